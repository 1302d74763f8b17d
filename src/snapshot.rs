//! In-process figures: counters and poll-duration histograms, read with
//! [`Guard::snapshot`](crate::Guard::snapshot).

use std::time::Duration;

use crate::diagnose::Cause;
use crate::kinds::TaskKind;
use crate::stall::LayerKind;

/// Upper bounds of the poll-duration histogram buckets, in nanoseconds (the last bucket,
/// above 10 s, is implicit). 10 µs to 10 s, with 50 µs and 100 µs among them.
pub const POLL_BUCKETS_NS: [u64; 21] = [
    1_000,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A histogram of durations over [`POLL_BUCKETS_NS`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    /// `counts[i]` holds durations `<= POLL_BUCKETS_NS[i]` (and above the previous bound);
    /// the last entry holds everything above 10 s.
    pub counts: Vec<u64>,
    /// How many durations were recorded.
    pub count: u64,
    /// Their sum.
    pub sum: Duration,
    /// The largest.
    pub max: Duration,
}

impl Histogram {
    pub(crate) fn new() -> Histogram {
        Histogram {
            counts: vec![0; POLL_BUCKETS_NS.len() + 1],
            ..Histogram::default()
        }
    }

    pub(crate) fn record(&mut self, nanos: u64) {
        let i = POLL_BUCKETS_NS.partition_point(|&b| b < nanos);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.count += 1;
        let d = Duration::from_nanos(nanos);
        self.sum = self.sum.saturating_add(d);
        self.max = self.max.max(d);
    }

    /// The upper bound of the bucket that holds quantile `q` (0..=1), or `None` if empty.
    /// Durations above the last bound report `Duration::MAX`.
    pub fn quantile_bound(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(
                    POLL_BUCKETS_NS
                        .get(i)
                        .map_or(Duration::MAX, |&ns| Duration::from_nanos(ns)),
                );
            }
        }
        Some(Duration::MAX)
    }
}

/// The poll durations of one task kind on one layer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KindPolls {
    /// The task kind (name and site).
    pub kind: TaskKind,
    /// The layer its polls ran on.
    pub layer: LayerKind,
    /// Exactly timed polls (one in [`Snapshot::sample_every`] per thread).
    pub histogram: Histogram,
}

/// loopwatch's figures at one moment.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Snapshot {
    /// Polls that ended on watched threads.
    pub polls: u64,
    /// Polls that held their thread at least the threshold, measured on the watchdog's clock
    /// (to within one tick), whether or not the watchdog caught them running.
    pub slow_polls: u64,
    /// Polls counted by the watchdog, by layer (index with `LayerKind as usize`: async,
    /// blocking, cpu); each thread's polls count for the layer of its latest poll.
    pub polls_by_layer: [u64; 3],
    /// Slow polls, by layer, as `polls_by_layer`.
    pub slow_polls_by_layer: [u64; 3],
    /// Stalls detected (polls the watchdog saw running past the threshold).
    pub stalls_total: u64,
    /// Stalls running now.
    pub stalls_in_progress: u64,
    /// Of `stalls_total`, those caught as they ended: polls past the threshold the watchdog
    /// did not see running past it (see [`Stall::caught_at_end`](crate::Stall::caught_at_end)).
    pub stalls_caught_at_end: u64,
    /// "Death by a thousand cuts" notices sent: kinds whose polls, none a stall, kept the
    /// async workers asleep in a system call for 10 % of one worker's time over 10 s.
    pub thousand_cuts_reports: u64,
    /// Stalls found with no probe: a monitored runtime's worker asleep in a system call inside
    /// a task's poll (`Stall::probe_free`; counted in `stalls_total` too).
    pub probe_free_stalls: u64,
    /// Probe-free candidates turned down: a learnt thread asleep in a call for a threshold
    /// whose stack was not inside a task's poll on a worker (a blocking-pool job,
    /// `block_in_place`, or a stack that could not be read).
    pub probe_free_rejected: u64,
    /// The monitored runtimes' worker threads the probe-free path has learnt so far (each
    /// polled one of loopwatch's learner tasks).
    pub probe_free_workers: usize,
    /// Threads the probe-free path follows: the learnt workers, and the threads named like
    /// them (workers no learner reached yet, and blocking-pool threads, which the stack check
    /// turns down).
    pub probe_free_followed: usize,
    /// Why the probe-free path is off although runtimes are monitored (no symbol table, not
    /// Linux), once that is known.
    pub probe_free_error: Option<String>,
    /// The probe-free path is on: tokio's function ranges are loaded (read from the
    /// executable's symbol table on a thread of their own, after the first `monitor_runtime`)
    /// and at least one worker is learnt.
    pub probe_free_ready: bool,
    /// Polls found to be phantoms: a span entered with `span.enter()` and held across an
    /// `.await` kept the poll open on a worker that was parked or running another task. They
    /// are ended uncounted, never reported as stalls (see README, "What is watched").
    pub phantom_polls: u64,
    /// Of the stalls reported running, those found afterwards to be phantoms (dropped: no
    /// ended report; a notice names them).
    pub phantom_stalls: u64,
    /// How long the oldest running stall has run, if any runs.
    pub oldest_stall: Option<Duration>,
    /// Stall reports dropped because the report queue was full.
    pub dropped_reports: u64,
    /// Timed-poll samples dropped because the watchdog fell behind.
    pub dropped_samples: u64,
    /// Spans the layer could not follow because its span table was full.
    pub dropped_spans: u64,
    /// Task kinds that did not fit the kind table and were counted as `other`.
    pub kinds_overflow: u64,
    /// Threads that polled but found no free slot (raise `max_threads`).
    pub unwatched_threads: u64,
    /// Panics caught inside loopwatch's callbacks (a bug in loopwatch or in an `on_stall`
    /// callback; the service is not affected).
    pub caught_panics: u64,
    /// Stacks captured from stalled threads.
    pub stacks_captured: u64,
    /// Stalls reported without a stack because of the rate limit (`max_stacks_per_sec`).
    pub stacks_rate_limited: u64,
    /// Stack captures that failed or timed out.
    pub stacks_failed: u64,
    /// Stack captures refused because the stack signal no longer ran loopwatch's handler (the
    /// application took it back after start): capture then stops, with a reason in
    /// [`stack_setup_error`](Self::stack_setup_error) and a WARN.
    pub stacks_signal_lost: u64,
    /// Stacks not captured because the stalled thread was asleep in a system call (the signal
    /// would have interrupted it; the cause names the call).
    pub stacks_in_syscall: u64,
    /// Readings of stalled (or suspect) threads' kernel state taken for diagnosis.
    pub diagnosis_samples: u64,
    /// Environment values loopwatch did not use, and why (a bad `OTEL_*` value, whose default
    /// it used instead; an `https` OTLP endpoint without TLS, which turns its OTLP export off).
    pub env_warnings: Vec<String>,
    /// Why the Prometheus listener is off although it was asked for (its default address was
    /// taken, by a second loopwatch-enabled service on the host, say), if so.
    pub prometheus_error: Option<String>,
    /// Why stacks are not captured although they were asked for (the signal is taken by the
    /// application, not Linux), if so.
    pub stack_setup_error: Option<String>,
    /// One poll in this many per thread is timed for the histograms.
    pub sample_every: u64,
    /// Poll durations per task kind and layer.
    pub poll_durations: Vec<KindPolls>,
    /// Stalls detected, by task kind, layer and the cause known when each was detected
    /// (the most frequent first).
    pub stalls_by: Vec<StallCount>,
    /// Where the async workers' time inside polls under the threshold went, sampled (the
    /// thousand-cuts sampling, on Linux with `diagnose` and `thousand_cuts` on): by task kind,
    /// asleep in each system call or running (the most first). The same figures as
    /// `loopwatch_blocked_seconds_total` and `loopwatch_running_seconds_total`.
    pub time_in_polls: Vec<PollTime>,
    /// What the OTLP exporter sent and dropped (all zero when it is off).
    pub otlp: OtlpStats,
    /// Loop lag of each runtime given to
    /// [`Guard::monitor_runtime`](crate::Guard::monitor_runtime).
    pub loop_lag: Vec<RuntimeLag>,
    /// Schedule delays (wake to poll) of timed polls per task kind and layer: with tokio's
    /// poll hooks and schedule-latency tracking (`--cfg tokio_unstable`), and for
    /// [`Watched`](crate::Watched) futures; empty otherwise.
    pub schedule_delays: Vec<KindPolls>,
    /// Tasks that waited behind stalls (see [`Victims`](crate::Victims)).
    pub victims_total: u64,
    /// Jobs of loopwatch's [`spawn_blocking`](crate::spawn_blocking) running now.
    pub blocking_running: u64,
    /// Jobs of loopwatch's `spawn_blocking` waiting for a thread now.
    pub blocking_queued: u64,
    /// Blocking jobs that waited at least the stall threshold for a thread (the pool was full).
    pub blocking_slow_starts: u64,
    /// "Jobs too fine" reports sent about CPU pools (feature `rayon`).
    pub cpu_too_fine_reports: u64,
}

/// A runtime's loop lag: how long its heartbeat tasks waited from their spawn (from
/// loopwatch's export thread, every 25 ms, one at a time) to their first poll.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RuntimeLag {
    /// The name given to `monitor_runtime`.
    pub runtime: String,
    /// The lags.
    pub histogram: Histogram,
}

/// The OTLP exporter's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OtlpStats {
    /// Stall spans the collector accepted.
    pub spans_exported: u64,
    /// Stall records dropped: the queue was full (collector slow or down), or their export
    /// failed.
    pub spans_dropped: u64,
    /// Span exports that failed or timed out.
    pub span_export_errors: u64,
    /// Metric exports the collector accepted.
    pub metric_exports: u64,
    /// Frames of metrics dropped because the queue was full (the metrics are cumulative: the
    /// next export carries the counters; histogram values of that frame are lost).
    pub metric_frames_dropped: u64,
    /// Metric exports that failed or timed out.
    pub metric_export_errors: u64,
}

/// How many stalls one task kind caused on one layer, with one cause.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StallCount {
    /// The task kind (name and site).
    pub kind: TaskKind,
    /// The layer.
    pub layer: LayerKind,
    /// The cause known when the stalls were detected (sampled from half the threshold on).
    pub cause: Cause,
    /// How many.
    pub count: u64,
}

/// Sampled time the polls of one task kind spent asleep in one system call, or running,
/// without any of them reaching the threshold ([`Snapshot::time_in_polls`]).
///
/// Each time the watchdog samples a worker inside a poll (one worker every other tick, in
/// turn), the time since that worker's last sample goes to what the worker is doing then.
/// It is an estimate: good over seconds, noisy over one tick.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PollTime {
    /// The task kind (name and site).
    pub kind: TaskKind,
    /// The layer (async: the thousand-cuts sampling reads async workers only).
    pub layer: LayerKind,
    /// The system call the worker slept in (`clock_nanosleep`, `read`, ...; `#<number>` for
    /// one without a name here), or `None` for time spent running (on a CPU, or runnable and
    /// waiting for one).
    pub syscall: Option<std::borrow::Cow<'static, str>>,
    /// How long, in all since start.
    pub time: Duration,
}

impl Snapshot {
    /// The histogram of all kinds on `layer`, merged.
    pub fn poll_durations_on(&self, layer: LayerKind) -> Histogram {
        let mut h = Histogram::new();
        for k in self.poll_durations.iter().filter(|k| k.layer == layer) {
            for (a, b) in h.counts.iter_mut().zip(&k.histogram.counts) {
                *a += b;
            }
            h.count += k.histogram.count;
            h.sum = h.sum.saturating_add(k.histogram.sum);
            h.max = h.max.max(k.histogram.max);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upper_bounds() {
        let mut h = Histogram::new();
        h.record(1_000); // = 1 µs: first bucket
        h.record(1_001); // second
        h.record(20_000_000_000); // above 10 s: last
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[POLL_BUCKETS_NS.len()], 1);
        assert_eq!(h.count, 3);
        assert_eq!(h.max, Duration::from_secs(20));
        assert_eq!(h.quantile_bound(0.0), Some(Duration::from_micros(1)));
        assert_eq!(h.quantile_bound(0.5), Some(Duration::from_micros(5)));
        assert_eq!(h.quantile_bound(1.0), Some(Duration::MAX));
        assert_eq!(Histogram::new().quantile_bound(0.5), None);
    }

    #[test]
    fn buckets_include_50_and_100_microseconds() {
        assert!(POLL_BUCKETS_NS.contains(&50_000));
        assert!(POLL_BUCKETS_NS.contains(&100_000));
        assert!(POLL_BUCKETS_NS.windows(2).all(|w| w[0] < w[1]));
    }
}
