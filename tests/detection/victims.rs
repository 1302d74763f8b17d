//! Head-of-line victims (`--cfg tokio_unstable`, poll hooks with schedule latency): a 100 ms
//! stall with 50 ready tasks queued behind it on its worker lists them, each with a wait close
//! to the stall's length; with free workers to steal them, fewer wait (the relation is
//! asserted, not a timing).
#![cfg(tokio_unstable)]

use crate::common;

use std::time::Duration;

use loopwatch::Stall;

const STALL: Duration = Duration::from_millis(100);

/// The stalled task spawns 50 short tasks (they queue on its worker), then computes for
/// `STALL` without yielding. Returns its ended report.
fn run(h: &common::Harness, workers: usize) -> Stall {
    let mut b = h.builder(workers);
    h.guard.install_poll_hooks(&mut b);
    let rt = b.build().unwrap();
    rt.block_on(async {
        tokio::spawn(async {
            let shorts: Vec<_> = (0..50)
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

#[test]
fn queued_tasks_are_listed_as_victims_and_stealing_lowers_their_count() {
    let _serial = common::serial();
    let h = common::harness(
        loopwatch::builder()
            .threshold(Duration::from_millis(20))
            .stacks(false),
    );
    let alone = run(&h, 0);
    let v = &alone.victims;
    assert!(v.tracked);
    assert!(v.count >= 40, "{v:#?}");
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

    let h2 = common::harness(
        loopwatch::builder()
            .threshold(Duration::from_millis(20))
            .stacks(false),
    );
    let shared = run(&h2, 4);
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
