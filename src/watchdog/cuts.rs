//! Death by a thousand cuts: many polls, each under the threshold, that block the async
//! workers in system calls (a handler that calls `std::thread::sleep(5 ms)`: throughput falls
//! by 99 % and no poll is a stall). The watchdog samples the kernel state of one worker that
//! is inside a poll every other tick, in turn, and puts the time since that worker was last
//! sampled down to what it was doing: asleep in a system call inside a poll of some kind, or
//! running one. Every [`WINDOW_NS`] it reports each kind whose polls kept the workers asleep
//! in one call for at least [`REPORT_SHARE`] of one worker's time.
//!
//! Pure arithmetic on readings, like the rest of the core: the readings come through the
//! kernel port, so the rules run in the core's scripted tests.

use std::collections::HashMap;
use std::sync::Arc;

use crate::diagnose::syscalls;
use crate::diagnose::verdict::{Activity, Reading};
use crate::kinds::KindId;
use crate::stall::{LayerKind, Notice};

/// How long a window of accumulated time is before its kinds are judged (and how often a
/// kind is reported at most).
pub(crate) const WINDOW_NS: u64 = 10_000_000_000;
/// The share of one worker's time a kind's polls must keep the workers asleep in one call,
/// over a window, to be reported.
pub(crate) const REPORT_SHARE: f64 = 0.10;
/// One sample stands for at most this long (a worker not sampled for longer, because it was
/// idle or the watchdog slept, counts from then on only).
const MAX_WEIGHT_NS: u64 = 100_000_000;

/// What polls of one kind did, in the current window and in all.
#[derive(Debug, Default, Clone)]
struct KindTime {
    /// Asleep in each system call (by number), nanoseconds.
    asleep: Vec<(i64, u64)>,
    running_ns: u64,
}

/// The accumulator.
#[derive(Debug, Default)]
pub(crate) struct Cuts {
    /// The slot sampled next (round robin).
    next: usize,
    /// When each slot was last sampled (or seen out of a poll).
    last_ns: Vec<u64>,
    window_start_ns: Option<u64>,
    window: HashMap<(KindId, LayerKind), KindTime>,
}

impl Cuts {
    /// Which slot to sample at this tick (of `slots`), if any: every other tick, in turn.
    pub(crate) fn pick(&mut self, tick: u64, slots: usize) -> Option<usize> {
        if slots == 0 || tick % 2 != 0 {
            return None;
        }
        if self.last_ns.len() < slots {
            self.last_ns.resize(slots, 0);
        }
        let i = self.next % slots;
        self.next = (i + 1) % slots;
        Some(i)
    }

    /// Slot `i` was looked at `now` and is not inside a poll worth counting: its time so far
    /// is nobody's.
    pub(crate) fn skip(&mut self, i: usize, now: u64) {
        if let Some(t) = self.last_ns.get_mut(i) {
            *t = now;
        }
    }

    /// Slot `i`, inside a poll of `kind` on `layer`, read as `reading`: the time since it was
    /// last looked at goes to what it is doing.
    pub(crate) fn add(&mut self, i: usize, kind: KindId, layer: LayerKind, reading: &Reading) {
        let now = reading.at_ns;
        self.window_start_ns.get_or_insert(now);
        let Some(last) = self.last_ns.get_mut(i) else {
            return;
        };
        let weight = if *last == 0 {
            0
        } else {
            now.saturating_sub(*last).min(MAX_WEIGHT_NS)
        };
        *last = now;
        if weight == 0 {
            return;
        }
        let t = self.window.entry((kind, layer)).or_default();
        match reading.activity {
            Activity::Syscall(nr) if !syscalls::is_runtime_park(nr) => {
                match t.asleep.iter_mut().find(|(n, _)| *n == nr) {
                    Some((_, ns)) => *ns += weight,
                    None => t.asleep.push((nr, weight)),
                }
            }
            Activity::Running => t.running_ns += weight,
            _ => {}
        }
    }

    /// At the end of a window: a notice for each kind whose polls kept the workers asleep in
    /// one call for [`REPORT_SHARE`] of a worker's time or more (the call that took most), then
    /// a new window. `label` names a kind.
    pub(crate) fn judge(
        &mut self,
        now: u64,
        label: impl Fn(KindId) -> Arc<str>,
        out: &mut Vec<Notice>,
    ) {
        let Some(start) = self.window_start_ns else {
            return;
        };
        let span = now.saturating_sub(start);
        if span < WINDOW_NS {
            return;
        }
        let mut found: Vec<_> = self
            .window
            .iter()
            .filter_map(|(&(kind, layer), t)| {
                let &(nr, ns) = t.asleep.iter().max_by_key(|(_, ns)| *ns)?;
                let share = ns as f64 / span as f64;
                (share >= REPORT_SHARE).then_some((kind, layer, nr, ns))
            })
            .collect();
        found.sort_by_key(|&(kind, _, nr, ns)| (std::cmp::Reverse(ns), kind, nr));
        for (kind, layer, nr, ns) in found {
            let name = syscalls::name(nr);
            out.push(Notice::ThousandCuts {
                kind: label(kind),
                layer,
                syscall: name.map_or_else(|| format!("#{nr}").into(), Arc::from),
                asleep: std::time::Duration::from_nanos(ns),
                window: std::time::Duration::from_nanos(span),
                hint: crate::hints::syscall(name.unwrap_or("")),
            });
        }
        self.window.clear();
        self.window_start_ns = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at_ns: u64, activity: Activity) -> Reading {
        Reading {
            at_ns,
            cpu_ns: None,
            activity,
        }
    }

    fn nanosleep() -> i64 {
        (0..512)
            .find(|&n| syscalls::name(n) == Some("clock_nanosleep"))
            .unwrap()
    }

    #[test]
    fn a_kind_that_keeps_a_worker_asleep_is_reported_once_a_window() {
        let mut c = Cuts::default();
        let mut out = Vec::new();
        let ms = 1_000_000;
        // One worker, sampled every 5 ms for 10 s: asleep in clock_nanosleep 3 samples in 4.
        for k in 0..2_001u64 {
            let i = c.pick(2 * k, 1).unwrap();
            let activity = if k % 4 == 3 {
                Activity::Running
            } else {
                Activity::Syscall(nanosleep())
            };
            c.add(i, 7, LayerKind::Async, &reading(k * 5 * ms, activity));
        }
        c.judge(10_000 * ms, |_| "seed".into(), &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        let Notice::ThousandCuts {
            kind,
            syscall,
            asleep,
            window,
            ..
        } = &out[0]
        else {
            unreachable!()
        };
        assert_eq!(
            (kind.as_ref(), syscall.as_ref()),
            ("seed", "clock_nanosleep")
        );
        let share = asleep.as_secs_f64() / window.as_secs_f64();
        assert!((share - 0.75).abs() < 0.01, "{share}");
        // A new window: nothing until it is full again.
        c.judge(10_001 * ms, |_| "seed".into(), &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn polls_that_mostly_run_or_park_are_not_reported() {
        let mut c = Cuts::default();
        let mut out = Vec::new();
        let ms = 1_000_000;
        let park = (0..512).find(|&n| syscalls::is_runtime_park(n)).unwrap();
        for k in 0..2_001u64 {
            let i = c.pick(2 * k, 1).unwrap();
            let activity = match k % 20 {
                0 => Activity::Syscall(nanosleep()), // 5 %: under the bar
                1..=9 => Activity::Syscall(park),    // the driver: never the poll's
                _ => Activity::Running,
            };
            c.add(i, 7, LayerKind::Async, &reading(k * 5 * ms, activity));
        }
        c.judge(10_000 * ms, |_| "k".into(), &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn only_every_other_tick_samples_one_slot_in_turn() {
        let mut c = Cuts::default();
        assert_eq!(c.pick(1, 3), None);
        assert_eq!(c.pick(2, 3), Some(0));
        assert_eq!(c.pick(4, 3), Some(1));
        assert_eq!(c.pick(6, 3), Some(2));
        assert_eq!(c.pick(8, 3), Some(0));
        assert_eq!(c.pick(10, 0), None);
    }
}
