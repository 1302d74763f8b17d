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

/// Installs the poll hooks of `board` on a runtime builder. With the `schedule-delay` feature
/// (on by default; 64-bit targets) it also turns on tokio's schedule-latency tracking, so each
/// poll says how long its task waited from its wake: the schedule-delay histogram, and a
/// stall's victims.
pub(crate) fn install<'a>(
    board: &Arc<Board>,
    builder: &'a mut Builder,
    schedule_delay: bool,
) -> &'a mut Builder {
    let before = board.clone();
    let after = board.clone();
    builder.on_after_task_poll(move |_meta: &TaskMeta<'_>| after.exit(PROBE));
    #[cfg(all(feature = "schedule-delay", target_has_atomic = "64"))]
    if schedule_delay {
        builder.track_task_schedule_latency();
        board.set_waits_known();
        return builder.on_before_task_poll(move |meta: &TaskMeta<'_>| {
            before.enter(
                PROBE,
                CulpritWord::location(meta.spawned_at()),
                || task_id_u64(meta.id()),
                waited(meta),
            );
        });
    }
    let _ = schedule_delay;
    // Without schedule delays the hook never asks tokio for one: its common path is a few
    // stores to this thread's slot.
    builder.on_before_task_poll(move |meta: &TaskMeta<'_>| {
        before.enter(
            PROBE,
            CulpritWord::location(meta.spawned_at()),
            || task_id_u64(meta.id()),
            Wait::UNKNOWN,
        );
    })
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
