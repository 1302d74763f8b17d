//! The OpenTelemetry environment variables: `OTEL_EXPORTER_OTLP_ENDPOINT` turns the export on,
//! `OTEL_EXPORTER_OTLP_PROTOCOL` picks the transport, `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` make the resource; `OTEL_SDK_DISABLED` and `LOOPWATCH_OTLP=0`
//! turn it off; a protocol loopwatch does not speak is a named error. (One test: the
//! environment is process-wide.)
#![cfg(feature = "otlp")]

mod common;
mod receiver;

use std::time::Duration;

use receiver::{attr, resource_attr, Receiver, Transport};

const VARS: [&str; 6] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
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
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json");
    let err = loopwatch::builder().config().unwrap_err();
    assert!(
        matches!(&err, loopwatch::Error::InvalidEnv { var: "OTEL_EXPORTER_OTLP_PROTOCOL", reason, .. } if reason.contains("http/protobuf")),
        "{err:?}"
    );
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
