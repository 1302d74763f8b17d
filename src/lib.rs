//! Finds the code that stalls a tokio service.
//!
//! tokio is cooperative: a task that computes or blocks inside `poll` holds its worker, and
//! every task queued behind it waits. loopwatch's probes mark each poll's start and end in a
//! few nanoseconds; a watchdog thread of its own sees a poll that holds a worker past the
//! threshold *while it runs*, says why (CPU, which blocking system call, starved or throttled
//! by the host), takes its stack, names the task and the tasks that waited behind it, and
//! exports it all to Prometheus and OTLP.
//!
//! ```rust,no_run
//! // In `main`, before the runtime: keep the guard alive for as long as the service runs.
//! let _guard = loopwatch::init(); // and a fmt subscriber on stderr
//! ```
//!
//! ```text
//! WARN loopwatch: stall ended: stall #4 (ended): task http-connection in span render_report at examples/demo.rs:156 held async worker 0 for 53.6ms; cause: cpu; hint: move it to spawn_blocking or a CPU pool, or yield
//! ```
//!
//! # Where to start
//! - [`init`] / [`try_init`] (one line), or [`builder`] for a [`Builder`] whose
//!   [`LoopwatchLayer`] goes into your own `tracing` subscriber; the [`Guard`] it returns owns
//!   the watchdog.
//! - What is watched: tasks with a span (the layer), futures wrapped in [`watch`] or started
//!   with [`spawn`], every request through `tower::WatchLayer` (feature `tower`), every task
//!   under `--cfg tokio_unstable` with `Guard::install_poll_hooks`, and with no probe at all
//!   a runtime's workers asleep in a system call ([`Guard::monitor_runtime`], Linux x86_64).
//! - What comes out: [`Stall`] reports (a WARN event per stall, [`Builder::on_stall`]
//!   callbacks, OTLP spans), the metrics in [`METRICS`] (Prometheus on
//!   [`DEFAULT_PROMETHEUS_ADDR`], or the application's own `metrics` recorder, or OTLP), and
//!   [`Guard::snapshot`] ([`Snapshot`]) in process.
//! - The other layers: [`spawn_blocking`] for tokio's blocking pool and, with feature
//!   `rayon`, `Guard::cpu_pool` for CPU pools (`CpuPool`).
//! - Every setting, with its `LOOPWATCH_*` variable: [`Builder`] and [`Config`].
//!
//! The README (in the package, and on the project's front page) has the rest: what each build
//! sees and the recall it reaches, the report's fields, the metrics table, alert rules and a
//! Grafana dashboard, the OTLP attributes, and what loopwatch costs.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_op_in_unsafe_fn)]
// `init`, `try_init` and `LogFields` are named in the docs of items that exist without them.
#![cfg_attr(not(feature = "fmt"), allow(rustdoc::broken_intra_doc_links))]

/// The README's examples, compiled and run as doctests (the crate's front page is the short
/// one above).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod board;
mod builder;
mod config;
mod diagnose;
mod error;
mod export;
mod guard;
mod hints;
mod kinds;
#[cfg(feature = "fmt")]
mod log_fields;
mod paths;
mod probe;
mod report;
mod shared;
mod snapshot;
mod stall;
mod watchdog;
mod words;
mod workers;

pub use builder::Builder;
pub use config::{
    default_tick, Config, MetricsExport, OtlpConfig, OtlpProtocol, DEFAULT_BLOCKING_THRESHOLD,
    DEFAULT_CPU_THRESHOLD, DEFAULT_EXPORT_INTERVAL, DEFAULT_MAX_BLOCKING_THREADS,
    DEFAULT_MAX_LIVE_SPANS, DEFAULT_MAX_STACKS_PER_SEC, DEFAULT_MAX_TASK_KINDS,
    DEFAULT_MAX_THREADS, DEFAULT_OTLP_SPAN_QUEUE, DEFAULT_OTLP_TIMEOUT, DEFAULT_PROMETHEUS_ADDR,
    DEFAULT_REPORT_QUEUE, DEFAULT_SAMPLE_EVERY, DEFAULT_THRESHOLD, ENV_DIAGNOSE, ENV_ENABLE,
    ENV_MAX_STACKS_PER_SEC, ENV_OTLP, ENV_PROMETHEUS_ADDR, ENV_SAMPLE_EVERY, ENV_SCHEDULE_DELAY,
    ENV_STACKS, ENV_STACK_LOCATIONS, ENV_STACK_SIGNAL, ENV_THRESHOLD, ENV_TICK,
    ENV_TOKIO_SCHEDULE_LATENCY, MAX_DEFAULT_TICK, MAX_NAME_BYTES, MAX_TASK_KINDS_LIMIT,
    MAX_THREADS_LIMIT, MAX_THRESHOLD, MIN_THRESHOLD, MIN_TICK, PROMETHEUS_MAX_CONNECTIONS,
    REPORT_QUEUE_LIMIT,
};
pub use diagnose::{Cause, CauseShare, CpuQuota, Frame, Stack, Syscall};
pub use error::Error;
pub use export::table::{MetricDef, MetricKind, MetricUnit, DURATION_BUCKETS, METRICS};
pub use guard::Guard;
pub use kinds::TaskKind;
#[cfg(feature = "fmt")]
#[cfg_attr(docsrs, doc(cfg(feature = "fmt")))]
pub use log_fields::LogFields;
pub use probe::blocking::spawn_blocking;
#[cfg(feature = "rayon")]
#[cfg_attr(docsrs, doc(cfg(feature = "rayon")))]
pub use probe::cpu::{CpuPool, FINE_JOB};
pub use probe::layer::LoopwatchLayer;
pub use probe::threads::ThreadCounter;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub use probe::tower;
pub use probe::watched::{spawn, watch, WatchExt, Watched};
pub use snapshot::{
    Histogram, KindPolls, OtlpStats, PollTime, RuntimeLag, Snapshot, StallCount, POLL_BUCKETS_NS,
};
pub use stall::{
    CpuTime, LayerKind, StackStatus, Stall, StallState, Summary, TaskInfo, Victim, Victims,
    WorkerInfo,
};

/// A [`Builder`] with the defaults (and `LOOPWATCH_*` variables applied when it is built).
pub fn builder() -> Builder {
    Builder::default()
}

/// Starts loopwatch with the defaults and sets a global subscriber that prints stall reports
/// (and the application's own events) to stderr. Keep the returned guard alive.
///
/// # Panics
/// If a `LOOPWATCH_*` variable is invalid, a thread cannot start, or a global subscriber is
/// already set: see [`try_init`] for the non-panicking form.
#[cfg(feature = "fmt")]
#[cfg_attr(docsrs, doc(cfg(feature = "fmt")))]
pub fn init() -> Guard {
    builder().init()
}

/// As [`init`], returning an error instead of panicking.
///
/// # Errors
/// [`Error::InvalidEnv`] for a bad `LOOPWATCH_*` variable, [`Error::SpawnThread`] if a thread
/// cannot start, [`Error::SetGlobalDefault`] if a global subscriber is already set.
#[cfg(feature = "fmt")]
#[cfg_attr(docsrs, doc(cfg(feature = "fmt")))]
pub fn try_init() -> Result<Guard, Error> {
    builder().try_init()
}
