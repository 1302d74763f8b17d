//! Death by a thousand cuts: many polls, each under the threshold, that block the async
//! workers in system calls (a handler that calls `std::thread::sleep(5 ms)`: throughput falls
//! by 99 % and no poll is a stall). The watchdog samples the kernel state of one worker that
//! is inside a poll every [`SAMPLE_EVERY`] ticks, in turn, and puts the time since that worker was last
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
use crate::shared::PollTimeKey;
use crate::stall::{LayerKind, Notice};

/// How long a window of accumulated time is before its kinds are judged (and how often a
/// kind is reported at most).
pub(crate) const WINDOW_NS: u64 = 10_000_000_000;
/// The share of one worker's time a kind's polls must keep the workers asleep in one call,
/// over a window, to be reported.
pub(crate) const REPORT_SHARE: f64 = 0.10;
/// One worker is sampled every this many ticks: 50 `pread`s a second at the default tick.
/// A `pread` of the `syscall` file of a thread that keeps waking costs ~20 µs of CPU here
/// (the kernel waits for the thread to be off its CPU; 1.5 µs for one soundly asleep), so
/// every other tick cost +0.5 % of a core and every fourth +0.37 % in the watchdog bench,
/// over the 0.3 % budget. 500 samples a window still put a 10 % share within ±1.5 %.
pub(crate) const SAMPLE_EVERY: u64 = 8;
/// Picks further apart than this many sampling periods mean the watchdog slept (its idle
/// back-off) or got no CPU: what the workers did meanwhile was not seen, and counts for
/// nobody (each worker counts again from its next sample).
const MAX_GAP_PERIODS: u64 = 4;

/// What polls of one kind did, in the current window and in all.
#[derive(Debug, Default, Clone)]
struct KindTime {
    /// Asleep in each system call (by number), nanoseconds.
    asleep: Vec<(i64, u64)>,
    running_ns: u64,
    /// The latest stack sampled asleep in each call (by number), where one was read.
    stacks: Vec<(i64, Arc<[usize]>)>,
}

/// The accumulator.
#[derive(Debug)]
pub(crate) struct Cuts {
    /// Picks further apart than this reset every slot (see [`MAX_GAP_PERIODS`]).
    max_gap_ns: u64,
    last_pick_ns: Option<u64>,
    /// The sampling period the current phase is for, the tick in it that samples, and the
    /// generator that draws it (xorshift: a fixed tick in each period would alias with work
    /// that repeats at a divisor of the period, and see it always asleep or never).
    period: Option<u64>,
    phase: u64,
    rng: u64,
    /// The slot sampled next (round robin).
    next: usize,
    /// When each slot was last sampled (or seen out of a poll); `None`: not since a gap.
    last_ns: Vec<Option<u64>>,
    window_start_ns: Option<u64>,
    window: HashMap<(KindId, LayerKind), KindTime>,
}

impl Cuts {
    /// An accumulator for a watchdog that ticks every `tick_ns`; `seed` draws its phases.
    pub(crate) fn new(tick_ns: u64, seed: u64) -> Cuts {
        Cuts {
            max_gap_ns: tick_ns.max(1) * SAMPLE_EVERY * MAX_GAP_PERIODS,
            last_pick_ns: None,
            period: None,
            phase: 0,
            rng: seed | 1,
            next: 0,
            last_ns: Vec::new(),
            window_start_ns: None,
            window: HashMap::new(),
        }
    }

    /// Which slot to sample at this tick (of `slots`) at `now`, if any: one tick in each
    /// period of [`SAMPLE_EVERY`], drawn at random, and the slots in turn.
    pub(crate) fn pick(&mut self, tick: u64, slots: usize, now: u64) -> Option<usize> {
        let period = tick / SAMPLE_EVERY;
        if self.period != Some(period) {
            self.period = Some(period);
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.phase = self.rng % SAMPLE_EVERY;
        }
        if slots == 0 || tick % SAMPLE_EVERY != self.phase {
            return None;
        }
        if self.last_ns.len() < slots {
            self.last_ns.resize(slots, None);
        }
        if self
            .last_pick_ns
            .is_some_and(|t| now.saturating_sub(t) > self.max_gap_ns)
        {
            self.forget_all();
        }
        self.last_pick_ns = Some(now);
        let i = self.next % slots;
        self.next = (i + 1) % slots;
        Some(i)
    }

    /// Slot `i` was looked at `now` and is not inside a poll worth counting: its time so far
    /// is nobody's.
    pub(crate) fn skip(&mut self, i: usize, now: u64) {
        if let Some(t) = self.last_ns.get_mut(i) {
            *t = Some(now);
        }
    }

    /// A worker sampled asleep in call `nr` inside a poll of `kind` on `layer` had stack
    /// `ips`: the notice for that kind and call carries the latest one.
    pub(crate) fn note_stack(
        &mut self,
        kind: KindId,
        layer: LayerKind,
        nr: i64,
        ips: Arc<[usize]>,
    ) {
        let t = self.window.entry((kind, layer)).or_default();
        match t.stacks.iter_mut().find(|(n, _)| *n == nr) {
            Some((_, s)) => *s = ips,
            None => t.stacks.push((nr, ips)),
        }
    }

    /// Every slot was seen at `now` doing nothing worth counting (every worker parked).
    pub(crate) fn skip_all(&mut self, now: u64) {
        self.last_ns.iter_mut().for_each(|t| *t = Some(now));
    }

    /// The slots were renumbered: each counts again from its next look.
    pub(crate) fn forget_all(&mut self) {
        self.last_ns.iter_mut().for_each(|t| *t = None);
    }

    /// Slot `i`, inside a poll of `kind` on `layer`, read as `reading`: the time since it was
    /// last looked at goes to what it is doing. Returns it, for the running totals, when it is
    /// asleep in a call other than the runtime's park (the call) or running (`None`).
    pub(crate) fn add(
        &mut self,
        i: usize,
        kind: KindId,
        layer: LayerKind,
        reading: &Reading,
    ) -> Option<(PollTimeKey, u64)> {
        let now = reading.at_ns;
        self.window_start_ns.get_or_insert(now);
        let last = self.last_ns.get_mut(i)?;
        // A slot looked at for the first time (or since a gap) stands for nothing yet; after
        // that, for the time since its previous look (a round of the slots).
        let weight = last.map_or(0, |t| now.saturating_sub(t));
        *last = Some(now);
        if weight == 0 {
            return None;
        }
        let t = self.window.entry((kind, layer)).or_default();
        let syscall = match reading.activity {
            Activity::Syscall(nr) if !syscalls::is_runtime_park(nr) => {
                match t.asleep.iter_mut().find(|(n, _)| *n == nr) {
                    Some((_, ns)) => *ns += weight,
                    None => t.asleep.push((nr, weight)),
                }
                Some(nr)
            }
            Activity::Running => {
                t.running_ns += weight;
                None
            }
            _ => return None,
        };
        let key = PollTimeKey {
            kind,
            layer,
            syscall,
        };
        Some((key, weight))
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
                let stack = t
                    .stacks
                    .iter()
                    .find(|(n, _)| *n == nr)
                    .map(|(_, s)| s.clone());
                (share >= REPORT_SHARE).then_some((kind, layer, nr, ns, stack))
            })
            .collect();
        found.sort_by_key(|&(kind, _, nr, ns, _)| (std::cmp::Reverse(ns), kind, nr));
        for (kind, layer, nr, ns, stack) in found {
            let name = syscalls::name(nr);
            out.push(Notice::ThousandCuts {
                kind: label(kind),
                layer,
                syscall: Arc::from(crate::shared::syscall_name(nr).as_ref()),
                asleep: std::time::Duration::from_nanos(ns),
                window: std::time::Duration::from_nanos(span),
                hint: crate::hints::syscall(name.unwrap_or("")),
                stack,
                top_frame: None,
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

    const MS: u64 = 1_000_000;
    /// The scripted watchdog's tick: picks come every 5 ms on average.
    const TICK: u64 = 5 * MS / SAMPLE_EVERY;

    fn cuts() -> Cuts {
        Cuts::new(TICK, 0x5eed)
    }

    /// Ticks on from `tick` (each [`TICK`] long) to the next pick: its slot and time.
    fn next(c: &mut Cuts, tick: &mut u64, slots: usize) -> (usize, u64) {
        loop {
            *tick += 1;
            if let Some(i) = c.pick(*tick, slots, *tick * TICK) {
                return (i, *tick * TICK);
            }
        }
    }

    fn nanosleep() -> i64 {
        (0..512)
            .find(|&n| syscalls::name(n) == Some("clock_nanosleep"))
            .unwrap()
    }

    #[test]
    fn a_kind_that_keeps_a_worker_asleep_is_reported_once_a_window() {
        let mut c = cuts();
        let mut out = Vec::new();
        let mut tick = 0;
        // One worker, sampled every 5 ms or so for 10 s: asleep in clock_nanosleep 3 samples
        // in 4.
        for k in 0..2_001u64 {
            let (i, at) = next(&mut c, &mut tick, 1);
            let activity = if k % 4 == 3 {
                Activity::Running
            } else {
                Activity::Syscall(nanosleep())
            };
            c.add(i, 7, LayerKind::Async, &reading(at, activity));
        }
        let end = tick * TICK;
        assert!(end >= WINDOW_NS, "{end}");
        c.judge(end, |_| "seed".into(), &mut out);
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
        assert!((share - 0.75).abs() < 0.03, "{share}");
        // A new window: nothing until it is full again.
        c.judge(end + MS, |_| "seed".into(), &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn polls_that_mostly_run_or_park_are_not_reported() {
        let mut c = cuts();
        let mut out = Vec::new();
        let mut tick = 0;
        let park = (0..512).find(|&n| syscalls::is_runtime_park(n)).unwrap();
        for k in 0..2_001u64 {
            let (i, at) = next(&mut c, &mut tick, 1);
            let activity = match k % 20 {
                0 => Activity::Syscall(nanosleep()), // 5 %: under the bar
                1..=9 => Activity::Syscall(park),    // the driver: never the poll's
                _ => Activity::Running,
            };
            c.add(i, 7, LayerKind::Async, &reading(at, activity));
        }
        c.judge(tick * TICK, |_| "k".into(), &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn each_sample_is_returned_for_the_running_totals_but_the_park() {
        let mut c = cuts();
        let mut tick = 0;
        let park = (0..512).find(|&n| syscalls::is_runtime_park(n)).unwrap();
        let mut totals: HashMap<PollTimeKey, u64> = HashMap::new();
        // Two slots for about 1 s: slot 0 asleep in clock_nanosleep, slot 1 running 9 samples
        // in 10, parked the 10th. What each sample should stand for: the time since its
        // slot's previous sample (nothing for the first).
        let (mut last, mut want_asleep, mut want_running) = ([None::<u64>; 2], 0, 0);
        for k in 0..200u64 {
            let (i, at) = next(&mut c, &mut tick, 2);
            let activity = match (i, k % 20) {
                (0, _) => Activity::Syscall(nanosleep()),
                (_, 1) => Activity::Syscall(park),
                _ => Activity::Running,
            };
            let since = last[i].replace(at).map_or(0, |t| at - t);
            match activity {
                Activity::Running => want_running += since,
                Activity::Syscall(nr) if nr != park => want_asleep += since,
                _ => {}
            }
            let kind = if i == 0 { 3 } else { 4 };
            if let Some((key, ns)) = c.add(i, kind, LayerKind::Async, &reading(at, activity)) {
                *totals.entry(key).or_default() += ns;
            }
        }
        let key = |kind, syscall| PollTimeKey {
            kind,
            layer: LayerKind::Async,
            syscall,
        };
        assert_eq!(totals.len(), 2, "{totals:?}");
        assert_eq!(totals[&key(3, Some(nanosleep()))], want_asleep);
        assert_eq!(totals[&key(4, None)], want_running);
        assert!(want_asleep > 900 * MS && want_running > 800 * MS);
    }

    #[test]
    fn time_the_watchdog_slept_through_counts_for_nobody() {
        let mut c = cuts();
        let mut tick = 0;
        let mut asleep = 0;
        let mut spans = Vec::new();
        // Sampled for about 100 ms, then no tick for a second (the idle back-off), then for
        // about 100 ms again.
        for run in 0..2 {
            if run == 1 {
                tick += 1_000 * MS / TICK;
            }
            let mut first = None;
            let mut at = 0;
            for _ in 0..20 {
                let (i, t) = next(&mut c, &mut tick, 1);
                at = t;
                first.get_or_insert(t);
                let r = reading(t, Activity::Syscall(nanosleep()));
                asleep += c.add(i, 7, LayerKind::Async, &r).map_or(0, |(_, ns)| ns);
            }
            spans.push(at - first.unwrap());
        }
        // The two runs' spans; the second (and a bit) in between is no one's.
        assert_eq!(asleep, spans[0] + spans[1]);
    }

    #[test]
    fn many_workers_sampled_in_turn_count_all_their_time() {
        // 16 workers asleep in polls for 2 s, a 2.5 ms tick: each is looked at every 320 ms
        // or so, and each look stands for all of that (a cap on it once lost 40 % of the time).
        let tick = 2_500_000;
        let mut c = Cuts::new(tick, 7);
        let (mut asleep, mut first, mut last) = (0, [None; 16], [0; 16]);
        for t in 1..=800u64 {
            let Some(i) = c.pick(t, 16, t * tick) else {
                continue;
            };
            first[i].get_or_insert(t * tick);
            last[i] = t * tick;
            let r = reading(t * tick, Activity::Syscall(nanosleep()));
            asleep += c.add(i, 7, LayerKind::Async, &r).map_or(0, |(_, ns)| ns);
        }
        let seen: u64 = (0..16).map(|i| last[i] - first[i].unwrap()).sum();
        assert_eq!(asleep, seen);
        assert!(seen > 16 * 1_400 * MS, "{seen}");
    }

    #[test]
    fn one_tick_in_each_period_at_random_samples_the_slots_in_turn() {
        let mut c = cuts();
        let mut phases = Vec::new();
        let mut turn = Vec::new();
        for period in 0..64u64 {
            let picks: Vec<_> = (0..SAMPLE_EVERY)
                .filter_map(|k| {
                    let t = period * SAMPLE_EVERY + k;
                    c.pick(t, 3, t * TICK).map(|i| (k, i))
                })
                .collect();
            assert_eq!(picks.len(), 1, "period {period}: {picks:?}");
            phases.push(picks[0].0);
            turn.push(picks[0].1);
        }
        assert!(
            turn.iter().enumerate().all(|(n, &i)| i == n % 3),
            "{turn:?}"
        );
        // Every tick of the period gets its turn, none always.
        for k in 0..SAMPLE_EVERY {
            let n = phases.iter().filter(|&&p| p == k).count();
            assert!((1..=20).contains(&n), "phase {k}: {n} of 64: {phases:?}");
        }
        assert_eq!(c.pick(20, 0, 20 * TICK), None);
    }
}
