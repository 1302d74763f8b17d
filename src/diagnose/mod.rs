//! Diagnosis: why a poll stalls (its cause), what to do about it (a hint), and where (its stack).
//!
//! The cause comes from the stalled thread's kernel state, sampled by the watchdog while the
//! stall runs (Linux: `/proc/self/task/<tid>/{schedstat,stat,syscall}`); nothing here touches the
//! poll hot path. On other systems the cause is [`Cause::Unknown`].
// Off Linux the kernel-state sampling and stack capture are compiled out, and with them
// the only users of some of what follows.
#![cfg_attr(
    not(all(target_os = "linux", not(loopwatch_portable))),
    allow(dead_code)
)]

use std::fmt;

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
pub(crate) mod proc;
pub(crate) mod sampler;
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
pub(crate) mod stack;
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
pub(crate) mod symbolize;
pub(crate) mod syscalls;

/// Why a poll held its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cause {
    /// The thread was running: its CPU time grew with wall time (a hot loop, heavy parsing,
    /// compression, crypto).
    Cpu,
    /// The thread slept inside a blocking system call.
    Syscall(Syscall),
    /// The thread was runnable but not running: the host is out of CPU. Not the code's fault.
    Starved,
    /// Not known (not Linux, the thread's state could not be read, or too few samples).
    Unknown,
}

/// A system call, by number and (where loopwatch knows it) name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Syscall {
    /// The architecture's syscall number.
    pub nr: i64,
    /// Its name (`nanosleep`, `futex`, `read`, ...), if known.
    pub name: Option<&'static str>,
}

impl Syscall {
    pub(crate) fn from_nr(nr: i64) -> Syscall {
        Syscall {
            nr,
            name: syscalls::name(nr),
        }
    }
}

impl fmt::Display for Syscall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name {
            Some(n) => f.write_str(n),
            None => write!(f, "#{}", self.nr),
        }
    }
}

impl Cause {
    /// The short label used in reports and metrics: `cpu`, `syscall`, `starved`, `unknown`.
    pub fn kind(&self) -> &'static str {
        match self {
            Cause::Cpu => "cpu",
            Cause::Syscall(_) => "syscall",
            Cause::Starved => "starved",
            Cause::Unknown => "unknown",
        }
    }

    /// One line saying what to do about a stall with this cause, if there is something to say.
    pub fn hint(&self) -> Option<&'static str> {
        Some(match self {
            Cause::Cpu => {
                "CPU-bound poll: move the work to tokio::task::spawn_blocking or a CPU pool \
                 (rayon), or yield (tokio::task::yield_now) inside the loop"
            }
            Cause::Starved => {
                "the thread was runnable but got no CPU: the host is out of CPU (limits, noisy \
                 neighbours), not this code"
            }
            Cause::Syscall(s) => match s.name.unwrap_or("") {
                "nanosleep" | "clock_nanosleep" => {
                    "std::thread::sleep on an async worker: use tokio::time::sleep"
                }
                "futex" | "futex_waitv" => {
                    "a lock or blocking channel holds the worker: shorten the critical section, \
                     or use the async primitive (tokio::sync::Mutex, tokio::sync::mpsc)"
                }
                "fsync" | "fdatasync" | "sync" | "syncfs" | "sync_file_range" => {
                    "a blocking fsync on an async worker: move it to tokio::task::spawn_blocking"
                }
                "epoll_wait" | "epoll_pwait" | "epoll_pwait2" => {
                    "a nested event loop (block_on inside a task?) blocks the worker: await \
                     the future instead"
                }
                "read" | "readv" | "pread64" | "preadv2" | "recvfrom" | "recvmsg" | "recvmmsg"
                | "write" | "writev" | "pwrite64" | "pwritev2" | "sendto" | "sendmsg"
                | "sendmmsg" | "connect" | "accept" | "accept4" | "poll" | "ppoll" | "select"
                | "pselect6" | "openat" | "open" | "sendfile" | "splice" => {
                    "blocking I/O on an async worker: use the tokio equivalent (tokio::net, \
                     tokio::fs) or tokio::task::spawn_blocking"
                }
                _ => {
                    "a blocking system call on an async worker: move it to \
                     tokio::task::spawn_blocking"
                }
            },
            Cause::Unknown => return None,
        })
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Syscall(s) => write!(f, "syscall({s})"),
            other => f.write_str(other.kind()),
        }
    }
}

/// A cause and the share of the stall's sampled time it took (0..=1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CauseShare {
    /// The cause.
    pub cause: Cause,
    /// Its share of the sampled time.
    pub share: f64,
}

/// The captured stack of a stalled thread, symbolized, with loopwatch's, tokio's and the
/// standard library's frames folded away so the first frame is the user's code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stack {
    /// The frames shown, innermost first.
    pub frames: Vec<Frame>,
    /// Frames folded away (runtime, std, loopwatch, signal handling).
    pub folded: usize,
}

/// One frame of a captured stack.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Frame {
    /// The function (demangled), or `None` if it could not be named.
    pub function: Option<String>,
    /// `file:line`, when debug info is there.
    pub location: Option<String>,
    /// The instruction address.
    pub ip: usize,
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.function {
            Some(func) => f.write_str(func)?,
            None => write!(f, "{:#x}", self.ip)?,
        }
        if let Some(loc) = &self.location {
            write!(f, " at {loc}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Stack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, fr) in self.frames.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "  {i}: {fr}")?;
        }
        if self.folded > 0 {
            write!(f, "\n  ({} runtime frames folded)", self.folded)?;
        }
        Ok(())
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
    #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
    pub(crate) fn add_interval(&mut self, wall: u64, cpu: u64, activity: proc::Activity) {
        let cpu = cpu.min(wall);
        let rest = wall - cpu;
        self.cpu_ns += cpu;
        self.samples += 1;
        match activity {
            proc::Activity::Running => self.starved_ns += rest,
            proc::Activity::Syscall(nr) => match self.sleep_ns.iter_mut().find(|(n, _)| *n == nr) {
                Some((_, ns)) => *ns += rest,
                None => self.sleep_ns.push((nr, rest)),
            },
            proc::Activity::Blocked | proc::Activity::Unknown => {}
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

    #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
    #[test]
    fn intervals_split_into_cpu_starved_and_sleep() {
        use proc::Activity;
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
    fn causes_show_and_hint() {
        let sleep = Cause::Syscall(Syscall {
            nr: 35,
            name: Some("nanosleep"),
        });
        assert_eq!(sleep.to_string(), "syscall(nanosleep)");
        assert!(sleep.hint().unwrap().contains("tokio::time::sleep"));
        assert!(Cause::Cpu.hint().unwrap().contains("spawn_blocking"));
        assert_eq!(
            Cause::Syscall(Syscall {
                nr: 9999,
                name: None
            })
            .to_string(),
            "syscall(#9999)"
        );
        assert_eq!(Cause::Unknown.hint(), None);
    }
}
