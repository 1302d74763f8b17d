//! The watchdog: one OS thread (`loopwatch-watchdog`), never a task on the watched runtime.
//!
//! Each tick it stores the board's clock (the probes read it instead of the real clock), then
//! hands the decision [`core`] the slots: a poll seen running past its layer's threshold becomes
//! a stall, reported at once while it still runs; a stall whose poll has moved on is reported
//! ended with its total. This file is the driver around the core: the OS thread, the real clock,
//! the schedule ([`pace`]), the real kernel and stack ports, and the bounded queue to the
//! reporter. It never waits on a watched thread: slot reads are lock-free, and a report goes
//! into a bounded queue that drops (and counts) when full.

mod bare;
mod core;
mod cuts;
mod pace;
mod pools;
#[cfg(test)]
mod tests;
mod victims;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use self::core::Core;
use self::pace::Pacer;
use crate::diagnose::ports::{ProcKernel, SignalStacks};
use crate::diagnose::sampler::Sampler;
use crate::shared::Shared;
use crate::stall::Report;

/// The watchdog thread's state: the core with the real ports, and the reporter's queue.
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    core: Core<ProcKernel, SignalStacks>,
    reports: SyncSender<Report>,
}

impl Watchdog {
    /// Sets up diagnosis (the stack signal, if asked for: a reason goes to the snapshot when it
    /// cannot be had) and the core.
    pub(crate) fn new(shared: Arc<Shared>, reports: SyncSender<Report>) -> Watchdog {
        let (sampler, note) = Sampler::new(&shared.cfg);
        if let Ok(mut e) = shared.stack_setup_error.lock() {
            *e = note;
        }
        Watchdog {
            core: Core::new(shared.clone(), sampler, ProcKernel, SignalStacks),
            shared,
            reports,
        }
    }

    /// The thread's body: tick until told to stop. A panic inside a tick is caught and
    /// counted; the watchdog goes on.
    pub(crate) fn run(mut self) {
        crate::board::mark_own_thread();
        let board = self.shared.board.clone();
        board.set_watchdog();
        let mut pacer = Pacer::new(
            self.shared.cfg.tick,
            self.shared.cfg.threshold,
            board.now_ns(),
        );
        while !self.shared.stop.load(Ordering::Acquire) {
            let now = board.now_ns();
            // Through an idle spell the clock stays "unknown": a poll that starts during this
            // tick wakes the watchdog too (see `pace`).
            let asleep = !pacer.clock_runs();
            if !asleep {
                board.tick(now);
            }
            let active = match catch_unwind(AssertUnwindSafe(|| self.core.tick(now, board.slots())))
            {
                Ok(active) => active,
                Err(_) => {
                    self.shared.caught_panics.fetch_add(1, Ordering::Relaxed);
                    true
                }
            };
            self.flush();
            // The pacer asks whether anything else is due only of an idle tick taken asleep
            // (see `pace`): the core's look (a lock, every slot) is left out of the others.
            let quiet = asleep && !active && self.core.quiet();
            let step =
                pacer.after_tick(active, self.core.watching_workers(), quiet, board.now_ns());
            if step.clock_unknown {
                if !asleep {
                    // Polls that start while we sleep long read "no time" instead of a stale
                    // clock (their start is exact), and the first of them wakes us.
                    board.sleep_unknown();
                }
            } else if asleep {
                // Something ran that started before the clock went unknown: it runs again.
                board.awake();
                board.tick(board.now_ns());
            }
            while !self.shared.stop.load(Ordering::Acquire) {
                let now = board.now_ns();
                if now >= step.next_ns || (step.clock_unknown && board.woken()) {
                    break;
                }
                std::thread::park_timeout(Duration::from_nanos(step.next_ns - now));
            }
            // Woken by a poll (it cleared `sleeping`): the clock runs from the next tick. Else
            // the spell goes on, `sleeping` still set, so a poll that starts from here on
            // wakes us.
            if step.clock_unknown && board.woken() {
                pacer.woken(board.now_ns());
            }
        }
        // Stopping: stalls held for their victims go out now.
        let now = board.now_ns();
        if catch_unwind(AssertUnwindSafe(|| self.core.release_all(now))).is_err() {
            self.shared.caught_panics.fetch_add(1, Ordering::Relaxed);
        }
        self.flush();
    }

    /// Hands the core's reports to the reporter; a full queue drops them, counted.
    fn flush(&mut self) {
        for report in self.core.out.drain(..) {
            if self.reports.try_send(report).is_err() {
                self.shared.dropped_reports.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
