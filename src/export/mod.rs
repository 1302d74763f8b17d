//! Exports: loopwatch's figures as metrics, from a thread of its own (`loopwatch-export`).
//!
//! Each interval the export thread takes one [`Frame`] from the watchdog's shared state (and
//! from the runtimes given to [`Guard::monitor_runtime`](crate::Guard::monitor_runtime)) and
//! hands it to every sink: the `metrics` facade (loopwatch's own Prometheus recorder, or the
//! application's global recorder). The thread runs its own single-threaded tokio runtime, which
//! also serves `/metrics`: nothing of loopwatch's runs on the watched runtime, so a stalled
//! service can still be scraped.

pub(crate) mod table;

mod frame;
#[cfg(feature = "prometheus")]
mod listener;
#[cfg(feature = "otlp")]
pub(crate) mod otlp;
mod runtime;
mod sink;
mod thread;

pub(crate) use thread::join_within;

use std::future::Future as _;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use metrics::SharedString;

use crate::config::MetricsExport;
use crate::shared::Shared;
use crate::stall::LayerKind;
use crate::Error;

use frame::{Frame, Value};
pub(crate) use runtime::RuntimeProbe;
use table::M;

const LAYERS: [LayerKind; 3] = [LayerKind::Async, LayerKind::Blocking, LayerKind::Cpu];

/// Builds frames from the shared state.
pub(crate) struct Collector {
    shared: Arc<Shared>,
    runtimes: Arc<Mutex<Vec<RuntimeProbe>>>,
    /// Feed values dropped so far (the feed counts per interval).
    feed_dropped: u64,
}

impl Collector {
    pub(crate) fn new(shared: Arc<Shared>, runtimes: Arc<Mutex<Vec<RuntimeProbe>>>) -> Self {
        Collector {
            shared,
            runtimes,
            feed_dropped: 0,
        }
    }

    pub(crate) fn collect(&mut self) -> Frame {
        let mut f = Frame::default();
        let sh = &*self.shared;
        let snap = sh.counters();
        let kinds = &sh.board.kinds;
        let kind_label = |id| -> SharedString {
            let k = kinds.get(id);
            SharedString::from(k.label().to_string())
        };

        // The values gathered since the last frame, for the histograms.
        let feed = sh
            .feed
            .as_ref()
            .and_then(|m| m.lock().ok().map(|mut g| std::mem::take(&mut *g)))
            .unwrap_or_default();
        self.feed_dropped += feed.dropped;

        for layer in LAYERS {
            let i = layer as usize;
            let l = || vec![SharedString::from(layer.as_str())];
            f.push(M::Polls, l(), Value::Counter(snap.polls_by_layer[i]));
            f.push(
                M::SlowPolls,
                l(),
                Value::Counter(snap.slow_polls_by_layer[i]),
            );
        }
        f.push(
            M::BuildInfo,
            vec![env!("CARGO_PKG_VERSION").into()],
            Value::Gauge(1.0),
        );
        f.counter(M::DroppedReports, snap.dropped_reports);
        f.counter(M::DroppedSamples, snap.dropped_samples + self.feed_dropped);
        f.counter(M::DroppedSpans, snap.dropped_spans);
        f.counter(M::LabelOverflow, snap.kinds_overflow);
        f.counter(M::UnwatchedThreads, snap.unwatched_threads);
        f.counter(M::CaughtPanics, snap.caught_panics);
        f.counter(M::DiagnosisSamples, snap.diagnosis_samples);
        for (status, v) in [
            ("captured", snap.stacks_captured),
            ("rate_limited", snap.stacks_rate_limited),
            ("failed", snap.stacks_failed),
            ("signal_lost", snap.stacks_signal_lost),
            ("in_syscall", snap.stacks_in_syscall),
        ] {
            f.push(M::Stacks, vec![status.into()], Value::Counter(v));
        }
        for layer in LAYERS {
            let i = layer as usize;
            f.push(
                M::StallsInProgress,
                vec![layer.as_str().into()],
                Value::Gauge(sh.in_progress[i].load(Ordering::Relaxed) as f64),
            );
            f.push(
                M::OldestStallAge,
                vec![layer.as_str().into()],
                Value::Gauge(sh.oldest_ns[i].load(Ordering::Relaxed) as f64 / 1e9),
            );
        }
        if let Ok(counts) = sh.stall_counts.lock() {
            for (key, &n) in counts.iter() {
                f.push(
                    M::Stalls,
                    vec![
                        key.layer.as_str().into(),
                        kind_label(key.kind),
                        key.cause.kind().into(),
                        syscall_label(&key.cause),
                    ],
                    Value::Counter(n),
                );
            }
        }

        if let Ok(times) = sh.poll_time.lock() {
            for (key, &ns) in times.iter() {
                let layer = SharedString::from(key.layer.as_str());
                let (metric, labels) = match key.syscall {
                    Some(nr) => (
                        M::Blocked,
                        vec![
                            layer,
                            kind_label(key.kind),
                            crate::shared::syscall_name(nr).into(),
                        ],
                    ),
                    None => (M::Running, vec![layer, kind_label(key.kind)]),
                };
                f.push(metric, labels, Value::Seconds(ns as f64 / 1e9));
            }
        }

        push_samples(&mut f, M::PollDuration, feed.polls, |(kind, layer)| {
            vec![layer.as_str().into(), kind_label(kind)]
        });
        push_samples(&mut f, M::StallDuration, feed.stalls, |k| {
            vec![
                k.layer.as_str().into(),
                kind_label(k.kind),
                k.cause.kind().into(),
            ]
        });
        push_samples(&mut f, M::ScheduleDelay, feed.sched, |(kind, layer)| {
            vec![layer.as_str().into(), kind_label(kind)]
        });
        push_samples(&mut f, M::VictimWait, feed.victims, |(layer, cause)| {
            vec![layer.as_str().into(), cause.into()]
        });

        let b = &sh.board.blocking;
        let max = b.max_threads.load(Ordering::Relaxed).max(1);
        f.push(
            M::BlockingRunning,
            Vec::new(),
            Value::Gauge(snap.blocking_running as f64),
        );
        f.push(
            M::BlockingQueued,
            Vec::new(),
            Value::Gauge(snap.blocking_queued as f64),
        );
        f.push(
            M::BlockingSaturation,
            Vec::new(),
            Value::Gauge(snap.blocking_running as f64 / max as f64),
        );
        f.counter(M::BlockingSlowStarts, snap.blocking_slow_starts);
        if let Ok(counts) = sh.victim_counts.lock() {
            for (&(layer, cause), &n) in counts.iter() {
                f.push(
                    M::Victims,
                    vec![layer.as_str().into(), cause.into()],
                    Value::Counter(n),
                );
            }
        }
        #[cfg(feature = "rayon")]
        if let Ok(pools) = sh.cpu_pools.lock() {
            for p in pools.iter() {
                let (jobs, fine, _) = p.totals();
                let pool = || vec![SharedString::from(p.name.to_string())];
                f.push(M::CpuJobs, pool(), Value::Counter(jobs));
                f.push(M::CpuJobsTooFine, pool(), Value::Counter(fine));
            }
        }
        if matches!(sh.cfg.metrics, MetricsExport::Prometheus(_)) {
            let e = &sh.export;
            for (signal, errors) in [
                ("accept", &e.listener_accept_errors),
                ("client", &e.listener_client_errors),
            ] {
                f.push(
                    M::ExportErrors,
                    vec![SharedString::from("prometheus"), SharedString::from(signal)],
                    Value::Counter(errors.load(Ordering::Relaxed)),
                );
            }
        }
        if sh.cfg.otlp.is_some() {
            let e = &sh.export;
            for (signal, dropped, errors) in [
                ("traces", &e.spans_dropped, &e.spans_errors),
                ("metrics", &e.metrics_dropped, &e.metrics_errors),
            ] {
                let labels = || vec![SharedString::from("otlp"), SharedString::from(signal)];
                f.push(
                    M::ExportDropped,
                    labels(),
                    Value::Counter(dropped.load(Ordering::Relaxed)),
                );
                f.push(
                    M::ExportErrors,
                    labels(),
                    Value::Counter(errors.load(Ordering::Relaxed)),
                );
            }
        }
        if let Ok(mut rts) = self.runtimes.lock() {
            for rt in rts.iter_mut() {
                rt.collect(&mut f);
            }
        }
        f
    }
}

/// Groups `(key, nanoseconds)` values by key into one histogram point (seconds) per label set.
fn push_samples<K: Copy + Eq + std::hash::Hash>(
    f: &mut Frame,
    metric: M,
    values: Vec<(K, u64)>,
    labels: impl Fn(K) -> Vec<SharedString>,
) {
    let mut groups: std::collections::HashMap<K, Vec<f64>> = std::collections::HashMap::new();
    for (k, ns) in values {
        groups.entry(k).or_default().push(ns as f64 / 1e9);
    }
    for (k, samples) in groups {
        f.push(metric, labels(k), Value::Samples(samples));
    }
}

/// The syscall label of a stall: the call's name for `syscall` stalls, empty otherwise (an
/// empty label is the same as none in Prometheus).
fn syscall_label(cause: &crate::diagnose::Cause) -> SharedString {
    match cause {
        crate::diagnose::Cause::Syscall(s) => match s.name {
            Some(n) => n.into(),
            None => "unknown".into(),
        },
        _ => "".into(),
    }
}

/// What the guard keeps of the export thread.
pub(crate) struct Exporter {
    thread: Option<JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The address `/metrics` is served on, if it is.
    pub(crate) prometheus_addr: Option<SocketAddr>,
    pub(crate) runtimes: Arc<Mutex<Vec<RuntimeProbe>>>,
    /// Thread counters by runtime name, for the runtimes monitored under that name.
    pub(crate) threads: Mutex<Vec<(String, crate::ThreadCounter)>>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("prometheus_addr", &self.prometheus_addr)
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// Starts the export thread (and the OTLP thread), if the config exports anything. Returns
    /// once the Prometheus listener (if any) is bound and the OTLP exporters are built, or with
    /// the error that kept them from it; with the OTLP exporter, also the sender the reporter
    /// gives stall records to.
    pub(crate) fn start(
        shared: &Arc<Shared>,
    ) -> Result<Option<(Exporter, Option<StallSink>)>, Error> {
        let cfg = &shared.cfg;
        if cfg.metrics == MetricsExport::Off && cfg.otlp.is_none() {
            return Ok(None);
        }
        #[cfg(feature = "otlp")]
        let otlp = match &cfg.otlp {
            Some(o) => Some(otlp::Otlp::start(shared, o)?),
            None => None,
        };
        #[cfg(not(feature = "otlp"))]
        let otlp: Option<NoOtlp> = None;
        #[cfg(feature = "otlp")]
        let stall_sink = otlp.as_ref().map(|o| o.stall_sender());
        #[cfg(not(feature = "otlp"))]
        let stall_sink = None;
        let prometheus_addr = match cfg.metrics {
            MetricsExport::Prometheus(addr) => match resolve_port(addr) {
                Ok(a) => Some(a),
                Err(e) if !listener_required(cfg) => {
                    shared.listener_off(&e);
                    None
                }
                Err(e) => return Err(e),
            },
            _ => None,
        };
        // The listener was the only exporter and it is off: nothing to run.
        let metrics_on = match cfg.metrics {
            MetricsExport::Off => false,
            MetricsExport::Prometheus(_) => prometheus_addr.is_some(),
            _ => true,
        };
        if !metrics_on && otlp.is_none() {
            return Ok(None);
        }
        let runtimes: Arc<Mutex<Vec<RuntimeProbe>>> = Arc::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let collector = Collector::new(shared.clone(), runtimes.clone());
        let interval = cfg.export_interval;
        let sinks = Sinks {
            metrics_on,
            listener_required: listener_required(cfg),
            prometheus_addr,
            otlp,
        };
        let thread = thread::start("loopwatch-export", move |ready| {
            run(collector, interval, sinks, stop_rx, ready)
        })?;
        Ok(Some((
            Exporter {
                thread: Some(thread),
                stop: Some(stop_tx),
                prometheus_addr,
                runtimes,
                threads: Mutex::default(),
            },
            stall_sink,
        )))
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            // The last frame, then up to 2 s for the OTLP thread to send what it holds.
            thread::join_within(t, Duration::from_secs(3));
        }
    }
}

/// Does a listener that cannot bind fail start-up? When asked for, or when its address was
/// given (only a busy *default* address turns the listener off instead).
fn listener_required(cfg: &crate::Config) -> bool {
    cfg.prometheus_required
        || cfg.metrics != MetricsExport::Prometheus(crate::DEFAULT_PROMETHEUS_ADDR)
}

/// Binds `addr` once to check it and, for port 0, to pick the port the listener will use; the
/// error is the OS's own (address in use, not a local address, no permission).
fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, Error> {
    let probe = std::net::TcpListener::bind(addr)
        .map_err(|source| Error::PrometheusListener { addr, source })?;
    probe
        .local_addr()
        .map_err(|source| Error::PrometheusListener { addr, source })
}

/// Where frames go.
struct Sinks {
    metrics_on: bool,
    listener_required: bool,
    prometheus_addr: Option<SocketAddr>,
    otlp: Option<OtlpSink>,
}

#[cfg(feature = "otlp")]
type OtlpSink = otlp::Otlp;
#[cfg(not(feature = "otlp"))]
type OtlpSink = NoOtlp;
/// Stall records for the OTLP exporter.
#[cfg(feature = "otlp")]
pub(crate) type StallSink = otlp::StallSender;
#[cfg(not(feature = "otlp"))]
pub(crate) type StallSink = NoOtlp;

/// Stands in for the OTLP exporter when the `otlp` feature is off.
#[cfg(not(feature = "otlp"))]
#[derive(Clone, Debug)]
pub(crate) enum NoOtlp {}

#[cfg(not(feature = "otlp"))]
impl NoOtlp {
    pub(crate) fn send(&self, _: &crate::Stall) {}
    fn send_frame(&self, _: &Arc<Frame>) {}
    fn close(self, _: Duration) {}
}

/// The export thread's body.
async fn run(
    mut collector: Collector,
    interval: Duration,
    sinks: Sinks,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    ready: thread::Ready,
) {
    let shared = collector.shared.clone();
    let Sinks {
        metrics_on,
        listener_required,
        prometheus_addr,
        otlp,
    } = sinks;
    {
        let mut metrics = None;
        if metrics_on {
            match sink::MetricsSink::start(prometheus_addr, &shared) {
                Ok(s) => metrics = Some(s),
                // Taken between the check and this bind: as a busy address at the check.
                Err(e) if !listener_required => shared.listener_off(&e),
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
        }
        let _ = ready.send(Ok(()));
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beats = tokio::time::interval(HEARTBEAT);
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = match next_wake(&mut stop, &mut beats, &mut ticker).await {
                Wake::Stop => true,
                Wake::Export => false,
                Wake::Beat => {
                    let beat = catch_unwind(AssertUnwindSafe(|| {
                        if let Ok(rts) = collector.runtimes.lock() {
                            rts.iter().for_each(RuntimeProbe::beat);
                        }
                    }));
                    if beat.is_err() {
                        shared.caught_panics.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
            };
            let exported = catch_unwind(AssertUnwindSafe(|| {
                let frame = Arc::new(collector.collect());
                if let Some(m) = metrics.as_mut() {
                    m.apply(&frame);
                }
                if let Some(o) = &otlp {
                    o.send_frame(&frame);
                }
            }));
            if exported.is_err() {
                shared.caught_panics.fetch_add(1, Ordering::Relaxed);
            }
            if stopping {
                break;
            }
        }
        if let Some(o) = otlp {
            o.close(Duration::from_secs(2));
        }
    }
}

/// How often each monitored runtime gets a heartbeat task (loop lag).
const HEARTBEAT: Duration = Duration::from_millis(25);

enum Wake {
    /// The guard is stopping (or gone).
    Stop,
    /// Time to send the heartbeats.
    Beat,
    /// Time to export a frame.
    Export,
}

/// Waits for the stop signal, the next heartbeat or the next export, in that order.
async fn next_wake(
    stop: &mut tokio::sync::oneshot::Receiver<()>,
    beats: &mut tokio::time::Interval,
    ticker: &mut tokio::time::Interval,
) -> Wake {
    std::future::poll_fn(|cx| {
        if std::pin::Pin::new(&mut *stop).poll(cx).is_ready() {
            return std::task::Poll::Ready(Wake::Stop);
        }
        if beats.poll_tick(cx).is_ready() {
            return std::task::Poll::Ready(Wake::Beat);
        }
        ticker.poll_tick(cx).map(|_| Wake::Export)
    })
    .await
}
