//! The task waker a watched future's wake note forwards to: the waker of the task that polls
//! the future, kept across wakes.
//!
//! `futures`' `AtomicWaker` hands its waker *out* on each wake, so every poll after a wake has
//! to clone the task's waker again (an atomic reference count in tokio) with two
//! compare-exchanges around it: for a task that yields in a loop that was much of what wake
//! notes cost. Here the waker stays in place: a poll whose task's waker did not change (the
//! common case: a spawned task's waker never does) only compares it, with no
//! read-modify-write at all, and a wake wakes it where it is, by reference.
//!
//! The protocol is `AtomicWaker`'s, less the taking. A state word has three bits:
//! `REGISTERING` (the poller is replacing the waker), `WAKING` (a wake is reading it) and
//! `PENDING` (a wake came while another held the word). Only the poller (the future's `poll`,
//! which has `&mut` access to the future, so one at a time) writes the waker, and only while
//! it holds `REGISTERING` set from an idle state; a wake reads it only while it holds
//! `WAKING`, set from a state with neither. So the waker is never read while it is written:
//!
//! - `register` with the waker it holds: nothing to write, and reading it beside a wake that
//!   reads it too is no race;
//! - `register` with another waker: `REGISTERING` is set from idle (else a wake is reading: the
//!   new waker is woken at once instead, and the task's next poll registers again), the waker
//!   replaced, and the state put back to idle; if a wake came meanwhile (`WAKING` set), it did
//!   not read the waker, so the new one is woken here;
//! - `wake`: `WAKING` is set from idle, the waker woken *by reference* (no clone: tokio's
//!   reference count is not touched for a task woken in its own poll), and `WAKING` cleared.
//!   A wake that finds the word held sets `PENDING` and does nothing else: the holder finds
//!   `PENDING` as it lets go, and wakes the task once more. The order matters: the task may run
//!   on the holder's wake, before the later wake's event, and miss it; the second wake comes
//!   after that event (a lost wake otherwise: found by `tests/detection/watched_wakes.rs` when
//!   a wake that found `WAKING` held did nothing, and the holder woke the task before letting
//!   go).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Waker;

/// The state word's values (an `AtomicU8` kept beside the waker by its owner, so that a wake
/// note packs it with its other small fields).
pub(crate) const IDLE: u8 = 0;
const REGISTERING: u8 = 1;
const WAKING: u8 = 2;
/// A wake came while another held `WAKING`: the holder wakes the task once more.
const PENDING: u8 = 4;

/// The waker of the task polling a watched future (see the module's docs). Its state word is
/// its owner's field, passed to each call: always the same one.
pub(crate) struct TaskWaker {
    /// The task's waker; before the first poll, one that does nothing (no `Option` to test
    /// at each wake and poll).
    waker: UnsafeCell<Waker>,
}

// SAFETY: `waker` is written only by `register` while it holds `REGISTERING` (set from
// `IDLE`), and read by `wake` only while it holds `WAKING` (set from `IDLE`) or by `register`
// itself (the only writer, one at a time: `register` takes `&self` but is called only from the
// future's `poll`, which has `&mut` access; see `Watched::poll`), every call with the same
// state word (their contract). `Waker` is `Send + Sync`.
unsafe impl Send for TaskWaker {}
unsafe impl Sync for TaskWaker {}

impl std::fmt::Debug for TaskWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskWaker").finish_non_exhaustive()
    }
}

impl TaskWaker {
    pub(crate) fn new() -> TaskWaker {
        TaskWaker {
            waker: UnsafeCell::new(Waker::noop().clone()),
        }
    }

    /// The task polling the future now has `waker`.
    ///
    /// # Safety
    ///
    /// Called by one thread at a time (the poller of the future that owns the note), and with
    /// the same `state` (starting at [`IDLE`]) as every other call on this `TaskWaker`.
    #[inline]
    pub(crate) unsafe fn register(&self, state: &AtomicU8, waker: &Waker) {
        // SAFETY: only this caller writes `waker` (the function's contract); a concurrent
        // wake may read it too, which is no race.
        if unsafe { &*self.waker.get() }.will_wake(waker) {
            // A wake after this poll's start still reaches the task: it wakes the waker held,
            // which wakes the same task.
            return;
        }
        // SAFETY: this function's contract.
        unsafe { self.replace(state, waker) };
    }

    /// # Safety
    ///
    /// As [`register`](Self::register).
    #[cold]
    unsafe fn replace(&self, state: &AtomicU8, waker: &Waker) {
        match state.compare_exchange(IDLE, REGISTERING, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => {
                // SAFETY: `REGISTERING` is held, set from `IDLE`: no wake reads the waker.
                unsafe { *self.waker.get() = waker.clone() };
                if state
                    .compare_exchange(REGISTERING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    // A wake came while the waker was replaced and left it to this call
                    // (acquired: its event is seen by the task woken here; a wake after
                    // this finds the word idle and wakes the task itself).
                    state.swap(IDLE, Ordering::AcqRel);
                    waker.wake_by_ref();
                }
            }
            // A wake is reading the old waker (or, were the contract broken, another
            // registration runs): wake the new task now; its next poll registers again.
            Err(_) => waker.wake_by_ref(),
        }
    }

    /// Wakes the task that polled the future last (none before the first poll).
    ///
    /// # Safety
    ///
    /// With the same `state` as every other call on this `TaskWaker`.
    #[inline]
    pub(crate) unsafe fn wake(&self, state: &AtomicU8) {
        // `WAKING` set from `IDLE`: the common case, in one compare-exchange.
        if state
            .compare_exchange(IDLE, WAKING, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: `WAKING` is held, set from `IDLE` (the caller's `state`).
            unsafe { self.wake_held(state) };
        } else {
            // SAFETY: the caller's.
            unsafe { self.wake_contended(state) };
        }
    }

    /// [`wake`](Self::wake) where the state was not idle: a wake or a registration under way.
    ///
    /// # Safety
    ///
    /// As [`wake`](Self::wake).
    #[cold]
    unsafe fn wake_contended(&self, state: &AtomicU8) {
        // `PENDING` tells the wake that holds `WAKING` (or the registration that holds
        // `REGISTERING`) that this wake came: it wakes the task again after this event.
        let was = state.fetch_or(WAKING | PENDING, Ordering::AcqRel);
        if was & (WAKING | REGISTERING) == 0 {
            // Idle again meanwhile: this wake holds `WAKING` (its `PENDING` costs the task one
            // wake more).
            // SAFETY: `WAKING` is held, set by this call from a state without it.
            unsafe { self.wake_held(state) };
        }
    }

    /// Wakes the task, `WAKING` held: by reference (no clone of the task's waker), then lets
    /// go; a wake that came meanwhile (`PENDING`) is one more wake, after its event.
    ///
    /// # Safety
    ///
    /// The caller holds `WAKING` in `state` (the state of this `TaskWaker`), set from a state
    /// without `WAKING` or `REGISTERING`.
    #[inline]
    unsafe fn wake_held(&self, state: &AtomicU8) {
        loop {
            // A waker that panics (an executor's bug) lets go of the word as the panic leaves:
            // the next wake finds it idle (the task is not left unwakeable).
            let unwinding = LetGo(state);
            // SAFETY: `WAKING` is held: no registration writes the waker until it is cleared.
            unsafe { &*self.waker.get() }.wake_by_ref();
            std::mem::forget(unwinding);
            // Acquire on failure too: the event of a wake that set `PENDING` is seen by the
            // task the next round wakes.
            match state.compare_exchange(WAKING, IDLE, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(_) => {
                    state.fetch_and(!PENDING, Ordering::AcqRel);
                }
            }
        }
    }
}

/// Puts a task waker's state word back to idle when dropped: during a panic out of a wake.
struct LetGo<'a>(&'a AtomicU8);

impl Drop for LetGo<'_> {
    #[cold]
    fn drop(&mut self) {
        self.0.store(IDLE, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::task::Wake;

    /// A waker that counts its wakes.
    struct Count(AtomicU64);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicU64::new(0)));
        let w = Waker::from(c.clone());
        (c, w)
    }

    fn wakes(c: &Count) -> u64 {
        c.0.load(Ordering::Relaxed)
    }

    /// A task waker with its state word, as a wake note keeps them.
    struct Tw {
        state: AtomicU8,
        tw: TaskWaker,
    }

    impl Tw {
        fn new() -> Tw {
            Tw {
                state: AtomicU8::new(IDLE),
                tw: TaskWaker::new(),
            }
        }

        /// # Safety
        ///
        /// One registering thread at a time.
        unsafe fn register(&self, waker: &Waker) {
            // SAFETY: the caller's; always this state.
            unsafe { self.tw.register(&self.state, waker) }
        }

        fn wake(&self) {
            // SAFETY: always this state.
            unsafe { self.tw.wake(&self.state) }
        }
    }

    #[test]
    fn a_wake_reaches_the_registered_task_and_leaves_its_waker_in_place() {
        let tw = Tw::new();
        // Before any poll there is no task to wake.
        tw.wake();
        let (a, wa) = counter();
        // SAFETY: one thread.
        unsafe { tw.register(&wa) };
        tw.wake();
        tw.wake();
        assert_eq!(wakes(&a), 2);
        // The same task again: nothing is cloned (the waker's count does not move).
        let refs = Arc::strong_count(&a);
        unsafe { tw.register(&wa.clone()) };
        assert_eq!(Arc::strong_count(&a), refs);
        // Another task: it is the one woken from now on, and the old waker is dropped.
        let (b, wb) = counter();
        unsafe { tw.register(&wb) };
        assert_eq!(Arc::strong_count(&a), refs - 1);
        tw.wake();
        assert_eq!((wakes(&a), wakes(&b)), (2, 1));
    }

    #[test]
    fn a_registration_that_meets_a_wake_wakes_the_new_task_itself() {
        let tw = Tw::new();
        let (a, wa) = counter();
        // A wake is reading the waker: the new one cannot be stored, so it is woken.
        tw.state.store(WAKING, Ordering::Relaxed);
        unsafe { tw.register(&wa) };
        assert_eq!(wakes(&a), 1);
        tw.state.store(IDLE, Ordering::Relaxed);
        // Registered later, it is stored and woken by the next wake.
        unsafe { tw.register(&wa) };
        tw.wake();
        assert_eq!(wakes(&a), 2);
    }

    /// A task's waker whose first wake stands for another thread's wake arriving at that very
    /// moment: it wakes the same `TaskWaker` again, from inside the first wake.
    struct Reentrant {
        tw: std::sync::Weak<Tw>,
        wakes: AtomicU64,
    }

    impl Wake for Reentrant {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            // The task runs on this wake and sees nothing new; then the second event comes,
            // and its wake must still reach the task.
            if self.wakes.fetch_add(1, Ordering::Relaxed) == 0 {
                if let Some(tw) = self.tw.upgrade() {
                    tw.wake();
                }
            }
        }
    }

    #[test]
    fn a_wake_that_comes_while_another_wakes_the_task_still_reaches_it() {
        let tw = Arc::new(Tw::new());
        let task = Arc::new(Reentrant {
            tw: Arc::downgrade(&tw),
            wakes: AtomicU64::new(0),
        });
        // SAFETY: one thread.
        unsafe { tw.register(&Waker::from(task.clone())) };
        tw.wake();
        // Woken twice: the second wake was not swallowed by the first one's hold on the state.
        assert_eq!(task.wakes.load(Ordering::Relaxed), 2);
        assert_eq!(tw.state.load(Ordering::Relaxed), IDLE);
    }

    /// A wake reads the task's waker in place and wakes it by reference: no clone, so tokio's
    /// reference count on the task is not touched by a wake.
    #[test]
    fn a_wake_wakes_the_task_by_reference() {
        struct ByRef {
            by_ref: AtomicU64,
            by_value: AtomicU64,
        }
        impl Wake for ByRef {
            fn wake(self: Arc<Self>) {
                self.by_value.fetch_add(1, Ordering::Relaxed);
            }
            fn wake_by_ref(self: &Arc<Self>) {
                self.by_ref.fetch_add(1, Ordering::Relaxed);
            }
        }
        let tw = Tw::new();
        let task = Arc::new(ByRef {
            by_ref: AtomicU64::new(0),
            by_value: AtomicU64::new(0),
        });
        // SAFETY: one thread.
        unsafe { tw.register(&Waker::from(task.clone())) };
        let refs = Arc::strong_count(&task);
        tw.wake();
        tw.wake();
        assert_eq!(task.by_ref.load(Ordering::Relaxed), 2);
        assert_eq!(task.by_value.load(Ordering::Relaxed), 0);
        assert_eq!(Arc::strong_count(&task), refs);
    }

    /// A wake that finds another holding the word only marks it; the holder, letting go, wakes
    /// the task once more (after the second wake's event), and leaves the word idle.
    #[test]
    fn a_wake_that_finds_the_word_held_is_woken_again_by_its_holder() {
        let tw = Tw::new();
        let (a, wa) = counter();
        // SAFETY: one thread.
        unsafe { tw.register(&wa) };
        tw.state.store(WAKING, Ordering::Relaxed);
        tw.wake();
        assert_eq!(wakes(&a), 0);
        assert_eq!(tw.state.load(Ordering::Relaxed), WAKING | PENDING);
        // SAFETY: this test holds `WAKING` (set above from idle).
        unsafe { tw.tw.wake_held(&tw.state) };
        assert_eq!(wakes(&a), 2);
        assert_eq!(tw.state.load(Ordering::Relaxed), IDLE);
        // A registration under way: the wake marks it and leaves the wake to it.
        tw.state.store(REGISTERING, Ordering::Relaxed);
        tw.wake();
        assert_eq!(wakes(&a), 2);
        assert_eq!(
            tw.state.load(Ordering::Relaxed),
            REGISTERING | WAKING | PENDING
        );
    }

    /// A task's waker that panics as it wakes (an executor's bug): the panic goes to the
    /// waker's caller, and the task waker is left idle, so the next wake reaches the task.
    #[test]
    fn a_waker_that_panics_leaves_the_task_waker_usable() {
        struct Panics(AtomicU64);
        impl Wake for Panics {
            fn wake(self: Arc<Self>) {
                self.wake_by_ref();
            }
            fn wake_by_ref(self: &Arc<Self>) {
                if self.0.fetch_add(1, Ordering::Relaxed) == 0 {
                    panic!("an executor's waker panics");
                }
            }
        }
        let tw = Tw::new();
        let task = Arc::new(Panics(AtomicU64::new(0)));
        // SAFETY: one thread.
        unsafe { tw.register(&Waker::from(task.clone())) };
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tw.wake())).is_err());
        assert_eq!(tw.state.load(Ordering::Relaxed), IDLE);
        tw.wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 2);
    }

    /// Threads publish an event each and wake the task, all at once, round after round: after
    /// every round the task has seen every event, at a wake that came after it (no event is
    /// left behind a wake that found another under way and did nothing).
    #[test]
    fn every_event_is_seen_by_a_wake_after_it() {
        struct Seen {
            events: Arc<AtomicU64>,
            seen: AtomicU64,
        }
        impl Wake for Seen {
            fn wake(self: Arc<Self>) {
                self.wake_by_ref();
            }
            fn wake_by_ref(self: &Arc<Self>) {
                // The task runs and reads the events published so far, then runs a while
                // (the window in which another thread's event and wake come).
                let now = self.events.load(Ordering::Acquire);
                self.seen.fetch_max(now, Ordering::Relaxed);
                for _ in 0..500 {
                    std::hint::spin_loop();
                }
            }
        }
        let (threads, rounds) = (2u64, if cfg!(miri) { 5 } else { 5_000 });
        let tw = Arc::new(Tw::new());
        let events = Arc::new(AtomicU64::new(0));
        let task = Arc::new(Seen {
            events: events.clone(),
            seen: AtomicU64::new(0),
        });
        // SAFETY: one thread registers (this one, before the wakers start).
        unsafe { tw.register(&Waker::from(task.clone())) };
        let start = Arc::new(std::sync::Barrier::new(threads as usize + 1));
        let done = Arc::new(std::sync::Barrier::new(threads as usize + 1));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (tw, events) = (tw.clone(), events.clone());
                let (start, done) = (start.clone(), done.clone());
                std::thread::spawn(move || {
                    for _ in 0..rounds {
                        start.wait();
                        events.fetch_add(1, Ordering::Release);
                        tw.wake();
                        done.wait();
                    }
                })
            })
            .collect();
        let mut missed = 0;
        for r in 1..=rounds {
            start.wait();
            done.wait();
            if task.seen.load(Ordering::Relaxed) != r * threads {
                missed += 1;
                // Caught up by a wake of this thread's, for the next round.
                tw.wake();
            }
        }
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(missed, 0, "rounds whose last event no wake saw");
        assert_eq!(tw.state.load(Ordering::Relaxed), IDLE);
    }

    #[test]
    fn no_wake_is_lost_while_wakers_race_with_registrations() {
        // Two tasks' wakers registered in turn on one thread while another thread wakes: every
        // wake after a registration reaches a task (counted as at least one wake per round).
        let tw = Arc::new(Tw::new());
        let (a, wa) = counter();
        let (b, wb) = counter();
        let rounds = 20_000u64;
        let go = Arc::new(AtomicU64::new(0));
        let waker_thread = {
            let (tw, go) = (tw.clone(), go.clone());
            std::thread::spawn(move || {
                for r in 1..=rounds {
                    while go.load(Ordering::Acquire) < r {
                        std::hint::spin_loop();
                    }
                    tw.wake();
                }
            })
        };
        for r in 1..=rounds {
            let before = wakes(&a) + wakes(&b);
            // SAFETY: this thread is the only registrar.
            unsafe { tw.register(if r % 2 == 0 { &wa } else { &wb }) };
            go.store(r, Ordering::Release);
            // The wake of this round reaches one of the tasks (or the registration woke one).
            while wakes(&a) + wakes(&b) == before {
                std::hint::spin_loop();
            }
        }
        waker_thread.join().unwrap();
        assert!(wakes(&a) + wakes(&b) >= rounds);
    }
}
