//! The probes: what runs on the watched threads, at every poll.

pub(crate) mod blocking;
#[cfg(feature = "rayon")]
pub(crate) mod cpu;
#[cfg(tokio_unstable)]
pub(crate) mod hooks;
pub(crate) mod layer;
pub(crate) mod spans;
pub(crate) mod task_waker;
pub(crate) mod threads;
#[cfg(feature = "tower")]
pub mod tower;
pub(crate) mod watched;
