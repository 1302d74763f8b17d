//! If the application already handles the stack signal, loopwatch leaves it alone: no stacks,
//! a reason in the snapshot, and the application's handler still in place. (Its own file: the
//! signal disposition is process-wide.)
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
