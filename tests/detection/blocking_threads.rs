//! The blocking pool's threads, seen through tokio's thread callbacks on stable tokio (and
//! tokio's own count under `--cfg tokio_unstable`): blocking work loopwatch does not wrap
//! (plain `tokio::task::spawn_blocking`, as `tokio::fs` does inside) still shows as threads in
//! `loopwatch_runtime_blocking_threads`.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const JOBS: usize = 3;

/// Scrapes until `loopwatch_runtime_blocking_threads{runtime="<name>"}` satisfies `pred`.
fn blocking_threads(h: &common::Harness, name: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let addr = h
        .guard
        .prometheus_addr()
        .expect("the harness serves /metrics");
    let series = format!(r#"loopwatch_runtime_blocking_threads{{runtime="{name}"}}"#);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = common::http_get(addr, "/metrics").unwrap();
        if let Some(v) = common::sample(&body, &series) {
            if pred(v) {
                return v;
            }
        }
        assert!(Instant::now() < deadline, "{series} never matched:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `JOBS` plain blocking jobs at once on `rt` and, while they all run, waits for the
/// metric to count them.
fn count_while_busy(h: &common::Harness, rt: &tokio::runtime::Runtime, name: &str) -> f64 {
    let all_running = Arc::new(Barrier::new(JOBS + 1));
    let release = Arc::new(Barrier::new(JOBS + 1));
    let jobs: Vec<_> = (0..JOBS)
        .map(|_| {
            let (a, r) = (all_running.clone(), release.clone());
            rt.spawn_blocking(move || {
                a.wait();
                r.wait();
            })
        })
        .collect();
    all_running.wait();
    let seen = blocking_threads(h, name, |v| v >= JOBS as f64);
    release.wait();
    rt.block_on(async {
        for j in jobs {
            j.await.unwrap();
        }
    });
    seen
}

#[test]
fn blocking_threads_are_counted_on_a_multi_thread_runtime() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().export_interval(Duration::from_millis(100)));
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2).enable_all();
    h.guard.count_threads(&mut b, "pool");
    let rt = b.build().unwrap();
    h.guard.monitor_runtime(rt.handle(), "pool");
    // The two workers are not blocking threads.
    assert_eq!(blocking_threads(&h, "pool", |_| true), 0.0);
    let seen = count_while_busy(&h, &rt, "pool");
    assert!(seen >= JOBS as f64, "{seen}");
    drop(rt);
}

#[test]
fn a_counter_called_from_the_applications_own_callbacks_counts_too() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().export_interval(Duration::from_millis(100)));
    let threads = h.guard.thread_counter("own");
    let own_starts = Arc::new(AtomicUsize::new(0));
    let (start, stop, starts) = (threads.clone(), threads.clone(), own_starts.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(move || {
            start.started();
            starts.fetch_add(1, Ordering::Relaxed);
        })
        .on_thread_stop(move || stop.stopped())
        .build()
        .unwrap();
    h.guard.monitor_runtime(rt.handle(), "own");
    let seen = count_while_busy(&h, &rt, "own");
    assert!(seen >= JOBS as f64, "{seen}");
    assert!(own_starts.load(Ordering::Relaxed) >= JOBS);
    assert!(threads.alive() >= JOBS as u64);
    drop(rt);
    // Every thread the runtime started has stopped with it.
    assert_eq!(threads.alive(), 0);
}
