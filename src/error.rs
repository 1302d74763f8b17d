//! The one error type of loopwatch's set-up calls.

use std::fmt;

/// Why loopwatch could not be set up.
///
/// Every variant names what was wrong (the setter or the environment variable) and why, so an
/// operator can fix it without reading the source.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A `LOOPWATCH_*` environment variable holds a value loopwatch cannot use.
    InvalidEnv {
        /// The variable's name, e.g. `LOOPWATCH_THRESHOLD`.
        var: &'static str,
        /// The value found (lossily decoded if it was not UTF-8).
        value: String,
        /// Why it was refused, and what would be accepted.
        reason: String,
    },
    /// A value given to a [`Builder`](crate::Builder) setter is out of range.
    InvalidConfig {
        /// The setter, e.g. `threshold`.
        setting: &'static str,
        /// Why it was refused, and what would be accepted.
        reason: String,
    },
    /// loopwatch's own thread (watchdog or reporter) could not be started.
    SpawnThread {
        /// Which thread.
        thread: &'static str,
        /// The error the OS gave.
        source: std::io::Error,
    },
    /// The Prometheus `/metrics` listener could not bind its address (in use, not local, no
    /// permission): an address other than the default, or any with `Builder::require_prometheus`
    /// (a busy default address only turns the listener off). Choose another with
    /// `Builder::prometheus_addr` or `LOOPWATCH_PROMETHEUS_ADDR` (`off` turns the listener off).
    PrometheusListener {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The error the OS (or the exporter) gave.
        source: std::io::Error,
    },
    /// The OTLP exporter could not be set up (an endpoint that is not a URI, for instance).
    Otlp {
        /// What the exporter said.
        reason: String,
    },
    /// [`try_init`](crate::try_init) could not set the global default subscriber, because one was
    /// already set. Use [`Builder::build`](crate::Builder::build) and add the returned layer to
    /// your own subscriber instead.
    SetGlobalDefault(tracing_subscriber::util::TryInitError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidEnv { var, value, reason } => {
                write!(
                    f,
                    "invalid value {value:?} in environment variable {var}: {reason}"
                )
            }
            Error::InvalidConfig { setting, reason } => {
                write!(f, "invalid loopwatch setting `{setting}`: {reason}")
            }
            Error::SpawnThread { thread, .. } => {
                write!(f, "could not start loopwatch's `{thread}` thread")
            }
            Error::PrometheusListener { addr, source } => {
                write!(
                    f,
                    "loopwatch's Prometheus listener could not bind {addr}: {source} \
                     (set another address with LOOPWATCH_PROMETHEUS_ADDR, or `off`)"
                )
            }
            Error::Otlp { reason } => {
                write!(f, "loopwatch's OTLP exporter could not be set up: {reason}")
            }
            Error::SetGlobalDefault(_) => {
                write!(
                    f,
                    "could not set loopwatch's subscriber as the global default: one is already \
                     set (by the application or a library). Keep it and add loopwatch's layer \
                     to it instead: `let (layer, guard) = loopwatch::builder().build()?;`, then \
                     `.with(layer)` on your `tracing_subscriber::registry()`"
                )
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::SpawnThread { source, .. } | Error::PrometheusListener { source, .. } => {
                Some(source)
            }
            Error::SetGlobalDefault(e) => Some(e),
            _ => None,
        }
    }
}
