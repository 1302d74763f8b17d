//! loopwatch's `/metrics` listener: served from its own thread, so a scrape answers while the
//! watched runtime is stalled, and shows the stall in progress; then the stall's counters and
//! histograms; the runtime's own figures; a bind error is named.
#![cfg(feature = "prometheus")]

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const THRESHOLD: Duration = Duration::from_millis(20);

fn scrape(addr: std::net::SocketAddr) -> String {
    let (status, body) = common::http_get(addr, "/metrics").expect("scrape answers");
    assert_eq!(status, 200, "{body}");
    body
}

/// Scrapes until `pred` holds (the export interval is 100 ms), or panics with the last body.
fn scrape_until(addr: std::net::SocketAddr, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(addr);
        if pred(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "never saw {what}:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopwatch with the threshold, a 100 ms export interval and no stacks, and its listener.
fn scraped() -> (common::Harness, std::net::SocketAddr) {
    let h = common::harness(
        loopwatch::builder()
            .threshold(THRESHOLD)
            .export_interval(Duration::from_millis(100))
            .stacks(false),
    );
    let addr = h.guard.prometheus_addr().expect("listener runs");
    (h, addr)
}

/// The hog's samples of metric `name`, summed over the labels other than its layer and kind
/// (the cause is the diagnosis' business, tested in the watchdog's core; what a scrape must
/// show is the stall itself). `None` if the hog has no sample.
fn hog_total(body: &str, name: &str) -> Option<f64> {
    let hog = common::series(body, name)
        .into_iter()
        .filter(|l| l.contains(r#"layer="async""#) && l.contains(r#"kind="hog""#))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .collect::<Vec<_>>();
    (!hog.is_empty()).then(|| hog.iter().sum())
}

#[test]
fn a_stalled_runtime_is_still_scraped_and_shows_the_stall_in_progress() {
    let _serial = common::serial();
    let (h, addr) = scraped();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    // A current-thread runtime: one stall holds its only thread.
    let rt = h.current_thread();
    h.guard.monitor_runtime(rt.handle(), "main");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    // The guard's own `watch` (the global one follows the newest guard, and tests in this
    // binary run side by side).
    let hog = h.guard.watch("hog", async move {
        common::spin_until(&stop2, Duration::from_secs(20));
    });
    let short = h.guard.watch("short", async {
        for _ in 0..2_000 {
            tokio::task::yield_now().await;
        }
    });
    let job = std::thread::spawn(move || {
        rt.block_on(async move {
            short.await;
            hog.await;
        });
    });

    let during = scrape_until(addr, "the stall in progress", |b| {
        common::sample(b, r#"loopwatch_stalls_in_progress{layer="async"}"#) == Some(1.0)
    });
    let age = common::sample(
        &during,
        r#"loopwatch_oldest_stall_age_seconds{layer="async"}"#,
    )
    .expect("oldest stall age");
    assert!(age >= THRESHOLD.as_secs_f64(), "{age}");
    assert_eq!(
        hog_total(&during, "loopwatch_stalls_total"),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        common::sample(&during, r#"loopwatch_stalls_in_progress{layer="blocking"}"#),
        Some(0.0)
    );
    assert!(during.contains("# TYPE loopwatch_stalls_in_progress gauge"));
    let version = concat!(
        r#"loopwatch_build_info{version=""#,
        env!("CARGO_PKG_VERSION"),
        r#""}"#
    );
    assert_eq!(common::sample(&during, version), Some(1.0), "{during}");
    assert!(during.contains("# HELP loopwatch_stalls_total "));
    assert_eq!(
        common::sample(&during, r#"loopwatch_runtime_workers{runtime="main"}"#),
        Some(1.0),
        "{during}"
    );

    // With tokio_unstable, tokio-metrics also gives the blocking pool and the local queues.
    #[cfg(tokio_unstable)]
    for m in [
        "loopwatch_runtime_blocking_threads",
        "loopwatch_runtime_local_queue_depth",
    ] {
        assert!(
            common::sample(&during, &format!(r#"{m}{{runtime="main"}}"#)).is_some(),
            "no {m} in {during}"
        );
    }

    stop.store(true, Ordering::Release);
    job.join().unwrap();
    let after = scrape_until(addr, "the stall ended", |b| {
        common::sample(b, r#"loopwatch_stalls_in_progress{layer="async"}"#) == Some(0.0)
            && !common::series(b, "loopwatch_stall_duration_seconds_count").is_empty()
    });
    assert!(after.contains("# TYPE loopwatch_stall_duration_seconds histogram"));
    assert!(after.contains("# TYPE loopwatch_poll_duration_seconds histogram"));
    let count = hog_total(&after, "loopwatch_stall_duration_seconds_count");
    assert_eq!(count, Some(1.0), "{after}");
    let sum = hog_total(&after, "loopwatch_stall_duration_seconds_sum").unwrap();
    assert!(sum >= THRESHOLD.as_secs_f64(), "{sum}");
    // Explicit buckets, 10 µs to 10 s, with 50 µs and 100 µs.
    let buckets = common::series(&after, "loopwatch_poll_duration_seconds_bucket");
    for le in ["0.00001", "0.00005", "0.0001", "10", "+Inf"] {
        assert!(
            buckets.iter().any(|l| l.contains(&format!("le=\"{le}\""))),
            "no le={le} in {buckets:#?}"
        );
    }
    let polls = common::sample(&after, r#"loopwatch_polls_total{layer="async"}"#).unwrap();
    assert!(polls >= 2_000.0, "{polls}");
    // No task id ever becomes a label.
    assert!(!after.contains("task_id") && !after.contains("id=\""));
}

#[test]
fn a_taken_address_is_a_named_error() {
    let _serial = common::serial();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = loopwatch::builder()
        .ignore_env()
        .prometheus_addr(addr)
        .build()
        .expect_err("the address is taken");
    match &err {
        loopwatch::Error::PrometheusListener { addr: a, source } => {
            assert_eq!(*a, addr);
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
        }
        other => panic!("wrong error: {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&addr.to_string()) && msg.contains("LOOPWATCH_PROMETHEUS_ADDR"),
        "{msg}"
    );
}

#[test]
fn metrics_off_starts_no_listener() {
    let _serial = common::serial();
    let (_layer, guard) = loopwatch::builder()
        .ignore_env()
        .metrics(loopwatch::MetricsExport::Off)
        .build()
        .unwrap();
    assert_eq!(guard.prometheus_addr(), None);
}

#[test]
fn a_huge_task_name_is_cut_and_the_scrape_stays_small() {
    let _serial = common::serial();
    let (h, addr) = scraped();
    // A 1 MiB name (once made every scrape 47 MB: the name is a label on each series).
    let huge = "n".repeat(1 << 20);
    let rt = h.runtime(1);
    rt.block_on(rt.spawn(h.guard.watch(&huge, async {
        common::spin_for(THRESHOLD * 3);
    })))
    .unwrap();
    let cut = format!("{}…", "n".repeat(loopwatch::MAX_NAME_BYTES - "…".len()));
    let body = scrape_until(addr, "the cut name", |b| {
        b.contains(&format!(r#"kind="{cut}""#))
    });
    assert!(body.len() < 256 * 1024, "a scrape of {} bytes", body.len());
    let s = h.ended_stall(THRESHOLD);
    assert_eq!(s.task.name.as_deref(), Some(cut.as_str()));
}

/// Records the message of each of loopwatch's events.
#[derive(Clone, Default)]
struct Warnings(Arc<std::sync::Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        if e.metadata().target() == "loopwatch" {
            let mut m = Message(String::new());
            e.record(&mut m);
            self.0.lock().unwrap().push(m.0);
        }
    }
}

#[test]
fn a_busy_default_address_turns_the_listener_off_and_the_service_starts() {
    use tracing_subscriber::prelude::*;
    let _serial = common::serial();
    // A second service on the host holds the default address (or something else already does).
    let _other = std::net::TcpListener::bind(loopwatch::DEFAULT_PROMETHEUS_ADDR);
    let warnings = Warnings::default();
    let (layer, guard) = loopwatch::builder()
        .ignore_env()
        .stacks(false)
        .build()
        .expect("a busy default address does not stop start-up");
    let _dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(layer)
            .with(warnings.clone()),
    );
    assert!(guard.is_running());
    assert_eq!(guard.prometheus_addr(), None);
    let why = guard.snapshot().prometheus_error.expect("a reason");
    assert!(
        why.contains("127.0.0.1:9464") && why.contains("require_prometheus"),
        "{why}"
    );
    // Said once, as a WARN, to the subscriber the layer is in.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = warnings.0.lock().unwrap().clone();
        let off = seen
            .iter()
            .filter(|m| m.contains("Prometheus listener is off"))
            .count();
        if off == 1 {
            break;
        }
        assert!(Instant::now() < deadline && off == 0, "{seen:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Detection goes on without the listener.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(guard.watch("no-listener", async {
        common::spin_for(THRESHOLD * 3);
    }));
    let deadline = Instant::now() + Duration::from_secs(5);
    while guard.snapshot().stalls_total == 0 {
        assert!(Instant::now() < deadline, "the stall was not seen");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(guard);
    // Who wants start-up to fail says so.
    let err = loopwatch::builder()
        .ignore_env()
        .require_prometheus(true)
        .build()
        .expect_err("required");
    assert!(
        matches!(&err, loopwatch::Error::PrometheusListener { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse),
        "{err:?}"
    );
}

/// This process's open file descriptors.
#[cfg(target_os = "linux")]
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[cfg(target_os = "linux")]
#[test]
fn idle_scrape_clients_cannot_take_the_services_descriptors() {
    let _serial = common::serial();
    let h = common::harness(
        loopwatch::builder()
            .stacks(false)
            .export_interval(Duration::from_millis(100)),
    );
    let addr = h.guard.prometheus_addr().expect("listener runs");
    scrape_until(addr, "the first frame", |b| {
        b.contains("loopwatch_polls_total")
    });
    let before = open_fds();
    // 200 clients that connect and never send a request (251 of them once took a
    // `ulimit -n 256` service's last descriptors).
    let idle: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(addr).expect("connects"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let during = open_fds();
    // The test's own 200 client sockets, and at most the cap (plus one being closed) that the
    // listener accepted.
    let accepted = during.saturating_sub(before + idle.len());
    assert!(
        accepted <= loopwatch::PROMETHEUS_MAX_CONNECTIONS + 1,
        "the listener holds {accepted} descriptors"
    );
    // A real scrape still gets its answer at once: it closes the oldest idle client.
    let t = Instant::now();
    let body = scrape(addr);
    assert!(body.contains("loopwatch_polls_total"), "{body}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(idle);
    // What the listener dropped is counted.
    scrape_until(addr, "dropped clients counted", |b| {
        common::sample(
            b,
            r#"loopwatch_export_errors_total{exporter="prometheus",signal="client"}"#,
        )
        .is_some_and(|v| v >= 100.0)
    });
}

/// tokio publishes a worker's busy time when it parks: a worker frozen in one poll publishes
/// nothing. Scraped during the stall, that worker must read busy, not idle; the runtime's
/// ratio is the mean over its workers (0..1).
#[test]
fn a_worker_held_by_a_stall_reads_busy() {
    let _serial = common::serial();
    let (h, addr) = scraped();
    let rt = h.runtime(2);
    h.guard.monitor_runtime(rt.handle(), "pool");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let hog = rt.spawn(h.guard.watch("hog", async move {
        common::spin_until(&stop2, Duration::from_secs(20));
    }));
    scrape_until(addr, "the stall in progress", |b| {
        common::sample(b, r#"loopwatch_stalls_in_progress{layer="async"}"#) == Some(1.0)
    });
    // Two export intervals inside the stall, so a frame covers only stalled time.
    std::thread::sleep(Duration::from_millis(250));
    let during = scrape(addr);
    let workers: Vec<f64> = common::series(&during, "loopwatch_runtime_worker_busy_ratio")
        .into_iter()
        .filter(|l| l.contains(r#"runtime="pool""#))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    stop.store(true, Ordering::Release);
    rt.block_on(hog).unwrap();
    assert_eq!(workers.len(), 2, "{during}");
    assert!(
        workers.contains(&1.0),
        "the stalled worker reads busy: {workers:?}"
    );
    let mean = common::sample(&during, r#"loopwatch_runtime_busy_ratio{runtime="pool"}"#)
        .expect("the runtime's ratio");
    let expected = workers.iter().sum::<f64>() / 2.0;
    assert!((mean - expected).abs() < 1e-9, "{mean} vs {workers:?}");
    assert!((0.5..=1.0).contains(&mean), "{mean}");
}
