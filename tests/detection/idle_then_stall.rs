//! After an idle spell (the watchdog then wakes less often), short polls are still not slow and
//! a stall is still reported, with a start no earlier than the poll's own.

use crate::common;

use std::time::{Duration, Instant, SystemTime};

const THRESHOLD: Duration = Duration::from_millis(10);

#[test]
fn idle_spells_neither_invent_slow_polls_nor_hide_stalls() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD).diagnose(false));
    let rt = h.runtime(2);
    // Polls of 0.6x the threshold, each after an idle spell.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(30));
        rt.block_on(rt.spawn(h.guard.watch("short", async {
            common::spin_for(THRESHOLD * 6 / 10);
        })))
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(30));
    let snap = h.guard.snapshot();
    if snap.stalls_total == 0 {
        assert_eq!(snap.slow_polls, 0, "no short poll counted slow");
    }

    // A stall that starts right after an idle spell is reported.
    std::thread::sleep(Duration::from_millis(50));
    let before = SystemTime::now();
    let t0 = Instant::now();
    rt.block_on(rt.spawn(h.guard.watch("after-idle", async {
        common::spin_for(THRESHOLD * 4);
    })))
    .unwrap();
    let ran = t0.elapsed();
    let s = h
        .wait_for(common::ENDED_WAIT, |s| {
            s.task.name.as_deref() == Some("after-idle") && s.state == loopwatch::StallState::Ended
        })
        .expect("the stall after an idle spell is reported");
    // Right to within what the record says (and a millisecond for the wall clock's reading).
    let slack = s.uncertainty + Duration::from_millis(1);
    assert!(s.started_at + slack >= before, "{s:?}");
    assert!(s.duration <= ran + slack, "{s:?} vs {ran:?}");
    assert!(s.duration + s.uncertainty >= THRESHOLD * 4, "{s:?}");
}
