//! A stall is reported as a WARN event with target `loopwatch` and all of the stall's fields,
//! to the subscriber the layer was added to; those events never feed back into the probes.

use crate::common;

use std::time::Duration;

use common::Captured;
use tracing::{Dispatch, Level};
use tracing_subscriber::prelude::*;

/// A one-worker runtime whose threads send their events to `dispatch`.
fn runtime_under(dispatch: &Dispatch) -> tokio::runtime::Runtime {
    let d = dispatch.clone();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || std::mem::forget(tracing::dispatcher::set_default(&d)))
        .build()
        .unwrap()
}

#[test]
fn stalls_become_warn_events_with_every_field() {
    let _serial = common::serial();
    let captured = Captured::default();
    // Stacks off: with them, a stall whose frames come after its first report is reported once
    // more, and this test counts events.
    let (layer, guard) = loopwatch::builder()
        .ignore_env()
        .threshold(Duration::from_millis(10))
        .stacks(false)
        .prometheus_addr(([127, 0, 0, 1], 0))
        .build()
        .unwrap();
    let dispatch = Dispatch::new(
        tracing_subscriber::registry()
            .with(layer)
            .with(captured.clone()),
    );
    let rt = runtime_under(&dispatch);
    rt.block_on(rt.spawn(guard.watch("slow-handler", async {
        common::spin_for(Duration::from_millis(40));
    })))
    .unwrap();
    // Let the watchdog count the last poll before taking the baseline.
    std::thread::sleep(Duration::from_millis(20));
    let polls_before = guard.snapshot().polls;
    assert!(polls_before >= 1);

    // Both reports arrive (detected, then ended).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while captured.0.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let events = captured.0.lock().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:#?}");
    for (level, target, fields) in &events {
        assert_eq!(*level, Level::WARN);
        assert_eq!(target, "loopwatch");
        for key in [
            "stall.id",
            "stall.state",
            "task.name",
            "task.id",
            "task.site",
            "worker.index",
            "worker.thread",
            "layer",
            "started_at_unix",
            "duration_ms",
            "threshold_ms",
            "exact_end",
            "uncertainty_ms",
            "cause",
            "stack.status",
            "message",
        ] {
            assert!(fields.contains_key(key), "{key} missing from {fields:#?}");
        }
        assert_eq!(fields["task.name"], "slow-handler");
        assert_eq!(fields["layer"], "async");
        assert_eq!(fields["threshold_ms"], "10.0");
    }
    assert_eq!(events[0].2["stall.state"], "running");
    assert!(events[0].2["message"].starts_with("stall detected"));
    assert_eq!(events[1].2["stall.state"], "ended");
    assert!(events[1].2["message"].starts_with("stall ended"));
    // The poll spun for 40 ms at least; the record is right to within what it says (on a
    // busy host that held the watchdog back, the start's tick was longer).
    let ended_ms: f64 = events[1].2["duration_ms"].parse().unwrap();
    let uncertainty_ms: f64 = events[1].2["uncertainty_ms"].parse().unwrap();
    assert!(
        ended_ms + uncertainty_ms >= 40.0,
        "{ended_ms} ± {uncertainty_ms}: {:#?}",
        events[1].2
    );

    // Reporting did not create polls of its own.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(guard.snapshot().polls, polls_before);
}

/// A `Write` into a shared buffer, for a `fmt` layer.
#[cfg(feature = "fmt")]
#[derive(Clone, Default)]
struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(feature = "fmt")]
impl std::io::Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(feature = "fmt")]
#[test]
fn with_log_fields_a_report_is_one_short_line_and_other_events_keep_their_fields() {
    let _serial = common::serial();
    let buffer = Buffer::default();
    let captured = Captured::default();
    let (layer, guard) = loopwatch::builder()
        .ignore_env()
        .threshold(Duration::from_millis(10))
        .prometheus_addr(([127, 0, 0, 1], 0))
        .build()
        .unwrap();
    let b = buffer.clone();
    let dispatch = Dispatch::new(
        tracing_subscriber::registry()
            .with(layer)
            .with(captured.clone())
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(loopwatch::LogFields::default())
                    .with_ansi(false)
                    .with_writer(move || b.clone()),
            ),
    );
    let rt = runtime_under(&dispatch);
    rt.block_on(rt.spawn(guard.watch("report-handler", async {
        tracing::info!(user = 7, "an application event");
        common::spin_for(Duration::from_millis(40));
    })))
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ended = |c: &Captured| {
        c.0.lock()
            .unwrap()
            .iter()
            .any(|(_, _, f)| f.get("stall.state").map(String::as_str) == Some("ended"))
    };
    while !ended(&captured) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(guard);
    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let reports: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" loopwatch: stall"))
        .collect();
    assert!(reports.len() >= 2, "{text}");
    for line in &reports {
        // The timestamp, level and target take about 40 characters.
        assert!(line.len() <= 300, "{} characters: {line}", line.len());
        assert!(line.contains("task report-handler"), "{line}");
        assert!(line.contains("cause: "), "{line}");
        for field in ["stall.id=", "stack=", "duration_ms=", "worker.tid="] {
            assert!(!line.contains(field), "{field} in {line}");
        }
    }
    assert!(
        reports
            .iter()
            .any(|l| l.contains("stall ended") && l.contains("(ended)")),
        "{text}"
    );
    // The structured fields are all still there for other layers (JSON logs).
    let events = captured.0.lock().unwrap().clone();
    let report = events
        .iter()
        .find(|(_, _, f)| f.contains_key("stall.state"))
        .expect("a report");
    for key in [
        "stall.id",
        "duration_ms",
        "cause",
        "stack.status",
        "worker.index",
    ] {
        assert!(report.2.contains_key(key), "{key}");
    }
    // Not loopwatch's: written as tracing-subscriber writes every event.
    let app = text
        .lines()
        .find(|l| l.contains("an application event"))
        .expect("the application's event");
    assert!(app.contains("user=7"), "{app}");
}
