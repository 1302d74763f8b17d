//! The `metrics` sink: frames recorded through the `metrics` facade, into loopwatch's own
//! Prometheus recorder (served by its listener) or into the application's global recorder.

use std::collections::HashMap;
use std::net::SocketAddr;

use metrics::{Counter, Gauge, Histogram, Label, SharedString, Unit};

use super::frame::{Frame, Value};
use super::table::{MetricKind, MetricUnit, M, METRICS};
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
    pub(crate) fn start(prometheus_addr: Option<SocketAddr>) -> Result<MetricsSink, Error> {
        #[cfg(feature = "prometheus")]
        {
            let own = match prometheus_addr {
                Some(addr) => Some(prometheus(addr)?),
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
                    MetricKind::Counter => Handle::Counter(metrics::counter!(def.name, labels)),
                    MetricKind::Gauge => Handle::Gauge(metrics::gauge!(def.name, labels)),
                    MetricKind::Histogram => {
                        Handle::Histogram(metrics::histogram!(def.name, labels))
                    }
                }
            });
            match (handle, &p.value) {
                (Handle::Counter(c), Value::Counter(v)) => c.absolute(*v),
                (Handle::Gauge(g), Value::Gauge(v)) => g.set(*v),
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
/// listener spawned on the current runtime.
#[cfg(feature = "prometheus")]
fn prometheus(addr: SocketAddr) -> Result<metrics_exporter_prometheus::PrometheusRecorder, Error> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

    let mut b = PrometheusBuilder::new().with_http_listener(addr);
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
    let (recorder, server) = b.build().map_err(|e| Error::PrometheusListener {
        addr,
        source: std::io::Error::other(e.to_string()),
    })?;
    tokio::spawn(async move {
        // Ends only if the listener fails; scrapes then get "connection refused", and the
        // in-process snapshot still works.
        let _ = server.await;
    });
    Ok(recorder)
}
