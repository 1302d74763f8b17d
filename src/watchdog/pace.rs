//! When the watchdog ticks: every `tick` while something runs; while the runtime is idle (no
//! poll running, none ended since the last tick) nothing can be stalled yet, so after two idle
//! ticks it sleeps longer per wake-up. While it sleeps long, the board's clock reads
//! [`CLOCK_UNKNOWN`](crate::board::CLOCK_UNKNOWN), so a poll that starts then reads the real
//! clock for its start (exact), never a stale one, and the first such poll wakes the watchdog
//! (`Board::wake_watchdog`): it ticks at once and every tick from then on.
//!
//! How long: the threshold and a tick, the first time. A poll that read the clock just before
//! it went "unknown" (it did not wake the watchdog) is then at most a threshold and a tick old
//! when the watchdog wakes, and its exact start gets it flagged then or at the next ticks: at
//! most a tick past its threshold, as while active. The clock stays "unknown" through the
//! ticks of an idle spell (the watchdog does not store one between two long sleeps), so once
//! such a tick found nothing running and nothing ended, every poll that starts from then on
//! wakes the watchdog: it sleeps **deep**, [`DEEP_SLEEP`] per wake-up, when nothing else needs
//! it sooner (the probe-free path follows no runtime, no stall waits for its victims; see
//! `Core::quiet`). Only a poll whose thread was held off its CPU for longer than that first
//! sleep between reading the clock and publishing its start (a few instructions) can start
//! unseen; the next deep wake-up sees it, [`DEEP_SLEEP`] late at most. (A wake-up of the idle
//! watchdog costs ~65 µs of CPU on this project's VM, most of it the kernel's: 80 a second, a
//! sleep of a threshold and a tick, were half a percent of a core.) Half the threshold while
//! the probe-free path follows workers at work: it sees a blocked worker only through the
//! readings it takes each wake-up, and needs them a threshold apart.

use std::time::Duration;

/// The deep sleep: how long an idle watchdog sleeps per wake-up once no poll can start unseen.
pub(crate) const DEEP_SLEEP: Duration = Duration::from_millis(100);

/// What to do after a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    /// When the next tick is due (board nanoseconds).
    pub(crate) next_ns: u64,
    /// Store "no time" on the board's clock until then.
    pub(crate) clock_unknown: bool,
}

/// The watchdog's schedule.
#[derive(Debug)]
pub(crate) struct Pacer {
    tick_ns: u64,
    /// The long sleep with nothing to watch.
    idle_sleep_ns: u64,
    /// The long sleep while the probe-free path follows workers at work.
    watch_sleep_ns: u64,
    /// The long sleep once no poll can start unseen.
    deep_sleep_ns: u64,
    idle_ticks: u32,
    next_ns: u64,
    /// The board's clock has read "unknown" since the last long sleep began, and no poll woke
    /// the watchdog: the tick after it is taken with the clock still unknown.
    asleep: bool,
}

/// Idle ticks in a row before the watchdog sleeps long.
const IDLE_TICKS_BEFORE_SLEEP: u32 = 2;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Pacer {
    /// A schedule of `tick`, for a smallest threshold of `threshold`, starting at `start_ns`.
    pub(crate) fn new(tick: Duration, threshold: Duration, start_ns: u64) -> Pacer {
        Pacer {
            tick_ns: nanos(tick).max(1),
            idle_sleep_ns: nanos(threshold.saturating_add(tick)),
            watch_sleep_ns: nanos((threshold / 2).max(tick)),
            deep_sleep_ns: nanos(DEEP_SLEEP.max(threshold.saturating_add(tick))),
            idle_ticks: 0,
            next_ns: start_ns,
            asleep: false,
        }
    }

    /// Does the board's clock run at this tick (the driver stores it)? Not after a long sleep
    /// that no poll woke: the clock stays "unknown" through the idle spell's ticks.
    pub(crate) fn clock_runs(&self) -> bool {
        !self.asleep
    }

    /// After a tick that saw a probe's poll run (`active`) or not, the probe-free path follow
    /// workers at work (`watching`) or not, and nothing else due before a deep sleep (`quiet`,
    /// see `Core::quiet`) or something, read at `now_ns`: when the next tick is due.
    /// A watchdog that fell behind (a loaded host) skips the ticks it missed.
    pub(crate) fn after_tick(
        &mut self,
        active: bool,
        watching: bool,
        quiet: bool,
        now_ns: u64,
    ) -> Step {
        self.idle_ticks = if active {
            0
        } else {
            self.idle_ticks.saturating_add(1)
        };
        let sleep = if watching {
            self.watch_sleep_ns
        } else if self.asleep && quiet {
            // This tick read the slots with the clock unknown since before the last sleep:
            // whatever read it before it went unknown has been seen (nothing ran), and every
            // poll from now on wakes the watchdog.
            self.deep_sleep_ns
        } else {
            self.idle_sleep_ns
        };
        let long = self.idle_ticks >= IDLE_TICKS_BEFORE_SLEEP && sleep > self.tick_ns;
        self.next_ns = self
            .next_ns
            .saturating_add(if long { sleep } else { self.tick_ns });
        if self.next_ns <= now_ns {
            self.next_ns = now_ns.saturating_add(self.tick_ns);
        }
        self.asleep = long;
        Step {
            next_ns: self.next_ns,
            clock_unknown: long,
        }
    }

    /// A poll woke the watchdog from its long sleep at `now_ns`: it ticks now, and on from
    /// here every tick (something runs).
    pub(crate) fn woken(&mut self, now_ns: u64) {
        self.idle_ticks = 0;
        self.asleep = false;
        self.next_ns = now_ns;
    }
}
