//! Shared by the integration tests: a loopwatch with its stall reports on a channel, and
//! runtimes whose threads report to its subscriber (without a global default, so tests in one
//! binary stay apart).
#![allow(dead_code, unreachable_pub)]

use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loopwatch::{Builder, Guard, Stall, StallState};
use tracing::Dispatch;
use tracing_subscriber::prelude::*;

pub struct Harness {
    pub guard: Guard,
    pub dispatch: Dispatch,
    pub stalls: Receiver<Stall>,
    /// Every report received so far, in order.
    pub seen: Arc<Mutex<Vec<Stall>>>,
}

/// Builds `builder` (environment ignored) with a callback that forwards every stall report.
pub fn harness(builder: Builder) -> Harness {
    let (tx, rx) = channel();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let tx = Mutex::new(tx);
    let (layer, guard) = builder
        .ignore_env()
        .on_stall(move |s| {
            seen2.lock().unwrap().push(s.clone());
            let _ = tx.lock().unwrap().send(s.clone());
        })
        .build()
        .expect("loopwatch builds");
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer));
    Harness {
        guard,
        dispatch,
        stalls: rx,
        seen,
    }
}

impl Harness {
    /// A multi-thread runtime whose workers (and blocking threads) use this harness' subscriber.
    pub fn runtime(&self, workers: usize) -> tokio::runtime::Runtime {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers).enable_all();
        self.with_dispatch(&mut b);
        b.build().unwrap()
    }

    /// A current-thread runtime; block on it inside [`Harness::enter`].
    pub fn current_thread(&self) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    pub fn with_dispatch(&self, b: &mut tokio::runtime::Builder) {
        let d = self.dispatch.clone();
        b.on_thread_start(move || {
            // The runtime's threads live as long as the runtime: keep the default for good.
            std::mem::forget(tracing::dispatcher::set_default(&d));
        });
    }

    /// Makes this harness' subscriber the default on the calling thread while the guard lives.
    pub fn enter(&self) -> tracing::dispatcher::DefaultGuard {
        tracing::dispatcher::set_default(&self.dispatch)
    }

    /// Waits up to `timeout` for a report that satisfies `pred`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Stall) -> bool) -> Option<Stall> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.stalls.recv_timeout(left) {
                Ok(s) if pred(&s) => return Some(s),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Waits up to `timeout` until the reports seen so far satisfy `pred`; returns them.
    pub fn wait_seen(&self, timeout: Duration, pred: impl Fn(&[Stall]) -> bool) -> Vec<Stall> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.seen.lock().unwrap().clone();
            if pred(&seen) || Instant::now() >= deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn wait_running(&self, timeout: Duration) -> Option<Stall> {
        self.wait_for(timeout, |s| s.state == StallState::Running)
    }

    pub fn wait_ended(&self, id: u64, timeout: Duration) -> Option<Stall> {
        self.wait_for(timeout, |s| s.state == StallState::Ended && s.id == id)
    }
}

/// Burns CPU on this thread for `d` (the kind of poll loopwatch exists to catch).
#[inline(never)]
pub fn spin_for(d: Duration) {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed() < d {
        for i in 0..1000 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
    std::hint::black_box(x);
}

/// Spins until `stop` is set, or `limit` passes (so a failing test still ends).
#[inline(never)]
pub fn spin_until(stop: &std::sync::atomic::AtomicBool, limit: Duration) {
    let start = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Acquire) && start.elapsed() < limit {
        std::hint::spin_loop();
    }
}

/// A loopwatch with diagnosis on and its symbol tables loaded, so reports carry stack frames.
pub fn diagnosing(threshold: Duration) -> Harness {
    let h = harness(loopwatch::builder().threshold(threshold));
    assert!(
        h.guard.wait_for_symbols(Duration::from_secs(30)),
        "symbol tables load"
    );
    h
}

/// Runs `fut` as a watched task named `name` on a 2-worker runtime and returns the ended
/// report of its stall.
pub fn stall_of<F>(h: &Harness, name: &str, fut: F) -> Stall
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = h.runtime(2);
    rt.block_on(rt.spawn(h.guard.watch(name, fut))).unwrap();
    h.wait_for(Duration::from_secs(10), |s| {
        s.state == StallState::Ended && s.task.name.as_deref() == Some(name)
    })
    .unwrap_or_else(|| panic!("no ended stall for {name}: {:#?}", h.seen.lock().unwrap()))
}

/// The names of the first `n` frames shown of a stall's stack.
pub fn first_frames(s: &Stall, n: usize) -> Vec<String> {
    s.stack
        .as_ref()
        .map(|st| {
            st.frames
                .iter()
                .take(n)
                .map(|f| f.function.clone().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}
