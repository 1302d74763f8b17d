//! A watched runtime's own figures, from `tokio-metrics`' `RuntimeMonitor` (aggregates per
//! interval) and tokio's per-worker busy time.

use std::time::{Duration, Instant};

use metrics::SharedString;
use tokio_metrics::{RuntimeIntervals, RuntimeMonitor};

use super::table::M;
use super::{Frame, Value};

/// One runtime given to [`Guard::monitor_runtime`](crate::Guard::monitor_runtime).
pub(crate) struct RuntimeProbe {
    name: SharedString,
    handle: tokio::runtime::Handle,
    intervals: RuntimeIntervals,
    /// Totals so far of the counters tokio-metrics gives per interval.
    parks: u64,
    #[cfg(tokio_unstable)]
    steals: u64,
    #[cfg(tokio_unstable)]
    forced_yields: u64,
    /// Each worker's busy time at the previous frame, and when that was.
    busy: Vec<Duration>,
    at: Instant,
}

impl std::fmt::Debug for RuntimeProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeProbe")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RuntimeProbe {
    pub(crate) fn new(handle: &tokio::runtime::Handle, name: &str) -> RuntimeProbe {
        let mut intervals = RuntimeMonitor::new(handle).intervals();
        // The first interval covers the runtime's life so far; start counting from now.
        let _ = intervals.next();
        let m = handle.metrics();
        RuntimeProbe {
            name: name.to_string().into(),
            handle: handle.clone(),
            intervals,
            parks: 0,
            #[cfg(tokio_unstable)]
            steals: 0,
            #[cfg(tokio_unstable)]
            forced_yields: 0,
            busy: (0..m.num_workers())
                .map(|w| m.worker_total_busy_duration(w))
                .collect(),
            at: Instant::now(),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn collect(&mut self, f: &mut Frame) {
        let Some(iv) = self.intervals.next() else {
            return;
        };
        let rt = || vec![self.name.clone()];
        self.parks += iv.total_park_count;
        f.push(
            M::RuntimeWorkers,
            rt(),
            Value::Gauge(iv.workers_count as f64),
        );
        f.push(
            M::RuntimeAliveTasks,
            rt(),
            Value::Gauge(iv.live_tasks_count as f64),
        );
        f.push(
            M::RuntimeGlobalQueueDepth,
            rt(),
            Value::Gauge(iv.global_queue_depth as f64),
        );
        let ratio = iv.busy_ratio();
        f.push(
            M::RuntimeBusyRatio,
            rt(),
            Value::Gauge(if ratio.is_finite() { ratio } else { 0.0 }),
        );
        f.push(M::RuntimeParks, rt(), Value::Counter(self.parks));
        #[cfg(tokio_unstable)]
        {
            self.steals += iv.total_steal_count;
            self.forced_yields += iv.budget_forced_yield_count;
            for (m, v) in [
                (M::RuntimeBlockingThreads, iv.blocking_threads_count),
                (
                    M::RuntimeIdleBlockingThreads,
                    iv.idle_blocking_threads_count,
                ),
                (M::RuntimeBlockingQueueDepth, iv.blocking_queue_depth),
                (M::RuntimeLocalQueueDepth, iv.total_local_queue_depth),
            ] {
                f.push(m, rt(), Value::Gauge(v as f64));
            }
            f.push(M::RuntimeSteals, rt(), Value::Counter(self.steals));
            f.push(
                M::RuntimeForcedYields,
                rt(),
                Value::Counter(self.forced_yields),
            );
        }

        let m = self.handle.metrics();
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        let workers = m.num_workers();
        self.busy.resize(workers, Duration::ZERO);
        for (w, prev) in self.busy.iter_mut().enumerate() {
            let total = m.worker_total_busy_duration(w);
            let delta = total.saturating_sub(*prev).as_secs_f64();
            *prev = total;
            let labels = vec![self.name.clone(), SharedString::from(w.to_string())];
            let ratio = if elapsed > 0.0 {
                (delta / elapsed).clamp(0.0, 1.0)
            } else {
                0.0
            };
            f.push(M::RuntimeWorkerBusyRatio, labels, Value::Gauge(ratio));
        }
    }
}
