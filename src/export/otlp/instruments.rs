//! OTLP metrics: each frame's points into OpenTelemetry instruments named as in the metric
//! table, collected by a manual reader that the export loop drives on its own runtime.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use metrics::SharedString;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, MeterProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};
use opentelemetry_sdk::Resource;

use crate::export::frame::{Frame, Value};
use crate::export::table::{MetricKind, DURATION_BUCKETS, M};

/// A `ManualReader` both the meter provider and the export loop can hold.
#[derive(Debug, Clone)]
pub(crate) struct SharedReader(pub(crate) Arc<ManualReader>);

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
    /// A counter of seconds.
    Seconds(Counter<f64>),
    Gauge(Gauge<f64>),
    Histogram(Histogram<f64>),
}

/// Frames into OpenTelemetry instruments, named as in the metric table.
pub(crate) struct OtlpMetrics {
    pub(crate) reader: SharedReader,
    _provider: SdkMeterProvider,
    meter: Meter,
    instruments: HashMap<M, Instrument>,
    /// Counter totals already added (frames carry totals; OTel counters take increments).
    totals: HashMap<(M, Vec<SharedString>), u64>,
    /// The same for counters of seconds.
    seconds: HashMap<(M, Vec<SharedString>), f64>,
}

impl OtlpMetrics {
    pub(crate) fn new(resource: &Resource, scope: InstrumentationScope) -> OtlpMetrics {
        let reader = SharedReader(Arc::new(
            ManualReader::builder()
                .with_temporality(Temporality::Cumulative)
                .build(),
        ));
        let provider = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(reader.clone())
            .build();
        let meter = provider.meter_with_scope(scope);
        OtlpMetrics {
            reader,
            _provider: provider,
            meter,
            instruments: HashMap::new(),
            totals: HashMap::new(),
            seconds: HashMap::new(),
        }
    }

    /// Records a frame: counters by their increase since the last frame, gauges as they are,
    /// histogram samples one by one.
    pub(crate) fn apply(&mut self, frame: &Frame) {
        for p in &frame.points {
            let def = p.metric.def();
            let meter = &self.meter;
            let inst = self.instruments.entry(p.metric).or_insert_with(|| {
                let unit = def.unit.ucum();
                match def.kind {
                    MetricKind::Counter if def.is_float_counter() => Instrument::Seconds(
                        meter
                            .f64_counter(def.name)
                            .with_unit(unit)
                            .with_description(def.help)
                            .build(),
                    ),
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
                (Instrument::Seconds(c), Value::Seconds(total)) => {
                    let seen = self
                        .seconds
                        .entry((p.metric, p.labels.clone()))
                        .or_insert(0.0);
                    let delta = (total - *seen).max(0.0);
                    *seen = seen.max(*total);
                    if delta > 0.0 || *total == 0.0 {
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
