//! Real HTTP services: an axum 0.8 server on a stable-tokio runtime (as `#[tokio::main]` makes
//! it: no hooks, no spans), driven by a hyper client, all on loopback.
#![cfg(feature = "axum")]

#[path = "../common/mod.rs"]
mod common;

mod probe_free;
mod tonic_server;
mod tower_layer;
