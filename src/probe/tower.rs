//! A tower layer that watches each request's future (cargo feature `tower`): the HTTP and
//! gRPC handlers of axum, tonic and hyper-util services get a name no runtime hook gives them
//! ("GET /report held async worker 1 for 50 ms"), on stable tokio, with no span and no change
//! to the handlers.
//!
//! ```
//! # #[cfg(feature = "axum")] {
//! use axum::{routing::get, Router};
//!
//! let app: Router = Router::new()
//!     .route("/report", get(|| async { "ok" }))
//!     // After the routes: axum then tells the layer the route that matched.
//!     .layer(loopwatch::tower::WatchLayer::new());
//! # }
//! ```
//!
//! Each request's future is polled inside [`Watched`]: its kind is the request's method and
//! route (`GET /users/{id}`), and its site the line that made the layer. The route is, in this
//! order: the one given with [`WatchLayer::route`]; axum's `MatchedPath` (feature `axum`, axum
//! 0.8, with the layer added by `Router::layer` so that routing ran first); the URI's path, with
//! [`WatchLayer::by_path`] (gRPC, where the path is the method and so bounded); else
//! `(no route)`. A raw URI path is never used unasked: each distinct kind is a Prometheus label
//! value, and paths carry ids.
//!
//! What it sees: every poll of the request's future (the handler, its extractors, and what
//! they await), so a handler that computes or blocks inside a poll is a stall under its route.
//! What it does not: the connection's own work around the request (hyper's parsing, the
//! response body's streaming after the handler returned), which the poll hooks see under
//! `tokio_unstable`.

use std::panic::Location;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use crate::board::Board;
use crate::probe::watched::{current, Watched};

/// A [`tower_layer::Layer`] that watches the future of every request through the service it
/// wraps (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct WatchLayer {
    target: Target,
    route: Option<Arc<str>>,
    by_path: bool,
    site: &'static Location<'static>,
}

/// Which loopwatch the requests are reported to.
#[derive(Debug, Clone)]
enum Target {
    /// The most recently started [`Guard`](crate::Guard) still alive, looked up again when the
    /// one first found has stopped (or none was running when the layer was made).
    Current(Weak<Board>),
    /// A given guard's, while it runs (none once it stopped, or if it was disabled).
    Fixed(Weak<Board>),
}

impl Target {
    fn board(&self) -> Option<Arc<Board>> {
        match self {
            Target::Current(w) => w.upgrade().or_else(current),
            Target::Fixed(b) => b.upgrade(),
        }
    }
}

impl Default for WatchLayer {
    #[track_caller]
    fn default() -> Self {
        WatchLayer::new()
    }
}

impl WatchLayer {
    /// A layer that reports to the most recently started [`Guard`](crate::Guard) that is still
    /// alive (with none, requests are only passed through). Its site is the caller's line.
    #[track_caller]
    pub fn new() -> WatchLayer {
        WatchLayer {
            target: Target::Current(current().as_ref().map_or_else(Weak::new, Arc::downgrade)),
            route: None,
            by_path: false,
            site: Location::caller(),
        }
    }

    /// A layer that reports to `guard`.
    #[track_caller]
    pub fn for_guard(guard: &crate::Guard) -> WatchLayer {
        WatchLayer {
            target: Target::Fixed(
                guard
                    .board()
                    .as_ref()
                    .map_or_else(Weak::new, Arc::downgrade),
            ),
            ..WatchLayer::new()
        }
    }

    /// Names every request through this layer by `route` (a template such as
    /// `/users/{id}`, for a service with no router that tells it), after its method.
    pub fn route(mut self, route: &str) -> WatchLayer {
        self.route = Some(route.into());
        self
    }

    /// Names requests with no route by their URI path. For gRPC (tonic), where the path is
    /// the method (`/greeter.Greeter/SayHello`); never for paths that carry ids, as each
    /// distinct name is a Prometheus label value.
    pub fn by_path(mut self, on: bool) -> WatchLayer {
        self.by_path = on;
        self
    }
}

impl<S> tower_layer::Layer<S> for WatchLayer {
    type Service = WatchService<S>;

    fn layer(&self, inner: S) -> WatchService<S> {
        WatchService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`WatchLayer`] makes: `inner`, with each request's future watched.
#[derive(Debug, Clone)]
pub struct WatchService<S> {
    inner: S,
    layer: WatchLayer,
}

impl<S> WatchService<S> {
    /// The name of `req`'s kind: method and route.
    fn name_of<B>(&self, req: &http::Request<B>) -> String {
        let method = req.method().as_str();
        let route = self.layer.route.as_deref().or_else(|| matched(req));
        match route {
            Some(r) => format!("{method} {r}"),
            None if self.layer.by_path => format!("{method} {}", req.uri().path()),
            None => format!("{method} (no route)"),
        }
    }
}

/// axum's matched route, when routing ran before this layer.
#[cfg(feature = "axum")]
fn matched<B>(req: &http::Request<B>) -> Option<&str> {
    req.extensions()
        .get::<axum::extract::MatchedPath>()
        .map(axum::extract::MatchedPath::as_str)
}

#[cfg(not(feature = "axum"))]
fn matched<B>(_req: &http::Request<B>) -> Option<&str> {
    None
}

impl<S, B> tower_service::Service<http::Request<B>> for WatchService<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Watched<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let board = self.layer.target.board();
        let Some(board) = board else {
            return Watched::new(None, "", self.inner.call(req), self.layer.site);
        };
        let name = self.name_of(&req);
        let future = self.inner.call(req);
        Watched::new(Some(board), &name, future, self.layer.site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(layer: WatchLayer, method: &str, uri: &str) -> String {
        let svc = tower_layer::Layer::layer(&layer, ());
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap();
        svc.name_of(&req)
    }

    #[test]
    fn a_request_is_named_by_its_method_and_route_never_by_an_unasked_path() {
        assert_eq!(
            name(WatchLayer::new(), "GET", "/users/42"),
            "GET (no route)"
        );
        assert_eq!(
            name(WatchLayer::new().route("/users/{id}"), "POST", "/users/42"),
            "POST /users/{id}"
        );
        assert_eq!(
            name(
                WatchLayer::new().by_path(true),
                "POST",
                "/greeter.Greeter/SayHello?x=1"
            ),
            "POST /greeter.Greeter/SayHello"
        );
        // A given route wins over the path.
        assert_eq!(
            name(WatchLayer::new().by_path(true).route("/r"), "GET", "/a"),
            "GET /r"
        );
    }

    #[test]
    fn the_site_is_the_line_that_made_the_layer() {
        let line = line!() + 1;
        let layer = WatchLayer::new();
        assert_eq!(layer.site.line(), line);
        assert!(layer.site.file().ends_with("tower.rs"));
    }
}
