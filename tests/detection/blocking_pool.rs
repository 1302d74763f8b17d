//! The blocking layer: jobs run with loopwatch's `spawn_blocking` on a pool at its
//! `max_blocking_threads` queue up; loopwatch reports the queue wait (the alarm), the pool's
//! saturation, and each job's duration, on the `blocking` layer, apart from the async workers.

use crate::common;

use std::time::{Duration, Instant};

use loopwatch::LayerKind;

const JOB: Duration = Duration::from_millis(200);

#[test]
fn a_saturated_blocking_pool_shows_queue_wait_and_saturation() {
    let _serial = common::serial();
    let h = common::harness(
        loopwatch::builder()
            .threshold(Duration::from_millis(20))
            .max_blocking_threads(2)
            .export_interval(Duration::from_millis(100)),
    );
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(1).max_blocking_threads(2).enable_all();
    h.with_dispatch(&mut b);
    let rt = b.build().unwrap();
    let during = rt.block_on(async {
        let jobs: Vec<_> = (0..6)
            .map(|_| h.guard.spawn_blocking(|| std::thread::sleep(JOB)))
            .collect();
        tokio::time::sleep(JOB / 4).await;
        let during = h.guard.snapshot();
        for j in jobs {
            j.await.unwrap();
        }
        during
    });
    // Two threads busy, four jobs waiting for one.
    assert_eq!(during.blocking_running, 2, "{during:?}");
    assert_eq!(during.blocking_queued, 4);

    // Four jobs waited a job's length or more: each is a slow start.
    let deadline = Instant::now() + Duration::from_secs(5);
    let snap = loop {
        let s = h.guard.snapshot();
        let timed = s
            .poll_durations
            .iter()
            .find(|k| k.layer == LayerKind::Blocking)
            .map_or(0, |k| k.histogram.count);
        if s.blocking_slow_starts >= 4 && s.blocking_running == 0 && timed == 6 {
            break s;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let waits = snap
        .schedule_delays
        .iter()
        .find(|k| k.layer == LayerKind::Blocking);
    let waits = waits
        .expect("queue waits on the blocking layer")
        .histogram
        .clone();
    assert_eq!(waits.count, 6, "every job's wait is kept");
    assert!(waits.max >= JOB * 3 / 4, "{waits:?}");
    let jobs = snap
        .poll_durations
        .iter()
        .find(|k| k.layer == LayerKind::Blocking)
        .expect("job durations on the blocking layer")
        .histogram
        .clone();
    assert_eq!(jobs.count, 6, "every job is timed");
    assert!(jobs.max >= JOB, "{jobs:?}");
    // The jobs count as polls of the blocking layer, not of the async workers.
    assert!(
        snap.polls_by_layer[LayerKind::Blocking as usize] >= 6,
        "{snap:?}"
    );
    assert!(snap.slow_polls_by_layer[LayerKind::Blocking as usize] == 0);
    // A 200 ms job is not a stall of the blocking layer (its threshold is 30 s), nor of async.
    assert_eq!(snap.stalls_total, 0, "{:?}", snap.stalls_by);

    // The same on /metrics.
    let addr = h.guard.prometheus_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = common::http_get(addr, "/metrics").unwrap();
        let slow = common::sample(&body, "loopwatch_blocking_slow_starts_total");
        let waits = common::series(&body, "loopwatch_schedule_delay_seconds_count");
        if slow >= Some(4.0) && waits.iter().any(|l| l.contains(r#"layer="blocking""#)) {
            assert!(body.contains("# TYPE loopwatch_blocking_pool_saturation gauge"));
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
