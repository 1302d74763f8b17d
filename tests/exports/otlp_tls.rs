//! OTLP to an `https://` collector (feature `otlp-tls`): over gRPC and over HTTP/protobuf, TLS
//! with a private CA given to `Builder::otlp_ca_certificate`; a collector whose certificate is
//! not trusted gets nothing (the handshake fails, the export errors are counted, the service
//! goes on).
#![cfg(feature = "otlp-tls")]

use crate::common;
use crate::receiver;

use std::time::Duration;

use receiver::tls::TestCa;
use receiver::{attr, Receiver, Transport};

const THRESHOLD: Duration = Duration::from_millis(20);

fn exported_over_tls(protocol: loopwatch::OtlpProtocol) {
    let ca = TestCa::new();
    let transport = match protocol {
        loopwatch::OtlpProtocol::Grpc => Transport::GrpcTls(ca.clone()),
        _ => Transport::HttpTls(ca.clone()),
    };
    let rx = Receiver::start(transport);
    assert!(rx.endpoint().starts_with("https://"));
    let ca_file = ca.ca_file(&format!("{protocol:?}"));
    let h = common::harness(
        loopwatch::builder()
            .threshold(THRESHOLD)
            .metrics(loopwatch::MetricsExport::Off)
            .export_interval(Duration::from_millis(200))
            .otlp_endpoint(rx.endpoint())
            .otlp_protocol(protocol)
            .otlp_ca_certificate(&ca_file),
    );
    let rt = h.runtime(1);
    rt.block_on(h.guard.watch("tls-hog", async {
        common::spin_for(Duration::from_millis(80))
    }));
    rx.wait("the stall span over TLS", Duration::from_secs(15), |r| {
        r.spans.iter().any(|(_, s)| s.name == "loopwatch.stall")
    });
    rx.wait("metrics over TLS", Duration::from_secs(15), |r| {
        r.metrics
            .iter()
            .any(|(_, m)| m.name == "loopwatch_polls_total")
    });
    let kind = rx.with(|r| attr(&r.spans[0].1.attributes, "loopwatch.task.kind"));
    assert_eq!(kind.as_deref(), Some("tls-hog"));
    let otlp = h.guard.snapshot().otlp;
    assert_eq!(otlp.span_export_errors, 0, "{otlp:?}");
    let _ = std::fs::remove_file(ca_file);
}

#[test]
fn grpc_over_tls_with_a_private_ca() {
    let _serial = common::serial();
    exported_over_tls(loopwatch::OtlpProtocol::Grpc);
}

#[test]
fn http_protobuf_over_tls_with_a_private_ca() {
    let _serial = common::serial();
    exported_over_tls(loopwatch::OtlpProtocol::HttpProtobuf);
}

#[test]
fn an_untrusted_collector_gets_nothing_and_the_errors_are_counted() {
    let _serial = common::serial();
    // Its certificate chains to a CA nobody gave loopwatch (not a public root either).
    let rx = Receiver::start(Transport::HttpTls(TestCa::new()));
    let h = common::harness(
        loopwatch::builder()
            .threshold(THRESHOLD)
            .metrics(loopwatch::MetricsExport::Off)
            .export_interval(Duration::from_millis(200))
            .otlp_endpoint(rx.endpoint())
            .otlp_protocol(loopwatch::OtlpProtocol::HttpProtobuf)
            .otlp_timeout(Duration::from_secs(2)),
    );
    let rt = h.runtime(1);
    let out = rt.block_on(h.guard.watch("untrusted", async {
        common::spin_for(Duration::from_millis(60));
        7
    }));
    assert_eq!(out, 7, "the watched code is untouched");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let otlp = h.guard.snapshot().otlp;
        if otlp.span_export_errors >= 1 && otlp.metric_export_errors >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no export error counted: {otlp:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    rx.with(|r| {
        assert!(r.tls_refused >= 1, "the handshake was refused: {r:?}");
        assert!(r.spans.is_empty() && r.metrics.is_empty(), "{r:?}");
    });
}

#[test]
fn a_ca_file_that_cannot_be_used_is_a_named_error() {
    let _serial = common::serial();
    let missing = std::env::temp_dir().join("loopwatch-no-such-ca.pem");
    let err = loopwatch::builder()
        .otlp_endpoint("https://127.0.0.1:4317")
        .otlp_ca_certificate(&missing)
        .config()
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("otlp_ca_certificate") && text.contains("cannot open"),
        "{text}"
    );
    let not_pem =
        std::env::temp_dir().join(format!("loopwatch-not-pem-{}.pem", std::process::id()));
    std::fs::write(&not_pem, "just text\n").unwrap();
    let err = loopwatch::builder()
        .otlp_endpoint("https://127.0.0.1:4317")
        .otlp_ca_certificate(&not_pem)
        .config()
        .unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
    let _ = std::fs::remove_file(not_pem);
}
