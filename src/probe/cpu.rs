//! The CPU-pool probe (feature `rayon`): a rayon pool whose jobs loopwatch times on the `cpu`
//! layer. From the seeds of this project: a job under 50–100 µs of compute costs more to
//! dispatch than it gains, so the watchdog counts too-fine jobs and says "batch these"; and a
//! job that sits in a system call is a parallel layer used for waiting (a `cpu` stall with a
//! `syscall` cause).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::board::{Board, PROBE};
use crate::stall::LayerKind;
use crate::words::{CulpritWord, Wait};

/// A job shorter than this is too fine to be worth a dispatch.
pub const FINE_JOB: std::time::Duration = std::time::Duration::from_micros(50);

/// One rayon thread's counters (padded: threads never share a line).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Shard {
    jobs: AtomicU64,
    fine: AtomicU64,
    nanos: AtomicU64,
}

/// A pool's job counters, summed over its threads.
#[derive(Debug)]
pub(crate) struct CpuStats {
    pub(crate) name: Arc<str>,
    shards: Box<[Shard]>,
}

impl CpuStats {
    /// Jobs, too-fine jobs, and their total nanoseconds so far.
    pub(crate) fn totals(&self) -> (u64, u64, u64) {
        self.shards.iter().fold((0, 0, 0), |(j, f, n), s| {
            (
                j + s.jobs.load(Ordering::Relaxed),
                f + s.fine.load(Ordering::Relaxed),
                n + s.nanos.load(Ordering::Relaxed),
            )
        })
    }

    fn record(&self, nanos: u64) {
        let i = rayon::current_thread_index().unwrap_or(0) % self.shards.len();
        let s = &self.shards[i];
        // Each shard has one writer (its thread): plain load + store, no locked instruction.
        s.jobs
            .store(s.jobs.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        s.nanos
            .store(s.nanos.load(Ordering::Relaxed) + nanos, Ordering::Relaxed);
        if nanos < FINE_JOB.as_nanos() as u64 {
            s.fine
                .store(s.fine.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
    }
}

/// A rayon pool whose jobs loopwatch watches. Made by
/// [`Guard::cpu_pool`](crate::Guard::cpu_pool). Jobs given to [`spawn`](CpuPool::spawn) and
/// [`install`](CpuPool::install) are timed on the `cpu` layer (their durations in
/// `loopwatch_poll_duration_seconds{layer="cpu"}`, their counts in `loopwatch_cpu_jobs_total`);
/// a pool fed jobs mostly under 50 µs gets a `cpu pool jobs too fine` report; a job running
/// past `cpu_threshold` is a stall of the `cpu` layer, diagnosed like any other.
#[derive(Debug)]
pub struct CpuPool {
    pool: rayon::ThreadPool,
    board: Option<Arc<Board>>,
    word: CulpritWord,
    stats: Arc<CpuStats>,
}

impl CpuPool {
    pub(crate) fn new(
        board: Option<Arc<Board>>,
        name: &str,
        pool: rayon::ThreadPool,
        site: &'static std::panic::Location<'static>,
    ) -> (CpuPool, Arc<CpuStats>) {
        let word = board.as_ref().map_or(CulpritWord::NONE, |b| {
            let kind = b
                .kinds
                .intern(Some(name), Some((site.file(), site.line(), site.column())));
            CulpritWord::kind(kind, LayerKind::Cpu, true)
        });
        let stats = Arc::new(CpuStats {
            name: Arc::from(name),
            shards: (0..pool.current_num_threads().max(1))
                .map(|_| Shard::default())
                .collect(),
        });
        (
            CpuPool {
                pool,
                board,
                word,
                stats: stats.clone(),
            },
            stats,
        )
    }

    /// Runs `f` on the pool (like `rayon::ThreadPool::spawn`), timed as one job.
    pub fn spawn<F: FnOnce() + Send + 'static>(&self, f: F) {
        let job = self.job();
        self.pool.spawn(move || job.run(f));
    }

    /// Runs `f` inside the pool and returns its result (like `rayon::ThreadPool::install`),
    /// timed as one job.
    pub fn install<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        let job = self.job();
        self.pool.install(move || job.run(f))
    }

    /// The rayon pool itself (its parallel iterators run unwatched).
    pub fn pool(&self) -> &rayon::ThreadPool {
        &self.pool
    }

    /// Jobs run so far, and how many of them took less than 50 µs.
    pub fn jobs(&self) -> (u64, u64) {
        let (jobs, fine, _) = self.stats.totals();
        (jobs, fine)
    }

    fn job(&self) -> Job {
        Job {
            board: self.board.clone(),
            word: self.word,
            stats: self.stats.clone(),
        }
    }
}

struct Job {
    board: Option<Arc<Board>>,
    word: CulpritWord,
    stats: Arc<CpuStats>,
}

impl Job {
    fn run<R>(self, f: impl FnOnce() -> R) -> R {
        let Some(board) = &self.board else {
            return f();
        };
        struct Done<'a>(&'a Job, &'a Arc<Board>, Instant);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.1.exit(PROBE);
                let nanos = u64::try_from(self.2.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.0.stats.record(nanos);
            }
        }
        board.enter(PROBE, self.word, || 0, Wait::UNKNOWN);
        let _done = Done(&self, board, Instant::now());
        f()
    }
}
