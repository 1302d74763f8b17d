//! The watchdog's side of diagnosis: sampling a suspect thread's kernel state on each tick,
//! and asking for its stack once per stall, within a rate limit. What it reads and asks goes
//! through the ports of `ports.rs` (the real `/proc` and signal, or a test's script); off Linux
//! the real ports read nothing, so the cause is "unknown" and stacks "unavailable".

use std::sync::atomic::{AtomicU64, Ordering};

use super::ports::{Kernel, RequestError, StackPort};
use super::verdict::{fold, Activity, Reading, Tally};
use super::{Cause, CauseShare, CpuQuota};
use crate::config::Config;
use crate::stall::{CpuTime, StackStatus};
use std::time::Duration;

/// Counters the snapshot shows.
#[derive(Debug, Default)]
pub(crate) struct DiagCounters {
    pub(crate) stacks_captured: AtomicU64,
    pub(crate) stacks_rate_limited: AtomicU64,
    pub(crate) stacks_failed: AtomicU64,
    /// Captures refused because the stack signal no longer runs loopwatch's handler.
    pub(crate) stacks_signal_lost: AtomicU64,
    /// Captures not tried because the thread was asleep in a system call.
    pub(crate) stacks_in_syscall: AtomicU64,
    pub(crate) samples: AtomicU64,
}

/// The sampling of one poll's thread; `T` is what the kernel port keeps open for it.
#[derive(Debug)]
pub(crate) struct Probe<T> {
    pub(crate) seq: u64,
    tally: Tally,
    last: Option<Reading>,
    /// A reading found the thread parked in the runtime (see
    /// [`is_runtime_park`](super::syscalls::is_runtime_park)): the poll is not running.
    parked: bool,
    /// The cgroup's throttled time at the first reading and at the last, and its quota.
    throttle: Option<(u64, u64, CpuQuota)>,
    /// The thread followed, and what is kept open for it.
    thread: Option<(u64, T)>,
}

impl<T> Probe<T> {
    pub(crate) fn new(seq: u64) -> Probe<T> {
        Probe {
            seq,
            tally: Tally::default(),
            last: None,
            parked: false,
            throttle: None,
            thread: None,
        }
    }

    /// Has a reading found the thread parked in the runtime?
    pub(crate) fn parked(&self) -> bool {
        self.parked
    }

    /// Readings taken so far.
    pub(crate) fn readings(&self) -> u32 {
        self.tally.samples
    }

    /// The verdict so far for a layer whose threshold is `threshold_ns`, the share of each
    /// cause, and the CPU time seen over the sampled wall time.
    pub(crate) fn verdict(&self, threshold_ns: u64) -> (Cause, Vec<CauseShare>, Option<CpuTime>) {
        let cpu = self.tally.cpu_time().map(|(cpu, wall)| CpuTime {
            cpu: Duration::from_nanos(cpu),
            sampled: Duration::from_nanos(wall),
        });
        match self.throttle {
            Some((first, last, quota)) if last > first => {
                let mut tally = self.tally.clone();
                tally.throttled_by(last - first, quota);
                (tally.verdict(threshold_ns), tally.shares(), cpu)
            }
            _ => (self.tally.verdict(threshold_ns), self.tally.shares(), cpu),
        }
    }

    /// Reads the cgroup's throttled time again (its kernel adds it when the group may run
    /// again: up to a period after the throttling), so the verdict sees throttling that ended.
    fn note_throttle<K: Kernel<Thread = T>>(&mut self, kernel: &mut K) {
        let Some((_, thread)) = self.thread.as_mut() else {
            return;
        };
        if let Some((ns, quota)) = kernel.throttle(thread) {
            self.throttle = Some(match self.throttle {
                Some((first, _, _)) => (first, ns, quota),
                None => (ns, ns, quota),
            });
        }
    }
}

/// A stack capture asked for and not yet picked up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pending {
    pub(crate) ticket: u64,
    pub(crate) deadline_ns: u64,
}

/// What asking for a stack gave.
#[derive(Debug)]
pub(crate) enum Ask {
    Pending(Pending),
    /// Another capture is under way (one at a time per process): ask again next tick.
    Busy,
    /// Taken at once, without a signal (a thread asleep in a system call).
    Captured(Vec<usize>),
    Not(StackStatus),
}

/// A token bucket: `rate` captures per second, bursts of up to `rate` (at least 1).
#[derive(Debug)]
struct Limiter {
    per_sec: f64,
    tokens: f64,
    last_ns: u64,
}

impl Limiter {
    fn allow(&mut self, now_ns: u64) -> bool {
        let cap = self.per_sec.max(1.0);
        let dt = now_ns.saturating_sub(self.last_ns) as f64 / 1e9;
        self.last_ns = now_ns;
        self.tokens = (self.tokens + dt * self.per_sec).min(cap);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back the token of a capture that could not be asked for.
    fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.per_sec.max(1.0));
    }
}

/// How long the watchdog keeps a stall's report waiting for its stack.
pub(crate) const STACK_WAIT_NS: u64 = 50_000_000;

#[derive(Debug)]
pub(crate) struct Sampler {
    diagnose: bool,
    /// The signal stacks are captured with, or why they are not.
    stacks: Result<i32, StackStatus>,
    limiter: Limiter,
    /// Why stacks just stopped (the signal was taken back), until the core takes it.
    lost: Option<String>,
}

impl Sampler {
    /// Sets up sampling and, if asked for, the stack signal. The second value explains why
    /// stacks are off when they were asked for and could not be had.
    pub(crate) fn new(cfg: &Config) -> (Sampler, Option<String>) {
        let mut note = None;
        let stacks = if !cfg.diagnose || !cfg.stacks {
            Err(StackStatus::Disabled)
        } else {
            setup_stacks(cfg.stack_signal).map_err(|e| {
                note = Some(e);
                StackStatus::Unavailable
            })
        };
        (Sampler::with_stacks(cfg, stacks), note)
    }

    /// A sampler whose stack signal is already settled: `Ok(signal)`, or why stacks are off.
    /// Sets nothing up (the decision core's tests start here).
    pub(crate) fn with_stacks(cfg: &Config, stacks: Result<i32, StackStatus>) -> Sampler {
        Sampler {
            diagnose: cfg.diagnose,
            stacks,
            limiter: Limiter {
                per_sec: f64::from(cfg.max_stacks_per_sec),
                tokens: f64::from(cfg.max_stacks_per_sec.max(1)),
                last_ns: 0,
            },
            lost: None,
        }
    }

    /// Why stack capture stopped since the last call, once: the stack signal no longer runs
    /// loopwatch's handler.
    pub(crate) fn take_lost(&mut self) -> Option<String> {
        self.lost.take()
    }

    /// Takes one reading of thread `tid` for the poll `seq` (starting a new probe if the poll
    /// changed). Does nothing when diagnosis is off or the kernel port has no reading.
    pub(crate) fn observe<K: Kernel>(
        &self,
        kernel: &mut K,
        probe: &mut Option<Probe<K::Thread>>,
        seq: u64,
        tid: Option<u64>,
        now_ns: u64,
        counters: &DiagCounters,
    ) {
        if probe.as_ref().is_none_or(|p| p.seq != seq) {
            *probe = Some(Probe::new(seq));
        }
        if !self.diagnose {
            return;
        }
        let (Some(p), Some(tid)) = (probe.as_mut(), tid) else {
            return;
        };
        if p.thread.as_ref().is_none_or(|(t, _)| *t != tid) {
            p.thread = Some((tid, kernel.open(tid)));
        }
        let Some((_, thread)) = p.thread.as_mut() else {
            return;
        };
        let Some(reading) = kernel.read(thread, now_ns) else {
            return;
        };
        if let Activity::Syscall(nr) = reading.activity {
            p.parked |= super::syscalls::is_runtime_park(nr);
        }
        p.note_throttle(kernel);
        match &p.last {
            Some(prev) => fold(&mut p.tally, prev, &reading),
            None => p.tally.set_instant(reading.instant_cause()),
        }
        p.last = Some(reading);
        counters.samples.fetch_add(1, Ordering::Relaxed);
    }

    /// The poll sampled by `probe` ended: a last look at its cgroup's throttled time (no
    /// reading of the thread: it has moved on).
    pub(crate) fn finish<K: Kernel>(&self, kernel: &mut K, probe: &mut Option<Probe<K::Thread>>) {
        if let Some(p) = probe.as_mut().filter(|_| self.diagnose) {
            p.note_throttle(kernel);
        }
    }

    /// Asks for the stack of thread `tid` (once per stall).
    pub(crate) fn ask_stack(
        &mut self,
        stacks: &mut impl StackPort,
        tid: Option<u64>,
        now_ns: u64,
        counters: &DiagCounters,
    ) -> Ask {
        let sig = match self.stacks {
            Ok(sig) => sig,
            Err(status) => return Ask::Not(status),
        };
        let Some(tid) = tid else {
            return Ask::Not(StackStatus::Failed);
        };
        if stacks.busy() {
            return Ask::Busy;
        }
        if !self.limiter.allow(now_ns) {
            counters.stacks_rate_limited.fetch_add(1, Ordering::Relaxed);
            return Ask::Not(StackStatus::RateLimited);
        }
        match stacks.request(tid, sig) {
            Ok(ticket) => Ask::Pending(Pending {
                ticket,
                deadline_ns: now_ns + STACK_WAIT_NS,
            }),
            Err(RequestError::Busy) => {
                // Another capture holds the slot: nothing was captured, so the try is free.
                self.limiter.refund();
                Ask::Busy
            }
            Err(RequestError::Failed) => {
                counters.stacks_failed.fetch_add(1, Ordering::Relaxed);
                Ask::Not(StackStatus::Failed)
            }
            Err(RequestError::Asleep) => match stacks.unwind_asleep(tid) {
                // Asleep in a call: its stack, read without a signal.
                Some(ips) => {
                    counters.stacks_captured.fetch_add(1, Ordering::Relaxed);
                    Ask::Captured(ips)
                }
                None => {
                    // Nothing was sent or read: the try is free.
                    self.limiter.refund();
                    counters.stacks_in_syscall.fetch_add(1, Ordering::Relaxed);
                    Ask::Not(StackStatus::InSyscall)
                }
            },
            Err(RequestError::SignalTaken) => {
                // For good: no signal is ever sent to a handler that is not loopwatch's.
                self.limiter.refund();
                self.stacks = Err(StackStatus::Unavailable);
                counters.stacks_signal_lost.fetch_add(1, Ordering::Relaxed);
                self.lost = Some(format!(
                    "signal {sig} no longer runs loopwatch's handler (the application or a \
                     library installed its own, or reset it): stack capture stopped; choose \
                     another signal with LOOPWATCH_STACK_SIGNAL"
                ));
                Ask::Not(StackStatus::Unavailable)
            }
        }
    }

    /// The addresses of a pending capture, once the handler has run; `Err` once it is too late.
    pub(crate) fn poll_stack(
        &self,
        stacks: &mut impl StackPort,
        p: Pending,
        now_ns: u64,
        counters: &DiagCounters,
    ) -> Option<Result<Vec<usize>, StackStatus>> {
        if let Some(ips) = stacks.take(p.ticket) {
            counters.stacks_captured.fetch_add(1, Ordering::Relaxed);
            return Some(Ok(ips));
        }
        if now_ns >= p.deadline_ns {
            stacks.cancel(p.ticket);
            counters.stacks_failed.fetch_add(1, Ordering::Relaxed);
            return Some(Err(StackStatus::TimedOut));
        }
        None
    }
}

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
fn setup_stacks(signal: Option<i32>) -> Result<i32, String> {
    let sig = signal.unwrap_or_else(super::stack::default_signal);
    super::stack::install(sig)
        .map(|()| sig)
        .map_err(|e| e.to_string())
}

#[cfg(not(all(target_os = "linux", not(loopwatch_portable))))]
fn setup_stacks(_signal: Option<i32>) -> Result<i32, String> {
    Err("stack capture is only implemented on Linux".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_allows_its_rate_and_bursts() {
        let mut l = Limiter {
            per_sec: 2.0,
            tokens: 2.0,
            last_ns: 0,
        };
        assert!(l.allow(0));
        assert!(l.allow(0));
        assert!(!l.allow(0));
        assert!(l.allow(500_000_000));
        assert!(!l.allow(500_000_000));
    }

    #[test]
    fn a_refunded_try_is_free_but_never_past_the_burst() {
        let mut l = Limiter {
            per_sec: 2.0,
            tokens: 2.0,
            last_ns: 0,
        };
        assert!(l.allow(0));
        l.refund();
        assert!(l.allow(0));
        assert!(l.allow(0));
        assert!(!l.allow(0));
        l.refund();
        l.refund();
        l.refund();
        assert!(l.allow(0) && l.allow(0));
        assert!(!l.allow(0), "refunds stop at the burst");
    }
}
