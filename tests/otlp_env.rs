//! The OpenTelemetry environment variables: `OTEL_EXPORTER_OTLP_ENDPOINT` turns the export on,
//! `OTEL_EXPORTER_OTLP_PROTOCOL` picks the transport, `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` make the resource; `OTEL_SDK_DISABLED` and `LOOPWATCH_OTLP=0`
//! turn it off; a value loopwatch cannot use (a protocol it does not speak, a timeout with a
//! unit, an https endpoint) is warned about, never an error. (One test: the environment is
//! process-wide.)
#![cfg(feature = "otlp")]

mod common;
mod receiver;

use std::time::Duration;

use receiver::{attr, resource_attr, Receiver, Transport};

const VARS: [&str; 8] = [
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SDK_DISABLED",
    "LOOPWATCH_OTLP",
];

#[test]
fn otel_variables_are_honoured() {
    for v in VARS {
        std::env::remove_var(v);
    }
    std::env::set_var("LOOPWATCH_PROMETHEUS_ADDR", "off");
    // Nothing set: no OTLP.
    assert!(loopwatch::builder().config().unwrap().otlp.is_none());

    let rx = Receiver::start(Transport::Http);
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint());
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
    std::env::set_var("OTEL_SERVICE_NAME", "checkout");
    std::env::set_var(
        "OTEL_RESOURCE_ATTRIBUTES",
        "deployment.environment=test,team=payments",
    );

    // Off switches first.
    std::env::set_var("OTEL_SDK_DISABLED", "true");
    assert!(loopwatch::builder().config().unwrap().otlp.is_none());
    std::env::remove_var("OTEL_SDK_DISABLED");
    std::env::set_var("LOOPWATCH_OTLP", "0");
    assert!(loopwatch::builder().config().unwrap().otlp.is_none());
    std::env::remove_var("LOOPWATCH_OTLP");
    // A value loopwatch cannot use is warned about and its default used, as the OpenTelemetry
    // specification asks: it never stops the service from starting.
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json");
    std::env::set_var("OTEL_EXPORTER_OTLP_TIMEOUT", "10s");
    let cfg = loopwatch::builder()
        .config()
        .expect("a bad OTEL_* value is no error");
    let otlp = cfg.otlp.expect("still on");
    assert_eq!(otlp.protocol, loopwatch::OtlpProtocol::Grpc);
    assert_eq!(otlp.timeout, loopwatch::DEFAULT_OTLP_TIMEOUT);
    let (_layer, guard) = loopwatch::builder().build().expect("starts");
    let warnings = guard.snapshot().env_warnings;
    assert!(
        warnings.iter().any(|w| w.contains("http/json"))
            && warnings.iter().any(|w| w.contains("10s")),
        "{warnings:?}"
    );
    drop(guard);
    // And with loopwatch's OTLP off, the SDK's variables are not even looked at.
    std::env::set_var("LOOPWATCH_OTLP", "0");
    let (_layer, guard) = loopwatch::builder().build().expect("starts");
    assert!(guard.snapshot().env_warnings.is_empty());
    drop(guard);
    std::env::remove_var("LOOPWATCH_OTLP");
    std::env::remove_var("OTEL_EXPORTER_OTLP_TIMEOUT");
    // An https endpoint (every hosted backend; often injected into every pod for the
    // application's own SDK).
    https_from_the_environment();
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint());
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");

    let (_layer, guard) = loopwatch::builder()
        .threshold(Duration::from_millis(20))
        .export_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let otlp = guard
        .config()
        .otlp
        .clone()
        .expect("the endpoint turned OTLP on");
    assert_eq!(otlp.protocol, loopwatch::OtlpProtocol::HttpProtobuf);
    assert_eq!(
        otlp.endpoint, None,
        "the exporter reads the variable itself"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(guard.watch("env-hog", async {
        common::spin_for(Duration::from_millis(80))
    }));
    // The receiver speaks only HTTP/protobuf: a span there is the variables at work.
    rx.wait("the stall span", Duration::from_secs(15), |r| {
        !r.spans.is_empty()
    });
    let (resource, span) = rx.with(|r| r.spans[0].clone());
    assert_eq!(
        attr(&span.attributes, "loopwatch.task.kind").as_deref(),
        Some("env-hog")
    );
    assert_eq!(
        resource_attr(&resource, "service.name").as_deref(),
        Some("checkout")
    );
    assert_eq!(
        resource_attr(&resource, "deployment.environment").as_deref(),
        Some("test")
    );
    assert_eq!(
        resource_attr(&resource, "team").as_deref(),
        Some("payments")
    );
    rx.wait("metrics", Duration::from_secs(15), |r| {
        r.metrics.iter().any(|(res, m)| {
            m.name == "loopwatch_polls_total"
                && resource_attr(res, "service.name").as_deref() == Some("checkout")
        })
    });
    for v in VARS {
        std::env::remove_var(v);
    }
    std::env::remove_var("LOOPWATCH_PROMETHEUS_ADDR");
}

/// Without the `otlp-tls` feature, loopwatch's OTLP is off, and it says so.
#[cfg(not(feature = "otlp-tls"))]
fn https_from_the_environment() {
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "https://otlp.example.com:443",
    );
    let (_layer, guard) = loopwatch::builder()
        .build()
        .expect("an https endpoint is no error");
    assert!(guard.config().otlp.is_none());
    let warnings = guard.snapshot().env_warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("needs TLS") && w.contains("otlp-tls")),
        "{warnings:?}"
    );
}

/// With it, the export goes over TLS, trusting the CA in `OTEL_EXPORTER_OTLP_CERTIFICATE`; a
/// certificate file that cannot be read is warned about, never an error.
#[cfg(feature = "otlp-tls")]
fn https_from_the_environment() {
    let ca = receiver::tls::TestCa::new();
    let rx = Receiver::start(Transport::HttpTls(ca.clone()));
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint());
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
    std::env::set_var("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem");
    let cfg = loopwatch::builder()
        .config()
        .expect("a bad CA file is no error");
    assert!(cfg.otlp.is_some_and(|o| o.ca_certificate_pem.is_none()));
    let (_layer, guard) = loopwatch::builder().build().expect("starts");
    let warnings = guard.snapshot().env_warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("OTEL_EXPORTER_OTLP_CERTIFICATE") && w.contains("cannot open")),
        "{warnings:?}"
    );
    drop(guard);
    let ca_file = ca.ca_file("env");
    std::env::set_var("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca_file);
    let (_layer, guard) = loopwatch::builder()
        .threshold(Duration::from_millis(20))
        .export_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    assert!(guard.snapshot().env_warnings.is_empty());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(guard.watch("https-env-hog", async {
        common::spin_for(Duration::from_millis(60))
    }));
    rx.wait("the stall span over TLS", Duration::from_secs(15), |r| {
        r.spans.iter().any(|(_, s)| {
            attr(&s.attributes, "loopwatch.task.kind").as_deref() == Some("https-env-hog")
        })
    });
    drop(guard);
    std::env::remove_var("OTEL_EXPORTER_OTLP_CERTIFICATE");
    let _ = std::fs::remove_file(ca_file);
}
