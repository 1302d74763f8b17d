//! The poll-hook probe (`--cfg tokio_unstable`): tokio calls loopwatch before and after every
//! task poll on the runtime it was installed on, with the task's id and spawn location.
//!
//! This is the cheapest probe: no span, no table look-up; the slot gets a pointer to the
//! task's `&'static Location` and its id, and the watchdog turns the location into a task kind.

use std::sync::Arc;

use tokio::runtime::{Builder, TaskMeta};

use crate::board::{Board, PROBE};
use crate::probe::layer::task_id_u64;
use crate::words::{CulpritWord, Wait};

/// Installs the poll hooks of `board` on a runtime builder. With `schedule_delay`, each stall
/// learns its victims: by default from the worker's queue at the stall's end (see
/// [`queued_here`]); with `tokio_latency` (and the `schedule-delay` feature; 64-bit targets)
/// tokio's schedule-latency tracking is turned on instead, so each poll says how long its task
/// waited from its wake: exact victims' waits, and the schedule-delay histogram.
pub(crate) fn install<'a>(
    board: &Arc<Board>,
    builder: &'a mut Builder,
    schedule_delay: bool,
    tokio_latency: bool,
) -> &'a mut Builder {
    let before = board.clone();
    let after = board.clone();
    builder.on_after_task_poll(move |_meta: &TaskMeta<'_>| after.exit(PROBE));
    #[cfg(all(feature = "schedule-delay", target_has_atomic = "64"))]
    if schedule_delay && tokio_latency {
        builder.track_task_schedule_latency();
        board.set_waits_known();
        return builder.on_before_task_poll(move |meta: &TaskMeta<'_>| {
            before.enter_task(
                PROBE,
                CulpritWord::location(meta.spawned_at()),
                task_id_u64(meta.id()),
                waited(meta),
            );
        });
    }
    let _ = tokio_latency;
    if schedule_delay {
        board.set_queue_reader(queued_here);
    }
    // The hook never asks tokio for a schedule delay: its common path is a few stores to this
    // thread's slot.
    builder.on_before_task_poll(move |meta: &TaskMeta<'_>| {
        before.enter_task(
            PROBE,
            CulpritWord::location(meta.spawned_at()),
            task_id_u64(meta.id()),
            Wait::UNKNOWN,
        );
    })
}

/// How many tasks are queued on the calling worker thread, from its runtime's metrics: its
/// local run queue, and on a runtime with one worker (a `current_thread` runtime) the global
/// queue too, which no other worker takes from. Read at the end of a stall, on its worker, so
/// these tasks waited behind it (for how long is not known). Tasks in the worker's LIFO slot
/// are not counted, and tasks queued on a multi-thread runtime's global queue are not either
/// (any free worker takes them). 0 off a runtime's worker. Finding the worker takes one of
/// tokio's locks per worker: off the common path (once per stall).
fn queued_here() -> usize {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return 0;
    };
    let m = handle.metrics();
    let me = std::thread::current().id();
    let workers = m.num_workers();
    let Some(w) = (0..workers).find(|&i| m.worker_thread_id(i) == Some(me)) else {
        return 0;
    };
    let mut queued = m.worker_local_queue_depth(w);
    if workers == 1 {
        queued += m.global_queue_depth();
    }
    queued
}

/// How long the task waited from its wake to this poll, if tokio tracks it.
#[cfg(all(feature = "schedule-delay", target_has_atomic = "64"))]
#[inline]
fn waited(meta: &TaskMeta<'_>) -> Wait {
    match meta.schedule_latency() {
        Some(d) => Wait::exact(u64::try_from(d.as_nanos()).unwrap_or(Wait::MAX_NANOS)),
        None => Wait::UNKNOWN,
    }
}
