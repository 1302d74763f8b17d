//! The *global* subscriber (a binary of its own: there is one per process). loopwatch's layer in
//! it, as `init()` sets it, with tokio's task spans and poll hooks (`--cfg tokio_unstable`):
//! tokio launches each multi-thread worker as a blocking task whose span lasts the worker's
//! whole life; that span must not swallow the polls inside it. (A regression test: it did, and
//! nothing was ever reported.) And when the application set its own global subscriber first,
//! `init()` says what to do instead.

#![cfg(feature = "fmt")]
mod common;

#[cfg(tokio_unstable)]
use std::sync::mpsc::channel;
#[cfg(tokio_unstable)]
use std::sync::Mutex;
#[cfg(tokio_unstable)]
use std::time::Duration;

use tracing_subscriber::prelude::*;

#[cfg(tokio_unstable)]
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
        assert!(
            s.duration + s.uncertainty >= Duration::from_millis(100),
            "{s}"
        );
    }
    // No stall of the blocking layer came from the workers' own lifetime spans.
    assert!(guard
        .snapshot()
        .stalls_by
        .iter()
        .all(|c| c.layer == loopwatch::LayerKind::Async));
    // A second init finds the global subscriber taken, and says what to do.
    init_says_what_to_do();
}

/// `try_init` and `init` after the application set its own global subscriber: the error says
/// to add loopwatch's layer to it.
fn init_says_what_to_do() {
    let e = loopwatch::builder()
        .ignore_env()
        .metrics(loopwatch::MetricsExport::Off)
        .try_init()
        .expect_err("a global subscriber is already set");
    assert!(matches!(e, loopwatch::Error::SetGlobalDefault(_)), "{e:?}");
    let shown = e.to_string();
    assert!(
        shown.contains("add loopwatch's layer") && shown.contains("builder().build()"),
        "{shown}"
    );
    let panic = std::panic::catch_unwind(|| {
        loopwatch::builder()
            .ignore_env()
            .metrics(loopwatch::MetricsExport::Off)
            .init()
    })
    .expect_err("init panics");
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("add loopwatch's layer"), "{msg}");
}

#[cfg(not(tokio_unstable))]
#[test]
fn init_after_the_application_set_its_own_subscriber_says_what_to_do() {
    tracing_subscriber::registry().init();
    init_says_what_to_do();
}
