//! Capturing the stack of a stalled thread while the stall runs (Linux).
//!
//! The watchdog arms a single capture slot with the thread's id and sends that one thread a
//! signal (`tgkill`). The handler runs on the stalled thread, at the point it was stopped: it
//! checks that the capture is for this thread, walks its own stack into the slot's fixed array
//! of addresses (no allocation, no lock of its own), and marks the slot done. The watchdog picks
//! the addresses up on a later tick (it never waits for the handler), and the reporter thread
//! symbolizes them.
//!
//! The walk calls the platform unwinder (`_Unwind_Backtrace`, which std links) directly, the
//! approach of `pprof-rs`'s signal handler. It allocates nothing; glibc's
//! `dl_iterate_phdr` lock it may take is recursive, so a thread interrupted while holding it does
//! not deadlock.
//!
//! The slot's state and the ticket of the capture it holds are one atomic word, so a handler late
//! for one capture can never claim, finish or free another; a capture the watchdog gives up on
//! while its handler still writes (a preempted thread, a debugger) is marked abandoned and freed
//! by that handler when it finishes. Before each `tgkill` the disposition is read again: if the
//! signal no longer runs loopwatch's handler (the application installed its own, or reset it to
//! the default, which would kill the process), nothing is sent and stack capture stops.
//!
//! The signal never goes into a system call: the thread's state is read just before `tgkill`,
//! and a thread asleep in a call (or blocked) gets none. Linux does not restart a socket call
//! with a timeout, `poll` or `nanosleep` after a handler, even with `SA_RESTART`, and std's
//! `read` does not retry, so the call would fail with `EINTR`. A thread that enters a call in
//! the microseconds between the read and the signal can still be interrupted.

use super::ports::{RequestError, SignalStacks, StackPort};
use super::verdict::Activity;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::ports::MAX_FRAMES;

// The capture slot's word: a ticket (who asked, bits 8..64) and a state (bits 0..8), in one
// atomic so every transition names the capture it belongs to: a handler late for capture A can
// never claim, finish or free capture B (the ABA a separate state byte allowed).
const IDLE: u64 = 0;
const ARMING: u64 = 1;
const ARMED: u64 = 2;
const WRITING: u64 = 3;
const DONE: u64 = 4;
/// The watchdog gave up on a capture its handler is still writing: the handler frees the slot
/// when it finishes.
const ABANDONED: u64 = 5;
const STATE: u64 = 0xff;

#[inline]
const fn word(ticket: u64, state: u64) -> u64 {
    (ticket << 8) | state
}

#[inline]
const fn state_of(word: u64) -> u64 {
    word & STATE
}

struct Capture {
    /// Ticket and state (see [`word`]).
    word: AtomicU64,
    tid: AtomicI32,
    len: AtomicUsize,
    ips: [AtomicUsize; MAX_FRAMES],
}

static CAPTURE: Capture = Capture {
    word: AtomicU64::new(IDLE),
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
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let armed = CAPTURE.word.load(Ordering::Acquire);
    if let Some(claimed) = claim(armed, me) {
        let mut n = 0usize;
        // SAFETY: unwinding this thread's own stack; the callback only stores into atomics
        // and the counter passed as its argument.
        unsafe {
            _Unwind_Backtrace(store_frame, (&mut n as *mut usize).cast());
        }
        finish(claimed, n);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

// The unwinder of the C runtime (libgcc_s, or libunwind on musl), which std links on Linux:
// `_Unwind_Backtrace` walks the calling thread's stack with the DWARF CFI and calls back once
// per frame; `_Unwind_GetIP` reads a frame's instruction pointer.
extern "C" {
    fn _Unwind_Backtrace(
        trace: extern "C" fn(*mut libc::c_void, *mut libc::c_void) -> libc::c_int,
        arg: *mut libc::c_void,
    ) -> libc::c_int;
    fn _Unwind_GetIP(ctx: *mut libc::c_void) -> usize;
}

/// `_URC_NO_REASON`: go on to the next frame.
const URC_NO_REASON: libc::c_int = 0;
/// `_URC_END_OF_STACK`: stop the walk.
const URC_END_OF_STACK: libc::c_int = 5;

/// One frame of the handler's walk: its address into the capture, until it is full.
extern "C" fn store_frame(ctx: *mut libc::c_void, arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the handler's frame counter; `ctx` the unwinder's live context.
    let (n, ip) = unsafe { (&mut *arg.cast::<usize>(), _Unwind_GetIP(ctx)) };
    if *n >= MAX_FRAMES || ip == 0 {
        return URC_END_OF_STACK;
    }
    CAPTURE.ips[*n].store(ip, Ordering::Relaxed);
    *n += 1;
    URC_NO_REASON
}

/// The handler's claim: `armed` is the slot's word as it read it, `me` its thread. Claims the
/// capture only if it is armed for this thread and still the same capture (same ticket) when
/// claimed: a capture cancelled and re-armed for another thread in between is not taken.
/// Returns the claimed word (state `WRITING`).
#[inline]
fn claim(armed: u64, me: i32) -> Option<u64> {
    if state_of(armed) != ARMED || CAPTURE.tid.load(Ordering::Relaxed) != me {
        return None;
    }
    let writing = (armed & !STATE) | WRITING;
    CAPTURE
        .word
        .compare_exchange(armed, writing, Ordering::AcqRel, Ordering::Relaxed)
        .ok()
        .map(|_| writing)
}

/// The handler's end: `n` addresses are written. Marks the capture done, or, if the watchdog
/// abandoned it meanwhile (the handler ran past the deadline), frees the slot.
#[inline]
fn finish(writing: u64, n: usize) {
    CAPTURE.len.store(n, Ordering::Relaxed);
    let done = (writing & !STATE) | DONE;
    if CAPTURE
        .word
        .compare_exchange(writing, done, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        let abandoned = (writing & !STATE) | ABANDONED;
        let _ = CAPTURE
            .word
            .compare_exchange(abandoned, IDLE, Ordering::AcqRel, Ordering::Relaxed);
    }
}

static TICKETS: AtomicU64 = AtomicU64::new(1);

/// Is a capture under way?
pub(crate) fn busy() -> bool {
    state_of(CAPTURE.word.load(Ordering::Acquire)) != IDLE
}

/// Does `sig` still run loopwatch's handler? (One `sigaction` query.)
fn ours(sig: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `now`.
    let mut now: libc::sigaction = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sigaction(sig, std::ptr::null(), &mut now) };
    rc == 0 && now.sa_sigaction == handler as *const () as usize
}

/// Is thread `tid` running or runnable (not asleep in a system call, not blocked)? Read from
/// `/proc/self/task/<tid>/syscall`; a thread whose state cannot be read counts as asleep (no
/// signal is the safe side).
fn running(tid: i32) -> bool {
    let mut buf = [0u8; 512];
    u64::try_from(tid)
        .ok()
        .and_then(|tid| super::proc::syscall_text(tid, &mut buf))
        .is_some_and(|t| super::proc::parse_syscall(t) == Activity::Running)
}

/// Arms the slot for thread `tid`; the ticket of the capture.
fn arm(tid: i32) -> Result<u64, RequestError> {
    // Tickets fit in 56 bits for 2^56 captures.
    let ticket = TICKETS.fetch_add(1, Ordering::Relaxed) & (u64::MAX >> 8);
    if CAPTURE
        .word
        .compare_exchange(
            IDLE,
            word(ticket, ARMING),
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_err()
    {
        return Err(RequestError::Busy);
    }
    CAPTURE.tid.store(tid, Ordering::Relaxed);
    CAPTURE.word.store(word(ticket, ARMED), Ordering::Release);
    Ok(ticket)
}

/// Asks thread `tid` for its stack. Returns the ticket to `take` it with.
pub(crate) fn request(tid: u64, sig: i32) -> Result<u64, RequestError> {
    let tid = i32::try_from(tid).map_err(|_| RequestError::Failed)?;
    // The application may have taken the signal back since loopwatch installed its handler:
    // sent now, the signal would run its handler, or (reset to the default) kill the process.
    if !ours(sig) {
        return Err(RequestError::SignalTaken);
    }
    let ticket = arm(tid)?;
    // Never into a system call: Linux does not restart a socket call with a timeout, `poll` or
    // `nanosleep` after a handler, even with SA_RESTART, so the application's call would fail
    // with EINTR. Read as late as can be, just before the signal.
    if !running(tid) {
        cancel(ticket);
        return Err(RequestError::Asleep);
    }
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
    let done = word(ticket, DONE);
    if CAPTURE.word.load(Ordering::Acquire) != done {
        return None;
    }
    let n = CAPTURE.len.load(Ordering::Relaxed).min(MAX_FRAMES);
    let ips = CAPTURE.ips[..n]
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    let _ = CAPTURE
        .word
        .compare_exchange(done, IDLE, Ordering::AcqRel, Ordering::Relaxed);
    Some(ips)
}

/// Gives up on capture `ticket`: frees the slot if its handler has not started (a blocked
/// signal, a thread that exited) or has finished; marks it abandoned if the handler is writing
/// (a preempted or throttled thread, a debugger), so the handler frees it when it finishes.
pub(crate) fn cancel(ticket: u64) {
    for (from, to) in [
        (word(ticket, ARMED), IDLE),
        (word(ticket, DONE), IDLE),
        (word(ticket, WRITING), word(ticket, ABANDONED)),
    ] {
        if CAPTURE
            .word
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
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

    #[cfg(target_arch = "x86_64")]
    fn unwind_asleep(&mut self, tid: u64) -> Option<Vec<usize>> {
        // One unwinder per process, built at the first thread asleep in a call (`Some(None)`
        // once building it failed). Never waited for: another watchdog using it means no
        // stack this time.
        static ASLEEP: Mutex<Option<Option<super::unwind::Blocked>>> = Mutex::new(None);
        let mut slot = ASLEEP.try_lock().ok()?;
        slot.get_or_insert_with(super::unwind::Blocked::new)
            .as_mut()?
            .unwind(tid)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn unwind_asleep(&mut self, _tid: u64) -> Option<Vec<usize>> {
        None
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

    /// Captures are process-wide: these tests take turns with the signal test.
    fn turn() -> std::sync::MutexGuard<'static, ()> {
        static TURN: Mutex<()> = Mutex::new(());
        TURN.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn me() -> i32 {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    }

    #[test]
    fn a_capture_abandoned_while_its_handler_writes_frees_the_slot_when_it_finishes() {
        let _t = turn();
        let ticket = arm(me()).unwrap();
        // The handler claims it, then runs past the deadline (a preempted thread).
        let writing = claim(CAPTURE.word.load(Ordering::Acquire), me()).expect("claimed");
        cancel(ticket);
        assert!(busy(), "the handler still writes into the slot");
        assert_eq!(take(ticket), None);
        finish(writing, 3);
        assert!(!busy(), "the late handler freed the slot");
        // The next stall gets its stack.
        let next = arm(me()).unwrap();
        let w = claim(CAPTURE.word.load(Ordering::Acquire), me()).unwrap();
        finish(w, 2);
        assert_eq!(take(next).map(|ips| ips.len()), Some(2));
        assert!(!busy());
    }

    #[test]
    fn a_handler_late_for_one_capture_never_claims_the_next() {
        let _t = turn();
        let first = arm(me()).unwrap();
        // The handler read the slot armed for it...
        let seen = CAPTURE.word.load(Ordering::Acquire);
        // ...but before it claims, the watchdog gives up and arms the slot again, for this
        // same thread (the worst case: the thread check passes).
        cancel(first);
        let second = arm(me()).unwrap();
        assert_eq!(claim(seen, me()), None, "the old capture is gone");
        // The second capture's own handler still gets it.
        let w = claim(CAPTURE.word.load(Ordering::Acquire), me()).unwrap();
        finish(w, 1);
        assert_eq!(take(second).map(|ips| ips.len()), Some(1));
        assert_eq!(take(first), None);
    }

    #[test]
    fn a_capture_armed_for_another_thread_is_not_claimed() {
        let _t = turn();
        let ticket = arm(me() + 1).unwrap();
        assert_eq!(claim(CAPTURE.word.load(Ordering::Acquire), me()), None);
        cancel(ticket);
        assert!(!busy());
    }

    #[test]
    fn a_spinning_thread_gives_its_stack() {
        let _t = turn();
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
        let frames = crate::diagnose::symbolize::resolve(&ips, false);
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
