//! The watchdog: one OS thread (`loopwatch-watchdog`), never a task on the watched runtime.
//!
//! Each tick it stores the board's clock (the probes read it instead of the real clock), then
//! reads every claimed slot: a poll seen running past its layer's threshold becomes a stall,
//! reported at once while it still runs; a stall whose poll has moved on is reported ended with
//! its total. It also folds the timed-poll samples into the histograms and sums the counters.
//! It never waits on a watched thread: slot reads are lock-free, and the report goes into a
//! bounded queue that drops (and counts) when full.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::board::{
    decode, layer_of, Board, Culprit, Record, Slot, SlotRead, CLOCK_UNKNOWN, WAIT, WAIT_NANOS,
    WAIT_SAMPLED,
};
use crate::config::Config;
use crate::diagnose::sampler::{Ask, DiagCounters, Pending, Probe, Sampler};
use crate::diagnose::Cause;
use crate::kinds::KindId;
use crate::probe::layer::LayerShared;
use crate::report::{Notice, Report};
use crate::snapshot::{Histogram, KindPolls, OtlpStats, Snapshot, StallCount};
use crate::stall::{
    LayerKind, StackStatus, Stall, StallState, TaskInfo, Victim, Victims, WorkerInfo,
};

/// What the watchdog, the reporter and the guard share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) board: Arc<Board>,
    pub(crate) layer: Arc<LayerShared>,
    pub(crate) cfg: Config,
    pub(crate) stop: AtomicBool,
    polls: AtomicU64,
    /// Polls and slow polls by the layer of the thread's latest poll.
    polls_by_layer: [AtomicU64; 3],
    slow_by_layer: [AtomicU64; 3],
    stalls_total: AtomicU64,
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
    hist: Mutex<HashMap<(KindId, LayerKind), Histogram>>,
    /// Stalls detected, by kind, layer and the cause known at detection.
    pub(crate) stall_counts: Mutex<HashMap<StallKey, u64>>,
    /// Schedule delays of timed polls (poll hooks with schedule latency only).
    sched_hist: Mutex<HashMap<(KindId, LayerKind), Histogram>>,
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
}

/// A stall's label set: task kind, layer, cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct StallKey {
    pub(crate) kind: KindId,
    pub(crate) layer: LayerKind,
    pub(crate) cause: Cause,
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
    fn keep<T>(
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
fn record_all<K: std::hash::Hash + Eq + Copy>(
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
            hist: Mutex::new(HashMap::new()),
            stall_counts: Mutex::new(HashMap::new()),
            sched_hist: Mutex::new(HashMap::new()),
            victim_counts: Mutex::new(HashMap::new()),
            feed: export.then(|| Mutex::new(Feed::default())),
            export: ExportStats::default(),
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
        let stalls_by = if !tables {
            Vec::new()
        } else {
            self.stall_counts
                .lock()
                .map(|m| {
                    let mut v: Vec<StallCount> = m
                        .iter()
                        .map(|(k, &count)| StallCount {
                            kind: self.board.kinds.get(k.kind).clone(),
                            layer: k.layer,
                            cause: k.cause,
                            count,
                        })
                        .collect();
                    v.sort_by_key(|c| std::cmp::Reverse(c.count));
                    v
                })
                .unwrap_or_default()
        };
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
            diagnosis_samples: self.diag.samples.load(Ordering::Relaxed),
            stack_setup_error: self.stack_setup_error.lock().ok().and_then(|e| e.clone()),
            sample_every: self.board.sample_every(),
            poll_durations,
            stalls_by,
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

/// A stall the watchdog follows until its poll ends.
struct Open {
    kind: KindId,
    seq: u64,
    start_ns: u64,
    record: Stall,
    /// A stack capture not picked up yet; the running report waits for it (at most 50 ms).
    pending: Option<Pending>,
    /// Another stall's capture held the (process-wide) capture slot: ask again until then.
    retry_until_ns: Option<u64>,
    running_sent: bool,
    raw_stack: Option<Arc<[usize]>>,
}

/// The watchdog's own view of one slot.
#[derive(Default)]
struct SlotState {
    /// Polls of this slot already counted.
    done: u64,
    /// Slow polls of this slot already counted.
    slow_done: u64,
    /// The poll in progress last seen, and the tick that first saw it.
    seen_seq: u64,
    first_seen_ns: u64,
    /// The earliest the poll in progress can have started.
    start_lo_ns: u64,
    open: Option<Open>,
    /// Kernel-state sampling of the poll in progress, once it is a suspect.
    probe: Option<Probe>,
    /// The OS thread id of the slot's owner, read when a probe starts.
    tid: Option<u64>,
    /// Ended stalls held back a moment to collect the tasks that waited behind them.
    held: Vec<Held>,
    /// Recent long waits on this slot (a victim's record can be drained before the watchdog
    /// sees the stall's end).
    recent: Vec<WaitRec>,
}

/// A task that waited at least the wait floor before a poll on this slot.
#[derive(Debug, Clone, Copy)]
struct WaitRec {
    kind: KindId,
    task: u64,
    /// From its wake to its poll's start (board clock).
    from_ns: u64,
    to_ns: u64,
}

/// An ended stall waiting for its victims' records.
struct Held {
    kind: KindId,
    record: Stall,
    raw_stack: Option<Arc<[usize]>>,
    start_ns: u64,
    end_ns: u64,
    until_ns: u64,
    acc: VictimAcc,
}

/// Victims gathered so far.
#[derive(Default)]
struct VictimAcc {
    /// The stalled task's id (0: unknown): a task never waits behind its own poll.
    stalled_task: u64,
    count: u64,
    total_ns: u64,
    worst_ns: u64,
    /// The longest waits (kind, task id, ns), at most `MAX_VICTIMS`.
    top: Vec<(KindId, u64, u64)>,
    kinds: HashMap<KindId, u64>,
    waits: Vec<u64>,
}

/// Victims listed one by one per stall, at most (the longest waits); the rest are counted.
const MAX_VICTIMS: usize = 16;

impl VictimAcc {
    fn add(&mut self, w: &WaitRec, stall_start: u64, stall_end: u64) {
        if w.task != 0 && w.task == self.stalled_task {
            return;
        }
        let overlap = w
            .to_ns
            .min(stall_end)
            .saturating_sub(w.from_ns.max(stall_start));
        if overlap == 0 {
            return;
        }
        self.count += 1;
        self.total_ns = self.total_ns.saturating_add(overlap);
        self.worst_ns = self.worst_ns.max(overlap);
        *self.kinds.entry(w.kind).or_insert(0) += 1;
        if self.waits.len() < 4096 {
            self.waits.push(overlap);
        }
        if self.top.len() < MAX_VICTIMS {
            self.top.push((w.kind, w.task, overlap));
        } else if let Some(min) = self.top.iter_mut().min_by_key(|t| t.2) {
            if min.2 < overlap {
                *min = (w.kind, w.task, overlap);
            }
        }
    }
}

pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    reports: SyncSender<Report>,
    sampler: Sampler,
    states: Vec<SlotState>,
    /// Location words resolved to kinds (poll-hook culprits), so samples do not re-intern.
    locations: HashMap<u64, KindId>,
    samples: Vec<(u64, u64)>,
    resolved: Vec<((KindId, LayerKind), u64)>,
    waits: Vec<Record>,
    /// When the last blocking-pool notice went out, and the slow starts since.
    last_notice_ns: Option<u64>,
    slow_starts_unreported: u64,
    /// CPU pools' totals at the last granularity check (by pool index), and their last report.
    #[cfg(feature = "rayon")]
    cpu_seen: Vec<(u64, u64, u64, Option<u64>)>,
    last_cpu_check_ns: u64,
    next_stall_id: u64,
    ticks: u64,
    /// When the last tick took place (a poll that read `CLOCK_UNKNOWN` started after it).
    last_tick_ns: u64,
}

/// A stalled thread is read on every tick until it has this many readings, then one tick in
/// eight.
const DENSE_READINGS: u32 = 16;

impl Watchdog {
    pub(crate) fn new(shared: Arc<Shared>, reports: SyncSender<Report>) -> Watchdog {
        let (sampler, note) = Sampler::new(&shared.cfg);
        if let Ok(mut e) = shared.stack_setup_error.lock() {
            *e = note;
        }
        Watchdog {
            shared,
            reports,
            sampler,
            states: Vec::new(),
            locations: HashMap::new(),
            samples: Vec::new(),
            resolved: Vec::new(),
            waits: Vec::new(),
            last_notice_ns: None,
            slow_starts_unreported: 0,
            #[cfg(feature = "rayon")]
            cpu_seen: Vec::new(),
            last_cpu_check_ns: 0,
            next_stall_id: 1,
            ticks: 0,
            last_tick_ns: 0,
        }
    }

    /// The thread's body: tick until told to stop. A panic inside a tick is caught and
    /// counted; the watchdog goes on.
    pub(crate) fn run(mut self) {
        crate::board::mark_own_thread();
        let tick = self.shared.cfg.tick;
        // While the runtime is idle (no poll running, none ended since the last tick) nothing
        // can be stalled yet: sleep up to half the threshold (at least one tick) per wake-up.
        let idle_sleep = (self.shared.cfg.threshold / 2).max(tick);
        let mut idle_ticks = 0u32;
        let mut next = Instant::now();
        while !self.shared.stop.load(Ordering::Acquire) {
            let active = match catch_unwind(AssertUnwindSafe(|| self.tick())) {
                Ok(active) => active,
                Err(_) => {
                    self.shared.caught_panics.fetch_add(1, Ordering::Relaxed);
                    true
                }
            };
            idle_ticks = if active {
                0
            } else {
                idle_ticks.saturating_add(1)
            };
            if idle_ticks >= 2 && idle_sleep > tick {
                // Polls that start while we sleep long read "no time" instead of a stale clock,
                // so their start is taken from when we next see them, never from before.
                self.shared.board.tick(CLOCK_UNKNOWN);
                next += idle_sleep;
            } else {
                next += tick;
            }
            let now = Instant::now();
            if next <= now {
                // We fell behind (the host is loaded): skip the missed ticks.
                next = now + tick;
            }
            while !self.shared.stop.load(Ordering::Acquire) {
                let now = Instant::now();
                if now >= next {
                    break;
                }
                std::thread::park_timeout(next - now);
            }
        }
        // Stopping: stalls held for their victims go out now.
        let now = self.shared.board.now_ns();
        for i in 0..self.states.len() {
            let _ = catch_unwind(AssertUnwindSafe(|| self.release_held(i, now, true)));
        }
    }

    /// One tick; returns whether anything ran since the last one (a poll in progress or ended).
    fn tick(&mut self) -> bool {
        self.ticks = self.ticks.wrapping_add(1);
        let board = self.shared.board.clone();
        let now = board.now_ns();
        board.tick(now);
        let prev_tick = std::mem::replace(&mut self.last_tick_ns, now);
        let mut active = false;
        let slots = board.slots();
        if self.states.len() < slots.len() {
            self.states.resize_with(slots.len(), SlotState::default);
        }
        let mut polls = 0;
        let mut oldest = [0u64; 3];
        for (i, slot) in slots.iter().enumerate() {
            let r = slot.read();
            active |= r.in_poll();
            let st = &mut self.states[i];
            let done = r.seq >> 1;
            let new = done.saturating_sub(st.done);
            polls += new;
            st.done = done;
            // A thread serves one layer (workers, the blocking pool, a CPU pool): its polls
            // count for the layer of its latest one.
            let layer = layer_of(r.word) as usize;
            if new > 0 {
                self.shared.polls_by_layer[layer].fetch_add(new, Ordering::Relaxed);
            }
            let slow = slot.slow_polls();
            if slow > st.slow_done {
                self.shared.slow_by_layer[layer].fetch_add(slow - st.slow_done, Ordering::Relaxed);
                st.slow_done = slow;
            }

            if let Some(mut open) = st.open.take() {
                if r.seq == open.seq {
                    let o = &mut oldest[open.record.layer as usize];
                    *o = (*o).max(now.saturating_sub(open.start_ns));
                    self.sample(i, slot, &r, now);
                    if open.retry_until_ns.is_some() {
                        self.ask_stack(i, slot, &mut open, now);
                    }
                    self.progress(i, &mut open, now);
                    self.states[i].open = Some(open);
                } else {
                    self.end_stall(i, slot, &r, open, now);
                }
            }

            let st = &mut self.states[i];
            if r.stable && r.in_poll() && st.open.is_none() {
                if st.seen_seq != r.seq {
                    st.seen_seq = r.seq;
                    st.first_seen_ns = now;
                    // The earliest it can have started: the clock it read, or, if it started
                    // while the watchdog slept long, the tick before this one.
                    st.start_lo_ns = if r.start_ns == CLOCK_UNKNOWN {
                        prev_tick
                    } else {
                        r.start_ns
                    };
                }
                if let Some(open) = self.check(i, slot, &r, now) {
                    let o = &mut oldest[open.record.layer as usize];
                    *o = (*o).max(now.saturating_sub(open.start_ns));
                    self.states[i].open = Some(open);
                }
            } else if !r.in_poll() {
                st.probe = None;
            }

            let (samples, waits) = (&mut self.samples, &mut self.waits);
            slot.drain_samples(|r| {
                if r.nanos & WAIT != 0 {
                    waits.push(r);
                } else {
                    samples.push((r.word, r.nanos));
                }
            });
            if !self.waits.is_empty() {
                self.take_waits(i, now);
            }
            if !self.states[i].held.is_empty() {
                self.release_held(i, now, false);
            }
        }
        active |= polls > 0;
        self.shared.polls.fetch_add(polls, Ordering::Relaxed);
        for (a, o) in self.shared.oldest_ns.iter().zip(oldest) {
            a.store(o, Ordering::Relaxed);
        }
        self.fold_samples();
        if now.saturating_sub(self.last_cpu_check_ns) >= 1_000_000_000 {
            self.last_cpu_check_ns = now;
            #[cfg(feature = "rayon")]
            self.check_cpu_pools(now);
        }
        active
    }

    /// Is the poll `r` on slot `i` a stall? If so, flag it, report it, and follow it.
    fn check(&mut self, i: usize, slot: &Slot, r: &SlotRead, now: u64) -> Option<Open> {
        let (kind, layer) = self.resolve(r.word);
        let threshold = self.shared.board.threshold_ns(layer);
        if threshold == u64::MAX {
            return None;
        }
        let first_seen = self.states[i].first_seen_ns;
        // The lower bound of the poll's age: with the exact start, the exact age; otherwise the
        // poll began before the tick that first saw it, whatever the watchdog's lateness.
        let (age_lower, start_ns) = if self.shared.cfg.precise_start {
            (now.saturating_sub(r.start_ns), r.start_ns)
        } else {
            // It began after the clock value it read (or the tick before an idle sleep) and
            // before `first_seen`: take the middle of that window as its start (at most half a
            // tick off when ticks are on time).
            let lo = self.states[i].start_lo_ns.min(first_seen);
            let mid = lo + (first_seen - lo) / 2;
            (now.saturating_sub(first_seen), mid)
        };
        // A suspect (half-way to the threshold): sample its thread, so the cause is known from
        // several samples by the time it becomes a stall.
        if age_lower >= threshold / 2 {
            self.sample(i, slot, r, now);
        }
        if age_lower < threshold {
            return None;
        }
        slot.flag(r.seq);
        let (cause, cause_shares) = self.verdict(i, r.seq);
        let record = Stall {
            id: self.next_stall_id,
            task: self.task_info(kind, r),
            worker: worker_info(i, slot),
            layer,
            started_at: self.shared.board.system_time(start_ns),
            duration: Duration::from_nanos(now.saturating_sub(start_ns)),
            state: StallState::Running,
            threshold: Duration::from_nanos(threshold),
            exact_end: false,
            hint: hint_for(layer, &cause),
            cause,
            cause_shares,
            stack: None,
            stack_status: StackStatus::Disabled,
            victims: Victims {
                tracked: self.shared.board.waits_known(),
                ..Victims::default()
            },
        };
        self.next_stall_id += 1;
        self.shared.stalls_total.fetch_add(1, Ordering::Relaxed);
        self.shared.in_progress[layer as usize].fetch_add(1, Ordering::Relaxed);
        let mut open = Open {
            kind,
            seq: r.seq,
            start_ns,
            record,
            pending: None,
            retry_until_ns: None,
            running_sent: false,
            raw_stack: None,
        };
        self.ask_stack(i, slot, &mut open, now);
        Some(open)
    }

    /// Asks for the stack of the stall `open` on slot `i`; if another capture holds the slot,
    /// tries again on the next ticks, for at most 50 ms.
    fn ask_stack(&mut self, i: usize, slot: &Slot, open: &mut Open, now: u64) {
        let tid = self.states[i]
            .tid
            .or_else(|| slot.meta().and_then(|m| m.tid));
        match self.sampler.ask_stack(tid, now, &self.shared.diag) {
            Ask::Pending(p) => {
                open.pending = Some(p);
                open.retry_until_ns = None;
            }
            Ask::Busy => {
                let until = *open.retry_until_ns.get_or_insert(now + 50_000_000);
                if now >= until {
                    self.shared
                        .diag
                        .stacks_failed
                        .fetch_add(1, Ordering::Relaxed);
                    open.retry_until_ns = None;
                    open.record.stack_status = StackStatus::TimedOut;
                    self.send_running(i, open);
                }
            }
            Ask::Not(status) => {
                open.retry_until_ns = None;
                open.record.stack_status = status;
                self.send_running(i, open);
            }
        }
    }

    /// Samples the thread of the poll in progress on slot `i`.
    fn sample(&mut self, i: usize, slot: &Slot, r: &SlotRead, now: u64) {
        let st = &mut self.states[i];
        match &st.probe {
            Some(p) if p.seq == r.seq => {
                // A long stall: after the first readings (enough for a verdict), read it one
                // tick in eight, so many long stalls at once stay cheap to watch.
                if p.readings() >= DENSE_READINGS && self.ticks % 8 != 0 {
                    return;
                }
            }
            _ => st.tid = slot.meta().and_then(|m| m.tid),
        }
        self.sampler
            .observe(&mut st.probe, r.seq, st.tid, now, &self.shared.diag);
    }

    /// The cause of poll `seq` on slot `i` from the samples so far.
    fn verdict(&self, i: usize, seq: u64) -> (Cause, Vec<crate::diagnose::CauseShare>) {
        match &self.states[i].probe {
            Some(p) if p.seq == seq => p.verdict(),
            _ => (Cause::Unknown, Vec::new()),
        }
    }

    /// Picks up a pending stack capture; sends the running report once it is in (or too late).
    fn progress(&mut self, i: usize, open: &mut Open, now: u64) {
        let Some(p) = open.pending else { return };
        let Some(got) = self.sampler.poll_stack(p, now, &self.shared.diag) else {
            return;
        };
        open.pending = None;
        match got {
            Ok(ips) => {
                open.raw_stack = Some(ips.into());
                open.record.stack_status = StackStatus::Captured;
            }
            Err(status) => open.record.stack_status = status,
        }
        self.send_running(i, open);
    }

    /// Sends the running report, with the cause as sampled up to now.
    fn send_running(&mut self, i: usize, open: &mut Open) {
        let (cause, shares) = self.verdict(i, open.seq);
        open.record.cause = cause;
        open.record.hint = hint_for(open.record.layer, &cause);
        open.record.cause_shares = shares;
        open.running_sent = true;
        let key = StallKey {
            kind: open.kind,
            layer: open.record.layer,
            cause,
        };
        if let Ok(mut m) = self.shared.stall_counts.lock() {
            *m.entry(key).or_insert(0) += 1;
        }
        let stall = open.record.clone();
        self.send(stall, open.raw_stack.clone());
    }

    fn end_stall(&mut self, i: usize, slot: &Slot, r: &SlotRead, mut open: Open, now: u64) {
        if !open.running_sent {
            // It ended before its stack came in: one last look, then the running report.
            if let Some(p) = open.pending {
                let late = Pending {
                    deadline_ns: now,
                    ..p
                };
                open.pending = Some(late);
                self.progress(i, &mut open, now);
            } else {
                if open.retry_until_ns.take().is_some() {
                    // It ended while waiting for another stall's capture to finish.
                    self.shared
                        .diag
                        .stacks_failed
                        .fetch_add(1, Ordering::Relaxed);
                    open.record.stack_status = StackStatus::Failed;
                }
                self.send_running(i, &mut open);
            }
        }
        let exact = slot.flagged_end_ns();
        let (end, exact_end) = if exact != 0 {
            (exact, true)
        } else if r.seq == open.seq + 1 {
            // The poll ended in the instant it was flagged: the watchdog's clock at its end.
            match slot.end_coarse_ns() {
                CLOCK_UNKNOWN => (now, false),
                c => (c.max(open.start_ns), false),
            }
        } else {
            (now, false)
        };
        let (cause, shares) = self.verdict(i, open.seq);
        let mut record = open.record;
        record.state = StallState::Ended;
        record.duration = Duration::from_nanos(end.saturating_sub(open.start_ns));
        record.exact_end = exact_end;
        record.cause = cause;
        record.hint = hint_for(record.layer, &cause);
        record.cause_shares = shares;
        self.states[i].probe = None;
        self.shared.in_progress[record.layer as usize].fetch_sub(1, Ordering::Relaxed);
        if self.shared.board.waits_known() {
            // Wait a moment for the tasks queued behind it to be polled: their records say
            // how long they waited.
            let stall_start = open.start_ns;
            let window = (record.threshold.as_nanos() as u64).clamp(5_000_000, 100_000_000);
            let stalled_task = record.task.id.unwrap_or(0);
            let mut held = Held {
                kind: open.kind,
                record,
                raw_stack: open.raw_stack,
                start_ns: stall_start,
                end_ns: end,
                until_ns: now.max(end) + window,
                acc: VictimAcc {
                    stalled_task,
                    ..VictimAcc::default()
                },
            };
            for w in &self.states[i].recent {
                held.acc.add(w, stall_start, end);
            }
            self.states[i].held.push(held);
            return;
        }
        self.feed_stall(open.kind, &record);
        self.send(record, open.raw_stack);
    }

    /// Hands `f` the exporters' feed, when something is exported.
    fn with_feed(&self, f: impl FnOnce(&mut Feed)) {
        if let Some(Ok(mut feed)) = self.shared.feed.as_ref().map(Mutex::lock) {
            f(&mut feed);
        }
    }

    /// An ended stall's exact duration, for the stall-duration histogram.
    fn feed_stall(&self, kind: KindId, record: &Stall) {
        let key = StallKey {
            kind,
            layer: record.layer,
            cause: record.cause,
        };
        let ns = record.duration.as_nanos() as u64;
        self.with_feed(|f| Feed::keep(&mut f.stalls, Feed::STALL_CAP, &mut f.dropped, [(key, ns)]));
    }

    fn send(&self, stall: Stall, raw_stack: Option<Arc<[usize]>>) {
        self.send_report(Report::Stall { stall, raw_stack });
    }

    fn send_report(&self, report: Report) {
        match self.reports.try_send(report) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.dropped_reports.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn resolve(&mut self, word: u64) -> (KindId, LayerKind) {
        match decode(word) {
            Culprit::Location(_) => {
                let board = &self.shared.board;
                let kind = *self
                    .locations
                    .entry(word)
                    .or_insert_with(|| board.resolve(word).0);
                (kind, LayerKind::Async)
            }
            _ => self.shared.board.resolve(word),
        }
    }

    /// Names the task of a poll: its id and site come from the outermost culprit (the task
    /// itself: tokio's task span or poll hook, or the outermost span); its name from the
    /// outermost culprit that has one; `span` is the innermost span open, if another.
    fn task_info(&mut self, kind: KindId, r: &SlotRead) -> TaskInfo {
        let k = self.shared.board.kinds.get(kind).clone();
        let mut info = TaskInfo {
            name: k.name.clone(),
            id: (r.task != 0).then_some(r.task),
            site: k.site.clone(),
            span: None,
        };
        if info.name.is_none() && r.named != 0 {
            let (n, _) = self.resolve(r.named);
            info.name = self.shared.board.kinds.get(n).name.clone();
        }
        if r.inner != 0 {
            let (inner, _) = self.resolve(r.inner);
            let ik = self.shared.board.kinds.get(inner);
            // tokio's task span inside a poll hook is the task itself (same site): not a span.
            if inner != kind && ik.site != k.site {
                info.span = Some(match (&ik.name, &ik.site) {
                    (Some(n), Some(s)) => format!("{n} ({s})").into(),
                    _ => ik.label().into(),
                });
            }
        }
        info
    }

    /// Schedule delays drained from slot `i`: timed ones go into the histograms; long ones are
    /// matched with the stalls that ended on that slot (their victims).
    fn take_waits(&mut self, i: usize, now: u64) {
        let floor = self.shared.board.threshold_ns(LayerKind::Async) / 10;
        let mut waits = std::mem::take(&mut self.waits);
        let mut timed = Vec::new();
        for r in waits.drain(..) {
            let waited = r.nanos & WAIT_NANOS;
            let (kind, layer) = self.resolve(r.word);
            if r.nanos & WAIT_SAMPLED != 0 {
                timed.push(((kind, layer), waited));
            }
            if layer == LayerKind::Blocking {
                if waited >= floor * 10 {
                    self.slow_start(kind, waited, now);
                }
                continue;
            }
            if waited < floor {
                continue;
            }
            let to_ns = if r.start == CLOCK_UNKNOWN {
                now
            } else {
                r.start
            };
            let w = WaitRec {
                kind,
                task: r.task,
                from_ns: to_ns.saturating_sub(waited),
                to_ns,
            };
            let st = &mut self.states[i];
            for h in &mut st.held {
                h.acc.add(&w, h.start_ns, h.end_ns);
            }
            if st.recent.len() >= 512 {
                st.recent.drain(..256);
            }
            st.recent.push(w);
        }
        self.waits = waits;
        // Forget waits too old to belong to a stall still to be seen ending.
        let horizon = now.saturating_sub(1_000_000_000);
        self.states[i].recent.retain(|w| w.to_ns >= horizon);
        if timed.is_empty() {
            return;
        }
        record_all(&self.shared.sched_hist, &timed);
        self.with_feed(|f| {
            Feed::keep(
                &mut f.sched,
                Feed::CAP,
                &mut f.dropped,
                timed.iter().copied(),
            )
        });
    }

    /// Once a second: a CPU pool that ran at least 10,000 jobs since the last look, most of them
    /// under 50 µs, gets a "too fine" report (at most one per pool every 10 s).
    #[cfg(feature = "rayon")]
    fn check_cpu_pools(&mut self, now: u64) {
        let pools = match self.shared.cpu_pools.lock() {
            Ok(p) => p.clone(),
            Err(_) => return,
        };
        self.cpu_seen.resize(pools.len(), (0, 0, 0, None));
        for (i, p) in pools.iter().enumerate() {
            let (jobs, fine, nanos) = p.totals();
            let (j0, f0, n0, last) = self.cpu_seen[i];
            let (dj, df, dn) = (
                jobs.saturating_sub(j0),
                fine.saturating_sub(f0),
                nanos.saturating_sub(n0),
            );
            let quiet = last.is_some_and(|t| now.saturating_sub(t) < 10_000_000_000);
            if quiet {
                continue; // keep counting from the last report
            }
            if dj >= 10_000 && df * 2 >= dj {
                self.shared.too_fine_reports.fetch_add(1, Ordering::Relaxed);
                self.send_report(Report::Notice(Notice::CpuTooFine {
                    pool: p.name.clone(),
                    jobs: dj,
                    fine: df,
                    mean: Duration::from_nanos(dn / dj.max(1)),
                }));
                self.cpu_seen[i] = (jobs, fine, nanos, Some(now));
            } else {
                self.cpu_seen[i] = (jobs, fine, nanos, last);
            }
        }
    }

    /// A blocking job waited past the stall threshold for a thread: the pool is full. Counted;
    /// reported at most once a second.
    fn slow_start(&mut self, kind: KindId, waited: u64, now: u64) {
        self.shared
            .blocking_slow_starts
            .fetch_add(1, Ordering::Relaxed);
        self.slow_starts_unreported += 1;
        if self
            .last_notice_ns
            .is_some_and(|t| now.saturating_sub(t) < 1_000_000_000)
        {
            return;
        }
        self.last_notice_ns = Some(now);
        let b = &self.shared.board.blocking;
        let notice = Notice::BlockingSaturated {
            site: Arc::from(self.shared.board.kinds.get(kind).label()),
            waited: Duration::from_nanos(waited),
            running: b.running(),
            queued: b.queued(),
            max: b.max_threads.load(Ordering::Relaxed),
            since_last: std::mem::take(&mut self.slow_starts_unreported),
        };
        self.send_report(Report::Notice(notice));
    }

    /// Sends the held stalls of slot `i` whose wait for victims is over (all with `force`).
    fn release_held(&mut self, i: usize, now: u64, force: bool) {
        let Some(st) = self.states.get_mut(i) else {
            return;
        };
        let (ready, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut st.held)
            .into_iter()
            .partition(|h| force || now >= h.until_ns);
        st.held = keep;
        for h in ready {
            let Held {
                kind,
                mut record,
                raw_stack,
                acc,
                ..
            } = h;
            record.victims = self.victims_of(&acc);
            let key = (record.layer, record.cause.kind());
            if acc.count > 0 {
                if let Ok(mut m) = self.shared.victim_counts.lock() {
                    *m.entry(key).or_insert(0) += acc.count;
                }
                let waits = acc.waits.iter().map(|&w| (key, w));
                self.with_feed(|f| Feed::keep(&mut f.victims, Feed::CAP, &mut f.dropped, waits));
            }
            self.feed_stall(kind, &record);
            self.send(record, raw_stack);
        }
    }

    fn victims_of(&self, acc: &VictimAcc) -> Victims {
        let kinds = &self.shared.board.kinds;
        let label = |k: KindId| -> Arc<str> { Arc::from(kinds.get(k).label()) };
        let mut tasks: Vec<Victim> = acc
            .top
            .iter()
            .map(|&(k, task, ns)| Victim {
                kind: label(k),
                task_id: (task != 0).then_some(task),
                waited: Duration::from_nanos(ns),
            })
            .collect();
        tasks.sort_by_key(|v| std::cmp::Reverse(v.waited));
        let mut top: Vec<(KindId, u64)> = acc.kinds.iter().map(|(&k, &n)| (k, n)).collect();
        top.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        top.truncate(5);
        Victims {
            tracked: true,
            count: acc.count,
            total_wait: Duration::from_nanos(acc.total_ns),
            worst_wait: Duration::from_nanos(acc.worst_ns),
            tasks,
            top_kinds: top.into_iter().map(|(k, n)| (label(k), n)).collect(),
        }
    }

    fn fold_samples(&mut self) {
        if self.samples.is_empty() {
            return;
        }
        // Both buffers are kept across ticks: no allocation per tick once warm.
        let mut samples = std::mem::take(&mut self.samples);
        let mut resolved = std::mem::take(&mut self.resolved);
        resolved.extend(
            samples
                .drain(..)
                .map(|(word, nanos)| (self.resolve(word), nanos)),
        );
        self.samples = samples;
        record_all(&self.shared.hist, &resolved);
        self.with_feed(|f| {
            Feed::keep(
                &mut f.polls,
                Feed::CAP,
                &mut f.dropped,
                resolved.iter().copied(),
            );
        });
        resolved.clear();
        self.resolved = resolved;
    }
}

fn worker_info(index: usize, slot: &Slot) -> WorkerInfo {
    let meta = slot.meta();
    WorkerInfo {
        index,
        thread_name: meta.as_ref().and_then(|m| m.name.clone()),
        tid: meta.and_then(|m| m.tid),
    }
}

/// The one-line hint for a stall with `cause` on `layer`: a CPU pool's job sitting in a system
/// call is the pool used for waiting, whatever the call.
fn hint_for(layer: LayerKind, cause: &Cause) -> Option<&'static str> {
    match (layer, cause) {
        (LayerKind::Cpu, Cause::Syscall(_)) => Some(
            "a CPU pool job waiting in a system call: a parallel layer used for waiting holds \
             a core's worth of thread; do the waiting on async tasks or the blocking pool",
        ),
        _ => cause.hint(),
    }
}
