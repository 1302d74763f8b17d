//! The packed words a probe hands the board, as zero-cost types: what a slot is polling (a
//! [`CulpritWord`]), how long the poll's task waited to be polled (a [`Wait`]), and what a slot's
//! ring holds for the watchdog (a [`Measure`]). Each is a `#[repr(transparent)]` `u64` with
//! `const fn` accessors, so the hot path compiles to the same instructions as bare `u64`s, and a
//! swapped argument is a compile error instead of a wrong report.

use std::panic::Location;

use crate::kinds::KindId;
use crate::stall::LayerKind;

// --- the culprit word ----------------------------------------------------------------------
//
// bits 0..2  tag: 0 none, 1 interned kind, 2 `&'static Location` pointer (tokio poll hooks)
// tag 1:     bits 2..4 layer, bit 4 set if the kind has a name, bits 32..64 kind id
// tag 2:     the pointer shifted left by 2 (a `Location` is at least 4-aligned, so bits 0..4
//            are then free: bits 2..4, the layer, read 0, async). One layer read serves every
//            tag (a poll's end reads it on its common path).

const TAG_MASK: u64 = 0b11;
const TAG_KIND: u64 = 1;
const TAG_LOCATION: u64 = 2;
const LAYER_SHIFT: u32 = 2;
const LAYER_MASK: u64 = 0b11 << LAYER_SHIFT;
const NAMED: u64 = 1 << 4;
// A location's pointer, shifted left by 2, leaves the layer bits 0 (async).
const _: () = assert!(std::mem::align_of::<Location<'static>>() >= 4);

/// What a slot is polling: an interned task kind on its layer, or a spawn location (the poll
/// hooks, resolved to a kind later by the watchdog), or nothing.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct CulpritWord(u64);

/// A decoded culprit word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Culprit {
    None,
    Kind(KindId, LayerKind),
    Location(&'static Location<'static>),
}

impl CulpritWord {
    /// Nothing is polled.
    pub(crate) const NONE: CulpritWord = CulpritWord(0);

    /// An interned kind polled on `layer`; `named` says if the kind has a name.
    #[inline]
    pub(crate) const fn kind(kind: KindId, layer: LayerKind, named: bool) -> CulpritWord {
        CulpritWord(
            ((kind as u64) << 32)
                | ((layer as u64) << LAYER_SHIFT)
                | if named { NAMED } else { 0 }
                | TAG_KIND,
        )
    }

    /// A spawn location (the poll-hook probe).
    #[inline]
    #[cfg_attr(not(tokio_unstable), allow(dead_code))]
    pub(crate) fn location(loc: &'static Location<'static>) -> CulpritWord {
        CulpritWord(((loc as *const Location<'static> as u64) << 2) | TAG_LOCATION)
    }

    /// The word as a slot's atomic holds it.
    #[inline]
    pub(crate) const fn bits(self) -> u64 {
        self.0
    }

    /// A word read back from a slot's atomic (written there with [`bits`](Self::bits)).
    #[inline]
    pub(crate) const fn from_bits(bits: u64) -> CulpritWord {
        CulpritWord(bits)
    }

    #[inline]
    pub(crate) const fn is_none(self) -> bool {
        self.0 == 0
    }

    /// The layer of the thread that polls it (a location is always async).
    #[inline]
    pub(crate) const fn layer(self) -> LayerKind {
        LayerKind::from_bits(self.layer_bits())
    }

    /// The layer's two bits (0 for a location or none; 3 is never made, read as async).
    #[inline]
    pub(crate) const fn layer_bits(self) -> u64 {
        (self.0 & LAYER_MASK) >> LAYER_SHIFT
    }

    /// A job of tokio's blocking pool.
    #[inline]
    pub(crate) const fn is_blocking(self) -> bool {
        self.0 & (TAG_MASK | LAYER_MASK) == TAG_KIND | ((LayerKind::Blocking as u64) << LAYER_SHIFT)
    }

    /// A poll of the async layer (a location, or a kind on the async layer): the only polls
    /// the board's common path takes (its end compares with the async threshold alone). One
    /// test: the layer bits are 0 for both (a location's are its pointer's lowest bits, 0 for
    /// a `Location`'s alignment, see the layout above), and for none.
    #[inline]
    pub(crate) const fn is_async(self) -> bool {
        self.0 & LAYER_MASK == (LayerKind::Async as u64) << LAYER_SHIFT
    }

    /// An interned kind with a name (a location never has one).
    #[inline]
    pub(crate) const fn is_named(self) -> bool {
        self.0 & (TAG_MASK | NAMED) == TAG_KIND | NAMED
    }

    pub(crate) fn decode(self) -> Culprit {
        match self.0 & TAG_MASK {
            TAG_KIND => Culprit::Kind((self.0 >> 32) as KindId, self.layer()),
            TAG_LOCATION => {
                let p = ((self.0 & !TAG_MASK) >> 2) as *const Location<'static>;
                // SAFETY: a TAG_LOCATION word is only ever made by `location` from a
                // `&'static Location<'static>`, so the pointer is valid for the whole program.
                Culprit::Location(unsafe { &*p })
            }
            _ => Culprit::None,
        }
    }
}

// --- the wait word -------------------------------------------------------------------------

/// In a wait: measured exactly and chosen for the schedule-delay histogram by its probe.
const CHOSEN: u64 = 1 << 62;
/// In a wait: measured on the watchdog's coarse clock (good for victims, never for the
/// histogram).
const COARSE: u64 = 1 << 61;
/// The nanoseconds of a wait or a measure, without its flags.
const NANOS: u64 = COARSE - 1;

/// How long a poll's task waited from its wake to the poll, as its probe knows it.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wait(u64);

impl Wait {
    /// The probe does not know.
    pub(crate) const UNKNOWN: Wait = Wait(u64::MAX);
    /// The longest wait a word holds (about 73 years): longer ones are clamped.
    pub(crate) const MAX_NANOS: u64 = NANOS;

    /// Measured exactly; counted for the histogram if the poll is one the board times.
    #[inline]
    pub(crate) const fn exact(nanos: u64) -> Wait {
        Wait(clamp(nanos))
    }

    /// Measured exactly and chosen for the histogram by its probe, whatever the board times.
    #[inline]
    pub(crate) const fn chosen(nanos: u64) -> Wait {
        Wait(clamp(nanos) | CHOSEN)
    }

    /// A known wait too short to note: on the watchdog's coarse clock and below the board's
    /// floor (its nanoseconds, never used, read 0). [`is_quiet`](Self::is_quiet) at once.
    pub(crate) const QUIET: Wait = Wait(COARSE);

    /// Measured on the watchdog's coarse clock: good to a tick, for victims only.
    #[inline]
    pub(crate) const fn coarse(nanos: u64) -> Wait {
        Wait(clamp(nanos) | COARSE)
    }

    #[inline]
    pub(crate) const fn is_known(self) -> bool {
        self.0 != u64::MAX
    }

    /// Nothing to note for a poll the board does not time: unknown, or shorter than
    /// `floor_ns` (not a victim's) and not chosen for the histogram. `floor_ns` is below
    /// `1 << 61`. [`Wait::QUIET`] (a coarse wait of nothing) always is: a caller that passes
    /// the constant has the test fold away.
    #[inline]
    pub(crate) const fn is_quiet(self, floor_ns: u64) -> bool {
        self.0 == u64::MAX || self.0 == COARSE || self.0 & !COARSE < floor_ns
    }

    #[inline]
    pub(crate) const fn nanos(self) -> u64 {
        self.0 & NANOS
    }

    /// Does this wait count for the schedule-delay histogram, on a poll the board times
    /// (`poll_timed`) or not?
    #[inline]
    pub(crate) const fn for_histogram(self, poll_timed: bool) -> bool {
        (poll_timed && self.0 & COARSE == 0) || self.0 & CHOSEN != 0
    }
}

#[inline]
const fn clamp(nanos: u64) -> u64 {
    if nanos > NANOS {
        NANOS
    } else {
        nanos
    }
}

// --- the measure: what a slot's ring holds -------------------------------------------------

/// A measure is a wait, not a poll's duration.
const IS_WAIT: u64 = 1 << 63;
/// A wait that counts for the schedule-delay histogram (the others only find victims).
const TIMED: u64 = 1 << 62;
/// Not a wait that was measured: the poll's task was queued behind the stall that ended on its
/// worker, and the nanoseconds run from that stall's start to this poll's.
const QUEUED: u64 = 1 << 61;

/// One value a worker hands the watchdog: an exact poll duration (one poll in
/// `sample_every`), or how long a poll waited to be polled.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Measure(u64);

impl Measure {
    /// A timed poll's duration (a poll of 73 years or more would read as a wait).
    #[inline]
    pub(crate) const fn poll(nanos: u64) -> Measure {
        Measure(nanos)
    }

    /// A poll's schedule delay, from a [`Wait`]'s nanoseconds (so at most
    /// [`Wait::MAX_NANOS`]); `timed`: it counts for the histogram.
    #[inline]
    pub(crate) const fn wait(nanos: u64, timed: bool) -> Measure {
        Measure(nanos | IS_WAIT | if timed { TIMED } else { 0 })
    }

    /// A poll whose task was queued behind a stall that just ended on its worker (its wake is
    /// not known): `since_stall_ns` from that stall's start to this poll's.
    #[inline]
    pub(crate) const fn queued(since_stall_ns: u64) -> Measure {
        Measure(clamp(since_stall_ns) | IS_WAIT | QUEUED)
    }

    #[inline]
    pub(crate) const fn bits(self) -> u64 {
        self.0
    }

    #[inline]
    pub(crate) const fn from_bits(bits: u64) -> Measure {
        Measure(bits)
    }

    /// A poll queued behind a stall (see [`queued`](Self::queued)), not a measured wait.
    #[inline]
    pub(crate) const fn is_queued(self) -> bool {
        self.0 & (IS_WAIT | QUEUED) == IS_WAIT | QUEUED
    }

    #[inline]
    pub(crate) const fn is_wait(self) -> bool {
        self.0 & IS_WAIT != 0
    }

    /// A wait that counts for the schedule-delay histogram.
    #[inline]
    pub(crate) const fn is_timed_wait(self) -> bool {
        self.0 & (IS_WAIT | TIMED) == IS_WAIT | TIMED
    }

    #[inline]
    pub(crate) const fn nanos(self) -> u64 {
        self.0 & NANOS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_quiet_when_unknown_or_short_and_not_chosen() {
        let floor = 1_000_000;
        assert!(Wait::UNKNOWN.is_quiet(floor));
        for w in [Wait::exact(999_999), Wait::coarse(999_999), Wait::coarse(0)] {
            assert!(w.is_quiet(floor), "{w:?}");
        }
        for w in [
            Wait::exact(floor),
            Wait::coarse(floor),
            Wait::chosen(0),
            Wait::chosen(999_999),
            Wait::exact(Wait::MAX_NANOS),
        ] {
            assert!(!w.is_quiet(floor), "{w:?}");
        }
        // The highest floor (the board's, with no async threshold) keeps a chosen wait apart.
        assert!(Wait::coarse(Wait::MAX_NANOS - 1).is_quiet(Wait::MAX_NANOS));
        assert!(!Wait::chosen(1).is_quiet(Wait::MAX_NANOS));
    }

    #[test]
    fn a_kind_word_keeps_its_kind_layer_and_name() {
        for layer in [LayerKind::Async, LayerKind::Blocking, LayerKind::Cpu] {
            for named in [false, true] {
                let w = CulpritWord::kind(77, layer, named);
                assert_eq!(w.decode(), Culprit::Kind(77, layer));
                assert_eq!(w.layer(), layer);
                assert_eq!(w.is_named(), named);
                assert_eq!(w.is_blocking(), layer == LayerKind::Blocking);
                assert_eq!(CulpritWord::from_bits(w.bits()), w);
            }
        }
        assert_eq!(CulpritWord::NONE.decode(), Culprit::None);
        assert!(CulpritWord::NONE.is_none());
    }

    #[test]
    fn a_location_word_is_an_unnamed_async_culprit() {
        let loc = Location::caller();
        let w = CulpritWord::location(loc);
        assert_eq!(w.decode(), Culprit::Location(loc));
        assert_eq!(w.layer(), LayerKind::Async);
        assert!(!w.is_named() && !w.is_blocking());
    }

    #[test]
    fn a_wait_says_whether_it_counts_for_the_histogram() {
        assert!(Wait::exact(5).for_histogram(true));
        assert!(!Wait::exact(5).for_histogram(false));
        assert!(Wait::chosen(5).for_histogram(false));
        assert!(!Wait::coarse(5).for_histogram(true));
        assert_eq!(Wait::coarse(5).nanos(), 5);
        assert_eq!(Wait::chosen(u64::MAX).nanos(), Wait::MAX_NANOS);
        assert!(!Wait::UNKNOWN.is_known() && Wait::exact(0).is_known());
    }

    #[test]
    fn a_measure_is_a_poll_or_a_wait() {
        let p = Measure::poll(1234);
        assert!(!p.is_wait() && !p.is_timed_wait());
        assert_eq!(p.nanos(), 1234);
        let w = Measure::wait(Wait::exact(99).nanos(), true);
        assert!(w.is_wait() && w.is_timed_wait());
        assert_eq!(Measure::from_bits(w.bits()).nanos(), 99);
        assert!(!Measure::wait(99, false).is_timed_wait());
    }
}
