//! Mismatch: CPU work on async workers. A handler parses and hashes a large document inside
//! its `async fn`, holding its worker for ~80 ms; every request queued behind it waits.
//! loopwatch reports each such poll as a `cpu` stall on the `async` layer, with the task, the
//! span it is in, and the fix.
//!
//! ```sh
//! cargo run --example cpu_on_async
//! RUSTFLAGS="--cfg tokio_unstable" cargo run --example cpu_on_async   # + who waited behind it
//! ```

use std::time::{Duration, Instant};

mod support;

fn main() -> std::process::ExitCode {
    support::main(run)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let guard = loopwatch::try_init()?;
    guard.wait_for_symbols(Duration::from_secs(10));
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2).enable_all();
    #[cfg(tokio_unstable)]
    guard.install_poll_hooks(&mut b);
    let rt = b.build()?;
    guard.monitor_runtime(rt.handle(), "api");

    rt.block_on(async {
        let mut requests = Vec::new();
        for i in 0..40u64 {
            requests.push(tokio::spawn(loopwatch::watch("request", async move {
                if i % 10 == 0 {
                    render_report(i).await
                } else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    i
                }
            })));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for r in requests {
            r.await.unwrap();
        }
    });

    let snap = guard.snapshot();
    println!();
    println!("what loopwatch saw:");
    for s in &snap.stalls_by {
        println!(
            "  {} stall(s) of {} on the {} layer, cause {}",
            s.count,
            s.kind.label(),
            s.layer,
            s.cause
        );
    }
    println!(
        "  {} task(s) waited behind those stalls (known with --cfg tokio_unstable)",
        snap.victims_total
    );
    println!("fix: move the CPU work off the async workers:");
    println!("  let report = tokio::task::spawn_blocking(move || build(doc)).await?;");
    println!("  (or a CPU pool such as rayon for parallel work)");
    Ok(())
}

/// Bad: ~80 ms of computing inside an async fn.
#[tracing::instrument]
async fn render_report(id: u64) -> u64 {
    let start = Instant::now();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ id;
    while start.elapsed() < Duration::from_millis(80) {
        for i in 0..10_000u64 {
            h = (h ^ i).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}
