//! Diagnosis on real threads: each cause from a real blocking call or spin, a burst of stalls within the stack rate limit, diagnosis turned off, and the unsupported platform path.
//!
//! One test binary for many files (each file one behaviour): the suite builds a few
//! binaries instead of one per file. Every test takes `common::serial()` first, so tests
//! that time real threads never share the machine with each other, as when each file was a
//! binary of its own.

#[path = "../common/mod.rs"]
mod common;

mod diagnose_burst;
mod diagnose_cpu;
mod diagnose_futex;
mod diagnose_off;
mod diagnose_read;
mod diagnose_sleep;
mod diagnose_starved;
mod diagnose_throttled;
mod diagnose_unsupported;
mod no_interrupted_calls;
mod thousand_cuts;
