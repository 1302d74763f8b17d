//! The seeds' own failure: handlers that wait 5 ms with `std::thread::sleep` instead of
//! `tokio::time::sleep`. No poll reaches the 10 ms threshold, yet the async workers spend
//! nearly all their time asleep: loopwatch reports the kind and the call. The same load with
//! `tokio::time::sleep` is reported for nothing. (Both at once, each with its own loopwatch:
//! one 10 s window.) The sampled time is in the snapshot and in the scrape, under the kind and
//! the call.
#![cfg(all(target_os = "linux", not(loopwatch_portable)))]

use crate::common;

use std::time::{Duration, Instant};

use tracing::Instrument;

fn load(blocking: bool) -> (loopwatch::Snapshot, String) {
    let h = common::harness(
        loopwatch::builder()
            .stacks(false)
            .export_interval(Duration::from_millis(100)),
    );
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
    // Two export intervals: the scrape holds what the snapshot holds.
    std::thread::sleep(Duration::from_millis(300));
    let snap = h.guard.snapshot();
    let addr = h.guard.prometheus_addr().expect("listener runs");
    let (status, scrape) = common::http_get(addr, "/metrics").expect("scrape answers");
    assert_eq!(status, 200);
    drop(rt);
    (snap, scrape)
}

/// The sampled seconds the seed handlers spent asleep in `clock_nanosleep`, from the snapshot.
fn asleep_in_nanosleep(snap: &loopwatch::Snapshot) -> f64 {
    snap.time_in_polls
        .iter()
        .filter(|t| t.kind.label() == "seed" && t.syscall.as_deref() == Some("clock_nanosleep"))
        .map(|t| t.time.as_secs_f64())
        .sum()
}

#[test]
fn many_short_blocking_polls_are_reported_and_their_async_twin_is_not() {
    let _serial = common::serial();
    let twin = std::thread::spawn(|| load(false));
    let (blocking, scrape) = load(true);
    let (twin, twin_scrape) = twin.join().unwrap();
    assert!(
        blocking.thousand_cuts_reports >= 1,
        "no thousand-cuts report: {blocking:#?}"
    );
    assert_eq!(
        twin.thousand_cuts_reports, 0,
        "tokio::time::sleep blocks nothing: {twin:#?}"
    );
    // Its code never holds a worker: on a busy host a poll of it can still wait past the
    // threshold for a CPU, and that is the host's (starved, or unknown from a single look at a
    // runnable thread), never the code's.
    let blamed: Vec<_> = twin
        .stalls_by
        .iter()
        .filter(|s| {
            matches!(
                s.cause,
                loopwatch::Cause::Cpu | loopwatch::Cause::Syscall(_)
            )
        })
        .collect();
    assert!(blamed.is_empty(), "{blamed:#?}");

    // Two workers asleep nearly all of 10.8 s: at least half of one worker's time, sampled.
    let asleep = asleep_in_nanosleep(&blocking);
    assert!(asleep >= 5.0, "{asleep} s: {:#?}", blocking.time_in_polls);
    assert_eq!(asleep_in_nanosleep(&twin), 0.0, "{:#?}", twin.time_in_polls);
    // The scrape: a counter of seconds, by kind and call, as in the snapshot.
    assert!(
        scrape.contains("# TYPE loopwatch_blocked_seconds_total counter"),
        "{scrape}"
    );
    let series =
        r#"loopwatch_blocked_seconds_total{layer="async",kind="seed",syscall="clock_nanosleep"}"#;
    let scraped =
        common::sample(&scrape, series).unwrap_or_else(|| panic!("no {series}:\n{scrape}"));
    assert!(
        scraped >= 5.0 && scraped <= asleep + 1e-9,
        "{scraped} s scraped, {asleep} s in the snapshot"
    );
    assert!(
        common::sample(&twin_scrape, series).is_none(),
        "{twin_scrape}"
    );
}
