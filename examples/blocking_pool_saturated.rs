//! Mismatch: a saturated blocking pool. Jobs that mostly *wait* (a synchronous HTTP client, a
//! database driver without async support) are sent to tokio's blocking pool, which is capped
//! at 4 threads here: the jobs queue for a thread. A long job is normal on this layer; a long
//! wait for a thread is the alarm, and loopwatch reports it, with the pool's saturation.
//!
//! ```sh
//! cargo run --example blocking_pool_saturated
//! ```

use std::time::Duration;

mod support;

fn main() -> std::process::ExitCode {
    support::main(run)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let guard = loopwatch::builder().max_blocking_threads(4).try_init()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()?;

    let during = rt.block_on(async {
        // 16 calls of ~300 ms each to a slow synchronous service.
        let calls: Vec<_> = (0..16)
            .map(|_| loopwatch::spawn_blocking(legacy_call))
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let during = guard.snapshot();
        for c in calls {
            c.await.unwrap();
        }
        during
    });
    std::thread::sleep(Duration::from_millis(100)); // the last figures reach the snapshot

    let snap = guard.snapshot();
    let layer = |v: &[loopwatch::KindPolls]| {
        v.iter()
            .find(|k| k.layer == loopwatch::LayerKind::Blocking)
            .map(|k| k.histogram.clone())
            .unwrap_or_default()
    };
    let (waits, jobs) = (layer(&snap.schedule_delays), layer(&snap.poll_durations));
    println!();
    println!("blocking pool, as loopwatch saw it:");
    println!(
        "  100 ms in: {} jobs running (of max 4), {} waiting for a thread",
        during.blocking_running, during.blocking_queued
    );
    println!(
        "  queue wait before a job started: max {:.0?}, p99 <= {:?} ({} jobs)",
        waits.max,
        waits.quantile_bound(0.99).unwrap_or_default(),
        waits.count
    );
    println!(
        "  job duration: max {:.0?} ({} jobs; long jobs are what this pool is for)",
        jobs.max, jobs.count
    );
    println!(
        "  {} jobs waited longer than the stall threshold for a thread",
        snap.blocking_slow_starts
    );
    println!("fix: make the waiting async (an async client), or give these calls a bounded pool");
    println!("of their own so they cannot starve other spawn_blocking users.");
    Ok(())
}

/// A synchronous call that waits ~300 ms on the network.
fn legacy_call() {
    std::thread::sleep(Duration::from_millis(300));
}
