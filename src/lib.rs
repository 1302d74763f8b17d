#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_op_in_unsafe_fn)]

mod board;
mod builder;
mod config;
mod diagnose;
mod error;
mod export;
mod guard;
mod hints;
mod kinds;
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
    ENV_STACKS, ENV_STACK_SIGNAL, ENV_THRESHOLD, ENV_TICK, MAX_DEFAULT_TICK, MAX_NAME_BYTES,
    MAX_TASK_KINDS_LIMIT, MAX_THREADS_LIMIT, MAX_THRESHOLD, MIN_THRESHOLD, MIN_TICK,
    PROMETHEUS_MAX_CONNECTIONS, REPORT_QUEUE_LIMIT,
};
pub use diagnose::{Cause, CauseShare, CpuQuota, Frame, Stack, Syscall};
pub use error::Error;
pub use export::table::{MetricDef, MetricKind, MetricUnit, DURATION_BUCKETS, METRICS};
pub use guard::Guard;
pub use kinds::TaskKind;
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
    CpuTime, LayerKind, StackStatus, Stall, StallState, TaskInfo, Victim, Victims, WorkerInfo,
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
pub fn init() -> Guard {
    builder().init()
}

/// As [`init`], returning an error instead of panicking.
///
/// # Errors
/// [`Error::InvalidEnv`] for a bad `LOOPWATCH_*` variable, [`Error::SpawnThread`] if a thread
/// cannot start, [`Error::SetGlobalDefault`] if a global subscriber is already set.
pub fn try_init() -> Result<Guard, Error> {
    builder().try_init()
}
