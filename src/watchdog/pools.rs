//! The parallel layers as a whole: a blocking pool whose jobs wait for a thread (it is full),
//! and a CPU pool fed jobs too small to be worth a dispatch. Each gives a rate-limited notice.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::kinds::KindId;
use crate::shared::Shared;
use crate::stall::Notice;

/// At most one blocking-pool notice in this long (board nanoseconds).
const BLOCKING_NOTICE_EVERY_NS: u64 = 1_000_000_000;
/// CPU pools are looked at once in this long.
const CPU_CHECK_EVERY_NS: u64 = 1_000_000_000;
/// At most one "too fine" notice per pool in this long.
#[cfg(feature = "rayon")]
const CPU_NOTICE_EVERY_NS: u64 = 10_000_000_000;
/// A pool is judged only after this many jobs since its last look.
#[cfg(feature = "rayon")]
const CPU_MIN_JOBS: u64 = 10_000;

/// The watchdog's memory of the pools between two looks.
#[derive(Debug, Default)]
pub(crate) struct Pools {
    /// When the last blocking-pool notice went out, and the slow starts since.
    last_notice_ns: Option<u64>,
    slow_starts_unreported: u64,
    /// CPU pools' totals (jobs, fine jobs, nanoseconds) at the last look, by pool index, and
    /// their last notice.
    #[cfg(feature = "rayon")]
    cpu_seen: Vec<(u64, u64, u64, Option<u64>)>,
    last_cpu_check_ns: u64,
}

impl Pools {
    /// A blocking job of `kind` waited `waited` ns for a thread: the pool is full. Counted; a
    /// notice at most once a second.
    pub(crate) fn slow_start(
        &mut self,
        shared: &Shared,
        kind: KindId,
        waited: u64,
        now: u64,
    ) -> Option<Notice> {
        shared.blocking_slow_starts.fetch_add(1, Ordering::Relaxed);
        self.slow_starts_unreported += 1;
        if self
            .last_notice_ns
            .is_some_and(|t| now.saturating_sub(t) < BLOCKING_NOTICE_EVERY_NS)
        {
            return None;
        }
        self.last_notice_ns = Some(now);
        let b = &shared.board.blocking;
        Some(Notice::BlockingSaturated {
            site: Arc::from(shared.board.kinds.get(kind).label()),
            waited: Duration::from_nanos(waited),
            running: b.running(),
            queued: b.queued(),
            max: b.max_threads.load(Ordering::Relaxed),
            since_last: std::mem::take(&mut self.slow_starts_unreported),
        })
    }

    /// Once a second: a CPU pool that ran at least 10,000 jobs since the last look, most of
    /// them under 50 µs, gets a "too fine" notice (at most one per pool every 10 s).
    pub(crate) fn check_cpu(&mut self, shared: &Shared, now: u64, out: &mut Vec<Notice>) {
        if now.saturating_sub(self.last_cpu_check_ns) < CPU_CHECK_EVERY_NS {
            return;
        }
        self.last_cpu_check_ns = now;
        #[cfg(feature = "rayon")]
        self.check_cpu_pools(shared, now, out);
        #[cfg(not(feature = "rayon"))]
        let _ = (shared, out);
    }

    #[cfg(feature = "rayon")]
    fn check_cpu_pools(&mut self, shared: &Shared, now: u64, out: &mut Vec<Notice>) {
        let pools = match shared.cpu_pools.lock() {
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
            let quiet = last.is_some_and(|t| now.saturating_sub(t) < CPU_NOTICE_EVERY_NS);
            if quiet {
                continue; // keep counting from the last notice
            }
            if dj >= CPU_MIN_JOBS && df * 2 >= dj {
                shared.too_fine_reports.fetch_add(1, Ordering::Relaxed);
                out.push(Notice::CpuTooFine {
                    pool: p.name.clone(),
                    jobs: dj,
                    fine: df,
                    mean: Duration::from_nanos(dn / dj.max(1)),
                });
                self.cpu_seen[i] = (jobs, fine, nanos, Some(now));
            } else {
                self.cpu_seen[i] = (jobs, fine, nanos, last);
            }
        }
    }
}
