//! The OTLP exporter (feature `otlp`): each ended stall becomes a span, and every frame of
//! metrics goes out as OTLP metrics, over gRPC or HTTP/protobuf, from a thread of its own
//! (`loopwatch-otlp`, with its own single-threaded tokio runtime).
//!
//! Nothing here can slow the service: stall records and frames reach this thread through
//! bounded queues filled with `try_send` (full: dropped and counted); every export has a
//! timeout; a failed export is counted and its spans dropped (the metrics are cumulative, so the
//! next export carries them). When the collector comes back, the next export goes through.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use metrics::SharedString;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, MeterProvider as _};
use opentelemetry::trace::{Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{MetricExporter, Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter as _;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};
use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator, SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use super::frame::{Frame, Value};
use super::table::{MetricKind, DURATION_BUCKETS, M};
use crate::config::{OtlpConfig, OtlpProtocol};
use crate::shared::{ExportStats, Shared};
use crate::stall::{Stall, StallState};
use crate::Error;

/// Spans sent in one export at most.
const MAX_BATCH: usize = 512;
/// Frames waiting for the metrics export at most (older ones are not dropped: a frame holds
/// histogram values; a full queue drops the newest, counted).
const FRAME_QUEUE: usize = 4;
/// Running stalls remembered until they end (for their detection event), at most.
const MAX_RUNNING: usize = 4096;

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
            let mut tracer = StallSpans::default();
            let mut stalls = stalls;
            while let Some(first) = stalls.recv().await {
                tracer.add(first);
                while tracer.batch.len() < MAX_BATCH {
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
            let mut sink = OtlpMetrics::new(&resource);
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
    let spans = match cfg.protocol {
        OtlpProtocol::Grpc => {
            let mut b = SpanExporter::builder()
                .with_tonic()
                .with_timeout(cfg.timeout);
            if let Some(e) = base {
                b = b.with_endpoint(e);
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
            b.build()
        }
    }
    .map_err(|e| err("metrics", e))?;
    Ok((spans, metrics))
}

/// Stall records in, spans out: a stall's span is made when it ends, from when its poll began
/// to when it ended, with a `loopwatch.stall.detected` event at the moment it was reported
/// running.
#[derive(Default)]
struct StallSpans {
    ids: Option<RandomIdGenerator>,
    /// Running stalls by id: their latest record and when it was first reported.
    running: HashMap<u64, (Stall, SystemTime)>,
    batch: Vec<SpanData>,
}

impl StallSpans {
    fn add(&mut self, s: Stall) {
        match s.state {
            StallState::Running => {
                let detected = s.started_at + s.duration;
                if let Some((old, _)) = self.running.get_mut(&s.id) {
                    *old = s; // a later report of the same stall (its stack came in)
                } else if self.running.len() < MAX_RUNNING {
                    self.running.insert(s.id, (s, detected));
                }
            }
            _ => {
                let (prev, detected) = match self.running.remove(&s.id) {
                    Some((p, d)) => (Some(p), Some(d)),
                    None => (None, None),
                };
                let mut s = s;
                if s.stack.is_none() {
                    if let Some(p) = prev {
                        s.stack = p.stack;
                    }
                }
                let span = self.span(&s, detected);
                self.batch.push(span);
            }
        }
    }

    fn take(&mut self) -> Vec<SpanData> {
        std::mem::take(&mut self.batch)
    }

    /// The stalls still running, as spans ending now.
    fn running_now(&mut self) -> Vec<SpanData> {
        let open: Vec<_> = self.running.drain().map(|(_, v)| v).collect();
        let now = SystemTime::now();
        open.into_iter()
            .map(|(mut s, detected)| {
                s.duration = now.duration_since(s.started_at).unwrap_or(s.duration);
                self.span(&s, Some(detected))
            })
            .collect()
    }

    fn span(&mut self, s: &Stall, detected: Option<SystemTime>) -> SpanData {
        let ids = self.ids.get_or_insert_with(RandomIdGenerator::default);
        let ctx = SpanContext::new(
            ids.new_trace_id(),
            ids.new_span_id(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let state = match s.state {
            StallState::Running => "running",
            _ => "ended",
        };
        let mut attrs = vec![
            KeyValue::new("loopwatch.stall.id", s.id as i64),
            KeyValue::new("loopwatch.stall.state", state),
            KeyValue::new("loopwatch.layer", s.layer.as_str()),
            KeyValue::new(
                "loopwatch.stall.duration_ms",
                s.duration.as_secs_f64() * 1e3,
            ),
            KeyValue::new(
                "loopwatch.stall.threshold_ms",
                s.threshold.as_secs_f64() * 1e3,
            ),
            KeyValue::new("loopwatch.stall.exact_end", s.exact_end),
            KeyValue::new("loopwatch.task.kind", s.task_label().to_string()),
            KeyValue::new("loopwatch.cause", s.cause.kind()),
            KeyValue::new("loopwatch.worker.index", s.worker.index as i64),
            KeyValue::new("loopwatch.stack.status", s.stack_status.as_str()),
        ];
        if let crate::diagnose::Cause::Syscall(sc) = s.cause {
            attrs.push(KeyValue::new("loopwatch.cause.syscall", sc.to_string()));
        }
        if !s.cause_shares.is_empty() {
            let shares: Vec<String> = s
                .cause_shares
                .iter()
                .map(|c| format!("{}={:.2}", c.cause, c.share))
                .collect();
            attrs.push(KeyValue::new("loopwatch.cause.shares", shares.join(",")));
        }
        if let Some(h) = s.hint {
            attrs.push(KeyValue::new("loopwatch.hint", h));
        }
        if let Some(n) = &s.task.name {
            attrs.push(KeyValue::new("loopwatch.task.name", n.to_string()));
        }
        if let Some(id) = s.task.id {
            attrs.push(KeyValue::new("loopwatch.task.id", id as i64));
        }
        if let Some(site) = &s.task.site {
            attrs.push(KeyValue::new("loopwatch.task.site", site.to_string()));
            // Semantic conventions: where the task was spawned.
            let mut parts = site.rsplitn(3, ':');
            let (c, l, f) = (parts.next(), parts.next(), parts.next());
            match (
                f,
                l.and_then(|l| l.parse::<i64>().ok()),
                c.and_then(|c| c.parse::<i64>().ok()),
            ) {
                (Some(f), Some(l), Some(c)) => {
                    attrs.push(KeyValue::new("code.file.path", f.to_string()));
                    attrs.push(KeyValue::new("code.line.number", l));
                    attrs.push(KeyValue::new("code.column.number", c));
                }
                _ => {
                    // `file:line` (a span's declaration site).
                    if let Some((f, l)) = site.rsplit_once(':') {
                        if let Ok(l) = l.parse::<i64>() {
                            attrs.push(KeyValue::new("code.file.path", f.to_string()));
                            attrs.push(KeyValue::new("code.line.number", l));
                        }
                    }
                }
            }
        }
        if let Some(span) = &s.task.span {
            attrs.push(KeyValue::new("loopwatch.task.span", span.to_string()));
        }
        if let Some(t) = &s.worker.thread_name {
            attrs.push(KeyValue::new("thread.name", t.to_string()));
        }
        if let Some(tid) = s.worker.tid {
            attrs.push(KeyValue::new("thread.id", tid as i64));
        }
        if let Some(stack) = &s.stack {
            attrs.push(KeyValue::new("code.stacktrace", stack.to_string()));
            if let Some(f) = stack.frames.iter().find_map(|f| f.function.clone()) {
                attrs.push(KeyValue::new("code.function.name", f));
            }
        }
        if s.victims.tracked {
            let v = &s.victims;
            attrs.push(KeyValue::new("loopwatch.victims.count", v.count as i64));
            attrs.push(KeyValue::new(
                "loopwatch.victims.total_wait_ms",
                v.total_wait.as_secs_f64() * 1e3,
            ));
            attrs.push(KeyValue::new(
                "loopwatch.victims.worst_wait_ms",
                v.worst_wait.as_secs_f64() * 1e3,
            ));
            let kinds: Vec<String> = v
                .top_kinds
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            attrs.push(KeyValue::new("loopwatch.victims.kinds", kinds.join(",")));
        }
        let mut events = opentelemetry_sdk::trace::SpanEvents::default();
        if let Some(at) = detected {
            events.events.push(Event::new(
                "loopwatch.stall.detected",
                at,
                vec![KeyValue::new(
                    "loopwatch.stall.duration_ms",
                    at.duration_since(s.started_at)
                        .unwrap_or_default()
                        .as_secs_f64()
                        * 1e3,
                )],
                0,
            ));
        }
        SpanData {
            span_context: ctx,
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "loopwatch.stall".into(),
            start_time: s.started_at,
            end_time: s.started_at + s.duration,
            attributes: attrs,
            dropped_attributes_count: 0,
            events,
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: scope(),
        }
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("loopwatch")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// A `ManualReader` both the meter provider and the export loop can hold.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

enum Instrument {
    Counter(Counter<u64>),
    Gauge(Gauge<f64>),
    Histogram(Histogram<f64>),
}

/// Frames into OpenTelemetry instruments, named as in the metric table.
struct OtlpMetrics {
    reader: SharedReader,
    _provider: SdkMeterProvider,
    meter: Meter,
    instruments: HashMap<M, Instrument>,
    /// Counter totals already added (frames carry totals; OTel counters take increments).
    totals: HashMap<(M, Vec<SharedString>), u64>,
}

impl OtlpMetrics {
    fn new(resource: &Resource) -> OtlpMetrics {
        let reader = SharedReader(Arc::new(
            ManualReader::builder()
                .with_temporality(Temporality::Cumulative)
                .build(),
        ));
        let provider = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(reader.clone())
            .build();
        let meter = provider.meter_with_scope(scope());
        OtlpMetrics {
            reader,
            _provider: provider,
            meter,
            instruments: HashMap::new(),
            totals: HashMap::new(),
        }
    }

    fn apply(&mut self, frame: &Frame) {
        for p in &frame.points {
            let def = p.metric.def();
            let meter = &self.meter;
            let inst = self.instruments.entry(p.metric).or_insert_with(|| {
                let unit = def.unit.ucum();
                match def.kind {
                    MetricKind::Counter => Instrument::Counter(
                        meter
                            .u64_counter(def.name)
                            .with_unit(unit)
                            .with_description(def.help)
                            .build(),
                    ),
                    MetricKind::Gauge => Instrument::Gauge(
                        meter
                            .f64_gauge(def.name)
                            .with_unit(unit)
                            .with_description(def.help)
                            .build(),
                    ),
                    MetricKind::Histogram => Instrument::Histogram(
                        meter
                            .f64_histogram(def.name)
                            .with_unit(unit)
                            .with_description(def.help)
                            .with_boundaries(DURATION_BUCKETS.to_vec())
                            .build(),
                    ),
                }
            });
            let attrs: Vec<KeyValue> = def
                .labels
                .iter()
                .zip(&p.labels)
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| KeyValue::new(*k, v.to_string()))
                .collect();
            match (inst, &p.value) {
                (Instrument::Counter(c), Value::Counter(total)) => {
                    let seen = self.totals.entry((p.metric, p.labels.clone())).or_insert(0);
                    let delta = total.saturating_sub(*seen);
                    *seen = (*seen).max(*total);
                    if delta > 0 || *total == 0 {
                        c.add(delta, &attrs);
                    }
                }
                (Instrument::Gauge(g), Value::Gauge(v)) => g.record(*v, &attrs),
                (Instrument::Histogram(h), Value::Samples(vs)) => {
                    for &v in vs {
                        h.record(v, &attrs);
                    }
                }
                _ => debug_assert!(false, "{:?} has the wrong value kind", p.metric),
            }
        }
    }
}
