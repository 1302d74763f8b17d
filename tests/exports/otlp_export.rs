//! The OTLP export against a real receiver (opentelemetry-proto's generated gRPC services, and
//! an HTTP/protobuf endpoint): each ended stall is a span from when its poll began to when it
//! ended, with its attributes; the metrics arrive as OTLP metrics with the table's names and
//! explicit buckets.
#![cfg(feature = "otlp")]

use crate::common;
use crate::receiver;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use receiver::{attr, resource_attr, Receiver, Transport};

const THRESHOLD: Duration = Duration::from_millis(20);
const STALL: Duration = Duration::from_millis(150);

/// The threshold, no stacks, no Prometheus listener, OTLP to `rx`.
fn otlp_only(rx: &Receiver) -> loopwatch::Builder {
    loopwatch::builder()
        .threshold(THRESHOLD)
        .stacks(false)
        .metrics(loopwatch::MetricsExport::Off)
        .otlp_endpoint(rx.endpoint())
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// `locations`: frames with `file:line` (`stack_locations`), else names alone.
fn stall_is_exported(transport: Transport, protocol: loopwatch::OtlpProtocol, locations: bool) {
    let rx = Receiver::start(transport);
    let h = common::harness(
        loopwatch::builder()
            .threshold(THRESHOLD)
            .stack_locations(locations)
            .metrics(loopwatch::MetricsExport::Off)
            .export_interval(Duration::from_millis(200))
            .otlp_endpoint(rx.endpoint())
            .otlp_protocol(protocol),
    );
    assert!(h.guard.config().otlp.is_some());
    let rt = h.runtime(1);
    let before = SystemTime::now();
    rt.block_on(h.guard.watch("hog", async { common::spin_for(STALL) }));
    let after = SystemTime::now();

    rx.wait("the stall span", Duration::from_secs(15), |r| {
        r.spans.iter().any(|(_, s)| s.name == "loopwatch.stall")
    });
    let (resource, span) = rx.with(|r| r.spans[0].clone());
    let a = &span.attributes;
    assert_eq!(
        attr(a, "loopwatch.task.kind").as_deref(),
        Some("hog"),
        "{a:#?}"
    );
    assert_eq!(attr(a, "loopwatch.task.name").as_deref(), Some("hog"));
    assert_eq!(attr(a, "loopwatch.layer").as_deref(), Some("async"));
    assert_eq!(attr(a, "loopwatch.stall.state").as_deref(), Some("ended"));
    assert!(attr(a, "loopwatch.cause").is_some());
    assert!(attr(a, "loopwatch.worker.index").is_some());
    assert!(attr(a, "thread.name").is_some());
    // Where it was spawned, apart from the code that stalled.
    assert!(
        attr(a, "loopwatch.task.site").is_some_and(|f| f.contains("otlp_export.rs:")),
        "{a:#?}"
    );
    // The code that stalled (where its frames came in): the top frame of this crate's code,
    // all three `code.*` attributes from it.
    if let Some(f) = attr(a, "code.function.name") {
        assert_eq!(f, "exports::common::spin_for", "{a:#?}");
        if locations {
            assert!(
                attr(a, "code.file.path").is_some_and(|p| p.ends_with("common/mod.rs")),
                "{a:#?}"
            );
            assert!(attr(a, "code.line.number").is_some(), "{a:#?}");
        } else {
            // Names alone: no file, and never the spawn site in its place.
            assert_eq!(attr(a, "code.file.path"), None, "{a:#?}");
            assert_eq!(attr(a, "code.line.number"), None, "{a:#?}");
        }
    }
    assert!(attr(a, "loopwatch.stack.status").is_some());
    // Timing: the span covers the poll (start within a tick or so of when it began).
    let (start, end) = (span.start_time_unix_nano, span.end_time_unix_nano);
    assert!(start >= nanos(before) - 10_000_000 && end <= nanos(after) + 10_000_000);
    let length = Duration::from_nanos(end - start);
    assert!(length >= STALL - Duration::from_millis(10), "{length:?}");
    let dur_ms: f64 = attr(a, "loopwatch.stall.duration_ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (dur_ms - length.as_secs_f64() * 1e3).abs() < 1.0,
        "{dur_ms} vs {length:?}"
    );
    // The moment it was detected, while it ran, is an event on the span.
    let ev = span
        .events
        .iter()
        .find(|e| e.name == "loopwatch.stall.detected")
        .expect("a detection event");
    assert!(
        ev.time_unix_nano > start && ev.time_unix_nano < end,
        "{ev:?}"
    );
    assert!(ev.time_unix_nano - start >= THRESHOLD.as_nanos() as u64);
    assert!(resource_attr(&resource, "service.name").is_some());

    // Metrics: the same names as the Prometheus table.
    rx.wait("the stall metrics", Duration::from_secs(15), |r| {
        r.metrics.iter().any(|(_, m)| {
            m.name == "loopwatch_stall_duration_seconds"
                && matches!(&m.data, Some(Data::Histogram(h)) if h.data_points.iter().any(|p| p.count >= 1))
        })
    });
    rx.with(|r| {
        let hist = r
            .metrics
            .iter()
            .rev()
            .find(|(_, m)| m.name == "loopwatch_stall_duration_seconds")
            .unwrap();
        let Some(Data::Histogram(hd)) = &hist.1.data else {
            unreachable!()
        };
        let p = &hd.data_points[0];
        assert_eq!(p.explicit_bounds, loopwatch::DURATION_BUCKETS.to_vec());
        assert_eq!(attr(&p.attributes, "kind").as_deref(), Some("hog"));
        assert_eq!(hist.1.unit, "s");
        let stalls = r
            .metrics
            .iter()
            .rev()
            .find(|(_, m)| m.name == "loopwatch_stalls_total")
            .expect("stalls_total");
        let Some(Data::Sum(sum)) = &stalls.1.data else {
            panic!("{stalls:?}")
        };
        assert!(sum.is_monotonic);
        let hog = sum
            .data_points
            .iter()
            .find(|p| attr(&p.attributes, "kind").as_deref() == Some("hog"))
            .expect("a point for the hog");
        assert!(matches!(
            hog.value,
            Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(1))
        ));
        assert!(r
            .metrics
            .iter()
            .any(|(_, m)| m.name == "loopwatch_stalls_in_progress"));
    });
    // The exporter counts a send once the collector has answered, a moment after the
    // receiver saw it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let o = h.guard.snapshot().otlp;
        if o.spans_exported >= 1 && o.metric_exports >= 1 {
            assert_eq!(o.spans_dropped, 0, "{o:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{o:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn grpc_receives_stall_spans_and_metrics() {
    let _serial = common::serial();
    stall_is_exported(Transport::Grpc, loopwatch::OtlpProtocol::Grpc, true);
}

#[test]
fn http_protobuf_receives_stall_spans_and_metrics() {
    let _serial = common::serial();
    stall_is_exported(
        Transport::Http,
        loopwatch::OtlpProtocol::HttpProtobuf,
        false,
    );
}

/// Short polls asleep in `clock_nanosleep` (none a stall): their sampled time arrives as a
/// monotonic sum of doubles in seconds, by kind and call.
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
#[test]
fn sampled_time_in_short_polls_is_a_sum_of_seconds() {
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value;
    let _serial = common::serial();
    let rx = Receiver::start(Transport::Grpc);
    let h = common::harness(otlp_only(&rx).export_interval(Duration::from_millis(200)));
    let rt = h.runtime(1);
    let started = std::time::Instant::now();
    rt.block_on(async {
        for _ in 0..200 {
            h.guard
                .watch("napper", async {
                    std::thread::sleep(Duration::from_millis(5));
                })
                .await;
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let asleep = |m: &opentelemetry_proto::tonic::metrics::v1::Metric| -> Option<(f64, bool)> {
        let Some(Data::Sum(sum)) = &m.data else {
            return None;
        };
        let p = sum.data_points.iter().find(|p| {
            attr(&p.attributes, "kind").as_deref() == Some("napper")
                && attr(&p.attributes, "syscall").as_deref() == Some("clock_nanosleep")
        })?;
        match p.value {
            Some(Value::AsDouble(v)) => Some((v, sum.is_monotonic)),
            _ => panic!("not a double: {p:?}"),
        }
    };
    let total = h.guard.snapshot().time_in_polls;
    rx.wait("the blocked seconds", Duration::from_secs(15), |r| {
        r.metrics
            .iter()
            .any(|(_, m)| m.name == "loopwatch_blocked_seconds_total" && asleep(m).is_some())
    });
    rx.with(|r| {
        let (_, m) = r
            .metrics
            .iter()
            .rev()
            .find(|(_, m)| m.name == "loopwatch_blocked_seconds_total")
            .unwrap();
        assert_eq!(m.unit, "s");
        let (v, monotonic) = asleep(m).expect("a point for the napper");
        assert!(monotonic);
        assert!(v > 0.0 && v <= elapsed, "{v} s of {elapsed} s: {total:#?}");
    });
}

#[test]
fn a_bad_endpoint_is_a_named_error() {
    let _serial = common::serial();
    let err = loopwatch::builder()
        .ignore_env()
        .metrics(loopwatch::MetricsExport::Off)
        .otlp_endpoint("not a uri at all")
        .otlp_protocol(loopwatch::OtlpProtocol::HttpProtobuf)
        .build()
        .expect_err("the endpoint is not a URI");
    assert!(matches!(err, loopwatch::Error::Otlp { .. }), "{err:?}");
    assert!(err.to_string().contains("OTLP"), "{err}");
}

#[test]
fn a_stall_still_running_at_shutdown_goes_out_as_running() {
    let _serial = common::serial();
    let rx = Receiver::start(Transport::Grpc);
    let h = common::harness(otlp_only(&rx));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let rt = h.runtime(1);
    let stuck = h.guard.watch("stuck", async move {
        common::spin_until(&stop2, Duration::from_secs(30))
    });
    let job = std::thread::spawn(move || rt.block_on(stuck));
    assert!(h.wait_running(Duration::from_secs(10)).is_some());
    drop(h); // the guard goes while the poll still runs
    rx.wait("the running stall's span", Duration::from_secs(10), |r| {
        !r.spans.is_empty()
    });
    stop.store(true, std::sync::atomic::Ordering::Release);
    job.join().unwrap();
    let span = rx.with(|r| r.spans[0].1.clone());
    assert_eq!(
        attr(&span.attributes, "loopwatch.stall.state").as_deref(),
        Some("running")
    );
    assert_eq!(
        attr(&span.attributes, "loopwatch.task.kind").as_deref(),
        Some("stuck")
    );
    assert!(span.end_time_unix_nano - span.start_time_unix_nano >= THRESHOLD.as_nanos() as u64);
}
