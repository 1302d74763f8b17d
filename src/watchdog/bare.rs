//! The probe-free path: async workers blocked in a system call, seen with no probe at all
//! (stable tokio, `#[tokio::main]`, handlers with no span, tasks spawned by a server).
//!
//! Which threads are workers is learnt (`crate::workers`): a learner task loopwatch spawns on
//! a runtime given to `Guard::monitor_runtime` (one per worker, every second) notes the OS
//! thread that polls it, and only a runtime's workers poll its tasks; threads named like a
//! learnt worker are followed too. Every other tick the watchdog reads each followed thread's
//! kernel state (its kept-open `syscall` file, one `pread`), unless tokio's own counters say
//! every worker of every such runtime is parked. A worker asleep in one system call, its CPU clock still, for a threshold, in a call
//! a tokio worker never parks in (not `epoll_wait`, not `futex`), is a candidate; its stack is
//! then read without a signal, and it is a stall only if that stack is inside a task's poll on
//! the worker and not in `block_in_place` or a blocking-pool job (see `diagnose/roles.rs`): a
//! thread that moved from the workers to the blocking pool is never taken for a worker.
//!
//! What it cannot see: a poll that computes (no system call: the poll hooks or a probe see
//! it), one waiting on a lock (`futex` is also where an idle worker parks), and workers of a
//! runtime no one gave to `monitor_runtime`.

use std::sync::Arc;

use crate::diagnose::roles::{Role, Roles};
use crate::diagnose::syscalls;
use crate::diagnose::verdict::{Activity, Reading};

/// Candidates turned down before a thread only named like a worker is left alone.
pub(crate) const MAX_TURNED_DOWN: u32 = 3;

/// One learnt worker followed by the watchdog.
#[derive(Debug)]
pub(crate) struct BareThread<T> {
    pub(crate) tid: u64,
    /// A learner ran on it (else it is only named like a learnt worker).
    pub(crate) learnt: bool,
    /// Its park state, where the runtime runs loopwatch's park hooks: then `futex` counts
    /// while it is not parked.
    pub(crate) park: Option<crate::workers::ParkState>,
    /// Some thread of the process runs loopwatch's park hooks (set each tick).
    pub(crate) hooks: bool,
    /// The thousand-cuts sampling's last stack read: where it slept (call, stack pointer,
    /// program counter), what the stack said, and the stack. A sample asleep at the same
    /// place (the same code at the same depth: a handler's every request) reuses it.
    pub(crate) cut_place: Option<CutPlace>,
    /// Candidates of its that the stack check turned down: a thread only named like a worker
    /// is no longer read after [`MAX_TURNED_DOWN`] (a helper thread the application spawned
    /// from a worker, which inherits its name), until a learner reaches it.
    pub(crate) turned_down: u32,
    pub(crate) thread: T,
    pub(crate) name: Option<Arc<str>>,
    /// The last reading, and the call it is asleep in since when.
    pub(crate) last: Option<Reading>,
    pub(crate) asleep: Option<Asleep>,
}

/// Where a followed thread slept at a thousand-cuts sample, and what its stack said.
#[derive(Debug, Clone)]
pub(crate) struct CutPlace {
    pub(crate) at: (i64, u64, u64),
    pub(crate) role: crate::diagnose::roles::Role,
    pub(crate) ips: Option<Arc<[usize]>>,
}

/// A worker asleep in one call.
#[derive(Debug, Clone)]
pub(crate) struct Asleep {
    pub(crate) nr: i64,
    /// The reading before the first one that saw it asleep in the call (it began after it).
    pub(crate) before_ns: u64,
    /// The first reading that saw it asleep in the call, and its CPU time then.
    pub(crate) first_ns: u64,
    pub(crate) cpu_ns: Option<u64>,
    /// The latest reading that saw it still there.
    pub(crate) last_ns: u64,
    /// What was decided: not yet, a stall (its id and record), or not a worker's poll.
    pub(crate) verdict: Verdict,
}

#[derive(Debug, Clone)]
pub(crate) enum Verdict {
    Undecided,
    /// Found a stall: its running record, and its stack (for the ended report's frames).
    Stall(Box<crate::stall::Stall>, Option<Arc<[usize]>>),
    NotAStall,
}

/// What one reading of a learnt worker says.
#[derive(Debug)]
pub(crate) enum Step {
    /// Nothing to do.
    Nothing,
    /// It has been asleep in the call for `threshold`: read its stack and decide.
    Decide,
    /// It left the call (or ran) after it was found a stall: that stall ended (after the
    /// candidate's `last_ns`, by this reading).
    Left(Asleep),
}

/// Is `activity` a call an idle tokio worker never sleeps in? `futex` is where a worker parks
/// on its condition variable, and also every lock: it counts only when the worker's hooks say
/// it is not parked (`unparked`).
pub(crate) fn counts(activity: Activity, unparked: bool) -> Option<i64> {
    match activity {
        Activity::Syscall(nr) if syscalls::is_runtime_park(nr) => None,
        Activity::Syscall(nr) if syscalls::name(nr) == Some("futex") => unparked.then_some(nr),
        Activity::Syscall(nr) => Some(nr),
        _ => None,
    }
}

impl<T> BareThread<T> {
    /// Do its hooks say it is at work (not parked)? A learnt worker whose hooks have not run
    /// yet, where the hooks run, has not parked since it started: at work since a learner ran
    /// on it. (Once missed: a worker kept busy from its start never registered, so `futex`
    /// never counted on it.)
    pub(crate) fn unparked(&self) -> bool {
        match &self.park {
            Some(p) => !p.parked(),
            None => self.hooks && self.learnt,
        }
    }

    /// Folds reading `r` in; `threshold` is the async layer's.
    pub(crate) fn step(&mut self, r: Reading, threshold: u64) -> Step {
        let prev = self.last.replace(r);
        let unparked = self.unparked();
        let nr = counts(r.activity, unparked);
        if let (Some(a), Some(nr)) = (self.asleep.as_mut(), nr) {
            // The same call, and no CPU time since it was first seen there: the same sleep.
            if nr == a.nr && (a.cpu_ns.is_none() || r.cpu_ns == a.cpu_ns) {
                a.last_ns = r.at_ns;
                let due = r.at_ns.saturating_sub(a.first_ns) >= threshold;
                return if due && matches!(a.verdict, Verdict::Undecided) {
                    Step::Decide
                } else {
                    Step::Nothing
                };
            }
        }
        let old = self.asleep.take();
        // A call is followed from a reading that saw the thread elsewhere: one already asleep
        // when first read began at an unknown time, and is left until it is seen out of it.
        let elsewhere = |p: &Reading| {
            counts(p.activity, unparked) != nr || p.cpu_ns.is_none() || p.cpu_ns != r.cpu_ns
        };
        let prev = prev.filter(elsewhere);
        self.asleep = nr.zip(prev).map(|(nr, prev)| Asleep {
            nr,
            before_ns: prev.at_ns,
            first_ns: r.at_ns,
            cpu_ns: r.cpu_ns,
            last_ns: r.at_ns,
            verdict: Verdict::Undecided,
        });
        match old {
            Some(a) if matches!(a.verdict, Verdict::Stall(..)) => Step::Left(a),
            _ => Step::Nothing,
        }
    }
}

/// Sends `n` learner tasks to runtime `name`'s `handle`: each notes the worker that polls it
/// (spawned from outside the runtime, they go to its shared queue, and parked workers are woken
/// for them, so they spread). loopwatch's own tasks: never counted as the application's.
#[track_caller]
pub(crate) fn send_learners(
    shared: &Arc<crate::shared::Shared>,
    name: &Arc<str>,
    handle: &tokio::runtime::Handle,
    n: usize,
) {
    crate::board::set_own_site(std::panic::Location::caller());
    for _ in 0..n {
        let shared = Arc::downgrade(shared);
        let name = name.clone();
        drop(handle.spawn(async move {
            if let (Some(s), Some(tid)) = (shared.upgrade(), crate::board::os_thread_id()) {
                s.bare.learnt(&name, tid, s.board.now_ns());
            }
        }));
    }
}

/// What the stack of a candidate says: a stall only inside a task's poll on the worker.
pub(crate) fn decide(roles: &Roles, ips: Option<&[usize]>) -> Role {
    match ips {
        Some(ips) => roles.classify(ips),
        None => Role::Unknown,
    }
}
