//! A worker pinned to one CPU beside three CPU hogs is runnable but not running for most of its
//! stall: loopwatch reports a `starved` share of it. Its poll still spun for more CPU time than
//! the threshold, so it would have stalled an idle host too: the cause is `cpu`, and the report
//! says how much the host stretched it. (`starved` is for a poll whose own CPU time stayed
//! under the threshold; the watchdog core's tests pin that rule on scripted readings.)
#![cfg(all(target_os = "linux", not(loopwatch_portable)))]

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use loopwatch::Cause;

fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity on the calling
    // thread (pid 0) have no other preconditions.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

#[test]
fn a_worker_sharing_its_cpu_with_hogs_is_starved() {
    let _serial = common::serial();
    let h = common::diagnosing(Duration::from_millis(10));
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_to_cpu0();
                common::spin_until(&stop, Duration::from_secs(10));
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    let s = common::stall_of(&h, "squeezed", async {
        pin_to_cpu0();
        common::spin_for(Duration::from_millis(300));
    });
    stop.store(true, Ordering::Release);
    for t in hogs {
        t.join().unwrap();
    }
    let starved = s
        .cause_shares
        .iter()
        .find(|c| c.cause == Cause::Starved)
        .map_or(0.0, |c| c.share);
    assert!(starved >= 0.4, "starved share {starved}: {s:#?}");
    assert!(s.to_string().contains("starved"), "{s}");
    assert_eq!(s.cause, Cause::Cpu, "{s:#?}");
    assert!(s.to_string().contains("contention stretched it"), "{s}");
}
