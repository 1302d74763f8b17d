//! The reporter thread (`loopwatch-report`): turns stall records into `tracing` events and
//! user callbacks, away from the watchdog, so a slow subscriber or callback can delay only
//! reports (the queue in front of it is bounded, and drops are counted), never detection.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::diagnose::Stack;
use crate::stall::{StackStatus, Stall, StallState};
use crate::watchdog::Shared;

/// A user callback, run for each stall report.
pub(crate) type Callback = Arc<dyn Fn(&Stall) + Send + Sync + 'static>;

/// What the watchdog sends: the record, and the stack's raw addresses (symbolized here, off
/// the watchdog, since symbolizing can take milliseconds).
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) stall: Stall,
    pub(crate) raw_stack: Option<Arc<[usize]>>,
}

/// Symbolized stacks of the stalls still running (a stall's two reports share one).
#[derive(Default)]
struct Stacks(HashMap<u64, Arc<Stack>>);

impl Stacks {
    fn attach(&mut self, stall: &mut Stall, raw: Option<&Arc<[usize]>>) {
        let Some(raw) = raw else { return };
        if !SYMBOLS_READY.load(Ordering::Acquire) && !self.0.contains_key(&stall.id) {
            // The symbol tables are still loading: report now, without the frames.
            stall.stack_status = StackStatus::Loading;
            return;
        }
        let stack = match self.0.get(&stall.id) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(symbolize(raw));
                if self.0.len() >= 1024 {
                    self.0.clear(); // bounded: ids whose ended report was dropped
                }
                self.0.insert(stall.id, s.clone());
                s
            }
        };
        if stall.state == StallState::Ended {
            self.0.remove(&stall.id);
        }
        stall.stack = Some(stack);
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

pub(crate) fn wait_for_symbols(timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while !SYMBOLS_READY.load(Ordering::Acquire) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}

fn warm_up() {
    crate::board::mark_own_thread();
    // Loading symbol tables is bulk work nobody waits on: let it have only idle CPU, so it
    // never takes a core from the service (Linux SCHED_IDLE, for this thread only).
    #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
    // SAFETY: sched_setscheduler on the calling thread (0) with a valid, zeroed param.
    unsafe {
        let param: libc::sched_param = std::mem::zeroed();
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
    #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
    let _ = catch_unwind(|| symbolize(&[warm_up as *const () as usize]));
    SYMBOLS_READY.store(true, Ordering::Release);
}

pub(crate) fn run(shared: Arc<Shared>, reports: Receiver<Report>, callbacks: Vec<Callback>) {
    crate::board::mark_own_thread();
    if shared.cfg.stacks && shared.cfg.diagnose {
        // Load the symbol tables on a thread of their own (hundreds of milliseconds for a
        // binary with debug info), once per process, so no report waits for them.
        static STARTED: std::sync::Once = std::sync::Once::new();
        STARTED.call_once(|| {
            let _ = std::thread::Builder::new()
                .name("loopwatch-symbols".into())
                .spawn(warm_up);
        });
    }
    let mut stacks = Stacks::default();
    while let Ok(Report {
        mut stall,
        raw_stack,
    }) = reports.recv()
    {
        if catch_unwind(AssertUnwindSafe(|| {
            stacks.attach(&mut stall, raw_stack.as_ref())
        }))
        .is_err()
        {
            shared.caught_panics.fetch_add(1, Ordering::Relaxed);
        }
        if catch_unwind(AssertUnwindSafe(|| emit(&shared, &stall))).is_err() {
            shared.caught_panics.fetch_add(1, Ordering::Relaxed);
        }
        for cb in &callbacks {
            if catch_unwind(AssertUnwindSafe(|| cb(&stall))).is_err() {
                shared.caught_panics.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Emits the stall as a WARN event with target `loopwatch`, to the subscriber the layer was
/// added to (or, if it was never added to one, to this thread's default).
fn emit(shared: &Shared, stall: &Stall) {
    let dispatch = shared
        .layer
        .dispatch
        .lock()
        .ok()
        .and_then(|d| d.as_ref().and_then(|w| w.upgrade()));
    match dispatch {
        Some(d) => tracing::dispatcher::with_default(&d, || event(stall)),
        None => event(stall),
    }
}

fn event(s: &Stall) {
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
    let threshold_ms = s.threshold.as_secs_f64() * 1e3;
    let (state, msg) = match s.state {
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
        stack = stack.as_deref(),
        "{msg}: {s}"
    );
}
