//! A poll that does not return is reported all the same (the watchdog does not wait for the
//! poll to end), here through the stable `watch` wrapper with no span at all.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use loopwatch::StallState;

#[test]
fn a_poll_that_never_returns_is_reported() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(Duration::from_millis(10)));
    let rt = h.runtime(2);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let task = rt.spawn(h.guard.watch("stuck", async move {
        // Never returns unless the test lets it go (bounded so a failing test still ends).
        common::spin_until(&stop2, Duration::from_secs(30));
    }));

    let running = h.wait_running(Duration::from_secs(10));
    // Looked at while the poll is still stuck:
    let snap = h.guard.snapshot();
    let still_stuck = !task.is_finished();
    stop.store(true, Ordering::Release);
    rt.block_on(task).unwrap();

    let running = running.expect("the stuck poll is reported while stuck");
    assert!(still_stuck);
    assert_eq!(running.state, StallState::Running);
    assert_eq!(running.task.name.as_deref(), Some("stuck"));
    assert_eq!(snap.stalls_in_progress, 1);
    assert!(snap.oldest_stall.is_some());
    let ended = h
        .wait_ended(running.id, common::ENDED_WAIT)
        .expect("ended once let go");
    assert!(ended.duration >= running.duration);
}
