//! The watchdog's side of diagnosis: sampling a suspect thread's kernel state on each tick,
//! and asking for its stack once per stall, within a rate limit. Off Linux this only says
//! "unknown" and "unsupported".
// Off Linux the kernel-state sampling and stack capture are compiled out, and with them
// the only users of some of what follows.
#![cfg_attr(
    not(all(target_os = "linux", not(loopwatch_portable))),
    allow(dead_code)
)]

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Cause, CauseShare, Tally};
use crate::config::Config;
use crate::stall::StackStatus;

/// Counters the snapshot shows.
#[derive(Debug, Default)]
pub(crate) struct DiagCounters {
    pub(crate) stacks_captured: AtomicU64,
    pub(crate) stacks_rate_limited: AtomicU64,
    pub(crate) stacks_failed: AtomicU64,
    pub(crate) samples: AtomicU64,
}

/// The sampling of one poll's thread.
#[derive(Debug)]
pub(crate) struct Probe {
    pub(crate) seq: u64,
    tally: Tally,
    #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
    last: Option<super::proc::Reading>,
    #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
    thread: Option<super::proc::Thread>,
}

impl Probe {
    pub(crate) fn new(seq: u64) -> Probe {
        Probe {
            seq,
            tally: Tally::default(),
            #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
            last: None,
            #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
            thread: None,
        }
    }

    /// Readings taken so far.
    pub(crate) fn readings(&self) -> u32 {
        self.tally.samples
    }

    /// The verdict so far, and the share of each cause.
    pub(crate) fn verdict(&self) -> (Cause, Vec<CauseShare>) {
        (self.tally.verdict(), self.tally.shares())
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
    #[cfg_attr(
        not(all(target_os = "linux", not(loopwatch_portable))),
        allow(dead_code)
    )]
    fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.per_sec.max(1.0));
    }
}

/// How long the watchdog keeps a stall's report waiting for its stack.
const STACK_WAIT_NS: u64 = 50_000_000;

#[derive(Debug)]
pub(crate) struct Sampler {
    diagnose: bool,
    /// The signal stacks are captured with, or why they are not.
    stacks: Result<i32, StackStatus>,
    limiter: Limiter,
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
        (
            Sampler {
                diagnose: cfg.diagnose,
                stacks,
                limiter: Limiter {
                    per_sec: f64::from(cfg.max_stacks_per_sec),
                    tokens: f64::from(cfg.max_stacks_per_sec.max(1)),
                    last_ns: 0,
                },
            },
            note,
        )
    }

    /// Takes one reading of thread `tid` for the poll `seq` (starting a new probe if the poll
    /// changed). Does nothing when diagnosis is off or the platform has none.
    #[allow(unused_variables)]
    pub(crate) fn observe(
        &self,
        probe: &mut Option<Probe>,
        seq: u64,
        tid: Option<u64>,
        now_ns: u64,
        counters: &DiagCounters,
    ) {
        if probe.as_ref().is_none_or(|p| p.seq != seq) {
            *probe = Some(Probe::new(seq));
        }
        #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
        if self.diagnose {
            let (Some(p), Some(tid)) = (probe.as_mut(), tid) else {
                return;
            };
            if p.thread.as_ref().is_none_or(|t| t.tid() != tid) {
                p.thread = Some(super::proc::Thread::new(tid));
            }
            let Some(thread) = p.thread.as_mut() else {
                return;
            };
            let reading = thread.read(now_ns);
            match &p.last {
                Some(prev) => super::proc::fold(&mut p.tally, prev, &reading),
                None => p.tally.set_instant(reading.instant_cause()),
            }
            p.last = Some(reading);
            counters.samples.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Asks for the stack of thread `tid` (once per stall).
    #[allow(unused_variables)]
    pub(crate) fn ask_stack(
        &mut self,
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
        #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
        if super::stack::busy() {
            return Ask::Busy;
        }
        if !self.limiter.allow(now_ns) {
            counters.stacks_rate_limited.fetch_add(1, Ordering::Relaxed);
            return Ask::Not(StackStatus::RateLimited);
        }
        #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
        match super::stack::request(tid, sig) {
            Ok(ticket) => {
                return Ask::Pending(Pending {
                    ticket,
                    deadline_ns: now_ns + STACK_WAIT_NS,
                })
            }
            Err(super::stack::RequestError::Busy) => {
                // Another capture holds the slot: nothing was captured, so the try is free.
                self.limiter.refund();
                return Ask::Busy;
            }
            Err(super::stack::RequestError::Failed) => {}
        }
        let _ = sig;
        counters.stacks_failed.fetch_add(1, Ordering::Relaxed);
        Ask::Not(StackStatus::Failed)
    }

    /// The addresses of a pending capture, once the handler has run; `Err` once it is too late.
    #[allow(unused_variables)]
    pub(crate) fn poll_stack(
        &self,
        p: Pending,
        now_ns: u64,
        counters: &DiagCounters,
    ) -> Option<Result<Vec<usize>, StackStatus>> {
        #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
        if let Some(ips) = super::stack::take(p.ticket) {
            counters.stacks_captured.fetch_add(1, Ordering::Relaxed);
            return Some(Ok(ips));
        }
        if now_ns >= p.deadline_ns {
            #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
            super::stack::cancel(p.ticket);
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
