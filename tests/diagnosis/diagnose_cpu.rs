//! A hot loop is diagnosed `cpu`, with its function first in the captured stack and the
//! spawn_blocking hint.
#![cfg(all(target_os = "linux", not(loopwatch_portable)))]

use crate::common;

use std::time::Duration;

use loopwatch::{Cause, StackStatus};

#[inline(never)]
fn crunch_numbers_in_a_hot_loop(d: Duration) {
    common::spin_for(d);
}

#[test]
fn a_hot_loop_is_cpu_with_its_function_on_top() {
    let _serial = common::serial();
    let h = common::diagnosing(Duration::from_millis(10));
    let s = common::stall_of(&h, "crunch", async {
        // Long enough for the first symbolization of a debug test binary (its debug info is big).
        crunch_numbers_in_a_hot_loop(Duration::from_millis(600));
    });
    // Its own CPU time passed the threshold: `cpu`, on an idle host or a busy one.
    assert_eq!(s.cause, Cause::Cpu, "{s:#?}");
    assert!(s.cpu.unwrap().cpu >= Duration::from_millis(10), "{s:#?}");
    assert!(s.hint.unwrap().contains("spawn_blocking"));
    assert_eq!(s.stack_status, StackStatus::Captured, "{s:#?}");
    let frames = common::first_frames(&s, 3);
    assert!(
        frames
            .iter()
            .any(|f| f.contains("crunch_numbers_in_a_hot_loop") || f.contains("spin_for")),
        "{frames:#?}\n{}",
        s.stack.as_ref().unwrap()
    );
    let snap = h.guard.snapshot();
    assert!(snap.stacks_captured >= 1);
    assert!(snap.diagnosis_samples >= 2);
}
