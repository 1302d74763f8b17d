//! The monitored runtimes' async workers, as the probe-free path learns them (see
//! `watchdog/bare.rs`): each runtime given to `Guard::monitor_runtime`, the OS threads that
//! polled one of loopwatch's learner tasks on it, the threads named like them, and the
//! executable's role ranges (`diagnose/roles.rs`), loaded once on a thread of their own.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::diagnose::roles::Roles;

/// The runtimes whose workers the probe-free path follows, and the threads learnt to be theirs.
#[derive(Debug, Default)]
pub(crate) struct BareRegistry {
    runtimes: Mutex<Vec<BareRuntime>>,
    /// Moves on at every change, so the watchdog copies the lists only then.
    generation: AtomicU64,
    /// The current learner round.
    round: AtomicU64,
    /// Threads named like a learnt worker, found at the last round (workers no learner reached
    /// yet, and blocking-pool threads: the stack check tells them apart).
    named: Mutex<Vec<u64>>,
    /// The executable's role ranges, loaded once on a thread of their own (see
    /// [`BareRegistry::roles`]).
    roles: Arc<OnceLock<Result<Roles, String>>>,
    loading: std::sync::atomic::AtomicBool,
    /// Workers' park state, where the runtime's `on_thread_park` / `on_thread_unpark` run
    /// loopwatch's hooks (`Guard::count_threads`): by thread, parked or not.
    park_states: Mutex<Vec<(u64, Arc<AtomicBool>)>>,
    /// Some thread ran the park hooks.
    hooks: AtomicBool,
}

/// A worker's park state as its hooks said last.
#[derive(Debug)]
pub(crate) struct ParkState(Arc<AtomicBool>);

impl ParkState {
    /// Is the worker parked (between its `on_thread_park` and `on_thread_unpark`)?
    pub(crate) fn parked(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
struct BareRuntime {
    name: Arc<str>,
    handle: Option<tokio::runtime::Handle>,
    /// Its learnt threads, each with the learner round that last saw it, and when a learner
    /// last ran on it (board time: it was running a task then, not asleep in a call).
    tids: Vec<(u64, u64, u64)>,
}

/// Learner rounds (one a second) a thread stays learnt without polling a learner: a worker
/// that gave its core up (`block_in_place`) joins the blocking pool, and another thread takes
/// the core; it is then learnt in turn, and the old one forgotten.
const FORGET_AFTER_ROUNDS: u64 = 10;

/// The most threads learnt per runtime (a runtime's workers; more means some left).
const MAX_LEARNT: usize = 256;
/// The most threads followed for their name only. Each followed thread keeps one file open
/// (its `syscall` file): a blocking pool of hundreds of threads named like the workers must
/// not take that many descriptors from the service.
const MAX_NAMED: usize = 32;

impl BareRegistry {
    /// Follows the workers of `handle` under `name` (a second call with the same name replaces
    /// the first), and starts loading the role ranges.
    pub(crate) fn add_runtime(&self, name: &str, handle: tokio::runtime::Handle) {
        if let Ok(mut rts) = self.runtimes.lock() {
            rts.retain(|r| &*r.name != name);
            rts.push(BareRuntime {
                name: name.into(),
                handle: Some(handle),
                tids: Vec::new(),
            });
        }
        self.generation.fetch_add(1, Ordering::Release);
        self.load_roles();
    }

    /// Follows no runtime (a poisoned list counts as one followed).
    pub(crate) fn follows_none(&self) -> bool {
        self.runtimes.lock().is_ok_and(|rts| rts.is_empty())
    }

    /// Thread `tid` polled a task of runtime `name` at board time `at_ns`: it is one of its
    /// workers.
    pub(crate) fn learnt(&self, name: &str, tid: u64, at_ns: u64) {
        let Ok(mut rts) = self.runtimes.lock() else {
            return;
        };
        let rt = match rts.iter_mut().position(|r| &*r.name == name) {
            Some(i) => &mut rts[i],
            None => {
                rts.push(BareRuntime {
                    name: name.into(),
                    handle: None,
                    tids: Vec::new(),
                });
                rts.last_mut().expect("just pushed")
            }
        };
        let round = self.round.load(Ordering::Relaxed);
        let full = rt.tids.len() >= MAX_LEARNT;
        match rt.tids.iter_mut().find(|(t, _, _)| *t == tid) {
            Some(seen) => {
                seen.1 = round;
                seen.2 = at_ns;
            }
            None if !full => {
                rt.tids.push((tid, round, at_ns));
                self.generation.fetch_add(1, Ordering::Release);
            }
            None => {}
        }
    }

    /// Thread `tid` is gone (its kernel state can no longer be read).
    pub(crate) fn forget(&self, tid: u64) {
        if let Ok(mut rts) = self.runtimes.lock() {
            for r in rts.iter_mut() {
                r.tids.retain(|&(t, _, _)| t != tid);
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The calling thread (a worker, from its park or unpark hook) parks (`true`) or unparks.
    /// The first call from a thread registers it; later ones are one store.
    pub(crate) fn set_parked(&self, parked: bool) {
        thread_local! {
            static STATE: std::cell::RefCell<Option<(usize, Arc<AtomicBool>)>> =
                const { std::cell::RefCell::new(None) };
        }
        let me = self as *const BareRegistry as usize;
        let _ = STATE.try_with(|st| {
            let mut st = st.borrow_mut();
            if let Some((reg, flag)) = st.as_ref() {
                if *reg == me {
                    flag.store(parked, Ordering::Release);
                    return;
                }
            }
            let Some(tid) = crate::board::os_thread_id() else {
                return;
            };
            let flag = Arc::new(AtomicBool::new(parked));
            self.hooks.store(true, Ordering::Release);
            if let Ok(mut states) = self.park_states.lock() {
                states.retain(|(t, _)| *t != tid);
                if states.len() < 4 * MAX_LEARNT {
                    states.push((tid, flag.clone()));
                }
            }
            // The watchdog picks it up at its next look at the lists.
            self.generation.fetch_add(1, Ordering::Release);
            *st = Some((me, flag));
        });
    }

    /// Whether any thread has run loopwatch's park hooks.
    pub(crate) fn hooks_seen(&self) -> bool {
        self.hooks.load(Ordering::Acquire)
    }

    /// Thread `tid`'s park state, if its hooks have run.
    pub(crate) fn park_state(&self, tid: u64) -> Option<ParkState> {
        let states = self.park_states.lock().ok()?;
        states
            .iter()
            .find(|(t, _)| *t == tid)
            .map(|(_, f)| ParkState(f.clone()))
    }

    /// How many threads are learnt, over every runtime.
    pub(crate) fn learnt_count(&self) -> usize {
        self.runtimes
            .lock()
            .map_or(0, |rts| rts.iter().map(|r| r.tids.len()).sum())
    }

    /// How many threads are followed: the learnt ones and those named like them.
    pub(crate) fn followed_count(&self) -> usize {
        let mut all = Vec::new();
        self.threads(&mut all);
        all.len()
    }

    /// Are the role ranges loaded, and a worker learnt?
    pub(crate) fn ready(&self) -> bool {
        matches!(self.roles.get(), Some(Ok(_))) && self.learnt_count() > 0
    }

    /// Why there are no role ranges, once that is known.
    pub(crate) fn error(&self) -> Option<String> {
        match self.roles.get() {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every thread to follow: the learnt ones with when a learner last ran on them, then
    /// those only named like them.
    pub(crate) fn threads(&self, out: &mut Vec<(u64, Option<u64>)>) {
        out.clear();
        if let Ok(rts) = self.runtimes.lock() {
            for r in rts.iter() {
                out.extend(r.tids.iter().map(|&(t, _, at)| (t, Some(at))));
            }
        }
        if let Ok(named) = self.named.lock() {
            for &t in named.iter() {
                if !out.iter().any(|&(o, _)| o == t) {
                    out.push((t, None));
                }
            }
        }
    }

    /// The threads found named like a learnt worker this round (at most [`MAX_NAMED`]).
    pub(crate) fn set_named(&self, mut tids: Vec<u64>) {
        tids.sort_unstable();
        tids.truncate(MAX_NAMED);
        if let Ok(mut named) = self.named.lock() {
            if *named != tids {
                *named = tids;
                self.generation.fetch_add(1, Ordering::Release);
            }
        }
    }

    /// Does every followed runtime say all its workers are parked (so none is in a poll)?
    /// `false` when one has no handle to ask (threads learnt by hand, in tests).
    pub(crate) fn all_parked(&self) -> bool {
        let Ok(rts) = self.runtimes.lock() else {
            return false;
        };
        rts.iter().all(|r| match &r.handle {
            Some(h) => {
                let m = h.metrics();
                // An odd park/unpark count: parked (tokio publishes it as the worker parks
                // and right after it unparks).
                (0..m.num_workers()).all(|w| m.worker_park_unpark_count(w) % 2 == 1)
            }
            None => false,
        })
    }

    /// Starts a learner round: forgets the threads no learner saw for
    /// [`FORGET_AFTER_ROUNDS`], and gives every runtime's name and handle, to send learners to.
    pub(crate) fn new_round(&self, out: &mut Vec<(Arc<str>, tokio::runtime::Handle)>) {
        out.clear();
        let round = self.round.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut rts) = self.runtimes.lock() {
            for r in rts.iter_mut() {
                let before = r.tids.len();
                r.tids
                    .retain(|&(_, seen, _)| round.saturating_sub(seen) <= FORGET_AFTER_ROUNDS);
                if r.tids.len() != before {
                    self.generation.fetch_add(1, Ordering::Release);
                }
                if let Some(h) = &r.handle {
                    out.push((r.name.clone(), h.clone()));
                }
            }
        }
    }

    /// The role ranges, once loaded: `None` while loading, `Some(Err)` when there are none.
    pub(crate) fn roles(&self) -> Option<&Result<Roles, String>> {
        self.roles.get()
    }

    /// Sets the role ranges (tests script them; the real ones come from [`load_roles`]).
    #[cfg(test)]
    pub(crate) fn set_roles(&self, roles: Roles) {
        let _ = self.roles.set(Ok(roles));
    }

    /// Loads the role ranges on a thread of its own, once (reading the executable's symbol
    /// table takes tens of milliseconds, which a tick must not).
    fn load_roles(&self) {
        if self.loading.swap(true, Ordering::AcqRel) {
            return;
        }
        let roles = self.roles.clone();
        let spawned = std::thread::Builder::new()
            .name("loopwatch-roles".into())
            .spawn(move || {
                crate::board::mark_own_thread();
                let loaded = std::panic::catch_unwind(crate::diagnose::roles::load)
                    .unwrap_or_else(|_| Err("reading the symbol table panicked".into()));
                let _ = roles.set(loaded);
            });
        if spawned.is_err() {
            let _ = self
                .roles
                .set(Err("no thread to read the symbol table".into()));
        }
    }
}
