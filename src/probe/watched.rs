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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use crate::board::{clock_known, Board, PROBE};
use crate::probe::layer::current_task_id;
use crate::probe::task_waker::TaskWaker;
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
        word: CulpritWord,
        // The task it runs in, learnt at its first poll.
        task: u64,
        board: Option<Arc<Board>>,
        // Its wake note (when it notes wakes): the inner future is polled with a waker that
        // borrows it (see `NOTE_WAKER`: nothing stored, no reference count touched per poll).
        note: Option<Arc<WakeNote>>,
    }
}

/// A future's wake note.
fn wake_note(board: &Arc<Board>) -> Arc<WakeNote> {
    let note = Arc::new(WakeNote {
        board: board.clone(),
        woken_at: AtomicU64::new(0),
        polling: AtomicBool::new(false),
        polls: AtomicU32::new(0),
        task: TaskWaker::new(),
    });
    // Which wakes are timed exactly: those after one poll in `sample_every`, counted from a
    // point that differs between futures (their note's address), so short-lived futures
    // share it.
    note.polls
        .store((Arc::as_ptr(&note) as usize >> 7) as u32, Ordering::Relaxed);
    note
}

/// In `woken_at`: woken during its own poll; the wait starts at that poll's end.
const WOKEN_IN_POLL: u64 = u64::MAX;
/// In `woken_at`: the stamp is from the real clock, not the watchdog's.
const EXACT: u64 = 1 << 63;
/// In `woken_at`: the wake was chosen for the schedule-delay histogram.
const CHOSEN: u64 = 1 << 62;
/// The nanoseconds of a stamp, without its flags.
const STAMP_NANOS: u64 = CHOSEN - 1;

/// The state behind a [`Watched`] future's waker.
///
/// A wake is stamped with the watchdog's clock (one load; exact to a tick, enough to find a
/// stall's victims), except the wakes after one poll in `sample_every`, stamped with the real
/// clock for the schedule-delay histogram: so most polls read no clock at all.
#[derive(Debug)]
struct WakeNote {
    board: Arc<Board>,
    /// The first wake since the last poll: a board time (`EXACT` set if from the real
    /// clock, `CHOSEN` if timed for the histogram), or [`WOKEN_IN_POLL`]; 0: no wake.
    woken_at: AtomicU64,
    /// The future is being polled (a wake now needs no clock: the poll's end is its time).
    polling: AtomicBool,
    /// Polls so far (from an offset): a wake after one in `sample_every` is timed exactly.
    /// Only the future's poll writes it (one poller at a time: `&mut` access); atomic because
    /// the note is shared with its wakers, which read it.
    polls: AtomicU32,
    /// The waker of the task that polled the future last.
    task: TaskWaker,
}

impl WakeNote {
    /// A stamp for a wake now.
    #[inline]
    fn stamp(&self) -> u64 {
        if self
            .board
            .sampled(u64::from(self.polls.load(Ordering::Relaxed)))
        {
            return self.board.now_ns().clamp(1, STAMP_NANOS) | EXACT | CHOSEN;
        }
        match self.board.coarse_ns() {
            // The watchdog's clock has its lowest bit clear (see `board::EXACT`): set, a stamp
            // is never 0 (no wake), and reads at most a nanosecond late. Its nanoseconds stay
            // below `CHOSEN` (2^62: 146 years after the board's start).
            t if clock_known(t) => t | 1,
            // The watchdog sleeps through an idle spell and its clock stops: a poll starting
            // now (this wake's, perhaps) ends the spell, so read the real one.
            _ => self.board.now_ns().clamp(1, STAMP_NANOS) | EXACT,
        }
    }

    #[inline]
    fn note(&self) {
        if self.woken_at.load(Ordering::Relaxed) == 0 {
            // Only the first wake counts: the task waits from then.
            let at = if self.polling.load(Ordering::Relaxed) {
                WOKEN_IN_POLL
            } else {
                self.stamp()
            };
            let _ = self
                .woken_at
                .compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// How long the future waited from the wake noted (taking the note), as `Board::enter`
    /// wants it: exact and chosen for the histogram, or coarse, or unknown.
    #[inline]
    fn take_wait(&self) -> Wait {
        let w = self.woken_at.swap(0, Ordering::Relaxed);
        // The common case: a coarse stamp (no flag; `WOKEN_IN_POLL` has them all), and a wait
        // too short to note. The clock's lowest bit set as the stamp's was: a wake and a poll
        // in one tick wait 0. An unknown clock reads far past any stamp (see `take_wait_from`).
        if w != 0 && w & (EXACT | CHOSEN) == 0 {
            let waited = (self.board.coarse_ns() | 1).wrapping_sub(w);
            if waited < self.board.wait_floor_ns() {
                return Wait::QUIET;
            }
        }
        self.take_wait_from(w)
    }

    /// [`take_wait`](Self::take_wait) of the stamp `w`, for any stamp.
    #[inline(never)]
    fn take_wait_from(&self, w: u64) -> Wait {
        if w == 0 || w == WOKEN_IN_POLL {
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
}

impl WakeNote {
    #[inline]
    fn wake(&self) {
        self.note();
        // Before the first poll there is no task to wake (and nothing polled the inner future
        // with this waker yet).
        self.task.wake();
    }

    /// A waker that borrows this note: for the inner future's poll, while the caller holds
    /// the note. Not to be dropped (it owns no count); its clones own one each.
    #[inline]
    fn borrowed_waker(self: &Arc<Self>) -> ManuallyDrop<Waker> {
        let raw = RawWaker::new(Arc::as_ptr(self).cast(), &NOTE_WAKER);
        // SAFETY: `NOTE_WAKER`'s functions are called with `Arc::as_ptr` of a live
        // `Arc<WakeNote>` (this one, alive while the caller holds it, and it outlives the
        // poll the waker is lent to); the waker is never dropped, so the count it does not own
        // is never given back; a clone takes a count of its own.
        ManuallyDrop::new(unsafe { Waker::from_raw(raw) })
    }
}

/// The wakers of a wake note: the data pointer is `Arc::as_ptr` of an `Arc<WakeNote>`, whose
/// strong count each owned waker holds one of. (Written out, not `std::task::Wake`, for the
/// borrowed waker of the poll, and for a wake by value that wakes and gives its count back in
/// one call.)
static NOTE_WAKER: RawWakerVTable =
    RawWakerVTable::new(clone_waker, wake_waker, wake_waker_by_ref, drop_waker);

/// SAFETY (the four): `data` is `Arc::as_ptr` of a live `Arc<WakeNote>` (see `NOTE_WAKER`).
unsafe fn clone_waker(data: *const ()) -> RawWaker {
    // SAFETY: see above; the clone owns the count taken here.
    unsafe { Arc::increment_strong_count(data.cast::<WakeNote>()) };
    RawWaker::new(data, &NOTE_WAKER)
}

unsafe fn wake_waker(data: *const ()) {
    // SAFETY: see above; this waker owned one count, given back as `note` drops.
    let note = unsafe { Arc::from_raw(data.cast::<WakeNote>()) };
    note.wake();
}

unsafe fn wake_waker_by_ref(data: *const ()) {
    // SAFETY: see above.
    unsafe { &*data.cast::<WakeNote>() }.wake();
}

unsafe fn drop_waker(data: *const ()) {
    // SAFETY: see above; this waker owned one count.
    unsafe { Arc::decrement_strong_count(data.cast::<WakeNote>()) };
}

impl<F> Watched<F> {
    pub(crate) fn new(
        board: Option<Arc<Board>>,
        name: &str,
        inner: F,
        site: &'static std::panic::Location<'static>,
    ) -> Self {
        let word = board.as_ref().map_or(CulpritWord::NONE, |b| {
            let kind = b
                .kinds
                .intern(Some(name), Some((site.file(), site.line(), site.column())));
            CulpritWord::kind(kind, LayerKind::Async, true)
        });
        // The note is made here, in the caller's code, so no poll allocates.
        let note = board.as_ref().filter(|b| b.track_wakes).map(|b| {
            // Stalls wait a moment after they end for watched futures' delays.
            b.set_waits_known();
            wake_note(b)
        });
        Watched {
            inner,
            word,
            task: 0,
            board,
            note,
        }
    }

    /// The future is being spawned: its first poll's wait counts from now.
    fn scheduled_now(self) -> Self {
        if let Some(note) = &self.note {
            note.woken_at.store(note.stamp(), Ordering::Relaxed);
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

struct ExitOnDrop<'a>(&'a Arc<Board>);

impl Drop for ExitOnDrop<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.exit(PROBE);
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Some(board) = this.board else {
            return this.inner.poll(cx);
        };
        let Some(note) = this.note else {
            // schedule_delay is off: the poll is timed, the waker left alone.
            board.enter(PROBE, *this.word, || task_id(this.task), Wait::UNKNOWN);
            let _exit = ExitOnDrop(board);
            return this.inner.poll(cx);
        };
        let waited = note.take_wait();
        // Registered before the future is polled: a wake during the poll reaches the task.
        // SAFETY: only this future's poll registers (`&mut self`: one poller at a time).
        unsafe { note.task.register(cx.waker()) };
        if waited == Wait::QUIET {
            // The common case, with the wait a constant: the board's test of it folds away.
            board.enter(PROBE, *this.word, || task_id(this.task), Wait::QUIET);
        } else {
            enter_waited(board, *this.word, this.task, waited);
        }
        note.polling.store(true, Ordering::Relaxed);
        let out = {
            let _exit = ExitOnDrop(board);
            this.inner
                .poll(&mut Context::from_waker(&note.borrowed_waker()))
        };
        note.polling.store(false, Ordering::Relaxed);
        // Only this poll writes `polls` (see its docs): a load and a store, no read-modify-write.
        let polls = note.polls.load(Ordering::Relaxed).wrapping_add(1);
        note.polls.store(polls, Ordering::Relaxed);
        if note.woken_at.load(Ordering::Relaxed) == WOKEN_IN_POLL {
            // Woken during its own poll (a yield, say): it waits from the poll's end, not
            // through the rest of the poll.
            note.woken_at.store(note.stamp(), Ordering::Relaxed);
        }
        out
    }
}

/// A watched poll starts with a wait to note (or unknown): out of line, so the common path's
/// call sees a constant wait.
#[inline(never)]
fn enter_waited(board: &Arc<Board>, word: CulpritWord, task: &mut u64, waited: Wait) {
    board.enter(PROBE, word, || task_id(task), waited);
}

/// The task id of the watched future's task, learnt at its first poll.
#[inline]
fn task_id(task: &mut u64) -> u64 {
    if *task == 0 {
        *task = current_task_id();
    }
    *task
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

    /// A note on a board whose async threshold is 10 ms (victims' floor 1 ms) and that times
    /// one poll in 4; the watchdog's clock at `clock`.
    fn note_at(clock: u64) -> Arc<WakeNote> {
        let board = Arc::new(Board::new(
            [Some(Duration::from_millis(10)), None, None],
            4,
            false,
            1,
            16,
        ));
        board.tick(clock);
        wake_note(&board)
    }

    /// The note's wakers own one count of the note each (the poll's borrowed one none), and
    /// every wake, by value or by reference, reaches the task's waker once.
    #[test]
    fn a_note_waker_keeps_the_notes_count_and_wakes_the_task() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let n = note_at(0);
        let task = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        // SAFETY: one caller (this test) registers.
        unsafe { n.task.register(&task_waker) };
        let borrowed = n.borrowed_waker();
        assert_eq!(Arc::strong_count(&n), 1);
        borrowed.wake_by_ref();
        let owned = (*borrowed).clone();
        assert!(owned.will_wake(&borrowed));
        assert_eq!(Arc::strong_count(&n), 2);
        owned.wake_by_ref();
        owned.clone().wake();
        assert_eq!(Arc::strong_count(&n), 2);
        drop(owned);
        assert_eq!(Arc::strong_count(&n), 1);
        assert_eq!(task.0.load(Ordering::Relaxed), 3);
    }

    /// Wakes are stamped with the watchdog's clock, except after one poll in `sample_every`
    /// (real clock, chosen for the histogram); a wait below the victims' floor is quiet (no
    /// note, on the common path), a longer one coarse, one with no wake stamped unknown.
    #[test]
    fn a_wake_note_stamps_coarse_except_after_a_sampled_poll_and_short_waits_are_quiet() {
        const MS: u64 = 1_000_000;
        let n = note_at(100 * MS);
        n.polls.store(5, Ordering::Relaxed);
        let coarse = n.stamp();
        assert_eq!(coarse, (100 * MS) | 1);
        n.polls.store(8, Ordering::Relaxed);
        let exact = n.stamp();
        assert_eq!(exact & (EXACT | CHOSEN), EXACT | CHOSEN);
        n.polls.store(9, Ordering::Relaxed);

        // No wake noted, or woken in its own poll: unknown.
        assert_eq!(n.take_wait(), Wait::UNKNOWN);
        n.woken_at.store(WOKEN_IN_POLL, Ordering::Relaxed);
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

    /// What a watched future costs in memory, as docs/PERFORMANCE.md states it: the wrapper's
    /// fields beside the future, and with wake notes one allocation of the note (its `Arc`
    /// counts included). A field added here must be weighed against issue 15's budget.
    #[test]
    fn a_watched_future_costs_32_bytes_beside_it_and_a_64_byte_note() {
        // Beside a future of no size (a larger one's alignment may pad it).
        let inline = std::mem::size_of::<Watched<std::future::Pending<()>>>();
        let note = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<WakeNote>();
        if cfg!(target_pointer_width = "64") {
            assert_eq!((inline, note), (32, 64));
        }
    }
}
