//! What loopwatch's probes cost, measured in one process on a 2-worker runtime, against the same
//! workload bare and under tokio-metrics' `TaskMonitor`.
//!
//! ```sh
//! cargo bench --bench overhead                                   # stable probes
//! RUSTFLAGS="--cfg tokio_unstable" cargo bench --bench overhead  # + task spans and poll hooks
//! LOOPWATCH_BENCH_SCALE=0.05 cargo bench --bench overhead        # a quick smoke run
//! ```
//!
//! Workloads: W1 = 20M tiny polls (tasks that `yield_now` in a loop), W2 = 2M short spawned
//! tasks, W3 = 1M polls of about 3 µs each. Each variant runs `ROUNDS` times, interleaved with
//! the others, and the fastest round is kept. CPU time is the process' user + system time
//! (getrusage), so the watchdog's own CPU is included.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;
use tracing_subscriber::prelude::*;

const ROUNDS: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Bare,
    TaskMonitor,
    /// The `watch()` wrapper at defaults: it also notes wakes (schedule delay, victims).
    Watch,
    /// The same with `schedule_delay(false)`: timing only, the waker left alone.
    WatchNoWakes,
    /// Each task instrumented with a span, registry only (what tracing itself costs).
    SpanRegistry,
    /// The same, with loopwatch's layer added (what loopwatch adds on the stable span path).
    SpanLoopwatch,
    #[cfg(tokio_unstable)]
    TaskSpansRegistry,
    #[cfg(tokio_unstable)]
    TaskSpansLoopwatch,
    /// tokio's poll hooks with empty closures: what tokio's hook dispatch itself costs.
    #[cfg(tokio_unstable)]
    HooksEmpty,
    /// The same with tokio's schedule-latency tracking on (what the schedule-delay probe costs
    /// tokio: a clock read per wake and per poll).
    #[cfg(tokio_unstable)]
    HooksEmptySched,
    #[cfg(tokio_unstable)]
    Hooks,
    #[cfg(tokio_unstable)]
    HooksPrecise,
}

impl Variant {
    fn all() -> Vec<Variant> {
        #[allow(unused_mut)] // extended under tokio_unstable
        let mut v = vec![
            Variant::Bare,
            Variant::TaskMonitor,
            Variant::Watch,
            Variant::WatchNoWakes,
            Variant::SpanRegistry,
            Variant::SpanLoopwatch,
        ];
        #[cfg(tokio_unstable)]
        v.extend([
            Variant::TaskSpansRegistry,
            Variant::TaskSpansLoopwatch,
            Variant::HooksEmpty,
            Variant::HooksEmptySched,
            Variant::Hooks,
            Variant::HooksPrecise,
        ]);
        v
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Bare => "bare",
            Variant::TaskMonitor => "tokio-metrics TaskMonitor",
            Variant::Watch => "loopwatch watch() wrapper",
            Variant::WatchNoWakes => "loopwatch watch(), schedule_delay off",
            Variant::SpanRegistry => "span per task, registry only",
            Variant::SpanLoopwatch => "span per task + loopwatch layer",
            #[cfg(tokio_unstable)]
            Variant::TaskSpansRegistry => "tokio task spans, registry only",
            #[cfg(tokio_unstable)]
            Variant::TaskSpansLoopwatch => "tokio task spans + loopwatch layer",
            #[cfg(tokio_unstable)]
            Variant::HooksEmpty => "tokio poll hooks, empty closures",
            #[cfg(tokio_unstable)]
            Variant::HooksEmptySched => "tokio poll hooks, empty, + schedule latency",
            #[cfg(tokio_unstable)]
            Variant::Hooks => "loopwatch poll hooks",
            #[cfg(tokio_unstable)]
            Variant::HooksPrecise => "loopwatch poll hooks, precise_start",
        }
    }

    /// The variant a loopwatch variant is compared with to see what loopwatch itself adds.
    fn baseline(self) -> Variant {
        match self {
            Variant::SpanLoopwatch => Variant::SpanRegistry,
            #[cfg(tokio_unstable)]
            Variant::TaskSpansLoopwatch => Variant::TaskSpansRegistry,
            #[cfg(tokio_unstable)]
            Variant::HooksEmptySched => Variant::HooksEmpty,
            // loopwatch's hooks leave tokio's schedule-latency tracking off by default
            // (victims come from the worker's queue): compared with empty hooks.
            #[cfg(tokio_unstable)]
            Variant::Hooks | Variant::HooksPrecise => Variant::HooksEmpty,
            _ => Variant::Bare,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    W1,
    W2,
    W3,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::W1 => "W1 20M tiny polls",
            Workload::W2 => "W2 2M spawned tasks",
            Workload::W3 => "W3 1M polls of ~3us",
        }
    }
}

/// Everything a run needs: a runtime with or without probes, and how to wrap a task.
struct Setup {
    rt: tokio::runtime::Runtime,
    variant: Variant,
    guard: Option<loopwatch::Guard>,
    monitor: tokio_metrics::TaskMonitor,
    /// The subscriber of the span variants, also set on the thread that spawns the tasks.
    dispatch: Option<tracing::Dispatch>,
}

impl Setup {
    fn new(variant: Variant) -> Setup {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2).enable_all();
        let mut guard = None;
        let needs_guard = !matches!(
            variant,
            Variant::Bare | Variant::TaskMonitor | Variant::SpanRegistry
        );
        #[cfg(tokio_unstable)]
        let needs_guard = needs_guard
            && !matches!(
                variant,
                Variant::TaskSpansRegistry | Variant::HooksEmpty | Variant::HooksEmptySched
            );
        #[cfg(tokio_unstable)]
        if variant == Variant::HooksEmptySched {
            b.track_task_schedule_latency();
        }
        #[cfg(tokio_unstable)]
        if matches!(variant, Variant::HooksEmpty | Variant::HooksEmptySched) {
            b.on_before_task_poll(|m| {
                std::hint::black_box(m);
            })
            .on_after_task_poll(|m| {
                std::hint::black_box(m);
            });
        }
        let mut layer = None;
        if needs_guard {
            #[allow(unused_mut)]
            let mut lb = loopwatch::builder()
                .ignore_env()
                .prometheus_addr(([127, 0, 0, 1], 0));
            #[cfg(tokio_unstable)]
            if variant == Variant::HooksPrecise {
                lb = lb.precise_start(true);
            }
            if variant == Variant::WatchNoWakes {
                lb = lb.schedule_delay(false);
            }
            lb = lb.threshold(Duration::from_millis(10));
            let (l, g) = lb.build().expect("loopwatch builds");
            layer = Some(l);
            guard = Some(g);
        }
        #[cfg(tokio_unstable)]
        if matches!(variant, Variant::Hooks | Variant::HooksPrecise) {
            guard.as_ref().unwrap().install_poll_hooks(&mut b);
        }
        let with_subscriber = matches!(variant, Variant::SpanRegistry | Variant::SpanLoopwatch);
        #[cfg(tokio_unstable)]
        let with_subscriber = with_subscriber
            || matches!(
                variant,
                Variant::TaskSpansRegistry | Variant::TaskSpansLoopwatch
            );
        let mut dispatch = None;
        if with_subscriber {
            let d = match layer.take() {
                Some(l) => tracing::Dispatch::new(tracing_subscriber::registry().with(l)),
                None => tracing::Dispatch::new(tracing_subscriber::registry()),
            };
            dispatch = Some(d.clone());
            b.on_thread_start(move || {
                std::mem::forget(tracing::dispatcher::set_default(&d));
            });
        }
        Setup {
            rt: b.build().unwrap(),
            variant,
            guard,
            monitor: tokio_metrics::TaskMonitor::new(),
            dispatch,
        }
    }

    /// Spawns `fut` wrapped as the variant wants.
    fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        spawn_as(self.variant, self.guard.as_ref(), &self.monitor, fut)
    }
}

fn spawn_as<F>(
    variant: Variant,
    guard: Option<&loopwatch::Guard>,
    monitor: &tokio_metrics::TaskMonitor,
    fut: F,
) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    match variant {
        Variant::TaskMonitor => tokio::spawn(monitor.instrument(fut)),
        Variant::Watch | Variant::WatchNoWakes => tokio::spawn(guard.unwrap().watch("bench", fut)),
        Variant::SpanRegistry | Variant::SpanLoopwatch => {
            tokio::spawn(fut.instrument(tracing::info_span!("bench")))
        }
        _ => tokio::spawn(fut),
    }
}

/// Process CPU time (user + system).
fn cpu_time() -> Duration {
    #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
    {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the struct it is given.
        let ru = unsafe {
            libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
            ru.assume_init()
        };
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
    #[cfg(not(all(target_os = "linux", not(loopwatch_portable))))]
    {
        Duration::ZERO
    }
}

/// The memory symbols cost: each variant (names from the symbol table; with
/// `stack_locations`, `file:line` from the debug info) in a fresh process of this binary, its
/// RSS (heap and mapped file pages apart) before the first stall and once that stall's report
/// has its frames, and how long the frames took.
fn symbols_cost() {
    let exe = std::env::current_exe().expect("the bench's own path");
    let size = std::fs::metadata(&exe).map(|m| m.len()).unwrap_or(0);
    println!();
    println!(
        "## Symbols: RSS before and after the first stack (this bench binary, {:.0} MB)",
        size as f64 / 1e6
    );
    println!();
    println!("| frames | RSS before MiB (heap / file) | after the first stack MiB (heap / file) | first frames after |");
    println!("|---|---:|---:|---:|");
    for (variant, label) in [
        ("names", "names (default)"),
        ("locations", "`stack_locations(true)`"),
    ] {
        let out = std::process::Command::new(&exe)
            .env("LOOPWATCH_BENCH_ONLY", format!("symbols:{variant}"))
            .output()
            .expect("runs itself");
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().find_map(|l| l.strip_prefix("symbols ")) {
            Some(row) => println!("| {label} | {row} |"),
            None => println!(
                "| {label} | failed: {} |",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
        }
    }
}

/// Memory per live task: a million tasks (times the scale), each instrumented with a span and
/// pending, polled once each, under tracing's registry alone and with loopwatch's layer (each
/// in a fresh process of this binary); RSS after they were all polled, and how many spans the
/// layer could not follow (it follows 2^21 live spans by default).
fn live_cost(scale: f64) {
    let exe = std::env::current_exe().expect("the bench's own path");
    let tasks = ((1_000_000.0 * scale) as u64).max(1_000);
    println!();
    println!("## Live tasks: {tasks} pending tasks, one span each, polled once");
    println!();
    println!("| subscriber | RSS MiB | spans not followed |");
    println!("|---|---:|---:|");
    let mut rss = Vec::new();
    for (variant, label) in [
        ("registry", "registry only"),
        ("layer", "registry + loopwatch layer"),
    ] {
        let out = std::process::Command::new(&exe)
            .env("LOOPWATCH_BENCH_ONLY", format!("live:{variant}"))
            .env("LOOPWATCH_BENCH_SCALE", scale.to_string())
            .output()
            .expect("runs itself");
        let text = String::from_utf8_lossy(&out.stdout);
        let row = text.lines().find_map(|l| {
            let mut it = l.strip_prefix("live ")?.split_whitespace();
            Some((it.next()?.parse::<u64>().ok()?, it.next()?.to_string()))
        });
        match row {
            Some((kib, dropped)) => {
                println!("| {label} | {:.1} | {dropped} |", kib as f64 / 1024.0);
                rss.push(kib);
            }
            None => println!(
                "| {label} | failed: {} | |",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
        }
    }
    if let [registry, layer] = rss[..] {
        println!();
        println!(
            "loopwatch's layer: {:.0} bytes per live task (RSS difference / tasks)",
            (layer.saturating_sub(registry) * 1024) as f64 / tasks as f64
        );
    }
}

fn live_child(variant: &str, scale: f64) {
    let tasks = ((1_000_000.0 * scale) as u64).max(1_000);
    let mut guard = None;
    let d = if variant == "layer" {
        let (l, g) = loopwatch::builder()
            .ignore_env()
            .diagnose(false)
            .metrics(loopwatch::MetricsExport::Off)
            .build()
            .expect("loopwatch builds");
        guard = Some(g);
        tracing::Dispatch::new(tracing_subscriber::registry().with(l))
    } else {
        tracing::Dispatch::new(tracing_subscriber::registry())
    };
    let _default = tracing::dispatcher::set_default(&d);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let polled = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        for _ in 0..tasks {
            let polled = polled.clone();
            tokio::spawn(
                async move {
                    polled.fetch_add(1, Ordering::Relaxed);
                    std::future::pending::<()>().await
                }
                .instrument(tracing::info_span!("live")),
            );
        }
        while polled.load(Ordering::Relaxed) < tasks {
            tokio::task::yield_now().await;
        }
    });
    let dropped = guard.as_ref().map_or(0, |g| g.snapshot().dropped_spans);
    println!("live {} {dropped}", rss_kib().0);
    // Exit without tearing a million tasks down one by one.
    std::process::exit(0);
}

/// The stall's code: a function of its own, so its frame is in the symbol table (code inlined
/// into tokio's or loopwatch's generic functions is named by them, and folded, without the
/// debug info's inlined frames).
#[inline(never)]
fn symbols_spin(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

/// One variant of [`symbols_cost`], in its own process: one 100 ms CPU stall with stacks on.
fn symbols_child(locations: bool) {
    let rss = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| -> f64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        (field("RssAnon:"), field("RssFile:"))
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    let (_layer, guard) = loopwatch::builder()
        .ignore_env()
        .metrics(loopwatch::MetricsExport::Off)
        .stack_locations(locations)
        .on_stall(move |s| {
            if s.stack.as_ref().is_some_and(|st| !st.frames.is_empty()) {
                let _ = tx.try_send(());
            }
        })
        .build()
        .expect("loopwatch starts");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    rt.block_on(async {}); // the runtime's threads are up
    std::thread::sleep(Duration::from_millis(200));
    let before = rss();
    let t = Instant::now();
    rt.block_on(rt.spawn(guard.watch("stall", async {
        symbols_spin(Duration::from_millis(100));
    })))
    .unwrap();
    let took = rx
        .recv_timeout(Duration::from_secs(60))
        .map(|_| t.elapsed());
    let after = rss();
    match took {
        Ok(took) => println!(
            "symbols {:.1} / {:.1} | {:.1} / {:.1} | {:.0} ms",
            before.0,
            before.1,
            after.0,
            after.1,
            took.as_secs_f64() * 1e3
        ),
        Err(_) => println!("symbols no frames within 60 s"),
    }
}

/// Resets the peak RSS (VmHWM) so the next reading is this run's own peak (Linux >= 4.0).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// (current RSS, peak RSS) in KiB, from /proc.
fn rss_kib() -> (u64, u64) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return (0, 0);
    };
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Iterations of a cheap loop that take about 3 µs here.
fn calibrate_3us() -> u64 {
    let mut n = 1000u64;
    loop {
        let t = Instant::now();
        for _ in 0..100 {
            work(n);
        }
        let per = t.elapsed() / 100;
        if per >= Duration::from_micros(3) || n > 1 << 30 {
            return (n as f64 * 3_000.0 / per.as_nanos().max(1) as f64) as u64;
        }
        n *= 2;
    }
}

#[inline(never)]
fn work(n: u64) -> u64 {
    let mut x = 0u64;
    for i in 0..n {
        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
    }
    x
}

struct Sizes {
    w1_tasks: u64,
    w1_yields: u64,
    w2_tasks: u64,
    w3_tasks: u64,
    w3_polls: u64,
    spin: u64,
}

/// `LOOPWATCH_BENCH_SCALE` (default 1).
fn scale() -> f64 {
    std::env::var("LOOPWATCH_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0)
}

fn sizes(scale: f64) -> Sizes {
    let sc = |n: u64| ((n as f64 * scale) as u64).max(1);
    Sizes {
        w1_tasks: 1000,
        w1_yields: sc(20_000),
        w2_tasks: sc(2_000_000),
        w3_tasks: 100,
        w3_polls: sc(10_000),
        spin: calibrate_3us(),
    }
}

/// W2's peak RSS for variant `vi`, from one run in a fresh process of this binary (VmHWM
/// cannot be reset on every kernel, and the variants before it would set it).
fn w2_peak_rss_kib(vi: usize) -> Option<u64> {
    let out = std::process::Command::new(std::env::current_exe().ok()?)
        .env("LOOPWATCH_BENCH_ONLY", format!("w2-rss:{vi}"))
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("peak ")?.trim().parse().ok())
}

/// Runs one workload; returns the number of polls it made.
fn run(setup: &Setup, w: Workload, s: &Sizes) -> u64 {
    let _default = setup
        .dispatch
        .as_ref()
        .map(tracing::dispatcher::set_default);
    let spin = s.spin;
    match w {
        Workload::W1 => {
            let (tasks, yields) = (s.w1_tasks, s.w1_yields);
            setup.rt.block_on(async {
                let hs: Vec<_> = (0..tasks)
                    .map(|_| {
                        setup.spawn(async move {
                            for _ in 0..yields {
                                tokio::task::yield_now().await;
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.await.unwrap();
                }
            });
            tasks * (yields + 1)
        }
        Workload::W2 => {
            let total = s.w2_tasks;
            let variant = setup.variant;
            let guard = setup.guard.as_ref();
            let monitor = &setup.monitor;
            setup.rt.block_on(async {
                let mut left = total;
                while left > 0 {
                    let batch = left.min(1024);
                    left -= batch;
                    let hs: Vec<_> = (0..batch)
                        .map(|i| {
                            spawn_as(variant, guard, monitor, async move {
                                std::hint::black_box(i);
                            })
                        })
                        .collect();
                    for h in hs {
                        h.await.unwrap();
                    }
                }
            });
            total
        }
        Workload::W3 => {
            let (tasks, polls) = (s.w3_tasks, s.w3_polls);
            setup.rt.block_on(async {
                let hs: Vec<_> = (0..tasks)
                    .map(|_| {
                        setup.spawn(async move {
                            for _ in 0..polls {
                                std::hint::black_box(work(spin));
                                tokio::task::yield_now().await;
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.await.unwrap();
                }
            });
            tasks * (polls + 1)
        }
    }
}

#[derive(Clone, Copy)]
struct Measure {
    wall: Duration,
    cpu: Duration,
    polls: u64,
    peak_rss: u64,
}

/// Without the `otlp` feature there is no export to measure.
#[cfg(not(feature = "otlp"))]
fn otlp_cost(_scale: f64) {
    println!("OTLP export cost: not measured (run with --features otlp)");
}

fn main() {
    match std::env::var("LOOPWATCH_BENCH_ONLY").as_deref() {
        Ok("watchdog") => {
            watchdog_cost();
            return;
        }
        Ok("otlp") => {
            otlp_cost(1.0);
            return;
        }
        Ok("latency") => {
            detection_latency(1.0);
            return;
        }
        Ok(v) if v.starts_with("instructions:") => {
            instructions(&v["instructions:".len()..]);
            return;
        }
        Ok("symbols") => {
            symbols_cost();
            return;
        }
        Ok(v) if v.starts_with("w2-rss:") => {
            if let Some(v) = v["w2-rss:".len()..]
                .parse::<usize>()
                .ok()
                .and_then(|i| Variant::all().get(i).copied())
            {
                let setup = Setup::new(v);
                run(&setup, Workload::W2, &sizes(scale()));
                println!("peak {}", rss_kib().1);
            }
            return;
        }
        Ok(v) if v.starts_with("symbols:") => {
            symbols_child(&v["symbols:".len()..] == "locations");
            return;
        }
        Ok("live") => {
            live_cost(1.0);
            return;
        }
        Ok(v) if v.starts_with("live:") => {
            live_child(&v["live:".len()..], scale());
            return;
        }
        _ => {}
    }
    // `cargo bench` passes `--bench`; ignore arguments.
    let scale = scale();
    let sizes = sizes(scale);
    let variants = Variant::all();
    let workloads = [Workload::W1, Workload::W2, Workload::W3];
    println!(
        "loopwatch overhead bench: scale {scale}, {ROUNDS} rounds (best kept), 2 workers, tokio_unstable: {}",
        cfg!(tokio_unstable)
    );
    let mut best: Vec<Vec<Option<Measure>>> = vec![vec![None; variants.len()]; workloads.len()];
    for round in 0..ROUNDS {
        for (wi, &w) in workloads.iter().enumerate() {
            for (vi, &v) in variants.iter().enumerate() {
                let setup = Setup::new(v);
                reset_peak_rss();
                let (c0, t0) = (cpu_time(), Instant::now());
                let polls = run(&setup, w, &sizes);
                let m = Measure {
                    wall: t0.elapsed(),
                    cpu: cpu_time() - c0,
                    polls,
                    peak_rss: rss_kib().1,
                };
                if let Some(g) = &setup.guard {
                    // On a shared 2-core host a worker can be preempted mid-poll for longer than
                    // the threshold: that is a real (starved) stall, so it is shown, not hidden.
                    let stalls = g.snapshot().stalls_total;
                    if stalls > 0 {
                        eprintln!("{} / {}: {stalls} stall(s) seen", v.name(), w.name());
                    }
                }
                drop(setup);
                let slot = &mut best[wi][vi];
                if slot.is_none_or(|b| m.cpu < b.cpu) {
                    *slot = Some(m);
                }
            }
        }
        eprintln!("round {} done", round + 1);
    }
    // W2's peak RSS per variant, each from a process of its own.
    for (vi, _) in variants.iter().enumerate() {
        let wi = workloads.iter().position(|&w| w == Workload::W2).unwrap();
        if let (Some(m), Some(kib)) = (best[wi][vi].as_mut(), w2_peak_rss_kib(vi)) {
            m.peak_rss = kib;
        }
    }
    for (wi, &w) in workloads.iter().enumerate() {
        println!();
        println!("{}", w.name());
        println!(
            "| variant | wall ms | CPU ms | wall ratio | CPU ratio | vs | CPU ns added / poll | peak RSS MiB |"
        );
        println!("|---|---:|---:|---:|---:|---|---:|---:|");
        for (vi, &v) in variants.iter().enumerate() {
            let m = best[wi][vi].unwrap();
            let bi = variants.iter().position(|&b| b == v.baseline()).unwrap();
            let base = best[wi][bi].unwrap();
            let bare = best[wi][0].unwrap();
            let added = (m.cpu.as_nanos() as f64 - base.cpu.as_nanos() as f64) / m.polls as f64;
            println!(
                "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {} | {:+.1} | {:.1} |",
                v.name(),
                m.wall.as_secs_f64() * 1e3,
                m.cpu.as_secs_f64() * 1e3,
                m.wall.as_secs_f64() / bare.wall.as_secs_f64(),
                m.cpu.as_secs_f64() / bare.cpu.as_secs_f64(),
                v.baseline().name(),
                added,
                m.peak_rss as f64 / 1024.0,
            );
        }
    }
    println!();
    println!(
        "peak RSS: W2's from one run of each variant in a fresh process; W1's and W3's the \
         process' peak during that run (VmHWM reset before each run where the kernel allows)"
    );
    watchdog_cost();
    otlp_cost(scale);
    detection_latency(scale);
    symbols_cost();
    live_cost(scale);
}

/// How late the *running* report is: from a stall's start to the moment `on_stall` sees it
/// running, less the threshold, with the defaults (10 ms threshold, 2.5 ms tick, stacks on).
/// 200 stalls of 30 ms, each after 20 ms of idle (so the idle back-off is in the picture), on
/// a current-thread runtime. The goal on an idle host: p99 within two ticks of the threshold.
fn detection_latency(scale: f64) {
    use std::sync::Mutex;
    let n = ((200.0 * scale) as usize).max(20);
    let seen: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let seen2 = seen.clone();
    let (_layer, guard) = loopwatch::builder()
        .ignore_env()
        .metrics(loopwatch::MetricsExport::Off)
        .on_stall(move |s| {
            if s.state == loopwatch::StallState::Running {
                seen2.lock().unwrap().push((s.id, Instant::now()));
            }
        })
        .build()
        .unwrap();
    let cfg = guard.config().clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let spin = calibrate_3us();
    let mut starts = Vec::with_capacity(n);
    rt.block_on(async {
        for _ in 0..n {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let start = Instant::now();
            guard
                .watch("latency", async move {
                    while start.elapsed() < Duration::from_millis(30) {
                        std::hint::black_box(work(spin));
                    }
                })
                .await;
            starts.push(start);
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut first: Vec<(u64, Instant)> = Vec::new();
    for &(id, at) in seen.lock().unwrap().iter() {
        if !first.iter().any(|&(i, _)| i == id) {
            first.push((id, at));
        }
    }
    first.sort_by_key(|&(id, _)| id);
    let mut late: Vec<f64> = first
        .iter()
        .zip(&starts)
        .map(|(&(_, at), &start)| {
            (at.saturating_duration_since(start).as_secs_f64() - cfg.threshold.as_secs_f64()) * 1e3
        })
        .collect();
    late.sort_by(f64::total_cmp);
    let q = |p: f64| late[((late.len() as f64 - 1.0) * p).round() as usize];
    println!();
    println!(
        "detection latency (stall start to its running report, past the {:?} threshold; tick {:?}): {} of {n} stalls reported",
        cfg.threshold,
        cfg.tick,
        late.len()
    );
    if late.is_empty() {
        return;
    }
    let ticks = cfg.tick.as_secs_f64() * 1e3;
    println!("| p50 ms | p90 ms | p99 ms | max ms | p99 in ticks |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        q(0.5),
        q(0.9),
        q(0.99),
        late[late.len() - 1],
        q(0.99) / ticks
    );
}

/// Does a collector that is down, or that accepts and never answers, slow the service? The
/// same workload (short polls of ~3 µs on 2 workers, with a 15 ms stall every 20 ms so stall
/// spans keep coming) with loopwatch's OTLP export off, to a port with nothing behind it, and
/// to a black hole; wall time per variant, best of `ROUNDS`.
#[cfg(feature = "otlp")]
fn otlp_cost(scale: f64) {
    use std::net::TcpListener;
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_addr = hole.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hole.incoming().flatten() {
            held.push(c); // accept, never read or answer
        }
    });
    let down_addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let spin = calibrate_3us();
    let polls = ((1_000_000.0 * scale) as u64).max(1_000);
    let variants: [(&str, Option<String>); 3] = [
        ("OTLP off", None),
        ("collector down", Some(format!("http://{down_addr}"))),
        ("collector hangs", Some(format!("http://{hole_addr}"))),
    ];
    let mut best = [Duration::MAX; 3];
    let mut drops = [(0u64, 0u64); 3];
    for _ in 0..ROUNDS {
        for (i, (_, endpoint)) in variants.iter().enumerate() {
            let mut b = loopwatch::builder()
                .ignore_env()
                .metrics(loopwatch::MetricsExport::Off)
                .stacks(false)
                .export_interval(Duration::from_millis(200))
                .otlp_timeout(Duration::from_millis(500))
                .otlp_span_queue(16);
            if let Some(e) = endpoint {
                b = b.otlp_endpoint(e.clone());
            }
            let (_layer, guard) = b.build().unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let t0 = Instant::now();
            rt.block_on(async {
                let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let d2 = done.clone();
                let staller = tokio::spawn(guard.watch("staller", async move {
                    while !d2.load(std::sync::atomic::Ordering::Relaxed) {
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_millis(15) {
                            std::hint::spin_loop();
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }));
                let tasks: Vec<_> = (0..100)
                    .map(|_| {
                        tokio::spawn(guard.watch("short", async move {
                            for _ in 0..polls / 100 {
                                std::hint::black_box(work(spin));
                                tokio::task::yield_now().await;
                            }
                        }))
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                staller.await.unwrap();
            });
            best[i] = best[i].min(t0.elapsed());
            let o = guard.snapshot().otlp;
            drops[i] = (
                o.spans_dropped,
                o.span_export_errors + o.metric_export_errors,
            );
            drop(rt);
            drop(guard);
        }
    }
    println!();
    println!("OTLP collector unavailable ({polls} polls of ~3 µs on 2 workers, a 15 ms stall every 20 ms)");
    println!("| variant | wall ms | wall ratio | spans dropped | export errors |");
    println!("|---|---:|---:|---:|---:|");
    for (i, (name, _)) in variants.iter().enumerate() {
        println!(
            "| {name} | {:.0} | {:.3} | {} | {} |",
            best[i].as_secs_f64() * 1e3,
            best[i].as_secs_f64() / best[0].as_secs_f64(),
            drops[i].0,
            drops[i].1
        );
    }
}

/// The watchdog's own CPU at defaults with 16 watched workers, all idle: the process' CPU
/// time over a quiet interval, as a share of one core.
fn watchdog_cost() {
    let workers = 16;
    let tick = loopwatch::builder().ignore_env().config().unwrap().tick;
    // What only waking up at that period costs here (a VM makes each wake-up dear).
    let timer = std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(3300) {
            std::thread::park_timeout(tick);
        }
    });
    std::thread::sleep(Duration::from_millis(150));
    let (tc0, tt0) = (cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let timer_pct = (cpu_time() - tc0).as_secs_f64() / tt0.elapsed().as_secs_f64() * 100.0;
    timer.join().unwrap();
    let (guard, rt) = watchdog_setup(workers);
    // One watched poll on each worker at once (a barrier inside the poll), so every worker
    // has a slot for the watchdog to read.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(workers));
    rt.block_on(async {
        let hs: Vec<_> = (0..workers)
            .map(|_| {
                let b = barrier.clone();
                tokio::spawn(guard.watch("claim", async move {
                    b.wait();
                }))
            })
            .collect();
        for h in hs {
            h.await.unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let (c0, t0) = (cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (cpu, wall) = (cpu_time() - c0, t0.elapsed());
    println!();
    println!(
        "a bare thread waking every {tick:?} (park_timeout), for comparison: {timer_pct:.2}% of one core"
    );
    println!(
        "watchdog at defaults (threshold {:?}, tick {:?}), {workers} idle watched workers: {:.2}% of one core",
        guard.config().threshold,
        guard.config().tick,
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0
    );

    // Now every worker stalled at once (blocked in std::thread::sleep, so that 16 stalls fit
    // on 2 cores): the watchdog samples all 16 threads on every tick.
    let stall_for = Duration::from_millis(4000);
    let hs: Vec<_> = (0..workers)
        .map(|_| {
            rt.spawn(guard.watch("stalled", async move {
                std::thread::sleep(stall_for);
            }))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (c0, t0) = (cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (cpu, wall) = (cpu_time() - c0, t0.elapsed());
    let snap = guard.snapshot();
    println!(
        "watchdog at defaults, all {workers} workers stalled at once ({} in progress, {} kernel-state readings so far): {:.2}% of one core",
        snap.stalls_in_progress,
        snap.diagnosis_samples,
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0
    );
    rt.block_on(async {
        for h in hs {
            h.await.unwrap();
        }
    });
    drop(rt);
    drop(guard);
    probe_free_cost(workers);
    cuts_cost(workers, true);
    cuts_cost(workers, false);
}

/// A loopwatch at defaults with metrics export off (so a measure is the watchdog's alone), and
/// a multi-thread runtime of `workers` workers.
fn watchdog_setup(workers: usize) -> (loopwatch::Guard, tokio::runtime::Runtime) {
    watchdog_setup_with(workers, loopwatch::builder())
}

fn watchdog_setup_with(
    workers: usize,
    builder: loopwatch::Builder,
) -> (loopwatch::Guard, tokio::runtime::Runtime) {
    let (_layer, guard) = builder
        .ignore_env()
        .metrics(loopwatch::MetricsExport::Off)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    (guard, rt)
}

/// The CPU time so far of this process's thread named `name` (Linux), from its schedstat.
fn thread_cpu(name: &str) -> Option<Duration> {
    for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name || (name.len() > 15 && comm.trim_end() == &name[..15]) {
            let st = std::fs::read_to_string(e.path().join("schedstat")).ok()?;
            let ns: u64 = st.split_whitespace().next()?.parse().ok()?;
            return Some(Duration::from_nanos(ns));
        }
    }
    None
}

/// The probe-free path's cost: `workers` workers of a monitored runtime, learnt, and one kept
/// busy (so tokio never says all are parked and every learnt worker is read each tick); the
/// watchdog thread's own CPU time, with the path and without (`monitor_runtime` not called).
fn probe_free_cost(workers: usize) {
    let mut pct = [0.0f64; 2];
    for (i, monitored) in [false, true].into_iter().enumerate() {
        let (guard, rt) = watchdog_setup(workers);
        if monitored {
            guard.monitor_runtime(rt.handle(), "bench");
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        // Short polls (0.2 ms of CPU each, then a yield): never a stall, never parked.
        let busy = rt.spawn(async move {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(200) {
                    std::hint::spin_loop();
                }
                tokio::task::yield_now().await;
            }
        });
        // Learn the workers (a learner per worker each second).
        let deadline = Instant::now() + Duration::from_secs(20);
        while monitored
            && guard.snapshot().probe_free_workers < workers
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let snap = guard.snapshot();
        let (learnt, followed) = (snap.probe_free_workers, snap.probe_free_followed);
        let (c0, t0) = (thread_cpu("loopwatch-watchdog"), Instant::now());
        std::thread::sleep(Duration::from_secs(3));
        let (c1, wall) = (thread_cpu("loopwatch-watchdog"), t0.elapsed());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(busy).unwrap();
        if let (Some(c0), Some(c1)) = (c0, c1) {
            pct[i] = (c1 - c0).as_secs_f64() / wall.as_secs_f64() * 100.0;
        }
        println!(
            "watchdog thread, {workers} workers, one busy with short polls, probe-free path {}: {:.2}% of one core{}",
            if monitored { "on" } else { "off" },
            pct[i],
            if monitored {
                format!(" ({learnt} workers learnt, {followed} threads followed)")
            } else {
                String::new()
            }
        );
    }
}

/// The thousand-cuts sampling's cost: `workers` workers, each inside a watched poll nearly all
/// the time (1 ms asleep in `std::thread::sleep` per poll, under the threshold: the seeds'
/// shape, with no CPU for the workers to take from the watchdog), the watchdog thread's own
/// CPU time with the sampling on (the default) and off, alternately, three times each (the
/// median of each is compared: one 3 s reading varies by ±0.2 % of a core here). `watched`:
/// the polls are `loopwatch::watch`ed; else plain tasks on a monitored runtime (the
/// probe-free path, whose samples also read the worker's stack).
fn cuts_cost(workers: usize, watched: bool) {
    let how = if watched {
        "watched"
    } else {
        "unwatched, probe-free path"
    };
    let mut pct: [Vec<f64>; 2] = Default::default();
    for _round in 0..3 {
        for (i, on) in [false, true].into_iter().enumerate() {
            let (guard, rt) = watchdog_setup_with(workers, loopwatch::builder().thousand_cuts(on));
            if !watched {
                guard.monitor_runtime(rt.handle(), "bench");
            }
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let tasks: Vec<_> = (0..workers)
                .map(|_| {
                    let s = stop.clone();
                    rt.spawn(async move {
                        while !s.load(std::sync::atomic::Ordering::Relaxed) {
                            let cut = async {
                                std::thread::sleep(Duration::from_millis(1));
                            };
                            if watched {
                                loopwatch::watch("cut", cut).await;
                            } else {
                                cut.await;
                            }
                            tokio::task::yield_now().await;
                        }
                    })
                })
                .collect();
            // The probe-free path learns the workers first (a learner each a second).
            let deadline = Instant::now() + Duration::from_secs(if watched { 0 } else { 10 });
            while guard.snapshot().probe_free_workers < workers && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(300));
            let (c0, t0) = (thread_cpu("loopwatch-watchdog"), Instant::now());
            std::thread::sleep(Duration::from_secs(3));
            let (c1, wall) = (thread_cpu("loopwatch-watchdog"), t0.elapsed());
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(async {
                for t in tasks {
                    t.await.unwrap();
                }
            });
            let (Some(c0), Some(c1)) = (c0, c1) else {
                println!("thousand-cuts sampling: no thread CPU clock here");
                return;
            };
            let p = (c1 - c0).as_secs_f64() / wall.as_secs_f64() * 100.0;
            pct[i].push(p);
            let snap = guard.snapshot();
            let asleep = snap
                .time_in_polls
                .iter()
                .filter(|t| t.syscall.is_some())
                .fold(0.0, |a, t| a + t.time.as_secs_f64());
            println!(
                "watchdog thread, {workers} workers in 1 ms blocking polls ({how}), thousand-cuts sampling {}: {p:.2}% of one core ({asleep:.1} s asleep sampled, {} stalls, {} workers learnt)",
                if on { "on" } else { "off" },
                snap.stalls_total,
                snap.probe_free_workers
            );
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on) = (median(&mut pct[0]), median(&mut pct[1]));
    println!(
        "thousand-cuts sampling ({how}), medians of 3: off {off:.2}%, on {on:.2}%: +{:.2}% of one core for {workers} workers",
        on - off
    );
}

/// One probe on a current_thread runtime, 1M tiny polls, for counting instructions under
/// `valgrind --tool=callgrind` (deterministic, unlike time on a shared host): see
/// `scripts/instructions.sh`, which runs it per probe and prints instructions added per poll.
///
/// The threshold is 500 ms (tick 125 ms), not the default 10 ms: under valgrind the run is
/// ~50x slower than native, so at the default it would see ~50x more watchdog ticks per poll
/// than a native run does (each tick sends the poll it lands in to the full path), and how
/// many more would depend on how fast valgrind runs on the host that day. The common path is
/// the same code at any threshold.
///
/// Each task's future is spawned as is (`watch` wraps it), except in `bare-inner` and
/// `watch-inner`: there it is awaited inside an `async` block spawned in its place (a
/// `.watched()` future awaited in a handler), to compare with each other
/// (`LOOPWATCH_INSTR_VARIANTS="bare-inner watch-inner" bash scripts/instructions.sh`).
///
/// A variant ending in `/spawn` counts spawned tasks instead of polls: 100,000 tasks of one
/// poll each, spawned in batches of 1,000 and awaited (W2's shape), so what a probe costs per
/// task (its set-up, first poll and drop) shows.
// Those `async` blocks around one `.await` are the point: a future of the task's own.
#[allow(clippy::redundant_async_block)]
fn instructions(variant: &str) {
    let (variant, spawn) = match variant.strip_suffix("/spawn") {
        Some(v) => (v, true),
        None => (variant, false),
    };
    let mut b = tokio::runtime::Builder::new_current_thread();
    b.enable_all();
    let mut guard = None;
    let mut layer = None;
    if !matches!(
        variant,
        "bare" | "bare-inner" | "hooks-empty" | "span-registry"
    ) {
        let (l, g) = loopwatch::builder()
            .ignore_env()
            .diagnose(false)
            .schedule_delay(variant != "watch-nowake" && variant != "hooks-nosched")
            .tokio_schedule_latency(variant == "hooks-tokio")
            .threshold(Duration::from_millis(500))
            .metrics(loopwatch::MetricsExport::Off)
            .build()
            .unwrap();
        guard = Some(g);
        layer = Some(l);
    }
    // The span variants: each task instrumented with a span, under tracing's registry alone or
    // with loopwatch's layer (in a `tokio_unstable` build tokio's task spans come too).
    let spans = variant.starts_with("span-");
    let _dispatch = spans.then(|| {
        let d = match layer.take().filter(|_| variant == "span-layer") {
            Some(l) => tracing::Dispatch::new(tracing_subscriber::registry().with(l)),
            None => tracing::Dispatch::new(tracing_subscriber::registry()),
        };
        tracing::dispatcher::set_default(&d)
    });
    match variant {
        #[cfg(tokio_unstable)]
        "hooks" | "hooks-nosched" | "hooks-tokio" => {
            guard.as_ref().unwrap().install_poll_hooks(&mut b);
        }
        #[cfg(tokio_unstable)]
        "hooks-empty" => {
            b.on_before_task_poll(|m| {
                std::hint::black_box(m);
            })
            .on_after_task_poll(|m| {
                std::hint::black_box(m);
            });
        }
        "bare" | "bare-inner" | "watch" | "watch-inner" | "watch-nowake" | "span-registry"
        | "span-layer" => {}
        other => panic!(
            "unknown variant {other} (bare, bare-inner, watch, watch-inner, watch-nowake, hooks-empty, hooks, hooks-nosched, hooks-tokio, span-registry, span-layer)"
        ),
    }
    let rt = b.build().unwrap();
    // Tiny polls: 100 tasks of 10,001 polls, all spawned at once. Spawned tasks: 100,000 of
    // one poll, 1,000 at a time.
    let (tasks, yields, batch) = if spawn {
        (100_000u64, 0u64, 1_000u64)
    } else {
        (100u64, 10_000u64, 100u64)
    };
    rt.block_on(async {
        for _ in 0..tasks / batch {
            let hs: Vec<_> = (0..batch)
                .map(|_| {
                    let fut = async move {
                        for _ in 0..yields {
                            tokio::task::yield_now().await;
                        }
                    };
                    match &guard {
                        // A watched future awaited inside the task's own future (not spawned
                        // as is).
                        Some(g) if variant == "watch-inner" => {
                            let w = g.watch("w", fut);
                            tokio::spawn(async move { w.await })
                        }
                        None if variant == "bare-inner" => tokio::spawn(async move { fut.await }),
                        Some(g) if variant.starts_with("watch") => tokio::spawn(g.watch("w", fut)),
                        _ if spans => tokio::spawn(fut.instrument(tracing::info_span!("w"))),
                        _ => tokio::spawn(fut),
                    }
                })
                .collect();
            for h in hs {
                h.await.unwrap();
            }
        }
    });
    if spawn {
        println!("tasks {tasks}");
    } else {
        println!("polls {}", tasks * (yields + 1));
    }
}
