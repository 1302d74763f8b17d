//! A collector that is down, or that accepts connections and never answers, never holds the
//! service: the workload runs to its end, what could not be sent is dropped and counted, the
//! guard still stops, and the export resumes when the collector comes back.
#![cfg(feature = "otlp")]

use crate::common;
use crate::receiver;

use std::time::{Duration, Instant};

use receiver::{Receiver, Transport};

/// `stalls` stalls of 8 ms (threshold 5 ms) on a 2-worker runtime, among 2,000 short tasks.
fn workload(h: &common::Harness, stalls: usize) {
    let rt = h.runtime(2);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..2_000 {
            tasks.push(tokio::spawn(h.guard.watch("short", async move {
                tokio::task::yield_now().await;
                i
            })));
        }
        for _ in 0..stalls {
            h.guard
                .watch("stall", async {
                    common::spin_for(Duration::from_millis(8))
                })
                .await;
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

fn builder(endpoint: String) -> loopwatch::Builder {
    loopwatch::builder()
        .threshold(Duration::from_millis(5))
        .stacks(false)
        .metrics(loopwatch::MetricsExport::Off)
        .export_interval(Duration::from_millis(100))
        .otlp_endpoint(endpoint)
        .otlp_timeout(Duration::from_millis(300))
        .otlp_span_queue(4)
}

#[test]
fn a_collector_that_never_answers_costs_drops_not_throughput() {
    let _serial = common::serial();
    let hole = Receiver::start(Transport::BlackHole);
    let h = common::harness(builder(hole.endpoint()));
    workload(&h, 100);
    let ended = |seen: &[loopwatch::Stall]| {
        seen.iter()
            .filter(|s| s.state == loopwatch::StallState::Ended)
            .count()
    };
    let seen = h.wait_seen(common::ENDED_WAIT, |s| ended(s) >= 50);
    assert!(ended(&seen) >= 50, "{}", ended(&seen));
    // The exports hang until their timeout; meanwhile the queue (4) overflows.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = h.guard.snapshot().otlp;
        if s.spans_dropped > 0 && s.span_export_errors > 0 && s.metric_export_errors > 0 {
            assert_eq!(s.spans_exported, 0);
            break;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Stopping does not wait on the collector for long (bounded, not the export timeout
    // times the queue).
    let t0 = Instant::now();
    drop(h);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[test]
fn export_resumes_when_the_collector_comes_back() {
    let _serial = common::serial();
    // A port with nothing behind it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = common::harness(builder(format!("http://{addr}")));
    workload(&h, 20);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = h.guard.snapshot().otlp;
        if s.span_export_errors > 0 && s.metric_export_errors > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let down = h.guard.snapshot().otlp;
    assert_eq!(down.spans_exported, 0, "{down:?}");
    assert!(down.spans_dropped > 0, "{down:?}");

    // The collector comes back on the same port. The backlog (and records dropped while the
    // queue of 4 is full) may come first: stall again until a new stall's span arrives.
    let rx = Receiver::start_on(addr, Transport::Grpc);
    let rt = h.runtime(1);
    let after = |r: &receiver::Received| {
        r.spans.iter().any(|(_, s)| {
            receiver::attr(&s.attributes, "loopwatch.task.kind").as_deref() == Some("after")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rx.with(after) {
        assert!(
            Instant::now() < deadline,
            "no span after the collector came back: {:?}",
            h.guard.snapshot().otlp
        );
        rt.block_on(h.guard.watch("after", async {
            common::spin_for(Duration::from_millis(30))
        }));
        std::thread::sleep(Duration::from_millis(300));
    }
    rx.wait(
        "metrics after the collector came back",
        Duration::from_secs(20),
        |r| !r.metrics.is_empty(),
    );
    // Counted once the collector has answered, a moment after the receiver saw it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let o = h.guard.snapshot().otlp;
        if o.spans_exported >= 1 && o.metric_exports >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{o:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
