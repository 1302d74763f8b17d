//! The probe-free path on a real axum server (stable tokio, as `#[tokio::main]` builds it, no
//! layer, no span, handlers untouched): only `monitor_runtime` is called. A handler that blocks
//! its worker in a system call is reported, named by its stack; blocking work off the workers
//! (`spawn_blocking`, `block_in_place`) never is.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use loopwatch::{Cause, LayerKind, StallState};

use super::tower_layer::{get_body, server_runtime};

const THRESHOLD: Duration = Duration::from_millis(20);
const HOLD: Duration = Duration::from_millis(80);

/// Sleeps on its worker (the seeds' `std::thread::sleep` in a handler).
async fn sleepy() -> &'static str {
    std::thread::sleep(HOLD);
    "slept"
}

/// Reads from a socket with std's blocking API, on its worker.
async fn blocking_read() -> String {
    let addr = SLOW_PEER.get().copied().expect("the slow peer runs");
    let mut s = TcpStream::connect(addr).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    "read".into()
}

/// Blocks off the workers, as it should: never a stall of the async layer.
async fn offloaded() -> &'static str {
    tokio::task::spawn_blocking(|| std::thread::sleep(HOLD * 2))
        .await
        .unwrap();
    tokio::task::block_in_place(|| std::thread::sleep(HOLD * 2));
    "offloaded"
}

/// Computes on its worker for a while (the probe-free path cannot see CPU; here it keeps a
/// worker from parking while `/offloaded` runs on the other).
async fn spin() -> &'static str {
    common::spin_for(HOLD * 10);
    "spun"
}

static SLOW_PEER: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();

/// A peer that answers each connection one byte after `HOLD`.
fn slow_peer() -> SocketAddr {
    *SLOW_PEER.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                std::thread::spawn(move || {
                    std::thread::sleep(HOLD);
                    let _ = c.write_all(b"x");
                });
            }
        });
        addr
    })
}

fn ended_probe_free(
    h: &common::Harness,
    pred: impl Fn(&loopwatch::Stall) -> bool,
) -> loopwatch::Stall {
    h.wait_for(common::ENDED_WAIT, |s| {
        s.probe_free && s.state == StallState::Ended && pred(s)
    })
    .unwrap_or_else(|| {
        let seen: Vec<_> = h
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| (s.id, s.state, s.probe_free, s.cause.to_string()))
            .collect();
        let snap = h.guard.snapshot();
        panic!(
            "no probe-free stall: {seen:?}; stalls {}, rejected {}, workers {}, off: {:?}",
            snap.probe_free_stalls,
            snap.probe_free_rejected,
            snap.probe_free_workers,
            snap.probe_free_error
        )
    })
}

/// Serves `app` on `rt` (loopback, any port), sends `/fast` until loopwatch has learnt both
/// workers (its learner tasks run on them) and loaded the role ranges; the address.
fn serve_learnt(h: &common::Harness, rt: &tokio::runtime::Runtime, app: Router) -> SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = |s: &loopwatch::Snapshot| s.probe_free_workers >= 2 && s.probe_free_ready;
    while !ready(&h.guard.snapshot()) && Instant::now() < deadline {
        assert_eq!(get_body(addr, "/fast").0, 200);
        std::thread::sleep(Duration::from_millis(20));
    }
    let snap = h.guard.snapshot();
    assert_eq!(snap.probe_free_workers, 2, "{snap:?}");
    assert!(snap.probe_free_ready, "{snap:?}");
    addr
}

#[test]
fn an_uninstrumented_handler_blocking_its_worker_is_reported_with_no_probe() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = server_runtime();
    h.guard.monitor_runtime(rt.handle(), "server");
    slow_peer();
    let app = Router::new()
        .route("/sleepy", get(sleepy))
        .route("/read", get(blocking_read))
        .route("/offloaded", get(offloaded))
        .route("/spin", get(spin))
        .route("/fast", get(|| async { "fast" }));
    let addr = serve_learnt(&h, &rt, app);
    let snap = h.guard.snapshot();
    assert_eq!(snap.probe_free_error, None);
    assert_eq!(
        snap.polls, 0,
        "nothing of loopwatch's in the application's tasks"
    );

    assert_eq!(get_body(addr, "/sleepy"), (200, "slept".into()));
    let s = ended_probe_free(&h, |_| true);
    eprintln!("{s}");
    assert_eq!(s.layer, LayerKind::Async);
    assert!(
        matches!(s.cause, Cause::Syscall(sc) if matches!(sc.name, Some("nanosleep" | "clock_nanosleep"))),
        "{s}"
    );
    assert!(s.duration + s.uncertainty >= HOLD, "{s}");
    // Named by its frames (symbolized at idle priority: on a saturated host an ended report
    // goes out without them after 10 s, unnamed).
    if s.stack.is_some() {
        assert!(s.task.named_by_stack, "{s}");
        assert_eq!(
            s.task.name.as_deref(),
            Some("services::probe_free::sleepy"),
            "{s}"
        );
    } else {
        assert_eq!(s.task.name, None, "{s}");
    }
    assert!(
        s.worker.tid.is_some() && s.worker.thread_name.is_some(),
        "{s}"
    );

    assert_eq!(get_body(addr, "/read"), (200, "read".into()));
    let r = ended_probe_free(&h, |r| r.id != s.id);
    eprintln!("{r}");
    assert!(
        matches!(r.cause, Cause::Syscall(sc) if matches!(sc.name, Some("read" | "recvfrom"))),
        "{r}"
    );
    if r.stack.is_some() {
        assert_eq!(
            r.task.name.as_deref(),
            Some("services::probe_free::blocking_read"),
            "{r}"
        );
    }
    assert_eq!(h.guard.snapshot().probe_free_stalls, 2);

    // Blocking work off the async workers is never a stall of theirs: a blocking-pool job
    // (its thread was never learnt), and `block_in_place` on a learnt worker, which hands
    // its core to another thread first (its stack says so: turned down, counted). The other
    // worker spins meanwhile, so tokio's counters never say every worker is parked and the
    // watchdog reads the learnt threads all along.
    let spinner = std::thread::spawn(move || get_body(addr, "/spin"));
    std::thread::sleep(HOLD);
    assert_eq!(get_body(addr, "/offloaded"), (200, "offloaded".into()));
    assert_eq!(spinner.join().unwrap(), (200, "spun".into()));
    std::thread::sleep(THRESHOLD * 2);
    let snap = h.guard.snapshot();
    assert_eq!(snap.probe_free_stalls, 2, "{:#?}", h.seen.lock().unwrap());
    // The worker in `block_in_place` is learnt: turned down once, always. The blocking-pool
    // thread is turned down too if it was already followed (by its name, found once a
    // second), which depends on when the pool started it.
    assert!(
        (1..=2).contains(&snap.probe_free_rejected),
        "{}",
        snap.probe_free_rejected
    );
    assert_eq!(snap.stalls_in_progress, 0);
    rt.shutdown_timeout(Duration::from_secs(1));
}

#[test]
fn on_a_current_thread_runtime_the_thread_in_block_on_is_the_worker() {
    // `#[tokio::main(flavor = "current_thread")]`: the thread that blocks on the main future
    // runs every task.
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    h.guard.monitor_runtime(rt.handle(), "main");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/sleepy", get(sleepy))
        .route("/fast", get(|| async { "fast" }));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        rt.block_on(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap()
        })
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.guard.snapshot().probe_free_ready && Instant::now() < deadline {
        assert_eq!(get_body(addr, "/fast").0, 200);
        std::thread::sleep(Duration::from_millis(20));
    }
    let snap = h.guard.snapshot();
    assert!(
        snap.probe_free_ready && snap.probe_free_workers == 1,
        "{snap:?}"
    );
    assert_eq!(get_body(addr, "/sleepy"), (200, "slept".into()));
    let s = ended_probe_free(&h, |_| true);
    eprintln!("{s}");
    assert!(
        matches!(s.cause, Cause::Syscall(sc) if matches!(sc.name, Some("nanosleep" | "clock_nanosleep"))),
        "{s}"
    );
    assert!(s.duration + s.uncertainty >= HOLD, "{s}");
    stop_tx.send(()).unwrap();
    server.join().unwrap();
}

/// The seeds' handler: 5 ms of `std::thread::sleep` on its worker.
async fn seed() -> &'static str {
    std::thread::sleep(Duration::from_millis(5));
    "seed"
}

/// The seeds' shape with no code change: an uninstrumented axum handler that waits 5 ms with
/// `std::thread::sleep`, under load from 8 clients, none of its polls a stall. With only
/// `monitor_runtime`, the followed workers' time asleep in the call inside a task's poll is
/// sampled and, over a 10 s window, reported as a thousand cuts under `(no probe)`.
#[test]
fn many_short_blocking_handlers_with_no_probe_are_a_thousand_cuts() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder());
    // The notice names the code by a sampled stack's top frame once the symbols are in.
    h.guard.wait_for_symbols(Duration::from_secs(300));
    let rt = server_runtime();
    h.guard.monitor_runtime(rt.handle(), "server");
    let app = Router::new()
        .route("/seed", get(seed))
        .route("/fast", get(|| async { "fast" }));
    let addr = serve_learnt(&h, &rt, app);

    let until = Instant::now() + Duration::from_millis(10_800);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                while Instant::now() < until {
                    assert_eq!(common::http_get(addr, "/seed").unwrap().0, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let snap = h.guard.snapshot();
    let asleep: f64 = snap
        .time_in_polls
        .iter()
        .filter(|t| {
            t.kind.label() == "(no probe)"
                && matches!(t.syscall.as_deref(), Some("clock_nanosleep" | "nanosleep"))
        })
        .fold(0.0, |a, t| a + t.time.as_secs_f64());
    // Two workers asleep most of 10.8 s: at least half of one worker's time, sampled.
    assert!(asleep >= 5.0, "{asleep} s: {:#?}", snap.time_in_polls);
    assert!(
        snap.thousand_cuts_reports >= 1,
        "no thousand-cuts report: {snap:#?}"
    );
    assert_eq!(snap.polls, 0, "no probe in the application's tasks");
    // The notice as the application's subscriber got it: the kind, the call and, where the
    // symbolizer answered within its patience, the handler by name.
    // (Held up to 2 s for its frames.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let cut = loop {
        let events = h.events.0.lock().unwrap().clone();
        let cut = events
            .iter()
            .find(|(_, _, f)| f.get("notice").map(String::as_str) == Some("thousand_cuts"));
        if let Some((_, _, f)) = cut {
            break f.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no thousand-cuts event: {events:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(cut["task.kind"], "(no probe)", "{cut:#?}");
    assert!(
        matches!(cut["syscall"].as_str(), "clock_nanosleep" | "nanosleep"),
        "{cut:#?}"
    );
    let frame = &cut["stack.top_frame"];
    eprintln!("{}", cut["message"]);
    if !frame.is_empty() {
        assert_eq!(frame, "services::probe_free::seed", "{cut:#?}");
        assert!(cut["message"].contains("(in services::probe_free::seed)"));
    }
    rt.shutdown_timeout(Duration::from_secs(1));
}

static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits on a `std::sync::Mutex` another thread holds: asleep in `futex` on its worker.
async fn locked() -> &'static str {
    drop(LOCK.lock().unwrap());
    "locked"
}

/// With the runtime's park hooks (`count_threads`), a worker asleep in `futex` while at work
/// (a std Mutex held elsewhere) is a stall too; without them `futex` is where an idle worker
/// parks, and never counts.
#[test]
fn with_the_park_hooks_a_handler_waiting_on_a_std_mutex_is_reported() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2).enable_all();
    h.guard.count_threads(&mut b, "server");
    let rt = b.build().unwrap();
    h.guard.monitor_runtime(rt.handle(), "server");
    let app = Router::new()
        .route("/locked", get(locked))
        .route("/fast", get(|| async { "fast" }));
    let addr = serve_learnt(&h, &rt, app);

    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let _g = LOCK.lock().unwrap();
        held_tx.send(()).unwrap();
        std::thread::sleep(HOLD * 2);
    });
    held_rx.recv().unwrap();
    assert_eq!(get_body(addr, "/locked"), (200, "locked".into()));
    holder.join().unwrap();
    let s = ended_probe_free(&h, |_| true);
    eprintln!("{s}");
    assert!(
        matches!(s.cause, Cause::Syscall(sc) if sc.name == Some("futex")),
        "{s}"
    );
    assert!(s.duration + s.uncertainty >= HOLD, "{s}");
    rt.shutdown_timeout(Duration::from_secs(1));
}
