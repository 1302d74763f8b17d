//! The verdict: what a stalled thread's kernel-state readings say it was doing. Platform-neutral
//! arithmetic on readings (where they come from is `proc.rs` on Linux, or a test's script), so
//! every rule here runs in unit tests on any host.

use super::{Cause, CauseShare, Syscall};

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
    /// What this reading alone says.
    pub(crate) fn instant_cause(&self) -> Cause {
        match self.activity {
            Activity::Running => Cause::Cpu,
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
    /// Sleeping time per syscall number.
    sleep_ns: Vec<(i64, u64)>,
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
        self.samples += 1;
        match activity {
            Activity::Running => self.starved_ns += rest,
            Activity::Syscall(nr) => match self.sleep_ns.iter_mut().find(|(n, _)| *n == nr) {
                Some((_, ns)) => *ns += rest,
                None => self.sleep_ns.push((nr, rest)),
            },
            Activity::Blocked | Activity::Unknown => {}
        }
    }

    pub(crate) fn set_instant(&mut self, cause: Cause) {
        self.last_instant = Some(cause);
        self.samples += 1;
    }

    /// The shares of each cause, largest first; the first is the verdict.
    pub(crate) fn shares(&self) -> Vec<CauseShare> {
        let mut v: Vec<(Cause, u64)> =
            vec![(Cause::Cpu, self.cpu_ns), (Cause::Starved, self.starved_ns)];
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

    pub(crate) fn verdict(&self) -> Cause {
        self.shares().first().map_or(Cause::Unknown, |s| s.cause)
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
    fn no_interval_falls_back_to_the_instant_reading() {
        let mut t = Tally::default();
        assert_eq!(t.verdict(), Cause::Unknown);
        t.set_instant(Cause::Cpu);
        assert_eq!(t.verdict(), Cause::Cpu);
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
        assert_eq!(t.verdict(), Cause::Syscall(Syscall::from_nr(35)));
        // An unknown reading keeps the activity of the one before it.
        let mut t = Tally::default();
        fold(
            &mut t,
            &r(0, 0, Activity::Running),
            &r(1000, 100, Activity::Unknown),
        );
        assert_eq!(t.verdict(), Cause::Starved);
        // No CPU clock: the reading alone.
        let mut t = Tally::default();
        let no_cpu = Reading {
            at_ns: 1000,
            cpu_ns: None,
            activity: Activity::Running,
        };
        fold(&mut t, &r(0, 0, Activity::Running), &no_cpu);
        assert_eq!(t.verdict(), Cause::Cpu);
    }
}
