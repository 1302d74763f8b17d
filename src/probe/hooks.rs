//! The poll-hook probe (`--cfg tokio_unstable`): tokio calls loopwatch before and after every
//! task poll on the runtime it was installed on, with the task's id and spawn location.
//!
//! This is the cheapest probe: no span, no table look-up; the slot gets a pointer to the
//! task's `&'static Location` and its id, and the watchdog turns the location into a task kind.

use std::sync::Arc;

use tokio::runtime::{Builder, TaskMeta};

use crate::board::{location_word, Board};
use crate::probe::layer::task_id_u64;

/// Installs the poll hooks of `board` on a runtime builder.
pub(crate) fn install<'a>(board: &Arc<Board>, builder: &'a mut Builder) -> &'a mut Builder {
    let before = board.clone();
    let after = board.clone();
    builder
        .on_before_task_poll(move |meta: &TaskMeta<'_>| {
            let loc = meta.spawned_at();
            before.enter(location_word(loc), || task_id_u64(meta.id()));
        })
        .on_after_task_poll(move |_meta: &TaskMeta<'_>| after.exit())
}
