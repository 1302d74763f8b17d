//! Capturing the stack of a stalled thread while the stall runs (Linux).
//!
//! The watchdog arms a single capture slot with the thread's id and sends that one thread a
//! signal (`tgkill`). The handler runs on the stalled thread, at the point it was stopped: it
//! checks that the capture is for this thread, walks its own stack into the slot's fixed array
//! of addresses (no allocation, no lock of its own), and marks the slot done. The watchdog picks
//! the addresses up on a later tick (it never waits for the handler), and the reporter thread
//! symbolizes them.
//!
//! The walk uses the platform unwinder (`_Unwind_Backtrace`) through `backtrace`'s unsynchronized
//! tracer, the approach of `pprof-rs`'s signal handler. It allocates nothing; glibc's
//! `dl_iterate_phdr` lock it may take is recursive, so a thread interrupted while holding it does
//! not deadlock.
//!
//! A signal interrupts the stalled thread's system call: calls restartable under `SA_RESTART`
//! (`read`, `futex`, ...) resume by themselves, and `nanosleep` and friends return `EINTR`, which
//! Rust's `std` (`thread::sleep`) and tokio retry. C code that does not retry `EINTR` could see
//! it: turn stacks off (`LOOPWATCH_STACKS=0`) for such a service.

use super::ports::{RequestError, SignalStacks, StackPort};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Frames kept from one capture.
pub(crate) const MAX_FRAMES: usize = 128;

const IDLE: u8 = 0;
const ARMING: u8 = 1;
const ARMED: u8 = 2;
const WRITING: u8 = 3;
const DONE: u8 = 4;

struct Capture {
    state: AtomicU8,
    /// Who asked (several loopwatch instances may share the process).
    ticket: AtomicU64,
    tid: AtomicI32,
    len: AtomicUsize,
    ips: [AtomicUsize; MAX_FRAMES],
}

static CAPTURE: Capture = Capture {
    state: AtomicU8::new(IDLE),
    ticket: AtomicU64::new(0),
    tid: AtomicI32::new(0),
    len: AtomicUsize::new(0),
    ips: [const { AtomicUsize::new(0) }; MAX_FRAMES],
};

/// Signals whose handler loopwatch installed.
static INSTALLED: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Why stacks cannot be captured with a signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SetupError {
    /// The application already handles (or ignores) that signal: loopwatch leaves it alone.
    AlreadyHandled(i32),
    /// `sigaction` refused the signal (not a valid signal number, or one that cannot be caught).
    Refused(i32, String),
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::AlreadyHandled(s) => write!(
                f,
                "signal {s} already has a handler (or is ignored) in this process; loopwatch \
                 leaves it alone: choose another with LOOPWATCH_STACK_SIGNAL"
            ),
            SetupError::Refused(s, e) => write!(f, "signal {s} cannot be used: {e}"),
        }
    }
}

/// The default signal: a real-time signal applications rarely use (`SIGRTMIN + 6`).
pub(crate) fn default_signal() -> i32 {
    libc::SIGRTMIN() + 6
}

/// Installs the capture handler on `sig`, unless the application already handles it.
pub(crate) fn install(sig: i32) -> Result<(), SetupError> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if installed.contains(&sig) {
        return Ok(());
    }
    // SAFETY: sigaction with a null new action only reads the current one into `old`.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
    if rc != 0 {
        return Err(SetupError::Refused(
            sig,
            std::io::Error::last_os_error().to_string(),
        ));
    }
    if old.sa_sigaction != libc::SIG_DFL {
        return Err(SetupError::AlreadyHandled(sig));
    }
    // SAFETY: a zeroed sigaction is valid; we fill in the handler, flags and an empty mask.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = handler as *const () as usize;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
    // SAFETY: sa_mask is a valid sigset_t inside `new`.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    // SAFETY: `handler` is async-signal-safe (see its docs); `new` is fully initialized.
    let rc = unsafe { libc::sigaction(sig, &new, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SetupError::Refused(
            sig,
            std::io::Error::last_os_error().to_string(),
        ));
    }
    installed.push(sig);
    Ok(())
}

/// The signal handler. Async-signal-safe: atomics, `gettid`, and the unwinder writing into a
/// static array; errno is saved and restored.
extern "C" fn handler(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: __errno_location returns this thread's errno slot.
    let errno = unsafe { *libc::__errno_location() };
    if CAPTURE.state.load(Ordering::Acquire) == ARMED
        // SAFETY: gettid has no preconditions.
        && CAPTURE.tid.load(Ordering::Relaxed) == unsafe { libc::gettid() }
        && CAPTURE
            .state
            .compare_exchange(ARMED, WRITING, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    {
        let mut n = 0;
        // SAFETY: tracing this thread's own stack; the callback only stores into atomics.
        unsafe {
            backtrace::trace_unsynchronized(|frame| {
                if n < MAX_FRAMES {
                    CAPTURE.ips[n].store(frame.ip() as usize, Ordering::Relaxed);
                    n += 1;
                    true
                } else {
                    false
                }
            });
        }
        CAPTURE.len.store(n, Ordering::Relaxed);
        CAPTURE.state.store(DONE, Ordering::Release);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

static TICKETS: AtomicU64 = AtomicU64::new(1);

/// Is a capture under way?
pub(crate) fn busy() -> bool {
    CAPTURE.state.load(Ordering::Acquire) != IDLE
}

/// Asks thread `tid` for its stack. Returns the ticket to `take` it with.
pub(crate) fn request(tid: u64, sig: i32) -> Result<u64, RequestError> {
    let tid = i32::try_from(tid).map_err(|_| RequestError::Failed)?;
    if CAPTURE
        .state
        .compare_exchange(IDLE, ARMING, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return Err(RequestError::Busy);
    }
    let ticket = TICKETS.fetch_add(1, Ordering::Relaxed);
    CAPTURE.ticket.store(ticket, Ordering::Relaxed);
    CAPTURE.tid.store(tid, Ordering::Relaxed);
    CAPTURE.state.store(ARMED, Ordering::Release);
    // SAFETY: tgkill only sends a signal to a thread of this process.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, sig) };
    if rc != 0 {
        cancel(ticket);
        return Err(RequestError::Failed);
    }
    Ok(ticket)
}

/// The addresses captured for `ticket`, if the handler has run; frees the slot.
pub(crate) fn take(ticket: u64) -> Option<Vec<usize>> {
    if CAPTURE.state.load(Ordering::Acquire) != DONE
        || CAPTURE.ticket.load(Ordering::Relaxed) != ticket
    {
        return None;
    }
    let n = CAPTURE.len.load(Ordering::Relaxed).min(MAX_FRAMES);
    let ips = CAPTURE.ips[..n]
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    CAPTURE.state.store(IDLE, Ordering::Release);
    Some(ips)
}

/// Gives up on capture `ticket` if its handler has not started (a blocked signal, a thread
/// that exited) or has finished. A capture the handler is writing is left to finish; the next
/// `cancel` of the same ticket frees it.
pub(crate) fn cancel(ticket: u64) {
    if CAPTURE.ticket.load(Ordering::Relaxed) != ticket {
        return;
    }
    for from in [ARMED, DONE] {
        let _ = CAPTURE
            .state
            .compare_exchange(from, IDLE, Ordering::AcqRel, Ordering::Relaxed);
    }
}

impl StackPort for SignalStacks {
    fn busy(&self) -> bool {
        busy()
    }

    fn request(&mut self, tid: u64, sig: i32) -> Result<u64, RequestError> {
        request(tid, sig)
    }

    fn take(&mut self, ticket: u64) -> Option<Vec<usize>> {
        take(ticket)
    }

    fn cancel(&mut self, ticket: u64) {
        cancel(ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[inline(never)]
    fn spin_here(stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_spinning_thread_gives_its_stack() {
        let sig = default_signal();
        install(sig).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            spin_here(&s2);
        });
        let tid = rx.recv().unwrap() as u64;
        // Let it get from the channel send into its loop.
        std::thread::sleep(Duration::from_millis(20));
        let ticket = request(tid, sig).expect("signal sent");
        assert!(busy());
        let deadline = Instant::now() + Duration::from_secs(2);
        let ips = loop {
            if let Some(ips) = take(ticket) {
                break ips;
            }
            assert!(Instant::now() < deadline, "no stack within 2 s");
            std::thread::sleep(Duration::from_millis(1));
        };
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert!(ips.len() > 3, "{ips:?}");
        // In this crate's own tests every frame is loopwatch's, so look before folding: the
        // interrupted function comes right after the signal trampoline.
        let frames = crate::diagnose::symbolize::resolve(&ips);
        let names: Vec<_> = frames.iter().map(|f| f.to_string()).collect();
        let after = names
            .iter()
            .rposition(|n| n.contains("stack::handler"))
            .map_or(0, |i| i + 2);
        assert!(
            names[after..]
                .iter()
                .take(3)
                .any(|n| n.contains("spin_here")),
            "{names:#?}"
        );
    }
}
