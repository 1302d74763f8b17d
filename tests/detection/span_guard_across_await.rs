//! `let _g = span.enter(); x.await;` (common, though tracing's docs warn against it): the
//! span stays entered on the worker after the poll returned, and its exit comes later or on
//! another worker. loopwatch must not take that for a stall that never ends (a page for
//! nothing, and every later stall on that worker hidden inside it): exits are matched to
//! enters by span id, another task's poll or the worker's park ends the phantom, and the
//! watchdog does not count a worker parked in the I/O driver as stalled.

use crate::common;

use std::time::{Duration, Instant};

use loopwatch::StallState;
use tracing::Instrument;

const THRESHOLD: Duration = Duration::from_millis(20);

/// Tasks that hold a span guard across a sleep longer than the threshold, then an idle spell,
/// then a real stall: nothing but the real stall is reported, and nothing stays in progress.
fn guards_across_awaits(h: &common::Harness, rt: &tokio::runtime::Runtime) {
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..4 {
            tasks.push(tokio::spawn(async move {
                let span = tracing::info_span!("guarded", i);
                let _g = span.enter();
                tokio::time::sleep(3 * THRESHOLD).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    // Idle: a phantom would stay "in progress" and age.
    std::thread::sleep(20 * THRESHOLD);
    let snap = h.guard.snapshot();
    assert_eq!(snap.stalls_in_progress, 0, "{snap:?}");
    assert_eq!(snap.oldest_stall, None);
    let stalls: Vec<_> = h.seen.lock().unwrap().clone();
    assert!(
        stalls.is_empty(),
        "a span guard across an await is no stall: {stalls:#?}"
    );
    if cfg!(tokio_unstable) {
        // tokio's own task span is entered around every poll: the guard's span is nested in
        // it, and the task span's exit closes both. No phantom at all.
        assert_eq!(snap.phantom_polls, 0, "{snap:?}");
    } else {
        // Nothing around the poll: the guard's span looked like the poll, and was a phantom.
        assert!(snap.phantom_polls >= 1, "{snap:?}");
    }

    // A real stall on the same runtime afterwards is seen, under its own name.
    rt.block_on(async {
        tokio::spawn(
            async { common::spin_for(3 * THRESHOLD) }.instrument(tracing::info_span!("spinner")),
        )
        .await
        .unwrap();
    });
    let running = h
        .wait_running(Duration::from_secs(5))
        .expect("the real stall is reported");
    assert_eq!(running.task.name.as_deref(), Some("spinner"));
    let ended = h
        .wait_ended(running.id, common::ENDED_WAIT)
        .expect("and ends");
    assert_eq!(ended.state, StallState::Ended);
    assert!(ended.duration < 10 * THRESHOLD, "{ended:?}");
}

/// With the park hook, any worker that parks ends the phantom it holds, wherever it parks
/// (in the driver or on its condition variable), on every platform: here with diagnosis off,
/// so the watchdog reads no thread state and the hook alone tells.
#[test]
fn with_the_park_hook_a_guard_across_an_await_is_no_stall() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD).diagnose(false));
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2).enable_all();
    h.with_dispatch(&mut b);
    b.on_thread_park(h.guard.park_hook());
    let rt = b.build().unwrap();
    let _sub = h.enter();
    guards_across_awaits(&h, &rt);
}

/// Without it (`#[tokio::main]`), a worker that holds the I/O driver parks in `epoll_wait`,
/// which the watchdog reads: not stalled. One worker always holds the driver.
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
#[test]
fn a_worker_parked_in_the_driver_is_not_stalled() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = h.runtime(1);
    let _sub = h.enter();
    guards_across_awaits(&h, &rt);
}

/// A real stall inside a span guard's poll is still a stall (the worker runs it).
#[test]
fn work_inside_a_guard_is_still_a_stall() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = h.runtime(1);
    let _sub = h.enter();
    let started = Instant::now();
    rt.block_on(async {
        tokio::spawn(async {
            let span = tracing::info_span!("guarded_spin");
            let _g = span.enter();
            common::spin_for(4 * THRESHOLD);
            tokio::time::sleep(THRESHOLD).await;
        })
        .await
        .unwrap();
    });
    let running = h
        .wait_running(Duration::from_secs(5))
        .expect("the spin inside the guard is a stall");
    assert_eq!(running.task.name.as_deref(), Some("guarded_spin"));
    assert!(running.duration < started.elapsed());
}
