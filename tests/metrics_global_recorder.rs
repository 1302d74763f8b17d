//! `MetricsExport::GlobalRecorder`: an application that already has a `metrics` recorder gets
//! loopwatch's metrics in it (here the application's own Prometheus recorder).
#![cfg(feature = "prometheus")]

mod common;

use std::time::{Duration, Instant};

#[test]
fn metrics_go_to_the_applications_recorder() {
    let app = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the application's recorder installs");
    metrics::counter!("app_requests_total").increment(3);
    let h = common::harness(
        loopwatch::builder()
            .threshold(Duration::from_millis(20))
            .stacks(false)
            .metrics(loopwatch::MetricsExport::GlobalRecorder)
            .export_interval(Duration::from_millis(100)),
    );
    assert_eq!(
        h.guard.prometheus_addr(),
        None,
        "no listener of loopwatch's own"
    );
    let rt = h.runtime(1);
    rt.block_on(
        h.guard
            .watch("hog", async { common::spin_for(Duration::from_millis(60)) }),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = app.render();
        if !common::series(&body, "loopwatch_stalls_total").is_empty() {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no loopwatch metrics in:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(body.contains("app_requests_total 3"), "{body}");
    assert!(
        common::series(&body, "loopwatch_stalls_total")[0].contains(r#"kind="hog""#),
        "{body}"
    );
    assert!(body.contains("# HELP loopwatch_polls_total "), "{body}");
}
