//! Polls of 0.3x the threshold are never stalls, even on a runtime busy with many short tasks.

mod common;

use std::time::Duration;

use tracing::Instrument;

const THRESHOLD: Duration = Duration::from_millis(10);

#[test]
fn polls_below_the_threshold_are_never_reported() {
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = h.runtime(2);
    let _sub = h.enter();
    rt.block_on(async {
        let mut tasks = Vec::new();
        // 40 tasks, each with 10 polls of 3 ms (0.3x the threshold)...
        for _ in 0..40 {
            tasks.push(tokio::spawn(
                async {
                    for _ in 0..10 {
                        common::spin_for(THRESHOLD * 3 / 10);
                        tokio::task::yield_now().await;
                    }
                }
                .instrument(tracing::info_span!("medium")),
            ));
        }
        // ...among 20,000 tiny ones.
        for i in 0..20_000u64 {
            tasks.push(tokio::spawn(
                async move {
                    std::hint::black_box(i);
                    tokio::task::yield_now().await;
                }
                .instrument(tracing::info_span!("tiny")),
            ));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    // Let the watchdog take a few more ticks.
    std::thread::sleep(THRESHOLD * 3);
    let snap = h.guard.snapshot();
    assert!(
        snap.polls >= 40_000,
        "the probes saw the polls: {}",
        snap.polls
    );
    assert_eq!(snap.stalls_total, 0, "{:?}", h.seen.lock().unwrap());
    assert_eq!(snap.slow_polls, 0);
    assert!(h.seen.lock().unwrap().is_empty());
    // The medium polls are in the histogram, below the threshold.
    let medium = snap
        .poll_durations
        .iter()
        .find(|k| k.kind.name.as_deref() == Some("medium"))
        .expect("medium polls were timed");
    assert!(medium.histogram.max < THRESHOLD);
}
