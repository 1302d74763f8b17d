//! A poll that spins for 3x the threshold is reported while it still runs, then reported ended
//! with its total.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loopwatch::{LayerKind, StallState};
use tracing::Instrument;

const THRESHOLD: Duration = Duration::from_millis(20);

#[test]
fn spinning_poll_is_reported_before_it_ends() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = h.runtime(2);
    let _sub = h.enter();
    let seen_during_spin = Arc::new(AtomicBool::new(false));
    let flag = seen_during_spin.clone();
    let seen = h.seen.clone();
    let spin = 3 * THRESHOLD;
    let started = Instant::now();
    rt.block_on(async move {
        tokio::spawn(
            async move {
                common::spin_for(spin);
                // Still inside the poll: has the report already arrived?
                let reported = seen
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|s| s.state == StallState::Running);
                flag.store(reported, Ordering::SeqCst);
            }
            .instrument(tracing::info_span!("spinner")),
        )
        .await
        .unwrap();
    });
    let ran = started.elapsed();

    let running = h
        .wait_running(Duration::from_secs(5))
        .expect("a running report");
    assert!(
        seen_during_spin.load(Ordering::SeqCst),
        "the stall must be reported while the poll still runs"
    );
    assert_eq!(running.layer, LayerKind::Async);
    assert_eq!(running.task.name.as_deref(), Some("spinner"));
    assert!(running.duration >= THRESHOLD, "{running:?}");
    assert!(running.duration < spin + running.uncertainty, "{running:?}");

    let ended = h
        .wait_ended(running.id, common::ENDED_WAIT)
        .unwrap_or_else(|| {
            let seen = h.seen.lock().unwrap();
            let states: Vec<_> = seen.iter().map(|s| (s.id, s.state)).collect();
            panic!("no ended report of stall {}: {states:?}", running.id)
        });
    assert!(ended.exact_end, "the worker saw the flag and timed the end");
    // Right to within what the record says (half a tick, more on a host that held the
    // watchdog back).
    assert!(ended.duration + ended.uncertainty >= spin, "{ended:?}");
    assert!(
        ended.duration <= ran + ended.uncertainty,
        "{ended:?} vs {ran:?}"
    );

    let snap = h.guard.snapshot();
    assert_eq!(snap.stalls_total, 1);
    assert_eq!(snap.stalls_in_progress, 0);
    assert!(snap.slow_polls >= 1);
}
