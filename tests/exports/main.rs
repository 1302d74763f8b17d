//! Exports to real receivers: OTLP over gRPC and HTTP/protobuf (receivers built from opentelemetry-proto), a collector that is down or hangs, and the Prometheus listener scraped while the runtime stalls.
//!
//! One test binary for many files (each file one behaviour): the suite builds a few
//! binaries instead of one per file. Every test takes `common::serial()` first, so tests
//! that time real threads never share the machine with each other, as when each file was a
//! binary of its own.

#[path = "../common/mod.rs"]
mod common;
#[path = "../receiver/mod.rs"]
mod receiver;

mod otlp_collector_down;
mod otlp_export;
mod otlp_tls;
mod prometheus_scrape;
