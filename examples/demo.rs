//! loopwatch's demo: a small HTTP service on 127.0.0.1 with two bad handlers, a built-in load
//! loop, and loopwatch printing each stall as it happens. It ends by itself.
//!
//! ```sh
//! cargo run --example demo
//! RUSTFLAGS="--cfg tokio_unstable" cargo run --example demo   # every task, no spans needed
//! ```
//!
//! - `GET /fast`    answers at once;
//! - `GET /report`  computes for 50 ms on the async worker (a `cpu` stall);
//! - `GET /config`  calls `std::thread::sleep(50 ms)` on the async worker (a blocking stall).
//! - `GET /freeze`  computes for `DEMO_FREEZE_MS` on the async worker (sent once, a third of
//!   the way in, when `DEMO_FREEZE_MS` is set: a stall long enough to watch in Prometheus).
//!
//! `DEMO_SECS` sets how long the load runs (default 3). loopwatch's metrics are served at
//! `http://127.0.0.1:9464/metrics` while it runs (`LOOPWATCH_PROMETHEUS_ADDR` moves them).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream as AsyncStream};

mod support;

fn main() -> std::process::ExitCode {
    support::main(run)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // 1. loopwatch: one line. Stall reports are WARN events printed to stderr; here with
    // `file:line` in stack frames (read from the debug info; off by default, which names
    // frames from the symbol table alone and costs the least memory).
    let guard = loopwatch::builder().stack_locations(true).try_init()?;
    // Optional: have the symbol tables loaded before the first stall, so even the first
    // reports carry stack frames (loopwatch loads them in the background either way).
    guard.wait_for_symbols(Duration::from_secs(10));

    // 2. The service, on a 2-worker runtime.
    let rt = runtime(&guard)?;
    guard.monitor_runtime(rt.handle(), "demo");
    if let Some(metrics) = guard.prometheus_addr() {
        tracing::info!("loopwatch metrics at http://{metrics}/metrics");
    }
    let addr = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        loopwatch::spawn("accept-loop", serve(listener));
        Ok::<_, std::io::Error>(addr)
    })?;
    tracing::info!(%addr, "demo service listening");

    // 3. The load: plain threads with blocking sockets, outside the runtime.
    let secs = env_u64("DEMO_SECS", 3);
    let freeze_ms = env_u64("DEMO_FREEZE_MS", 0);
    FREEZE_MS.store(freeze_ms, Ordering::Relaxed);
    let freeze = (freeze_ms > 0).then(|| {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs) / 3);
            let _ = get(addr, "/freeze", Duration::from_millis(freeze_ms + 5_000));
        })
    });
    let latencies = load(addr, Duration::from_secs(secs));
    if let Some(f) = freeze {
        let _ = f.join();
    }

    let snap = guard.snapshot();
    println!();
    println!(
        "requests: {}",
        latencies.iter().map(|(_, n, _)| n).sum::<u64>()
    );
    for (path, n, worst) in &latencies {
        println!("  {path:<8} {n:>5} requests, worst latency {worst:.1?}");
    }
    println!(
        "loopwatch: {} polls seen, {} slow polls, {} stalls, {} dropped reports",
        snap.polls, snap.slow_polls, snap.stalls_total, snap.dropped_reports
    );
    for k in snap.poll_durations.iter().take(6) {
        println!(
            "  {:<40} {:>6} timed polls, p99 <= {:?}, max {:.1?}",
            k.kind.to_string(),
            k.histogram.count,
            k.histogram.quantile_bound(0.99).unwrap_or_default(),
            k.histogram.max
        );
    }
    drop(rt);
    Ok(())
}

#[cfg(tokio_unstable)]
fn runtime(guard: &loopwatch::Guard) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2).enable_all();
    // With tokio_unstable, the poll hooks watch every task with no span at all.
    guard.install_poll_hooks(&mut b);
    b.build()
}

#[cfg(not(tokio_unstable))]
fn runtime(_guard: &loopwatch::Guard) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

async fn serve(listener: TcpListener) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        // A watched task: its polls are timed, and its waits count as victims of stalls.
        loopwatch::spawn("http-connection", handle(conn));
    }
}

async fn handle(mut conn: AsyncStream) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf[len..]).await?;
        if n == 0 || len + n == buf.len() {
            return Ok(());
        }
        len += n;
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let body = match path {
        "/report" => render_report().await,
        "/config" => fetch_legacy_config().await,
        "/freeze" => rebuild_cache().await,
        _ => "ok\n".to_string(),
    };
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}

/// Bad: 50 ms of CPU work on the async worker.
#[tracing::instrument]
async fn render_report() -> String {
    let start = Instant::now();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    while start.elapsed() < Duration::from_millis(50) {
        for i in 0..10_000u64 {
            h = (h ^ i).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("report {h:x}\n")
}

/// Bad: a blocking sleep (think: a synchronous HTTP client) on the async worker.
#[tracing::instrument]
async fn fetch_legacy_config() -> String {
    std::thread::sleep(Duration::from_millis(50));
    "config\n".to_string()
}

static FREEZE_MS: AtomicU64 = AtomicU64::new(0);

/// Very bad: `DEMO_FREEZE_MS` of CPU work on the async worker.
#[tracing::instrument]
async fn rebuild_cache() -> String {
    let start = Instant::now();
    let length = Duration::from_millis(FREEZE_MS.load(Ordering::Relaxed));
    let mut h: u64 = 0;
    while start.elapsed() < length {
        for i in 0..10_000u64 {
            h = (h ^ i).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("cache {h:x}\n")
}

fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends requests from 4 client threads for `length`; every 10th is `/report` or `/config`.
fn load(addr: SocketAddr, length: Duration) -> Vec<(&'static str, u64, Duration)> {
    let paths = ["/fast", "/report", "/config"];
    let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let worst: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let end = Instant::now() + length;
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (counts, worst) = (counts.clone(), worst.clone());
            std::thread::spawn(move || {
                let mut i = c;
                while Instant::now() < end {
                    let which = match i % 20 {
                        7 => 1,
                        17 => 2,
                        _ => 0,
                    };
                    i += 1;
                    let t0 = Instant::now();
                    if get(addr, paths[which], Duration::from_secs(2)).is_ok() {
                        let us = t0.elapsed().as_micros() as u64;
                        counts[which].fetch_add(1, Ordering::Relaxed);
                        worst[which].fetch_max(us, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    for c in clients {
        let _ = c.join();
    }
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                *p,
                counts[i].load(Ordering::Relaxed),
                Duration::from_micros(worst[i].load(Ordering::Relaxed)),
            )
        })
        .collect()
}

fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: demo\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(())
}
