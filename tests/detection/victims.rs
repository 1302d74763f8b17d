//! Head-of-line victims (`--cfg tokio_unstable`, poll hooks): a 100 ms stall with 50 ready
//! tasks queued behind it on its worker lists them. By default they are found in the worker's
//! queue at the stall's end (no wait measured); with tokio's schedule-latency tracking each
//! has a measured wait close to the stall's length. With free workers to steal them, fewer
//! wait (the relation is asserted, not a timing).
#![cfg(tokio_unstable)]

use crate::common;

use std::time::Duration;

use loopwatch::Stall;

const STALL: Duration = Duration::from_millis(100);
const QUEUED: u64 = 50;

/// The stalled task spawns 50 short tasks (they queue on its worker), then computes for
/// `STALL` without yielding. Returns its ended report.
fn run(h: &common::Harness, workers: usize) -> Stall {
    let mut b = h.builder(workers);
    h.guard.install_poll_hooks(&mut b);
    let rt = b.build().unwrap();
    rt.block_on(async {
        tokio::spawn(async {
            let shorts: Vec<_> = (0..QUEUED)
                .map(|i| tokio::spawn(async move { std::hint::black_box(i) }))
                .collect();
            common::spin_for(STALL);
            for s in shorts {
                s.await.unwrap();
            }
        })
        .await
        .unwrap();
    });
    let ended = h.ended_stall(STALL * 8 / 10);
    drop(rt);
    ended
}

fn harness(tokio_latency: bool) -> common::Harness {
    common::harness(
        loopwatch::builder()
            .threshold(Duration::from_millis(20))
            .tokio_schedule_latency(tokio_latency)
            .stacks(false),
    )
}

#[test]
fn by_default_the_tasks_queued_on_the_stalled_worker_are_its_victims_with_no_wait_made_up() {
    let _serial = common::serial();
    let h = harness(false);
    let alone = run(&h, 0);
    let v = &alone.victims;
    assert!(v.tracked);
    // On one worker nothing else can take them: every one was queued at the stall's end, and
    // each is polled there next.
    assert_eq!(v.count, QUEUED, "{v:#?}");
    assert_eq!(v.unmeasured, v.count, "{v:#?}");
    assert_eq!(
        (v.total_wait, v.worst_wait),
        (Duration::ZERO, Duration::ZERO)
    );
    assert!(v.tasks.len() == 16 && v.tasks.iter().all(|t| t.waited.is_zero()));
    assert_eq!(v.top_kinds.len(), 1, "{:?}", v.top_kinds);
    assert!(v.top_kinds[0].0.contains("victims.rs"), "{:?}", v.top_kinds);
    assert_eq!(v.top_kinds[0].1, QUEUED);
    assert!(
        alone
            .summary()
            .to_string()
            .ends_with("50 tasks waited behind it (queued on its worker)"),
        "{}",
        alone.summary()
    );

    let shared = run(&harness(false), 4);
    common::assert_stealing_lowers_victims(&alone, &shared);
    assert_eq!(shared.victims.unmeasured, shared.victims.count);

    // Victims counted; no wait was measured, so the schedule-delay histogram is empty.
    let snap = h.guard.snapshot();
    assert!(snap.victims_total >= v.count, "{}", snap.victims_total);
    assert!(
        snap.schedule_delays.iter().all(|k| k.histogram.count == 0),
        "{:?}",
        snap.schedule_delays
    );
}

#[cfg(feature = "schedule-delay")]
#[test]
fn with_tokio_schedule_latency_each_victims_wait_is_measured() {
    let _serial = common::serial();
    let h = harness(true);
    let alone = run(&h, 0);
    let v = &alone.victims;
    assert!(v.tracked);
    assert!(v.count >= 40, "{v:#?}");
    assert_eq!(v.unmeasured, 0, "{v:#?}");
    // Each waited for most of the stall (they were queued before it began).
    assert!(v.worst_wait >= STALL * 8 / 10, "{v:#?}");
    assert!(
        v.tasks.iter().all(|t| t.waited >= STALL / 2),
        "{:#?}",
        v.tasks
    );
    assert!(v.total_wait >= STALL * (v.count as u32) / 2, "{v:#?}");
    assert!(v.tasks.len() <= 16 && !v.tasks.is_empty());
    assert!(v.top_kinds[0].0.contains("victims.rs"), "{:?}", v.top_kinds);
    assert!(alone.to_string().contains("waited behind it"), "{alone}");

    let shared = run(&harness(true), 4);
    common::assert_stealing_lowers_victims(&alone, &shared);

    // The schedule-delay histogram and the victims total.
    let snap = h.guard.snapshot();
    assert!(snap.victims_total >= v.count, "{}", snap.victims_total);
    assert!(
        snap.schedule_delays.iter().any(|k| k.histogram.count > 0),
        "{:?}",
        snap.schedule_delays
    );
}
