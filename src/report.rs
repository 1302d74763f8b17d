//! The reporter thread (`loopwatch-report`): turns stall records into `tracing` events and
//! user callbacks, away from the watchdog, so a slow subscriber or callback can delay only
//! reports (the queue in front of it is bounded, and drops are counted), never detection.

use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::diagnose::symbols::Stacks;
use crate::hints::{BLOCKING_POOL_FULL, CPU_JOBS_TOO_FINE, SPAN_GUARD_ACROSS_AWAIT};
use crate::shared::Shared;
use crate::stall::{Notice, Report, Stall, StallState};

/// A user callback, run for each stall report.
pub(crate) type Callback = Arc<dyn Fn(&Stall) + Send + Sync + 'static>;

pub(crate) fn run(shared: Arc<Shared>, reports: Receiver<Report>, callbacks: Vec<Callback>) {
    crate::board::mark_own_thread();
    let mut stacks = Stacks::new(
        shared.cfg.stacks && shared.cfg.diagnose,
        shared.cfg.stack_locations,
    );
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
    let say = |n: &Notice| {
        if catch_unwind(AssertUnwindSafe(|| emit_notice(&shared, n))).is_err() {
            shared.caught_panics.fetch_add(1, Ordering::Relaxed);
        }
    };
    let started = Instant::now();
    let mut startup_pending = true;
    // Stalls reported running so far: a later running report of one is an update (its stack
    // came in). Bounded: ids whose ended report was dropped.
    let mut running: std::collections::HashSet<u64> = std::collections::HashSet::new();
    loop {
        // Start-up notices (a listener that could not bind) wait for the layer to be added to
        // the application's subscriber, so they reach it, for at most a second.
        if startup_pending && (layer_registered(&shared) || started.elapsed() >= STARTUP_WAIT) {
            startup_pending = false;
            let notices = shared
                .startup_notices
                .lock()
                .map(|mut n| std::mem::take(&mut *n))
                .unwrap_or_default();
            for n in &notices {
                if catch_unwind(AssertUnwindSafe(|| emit_notice(&shared, n))).is_err() {
                    shared.caught_panics.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // While an ended report waits for its frames, look for them often.
        let wait = if stacks.holding() || startup_pending {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(250)
        };
        match reports.recv_timeout(wait) {
            Ok(Report::Notice(n)) => {
                // A sampled stack names the code by its top frame: held for its frames.
                let now = catch_unwind(AssertUnwindSafe(|| stacks.hold_notice(n.clone())))
                    .unwrap_or_else(|_| {
                        shared.caught_panics.fetch_add(1, Ordering::Relaxed);
                        Some(n)
                    });
                if let Some(n) = now {
                    say(&n);
                }
            }
            Ok(Report::Stall { stall, raw_stack }) => {
                // Kept to deliver as it is if attaching its frames panics.
                let plain = stall.clone();
                let now = catch_unwind(AssertUnwindSafe(|| {
                    stacks.attach(stall, raw_stack.as_ref())
                }))
                .unwrap_or_else(|_| {
                    shared.caught_panics.fetch_add(1, Ordering::Relaxed);
                    Some(plain)
                });
                if let Some(stall) = now {
                    let update = match stall.state {
                        StallState::Running => {
                            if running.len() >= 4096 {
                                running.clear();
                            }
                            !running.insert(stall.id)
                        }
                        _ => {
                            running.remove(&stall.id);
                            false
                        }
                    };
                    deliver(&stall, update);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        for (stall, update) in stacks.ready_late() {
            deliver(&stall, update);
        }
        for n in stacks.ready_notices(false) {
            say(&n);
        }
    }
    for stall in stacks.release_held() {
        deliver(&stall, false);
    }
    for n in stacks.ready_notices(true) {
        say(&n);
    }
}

/// How long start-up notices wait for the layer to be added to a subscriber.
const STARTUP_WAIT: Duration = Duration::from_secs(1);

/// Has loopwatch's layer been added to a subscriber yet?
fn layer_registered(shared: &Shared) -> bool {
    shared
        .layer
        .dispatch
        .lock()
        .map(|d| d.is_some())
        .unwrap_or(true)
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
            hint = BLOCKING_POOL_FULL,
            "blocking pool saturated: a job from {site} waited {waited:.1?} for a thread \
             ({running} of {max} threads busy, {queued} jobs queued; {since_last} jobs waited \
             like this since the last notice); hint: {BLOCKING_POOL_FULL}"
        ),
        Notice::Phantom {
            kind,
            stall,
            since_last,
        } => match stall {
            Some(id) => tracing::warn!(
                target: "loopwatch",
                notice = "phantom_stall",
                task.kind = kind.as_ref(),
                stall.id = id,
                phantoms = since_last,
                hint = SPAN_GUARD_ACROSS_AWAIT,
                "stall #{id} ({kind}) was not a stall: its worker was parked or running another \
                 task, and the poll only looked open; it is dropped ({since_last} such polls \
                 since the last notice); hint: {SPAN_GUARD_ACROSS_AWAIT}"
            ),
            None => tracing::info!(
                target: "loopwatch",
                notice = "phantom_poll",
                task.kind = kind.as_ref(),
                phantoms = since_last,
                hint = SPAN_GUARD_ACROSS_AWAIT,
                "a poll of {kind} looked open while its worker was parked: not a stall, ignored \
                 ({since_last} such polls since the last notice); hint: {SPAN_GUARD_ACROSS_AWAIT}"
            ),
        },
        Notice::ThousandCuts {
            kind,
            layer,
            syscall,
            asleep,
            window,
            hint,
            top_frame,
            ..
        } => {
            let share = asleep.as_secs_f64() / window.as_secs_f64().max(1e-9) * 100.0;
            let frame = top_frame.as_deref().unwrap_or("");
            let in_frame = match top_frame {
                Some(f) => format!(" (in {f})"),
                None => String::new(),
            };
            tracing::warn!(
                target: "loopwatch",
                notice = "thousand_cuts",
                layer = layer.as_str(),
                task.kind = kind.as_ref(),
                syscall = syscall.as_ref(),
                asleep_ms = asleep.as_secs_f64() * 1e3,
                window_ms = window.as_secs_f64() * 1e3,
                share_of_one_worker = share / 100.0,
                stack.top_frame = frame,
                hint,
                "{} workers spent {share:.0} % of one worker's time over the last {window:.0?} \
                 asleep in {syscall} inside polls of {kind}{in_frame}, none of them a stall; \
                 hint: {hint}",
                layer.as_str()
            )
        }
        Notice::EnvIgnored { reason } => tracing::warn!(
            target: "loopwatch",
            notice = "env_ignored",
            reason = reason.as_str(),
            "loopwatch ignored an environment value: {reason}"
        ),
        Notice::ListenerOff { reason } => tracing::warn!(
            target: "loopwatch",
            notice = "prometheus_off",
            reason = reason.as_str(),
            "loopwatch's Prometheus listener is off: {reason}"
        ),
        Notice::StacksOff { reason } => tracing::warn!(
            target: "loopwatch",
            notice = "stacks_off",
            reason = reason.as_str(),
            "loopwatch stopped capturing stacks: {reason}"
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
            hint = CPU_JOBS_TOO_FINE,
            "cpu pool {pool} jobs too fine: {fine} of its last {jobs} jobs took under 50 µs \
             (mean {mean:.1?}); hint: {CPU_JOBS_TOO_FINE}"
        ),
    }
}

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
        task.named_by_stack = s.task.named_by_stack,
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
        uncertainty_ms = s.uncertainty.as_secs_f64() * 1e3,
        caught_at_end = s.caught_at_end,
        cause = %s.cause,
        cause.shares = shares.as_str(),
        cpu_ms = s.cpu.map(|c| c.cpu.as_secs_f64() * 1e3),
        cpu_sampled_ms = s.cpu.map(|c| c.sampled.as_secs_f64() * 1e3),
        hint = s.hint,
        stack.status = s.stack_status.as_str(),
        victims.count = s.victims.count,
        victims.unmeasured = s.victims.unmeasured,
        victims.total_ms = s.victims.total_wait.as_secs_f64() * 1e3,
        victims.worst_ms = s.victims.worst_wait.as_secs_f64() * 1e3,
        victims.kinds = victim_kinds.as_str(),
        stack = stack.as_deref(),
        "{msg}: {}",
        s.summary()
    );
}
