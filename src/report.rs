//! The reporter thread (`loopwatch-report`): turns stall records into `tracing` events and
//! user callbacks, away from the watchdog, so a slow subscriber or callback can delay only
//! reports (the queue in front of it is bounded, and drops are counted), never detection.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::diagnose::Stack;
use crate::stall::{StackStatus, Stall, StallState};
use crate::watchdog::Shared;

/// A user callback, run for each stall report.
pub(crate) type Callback = Arc<dyn Fn(&Stall) + Send + Sync + 'static>;

/// What the watchdog sends: a stall record, and the stack's raw addresses (symbolized off the
/// watchdog, since symbolizing can take milliseconds); or a notice about a pool.
#[derive(Debug)]
// Stall reports are nearly all the traffic: boxing them would add an allocation to each.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Report {
    Stall {
        stall: Stall,
        raw_stack: Option<Arc<[usize]>>,
    },
    Notice(Notice),
}

/// Something wrong with a layer as a whole, not one poll.
#[derive(Debug, Clone)]
pub(crate) enum Notice {
    /// A blocking job waited for a thread of tokio's blocking pool: the pool is full.
    BlockingSaturated {
        /// Where the job was submitted.
        site: Arc<str>,
        waited: Duration,
        running: u64,
        queued: u64,
        max: u64,
        /// Jobs that waited like this since the last notice (notices are rate limited).
        since_last: u64,
    },
    /// A CPU pool is fed jobs too small to be worth a dispatch.
    #[cfg_attr(not(feature = "rayon"), allow(dead_code))]
    CpuTooFine {
        pool: Arc<str>,
        jobs: u64,
        fine: u64,
        mean: Duration,
    },
}

/// The longest a running report waits for its stack to be symbolized; past it the report goes
/// out without frames, and the stall is reported once more when they are ready.
const SYMBOLIZE_WAIT: Duration = Duration::from_millis(5);
/// The same for an ended report (less urgent: the stall is over).
const SYMBOLIZE_WAIT_ENDED: Duration = Duration::from_millis(250);

/// Symbolizes on a thread of its own (`loopwatch-symbols`), so the reporter never waits more
/// than [`SYMBOLIZE_WAIT`]: the first stacks of a process can take hundreds of milliseconds
/// (its debug info is parsed on first use).
/// Finished stacks by stall id, and the condition variable that says one has arrived.
type Done = Arc<(Mutex<HashMap<u64, Arc<Stack>>>, Condvar)>;

struct Symbolizer {
    jobs: SyncSender<(u64, Arc<[usize]>)>,
    done: Done,
    /// Jobs submitted and not finished: a report waits for its stack only when its job is the
    /// only one, so a backlog never makes every report wait.
    outstanding: Arc<AtomicUsize>,
}

impl Symbolizer {
    fn start() -> Option<Symbolizer> {
        let (jobs, rx) = sync_channel::<(u64, Arc<[usize]>)>(64);
        let done: Done = Arc::default();
        let out = done.clone();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let count = outstanding.clone();
        std::thread::Builder::new()
            .name("loopwatch-symbols".into())
            .spawn(move || {
                warm_up();
                while let Ok((id, raw)) = rx.recv() {
                    let stack = catch_unwind(|| symbolize(&raw)).unwrap_or_default();
                    let (map, cv) = &*out;
                    if let Ok(mut m) = map.lock() {
                        if m.len() >= 1024 {
                            m.clear(); // bounded: results nobody picked up
                        }
                        m.insert(id, Arc::new(stack));
                    }
                    count.fetch_sub(1, Ordering::AcqRel);
                    cv.notify_all();
                }
            })
            .ok()?;
        Some(Symbolizer {
            jobs,
            done,
            outstanding,
        })
    }

    fn submit(&self, id: u64, raw: Arc<[usize]>) -> bool {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let ok = self.jobs.try_send((id, raw)).is_ok();
        if !ok {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
        }
        ok
    }

    /// How long a report in `state` may wait for its stack now.
    fn patience(&self, state: StallState) -> Duration {
        match (self.outstanding.load(Ordering::Acquire) <= 1, state) {
            (false, _) => Duration::ZERO,
            (true, StallState::Ended) => SYMBOLIZE_WAIT_ENDED,
            (true, _) => SYMBOLIZE_WAIT,
        }
    }

    /// The stack of stall `id`, waiting at most `wait` for it.
    fn get(&self, id: u64, wait: Duration) -> Option<Arc<Stack>> {
        let (map, cv) = &*self.done;
        let deadline = Instant::now() + wait;
        let mut m = map.lock().ok()?;
        loop {
            if let Some(s) = m.get(&id) {
                return Some(s.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            m = cv.wait_timeout(m, left).ok()?.0;
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut m) = self.done.0.lock() {
            m.remove(&id);
        }
    }
}

/// The reporter's side of stacks: which stalls were submitted, and the running reports that
/// went out before their frames were ready.
struct Stacks {
    symbolizer: Option<Symbolizer>,
    submitted: HashSet<u64>,
    late: Vec<Stall>,
}

impl Stacks {
    fn attach(&mut self, stall: &mut Stall, raw: Option<&Arc<[usize]>>) {
        let Some(raw) = raw else { return };
        let Some(sym) = &self.symbolizer else {
            return;
        };
        if self.submitted.len() >= 1024 {
            self.submitted.clear(); // bounded: ids whose ended report was dropped
        }
        if self.submitted.insert(stall.id) && !sym.submit(stall.id, raw.clone()) {
            stall.stack_status = StackStatus::Failed;
            return;
        }
        match sym.get(stall.id, sym.patience(stall.state)) {
            Some(stack) => stall.stack = Some(stack),
            None => {
                stall.stack_status = StackStatus::Loading;
                if stall.state == StallState::Running && self.late.len() < 64 {
                    self.late.push(stall.clone());
                }
            }
        }
        if stall.state == StallState::Ended {
            self.submitted.remove(&stall.id);
            self.late.retain(|s| s.id != stall.id);
            sym.forget(stall.id);
        }
    }

    /// Running reports whose frames are now ready: they are reported once more, with them.
    fn ready_late(&mut self) -> Vec<Stall> {
        let Some(sym) = &self.symbolizer else {
            return Vec::new();
        };
        let mut ready = Vec::new();
        self.late.retain(|s| match sym.get(s.id, Duration::ZERO) {
            Some(stack) => {
                let mut s = s.clone();
                s.stack = Some(stack);
                s.stack_status = StackStatus::Captured;
                ready.push(s);
                false
            }
            None => true,
        });
        ready
    }
}

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
fn symbolize(raw: &[usize]) -> Stack {
    crate::diagnose::symbolize::symbolize(raw)
}

#[cfg(not(all(target_os = "linux", not(loopwatch_portable))))]
fn symbolize(_raw: &[usize]) -> Stack {
    Stack::default()
}

/// Set once the symbol tables are loaded.
static SYMBOLS_READY: AtomicBool = AtomicBool::new(false);

pub(crate) fn wait_for_symbols(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !SYMBOLS_READY.load(Ordering::Acquire) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

pub(crate) fn run(shared: Arc<Shared>, reports: Receiver<Report>, callbacks: Vec<Callback>) {
    crate::board::mark_own_thread();
    let mut stacks = Stacks {
        symbolizer: (shared.cfg.stacks && shared.cfg.diagnose)
            .then(Symbolizer::start)
            .flatten(),
        submitted: HashSet::new(),
        late: Vec::new(),
    };
    let deliver = |stall: &Stall, update: bool| {
        if catch_unwind(AssertUnwindSafe(|| emit(&shared, stall, update))).is_err() {
            shared.caught_panics.fetch_add(1, Ordering::Relaxed);
        }
        for cb in &callbacks {
            if catch_unwind(AssertUnwindSafe(|| cb(stall))).is_err() {
                shared.caught_panics.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    loop {
        match reports.recv_timeout(Duration::from_millis(250)) {
            Ok(Report::Notice(n)) => {
                if catch_unwind(AssertUnwindSafe(|| emit_notice(&shared, &n))).is_err() {
                    shared.caught_panics.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Report::Stall {
                mut stall,
                raw_stack,
            }) => {
                if catch_unwind(AssertUnwindSafe(|| {
                    stacks.attach(&mut stall, raw_stack.as_ref())
                }))
                .is_err()
                {
                    shared.caught_panics.fetch_add(1, Ordering::Relaxed);
                }
                deliver(&stall, false);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        for stall in stacks.ready_late() {
            deliver(&stall, true);
        }
    }
}

/// Emits the stall as a WARN event with target `loopwatch`, to the subscriber the layer was
/// added to (or, if it was never added to one, to this thread's default).
/// `update`: a running stall reported again because its stack frames are now ready.
fn emit(shared: &Shared, stall: &Stall, update: bool) {
    in_layer_dispatch(shared, || event(stall, update));
}

fn emit_notice(shared: &Shared, n: &Notice) {
    in_layer_dispatch(shared, || notice_event(n));
}

/// Runs `f` with the subscriber loopwatch's layer was added to as the default (or this
/// thread's default, if the layer was never added to one).
fn in_layer_dispatch(shared: &Shared, f: impl FnOnce()) {
    let dispatch = shared
        .layer
        .dispatch
        .lock()
        .ok()
        .and_then(|d| d.as_ref().and_then(|w| w.upgrade()));
    match dispatch {
        Some(d) => tracing::dispatcher::with_default(&d, f),
        None => f(),
    }
}

fn notice_event(n: &Notice) {
    match n {
        Notice::BlockingSaturated {
            site,
            waited,
            running,
            queued,
            max,
            since_last,
        } => tracing::warn!(
            target: "loopwatch",
            layer = "blocking",
            notice = "blocking_pool_saturated",
            job.site = site.as_ref(),
            waited_ms = waited.as_secs_f64() * 1e3,
            running,
            queued,
            max_blocking_threads = max,
            jobs_waited = since_last,
            hint = BLOCKING_HINT,
            "blocking pool saturated: a job from {site} waited {waited:.1?} for a thread \
             ({running} of {max} threads busy, {queued} jobs queued; {since_last} jobs waited \
             like this since the last notice); hint: {BLOCKING_HINT}"
        ),
        Notice::CpuTooFine {
            pool,
            jobs,
            fine,
            mean,
        } => tracing::warn!(
            target: "loopwatch",
            layer = "cpu",
            notice = "cpu_jobs_too_fine",
            pool = pool.as_ref(),
            jobs,
            too_fine = fine,
            mean_us = mean.as_secs_f64() * 1e6,
            hint = FINE_HINT,
            "cpu pool {pool} jobs too fine: {fine} of its last {jobs} jobs took under 50 µs \
             (mean {mean:.1?}); hint: {FINE_HINT}"
        ),
    }
}

const FINE_HINT: &str = "batch these: give each job at least 50-100 µs of work (par_chunks, \
     with_min_len, or a loop over several items per job); below that, dispatch costs more than \
     the parallelism gains";

const BLOCKING_HINT: &str = "the blocking pool is full: jobs that wait (sleep, poll, hold \
     locks) occupy its threads; make them async, raise max_blocking_threads, or give long jobs \
     a pool of their own";

fn event(s: &Stall, update: bool) {
    let started_unix = s
        .started_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let duration_ms = s.duration.as_secs_f64() * 1e3;
    let mut shares = String::new();
    for (i, c) in s.cause_shares.iter().enumerate() {
        let _ = write!(
            shares,
            "{}{}={:.2}",
            if i > 0 { "," } else { "" },
            c.cause,
            c.share
        );
    }
    let stack = s.stack.as_ref().map(|st| st.to_string());
    let mut victim_kinds = String::new();
    for (i, (k, n)) in s.victims.top_kinds.iter().enumerate() {
        let _ = write!(victim_kinds, "{}{k}={n}", if i > 0 { "," } else { "" });
    }
    let threshold_ms = s.threshold.as_secs_f64() * 1e3;
    let (state, msg) = match s.state {
        StallState::Running if update => ("running", "stall stack"),
        StallState::Running => ("running", "stall detected"),
        StallState::Ended => ("ended", "stall ended"),
    };
    tracing::warn!(
        target: "loopwatch",
        layer = s.layer.as_str(),
        stall.id = s.id,
        stall.state = state,
        task.name = s.task.name.as_deref(),
        task.id = s.task.id,
        task.site = s.task.site.as_deref(),
        task.span = s.task.span.as_deref(),
        worker.index = s.worker.index,
        worker.thread = s.worker.thread_name.as_deref(),
        worker.tid = s.worker.tid,
        started_at_unix = started_unix,
        duration_ms,
        threshold_ms,
        exact_end = s.exact_end,
        cause = %s.cause,
        cause.shares = shares.as_str(),
        hint = s.hint,
        stack.status = s.stack_status.as_str(),
        victims.count = s.victims.count,
        victims.total_ms = s.victims.total_wait.as_secs_f64() * 1e3,
        victims.worst_ms = s.victims.worst_wait.as_secs_f64() * 1e3,
        victims.kinds = victim_kinds.as_str(),
        stack = stack.as_deref(),
        "{msg}: {s}"
    );
}

/// Loads the symbol tables, once per process, at idle priority (Linux `SCHED_IDLE`: bulk work
/// nobody waits on never takes a core from the service); then this thread symbolizes stalls at
/// a lowered priority (nice 10).
fn warm_up() {
    crate::board::mark_own_thread();
    static ONCE: std::sync::Once = std::sync::Once::new();
    if !ONCE.is_completed() {
        #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
        // SAFETY: sched_setscheduler on the calling thread (0) with a valid, zeroed param.
        unsafe {
            let param: libc::sched_param = std::mem::zeroed();
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
        }
        ONCE.call_once(|| {
            #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
            let _ = catch_unwind(|| symbolize(&[warm_up as *const () as usize]));
            SYMBOLS_READY.store(true, Ordering::Release);
        });
    }
    #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
    // SAFETY: sched_setscheduler and setpriority on the calling thread (0), valid arguments.
    unsafe {
        let param: libc::sched_param = std::mem::zeroed();
        libc::sched_setscheduler(0, libc::SCHED_OTHER, &param);
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}
