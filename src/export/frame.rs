//! A frame: every metric's value at one moment, built by the export thread and handed to each
//! sink (the `metrics` facade, OTLP).

use metrics::SharedString;

use super::table::M;

/// One metric's value for one label set.
#[derive(Debug, Clone)]
pub(crate) struct Point {
    pub(crate) metric: M,
    /// Values of the metric's labels, in the table's order.
    pub(crate) labels: Vec<SharedString>,
    pub(crate) value: Value,
}

#[derive(Debug, Clone)]
pub(crate) enum Value {
    /// A counter's total so far.
    Counter(u64),
    /// A counter of seconds' total so far ([`MetricDef::is_float_counter`](super::table::MetricDef::is_float_counter)).
    Seconds(f64),
    Gauge(f64),
    /// Values (seconds) recorded since the previous frame.
    Samples(Vec<f64>),
}

/// Everything exported at one moment.
#[derive(Debug, Default)]
pub(crate) struct Frame {
    pub(crate) points: Vec<Point>,
}

impl Frame {
    pub(crate) fn push(&mut self, metric: M, labels: Vec<SharedString>, value: Value) {
        debug_assert_eq!(labels.len(), metric.def().labels.len(), "{metric:?}");
        self.points.push(Point {
            metric,
            labels,
            value,
        });
    }

    pub(crate) fn counter(&mut self, metric: M, v: u64) {
        self.push(metric, Vec::new(), Value::Counter(v));
    }
}
