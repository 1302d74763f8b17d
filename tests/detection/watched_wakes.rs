//! Watched futures are polled with loopwatch's waker, which forwards every wake to the task:
//! no wake may be lost, whatever thread it comes from and however wakes and polls interleave.
//! Pairs of watched tasks play ping-pong across a multi-thread runtime (wakes from other
//! workers, from the same worker, during polls and between them); every exchange must finish.

use crate::common;

use std::time::Duration;

const PAIRS: usize = 64;
const ROUNDS: usize = 2_000;

#[test]
fn ping_pong_between_watched_tasks_never_loses_a_wake() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().sample_every(1).stacks(false));
    let rt = h.runtime(4);
    let done = rt.block_on(async {
        let mut pairs = Vec::new();
        for _ in 0..PAIRS {
            let (to_b, mut from_a) = tokio::sync::mpsc::channel::<usize>(1);
            let (to_a, mut from_b) = tokio::sync::mpsc::channel::<usize>(1);
            let a = h.guard.spawn("ping", async move {
                for i in 0..ROUNDS {
                    to_b.send(i).await.unwrap();
                    assert_eq!(from_b.recv().await, Some(i));
                }
            });
            let b = h.guard.spawn("pong", async move {
                while let Some(i) = from_a.recv().await {
                    if i % 7 == 0 {
                        // A wake of its own mid-exchange.
                        tokio::task::yield_now().await;
                    }
                    if to_a.send(i).await.is_err() {
                        break;
                    }
                }
            });
            pairs.push((a, b));
        }
        tokio::time::timeout(Duration::from_secs(120), async {
            for (a, b) in pairs {
                a.await.unwrap();
                b.await.unwrap();
            }
        })
        .await
    });
    assert!(done.is_ok(), "a watched task never woke: a wake was lost");
    // The exchanges were seen: their schedule delays reached the histogram.
    let snap = h.guard.snapshot();
    let delays: u64 = snap
        .schedule_delays
        .iter()
        .filter(|k| {
            k.kind
                .name
                .as_deref()
                .is_some_and(|n| n == "ping" || n == "pong")
        })
        .map(|k| k.histogram.count)
        .sum();
    assert!(delays > 0, "{:?}", snap.schedule_delays);
}
