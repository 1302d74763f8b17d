//! Reading a thread's kernel state from `/proc/self/task/<tid>/` (Linux), on the watchdog.

use std::fs::File;
use std::io::Read;

use super::{Cause, Syscall, Tally};

/// One reading of a thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reading {
    /// When it was taken (board nanoseconds).
    pub(crate) at_ns: u64,
    /// Time spent on a CPU, nanoseconds (schedstat), if readable.
    pub(crate) run_ns: Option<u64>,
    /// Time spent runnable but waiting for a CPU, nanoseconds (schedstat), if readable.
    pub(crate) wait_ns: Option<u64>,
    /// The scheduler state letter from `stat` (`R`, `S`, `D`, ...).
    pub(crate) state: Option<u8>,
    /// The syscall the thread is blocked in (`None`: running, or not in a syscall).
    pub(crate) syscall: Option<i64>,
}

impl Reading {
    /// What this reading alone says.
    pub(crate) fn instant_cause(&self) -> Cause {
        match (self.state, self.syscall) {
            (Some(b'R'), _) => Cause::Cpu,
            (Some(b'S' | b'D'), Some(nr)) => Cause::Syscall(Syscall::from_nr(nr)),
            _ => Cause::Unknown,
        }
    }
}

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

/// Takes a reading of thread `tid` of this process. The scheduler state letter (a third file)
/// is read only when `with_state` is set or schedstat is missing: with schedstat, intervals
/// need only the times and the syscall.
pub(crate) fn read(tid: u64, at_ns: u64, with_state: bool) -> Reading {
    let mut buf = [0u8; 512];
    let mut r = Reading {
        at_ns,
        run_ns: None,
        wait_ns: None,
        state: None,
        syscall: None,
    };
    // The syscall first: the other reads take time, and a blocked thread stays blocked.
    if let Some(text) = read_small(&format!("/proc/self/task/{tid}/syscall"), &mut buf) {
        r.syscall = parse_syscall(text);
    }
    if let Some(text) = read_small(&format!("/proc/self/task/{tid}/schedstat"), &mut buf) {
        let mut it = text.split_whitespace().map(|v| v.parse::<u64>().ok());
        r.run_ns = it.next().flatten();
        r.wait_ns = it.next().flatten();
    }
    if with_state || r.run_ns.is_none() {
        if let Some(text) = read_small(&format!("/proc/self/task/{tid}/stat"), &mut buf) {
            r.state = parse_state(text);
        }
    }
    r
}

/// `running` → None; `-1 sp pc` (blocked outside a syscall) → None; `nr a1 .. a6 sp pc` → nr.
pub(crate) fn parse_syscall(text: &str) -> Option<i64> {
    let first = text.split_whitespace().next()?;
    let nr: i64 = first.parse().ok()?;
    (nr >= 0).then_some(nr)
}

/// The state letter of `/proc/.../stat`: the first field after the `(comm)`, whose closing
/// parenthesis is the last one (a thread name can hold parentheses and spaces).
pub(crate) fn parse_state(text: &str) -> Option<u8> {
    let close = text.rfind(')')?;
    text[close + 1..].trim_start().bytes().next()
}

/// Folds the interval between two readings into a tally.
pub(crate) fn fold(tally: &mut Tally, prev: &Reading, now: &Reading) {
    let wall = now.at_ns.saturating_sub(prev.at_ns);
    match (prev.run_ns, now.run_ns, prev.wait_ns, now.wait_ns) {
        (Some(r0), Some(r1), Some(w0), Some(w1)) if wall > 0 => {
            // Blocked now, or at the start of the interval: that syscall is why it slept.
            let syscall = now.syscall.or(prev.syscall);
            tally.add_interval(wall, r1.saturating_sub(r0), w1.saturating_sub(w0), syscall);
            tally.samples += 1;
        }
        _ => tally.set_instant(now.instant_cause()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_lines_parse() {
        assert_eq!(parse_syscall("running\n"), None);
        assert_eq!(parse_syscall("-1 0x7ffd 0x7f00\n"), None);
        assert_eq!(
            parse_syscall("230 0x1 0x0 0x7f 0x0 0x0 0x0 0x7ffd 0x7f00\n"),
            Some(230)
        );
        assert_eq!(parse_syscall(""), None);
    }

    #[test]
    fn state_is_read_after_the_last_parenthesis() {
        assert_eq!(parse_state("123 (tokio-rt-worker) R 1 2 3"), Some(b'R'));
        assert_eq!(parse_state("123 (a) b) (c) S 1 2 3"), Some(b'S'));
        assert_eq!(parse_state("garbage"), None);
    }

    #[test]
    fn this_thread_can_be_read() {
        // SAFETY: gettid has no preconditions.
        let tid = u64::try_from(unsafe { libc::gettid() }).unwrap();
        let r = read(tid, 1, true);
        assert_eq!(r.state, Some(b'R'), "a thread reading itself is running");
        assert!(r.run_ns.is_some(), "schedstat is readable");
    }
}
