//! The board: one cache-line-padded slot per watched thread, written by that thread's probes
//! and read by the watchdog.
//!
//! # The poll protocol (the hot path)
//!
//! A probe calls [`Board::enter`] when a poll starts and [`Board::exit`] when it ends. Entering
//! and exiting nest (a task span around a user span, a poll hook around a task span): only the
//! outermost pair is a poll. On the common path a poll does, on the thread's own slot:
//!
//! - at start: a few relaxed stores (what is polled, the *watchdog's* clock as the start time)
//!   and a release store of the sequence number, which becomes odd;
//! - at end: one load of the watchdog's clock, a compare (to count a slow poll), and a release
//!   store that makes the sequence even again.
//!
//! No lock, no allocation, no syscall, and no clock read: the watchdog keeps time. Two things
//! read the real clock, both off the common path: one poll in `sample_every` (for the exact
//! poll-duration histogram), and the end of a poll the watchdog has flagged as a stall (for
//! the stall's exact end).
//!
//! The watchdog reads a slot like a seqlock: sequence, fields, sequence again; a changed
//! sequence means the fields may mix two polls and the read is dropped.
//!
//! # Slots
//!
//! A thread claims a slot the first time it polls under a board (allocation and locks are
//! fine there: once per thread), keeps it in a thread-local, and gives it back when it exits.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::kinds::{KindId, Kinds, OTHER, OWN};
use crate::stall::LayerKind;
use crate::words::{Culprit, CulpritWord, Measure, Wait};

/// The board's clock while the watchdog sleeps through an idle spell: "no time". A poll that starts then reads the real clock for its start; one that ends
/// then may be slow (see `Board::perhaps_slow`) and reads the real clock for its end. The top
/// bit alone, which no real clock value has (2^63 ns is 292 years), so the common path tests it
/// with a sign test, and a poll's end that reads it is far past any start.
pub(crate) const CLOCK_UNKNOWN: u64 = 1 << 63;

/// The monotonic clock, in nanoseconds from an arbitrary origin: `CLOCK_MONOTONIC`, which
/// `Instant` reads on Linux too, without `Instant`'s checked arithmetic and 128-bit
/// conversions (about 190 instructions less per reading; each timed poll reads it twice).
#[cfg(target_os = "linux")]
#[inline]
pub(crate) fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC exists on every Linux (it
    // cannot fail with these arguments; were it to, `ts` stays 0 and the reading is 0).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// The monotonic clock, in nanoseconds from the first reading in this process.
#[cfg(not(target_os = "linux"))]
pub(crate) fn mono_ns() -> u64 {
    static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
    let origin = ORIGIN.get_or_init(std::time::Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Is `clock` (the board's clock, as read) a time, not [`CLOCK_UNKNOWN`]?
#[inline(always)]
pub(crate) const fn clock_known(clock: u64) -> bool {
    (clock as i64) >= 0
}

/// The lowest bit of a poll's start: set, the start was read from the real clock (exact:
/// `precise_start`, or a poll that began while the watchdog slept through an idle spell);
/// clear, it is the watchdog's clock (the poll began at most a tick after it). The watchdog
/// publishes its clock with this bit clear.
pub(crate) const EXACT: u64 = 1;

/// Where a poll caught at its end is judged from: its start if exact; else three quarters of a
/// tick after the clock value it read (it began within the tick after it). Judged so, every
/// poll of 1.2 thresholds is caught at the default tick (a quarter of the threshold), and none
/// shorter than the threshold less a quarter tick. Its reported start is half a tick after
/// the value it read (see the watchdog's `catch`).
#[inline]
pub(crate) fn caught_from(start_ns: u64, tick_ns: u64) -> u64 {
    if is_exact(start_ns) {
        start_ns
    } else {
        start_ns.saturating_add(tick_ns / 4 * 3)
    }
}

/// Was a poll's start read from the real clock?
#[inline]
pub(crate) fn is_exact(start_ns: u64) -> bool {
    start_ns != CLOCK_UNKNOWN && start_ns & EXACT != 0
}

// --- slots -------------------------------------------------------------------------------------

/// One ring entry: a [`Record`] in atomics.
#[derive(Debug, Default)]
pub(crate) struct Sample {
    word: AtomicU64,
    measure: AtomicU64,
    start: AtomicU64,
    task: AtomicU64,
}

/// A record a worker hands the watchdog: an exact poll duration (one poll in `sample_every`),
/// or how long a poll waited to start (then `start` is the board's clock at its start and
/// `task` its task id).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record {
    pub(crate) word: CulpritWord,
    pub(crate) measure: Measure,
    pub(crate) start: u64,
    pub(crate) task: u64,
}

/// The poll a schedule delay belongs to.
#[derive(Debug, Clone, Copy)]
struct Polled {
    word: CulpritWord,
    task: u64,
    start_ns: u64,
}

/// A poll that ended past its threshold without the watchdog having flagged it (it ran
/// between two of its looks, or the watchdog was late): the owner caught it at its end, with
/// the real clock. `seq` is the poll's (odd) sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caught {
    pub(crate) seq: u64,
    pub(crate) word: CulpritWord,
    /// The outermost named culprit of the poll (a watched future or span inside a task).
    pub(crate) named: CulpritWord,
    pub(crate) task: u64,
    /// Its start as it read it (the watchdog's clock, or exact: see [`is_exact`]).
    pub(crate) start_ns: u64,
    /// Its end, from the real clock.
    pub(crate) end_ns: u64,
}

/// Facts about the thread that owns a slot, set when it claims the slot.
#[derive(Debug, Clone)]
pub(crate) struct ThreadMeta {
    pub(crate) name: Option<Arc<str>>,
    pub(crate) tid: Option<u64>,
}

const RING: usize = 1024;

/// Nested entries whose ids (and culprits) a thread keeps; deeper ones are followed by depth
/// alone.
const MAX_DEPTH: usize = 8;

/// In `Local::gate`'s low bits (a board's address has them clear): the common path opened a
/// poll with [`PROBE`].
const OPEN_PROBE: usize = 1;

/// In `Local::gate`'s low bits: the common path opened a poll with the span id in
/// `Local::open`.
const OPEN_SPAN: usize = 2;

// The gate's tags fit in the low bits of a board's address.
const _: () = assert!(std::mem::align_of::<Board>() > OPEN_PROBE | OPEN_SPAN);

/// The common path's name for `board` in `Local::gate`: its address (never 0; the tags go in
/// its low bits, clear by the board's alignment).
#[inline(always)]
fn gate_of(board: &Board) -> usize {
    ptr::from_ref(board) as usize
}

/// The gate's tag for a poll the common path opens with `id`.
#[inline(always)]
const fn open_tag(id: u64) -> usize {
    if id == PROBE {
        OPEN_PROBE
    } else {
        OPEN_SPAN
    }
}

/// Polls noted as queued behind one stall, at most (each is a ring record).
const MAX_QUEUED: usize = RING / 4;

/// How long an ended stall of `threshold_ns` is held for its victims' records: they are polled
/// right after it, so a few ticks' worth, between 5 and 100 ms. A worker notes the polls queued
/// behind a stall for as long.
pub(crate) fn hold_window_ns(threshold_ns: u64) -> u64 {
    threshold_ns.clamp(5_000_000, 100_000_000)
}

/// One thread's state. Aligned so two threads never share a cache line.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Slot {
    // Written by the owning thread only.
    seq: AtomicU64,
    culprit: AtomicU64,
    task: AtomicU64,
    named: AtomicU64,
    inner: AtomicU64,
    start_ns: AtomicU64,
    end_coarse_ns: AtomicU64,
    end_ns: AtomicU64,
    slow_polls: AtomicU64,
    /// Polls found to be phantoms and ended without being counted (see [`Board::enter`]).
    phantoms: AtomicU64,
    /// The last poll that ended past its threshold without the watchdog having flagged it
    /// (caught at its end), a seqlock on `caught_seq`: its sequence number (0: none yet).
    caught_seq: AtomicU64,
    caught_word: AtomicU64,
    caught_named: AtomicU64,
    caught_task: AtomicU64,
    caught_start: AtomicU64,
    caught_end: AtomicU64,
    ring_head: AtomicU64,
    ring_dropped: AtomicU64,
    // Written by the watchdog.
    flagged: AtomicU64,
    /// A poll the watchdog found not running (its thread parked in the runtime): the owner
    /// ends it, uncounted, at its next enter.
    phantom: AtomicU64,
    ring_tail: AtomicU64,
    // Claim state and the cold parts.
    claimed: AtomicBool,
    ring: OnceLock<Box<[Sample]>>,
    meta: Mutex<Option<ThreadMeta>>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            seq: AtomicU64::new(0),
            culprit: AtomicU64::new(0),
            task: AtomicU64::new(0),
            named: AtomicU64::new(0),
            inner: AtomicU64::new(0),
            start_ns: AtomicU64::new(0),
            end_coarse_ns: AtomicU64::new(0),
            end_ns: AtomicU64::new(0),
            slow_polls: AtomicU64::new(0),
            phantoms: AtomicU64::new(0),
            caught_seq: AtomicU64::new(0),
            caught_word: AtomicU64::new(0),
            caught_named: AtomicU64::new(0),
            caught_task: AtomicU64::new(0),
            caught_start: AtomicU64::new(0),
            caught_end: AtomicU64::new(0),
            ring_head: AtomicU64::new(0),
            ring_dropped: AtomicU64::new(0),
            flagged: AtomicU64::new(0),
            phantom: AtomicU64::new(0),
            ring_tail: AtomicU64::new(0),
            claimed: AtomicBool::new(false),
            ring: OnceLock::new(),
            meta: Mutex::new(None),
        }
    }

    /// Reads the poll in progress, if the slot was stable while read.
    pub(crate) fn read(&self) -> SlotRead {
        let s1 = self.seq.load(Ordering::Acquire);
        let word = CulpritWord::from_bits(self.culprit.load(Ordering::Relaxed));
        let task = self.task.load(Ordering::Relaxed);
        // A named poll names itself; `named` holds a name found inside an unnamed one.
        let named = match self.named.load(Ordering::Relaxed) {
            _ if word.is_named() => word,
            n => CulpritWord::from_bits(n),
        };
        let inner = CulpritWord::from_bits(self.inner.load(Ordering::Relaxed));
        let start_ns = self.start_ns.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        let s2 = self.seq.load(Ordering::Relaxed);
        SlotRead {
            seq: s2,
            stable: s1 == s2,
            word,
            task,
            named,
            inner,
            start_ns,
        }
    }

    /// Flags the poll `seq` as a stall: its end will read the real clock.
    pub(crate) fn flag(&self, seq: u64) {
        self.end_ns.store(0, Ordering::Relaxed);
        self.flagged.store(seq, Ordering::SeqCst);
    }

    /// The exact end of the flagged poll, if the worker saw the flag (0 if not).
    pub(crate) fn flagged_end_ns(&self) -> u64 {
        self.end_ns.load(Ordering::Acquire)
    }

    /// The watchdog's clock when the last poll ended.
    pub(crate) fn end_coarse_ns(&self) -> u64 {
        self.end_coarse_ns.load(Ordering::Relaxed)
    }

    pub(crate) fn slow_polls(&self) -> u64 {
        self.slow_polls.load(Ordering::Relaxed)
    }

    /// Marks poll `seq` as a phantom: its thread is parked, so it is not running. The owner
    /// ends it at its next enter (watchdog only).
    pub(crate) fn mark_phantom(&self, seq: u64) {
        self.phantom.store(seq, Ordering::Relaxed);
    }

    /// The poll the watchdog marked a phantom last (its sequence number).
    pub(crate) fn marked_phantom(&self) -> u64 {
        self.phantom.load(Ordering::Relaxed)
    }

    /// The last poll caught at its end (see [`Caught`]), if it was read whole.
    pub(crate) fn caught(&self) -> Option<Caught> {
        let seq = self.caught_seq.load(Ordering::Acquire);
        if seq == 0 {
            return None;
        }
        let c = Caught {
            seq,
            word: CulpritWord::from_bits(self.caught_word.load(Ordering::Relaxed)),
            named: CulpritWord::from_bits(self.caught_named.load(Ordering::Relaxed)),
            task: self.caught_task.load(Ordering::Relaxed),
            start_ns: self.caught_start.load(Ordering::Relaxed),
            end_ns: self.caught_end.load(Ordering::Relaxed),
        };
        fence(Ordering::Acquire);
        (self.caught_seq.load(Ordering::Relaxed) == seq).then_some(c)
    }

    /// Polls the owner ended as phantoms (those the watchdog did not mark first).
    pub(crate) fn phantoms(&self) -> u64 {
        self.phantoms.load(Ordering::Relaxed)
    }

    pub(crate) fn samples_dropped(&self) -> u64 {
        self.ring_dropped.load(Ordering::Relaxed)
    }

    /// The owner's name and OS thread id; `None` if the owner is claiming the slot right now
    /// (the watchdog never waits on a worker).
    pub(crate) fn meta(&self) -> Option<ThreadMeta> {
        self.meta.try_lock().ok().and_then(|m| m.clone())
    }

    /// Takes the records pushed since the last drain (watchdog only).
    pub(crate) fn drain_samples(&self, mut f: impl FnMut(Record)) {
        let Some(ring) = self.ring.get() else { return };
        let head = self.ring_head.load(Ordering::Acquire);
        let mut tail = self.ring_tail.load(Ordering::Relaxed);
        while tail < head {
            let s = &ring[(tail as usize) & (RING - 1)];
            f(Record {
                word: CulpritWord::from_bits(s.word.load(Ordering::Relaxed)),
                measure: Measure::from_bits(s.measure.load(Ordering::Relaxed)),
                start: s.start.load(Ordering::Relaxed),
                task: s.task.load(Ordering::Relaxed),
            });
            tail += 1;
        }
        self.ring_tail.store(tail, Ordering::Release);
    }

    #[inline]
    fn push(&self, r: Record) {
        let Some(ring) = self.ring.get() else { return };
        let head = self.ring_head.load(Ordering::Relaxed);
        let tail = self.ring_tail.load(Ordering::Acquire);
        if head - tail >= RING as u64 {
            self.ring_dropped.store(
                self.ring_dropped.load(Ordering::Relaxed) + 1,
                Ordering::Relaxed,
            );
            return;
        }
        let s = &ring[(head as usize) & (RING - 1)];
        s.word.store(r.word.bits(), Ordering::Relaxed);
        s.measure.store(r.measure.bits(), Ordering::Relaxed);
        s.start.store(r.start, Ordering::Relaxed);
        s.task.store(r.task, Ordering::Relaxed);
        self.ring_head.store(head + 1, Ordering::Release);
    }
}

/// What the watchdog read from a slot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotRead {
    pub(crate) seq: u64,
    pub(crate) stable: bool,
    pub(crate) word: CulpritWord,
    pub(crate) task: u64,
    /// The outermost culprit with a name (a named span or watched future inside an unnamed
    /// task), none if none.
    pub(crate) named: CulpritWord,
    /// The innermost span open in the poll, none if none is nested.
    pub(crate) inner: CulpritWord,
    pub(crate) start_ns: u64,
}

impl SlotRead {
    pub(crate) fn in_poll(&self) -> bool {
        self.seq & 1 == 1
    }
}

// --- the board ---------------------------------------------------------------------------------

#[repr(align(128))]
#[derive(Debug)]
struct Padded<T>(T);

/// Every slot, the watchdog's clock, and what the probes need to know of the config.
#[derive(Debug)]
pub(crate) struct Board {
    /// The monotonic clock's reading at the board's creation (see [`mono_ns`]).
    epoch_ns: u64,
    epoch_system: SystemTime,
    /// The watchdog's clock: nanoseconds since `epoch`, stored every tick.
    clock_ns: Padded<AtomicU64>,
    /// Per-layer threshold in nanoseconds (`u64::MAX`: the layer is not watched).
    thresholds_ns: [u64; 3],
    /// `sample_every - 1`, shifted left one bit: a poll's sequence number (twice its count)
    /// masked with it is 0 for the one poll in `sample_every` the board times.
    sample_bits: u64,
    precise_start: bool,
    /// The watchdog's tick: a start read from its clock is at most this much early.
    tick_ns: u64,
    /// Per layer, how long after its start (as read) a poll may have passed its threshold:
    /// the threshold less a tick (the start and end read from the watchdog's clock are each
    /// up to a tick early). Both ends of a poll compare the clock with its start plus this
    /// (see `perhaps_slow`).
    slow_after_ns: [i64; 4],
    /// A poll that waited at least this long to start is recorded (a possible victim).
    wait_floor_ns: u64,
    /// A probe that knows schedule delays is installed (victims can be found).
    waits_known: AtomicBool,
    /// Watched futures note their wakes (`schedule_delay`, default on).
    pub(crate) track_wakes: bool,
    /// Reads how many tasks are queued on the calling worker (its runtime's metrics), set by
    /// a probe that learns victims from the queue (the poll hooks without tokio's
    /// schedule-latency tracking). Called only at the end of a stall, on its worker.
    queue_reader: OnceLock<fn() -> usize>,
    /// The watchdog sleeps through an idle spell (its clock reads [`CLOCK_UNKNOWN`]): the first
    /// poll that starts then wakes it (see [`Board::wake_watchdog`]).
    sleeping: AtomicBool,
    /// The watchdog's thread, to wake it.
    watchdog: OnceLock<std::thread::Thread>,
    slots: Box<[Slot]>,
    high_water: AtomicUsize,
    unwatched_threads: AtomicU64,
    pub(crate) kinds: Kinds,
    /// tokio's blocking pool, as seen through `spawn_blocking` wrappers.
    pub(crate) blocking: BlockingStats,
}

/// Jobs given to loopwatch's `spawn_blocking` wrappers. A cache line of their own: they are
/// counted at every job, on any thread, and the board's other fields are read at every poll.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct BlockingStats {
    pub(crate) submitted: AtomicU64,
    pub(crate) started: AtomicU64,
    pub(crate) finished: AtomicU64,
    /// The pool's size limit, as configured (`max_blocking_threads`).
    pub(crate) max_threads: AtomicU64,
}

impl BlockingStats {
    pub(crate) fn running(&self) -> u64 {
        self.started
            .load(Ordering::Relaxed)
            .saturating_sub(self.finished.load(Ordering::Relaxed))
    }

    pub(crate) fn queued(&self) -> u64 {
        self.submitted
            .load(Ordering::Relaxed)
            .saturating_sub(self.started.load(Ordering::Relaxed))
    }
}

impl Board {
    pub(crate) fn new(
        thresholds: [Option<Duration>; 3],
        sample_every: u32,
        precise_start: bool,
        max_threads: usize,
        max_kinds: usize,
    ) -> Board {
        debug_assert!(
            sample_every.is_power_of_two() && sample_every <= crate::config::MAX_SAMPLE_EVERY,
            "sample_every is checked by the config"
        );
        let epoch_ns = mono_ns();
        let mut board = Board {
            epoch_ns,
            epoch_system: SystemTime::now(),
            // Until the watchdog's first tick, a poll's start reads the board's epoch: before
            // it, as a start read off the watchdog's clock always is (the watchdog bounds it
            // by the clock it publishes next).
            clock_ns: Padded(AtomicU64::new(0)),
            thresholds_ns: thresholds
                .map(|t| t.map_or(u64::MAX, |d| d.as_nanos().try_into().unwrap_or(u64::MAX))),
            sample_bits: (u64::from(sample_every.max(1)) - 1) << 1,
            precise_start,
            tick_ns: 0,
            slow_after_ns: [0; 4],
            // At most a wait's largest value, so `Wait::is_quiet` can tell a chosen wait.
            wait_floor_ns: thresholds[0]
                .map_or(u64::MAX, |t| {
                    u64::try_from(t.as_nanos() / 10).unwrap_or(u64::MAX)
                })
                .min(Wait::MAX_NANOS),
            waits_known: AtomicBool::new(false),
            track_wakes: true,
            queue_reader: OnceLock::new(),
            sleeping: AtomicBool::new(false),
            watchdog: OnceLock::new(),
            slots: (0..max_threads).map(|_| Slot::new()).collect(),
            high_water: AtomicUsize::new(0),
            unwatched_threads: AtomicU64::new(0),
            kinds: Kinds::new(max_kinds),
            blocking: BlockingStats::default(),
        };
        board.set_tick(0);
        board
    }

    /// The board for `cfg`: its layers' thresholds, sampling, start precision and limits.
    pub(crate) fn for_config(cfg: &Config) -> Board {
        let mut board = Board::new(
            [
                Some(cfg.threshold),
                Some(cfg.blocking_threshold),
                Some(cfg.cpu_threshold),
            ],
            cfg.sample_every,
            cfg.precise_start,
            cfg.max_threads,
            cfg.max_task_kinds,
        );
        board.set_tick(u64::try_from(cfg.tick.as_nanos()).unwrap_or(u64::MAX));
        board
    }

    fn set_tick(&mut self, tick_ns: u64) {
        self.tick_ns = tick_ns;
        // Below zero where a layer's threshold is shorter than the tick: then a poll whose
        // clock reads a little behind its exact start may be slow. A layer that is not watched
        // is never slow.
        let tick = i64::try_from(tick_ns).unwrap_or(i64::MAX);
        let [a, b, c] = self
            .thresholds_ns
            .map(|t| i64::try_from(t).map_or(i64::MAX, |t| t.saturating_sub(tick)));
        // Indexed by a culprit word's layer bits (3 is never made: async, as `layer` reads it).
        self.slow_after_ns = [a, b, c, a];
    }

    /// The watchdog's tick, nanoseconds.
    #[cfg(test)]
    pub(crate) fn tick_ns(&self) -> u64 {
        self.tick_ns
    }

    /// The watchdog's clock (updated every tick), or [`CLOCK_UNKNOWN`] during an idle spell.
    #[inline]
    pub(crate) fn coarse_ns(&self) -> u64 {
        self.clock_ns.0.load(Ordering::Relaxed)
    }

    /// Nanoseconds since the board's epoch, from the real clock.
    #[inline]
    pub(crate) fn now_ns(&self) -> u64 {
        mono_ns().saturating_sub(self.epoch_ns)
    }

    /// The wall-clock time of a board timestamp.
    pub(crate) fn system_time(&self, ns: u64) -> SystemTime {
        self.epoch_system + Duration::from_nanos(ns)
    }

    /// Stores the watchdog's clock (watchdog only). Its lowest bit is cleared: a start with it
    /// set was read from the real clock (see [`EXACT`]).
    pub(crate) fn tick(&self, now_ns: u64) {
        let v = if now_ns == CLOCK_UNKNOWN {
            now_ns
        } else {
            now_ns & !EXACT
        };
        self.clock_ns.0.store(v, Ordering::Relaxed);
    }

    /// The calling thread is the watchdog (watchdog only, once).
    pub(crate) fn set_watchdog(&self) {
        let _ = self.watchdog.set(std::thread::current());
    }

    /// The watchdog sleeps through an idle spell: its clock reads [`CLOCK_UNKNOWN`] until it
    /// ticks again, and the first poll that starts meanwhile wakes it (watchdog only).
    pub(crate) fn sleep_unknown(&self) {
        // Before the clock: a poll that reads "unknown" then sees `sleeping` (see
        // `wake_watchdog`'s fence).
        self.sleeping.store(true, Ordering::Relaxed);
        self.clock_ns.0.store(CLOCK_UNKNOWN, Ordering::Release);
    }

    /// The watchdog ticks again (watchdog only). Returns whether a poll woke it.
    pub(crate) fn awake(&self) -> bool {
        !self.sleeping.swap(false, Ordering::Relaxed)
    }

    /// Was the watchdog woken from its idle sleep by a poll (or never sent to sleep)?
    pub(crate) fn woken(&self) -> bool {
        !self.sleeping.load(Ordering::Relaxed)
    }

    /// A poll starts while the watchdog's clock reads "unknown": wake the watchdog if it sleeps
    /// through an idle spell, so the clock runs again within a wake-up's latency instead of
    /// up to a threshold and a tick. Once per idle spell (the first poll to see it asleep);
    /// off the common path (a poll that reads "unknown" takes the full path). Its cost, an
    /// unpark (one futex wake), is paid once by the first poll after an idle spell; it keeps
    /// the polls after it on the common path, and their ends from reading the real clock.
    #[cold]
    fn wake_watchdog(&self) {
        fence(Ordering::Acquire);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::AcqRel) {
            if let Some(t) = self.watchdog.get() {
                t.unpark();
            }
        }
    }

    pub(crate) fn threshold_ns(&self, layer: LayerKind) -> u64 {
        self.thresholds_ns[layer as usize]
    }

    pub(crate) fn sample_every(&self) -> u64 {
        (self.sample_bits >> 1) + 1
    }

    /// Is a count (of polls, say) one of the one in `sample_every` the board times?
    #[inline]
    pub(crate) fn sampled(&self, count: u64) -> bool {
        self.sampled_seq(count << 1)
    }

    /// Is the poll of (even) sequence number `seq` (twice the slot's poll count, see
    /// [`Slot`]) one the board times? The one rule of [`sampled`](Self::sampled) too.
    #[inline(always)]
    fn sampled_seq(&self, seq: u64) -> bool {
        seq & self.sample_bits == 0
    }

    /// A known wait at least this long is noted (a possible victim's); a shorter one only
    /// if chosen for the histogram.
    #[inline]
    pub(crate) fn wait_floor_ns(&self) -> u64 {
        self.wait_floor_ns
    }

    /// A probe that reports schedule delays (tokio's poll hooks with schedule latency, or a
    /// [`Watched`](crate::Watched) future) is in use: stalls wait a little after they end to
    /// collect their victims.
    pub(crate) fn set_waits_known(&self) {
        // Called at every `watch()`: a store each time would take the cache line of the
        // fields every poll reads (sampling, the quiet-wait floor) from the other workers.
        if !self.waits_known.load(Ordering::Relaxed) {
            self.waits_known.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn waits_known(&self) -> bool {
        self.waits_known.load(Ordering::Relaxed)
    }

    /// Victims are learnt from the queue: at the end of a stall of the async layer, its worker
    /// reads with `reader` how many tasks are queued on it, and notes that many of the polls
    /// that follow as queued behind it (see [`arm_queued`](Self::arm_queued)).
    #[cfg_attr(not(tokio_unstable), allow(dead_code))]
    pub(crate) fn set_queue_reader(&self, reader: fn() -> usize) {
        let _ = self.queue_reader.set(reader);
        self.set_waits_known();
    }

    /// The slots that have ever been claimed.
    pub(crate) fn slots(&self) -> &[Slot] {
        let n = self
            .high_water
            .load(Ordering::Acquire)
            .min(self.slots.len());
        &self.slots[..n]
    }

    /// Threads that polled but found no free slot.
    pub(crate) fn unwatched_threads(&self) -> u64 {
        self.unwatched_threads.load(Ordering::Relaxed)
    }

    /// A poll (or a nested span) starts on this thread. `id` is what was entered, so that its
    /// exit can be matched to it: a span's id, or [`PROBE`] for a probe's own poll (poll hooks,
    /// wrappers, pool jobs: always exited on the thread that entered, in order). `task`: the
    /// task polled (0: not known). `waited`: how long the task waited from its wake to this
    /// poll, or [`Wait::UNKNOWN`].
    ///
    /// An enter nested in an open poll of *another* task (both ids known), or in a poll the
    /// watchdog found parked, means that open poll is a phantom: a span entered with
    /// `span.enter()` and held across an `.await`, whose exit comes later or on another
    /// thread. The phantom is ended, uncounted, and this enter starts a poll of its own.
    #[inline]
    pub(crate) fn enter(
        self: &Arc<Self>,
        id: u64,
        word: CulpritWord,
        task: impl FnOnce() -> u64,
        waited: Wait,
    ) {
        self.enter_with(id, word, task, waited, |task| {
            self.enter_full(id, word, task, waited);
        });
    }

    /// [`enter`](Self::enter) for a probe that has its task id at hand (the poll hooks, from
    /// tokio's `TaskMeta`; a watched future without wake notes, which learns it at its first
    /// poll): the id is read before the common path's tests and handed to the full path
    /// already read. (Read after the tests, it cost the hooks one instruction; a watched
    /// future's learning call there kept the clock and sequence on the stack, 4 more.)
    #[inline]
    pub(crate) fn enter_task(
        self: &Arc<Self>,
        id: u64,
        word: CulpritWord,
        task: u64,
        waited: Wait,
    ) {
        self.enter_with(
            id,
            word,
            move || task,
            waited,
            |task| {
                self.enter_full(id, word, task, waited);
            },
        );
    }

    /// [`enter`](Self::enter)'s common path, and `full` off it.
    #[inline(always)]
    fn enter_with<T: FnOnce() -> u64>(
        self: &Arc<Self>,
        id: u64,
        word: CulpritWord,
        task: T,
        waited: Wait,
        full: impl FnOnce(T),
    ) {
        {
            let Some(l) = local() else { return };
            let me = gate_of(self);
            // The common case: this thread's slot on this board, no poll open (one compare:
            // the gate), the watchdog's clock running, a poll of the async layer, and nothing
            // to note (a wait long enough for a victim or chosen for the histogram, a timed
            // poll).
            if l.gate.get() == me {
                // SAFETY: the gate is this board (alive: the caller holds it) only while
                // `fast` is, that is while this thread holds one of its slots, whose address
                // `slot_ptr` is (the slots never move).
                let slot = unsafe { &*l.slot_ptr.get() };
                let s = slot.seq.load(Ordering::Relaxed);
                let start = self.clock_ns.0.load(Ordering::Relaxed);
                if clock_known(start)
                    && !self.sampled_seq(s)
                    && word.is_async()
                    && waited.is_quiet(self.wait_floor_ns)
                {
                    // Open on the common path: depth 1, `id` at the bottom (see `settle`).
                    l.gate.set(me + open_tag(id));
                    if id != PROBE {
                        l.open.set(id);
                    }
                    // The previous poll's end (even sequence) is published before this
                    // poll's fields (seqlock), as in `begin`.
                    fence(Ordering::Release);
                    slot.culprit.store(word.bits(), Ordering::Relaxed);
                    slot.task.store(task(), Ordering::Relaxed);
                    slot.start_ns.store(start, Ordering::Relaxed);
                    slot.seq.store(s | 1, Ordering::Release);
                    return;
                }
            }
            full(task);
        }
    }

    /// [`enter`](Self::enter)'s full path, with the task id still to be read (the common
    /// path's caller keeps nothing live for it). It finds this thread's state again: handed
    /// it, the common path kept its address in a register for it at every poll (a probe's
    /// common path addresses it from the thread pointer; 2 instructions at each end of a
    /// watched poll; see `exit_nested` too).
    #[inline(never)]
    fn enter_full(
        self: &Arc<Self>,
        id: u64,
        word: CulpritWord,
        task: impl FnOnce() -> u64,
        waited: Wait,
    ) {
        let Some(l) = local() else { return };
        self.enter_nested(l, id, word, task(), waited);
    }

    /// [`enter`](Self::enter) off its common path: the thread's first poll under this board,
    /// or a span nested in an open poll. (Inlined in each probe's `enter_full`: a span nested
    /// in a task span takes this path at every poll.)
    #[inline(always)]
    fn enter_nested(
        self: &Arc<Self>,
        l: &Local,
        id: u64,
        word: CulpritWord,
        task: u64,
        waited: Wait,
    ) {
        {
            l.settle();
            if !ptr::eq(l.board.get(), Arc::as_ptr(self)) && !self.attach(l, word) {
                return;
            }
            let Some(slot) = self.slots.get(l.slot.get()) else {
                return;
            };
            let mut depth = l.depth.get();
            if depth > 0 && is_phantom(slot, task) {
                self.end_phantom(slot, l);
                depth = 0;
            }
            if let Some(c) = l.ids.get(depth as usize) {
                c.set(id);
            }
            l.set_open(depth + 1);
            if depth == 0 {
                self.begin(slot, l, word, task, waited);
            } else {
                // A span nested in the poll: it is the innermost now, and it may name the task.
                l.dirty.set(true);
                if let Some(s) = l.stack.get(depth as usize) {
                    s.set(word.bits());
                }
                slot.inner.store(word.bits(), Ordering::Relaxed);
                // A named poll keeps its own name (the outermost).
                if word.is_named()
                    && !CulpritWord::from_bits(slot.culprit.load(Ordering::Relaxed)).is_named()
                    && (l.named_left.get() || slot.named.load(Ordering::Relaxed) == 0)
                {
                    l.named_left.set(false);
                    slot.named.store(word.bits(), Ordering::Relaxed);
                    if l.first_named.get() == 0 {
                        l.first_named.set(word.bits());
                    }
                }
                if waited.is_known() && !l.wait_noted.get() {
                    // A watched future inside a span's poll: its wake time is the task's.
                    l.wait_noted.set(true);
                    let timed = l.sample_start.get() != 0;
                    let polled = Polled {
                        word,
                        task: slot.task.load(Ordering::Relaxed),
                        start_ns: slot.start_ns.load(Ordering::Relaxed),
                    };
                    self.note_wait(slot, polled, waited, timed);
                }
            }
        }
    }

    /// `id` (a span's, or [`PROBE`]) is exited on this thread. It closes what was entered
    /// last with that id, and everything entered inside it that is still open (spans held
    /// across an `.await`: their own exits come later, or on another thread, and are then
    /// ignored). An exit that matches nothing open on this thread is ignored.
    #[inline]
    pub(crate) fn exit(self: &Arc<Self>, id: u64) {
        // (A constant closure: no frame for it on the common path.)
        self.exit_with(id, || self.exit_nested(id, &|| true));
    }

    /// [`exit`](Self::exit) for a probe that may exit ids it never entered (the layer, which
    /// sees every span): `followed` says whether `id` is one it entered. It is asked only where
    /// the board cannot tell by itself, past [`MAX_DEPTH`] nested entries (whose ids are not
    /// kept), so the common path needs no look-up.
    #[inline]
    pub(crate) fn exit_if(self: &Arc<Self>, id: u64, followed: impl Fn() -> bool) {
        self.exit_with(id, || self.exit_nested(id, &followed));
    }

    /// [`exit`](Self::exit)'s common path, and `full` off it.
    #[inline(always)]
    fn exit_with(self: &Arc<Self>, id: u64, full: impl FnOnce()) {
        {
            let Some(l) = local() else { return };
            let me = gate_of(self);
            // The common case: the poll the common path started ends (the gate, and for a
            // span its id: nothing nested, nothing noted since), and short on the watchdog's
            // clock (see `end`; it is of the async layer). For a probe's own poll, one compare.
            if l.gate.get() == me + open_tag(id) && (id == PROBE || l.open.get() == id) {
                // SAFETY: as in `enter`.
                let slot = unsafe { &*l.slot_ptr.get() };
                let s = slot.seq.load(Ordering::Relaxed);
                let coarse = self.clock_ns.0.load(Ordering::Relaxed);
                let start = slot.start_ns.load(Ordering::Relaxed);
                // The watchdog's clock did not move since the poll started: it cannot have
                // passed its threshold (`perhaps_slow`: the async layer's threshold is more
                // than a tick, or the common path is off, see `attach`). One compare; a poll
                // that saw a tick takes the full path, which applies the rule exactly.
                if coarse == start {
                    l.gate.set(me);
                    slot.end_coarse_ns.store(coarse, Ordering::Relaxed);
                    // The common path opened it: its sequence is odd.
                    slot.seq.store(s + 1, Ordering::Release);
                    return;
                }
            }
            full();
        }
    }

    /// [`exit`](Self::exit) off its common path: spans nested in the poll. It finds this
    /// thread's state again, as `enter_full` does, and takes the board itself, not its `Arc`
    /// (one load less: −5 per poll for the layer under `tokio_unstable`, where a task span
    /// encloses every span it follows and this path is taken at every poll).
    #[inline(never)]
    fn exit_nested(&self, id: u64, followed: &dyn Fn() -> bool) {
        {
            let Some(l) = local() else { return };
            if !ptr::eq(l.board.get(), ptr::from_ref(self)) {
                return;
            }
            l.settle();
            let Some(slot) = self.slots.get(l.slot.get()) else {
                return;
            };
            let depth = l.depth.get() as usize;
            if depth == 0 {
                return;
            }
            // The open entry this exit closes: the innermost with its id. Deeper than the
            // id stack, the innermost (as before ids were kept), if the probe entered this id.
            let open = match l.ids.get(depth - 1) {
                // The common case: what was entered last.
                Some(top) if top.get() == id => depth - 1,
                Some(_) => match l.ids[..depth - 1].iter().rposition(|c| c.get() == id) {
                    Some(k) => k,
                    None => return,
                },
                None if followed() => depth - 1,
                None => return,
            };
            if open == 0 {
                l.set_closed();
                self.end(slot, l);
                return;
            }
            // Back to the span that encloses the one exited (none nested at depth 1).
            let inner = if open == 1 {
                0
            } else {
                l.stack.get(open - 1).map_or(0, Cell::get)
            };
            slot.inner.store(inner, Ordering::Relaxed);
            // Leaving the span that named the task (or one inside it): the spans around it
            // have no name (it was the outermost with one). The name stays until another
            // named culprit is entered in this poll, or the poll ends: the task's poll goes on
            // a moment after the future inside it returned (tokio stores its output, wakes
            // its joiner), and a stall flagged then is still that future's.
            let named = slot.named.load(Ordering::Relaxed);
            let closed = l.stack.get(open..depth).unwrap_or(&[]);
            // (A named poll names itself: `named` is set only inside an unnamed one.)
            if named != 0 && closed.iter().any(|c| c.get() == named) {
                l.named_left.set(true);
            }
            l.set_open(open as u32);
        }
    }

    /// This thread is about to park (the runtime's `on_thread_park`): no poll runs on it, so
    /// a poll still open here is a phantom, ended now.
    pub(crate) fn parked(self: &Arc<Self>) {
        let _ = LOCAL.try_with(|l| {
            if !ptr::eq(l.board.get(), Arc::as_ptr(self)) {
                return;
            }
            // Its queue is empty: no task polled after this waited behind the last stall.
            if l.queued_left.get() > 0 {
                self.disarm_queued(l);
            }
            l.settle();
            if l.depth.get() == 0 {
                return;
            }
            if let Some(slot) = self.slots.get(l.slot.get()) {
                self.end_phantom(slot, l);
            }
        });
    }

    /// Ends the open poll on this thread as a phantom: not counted, not timed, its stall (if
    /// the watchdog flagged it) ended by the watchdog as one.
    #[cold]
    fn end_phantom(&self, slot: &Slot, l: &Local) {
        l.settle();
        let s = slot.seq.load(Ordering::Relaxed);
        // One the watchdog marked (its thread seen parked) is counted there.
        if slot.phantom.load(Ordering::Relaxed) != s {
            slot.phantom.store(s, Ordering::Relaxed);
            slot.phantoms
                .store(slot.phantoms.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        slot.end_coarse_ns
            .store(self.clock_ns.0.load(Ordering::Relaxed), Ordering::Relaxed);
        self.clean(slot, l);
        slot.seq.store((s | 1) + 1, Ordering::Release);
        l.set_closed();
    }

    /// Puts back what a poll's start leaves alone (the slot's `named` and `inner`, the
    /// thread's notes of the poll) after a poll that changed them: a nested span, a named
    /// culprit, a known wait, or timing. Off the common path: a tiny poll of an unnamed task
    /// touches none of them.
    #[cold]
    fn clean(&self, slot: &Slot, l: &Local) {
        l.dirty.set(false);
        slot.named.store(0, Ordering::Relaxed);
        slot.inner.store(0, Ordering::Relaxed);
        l.first_named.set(0);
        l.named_left.set(false);
        l.wait_noted.set(false);
        l.sample_start.set(0);
    }

    #[inline]
    fn begin(&self, slot: &Slot, l: &Local, word: CulpritWord, task: u64, waited: Wait) {
        let s = slot.seq.load(Ordering::Relaxed);
        // The previous poll's end (even sequence) is published before the new poll's fields,
        // so a reader that sees these fields also sees a sequence past its own (seqlock).
        fence(Ordering::Release);
        slot.culprit.store(word.bits(), Ordering::Relaxed);
        slot.task.store(task, Ordering::Relaxed);
        // Between polls `named`, `inner` and the thread's notes are clear (see `clean`); a
        // named poll names itself (see `Slot::read`).
        let mut start = self.clock_ns.0.load(Ordering::Relaxed);
        // The watchdog sleeps through an idle spell (its clock reads CLOCK_UNKNOWN): this poll
        // may be the first of a stall it would otherwise see only when it wakes. Reading the
        // clock here is off the common path (the runtime was idle), and makes the start exact.
        if start == CLOCK_UNKNOWN {
            self.wake_watchdog();
        }
        if start == CLOCK_UNKNOWN || self.precise_start {
            start = self.exact_now();
        }
        slot.start_ns.store(start, Ordering::Relaxed);
        slot.seq.store(s | 1, Ordering::Release);
        // Blocking jobs are few and long: every one is timed, and its queue wait kept.
        let sampled = self.sampled_seq(s) || word.is_blocking();
        if waited.is_known() {
            l.dirty.set(true);
            l.wait_noted.set(true);
            let polled = Polled {
                word,
                task,
                start_ns: start,
            };
            self.note_wait(slot, polled, waited, sampled);
        }
        if sampled {
            self.start_timing(l);
        }
        if l.queued_left.get() > 0 {
            self.note_queued(slot, l, word, task, start);
        }
    }

    /// The real clock as a poll's exact start (see [`EXACT`]).
    #[cold]
    fn exact_now(&self) -> u64 {
        self.now_ns() | EXACT
    }

    /// Times this poll with the real clock (one in `sample_every`).
    #[cold]
    fn start_timing(&self, l: &Local) {
        l.dirty.set(true);
        l.sample_start.set(self.now_ns().max(1));
    }

    /// Keeps a poll's schedule delay if rare enough: a timed poll's (for the histogram), or a
    /// long one (a stall's victim, perhaps). `timed`: the board times this poll.
    #[inline]
    fn note_wait(&self, slot: &Slot, polled: Polled, waited: Wait, timed: bool) {
        // A probe may choose its own exact waits for the histogram, or say a wait is coarse.
        let timed = waited.for_histogram(timed);
        let nanos = waited.nanos();
        if timed || nanos >= self.wait_floor_ns {
            slot.push(Record {
                word: polled.word,
                measure: Measure::wait(nanos, timed),
                start: polled.start_ns,
                task: polled.task,
            });
        }
    }

    /// May a poll of `word` that started at `start` (as read) and ends at `coarse` (the
    /// watchdog's clock) have passed its threshold? Its start and end on the watchdog's clock
    /// are each up to a tick early, so: at least the threshold less a tick. The one rule of
    /// both ends of a poll (the common path's and the full path's). Signed: the watchdog's
    /// clock may read behind an exact start (slow only for a layer whose threshold is shorter
    /// than a tick). [`CLOCK_UNKNOWN`] is far past any start: the watchdog sleeps through an
    /// idle spell (a threshold and a tick), and a poll that ends then may have run through it
    /// unseen. A layer that is not watched (threshold `u64::MAX`) never is. A "perhaps" is then
    /// timed with the real clock.
    /// `layer`: the poll's layer bits ([`CulpritWord::layer_bits`]).
    #[inline(always)]
    fn perhaps_slow(&self, layer: usize, start: u64, coarse: u64) -> bool {
        (coarse.wrapping_sub(start) as i64) >= self.slow_after_ns[layer & 3]
    }

    #[inline]
    fn end(&self, slot: &Slot, l: &Local) {
        let s = slot.seq.load(Ordering::Relaxed);
        let coarse = self.clock_ns.0.load(Ordering::Relaxed);
        let word = CulpritWord::from_bits(slot.culprit.load(Ordering::Relaxed));
        let start = slot.start_ns.load(Ordering::Relaxed);
        if slot.flagged.load(Ordering::Relaxed) == s {
            self.flagged_end(slot, l, word, start, coarse);
        }
        if self.perhaps_slow(word.layer_bits() as usize, start, coarse) {
            let threshold = self.thresholds_ns[word.layer() as usize];
            let named = if word.is_named() {
                word.bits()
            } else {
                l.first_named.get()
            };
            if let Some(end) = self.slow_end(slot, s, word, start, threshold, named) {
                self.arm_queued(
                    l,
                    word,
                    start,
                    if clock_known(coarse) { coarse } else { end },
                );
            }
        }
        if l.dirty.get() {
            self.end_noted(slot, l);
        }
        slot.end_coarse_ns.store(coarse, Ordering::Relaxed);
        slot.seq.store((s | 1) + 1, Ordering::Release);
    }

    /// The poll the watchdog flagged as a stall ends: its exact end, from the real clock.
    #[cold]
    fn flagged_end(&self, slot: &Slot, l: &Local, word: CulpritWord, start: u64, coarse: u64) {
        let end = self.now_ns().max(1);
        slot.end_ns.store(end, Ordering::Relaxed);
        self.arm_queued(
            l,
            word,
            start,
            if coarse == CLOCK_UNKNOWN { end } else { coarse },
        );
    }

    /// A stall of the async layer that started at `start` ends on this thread at `end` (the
    /// watchdog's clock, as the polls that follow read their starts): with a queue reader, the
    /// tasks queued on this worker now waited behind it. As many of the polls that follow on
    /// this thread (the worker takes them from its queue), within the victims' hold window, are
    /// noted as queued behind it (see [`note_queued`](Self::note_queued)). The common path is
    /// left alone: `fast` is cleared until they are noted.
    #[cold]
    fn arm_queued(&self, l: &Local, word: CulpritWord, start: u64, end: u64) {
        let Some(read) = self.queue_reader.get() else {
            return;
        };
        if word.layer() != LayerKind::Async {
            return;
        }
        // Never let a panic in the runtime's metrics out into the runtime's poll hook.
        let queued = std::panic::catch_unwind(read).unwrap_or(0);
        if queued == 0 {
            return;
        }
        l.queued_left.set(queued.min(MAX_QUEUED) as u32); // at most MAX_QUEUED (256): fits
                                                          // (A start is never CLOCK_UNKNOWN: `begin` reads the real clock then.)
        l.queued_from.set(start);
        l.queued_until
            .set(end.saturating_add(hold_window_ns(self.thresholds_ns[0])));
        l.set_fast(0);
    }

    /// A poll starts on a thread armed by [`arm_queued`](Self::arm_queued): its task was
    /// queued behind the stall that ended (its wake is not known, so its wait is not measured).
    /// The record's measure spans the stall's start to this poll's, so the watchdog can match
    /// it with the stall.
    #[cold]
    fn note_queued(&self, slot: &Slot, l: &Local, word: CulpritWord, task: u64, start: u64) {
        if start > l.queued_until.get() {
            self.disarm_queued(l);
            return;
        }
        if word.layer() != LayerKind::Async {
            return;
        }
        l.dirty.set(true);
        // A watched future nested in this poll keeps no wait of its own: one record a poll.
        l.wait_noted.set(true);
        slot.push(Record {
            word,
            measure: Measure::queued(start.saturating_sub(l.queued_from.get())),
            start,
            task,
        });
        let left = l.queued_left.get() - 1;
        l.queued_left.set(left);
        if left == 0 {
            self.disarm_queued(l);
        }
    }

    /// No more polls are noted as queued: the common path is back.
    #[cold]
    fn disarm_queued(&self, l: &Local) {
        l.queued_left.set(0);
        if !self.precise_start && !l.slot_ptr.get().is_null() && ptr::eq(l.board.get(), self) {
            l.set_fast(gate_of(self));
        }
    }

    /// A poll that changed what its start leaves alone ends: its exact duration if it was
    /// timed, then the slot and the thread's notes are cleared for the next.
    #[cold]
    fn end_noted(&self, slot: &Slot, l: &Local) {
        let timed = l.sample_start.get();
        self.clean(slot, l);
        if timed != 0 {
            let nanos = self.now_ns().saturating_sub(timed);
            slot.push(Record {
                word: CulpritWord::from_bits(slot.culprit.load(Ordering::Relaxed)),
                measure: Measure::poll(nanos),
                start: 0,
                task: 0,
            });
        }
    }

    /// A poll that may have passed its threshold ends (rare: polls of threshold less a tick,
    /// or longer). A stall the watchdog flagged counts as a slow poll; one it did not see is
    /// timed with the real clock and, past its threshold, counted and handed to the watchdog
    /// as caught at its end (then it returns that end). A phantom is neither.
    #[cold]
    fn slow_end(
        &self,
        slot: &Slot,
        s: u64,
        word: CulpritWord,
        start: u64,
        threshold: u64,
        named: u64,
    ) -> Option<u64> {
        if slot.phantom.load(Ordering::Relaxed) == s {
            return None;
        }
        let slow = || {
            slot.slow_polls.store(
                slot.slow_polls.load(Ordering::Relaxed) + 1,
                Ordering::Relaxed,
            );
        };
        if slot.flagged.load(Ordering::Relaxed) == s {
            slow();
            return None;
        }
        let end = self.now_ns().max(1);
        if end.saturating_sub(caught_from(start, self.tick_ns)) < threshold {
            return None;
        }
        slow();
        slot.caught_seq.store(0, Ordering::Relaxed);
        fence(Ordering::Release);
        slot.caught_word.store(word.bits(), Ordering::Relaxed);
        slot.caught_named.store(named, Ordering::Relaxed);
        slot.caught_task
            .store(slot.task.load(Ordering::Relaxed), Ordering::Relaxed);
        slot.caught_start.store(start, Ordering::Relaxed);
        slot.caught_end.store(end, Ordering::Relaxed);
        slot.caught_seq.store(s | 1, Ordering::Release);
        Some(end)
    }

    /// Slow path: this thread polls under this board for the first time (or came back to it).
    #[cold]
    fn attach(self: &Arc<Self>, l: &Local, word: CulpritWord) -> bool {
        if l.own.get() || l.depth.get() > 0 {
            // loopwatch's own threads are never watched; a thread never switches boards in
            // the middle of a poll.
            return false;
        }
        // Only threads inside a tokio runtime are watched: a span held for long on some
        // other thread is not a stalled worker. A CPU pool's jobs are the exception: they
        // come through loopwatch's own wrapper, which names their layer.
        if word.layer() != LayerKind::Cpu && tokio::runtime::Handle::try_current().is_err() {
            return false;
        }
        l.release();
        // Without a place to keep the board alive (the thread is exiting), do not watch.
        if HOLD.try_with(|h| h.0.set(Some(self.clone()))).is_err() {
            return false;
        }
        l.board.set(Arc::as_ptr(self));
        match self.claim() {
            Some(i) => {
                l.slot.set(i);
                l.slot_ptr.set(&self.slots[i]);
                // With exact starts every poll reads the real clock: no common path. Nor
                // when an async poll may be slow with the watchdog's clock unmoved (its
                // threshold a tick or less): the common path's end tests only that.
                if !self.precise_start && self.slow_after_ns[LayerKind::Async as usize] > 0 {
                    l.set_fast(gate_of(self));
                }
                true
            }
            None => {
                self.unwatched_threads.fetch_add(1, Ordering::Relaxed);
                l.slot.set(usize::MAX);
                false
            }
        }
    }

    fn claim(&self) -> Option<usize> {
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.claimed.load(Ordering::Relaxed) {
                continue;
            }
            if slot
                .claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.ring
                    .get_or_init(|| (0..RING).map(|_| Sample::default()).collect());
                // Clear between polls, as a poll's start expects (see `clean`).
                slot.named.store(0, Ordering::Relaxed);
                slot.inner.store(0, Ordering::Relaxed);
                let current = std::thread::current();
                let meta = ThreadMeta {
                    name: current.name().map(Arc::from),
                    tid: os_thread_id(),
                };
                if let Ok(mut m) = slot.meta.lock() {
                    *m = Some(meta);
                }
                self.high_water.fetch_max(i + 1, Ordering::AcqRel);
                return Some(i);
            }
        }
        None
    }

    fn release(&self, i: usize) {
        if let Some(slot) = self.slots.get(i) {
            let s = slot.seq.load(Ordering::Relaxed);
            if s & 1 == 1 {
                // The thread is going away in the middle of a poll (it cannot come back).
                slot.seq.store(s + 1, Ordering::Release);
            }
            slot.claimed.store(false, Ordering::Release);
        }
    }

    /// Resolves a culprit word to an interned kind and its layer (watchdog side).
    pub(crate) fn resolve(&self, word: CulpritWord) -> (KindId, LayerKind) {
        match word.decode() {
            Culprit::None => (OTHER, LayerKind::Async),
            Culprit::Kind(k, layer) => (k, layer),
            Culprit::Location(loc) if is_own_site(loc.file(), loc.line(), loc.column()) => {
                (OWN, LayerKind::Async)
            }
            Culprit::Location(loc) => (
                self.kinds
                    .intern(None, Some((loc.file(), loc.line(), loc.column()))),
                LayerKind::Async,
            ),
        }
    }
}

/// Where loopwatch spawns tasks of its own on a watched runtime (the loop-lag heartbeat, the
/// probe-free path's learners): their polls are never the application's (no stall, no histogram,
/// no victim).
static OWN_SITES: [OnceLock<(&'static str, u32, u32)>; 4] = [
    OnceLock::new(),
    OnceLock::new(),
    OnceLock::new(),
    OnceLock::new(),
];

/// Records a site where loopwatch spawns tasks of its own (see [`OWN_SITES`]): the heartbeat,
/// the probe-free path's learners.
pub(crate) fn set_own_site(loc: &'static std::panic::Location<'static>) {
    let site = (loc.file(), loc.line(), loc.column());
    for slot in &OWN_SITES {
        if slot.get() == Some(&site) || slot.set(site).is_ok() || slot.get() == Some(&site) {
            return;
        }
    }
}

/// Is `file:line:col` where loopwatch spawns a task of its own?
pub(crate) fn is_own_site(file: &str, line: u32, col: u32) -> bool {
    OWN_SITES.iter().any(|s| {
        s.get()
            .is_some_and(|&(f, l, c)| l == line && c == col && f == file)
    })
}

/// The id a probe enters and exits its own poll with (poll hooks, wrappers, pool jobs): no
/// span has it (tracing's span ids start at 1).
pub(crate) const PROBE: u64 = 0;

/// Is the open poll on `slot` a phantom, seen from an enter for `task` nested in it? Another
/// task's poll cannot nest in it, and one the watchdog found parked is not running.
#[inline]
fn is_phantom(slot: &Slot, task: u64) -> bool {
    let open = slot.task.load(Ordering::Relaxed);
    (task != 0 && open != 0 && task != open)
        || slot.phantom.load(Ordering::Relaxed) == slot.seq.load(Ordering::Relaxed)
}

// --- the thread-locals ---------------------------------------------------------------------
//
// Two of them: `LOCAL`, read on every poll, has no destructor, so an access is a plain
// thread-local address with no "is it registered / still alive" check; `HOLD`, touched only
// when a thread claims or gives back a slot, keeps the board alive and gives the slot back when
// the thread exits (and then clears `LOCAL`, so a late poll cannot write to a slot it lost).

struct Local {
    board: Cell<*const Board>,
    slot: Cell<usize>,
    /// `board`'s [`gate_of`] while this thread holds one of its slots and the common path
    /// may start a poll there (else 0). What the common path tests is `gate`.
    fast: Cell<usize>,
    /// The common path's one test, a word: `fast` while no poll is open on this thread (the
    /// common path may start one); `fast` tagged with [`OPEN_PROBE`] or [`OPEN_SPAN`] while
    /// the poll the common path started is open and nothing else happened in it (nothing
    /// nested, nothing noted): depth 1 with [`PROBE`] or the span id in `open` (its exit may
    /// take the common path, on one compare for a probe). 0 otherwise: no common path (a poll
    /// the full path follows is open, or `fast` is 0). The full path turns a tagged gate
    /// into `depth` and `ids` first (see [`Local::settle`]).
    gate: Cell<usize>,
    /// The held slot's address (valid while `fast` is not 0).
    slot_ptr: Cell<*const Slot>,
    /// The open poll changed what a start leaves alone: its end clears it (see `clean`).
    dirty: Cell<bool>,
    depth: Cell<u32>,
    /// The board time the current poll's timing started (one in `sample_every`), 0 if none.
    sample_start: Cell<u64>,
    /// The current poll's schedule delay is known (its first probe, or a nested one, said).
    wait_noted: Cell<bool>,
    own: Cell<bool>,
    /// The culprit words of the spans nested in the current poll (`stack[d]` at depth `d`).
    stack: [Cell<u64>; MAX_DEPTH],
    /// The span id of the poll the common path started, while `gate` is tagged
    /// [`OPEN_SPAN`] (meaningless otherwise).
    open: Cell<u64>,
    /// What was entered at each depth (`ids[0]`: the poll's outermost), to match exits.
    ids: [Cell<u64>; MAX_DEPTH],
    /// The first named culprit of the current poll, kept when its span is left (`named` on
    /// the slot follows what is open): the name of a poll caught at its end.
    first_named: Cell<u64>,
    /// The culprit that named the poll (`named` on the slot) was left: the next named one
    /// entered takes its place.
    named_left: Cell<bool>,
    /// Polls still to be noted as queued behind the stall that just ended on this thread
    /// (see [`Board::arm_queued`]); while non-zero, `fast` is 0 so every poll starts on the
    /// full path.
    queued_left: Cell<u32>,
    /// That stall's start (board clock, as its poll read it).
    queued_from: Cell<u64>,
    /// After this (board clock), the polls that follow are no longer noted.
    queued_until: Cell<u64>,
}

impl Local {
    /// Gives back this thread's slot, if it has one.
    fn release(&self) {
        let _ = HOLD.try_with(|h| {
            if let Some(board) = h.0.take() {
                board.release(self.slot.get());
            }
        });
        self.forget();
    }

    /// The id of the poll the common path started and is open, if one is.
    #[inline]
    fn common_open(&self) -> Option<u64> {
        match self.gate.get() & (OPEN_PROBE | OPEN_SPAN) {
            OPEN_PROBE => Some(PROBE),
            OPEN_SPAN => Some(self.open.get()),
            _ => None,
        }
    }

    /// Off the common path, before `depth` or `ids` are read: the poll the common path
    /// started (if any) is the full path's now, and its exit takes the full path too.
    #[inline]
    fn settle(&self) {
        // (One test on the common case, nothing to settle: `common_open`'s match cost the
        // layer's full path, taken at every poll under `tokio_unstable`, ~10 per poll.)
        let gate = self.gate.get();
        if gate & (OPEN_PROBE | OPEN_SPAN) != 0 {
            let id = if gate & OPEN_SPAN != 0 {
                self.open.get()
            } else {
                PROBE
            };
            self.ids[0].set(id);
            self.depth.set(1);
            self.gate.set(0);
        }
    }

    /// How many entries are open on this thread, without settling.
    #[cfg(test)]
    fn open_depth(&self) -> u32 {
        match self.common_open() {
            Some(_) => 1,
            None => self.depth.get(),
        }
    }

    /// The full path follows `depth` (at least 1) open entries (after `settle`): the gate is
    /// shut.
    #[inline]
    fn set_open(&self, depth: u32) {
        self.depth.set(depth);
        self.gate.set(0);
    }

    /// The full path closed the poll (after `settle`): the gate opens if `fast` says so.
    #[inline]
    fn set_closed(&self) {
        self.depth.set(0);
        self.gate.set(self.fast.get());
    }

    /// Whether the common path may start a poll on this thread: on the board whose
    /// [`gate_of`] is `gate`, or never (0). Set between polls, or inside one the full path
    /// follows (the gate follows at its end).
    fn set_fast(&self, gate: usize) {
        self.fast.set(gate);
        if self.depth.get() == 0 && self.common_open().is_none() {
            self.gate.set(gate);
        }
    }

    /// Holds no slot any more: a fresh start for the next board.
    fn forget(&self) {
        self.gate.set(0);
        self.board.set(ptr::null());
        self.fast.set(0);
        self.slot_ptr.set(ptr::null());
        self.slot.set(usize::MAX);
        self.depth.set(0);
        self.dirty.set(false);
        self.first_named.set(0);
        self.named_left.set(false);
        self.wait_noted.set(false);
        self.sample_start.set(0);
        self.queued_left.set(0);
    }
}

struct Hold(Cell<Option<Arc<Board>>>);

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(board) = self.0.take() {
            let _ = LOCAL.try_with(|l| {
                board.release(l.slot.get());
                l.forget();
            });
        }
    }
}

thread_local! {
    static LOCAL: Local = const {
        Local {
            board: Cell::new(ptr::null()),
            slot: Cell::new(usize::MAX),
            fast: Cell::new(0),
            gate: Cell::new(0),
            slot_ptr: Cell::new(ptr::null()),
            dirty: Cell::new(false),
            depth: Cell::new(0),
            open: Cell::new(0),
            sample_start: Cell::new(0),
            wait_noted: Cell::new(false),
            own: Cell::new(false),
            stack: [const { Cell::new(0) }; MAX_DEPTH],
            ids: [const { Cell::new(0) }; MAX_DEPTH],
            first_named: Cell::new(0),
            named_left: Cell::new(false),
            queued_left: Cell::new(0),
            queued_from: Cell::new(0),
            queued_until: Cell::new(0),
        }
    };
    static HOLD: Hold = const { Hold(Cell::new(None)) };
}

/// This thread's `LOCAL`, for the probes' common paths. Its closure is only the address, so
/// that `try_with` is inlined wherever the probe is (a closure holding the whole common path
/// made `try_with` too large to inline into a caller such as tokio's `Core::poll`).
#[inline(always)]
fn local<'a>() -> Option<&'a Local> {
    let l = LOCAL.try_with(ptr::from_ref).ok()?;
    // SAFETY: `LOCAL` has no destructor: its storage lives as long as this thread, and the
    // reference does not leave the probe's call (`'a` is the caller's; no probe keeps it).
    Some(unsafe { &*l })
}

/// Is a poll the common path started open on this thread (any board)?
#[cfg(test)]
pub(crate) fn common_path_poll_open() -> bool {
    LOCAL.with(|l| l.common_open().is_some())
}

/// Marks the calling thread as one of loopwatch's own: it is never watched, so nothing
/// loopwatch does (reporting a stall through `tracing`) feeds back into its probes.
pub(crate) fn mark_own_thread() {
    let _ = LOCAL.try_with(|l| l.own.set(true));
}

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
pub(crate) fn os_thread_id() -> Option<u64> {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    u64::try_from(tid).ok()
}

#[cfg(not(all(target_os = "linux", not(loopwatch_portable))))]
pub(crate) fn os_thread_id() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A board, and a runtime context entered on this thread (only threads inside a runtime
    /// are watched).
    fn board() -> (Arc<Board>, tokio::runtime::Runtime) {
        let cfg = Config::default();
        let board = Arc::new(Board::for_config(&cfg));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        (board, rt)
    }

    fn word(n: u64) -> CulpritWord {
        CulpritWord::kind(n as KindId, LayerKind::Async, false)
    }

    fn read(b: &Board) -> SlotRead {
        b.slots()[0].read()
    }

    #[test]
    fn a_poll_is_perhaps_slow_from_its_threshold_less_a_tick_on_the_watchdogs_clock() {
        const MS: u64 = 1_000_000;
        // Async 10 ms, blocking 1 ms (shorter than the tick), CPU not watched; tick 2.5 ms.
        let mut b = Board::new(
            [
                Some(Duration::from_millis(10)),
                Some(Duration::from_millis(1)),
                None,
            ],
            1,
            false,
            1,
            16,
        );
        b.set_tick(2_500_000);
        let on = |layer| CulpritWord::kind(1, layer, false).layer_bits() as usize;
        let start = 100 * MS;
        // Async: 7.5 ms on the watchdog's clock is perhaps 10 ms; a nanosecond less is not.
        assert!(b.perhaps_slow(on(LayerKind::Async), start, start + 7_500_000));
        assert!(!b.perhaps_slow(on(LayerKind::Async), start, start + 7_499_999));
        // A location (no layer bits) is async.
        let loc = CulpritWord::location(std::panic::Location::caller());
        assert!(b.perhaps_slow(loc.layer_bits() as usize, start, start + 7_500_000));
        assert!(!b.perhaps_slow(loc.layer_bits() as usize, start, start + 7_499_999));
        // The clock reads behind an exact start: not slow.
        let exact = start | EXACT;
        assert!(!b.perhaps_slow(on(LayerKind::Async), exact, start - 2 * MS));
        // An unknown clock (the watchdog sleeps through an idle spell) is past any start.
        assert!(b.perhaps_slow(on(LayerKind::Async), start, CLOCK_UNKNOWN));
        assert!(b.perhaps_slow(on(LayerKind::Async), 1, CLOCK_UNKNOWN));
        assert!(b.perhaps_slow(on(LayerKind::Async), (1 << 62) | EXACT, CLOCK_UNKNOWN));
        // A threshold shorter than the tick: a clock a little behind an exact start may
        // already be a slow poll's end (it reads up to a tick early).
        assert!(b.perhaps_slow(on(LayerKind::Blocking), exact, start - MS));
        assert!(!b.perhaps_slow(on(LayerKind::Blocking), exact, start - 2 * MS));
        // A layer that is not watched never is.
        assert!(!b.perhaps_slow(on(LayerKind::Cpu), start, start + 1_000_000 * MS));
    }

    const TASK_SPAN: u64 = 5;
    const GUARD_SPAN: u64 = 9;

    #[test]
    fn a_span_held_across_an_await_inside_a_task_span_ends_with_the_poll() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        b.enter(TASK_SPAN, word(1), || 1, Wait::UNKNOWN);
        b.enter(GUARD_SPAN, word(2), || 1, Wait::UNKNOWN);
        let poll = read(&b).seq;
        assert_eq!(poll & 1, 1);
        // The poll returns Pending with the guard alive: only the task span is exited.
        b.exit(TASK_SPAN);
        assert_eq!(read(&b).seq, poll + 1, "the poll ended");
        // The guard drops later (here, or on another worker): nothing is open to close.
        b.exit(GUARD_SPAN);
        assert_eq!(read(&b).seq, poll + 1);
        b.enter(TASK_SPAN, word(1), || 1, Wait::UNKNOWN);
        assert_eq!(read(&b).seq, poll + 2, "the next poll is a poll of its own");
    }

    #[test]
    fn a_named_future_left_inside_an_unnamed_task_keeps_naming_its_poll_until_another() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        let named = |n| CulpritWord::kind(n, LayerKind::Async, true);
        b.enter(TASK_SPAN, word(1), || 1, Wait::UNKNOWN);
        b.enter(GUARD_SPAN, named(2), || 1, Wait::UNKNOWN);
        assert_eq!(read(&b).named, named(2));
        // The future returned; the task's poll goes on a moment (tokio stores its output):
        // a stall flagged now is still the future's.
        b.exit(GUARD_SPAN);
        assert_eq!(read(&b).named, named(2));
        // Another named future in the same poll takes over.
        b.enter(17, named(3), || 1, Wait::UNKNOWN);
        assert_eq!(read(&b).named, named(3));
        b.exit(17);
        b.exit(TASK_SPAN);
        // The next poll starts with no name of its own.
        b.enter(TASK_SPAN, word(1), || 1, Wait::UNKNOWN);
        assert_eq!(read(&b).named, CulpritWord::NONE);
        b.exit(TASK_SPAN);
    }

    #[test]
    fn an_exit_that_matches_nothing_open_is_ignored() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        b.enter(TASK_SPAN, word(1), || 1, Wait::UNKNOWN);
        let poll = read(&b).seq;
        b.exit(GUARD_SPAN);
        assert_eq!(read(&b).seq, poll, "still in its poll");
        b.exit(TASK_SPAN);
        assert_eq!(read(&b).seq, poll + 1);
    }

    #[test]
    fn past_the_kept_depth_only_an_exit_the_probe_followed_closes_the_innermost() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        let deepest = MAX_DEPTH as u64 + 2;
        for id in 1..=deepest {
            b.enter(id, word(id), || 1, Wait::UNKNOWN);
        }
        let depth = || LOCAL.with(|l| u64::from(l.open_depth()));
        assert_eq!(depth(), deepest);
        // A span the layer does not follow (its exit reaches the board unlooked-up).
        b.exit_if(1_000, || false);
        assert_eq!(depth(), deepest);
        // One it entered: the innermost closes.
        b.exit_if(deepest, || true);
        assert_eq!(depth(), deepest - 1);
        // Within the kept depth an unknown id is ignored without asking.
        b.exit_if(MAX_DEPTH as u64 + 1, || true);
        b.exit_if(2_000, || panic!("asked"));
        let poll = read(&b).seq;
        for id in (1..=MAX_DEPTH as u64).rev() {
            b.exit_if(id, || panic!("asked"));
        }
        assert_eq!(read(&b).seq, poll + 1, "the poll ended");
    }

    #[test]
    fn an_exit_ends_a_poll_once_whichever_path_ended_it() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        b.tick(b.now_ns());
        // Ended on the common path, then a stray second exit.
        b.enter(PROBE, word(1), || 1, Wait::UNKNOWN);
        let poll = read(&b).seq;
        b.exit(PROBE);
        b.exit(PROBE);
        assert_eq!(read(&b).seq, poll + 1);
        // Ended on the full path (long on the watchdog's clock), then a stray exit.
        b.enter(PROBE, word(1), || 1, Wait::UNKNOWN);
        let poll = read(&b).seq;
        b.tick(b.coarse_ns() + b.threshold_ns(LayerKind::Async) * 2);
        b.exit(PROBE);
        b.exit(PROBE);
        assert_eq!(read(&b).seq, poll + 1);
        // A span nested in a poll the common path started: the poll's exit closes both.
        b.enter(TASK_SPAN, word(1), || 1, Wait::UNKNOWN);
        let poll = read(&b).seq;
        b.enter(GUARD_SPAN, word(2), || 1, Wait::UNKNOWN);
        b.exit(TASK_SPAN);
        assert_eq!(read(&b).seq, poll + 1);
        assert_eq!(read(&b).inner, CulpritWord::NONE, "cleaned at its end");
        b.exit(GUARD_SPAN);
        assert_eq!(read(&b).seq, poll + 1);
    }

    #[test]
    fn nested_spans_of_the_same_task_stay_in_its_poll() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        b.enter(TASK_SPAN, word(1), || 1, Wait::UNKNOWN);
        let poll = read(&b).seq;
        b.enter(GUARD_SPAN, word(2), || 1, Wait::UNKNOWN);
        let r = read(&b);
        assert_eq!((r.seq, r.inner), (poll, word(2)));
        b.exit(GUARD_SPAN);
        assert_eq!((read(&b).seq, read(&b).inner), (poll, CulpritWord::NONE));
        b.exit(TASK_SPAN);
        assert_eq!(read(&b).seq, poll + 1);
        assert_eq!(b.slots()[0].phantoms(), 0);
    }

    #[test]
    fn another_tasks_poll_ends_a_phantom_and_starts_its_own() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        // A guard entered outside any probe's poll: it looks like a poll of its own, and
        // stays "open" after the task's real poll returned.
        b.enter(GUARD_SPAN, word(2), || 1, Wait::UNKNOWN);
        let phantom = read(&b).seq;
        // The worker polls task 2 next.
        b.enter(TASK_SPAN, word(1), || 2, Wait::UNKNOWN);
        let r = read(&b);
        assert_eq!(r.seq, phantom + 2, "the phantom ended, a new poll began");
        assert_eq!((r.task, r.word), (2, word(1)));
        assert_eq!(b.slots()[0].phantoms(), 1);
        assert_eq!(b.slots()[0].marked_phantom(), phantom);
        b.exit(TASK_SPAN);
        assert_eq!(read(&b).seq, phantom + 3, "and it ends on its own exit");
    }

    #[test]
    fn a_poll_the_watchdog_marked_parked_ends_at_the_next_enter() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        b.enter(GUARD_SPAN, word(2), || 1, Wait::UNKNOWN);
        let phantom = read(&b).seq;
        b.slots()[0].mark_phantom(phantom);
        // Even the same task's next poll (its id cannot tell): the mark does.
        b.enter(TASK_SPAN, word(1), || 1, Wait::UNKNOWN);
        assert_eq!(read(&b).seq, phantom + 2);
        assert_eq!(
            b.slots()[0].phantoms(),
            0,
            "counted by the watchdog, not twice"
        );
    }

    #[test]
    fn a_poll_that_starts_while_the_watchdog_sleeps_reads_the_real_clock() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        b.tick(4_000_000);
        b.enter(PROBE, word(1), || 1, Wait::UNKNOWN);
        assert_eq!(read(&b).start_ns, 4_000_000, "the watchdog's clock");
        assert!(!is_exact(read(&b).start_ns));
        b.exit(PROBE);
        b.tick(CLOCK_UNKNOWN);
        b.enter(PROBE, word(1), || 1, Wait::UNKNOWN);
        let start = read(&b).start_ns;
        assert!(is_exact(start), "{start}");
        assert!(start <= b.now_ns());
        b.exit(PROBE);
        // The watchdog's clock never looks exact.
        b.tick(5_000_001);
        assert_eq!(b.coarse_ns(), 5_000_000);
    }

    #[test]
    fn a_slow_poll_the_watchdog_did_not_flag_is_caught_at_its_end() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        let threshold = b.threshold_ns(LayerKind::Async);
        // Short: not caught.
        b.tick(b.now_ns());
        b.enter(PROBE, word(1), || 5, Wait::UNKNOWN);
        b.exit(PROBE);
        assert_eq!(b.slots()[0].caught(), None);
        // Past the threshold, never flagged (the watchdog's clock stands still here, as if it
        // had not run): caught, with the real clock at its end.
        b.tick(b.now_ns());
        b.enter(PROBE, word(1), || 6, Wait::UNKNOWN);
        let poll = read(&b);
        std::thread::sleep(Duration::from_nanos(threshold + b.tick_ns()));
        b.tick(b.now_ns());
        b.exit(PROBE);
        let c = b.slots()[0].caught().expect("caught");
        assert_eq!((c.seq, c.task, c.word), (poll.seq, 6, word(1)));
        assert_eq!(c.start_ns, poll.start_ns);
        assert!(c.end_ns >= poll.start_ns + threshold);
        assert_eq!(b.slots()[0].slow_polls(), 1);
        // Flagged: a stall the watchdog follows; counted slow, not caught again.
        b.enter(PROBE, word(1), || 7, Wait::UNKNOWN);
        let flagged = read(&b).seq;
        b.slots()[0].flag(flagged);
        std::thread::sleep(Duration::from_nanos(threshold + b.tick_ns()));
        b.tick(b.now_ns());
        b.exit(PROBE);
        assert_eq!(b.slots()[0].caught().map(|c| c.seq), Some(poll.seq));
        assert_eq!(b.slots()[0].slow_polls(), 2);
    }

    /// The common path's end tests only that the watchdog's clock did not move: a poll that
    /// saw a tick ends on the full path (by the exact rule), and where an async poll may be
    /// slow with the clock unmoved (its threshold no more than a tick) there is no common path.
    #[test]
    fn a_poll_that_saw_the_clock_move_ends_by_the_exact_rule() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        b.tick(b.now_ns());
        b.enter(PROBE, word(1), || 5, Wait::UNKNOWN);
        b.exit(PROBE);
        assert!(on_common_path(&b));
        // A tick inside a short poll: not slow, not caught, and the next poll is on the
        // common path again.
        b.enter(PROBE, word(1), || 6, Wait::UNKNOWN);
        let poll = read(&b);
        b.tick(b.coarse_ns() + b.tick_ns());
        b.exit(PROBE);
        let after = read(&b);
        assert_eq!(after.seq, poll.seq + 1);
        assert_eq!(
            (b.slots()[0].caught(), b.slots()[0].slow_polls()),
            (None, 0)
        );
        b.enter(PROBE, word(1), || 7, Wait::UNKNOWN);
        assert!(on_common_path(&b) && LOCAL.with(|l| l.common_open() == Some(PROBE)));
        b.exit(PROBE);

        // Async threshold 1 ms, tick 2.5 ms: a 4 ms poll the watchdog's clock never saw is
        // still caught at its end (judged from three quarters of a tick after its start).
        let mut small = Board::new(
            [Some(Duration::from_millis(1)), None, None],
            1 << 16,
            false,
            1,
            16,
        );
        small.set_tick(2_500_000);
        let small = Arc::new(small);
        small.tick(small.now_ns());
        small.enter(PROBE, word(1), || 8, Wait::UNKNOWN);
        assert!(!on_common_path(&small));
        std::thread::sleep(Duration::from_millis(4));
        small.exit(PROBE);
        assert_eq!(small.slots()[0].caught().map(|c| c.task), Some(8));
    }

    #[test]
    fn a_slow_poll_that_starts_and_ends_while_the_watchdog_sleeps_is_caught_at_its_end() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        let threshold = b.threshold_ns(LayerKind::Async);
        // The watchdog sleeps a threshold and a tick through an idle spell: a poll of just
        // over the threshold can start and end before it wakes. Its start is exact; so is its
        // end, and it is caught.
        b.tick(CLOCK_UNKNOWN);
        b.enter(PROBE, word(1), || 6, Wait::UNKNOWN);
        let poll = read(&b);
        std::thread::sleep(Duration::from_nanos(threshold + 1_000_000));
        b.exit(PROBE);
        let c = b.slots()[0].caught().expect("caught");
        assert_eq!((c.seq, c.task, c.start_ns), (poll.seq, 6, poll.start_ns));
        assert!(c.end_ns >= poll.start_ns + threshold);
        assert_eq!(b.slots()[0].slow_polls(), 1);
        // A short one is not.
        b.enter(PROBE, word(1), || 7, Wait::UNKNOWN);
        b.exit(PROBE);
        assert_eq!(b.slots()[0].caught().map(|c| c.seq), Some(poll.seq));
        assert_eq!(b.slots()[0].slow_polls(), 1);
        // One that started on the common path an instant before the watchdog went to sleep
        // (its start is the watchdog's clock) and ends while it sleeps: caught too.
        b.tick(b.now_ns());
        b.enter(PROBE, word(1), || 8, Wait::UNKNOWN);
        let poll = read(&b);
        assert!(!is_exact(poll.start_ns));
        b.tick(CLOCK_UNKNOWN);
        std::thread::sleep(Duration::from_nanos(threshold + b.tick_ns()));
        b.exit(PROBE);
        let c = b.slots()[0].caught().expect("caught");
        assert_eq!((c.seq, c.task), (poll.seq, 8));
        assert_eq!(b.slots()[0].slow_polls(), 2);
    }

    #[test]
    fn the_first_poll_that_starts_while_the_watchdog_sleeps_wakes_it() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        // This thread plays the watchdog: it parks until a poll (on another thread) wakes it.
        b.set_watchdog();
        b.tick(b.now_ns());
        assert!(b.woken(), "awake until sent to sleep");
        b.sleep_unknown();
        assert!(!b.woken());
        let poller = {
            let b = b.clone();
            let handle = rt.handle().clone();
            std::thread::spawn(move || {
                let _ctx = handle.enter();
                b.enter(PROBE, word(1), || 1, Wait::UNKNOWN);
                b.exit(PROBE);
                // A second poll finds it woken already: no second wake.
                b.enter(PROBE, word(1), || 1, Wait::UNKNOWN);
                b.exit(PROBE);
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !b.woken() && Instant::now() < deadline {
            std::thread::park_timeout(Duration::from_secs(1));
        }
        poller.join().unwrap();
        assert!(b.woken(), "woken by the poll");
        assert!(b.awake(), "a poll woke it");
        // Sent to sleep and waking by its own timer: not woken by a poll.
        b.sleep_unknown();
        assert!(!b.awake());
    }

    /// The queue a scripted reader says the stalled worker holds (only the test below reads it).
    static QUEUED: AtomicUsize = AtomicUsize::new(0);

    fn scripted_queue() -> usize {
        QUEUED.load(Ordering::Relaxed)
    }

    /// The records a slot's ring holds that are waits (queued or measured).
    fn waits(b: &Board) -> Vec<Record> {
        let mut v = Vec::new();
        b.slots()[0].drain_samples(|r| v.push(r));
        v.retain(|r| r.measure.is_wait());
        v
    }

    fn on_common_path(b: &Arc<Board>) -> bool {
        LOCAL.with(|l| l.fast.get() == gate_of(b))
    }

    /// One poll of `task` the watchdog flags as a stall; returns what it read of it.
    fn flagged_poll(b: &Arc<Board>, task: u64) -> SlotRead {
        b.enter(PROBE, word(1), || task, Wait::UNKNOWN);
        let stall = read(b);
        // The watchdog flags it once its clock shows it past the threshold.
        b.tick(stall.start_ns + b.threshold_ns(LayerKind::Async) + b.tick_ns());
        b.slots()[0].flag(stall.seq);
        b.exit(PROBE);
        stall
    }

    #[test]
    fn the_polls_after_a_stall_are_noted_as_queued_behind_it_as_many_as_its_worker_queued() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        b.set_queue_reader(scripted_queue);
        assert!(b.waits_known());
        let poll = |task: u64| {
            b.enter(PROBE, word(2), || task, Wait::UNKNOWN);
            b.exit(PROBE);
        };
        b.tick(1_000_000);
        poll(1);
        assert!(on_common_path(&b));
        // Three tasks queued on the worker when the stall ends: the next three polls (not the
        // fourth) are noted, each from the stall's start; then the common path is back.
        QUEUED.store(3, Ordering::Relaxed);
        let stall = flagged_poll(&b, 7);
        assert!(!on_common_path(&b));
        let after = stall.start_ns + 15_000_000;
        b.tick(after);
        for task in 10..14 {
            poll(task);
        }
        let noted = waits(&b);
        assert_eq!(
            noted.iter().map(|r| r.task).collect::<Vec<_>>(),
            [10, 11, 12]
        );
        for r in &noted {
            assert!(r.measure.is_queued() && !r.measure.is_timed_wait(), "{r:?}");
            assert_eq!((r.start, r.measure.nanos()), (after, 15_000_000));
        }
        assert!(on_common_path(&b));
        // An empty queue at the stall's end: nothing is noted, the common path stays.
        QUEUED.store(0, Ordering::Relaxed);
        flagged_poll(&b, 7);
        assert!(on_common_path(&b));
        poll(20);
        assert!(waits(&b).is_empty());
        // Past the victims' hold window, the polls that follow are no longer the queue's.
        QUEUED.store(5, Ordering::Relaxed);
        flagged_poll(&b, 7);
        b.tick(b.coarse_ns() + hold_window_ns(b.threshold_ns(LayerKind::Async)) + 1_000_000);
        poll(21);
        assert!(waits(&b).is_empty());
        assert!(on_common_path(&b));
        // A worker that parks has drained its queue: the polls after it are not noted.
        flagged_poll(&b, 7);
        poll(22);
        b.parked();
        assert!(on_common_path(&b));
        poll(23);
        assert_eq!(waits(&b).iter().map(|r| r.task).collect::<Vec<_>>(), [22]);
        // A stall caught at its end (never flagged) arms the worker too.
        b.tick(b.now_ns());
        b.enter(PROBE, word(1), || 8, Wait::UNKNOWN);
        std::thread::sleep(Duration::from_nanos(
            b.threshold_ns(LayerKind::Async) + b.tick_ns(),
        ));
        b.tick(b.now_ns());
        b.exit(PROBE);
        assert!(b.slots()[0].caught().is_some());
        poll(24);
        assert_eq!(waits(&b).iter().map(|r| r.task).collect::<Vec<_>>(), [24]);
    }

    #[test]
    fn without_a_queue_reader_a_stalls_end_leaves_the_common_path_alone() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        b.tick(1_000_000);
        flagged_poll(&b, 7);
        assert!(on_common_path(&b));
        b.enter(PROBE, word(2), || 9, Wait::UNKNOWN);
        b.exit(PROBE);
        assert!(waits(&b).is_empty());
    }

    #[test]
    fn a_thread_that_parks_ends_its_phantom() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        b.enter(GUARD_SPAN, word(2), || 1, Wait::UNKNOWN);
        let phantom = read(&b).seq;
        b.parked();
        assert_eq!(read(&b).seq, phantom + 1);
        assert_eq!(b.slots()[0].phantoms(), 1);
        // Parking between polls is the common case: nothing to do.
        b.parked();
        assert_eq!(read(&b).seq, phantom + 1);
        assert_eq!(b.slots()[0].phantoms(), 1);
    }

    /// The common path's gate names the board and the id of the poll it opened: an exit of
    /// another board, or of another id, leaves that poll open (it goes to the full path,
    /// which ignores it), and the gate opens again once the poll ends.
    #[test]
    fn the_gate_keeps_a_common_path_poll_for_its_own_board_and_id() {
        let (a, rt) = board();
        let (b, _rt_b) = board();
        let _ctx = rt.enter();
        let open = |x: &Board| read(x).seq & 1 == 1;
        // The thread's first poll under `a` takes the full path (it claims a slot).
        a.tick(a.now_ns());
        a.enter(PROBE, word(1), || 1, Wait::UNKNOWN);
        a.exit(PROBE);
        a.enter(PROBE, word(1), || 1, Wait::UNKNOWN);
        assert_eq!(LOCAL.with(Local::common_open), Some(PROBE));
        b.exit(PROBE);
        a.exit(GUARD_SPAN);
        assert!(open(&a), "another board's or id's exit leaves it open");
        a.exit(PROBE);
        assert!(!open(&a));
        assert!(on_common_path(&a) && LOCAL.with(|l| l.gate.get() == gate_of(&a)));

        // A span's poll: a probe's exit, or another span's, is not its exit.
        a.enter(TASK_SPAN, word(1), || 1, Wait::UNKNOWN);
        assert_eq!(LOCAL.with(Local::common_open), Some(TASK_SPAN));
        a.exit(PROBE);
        a.exit(GUARD_SPAN);
        assert!(open(&a));
        a.exit(TASK_SPAN);
        assert!(!open(&a));

        // Another board's enter inside the poll: not watched (this thread is in a poll of
        // `a`), and the poll, now followed by the full path, ends at its own exit.
        a.enter(PROBE, word(1), || 1, Wait::UNKNOWN);
        b.enter(PROBE, word(2), || 2, Wait::UNKNOWN);
        assert_eq!(LOCAL.with(Local::common_open), None);
        assert!(open(&a) && b.slots().is_empty(), "b claimed no slot");
        b.exit(PROBE);
        assert!(open(&a));
        a.exit(PROBE);
        assert!(!open(&a));
        a.enter(PROBE, word(1), || 1, Wait::UNKNOWN);
        assert_eq!(
            LOCAL.with(Local::common_open),
            Some(PROBE),
            "the common path again"
        );
        a.exit(PROBE);

        // Any span id, the largest too, opens and closes its poll on the common path.
        for id in [u64::MAX - 1, u64::MAX] {
            a.enter(id, word(1), || 1, Wait::UNKNOWN);
            assert_eq!(LOCAL.with(Local::common_open), Some(id));
            a.exit(id - 2);
            assert!(open(&a));
            a.exit(id);
            assert!(!open(&a));
            assert!(
                LOCAL.with(|l| l.gate.get() == gate_of(&a)),
                "the gate open again"
            );
        }
    }

    #[test]
    fn a_probes_exit_closes_the_spans_left_open_in_its_poll() {
        let (b, rt) = board();
        let _ctx = rt.enter();
        b.enter(PROBE, word(1), || 1, Wait::UNKNOWN);
        b.enter(GUARD_SPAN, word(2), || 1, Wait::UNKNOWN);
        let poll = read(&b).seq;
        b.exit(PROBE);
        assert_eq!(read(&b).seq, poll + 1);
    }
}
