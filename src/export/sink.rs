//! The `metrics` sink: frames recorded through the `metrics` facade, into loopwatch's own
//! Prometheus recorder (served by its listener) or into the application's global recorder.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Label, SharedString, Unit};

use super::frame::{Frame, Value};
use super::table::{MetricKind, MetricUnit, M, METRICS};
use crate::shared::Shared;
use crate::Error;

/// Records frames through the `metrics` facade.
pub(crate) struct MetricsSink {
    /// loopwatch's own recorder; `None` records into the global recorder.
    #[cfg(feature = "prometheus")]
    own: Option<metrics_exporter_prometheus::PrometheusRecorder>,
    described: bool,
    handles: HashMap<(M, Vec<SharedString>), Handle>,
}

enum Handle {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

impl MetricsSink {
    /// Starts the sink; with an address, builds loopwatch's Prometheus recorder and spawns its
    /// HTTP listener on the current (loopwatch's own) runtime.
    pub(crate) fn start(
        prometheus_addr: Option<SocketAddr>,
        shared: &Arc<Shared>,
    ) -> Result<MetricsSink, Error> {
        #[cfg(feature = "prometheus")]
        {
            let own = match prometheus_addr {
                Some(addr) => Some(prometheus(addr, shared)?),
                None => None,
            };
            Ok(MetricsSink {
                own,
                described: false,
                handles: HashMap::new(),
            })
        }
        #[cfg(not(feature = "prometheus"))]
        {
            // Config validation refuses a Prometheus address without the feature.
            debug_assert!(prometheus_addr.is_none());
            let _ = shared;
            Ok(MetricsSink {
                described: false,
                handles: HashMap::new(),
            })
        }
    }

    pub(crate) fn apply(&mut self, frame: &Frame) {
        #[cfg(feature = "prometheus")]
        if let Some(own) = self.own.take() {
            metrics::with_local_recorder(&own, || self.record(frame));
            // Folds the histograms' new values into their buckets (a listener of the exporter
            // crate's own would do it on a timer): memory stays flat between scrapes.
            own.handle().run_upkeep();
            self.own = Some(own);
            return;
        }
        self.record(frame);
    }

    fn record(&mut self, frame: &Frame) {
        if !self.described {
            self.described = true;
            for m in METRICS {
                let unit = match m.unit {
                    MetricUnit::Seconds => Some(Unit::Seconds),
                    MetricUnit::Count => Some(Unit::Count),
                    MetricUnit::Ratio => None,
                };
                let name = m.name;
                match m.kind {
                    // No fractions in the facade's counters (see `MetricKind::Counter`).
                    MetricKind::Counter if m.is_float_counter() => metrics::with_recorder(|r| {
                        r.describe_gauge(name.into(), unit, m.help.into())
                    }),
                    MetricKind::Counter => metrics::with_recorder(|r| {
                        r.describe_counter(name.into(), unit, m.help.into())
                    }),
                    MetricKind::Gauge => metrics::with_recorder(|r| {
                        r.describe_gauge(name.into(), unit, m.help.into())
                    }),
                    MetricKind::Histogram => metrics::with_recorder(|r| {
                        r.describe_histogram(name.into(), unit, m.help.into())
                    }),
                }
            }
        }
        for p in &frame.points {
            let key = (p.metric, p.labels.clone());
            let handle = self.handles.entry(key).or_insert_with(|| {
                let def = p.metric.def();
                let labels: Vec<Label> = def
                    .labels
                    .iter()
                    .zip(&p.labels)
                    .map(|(k, v)| Label::new(*k, v.clone()))
                    .collect();
                match def.kind {
                    MetricKind::Counter if def.is_float_counter() => {
                        Handle::Gauge(metrics::gauge!(def.name, labels))
                    }
                    MetricKind::Counter => Handle::Counter(metrics::counter!(def.name, labels)),
                    MetricKind::Gauge => Handle::Gauge(metrics::gauge!(def.name, labels)),
                    MetricKind::Histogram => {
                        Handle::Histogram(metrics::histogram!(def.name, labels))
                    }
                }
            });
            match (handle, &p.value) {
                (Handle::Counter(c), Value::Counter(v)) => c.absolute(*v),
                (Handle::Gauge(g), Value::Gauge(v) | Value::Seconds(v)) => g.set(*v),
                (Handle::Histogram(h), Value::Samples(vs)) => {
                    for &v in vs {
                        h.record(v);
                    }
                }
                _ => debug_assert!(false, "{:?} has the wrong value kind", p.metric),
            }
        }
    }
}

/// loopwatch's Prometheus recorder, with explicit buckets for every histogram, and its HTTP
/// listener (loopwatch's own, bounded: `listener.rs`) spawned on the current runtime.
#[cfg(feature = "prometheus")]
fn prometheus(
    addr: SocketAddr,
    shared: &Arc<Shared>,
) -> Result<metrics_exporter_prometheus::PrometheusRecorder, Error> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

    let mut b = PrometheusBuilder::new();
    for m in METRICS.iter().filter(|m| m.kind == MetricKind::Histogram) {
        b = b
            .set_buckets_for_metric(
                Matcher::Full(m.name.into()),
                &super::table::DURATION_BUCKETS,
            )
            .map_err(|e| Error::PrometheusListener {
                addr,
                source: std::io::Error::other(e.to_string()),
            })?;
    }
    let bound = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|source| Error::PrometheusListener { addr, source })?;
    let recorder = b.build_recorder();
    tokio::spawn(super::listener::serve(
        bound,
        recorder.handle(),
        shared.clone(),
    ));
    Ok(recorder)
}
