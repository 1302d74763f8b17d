//! The reporter thread (`loopwatch-report`): turns stall records into `tracing` events and
//! user callbacks, away from the watchdog, so a slow subscriber or callback can delay only
//! reports (the queue in front of it is bounded, and drops are counted), never detection.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::stall::{Stall, StallState};
use crate::watchdog::Shared;

/// A user callback, run for each stall report.
pub(crate) type Callback = Arc<dyn Fn(&Stall) + Send + Sync + 'static>;

pub(crate) fn run(shared: Arc<Shared>, reports: Receiver<Stall>, callbacks: Vec<Callback>) {
    crate::board::mark_own_thread();
    while let Ok(stall) = reports.recv() {
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
        "{msg}: {s}"
    );
}
