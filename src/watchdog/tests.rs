//! The decision core on a scripted clock, scripted slots and scripted kernel readings: each test
//! is one rule, with no thread, no sleep and no real time, so it gives the same answer on any
//! host however loaded.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::core::{Core, SlotPort};
use super::pace::{Pacer, Step, DEEP_SLEEP};
use crate::board::{Board, Caught, Record, SlotRead, ThreadMeta, CLOCK_UNKNOWN};
use crate::config::Config;
use crate::diagnose::ports::{Kernel, RequestError, StackPort};
use crate::diagnose::sampler::Sampler;
use crate::diagnose::verdict::{Activity, Reading};
use crate::diagnose::{Cause, CpuQuota, Syscall};
use crate::probe::layer::LayerShared;
use crate::shared::Shared;
use crate::stall::{LayerKind, Notice, Report, StackStatus, Stall, StallState};
use crate::words::{CulpritWord, Measure};

const MS: u64 = 1_000_000;
const THRESHOLD: u64 = 10 * MS;
const TID: u64 = 4242;

// --- scripted ports ------------------------------------------------------------------------

/// A slot whose owner the test plays: it starts and ends polls by hand.
struct FakeSlot {
    read: Cell<SlotRead>,
    slow: Cell<u64>,
    flagged: Cell<Option<u64>>,
    end_exact: Cell<u64>,
    end_coarse: Cell<u64>,
    phantom: Cell<u64>,
    caught: Cell<Option<Caught>>,
    tid: u64,
    records: RefCell<Vec<Record>>,
}

impl FakeSlot {
    fn new(tid: u64) -> FakeSlot {
        FakeSlot {
            read: Cell::new(SlotRead {
                seq: 0,
                stable: true,
                word: CulpritWord::NONE,
                task: 0,
                named: CulpritWord::NONE,
                inner: CulpritWord::NONE,
                start_ns: 0,
            }),
            slow: Cell::new(0),
            flagged: Cell::new(None),
            end_exact: Cell::new(0),
            end_coarse: Cell::new(0),
            phantom: Cell::new(0),
            caught: Cell::new(None),
            tid,
            records: RefCell::new(Vec::new()),
        }
    }

    /// A poll of `word` (task `task`) starts, having read `start_ns` from the board's clock.
    fn start(&self, word: CulpritWord, task: u64, start_ns: u64) {
        let mut r = self.read.get();
        r.seq |= 1;
        r.word = word;
        r.task = task;
        r.named = word;
        r.start_ns = start_ns;
        self.read.set(r);
    }

    /// The poll ends; `coarse` is the board's clock it read then.
    fn end(&self, coarse: u64) {
        let mut r = self.read.get();
        // The worker stores its exact end only if the watchdog flagged this very poll.
        if self.flagged.get() != Some(r.seq) {
            self.end_exact.set(0);
        }
        self.end_coarse.set(coarse);
        r.seq = (r.seq | 1) + 1;
        self.read.set(r);
    }

    /// The poll ends and its thread saw the flag: it read the real clock, `exact_ns`.
    fn end_exactly(&self, exact_ns: u64) {
        self.end_exact.set(exact_ns);
        self.end(exact_ns);
    }

    fn seq(&self) -> u64 {
        self.read.get().seq
    }

    /// The owner publishes the poll in progress as caught, ending at `end_ns` (as if it had
    /// not seen the flag).
    fn publish_caught(&self, end_ns: u64) {
        let r = self.read.get();
        self.caught.set(Some(Caught {
            seq: r.seq,
            word: r.word,
            named: r.named,
            task: r.task,
            start_ns: r.start_ns,
            end_ns,
        }));
    }

    /// The poll ends at `end_ns` (real clock) as the board's owner ends it: a poll the
    /// watchdog did not flag, whose end less its start (judged as the board judges it, for a
    /// clock of `tick_ns` resolution) reaches `threshold_ns`, is caught.
    fn end_as_owner(&self, end_ns: u64, tick_ns: u64, threshold_ns: u64) {
        let r = self.read.get();
        if self.flagged.get() != Some(r.seq)
            && end_ns.saturating_sub(crate::board::caught_from(r.start_ns, tick_ns)) >= threshold_ns
        {
            self.publish_caught(end_ns);
        }
        self.end(end_ns);
    }

    /// The probe hands the watchdog a schedule delay: task `task` of `word` waited `waited_ns`
    /// before its poll that started at `start_ns`.
    fn push_wait(&self, word: CulpritWord, task: u64, waited_ns: u64, start_ns: u64) {
        self.records.borrow_mut().push(Record {
            word,
            measure: Measure::wait(waited_ns, false),
            start: start_ns,
            task,
        });
    }

    /// A poll the worker noted as queued behind the stall that began at `stall_start_ns` (the
    /// poll hooks' default: its wake is not known).
    fn push_queued(&self, word: CulpritWord, task: u64, stall_start_ns: u64, start_ns: u64) {
        self.records.borrow_mut().push(Record {
            word,
            measure: Measure::queued(start_ns - stall_start_ns),
            start: start_ns,
            task,
        });
    }
}

impl SlotPort for FakeSlot {
    fn read(&self) -> SlotRead {
        self.read.get()
    }
    fn slow_polls(&self) -> u64 {
        self.slow.get()
    }
    fn flag(&self, seq: u64) {
        self.flagged.set(Some(seq));
    }
    fn flagged_end_ns(&self) -> u64 {
        self.end_exact.get()
    }
    fn end_coarse_ns(&self) -> u64 {
        self.end_coarse.get()
    }
    fn meta(&self) -> Option<ThreadMeta> {
        Some(ThreadMeta {
            name: Some("worker".into()),
            tid: Some(self.tid),
        })
    }
    fn drain(&self, f: &mut dyn FnMut(Record)) {
        for r in self.records.borrow_mut().drain(..) {
            f(r);
        }
    }
    fn mark_phantom(&self, seq: u64) {
        self.phantom.set(seq);
    }
    fn marked_phantom(&self) -> u64 {
        self.phantom.get()
    }
    fn caught(&self) -> Option<Caught> {
        self.caught.get()
    }
}

/// A thread's kernel state as the test sets it: what it does now, and how fast its CPU clock
/// runs against wall time (1.0: on a CPU all the time).
#[derive(Clone, Copy)]
struct ThreadScript {
    activity: Activity,
    cpu_per_wall: f64,
}

/// A kernel that answers from the scripts, integrating each thread's CPU clock over the board
/// time of the readings.
#[derive(Default)]
struct ScriptedKernel {
    scripts: HashMap<u64, ThreadScript>,
    /// A thread's cgroup: its quota and throttled time so far (set by the test, as the kernel
    /// adds it: when the group may run again).
    throttle: HashMap<u64, (CpuQuota, u64)>,
    /// (tid, at_ns) of every reading taken, and the threads of every peek.
    reads: Vec<(u64, u64)>,
    peeks: Vec<u64>,
    opened: Vec<u64>,
}

#[derive(Debug)]
struct Followed {
    tid: u64,
    cpu_ns: f64,
    last_ns: Option<u64>,
}

impl Kernel for ScriptedKernel {
    type Thread = Followed;

    fn open(&mut self, tid: u64) -> Followed {
        self.opened.push(tid);
        Followed {
            tid,
            cpu_ns: 0.0,
            last_ns: None,
        }
    }

    fn read(&mut self, t: &mut Followed, at_ns: u64) -> Option<Reading> {
        let s = *self.scripts.get(&t.tid)?;
        if let Some(last) = t.last_ns {
            t.cpu_ns += at_ns.saturating_sub(last) as f64 * s.cpu_per_wall;
        }
        t.last_ns = Some(at_ns);
        self.reads.push((t.tid, at_ns));
        Some(Reading {
            at_ns,
            cpu_ns: Some(t.cpu_ns as u64),
            activity: s.activity,
        })
    }

    fn throttle(&mut self, t: &mut Followed) -> Option<(u64, CpuQuota)> {
        self.throttle.get(&t.tid).map(|&(q, ns)| (ns, q))
    }

    fn peek(&mut self, t: &mut Followed) -> Option<Activity> {
        self.peeks.push(t.tid);
        self.scripts.get(&t.tid).map(|s| s.activity)
    }

    fn asleep_at(&mut self, t: &mut Followed) -> Option<(i64, u64, u64)> {
        self.peeks.push(t.tid);
        match self.scripts.get(&t.tid)?.activity {
            // One place per call: the same code sleeping at the same depth.
            Activity::Syscall(nr) => Some((nr, 0x7000 + nr as u64, 0x4000)),
            _ => None,
        }
    }

    fn threads_named(&mut self, _names: &[Arc<str>]) -> Vec<u64> {
        Vec::new()
    }
}

/// A stack capture the test answers by hand.
#[derive(Default)]
struct ScriptedStacks {
    busy: bool,
    refuse_busy: bool,
    /// The application took the signal back.
    taken: bool,
    /// The thread is asleep in a system call when the signal would go.
    asleep: bool,
    /// Its stack read without a signal, if that works.
    asleep_stack: Option<Vec<usize>>,
    /// Stacks read without a signal so far.
    unwinds: usize,
    next_ticket: u64,
    /// Tickets asked for, by thread.
    requests: Vec<(u64, u64)>,
    /// Captures that came in, by ticket.
    captured: HashMap<u64, Vec<usize>>,
    cancelled: Vec<u64>,
}

impl StackPort for ScriptedStacks {
    fn busy(&self) -> bool {
        self.busy
    }
    fn request(&mut self, tid: u64, _sig: i32) -> Result<u64, RequestError> {
        if self.refuse_busy {
            return Err(RequestError::Busy);
        }
        if self.taken {
            return Err(RequestError::SignalTaken);
        }
        if self.asleep {
            return Err(RequestError::Asleep);
        }
        self.next_ticket += 1;
        self.requests.push((tid, self.next_ticket));
        Ok(self.next_ticket)
    }
    fn take(&mut self, ticket: u64) -> Option<Vec<usize>> {
        self.captured.remove(&ticket)
    }
    fn cancel(&mut self, ticket: u64) {
        self.cancelled.push(ticket);
    }
    fn unwind_asleep(&mut self, _tid: u64) -> Option<Vec<usize>> {
        self.unwinds += 1;
        self.asleep_stack.clone()
    }
}

// --- the rig -------------------------------------------------------------------------------

fn config(f: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = crate::builder()
        .ignore_env()
        .threshold(Duration::from_nanos(THRESHOLD))
        .tick(Duration::from_millis(1))
        .metrics(crate::MetricsExport::Off)
        .config()
        .expect("a valid config");
    cfg.stacks = false;
    // The thousand-cuts sampling reads the kernel too: off, except where tested.
    cfg.thousand_cuts = false;
    f(&mut cfg);
    cfg
}

struct Rig {
    core: Core<ScriptedKernel, ScriptedStacks>,
    shared: Arc<Shared>,
    word: CulpritWord,
}

fn rig(cfg: Config) -> Rig {
    rig_with(cfg, Err(StackStatus::Disabled))
}

fn rig_with(cfg: Config, stacks: Result<i32, StackStatus>) -> Rig {
    let board = Arc::new(Board::for_config(&cfg));
    let layer = Arc::new(LayerShared::new(board.clone(), 64));
    let shared = Arc::new(Shared::new(board.clone(), layer, cfg.clone(), false));
    let sampler = Sampler::with_stacks(&cfg, stacks);
    let kind = board.kinds.intern(Some("hog"), Some(("src/hog.rs", 7, 1)));
    Rig {
        core: Core::new(
            shared.clone(),
            sampler,
            ScriptedKernel::default(),
            ScriptedStacks::default(),
        ),
        shared,
        word: CulpritWord::kind(kind, LayerKind::Async, true),
    }
}

impl Rig {
    fn tick(&mut self, now: u64, slots: &[FakeSlot]) -> bool {
        self.core.tick(now, slots)
    }

    /// Ticks every millisecond from `from` to `to` (both included).
    fn ticks(&mut self, from_ms: u64, to_ms: u64, slots: &[FakeSlot]) {
        for t in from_ms..=to_ms {
            self.tick(t * MS, slots);
        }
    }

    /// A poll of `self.word` (task 7) on thread `TID` that read the clock at 0.5 ms, was first
    /// seen at 1 ms and is flagged at 11 ms: its slot, ticked to 11 ms.
    fn stalled(&mut self) -> [FakeSlot; 1] {
        let slot = [FakeSlot::new(TID)];
        slot[0].start(self.word, 7, MS / 2);
        self.ticks(1, 11, &slot);
        slot
    }

    /// Ticks `slot` (stalled by [`stalled`](Self::stalled)) on to `end_ms`, where its poll ends
    /// exactly; the ended report (the running one is dropped).
    fn run_to_end(&mut self, slot: &[FakeSlot; 1], end_ms: u64) -> Stall {
        self.ticks(12, end_ms, slot);
        slot[0].end_exactly(end_ms * MS);
        self.tick((end_ms + 1) * MS, slot);
        self.stalls()
            .into_iter()
            .rfind(|s| s.state == StallState::Ended)
            .expect("the ended report")
    }

    fn stalls(&mut self) -> Vec<Stall> {
        self.core
            .out
            .drain(..)
            .filter_map(|r| match r {
                Report::Stall { stall, .. } => Some(stall),
                Report::Notice(_) => None,
            })
            .collect()
    }

    fn script(&mut self, tid: u64, activity: Activity, cpu_per_wall: f64) {
        self.core.kernel_mut().scripts.insert(
            tid,
            ThreadScript {
                activity,
                cpu_per_wall,
            },
        );
    }

    /// Thread `tid`'s cgroup has CPU quota `quota` and has been throttled `ns` so far (as the
    /// kernel adds it: when the group may run again).
    fn throttled(&mut self, tid: u64, quota: CpuQuota, ns: u64) {
        self.core.kernel_mut().throttle.insert(tid, (quota, ns));
    }

    fn one_stall(&mut self) -> Stall {
        let mut s = self.stalls();
        assert_eq!(s.len(), 1, "{s:#?}");
        s.remove(0)
    }
}

// --- detection -----------------------------------------------------------------------------

#[test]
fn a_poll_is_flagged_exactly_when_the_lower_bound_of_its_age_reaches_the_threshold() {
    let mut rig = rig(config(|_| {}));
    let slot = [FakeSlot::new(TID)];
    // It read the board's clock at 0.5 ms; the tick at 1 ms is the first to see it.
    slot[0].start(rig.word, 7, MS / 2);
    rig.tick(MS, &slot);
    rig.tick(11 * MS - 1, &slot);
    assert_eq!(
        slot[0].flagged.get(),
        None,
        "9.999 ms since it was first seen"
    );
    assert!(rig.stalls().is_empty());
    rig.tick(11 * MS, &slot);
    assert_eq!(slot[0].flagged.get(), Some(slot[0].seq()));
    let s = rig.one_stall();
    assert_eq!(s.state, StallState::Running);
    assert_eq!(s.threshold, Duration::from_nanos(THRESHOLD));
    // Its start is the middle of [clock it read, first tick that saw it]: 0.75 ms.
    assert_eq!(s.duration, Duration::from_nanos(11 * MS - 750_000));
    assert_eq!(s.task.name.as_deref(), Some("hog"));
    assert_eq!(s.task.id, Some(7));
    assert_eq!(s.worker.tid, Some(TID));
    assert_eq!(rig.shared.stalls_total.load(Ordering::Relaxed), 1);
    assert_eq!(rig.shared.stalls_in_progress(), 1);
}

#[test]
fn a_late_watchdog_never_reports_a_poll_it_has_not_seen_run_for_the_threshold() {
    let mut rig = rig(config(|_| {}));
    let slot = [FakeSlot::new(TID)];
    slot[0].start(rig.word, 7, 0);
    // The watchdog was descheduled: its first look is 50 ms after the poll read the clock.
    rig.tick(50 * MS, &slot);
    rig.tick(59 * MS, &slot);
    slot[0].end(59 * MS);
    rig.tick(60 * MS, &slot);
    assert_eq!(slot[0].flagged.get(), None);
    assert!(rig.stalls().is_empty());
    assert_eq!(rig.shared.stalls_total.load(Ordering::Relaxed), 0);
}

#[test]
fn with_precise_starts_the_age_counts_from_the_exact_start() {
    let mut rig = rig(config(|c| c.precise_start = true));
    let slot = [FakeSlot::new(TID)];
    slot[0].start(rig.word, 7, 0);
    rig.tick(9 * MS, &slot);
    assert!(rig.stalls().is_empty());
    rig.tick(10 * MS, &slot);
    let s = rig.one_stall();
    assert_eq!(s.duration, Duration::from_nanos(10 * MS));
}

#[test]
fn a_poll_that_ends_between_ticks_before_the_threshold_is_no_stall() {
    let mut rig = rig(config(|_| {}));
    let slot = [FakeSlot::new(TID)];
    slot[0].start(rig.word, 7, 0);
    rig.tick(MS, &slot);
    slot[0].end(8 * MS);
    // Another poll starts before the next tick: the sequence moved by two.
    slot[0].start(rig.word, 8, 8 * MS);
    rig.tick(9 * MS, &slot);
    rig.tick(10 * MS, &slot);
    assert_eq!(slot[0].flagged.get(), None);
    assert!(rig.stalls().is_empty());
    assert_eq!(rig.shared.polls.load(Ordering::Relaxed), 1);
}

#[test]
fn a_flagged_poll_that_saw_its_flag_ends_at_its_exact_end() {
    let mut rig = rig(config(|_| {}));
    let slot = rig.stalled();
    assert_eq!(rig.one_stall().state, StallState::Running);
    slot[0].end_exactly(15 * MS + 123);
    rig.tick(16 * MS, &slot);
    let s = rig.one_stall();
    assert_eq!(s.state, StallState::Ended);
    assert!(s.exact_end);
    assert_eq!(s.duration, Duration::from_nanos(15 * MS + 123 - 750_000));
    assert_eq!(rig.shared.stalls_in_progress(), 0);
}

#[test]
fn a_flagged_poll_that_missed_its_flag_ends_at_the_clock_it_read() {
    let mut rig = rig(config(|_| {}));
    let slot = rig.stalled();
    rig.stalls();
    // It ended in the instant it was flagged: no exact end. It read the clock of the tick at
    // 11 ms, so it ended before the next (12 ms): the middle of that tick.
    slot[0].end(11 * MS);
    rig.tick(12 * MS, &slot);
    let s = rig.one_stall();
    assert!(!s.exact_end);
    assert_eq!(s.duration, Duration::from_nanos(11 * MS + MS / 2 - 750_000));
    // Half of the start's tick (0.5 to 1 ms) and half of the end's.
    assert_eq!(s.uncertainty, Duration::from_nanos(250_000 + MS / 2));
}

#[test]
fn a_flagged_poll_followed_by_another_poll_ends_at_the_tick_that_saw_it_gone() {
    let mut rig = rig(config(|_| {}));
    let slot = rig.stalled();
    rig.stalls();
    // Its end was not stored (the flag came too late) and a new poll already runs.
    // It ended after the tick at 11 ms saw it running, and before this one.
    slot[0].end(11 * MS);
    slot[0].start(rig.word, 8, 11 * MS);
    rig.tick(12 * MS, &slot);
    let s = rig.one_stall();
    assert!(!s.exact_end);
    assert_eq!(s.duration, Duration::from_nanos(11 * MS + MS / 2 - 750_000));
    assert_eq!(s.uncertainty, Duration::from_nanos(250_000 + MS / 2));
}

#[test]
fn a_start_in_a_tick_a_busy_host_stretched_is_the_middle_of_it_and_says_how_far_off() {
    let mut rig = rig(config(|_| {}));
    let slot = [FakeSlot::new(TID)];
    rig.tick(MS, &slot);
    // The poll reads the clock of the tick at 1 ms and runs from 1.1 to 41.1 ms; the host
    // holds the watchdog back until 15 ms.
    slot[0].start(rig.word, 7, MS);
    rig.tick(15 * MS, &slot);
    for t in 16..=25 {
        rig.tick(t * MS, &slot);
    }
    let running = rig.one_stall();
    // Began between 1 and 15 ms: taken as 8 ms, off by at most 7.
    assert_eq!(running.uncertainty, Duration::from_millis(7));
    assert_eq!(running.duration, Duration::from_millis(25 - 8));
    slot[0].end_exactly(41 * MS + 100_000);
    rig.tick(42 * MS, &slot);
    let ended = rig.one_stall();
    assert!(ended.exact_end);
    assert_eq!(ended.duration, Duration::from_nanos(33 * MS + 100_000));
    assert_eq!(ended.uncertainty, Duration::from_millis(7));
    // The truth (40 ms) lies within what the record says.
    let truth = Duration::from_millis(40);
    assert!(ended.duration.abs_diff(truth) <= ended.uncertainty);
    assert!(
        ended.to_string().contains("33.1ms (±7.0ms) (threshold"),
        "{ended}"
    );
    // An on-time watchdog's half tick is not worth saying.
    let mut rig = self::rig(config(|_| {}));
    let _slot = rig.stalled();
    let s = rig.one_stall();
    assert_eq!(s.uncertainty, Duration::from_nanos(250_000));
    assert!(!s.to_string().contains('±'), "{s}");
}

#[test]
fn a_short_poll_late_in_a_stretched_tick_is_not_caught() {
    let mut rig = rig(config(|_| {}));
    let slot = [FakeSlot::new(TID)];
    rig.tick(MS, &slot);
    // It reads the clock of the tick at 1 ms, but runs from 14.9 to 15.9 ms only: the
    // watchdog, held back, next looks at 16 ms. From the clock it read, its owner cannot
    // tell it from a 14.9 ms stall and hands it over.
    slot[0].start(rig.word, 7, MS);
    let tick = rig.shared.board.tick_ns();
    slot[0].end_as_owner(15_900_000, tick, THRESHOLD);
    assert!(slot[0].caught().is_some(), "the owner hands it over");
    rig.tick(16 * MS, &slot);
    // The watchdog knows the window it began in (1 to 15.9 ms): judged from three quarters
    // of the way in, it is no stall.
    assert!(rig.stalls().is_empty());
    assert_eq!(rig.shared.snapshot().stalls_total, 0);
}

#[test]
fn a_poll_that_started_while_the_watchdog_slept_long_starts_after_the_tick_before() {
    let mut rig = rig(config(|_| {}));
    let slot = [FakeSlot::new(TID)];
    rig.tick(MS, &slot);
    // The board's clock read "no time": the poll began after the tick at 1 ms.
    slot[0].start(rig.word, 7, CLOCK_UNKNOWN);
    rig.tick(31 * MS, &slot);
    rig.tick(40 * MS, &slot);
    assert!(rig.stalls().is_empty());
    rig.tick(41 * MS, &slot);
    let s = rig.one_stall();
    // Start: the middle of [1 ms, 31 ms].
    assert_eq!(s.duration, Duration::from_nanos(41 * MS - 16 * MS));
}

#[test]
fn a_poll_that_read_the_real_clock_after_an_idle_spell_is_flagged_on_its_exact_age() {
    // The first poll after an idle spell reads the real clock (the start's lowest bit says
    // so): the watchdog, waking 20 ms late, flags it the first tick its exact age reaches the
    // threshold, not a threshold after it first saw it.
    let mut rig = rig(config(|_| {}));
    let slot = [FakeSlot::new(TID)];
    rig.tick(MS, &slot);
    let start = 2 * MS + crate::board::EXACT;
    slot[0].start(rig.word, 7, start);
    rig.tick(11 * MS, &slot);
    assert!(rig.stalls().is_empty(), "9 ms old");
    rig.tick(12 * MS + 1, &slot);
    let s = rig.one_stall();
    assert_eq!(s.duration, Duration::from_nanos(10 * MS));
    // A coarse start (bit clear) seen for the first time at 11 ms waits for its lower bound.
    let mut rig2 = self::rig(config(|_| {}));
    let slot2 = [FakeSlot::new(TID)];
    rig2.tick(MS, &slot2);
    slot2[0].start(rig2.word, 7, 2 * MS);
    rig2.tick(11 * MS, &slot2);
    rig2.tick(12 * MS + 1, &slot2);
    assert!(rig2.stalls().is_empty());
    rig2.tick(21 * MS, &slot2);
    assert_eq!(rig2.stalls().len(), 1);
}

#[test]
fn each_layer_is_judged_by_its_own_threshold() {
    let mut rig = rig(config(|_| {}));
    let slots = [FakeSlot::new(TID), FakeSlot::new(TID + 1)];
    let board = rig.shared.board.clone();
    let job = CulpritWord::kind(
        board.kinds.intern(Some("job"), None),
        LayerKind::Blocking,
        true,
    );
    // A blocking job 100 ms long is normal (its threshold is 30 s); an async poll is not.
    slots[0].start(job, 1, MS / 2);
    slots[1].start(rig.word, 2, MS / 2);
    rig.ticks(1, 101, &slots);
    let s = rig.one_stall();
    assert_eq!(s.layer, LayerKind::Async);
    assert_eq!(s.worker.tid, Some(TID + 1));
    assert_eq!(slots[0].flagged.get(), None);
    assert_eq!(
        rig.shared.in_progress[LayerKind::Blocking as usize].load(Ordering::Relaxed),
        0
    );
}

#[test]
fn a_blocking_job_that_waited_for_a_thread_gives_one_notice_a_second() {
    let mut rig = rig(config(|_| {}));
    let board = rig.shared.board.clone();
    let job = CulpritWord::kind(
        board.kinds.intern(Some("job"), None),
        LayerKind::Blocking,
        true,
    );
    let slot = [FakeSlot::new(TID)];
    // Waited past the async threshold for a thread: the pool is full.
    slot[0].push_wait(job, 1, THRESHOLD, MS);
    slot[0].push_wait(job, 2, THRESHOLD, MS);
    // A short wait is normal.
    slot[0].push_wait(job, 3, THRESHOLD - 1, MS);
    rig.tick(2 * MS, &slot);
    let notices: Vec<Report> = rig.core.out.drain(..).collect();
    assert_eq!(notices.len(), 1, "{notices:#?}");
    assert!(matches!(
        &notices[0],
        Report::Notice(crate::stall::Notice::BlockingSaturated { since_last: 1, .. })
    ));
    assert_eq!(rig.shared.blocking_slow_starts.load(Ordering::Relaxed), 2);
    slot[0].push_wait(job, 4, THRESHOLD, MS);
    rig.tick(1_002 * MS, &slot);
    let again: Vec<Report> = rig.core.out.drain(..).collect();
    assert!(
        matches!(
            &again[..],
            [Report::Notice(crate::stall::Notice::BlockingSaturated {
                since_last: 2,
                ..
            })]
        ),
        "{again:#?}"
    );
}

// --- pacing --------------------------------------------------------------------------------

/// A pacer of a 1 ms tick for a 10 ms threshold, from 0.
fn pacer() -> Pacer {
    Pacer::new(Duration::from_millis(1), Duration::from_millis(10), 0)
}

/// The step "next tick at `next_ms`", with the board's clock unknown meanwhile or not.
fn step(next_ms: u64, clock_unknown: bool) -> Step {
    Step {
        next_ns: next_ms * MS,
        clock_unknown,
    }
}

#[test]
fn the_watchdog_sleeps_long_after_two_idle_ticks_with_the_clock_unknown() {
    let mut p = pacer();
    assert_eq!(p.after_tick(true, false, false, 0), step(1, false));
    assert_eq!(p.after_tick(false, false, false, MS), step(2, false));
    // Second idle tick in a row: the threshold and a tick, and "no time" on the board
    // meanwhile (a poll that starts then reads an exact start, so it is flagged at most a
    // tick past its threshold).
    assert_eq!(p.after_tick(false, false, false, 2 * MS), step(13, true));
    assert_eq!(p.after_tick(false, false, false, 13 * MS), step(24, true));
    // Something ran: back to every tick at once.
    assert_eq!(p.after_tick(true, false, false, 24 * MS), step(25, false));
}

#[test]
fn a_poll_that_wakes_the_watchdog_from_its_long_sleep_brings_back_every_tick() {
    let mut p = pacer();
    p.after_tick(false, false, false, 0);
    assert_eq!(p.after_tick(false, false, false, MS), step(12, true));
    // A poll woke it at 4 ms: it ticks then (the loop breaks), and every tick after while
    // something runs.
    p.woken(4 * MS);
    assert_eq!(p.after_tick(true, false, false, 4 * MS), step(5, false));
    assert_eq!(p.after_tick(true, false, false, 5 * MS), step(6, false));
    // Woken by a poll that ended before the tick saw it: still a tick later, not a long
    // sleep from the one it was woken from.
    p.after_tick(false, false, false, 6 * MS);
    assert_eq!(p.after_tick(false, false, false, 7 * MS), step(18, true));
    p.woken(9 * MS);
    assert_eq!(p.after_tick(false, false, false, 9 * MS), step(10, false));
    // Two idle ticks in a row again: the long sleep.
    assert_eq!(p.after_tick(false, false, false, 10 * MS), step(21, true));
}

#[test]
fn while_the_probe_free_path_follows_workers_at_work_the_long_sleep_is_half_the_threshold() {
    let mut p = pacer();
    assert_eq!(p.after_tick(false, true, false, 0), step(1, false));
    assert_eq!(p.after_tick(false, true, false, MS), step(6, true));
    // The workers parked: the long sleep is the idle one.
    assert_eq!(p.after_tick(false, false, false, 6 * MS), step(17, true));
}

#[test]
fn an_idle_spell_that_a_tick_found_empty_with_the_clock_unknown_sleeps_deep() {
    let mut p = pacer();
    assert!(p.clock_runs());
    p.after_tick(false, false, true, 0);
    // The first long sleep: a poll that read the clock before it went unknown did not wake
    // the watchdog, and is at most a threshold and a tick old when it wakes.
    assert_eq!(p.after_tick(false, false, true, MS), step(12, true));
    // The tick after it is taken with the clock still unknown (the driver stores none).
    assert!(!p.clock_runs());
    // It found nothing: every poll from now on wakes the watchdog, which sleeps deep.
    let deep = DEEP_SLEEP.as_millis() as u64;
    assert_eq!(
        p.after_tick(false, false, true, 12 * MS),
        step(12 + deep, true)
    );
    assert!(!p.clock_runs());
    assert_eq!(
        p.after_tick(false, false, true, (12 + deep) * MS),
        step(12 + 2 * deep, true)
    );
    // A poll woke it: the clock runs, every tick.
    p.woken((20 + 2 * deep) * MS);
    assert!(p.clock_runs());
    assert_eq!(
        p.after_tick(true, false, true, (20 + 2 * deep) * MS),
        step(21 + 2 * deep, false)
    );
}

#[test]
fn a_poll_from_before_the_clock_went_unknown_brings_back_every_tick_with_the_clock() {
    let mut p = pacer();
    p.after_tick(false, false, true, 0);
    assert_eq!(p.after_tick(false, false, true, MS), step(12, true));
    // The tick after the first long sleep finds a poll that read the clock before it went
    // unknown (it did not wake the watchdog): the clock runs again, every tick.
    assert_eq!(p.after_tick(true, false, true, 12 * MS), step(13, false));
    assert!(p.clock_runs());
    // Idle again: the first long sleep again, never a deep one straight after a tick that
    // stored the clock.
    p.after_tick(false, false, true, 13 * MS);
    assert_eq!(p.after_tick(false, false, true, 14 * MS), step(25, true));
}

#[test]
fn no_deep_sleep_while_something_else_is_due() {
    let mut p = pacer();
    p.after_tick(false, false, false, 0);
    assert_eq!(p.after_tick(false, false, false, MS), step(12, true));
    // Not quiet (the probe-free path follows a runtime, or a stall waits for its victims):
    // the sleep of a threshold and a tick, the clock still unknown.
    assert_eq!(p.after_tick(false, false, false, 12 * MS), step(23, true));
    assert!(!p.clock_runs());
    // Quiet now: deep.
    let deep = DEEP_SLEEP.as_millis() as u64;
    assert_eq!(
        p.after_tick(false, false, true, 23 * MS),
        step(23 + deep, true)
    );
    // Workers at work for the probe-free path: half the threshold, never deep.
    assert_eq!(
        p.after_tick(false, true, true, (23 + deep) * MS),
        step(28 + deep, true)
    );
}

#[test]
fn a_watchdog_that_fell_behind_skips_the_ticks_it_missed() {
    let mut p = pacer();
    assert_eq!(p.after_tick(true, false, false, 50 * MS).next_ns, 51 * MS);
}

#[test]
fn no_long_sleep_when_it_is_no_longer_than_a_tick() {
    let mut p = Pacer::new(Duration::from_millis(1), Duration::from_millis(2), 0);
    for i in 0..5 {
        assert!(!p.after_tick(false, true, false, i * MS).clock_unknown);
    }
}

// --- verdicts ------------------------------------------------------------------------------

/// Runs one stall of `rig.word` on thread `TID` from 0.5 ms to its detection at 11 ms.
fn detect(rig: &mut Rig) -> Stall {
    rig.stalled();
    rig.one_stall()
}

#[test]
fn a_suspect_is_read_from_half_the_threshold_on_every_tick() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Running, 1.0);
    detect(&mut rig);
    let at: Vec<u64> = rig
        .core
        .kernel_mut()
        .reads
        .iter()
        .map(|r| r.1 / MS)
        .collect();
    // First seen at 1 ms: a suspect from 6 ms (5 ms old), read each tick to 11 ms.
    assert_eq!(at, vec![6, 7, 8, 9, 10, 11]);
    assert_eq!(rig.core.kernel_mut().opened, vec![TID]);
    assert_eq!(rig.shared.diag.samples.load(Ordering::Relaxed), 6);
}

#[test]
fn a_long_stall_is_read_one_tick_in_eight_after_sixteen_readings() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Running, 1.0);
    let slot = [FakeSlot::new(TID)];
    slot[0].start(rig.word, 7, MS / 2);
    rig.ticks(1, 100, &slot);
    let reads = rig.core.kernel_mut().reads.len();
    // 16 dense readings (6..=21 ms), then on the ticks divisible by 8 (24, 32, .. 96 ms).
    assert_eq!(reads, 16 + 10);
}

#[test]
fn a_thread_whose_cpu_clock_keeps_up_with_wall_time_is_cpu_bound() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Running, 1.0);
    let s = detect(&mut rig);
    assert_eq!(s.cause, Cause::Cpu);
    assert_eq!(s.hint, Some(crate::hints::CPU));
    assert_eq!(s.cause_shares.len(), 1);
}

#[test]
fn a_runnable_thread_whose_cpu_clock_stands_still_is_starved() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Running, 0.0);
    let s = detect(&mut rig);
    assert_eq!(s.cause, Cause::Starved);
    assert_eq!(s.hint, Some(crate::hints::STARVED));
}

#[test]
fn a_late_watchdog_that_reads_a_starved_poll_once_does_not_call_it_cpu() {
    // The watchdog itself was descheduled (a busy host): it saw the poll at 1 ms, then not
    // until 14 ms, where it flags it on its first and only reading. The thread is runnable;
    // one look cannot tell running from waiting for a CPU, and its CPU clock stood still.
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Running, 0.0);
    let slot = [FakeSlot::new(TID)];
    slot[0].start(rig.word, 7, MS / 2);
    rig.tick(MS, &slot);
    rig.tick(14 * MS, &slot);
    let s = rig.one_stall();
    assert_eq!(rig.core.kernel_mut().reads.len(), 1);
    assert_ne!(s.cause, Cause::Cpu, "{s:#?}");
    assert_eq!(s.cause, Cause::Unknown);
    assert_eq!(s.hint, None, "no advice for the code from one look");
    // Its next readings give intervals with no CPU time in them: starved, by its end.
    rig.tick(15 * MS, &slot);
    rig.tick(16 * MS, &slot);
    slot[0].end_exactly(17 * MS);
    rig.tick(18 * MS, &slot);
    let ended = rig
        .stalls()
        .into_iter()
        .find(|s| s.state == StallState::Ended)
        .expect("its ended report");
    assert_eq!(ended.cause, Cause::Starved, "{ended:#?}");
}

#[test]
fn a_thread_asleep_in_a_system_call_is_that_call() {
    let nanosleep = (0..512)
        .find(|&nr| crate::diagnose::syscalls::name(nr) == Some("nanosleep"))
        .expect("the table names nanosleep");
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Syscall(nanosleep), 0.0);
    let s = detect(&mut rig);
    assert_eq!(s.cause, Cause::Syscall(Syscall::from_nr(nanosleep)));
    assert!(s.hint.unwrap().contains("tokio::time::sleep"), "{s}");
}

#[test]
fn a_stall_on_and_off_the_cpu_is_split_into_shares() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Syscall(0), 0.25);
    let s = detect(&mut rig);
    assert_eq!(s.cause, Cause::Syscall(Syscall::from_nr(0)));
    let share = |c: Cause| {
        s.cause_shares
            .iter()
            .find(|x| x.cause == c)
            .map_or(0.0, |x| x.share)
    };
    assert!(
        (share(Cause::Cpu) - 0.25).abs() < 1e-6,
        "{:?}",
        s.cause_shares
    );
    assert!((share(s.cause) - 0.75).abs() < 1e-6, "{:?}", s.cause_shares);
}

#[test]
fn a_cpu_pool_job_asleep_in_a_call_is_the_pool_used_for_waiting() {
    let mut rig = rig(config(|c| {
        c.cpu_threshold = Duration::from_nanos(THRESHOLD)
    }));
    let kind = rig.shared.board.kinds.intern(Some("job"), None);
    rig.word = CulpritWord::kind(kind, LayerKind::Cpu, true);
    rig.script(TID, Activity::Syscall(0), 0.0);
    let s = detect(&mut rig);
    assert_eq!(s.layer, LayerKind::Cpu);
    assert_eq!(s.hint, Some(crate::hints::CPU_POOL_WAITING));
}

#[test]
fn with_diagnosis_off_no_thread_is_read_and_the_cause_is_unknown() {
    let mut rig = rig(config(|c| c.diagnose = false));
    rig.script(TID, Activity::Running, 1.0);
    let s = detect(&mut rig);
    assert_eq!(s.cause, Cause::Unknown);
    assert_eq!(s.hint, None);
    assert!(rig.core.kernel_mut().reads.is_empty());
}

#[test]
fn a_thread_with_no_reading_is_unknown() {
    let mut rig = rig(config(|_| {}));
    // No script for the thread: the kernel port has no reading (as off Linux).
    let s = detect(&mut rig);
    assert_eq!(s.cause, Cause::Unknown);
    assert!(s.cause_shares.is_empty());
}

#[test]
fn the_ended_report_has_the_verdict_of_the_whole_stall() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Running, 1.0);
    let slot = rig.stalled();
    assert_eq!(rig.one_stall().cause, Cause::Cpu);
    // It then sleeps for a long while: the end says so.
    rig.script(TID, Activity::Syscall(0), 0.0);
    rig.ticks(12, 60, &slot);
    slot[0].end_exactly(60 * MS);
    rig.tick(61 * MS, &slot);
    let s = rig.one_stall();
    assert_eq!(s.state, StallState::Ended);
    assert_eq!(s.cause, Cause::Syscall(Syscall::from_nr(0)));
}

// --- victims -------------------------------------------------------------------------------

/// A rig whose board knows waits (stalls are held for their victims), and the culprit word of
/// a named kind "queued" for the victims.
fn victims_rig() -> (Rig, CulpritWord) {
    let rig = rig(config(|_| {}));
    rig.shared.board.set_waits_known();
    let queued = CulpritWord::kind(
        rig.shared.board.kinds.intern(Some("queued"), None),
        LayerKind::Async,
        true,
    );
    (rig, queued)
}

#[test]
fn tasks_that_waited_through_a_stall_are_its_victims() {
    let (mut rig, queued) = victims_rig();
    let slot = rig.stalled();
    let running = rig.one_stall();
    assert!(running.victims.tracked);
    slot[0].end_exactly(20 * MS);
    rig.tick(21 * MS, &slot);
    assert!(rig.stalls().is_empty(), "held for its victims");
    // Polled right after it: waited 25 ms, 19.25 of them behind the stall (0.75..20 ms).
    slot[0].push_wait(queued, 100, 25 * MS, 21 * MS);
    // Waited 2 ms, wholly behind it.
    slot[0].push_wait(queued, 101, 2 * MS, 15 * MS);
    // The stalled task itself is never its own victim.
    slot[0].push_wait(rig.word, 7, 20 * MS, 21 * MS);
    // Woken after the stall ended: no overlap.
    slot[0].push_wait(queued, 102, 2 * MS, 24 * MS);
    rig.tick(22 * MS, &slot);
    assert!(rig.stalls().is_empty());
    // Held for the threshold (10 ms) past the tick that saw it end.
    rig.tick(31 * MS, &slot);
    let s = rig.one_stall();
    assert_eq!(s.state, StallState::Ended);
    assert_eq!(s.victims.count, 2, "{:#?}", s.victims);
    assert_eq!(
        s.victims.worst_wait,
        Duration::from_nanos(20 * MS - 750_000)
    );
    assert_eq!(
        s.victims.total_wait,
        Duration::from_nanos(20 * MS - 750_000 + 2 * MS)
    );
    assert_eq!(s.victims.tasks[0].task_id, Some(100));
    assert_eq!(s.victims.top_kinds, vec![(Arc::from("queued"), 2)]);
    let counted: u64 = rig.shared.victim_counts.lock().unwrap().values().sum();
    assert_eq!(counted, 2);
}

#[test]
fn tasks_found_queued_behind_a_stall_are_victims_whose_waits_are_not_made_up() {
    let (mut rig, queued) = victims_rig();
    let slot = rig.stalled();
    rig.stalls();
    // Its worker noted the polls that followed it, from the start it read (0.5 ms): two
    // tasks, the stalled task itself again (never its own victim), and one measured wait.
    slot[0].end_exactly(20 * MS);
    slot[0].push_queued(queued, 100, MS / 2, 20 * MS);
    slot[0].push_queued(queued, 101, MS / 2, 21 * MS);
    slot[0].push_queued(rig.word, 7, MS / 2, 21 * MS);
    rig.tick(21 * MS, &slot);
    slot[0].push_wait(queued, 102, 4 * MS, 22 * MS);
    rig.tick(31 * MS, &slot);
    let s = rig.one_stall();
    let v = &s.victims;
    assert_eq!((v.count, v.unmeasured), (3, 2), "{v:#?}");
    // Only the measured wait is a wait: 2 ms behind the stall (18..20 ms).
    assert_eq!(v.total_wait, Duration::from_millis(2));
    assert_eq!(v.worst_wait, Duration::from_millis(2));
    let listed: Vec<_> = v.tasks.iter().map(|t| (t.task_id, t.waited)).collect();
    assert_eq!(
        listed,
        [
            (Some(102), Duration::from_millis(2)),
            (Some(100), Duration::ZERO),
            (Some(101), Duration::ZERO)
        ]
    );
    assert_eq!(v.top_kinds, vec![(Arc::from("queued"), 3)]);
    let counted: u64 = rig.shared.victim_counts.lock().unwrap().values().sum();
    assert_eq!(counted, 3);
}

#[test]
fn a_victim_polled_in_the_instant_the_stall_ended_counts() {
    let (mut rig, queued) = victims_rig();
    let slot = rig.stalled();
    rig.stalls();
    // The stall ends and its victim is polled before the next tick: its record is drained in
    // the tick that sees the end.
    slot[0].end_exactly(20 * MS);
    slot[0].push_wait(queued, 100, 5 * MS, 20 * MS);
    rig.tick(21 * MS, &slot);
    rig.tick(40 * MS, &slot);
    let s = rig.one_stall();
    assert_eq!(s.victims.count, 1);
}

#[test]
fn the_watchdog_is_quiet_only_with_no_stall_open_or_held_and_no_runtime_followed() {
    let (mut rig, _) = victims_rig();
    assert!(rig.core.quiet(), "nothing seen yet");
    let slot = rig.stalled();
    rig.one_stall();
    assert!(!rig.core.quiet(), "a stall open");
    slot[0].end_exactly(20 * MS);
    rig.tick(21 * MS, &slot);
    assert!(rig.stalls().is_empty(), "held for its victims");
    assert!(!rig.core.quiet(), "a stall held for its victims");
    rig.tick(31 * MS, &slot);
    assert_eq!(rig.one_stall().state, StallState::Ended);
    assert!(rig.core.quiet(), "released");
    // The probe-free path follows a runtime: it sees work start only by its readings.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rig.shared.bare.add_runtime("api", rt.handle().clone());
    assert_eq!(rig.core.quiet(), !rig.shared.cfg.diagnose);
}

#[test]
fn stalls_held_for_victims_go_out_when_the_watchdog_stops() {
    let mut rig = rig(config(|_| {}));
    rig.shared.board.set_waits_known();
    let slot = rig.stalled();
    rig.stalls();
    slot[0].end_exactly(12 * MS);
    rig.tick(13 * MS, &slot);
    assert!(rig.stalls().is_empty());
    rig.core.release_all(13 * MS);
    assert_eq!(rig.one_stall().state, StallState::Ended);
}

#[test]
fn without_known_waits_the_end_goes_out_at_once_with_no_victims_tracked() {
    let mut rig = rig(config(|_| {}));
    let slot = rig.stalled();
    assert!(!rig.one_stall().victims.tracked);
    slot[0].end_exactly(12 * MS);
    rig.tick(13 * MS, &slot);
    let s = rig.one_stall();
    assert!(!s.victims.tracked);
}

// --- stacks and their rate limit -----------------------------------------------------------

const SIG: i32 = 40;

#[test]
fn the_running_report_goes_out_at_once_and_its_stack_follows() {
    let mut rig = rig_with(config(|_| {}), Ok(SIG));
    let slot = rig.stalled();
    // Reported the tick it is flagged, without waiting for the handler.
    let s = rig.one_stall();
    assert_eq!(s.state, StallState::Running);
    assert_eq!(s.stack_status, StackStatus::Pending);
    let (tid, ticket) = rig.core.stacks_mut().requests[0];
    assert_eq!(tid, TID);
    rig.core
        .stacks_mut()
        .captured
        .insert(ticket, vec![0x1000, 0x2000]);
    rig.tick(12 * MS, &slot);
    // The stack comes as an update of the same running stall.
    let reports: Vec<Report> = rig.core.out.drain(..).collect();
    let [Report::Stall { stall, raw_stack }] = &reports[..] else {
        panic!("{reports:#?}");
    };
    assert_eq!((stall.id, stall.state), (s.id, StallState::Running));
    assert_eq!(stall.stack_status, StackStatus::Captured);
    assert_eq!(raw_stack.as_deref(), Some(&[0x1000, 0x2000][..]));
    assert_eq!(rig.shared.diag.stacks_captured.load(Ordering::Relaxed), 1);
    // Counted once, however many reports.
    let counted: u64 = rig.shared.stall_counts.lock().unwrap().values().sum();
    assert_eq!(counted, 1);
    // The ended report carries it too.
    slot[0].end_exactly(20 * MS);
    rig.tick(21 * MS, &slot);
    let reports: Vec<Report> = rig.core.out.drain(..).collect();
    assert!(
        matches!(&reports[..], [Report::Stall { stall, raw_stack: Some(_) }] if stall.state == StallState::Ended && stall.stack_status == StackStatus::Captured),
        "{reports:#?}"
    );
}

#[test]
fn a_stack_that_never_comes_times_out_after_fifty_milliseconds() {
    let mut rig = rig_with(config(|_| {}), Ok(SIG));
    let slot = rig.stalled();
    assert_eq!(rig.one_stall().stack_status, StackStatus::Pending);
    rig.ticks(12, 61, &slot);
    // No update: nothing came.
    assert!(rig.stalls().is_empty());
    assert_eq!(rig.core.stacks_mut().cancelled, vec![1]);
    assert_eq!(rig.shared.diag.stacks_failed.load(Ordering::Relaxed), 1);
    // The ended report says what became of it.
    let s = rig.run_to_end(&slot, 70);
    assert_eq!(s.stack_status, StackStatus::TimedOut);
}

#[test]
fn a_stall_that_finds_the_capture_busy_asks_again_for_fifty_milliseconds() {
    let mut rig = rig_with(config(|_| {}), Ok(SIG));
    rig.core.stacks_mut().busy = true;
    let slot = rig.stalled();
    // Reported at once all the same.
    assert_eq!(rig.one_stall().stack_status, StackStatus::Pending);
    rig.ticks(12, 30, &slot);
    assert!(rig.stalls().is_empty());
    // The other capture finishes: this one's turn.
    rig.core.stacks_mut().busy = false;
    rig.tick(31 * MS, &slot);
    assert_eq!(rig.core.stacks_mut().requests.len(), 1);
    // And with the slot busy for good, it gives up after 50 ms; the end says so.
    let mut rig = rig_with(config(|_| {}), Ok(SIG));
    rig.core.stacks_mut().busy = true;
    let slot = rig.stalled();
    assert_eq!(rig.one_stall().stack_status, StackStatus::Pending);
    rig.ticks(12, 61, &slot);
    assert!(rig.stalls().is_empty());
    assert_eq!(rig.shared.diag.stacks_failed.load(Ordering::Relaxed), 1);
    assert_eq!(
        rig.run_to_end(&slot, 70).stack_status,
        StackStatus::TimedOut
    );
}

#[test]
fn a_try_that_finds_the_capture_taken_costs_no_token() {
    let mut rig = rig_with(config(|c| c.max_stacks_per_sec = 1), Ok(SIG));
    rig.core.stacks_mut().refuse_busy = true;
    let slot = [FakeSlot::new(TID)];
    slot[0].start(rig.word, 7, MS / 2);
    rig.ticks(1, 20, &slot);
    // Ten refused tries; then the capture is free and the one token is still there.
    rig.core.stacks_mut().refuse_busy = false;
    rig.tick(21 * MS, &slot);
    assert_eq!(rig.core.stacks_mut().requests.len(), 1);
    assert_eq!(
        rig.shared.diag.stacks_rate_limited.load(Ordering::Relaxed),
        0
    );
}

#[test]
fn stacks_past_the_rate_go_without_and_are_counted() {
    let mut rig = rig_with(config(|c| c.max_stacks_per_sec = 2), Ok(SIG));
    let slots: Vec<FakeSlot> = (0..3).map(|i| FakeSlot::new(TID + i)).collect();
    for s in &slots {
        s.start(rig.word, 7, MS / 2);
    }
    rig.ticks(1, 11, &slots);
    // Two captures asked for; the third stall goes without, rate limited.
    assert_eq!(rig.core.stacks_mut().requests.len(), 2);
    let s = rig.stalls();
    let status: Vec<StackStatus> = s.iter().map(|s| s.stack_status).collect();
    assert_eq!(
        status,
        vec![
            StackStatus::Pending,
            StackStatus::Pending,
            StackStatus::RateLimited
        ]
    );
    assert_eq!(s[2].worker.tid, Some(TID + 2));
    assert_eq!(
        rig.shared.diag.stacks_rate_limited.load(Ordering::Relaxed),
        1
    );
}

#[test]
fn a_stall_that_ends_before_its_stack_arrives_is_reported_running_then_ended() {
    let mut rig = rig_with(config(|_| {}), Ok(SIG));
    let slot = rig.stalled();
    assert_eq!(rig.one_stall().state, StallState::Running);
    slot[0].end_exactly(12 * MS);
    rig.tick(13 * MS, &slot);
    // Never "running" after its end: the ended report alone, with the stack's fate.
    let s = rig.one_stall();
    assert_eq!(s.state, StallState::Ended);
    assert_eq!(s.stack_status, StackStatus::TimedOut);
}

#[test]
fn a_signal_taken_back_stops_stacks_for_good_and_says_so_once() {
    let mut rig = rig_with(config(|_| {}), Ok(SIG));
    rig.core.stacks_mut().taken = true;
    let slots: Vec<FakeSlot> = (0..2).map(|i| FakeSlot::new(TID + i)).collect();
    slots[0].start(rig.word, 7, MS / 2);
    rig.ticks(1, 11, &slots);
    let out: Vec<Report> = rig.core.out.drain(..).collect();
    assert!(
        matches!(&out[..], [Report::Notice(crate::stall::Notice::StacksOff { .. }), Report::Stall { stall, .. }] if stall.stack_status == StackStatus::Unavailable),
        "{out:#?}"
    );
    let why = rig
        .shared
        .stack_setup_error
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    assert!(why.contains("no longer runs loopwatch's handler"), "{why}");
    // A later stall asks for nothing: no signal goes to a handler that is not loopwatch's.
    rig.core.stacks_mut().taken = false;
    slots[1].start(rig.word, 8, 12 * MS);
    rig.ticks(12, 24, &slots);
    let later: Vec<Stall> = rig
        .stalls()
        .into_iter()
        .filter(|s| s.task.id == Some(8))
        .collect();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].stack_status, StackStatus::Unavailable);
    assert!(rig.core.stacks_mut().requests.is_empty());
    assert_eq!(
        rig.shared.diag.stacks_signal_lost.load(Ordering::Relaxed),
        1
    );
}

#[test]
fn a_thread_asleep_in_a_call_gets_no_signal_and_costs_no_token() {
    let mut rig = rig_with(config(|c| c.max_stacks_per_sec = 1), Ok(SIG));
    rig.core.stacks_mut().asleep = true;
    let slot = rig.stalled();
    let s = rig.one_stall();
    assert_eq!(s.stack_status, StackStatus::InSyscall);
    assert_eq!(rig.shared.diag.stacks_in_syscall.load(Ordering::Relaxed), 1);
    // The token was given back: the next stall, on the CPU, gets its stack at once.
    rig.core.stacks_mut().asleep = false;
    slot[0].end_exactly(12 * MS);
    slot[0].start(rig.word, 8, 12 * MS);
    rig.ticks(13, 24, &slot);
    assert_eq!(rig.core.stacks_mut().requests.len(), 1);
    assert_eq!(
        rig.shared.diag.stacks_rate_limited.load(Ordering::Relaxed),
        0
    );
}

#[test]
fn a_thread_asleep_in_a_call_gives_its_stack_without_a_signal() {
    let mut rig = rig_with(config(|_| {}), Ok(SIG));
    rig.core.stacks_mut().asleep = true;
    rig.core.stacks_mut().asleep_stack = Some(vec![0x10, 0x20, 0x30]);
    rig.stalled();
    let reports: Vec<Report> = rig.core.out.drain(..).collect();
    let [Report::Stall { stall, raw_stack }] = &reports[..] else {
        panic!("{reports:#?}");
    };
    assert_eq!(stall.stack_status, StackStatus::Captured);
    assert_eq!(raw_stack.as_deref(), Some(&[0x10, 0x20, 0x30][..]));
    assert!(
        rig.core.stacks_mut().requests.is_empty(),
        "no signal was armed"
    );
    assert_eq!(rig.shared.diag.stacks_captured.load(Ordering::Relaxed), 1);
    assert_eq!(rig.shared.diag.stacks_in_syscall.load(Ordering::Relaxed), 0);
}

#[test]
fn a_cpu_hog_on_a_busy_host_is_cpu_and_says_how_much_it_was_stretched() {
    let mut rig = rig(config(|_| {}));
    // The thread gets 48% of a CPU: runnable without one the rest of the time.
    rig.script(TID, Activity::Running, 0.48);
    let slot = rig.stalled();
    // At detection it has had 2.4 ms of CPU in 5 ms sampled: under the threshold so far.
    assert_eq!(rig.one_stall().cause, Cause::Starved);
    let s = rig.run_to_end(&slot, 100);
    // 43 ms of CPU over the 90 ms sampled (6 to 96 ms: the last reading): past the threshold,
    // so it would have stalled an idle host too. Not "the host's fault".
    assert_eq!(s.cause, Cause::Cpu, "{s:#?}");
    assert_eq!(s.hint, Some(crate::hints::CPU));
    let cpu = s.cpu.expect("its CPU time");
    assert_eq!(cpu.sampled, Duration::from_millis(90));
    assert!(cpu.cpu >= Duration::from_millis(43), "{cpu:?}");
    assert!(
        s.to_string().contains("contention stretched it x2.1"),
        "{s}"
    );
    assert_eq!(
        s.cause_shares[0].cause,
        Cause::Starved,
        "the shares still tell both"
    );
}

#[test]
fn a_thread_that_got_less_cpu_than_the_threshold_is_starved() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Running, 0.05);
    let slot = rig.stalled();
    rig.stalls();
    let s = rig.run_to_end(&slot, 100);
    // 4.7 ms of CPU in 94 ms: on an idle host it would not have stalled the worker.
    assert_eq!(s.cause, Cause::Starved, "{s:#?}");
    assert_eq!(s.hint, Some(crate::hints::STARVED));
}

#[test]
fn a_sleeping_thread_whose_state_cannot_be_read_is_unknown_not_cpu() {
    let mut rig = rig(config(|_| {}));
    // No /proc: the CPU clock (nearly flat) but no activity.
    rig.script(TID, Activity::Unknown, 0.01);
    let slot = rig.stalled();
    rig.stalls();
    let s = rig.run_to_end(&slot, 60);
    assert_eq!(s.cause, Cause::Unknown, "{s:#?}");
    assert_eq!(
        s.hint, None,
        "no advice to move CPU work for a thread that slept"
    );
}

// --- phantoms: a span guard held across an `.await` -----------------------------------------

/// The number of the call tokio's driver parks in (`epoll_wait`, or `epoll_pwait`).
fn park_nr() -> i64 {
    (0..512)
        .find(|&nr| crate::diagnose::syscalls::is_runtime_park(nr))
        .expect("a park call on this architecture")
}

fn phantom_notices(rig: &mut Rig) -> Vec<(Option<u64>, u64)> {
    rig.core
        .out
        .iter()
        .filter_map(|r| match r {
            Report::Notice(Notice::Phantom {
                stall, since_last, ..
            }) => Some((*stall, *since_last)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_poll_whose_thread_is_parked_in_the_driver_is_a_phantom_not_a_stall() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Syscall(park_nr()), 0.0);
    let slot = [FakeSlot::new(TID)];
    slot[0].start(rig.word, 7, MS / 2);
    rig.ticks(1, 40, &slot);
    assert_eq!(phantom_notices(&mut rig), vec![(None, 1)]);
    assert!(rig.stalls().is_empty(), "a parked worker is not stalled");
    assert_eq!(
        slot[0].marked_phantom(),
        slot[0].seq(),
        "marked for its owner"
    );
    let snap = rig.shared.snapshot();
    assert_eq!((snap.phantom_polls, snap.stalls_in_progress), (1, 0));
    // The owner ends it at its next enter; the next real stall is seen as ever.
    slot[0].end(41 * MS);
    rig.script(TID, Activity::Running, 1.0);
    slot[0].start(rig.word, 8, 42 * MS);
    rig.ticks(42, 60, &slot);
    let s = rig.one_stall();
    assert_eq!((s.task.id, s.cause), (Some(8), Cause::Cpu));
}

#[test]
fn a_lock_wait_is_no_phantom() {
    // futex: a std Mutex held elsewhere, or tokio's parker; without park hooks it cannot be
    // told apart from a lock wait, so it stays a stall.
    let futex = (0..512)
        .find(|&nr| crate::diagnose::syscalls::name(nr) == Some("futex"))
        .expect("the table names futex");
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Syscall(futex), 0.0);
    let s = detect(&mut rig);
    assert_eq!(s.cause, Cause::Syscall(Syscall::from_nr(futex)));
    assert!(phantom_notices(&mut rig).is_empty());
}

#[test]
fn a_running_stall_whose_thread_then_parks_is_dropped_as_a_phantom() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Running, 1.0);
    let slot = rig.stalled();
    let running = rig.one_stall();
    assert_eq!(running.state, StallState::Running);
    assert_eq!(rig.shared.snapshot().stalls_in_progress, 1);
    rig.script(TID, Activity::Syscall(park_nr()), 0.0);
    rig.ticks(12, 30, &slot);
    assert_eq!(phantom_notices(&mut rig), vec![(Some(running.id), 1)]);
    assert!(rig.stalls().is_empty(), "no ended report for a phantom");
    let snap = rig.shared.snapshot();
    assert_eq!(
        (
            snap.stalls_in_progress,
            snap.phantom_stalls,
            snap.phantom_polls
        ),
        (0, 1, 1)
    );
    assert_eq!(snap.oldest_stall, None);
}

#[test]
fn a_stall_its_owner_found_a_phantom_gets_no_ended_report() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Running, 1.0);
    let slot = rig.stalled();
    let running = rig.one_stall();
    rig.ticks(12, 20, &slot);
    assert!(rig.stalls().is_empty());
    // Another task's poll nested in it: the owner ended it as a phantom (and said so).
    slot[0].mark_phantom(slot[0].seq());
    slot[0].end(21 * MS);
    rig.tick(22 * MS, &slot);
    assert_eq!(phantom_notices(&mut rig), vec![(Some(running.id), 1)]);
    assert!(rig.stalls().is_empty());
    assert_eq!(rig.shared.snapshot().stalls_in_progress, 0);
}

#[test]
fn phantom_notices_are_rate_limited_and_count_what_they_did_not_say() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Syscall(park_nr()), 0.0);
    let slot = [FakeSlot::new(TID)];
    let mut t = 1;
    for task in 0..5 {
        slot[0].start(rig.word, 100 + task, t * MS);
        rig.ticks(t + 1, t + 30, &slot);
        slot[0].end((t + 31) * MS);
        t += 32;
    }
    // 5 phantoms within 10 s: one notice for the first; the next says 5 when it is due.
    assert_eq!(phantom_notices(&mut rig), vec![(None, 1)]);
    rig.core.out.clear();
    slot[0].start(rig.word, 200, 11_000 * MS);
    rig.ticks(11_001, 11_030, &slot);
    assert_eq!(phantom_notices(&mut rig), vec![(None, 5)]);
    assert_eq!(rig.shared.snapshot().phantom_polls, 6);
}

// --- CPU-quota throttling ---------------------------------------------------------------

#[test]
fn a_poll_starved_while_its_cgroup_was_throttled_is_throttled() {
    let quota = CpuQuota::from_us(10_000, 100_000).unwrap();
    let mut rig = rig(config(|_| {}));
    // 8 % of a CPU (8 ms in 100: under the threshold): runnable the rest of the time, within
    // a cgroup allowed 0.1 CPU.
    rig.script(TID, Activity::Running, 0.08);
    rig.throttled(TID, quota, 5_000_000);
    let slot = rig.stalled();
    // The kernel has not accounted this period's throttling yet: starved, for now.
    let running = rig.one_stall();
    assert_eq!(running.cause, Cause::Starved);
    rig.ticks(12, 99, &slot);
    // The group may run again: the kernel adds the 80 ms it was held.
    rig.throttled(TID, quota, 85_000_000);
    let ended = end_at(&mut rig, &slot, 100);
    assert_eq!(ended.cause, Cause::Throttled(quota), "{ended}");
    assert_eq!(ended.hint, Some(crate::hints::THROTTLED));
    assert_eq!(ended.cause.kind(), "throttled");
    assert_eq!(
        ended.cause.to_string(),
        "throttled(0.10 CPU: 10ms per 100ms)"
    );
    let shares = &ended.cause_shares;
    assert_eq!(shares[0].cause, Cause::Throttled(quota), "{shares:?}");
    assert!(shares.iter().any(|s| s.cause == Cause::Cpu));
}

#[test]
fn a_poll_whose_cpu_reached_the_threshold_is_cpu_even_when_throttled() {
    let quota = CpuQuota::from_us(50_000, 100_000).unwrap();
    let mut rig = rig(config(|_| {}));
    // Half a CPU for 60 ms: 30 ms of CPU, past the 10 ms threshold.
    rig.script(TID, Activity::Running, 0.5);
    rig.throttled(TID, quota, 0);
    let slot = rig.stalled();
    rig.one_stall();
    rig.ticks(12, 59, &slot);
    rig.throttled(TID, quota, 30_000_000);
    let ended = end_at(&mut rig, &slot, 60);
    assert_eq!(ended.cause, Cause::Cpu, "{ended}");
    assert!(
        ended
            .cause_shares
            .iter()
            .any(|s| s.cause == Cause::Throttled(quota)),
        "{ended}"
    );
}

/// Ends the stalled poll on `slot` exactly at `end_ms` (ticked up to the tick before) and
/// returns its ended report.
fn end_at(rig: &mut Rig, slot: &[FakeSlot; 1], end_ms: u64) -> Stall {
    slot[0].end_exactly(end_ms * MS);
    rig.tick((end_ms + 1) * MS, slot);
    rig.stalls()
        .into_iter()
        .rfind(|s| s.state == StallState::Ended)
        .expect("the ended report")
}

#[test]
fn starvation_without_throttling_stays_starved() {
    let quota = CpuQuota::from_us(50_000, 100_000).unwrap();
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Running, 0.1);
    rig.throttled(TID, quota, 42_000_000);
    let slot = rig.stalled();
    rig.one_stall();
    let ended = rig.run_to_end(&slot, 60);
    assert_eq!(ended.cause, Cause::Starved, "{ended}");
}

// --- the end-of-poll catch -----------------------------------------------------------------

#[test]
fn a_poll_caught_at_its_end_is_an_ended_stall_with_what_was_sampled() {
    let mut rig = rig(config(|_| {}));
    rig.script(TID, Activity::Running, 1.0);
    let slot = [FakeSlot::new(TID)];
    // Starts at 1.2 ms, having read the clock of the tick at 1 ms; first seen at 3.5 ms; the
    // lower bound of its age (from 3.5 ms) never reaches 10 ms before it ends at 13.4 ms.
    // (Ticks here are 1 ms apart on the board's config: judged from 1.75 ms, it is caught.)
    rig.tick(MS, &slot);
    slot[0].start(rig.word, 7, MS);
    for t in [3_500_000, 6_000_000, 8_500_000, 11_000_000] {
        rig.tick(t, &slot);
    }
    assert!(rig.stalls().is_empty());
    let tick = rig.shared.board.tick_ns();
    slot[0].end_as_owner(13_400_000, tick, THRESHOLD);
    rig.tick(13_500_000, &slot);
    let s = rig.one_stall();
    assert!(s.caught_at_end);
    assert_eq!(s.state, StallState::Ended);
    assert_eq!(s.stack_status, StackStatus::EndedFirst);
    assert!(s.exact_end);
    // From the middle of the window after the clock it read (to the next tick, at 3.5 ms),
    // to its exact end.
    assert_eq!(s.duration, Duration::from_nanos(13_400_000 - 2_250_000));
    assert_eq!(s.uncertainty, Duration::from_nanos(1_250_000));
    assert_eq!(s.task.id, Some(7));
    assert_eq!(s.task.name.as_deref(), Some("hog"));
    assert_eq!(
        s.cause,
        Cause::Cpu,
        "sampled from half the threshold on: {s}"
    );
    assert!(s.to_string().contains("ended (caught as it ended)"), "{s}");
    let snap = rig.shared.snapshot();
    assert_eq!((snap.stalls_total, snap.stalls_caught_at_end), (1, 1));
    assert_eq!(snap.stalls_in_progress, 0);
    // Taken once.
    rig.tick(16_000_000, &slot);
    assert!(rig.stalls().is_empty());
}

#[test]
fn a_poll_caught_between_the_watchdogs_two_reads_of_its_slot_is_reported_once() {
    // The owner ends the poll past its threshold and publishes the catch in the instant after
    // the watchdog read its slot (which still shows it running, old enough to flag) and before
    // it reads the catch: one stall, caught at its end, never also flagged.
    let mut rig = rig(config(|_| {}));
    let slot = [FakeSlot::new(TID)];
    rig.tick(MS, &slot);
    slot[0].start(rig.word, 7, MS);
    for t in [3_500_000, 6_000_000, 8_500_000, 11_000_000] {
        rig.tick(t, &slot);
    }
    assert!(rig.stalls().is_empty());
    // At 13.5 ms the lower bound of its age (from 3.5 ms, first seen) reaches the threshold.
    slot[0].publish_caught(13_400_000);
    rig.tick(13_500_000, &slot);
    slot[0].end(11_000_000);
    rig.tick(14_000_000, &slot);
    rig.tick(16_000_000, &slot);
    let stalls = rig.stalls();
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    assert!(stalls[0].caught_at_end);
    assert_eq!(stalls[0].state, StallState::Ended);
    assert_eq!(rig.shared.snapshot().stalls_total, 1);
}

#[test]
fn a_flagged_stall_is_not_caught_again() {
    let mut rig = rig(config(|_| {}));
    let slot = rig.stalled();
    let running = rig.one_stall();
    // The owner ended it as it was flagged (the two crossed): it published a catch too.
    slot[0].publish_caught(20 * MS);
    let ended = rig.run_to_end(&slot, 20);
    assert_eq!(ended.id, running.id);
    assert!(!ended.caught_at_end);
    assert_eq!(rig.shared.snapshot().stalls_total, 1);
}

#[test]
fn a_flag_that_crossed_the_end_takes_the_owners_exact_end() {
    // The watchdog, descheduled, flags a poll in the instant it ends: the owner did not see
    // the flag, so it read no exact end for it, but it timed the end itself (caught). The
    // coarse clock it read at the end is the watchdog's last, from long before.
    let mut rig = rig(config(|_| {}));
    let slot = [FakeSlot::new(TID)];
    rig.tick(MS, &slot);
    slot[0].start(rig.word, 7, MS);
    rig.tick(2 * MS, &slot);
    // The watchdog sleeps through 40 ms; the poll ends at 41.5 ms.
    rig.tick(42 * MS, &slot);
    let running = rig.one_stall();
    slot[0].publish_caught(41_500_000);
    slot[0].end(2 * MS);
    rig.tick(43 * MS, &slot);
    let ended = rig.stalls().pop().expect("the ended report");
    assert_eq!((ended.id, ended.state), (running.id, StallState::Ended));
    assert!(ended.exact_end);
    assert_eq!(
        ended.duration,
        Duration::from_nanos(41_500_000)
            - (running
                .started_at
                .duration_since(rig.shared.board.system_time(0))
                .unwrap())
    );
}

#[test]
fn recall_at_one_point_two_thresholds_is_complete() {
    // 1,000 polls of 1.2x the threshold, each after an idle tick, at every phase against the
    // watchdog's ticks (a quarter of the threshold, the default): each is reported running,
    // or caught at its end. None twice.
    let mut rig = rig(config(|c| c.tick = Duration::from_nanos(THRESHOLD / 4)));
    let tick = rig.shared.board.tick_ns();
    assert_eq!(tick, 2_500_000);
    let slot = [FakeSlot::new(TID)];
    let mut now = 0;
    let mut next_tick = 0;
    let mut advance_to = |rig: &mut Rig, t: u64, slot: &[FakeSlot; 1], now: &mut u64| {
        while next_tick <= t {
            rig.tick(next_tick, slot);
            *now = next_tick;
            next_tick += tick;
        }
    };
    let polls = 1_000u64;
    let duration = THRESHOLD * 12 / 10;
    for k in 0..polls {
        let start = now + tick + (k * 7_919 * 1_000) % tick;
        advance_to(&mut rig, start, &slot, &mut now);
        // It read the clock of the last tick.
        slot[0].start(rig.word, k + 1, now);
        let end = start + duration;
        advance_to(&mut rig, end, &slot, &mut now);
        slot[0].end_as_owner(end, tick, THRESHOLD);
        advance_to(&mut rig, end + tick, &slot, &mut now);
    }
    let stalls = rig.stalls();
    let mut tasks: Vec<u64> = stalls.iter().filter_map(|s| s.task.id).collect();
    tasks.sort_unstable();
    tasks.dedup();
    assert_eq!(tasks.len() as u64, polls, "every one seen");
    let ended = stalls
        .iter()
        .filter(|s| s.state == StallState::Ended)
        .count() as u64;
    assert_eq!(ended, polls, "each ended once");
    assert!(stalls
        .iter()
        .all(|s| s.duration >= Duration::from_nanos(THRESHOLD)));
}

#[test]
fn no_poll_under_the_threshold_less_a_quarter_tick_is_caught() {
    // Polls of 0.93x the threshold (under it by more than a quarter of a 2.5 ms tick), at
    // every phase: none is caught, none reported.
    let mut rig = rig(config(|c| c.tick = Duration::from_nanos(THRESHOLD / 4)));
    let tick = rig.shared.board.tick_ns();
    let slot = [FakeSlot::new(TID)];
    let mut t = 0;
    rig.tick(t, &slot);
    for k in 0..500u64 {
        let start = t + (k * 7_919 * 1_000) % tick;
        slot[0].start(rig.word, k + 1, t);
        let end = start + THRESHOLD * 93 / 100;
        while t + tick <= end {
            t += tick;
            rig.tick(t, &slot);
        }
        slot[0].end_as_owner(end, tick, THRESHOLD);
        t += tick;
        rig.tick(t, &slot);
        t += tick;
        rig.tick(t, &slot);
    }
    assert!(rig.stalls().is_empty());
}

// --- death by a thousand cuts ----------------------------------------------------------------

#[test]
fn short_polls_asleep_in_a_call_are_reported_as_a_thousand_cuts() {
    let nanosleep = (0..512)
        .find(|&nr| crate::diagnose::syscalls::name(nr) == Some("clock_nanosleep"))
        .unwrap();
    let mut rig = rig(config(|c| c.thousand_cuts = true));
    rig.script(TID, Activity::Syscall(nanosleep), 0.0);
    let slot = [FakeSlot::new(TID)];
    // 5 ms polls back to back (each under the 10 ms threshold) for 10.5 s.
    for t in 1..=10_500u64 {
        if t % 5 == 1 {
            slot[0].start(rig.word, t, (t - 1) * MS);
        }
        rig.tick(t * MS, &slot);
        if t % 5 == 0 {
            slot[0].end(t * MS);
        }
    }
    let cuts: Vec<_> = rig
        .core
        .out
        .iter()
        .filter_map(|r| match r {
            Report::Notice(Notice::ThousandCuts {
                kind,
                syscall,
                asleep,
                window,
                hint,
                ..
            }) => Some((kind.clone(), syscall.clone(), *asleep, *window, *hint)),
            _ => None,
        })
        .collect();
    assert_eq!(cuts.len(), 1, "one window, one kind: {cuts:?}");
    let (kind, syscall, asleep, window, hint) = &cuts[0];
    assert_eq!(
        (kind.as_ref(), syscall.as_ref()),
        ("hog", "clock_nanosleep")
    );
    assert!(
        asleep.as_secs_f64() / window.as_secs_f64() > 0.9,
        "{cuts:?}"
    );
    assert!(hint.contains("tokio::time::sleep"));
    assert!(rig.stalls().is_empty(), "none of them a stall");
    assert_eq!(rig.shared.snapshot().thousand_cuts_reports, 1);
}

#[test]
fn short_polls_that_compute_are_no_thousand_cuts() {
    let mut rig = rig(config(|c| c.thousand_cuts = true));
    rig.script(TID, Activity::Running, 1.0);
    let slot = [FakeSlot::new(TID)];
    for t in 1..=10_500u64 {
        if t % 5 == 1 {
            slot[0].start(rig.word, t, (t - 1) * MS);
        }
        rig.tick(t * MS, &slot);
        if t % 5 == 0 {
            slot[0].end(t * MS);
        }
    }
    assert_eq!(rig.shared.snapshot().thousand_cuts_reports, 0);
}

// --- the probe-free path -------------------------------------------------------------------

fn nr_of(name: &str) -> i64 {
    (0..512)
        .find(|&nr| crate::diagnose::syscalls::name(nr) == Some(name))
        .expect("the table names it")
}

const WORKER: u64 = 777;

/// A rig whose registry has learnt thread `WORKER` (no runtime handle: never gated as parked),
/// with the role ranges of a scheduler whose `run_task` is at 1000..1100 and whose
/// `block_in_place` is at 2000..2050.
fn bare_rig() -> Rig {
    bare_rig_with(|_| {})
}

/// [`bare_rig`] with a config of its own.
fn bare_rig_with(f: impl FnOnce(&mut Config)) -> Rig {
    let rig = rig(config(f));
    rig.shared.bare.learnt("rt", WORKER, 0);
    rig.shared
        .bare
        .set_roles(crate::diagnose::roles::Roles::from_symbols([
            (
                "tokio::runtime::scheduler::multi_thread::worker::Context::run_task",
                1000,
                100,
            ),
            ("tokio::task::blocking::block_in_place::<F, R>", 2000, 50),
            (
                "tokio::runtime::scheduler::multi_thread::worker::Context::run",
                3000,
                100,
            ),
        ]));
    rig
}

#[test]
fn a_learnt_worker_asleep_in_a_call_inside_a_poll_is_a_stall_with_no_probe() {
    let mut rig = bare_rig();
    let sleep = nr_of("clock_nanosleep");
    rig.script(WORKER, Activity::Syscall(nr_of("epoll_wait")), 0.0);
    rig.core.stacks_mut().asleep_stack = Some(vec![50, 1050, 9000]);
    let none: [FakeSlot; 0] = [];
    rig.tick(MS, &none);
    rig.tick(2 * MS, &none);
    // Parked in the driver: nothing, for one look (every other tick; one `pread`, no CPU
    // clock, no `stat`).
    assert!(rig.stalls().is_empty());
    assert_eq!(rig.core.kernel_mut().peeks, vec![WORKER]);
    assert!(rig.core.kernel_mut().reads.is_empty());
    // The handler sleeps from between 2 and 3 ms. With no candidate the thread is read every
    // other tick (the even ones here): first seen asleep at 4 ms.
    rig.script(WORKER, Activity::Syscall(sleep), 0.0);
    for t in 3..=13 {
        rig.tick(t * MS, &none);
    }
    assert!(
        rig.stalls().is_empty(),
        "9 ms since it was first seen: under the threshold"
    );
    rig.tick(14 * MS, &none);
    let s = rig.one_stall();
    assert!(s.probe_free);
    assert_eq!(s.state, StallState::Running);
    assert_eq!(s.cause, Cause::Syscall(Syscall::from_nr(sleep)));
    assert_eq!(s.worker.tid, Some(WORKER));
    assert_eq!(s.layer, LayerKind::Async);
    // Began between the readings at 2 and 4 ms: 3, off by one millisecond.
    assert_eq!(s.duration, Duration::from_millis(11));
    assert_eq!(s.uncertainty, Duration::from_millis(1));
    assert!(s.to_string().contains("(seen with no probe)"), "{s}");
    assert_eq!(rig.shared.stalls_in_progress(), 1);
    // It wakes between 20 and 21 ms (its CPU clock moves).
    // A candidate is read every tick.
    for t in 15..=20 {
        rig.tick(t * MS, &none);
    }
    rig.script(WORKER, Activity::Running, 1.0);
    rig.tick(21 * MS, &none);
    let ended = rig.one_stall();
    assert_eq!(ended.state, StallState::Ended);
    assert_eq!(ended.id, s.id);
    assert_eq!(
        ended.duration,
        Duration::from_nanos(20 * MS + MS / 2 - 3 * MS)
    );
    assert_eq!(ended.uncertainty, Duration::from_nanos(MS + MS / 2));
    assert_eq!(rig.shared.stalls_in_progress(), 0);
    let snap = rig.shared.snapshot();
    assert_eq!((snap.stalls_total, snap.probe_free_stalls), (1, 1));
}

#[test]
fn a_thread_that_gave_its_worker_up_or_runs_a_blocking_job_is_never_a_stall() {
    let sleep = nr_of("clock_nanosleep");
    let none: [FakeSlot; 0] = [];
    for stack in [
        // block_in_place inside the task's poll: the core went to another thread.
        Some(vec![50, 2010, 1050]),
        // No scheduler frame at all (a blocking-pool job, a thread of its own).
        Some(vec![50, 60, 70]),
        // The stack could not be read.
        None,
    ] {
        let mut rig = bare_rig();
        rig.core.stacks_mut().asleep_stack = stack.clone();
        rig.script(WORKER, Activity::Running, 1.0);
        rig.tick(MS, &none);
        rig.script(WORKER, Activity::Syscall(sleep), 0.0);
        for t in 2..=40 {
            rig.tick(t * MS, &none);
        }
        assert!(rig.stalls().is_empty(), "{stack:?}");
        let snap = rig.shared.snapshot();
        assert_eq!(snap.stalls_total, 0);
        assert_eq!(snap.probe_free_rejected, 1, "{stack:?}: decided once");
    }
}

#[test]
fn idle_calls_new_calls_and_probed_polls_are_left_alone() {
    let none: [FakeSlot; 0] = [];
    // Parked on a condition variable (futex) or the driver: an idle worker.
    for idle in ["futex", "epoll_wait", "epoll_pwait"] {
        let mut rig = bare_rig();
        rig.core.stacks_mut().asleep_stack = Some(vec![1050]);
        rig.script(WORKER, Activity::Running, 1.0);
        rig.tick(MS, &none);
        rig.script(WORKER, Activity::Syscall(nr_of(idle)), 0.0);
        for t in 2..=40 {
            rig.tick(t * MS, &none);
        }
        assert!(rig.stalls().is_empty(), "{idle}");
    }
    // Many short reads, each with some CPU between: never one call for a threshold.
    let mut rig = bare_rig();
    rig.core.stacks_mut().asleep_stack = Some(vec![1050]);
    rig.script(WORKER, Activity::Syscall(nr_of("read")), 0.1);
    for t in 1..=40 {
        rig.tick(t * MS, &none);
    }
    assert!(rig.stalls().is_empty());
    // A thread inside a probe's poll is the probe path's: no second report of its stall.
    let mut rig = bare_rig();
    rig.core.stacks_mut().asleep_stack = Some(vec![1050]);
    rig.script(WORKER, Activity::Running, 1.0);
    rig.tick(MS / 4, &none);
    rig.script(WORKER, Activity::Syscall(nr_of("clock_nanosleep")), 0.0);
    let slot = [FakeSlot::new(WORKER)];
    slot[0].start(rig.word, 7, MS / 2);
    for t in 1..=40 {
        rig.tick(t * MS, &slot);
    }
    let stalls = rig.stalls();
    assert!(stalls.iter().all(|s| !s.probe_free), "{stalls:#?}");
    assert!(!stalls.is_empty(), "the probe path reports it");
}

#[test]
fn a_newly_learnt_thread_is_bounded_by_its_learner() {
    // A learner ran on it at 0: a call it is asleep in at its first reading (2 ms: every
    // other tick) began after.
    let mut rig = bare_rig();
    rig.core.stacks_mut().asleep_stack = Some(vec![1050]);
    let sleep = nr_of("clock_nanosleep");
    rig.script(WORKER, Activity::Syscall(sleep), 0.0);
    let none: [FakeSlot; 0] = [];
    for t in 1..=11 {
        rig.tick(t * MS, &none);
    }
    assert!(rig.stalls().is_empty());
    rig.tick(12 * MS, &none);
    let s = rig.one_stall();
    assert_eq!(s.duration, Duration::from_millis(11));
    assert_eq!(s.uncertainty, Duration::from_millis(1));
}

#[test]
fn without_role_ranges_the_probe_free_path_stays_off() {
    let mut rig = rig(config(|_| {}));
    rig.shared.bare.learnt("rt", WORKER, 0);
    rig.core.stacks_mut().asleep_stack = Some(vec![1050]);
    let none: [FakeSlot; 0] = [];
    rig.script(WORKER, Activity::Running, 1.0);
    rig.tick(MS / 2, &none);
    rig.script(WORKER, Activity::Syscall(nr_of("clock_nanosleep")), 0.0);
    for t in 1..=40 {
        rig.tick(t * MS, &none);
    }
    assert!(rig.stalls().is_empty());
    assert!(
        rig.core.kernel_mut().reads.is_empty(),
        "no reading without ranges"
    );
}

#[test]
fn a_thread_only_named_like_a_worker_is_left_alone_once_turned_down_three_times() {
    // A helper thread spawned from a worker inherits its name: followed, then left alone.
    let mut rig = bare_rig();
    const HELPER: u64 = 888;
    rig.shared.bare.set_named(vec![HELPER]);
    rig.core.stacks_mut().asleep_stack = Some(vec![50, 60]);
    rig.script(WORKER, Activity::Syscall(nr_of("epoll_wait")), 0.0);
    let none: [FakeSlot; 0] = [];
    let sleep = nr_of("clock_nanosleep");
    let mut t = 1;
    for _ in 0..5 {
        rig.script(HELPER, Activity::Running, 1.0);
        rig.tick(t * MS, &none);
        rig.tick((t + 1) * MS, &none);
        rig.script(HELPER, Activity::Syscall(sleep), 0.0);
        for k in 2..=20 {
            rig.tick((t + k) * MS, &none);
        }
        t += 21;
    }
    let snap = rig.shared.snapshot();
    assert_eq!(snap.probe_free_rejected, 3);
    assert_eq!(snap.stalls_total, 0);
    assert_eq!(snap.probe_free_followed, 2);
    assert_eq!(snap.probe_free_workers, 1);
    // Its last reading was in the third cycle.
    let last = rig
        .core
        .kernel_mut()
        .reads
        .iter()
        .rev()
        .find(|r| r.0 == HELPER)
        .unwrap()
        .1;
    assert!(last < 3 * 21 * MS, "{last}");
}

/// Thread `tid` runs for 2 ms, then sleeps in `futex` (a std Mutex held elsewhere) for 28;
/// the reports.
fn asleep_in_futex(rig: &mut Rig, tid: u64) -> Vec<Stall> {
    let none: [FakeSlot; 0] = [];
    rig.script(tid, Activity::Running, 1.0);
    rig.tick(MS, &none);
    rig.tick(2 * MS, &none);
    rig.script(tid, Activity::Syscall(nr_of("futex")), 0.0);
    for t in 3..=30 {
        rig.tick(t * MS, &none);
    }
    rig.stalls()
}

#[test]
fn futex_counts_only_while_the_workers_hooks_say_it_is_not_parked() {
    let futex = nr_of("futex");
    for parked in [true, false] {
        let mut rig = bare_rig();
        rig.core.stacks_mut().asleep_stack = Some(vec![1050]);
        // The worker's park hooks ran (from this thread: the registry keys them by thread).
        let shared = rig.shared.clone();
        let tid = std::thread::spawn(move || {
            shared.bare.set_parked(parked);
            crate::board::os_thread_id()
        })
        .join()
        .unwrap();
        let Some(tid) = tid else { return };
        rig.shared.bare.learnt("rt", tid, 0);
        let stalls = asleep_in_futex(&mut rig, tid);
        if parked {
            assert!(stalls.is_empty(), "a parked worker's futex is its park");
        } else {
            assert_eq!(stalls.len(), 1, "{stalls:#?}");
            assert_eq!(stalls[0].cause, Cause::Syscall(Syscall::from_nr(futex)));
        }
    }
}

#[test]
fn a_learnt_worker_whose_hooks_never_ran_is_at_work_where_the_hooks_run() {
    if crate::board::os_thread_id().is_none() {
        return; // no thread ids here (the portable build): no probe-free path
    }
    // The hooks run in this process (another worker parked once), but WORKER was kept busy
    // from its start: it never parked, so never registered. A learner ran on it: at work.
    for learnt in [true, false] {
        let mut rig = bare_rig();
        let shared = rig.shared.clone();
        std::thread::spawn(move || shared.bare.set_parked(true))
            .join()
            .unwrap();
        let tid = if learnt {
            WORKER
        } else {
            // Only named like a worker (followed, never reached by a learner).
            rig.shared.bare.set_named(vec![WORKER + 1]);
            WORKER + 1
        };
        rig.core.stacks_mut().asleep_stack = Some(vec![1050]);
        let stalls: Vec<_> = asleep_in_futex(&mut rig, tid)
            .into_iter()
            .filter(|s| s.worker.tid == Some(tid))
            .collect();
        assert_eq!(
            stalls.len(),
            usize::from(learnt),
            "learnt {learnt}: {stalls:#?}"
        );
    }
}

#[test]
fn without_park_hooks_futex_never_counts() {
    let mut rig = bare_rig();
    rig.core.stacks_mut().asleep_stack = Some(vec![1050]);
    assert!(asleep_in_futex(&mut rig, WORKER).is_empty());
}

#[test]
fn in_the_workers_loop_alone_futex_is_its_park_and_other_calls_still_count() {
    // A stack that shows the worker's loop but no `run_task` (an optimized build inlines it):
    // asleep in `futex` there may be the worker parking, so no stall even with the hooks
    // saying unparked; asleep in `clock_nanosleep` is a task's poll.
    let none: [FakeSlot; 0] = [];
    for (call, stalls) in [("futex", 0), ("clock_nanosleep", 1)] {
        let mut rig = bare_rig();
        rig.core.stacks_mut().asleep_stack = Some(vec![50, 3050]);
        let shared = rig.shared.clone();
        let Some(tid) = std::thread::spawn(move || {
            shared.bare.set_parked(false);
            crate::board::os_thread_id()
        })
        .join()
        .unwrap() else {
            return;
        };
        rig.shared.bare.learnt("rt", tid, 0);
        rig.script(tid, Activity::Running, 1.0);
        rig.tick(MS, &none);
        rig.tick(2 * MS, &none);
        rig.script(tid, Activity::Syscall(nr_of(call)), 0.0);
        for t in 3..=30 {
            rig.tick(t * MS, &none);
        }
        assert_eq!(rig.stalls().len(), stalls, "{call}");
    }
}

/// A learnt worker, no probe: 5 ms asleep in `call` inside a task's poll (its stack: `stack`),
/// then 1 ms parked in the driver, for 10.5 s of 1 ms ticks, thousand-cuts sampling on. The
/// notices, and the sampled time put down to `(no probe)` and the call.
fn bare_cuts_run(call: &str, stack: Vec<usize>) -> (Vec<Notice>, Duration, Vec<Stall>) {
    let (notices, asleep, stalls, _) = bare_cuts_run_counted(call, stack);
    (notices, asleep, stalls)
}

/// [`bare_cuts_run`], with how many stacks were read.
fn bare_cuts_run_counted(
    call: &str,
    stack: Vec<usize>,
) -> (Vec<Notice>, Duration, Vec<Stall>, usize) {
    bare_cuts_run_counted_with(call, Some(stack))
}

/// [`bare_cuts_run_counted`] with a stack read that may fail (`None`).
fn bare_cuts_run_counted_with(
    call: &str,
    stack: Option<Vec<usize>>,
) -> (Vec<Notice>, Duration, Vec<Stall>, usize) {
    let mut rig = bare_rig_with(|c| c.thousand_cuts = true);
    rig.core.stacks_mut().asleep_stack = stack;
    let none: [FakeSlot; 0] = [];
    for t in 1..=10_500u64 {
        let a = match t % 6 {
            0 => Activity::Syscall(nr_of("epoll_wait")),
            _ => Activity::Syscall(nr_of(call)),
        };
        rig.script(WORKER, a, 0.0);
        rig.tick(t * MS, &none);
    }
    let notices = rig
        .core
        .out
        .iter()
        .filter_map(|r| match r {
            Report::Notice(n @ Notice::ThousandCuts { .. }) => Some(n.clone()),
            _ => None,
        })
        .collect();
    let asleep = rig
        .shared
        .snapshot()
        .time_in_polls
        .iter()
        .filter(|t| t.kind.label() == "(no probe)" && t.syscall.as_deref() == Some(call))
        .map(|t| t.time)
        .sum();
    let unwinds = rig.core.stacks_mut().unwinds;
    (notices, asleep, rig.stalls(), unwinds)
}

#[test]
fn short_blocking_polls_with_no_probe_are_a_thousand_cuts() {
    // Inside `run_task`: 5 ms in 6 asleep in clock_nanosleep, none a stall.
    let (notices, asleep, stalls) = bare_cuts_run("clock_nanosleep", vec![50, 1050, 9000]);
    assert!(stalls.is_empty(), "{stalls:#?}");
    assert_eq!(notices.len(), 1, "{notices:#?}");
    let Notice::ThousandCuts {
        kind,
        syscall,
        stack,
        ..
    } = &notices[0]
    else {
        unreachable!()
    };
    assert_eq!(
        (kind.as_ref(), syscall.as_ref()),
        ("(no probe)", "clock_nanosleep")
    );
    // A sampled stack, for the reporter to name the code by.
    assert_eq!(stack.as_deref(), Some(&[50, 1050, 9000][..]));
    // 5/6 of 10.5 s is 8.75 s; sampled every 8 ms in turn.
    let s = asleep.as_secs_f64();
    assert!((7.5..=10.0).contains(&s), "{s} s");
}

#[test]
fn a_worker_asleep_where_its_stack_was_read_is_not_read_again() {
    // Every sample finds it asleep at the same place (the same handler, the same depth): one
    // stack read for 10.5 s of samples.
    let (notices, _, _, unwinds) = bare_cuts_run_counted("clock_nanosleep", vec![50, 1050]);
    assert_eq!(notices.len(), 1);
    assert_eq!(unwinds, 1);
}

#[test]
fn a_stack_that_could_not_be_read_is_read_again_at_the_next_sample() {
    // No stack (the thread woke while it was read): no answer to keep.
    let (notices, asleep, _, unwinds) = bare_cuts_run_counted_with("clock_nanosleep", None);
    assert!(notices.is_empty() && asleep.is_zero());
    assert!(unwinds > 100, "{unwinds}");
}

#[test]
fn with_no_probe_only_a_tasks_poll_is_a_thousand_cut() {
    // `block_in_place` inside the poll (the core went to another thread), or no scheduler
    // frame at all (a blocking-pool job): meant to block.
    for stack in [vec![50, 2010, 1050], vec![50, 60, 70]] {
        let (notices, asleep, _) = bare_cuts_run("clock_nanosleep", stack.clone());
        assert!(notices.is_empty(), "{stack:?}: {notices:#?}");
        assert_eq!(asleep, Duration::ZERO, "{stack:?}");
    }
    // In the worker's loop with no `run_task` frame: futex may be its park (no hooks here).
    let (notices, asleep, _) = bare_cuts_run("futex", vec![50, 3050]);
    assert!(
        notices.is_empty() && asleep == Duration::ZERO,
        "{notices:#?}"
    );
}
