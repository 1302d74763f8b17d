//! The seeds' own failure: handlers that wait 5 ms with `std::thread::sleep` instead of
//! `tokio::time::sleep`. No poll reaches the 10 ms threshold, yet the async workers spend
//! nearly all their time asleep: loopwatch reports the kind and the call. The same load with
//! `tokio::time::sleep` is reported for nothing. (Both at once, each with its own loopwatch:
//! one 10 s window.)
#![cfg(all(target_os = "linux", not(loopwatch_portable)))]

use crate::common;

use std::time::{Duration, Instant};

use tracing::Instrument;

fn load(blocking: bool) -> loopwatch::Snapshot {
    let h = common::harness(loopwatch::builder().stacks(false));
    let rt = h.runtime(2);
    let _sub = h.enter();
    let until = Instant::now() + Duration::from_millis(10_800);
    rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(tokio::spawn(async move {
                while Instant::now() < until {
                    // One "request": a handler task that waits 5 ms (as a server spawns one
                    // per connection: each request is a poll of its own).
                    tokio::spawn(
                        async move {
                            if blocking {
                                std::thread::sleep(Duration::from_millis(5));
                            } else {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                        .instrument(tracing::info_span!("seed")),
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for c in clients {
            c.await.unwrap();
        }
    });
    let snap = h.guard.snapshot();
    drop(rt);
    snap
}

#[test]
fn many_short_blocking_polls_are_reported_and_their_async_twin_is_not() {
    let _serial = common::serial();
    let twin = std::thread::spawn(|| load(false));
    let blocking = load(true);
    let twin = twin.join().unwrap();
    assert!(
        blocking.thousand_cuts_reports >= 1,
        "no thousand-cuts report: {blocking:#?}"
    );
    assert_eq!(
        twin.thousand_cuts_reports, 0,
        "tokio::time::sleep blocks nothing: {twin:#?}"
    );
    assert_eq!(twin.stalls_total, 0);
}
