//! What each way of installing loopwatch sees of an axum 0.8 service's stalls: the recall
//! table of the README, measured.
//!
//! An axum server on a 2-worker multi-thread runtime built as `#[tokio::main]` builds it, with
//! handlers that hold their worker for 50 ms four ways (CPU, `std::thread::sleep`, a blocking
//! `std::net` read, a `std::sync::Mutex` held by another thread), each requested 6 times, one
//! at a time. For each install (the probe-free path alone: `monitor_runtime`; the tower layer;
//! both; and, built with `--cfg tokio_unstable`, the poll hooks), it counts the ended stall
//! reports per handler.
//!
//! `cargo run --release --example axum_recall --features axum`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use tracing_subscriber::prelude::*;

const HOLD: Duration = Duration::from_millis(50);
const REQUESTS: usize = 6;
const ROUTES: [&str; 4] = ["/cpu", "/sleep", "/read", "/lock"];

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

static PEER: OnceLock<SocketAddr> = OnceLock::new();
static LOCK: Mutex<()> = Mutex::new(());

/// A peer that answers each connection one byte after `HOLD`.
fn peer() -> SocketAddr {
    *PEER.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    std::thread::sleep(HOLD);
                    let _ = c.write_all(b"x");
                });
            }
        });
        addr
    })
}

async fn cpu() -> &'static str {
    spin(HOLD);
    "cpu"
}

async fn sleep() -> &'static str {
    std::thread::sleep(HOLD);
    "sleep"
}

async fn read() -> &'static str {
    let mut s = TcpStream::connect(peer()).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    "read"
}

async fn lock() -> &'static str {
    // Another thread holds the lock for `HOLD`; the handler waits for it on its worker.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _g = LOCK.lock().unwrap();
        tx.send(()).unwrap();
        std::thread::sleep(HOLD);
    });
    rx.recv().unwrap();
    let _g = LOCK.lock().unwrap();
    "lock"
}

#[derive(Clone, Copy, PartialEq)]
enum Install {
    ProbeFree,
    ProbeFreeHooks,
    Tower,
    Both,
    #[cfg(tokio_unstable)]
    Hooks,
}

impl Install {
    fn name(self) -> &'static str {
        match self {
            Install::ProbeFree => "monitor_runtime only (probe-free)",
            Install::ProbeFreeHooks => "monitor_runtime + count_threads (park hooks)",
            Install::Tower => "tower layer",
            Install::Both => "tower layer + monitor_runtime",
            #[cfg(tokio_unstable)]
            Install::Hooks => "poll hooks (tokio_unstable)",
        }
    }
}

/// The handler a stall report belongs to: by its route (the tower layer names it), else by its
/// cause (each handler holds its worker its own way; frames would need the symbols, which load
/// at idle priority and may not be in on a busy host).
fn route_of(s: &loopwatch::Stall) -> Option<usize> {
    let name = s.task.name.as_deref().unwrap_or_default();
    if let Some(i) = ROUTES.iter().position(|r| name.ends_with(r)) {
        return Some(i);
    }
    match s.cause {
        loopwatch::Cause::Cpu | loopwatch::Cause::Starved => Some(0),
        loopwatch::Cause::Syscall(sc) => match sc.name {
            Some("nanosleep" | "clock_nanosleep") => Some(1),
            Some("read" | "recvfrom") => Some(2),
            Some("futex") => Some(3),
            _ => None,
        },
        _ => None,
    }
}

fn measure(install: Install) -> [usize; 4] {
    let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
    let c = counts.clone();
    let (layer, guard) = loopwatch::builder()
        .ignore_env()
        .prometheus_addr(([127, 0, 0, 1], 0))
        .on_stall(move |s| {
            if s.state == loopwatch::StallState::Ended {
                if let Some(i) = route_of(s) {
                    c[i].fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .build()
        .unwrap();
    // The layer in a subscriber (no thread needs it as its default: the application's
    // tasks carry no span here).
    let _dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2).enable_all();
    #[cfg(tokio_unstable)]
    if install == Install::Hooks {
        guard.install_poll_hooks(&mut b);
    }
    if install == Install::ProbeFreeHooks {
        guard.count_threads(&mut b, "server");
    }
    let rt = b.build().unwrap();
    if matches!(
        install,
        Install::ProbeFree | Install::ProbeFreeHooks | Install::Both
    ) {
        guard.monitor_runtime(rt.handle(), "server");
    }
    let mut app = Router::new()
        .route("/cpu", get(cpu))
        .route("/sleep", get(sleep))
        .route("/read", get(read))
        .route("/lock", get(lock));
    if matches!(install, Install::Tower | Install::Both) {
        app = app.layer(loopwatch::tower::WatchLayer::for_guard(&guard));
    }
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    // Let the probe-free path learn the workers.
    let t = Instant::now();
    let watching = matches!(
        install,
        Install::ProbeFree | Install::ProbeFreeHooks | Install::Both
    );
    let ready = |s: &loopwatch::Snapshot| s.probe_free_ready && s.probe_free_followed >= 2;
    while watching && !ready(&guard.snapshot()) && t.elapsed() < Duration::from_secs(10) {
        let _ = fetch(addr, "/nowhere");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..REQUESTS {
        for r in ROUTES {
            fetch(addr, r);
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    // Ended reports held for their frames come out within 10 s.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(12)
        && counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<usize>()
            < 4 * REQUESTS
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    if std::env::var("RECALL_DEBUG").is_ok() {
        let snap = guard.snapshot();
        eprintln!(
            "{}: probe-free {} stalls, {} turned down; {:?}",
            install.name(),
            snap.probe_free_stalls,
            snap.probe_free_rejected,
            snap.stalls_by
        );
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(guard);
    std::array::from_fn(|i| counts[i].load(Ordering::Relaxed))
}

/// One HTTP/1.1 GET over a fresh connection; the status line.
fn fetch(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

fn main() {
    let installs = [
        Install::ProbeFree,
        Install::ProbeFreeHooks,
        Install::Tower,
        Install::Both,
        #[cfg(tokio_unstable)]
        Install::Hooks,
    ];
    println!("| install | CPU spin | thread::sleep | blocking read | std Mutex |");
    println!("|---|---:|---:|---:|---:|");
    for i in installs {
        let c = measure(i);
        println!(
            "| {} | {}/{REQUESTS} | {}/{REQUESTS} | {}/{REQUESTS} | {}/{REQUESTS} |",
            i.name(),
            c[0],
            c[1],
            c[2],
            c[3]
        );
    }
}
