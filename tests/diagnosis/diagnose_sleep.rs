//! `std::thread::sleep` on a worker is `syscall(nanosleep)` (or `clock_nanosleep`), with the
//! tokio::time::sleep hint; no stack signal is sent into the sleep (it would cut it short).
#![cfg(all(target_os = "linux", not(loopwatch_portable)))]

use crate::common;

use std::time::Duration;

use loopwatch::{Cause, StackStatus};

#[inline(never)]
fn fetch_config_the_old_way() {
    std::thread::sleep(Duration::from_millis(100));
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
    assert_eq!(s.stack_status, StackStatus::InSyscall, "{s:#?}");
    assert!(h.guard.snapshot().stacks_in_syscall >= 1);
}
