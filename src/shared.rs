//! What every loopwatch thread of one install shares: the board, the config, the counters and
//! histograms the watchdog keeps, the exporters' feed, and the assembly of a [`Snapshot`] from
//! them. The watchdog writes here; the reporter, the exporters and the guard read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::board::{Board, Slot};
use crate::config::Config;
use crate::diagnose::sampler::DiagCounters;
use crate::diagnose::Cause;
use crate::kinds::KindId;
use crate::probe::layer::LayerShared;
use crate::snapshot::{Histogram, KindPolls, OtlpStats, PollTime, Snapshot, StallCount};
use crate::stall::{LayerKind, Notice};

/// What the watchdog, the reporter and the guard share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) board: Arc<Board>,
    pub(crate) layer: Arc<LayerShared>,
    pub(crate) cfg: Config,
    pub(crate) stop: AtomicBool,
    pub(crate) polls: AtomicU64,
    /// Polls and slow polls by the layer of the thread's latest poll.
    pub(crate) polls_by_layer: [AtomicU64; 3],
    pub(crate) slow_by_layer: [AtomicU64; 3],
    pub(crate) stalls_total: AtomicU64,
    /// Running stalls found to be phantoms afterwards (dropped, not reported as ended).
    pub(crate) phantom_stalls: AtomicU64,
    /// Polls the watchdog found to be phantoms (their threads parked).
    pub(crate) phantoms_parked: AtomicU64,
    /// Stalls caught at their end (never seen running past the threshold).
    pub(crate) stalls_caught: AtomicU64,
    /// Thousand-cuts notices sent.
    pub(crate) cut_reports: AtomicU64,
    /// The probe-free path: the runtimes and workers it follows, the stalls it found, and the
    /// candidates its stack check turned down (not inside a task's poll on a worker).
    pub(crate) bare: crate::workers::BareRegistry,
    pub(crate) bare_stalls: AtomicU64,
    pub(crate) bare_rejected: AtomicU64,
    /// Stalls running now, by layer.
    pub(crate) in_progress: [AtomicU64; 3],
    /// Age of the oldest running stall in nanoseconds per layer, 0 when none runs.
    pub(crate) oldest_ns: [AtomicU64; 3],
    pub(crate) dropped_reports: AtomicU64,
    pub(crate) caught_panics: AtomicU64,
    /// Blocking jobs that waited past the async stall threshold for a thread.
    pub(crate) blocking_slow_starts: AtomicU64,
    /// CPU pools made with `Guard::cpu_pool`.
    #[cfg(feature = "rayon")]
    pub(crate) cpu_pools: Mutex<Vec<Arc<crate::probe::cpu::CpuStats>>>,
    /// "Jobs too fine" reports sent.
    pub(crate) too_fine_reports: AtomicU64,
    pub(crate) diag: DiagCounters,
    /// Why stacks are off although they were asked for (the signal is taken, ...).
    pub(crate) stack_setup_error: Mutex<Option<String>>,
    /// Why the Prometheus listener is off although it was asked for (its default address was
    /// busy).
    pub(crate) prometheus_error: Mutex<Option<String>>,
    /// Notices from start-up, for the reporter to emit once the layer is in a subscriber.
    pub(crate) startup_notices: Mutex<Vec<Notice>>,
    /// Environment values that were not used, and why.
    pub(crate) env_warnings: Mutex<Vec<String>>,
    pub(crate) hist: Mutex<HashMap<(KindId, LayerKind), Histogram>>,
    /// Stalls detected, by kind, layer and the cause known at detection.
    pub(crate) stall_counts: Mutex<HashMap<StallKey, u64>>,
    /// Sampled time inside polls under the threshold (the thousand-cuts sampling), in
    /// nanoseconds, by kind, layer and what the worker did.
    pub(crate) poll_time: Mutex<HashMap<PollTimeKey, u64>>,
    /// Schedule delays of timed polls (poll hooks with schedule latency only).
    pub(crate) sched_hist: Mutex<HashMap<(KindId, LayerKind), Histogram>>,
    /// Tasks that waited behind stalls, by the stall's layer and cause.
    pub(crate) victim_counts: Mutex<HashMap<(LayerKind, &'static str), u64>>,
    /// Raw figures for the exporters, taken by the export thread each interval; `None` when no
    /// exporter runs (nothing is kept).
    pub(crate) feed: Option<Mutex<Feed>>,
    /// The OTLP exporter's counters.
    pub(crate) export: ExportStats,
}

/// What the OTLP exporter sent, dropped and failed to send.
#[derive(Debug, Default)]
pub(crate) struct ExportStats {
    pub(crate) spans_exported: AtomicU64,
    pub(crate) spans_dropped: AtomicU64,
    pub(crate) spans_errors: AtomicU64,
    pub(crate) metric_exports: AtomicU64,
    pub(crate) metrics_dropped: AtomicU64,
    pub(crate) metrics_errors: AtomicU64,
    /// The `/metrics` listener's `accept` failures (out of descriptors, ...).
    pub(crate) listener_accept_errors: AtomicU64,
    /// Scrape clients dropped: too slow, a request too long or not HTTP, or gone.
    pub(crate) listener_client_errors: AtomicU64,
}

/// A stall's label set: task kind, layer, cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct StallKey {
    pub(crate) kind: KindId,
    pub(crate) layer: LayerKind,
    pub(crate) cause: Cause,
}

/// What sampled time inside polls is put down to: a task kind on a layer, asleep in one
/// system call (by number) or running (`syscall: None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PollTimeKey {
    pub(crate) kind: KindId,
    pub(crate) layer: LayerKind,
    pub(crate) syscall: Option<i64>,
}

/// Exact values the exporters record into their histograms, gathered by the watchdog between
/// two exports. Bounded: past [`Feed::CAP`] values are dropped and counted.
#[derive(Debug, Default)]
pub(crate) struct Feed {
    pub(crate) polls: Vec<((KindId, LayerKind), u64)>,
    pub(crate) stalls: Vec<(StallKey, u64)>,
    /// Schedule delays of timed polls.
    pub(crate) sched: Vec<((KindId, LayerKind), u64)>,
    /// How long each victim waited behind its stall, by the stall's layer and cause.
    pub(crate) victims: Vec<((LayerKind, &'static str), u64)>,
    pub(crate) dropped: u64,
}

impl Feed {
    /// At most this many poll samples wait between two exports (one second of 1-in-64 samples
    /// at 4M polls/s).
    pub(crate) const CAP: usize = 1 << 16;
    /// At most this many ended stalls wait between two exports.
    pub(crate) const STALL_CAP: usize = 4096;

    /// Appends the `items` that fit under `cap` to `into`; the rest are counted in `dropped`.
    pub(crate) fn keep<T>(
        into: &mut Vec<T>,
        cap: usize,
        dropped: &mut u64,
        items: impl IntoIterator<Item = T>,
    ) {
        for item in items {
            if into.len() < cap {
                into.push(item);
            } else {
                *dropped += 1;
            }
        }
    }
}

/// Records each `(key, ns)` value in its histogram of `hist`.
pub(crate) fn record_all<K: std::hash::Hash + Eq + Copy>(
    hist: &Mutex<HashMap<K, Histogram>>,
    values: &[(K, u64)],
) {
    if let Ok(mut h) = hist.lock() {
        for &(key, ns) in values {
            h.entry(key).or_insert_with(Histogram::new).record(ns);
        }
    }
}

impl Shared {
    pub(crate) fn new(
        board: Arc<Board>,
        layer: Arc<LayerShared>,
        cfg: Config,
        export: bool,
    ) -> Shared {
        Shared {
            board,
            layer,
            cfg,
            stop: AtomicBool::new(false),
            polls: AtomicU64::new(0),
            polls_by_layer: Default::default(),
            slow_by_layer: Default::default(),
            stalls_total: AtomicU64::new(0),
            phantom_stalls: AtomicU64::new(0),
            phantoms_parked: AtomicU64::new(0),
            stalls_caught: AtomicU64::new(0),
            cut_reports: AtomicU64::new(0),
            bare: Default::default(),
            bare_stalls: AtomicU64::new(0),
            bare_rejected: AtomicU64::new(0),
            in_progress: Default::default(),
            oldest_ns: Default::default(),
            dropped_reports: AtomicU64::new(0),
            caught_panics: AtomicU64::new(0),
            blocking_slow_starts: AtomicU64::new(0),
            #[cfg(feature = "rayon")]
            cpu_pools: Mutex::new(Vec::new()),
            too_fine_reports: AtomicU64::new(0),
            diag: DiagCounters::default(),
            stack_setup_error: Mutex::new(None),
            prometheus_error: Mutex::new(None),
            startup_notices: Mutex::new(Vec::new()),
            env_warnings: Mutex::new(Vec::new()),
            hist: Mutex::new(HashMap::new()),
            stall_counts: Mutex::new(HashMap::new()),
            poll_time: Mutex::new(HashMap::new()),
            sched_hist: Mutex::new(HashMap::new()),
            victim_counts: Mutex::new(HashMap::new()),
            feed: export.then(|| Mutex::new(Feed::default())),
            export: ExportStats::default(),
        }
    }

    /// The Prometheus listener could not start (`e`) and is off: said in the snapshot, and in a
    /// WARN once the reporter can reach the application's subscriber.
    pub(crate) fn listener_off(&self, e: &crate::Error) {
        let reason = format!(
            "{e}; loopwatch serves no /metrics (the service runs as usual; \
             `Builder::require_prometheus(true)` makes this fail start-up instead)"
        );
        if let Ok(mut p) = self.prometheus_error.lock() {
            *p = Some(reason.clone());
        }
        if let Ok(mut n) = self.startup_notices.lock() {
            n.push(Notice::ListenerOff { reason });
        }
    }

    /// An environment value was not used (`reason` says which and why): said in the snapshot,
    /// and in a WARN once the reporter can reach the application's subscriber.
    pub(crate) fn env_ignored(&self, reason: String) {
        if let Ok(mut w) = self.env_warnings.lock() {
            w.push(reason.clone());
        }
        if let Ok(mut n) = self.startup_notices.lock() {
            n.push(Notice::EnvIgnored { reason });
        }
    }

    /// Stalls running now, all layers.
    pub(crate) fn stalls_in_progress(&self) -> u64 {
        self.in_progress
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }

    /// The histograms of `map` per task kind and layer, the fullest first.
    fn kind_polls(&self, map: &Mutex<HashMap<(KindId, LayerKind), Histogram>>) -> Vec<KindPolls> {
        let Ok(h) = map.lock() else {
            return Vec::new();
        };
        let mut v: Vec<KindPolls> = h
            .iter()
            .map(|(&(kind, layer), histogram)| KindPolls {
                kind: self.board.kinds.get(kind).clone(),
                layer,
                histogram: histogram.clone(),
            })
            .collect();
        v.sort_by_key(|b| std::cmp::Reverse(b.histogram.count));
        v
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        self.snapshot_with(true)
    }

    /// The counters and gauges only: no histogram or per-kind table is copied (the export
    /// thread takes exact values from the feed instead, every interval).
    pub(crate) fn counters(&self) -> Snapshot {
        self.snapshot_with(false)
    }

    fn snapshot_with(&self, tables: bool) -> Snapshot {
        let slots = self.board.slots();
        let oldest = self
            .oldest_ns
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let schedule_delays = if tables {
            self.kind_polls(&self.sched_hist)
        } else {
            Vec::new()
        };
        let victims_total = self
            .victim_counts
            .lock()
            .map(|m| m.values().sum())
            .unwrap_or(0);
        let mut stalls_by = if tables {
            rows(&self.stall_counts, |k, &count| StallCount {
                kind: self.board.kinds.get(k.kind).clone(),
                layer: k.layer,
                cause: k.cause,
                count,
            })
        } else {
            Vec::new()
        };
        let mut time_in_polls = if tables {
            rows(&self.poll_time, |k, &ns| PollTime {
                kind: self.board.kinds.get(k.kind).clone(),
                layer: k.layer,
                syscall: k.syscall.map(syscall_name),
                time: Duration::from_nanos(ns),
            })
        } else {
            Vec::new()
        };
        stalls_by.sort_by_key(|c| std::cmp::Reverse(c.count));
        time_in_polls.sort_by_key(|t| std::cmp::Reverse(t.time));
        let poll_durations = if tables {
            self.kind_polls(&self.hist)
        } else {
            Vec::new()
        };
        Snapshot {
            polls: self.polls.load(Ordering::Relaxed),
            slow_polls: slots.iter().map(Slot::slow_polls).sum(),
            polls_by_layer: self
                .polls_by_layer
                .each_ref()
                .map(|a| a.load(Ordering::Relaxed)),
            slow_polls_by_layer: self
                .slow_by_layer
                .each_ref()
                .map(|a| a.load(Ordering::Relaxed)),
            stalls_total: self.stalls_total.load(Ordering::Relaxed),
            phantom_polls: self.phantoms_parked.load(Ordering::Relaxed)
                + slots.iter().map(Slot::phantoms).sum::<u64>(),
            phantom_stalls: self.phantom_stalls.load(Ordering::Relaxed),
            stalls_caught_at_end: self.stalls_caught.load(Ordering::Relaxed),
            thousand_cuts_reports: self.cut_reports.load(Ordering::Relaxed),
            probe_free_stalls: self.bare_stalls.load(Ordering::Relaxed),
            probe_free_rejected: self.bare_rejected.load(Ordering::Relaxed),
            probe_free_workers: self.bare.learnt_count(),
            probe_free_followed: self.bare.followed_count(),
            probe_free_error: self.bare.error(),
            probe_free_ready: self.bare.ready(),
            stalls_in_progress: self.stalls_in_progress(),
            oldest_stall: (oldest > 0).then(|| Duration::from_nanos(oldest)),
            dropped_reports: self.dropped_reports.load(Ordering::Relaxed),
            dropped_samples: slots.iter().map(Slot::samples_dropped).sum(),
            dropped_spans: self.layer.spans.dropped(),
            kinds_overflow: self.board.kinds.overflow(),
            unwatched_threads: self.board.unwatched_threads(),
            caught_panics: self.caught_panics.load(Ordering::Relaxed),
            stacks_captured: self.diag.stacks_captured.load(Ordering::Relaxed),
            stacks_rate_limited: self.diag.stacks_rate_limited.load(Ordering::Relaxed),
            stacks_failed: self.diag.stacks_failed.load(Ordering::Relaxed),
            stacks_signal_lost: self.diag.stacks_signal_lost.load(Ordering::Relaxed),
            stacks_in_syscall: self.diag.stacks_in_syscall.load(Ordering::Relaxed),
            diagnosis_samples: self.diag.samples.load(Ordering::Relaxed),
            stack_setup_error: self.stack_setup_error.lock().ok().and_then(|e| e.clone()),
            prometheus_error: self.prometheus_error.lock().ok().and_then(|e| e.clone()),
            env_warnings: self
                .env_warnings
                .lock()
                .map(|w| w.clone())
                .unwrap_or_default(),
            sample_every: self.board.sample_every(),
            poll_durations,
            stalls_by,
            time_in_polls,
            otlp: OtlpStats {
                spans_exported: self.export.spans_exported.load(Ordering::Relaxed),
                spans_dropped: self.export.spans_dropped.load(Ordering::Relaxed),
                span_export_errors: self.export.spans_errors.load(Ordering::Relaxed),
                metric_exports: self.export.metric_exports.load(Ordering::Relaxed),
                metric_frames_dropped: self.export.metrics_dropped.load(Ordering::Relaxed),
                metric_export_errors: self.export.metrics_errors.load(Ordering::Relaxed),
            },
            // Filled in by the guard, which holds the monitored runtimes.
            loop_lag: Vec::new(),
            schedule_delays,
            victims_total,
            blocking_running: self.board.blocking.running(),
            blocking_queued: self.board.blocking.queued(),
            blocking_slow_starts: self.blocking_slow_starts.load(Ordering::Relaxed),
            cpu_too_fine_reports: self.too_fine_reports.load(Ordering::Relaxed),
        }
    }
}

/// One row per entry of the table behind `m` (empty if its lock was poisoned).
fn rows<K, V, T>(m: &Mutex<HashMap<K, V>>, row: impl Fn(&K, &V) -> T) -> Vec<T> {
    m.lock()
        .map(|m| m.iter().map(|(k, v)| row(k, v)).collect())
        .unwrap_or_default()
}

/// A system call's name for labels and snapshots (`#<number>` where the table has none).
pub(crate) fn syscall_name(nr: i64) -> std::borrow::Cow<'static, str> {
    match crate::diagnose::syscalls::name(nr) {
        Some(n) => n.into(),
        None => format!("#{nr}").into(),
    }
}
