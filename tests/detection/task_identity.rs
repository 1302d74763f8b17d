//! A stall names its task: name, tokio task id and site, on each probe path.

use crate::common;

use std::sync::mpsc;
use std::time::Duration;

use loopwatch::Stall;

const THRESHOLD: Duration = Duration::from_millis(10);
const FILE: &str = file!();

const PARSE_LINE: u32 = line!() + 1; // #[instrument] spans sit on the attribute
#[tracing::instrument]
async fn parse_request() {
    common::spin_for(THRESHOLD * 4);
}

fn report(h: &common::Harness) -> Stall {
    h.wait_running(Duration::from_secs(5))
        .expect("a stall is reported")
}

#[test]
fn instrumented_future_names_the_span_and_the_task_id() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = h.runtime(2);
    let _sub = h.enter();
    let (tx, rx) = mpsc::channel();
    let spawn_line = line!() + 1;
    rt.block_on(rt.spawn(async move {
        tx.send(tokio::task::id().to_string()).unwrap();
        parse_request().await;
    }))
    .unwrap();
    let s = report(&h);
    let id: u64 = rx.recv().unwrap().parse().unwrap();
    assert_eq!(s.task.name.as_deref(), Some("parse_request"));
    assert_eq!(s.task.id, Some(id));
    let decl = format!("{FILE}:{PARSE_LINE}");
    #[cfg(not(tokio_unstable))]
    {
        // Stable: the site is where the instrumented span is declared.
        let _ = spawn_line;
        assert_eq!(s.task.site.as_deref(), Some(decl.as_str()));
    }
    #[cfg(tokio_unstable)]
    {
        // tokio's task span is the task: the site is where it was spawned, and the user's span
        // is named inside it.
        let site = s.task.site.as_deref().unwrap();
        assert!(site.starts_with(&format!("{FILE}:{spawn_line}:")), "{site}");
        assert!(s.task.span.as_deref().unwrap().contains(&decl), "{s:?}");
    }
}

#[test]
fn watched_future_names_the_call_site() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = h.runtime(2);
    let (tx, rx) = mpsc::channel();
    let watch_line = line!() + 1;
    let fut = h.guard.watch("checkout", async move {
        tx.send(tokio::task::id().to_string()).unwrap();
        common::spin_for(THRESHOLD * 4);
    });
    rt.block_on(rt.spawn(fut)).unwrap();
    let s = report(&h);
    let id: u64 = rx.recv().unwrap().parse().unwrap();
    assert_eq!(s.task.name.as_deref(), Some("checkout"));
    assert_eq!(s.task.id, Some(id));
    let site = s.task.site.as_deref().unwrap();
    assert!(site.starts_with(&format!("{FILE}:{watch_line}:")), "{site}");
}

/// With `--cfg tokio_unstable`, a task spawned with a name is named, with no span of the
/// user's: tokio's own `runtime.spawn` span is seen by the layer.
#[cfg(tokio_unstable)]
#[test]
fn tokio_task_span_gives_name_id_and_spawn_site() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = h.runtime(2);
    let _sub = h.enter();
    let (tx, rx) = mpsc::channel();
    rt.block_on(async move {
        let spawn_line = line!() + 3;
        let task = tokio::task::Builder::new()
            .name("named-task")
            .spawn(async move {
                tx.send(tokio::task::id().to_string()).unwrap();
                common::spin_for(THRESHOLD * 4);
            })
            .unwrap();
        task.await.unwrap();
        let s = report(&h);
        let id: u64 = rx.recv().unwrap().parse().unwrap();
        assert_eq!(s.task.name.as_deref(), Some("named-task"));
        assert_eq!(s.task.id, Some(id));
        let site = s.task.site.as_deref().unwrap();
        assert!(site.starts_with(&format!("{FILE}:{spawn_line}:")), "{site}");
    });
}

/// With `--cfg tokio_unstable` and the poll hooks installed, a plain task (no span, no name,
/// no subscriber at all) is named by its id and spawn site.
#[cfg(tokio_unstable)]
#[test]
fn poll_hooks_give_id_and_spawn_site_without_any_span() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2).enable_all();
    h.guard.install_poll_hooks(&mut b);
    let rt = b.build().unwrap();
    let (tx, rx) = mpsc::channel();
    let spawn_line = line!() + 1;
    let task = rt.spawn(async move {
        tx.send(tokio::task::id().to_string()).unwrap();
        common::spin_for(THRESHOLD * 4);
    });
    rt.block_on(task).unwrap();
    let s = report(&h);
    let id: u64 = rx.recv().unwrap().parse().unwrap();
    assert_eq!(s.task.id, Some(id));
    let site = s.task.site.as_deref().unwrap();
    assert!(site.starts_with(&format!("{FILE}:{spawn_line}:")), "{site}");
    // No name was given: none until its frames are in, then the top frame of this code.
    if s.stack.is_none() {
        assert_eq!(s.task.name, None, "{s}");
    }
    #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
    {
        let framed = h
            .wait_for(common::ENDED_WAIT, |s| s.stack.is_some())
            .expect("a report with its frames");
        assert!(framed.task.named_by_stack, "{framed}");
        assert_eq!(
            framed.task.name.as_deref(),
            Some("detection::common::spin_for"),
            "{framed}"
        );
    }
}

/// The span a stall names is the innermost one still open when it is caught, not the last one
/// entered: a span entered and left earlier in the same poll is not blamed.
#[test]
fn the_innermost_open_span_is_named_not_an_earlier_one() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let rt = h.runtime(2);
    let _sub = h.enter();
    let slow_line = line!() + 6;
    rt.block_on(rt.spawn(h.guard.watch("request", async {
        let quick = tracing::info_span!("quick_lookup");
        quick.in_scope(|| std::hint::black_box(1));
        // Entered and left again: it must not be blamed for what follows.
        drop(quick);
        let slow = tracing::info_span!("slow_render");
        slow.in_scope(|| common::spin_for(THRESHOLD * 4));
    })))
    .unwrap();
    let s = report(&h);
    assert_eq!(s.task.name.as_deref(), Some("request"));
    let span = s.task.span.as_deref().unwrap_or_default();
    assert!(
        span.starts_with("slow_render") && span.contains(&format!("{FILE}:{slow_line}")),
        "{s:?}"
    );
}
