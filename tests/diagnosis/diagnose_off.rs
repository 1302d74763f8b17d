//! With diagnosis off (`LOOPWATCH_DIAGNOSE=0`, and the path every non-Linux build takes), a
//! stall is still reported, with cause `unknown`, no hint and no stack.

use crate::common;

use std::time::Duration;

use loopwatch::{Cause, StackStatus};

#[test]
fn without_diagnosis_the_cause_is_unknown() {
    let _serial = common::serial();
    let h = common::harness(
        loopwatch::builder()
            .threshold(Duration::from_millis(10))
            .diagnose(false),
    );
    let s = common::stall_of(&h, "plain", async {
        common::spin_for(Duration::from_millis(40));
    });
    assert_eq!(s.cause, Cause::Unknown);
    assert_eq!(s.hint, None);
    assert!(s.cause_shares.is_empty());
    assert_eq!(s.stack, None);
    assert_eq!(s.stack_status, StackStatus::Disabled);
    assert_eq!(h.guard.snapshot().diagnosis_samples, 0);
}
