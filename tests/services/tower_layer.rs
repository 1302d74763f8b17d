//! `loopwatch::tower::WatchLayer` on an axum router: a handler that holds its worker is
//! reported under its method and route, with no span and no change to the handler.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use loopwatch::{LayerKind, StallState};

const THRESHOLD: Duration = Duration::from_millis(20);

/// A handler that computes inside its poll.
async fn report() -> &'static str {
    common::spin_for(Duration::from_millis(60));
    "report"
}

/// A handler that blocks its worker in a system call.
async fn user() -> &'static str {
    std::thread::sleep(Duration::from_millis(60));
    "user"
}

async fn fast() -> &'static str {
    "fast"
}

/// An axum server on a 2-worker multi-thread runtime with nothing of loopwatch's but `layer`
/// on the router; its address.
fn serve(rt: &tokio::runtime::Runtime, layer: loopwatch::tower::WatchLayer) -> SocketAddr {
    let app = Router::new()
        .route("/report", get(report))
        .route("/users/{id}", get(user))
        .route("/fast", get(fast))
        .layer(layer);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// GETs `path` from `addr` with a hyper client on a runtime of its own; the body.
pub(crate) fn get_body(addr: SocketAddr, path: &str) -> (u16, String) {
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    client_rt.block_on(async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri: http::Uri = format!("http://{addr}{path}").parse().unwrap();
        let resp = client.get(uri).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
}

pub(crate) fn server_runtime() -> tokio::runtime::Runtime {
    // As `#[tokio::main]` builds it: no hooks, no subscriber on its threads.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_handler_that_holds_its_worker_is_reported_under_its_route() {
    let _serial = common::serial();
    // Every poll timed, so every route's polls are in the histograms.
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD).sample_every(1));
    let rt = server_runtime();
    let layer_line = line!() + 1;
    let addr = serve(&rt, loopwatch::tower::WatchLayer::new());

    assert_eq!(get_body(addr, "/fast"), (200, "fast".into()));
    assert_eq!(get_body(addr, "/report"), (200, "report".into()));
    let s = h
        .wait_for(common::ENDED_WAIT, |s| {
            s.state == StallState::Ended && s.task.name.as_deref() == Some("GET /report")
        })
        .unwrap_or_else(|| panic!("no stall under the route: {:#?}", h.seen.lock().unwrap()));
    eprintln!("{s}");
    assert_eq!(s.layer, LayerKind::Async);
    assert!(
        s.duration + s.uncertainty >= Duration::from_millis(60),
        "{s}"
    );
    // The site is the line that made the layer, shown relative to the crate.
    let site = s.task.site.as_deref().unwrap_or_default();
    assert!(
        site.starts_with(&format!("tests/services/tower_layer.rs:{layer_line}:")),
        "{s}"
    );
    assert!(!s.task.dependency, "{s}");
    assert!(s.to_string().contains("task GET /report"), "{s}");

    // The route's template, not the path (ids would make every request a kind of its own).
    assert_eq!(get_body(addr, "/users/42"), (200, "user".into()));
    let s = h
        .wait_for(common::ENDED_WAIT, |s| {
            s.state == StallState::Ended && s.task.name.as_deref() == Some("GET /users/{id}")
        })
        .unwrap_or_else(|| panic!("no stall under the template: {:#?}", h.seen.lock().unwrap()));
    #[cfg(target_os = "linux")]
    assert!(
        matches!(s.cause, loopwatch::Cause::Syscall(sc) if matches!(sc.name, Some("nanosleep" | "clock_nanosleep"))),
        "{s}"
    );

    // The fast route and a request no route matched are polls, never stalls.
    assert_eq!(get_body(addr, "/nowhere").0, 404);
    std::thread::sleep(THRESHOLD * 3);
    let snap = h.guard.snapshot();
    let kinds: Vec<_> = snap
        .poll_durations
        .iter()
        .filter_map(|k| k.kind.name.clone())
        .collect();
    for k in [
        "GET /fast",
        "GET /report",
        "GET /users/{id}",
        "GET (no route)",
    ] {
        assert!(kinds.iter().any(|n| &**n == k), "{k} in {kinds:?}");
    }
    assert!(
        snap.stalls_by.iter().all(|c| matches!(
            c.kind.name.as_deref(),
            Some("GET /report" | "GET /users/{id}")
        )),
        "{:#?}",
        snap.stalls_by
    );
    rt.shutdown_timeout(Duration::from_secs(1));
}

#[test]
fn without_a_running_loopwatch_requests_only_pass_through() {
    let _serial = common::serial();
    let rt = server_runtime();
    let h = common::harness(loopwatch::builder().threshold(THRESHOLD));
    let layer = loopwatch::tower::WatchLayer::for_guard(&h.guard);
    drop(h);
    let addr = serve(&rt, layer);
    assert_eq!(get_body(addr, "/fast"), (200, "fast".into()));
    assert_eq!(get_body(addr, "/users/7"), (200, "user".into()));
    rt.shutdown_timeout(Duration::from_secs(1));
}

/// No `kind` label in a scrape is a path of the build machine: the routes the layer names,
/// and (with `--cfg tokio_unstable`, under the poll hooks) the connection tasks axum spawns,
/// whose spawn site is in axum's source (shown relative to the crate, `axum-0.8.x/src/…`).
#[test]
fn no_kind_in_a_scrape_is_an_absolute_path() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder().sample_every(1));
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2).enable_all();
    #[cfg(tokio_unstable)]
    h.guard.install_poll_hooks(&mut b);
    let rt = b.build().unwrap();
    let addr = serve(&rt, loopwatch::tower::WatchLayer::new());
    for path in ["/fast", "/users/7", "/report"] {
        assert_eq!(get_body(addr, path).0, 200);
    }
    let metrics = h.guard.prometheus_addr().expect("listener runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = common::http_get(metrics, "/metrics").unwrap();
        assert_eq!(status, 200);
        // `/report` holds its worker: its stall is counted under some kind.
        if body.contains("loopwatch_stalls_total{") {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "no stall: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let kinds: Vec<&str> = body
        .match_indices("kind=\"")
        .map(|(i, m)| {
            let v = &body[i + m.len()..];
            &v[..v.find('"').unwrap_or(v.len())]
        })
        .collect();
    assert!(!kinds.is_empty());
    for k in &kinds {
        assert!(!k.starts_with('/'), "an absolute path as a kind: {k}");
        assert!(
            !k.contains("/registry/src/"),
            "a machine path inside a kind: {k}"
        );
    }
    // The stall is counted under its route, as its report names it (under the poll hooks
    // too, where the task polled is axum's connection task).
    assert!(
        body.contains(r#"loopwatch_stalls_total{layer="async",kind="GET /report""#),
        "{body}"
    );
    #[cfg(tokio_unstable)]
    assert!(
        kinds.iter().any(|k| k.contains("axum-0.8")),
        "axum's connection tasks, by their spawn site in axum: {kinds:?}"
    );
    rt.shutdown_timeout(Duration::from_secs(1));
}
