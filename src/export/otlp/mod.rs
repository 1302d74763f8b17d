//! The OTLP exporter (feature `otlp`): each ended stall becomes a span, and every frame of
//! metrics goes out as OTLP metrics, over gRPC or HTTP/protobuf, from a thread of its own
//! (`loopwatch-otlp`, with its own single-threaded tokio runtime).
//!
//! Nothing here can slow the service: stall records and frames reach this thread through
//! bounded queues filled with `try_send` (full: dropped and counted); every export has a
//! timeout; a failed export is counted and its spans dropped (the metrics are cumulative, so the
//! next export carries them). When the collector comes back, the next export goes through.

mod instruments;
mod spans;
#[cfg(feature = "otlp-tls")]
mod tls;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{MetricExporter, Protocol, SpanExporter, WithExportConfig as _};
#[cfg(feature = "otlp-tls")]
use opentelemetry_otlp::{WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter as _;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use self::instruments::OtlpMetrics;
use self::spans::StallSpans;
use super::frame::Frame;
use crate::config::{OtlpConfig, OtlpProtocol};
use crate::shared::{ExportStats, Shared};
use crate::stall::Stall;
use crate::Error;

/// Spans sent in one export at most.
const MAX_BATCH: usize = 512;
/// Frames waiting for the metrics export at most (older ones are not dropped: a frame holds
/// histogram values; a full queue drops the newest, counted).
const FRAME_QUEUE: usize = 4;

/// What the rest of loopwatch keeps of the OTLP thread: the two queues into it.
pub(crate) struct Otlp {
    stalls: mpsc::Sender<Stall>,
    frames: mpsc::Sender<Arc<Frame>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Otlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otlp").finish_non_exhaustive()
    }
}

/// The sending side for stall records, given to the reporter.
#[derive(Clone)]
pub(crate) struct StallSender {
    tx: mpsc::Sender<Stall>,
    shared: Arc<Shared>,
}

impl StallSender {
    /// Queues a stall record for the OTLP thread; a full queue drops it (counted).
    pub(crate) fn send(&self, stall: &Stall) {
        if self.tx.try_send(stall.clone()).is_err() {
            self.shared
                .export
                .spans_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Otlp {
    /// Starts `loopwatch-otlp`; returns once its exporters are built (an invalid endpoint is an
    /// error here, not later).
    pub(crate) fn start(shared: &Arc<Shared>, cfg: &OtlpConfig) -> Result<Otlp, Error> {
        let (stall_tx, stall_rx) = mpsc::channel::<Stall>(cfg.span_queue);
        let (frame_tx, frame_rx) = mpsc::channel::<Arc<Frame>>(FRAME_QUEUE);
        let cfg2 = cfg.clone();
        let stats = shared.clone();
        let thread = super::thread::start("loopwatch-otlp", move |ready| {
            run(cfg2, stats, stall_rx, frame_rx, ready)
        })?;
        Ok(Otlp {
            stalls: stall_tx,
            frames: frame_tx,
            thread: Some(thread),
            shared: shared.clone(),
        })
    }

    pub(crate) fn stall_sender(&self) -> StallSender {
        StallSender {
            tx: self.stalls.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Queues a frame of metrics; a full queue (the collector is slow) drops it, counted.
    pub(crate) fn send_frame(&self, frame: &Arc<Frame>) {
        if self.frames.try_send(frame.clone()).is_err() {
            self.shared
                .export
                .metrics_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the queues and gives the thread up to `wait` to send what it holds.
    pub(crate) fn close(mut self, wait: Duration) {
        let thread = self.thread.take();
        drop(self); // the senders: the thread's loops end once their queue is drained
        if let Some(t) = thread {
            super::thread::join_within(t, wait);
        }
    }
}

async fn run(
    cfg: OtlpConfig,
    shared: Arc<Shared>,
    stalls: mpsc::Receiver<Stall>,
    frames: mpsc::Receiver<Arc<Frame>>,
    ready: super::thread::Ready,
) {
    {
        let resource = resource();
        let built =
            std::panic::catch_unwind(|| build_exporters(&cfg, &resource)).unwrap_or_else(|_| {
                Err(Error::Otlp {
                    reason: "building the OTLP exporters panicked".into(),
                })
            });
        let (mut spans, metrics) = match built {
            Ok(e) => e,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        spans.set_resource(&resource);
        let _ = ready.send(Ok(()));
        let stats = &shared.export;
        let timeout = cfg.timeout;
        let span_loop = async {
            let mut tracer = StallSpans::new(scope());
            let mut stalls = stalls;
            while let Some(first) = stalls.recv().await {
                tracer.add(first);
                while tracer.ready() < MAX_BATCH {
                    match stalls.try_recv() {
                        Ok(s) => tracer.add(s),
                        Err(_) => break,
                    }
                }
                export_spans(&spans, tracer.take(), timeout, stats).await;
            }
            // Closing: stalls still running go out as they are (state `running`).
            let open = tracer.running_now();
            export_spans(&spans, open, timeout, stats).await;
        };
        let metric_loop = async {
            let mut sink = OtlpMetrics::new(&resource, scope());
            let mut frames = frames;
            while let Some(frame) = frames.recv().await {
                sink.apply(&frame);
                while let Ok(f) = frames.try_recv() {
                    sink.apply(&f);
                }
                let mut rm = ResourceMetrics::default();
                if sink.reader.0.collect(&mut rm).is_err() {
                    stats.metrics_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match tokio::time::timeout(timeout, metrics.export(&rm)).await {
                    Ok(Ok(())) => {
                        stats.metric_exports.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        stats.metrics_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        };
        // Both run on this thread; one waiting on a slow collector does not hold the other.
        join(span_loop, metric_loop).await;
    }
}

/// Runs two futures to completion, side by side (what `tokio::join!` does, without tokio's
/// `macros` feature).
async fn join(a: impl std::future::Future<Output = ()>, b: impl std::future::Future<Output = ()>) {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    let (mut a_done, mut b_done) = (false, false);
    std::future::poll_fn(|cx| {
        if !a_done {
            a_done = a.as_mut().poll(cx).is_ready();
        }
        if !b_done {
            b_done = b.as_mut().poll(cx).is_ready();
        }
        if a_done && b_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

async fn export_spans(
    exporter: &SpanExporter,
    batch: Vec<SpanData>,
    timeout: Duration,
    stats: &ExportStats,
) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    match tokio::time::timeout(timeout, exporter.export(batch)).await {
        Ok(Ok(())) => {
            stats.spans_exported.fetch_add(n, Ordering::Relaxed);
        }
        _ => {
            stats.spans_errors.fetch_add(1, Ordering::Relaxed);
            stats.spans_dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// The service's resource: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (read by the
/// SDK's detectors), else `unknown_service:<executable>` as the specification suggests.
fn resource() -> Resource {
    let mut b = Resource::builder();
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    if !named {
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        b = b.with_service_name(format!("unknown_service:{exe}"));
    }
    b.with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())))
        .build()
}

fn build_exporters(
    cfg: &OtlpConfig,
    resource: &Resource,
) -> Result<(SpanExporter, MetricExporter), Error> {
    let _ = resource;
    let err = |signal: &str, e: opentelemetry_otlp::ExporterBuildError| Error::Otlp {
        reason: format!("the {signal} exporter: {e}"),
    };
    let base = cfg.endpoint.as_deref().map(|e| e.trim_end_matches('/'));
    // An https endpoint (given here or by the environment) gets TLS settings of its own:
    // opentelemetry-otlp's default TLS trusts no root at all.
    #[cfg(feature = "otlp-tls")]
    let https = |signal_var: &str| {
        tls::endpoint_of(base, signal_var).is_some_and(|e| crate::config::is_https(&e))
    };
    #[cfg(feature = "otlp-tls")]
    let ca = cfg.ca_certificate_pem.as_deref();
    #[cfg(feature = "otlp-tls")]
    let https_client = || {
        tls::http(ca, cfg.timeout).map_err(|reason| Error::Otlp {
            reason: format!("the https client: {reason}"),
        })
    };
    let spans = match cfg.protocol {
        OtlpProtocol::Grpc => {
            let mut b = SpanExporter::builder()
                .with_tonic()
                .with_timeout(cfg.timeout);
            if let Some(e) = base {
                b = b.with_endpoint(e);
            }
            #[cfg(feature = "otlp-tls")]
            if https("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
                b = b.with_tls_config(tls::grpc(ca));
            }
            b.build()
        }
        OtlpProtocol::HttpProtobuf => {
            let mut b = SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_timeout(cfg.timeout);
            if let Some(e) = base {
                b = b.with_endpoint(format!("{e}/v1/traces"));
            }
            #[cfg(feature = "otlp-tls")]
            if https("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
                b = b.with_http_client(https_client()?);
            }
            b.build()
        }
    }
    .map_err(|e| err("traces", e))?;
    let metrics = match cfg.protocol {
        OtlpProtocol::Grpc => {
            let mut b = MetricExporter::builder()
                .with_tonic()
                .with_temporality(Temporality::Cumulative)
                .with_timeout(cfg.timeout);
            if let Some(e) = base {
                b = b.with_endpoint(e);
            }
            #[cfg(feature = "otlp-tls")]
            if https("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
                b = b.with_tls_config(tls::grpc(ca));
            }
            b.build()
        }
        OtlpProtocol::HttpProtobuf => {
            let mut b = MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_temporality(Temporality::Cumulative)
                .with_timeout(cfg.timeout);
            if let Some(e) = base {
                b = b.with_endpoint(format!("{e}/v1/metrics"));
            }
            #[cfg(feature = "otlp-tls")]
            if https("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
                b = b.with_http_client(https_client()?);
            }
            b.build()
        }
    }
    .map_err(|e| err("metrics", e))?;
    Ok((spans, metrics))
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("loopwatch")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}
