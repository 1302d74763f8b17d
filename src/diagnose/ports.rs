//! What diagnosis reads from and asks of the operating system, behind two small traits: the
//! watchdog's decision core calls only these, so a test can script a thread's kernel state and
//! the stack capture (see `watchdog/tests.rs`), and the real adapters below are the only code
//! that touches `/proc` or sends a signal.

use std::fmt;

use super::verdict::{Activity, Reading};
use super::CpuQuota;

/// Reads a thread's kernel state: its CPU time and what it is doing.
pub(crate) trait Kernel {
    /// What is kept open while one thread is followed (the real one keeps its `syscall` file
    /// open, so each reading is one `pread`); dropped when the thread is no longer followed.
    type Thread: fmt::Debug;
    /// Starts following thread `tid` (an OS thread id of this process).
    fn open(&mut self, tid: u64) -> Self::Thread;
    /// One reading of `thread` at board time `at_ns`; `None` where there is no way to read one
    /// (not Linux).
    fn read(&mut self, thread: &mut Self::Thread, at_ns: u64) -> Option<Reading>;
    /// How long `thread`'s cgroup has been throttled by its CPU quota so far (nanoseconds,
    /// summed over CPUs), and that quota; `None` where there is no quota (or no cgroup).
    fn throttle(&mut self, thread: &mut Self::Thread) -> Option<(u64, CpuQuota)>;
    /// What `thread` is doing, from its `syscall` file alone (one `pread`): the system call it
    /// is in, with no check that it sleeps there. The cheap first look of the probe-free path.
    fn peek(&mut self, thread: &mut Self::Thread) -> Option<Activity>;
    /// Where `thread` sleeps, if it is asleep in a system call: the call's number, its stack
    /// pointer and program counter (one `pread` of the same file).
    fn asleep_at(&mut self, thread: &mut Self::Thread) -> Option<(i64, u64, u64)>;
    /// The threads of this process whose name is one of `names`.
    fn threads_named(&mut self, names: &[std::sync::Arc<str>]) -> Vec<u64>;
}

/// Frames kept from one capture, at most (signal or not).
pub(crate) const MAX_FRAMES: usize = 128;

/// Why a stack capture could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestError {
    /// Another capture is under way (one at a time per process).
    Busy,
    /// The signal could not be sent (the thread is gone).
    Failed,
    /// The thread is asleep in a system call (or blocked outside one): a signal would
    /// interrupt it, so none was sent.
    Asleep,
    /// The signal no longer runs loopwatch's handler (the application or a library installed
    /// its own, or reset it to the default, which would kill the process): nothing was sent.
    SignalTaken,
}

/// The process-wide stack capture: ask a thread for its stack, pick the addresses up later.
pub(crate) trait StackPort {
    /// Is a capture under way (perhaps another loopwatch instance's)?
    fn busy(&self) -> bool;
    /// Asks thread `tid` for its stack with signal `sig`; the ticket to pick it up with.
    fn request(&mut self, tid: u64, sig: i32) -> Result<u64, RequestError>;
    /// The addresses captured for `ticket`, once its handler has run.
    fn take(&mut self, ticket: u64) -> Option<Vec<usize>>;
    /// Gives up on `ticket`.
    fn cancel(&mut self, ticket: u64);
    /// The stack of thread `tid`, asleep in a system call, taken without a signal (which would
    /// interrupt the call); `None` where that cannot be done.
    fn unwind_asleep(&mut self, tid: u64) -> Option<Vec<usize>>;
}

/// The real kernel: `/proc/self/task/<tid>/syscall` and the thread's CPU clock (Linux: the impl
/// is in `proc.rs`), nothing elsewhere.
#[derive(Debug, Default)]
pub(crate) struct ProcKernel;

#[cfg(not(all(target_os = "linux", not(loopwatch_portable))))]
impl Kernel for ProcKernel {
    type Thread = ();

    fn open(&mut self, _tid: u64) -> Self::Thread {}

    fn read(&mut self, _thread: &mut Self::Thread, _at_ns: u64) -> Option<Reading> {
        None
    }

    fn throttle(&mut self, _thread: &mut Self::Thread) -> Option<(u64, CpuQuota)> {
        None
    }

    fn peek(&mut self, _thread: &mut Self::Thread) -> Option<Activity> {
        None
    }

    fn asleep_at(&mut self, _thread: &mut Self::Thread) -> Option<(i64, u64, u64)> {
        None
    }

    fn threads_named(&mut self, _names: &[std::sync::Arc<str>]) -> Vec<u64> {
        Vec::new()
    }
}

/// The real stack capture: the signal handler and its single capture slot (Linux: the impl is
/// in `stack.rs`); elsewhere every request fails (stacks are never set up there, so none is made).
#[derive(Debug, Default)]
pub(crate) struct SignalStacks;

#[cfg(not(all(target_os = "linux", not(loopwatch_portable))))]
impl StackPort for SignalStacks {
    fn busy(&self) -> bool {
        false
    }

    fn request(&mut self, _tid: u64, _sig: i32) -> Result<u64, RequestError> {
        Err(RequestError::Failed)
    }

    fn take(&mut self, _ticket: u64) -> Option<Vec<usize>> {
        None
    }

    fn cancel(&mut self, _ticket: u64) {}

    fn unwind_asleep(&mut self, _tid: u64) -> Option<Vec<usize>> {
        None
    }
}
