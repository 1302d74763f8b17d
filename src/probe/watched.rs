//! The wrapper probe: a future polled inside [`Watched`] is watched like a task, on stable
//! tokio, with no span and no subscriber needed.
//!
//! It also knows when its future was woken, which stable tokio does not tell: the future is
//! polled with a waker of loopwatch's that notes the time of the first wake since the last
//! poll, then wakes the task's own waker. The next poll's start minus that time is the
//! schedule delay, which feeds the schedule-delay histogram and a stall's victims, as tokio's
//! schedule latency does under `--cfg tokio_unstable`.

use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use crate::board::{clock_known, Board, PROBE};
use crate::kinds::KindId;
use crate::probe::layer::current_task_id;
use crate::probe::task_waker::{self, TaskWaker};
use crate::stall::LayerKind;
use crate::words::{CulpritWord, Wait};

/// The board of the most recently started [`Guard`](crate::Guard), for [`watch`].
static CURRENT: Mutex<Option<Weak<Board>>> = Mutex::new(None);

pub(crate) fn set_current(board: &Arc<Board>) {
    if let Ok(mut c) = CURRENT.lock() {
        *c = Some(Arc::downgrade(board));
    }
}

pub(crate) fn clear_current(board: &Arc<Board>) {
    if let Ok(mut c) = CURRENT.lock() {
        if c.as_ref()
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(board)))
        {
            *c = None;
        }
    }
}

pub(crate) fn current() -> Option<Arc<Board>> {
    CURRENT.lock().ok()?.as_ref()?.upgrade()
}

pin_project_lite::pin_project! {
    /// A future whose polls loopwatch watches. Made by [`watch`] or
    /// [`WatchExt::watched`]; with no loopwatch running it only forwards the polls.
    #[derive(Debug)]
    pub struct Watched<F> {
        #[pin]
        inner: F,
        // What loopwatch keeps of it (none with no loopwatch running): one allocation, shared
        // with its wakers when it notes wakes (the inner future is then polled with a waker
        // that borrows it, see `NOTE_WAKER`: nothing stored, no count touched per poll).
        note: Option<NoteRef>,
    }
}

/// What loopwatch keeps of a watched future: its board, name and task, and its wake note. 56
/// bytes, its own reference count included (the future's and each of its wakers'), so a
/// watched future costs 64 bytes with the pointer beside it (see the memory test below).
struct WakeNote {
    board: Arc<Board>,
    /// The first wake since the last poll's start: a board time (`EXACT` set if from the
    /// real clock, `CHOSEN` if timed for the histogram); 0: no wake. One noted during a poll
    /// is stamped again at the poll's end (see [`WakeNote::poll_ended`]).
    woken_at: AtomicU64,
    /// The task it runs in, learnt at its first poll (only the poller writes it).
    task_id: AtomicU64,
    /// The waker of the task that polled the future last; its state word is `wake_state`.
    task: TaskWaker,
    /// Its culprit word (its task kind, named, of the async layer), made once: read as is at
    /// every poll (see [`WakeNote::word`]).
    word: u64,
    /// References: the future's, and one per waker made from the note.
    refs: AtomicU32,
    /// Polls so far (from an offset, wrapping): a wake after one in `sample_every` is timed
    /// exactly. 16 bits are enough: `sample_every` is a power of two up to 65,536
    /// ([`MAX_SAMPLE_EVERY`](crate::config::MAX_SAMPLE_EVERY)), so it divides the wrap. Only
    /// the future's poll writes it (one poller at a time: `&mut` access); atomic because the
    /// note is shared with its wakers, which read it.
    polls: AtomicU16,
    /// `task`'s state word (see `TaskWaker`).
    wake_state: AtomicU8,
    /// It notes its wakes (`schedule_delay`, default on): its inner poll gets the note's waker.
    notes_wakes: bool,
}

// SAFETY: `task` is `Send + Sync` with its state word, `wake_state`, always the one passed
// (see its uses); every other field is.
unsafe impl Send for WakeNote {}
unsafe impl Sync for WakeNote {}

/// One reference to a [`WakeNote`]: the future's (a waker's is its raw pointer, see
/// [`NOTE_WAKER`]). Dropping it gives the reference back; the last one frees the note.
struct NoteRef(NonNull<WakeNote>);

// SAFETY: a shared reference to a `Send + Sync` note, counted atomically (as `Arc`).
unsafe impl Send for NoteRef {}
unsafe impl Sync for NoteRef {}

impl std::fmt::Debug for NoteRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.get();
        f.debug_struct("WakeNote")
            .field("word", &CulpritWord::from_bits(n.word))
            .field("task_id", &n.task_id.load(Ordering::Relaxed))
            .field("notes_wakes", &n.notes_wakes)
            .finish_non_exhaustive()
    }
}

impl NoteRef {
    /// A new note of a future on `board`, of task kind `kind`: the future's reference.
    fn new(board: &Arc<Board>, kind: KindId) -> NoteRef {
        let r = NoteRef(NonNull::from(Box::leak(Box::new(WakeNote {
            board: board.clone(),
            woken_at: AtomicU64::new(0),
            task_id: AtomicU64::new(0),
            task: TaskWaker::new(),
            word: CulpritWord::kind(kind, LayerKind::Async, true).bits(),
            refs: AtomicU32::new(1),
            polls: AtomicU16::new(0),
            wake_state: AtomicU8::new(task_waker::IDLE),
            notes_wakes: board.track_wakes,
        }))));
        // Which wakes are timed exactly: those after one poll in `sample_every`, counted from
        // a point that differs between futures (their note's address), so short-lived futures
        // share it.
        r.get()
            .polls
            .store((r.0.as_ptr() as usize >> 7) as u16, Ordering::Relaxed);
        r
    }

    #[inline]
    fn get(&self) -> &WakeNote {
        // SAFETY: this reference keeps the note alive.
        unsafe { self.0.as_ref() }
    }

    /// A waker that borrows the note: for the inner future's poll, while this reference is
    /// held. Not to be dropped (it owns no reference); its clones own one each. Its pointer is
    /// the allocation's own (not one from a `&WakeNote`), so the last waker may free it.
    #[inline]
    fn borrowed_waker(&self) -> ManuallyDrop<Waker> {
        let raw = RawWaker::new(self.0.as_ptr().cast_const().cast(), &NOTE_WAKER);
        // SAFETY: `NOTE_WAKER`'s functions are called with a pointer to a live note (this one,
        // alive while this reference is held, which outlives the poll the waker is lent to);
        // the waker is never dropped, so the reference it does not own is never given back; a
        // clone takes one of its own.
        ManuallyDrop::new(unsafe { Waker::from_raw(raw) })
    }
}

impl Drop for NoteRef {
    fn drop(&mut self) {
        // SAFETY: this reference was counted, and is given back once.
        unsafe { WakeNote::release(self.0) };
    }
}

/// In `woken_at`: the stamp is from the real clock, not the watchdog's.
const EXACT: u64 = 1 << 63;
/// In `woken_at`: the wake was chosen for the schedule-delay histogram.
const CHOSEN: u64 = 1 << 62;
/// The nanoseconds of a stamp, without its flags.
const STAMP_NANOS: u64 = CHOSEN - 1;
/// The most nanoseconds an exact stamp holds (2^61 - 1: 73 years after the board's start):
/// below 2^61, a stamp flagged `EXACT | CHOSEN` stays at least 2^61 away from any clock
/// reading, so the quiet test needs no test of the flags (see `take_quiet`).
const EXACT_MAX: u64 = (1 << 61) - 1;

/// A wake note stamps each wake with the watchdog's clock (one load; exact to a tick, enough to
/// find a stall's victims), except the wakes after one poll in `sample_every`, stamped with the
/// real clock for the schedule-delay histogram: so most polls read no clock at all.
impl WakeNote {
    /// The future's culprit word.
    #[inline]
    fn word(&self) -> CulpritWord {
        let word = CulpritWord::from_bits(self.word);
        // SAFETY: `word` is made of the async layer in `NoteRef::new` and never changed. (Said
        // so, the board's common path tests the layer of a word read from memory as it does
        // a constant's: not at all. Made at every poll from the kind instead, it took two
        // instructions more.)
        unsafe { std::hint::assert_unchecked(word.is_async()) };
        word
    }

    /// The id of the task the future runs in, learnt at its first poll.
    #[inline]
    fn task_id(&self) -> u64 {
        match self.task_id.load(Ordering::Relaxed) {
            0 => {
                let id = current_task_id();
                self.task_id.store(id, Ordering::Relaxed);
                id
            }
            id => id,
        }
    }

    /// The id of the task the future runs in, if learnt (else 0), without learning it.
    #[inline]
    fn known_task_id(&self) -> u64 {
        self.task_id.load(Ordering::Relaxed)
    }

    /// Takes one more reference (a waker's).
    #[inline]
    fn acquire(&self) {
        // As `Arc`: a count this high means references leak; stop before it wraps.
        if self.refs.fetch_add(1, Ordering::Relaxed) > i32::MAX as u32 {
            std::process::abort();
        }
    }

    /// Gives one reference back; the last one frees the note.
    ///
    /// # Safety
    ///
    /// `note` was made by [`NoteRef::new`], and the caller owns one counted reference to it,
    /// not used after this.
    #[inline]
    unsafe fn release(note: NonNull<WakeNote>) {
        // SAFETY: the caller's reference keeps it alive until here.
        if unsafe { note.as_ref() }
            .refs
            .fetch_sub(1, Ordering::Release)
            != 1
        {
            return;
        }
        // The other references' uses happen before the free (as `Arc`).
        fence(Ordering::Acquire);
        // SAFETY: the last reference: made by `Box::leak` in `NoteRef::new`.
        drop(unsafe { Box::from_raw(note.as_ptr()) });
    }

    /// A stamp for a wake now.
    #[inline]
    fn stamp(&self) -> u64 {
        if self
            .board
            .sampled(u64::from(self.polls.load(Ordering::Relaxed)))
        {
            return self.board.now_ns().clamp(1, EXACT_MAX) | EXACT | CHOSEN;
        }
        match self.board.coarse_ns() {
            // The watchdog's clock has its lowest bit clear (see `board::EXACT`): set, a stamp
            // is never 0 (no wake), and reads at most a nanosecond late. Its nanoseconds stay
            // below `CHOSEN` (2^62: 146 years after the board's start).
            t if clock_known(t) => t | 1,
            // The watchdog sleeps through an idle spell and its clock stops: a poll starting
            // now (this wake's, perhaps) ends the spell, so read the real one.
            _ => self.board.now_ns().clamp(1, EXACT_MAX) | EXACT,
        }
    }

    #[inline]
    fn note(&self) {
        if self.woken_at.load(Ordering::Relaxed) == 0 {
            // Only the first wake counts: the task waits from then. During a poll too (a
            // yield): the poll's end stamps it again. A store, not a compare-exchange (no
            // read-modify-write per wake): wakes that find no wake noted at the same instant
            // each store theirs, and the last stands, nanoseconds after the first (a wait read
            // that much short; a compare-exchange would not keep a stale stamp out either, as
            // the poll's take clears the note to 0 again).
            self.woken_at.store(self.stamp(), Ordering::Relaxed);
        }
    }

    /// The future's poll ended: a wake noted since its start (see [`take_wait`]) woke the
    /// task during the poll, so the task waits from now. That is the wake of a yield, or one
    /// that read its stamp before the poll started and noted it after: their stamps would
    /// count the poll's own run as the next poll's wait.
    ///
    /// [`take_wait`]: Self::take_wait
    #[inline]
    fn poll_ended(&self) {
        // A wake between the load and the store finds a wake noted and leaves it (its task
        // is woken from about now, as this stamp says).
        if self.woken_at.load(Ordering::Relaxed) != 0 {
            self.woken_at.store(self.stamp(), Ordering::Relaxed);
        }
    }

    /// How long the future waited from the wake noted (taking the note), as `Board::enter`
    /// wants it: exact and chosen for the histogram, or coarse, or unknown.
    #[cfg(test)]
    fn take_wait(&self) -> Wait {
        match self.take_quiet() {
            Ok(()) => Wait::QUIET,
            Err(w) => self.take_wait_from(w),
        }
    }

    /// [`take_wait`](Self::take_wait) in two steps, as the poll takes it: `Ok` for the common
    /// case, a wait too short to note ([`Wait::QUIET`]), in a few instructions; else the
    /// stamp taken, for [`take_wait_from`](Self::take_wait_from) (off the common path).
    ///
    /// The note is taken with a load and a store, not a swap (no read-modify-write per poll):
    /// a wake between the two has its note cleared (or finds one and notes nothing); if it
    /// wakes the task again, the next poll's wait is unknown (a wait lost, never one too long).
    #[inline]
    fn take_quiet(&self) -> Result<(), u64> {
        let w = self.woken_at.load(Ordering::Relaxed);
        self.woken_at.store(0, Ordering::Relaxed);
        // The common case: a coarse stamp (no flag), and a wait too short to note. The
        // clock's lowest bit set as the stamp's was: a wake and a poll in one tick wait 0. An
        // unknown clock reads far past any stamp (see `take_wait_from`). An exact stamp
        // needs no test of its flags: with nanoseconds x (1..=EXACT_MAX) and a known clock c
        // (below 2^62 ns), the wrapping difference is 2^63 + c + 1 - x for `EXACT` and
        // 2^62 + c + 1 - x for `EXACT | CHOSEN`, both at least 2^61; with the unknown clock
        // (2^63) it is 2^64 + 1 - x and 2^64 - 2^62 + 1 - x, at least 2^61 unless x is 1 (a
        // wake in the board's first nanosecond). Never under the floor, then. (The flags'
        // test cost 2 instructions more per poll.)
        if w != 0 {
            let waited = (self.board.coarse_ns() | 1).wrapping_sub(w);
            if waited < self.board.wait_floor_ns() {
                return Ok(());
            }
        }
        Err(w)
    }

    /// [`take_wait`](Self::take_wait) of the stamp `w`, for any stamp.
    #[inline]
    fn take_wait_from(&self, w: u64) -> Wait {
        if w == 0 {
            // Not woken through this future's waker (the first poll, or the task was woken
            // for another future it polls): the wait is unknown.
            return Wait::UNKNOWN;
        }
        let from = w & STAMP_NANOS;
        if w & CHOSEN != 0 {
            return Wait::chosen(self.board.now_ns().saturating_sub(from));
        }
        let now = match self.board.coarse_ns() {
            // Its lowest bit set as a coarse stamp's is (see `stamp`).
            t if clock_known(t) => t | 1,
            _ => self.board.now_ns(),
        };
        // Good to a tick: for victims, not for the histogram.
        Wait::coarse(now.saturating_sub(from))
    }

    #[inline(always)]
    fn wake(&self) {
        self.note();
        // Before the first poll there is no task to wake (and nothing polled the inner future
        // with this waker yet).
        // SAFETY: `wake_state` is `task`'s state word (its one other use: `register_task`).
        unsafe { self.task.wake(&self.wake_state) };
    }

    /// The task polling the future now has `waker`.
    ///
    /// # Safety
    ///
    /// Called by the future's poll only (one poller at a time: `&mut` access).
    #[inline]
    unsafe fn register_task(&self, waker: &Waker) {
        // SAFETY: one registering thread (the caller's contract), with `wake_state`, `task`'s
        // state word (its one other use: `wake`).
        unsafe { self.task.register(&self.wake_state, waker) };
    }
}

/// The wakers of a wake note: the data pointer is a `WakeNote`'s (made by `NoteRef::new`),
/// whose count each owned waker holds one reference of. (Written out, not `std::task::Wake`:
/// the note's own count, the borrowed waker of the poll, and a wake by value that wakes and
/// gives its reference back in one call.)
static NOTE_WAKER: RawWakerVTable =
    RawWakerVTable::new(clone_waker, wake_waker, wake_waker_by_ref, drop_waker);

/// SAFETY (the four): `data` points to a live `WakeNote` (see `NOTE_WAKER`).
unsafe fn clone_waker(data: *const ()) -> RawWaker {
    // SAFETY: see above; the clone owns the reference taken here.
    unsafe { &*data.cast::<WakeNote>() }.acquire();
    RawWaker::new(data, &NOTE_WAKER)
}

unsafe fn wake_waker(data: *const ()) {
    // SAFETY: see above; this waker owned one reference, given back after the wake.
    unsafe {
        (*data.cast::<WakeNote>()).wake();
        WakeNote::release(NonNull::new_unchecked(data.cast_mut().cast()));
    }
}

unsafe fn wake_waker_by_ref(data: *const ()) {
    // SAFETY: see above.
    unsafe { &*data.cast::<WakeNote>() }.wake();
}

unsafe fn drop_waker(data: *const ()) {
    // SAFETY: see above; this waker owned one reference.
    unsafe { WakeNote::release(NonNull::new_unchecked(data.cast_mut().cast())) };
}

impl<F> Watched<F> {
    pub(crate) fn new(
        board: Option<Arc<Board>>,
        name: &str,
        inner: F,
        site: &'static std::panic::Location<'static>,
    ) -> Self {
        // The note is made here, in the caller's code, so no poll allocates.
        let note = board.as_ref().map(|b| {
            let kind = b.kinds.intern_at(
                std::ptr::from_ref(site) as usize,
                Some(name),
                Some((site.file(), site.line(), site.column())),
            );
            if b.track_wakes {
                // Stalls wait a moment after they end for watched futures' delays.
                b.set_waits_known();
            }
            NoteRef::new(b, kind)
        });
        Watched { inner, note }
    }

    /// The future is being spawned: its first poll's wait counts from now.
    fn scheduled_now(self) -> Self {
        if let Some(note) = self.note.as_ref().map(NoteRef::get) {
            if note.notes_wakes {
                note.woken_at.store(note.stamp(), Ordering::Relaxed);
            }
        }
        self
    }
}

/// Spawns `future` as a tokio task watched under `name` by `board` (see [`spawn`]). Its
/// caller's location is the task's spawn site, for tokio too.
#[track_caller]
pub(crate) fn spawn_watched<F>(
    board: Option<Arc<Board>>,
    name: &str,
    future: F,
    site: &'static std::panic::Location<'static>,
) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(Watched::new(board, name, future, site).scheduled_now())
}

/// Exits the watched poll when dropped (its end, or an unwinding panic). It holds the note,
/// not its board: the note's address stays in a register across the inner poll anyway, while
/// a reference to the board inside it was spilled to the stack for the unwinding path at every
/// poll (with wake notes −3 instructions per poll, without them +1: the compiler's register
/// choices; both counted by `scripts/instructions.sh`).
struct ExitOnDrop<'a>(&'a WakeNote);

impl Drop for ExitOnDrop<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.board.exit(PROBE);
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Some(note_ref) = this.note.as_ref() else {
            return this.inner.poll(cx);
        };
        let note = note_ref.get();
        let board = &note.board;
        if !note.notes_wakes {
            // schedule_delay is off: the poll is timed, the waker left alone.
            board.enter_task(PROBE, note.word(), note.task_id(), Wait::UNKNOWN);
            let _exit = ExitOnDrop(note);
            return this.inner.poll(cx);
        }
        // Registered before the future is polled: a wake during the poll reaches the task.
        // (Before the note is taken: a wake between the two is this poll's, a wait of ~0.)
        // SAFETY: this future's poll (`&mut self`: one poller at a time).
        unsafe { note.register_task(cx.waker()) };
        match note.take_quiet() {
            // The common case, with the wait a constant: the board's test of it folds away.
            // The task id as learnt: the first poll, with no wake noted, is never quiet, and
            // `enter_waited` learns it there (or at the next such poll if it was polled
            // outside any task then).
            Ok(()) => board.enter(PROBE, note.word(), || note.known_task_id(), Wait::QUIET),
            Err(stamp) => enter_waited(note, stamp),
        }
        let out = {
            let _exit = ExitOnDrop(note);
            this.inner
                .poll(&mut Context::from_waker(&note_ref.borrowed_waker()))
        };
        // Only this poll writes `polls` (see its docs): a load and a store, no read-modify-write.
        let polls = note.polls.load(Ordering::Relaxed).wrapping_add(1);
        note.polls.store(polls, Ordering::Relaxed);
        note.poll_ended();
        out
    }
}

/// A watched poll starts with a wait to note (or unknown), from the stamp it took: out of
/// line, so the common path's call sees a constant wait.
#[inline(never)]
fn enter_waited(note: &WakeNote, stamp: u64) {
    let waited = note.take_wait_from(stamp);
    note.board
        .enter(PROBE, note.word(), || note.task_id(), waited);
}

/// Watches the polls of `future` under the name `name`, with the caller's location as its
/// site. Use it for futures you spawn without a `tracing` span on stable tokio:
///
/// ```
/// # async fn handle() {}
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// tokio::spawn(loopwatch::watch("handle", handle()));
/// # }
/// ```
///
/// It reports to the most recently started [`Guard`](crate::Guard) that is still alive; with
/// none, the wrapper costs one branch per poll. [`Guard::watch`](crate::Guard::watch) names the
/// guard explicitly.
#[track_caller]
pub fn watch<F: Future>(name: &str, future: F) -> Watched<F> {
    Watched::new(current(), name, future, std::panic::Location::caller())
}

/// Spawns `future` on the current tokio runtime as a task watched under `name`, like
/// `tokio::spawn(loopwatch::watch(name, future))`, and also times its wait from the spawn to
/// its first poll (a plain [`watch`] knows a wait only from a wake on). On stable tokio this
/// makes a burst of spawned tasks queued behind a stall show as its victims:
///
/// ```
/// # async fn handle() {}
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let task = loopwatch::spawn("handle", handle());
/// task.await.unwrap();
/// # }
/// ```
///
/// # Panics
///
/// Like `tokio::spawn`, when called outside a tokio runtime.
#[track_caller]
pub fn spawn<F>(name: &str, future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    spawn_watched(current(), name, future, std::panic::Location::caller())
}

/// `.watched(name)` on any future: the method form of [`watch`].
pub trait WatchExt: Future + Sized {
    /// See [`watch`].
    #[track_caller]
    fn watched(self, name: &str) -> Watched<Self> {
        Watched::new(current(), name, self, std::panic::Location::caller())
    }
}

impl<F: Future> WatchExt for F {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::board::CLOCK_UNKNOWN;
    use std::time::Duration;

    /// A board with an async threshold of `threshold_ms` (victims' floor a tenth of it) that
    /// times one poll in `sample_every`, whose watched futures note their wakes or not.
    fn test_board(threshold_ms: u64, sample_every: u32, track_wakes: bool) -> Arc<Board> {
        let mut b = Board::new(
            [Some(Duration::from_millis(threshold_ms)), None, None],
            sample_every,
            false,
            1,
            16,
        );
        b.track_wakes = track_wakes;
        Arc::new(b)
    }

    /// A watched future whose poll panics still ends its poll on the board (the exit runs as
    /// the panic unwinds), with wake notes and without: the thread's next poll starts afresh,
    /// not nested in a poll that never ended (which the watchdog would report as a stall).
    #[test]
    fn a_watched_poll_that_panics_is_ended_on_the_board() {
        struct Boom;
        impl Future for Boom {
            type Output = ();
            fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
                panic!("boom");
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _ctx = rt.enter();
        for notes in [true, false] {
            let board = test_board(10, 4, notes);
            board.tick(board.now_ns());
            for _ in 0..3 {
                let mut fut = Box::pin(Watched::new(
                    Some(board.clone()),
                    "boom",
                    Boom,
                    std::panic::Location::caller(),
                ));
                let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
                }));
                assert!(polled.is_err());
                let slot = board.slots()[0].read();
                assert_eq!(slot.seq & 1, 0, "the poll ended (notes: {notes})");
            }
            assert_eq!(board.slots()[0].read().seq, 6, "three polls, each its own");
        }
    }

    /// Every poll of a watched future names its task on the board, the quiet ones on the
    /// common path too (with wake notes they store the id learnt at the first poll, which is
    /// never quiet).
    #[test]
    fn every_watched_poll_names_its_task() {
        struct Check {
            board: Arc<Board>,
            polls: u32,
            quiet: u32,
        }
        impl Future for Check {
            type Output = u32;
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
                let id = crate::probe::layer::current_task_id();
                assert_ne!(id, 0);
                assert_eq!(self.board.slots()[0].read().task, id, "poll {}", self.polls);
                self.quiet += u32::from(crate::board::common_path_poll_open());
                self.polls += 1;
                if self.polls == 20 {
                    return Poll::Ready(self.quiet);
                }
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // With wake notes and without (`schedule_delay(false)`: the id, learnt at the first
        // poll, is read at every poll's start, before the board's tests).
        for track_wakes in [true, false] {
            let board = test_board(500, 1 << 16, track_wakes);
            board.tick(board.now_ns());
            let fut = Watched::new(
                Some(board.clone()),
                "check",
                Check {
                    board: board.clone(),
                    polls: 0,
                    quiet: 0,
                },
                std::panic::Location::caller(),
            );
            let quiet = rt.block_on(async move { tokio::spawn(fut).await.unwrap() });
            assert!(
                quiet >= 15,
                "{quiet} of 20 polls on the common path (wake notes: {track_wakes})"
            );
        }
    }

    /// A note on a board whose async threshold is 10 ms (victims' floor 1 ms) and that times
    /// one poll in 4; the watchdog's clock at `clock`.
    fn note_at(clock: u64) -> NoteRef {
        let board = test_board(10, 4, true);
        board.tick(clock);
        NoteRef::new(&board, 1)
    }

    /// The note's wakers own one reference to the note each (the poll's borrowed one none),
    /// every wake, by value or by reference, reaches the task's waker once, and the last
    /// reference given back frees the note (and its hold on the board).
    #[test]
    fn a_note_waker_keeps_the_notes_count_and_wakes_the_task() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let r = note_at(0);
        let n = r.get();
        let board = n.board.clone();
        let task = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        // SAFETY: one caller (this test) registers.
        unsafe { n.register_task(&task_waker) };
        let borrowed = r.borrowed_waker();
        assert_eq!(n.refs.load(Ordering::Relaxed), 1);
        borrowed.wake_by_ref();
        let owned = (*borrowed).clone();
        assert!(owned.will_wake(&borrowed));
        assert_eq!(n.refs.load(Ordering::Relaxed), 2);
        owned.wake_by_ref();
        let second = owned.clone();
        second.wake();
        assert_eq!(n.refs.load(Ordering::Relaxed), 2);
        drop(owned);
        assert_eq!(n.refs.load(Ordering::Relaxed), 1);
        assert_eq!(task.0.load(Ordering::Relaxed), 3);
        // The future goes, a waker outlives it: the note lives until the waker goes too.
        let owned = (*borrowed).clone();
        assert_eq!(Arc::strong_count(&board), 2);
        drop(r);
        assert_eq!(Arc::strong_count(&board), 2);
        owned.wake();
        assert_eq!(Arc::strong_count(&board), 1);
        assert_eq!(task.0.load(Ordering::Relaxed), 4);
    }

    /// A waker the inner future keeps from its poll outlives the watched future: the note
    /// lives until that waker goes, and its wake still reaches the task that polled last.
    #[test]
    fn a_waker_kept_from_a_watched_poll_outlives_the_future() {
        struct Keep(Option<Waker>);
        impl Future for Keep {
            type Output = ();
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                self.0 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let board = note_at(0).get().board.clone();
        let task = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut fut = Box::pin(Watched::new(
            Some(board.clone()),
            "keep",
            Keep(None),
            std::panic::Location::caller(),
        ));
        assert!(fut
            .as_mut()
            .poll(&mut Context::from_waker(&task_waker))
            .is_pending());
        let kept = fut.as_mut().project().inner.0.take().expect("a waker kept");
        assert_eq!(Arc::strong_count(&board), 2);
        drop(fut);
        assert_eq!(Arc::strong_count(&board), 2);
        kept.wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 1);
        assert_eq!(Arc::strong_count(&board), 1);
    }

    /// An exactly stamped wake (flagged) is never quiet, whatever the watchdog's clock reads
    /// beside its nanoseconds: the quiet test has no test of the flags of its own.
    #[test]
    fn an_exact_stamp_is_never_quiet() {
        const MS: u64 = 1_000_000;
        let r = note_at(100 * MS);
        let n = r.get();
        for nanos in [2, MS, 100 * MS, EXACT_MAX] {
            for flags in [EXACT, EXACT | CHOSEN] {
                for clock in [0, nanos - 1, nanos, nanos + 1, 100 * MS, CLOCK_UNKNOWN] {
                    n.board.tick(clock);
                    n.woken_at.store(nanos | flags, Ordering::Relaxed);
                    assert_eq!(
                        n.take_quiet(),
                        Err(nanos | flags),
                        "stamp {nanos} flags {flags:#x} clock {clock}"
                    );
                }
            }
        }
        // A coarse one at the clock is (a wake and a poll in one tick).
        n.board.tick(100 * MS);
        n.woken_at.store((100 * MS) | 1, Ordering::Relaxed);
        assert_eq!(n.take_quiet(), Ok(()));
    }

    /// The note counts polls in 16 bits: across the count's wrap, still exactly one wake in
    /// `sample_every` is chosen, up to the largest `sample_every` (65,536) and at the least.
    #[test]
    // Arithmetic, no unsafe code: its 262,144 stamps take minutes under Miri.
    #[cfg_attr(miri, ignore)]
    fn a_notes_poll_count_chooses_one_wake_in_sample_every_across_its_wrap() {
        for every in [65_536, 4] {
            let board = test_board(10, every, true);
            board.tick(100_000_000);
            let r = NoteRef::new(&board, 1);
            let n = r.get();
            let start = u16::MAX - 2;
            let mut chosen = 0;
            for k in 0..2 * 65_536_u32 {
                n.polls
                    .store(start.wrapping_add(k as u16), Ordering::Relaxed);
                chosen += u32::from(n.stamp() & CHOSEN != 0);
            }
            assert_eq!(chosen, 2 * 65_536 / every, "sample_every {every}");
            // The count wrapped to 0, a multiple of any `sample_every`: chosen.
            n.polls.store(0, Ordering::Relaxed);
            assert_ne!(n.stamp() & CHOSEN, 0);
        }
    }

    /// Wakes are stamped with the watchdog's clock, except after one poll in `sample_every`
    /// (real clock, chosen for the histogram); a wait below the victims' floor is quiet (no
    /// note, on the common path), a longer one coarse, one with no wake stamped unknown.
    #[test]
    fn a_wake_note_stamps_coarse_except_after_a_sampled_poll_and_short_waits_are_quiet() {
        const MS: u64 = 1_000_000;
        let r = note_at(100 * MS);
        let n = r.get();
        n.polls.store(5, Ordering::Relaxed);
        let coarse = n.stamp();
        assert_eq!(coarse, (100 * MS) | 1);
        n.polls.store(8, Ordering::Relaxed);
        let exact = n.stamp();
        assert_eq!(exact & (EXACT | CHOSEN), EXACT | CHOSEN);
        n.polls.store(9, Ordering::Relaxed);

        // No wake noted: unknown.
        assert_eq!(n.take_wait(), Wait::UNKNOWN);
        // Woken and polled in one tick, or less than the floor later: quiet.
        n.note();
        assert_eq!(n.take_wait(), Wait::QUIET);
        n.note();
        n.board.tick(100 * MS + MS - 2);
        assert_eq!(n.take_wait(), Wait::QUIET);
        // At the floor: a coarse wait, noted for victims.
        n.board.tick(100 * MS);
        n.note();
        n.board.tick(101 * MS);
        let w = n.take_wait();
        assert!(!w.is_quiet(n.board.wait_floor_ns()) && !w.for_histogram(true));
        assert_eq!(w.nanos(), MS);
        // The watchdog sleeps through an idle spell: the wait is read off the real clock.
        n.board.tick(100 * MS);
        n.note();
        n.board.tick(CLOCK_UNKNOWN);
        let w = n.take_wait();
        assert!(w.is_known() && !w.for_histogram(true));
        // A chosen wake: exact, for the histogram.
        n.polls.store(12, Ordering::Relaxed);
        n.board.tick(100 * MS);
        n.note();
        let w = n.take_wait();
        assert!(w.is_known() && w.for_histogram(false));
        // Only the first wake since the poll counts.
        n.polls.store(13, Ordering::Relaxed);
        n.note();
        n.board.tick(105 * MS);
        n.note();
        assert_eq!(n.take_wait().nanos(), 5 * MS);
    }

    /// A wake noted during a poll, or one that read its stamp before the poll started and
    /// noted it after, woke the task during the poll: the next poll waited from the poll's
    /// end, not through the poll (which is not a wait: a long poll's own task is no victim
    /// of it).
    #[test]
    fn a_wake_noted_during_a_poll_waits_from_the_polls_end() {
        const MS: u64 = 1_000_000;
        let r = note_at(100 * MS);
        let n = r.get();
        n.polls.store(5, Ordering::Relaxed);
        // A wake reads its stamp; the poll starts (no wake noted yet: unknown); the wake
        // notes its stamp; the poll runs 50 ms.
        let early = n.stamp();
        assert_eq!(n.take_wait(), Wait::UNKNOWN);
        n.woken_at.store(early, Ordering::Relaxed);
        n.board.tick(150 * MS);
        n.poll_ended();
        assert_eq!(n.woken_at.load(Ordering::Relaxed), (150 * MS) | 1);
        // Polled again at once: a quiet wait, not 50 ms.
        assert_eq!(n.take_wait(), Wait::QUIET);
        // A yield: woken in its own poll, then waits from the poll's end.
        n.note();
        n.board.tick(160 * MS);
        n.poll_ended();
        n.board.tick(162 * MS);
        assert_eq!(n.take_wait().nanos(), 2 * MS);
        // No wake during the poll: none noted after it.
        n.poll_ended();
        assert_eq!(n.woken_at.load(Ordering::Relaxed), 0);
    }

    /// What a watched future costs in memory, as docs/PERFORMANCE.md states it: the pointer
    /// beside the future, and one allocation of its note (its reference count included), with
    /// or without wake notes. Issue 15's budget is 64 bytes: a field added here must fit.
    #[test]
    fn a_watched_future_costs_64_bytes_a_pointer_beside_it_and_a_56_byte_note() {
        // Beside a future of no size (a larger one's alignment may pad it).
        let inline = std::mem::size_of::<Watched<std::future::Pending<()>>>();
        let note = std::mem::size_of::<WakeNote>();
        if cfg!(target_pointer_width = "64") {
            assert_eq!((inline, note), (8, 56));
        }
    }
}
