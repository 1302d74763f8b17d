//! Detection and identity: stalls reported while they run and when they end, short polls left alone, idle spells, concurrent stalls, task names, the report event, victims and schedule delays, loop lag, and the blocking and CPU layers.
//!
//! One test binary for many files (each file one behaviour): the suite builds a few
//! binaries instead of one per file. Every test takes `common::serial()` first, so tests
//! that time real threads never share the machine with each other, as when each file was a
//! binary of its own.

#[path = "../common/mod.rs"]
mod common;

mod blocking_pool;
mod blocking_threads;
mod caught_at_end;
mod concurrent_stalls;
mod cpu_pool;
mod idle_then_stall;
mod loop_lag;
mod report_event;
mod short_polls_not_reported;
mod span_guard_across_await;
mod stall_never_returns;
mod stall_reported_while_running;
mod task_identity;
mod victims;
mod victims_watched;
mod watched_wakes;
