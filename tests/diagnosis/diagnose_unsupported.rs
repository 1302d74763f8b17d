//! Where loopwatch cannot diagnose (every target but Linux; checked on Linux by building with
//! `--cfg loopwatch_portable`, which compiles the Linux-only parts out), stalls are still found
//! and reported, with cause `unknown` and no stack.
#![cfg(not(all(target_os = "linux", not(loopwatch_portable))))]

use crate::common;

use std::time::Duration;

use loopwatch::{Cause, StackStatus};

#[test]
fn off_linux_the_cause_is_unknown_and_there_is_no_stack() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(Duration::from_millis(10)));
    let s = common::stall_of(&h, "elsewhere", async {
        common::spin_for(Duration::from_millis(40));
    });
    assert_eq!(s.cause, Cause::Unknown);
    assert_eq!(s.hint, None);
    assert_eq!(s.stack_status, StackStatus::Unavailable);
    assert_eq!(s.worker.tid, None);
    assert!(h
        .guard
        .snapshot()
        .stack_setup_error
        .unwrap()
        .contains("only implemented on Linux"));
}
