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
    /// Each worker's busy time and park/unpark count at the previous frame, and when that was.
    busy: Vec<Duration>,
    parked: Vec<u64>,
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
            parked: (0..m.num_workers())
                .map(|w| m.worker_park_unpark_count(w))
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
        drop(spawn_own(&self.handle, async move {
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
        self.parked.resize(workers, 0);
        // A multi-thread runtime's workers are always at work or parked; a current-thread
        // runtime's one "worker" is whoever calls `block_on`, and nobody may.
        let multi = self.handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
        let mut sum = 0.0;
        for (w, (prev, prev_parked)) in self.busy.iter_mut().zip(&mut self.parked).enumerate() {
            let total = m.worker_total_busy_duration(w);
            let parked = m.worker_park_unpark_count(w);
            let delta = total.saturating_sub(*prev).as_secs_f64();
            let ratio = if multi {
                worker_busy_ratio(delta, elapsed, *prev_parked, parked)
            } else if elapsed > 0.0 {
                (delta / elapsed).clamp(0.0, 1.0)
            } else {
                0.0
            };
            (*prev, *prev_parked) = (total, parked);
            sum += ratio;
            let labels = vec![self.name.clone(), SharedString::from(w.to_string())];
            f.push(M::RuntimeWorkerBusyRatio, labels, Value::Gauge(ratio));
        }
        let mean = if workers > 0 {
            sum / workers as f64
        } else {
            0.0
        };
        f.push(M::RuntimeBusyRatio, rt(), Value::Gauge(mean));
    }
}

/// Spawns loopwatch's own task on a watched runtime, recording its site first: tokio takes
/// the spawn site from this function's caller (`#[track_caller]`), and the probes leave polls
/// of a task spawned there out of the application's figures.
#[track_caller]
fn spawn_own<F>(handle: &tokio::runtime::Handle, fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    crate::board::set_own_site(std::panic::Location::caller());
    handle.spawn(fut)
}

/// One worker's busy share of an interval of `elapsed` seconds in which tokio published
/// `busy` seconds of busy time for it, and its park/unpark count went from `parked_before` to
/// `parked_now` (odd: parked). tokio publishes a worker's busy time when it parks (and every
/// few dozen polls): a worker held by one long poll publishes nothing, and would read idle
/// exactly while it is stalled. A worker that neither parked nor unparked during the interval
/// and is not parked was at work all of it: busy, whatever was published (multi-thread
/// runtimes only: their workers are always at work or parked).
pub(crate) fn worker_busy_ratio(
    busy: f64,
    elapsed: f64,
    parked_before: u64,
    parked_now: u64,
) -> f64 {
    if elapsed <= 0.0 {
        return 0.0;
    }
    if parked_now == parked_before && parked_now.is_multiple_of(2) {
        return 1.0;
    }
    (busy / elapsed).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::worker_busy_ratio;

    #[test]
    fn a_worker_held_by_one_poll_is_busy_though_tokio_published_nothing() {
        // Never parked in the interval, not parked now: a stall (or a long run of polls).
        assert_eq!(worker_busy_ratio(0.0, 1.0, 6, 6), 1.0);
        // Parked the whole interval.
        assert_eq!(worker_busy_ratio(0.0, 1.0, 7, 7), 0.0);
        // Parked and woke: what tokio published.
        assert_eq!(worker_busy_ratio(0.25, 1.0, 7, 9), 0.25);
        assert_eq!(worker_busy_ratio(0.25, 1.0, 6, 8), 0.25);
        assert_eq!(worker_busy_ratio(3.0, 1.0, 6, 8), 1.0);
        assert_eq!(worker_busy_ratio(0.5, 0.0, 6, 6), 0.0);
    }
}
