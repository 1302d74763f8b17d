//! The [`Builder`]: setters, the `LOOPWATCH_*` variables on top, validation, and the one-call
//! [`init`](Builder::init) / [`try_init`](Builder::try_init). What the built thing does is the
//! [`Guard`]'s (`guard.rs`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "fmt")]
use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _, Layer as _};

use crate::config::{self, Config, EnvOverrides, Source};
use crate::guard::Guard;
use crate::probe::layer::LoopwatchLayer;
use crate::report::Callback;
use crate::stall::Stall;
use crate::Error;

/// Configures and starts loopwatch. Made by [`builder`](crate::builder).
///
/// Setters give the application's values; `LOOPWATCH_*` environment variables, when set,
/// override them so an operator can retune or turn off loopwatch without a rebuild
/// ([`ignore_env`](Builder::ignore_env) opts out).
#[must_use = "a Builder does nothing until `build`, `init` or `try_init` is called"]
pub struct Builder {
    cfg: Config,
    tick_set: bool,
    use_env: bool,
    callbacks: Vec<Callback>,
    otlp: OtlpChoice,
}

/// What the application said about OTLP; the environment is applied on top in `resolve`.
#[derive(Debug, Clone)]
struct OtlpChoice {
    on: Option<bool>,
    endpoint: Option<String>,
    protocol: Option<crate::OtlpProtocol>,
    timeout: Option<Duration>,
    span_queue: usize,
    /// `otlp_ca_certificate`: a PEM file of CA certificates.
    #[cfg_attr(not(feature = "otlp-tls"), allow(dead_code))]
    ca_certificate: Option<std::path::PathBuf>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("cfg", &self.cfg)
            .field("use_env", &self.use_env)
            .field("callbacks", &self.callbacks.len())
            .finish()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            cfg: Config::default(),
            tick_set: false,
            use_env: true,
            callbacks: Vec::new(),
            otlp: OtlpChoice {
                on: None,
                endpoint: None,
                protocol: None,
                timeout: None,
                span_queue: config::DEFAULT_OTLP_SPAN_QUEUE,
                ca_certificate: None,
            },
        }
    }
}

impl Builder {
    /// A poll that holds an async worker this long is a stall. Default
    /// [`DEFAULT_THRESHOLD`](crate::DEFAULT_THRESHOLD) (10 ms); accepted from
    /// [`MIN_THRESHOLD`](crate::MIN_THRESHOLD) (100 µs) to
    /// [`MAX_THRESHOLD`](crate::MAX_THRESHOLD). Env: `LOOPWATCH_THRESHOLD`.
    pub fn threshold(mut self, threshold: Duration) -> Self {
        self.cfg.threshold = threshold;
        self
    }

    /// How often the watchdog samples the workers. Default: a tenth of the threshold, within
    /// [`MIN_TICK`](crate::MIN_TICK)..=[`MAX_DEFAULT_TICK`](crate::MAX_DEFAULT_TICK); never
    /// longer than the threshold. A stall is reported within one tick of crossing the
    /// threshold. Env: `LOOPWATCH_TICK`.
    pub fn tick(mut self, tick: Duration) -> Self {
        self.cfg.tick = tick;
        self.tick_set = true;
        self
    }

    /// Serves loopwatch's metrics in the Prometheus text format at `http://<addr>/metrics`,
    /// from loopwatch's own thread (never the watched runtime, so a stalled service can still
    /// be scraped). The default is [`DEFAULT_PROMETHEUS_ADDR`](crate::DEFAULT_PROMETHEUS_ADDR)
    /// (`127.0.0.1:9464`) with the `prometheus` feature (on by default); port 0 picks a free
    /// port ([`Guard::prometheus_addr`] tells which). Env: `LOOPWATCH_PROMETHEUS_ADDR`
    /// (`off` turns it off).
    pub fn prometheus_addr(mut self, addr: impl Into<std::net::SocketAddr>) -> Self {
        self.cfg.metrics = crate::MetricsExport::Prometheus(addr.into());
        self
    }

    /// Makes a Prometheus listener that cannot bind its address fail [`build`](Self::build)
    /// even at the default address (where it otherwise only turns the listener off, with a
    /// WARN: a second loopwatch-enabled service on the same host must still start). See
    /// [`Config::prometheus_required`](crate::Config::prometheus_required).
    pub fn require_prometheus(mut self, on: bool) -> Self {
        self.cfg.prometheus_required = on;
        self
    }

    /// Where the metrics go: loopwatch's Prometheus listener (the default), the application's
    /// own global `metrics` recorder, or nowhere (see [`MetricsExport`](crate::MetricsExport)).
    /// `LOOPWATCH_PROMETHEUS_ADDR`, when set, overrides this.
    pub fn metrics(mut self, export: crate::MetricsExport) -> Self {
        self.cfg.metrics = export;
        self
    }

    /// How often the exporters take loopwatch's figures (default 1 s; 100 ms to 5 min). A
    /// scrape sees values at most this old.
    pub fn export_interval(mut self, interval: Duration) -> Self {
        self.cfg.export_interval = interval;
        self
    }

    /// Turns the OTLP export on or off. By default it is on when an
    /// `OTEL_EXPORTER_OTLP_{,TRACES_,METRICS_}ENDPOINT` variable is set (and
    /// `OTEL_SDK_DISABLED` is not `true`), or when [`otlp_endpoint`](Builder::otlp_endpoint) is
    /// called. Env: `LOOPWATCH_OTLP` (`1`/`0`) overrides everything. Needs the `otlp` cargo
    /// feature: without it, turning the export on in code is a named error from
    /// [`build`](Builder::build), and the `OTEL_*` variables are ignored.
    pub fn otlp(mut self, on: bool) -> Self {
        self.otlp.on = Some(on);
        self
    }

    /// Sends OTLP to this collector (and turns the export on): the base address, as in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (`http://collector:4317` for gRPC, `http://collector:4318`
    /// for HTTP, where `/v1/traces` and `/v1/metrics` are added). As with OpenTelemetry's own
    /// SDKs, a value given in code wins over `OTEL_EXPORTER_OTLP_*ENDPOINT`. Needs the `otlp`
    /// cargo feature (see [`otlp`](Builder::otlp)).
    pub fn otlp_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.otlp.endpoint = Some(endpoint.into());
        self
    }

    /// gRPC (the default) or HTTP/protobuf; wins over `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn otlp_protocol(mut self, protocol: crate::OtlpProtocol) -> Self {
        self.otlp.protocol = Some(protocol);
        self
    }

    /// The longest one OTLP export may take (default 10 s; 100 ms to 5 min); wins over
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds).
    pub fn otlp_timeout(mut self, timeout: Duration) -> Self {
        self.otlp.timeout = Some(timeout);
        self
    }

    /// Stall spans waiting for the OTLP exporter, at most (default 1024); beyond it (a collector
    /// down or slow) they are dropped and counted in `loopwatch_export_dropped_total`.
    pub fn otlp_span_queue(mut self, capacity: usize) -> Self {
        self.otlp.span_queue = capacity;
        self
    }

    /// Trusts the CA certificates of this PEM file for an `https` OTLP collector, besides the
    /// built-in roots (Mozilla's, from `webpki-roots`): for a collector whose certificate a
    /// private CA signed. Wins over `OTEL_EXPORTER_OTLP_CERTIFICATE`. The file is read by
    /// `build()`; one that cannot be read, or holds no certificate, is a named error.
    #[cfg(feature = "otlp-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otlp-tls")))]
    pub fn otlp_ca_certificate(mut self, pem_file: impl Into<std::path::PathBuf>) -> Self {
        self.otlp.ca_certificate = Some(pem_file.into());
        self
    }

    /// Turns loopwatch on or off (off: the layer does nothing and no thread starts).
    /// Default on. Env: `LOOPWATCH_ENABLE`.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.cfg.enabled = enabled;
        self
    }

    /// Time one poll in `n` (per thread) exactly for the poll-duration histograms; a power of
    /// two from 1 to 65536. Default [`DEFAULT_SAMPLE_EVERY`](crate::DEFAULT_SAMPLE_EVERY).
    /// Env: `LOOPWATCH_SAMPLE_EVERY`.
    pub fn sample_every(mut self, n: u32) -> Self {
        self.cfg.sample_every = n;
        self
    }

    /// Read the real clock at every poll start, so a stall's start and total are exact instead
    /// of within a tick. Costs one clock read per poll (see `docs/PERFORMANCE.md`). Default off.
    pub fn precise_start(mut self, on: bool) -> Self {
        self.cfg.precise_start = on;
        self
    }

    /// Capacity of the queue between the watchdog and the reporter thread; reports beyond it
    /// are dropped and counted. Default [`DEFAULT_REPORT_QUEUE`](crate::DEFAULT_REPORT_QUEUE),
    /// at most [`REPORT_QUEUE_LIMIT`](crate::REPORT_QUEUE_LIMIT).
    pub fn report_queue(mut self, capacity: usize) -> Self {
        self.cfg.report_queue = capacity;
        self
    }

    /// How many threads can be watched at once. Default
    /// [`DEFAULT_MAX_THREADS`](crate::DEFAULT_MAX_THREADS), at most
    /// [`MAX_THREADS_LIMIT`](crate::MAX_THREADS_LIMIT).
    pub fn max_threads(mut self, n: usize) -> Self {
        self.cfg.max_threads = n;
        self
    }

    /// How many task kinds (name + site) are kept apart; the rest are `other`. Default
    /// [`DEFAULT_MAX_TASK_KINDS`](crate::DEFAULT_MAX_TASK_KINDS), at most
    /// [`MAX_TASK_KINDS_LIMIT`](crate::MAX_TASK_KINDS_LIMIT).
    pub fn max_task_kinds(mut self, n: usize) -> Self {
        self.cfg.max_task_kinds = n;
        self
    }

    /// How many live spans the layer can follow. Default
    /// [`DEFAULT_MAX_LIVE_SPANS`](crate::DEFAULT_MAX_LIVE_SPANS) (2,097,152). Memory grows with
    /// the spans alive at once, 24 bytes an entry: a first table of up to 65,536 entries (1.5
    /// MiB), then tables of twice the size as they are outgrown (about 48 MiB for a million).
    /// A span past the limit is not followed, and is counted (`Snapshot::dropped_spans`).
    pub fn max_live_spans(mut self, n: usize) -> Self {
        self.cfg.max_live_spans = n;
        self
    }

    /// Diagnose each stall: its cause (`cpu`, `syscall(name)`, `starved`) from the stalled
    /// thread's kernel state, and a one-line hint. Default on (Linux; elsewhere the cause is
    /// `unknown`). Env: `LOOPWATCH_DIAGNOSE`.
    pub fn diagnose(mut self, on: bool) -> Self {
        self.cfg.diagnose = on;
        self
    }

    /// Find kinds whose polls, each shorter than the threshold, keep the async workers asleep
    /// in system calls for a large share of their time ("death by a thousand cuts": a handler
    /// that calls `std::thread::sleep(5 ms)`). The watchdog reads one worker inside a poll
    /// every other tick, in turn (at most 200 readings a second at the default tick), and
    /// reports a kind that kept the workers asleep in one call for 10 % of one worker's time
    /// over 10 s. Default on (needs `diagnose`; Linux).
    pub fn thousand_cuts(mut self, on: bool) -> Self {
        self.cfg.thousand_cuts = on;
        self
    }

    /// A job on tokio's blocking pool (run with [`spawn_blocking`](crate::spawn_blocking))
    /// that runs this long is reported as a stall of the `blocking` layer. Default
    /// [`DEFAULT_BLOCKING_THRESHOLD`](crate::DEFAULT_BLOCKING_THRESHOLD) (30 s): long jobs are
    /// what the pool is for; waiting for a thread is the alarm, and is reported whatever this is.
    pub fn blocking_threshold(mut self, threshold: Duration) -> Self {
        self.cfg.blocking_threshold = threshold;
        self
    }

    /// A job on a CPU pool (`Guard::cpu_pool`, feature `rayon`) that runs this long is a stall
    /// of the `cpu` layer (default 1 s). A long CPU job is what the pool is for; one that sits
    /// in a system call is reported as "waiting on a CPU pool".
    pub fn cpu_threshold(mut self, threshold: Duration) -> Self {
        self.cfg.cpu_threshold = threshold;
        self
    }

    /// The blocking pool's size limit, as given to tokio's `max_blocking_threads` (default 512,
    /// tokio's default), so saturation can be reported as a share.
    pub fn max_blocking_threads(mut self, n: usize) -> Self {
        self.cfg.max_blocking_threads = n;
        self
    }

    /// Learn which tasks waited behind each stall ([`Victims`](crate::Victims)) and, where a
    /// probe measures it, each poll's schedule delay (wake to poll) for the schedule-delay
    /// histogram. Default on. With the poll hooks (`tokio_unstable`) a stall's victims are the
    /// tasks queued on its worker when it ended, read from tokio's runtime metrics at its end
    /// and named by the polls that follow on that worker: nothing on the common path of a poll,
    /// but their waits are not measured (see
    /// [`tokio_schedule_latency`](Self::tokio_schedule_latency) for that). On any tokio it makes
    /// [`Watched`](crate::Watched) futures note their wakes (about +17 ns per such poll, and
    /// one allocation per watched future; see docs/PERFORMANCE.md). Env:
    /// `LOOPWATCH_SCHEDULE_DELAY`.
    pub fn schedule_delay(mut self, on: bool) -> Self {
        self.cfg.schedule_delay = on;
        self
    }

    /// With the poll hooks (`tokio_unstable`, feature `schedule-delay`), turn on tokio's own
    /// schedule-latency tracking: every task's exact wait from its wake to its poll, so each
    /// victim's wait is measured and every timed poll feeds the schedule-delay histogram.
    /// Default off: tokio then reads the clock at every wake and every poll, which nearly
    /// quadruples what the hooks cost per poll (about +245 instructions on a tiny poll;
    /// docs/PERFORMANCE.md). Needs [`schedule_delay`](Self::schedule_delay) on. Env:
    /// `LOOPWATCH_TOKIO_SCHEDULE_LATENCY`.
    pub fn tokio_schedule_latency(mut self, on: bool) -> Self {
        self.cfg.tokio_schedule_latency = on;
        self
    }

    /// Capture each stalled thread's stack, mid-stall, with a signal sent to that thread.
    /// Default on (Linux). Env: `LOOPWATCH_STACKS`.
    pub fn stacks(mut self, on: bool) -> Self {
        self.cfg.stacks = on;
        self
    }

    /// Give stack frames `file:line` and the functions inlined into them, from the debug info
    /// of each module (Linux). Default off: frames are named from the symbol table alone,
    /// which a release build without debug info has too, and which costs about 0.5 MiB of heap
    /// and 4 MiB of mapped file pages for a 59 MB test binary, against 9.5 MiB and 37 MiB with
    /// locations (read at the first stack that needs them, once per process; see
    /// docs/PERFORMANCE.md). Env: `LOOPWATCH_STACK_LOCATIONS`.
    pub fn stack_locations(mut self, on: bool) -> Self {
        self.cfg.stack_locations = on;
        self
    }

    /// The signal used for stack capture. Default `SIGRTMIN+6`. If the application already
    /// handles (or ignores) it, loopwatch leaves it alone and captures no stacks (the reason is
    /// in [`Snapshot::stack_setup_error`](crate::Snapshot::stack_setup_error)).
    /// Env: `LOOPWATCH_STACK_SIGNAL`.
    pub fn stack_signal(mut self, signal: i32) -> Self {
        self.cfg.stack_signal = Some(signal);
        self
    }

    /// At most `n` stack captures per second, bursts of as many (0: none); stalls beyond it
    /// are reported without a stack and counted. Default
    /// [`DEFAULT_MAX_STACKS_PER_SEC`](crate::DEFAULT_MAX_STACKS_PER_SEC).
    /// Env: `LOOPWATCH_MAX_STACKS_PER_SEC`.
    pub fn max_stacks_per_sec(mut self, n: u32) -> Self {
        self.cfg.max_stacks_per_sec = n;
        self
    }

    /// Calls `f` with every stall report (once when detected, once when ended, and once more
    /// while it runs if its stack frames were not symbolized in time for the first report), on
    /// loopwatch's reporter thread; [`Stall::id`](crate::Stall::id) ties them together. A slow callback delays only later reports; when the report queue is
    /// full they are dropped and counted. A panic in `f` is caught and counted.
    pub fn on_stall(mut self, f: impl Fn(&Stall) + Send + Sync + 'static) -> Self {
        self.callbacks.push(Arc::new(f));
        self
    }

    /// Do not read `LOOPWATCH_*` environment variables.
    pub fn ignore_env(mut self) -> Self {
        self.use_env = false;
        self
    }

    /// The settings `build` would use (builder values with the environment applied).
    ///
    /// # Errors
    /// A named [`Error`] for any bad value, saying which setter or variable and why.
    pub fn config(&self) -> Result<Config, Error> {
        let env = if self.use_env {
            EnvOverrides::from_env()?
        } else {
            EnvOverrides::default()
        };
        self.resolve(env)
    }

    pub(crate) fn resolve(&self, env: EnvOverrides) -> Result<Config, Error> {
        self.resolve_noting(env).map(|(cfg, _)| cfg)
    }

    /// The config, and the warnings about environment values that were not used (a bad
    /// `OTEL_*` value, an `https` endpoint without TLS): they are said once loopwatch runs.
    pub(crate) fn resolve_noting(&self, env: EnvOverrides) -> Result<(Config, Vec<String>), Error> {
        let mut warnings = Vec::new();
        let mut cfg = self.cfg.clone();
        let mut threshold_src = Source::Setter("threshold");
        let mut tick_src = Source::Setter("tick");
        let mut sample_src = Source::Setter("sample_every");
        if let Some(v) = env.enabled {
            cfg.enabled = v;
        }
        if let Some((v, raw)) = env.threshold {
            cfg.threshold = v;
            threshold_src = Source::Env(config::ENV_THRESHOLD, raw);
        }
        let tick_given = if let Some((v, raw)) = env.tick {
            cfg.tick = v;
            tick_src = Source::Env(config::ENV_TICK, raw);
            true
        } else {
            self.tick_set
        };
        if !tick_given {
            cfg.tick = config::default_tick(cfg.threshold);
        }
        if let Some(v) = env.diagnose {
            cfg.diagnose = v;
        }
        if let Some(v) = env.stacks {
            cfg.stacks = v;
        }
        if let Some(v) = env.stack_locations {
            cfg.stack_locations = v;
        }
        if let Some(v) = env.schedule_delay {
            cfg.schedule_delay = v;
        }
        if let Some(v) = env.tokio_schedule_latency {
            cfg.tokio_schedule_latency = v;
        }
        if let Some(v) = env.stack_signal {
            cfg.stack_signal = Some(v);
        }
        if let Some(v) = env.metrics {
            cfg.metrics = v;
        }
        let o = &self.otlp;
        // The SDK's variables speak to loopwatch only when it can export OTLP.
        let otel = cfg!(feature = "otlp");
        let mut otlp_on = match env.otlp {
            Some(v) => v,
            None if env.otel.sdk_disabled => false,
            None => {
                o.on.unwrap_or(o.endpoint.is_some() || (otel && env.otel.endpoint_set))
            }
        };
        if otlp_on && o.endpoint.is_none() && !cfg!(feature = "otlp-tls") {
            if let Some((var, value)) = &env.otel.https_endpoint {
                // Injected into every pod for the application's own SDK: never a reason for
                // the service not to start.
                warnings.push(format!(
                    "{var}={value}: an https endpoint needs TLS, which this build of loopwatch \
                     lacks (its `otlp-tls` cargo feature); loopwatch's OTLP export is off (the \
                     application's own OpenTelemetry SDK is not affected)"
                ));
                otlp_on = false;
            }
        }
        #[cfg(feature = "otlp-tls")]
        let ca_certificate_pem = if otlp_on {
            ca_certificate(o.ca_certificate.as_deref(), &env.otel, &mut warnings)?
        } else {
            None
        };
        // Only https needs it, and this build exports plain http only.
        #[cfg(not(feature = "otlp-tls"))]
        let ca_certificate_pem = None;
        let env_protocol = env_value(&env.otel.protocol, otlp_on, &mut warnings);
        let env_timeout = env_value(&env.otel.timeout, otlp_on, &mut warnings).filter(|t| {
            let ok = (Duration::from_millis(100)..=config::MAX_EXPORT_INTERVAL).contains(t);
            if !ok && otlp_on {
                warnings.push(format!(
                    "OTEL_EXPORTER_OTLP_TIMEOUT={}: loopwatch takes 100..={} ms; it uses {:?}",
                    t.as_millis(),
                    config::MAX_EXPORT_INTERVAL.as_millis(),
                    config::DEFAULT_OTLP_TIMEOUT
                ));
            }
            ok
        });
        cfg.otlp = otlp_on.then(|| crate::OtlpConfig {
            endpoint: o.endpoint.clone(),
            protocol: o
                .protocol
                .or(env_protocol)
                .unwrap_or(crate::OtlpProtocol::Grpc),
            timeout: o
                .timeout
                .or(env_timeout)
                .unwrap_or(config::DEFAULT_OTLP_TIMEOUT),
            span_queue: o.span_queue,
            ca_certificate_pem,
        });
        if let Some(v) = env.max_stacks_per_sec {
            cfg.max_stacks_per_sec = v;
        }
        if let Some((v, raw)) = env.sample_every {
            cfg.sample_every = v;
            sample_src = Source::Env(config::ENV_SAMPLE_EVERY, raw);
        }
        config::validate(&cfg, &threshold_src, &tick_src, &sample_src)?;
        Ok((cfg, warnings))
    }

    /// Starts the watchdog and returns the layer to add to a `tracing_subscriber::registry()`
    /// and the guard that owns loopwatch's threads (drop it to stop them).
    ///
    /// # Errors
    /// A named [`Error`] for a bad setting or variable, or if a thread could not start.
    pub fn build(self) -> Result<(LoopwatchLayer, Guard), Error> {
        let env = if self.use_env {
            EnvOverrides::from_env()?
        } else {
            EnvOverrides::default()
        };
        let (cfg, warnings) = self.resolve_noting(env)?;
        Guard::start(cfg, self.callbacks, warnings)
    }

    /// Builds loopwatch and sets, as the global default subscriber, a registry with its layer
    /// and a `fmt` layer that prints to stderr, filtered by `RUST_LOG` (a list of `level` and
    /// `target=level`, e.g. `warn,my_app=debug`; default `info`; a value it cannot read is
    /// warned about and `info` used: for span and field filters, build your own subscriber
    /// with tracing-subscriber's `EnvFilter` and [`build`](Builder::build)'s layer), with
    /// loopwatch's reports in one short line each ([`LogFields`](crate::LogFields)); with the
    /// `ansi` feature, in
    /// colour only when stderr is a terminal and `NO_COLOR` is not set (a redirected log gets
    /// no escape codes).
    ///
    /// # Errors
    /// As [`build`](Builder::build), and [`Error::SetGlobalDefault`] if a global subscriber was
    /// already set.
    #[cfg(feature = "fmt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "fmt")))]
    pub fn try_init(self) -> Result<Guard, Error> {
        let (layer, guard) = self.build()?;
        let (filter, rust_log_error) = log_filter(std::env::var("RUST_LOG").ok());
        tracing_subscriber::registry()
            .with(layer)
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(crate::LogFields::default())
                    .with_writer(std::io::stderr)
                    // tracing-subscriber panics (in a debug build) on colour without its
                    // `ansi` feature.
                    .with_ansi(
                        cfg!(feature = "ansi")
                            && colour(
                                std::io::IsTerminal::is_terminal(&std::io::stderr()),
                                std::env::var_os("NO_COLOR"),
                            ),
                    )
                    .with_filter(filter),
            )
            .try_init()
            .map_err(Error::SetGlobalDefault)?;
        if let Some(why) = rust_log_error {
            tracing::warn!(target: "loopwatch", "{why}");
        }
        Ok(guard)
    }

    /// As [`try_init`](Builder::try_init), panicking on error.
    ///
    /// # Panics
    /// If a setting or `LOOPWATCH_*` variable is invalid, a thread cannot start, or a global
    /// subscriber is already set. The panic message is the [`Error`]'s.
    #[cfg(feature = "fmt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "fmt")))]
    pub fn init(self) -> Guard {
        match self.try_init() {
            Ok(g) => g,
            Err(e) => panic!("loopwatch::init failed: {e}"),
        }
    }
}

/// An `OTEL_*` value as read: the value, or (when it was bad) nothing, with the warning kept
/// when it matters (`used`: OTLP is on).
fn env_value<T: Copy>(
    v: &Option<Result<T, String>>,
    used: bool,
    warnings: &mut Vec<String>,
) -> Option<T> {
    match v {
        Some(Ok(v)) => Some(*v),
        Some(Err(why)) => {
            if used {
                warnings.push(why.clone());
            }
            None
        }
        None => None,
    }
}

/// The PEM text of the CA certificates to trust for an https collector: from the setter (a
/// file that cannot be read, or holds no certificate, is an error: the user asked for it),
/// else from `OTEL_EXPORTER_OTLP_CERTIFICATE` (then a warning: the built-in roots are used).
#[cfg(feature = "otlp-tls")]
fn ca_certificate(
    setter: Option<&std::path::Path>,
    otel: &config::OtelEnv,
    warnings: &mut Vec<String>,
) -> Result<Option<Vec<u8>>, Error> {
    if let Some(path) = setter {
        return crate::config::read_ca_pem(path)
            .map(Some)
            .map_err(|reason| Error::InvalidConfig {
                setting: "otlp_ca_certificate",
                reason,
            });
    }
    let Some(path) = &otel.certificate else {
        return Ok(None);
    };
    match crate::config::read_ca_pem(std::path::Path::new(path)) {
        Ok(pem) => Ok(Some(pem)),
        Err(reason) => {
            warnings.push(format!(
                "OTEL_EXPORTER_OTLP_CERTIFICATE={path}: {reason}; loopwatch's OTLP export \
                 trusts only the built-in root certificates"
            ));
            Ok(None)
        }
    }
}

/// Whether `init`'s log lines get colour: on a terminal, unless `NO_COLOR` is set to anything
/// but the empty string (<https://no-color.org>).
/// `init`'s filter from `RUST_LOG`: its `level,target=level` list, or `info` where it is unset,
/// empty or unreadable (then with the words of a warning).
#[cfg(feature = "fmt")]
fn log_filter(rust_log: Option<String>) -> (tracing_subscriber::filter::Targets, Option<String>) {
    use tracing_subscriber::filter::Targets;
    let info = || Targets::new().with_default(tracing::Level::INFO);
    match rust_log.as_deref().map(str::trim) {
        None | Some("") => (info(), None),
        Some(v) => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (
                info(),
                Some(format!(
                    "RUST_LOG={v:?} is not a list of `level` and `target=level` ({e}): logging at \
                     info; for span or field filters, set up your own subscriber with \
                     tracing-subscriber's EnvFilter and loopwatch::builder().build()'s layer"
                )),
            ),
        },
    }
}

#[cfg(feature = "fmt")]
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OtelEnv;

    #[cfg(feature = "fmt")]
    #[test]
    fn init_reads_rust_log_as_a_target_list_and_warns_of_what_it_cannot_read() {
        use tracing::Level;
        let (f, why) = log_filter(None);
        assert!(why.is_none());
        assert!(f.would_enable("anything", &Level::INFO));
        assert!(!f.would_enable("anything", &Level::DEBUG));
        let (f, why) = log_filter(Some("warn,my_app=debug".into()));
        assert!(why.is_none());
        assert!(f.would_enable("my_app::db", &Level::DEBUG));
        assert!(!f.would_enable("loopwatch", &Level::INFO));
        assert!(f.would_enable("loopwatch", &Level::WARN));
        let (f, why) = log_filter(Some("my_app[request{id=7}]=debug".into()));
        assert!(f.would_enable("x", &Level::INFO), "falls back to info");
        let why = why.expect("a warning");
        assert!(
            why.contains("RUST_LOG=") && why.contains("EnvFilter"),
            "{why}"
        );
        let (_, why) = log_filter(Some("  ".into()));
        assert!(why.is_none(), "blank is unset");
    }

    #[cfg(feature = "fmt")]
    #[test]
    fn init_colours_a_terminal_only_and_never_under_no_color() {
        assert!(colour(true, None));
        assert!(
            !colour(false, None),
            "a redirected log gets no escape codes"
        );
        assert!(!colour(true, Some("1".into())));
        assert!(colour(true, Some("".into())), "an empty NO_COLOR is unset");
    }

    fn with_otel(
        otel: OtelEnv,
        loopwatch_otlp: Option<bool>,
    ) -> Result<(Config, Vec<String>), Error> {
        let env = EnvOverrides {
            otel,
            otlp: loopwatch_otlp,
            ..EnvOverrides::default()
        };
        Builder::default().resolve_noting(env)
    }

    fn endpoint(v: &str) -> OtelEnv {
        OtelEnv {
            endpoint_set: true,
            https_endpoint: crate::config::is_https(v)
                .then(|| ("OTEL_EXPORTER_OTLP_ENDPOINT", v.to_string())),
            ..OtelEnv::default()
        }
    }

    #[cfg(feature = "otlp")]
    #[test]
    fn a_bad_otel_value_is_warned_about_and_its_default_used() {
        let otel = OtelEnv {
            protocol: Some(Err("OTEL_EXPORTER_OTLP_PROTOCOL=\"http/json\": ...".into())),
            timeout: Some(Err("OTEL_EXPORTER_OTLP_TIMEOUT=\"10s\": ...".into())),
            ..endpoint("http://collector:4317")
        };
        let (cfg, warnings) = with_otel(otel, None).expect("never an error");
        let otlp = cfg.otlp.expect("the endpoint turns OTLP on");
        assert_eq!(otlp.protocol, crate::OtlpProtocol::Grpc);
        assert_eq!(otlp.timeout, crate::DEFAULT_OTLP_TIMEOUT);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        // An out-of-range timeout too.
        let otel = OtelEnv {
            timeout: Some(Ok(Duration::from_millis(5))),
            ..endpoint("http://collector:4317")
        };
        let (cfg, warnings) = with_otel(otel, None).unwrap();
        assert_eq!(cfg.otlp.unwrap().timeout, crate::DEFAULT_OTLP_TIMEOUT);
        assert!(
            warnings[0].contains("OTEL_EXPORTER_OTLP_TIMEOUT=5"),
            "{warnings:?}"
        );
    }

    #[test]
    fn otel_values_say_nothing_while_otlp_is_off() {
        let otel = OtelEnv {
            protocol: Some(Err("bad".into())),
            ..endpoint("http://collector:4317")
        };
        let (cfg, warnings) = with_otel(otel, Some(false)).expect("never an error");
        assert!(cfg.otlp.is_none());
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[cfg(not(feature = "otlp-tls"))]
    #[test]
    fn an_https_endpoint_from_the_environment_turns_otlp_off_with_a_warning() {
        let (cfg, warnings) = with_otel(endpoint("https://otlp.example:443"), None).unwrap();
        assert!(cfg.otlp.is_none());
        if cfg!(feature = "otlp") {
            assert!(warnings[0].contains("needs TLS"), "{warnings:?}");
        }
    }

    #[cfg(feature = "otlp-tls")]
    #[test]
    fn with_tls_an_https_endpoint_is_exported_to_and_the_ca_file_read() {
        let (cfg, warnings) = with_otel(endpoint("https://otlp.example:443"), None).unwrap();
        assert!(cfg.otlp.is_some(), "{warnings:?}");
        assert!(warnings.is_empty(), "{warnings:?}");
        // A CA file from the environment that holds no certificate: a warning, OTLP stays on.
        let not_pem = std::env::temp_dir().join(format!("lw-unit-not-pem-{}", std::process::id()));
        std::fs::write(
            &not_pem,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let otel = OtelEnv {
            certificate: Some(not_pem.display().to_string()),
            ..endpoint("https://otlp.example:443")
        };
        let (cfg, warnings) = with_otel(otel, None).expect("never an error");
        let otlp = cfg.otlp.expect("still on");
        assert_eq!(otlp.ca_certificate_pem, None);
        assert!(
            warnings[0].contains("OTEL_EXPORTER_OTLP_CERTIFICATE")
                && warnings[0].contains("no PEM certificate"),
            "{warnings:?}"
        );
        // The same file given to the setter: a named error.
        let err = Builder::default()
            .otlp_endpoint("https://otlp.example:443")
            .otlp_ca_certificate(&not_pem)
            .resolve(EnvOverrides::default())
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::InvalidConfig {
                    setting: "otlp_ca_certificate",
                    ..
                }
            ),
            "{err:?}"
        );
        let _ = std::fs::remove_file(not_pem);
    }

    #[cfg(all(feature = "otlp", not(feature = "otlp-tls")))]
    #[test]
    fn an_https_endpoint_given_to_the_setter_is_a_named_error() {
        let err = Builder::default()
            .otlp_endpoint("https://otlp.example:443")
            .resolve(EnvOverrides::default())
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::InvalidConfig {
                    setting: "otlp_endpoint",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[cfg(not(feature = "otlp"))]
    #[test]
    fn without_the_otlp_feature_an_otel_endpoint_is_ignored() {
        let (cfg, warnings) = with_otel(endpoint("http://collector:4317"), None)
            .expect("no error naming a setter the user never called");
        assert!(cfg.otlp.is_none());
        assert!(warnings.is_empty());
    }
}
