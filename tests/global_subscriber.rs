//! loopwatch's layer in the *global* subscriber, as `init()` sets it, with tokio's task spans
//! and poll hooks (`--cfg tokio_unstable`): tokio launches each multi-thread worker as a
//! blocking task whose span lasts the worker's whole life; that span must not swallow the
//! polls inside it. (A regression test: it did, and nothing was ever reported.)
#![cfg(tokio_unstable)]

mod common;

use std::sync::mpsc::channel;
use std::sync::Mutex;
use std::time::Duration;

use tracing_subscriber::prelude::*;

#[test]
fn stalls_are_seen_under_a_global_subscriber_with_task_spans_and_hooks() {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let (layer, guard) = loopwatch::builder()
        .ignore_env()
        .threshold(Duration::from_millis(20))
        .stacks(false)
        .prometheus_addr(([127, 0, 0, 1], 0))
        .on_stall(move |s| {
            let _ = tx.lock().unwrap().send(s.clone());
        })
        .build()
        .unwrap();
    tracing_subscriber::registry().with(layer).init();

    for hooks in [false, true] {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2).enable_all();
        if hooks {
            guard.install_poll_hooks(&mut b);
        }
        let rt = b.build().unwrap();
        let spawn_line = line!() + 2;
        rt.block_on(async {
            tokio::spawn(async { common::spin_for(Duration::from_millis(100)) })
                .await
                .unwrap()
        });
        let s = loop {
            let s = rx
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("no stall reported (hooks: {hooks})"));
            if s.state == loopwatch::StallState::Ended {
                break s;
            }
        };
        assert_eq!(s.layer, loopwatch::LayerKind::Async, "{s}");
        let site = s.task.site.as_deref().unwrap_or_default();
        assert!(
            site.contains(&format!("global_subscriber.rs:{spawn_line}:")),
            "hooks {hooks}: {s}"
        );
        assert!(s.duration >= Duration::from_millis(80), "{s}");
    }
    // No stall of the blocking layer came from the workers' own lifetime spans.
    assert!(guard
        .snapshot()
        .stalls_by
        .iter()
        .all(|c| c.layer == loopwatch::LayerKind::Async));
}
