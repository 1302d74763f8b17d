//! Two workers stalled at once give two stalls; a stall on a current_thread runtime is seen.

use crate::common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use loopwatch::StallState;
use tracing::Instrument;

const THRESHOLD: Duration = Duration::from_millis(10);

#[test]
fn two_workers_stalled_at_once_are_two_stalls() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = h.runtime(2);
    let _sub = h.enter();
    let both = Arc::new(Barrier::new(2));
    rt.block_on(async {
        let tasks: Vec<_> = (0..2)
            .map(|i| {
                let both = both.clone();
                tokio::spawn(
                    async move {
                        // Both workers are held at the same moment.
                        both.wait();
                        common::spin_for(THRESHOLD * 5);
                    }
                    .instrument(tracing::info_span!("hog", i)),
                )
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let seen = h.wait_seen(common::ENDED_WAIT, |seen| {
        seen.iter().filter(|s| s.state == StallState::Ended).count() >= 2
    });
    // One running report per stall (a stall whose frames came after its first report is
    // reported running once more, with them).
    let mut first = HashSet::new();
    let running: Vec<_> = seen
        .iter()
        .filter(|s| s.state == StallState::Running && first.insert(s.id))
        .collect();
    assert_eq!(running.len(), 2, "{seen:#?}");
    let workers: HashSet<_> = running.iter().map(|s| s.worker.index).collect();
    assert_eq!(workers.len(), 2, "two different workers: {seen:#?}");
    let ids: HashSet<_> = running.iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(h.guard.snapshot().stalls_total, 2);
    for s in &running {
        let name = s.worker.thread_name.as_deref().unwrap_or_default();
        assert!(name.starts_with("tokio-"), "a tokio worker: {name}");
        #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
        assert!(s.worker.tid.is_some());
    }
}

#[test]
fn a_stall_on_a_current_thread_runtime_is_seen() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = h.current_thread();
    let _sub = h.enter();
    let test_thread = std::thread::current().name().map(str::to_owned);
    rt.block_on(async {
        tokio::spawn(
            async {
                common::spin_for(THRESHOLD * 4);
            }
            .instrument(tracing::info_span!("single")),
        )
        .await
        .unwrap();
    });
    let s = h
        .wait_running(Duration::from_secs(5))
        .expect("the current_thread stall is reported");
    assert_eq!(s.task.name.as_deref(), Some("single"));
    assert_eq!(s.worker.thread_name.as_deref(), test_thread.as_deref());
    assert!(h.wait_ended(s.id, common::ENDED_WAIT).is_some());
}
