//! Head-of-line victims without tokio's hooks (stable tokio): futures watched by loopwatch
//! note their own wakes, and `loopwatch::spawn` notes the spawn, so tasks queued behind a
//! stall are listed as its victims. Runs in both builds; under `--cfg tokio_unstable` tokio's
//! own task spans enclose the watched futures, which tests the nested path.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use loopwatch::Stall;

const STALL: Duration = Duration::from_millis(100);
const QUEUED: usize = 50;

/// `loopwatch::spawn` and `loopwatch::watch` report to the newest guard: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime(h: &common::Harness, workers: usize) -> tokio::runtime::Runtime {
    h.builder(workers).build().unwrap()
}

fn ended_stall(h: &common::Harness) -> Stall {
    h.ended_stall(STALL * 8 / 10)
}

/// A watched task spawns `QUEUED` short tasks with `loopwatch::spawn` (they queue on its
/// worker), then computes for `STALL` without yielding.
fn spawned_behind_a_stall(h: &common::Harness, workers: usize) -> Stall {
    let rt = runtime(h, workers);
    let _d = h.enter();
    rt.block_on(async move {
        loopwatch::spawn("staller", async move {
            let shorts: Vec<_> = (0..QUEUED)
                .map(|i| loopwatch::spawn("short", async move { std::hint::black_box(i) }))
                .collect();
            common::spin_for(STALL);
            for s in shorts {
                s.await.unwrap();
            }
        })
        .await
        .unwrap();
    });
    let ended = ended_stall(h);
    drop(rt);
    ended
}

fn harness() -> common::Harness {
    common::harness(
        loopwatch::builder()
            .threshold(Duration::from_millis(20))
            // Every poll timed: each waiter's delay reaches the schedule-delay histogram.
            .sample_every(1)
            .stacks(false),
    )
}

#[test]
fn tasks_spawned_behind_a_stall_are_its_victims_and_stealing_lowers_their_count() {
    let _serial = common::serial();
    let _serial = serial();
    let h = harness();
    let alone = spawned_behind_a_stall(&h, 0);
    let v = &alone.victims;
    assert!(v.tracked, "watched futures make victims known");
    assert!(v.count >= QUEUED as u64 * 8 / 10, "{v:#?}");
    assert!(v.worst_wait >= STALL * 8 / 10, "{v:#?}");
    assert!(
        v.tasks.iter().all(|t| t.waited >= STALL / 2),
        "{:#?}",
        v.tasks
    );
    assert!(
        v.top_kinds[0].0.contains("short"),
        "the victims' kind is their watched name: {:?}",
        v.top_kinds
    );
    assert!(alone.to_string().contains("waited behind it"), "{alone}");

    let h2 = harness();
    let shared = spawned_behind_a_stall(&h2, 4);
    common::assert_stealing_lowers_victims(&alone, &shared);

    let snap = h.guard.snapshot();
    assert!(snap.victims_total >= v.count, "{}", snap.victims_total);

    // A stall held back for its victims still reaches the stall-duration histogram, and the
    // victims their counter.
    let addr = h
        .guard
        .prometheus_addr()
        .expect("the harness serves /metrics");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (_, body) = common::http_get(addr, "/metrics").unwrap();
        // The kind is "staller" on stable, tokio's task span (the spawn site) under
        // tokio_unstable.
        if common::series(&body, "loopwatch_stall_duration_seconds_count")
            .iter()
            .any(|l| l.contains("staller") || l.contains("victims_watched.rs"))
        {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let victims: f64 = common::series(&body, "loopwatch_victims_total")
        .iter()
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(victims >= v.count as f64, "{body}");
}

#[test]
fn tasks_woken_by_a_stalling_poll_are_its_victims() {
    let _serial = common::serial();
    let _serial = serial();
    let h = harness();
    let rt = runtime(&h, 0);
    let _d = h.enter();
    rt.block_on(async move {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let parked = Arc::new(AtomicUsize::new(0));
        // Plain watched futures (not spawned through loopwatch): only their wakes say when
        // they became ready.
        let waiters: Vec<_> = (0..QUEUED)
            .map(|_| {
                let gate = gate.clone();
                let parked = parked.clone();
                tokio::spawn(loopwatch::watch("waiter", async move {
                    parked.fetch_add(1, Ordering::Relaxed);
                    gate.acquire().await.unwrap().forget();
                }))
            })
            .collect();
        while parked.load(Ordering::Relaxed) < QUEUED {
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        loopwatch::spawn("waker", async move {
            // Wakes every waiter, then holds the only worker.
            gate.add_permits(QUEUED);
            common::spin_for(STALL);
        })
        .await
        .unwrap();
        for w in waiters {
            w.await.unwrap();
        }
    });
    let stall = ended_stall(&h);
    drop(rt);
    let v = &stall.victims;
    assert!(stall.task.name.as_deref() == Some("waker"), "{stall}");
    assert!(v.count >= QUEUED as u64 * 8 / 10, "{v:#?}");
    assert!(v.worst_wait >= STALL * 8 / 10, "{v:#?}");
    assert!(v.top_kinds[0].0.contains("waiter"), "{:?}", v.top_kinds);

    // Their delays reached the schedule-delay histogram under the waiters' kind.
    let snap = h.guard.snapshot();
    assert!(
        snap.schedule_delays
            .iter()
            .any(|k| k.kind.to_string().contains("waiter") && k.histogram.count > 0),
        "{:?}",
        snap.schedule_delays
    );
}

#[test]
fn a_future_that_wakes_itself_is_not_its_own_victim() {
    let _serial = common::serial();
    let _serial = serial();
    let h = harness();
    let rt = runtime(&h, 0);
    let _d = h.enter();
    rt.block_on(async move {
        loopwatch::spawn("self-waker", async {
            // Wakes itself first (as a yield does), then computes: the next poll's wait
            // counts from this poll's end, not from the wake.
            let mut woke = false;
            std::future::poll_fn(|cx| {
                if woke {
                    return std::task::Poll::Ready(());
                }
                woke = true;
                cx.waker().wake_by_ref();
                common::spin_for(STALL);
                std::task::Poll::Pending
            })
            .await;
        })
        .await
        .unwrap();
    });
    let stall = ended_stall(&h);
    drop(rt);
    assert_eq!(stall.victims.count, 0, "{:#?}", stall.victims);
}

#[test]
fn with_schedule_delay_off_watched_futures_do_not_track_victims() {
    let _serial = common::serial();
    let _serial = serial();
    let h = common::harness(
        loopwatch::builder()
            .threshold(Duration::from_millis(20))
            .schedule_delay(false)
            .stacks(false),
    );
    let stall = spawned_behind_a_stall(&h, 0);
    assert!(!stall.victims.tracked, "{:#?}", stall.victims);
    assert_eq!(stall.victims.count, 0);
}
