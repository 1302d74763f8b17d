//! Loop lag: the heartbeat loopwatch sends to a monitored runtime waits for a worker, so its
//! lag stays low while the runtime is free and grows by the length of a stall that holds it.
//! (Relations, not timings: the quiet lag is compared with the stall's length.)

use crate::common;

use std::time::{Duration, Instant};

const STALL: Duration = Duration::from_millis(300);

fn max_lag(h: &common::Harness) -> (u64, Duration) {
    let snap = h.guard.snapshot();
    let lag = snap
        .loop_lag
        .iter()
        .find(|l| l.runtime == "main")
        .expect("the runtime's loop lag");
    (lag.histogram.count, lag.histogram.max)
}

#[test]
fn loop_lag_grows_under_a_stall_and_stays_low_without() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(Duration::from_millis(20)));
    // One worker: a stall holds the whole runtime.
    let rt = h.runtime(1);
    h.guard.monitor_runtime(rt.handle(), "main");

    // Quiet: the runtime idles; heartbeats run at once.
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(500)).await });
    let (quiet_n, quiet_max) = max_lag(&h);
    assert!(quiet_n >= 5, "only {quiet_n} heartbeats in 500 ms");
    assert!(quiet_max < STALL / 3, "quiet loop lag {quiet_max:?}");

    // A stall on the only worker: the heartbeat sent during it waits for it to end.
    rt.block_on(async {
        tokio::spawn(h.guard.watch("hog", async { common::spin_for(STALL) }))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, stalled_max) = max_lag(&h);
        if stalled_max >= STALL / 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "loop lag {stalled_max:?} did not grow under a {STALL:?} stall"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The histogram is exported too.
    let addr = h.guard.prometheus_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = common::http_get(addr, "/metrics").unwrap();
        let slow = common::sample(
            &body,
            r#"loopwatch_loop_lag_seconds_bucket{runtime="main",le="0.1"}"#,
        );
        let all = common::sample(
            &body,
            r#"loopwatch_loop_lag_seconds_bucket{runtime="main",le="+Inf"}"#,
        );
        if let (Some(s), Some(a)) = (slow, all) {
            if a > s {
                break; // at least one heartbeat waited more than 100 ms
            }
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The heartbeat is loopwatch's own task on the application's runtime: seen by every probe
/// that sees all tasks (tokio's task spans and the poll hooks, under `tokio_unstable`), but
/// never counted as one of the application's kinds.
#[cfg(tokio_unstable)]
#[test]
fn the_heartbeat_is_not_one_of_the_applications_tasks() {
    let _serial = common::serial();
    // Every poll timed, so a heartbeat's poll would be in the histograms if it counted.
    let h = common::harness(
        loopwatch::builder()
            .threshold(Duration::from_millis(20))
            .sample_every(1),
    );
    let mut b = h.builder(1);
    h.guard.install_poll_hooks(&mut b);
    let rt = b.build().unwrap();
    h.guard.monitor_runtime(rt.handle(), "main");
    let _sub = h.enter();
    rt.block_on(async {
        // Over a second: the learners have run too.
        for _ in 0..120 {
            tokio::spawn(async { tokio::task::yield_now().await })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let (beats, _) = max_lag(&h);
    assert!(beats >= 5, "heartbeats ran: {beats}");
    let snap = h.guard.snapshot();
    assert!(
        !snap.poll_durations.is_empty(),
        "the application's polls were timed"
    );
    for k in &snap.poll_durations {
        let site = k.kind.site.as_deref().unwrap_or("");
        assert!(
            !site.contains("export/runtime.rs"),
            "loopwatch's heartbeat counted as the application's: {:?}",
            k.kind
        );
        // Nor the probe-free path's learner tasks (one per worker, each second).
        assert!(
            !site.contains("src/watchdog/"),
            "loopwatch's learners counted as the application's: {:?}",
            k.kind
        );
        assert!(!site.starts_with('/'), "an absolute path: {:?}", k.kind);
    }
}
