//! The [`Guard`]: starts loopwatch's threads from a settled config, owns them, and stops them
//! when dropped; the snapshot, the watched spawns and the runtime helpers hang off it.

use std::fmt;
use std::future::Future;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::board::Board;
use crate::config::Config;
use crate::export::{Exporter, RuntimeProbe};
use crate::probe::layer::{LayerShared, LoopwatchLayer};
use crate::probe::watched::{self, Watched};
use crate::report::{self, Callback};
use crate::shared::Shared;
use crate::snapshot::Snapshot;
use crate::stall::{Report, Stall};
use crate::watchdog::Watchdog;
use crate::Error;

struct Inner {
    shared: Arc<Shared>,
    watchdog: Option<JoinHandle<()>>,
    reporter: Option<JoinHandle<()>>,
}

/// Owns loopwatch's threads. Dropping it stops the watchdog, lets the reporter deliver the
/// reports already queued, and joins both (waiting at most one second for a stuck callback).
#[must_use = "dropping the Guard stops loopwatch"]
pub struct Guard {
    inner: Option<Inner>,
    /// Dropped after `inner` (fields drop in order after `Drop::drop`), so its last export
    /// sees the watchdog's final figures.
    exporter: Option<Exporter>,
    cfg: Config,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("running", &self.inner.is_some())
            .field("exporter", &self.exporter)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Guard {
    /// Starts loopwatch with the settled config `cfg`: the board, the exporters (first, so a
    /// bad Prometheus address or OTLP endpoint fails before any thread starts), the reporter
    /// and the watchdog. Returns the layer and the guard that owns the threads.
    /// `warnings`: environment values that were not used, said once loopwatch runs.
    pub(crate) fn start(
        cfg: Config,
        callbacks: Vec<Callback>,
        warnings: Vec<String>,
    ) -> Result<(LoopwatchLayer, Guard), Error> {
        if !cfg.enabled {
            return Ok((
                LoopwatchLayer::new(None),
                Guard {
                    inner: None,
                    exporter: None,
                    cfg,
                },
            ));
        }
        let mut board = Board::for_config(&cfg);
        board.track_wakes = cfg.schedule_delay;
        let board = Arc::new(board);
        let layer_shared = Arc::new(LayerShared::new(board.clone(), cfg.max_live_spans));
        let shared = Arc::new(Shared::new(
            board.clone(),
            layer_shared.clone(),
            cfg.clone(),
            cfg.metrics != crate::MetricsExport::Off || cfg.otlp.is_some(),
        ));
        for w in warnings {
            shared.env_ignored(w);
        }
        // First, so a bad Prometheus address or OTLP endpoint fails the build before the
        // watchdog starts.
        let (exporter, stall_sink) = match Exporter::start(&shared)? {
            Some((e, s)) => (Some(e), s),
            None => (None, None),
        };
        let (tx, rx) = sync_channel::<Report>(cfg.report_queue);

        let reporter = {
            let shared = shared.clone();
            let mut callbacks = callbacks;
            if let Some(sink) = stall_sink {
                callbacks.push(Arc::new(move |s: &Stall| sink.send(s)));
            }
            std::thread::Builder::new()
                .name("loopwatch-report".into())
                .spawn(move || report::run(shared, rx, callbacks))
                .map_err(|source| Error::SpawnThread {
                    thread: "loopwatch-report",
                    source,
                })?
        };
        let watchdog = {
            let dog = Watchdog::new(shared.clone(), tx);
            std::thread::Builder::new()
                .name("loopwatch-watchdog".into())
                .spawn(move || dog.run())
                .map_err(|source| Error::SpawnThread {
                    thread: "loopwatch-watchdog",
                    source,
                })?
        };
        board.blocking.max_threads.store(
            cfg.max_blocking_threads as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        watched::set_current(&board);
        Ok((
            LoopwatchLayer::new(Some(layer_shared)),
            Guard {
                inner: Some(Inner {
                    shared,
                    watchdog: Some(watchdog),
                    reporter: Some(reporter),
                }),
                exporter,
                cfg,
            },
        ))
    }
}

impl Guard {
    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Is loopwatch running (false when it was turned off)?
    pub fn is_running(&self) -> bool {
        self.inner.is_some()
    }

    /// Counters and histograms as of now. All zero when loopwatch is off.
    pub fn snapshot(&self) -> Snapshot {
        let mut snap = self
            .inner
            .as_ref()
            .map(|i| i.shared.snapshot())
            .unwrap_or_default();
        if let Some(Ok(rts)) = self.exporter.as_ref().map(|e| e.runtimes.lock()) {
            snap.loop_lag = rts
                .iter()
                .map(|r| crate::snapshot::RuntimeLag {
                    runtime: r.name().to_string(),
                    histogram: r.loop_lag(),
                })
                .collect();
        }
        snap
    }

    /// The board this guard watches with (none when it is disabled).
    #[cfg(feature = "tower")]
    pub(crate) fn board(&self) -> Option<std::sync::Arc<crate::board::Board>> {
        self.inner.as_ref().map(|i| i.shared.board.clone())
    }

    /// Watches `future` under `name` with this guard (see [`watch`](crate::watch)).
    #[track_caller]
    pub fn watch<F: Future>(&self, name: &str, future: F) -> Watched<F> {
        Watched::new(
            self.inner.as_ref().map(|i| i.shared.board.clone()),
            name,
            future,
            std::panic::Location::caller(),
        )
    }

    /// Spawns `future` as a task watched under `name` by this guard (see
    /// [`spawn`](crate::spawn)).
    ///
    /// # Panics
    ///
    /// Like `tokio::spawn`, when called outside a tokio runtime.
    #[track_caller]
    pub fn spawn<F>(&self, name: &str, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        crate::probe::watched::spawn_watched(
            self.inner.as_ref().map(|i| i.shared.board.clone()),
            name,
            future,
            std::panic::Location::caller(),
        )
    }

    /// Runs `f` on tokio's blocking pool, watched by this guard (see
    /// [`spawn_blocking`](crate::spawn_blocking)).
    #[track_caller]
    pub fn spawn_blocking<F, R>(&self, f: F) -> tokio::task::JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        crate::probe::blocking::spawn(
            self.inner.as_ref().map(|i| i.shared.board.clone()),
            f,
            std::panic::Location::caller(),
        )
    }

    /// Builds a rayon pool whose jobs loopwatch watches on the `cpu` layer (feature `rayon`):
    /// job durations, too-fine jobs (under 50 µs: "batch these"), and jobs that wait in system
    /// calls. Run jobs with [`CpuPool::spawn`](crate::CpuPool::spawn) and
    /// [`CpuPool::install`](crate::CpuPool::install).
    ///
    /// # Errors
    /// rayon's, if the pool cannot be built.
    #[cfg(feature = "rayon")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rayon")))]
    #[track_caller]
    pub fn cpu_pool(
        &self,
        name: &str,
        builder: rayon::ThreadPoolBuilder,
    ) -> Result<crate::CpuPool, rayon::ThreadPoolBuildError> {
        let site = std::panic::Location::caller();
        let pool = builder.build()?;
        let (pool, stats) = crate::CpuPool::new(
            self.inner.as_ref().map(|i| i.shared.board.clone()),
            name,
            pool,
            site,
        );
        if let Some(i) = &self.inner {
            if let Ok(mut pools) = i.shared.cpu_pools.lock() {
                pools.push(stats);
            }
        }
        Ok(pool)
    }

    /// Installs tokio's poll hooks on a runtime builder, so every task on that runtime is
    /// watched with no span at all (the cheapest probe). Requires `--cfg tokio_unstable`.
    ///
    /// ```ignore
    /// let mut rt = tokio::runtime::Builder::new_multi_thread();
    /// guard.install_poll_hooks(rt.enable_all());
    /// let rt = rt.build()?;
    /// ```
    #[cfg(tokio_unstable)]
    #[cfg_attr(docsrs, doc(cfg(tokio_unstable)))]
    pub fn install_poll_hooks<'a>(
        &self,
        builder: &'a mut tokio::runtime::Builder,
    ) -> &'a mut tokio::runtime::Builder {
        match &self.inner {
            Some(i) => crate::probe::hooks::install(
                &i.shared.board,
                builder,
                self.cfg.schedule_delay,
                self.cfg.tokio_schedule_latency,
            ),
            None => builder,
        }
    }

    /// The address loopwatch's Prometheus listener serves `/metrics` on (with port 0 resolved
    /// to the port it got), or `None` when it does not run.
    pub fn prometheus_addr(&self) -> Option<std::net::SocketAddr> {
        self.exporter.as_ref().and_then(|e| e.prometheus_addr)
    }

    /// Exports `runtime`'s own figures (from `tokio-metrics`' `RuntimeMonitor` and tokio's
    /// per-worker busy time) as `loopwatch_runtime_*` metrics labelled `runtime="<name>"`:
    /// workers, alive tasks, global queue depth, busy ratio (total and per worker), parks, and
    /// with `--cfg tokio_unstable` the blocking pool, local queues, steals and forced yields.
    /// Sampled on loopwatch's export thread, never on the runtime itself.
    ///
    /// Also measures the runtime's **loop lag**: every 25 ms the export thread spawns one tiny
    /// heartbeat task on it (never more than one waiting) and records the time from spawn to
    /// first poll (`loopwatch_loop_lag_seconds`, [`Snapshot::loop_lag`]): it stays near zero
    /// while a worker is free and grows by the length of a stall that holds them all.
    ///
    /// Does nothing when nothing is exported (no export thread runs). A second call with the
    /// same name replaces the first.
    pub fn monitor_runtime(&self, runtime: &tokio::runtime::Handle, name: &str) {
        if let Some(i) = &self.inner {
            if i.shared.cfg.diagnose {
                i.shared.bare.add_runtime(name, runtime.clone());
            }
        }
        let Some(e) = &self.exporter else { return };
        let threads = e
            .threads
            .lock()
            .ok()
            .and_then(|t| t.iter().find(|(n, _)| n == name).map(|(_, c)| c.clone()));
        let probe = RuntimeProbe::new(runtime, name, threads);
        if let Ok(mut rts) = e.runtimes.lock() {
            rts.retain(|r| r.name() != name);
            rts.push(probe);
        }
    }

    /// A counter of the threads of the runtime that [`monitor_runtime`](Self::monitor_runtime)
    /// will watch under `name`: call its [`started`](crate::ThreadCounter::started) and
    /// [`stopped`](crate::ThreadCounter::stopped) from the runtime's `on_thread_start` and
    /// `on_thread_stop`. On stable tokio this is how loopwatch sees the runtime's blocking
    /// pool (`loopwatch_runtime_blocking_threads`), tokio's own blocking work included; under
    /// `--cfg tokio_unstable` tokio's own count is exported instead. A second call with the
    /// same name replaces the first.
    pub fn thread_counter(&self, name: &str) -> crate::ThreadCounter {
        let counter = crate::ThreadCounter::default();
        if let Some(e) = &self.exporter {
            if let Ok(mut t) = e.threads.lock() {
                t.retain(|(n, _)| n != name);
                t.push((name.to_string(), counter.clone()));
            }
            if let Ok(mut rts) = e.runtimes.lock() {
                for r in rts.iter_mut().filter(|r| r.name() == name) {
                    r.set_threads(counter.clone());
                }
            }
        }
        counter
    }

    /// [`thread_counter`](Self::thread_counter) installed as the builder's `on_thread_start`
    /// and `on_thread_stop`, and [`park_hook`](Self::park_hook) as its `on_thread_park`, for a
    /// runtime that has none of its own (tokio keeps one of each: these replace callbacks set
    /// before, and are replaced by ones set after).
    ///
    /// ```
    /// # let guard = loopwatch::builder().ignore_env().metrics(loopwatch::MetricsExport::Off).build().unwrap().1;
    /// let mut builder = tokio::runtime::Builder::new_multi_thread();
    /// guard.count_threads(&mut builder, "api");
    /// let rt = builder.enable_all().build().unwrap();
    /// guard.monitor_runtime(rt.handle(), "api");
    /// ```
    pub fn count_threads<'a>(
        &self,
        builder: &'a mut tokio::runtime::Builder,
        name: &str,
    ) -> &'a mut tokio::runtime::Builder {
        self.thread_counter(name)
            .install(builder)
            .on_thread_park(self.park_hook())
            .on_thread_unpark(self.unpark_hook())
    }

    /// A callback for the runtime's `on_thread_park` (call it from yours, if you have one;
    /// [`count_threads`](Self::count_threads) installs it). A worker about to park runs no
    /// poll, so a poll loopwatch still sees open on it is a phantom (a span entered with
    /// `span.enter()` and held across an `.await`): it is ended there, never reported as a
    /// stall. Without it, loopwatch tells such a phantom only where it can read the worker's
    /// state (Linux): asleep in the I/O driver's `epoll_wait`, or when another task's poll
    /// starts on that worker.
    ///
    /// With [`unpark_hook`](Self::unpark_hook) too, the probe-free path (see
    /// [`monitor_runtime`](Self::monitor_runtime)) knows when a worker is not parked, and then
    /// counts one asleep in `futex` (a `std::sync::Mutex`, a condition variable) as blocked.
    pub fn park_hook(&self) -> impl Fn() + Send + Sync + 'static {
        let shared = self.inner.as_ref().map(|i| i.shared.clone());
        move || {
            if let Some(s) = &shared {
                s.board.parked();
                s.bare.set_parked(true);
            }
        }
    }

    /// A callback for the runtime's `on_thread_unpark` (call it from yours, if you have one;
    /// [`count_threads`](Self::count_threads) installs it): with
    /// [`park_hook`](Self::park_hook), it tells the probe-free path a worker is at work, so a
    /// worker asleep in `futex` then (a lock held elsewhere) is a stall it reports.
    pub fn unpark_hook(&self) -> impl Fn() + Send + Sync + 'static {
        let shared = self.inner.as_ref().map(|i| i.shared.clone());
        move || {
            if let Some(s) = &shared {
                s.bare.set_parked(false);
            }
        }
    }

    /// Loads the program's symbol tables now, on a thread of loopwatch's own, and waits up to
    /// `timeout` for them. Without this call they are read at the first stack (nothing is
    /// read before a stall needs it), and that first report goes out without frames (stack
    /// status `loading`) and is sent once more with them. Returns whether they are loaded. A
    /// service that wants frames in its very first reports can call this once at start-up.
    pub fn wait_for_symbols(&self, timeout: Duration) -> bool {
        let locations = self.config().stack_locations;
        crate::diagnose::symbols::wait_for_symbols(timeout, locations)
    }

    /// Stops loopwatch now (the same as dropping the guard).
    pub fn shutdown(self) {}
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(mut inner) = self.inner.take() else {
            return;
        };
        inner
            .shared
            .stop
            .store(true, std::sync::atomic::Ordering::Release);
        watched::clear_current(&inner.shared.board);
        if let Some(w) = inner.watchdog.take() {
            w.thread().unpark();
            let _ = w.join();
        }
        // The watchdog has dropped the sending side: the reporter ends after the queue.
        if let Some(r) = inner.reporter.take() {
            crate::export::join_within(r, Duration::from_secs(1));
        }
    }
}
