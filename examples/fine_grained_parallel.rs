//! Mismatch: parallel work cut too fine. Each job on the CPU pool does ~1 µs of work, less than
//! it costs to dispatch it; loopwatch counts the too-fine jobs and says "batch these". The
//! same work in batches of 1,000 items is not reported.
//!
//! ```sh
//! cargo run --example fine_grained_parallel --features rayon
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

fn main() -> std::process::ExitCode {
    support::main(run)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let guard = loopwatch::try_init()?;
    let pool = guard.cpu_pool("thumbnails", rayon::ThreadPoolBuilder::new().num_threads(2))?;
    let items: Vec<u64> = (0..400_000).collect();

    // Bad: one job per item.
    let t0 = Instant::now();
    let sum = Arc::new(AtomicU64::new(0));
    for &i in &items {
        let sum = sum.clone();
        pool.spawn(move || {
            sum.fetch_add(work(i), Ordering::Relaxed);
        });
    }
    wait(&pool, items.len() as u64);
    let fine = t0.elapsed();
    std::thread::sleep(Duration::from_millis(1_200)); // the watchdog looks once a second

    // Good: one job per 1,000 items.
    let t1 = Instant::now();
    let before = pool.jobs().0;
    for chunk in items.chunks(1_000) {
        let chunk = chunk.to_vec();
        let sum = sum.clone();
        pool.spawn(move || {
            sum.fetch_add(chunk.iter().map(|&i| work(i)).sum(), Ordering::Relaxed);
        });
    }
    wait(&pool, before + (items.len() / 1_000) as u64);
    let batched = t1.elapsed();

    let (jobs, too_fine) = pool.jobs();
    println!();
    println!("CPU pool `thumbnails`, as loopwatch saw it:");
    println!("  {jobs} jobs, {too_fine} of them under 50 µs");
    println!("  one job per item: {fine:.0?}; one job per 1,000 items: {batched:.0?}");
    println!(
        "  too-fine reports: {}",
        guard.snapshot().cpu_too_fine_reports
    );
    Ok(())
}

/// ~1 µs of arithmetic.
fn work(i: u64) -> u64 {
    let mut h = i;
    for _ in 0..200 {
        h = h.wrapping_mul(0x0100_0000_01b3) ^ 0xcbf2_9ce4_8422_2325;
    }
    h & 1
}

fn wait(pool: &loopwatch::CpuPool, jobs: u64) {
    while pool.jobs().0 < jobs {
        std::thread::sleep(Duration::from_millis(5));
    }
}
