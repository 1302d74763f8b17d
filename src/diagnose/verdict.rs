//! The verdict: what a stalled thread's kernel-state readings say it was doing. Platform-neutral
//! arithmetic on readings (where they come from is `proc.rs` on Linux, or a test's script), so
//! every rule here runs in unit tests on any host.

use super::{Cause, CauseShare, CpuQuota, Syscall};

/// What a thread was doing at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activity {
    /// Running, or runnable and waiting for a CPU (the kernel's TASK_RUNNING).
    Running,
    /// Sleeping inside this system call.
    Syscall(i64),
    /// Sleeping, not in a system call we could name.
    Blocked,
    Unknown,
}

/// One reading of a thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reading {
    /// When it was taken (board nanoseconds).
    pub(crate) at_ns: u64,
    /// The thread's CPU time, nanoseconds.
    pub(crate) cpu_ns: Option<u64>,
    pub(crate) activity: Activity,
}

impl Reading {
    /// What this reading alone says. A thread in the kernel's TASK_RUNNING may be on a CPU or
    /// waiting for one (a busy host): one reading cannot tell, so it says nothing (`unknown`,
    /// until a second reading gives an interval whose CPU time decides). A thread asleep in a
    /// call is in that call.
    pub(crate) fn instant_cause(&self) -> Cause {
        match self.activity {
            Activity::Running => Cause::Unknown,
            Activity::Syscall(nr) => Cause::Syscall(Syscall::from_nr(nr)),
            Activity::Blocked | Activity::Unknown => Cause::Unknown,
        }
    }
}

/// Folds the interval between two readings into a tally: the CPU time it ran, and the rest
/// by what the thread was doing at the end of it (runnable: starved; in a syscall: that call).
pub(crate) fn fold(tally: &mut Tally, prev: &Reading, now: &Reading) {
    let wall = now.at_ns.saturating_sub(prev.at_ns);
    match (prev.cpu_ns, now.cpu_ns) {
        (Some(c0), Some(c1)) if wall > 0 => {
            let activity = match now.activity {
                Activity::Unknown => prev.activity,
                a => a,
            };
            tally.add_interval(wall, c1.saturating_sub(c0), activity);
        }
        _ => tally.set_instant(now.instant_cause()),
    }
}

/// Accumulates the samples of one stalled thread into shares of time per cause.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    cpu_ns: u64,
    starved_ns: u64,
    /// Time off the CPU with no readable state (no `/proc`, or asleep outside a call we can
    /// name): it counts for `unknown`, never silently for the CPU.
    unknown_ns: u64,
    /// Wall time the intervals cover.
    wall_ns: u64,
    /// Sleeping time per syscall number.
    sleep_ns: Vec<(i64, u64)>,
    /// Of the starved time, what the cgroup's CPU quota explains (see
    /// [`throttled_by`](Self::throttled_by)), and that quota.
    throttled: Option<(u64, CpuQuota)>,
    /// The last instantaneous reading, for a verdict with no interval yet.
    last_instant: Option<Cause>,
    pub(crate) samples: u32,
}

impl Tally {
    /// An interval of `wall` nanoseconds in which the thread ran `cpu`; the rest is put down
    /// to what it was doing (runnable: starved; in a syscall: sleeping in it; else unknown).
    pub(crate) fn add_interval(&mut self, wall: u64, cpu: u64, activity: Activity) {
        let cpu = cpu.min(wall);
        let rest = wall - cpu;
        self.cpu_ns += cpu;
        self.wall_ns += wall;
        self.samples += 1;
        match activity {
            Activity::Running => self.starved_ns += rest,
            Activity::Syscall(nr) => match self.sleep_ns.iter_mut().find(|(n, _)| *n == nr) {
                Some((_, ns)) => *ns += rest,
                None => self.sleep_ns.push((nr, rest)),
            },
            Activity::Blocked | Activity::Unknown => self.unknown_ns += rest,
        }
    }

    /// The thread's cgroup was throttled `delta_ns` (summed over its CPUs) while these
    /// intervals were sampled: that much of the starved time, at most, was the quota's doing.
    /// Applied once, to a tally about to give its verdict.
    pub(crate) fn throttled_by(&mut self, delta_ns: u64, quota: CpuQuota) {
        if delta_ns == 0 {
            return;
        }
        let ns = delta_ns.min(self.starved_ns);
        self.starved_ns -= ns;
        self.throttled = Some((ns, quota));
    }

    pub(crate) fn set_instant(&mut self, cause: Cause) {
        self.last_instant = Some(cause);
        self.samples += 1;
    }

    /// The shares of each cause, largest first; the first is the verdict.
    pub(crate) fn shares(&self) -> Vec<CauseShare> {
        let mut v: Vec<(Cause, u64)> = vec![
            (Cause::Cpu, self.cpu_ns),
            (Cause::Starved, self.starved_ns),
            (Cause::Unknown, self.unknown_ns),
        ];
        if let Some((ns, quota)) = self.throttled {
            v.push((Cause::Throttled(quota), ns));
        }
        v.extend(
            self.sleep_ns
                .iter()
                .map(|&(nr, ns)| (Cause::Syscall(Syscall::from_nr(nr)), ns)),
        );
        let total: u64 = v.iter().map(|(_, ns)| ns).sum();
        if total == 0 {
            return self
                .last_instant
                .map(|c| {
                    vec![CauseShare {
                        cause: c,
                        share: 1.0,
                    }]
                })
                .unwrap_or_default();
        }
        v.retain(|(_, ns)| *ns > 0);
        v.sort_by_key(|b| std::cmp::Reverse(b.1));
        v.into_iter()
            .map(|(cause, ns)| CauseShare {
                cause,
                share: ns as f64 / total as f64,
            })
            .collect()
    }

    /// The cause of a stall of a layer whose threshold is `threshold_ns`. A poll whose own CPU
    /// time reached the threshold would have stalled the worker on an idle host too: `cpu`,
    /// however much the host stretched it (a busy host, a CPU-limited container). Otherwise
    /// the largest share: `starved` only when the poll's own CPU time stayed under the
    /// threshold.
    pub(crate) fn verdict(&self, threshold_ns: u64) -> Cause {
        if threshold_ns > 0 && self.cpu_ns >= threshold_ns {
            return Cause::Cpu;
        }
        self.shares().first().map_or(Cause::Unknown, |s| s.cause)
    }

    /// The CPU time the sampled intervals saw, and the wall time they cover (none before the
    /// second reading).
    pub(crate) fn cpu_time(&self) -> Option<(u64, u64)> {
        (self.wall_ns > 0).then_some((self.cpu_ns, self.wall_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_split_into_cpu_starved_and_sleep() {
        let mut t = Tally::default();
        t.add_interval(1000, 300, Activity::Syscall(202));
        t.add_interval(1000, 100, Activity::Syscall(202));
        t.add_interval(1000, 400, Activity::Running);
        let s = t.shares();
        assert_eq!(s[0].cause, Cause::Syscall(Syscall::from_nr(202)));
        assert!((s[0].share - 1600.0 / 3000.0).abs() < 1e-9);
        assert_eq!(s[1].cause, Cause::Cpu);
        assert_eq!(s[2].cause, Cause::Starved);
        assert_eq!(t.samples, 3);
    }

    #[test]
    fn starved_time_the_quota_explains_is_throttled() {
        let quota = CpuQuota::from_us(10_000, 100_000).unwrap();
        // 12 ms of CPU over 100 ms, runnable the rest; the cgroup was throttled 88 ms.
        let mut t = Tally::default();
        for _ in 0..10 {
            t.add_interval(10_000_000, 1_200_000, Activity::Running);
        }
        t.throttled_by(88_000_000, quota);
        let s = t.shares();
        assert_eq!(s[0].cause, Cause::Throttled(quota));
        assert!((s[0].share - 0.88).abs() < 1e-9, "{s:?}");
        assert_eq!(s[1].cause, Cause::Cpu);
        assert_eq!(t.verdict(20_000_000), Cause::Throttled(quota));
        // Throttled more than it starved (the quota's time is summed over CPUs): at most the
        // starved time is the quota's.
        let mut t = Tally::default();
        t.add_interval(100_000_000, 40_000_000, Activity::Running);
        t.throttled_by(500_000_000, quota);
        assert_eq!(
            t.shares().iter().map(|s| s.cause).collect::<Vec<_>>(),
            vec![Cause::Throttled(quota), Cause::Cpu]
        );
        // A poll whose own CPU reached the threshold is cpu, throttled or not.
        assert_eq!(t.verdict(30_000_000), Cause::Cpu);
        // No throttling in the window: starved, as before.
        let mut t = Tally::default();
        t.add_interval(100_000_000, 10_000_000, Activity::Running);
        t.throttled_by(0, quota);
        assert_eq!(t.verdict(20_000_000), Cause::Starved);
    }

    #[test]
    fn no_interval_falls_back_to_the_instant_reading() {
        let mut t = Tally::default();
        assert_eq!(t.verdict(10), Cause::Unknown);
        t.set_instant(Cause::Syscall(Syscall::from_nr(230)));
        assert_eq!(t.verdict(10), Cause::Syscall(Syscall::from_nr(230)));
    }

    #[test]
    fn one_reading_of_a_runnable_thread_is_no_verdict_of_cpu() {
        // Running or waiting for a CPU: one look at TASK_RUNNING cannot tell (on a busy host
        // a starved poll reads just like a spinning one).
        let r = Reading {
            at_ns: 5_000_000,
            cpu_ns: Some(123),
            activity: Activity::Running,
        };
        assert_eq!(r.instant_cause(), Cause::Unknown);
        let mut t = Tally::default();
        t.set_instant(r.instant_cause());
        assert_eq!(t.verdict(10_000_000), Cause::Unknown);
        // A second reading gives the interval: no CPU time in it, runnable: starved.
        fold(
            &mut t,
            &r,
            &Reading {
                at_ns: 7_500_000,
                cpu_ns: Some(123 + 10_000),
                activity: Activity::Running,
            },
        );
        assert_eq!(t.verdict(10_000_000), Cause::Starved);
    }

    #[test]
    fn a_poll_whose_cpu_reached_the_threshold_is_cpu_however_stretched() {
        // 100 ms of wall time, 48 ms of it on the CPU, the rest runnable without one: a busy
        // host stretched a CPU-bound poll x2.1. Threshold 10 ms.
        let mut t = Tally::default();
        for _ in 0..10 {
            t.add_interval(10_000_000, 4_800_000, Activity::Running);
        }
        assert_eq!(
            t.shares()[0].cause,
            Cause::Starved,
            "starved is the larger share"
        );
        assert_eq!(t.verdict(10_000_000), Cause::Cpu);
        assert_eq!(t.cpu_time(), Some((48_000_000, 100_000_000)));
        // 9 ms of CPU in 100 ms: on an idle host it would not have stalled: starved.
        let mut t = Tally::default();
        for _ in 0..10 {
            t.add_interval(10_000_000, 900_000, Activity::Running);
        }
        assert_eq!(t.verdict(10_000_000), Cause::Starved);
        // The rule at the edge: exactly the threshold is CPU.
        let mut t = Tally::default();
        t.add_interval(20_000_000, 10_000_000, Activity::Running);
        assert_eq!(t.verdict(10_000_000), Cause::Cpu);
    }

    #[test]
    fn time_off_the_cpu_with_no_readable_state_is_unknown_never_cpu() {
        // No /proc: every reading's activity is unknown; the thread slept (CPU clock flat but
        // for 2%).
        let mut t = Tally::default();
        for _ in 0..10 {
            t.add_interval(1_000_000, 20_000, Activity::Unknown);
        }
        assert_eq!(t.verdict(10_000_000), Cause::Unknown);
        // `stat` says S or D (blocked, no call named): unknown too.
        let mut t = Tally::default();
        t.add_interval(1_000_000, 0, Activity::Blocked);
        assert_eq!(t.verdict(10_000_000), Cause::Unknown);
    }

    #[test]
    fn an_interval_is_put_down_to_the_activity_at_its_end() {
        let r = |at_ns, cpu_ns, activity| Reading {
            at_ns,
            cpu_ns: Some(cpu_ns),
            activity,
        };
        let mut t = Tally::default();
        fold(
            &mut t,
            &r(0, 0, Activity::Running),
            &r(1000, 0, Activity::Syscall(35)),
        );
        assert_eq!(t.verdict(u64::MAX), Cause::Syscall(Syscall::from_nr(35)));
        // An unknown reading keeps the activity of the one before it.
        let mut t = Tally::default();
        fold(
            &mut t,
            &r(0, 0, Activity::Running),
            &r(1000, 100, Activity::Unknown),
        );
        assert_eq!(t.verdict(u64::MAX), Cause::Starved);
        // No CPU clock: the reading alone, and a runnable thread's reading alone says nothing.
        let mut t = Tally::default();
        let no_cpu = Reading {
            at_ns: 1000,
            cpu_ns: None,
            activity: Activity::Running,
        };
        fold(&mut t, &r(0, 0, Activity::Running), &no_cpu);
        assert_eq!(t.verdict(u64::MAX), Cause::Unknown);
    }
}
