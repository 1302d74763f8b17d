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
pub(crate) mod cgroup;
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
pub(crate) mod elf;
pub(crate) mod ports;
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
pub(crate) mod proc;
pub(crate) mod roles;
pub(crate) mod sampler;
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
pub(crate) mod stack;
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
pub(crate) mod symbolize;
pub(crate) mod symbols;
pub(crate) mod syscalls;
#[cfg(all(target_os = "linux", target_arch = "x86_64", not(loopwatch_portable)))]
pub(crate) mod unwind;
pub(crate) mod verdict;

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
    /// The thread was runnable but its cgroup's CPU quota was used up (the CFS bandwidth
    /// limit of a container: `cpu.max`, or v1's `cpu.cfs_quota_us`): the container is out of
    /// CPU. Not this poll's code alone: all the process's threads share the quota.
    Throttled(CpuQuota),
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
            Cause::Throttled(_) => "throttled",
            Cause::Unknown => "unknown",
        }
    }

    /// One line saying what to do about a stall with this cause, if there is something to say.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Cause::Cpu => Some(crate::hints::CPU),
            Cause::Starved => Some(crate::hints::STARVED),
            Cause::Throttled(_) => Some(crate::hints::THROTTLED),
            Cause::Syscall(s) => Some(crate::hints::syscall(s.name.unwrap_or(""))),
            Cause::Unknown => None,
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Syscall(s) => write!(f, "syscall({s})"),
            Cause::Throttled(q) => write!(f, "throttled({q})"),
            other => f.write_str(other.kind()),
        }
    }
}

/// A cgroup's CPU quota: `quota_us` of CPU time per `period_us` of wall time, over all its
/// threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct CpuQuota {
    /// CPU time allowed per period, microseconds.
    pub quota_us: u64,
    /// The period, microseconds.
    pub period_us: u64,
}

impl CpuQuota {
    pub(crate) fn from_us(quota_us: u64, period_us: u64) -> Option<CpuQuota> {
        (quota_us > 0 && period_us > 0).then_some(CpuQuota {
            quota_us,
            period_us,
        })
    }

    /// How many CPUs the quota is worth (`quota / period`).
    pub fn cpus(&self) -> f64 {
        self.quota_us as f64 / self.period_us as f64
    }
}

impl fmt::Display for CpuQuota {
    /// `0.50 CPU: 50ms per 100ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.2} CPU: {}ms per {}ms",
            self.cpus(),
            self.quota_us as f64 / 1e3,
            self.period_us as f64 / 1e3
        )
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
    /// Its source is in a dependency (a registry or git crate, the toolchain's), not the
    /// application's code; `false` when there is no debug info to tell.
    pub dependency: bool,
}

impl Frame {
    /// The function's name without the `::{{closure}}` suffixes of the async blocks and
    /// closures inside it (`app::handlers::report::{{closure}}` → `app::handlers::report`).
    pub fn function_name(&self) -> Option<&str> {
        let mut n = self.function.as_deref()?;
        while let Some(s) = n.strip_suffix("::{{closure}}") {
            n = s;
        }
        Some(n)
    }
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

impl Stack {
    /// The innermost frame of the application's own code: named, and not in a dependency.
    pub fn top_user_frame(&self) -> Option<&Frame> {
        self.frames
            .iter()
            .find(|f| f.function.is_some() && !f.dependency)
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

#[cfg(test)]
mod tests {
    use super::*;

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
