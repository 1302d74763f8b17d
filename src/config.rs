//! Settings, their defaults, and the `LOOPWATCH_*` environment variables.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use crate::Error;

/// Default stall threshold: a poll that holds its worker this long is a stall.
pub const DEFAULT_THRESHOLD: Duration = Duration::from_millis(10);
/// Smallest accepted threshold.
pub const MIN_THRESHOLD: Duration = Duration::from_micros(100);
/// Default threshold of the `blocking` layer: a `spawn_blocking` job that runs this long is a
/// stall of that layer (long jobs are what the pool is for; a stuck one is not).
pub const DEFAULT_BLOCKING_THRESHOLD: Duration = Duration::from_secs(30);
/// Default threshold of the `cpu` layer (a CPU pool's job running this long is a stall).
pub const DEFAULT_CPU_THRESHOLD: Duration = Duration::from_secs(1);
/// Default size limit of tokio's blocking pool (tokio's own default), used for saturation.
pub const DEFAULT_MAX_BLOCKING_THREADS: usize = 512;
/// Largest accepted threshold.
pub const MAX_THRESHOLD: Duration = Duration::from_secs(3600);
/// Smallest accepted watchdog tick.
pub const MIN_TICK: Duration = Duration::from_micros(50);
/// Largest tick the default picks (the default is a quarter of the threshold, within
/// [`MIN_TICK`]..=[`MAX_DEFAULT_TICK`]).
pub const MAX_DEFAULT_TICK: Duration = Duration::from_millis(10);
/// Default: one poll in this many (per worker) is timed exactly for the poll-duration histograms.
pub const DEFAULT_SAMPLE_EVERY: u32 = 64;
/// The largest `sample_every` (a watched future counts its polls in 16 bits, see
/// `probe::watched`).
pub(crate) const MAX_SAMPLE_EVERY: u32 = 1 << 16;
/// Default capacity of the queue of stall reports between the watchdog and the reporter thread.
pub const DEFAULT_REPORT_QUEUE: usize = 1024;
/// Default number of threads that can be watched at once (each gets a slot).
pub const DEFAULT_MAX_THREADS: usize = 1024;
/// Default number of distinct task kinds (name + spawn site) kept apart; the rest become `other`.
pub const DEFAULT_MAX_TASK_KINDS: usize = 512;
/// Default number of live instrumented spans the layer can follow at once (its table grows with
/// them: 1.5 MiB up to 65,536 live spans, about 48 MiB at a million).
pub const DEFAULT_MAX_LIVE_SPANS: usize = 1 << 21;
/// The largest `report_queue` accepted (its slots are allocated at start: about 8 MiB).
pub const REPORT_QUEUE_LIMIT: usize = 16_384;
/// The largest `max_threads` accepted (a slot per thread is allocated at start: about 16 MiB).
pub const MAX_THREADS_LIMIT: usize = 65_536;
/// The largest `max_task_kinds` accepted (the table is allocated at start: about 8 MiB).
pub const MAX_TASK_KINDS_LIMIT: usize = 65_536;
/// Task and span names are kept to this many bytes (cut on a character boundary, ending in
/// `…`): a name is a label on every series of its kind.
pub const MAX_NAME_BYTES: usize = 128;

/// The Prometheus `/metrics` listener keeps at most this many connections open (a new one closes
/// the oldest), so scrape clients can never take the service's file descriptors.
pub const PROMETHEUS_MAX_CONNECTIONS: usize = 16;

/// Default address of the Prometheus `/metrics` listener: loopback only, port 9464 (the port
/// OpenTelemetry's Prometheus exporters use).
pub const DEFAULT_PROMETHEUS_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464));
/// Default interval at which the exporters take loopwatch's figures.
pub const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Environment variable: the Prometheus listener's address (`127.0.0.1:9464`, `0.0.0.0:9464`,
/// `[::1]:9464`), or `off`.
pub const ENV_PROMETHEUS_ADDR: &str = "LOOPWATCH_PROMETHEUS_ADDR";

/// Where loopwatch's metrics go (see the metric table, [`METRICS`](crate::METRICS)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricsExport {
    /// Not exported: only [`Guard::snapshot`](crate::Guard::snapshot) has them.
    Off,
    /// Served in the Prometheus text format at `http://<addr>/metrics` by loopwatch's own
    /// listener, on its own thread (never the watched runtime). Needs the `prometheus` feature
    /// (on by default).
    Prometheus(SocketAddr),
    /// Recorded into the application's own global `metrics` recorder (one set with
    /// `metrics::set_global_recorder`, e.g. its own Prometheus or StatsD exporter), from
    /// loopwatch's export thread.
    GlobalRecorder,
}

impl Default for MetricsExport {
    fn default() -> Self {
        if cfg!(feature = "prometheus") {
            MetricsExport::Prometheus(DEFAULT_PROMETHEUS_ADDR)
        } else {
            MetricsExport::Off
        }
    }
}

/// Environment variable: `1`/`0` turns the OTLP export on or off, whatever the builder and
/// `OTEL_*` variables say.
pub const ENV_OTLP: &str = "LOOPWATCH_OTLP";
/// Default timeout of one OTLP export.
pub const DEFAULT_OTLP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of stall spans waiting for the OTLP exporter; beyond it they are dropped and
/// counted.
pub const DEFAULT_OTLP_SPAN_QUEUE: usize = 1024;

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OtlpProtocol {
    /// gRPC (default port 4317).
    Grpc,
    /// HTTP with protobuf bodies (default port 4318; `/v1/traces` and `/v1/metrics`).
    HttpProtobuf,
}

impl OtlpProtocol {
    /// `grpc` or `http/protobuf`, as in `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// The OTLP export's settings (in [`Config::otlp`] when it is on).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OtlpConfig {
    /// The collector's base address (`http://host:4317` for gRPC, `http://host:4318` for
    /// HTTP, where `/v1/traces` and `/v1/metrics` are added). `None`: the exporter reads
    /// `OTEL_EXPORTER_OTLP_{TRACES_,METRICS_,}ENDPOINT`, else localhost on the protocol's port.
    pub endpoint: Option<String>,
    /// gRPC or HTTP/protobuf.
    pub protocol: OtlpProtocol,
    /// The longest one export may take; then it is abandoned and counted as an error.
    pub timeout: Duration,
    /// Stall spans waiting to be sent, at most; beyond it they are dropped and counted.
    pub span_queue: usize,
    /// With the `otlp-tls` feature: the PEM text of certificates an `https` collector's
    /// certificate may chain to, besides the built-in roots (read from
    /// [`Builder::otlp_ca_certificate`](crate::Builder) or `OTEL_EXPORTER_OTLP_CERTIFICATE`).
    pub ca_certificate_pem: Option<Vec<u8>>,
}

/// Environment variable: stall threshold, a duration such as `10ms`, `250us`, `1.5s`.
pub const ENV_THRESHOLD: &str = "LOOPWATCH_THRESHOLD";
/// Environment variable: watchdog tick, a duration no longer than the threshold.
pub const ENV_TICK: &str = "LOOPWATCH_TICK";
/// Default rate limit of stack captures (per second, with bursts of as many).
pub const DEFAULT_MAX_STACKS_PER_SEC: u32 = 5;

/// Environment variable: `0`/`false`/`off`/`no` turns loopwatch off, `1`/`true`/`on`/`yes` on.
pub const ENV_ENABLE: &str = "LOOPWATCH_ENABLE";
/// Environment variable: time one poll in N exactly (a power of two, 1..=65536).
pub const ENV_SAMPLE_EVERY: &str = "LOOPWATCH_SAMPLE_EVERY";
/// Environment variable: turn diagnosis (cause, hint, stack) off with `0`.
pub const ENV_DIAGNOSE: &str = "LOOPWATCH_DIAGNOSE";
/// Environment variable: turn stack capture off with `0`.
pub const ENV_STACKS: &str = "LOOPWATCH_STACKS";
/// Environment variable: `1` gives stack frames `file:line` and inlined functions from the
/// debug info (see [`Builder::stack_locations`](crate::Builder::stack_locations)).
pub const ENV_STACK_LOCATIONS: &str = "LOOPWATCH_STACK_LOCATIONS";
/// Environment variable: the signal number used to capture stacks (default `SIGRTMIN+6`).
pub const ENV_STACK_SIGNAL: &str = "LOOPWATCH_STACK_SIGNAL";
/// Environment variable: at most this many stack captures per second (0 = none).
pub const ENV_MAX_STACKS_PER_SEC: &str = "LOOPWATCH_MAX_STACKS_PER_SEC";
/// Environment variable: `0` turns victims and schedule delays off (no wake notes in watched
/// futures, no victims from the poll hooks).
pub const ENV_SCHEDULE_DELAY: &str = "LOOPWATCH_SCHEDULE_DELAY";
/// Environment variable: `1` turns on tokio's schedule-latency tracking in
/// `install_poll_hooks` (exact victim waits and the schedule-delay histogram for every task;
/// costs tokio two clock reads per wake and poll). See
/// [`Builder::tokio_schedule_latency`](crate::Builder::tokio_schedule_latency).
pub const ENV_TOKIO_SCHEDULE_LATENCY: &str = "LOOPWATCH_TOKIO_SCHEDULE_LATENCY";

/// The settings loopwatch runs with, after the builder and the environment were applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Is loopwatch on at all.
    pub enabled: bool,
    /// Stall threshold for the async worker layer.
    pub threshold: Duration,
    /// Watchdog tick: how often the watchdog samples every worker.
    pub tick: Duration,
    /// Time one poll in this many exactly (power of two).
    pub sample_every: u32,
    /// Read the clock at every poll start (exact stall start) instead of the watchdog's clock.
    pub precise_start: bool,
    /// Capacity of the stall report queue.
    pub report_queue: usize,
    /// Threads that can be watched at once.
    pub max_threads: usize,
    /// Distinct task kinds kept apart.
    pub max_task_kinds: usize,
    /// Live instrumented spans followed at once.
    pub max_live_spans: usize,
    /// Diagnose stalls (cause and hint from the thread's kernel state; Linux).
    pub diagnose: bool,
    /// Capture the stalled thread's stack (needs `diagnose`; Linux).
    pub stacks: bool,
    /// Frames get `file:line` and inlined functions from the debug info (else names from the
    /// symbol table alone).
    pub stack_locations: bool,
    /// Sample the workers inside polls to find kinds whose short polls, none a stall, keep the
    /// async workers asleep in system calls ("death by a thousand cuts"; needs `diagnose`;
    /// Linux).
    pub thousand_cuts: bool,
    /// The signal used for stack capture; `None` is `SIGRTMIN+6`.
    pub stack_signal: Option<i32>,
    /// At most this many stack captures per second (bursts of as many).
    pub max_stacks_per_sec: u32,
    /// Learn victims and schedule delays: the tasks queued on a stalled worker, from the poll
    /// hooks (`install_poll_hooks`, `tokio_unstable`), and wake notes in
    /// [`Watched`](crate::Watched) futures.
    pub schedule_delay: bool,
    /// With the poll hooks, turn on tokio's schedule-latency tracking (feature
    /// `schedule-delay`): every task's exact wait from wake to poll, for victims' waits and the
    /// schedule-delay histogram. Off by default (it costs tokio two clock reads per wake and
    /// poll); see [`Builder::tokio_schedule_latency`](crate::Builder::tokio_schedule_latency).
    pub tokio_schedule_latency: bool,
    /// A job on tokio's blocking pool that runs this long is a stall of the `blocking` layer.
    pub blocking_threshold: Duration,
    /// The blocking pool's size limit (what the runtime was built with), for saturation.
    pub max_blocking_threads: usize,
    /// A job on a CPU pool ([`Guard::cpu_pool`](crate::Guard), feature `rayon`) that runs this
    /// long is a stall of the `cpu` layer.
    pub cpu_threshold: Duration,
    /// Where the metrics go.
    pub metrics: MetricsExport,
    /// Fail start-up if the Prometheus listener cannot bind its address. Off by default, and
    /// then a busy *default* address ([`DEFAULT_PROMETHEUS_ADDR`]: a second service on the
    /// host) only turns the listener off, with a WARN and
    /// [`Snapshot::prometheus_error`](crate::Snapshot::prometheus_error); any other address
    /// always fails start-up when it cannot be bound.
    pub prometheus_required: bool,
    /// How often the exporters take loopwatch's figures.
    pub export_interval: Duration,
    /// The OTLP export, when it is on.
    pub otlp: Option<OtlpConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: true,
            threshold: DEFAULT_THRESHOLD,
            tick: default_tick(DEFAULT_THRESHOLD),
            sample_every: DEFAULT_SAMPLE_EVERY,
            precise_start: false,
            report_queue: DEFAULT_REPORT_QUEUE,
            max_threads: DEFAULT_MAX_THREADS,
            max_task_kinds: DEFAULT_MAX_TASK_KINDS,
            max_live_spans: DEFAULT_MAX_LIVE_SPANS,
            diagnose: true,
            thousand_cuts: true,
            stacks: true,
            stack_locations: false,
            stack_signal: None,
            max_stacks_per_sec: DEFAULT_MAX_STACKS_PER_SEC,
            schedule_delay: true,
            tokio_schedule_latency: false,
            blocking_threshold: DEFAULT_BLOCKING_THRESHOLD,
            max_blocking_threads: DEFAULT_MAX_BLOCKING_THREADS,
            cpu_threshold: DEFAULT_CPU_THRESHOLD,
            metrics: MetricsExport::default(),
            prometheus_required: false,
            export_interval: DEFAULT_EXPORT_INTERVAL,
            otlp: None,
        }
    }
}

/// The tick used when none is set: a quarter of the threshold, within
/// [`MIN_TICK`]..=[`MAX_DEFAULT_TICK`]. A stall is reported between one and two ticks past
/// the threshold; each tick is a wake-up of the watchdog thread (about 20 µs of CPU on a
/// virtual machine), so a quarter keeps the watchdog under 1 % of a core at the default 10 ms.
pub fn default_tick(threshold: Duration) -> Duration {
    (threshold / 4).clamp(MIN_TICK, MAX_DEFAULT_TICK)
}

/// Values read from the `LOOPWATCH_*` variables; `None` where a variable is unset.
#[derive(Debug, Default)]
pub(crate) struct EnvOverrides {
    pub(crate) enabled: Option<bool>,
    /// Each value with the text it was read from, so range errors can quote it.
    pub(crate) threshold: Option<(Duration, String)>,
    pub(crate) tick: Option<(Duration, String)>,
    pub(crate) sample_every: Option<(u32, String)>,
    pub(crate) diagnose: Option<bool>,
    pub(crate) stacks: Option<bool>,
    pub(crate) stack_locations: Option<bool>,
    pub(crate) schedule_delay: Option<bool>,
    pub(crate) tokio_schedule_latency: Option<bool>,
    pub(crate) stack_signal: Option<i32>,
    pub(crate) max_stacks_per_sec: Option<u32>,
    pub(crate) metrics: Option<MetricsExport>,
    /// `LOOPWATCH_OTLP`.
    pub(crate) otlp: Option<bool>,
    /// The `OTEL_*` variables loopwatch reads itself (the exporter reads the others).
    pub(crate) otel: OtelEnv,
}

/// The OpenTelemetry SDK variables that decide whether and how loopwatch exports OTLP.
#[derive(Debug, Default)]
pub(crate) struct OtelEnv {
    /// An `OTEL_EXPORTER_OTLP_{,TRACES_,METRICS_}ENDPOINT` is set (OTLP is then on by default).
    pub(crate) endpoint_set: bool,
    /// The first of those variables whose endpoint is `https://`, and its value.
    pub(crate) https_endpoint: Option<(&'static str, String)>,
    /// `OTEL_SDK_DISABLED=true`.
    pub(crate) sdk_disabled: bool,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, or why its value was not used. As the OpenTelemetry
    /// specification asks of SDKs, a bad `OTEL_*` value is warned about and its default used
    /// (and only when OTLP is on); it never stops the service.
    pub(crate) protocol: Option<Result<OtlpProtocol, String>>,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`, or why its value was not used.
    pub(crate) timeout: Option<Result<Duration, String>>,
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`: a PEM file of CA certificates (read only with the
    /// `otlp-tls` feature, and only when OTLP is on).
    pub(crate) certificate: Option<String>,
}

impl EnvOverrides {
    /// Reads the process environment.
    pub(crate) fn from_env() -> Result<Self, Error> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// Reads through `lookup`, so tests need not touch the process environment.
    pub(crate) fn from_lookup(
        lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, Error> {
        let get = |var: &'static str| -> Result<Option<String>, Error> {
            match lookup(var) {
                None => Ok(None),
                Some(v) => match v.into_string() {
                    Ok(s) => Ok(Some(s)),
                    Err(raw) => Err(Error::InvalidEnv {
                        var,
                        value: raw.to_string_lossy().into_owned(),
                        reason: "not valid UTF-8".into(),
                    }),
                },
            }
        };
        let bad = |var: &'static str, value: &str, reason: String| Error::InvalidEnv {
            var,
            value: value.to_string(),
            reason,
        };
        let mut out = EnvOverrides::default();
        for (var, slot) in [
            (ENV_ENABLE, &mut out.enabled),
            (ENV_DIAGNOSE, &mut out.diagnose),
            (ENV_STACKS, &mut out.stacks),
            (ENV_STACK_LOCATIONS, &mut out.stack_locations),
            (ENV_SCHEDULE_DELAY, &mut out.schedule_delay),
            (ENV_TOKIO_SCHEDULE_LATENCY, &mut out.tokio_schedule_latency),
        ] {
            if let Some(v) = get(var)? {
                *slot = Some(parse_bool(&v).map_err(|reason| bad(var, &v, reason))?);
            }
        }
        for (var, slot) in [
            (ENV_THRESHOLD, &mut out.threshold),
            (ENV_TICK, &mut out.tick),
        ] {
            if let Some(v) = get(var)? {
                let d = parse_duration(&v).map_err(|reason| bad(var, &v, reason))?;
                *slot = Some((d, v));
            }
        }
        if let Some(v) = get(ENV_STACK_SIGNAL)? {
            let n = v.trim().parse::<i32>().map_err(|e| {
                bad(
                    ENV_STACK_SIGNAL,
                    &v,
                    format!("not a signal number ({e}); expected e.g. 40 (SIGRTMIN+6 on Linux)"),
                )
            })?;
            check_signal(n).map_err(|reason| bad(ENV_STACK_SIGNAL, &v, reason))?;
            out.stack_signal = Some(n);
        }
        if let Some(v) = get(ENV_MAX_STACKS_PER_SEC)? {
            let n = v.trim().parse::<u32>().map_err(|e| {
                bad(
                    ENV_MAX_STACKS_PER_SEC,
                    &v,
                    format!("not a whole number ({e}); expected 0..=1000"),
                )
            })?;
            if n > 1000 {
                return Err(bad(
                    ENV_MAX_STACKS_PER_SEC,
                    &v,
                    "at most 1000 captures per second".into(),
                ));
            }
            out.max_stacks_per_sec = Some(n);
        }
        if let Some(v) = get(ENV_PROMETHEUS_ADDR)? {
            out.metrics = Some(
                parse_prometheus_addr(&v).map_err(|reason| bad(ENV_PROMETHEUS_ADDR, &v, reason))?,
            );
        }
        if let Some(v) = get(ENV_OTLP)? {
            out.otlp = Some(parse_bool(&v).map_err(|reason| bad(ENV_OTLP, &v, reason))?);
        }
        for var in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        ] {
            let v = get(var)?.filter(|v| !v.trim().is_empty());
            if let Some(v) = v {
                out.otel.endpoint_set = true;
                if is_https(&v) && out.otel.https_endpoint.is_none() {
                    out.otel.https_endpoint = Some((var, v));
                }
            }
        }
        if let Some(v) = get("OTEL_EXPORTER_OTLP_CERTIFICATE")? {
            out.otel.certificate = Some(v).filter(|v| !v.trim().is_empty());
        }
        if let Some(v) = get("OTEL_SDK_DISABLED")? {
            out.otel.sdk_disabled = v.trim().eq_ignore_ascii_case("true");
        }
        if let Some(v) = get("OTEL_EXPORTER_OTLP_PROTOCOL")? {
            out.otel.protocol = Some(match v.trim() {
                "grpc" => Ok(OtlpProtocol::Grpc),
                "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
                other => Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL={other:?}: loopwatch exports grpc or \
                     http/protobuf{}; it uses grpc",
                    if other == "http/json" {
                        ", not http/json"
                    } else {
                        ""
                    }
                )),
            });
        }
        if let Some(v) = get("OTEL_EXPORTER_OTLP_TIMEOUT")? {
            out.otel.timeout = Some(v.trim().parse::<u64>().map(Duration::from_millis).map_err(
                |e| {
                    format!(
                        "OTEL_EXPORTER_OTLP_TIMEOUT={v:?}: not a whole number of \
                             milliseconds ({e}); it uses {DEFAULT_OTLP_TIMEOUT:?}"
                    )
                },
            ));
        }
        if let Some(v) = get(ENV_SAMPLE_EVERY)? {
            let n = v.trim().parse::<u32>().map_err(|e| {
                bad(
                    ENV_SAMPLE_EVERY,
                    &v,
                    format!(
                        "not a whole number ({e}); expected a power of two in 1..={MAX_SAMPLE_EVERY}"
                    ),
                )
            })?;
            out.sample_every = Some((n, v));
        }
        Ok(out)
    }
}

/// Which knob a value came from, so range errors name it.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    Setter(&'static str),
    /// The variable and the text it held.
    Env(&'static str, String),
}

impl Source {
    /// `value` is how a setter's value is shown; an environment variable shows its own text.
    pub(crate) fn error(&self, value: String, reason: String) -> Error {
        match self {
            Source::Setter(setting) => Error::InvalidConfig {
                setting,
                reason: format!("{value}: {reason}"),
            },
            Source::Env(var, raw) => Error::InvalidEnv {
                var,
                value: raw.clone(),
                reason,
            },
        }
    }
}

/// Checks the ranges of a finished config. `threshold_src`, `tick_src` and `sample_src` say where
/// each value came from so the error names the right variable or setter.
pub(crate) fn validate(
    cfg: &Config,
    threshold_src: &Source,
    tick_src: &Source,
    sample_src: &Source,
) -> Result<(), Error> {
    if cfg.threshold < MIN_THRESHOLD || cfg.threshold > MAX_THRESHOLD {
        return Err(threshold_src.error(
            format!("{:?}", cfg.threshold),
            format!("the threshold must be between {MIN_THRESHOLD:?} and {MAX_THRESHOLD:?}"),
        ));
    }
    for (setting, t) in [
        ("blocking_threshold", cfg.blocking_threshold),
        ("cpu_threshold", cfg.cpu_threshold),
    ] {
        if !(MIN_THRESHOLD..=MAX_THRESHOLD).contains(&t) {
            return Err(Error::InvalidConfig {
                setting,
                reason: format!("{t:?}: must be between {MIN_THRESHOLD:?} and {MAX_THRESHOLD:?}"),
            });
        }
    }
    if cfg.tick < MIN_TICK {
        return Err(tick_src.error(
            format!("{:?}", cfg.tick),
            format!("the tick must be at least {MIN_TICK:?}"),
        ));
    }
    if cfg.tick > cfg.threshold {
        return Err(tick_src.error(
            format!("{:?}", cfg.tick),
            format!(
                "the tick must not be longer than the threshold ({:?}), or stalls would be seen late",
                cfg.threshold
            ),
        ));
    }
    if !cfg.sample_every.is_power_of_two() || cfg.sample_every > MAX_SAMPLE_EVERY {
        return Err(sample_src.error(
            cfg.sample_every.to_string(),
            format!("expected a power of two in 1..={MAX_SAMPLE_EVERY}"),
        ));
    }
    if let Some(sig) = cfg.stack_signal {
        check_signal(sig).map_err(|reason| Error::InvalidConfig {
            setting: "stack_signal",
            reason: format!("{sig}: {reason}"),
        })?;
    }
    if cfg.max_stacks_per_sec > 1000 {
        return Err(Error::InvalidConfig {
            setting: "max_stacks_per_sec",
            reason: format!(
                "{}: at most 1000 captures per second",
                cfg.max_stacks_per_sec
            ),
        });
    }
    if cfg.export_interval < Duration::from_millis(100) || cfg.export_interval > MAX_EXPORT_INTERVAL
    {
        return Err(Error::InvalidConfig {
            setting: "export_interval",
            reason: format!(
                "{:?}: must be between 100ms and {MAX_EXPORT_INTERVAL:?}",
                cfg.export_interval
            ),
        });
    }
    if let Some(o) = &cfg.otlp {
        if !cfg!(feature = "otlp") {
            return Err(Error::InvalidConfig {
                setting: "otlp",
                reason: "the OTLP export needs loopwatch's `otlp` cargo feature".into(),
            });
        }
        if !cfg!(feature = "otlp-tls") && o.endpoint.as_deref().is_some_and(is_https) {
            return Err(Error::InvalidConfig {
                setting: "otlp_endpoint",
                reason: "an https endpoint needs TLS: build loopwatch with its `otlp-tls` cargo \
                         feature, or use an http:// collector (on the host, or a sidecar)"
                    .into(),
            });
        }
        if o.timeout < Duration::from_millis(100) || o.timeout > MAX_EXPORT_INTERVAL {
            return Err(Error::InvalidConfig {
                setting: "otlp_timeout",
                reason: format!(
                    "{:?}: must be between 100ms and {MAX_EXPORT_INTERVAL:?}",
                    o.timeout
                ),
            });
        }
        if o.span_queue == 0 || o.span_queue > 1 << 20 {
            return Err(Error::InvalidConfig {
                setting: "otlp_span_queue",
                reason: format!("{}: must be between 1 and {}", o.span_queue, 1 << 20),
            });
        }
    }
    if matches!(cfg.metrics, MetricsExport::Prometheus(_)) && !cfg!(feature = "prometheus") {
        return Err(Error::InvalidConfig {
            setting: "metrics",
            reason: "the Prometheus listener needs loopwatch's `prometheus` cargo feature".into(),
        });
    }
    for (setting, v, limit) in [
        ("report_queue", cfg.report_queue, REPORT_QUEUE_LIMIT),
        ("max_threads", cfg.max_threads, MAX_THREADS_LIMIT),
        ("max_task_kinds", cfg.max_task_kinds, MAX_TASK_KINDS_LIMIT),
        ("max_live_spans", cfg.max_live_spans, 1 << 24),
        ("max_blocking_threads", cfg.max_blocking_threads, 1 << 24),
    ] {
        if v == 0 || v > limit {
            return Err(Error::InvalidConfig {
                setting,
                reason: format!("{v}: must be between 1 and {limit}"),
            });
        }
    }
    Ok(())
}

/// A signal loopwatch may use for stack capture: one an application can spare. On Linux that is
/// `SIGUSR1`, `SIGUSR2`, `SIGPROF`, or a real-time signal from `SIGRTMIN` to `SIGRTMAX`; never
/// 32 or 33 (the C library's own: thread cancellation and `setxid`), and never a standard
/// signal whose job is to stop, terminate or report on the process (`SIGTERM`, `SIGINT`,
/// `SIGSEGV`, `SIGCHLD`, ...): loopwatch taking one of those would change what it means.
pub(crate) fn check_signal(n: i32) -> Result<(), String> {
    if !(1..=64).contains(&n) {
        return Err("expected a signal number in 1..=64".into());
    }
    #[cfg(target_os = "linux")]
    {
        let (lo, hi) = (libc::SIGRTMIN(), libc::SIGRTMAX());
        if (lo..=hi).contains(&n) || [libc::SIGUSR1, libc::SIGUSR2, libc::SIGPROF].contains(&n) {
            return Ok(());
        }
        if (32..lo).contains(&n) {
            return Err(format!(
                "reserved by the C library (thread cancellation, setxid); use SIGUSR1, SIGUSR2, \
                 SIGPROF or a real-time signal in {lo}..={hi}"
            ));
        }
        const NAMES: [&str; 31] = [
            "SIGHUP",
            "SIGINT",
            "SIGQUIT",
            "SIGILL",
            "SIGTRAP",
            "SIGABRT",
            "SIGBUS",
            "SIGFPE",
            "SIGKILL",
            "SIGUSR1",
            "SIGSEGV",
            "SIGUSR2",
            "SIGPIPE",
            "SIGALRM",
            "SIGTERM",
            "SIGSTKFLT",
            "SIGCHLD",
            "SIGCONT",
            "SIGSTOP",
            "SIGTSTP",
            "SIGTTIN",
            "SIGTTOU",
            "SIGURG",
            "SIGXCPU",
            "SIGXFSZ",
            "SIGVTALRM",
            "SIGPROF",
            "SIGWINCH",
            "SIGIO",
            "SIGPWR",
            "SIGSYS",
        ];
        let name = usize::try_from(n - 1)
            .ok()
            .and_then(|i| NAMES.get(i))
            .copied()
            .unwrap_or("this signal");
        Err(format!(
            "{name} has a job of its own in a process; use SIGUSR1, SIGUSR2, SIGPROF or a \
             real-time signal in {lo}..={hi}"
        ))
    }
    #[cfg(not(target_os = "linux"))]
    Ok(())
}

/// Does `endpoint` start with `https://` (any case)?
pub(crate) fn is_https(endpoint: &str) -> bool {
    endpoint
        .trim()
        .get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("https://"))
}

#[cfg(feature = "otlp-tls")]
/// The largest CA file read (a full system bundle is about 250 KB).
const MAX_CA_FILE_BYTES: u64 = 4 << 20;

/// Reads a PEM file of CA certificates for an https OTLP collector; the error says what is
/// wrong with it (never a build machine's path: only the one the user gave).
#[cfg(feature = "otlp-tls")]
pub(crate) fn read_ca_pem(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {shown}: {e}"))?;
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE_BYTES + 1)
        .read_to_end(&mut pem)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if pem.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(format!(
            "{shown} is larger than {} MiB: not a CA file",
            MAX_CA_FILE_BYTES >> 20
        ));
    }
    match pem_certificates(&pem) {
        Ok(0) => Err(format!(
            "{shown} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )),
        Ok(_) => Ok(pem),
        Err(e) => Err(format!("{shown} is not valid PEM: {e}")),
    }
}

/// How many certificates a PEM text holds.
#[cfg(feature = "otlp-tls")]
fn pem_certificates(pem: &[u8]) -> Result<usize, String> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| e.to_string())?;
        n += 1;
    }
    Ok(n)
}

/// The longest export interval (and OTLP timeout) accepted.
pub(crate) const MAX_EXPORT_INTERVAL: Duration = Duration::from_secs(300);

/// Parses `LOOPWATCH_PROMETHEUS_ADDR`: a socket address, or `off`.
pub(crate) fn parse_prometheus_addr(s: &str) -> Result<MetricsExport, String> {
    let t = s.trim();
    if matches!(
        t.to_ascii_lowercase().as_str(),
        "off" | "0" | "false" | "no" | "none"
    ) {
        return Ok(MetricsExport::Off);
    }
    t.parse::<SocketAddr>()
        .map(MetricsExport::Prometheus)
        .map_err(|_| {
            let host = t.rsplit_once(':').map_or(t, |(h, _)| h);
            let named = !host.is_empty()
                && host.parse::<std::net::IpAddr>().is_err()
                && !host.starts_with('[');
            if named {
                format!(
                    "`{host}` is a host name, and host names are not resolved: give an IP \
                     address with a port (127.0.0.1:9464, 0.0.0.0:9464, [::1]:9464) or `off`"
                )
            } else {
                "expected an IP address with a port (127.0.0.1:9464, 0.0.0.0:9464, [::1]:9464) \
                 or `off`"
                    .into()
            }
        })
}

/// Parses `1`/`0`, `true`/`false`, `on`/`off`, `yes`/`no` (any case).
pub(crate) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err("expected one of 1, 0, true, false, on, off, yes, no".into()),
    }
}

/// Parses a duration with a unit: `ns`, `us` (or `µs`), `ms`, `s`; decimals allowed (`1.5ms`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    const HELP: &str = "expected a number with a unit: ns, us, ms or s (e.g. 10ms, 250us, 1.5s)";
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("empty; {HELP}"));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("no unit; {HELP}"))?;
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("no number; {HELP}"));
    }
    let nanos_per_unit: f64 = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        other => return Err(format!("unknown unit {other:?}; {HELP}")),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{num:?} is not a number; {HELP}"))?;
    let nanos = value * nanos_per_unit;
    if !nanos.is_finite() || nanos > 1e15 {
        return Err(format!("too large; {HELP}"));
    }
    Ok(Duration::from_nanos(nanos.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn only_signals_an_application_can_spare_take_stacks() {
        for ok in [
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPROF,
            libc::SIGRTMIN(),
            libc::SIGRTMIN() + 6,
            libc::SIGRTMAX(),
        ] {
            assert_eq!(check_signal(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            (32, "C library"),
            (33, "C library"),
            (libc::SIGTERM, "SIGTERM"),
            (libc::SIGINT, "SIGINT"),
            (libc::SIGSEGV, "SIGSEGV"),
            (libc::SIGCHLD, "SIGCHLD"),
            (libc::SIGKILL, "SIGKILL"),
            (0, "1..=64"),
            (65, "1..=64"),
        ] {
            let why = check_signal(bad).unwrap_err();
            assert!(why.contains(says), "{bad}: {why}");
        }
    }

    #[test]
    fn tokio_schedule_latency_is_read_from_its_variable_and_a_bad_value_is_named() {
        let env = |v: &'static str| {
            EnvOverrides::from_lookup(move |name| {
                (name == ENV_TOKIO_SCHEDULE_LATENCY).then(|| v.into())
            })
        };
        assert_eq!(env("1").unwrap().tokio_schedule_latency, Some(true));
        assert_eq!(env("off").unwrap().tokio_schedule_latency, Some(false));
        let bad = env("maybe").unwrap_err().to_string();
        assert!(bad.contains(ENV_TOKIO_SCHEDULE_LATENCY), "{bad}");
        assert!(!Config::default().tokio_schedule_latency);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration(" 250us "), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("100000ns"), Ok(Duration::from_micros(100)));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("ms").unwrap_err().contains("no number"));
        assert!(parse_duration("10 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("1.2.3ms")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_duration("99999999999s")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn prometheus_addr_parses() {
        assert_eq!(
            parse_prometheus_addr(" 127.0.0.1:9000 "),
            Ok(MetricsExport::Prometheus("127.0.0.1:9000".parse().unwrap()))
        );
        assert_eq!(
            parse_prometheus_addr("[::1]:9464"),
            Ok(MetricsExport::Prometheus("[::1]:9464".parse().unwrap()))
        );
        assert_eq!(parse_prometheus_addr("OFF"), Ok(MetricsExport::Off));
        assert!(parse_prometheus_addr("localhost")
            .unwrap_err()
            .contains("with a port"));
        let named = parse_prometheus_addr("localhost:9464").unwrap_err();
        assert!(named.contains("host names are not resolved"), "{named}");
        let no_port = parse_prometheus_addr("127.0.0.1").unwrap_err();
        assert!(no_port.contains("with a port"), "{no_port}");
    }

    #[test]
    fn default_tick_is_a_quarter_of_the_threshold_within_bounds() {
        assert_eq!(
            default_tick(Duration::from_millis(10)),
            Duration::from_micros(2500)
        );
        assert_eq!(default_tick(Duration::from_micros(100)), MIN_TICK);
        assert_eq!(default_tick(Duration::from_secs(10)), MAX_DEFAULT_TICK);
    }
}
