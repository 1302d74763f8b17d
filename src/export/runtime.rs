//! A watched runtime's own figures, from `tokio-metrics`' `RuntimeMonitor` (aggregates per
//! interval) and tokio's per-worker busy time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::SharedString;
use tokio_metrics::{RuntimeIntervals, RuntimeMonitor};

use super::frame::{Frame, Value};
use super::table::M;

/// The runtime's heartbeat: one tiny task at a time, spawned from loopwatch's export thread;
/// the time from its spawn to its first poll is the loop lag (how long a newly woken task waits
/// for a worker). While one is still waiting, no other is sent, so a stalled runtime holds at
/// most one, and that one measures the whole stall when it finally runs.
#[derive(Debug, Default)]
pub(crate) struct Heartbeat {
    in_flight: AtomicBool,
    /// Lags (ns) not exported yet; bounded.
    pending: Mutex<Vec<u64>>,
    /// Every lag, for the snapshot.
    hist: Mutex<crate::snapshot::Histogram>,
}

impl Heartbeat {
    fn record(&self, ns: u64) {
        if let Ok(mut h) = self.hist.lock() {
            if h.counts.is_empty() {
                *h = crate::snapshot::Histogram::new();
            }
            h.record(ns);
        }
        if let Ok(mut p) = self.pending.lock() {
            if p.len() < 4096 {
                p.push(ns);
            }
        }
    }
}

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
    heartbeat: Arc<Heartbeat>,
    /// The runtime's threads, counted by its start and stop callbacks (stable tokio's only
    /// view of its blocking pool).
    threads: Option<crate::ThreadCounter>,
}

impl std::fmt::Debug for RuntimeProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeProbe")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RuntimeProbe {
    pub(crate) fn new(
        handle: &tokio::runtime::Handle,
        name: &str,
        threads: Option<crate::ThreadCounter>,
    ) -> RuntimeProbe {
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
            heartbeat: Arc::default(),
            threads,
        }
    }

    /// Sends a heartbeat task to the runtime, unless the last one has not run yet.
    pub(crate) fn beat(&self) {
        if self.heartbeat.in_flight.swap(true, Ordering::AcqRel) {
            return;
        }
        let hb = self.heartbeat.clone();
        let sent = Instant::now();
        drop(self.handle.spawn(async move {
            hb.record(sent.elapsed().as_nanos() as u64);
            hb.in_flight.store(false, Ordering::Release);
        }));
    }

    /// The loop lags measured so far.
    pub(crate) fn loop_lag(&self) -> crate::snapshot::Histogram {
        self.heartbeat
            .hist
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn set_threads(&mut self, threads: crate::ThreadCounter) {
        self.threads = Some(threads);
    }

    pub(crate) fn collect(&mut self, f: &mut Frame) {
        let lags = self
            .heartbeat
            .pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        if !lags.is_empty() {
            f.push(
                M::LoopLag,
                vec![self.name.clone()],
                Value::Samples(lags.iter().map(|&ns| ns as f64 / 1e9).collect()),
            );
        }
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
        // tokio counts its blocking threads itself under tokio_unstable; on stable, the
        // thread callbacks do: every thread it started, less the workers of a multi-thread
        // runtime (started the same way; a current-thread runtime's worker is the caller's).
        #[cfg(not(tokio_unstable))]
        if let Some(t) = &self.threads {
            let workers = match self.handle.runtime_flavor() {
                tokio::runtime::RuntimeFlavor::CurrentThread => 0,
                _ => iv.workers_count as u64,
            };
            f.push(
                M::RuntimeBlockingThreads,
                rt(),
                Value::Gauge(t.alive().saturating_sub(workers) as f64),
            );
        }
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
