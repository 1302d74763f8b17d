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

/// Held by each test of a grouped binary for its whole run: tests that time real threads
/// (spins, sleeps, stalls on purpose) run one at a time, so one test's load never changes
/// another's verdict. A test that failed (and so poisoned the lock) does not stop the rest.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a test waits for an ended report: an ended report whose frames are not ready is
/// held for them up to 10 s (the symbols load at idle priority, which a busy host may not give
/// for that long), so past that with a margin.
pub const ENDED_WAIT: Duration = Duration::from_secs(15);

pub struct Harness {
    pub guard: Guard,
    pub dispatch: Dispatch,
    pub stalls: Receiver<Stall>,
    /// Every report received so far, in order.
    pub seen: Arc<Mutex<Vec<Stall>>>,
    /// loopwatch's events (stall reports and notices) as its subscriber got them.
    pub events: Captured,
}

/// Builds `builder` (environment ignored) with a callback that forwards every stall report.
pub fn harness(mut builder: Builder) -> Harness {
    // Tests in one binary run side by side: each guard's listener takes a free port.
    let default_addr = loopwatch::MetricsExport::Prometheus(loopwatch::DEFAULT_PROMETHEUS_ADDR);
    if matches!(builder.config(), Ok(c) if c.metrics == default_addr) {
        builder = builder.prometheus_addr(([127, 0, 0, 1], 0));
    }
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
    let events = Captured::default();
    let dispatch = Dispatch::new(
        tracing_subscriber::registry()
            .with(layer)
            .with(events.clone()),
    );
    Harness {
        guard,
        dispatch,
        stalls: rx,
        seen,
        events,
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

    /// The ended report of a stall at least `min` long, or a panic listing what was seen.
    pub fn ended_stall(&self, min: Duration) -> Stall {
        self.wait_for(ENDED_WAIT, |s| {
            s.state == StallState::Ended && s.duration >= min
        })
        .unwrap_or_else(|| {
            let seen = self.seen.lock().unwrap();
            let states: Vec<_> = seen.iter().map(|s| (s.id, s.state, s.duration)).collect();
            panic!("no ended report of a stall of {min:?}: {states:?}")
        })
    }

    /// A builder for a current-thread runtime (`workers` 0) or a multi-thread one, with this
    /// harness' subscriber on its threads.
    pub fn builder(&self, workers: usize) -> tokio::runtime::Builder {
        let mut b = if workers == 0 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers);
            b
        };
        b.enable_all();
        self.with_dispatch(&mut b);
        b
    }
}

/// The same stall on a runtime whose free workers can steal the queued tasks leaves fewer
/// victims than on one worker (the relation, not a timing).
pub fn assert_stealing_lowers_victims(alone: &Stall, shared: &Stall) {
    eprintln!("alone: {alone}\nwith free workers: {shared}");
    assert!(shared.victims.tracked);
    assert!(
        shared.victims.count < alone.victims.count,
        "with free workers to steal them, fewer tasks wait: {} vs {}",
        shared.victims.count,
        alone.victims.count
    );
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
        h.guard.wait_for_symbols(Duration::from_secs(120)),
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
    h.wait_for(ENDED_WAIT, |s| {
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

/// `GET path` from `addr` over plain HTTP/1.1 (one request per connection): status and body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP header end in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the sample line `series` (name with labels, exactly as rendered) in a
/// Prometheus text exposition.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The sample lines of metric `name` (any labels).
pub fn series<'a>(exposition: &'a str, name: &str) -> Vec<&'a str> {
    exposition
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .collect()
}

/// One event of loopwatch's (target `loopwatch`): its level, target and fields.
pub type Seen = (
    tracing::Level,
    String,
    std::collections::BTreeMap<String, String>,
);

#[derive(Default, Clone)]
pub struct Captured(pub Arc<Mutex<Vec<Seen>>>);

struct Fields(std::collections::BTreeMap<String, String>);
impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        // loopwatch's events only: tokio's own (its waker traces under tokio_unstable, enabled
        // once any subscriber in the process wanted them) are not what this test is about.
        if event.metadata().target() != "loopwatch" {
            return;
        }
        let mut f = Fields(std::collections::BTreeMap::new());
        event.record(&mut f);
        self.0.lock().unwrap().push((
            *event.metadata().level(),
            event.metadata().target().to_string(),
            f.0,
        ));
    }
}
