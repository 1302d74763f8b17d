//! `std::thread::sleep` on a worker is `syscall(nanosleep)` (or `clock_nanosleep`), with the
//! tokio::time::sleep hint, and the sleeping function first in the stack (std folded away): a
//! stack read without a signal (one would cut the sleep short).
#![cfg(all(target_os = "linux", not(loopwatch_portable)))]

use crate::common;

use std::time::Duration;

use loopwatch::{Cause, StackStatus};

#[inline(never)]
fn fetch_config_the_old_way() {
    std::thread::sleep(Duration::from_millis(150));
}

#[test]
fn thread_sleep_is_a_nanosleep_syscall() {
    let _serial = common::serial();
    let h = common::diagnosing(Duration::from_millis(10));
    let s = common::stall_of(&h, "sleepy", async {
        fetch_config_the_old_way();
    });
    let Cause::Syscall(sc) = s.cause else {
        panic!("expected a syscall: {s:#?}");
    };
    assert!(
        matches!(sc.name, Some("nanosleep" | "clock_nanosleep")),
        "{sc:?}"
    );
    assert!(s.hint.unwrap().contains("tokio::time::sleep"));
    assert_eq!(s.stack_status, StackStatus::Captured, "{s:#?}");
    let frames = common::first_frames(&s, 2);
    assert!(
        frames[0].contains("fetch_config_the_old_way"),
        "{frames:#?}\n{}",
        s.stack.as_ref().unwrap()
    );
    assert_eq!(h.guard.snapshot().stacks_in_syscall, 0);
}
