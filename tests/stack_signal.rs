//! The stack signal belongs to the application first. If it already handles the signal,
//! loopwatch leaves it alone: no stacks, a reason in the snapshot, and the application's handler
//! still in place. If it takes the signal back later (its own handler, or the default, which
//! would kill the process), loopwatch sends nothing more and says so once. (A binary of its own:
//! signal dispositions are process-wide; each test uses its own signal.)
#![cfg(all(target_os = "linux", not(loopwatch_portable)))]

mod common;

use std::time::Duration;

use loopwatch::StackStatus;

extern "C" fn app_handler(_: libc::c_int) {}

#[test]
fn a_signal_the_app_handles_is_left_alone() {
    let sig = libc::SIGRTMIN() + 6;
    // SAFETY: installing a trivial handler with a zeroed (empty-mask) sigaction.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = app_handler as *const () as usize;
        assert_eq!(libc::sigaction(sig, &act, std::ptr::null_mut()), 0);
    }
    let h = common::harness(loopwatch::builder().threshold(Duration::from_millis(10)));
    let s = common::stall_of(&h, "no-stack", async {
        common::spin_for(Duration::from_millis(40));
    });
    assert_eq!(s.stack_status, StackStatus::Unavailable);
    // Diagnosis still runs without stacks: the thread was read and the stall has its shares
    // (which cause wins on a loaded host is the watchdog core's rule, unit-tested there).
    assert_eq!(s.task.name.as_deref(), Some("no-stack"));
    assert!(!s.cause_shares.is_empty(), "{s:#?}");
    assert!(h.guard.snapshot().diagnosis_samples > 0);
    let why = h.guard.snapshot().stack_setup_error.expect("a reason");
    assert!(why.contains("already has a handler"), "{why}");
    // SAFETY: reading the current disposition.
    let current = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old);
        old.sa_sigaction
    };
    assert_eq!(current, app_handler as *const () as usize);
}

static APP_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn counting_handler(_: libc::c_int) {
    APP_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Sets `sig`'s disposition to `handler` (or the default with `None`).
fn set_disposition(sig: i32, handler: Option<extern "C" fn(libc::c_int)>) {
    // SAFETY: a zeroed sigaction (empty mask) with a trivial, async-signal-safe handler or
    // SIG_DFL.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler.map_or(libc::SIG_DFL, |h| h as *const () as usize);
        assert_eq!(libc::sigaction(sig, &act, std::ptr::null_mut()), 0);
    }
}

/// A stall after the application took `sig` back: reported without a stack, with the reason.
fn stall_after_taking_back(sig: i32, handler: Option<extern "C" fn(libc::c_int)>, name: &str) {
    let h = common::harness(
        loopwatch::builder()
            .threshold(Duration::from_millis(10))
            .stack_signal(sig),
    );
    assert_eq!(
        h.guard.snapshot().stack_setup_error,
        None,
        "loopwatch took {sig}"
    );
    set_disposition(sig, handler);
    // Were the signal sent now, the default action would end this test binary.
    let s = common::stall_of(&h, name, async {
        common::spin_for(Duration::from_millis(40));
    });
    assert_eq!(s.stack_status, StackStatus::Unavailable, "{s:#?}");
    let snap = h.guard.snapshot();
    let why = snap.stack_setup_error.expect("a reason");
    assert!(why.contains("no longer runs loopwatch's handler"), "{why}");
    assert_eq!(snap.stacks_signal_lost, 1);
    assert_eq!(snap.stacks_captured, 0);
}

#[test]
fn a_signal_reset_to_the_default_after_start_kills_nothing() {
    stall_after_taking_back(libc::SIGRTMIN() + 7, None, "reset");
}

#[test]
fn a_signal_the_app_handles_after_start_never_reaches_its_handler() {
    stall_after_taking_back(libc::SIGRTMIN() + 8, Some(counting_handler), "taken");
    assert_eq!(APP_CALLS.load(std::sync::atomic::Ordering::Relaxed), 0);
}
