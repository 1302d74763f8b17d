//! Counting a runtime's threads through tokio's thread start and stop callbacks: on stable
//! tokio the only way to see how many threads its blocking pool runs (tokio's own count is a
//! `tokio_unstable` metric), including the ones tokio starts for its own blocking work
//! (`tokio::fs`, DNS look-ups, `spawn_blocking` calls loopwatch does not wrap).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
struct Counts {
    started: AtomicU64,
    stopped: AtomicU64,
}

/// Counts the threads a tokio runtime starts and stops. Made by
/// [`Guard::thread_counter`](crate::Guard::thread_counter) (or installed in one step by
/// [`Guard::count_threads`](crate::Guard::count_threads)); call [`started`](Self::started)
/// from the runtime's `on_thread_start` and [`stopped`](Self::stopped) from its
/// `on_thread_stop`. tokio keeps one callback of each per runtime, so a runtime that already
/// has its own calls these from inside it:
///
/// ```
/// # let guard = loopwatch::builder().ignore_env().metrics(loopwatch::MetricsExport::Off).build().unwrap().1;
/// let threads = guard.thread_counter("api");
/// let (start, stop) = (threads.clone(), threads.clone());
/// let rt = tokio::runtime::Builder::new_multi_thread()
///     .on_thread_start(move || {
///         start.started();
///         // ... the application's own start-up per thread
///     })
///     .on_thread_stop(move || stop.stopped())
///     .build()
///     .unwrap();
/// guard.monitor_runtime(rt.handle(), "api");
/// ```
///
/// [`Guard::monitor_runtime`](crate::Guard::monitor_runtime) under the same name then exports
/// the blocking pool's threads (`loopwatch_runtime_blocking_threads`): the threads alive less
/// the workers. Two atomic adds per thread start or stop; nothing per poll.
#[derive(Debug, Clone, Default)]
pub struct ThreadCounter {
    counts: Arc<Counts>,
}

impl ThreadCounter {
    /// A thread of the runtime started: call from `on_thread_start`.
    pub fn started(&self) {
        self.counts.started.fetch_add(1, Ordering::Relaxed);
    }

    /// A thread of the runtime is stopping: call from `on_thread_stop`.
    pub fn stopped(&self) {
        self.counts.stopped.fetch_add(1, Ordering::Relaxed);
    }

    /// Threads started and not yet stopped.
    pub fn alive(&self) -> u64 {
        // Read `stopped` first: a thread counted as stopped was counted as started before.
        let stopped = self.counts.stopped.load(Ordering::Relaxed);
        self.counts
            .started
            .load(Ordering::Relaxed)
            .saturating_sub(stopped)
    }

    /// Sets the builder's `on_thread_start` and `on_thread_stop` to count its threads,
    /// replacing callbacks set before (and replaced by ones set after).
    pub fn install<'a>(
        &self,
        builder: &'a mut tokio::runtime::Builder,
    ) -> &'a mut tokio::runtime::Builder {
        let (start, stop) = (self.clone(), self.clone());
        builder
            .on_thread_start(move || start.started())
            .on_thread_stop(move || stop.stopped())
    }
}
