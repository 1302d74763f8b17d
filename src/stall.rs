//! The stall record: which task held which worker, for how long, and whether it still does.

use std::fmt;
use std::sync::Arc;

use std::time::{Duration, SystemTime};

use crate::diagnose::{Cause, CauseShare, Frame, Stack};

/// The layer of the service a thread belongs to. The seeds of this project insist the two
/// layers be measured apart: the concurrency layer (async workers, where one long poll delays
/// every task queued behind it) and the parallelism layer (the blocking pool and CPU pools,
/// where long jobs are normal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum LayerKind {
    /// tokio worker threads polling tasks.
    Async = 0,
    /// tokio's blocking pool (`spawn_blocking`). Not watched for stalls yet.
    Blocking = 1,
    /// A CPU pool such as rayon. Not watched yet.
    Cpu = 2,
}

impl LayerKind {
    /// The label used in reports and metrics: `async`, `blocking` or `cpu`.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerKind::Async => "async",
            LayerKind::Blocking => "blocking",
            LayerKind::Cpu => "cpu",
        }
    }

    pub(crate) const fn from_bits(b: u64) -> LayerKind {
        match b {
            1 => LayerKind::Blocking,
            2 => LayerKind::Cpu,
            _ => LayerKind::Async,
        }
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stalled poll's CPU time over the wall time loopwatch sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CpuTime {
    /// CPU time the poll's thread ran.
    pub cpu: Duration,
    /// The wall time that CPU time was measured over.
    pub sampled: Duration,
}

impl CpuTime {
    /// How much the host stretched the poll: sampled wall time over CPU time (1.0: it ran
    /// all the time), if it ran at all.
    pub fn stretch(&self) -> Option<f64> {
        (!self.cpu.is_zero()).then(|| self.sampled.as_secs_f64() / self.cpu.as_secs_f64())
    }
}

/// The task that stalled.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskInfo {
    /// The task's name, if it has one (`tokio::task::Builder::name`, the instrumented span's
    /// name, or the name given to [`watch`](crate::watch)).
    pub name: Option<Arc<str>>,
    /// tokio's task id, when known (`tokio::task::Id`, as a number).
    pub id: Option<u64>,
    /// Where the task was spawned (`file:line:column`, tokio_unstable probes and
    /// [`watch`](crate::watch)) or where its span is declared (`file:line`, stable tracing).
    pub site: Option<Arc<str>>,
    /// The innermost instrumented span entered inside the poll, if it differs from the task's
    /// own (for example the `#[instrument]`ed function a tokio task was running).
    pub span: Option<Arc<str>>,
    /// The site is in a dependency, not the application's code (a server's connection task
    /// spawned inside axum, say): see [`TaskKind::dependency`](crate::TaskKind::dependency).
    pub dependency: bool,
    /// The task had no name, and `name` is the top frame of the application's own code in its
    /// stack ([`Stack::top_user_frame`](crate::Stack::top_user_frame)): what it was running, not
    /// a name it was given.
    pub named_by_stack: bool,
}

/// The thread the stall holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// loopwatch's index of the thread (its slot on the board), stable while the thread lives.
    pub index: usize,
    /// The thread's name (tokio's default is `tokio-runtime-worker`).
    pub thread_name: Option<Arc<str>>,
    /// The OS thread id (Linux `gettid`), `None` on other systems.
    pub tid: Option<u64>,
}

/// Is the stalled poll still running?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StallState {
    /// The poll was still running when this record was made.
    Running,
    /// The poll returned; [`Stall::duration`] is its total.
    Ended,
}

/// One poll that held its worker past the threshold.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Stall {
    /// A number unique to this stall within one [`Guard`](crate::Guard), shared by its
    /// `Running` and `Ended` reports.
    pub id: u64,
    /// The task.
    pub task: TaskInfo,
    /// The worker thread.
    pub worker: WorkerInfo,
    /// The layer the thread belongs to.
    pub layer: LayerKind,
    /// When the poll started: exact with `precise_start`, else the middle of the watchdog tick
    /// it began in (see [`Stall::uncertainty`]).
    pub started_at: SystemTime,
    /// How long the poll had run when this record was made; its total once it has ended.
    pub duration: Duration,
    /// Running or ended.
    pub state: StallState,
    /// The threshold it crossed.
    pub threshold: Duration,
    /// Is `duration` exact at its end? `false` when the poll ended in the instant the watchdog
    /// flagged it and the end was taken from the watchdog's clock (off by at most one tick).
    pub exact_end: bool,
    /// How far `started_at` and `duration` may be from the truth, either way. Zero when the
    /// start and the end were read from the real clock; half a watchdog tick when the start
    /// was the watchdog's clock and the watchdog ran on time; more when a busy host held the
    /// watchdog back, so the tick the poll began in was longer.
    pub uncertainty: Duration,
    /// Why the poll held its worker, from the samples taken so far (all of them once ended).
    pub cause: Cause,
    /// The share of the sampled time each cause took, largest first (a mixed stall has
    /// several).
    pub cause_shares: Vec<CauseShare>,
    /// The poll's own CPU time over the part of the stall loopwatch sampled (from half the
    /// threshold on), where its thread could be read. A poll whose CPU time reached the
    /// threshold is `cpu` whatever else the host did; the wall time past its CPU time is how
    /// much contention stretched it.
    pub cpu: Option<CpuTime>,
    /// One line on what to do about it.
    pub hint: Option<&'static str>,
    /// The stalled thread's stack, captured mid-stall, user frames first.
    pub stack: Option<Arc<Stack>>,
    /// Whether a stack was captured, and if not, why.
    pub stack_status: StackStatus,
    /// The tasks that waited behind it (in its `Ended` report; empty while it runs).
    pub victims: Victims,
    /// The watchdog did not see this poll running past its threshold (it ran between two of
    /// the watchdog's looks, or only a little longer than the threshold): its thread caught it
    /// as it ended, with the real clock. There is no running report and no stack; the start is
    /// known to within half a tick (exactly, if the poll read the real clock).
    pub caught_at_end: bool,
    /// Seen with no probe: a monitored runtime's worker found asleep in a system call inside a
    /// task's poll (its stack says so), with nothing of loopwatch's in the task. The task has
    /// no identity but the frames of its stack.
    pub probe_free: bool,
}

/// The tasks that waited behind a stall on its worker: head-of-line blocking, linked to its
/// cause.
///
/// Found three ways:
/// - with tokio's poll hooks (`--cfg tokio_unstable`, `Guard::install_poll_hooks`), by default:
///   at the stall's end its worker reads how many tasks are queued on it (tokio's runtime
///   metrics), and the polls that follow on that worker, as many, are its victims. Their waits
///   are not measured (`unmeasured`); a task another worker stole meanwhile leaves its place
///   to the next polled there, and one woken into the worker's LIFO slot by a victim can take
///   a queued task's place in the list (the count stays that of the queue);
/// - with the poll hooks and [`tokio_schedule_latency`](crate::Builder::tokio_schedule_latency)
///   (feature `schedule-delay`): tokio times every task from its wake to its poll;
/// - [`Watched`](crate::Watched) futures (`watch`, `spawn`) on any tokio note their wakes.
///
/// With a measured wait, a task polled on the same worker after the stall whose wait
/// overlapped it is a victim, for the overlap. A task stolen by another worker did not wait
/// behind it, and is not counted; a task seen only through a `tracing` span has no known wake
/// and is not counted either. Without any of these probes, `tracked` is false and the rest is
/// empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Victims {
    /// Were victims looked for?
    pub tracked: bool,
    /// How many tasks waited behind the stall.
    pub count: u64,
    /// Of `count`, the tasks found queued on the stalled worker at the stall's end, whose
    /// waits were not measured (the poll hooks without
    /// [`tokio_schedule_latency`](crate::Builder::tokio_schedule_latency)): they are in
    /// `tasks` and `top_kinds` with no wait, and add nothing to `total_wait` or `worst_wait`.
    pub unmeasured: u64,
    /// Their waits behind it, summed.
    pub total_wait: Duration,
    /// The longest of them.
    pub worst_wait: Duration,
    /// The longest waits, longest first (at most 16; the rest are in `count`).
    pub tasks: Vec<Victim>,
    /// The task kinds that waited most often, with how many (at most 5).
    pub top_kinds: Vec<(Arc<str>, u64)>,
}

/// One task that waited behind a stall.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Victim {
    /// Its kind's label (name or spawn site).
    pub kind: Arc<str>,
    /// tokio's task id, when known.
    pub task_id: Option<u64>,
    /// How long it waited while the stall held the worker; zero when it was found queued and
    /// its wait was not measured (see [`Victims::unmeasured`]).
    pub waited: Duration,
}

/// Whether a stall's stack was captured, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StackStatus {
    /// Captured: see [`Stall::stack`].
    Captured,
    /// Turned off (`LOOPWATCH_STACKS=0` or `LOOPWATCH_DIAGNOSE=0`).
    Disabled,
    /// Not possible here: not Linux, or the signal is taken by the application (see
    /// [`Snapshot::stack_setup_error`](crate::Snapshot::stack_setup_error)).
    Unavailable,
    /// Skipped by the rate limit (`max_stacks_per_sec`); counted.
    RateLimited,
    /// The signal could not be sent or the thread did not answer in time; counted.
    Failed,
    /// The thread did not answer within 50 ms (its signal blocked?); counted.
    TimedOut,
    /// Asked for, not in yet: the running report went out at once, and the stack follows in an
    /// update of the same stall (or its ended report says what became of it).
    Pending,
    /// Not captured: the thread was asleep in a system call, and the stack signal would have
    /// interrupted it (a `read` with a timeout, `poll` or `nanosleep` would have failed with
    /// `Interrupted`). The cause names the call; counted.
    InSyscall,
    /// Captured, but loopwatch was still loading the symbol tables (in its first moments, on
    /// its own thread), so the report went out without the frames rather than wait.
    Loading,
    /// None: the poll ended before the watchdog saw it past its threshold (it was caught at
    /// its end, see [`Stall::caught_at_end`]).
    EndedFirst,
}

impl StackStatus {
    /// `captured`, `disabled`, `unavailable`, `rate_limited`, `failed`, `timed_out`,
    /// `in_syscall`, `pending`, `loading` or `ended_first`.
    pub fn as_str(self) -> &'static str {
        match self {
            StackStatus::Captured => "captured",
            StackStatus::Disabled => "disabled",
            StackStatus::Unavailable => "unavailable",
            StackStatus::RateLimited => "rate_limited",
            StackStatus::Failed => "failed",
            StackStatus::TimedOut => "timed_out",
            StackStatus::InSyscall => "in_syscall",
            StackStatus::Pending => "pending",
            StackStatus::Loading => "loading",
            StackStatus::EndedFirst => "ended_first",
        }
    }
}

impl Stall {
    /// A task with no name is named by the top frame of the application's code in its stack,
    /// once it has one (a connection task that axum spawned, seen through the poll hooks, is
    /// then named by the handler that holds the worker).
    pub(crate) fn name_by_stack(&mut self) {
        if self.task.name.is_some() {
            return;
        }
        let top = self.stack.as_ref().and_then(|s| s.top_user_frame());
        if let Some(name) = top.and_then(Frame::function_name) {
            self.task.name = Some(name.into());
            self.task.named_by_stack = true;
        }
    }

    /// The report in one line of about 200 characters, as loopwatch's log event says it: the
    /// task, where (its span, the top frame of its code), how long, the cause (with the
    /// runner-up only when it took a quarter or more of the sampled time), a short hint and
    /// the tasks that waited. The whole report is this `Stall`'s `Display`; every fact is a
    /// field of the event.
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }

    /// The task's label: its name, else its site, else `unknown`.
    pub fn task_label(&self) -> &str {
        self.task
            .name
            .as_deref()
            .or(self.task.site.as_deref())
            .unwrap_or("unknown")
    }
}

/// A stall's report in one line: see [`Stall::summary`].
#[derive(Debug, Clone, Copy)]
pub struct Summary<'a>(&'a Stall);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let state = match s.state {
            StallState::Running if s.probe_free => "running, seen with no probe",
            StallState::Ended if s.probe_free => "ended, seen with no probe",
            StallState::Running => "running",
            StallState::Ended if s.caught_at_end => "caught as it ended",
            StallState::Ended => "ended",
        };
        write!(f, "stall #{} ({state}): task {}", s.id, s.task_label())?;
        // A span is `name (file:line)`: the name says enough here.
        let span = s
            .task
            .span
            .as_deref()
            .map(|sp| sp.split(" (").next().unwrap_or(sp));
        if let Some(span) = span {
            write!(f, " in span {span}")?;
        }
        let top = s.stack.as_ref().and_then(|st| st.top_user_frame());
        if let Some((func, at)) = top.and_then(|t| Some((t.function_name()?, &t.location))) {
            // The function is said unless the task's name says it, or its span does and the
            // location says where (without debug info, the function is all there is).
            let said = s.task.named_by_stack
                || (at.is_some()
                    && span.is_some_and(|sp| func == sp || func.ends_with(&format!("::{sp}"))));
            if !said {
                write!(f, " in {func}")?;
            }
            if let Some(at) = at {
                write!(f, " at {at}")?;
            }
        }
        write!(
            f,
            " held {} worker {} for {:.1?}; cause: {}",
            s.layer, s.worker.index, s.duration, s.cause
        )?;
        let runner_up = s
            .cause_shares
            .iter()
            .filter(|c| c.cause != s.cause)
            .find(|c| c.share >= 0.25);
        if let Some(c) = runner_up {
            write!(f, " ({} {:.0}%)", c.cause, c.share * 100.0)?;
        }
        if let (Cause::Cpu, Some(x)) = (s.cause, s.cpu.and_then(|c| c.stretch())) {
            if x >= 1.5 {
                write!(f, ", stretched x{x:.1}")?;
            }
        }
        if let Some(h) = s.hint {
            write!(f, "; hint: {}", crate::hints::short(h))?;
        }
        let v = &s.victims;
        if v.count > 0 {
            write!(
                f,
                "; {} task{} waited behind it",
                v.count,
                if v.count == 1 { "" } else { "s" },
            )?;
            if v.unmeasured < v.count {
                write!(f, " (worst {:.1?})", v.worst_wait)?;
            } else {
                f.write_str(" (queued on its worker)")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            StallState::Running if self.probe_free => "still running (seen with no probe)",
            StallState::Ended if self.probe_free => "ended (seen with no probe)",
            StallState::Running => "still running",
            StallState::Ended if self.caught_at_end => "ended (caught as it ended)",
            StallState::Ended => "ended",
        };
        write!(
            f,
            "stall #{} on {} worker {}",
            self.id, self.layer, self.worker.index
        )?;
        if let Some(n) = &self.worker.thread_name {
            write!(f, " ({n}")?;
            if let Some(t) = self.worker.tid {
                write!(f, ", tid {t}")?;
            }
            f.write_str(")")?;
        }
        write!(f, ": task {}", self.task_label())?;
        if self.task.named_by_stack {
            f.write_str(" (named by its stack)")?;
        }
        if let Some(id) = self.task.id {
            write!(f, " id={id}")?;
        }
        if let (Some(site), Some(_)) = (&self.task.site, &self.task.name) {
            write!(f, " spawned at {site}")?;
        }
        if self.task.dependency {
            f.write_str(" (in a dependency)")?;
        }
        if let Some(span) = &self.task.span {
            write!(f, " in span {span}")?;
        }
        write!(f, " held the worker for {:.1?}", self.duration)?;
        // Said only when it is more than twice what an on-time watchdog at the default tick
        // leaves (a host that held the watchdog back, or the probe-free path's idle pace).
        if self.uncertainty > self.threshold / 4 {
            write!(f, " (±{:.1?})", self.uncertainty)?;
        }
        write!(
            f,
            " (threshold {:?}), {state}; cause: {}",
            self.threshold, self.cause
        )?;
        if self.cause_shares.len() > 1 {
            f.write_str(" (")?;
            for (i, s) in self.cause_shares.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{} {:.0}%", s.cause, s.share * 100.0)?;
            }
            f.write_str(")")?;
        }
        if let (Cause::Cpu, Some(c)) = (self.cause, self.cpu) {
            // The code needed the CPU it got; say how much the host stretched it.
            if let Some(x) = c.stretch().filter(|&x| x >= 1.2) {
                write!(
                    f,
                    "; {:.1?} of CPU over {:.1?}: contention stretched it x{x:.1}",
                    c.cpu, c.sampled
                )?;
            }
        }
        if let Some(h) = self.hint {
            write!(f, "; hint: {h}")?;
        }
        let v = &self.victims;
        if v.count > 0 {
            write!(
                f,
                "; {} task{} waited behind it (",
                v.count,
                if v.count == 1 { "" } else { "s" },
            )?;
            if v.unmeasured < v.count {
                write!(f, "total {:.1?}, worst {:.1?}", v.total_wait, v.worst_wait)?;
                if v.unmeasured > 0 {
                    write!(f, "; {} more queued, waits not measured", v.unmeasured)?;
                }
            } else {
                f.write_str("queued on its worker, waits not measured")?;
            }
            for (i, (k, n)) in v.top_kinds.iter().enumerate() {
                write!(f, "{}{k}×{n}", if i == 0 { "; " } else { ", " })?;
            }
            f.write_str(")")?;
        }
        if let Some(frame) = self.stack.as_ref().and_then(|s| s.frames.first()) {
            write!(f, "; at {frame}")?;
        }
        Ok(())
    }
}

/// What the watchdog sends: a stall record, and the stack's raw addresses (symbolized off the
/// watchdog, since symbolizing can take milliseconds); or a notice about a pool.
#[derive(Debug)]
// Stall reports are nearly all the traffic: boxing them would add an allocation to each.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Report {
    Stall {
        stall: Stall,
        raw_stack: Option<Arc<[usize]>>,
    },
    Notice(Notice),
}

/// Something wrong with a layer as a whole, not one poll.
#[derive(Debug, Clone)]
pub(crate) enum Notice {
    /// A blocking job waited for a thread of tokio's blocking pool: the pool is full.
    BlockingSaturated {
        /// Where the job was submitted.
        site: Arc<str>,
        waited: Duration,
        running: u64,
        queued: u64,
        max: u64,
        /// Jobs that waited like this since the last notice (notices are rate limited).
        since_last: u64,
    },
    /// Stack capture stopped for good (the stack signal was taken back), and why.
    StacksOff { reason: String },
    /// The Prometheus listener could not start and is off, and why.
    ListenerOff { reason: String },
    /// An environment value was not used, and why.
    EnvIgnored { reason: String },
    /// A poll was a phantom: a span entered with `span.enter()` and held across an `.await`
    /// kept it open on a worker that was in fact parked, or running another task. `stall`:
    /// the running stall it had been reported as, if it got that far.
    Phantom {
        kind: Arc<str>,
        stall: Option<u64>,
        /// Phantoms since the last notice (notices are rate limited), this one included.
        since_last: u64,
    },
    /// Polls of `kind`, none of them a stall, kept the workers asleep in `syscall` for
    /// `asleep` of the last `window` (summed over workers; sampled).
    ThousandCuts {
        kind: Arc<str>,
        layer: LayerKind,
        syscall: Arc<str>,
        asleep: Duration,
        window: Duration,
        hint: &'static str,
        /// One sampled stack of a worker asleep in the call (the probe-free path's samples,
        /// which read it), for the reporter to name the code by its top frame.
        stack: Option<Arc<[usize]>>,
        /// That frame's function, once the reporter symbolized `stack`.
        top_frame: Option<Arc<str>>,
    },
    /// A CPU pool is fed jobs too small to be worth a dispatch.
    #[cfg_attr(not(feature = "rayon"), allow(dead_code))]
    CpuTooFine {
        pool: Arc<str>,
        jobs: u64,
        fine: u64,
        mean: Duration,
    },
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A running stall record with nothing known yet.
    pub(crate) fn stall() -> Stall {
        Stall {
            id: 1,
            task: TaskInfo {
                name: None,
                id: None,
                site: None,
                span: None,
                dependency: false,
                named_by_stack: false,
            },
            worker: WorkerInfo {
                index: 0,
                thread_name: None,
                tid: None,
            },
            layer: LayerKind::Async,
            started_at: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            state: StallState::Running,
            threshold: Duration::from_millis(10),
            exact_end: false,
            uncertainty: Duration::ZERO,
            hint: None,
            cpu: None,
            cause: Cause::Unknown,
            cause_shares: Vec::new(),
            stack: None,
            stack_status: StackStatus::Disabled,
            victims: Victims::default(),
            caught_at_end: false,
            probe_free: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, dependency: bool) -> Frame {
        Frame {
            function: Some(function.into()),
            location: None,
            ip: 1,
            dependency,
        }
    }

    fn with_stack(frames: Vec<Frame>) -> Stall {
        let mut s = tests_support::stall();
        s.stack = Some(Arc::new(Stack { frames, folded: 3 }));
        s
    }

    fn a_full_stall() -> Stall {
        let mut s = with_stack(vec![
            frame("std::thread::sleep", true),
            Frame {
                location: Some("src/report.rs:154".into()),
                ..frame("app::render_report::{{closure}}::{{closure}}", false)
            },
        ]);
        s.id = 12;
        s.state = StallState::Ended;
        s.duration = Duration::from_micros(61_300);
        s.task.name = Some("GET /report".into());
        s.task.id = Some(4411);
        s.task.site = Some("src/main.rs:40:5".into());
        s.task.span = Some("render_report (src/report.rs:149)".into());
        s.worker.thread_name = Some("tokio-runtime-worker".into());
        s.worker.tid = Some(29571);
        s.cause = Cause::Cpu;
        s.cause_shares = vec![
            CauseShare {
                cause: Cause::Starved,
                share: 0.52,
            },
            CauseShare {
                cause: Cause::Cpu,
                share: 0.48,
            },
        ];
        s.cpu = Some(CpuTime {
            cpu: Duration::from_millis(48),
            sampled: Duration::from_millis(100),
        });
        s.hint = Cause::Cpu.hint();
        s.victims = Victims {
            tracked: true,
            count: 37,
            total_wait: Duration::from_millis(900),
            worst_wait: Duration::from_micros(45_200),
            ..Victims::default()
        };
        s
    }

    #[test]
    fn the_summary_says_who_where_how_long_why_and_who_waited_in_one_short_line() {
        let s = a_full_stall();
        let line = s.summary().to_string();
        assert_eq!(
            line,
            "stall #12 (ended): task GET /report in span render_report at src/report.rs:154 \
             held async worker 0 for 61.3ms; cause: cpu (starved 52%), stretched x2.1; hint: \
             move it to spawn_blocking or a CPU pool, or yield; 37 tasks waited behind it \
             (worst 45.2ms)"
        );
        assert!(line.len() <= 250, "{}", line.len());
        // Victims found queued (the poll hooks' default) have no wait to show: none is made up.
        let mut queued = s.clone();
        queued.victims = Victims {
            tracked: true,
            count: 37,
            unmeasured: 37,
            ..Victims::default()
        };
        let line = queued.summary().to_string();
        assert!(
            line.ends_with("; 37 tasks waited behind it (queued on its worker)"),
            "{line}"
        );
        assert!(
            queued
                .to_string()
                .contains("; 37 tasks waited behind it (queued on its worker, waits not measured)"),
            "{queued}"
        );
        // Some measured, some not: the waits are the measured ones', and the rest is said.
        queued.victims.unmeasured = 30;
        queued.victims.worst_wait = Duration::from_millis(45);
        queued.victims.total_wait = Duration::from_millis(200);
        assert!(queued.summary().to_string().ends_with("(worst 45.0ms)"));
        assert!(
            queued.to_string().contains(
                "; 37 tasks waited behind it (total 200.0ms, worst 45.0ms; 30 more queued, \
                 waits not measured)"
            ),
            "{queued}"
        );
        // The common case: no runner-up, no victims.
        let mut plain = s.clone();
        plain.cause_shares.clear();
        plain.cpu = None;
        plain.victims = Victims::default();
        assert!(
            plain.summary().to_string().len() <= 200,
            "{}",
            plain.summary()
        );
        assert!(
            s.to_string().len() > line.len(),
            "the whole report says more"
        );
    }

    #[test]
    fn the_summary_names_the_runner_up_cause_only_when_it_is_material() {
        let mut s = a_full_stall();
        s.cause_shares[0].share = 0.2;
        s.cause_shares[1].share = 0.8;
        s.cpu = None;
        let line = s.summary().to_string();
        assert!(line.contains("; cause: cpu; hint"), "{line}");
        // Without a location, the function is all there is to say where.
        s.stack = Some(Arc::new(Stack {
            frames: vec![frame("app::render_report::{{closure}}", false)],
            folded: 0,
        }));
        let line = s.summary().to_string();
        assert!(
            line.contains("in span render_report in app::render_report held"),
            "{line}"
        );
        s = a_full_stall();
        // The function is said when nothing else names it.
        s.task.span = None;
        let line = s.summary().to_string();
        assert!(
            line.contains("task GET /report in app::render_report at src/report.rs:154 held"),
            "{line}"
        );
        // A task named by its stack is not named twice.
        s.task.name = Some("app::render_report".into());
        s.task.named_by_stack = true;
        let line = s.summary().to_string();
        assert!(
            line.contains("task app::render_report at src/report.rs:154 held"),
            "{line}"
        );
    }

    #[test]
    fn a_task_with_no_name_is_named_by_the_top_frame_of_the_applications_code() {
        let mut s = with_stack(vec![
            frame("serde_json::de::from_str", true),
            frame("app::handlers::report::{{closure}}::{{closure}}", false),
            frame("app::main::{{closure}}", false),
        ]);
        s.task.site = Some("axum-0.8.9/src/serve/mod.rs:389:5".into());
        s.name_by_stack();
        assert_eq!(s.task.name.as_deref(), Some("app::handlers::report"));
        assert!(s.task.named_by_stack);
        let text = s.to_string();
        assert!(
            text.contains("task app::handlers::report (named by its stack) spawned at axum-0.8.9/src/serve/mod.rs:389:5"),
            "{text}"
        );
    }

    #[test]
    fn a_given_name_is_kept_and_a_stack_of_dependencies_names_nothing() {
        let mut s = with_stack(vec![frame("app::report", false)]);
        s.task.name = Some("GET /report".into());
        s.name_by_stack();
        assert_eq!(s.task.name.as_deref(), Some("GET /report"));
        assert!(!s.task.named_by_stack);

        let mut s = with_stack(vec![frame("hyper::proto::h1::dispatch::poll", true)]);
        s.name_by_stack();
        assert_eq!(s.task.name, None);
        let mut s = tests_support::stall();
        s.name_by_stack();
        assert_eq!(s.task.name, None);
    }
}
