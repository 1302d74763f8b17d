//! The blocking-pool probe: `spawn_blocking` wrappers that see each job's wait for a thread
//! (the alarm: the pool is full) and its run on the `blocking` layer (a long job is normal;
//! one past `blocking_threshold` is reported as a stall of that layer).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinHandle;

use crate::board::{Board, PROBE};
use crate::probe::layer::current_task_id;
use crate::stall::LayerKind;
use crate::words::{CulpritWord, Wait};

/// Runs `f` on tokio's blocking pool like `tokio::task::spawn_blocking`, watched by `board`.
pub(crate) fn spawn<F, R>(
    board: Option<Arc<Board>>,
    f: F,
    site: &'static std::panic::Location<'static>,
) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let Some(board) = board else {
        return tokio::task::spawn_blocking(f);
    };
    let kind = board
        .kinds
        .intern(None, Some((site.file(), site.line(), site.column())));
    let word = CulpritWord::kind(kind, LayerKind::Blocking, false);
    let submitted = Instant::now();
    board.blocking.submitted.fetch_add(1, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || {
        let waited =
            Wait::exact(u64::try_from(submitted.elapsed().as_nanos()).unwrap_or(Wait::MAX_NANOS));
        board.blocking.started.fetch_add(1, Ordering::Relaxed);
        // Ends the job on the board even if `f` panics.
        struct Done<'a>(&'a Arc<Board>);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.exit(PROBE);
                self.0.blocking.finished.fetch_add(1, Ordering::Relaxed);
            }
        }
        board.enter(PROBE, word, current_task_id, waited);
        let _done = Done(&board);
        f()
    })
}

/// Runs `f` on tokio's blocking pool, like [`tokio::task::spawn_blocking`], watched by the
/// most recently started [`Guard`](crate::Guard): loopwatch sees how long the job waited for a
/// thread (`loopwatch_schedule_delay_seconds{layer="blocking"}`; a wait past the stall
/// threshold means the pool is full, and is reported as such) and how long it ran
/// (`loopwatch_poll_duration_seconds{layer="blocking"}`; a job past `blocking_threshold` is a
/// stall of the `blocking` layer). Must be called inside a tokio runtime, like tokio's.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let n = loopwatch::spawn_blocking(|| std::fs::read_dir(".").map(|d| d.count()))
///     .await
///     .unwrap();
/// # }
/// ```
#[track_caller]
pub fn spawn_blocking<F, R>(f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    spawn(
        crate::probe::watched::current(),
        f,
        std::panic::Location::caller(),
    )
}
