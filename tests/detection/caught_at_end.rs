//! Polls only a little longer than the threshold (1.2x) often end before the watchdog's lower
//! bound of their age reaches it: their thread catches them as they end, so each is reported
//! (running, or caught at its end), and nothing shorter than the threshold is.

use crate::common;

use std::time::Duration;

use loopwatch::StallState;

const THRESHOLD: Duration = Duration::from_millis(20);

#[test]
fn polls_of_one_point_two_thresholds_are_all_reported() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD).stacks(false));
    let rt = h.current_thread();
    let _sub = h.enter();
    let polls = 40;
    rt.block_on(async {
        for i in 0..polls {
            // Each poll a task of its own (so no other work shares its poll).
            tokio::spawn(h.guard.watch("near", async move {
                // Vary the phase against the watchdog's ticks.
                std::thread::sleep(Duration::from_micros(137 * (i % 37)));
                common::spin_for(THRESHOLD * 12 / 10);
            }))
            .await
            .unwrap();
            // Short polls in between keep the watchdog ticking (never idle), so each start is
            // the watchdog's clock, known to within a tick.
            tokio::spawn(h.guard.watch("gap", async {
                let t0 = std::time::Instant::now();
                while t0.elapsed() < Duration::from_millis(15) {
                    tokio::task::yield_now().await;
                }
            }))
            .await
            .unwrap();
        }
    });
    let ended = h.wait_seen(Duration::from_secs(10), |seen| {
        seen.iter().filter(|s| s.state == StallState::Ended).count() >= polls as usize
    });
    let ended: Vec<_> = ended
        .into_iter()
        .filter(|s| s.state == StallState::Ended)
        .collect();
    let caught = ended.iter().filter(|s| s.caught_at_end).count();
    assert!(
        ended.len() * 100 >= polls as usize * 95,
        "{} of {polls} reported ({caught} caught at their end)",
        ended.len()
    );
    assert!(ended.len() <= polls as usize, "none twice: {ended:#?}");
    for s in &ended {
        assert!(s.duration >= THRESHOLD, "{s}");
        assert_eq!(s.task.name.as_deref(), Some("near"), "{s}");
    }
    let snap = h.guard.snapshot();
    assert_eq!(snap.stalls_caught_at_end as usize, caught);
    eprintln!(
        "{} of {polls} reported, {caught} caught at their end",
        ended.len()
    );
}
