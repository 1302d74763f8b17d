//! Reading a thread's kernel state on the watchdog (Linux): its CPU time from the per-thread
//! CPU clock (exact, even while it runs), and what it is doing from
//! `/proc/self/task/<tid>/syscall` (running or runnable, or blocked in which system call), with
//! `/proc/self/task/<tid>/stat` as the fallback where that file cannot be read.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use super::cgroup::CpuLimit;
use super::ports::{Kernel, ProcKernel};
use super::verdict::{Activity, Reading};
use super::CpuQuota;

/// Reads a small proc file into `buf`, returning the text.
fn read_small<'a>(path: &str, buf: &'a mut [u8; 512]) -> Option<&'a str> {
    let mut f = File::open(path).ok()?;
    let mut len = 0;
    loop {
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len == buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    std::str::from_utf8(&buf[..len]).ok()
}

/// The CPU time of thread `tid` of this process: its per-thread CPU clock
/// (`MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)`), which the kernel brings up to date on read.
fn thread_cpu_ns(tid: u64) -> Option<u64> {
    let tid = libc::clockid_t::try_from(tid).ok()?;
    let clock: libc::clockid_t = (!tid << 3) | 6;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(secs * 1_000_000_000 + nanos)
}

/// One thread's `syscall` file, kept open while the thread is sampled: each reading is then one
/// `pread` instead of an open, a read and a close.
#[derive(Debug)]
pub(crate) struct Thread {
    tid: u64,
    syscall: Option<File>,
    /// The CPU quota of its cgroup, looked up once (no quota: `None`).
    limit: Option<CpuLimit>,
}

impl Thread {
    pub(crate) fn new(tid: u64) -> Thread {
        Thread {
            tid,
            syscall: File::open(format!("/proc/self/task/{tid}/syscall")).ok(),
            limit: CpuLimit::of_thread(tid),
        }
    }

    /// The system call the thread is in, from its `syscall` file alone.
    pub(crate) fn peek(&mut self) -> Option<Activity> {
        let mut buf = [0u8; 512];
        self.syscall_text(&mut buf).map(parse_syscall)
    }

    /// Where the thread sleeps, if asleep in a call, from its `syscall` file alone.
    pub(crate) fn asleep_at(&mut self) -> Option<Asleep> {
        let mut buf = [0u8; 512];
        self.syscall_text(&mut buf).and_then(parse_asleep)
    }

    /// The kept-open `syscall` file, read into `buf`.
    fn syscall_text<'b>(&self, buf: &'b mut [u8; 512]) -> Option<&'b str> {
        let f = self.syscall.as_ref()?;
        let n = loop {
            match f.read_at(buf, 0) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        };
        std::str::from_utf8(&buf[..n]).ok()
    }

    /// Takes a reading.
    pub(crate) fn read(&mut self, at_ns: u64) -> Reading {
        let activity = match self.peek() {
            // A call's number means asleep in it: the kernel shows one only for a thread that
            // is not runnable (a thread preempted inside a fast call, like the non-blocking
            // `accept4` tokio makes, reads `running`), so no `stat` is needed to tell (its
            // open, read and close cost 5× the `pread`).
            Some(a) => a,
            None => {
                self.syscall = None;
                read_stat_activity(self.tid)
            }
        };
        Reading {
            at_ns,
            cpu_ns: thread_cpu_ns(self.tid),
            activity,
        }
    }
}

/// The state letter of thread `tid`'s `stat` (`R`, `S`, `D`, ...), if it can be read.
fn state_letter(tid: u64) -> Option<u8> {
    let mut buf = [0u8; 512];
    read_small(&format!("/proc/self/task/{tid}/stat"), &mut buf).and_then(parse_state)
}

/// The fallback: the state letter of `stat` (no syscall number).
fn read_stat_activity(tid: u64) -> Activity {
    match state_letter(tid) {
        Some(b'R') => Activity::Running,
        Some(b'S' | b'D') => Activity::Blocked,
        _ => Activity::Unknown,
    }
}

/// `running` → Running; `-1 sp pc` (blocked outside a syscall) → Blocked;
/// `nr a1 .. a6 sp pc` → Syscall(nr).
pub(crate) fn parse_syscall(text: &str) -> Activity {
    let Some(first) = text.split_whitespace().next() else {
        return Activity::Unknown;
    };
    if first == "running" {
        return Activity::Running;
    }
    match first.parse::<i64>() {
        Ok(nr) if nr >= 0 => Activity::Syscall(nr),
        Ok(_) => Activity::Blocked,
        Err(_) => Activity::Unknown,
    }
}

/// The state letter of `/proc/.../stat`: the first field after the `(comm)`, whose closing
/// parenthesis is the last one (a thread name can hold parentheses and spaces).
pub(crate) fn parse_state(text: &str) -> Option<u8> {
    let close = text.rfind(')')?;
    text[close + 1..].trim_start().bytes().next()
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
/// Where a thread sleeps: its syscall number, stack pointer and instruction pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Asleep {
    pub(crate) nr: i64,
    pub(crate) sp: u64,
    pub(crate) pc: u64,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
/// Parses `/proc/<pid>/task/<tid>/syscall` of a thread asleep in a call:
/// `nr arg1 .. arg6 sp pc`, numbers in hex but the first.
pub(crate) fn parse_asleep(text: &str) -> Option<Asleep> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [nr, .., sp, pc] = fields.as_slice() else {
        return None;
    };
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let nr = nr.parse::<i64>().ok().filter(|&n| n >= 0)?;
    (fields.len() == 9).then_some(())?;
    Some(Asleep {
        nr,
        sp: hex(sp)?,
        pc: hex(pc)?,
    })
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
/// Reads where thread `tid` of this process sleeps, if it is asleep in a system call.
pub(crate) fn read_asleep(tid: u64) -> Option<Asleep> {
    let mut buf = [0u8; 512];
    parse_asleep(syscall_text(tid, &mut buf)?)
}

/// Thread `tid`'s `/proc/self/task/<tid>/syscall`, read into `buf`.
pub(crate) fn syscall_text(tid: u64, buf: &mut [u8; 512]) -> Option<&str> {
    read_small(&format!("/proc/self/task/{tid}/syscall"), buf)
}

impl Kernel for ProcKernel {
    type Thread = Thread;

    fn open(&mut self, tid: u64) -> Self::Thread {
        Thread::new(tid)
    }

    fn read(&mut self, thread: &mut Self::Thread, at_ns: u64) -> Option<Reading> {
        Some(thread.read(at_ns))
    }

    fn throttle(&mut self, thread: &mut Self::Thread) -> Option<(u64, CpuQuota)> {
        let limit = thread.limit.as_ref()?;
        Some((limit.throttled_ns()?, limit.quota))
    }

    fn peek(&mut self, thread: &mut Self::Thread) -> Option<Activity> {
        thread.peek()
    }

    fn asleep_at(&mut self, thread: &mut Self::Thread) -> Option<(i64, u64, u64)> {
        thread.asleep_at().map(|a| (a.nr, a.sp, a.pc))
    }

    fn threads_named(&mut self, names: &[std::sync::Arc<str>]) -> Vec<u64> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return out;
        };
        let mut buf = [0u8; 512];
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if let Some(comm) = read_small(&format!("/proc/self/task/{tid}/comm"), &mut buf) {
                if names.iter().any(|n| **n == *comm.trim_end()) {
                    out.push(tid);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_syscall_file_of_a_sleeping_thread_parses() {
        let a = parse_asleep("35 0x7ffd1 0x0 0x0 0x0 0x0 0x0 0x7f1234567000 0x7f89abcdef01\n");
        assert_eq!(
            a,
            Some(Asleep {
                nr: 35,
                sp: 0x7f12_3456_7000,
                pc: 0x7f89_abcd_ef01
            })
        );
        assert_eq!(parse_asleep("running\n"), None);
        assert_eq!(parse_asleep("-1 0x7ffd 0x7f00\n"), None);
        assert_eq!(parse_asleep(""), None);
    }

    #[test]
    fn syscall_lines_parse() {
        assert_eq!(parse_syscall("running\n"), Activity::Running);
        assert_eq!(parse_syscall("-1 0x7ffd 0x7f00\n"), Activity::Blocked);
        assert_eq!(
            parse_syscall("230 0x1 0x0 0x7f 0x0 0x0 0x0 0x7ffd 0x7f00\n"),
            Activity::Syscall(230)
        );
        assert_eq!(parse_syscall(""), Activity::Unknown);
    }

    #[test]
    fn a_thread_that_never_sleeps_is_never_seen_in_a_call() {
        // What `Thread::read` relies on: a thread making fast calls back to back (preempted
        // inside them, on a busy host) is runnable throughout, and the kernel's `syscall` file
        // then reads `running`, never a call's number. (A C loop of 200,000 readings of such
        // a thread under three CPU hogs on two cores: 0 numbers.)
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            while !s.load(Ordering::Relaxed) {
                // SAFETY: getppid has no preconditions and cannot block.
                std::hint::black_box(unsafe { libc::getppid() });
            }
        });
        let mut th = Thread::new(u64::try_from(rx.recv().unwrap()).unwrap());
        let seen: Vec<_> = (0..20_000).filter_map(|_| th.peek()).collect();
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert!(!seen.is_empty());
        let calls: Vec<_> = seen
            .iter()
            .filter(|a| matches!(a, Activity::Syscall(_)))
            .collect();
        assert!(
            calls.is_empty(),
            "{} of {}: {:?}",
            calls.len(),
            seen.len(),
            calls.first()
        );
    }

    #[test]
    fn state_is_read_after_the_last_parenthesis() {
        assert_eq!(parse_state("123 (tokio-rt-worker) R 1 2 3"), Some(b'R'));
        assert_eq!(parse_state("123 (a) b) (c) S 1 2 3"), Some(b'S'));
        assert_eq!(parse_state("garbage"), None);
    }

    #[test]
    fn a_spinning_and_a_sleeping_thread_are_told_apart() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = |sleep: bool| {
            let stop = stop.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            let t = std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() }).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if sleep {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            });
            (t, u64::try_from(rx.recv().unwrap()).unwrap())
        };
        let (spinner, spin_tid) = spawn(false);
        let (sleeper, sleep_tid) = spawn(true);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut spin = Thread::new(spin_tid);
        let a = spin.read(1);
        // The sleeper wakes every 5 ms and may be caught between sleeps on a
        // loaded machine: it must be seen in a syscall within a few readings.
        let mut sleeper_thread = Thread::new(sleep_tid);
        let mut s = sleeper_thread.read(1);
        for _ in 0..50 {
            if matches!(s.activity, Activity::Syscall(_)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            s = sleeper_thread.read(1);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = spin.read(2);
        stop.store(true, Ordering::Relaxed);
        spinner.join().unwrap();
        sleeper.join().unwrap();
        assert_eq!(a.activity, Activity::Running);
        assert!(b.cpu_ns.unwrap() > a.cpu_ns.unwrap(), "its CPU clock moves");
        assert!(matches!(s.activity, Activity::Syscall(_)), "{s:?}");
    }
}
