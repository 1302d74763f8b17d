//! The one table of every metric loopwatch exports: name, kind, unit, help and labels. Every
//! exporter registers and describes its metrics from here, so the Prometheus and OTLP views
//! cannot drift apart (a test checks the names against Prometheus' rules).

/// What kind of metric a [`MetricDef`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricKind {
    /// Only goes up (`_total`). A counter in seconds counts fractions of a second: the
    /// `metrics` facade's counters are whole numbers, so it is recorded there as a gauge that
    /// only goes up (loopwatch's own `/metrics` still types it `counter`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution, exported with explicit buckets ([`DURATION_BUCKETS`]).
    Histogram,
}

/// The unit of a metric, in Prometheus' base units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricUnit {
    /// Seconds (names end in `_seconds`).
    Seconds,
    /// A plain count.
    Count,
    /// A ratio between 0 and 1.
    Ratio,
}

impl MetricUnit {
    /// The UCUM unit used for OTLP (`s`, `1`).
    pub fn ucum(self) -> &'static str {
        match self {
            MetricUnit::Seconds => "s",
            MetricUnit::Count | MetricUnit::Ratio => "1",
        }
    }
}

/// One exported metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricDef {
    /// The full name, `loopwatch_` first.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Its unit.
    pub unit: MetricUnit,
    /// The help text.
    pub help: &'static str,
    /// Its label names, in the order their values are given. None carries a task id: every
    /// label's values are bounded (task kinds by `max_task_kinds`, the rest by the code).
    pub labels: &'static [&'static str],
}

/// Bucket upper bounds of every duration histogram, in seconds: 10 µs to 10 s, with 50 µs and
/// 100 µs (the granularity below which work costs more to schedule than it gains).
pub const DURATION_BUCKETS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

macro_rules! metrics {
    ($($id:ident = $name:literal, $kind:ident, $unit:ident, [$($label:literal),*], $help:literal;)*) => {
        /// Indexes into [`METRICS`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        // Some rows are only fed under `--cfg tokio_unstable` or by the OTLP exporter.
        #[allow(non_camel_case_types, missing_docs, dead_code)]
        pub(crate) enum M { $($id),* }

        /// Every metric loopwatch exports.
        pub const METRICS: &[MetricDef] = &[$(MetricDef {
            name: $name,
            kind: MetricKind::$kind,
            unit: MetricUnit::$unit,
            help: $help,
            labels: &[$($label),*],
        }),*];
    };
}

metrics! {
    Polls = "loopwatch_polls_total", Counter, Count, ["layer"],
        "Polls that ended on watched threads.";
    SlowPolls = "loopwatch_slow_polls_total", Counter, Count, ["layer"],
        "Polls that held their thread at least the stall threshold (caught running or not).";
    PollDuration = "loopwatch_poll_duration_seconds", Histogram, Seconds, ["layer", "kind"],
        "Duration of timed polls (one poll in sample_every per thread), by layer and task kind.";
    Stalls = "loopwatch_stalls_total", Counter, Count, ["layer", "kind", "cause", "syscall"],
        "Stalls detected (polls seen running past the threshold), by layer, task kind and the cause known at detection.";
    StallsInProgress = "loopwatch_stalls_in_progress", Gauge, Count, ["layer"],
        "Stalls running now: non-zero while a poll holds its worker past the threshold.";
    OldestStallAge = "loopwatch_oldest_stall_age_seconds", Gauge, Seconds, ["layer"],
        "How long the oldest running stall has run so far (0 when none runs).";
    StallDuration = "loopwatch_stall_duration_seconds", Histogram, Seconds, ["layer", "kind", "cause"],
        "Total duration of ended stalls, by layer, task kind and final cause.";
    ScheduleDelay = "loopwatch_schedule_delay_seconds", Histogram, Seconds, ["layer", "kind"],
        "Time from a task's wake to its poll, for timed polls (tokio_unstable poll hooks with schedule latency).";
    Victims = "loopwatch_victims_total", Counter, Count, ["layer", "cause"],
        "Tasks that waited behind a stall on its worker (head-of-line victims), by the stall's layer and cause.";
    VictimWait = "loopwatch_victim_wait_seconds", Histogram, Seconds, ["layer", "cause"],
        "How long each victim waited behind its stall, by the stall's layer and cause.";
    Blocked = "loopwatch_blocked_seconds_total", Counter, Seconds, ["layer", "kind", "syscall"],
        "Sampled time async workers slept in a system call inside polls under the stall threshold, by task kind and call (death by a thousand cuts; the runtime's own park excluded).";
    Running = "loopwatch_running_seconds_total", Counter, Seconds, ["layer", "kind"],
        "Sampled time async workers ran (on a CPU, or runnable) inside polls under the stall threshold, by task kind.";
    BlockingRunning = "loopwatch_blocking_jobs_running", Gauge, Count, [],
        "Jobs of loopwatch::spawn_blocking running on tokio's blocking pool.";
    BlockingQueued = "loopwatch_blocking_jobs_queued", Gauge, Count, [],
        "Jobs of loopwatch::spawn_blocking waiting for a blocking-pool thread.";
    BlockingSaturation = "loopwatch_blocking_pool_saturation", Gauge, Ratio, [],
        "Blocking jobs running as a share of max_blocking_threads (1 = the pool is full).";
    BlockingSlowStarts = "loopwatch_blocking_slow_starts_total", Counter, Count, [],
        "Blocking jobs that waited at least the stall threshold for a thread: the pool was full.";
    CpuJobs = "loopwatch_cpu_jobs_total", Counter, Count, ["pool"],
        "Jobs run on a CPU pool made with Guard::cpu_pool (feature rayon).";
    CpuJobsTooFine = "loopwatch_cpu_jobs_too_fine_total", Counter, Count, ["pool"],
        "CPU-pool jobs shorter than 50 µs: too fine to be worth a dispatch.";
    DroppedReports = "loopwatch_dropped_reports_total", Counter, Count, [],
        "Stall reports dropped because the report queue was full.";
    DroppedSamples = "loopwatch_dropped_samples_total", Counter, Count, [],
        "Timed-poll samples dropped (a probe's ring was full, or the export buffer was).";
    DroppedSpans = "loopwatch_dropped_spans_total", Counter, Count, [],
        "Spans the layer could not follow because its span table was full.";
    LabelOverflow = "loopwatch_label_overflow_total", Counter, Count, [],
        "Task kinds that did not fit the kind table (max_task_kinds) and were counted as kind=\"other\".";
    UnwatchedThreads = "loopwatch_unwatched_threads_total", Counter, Count, [],
        "Threads that polled but found no free slot (raise max_threads).";
    CaughtPanics = "loopwatch_caught_panics_total", Counter, Count, [],
        "Panics caught inside loopwatch's own callbacks (never reach the service).";
    Stacks = "loopwatch_stacks_total", Counter, Count, ["status"],
        "Stack captures of stalled threads, by outcome (captured, rate_limited, failed, signal_lost, in_syscall).";
    DiagnosisSamples = "loopwatch_diagnosis_samples_total", Counter, Count, [],
        "Readings of stalled threads' kernel state taken for diagnosis.";
    ExportDropped = "loopwatch_export_dropped_total", Counter, Count, ["exporter", "signal"],
        "Items an exporter could not send and dropped (collector down, slow or full queue).";
    ExportErrors = "loopwatch_export_errors_total", Counter, Count, ["exporter", "signal"],
        "Export attempts that failed or timed out (otlp: traces, metrics); for the /metrics listener (prometheus), accept errors and dropped scrape clients.";
    LoopLag = "loopwatch_loop_lag_seconds", Histogram, Seconds, ["runtime"],
        "Loop lag: from a heartbeat task's spawn (from loopwatch's thread, every 25 ms) to its first poll; it grows when the workers are stalled.";
    BuildInfo = "loopwatch_build_info", Gauge, Count, ["version"],
        "Always 1: the version of loopwatch the service runs, as a label (join it to other series to tell deployments apart).";
    RuntimeWorkers = "loopwatch_runtime_workers", Gauge, Count, ["runtime"],
        "Worker threads of the runtime (tokio-metrics workers_count).";
    RuntimeAliveTasks = "loopwatch_runtime_alive_tasks", Gauge, Count, ["runtime"],
        "Tasks alive on the runtime (tokio-metrics live_tasks_count).";
    RuntimeGlobalQueueDepth = "loopwatch_runtime_global_queue_depth", Gauge, Count, ["runtime"],
        "Tasks waiting in the runtime's global (injection) queue.";
    RuntimeBusyRatio = "loopwatch_runtime_busy_ratio", Gauge, Ratio, ["runtime"],
        "Share of the last interval the runtime's workers were busy, averaged over workers (0..1; a worker held by a stall counts as busy).";
    RuntimeWorkerBusyRatio = "loopwatch_runtime_worker_busy_ratio", Gauge, Ratio, ["runtime", "worker"],
        "Share of the last interval one worker was busy (0..1; a worker that neither parked nor woke all interval, such as one held by a stall, is busy).";
    RuntimeParks = "loopwatch_runtime_parks_total", Counter, Count, ["runtime"],
        "Times the runtime's workers parked (went idle).";
    RuntimeBlockingThreads = "loopwatch_runtime_blocking_threads", Gauge, Count, ["runtime"],
        "Threads of the runtime's blocking pool (tokio_unstable, or Guard::count_threads on stable tokio).";
    RuntimeIdleBlockingThreads = "loopwatch_runtime_idle_blocking_threads", Gauge, Count, ["runtime"],
        "Idle threads of the runtime's blocking pool (tokio_unstable builds only).";
    RuntimeBlockingQueueDepth = "loopwatch_runtime_blocking_queue_depth", Gauge, Count, ["runtime"],
        "Jobs waiting for a blocking-pool thread (tokio_unstable builds only).";
    RuntimeLocalQueueDepth = "loopwatch_runtime_local_queue_depth", Gauge, Count, ["runtime"],
        "Tasks waiting in the workers' local queues, summed (tokio_unstable builds only).";
    RuntimeSteals = "loopwatch_runtime_steals_total", Counter, Count, ["runtime"],
        "Tasks stolen between workers (tokio_unstable builds only).";
    RuntimeForcedYields = "loopwatch_runtime_budget_forced_yields_total", Counter, Count, ["runtime"],
        "Times tokio's coop budget forced a task to yield (tokio_unstable builds only).";
}

impl M {
    /// This metric's row in [`METRICS`].
    pub(crate) fn def(self) -> &'static MetricDef {
        &METRICS[self as usize]
    }
}

impl MetricDef {
    /// A counter of seconds: its value has fractions ([`MetricKind::Counter`]).
    pub fn is_float_counter(&self) -> bool {
        self.kind == MetricKind::Counter && self.unit == MetricUnit::Seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_rules() {
        let mut seen = std::collections::HashSet::new();
        for m in METRICS {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("loopwatch_"), "{}", m.name);
            assert!(
                m.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                m.name
            );
            match m.kind {
                MetricKind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                _ => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
            if m.unit == MetricUnit::Seconds {
                assert!(
                    m.name.ends_with("_seconds") || m.name.ends_with("_seconds_total"),
                    "{}",
                    m.name
                );
            }
            assert!(!m.labels.contains(&"task_id") && !m.labels.contains(&"id"));
            assert!(!m.help.is_empty());
        }
    }

    #[test]
    fn the_readme_lists_every_metric() {
        let readme = include_str!("../../README.md");
        for m in METRICS {
            assert!(
                readme.contains(&format!("`{}`", m.name)),
                "README lacks {}",
                m.name
            );
        }
    }

    #[test]
    fn buckets_cover_10us_to_10s() {
        assert_eq!(DURATION_BUCKETS[0], 0.000_01);
        assert_eq!(*DURATION_BUCKETS.last().unwrap(), 10.0);
        assert!(DURATION_BUCKETS.contains(&0.000_05) && DURATION_BUCKETS.contains(&0.000_1));
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn ids_index_their_rows() {
        assert_eq!(M::Polls.def().name, "loopwatch_polls_total");
        assert_eq!(
            M::RuntimeForcedYields.def().name,
            "loopwatch_runtime_budget_forced_yields_total"
        );
    }
}
