//! The watchdog's decision core: a function of what it reads. Each tick it is given the clock
//! and the slots (through [`SlotPort`]); it reads suspect threads through the kernel port and
//! asks for stacks through the stack port (`diagnose/ports.rs`), and it answers with what to do:
//! a poll flagged on its slot, reports (running, ended, with victims) and pool notices in
//! [`Core::out`], counters and histograms in [`Shared`]. It owns no thread, reads no real clock
//! and sleeps nowhere, so tests drive it tick by tick on a scripted clock (`tests.rs`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::bare::{decide, BareThread, Step, Verdict};
use super::cuts::Cuts;
use super::pools::Pools;
use super::victims::{hold_window_ns, Held, SlotVictims, VictimAcc, WaitRec};
use crate::board::{is_exact, Caught, Record, Slot, SlotRead, ThreadMeta, CLOCK_UNKNOWN};
use crate::diagnose::ports::{Kernel, StackPort};
use crate::diagnose::roles::Role;
use crate::diagnose::sampler::{Ask, Pending, Probe, Sampler, STACK_WAIT_NS};
use crate::diagnose::verdict::{Activity, Reading};
use crate::diagnose::{Cause, CauseShare};
use crate::kinds::{KindId, OWN};
use crate::shared::{record_all, Feed, Shared, StallKey};
use crate::stall::{
    CpuTime, LayerKind, Notice, Report, StackStatus, Stall, StallState, TaskInfo, Victims,
    WorkerInfo,
};
use crate::words::{Culprit, CulpritWord};

/// What the core reads of one slot, and the one thing it writes (the flag). The board's
/// [`Slot`] is the real one; tests script their own.
pub(crate) trait SlotPort {
    /// The poll in progress (a seqlock read: `stable` is false if it changed while read).
    fn read(&self) -> SlotRead;
    /// Slow polls the owner has counted.
    fn slow_polls(&self) -> u64;
    /// Flags poll `seq` as a stall: its end will read the real clock.
    fn flag(&self, seq: u64);
    /// The exact end of the flagged poll, if its thread saw the flag (0 if not).
    fn flagged_end_ns(&self) -> u64;
    /// The board's clock when the last poll ended.
    fn end_coarse_ns(&self) -> u64;
    /// The owner's name and OS thread id (`None` while it claims the slot).
    fn meta(&self) -> Option<ThreadMeta>;
    /// Hands each record pushed since the last drain to `f`.
    fn drain(&self, f: &mut dyn FnMut(Record));
    /// Marks poll `seq` a phantom: its thread was seen parked (the owner ends it).
    fn mark_phantom(&self, seq: u64);
    /// The poll marked a phantom last, by the watchdog or by its owner.
    fn marked_phantom(&self) -> u64;
    /// The last poll its owner caught at its end, past its threshold and never flagged.
    fn caught(&self) -> Option<Caught>;
}

impl SlotPort for Slot {
    fn read(&self) -> SlotRead {
        Slot::read(self)
    }
    fn slow_polls(&self) -> u64 {
        Slot::slow_polls(self)
    }
    fn flag(&self, seq: u64) {
        Slot::flag(self, seq);
    }
    fn flagged_end_ns(&self) -> u64 {
        Slot::flagged_end_ns(self)
    }
    fn end_coarse_ns(&self) -> u64 {
        Slot::end_coarse_ns(self)
    }
    fn meta(&self) -> Option<ThreadMeta> {
        Slot::meta(self)
    }
    fn drain(&self, f: &mut dyn FnMut(Record)) {
        self.drain_samples(f);
    }
    fn mark_phantom(&self, seq: u64) {
        Slot::mark_phantom(self, seq);
    }
    fn marked_phantom(&self) -> u64 {
        Slot::marked_phantom(self)
    }
    fn caught(&self) -> Option<Caught> {
        Slot::caught(self)
    }
}

/// Phantom polls are said at most this often (with how many since the last notice).
const PHANTOM_NOTICE_NS: u64 = 10_000_000_000;

/// A stalled thread is read on every tick until it has this many readings, then one tick in
/// eight, so many long stalls at once stay cheap to watch.
const DENSE_READINGS: u32 = 16;

/// How many of the clocks it published the watchdog remembers (the ticks a poll's start or
/// end is bounded by; older ones only widen the bound).
const PUBLISHED: usize = 8;

/// The times a poll's start (or end) lies between, on the board's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) lo: u64,
    pub(crate) hi: u64,
}

impl Window {
    /// A point known exactly.
    fn exact(t: u64) -> Window {
        Window { lo: t, hi: t }
    }

    /// The estimate: the middle, off by at most [`Window::error`].
    pub(crate) fn mid(self) -> u64 {
        self.lo + (self.hi - self.lo) / 2
    }

    pub(crate) fn error(self) -> u64 {
        (self.hi - self.lo) - (self.hi - self.lo) / 2
    }

    /// The point three quarters of the way through: a caught poll is judged as if it had
    /// begun here, so one that began later (a late watchdog widens the window) and ran for
    /// less than its threshold is not taken for a stall.
    fn late(self) -> u64 {
        self.lo + (self.hi - self.lo) / 4 * 3
    }
}

/// A stall the core follows until its poll ends.
#[derive(Debug)]
struct Open {
    kind: KindId,
    seq: u64,
    start_ns: u64,
    record: Stall,
    /// A stack capture not picked up yet; the running report waits for it (at most
    /// [`STACK_WAIT_NS`]).
    pending: Option<Pending>,
    /// Another stall's capture held the (process-wide) capture slot: ask again until then.
    retry_until_ns: Option<u64>,
    running_sent: bool,
    raw_stack: Option<Arc<[usize]>>,
}

/// The core's own view of one slot; `T` is what the kernel port keeps open for its thread.
#[derive(Debug)]
struct SlotState<T> {
    /// Polls of this slot already counted.
    done: u64,
    /// Slow polls of this slot already counted.
    slow_done: u64,
    /// The poll in progress last seen, and the tick that first saw it.
    seen_seq: u64,
    first_seen_ns: u64,
    /// The earliest the poll in progress can have started.
    start_lo_ns: u64,
    open: Option<Open>,
    /// Kernel-state sampling of the poll in progress, once it is a suspect.
    probe: Option<Probe<T>>,
    /// The OS thread id of the slot's owner, read when a probe starts.
    tid: Option<u64>,
    /// The last poll caught at its end that was taken, and the last poll flagged.
    caught_seq: u64,
    flagged_seq: u64,
    victims: SlotVictims,
}

impl<T> Default for SlotState<T> {
    fn default() -> Self {
        SlotState {
            done: 0,
            slow_done: 0,
            seen_seq: 0,
            first_seen_ns: 0,
            start_lo_ns: 0,
            open: None,
            probe: None,
            tid: None,
            caught_seq: 0,
            flagged_seq: 0,
            victims: SlotVictims::default(),
        }
    }
}

/// The decision core. `K` reads kernel state, `S` captures stacks.
pub(crate) struct Core<K: Kernel, S: StackPort> {
    shared: Arc<Shared>,
    sampler: Sampler,
    kernel: K,
    stacks: S,
    states: Vec<SlotState<K::Thread>>,
    /// Location words resolved to kinds (poll-hook culprits), so samples do not re-intern.
    locations: HashMap<CulpritWord, KindId>,
    /// Buffers kept across ticks: no allocation per tick once warm.
    samples: Vec<(CulpritWord, u64)>,
    resolved: Vec<((KindId, LayerKind), u64)>,
    waits: Vec<Record>,
    pools: Pools,
    cuts: Cuts,
    /// The same for the probe-free path's followed threads (by their index in `bare`).
    bare_cuts: Cuts,
    /// What the thousand-cuts sampling keeps open for each slot's thread.
    cut_threads: Vec<Option<(u64, K::Thread)>>,
    notices: Vec<Notice>,
    next_stall_id: u64,
    ticks: u64,
    /// Phantom polls not said yet, and when one was last said.
    phantoms_unsaid: u64,
    phantom_said_ns: Option<u64>,
    /// When the last tick took place (a poll that read `CLOCK_UNKNOWN` started after it).
    last_tick_ns: u64,
    /// The clocks the last ticks published (a ring): a poll that read one started before the
    /// next was published, so the next bounds its start (see [`Core::published_after`]).
    published: [u64; PUBLISHED],
    published_at: usize,
    /// The learnt workers the probe-free path follows (see `bare.rs`), the registry's
    /// generation they were copied at, when learner tasks may next be sent, and the kind its
    /// stalls count under.
    bare: Vec<BareThread<K::Thread>>,
    bare_gen: u64,
    /// The last tick's probe-free path read workers at work (see [`Core::watching_workers`]).
    bare_watching: bool,
    bare_learn_ns: u64,
    bare_kind: Option<KindId>,
    /// A buffer kept across ticks: the threads inside a probe's poll.
    bare_probed: Vec<u64>,
    /// What to send the reporter, in order; the driver takes it after each tick.
    pub(crate) out: Vec<Report>,
}

impl<K: Kernel, S: StackPort> std::fmt::Debug for Core<K, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("slots", &self.states.len())
            .field("ticks", &self.ticks)
            .finish_non_exhaustive()
    }
}

impl<K: Kernel, S: StackPort> Core<K, S> {
    pub(crate) fn new(shared: Arc<Shared>, sampler: Sampler, kernel: K, stacks: S) -> Self {
        let tick_ns = u64::try_from(shared.cfg.tick.as_nanos()).unwrap_or(u64::MAX);
        let (cuts, bare_cuts) = (
            Cuts::new(tick_ns, 0x9e37_79b9),
            Cuts::new(tick_ns, 0x85eb_ca6b),
        );
        Core {
            shared,
            sampler,
            kernel,
            stacks,
            states: Vec::new(),
            locations: HashMap::new(),
            samples: Vec::new(),
            resolved: Vec::new(),
            waits: Vec::new(),
            pools: Pools::default(),
            cuts,
            bare_cuts,
            cut_threads: Vec::new(),
            notices: Vec::new(),
            next_stall_id: 1,
            ticks: 0,
            phantoms_unsaid: 0,
            phantom_said_ns: None,
            last_tick_ns: 0,
            published: [0; PUBLISHED],
            published_at: 0,
            bare: Vec::new(),
            bare_gen: 0,
            bare_watching: false,
            bare_learn_ns: 0,
            bare_kind: None,
            bare_probed: Vec::new(),
            out: Vec::new(),
        }
    }

    /// The probe-free path follows workers that are not all parked: the watchdog must not sleep
    /// as long through an idle spell of the probes (see `pace.rs`).
    pub(crate) fn watching_workers(&self) -> bool {
        self.bare_watching
    }

    /// Is nothing due before a deep sleep of the idle watchdog (see `pace`)? Not while the
    /// probe-free path follows a runtime (it sees work start only by its readings), nor while
    /// a stall is open or waits for its victims.
    pub(crate) fn quiet(&self) -> bool {
        (!self.shared.cfg.diagnose || self.shared.bare.follows_none())
            && self
                .states
                .iter()
                .all(|st| st.open.is_none() && !st.victims.is_holding())
    }

    /// One tick at board time `now` over `slots`; returns whether anything ran since the last
    /// one (a poll in progress or ended), which paces the watchdog.
    pub(crate) fn tick<P: SlotPort>(&mut self, now: u64, slots: &[P]) -> bool {
        self.ticks = self.ticks.wrapping_add(1);
        let prev_tick = std::mem::replace(&mut self.last_tick_ns, now);
        self.published[self.published_at % PUBLISHED] = now;
        self.published_at = self.published_at.wrapping_add(1);
        let mut active = false;
        if self.states.len() < slots.len() {
            self.states.resize_with(slots.len(), SlotState::default);
        }
        let mut polls = 0;
        let mut oldest = [0u64; 3];
        for (i, slot) in slots.iter().enumerate() {
            let r = slot.read();
            active |= r.in_poll();
            polls += self.count_polls(i, slot, &r);
            if let Some(c) = slot.caught() {
                let st = &mut self.states[i];
                if c.seq != st.caught_seq {
                    st.caught_seq = c.seq;
                    // Flagged after all (the two crossed): its own reports cover it.
                    if c.seq != st.flagged_seq {
                        self.catch(i, slot, c, now);
                    }
                }
            }

            if let Some(mut open) = self.states[i].open.take() {
                if r.seq == open.seq {
                    self.sample(i, slot, &r, now);
                    if self.parked(i, slot, &r) {
                        self.shared.phantoms_parked.fetch_add(1, Ordering::Relaxed);
                        self.end_phantom(i, open, now);
                    } else {
                        let o = &mut oldest[open.record.layer as usize];
                        *o = (*o).max(now.saturating_sub(open.start_ns));
                        if open.retry_until_ns.is_some() {
                            self.ask_stack(i, slot, &mut open, now);
                        }
                        self.progress(&mut open, now);
                        self.states[i].open = Some(open);
                    }
                } else if slot.marked_phantom() == open.seq {
                    // Its owner found it a phantom (another task's poll nested in it).
                    self.end_phantom(i, open, now);
                } else {
                    self.end_stall(i, slot, &r, open, now);
                }
            }

            let st = &mut self.states[i];
            // A poll its owner caught at its end is over, even if this tick's read of the slot
            // (taken before the catch was) still shows it running: never flag it too.
            if r.stable && r.in_poll() && st.open.is_none() && st.caught_seq != r.seq {
                if st.seen_seq != r.seq {
                    st.seen_seq = r.seq;
                    st.first_seen_ns = now;
                    // The earliest it can have started: the clock it read, or, if it started
                    // while the watchdog slept long, the tick before this one.
                    st.start_lo_ns = if r.start_ns == CLOCK_UNKNOWN {
                        prev_tick
                    } else {
                        r.start_ns
                    };
                }
                if let Some(open) = self.check(i, slot, &r, now) {
                    let o = &mut oldest[open.record.layer as usize];
                    *o = (*o).max(now.saturating_sub(open.start_ns));
                    self.states[i].open = Some(open);
                }
            } else if !r.in_poll() {
                st.probe = None;
            }

            let (samples, waits) = (&mut self.samples, &mut self.waits);
            slot.drain(&mut |r| {
                if r.measure.is_wait() {
                    waits.push(r);
                } else {
                    samples.push((r.word, r.measure.nanos()));
                }
            });
            if !self.waits.is_empty() {
                self.take_waits(i, now);
            }
            if self.states[i].victims.is_holding() {
                self.release_held(i, now, false);
            }
        }
        active |= polls > 0;
        self.shared.polls.fetch_add(polls, Ordering::Relaxed);
        for (a, o) in self.shared.oldest_ns.iter().zip(oldest) {
            a.store(o, Ordering::Relaxed);
        }
        self.fold_samples();
        if self.shared.cfg.diagnose {
            self.bare_tick(now, slots);
        }
        if self.shared.cfg.diagnose && self.shared.cfg.thousand_cuts {
            self.sample_cuts(now, slots);
        }
        let mut notices = std::mem::take(&mut self.notices);
        self.pools.check_cpu(&self.shared, now, &mut notices);
        self.out.extend(notices.drain(..).map(Report::Notice));
        self.notices = notices;
        active
    }

    /// The probe-free path (see `bare.rs`): the learnt workers' kernel state, each tick, unless
    /// every worker of every followed runtime is parked.
    fn bare_tick<P: SlotPort>(&mut self, now: u64, slots: &[P]) {
        self.bare_watching = false;
        let shared = self.shared.clone();
        let reg = &shared.bare;
        let generation = reg.generation();
        let mut scan = false;
        if generation != self.bare_gen {
            self.bare_gen = generation;
            // A newly learnt worker: look for the threads named like it now, not at the next
            // round.
            scan = self.bare_refresh();
        }
        if now >= self.bare_learn_ns {
            // A learner per worker every second: workers come and go (`block_in_place` hands
            // a core to another thread), and the stack check, not this list, is what makes a
            // verdict right.
            self.bare_learn_ns = now.saturating_add(1_000_000_000);
            let mut runtimes = Vec::new();
            reg.new_round(&mut runtimes);
            for (name, handle) in &runtimes {
                let n = handle.metrics().num_workers();
                super::bare::send_learners(&shared, name, handle, n);
            }
            scan = true;
        }
        if scan {
            // Learners land where tokio puts them, often on the same few workers: threads that
            // bear a learnt worker's name are followed too (the stack check, not the name,
            // decides).
            let mut names: Vec<Arc<str>> = Vec::new();
            for t in self.bare.iter().filter(|t| t.learnt) {
                if let Some(n) = &t.name {
                    if !names.contains(n) {
                        names.push(n.clone());
                    }
                }
            }
            if !names.is_empty() {
                reg.set_named(self.kernel.threads_named(&names));
            }
        }
        if self.bare.is_empty() {
            return;
        }
        let Some(Ok(roles)) = reg.roles() else {
            return;
        };
        let open = self
            .bare
            .iter()
            .any(|t| matches!(&t.asleep, Some(a) if matches!(a.verdict, Verdict::Stall(..))));
        // Not asleep in a call of a poll at `now`: what began after is bounded by it.
        let seen_idle = Reading {
            at_ns: now,
            cpu_ns: None,
            activity: Activity::Unknown,
        };
        if !open && reg.all_parked() {
            for t in &mut self.bare {
                t.last = Some(seen_idle);
                t.asleep = None;
            }
            self.bare_cuts.skip_all(now);
            return;
        }
        self.bare_watching = true;
        let threshold = shared.board.threshold_ns(LayerKind::Async);
        // The threads inside a probe's poll now: the probe path's to judge.
        let mut probed_tids = std::mem::take(&mut self.bare_probed);
        probed_tids.clear();
        probed_tids.extend(slots.iter().filter_map(|s| {
            if !s.read().in_poll() {
                return None;
            }
            s.meta()?.tid
        }));
        let mut bare = std::mem::take(&mut self.bare);
        let mut gone = Vec::new();
        let hooks = reg.hooks_seen();
        for (i, t) in bare.iter_mut().enumerate() {
            t.hooks = hooks;
            let probed = probed_tids.contains(&t.tid);
            if probed {
                t.last = Some(seen_idle);
                if let Some(a) = t.asleep.take() {
                    self.bare_ended(a, now);
                }
                continue;
            }
            if !t.learnt && t.turned_down >= super::bare::MAX_TURNED_DOWN {
                continue;
            }
            // A thread with no candidate is looked at every other tick (half the reads; a
            // stall is still seen within a threshold and two ticks).
            if t.asleep.is_none() && (self.ticks as usize + i) % 2 == 1 {
                continue;
            }
            // First the call alone (one `pread`): an idle worker's park, or a running thread,
            // needs no more.
            let peek = self.kernel.peek(&mut t.thread);
            let r = match peek {
                Some(a) if super::bare::counts(a, t.unparked()).is_none() => Some(Reading {
                    at_ns: now,
                    cpu_ns: None,
                    activity: a,
                }),
                _ => self.kernel.read(&mut t.thread, now),
            };
            let Some(r) = r else {
                // Gone (or unreadable): followed no more; a stall on it ends here.
                gone.push(t.tid);
                if let Some(a) = t.asleep.take() {
                    self.bare_ended(a, now);
                }
                continue;
            };
            match t.step(r, threshold) {
                Step::Nothing => {}
                Step::Decide => {
                    let ips = self.stacks.unwind_asleep(t.tid);
                    let role = decide(roles, ips.as_deref());
                    let a = t.asleep.as_mut().expect("a candidate to decide");
                    // In a task's poll; or in the worker's loop (`run_task` inlined) for any
                    // call but `futex`, which is also where the loop parks.
                    let futex = crate::diagnose::syscalls::name(a.nr) == Some("futex");
                    if role == Role::TaskPoll || (role == Role::WorkerPoll && !futex) {
                        let stall = self.bare_stall(i, t.tid, t.name.clone(), a, now, threshold);
                        let raw: Option<Arc<[usize]>> = ips.map(Into::into);
                        self.send(stall.clone(), raw.clone());
                        a.verdict = Verdict::Stall(Box::new(stall), raw);
                    } else {
                        a.verdict = Verdict::NotAStall;
                        t.turned_down = t.turned_down.saturating_add(1);
                        shared.bare_rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Step::Left(a) => self.bare_ended(a, now),
            }
        }
        self.bare = bare;
        self.bare_probed = probed_tids;
        if shared.cfg.thousand_cuts {
            self.sample_bare_cut(now, roles);
        }
        for tid in gone {
            reg.forget(tid);
        }
    }

    /// Death by a thousand cuts on the probe-free path: one followed worker in turn, one tick
    /// in each `cuts::SAMPLE_EVERY`. Time it spends
    /// asleep in a call that counts, inside a task's poll (its stack, read without a signal,
    /// says so), goes to the kind `(no probe)` and the call; time running cannot be told from
    /// the worker's own loop with no probe, and counts for nobody.
    fn sample_bare_cut(&mut self, now: u64, roles: &crate::diagnose::roles::Roles) {
        let Some(i) = self.bare_cuts.pick(self.ticks, self.bare.len(), now) else {
            return;
        };
        let kind = self.bare_kind();
        let t = &mut self.bare[i];
        let judged = matches!(&t.asleep, Some(a) if !matches!(a.verdict, Verdict::Undecided));
        // Inside a probe's poll (the probes' sample has it), a stall (reported on its own) or
        // a call already turned down: nobody's.
        if !t.learnt || judged || self.bare_probed.contains(&t.tid) {
            self.bare_cuts.skip(i, now);
            return;
        }
        let at = self.kernel.asleep_at(&mut t.thread);
        let Some(at @ (nr, _, _)) = at.filter(|&(nr, _, _)| {
            super::bare::counts(Activity::Syscall(nr), t.unparked()).is_some()
        }) else {
            self.bare_cuts.skip(i, now);
            return;
        };
        // Asleep where the last stack read found it: the same answer, with no second read.
        // Only a stack that was read is kept (a read fails when the thread wakes meanwhile,
        // or another watchdog holds the unwinder: that is no answer for the next sample).
        let place = match &t.cut_place {
            Some(p) if p.at == at => p.clone(),
            _ => {
                let ips: Option<Arc<[usize]>> = self.stacks.unwind_asleep(t.tid).map(Into::into);
                let p = super::bare::CutPlace {
                    at,
                    role: decide(roles, ips.as_deref()),
                    ips,
                };
                if p.ips.is_some() {
                    t.cut_place = Some(p.clone());
                }
                p
            }
        };
        let futex = crate::diagnose::syscalls::name(nr) == Some("futex");
        if !(place.role == Role::TaskPoll || (place.role == Role::WorkerPoll && !futex)) {
            self.bare_cuts.skip(i, now);
            return;
        }
        if let Some(ips) = place.ips {
            self.bare_cuts.note_stack(kind, LayerKind::Async, nr, ips);
        }
        let reading = Reading {
            at_ns: now,
            cpu_ns: None,
            activity: Activity::Syscall(nr),
        };
        let sample = self.bare_cuts.add(i, kind, LayerKind::Async, &reading);
        self.count_poll_time(sample);
    }

    /// Copies the registry's learnt threads, keeping those already followed; whether a
    /// thread was learnt that was not before.
    fn bare_refresh(&mut self) -> bool {
        // The list is rebuilt: the thousand-cuts sampling's indexes into it start afresh.
        self.bare_cuts.forget_all();
        let mut new_learnt = false;
        let mut threads = Vec::new();
        self.shared.bare.threads(&mut threads);
        let mut old = std::mem::take(&mut self.bare);
        // A thread forgotten while a stall holds it is kept until that stall ends.
        let (held, mut old): (Vec<_>, Vec<_>) = old.drain(..).partition(|t| {
            matches!(&t.asleep, Some(a) if matches!(a.verdict, Verdict::Stall(..)))
                && !threads.iter().any(|&(tid, _)| tid == t.tid)
        });
        self.bare.extend(held);
        for (tid, learnt) in threads {
            match old.iter().position(|t| t.tid == tid) {
                Some(k) => {
                    let mut t = old.swap_remove(k);
                    if t.park.is_none() {
                        t.park = self.shared.bare.park_state(tid);
                    }
                    if learnt.is_some() && !t.learnt {
                        t.turned_down = 0;
                        new_learnt = true;
                    }
                    t.learnt = learnt.is_some();
                    self.bare.push(t);
                }
                None => {
                    new_learnt |= learnt.is_some();
                    self.bare.push(BareThread {
                        tid,
                        thread: self.kernel.open(tid),
                        name: thread_name(tid),
                        learnt: learnt.is_some(),
                        park: self.shared.bare.park_state(tid),
                        hooks: self.shared.bare.hooks_seen(),
                        cut_place: None,
                        turned_down: 0,
                        // A learner ran on it then: it was in no call of a poll's.
                        last: learnt.map(|at_ns| Reading {
                            at_ns,
                            cpu_ns: None,
                            activity: Activity::Unknown,
                        }),
                        asleep: None,
                    });
                }
            }
        }
        new_learnt
    }

    /// The kind probe-free stalls count under (no probe named the task).
    fn bare_kind(&mut self) -> KindId {
        *self
            .bare_kind
            .get_or_insert_with(|| self.shared.board.kinds.intern(Some("(no probe)"), None))
    }

    /// The running report of learnt worker `i` (thread `tid`), found asleep in `a`'s call
    /// inside a task's poll for at least `threshold`.
    fn bare_stall(
        &mut self,
        i: usize,
        tid: u64,
        name: Option<Arc<str>>,
        a: &super::bare::Asleep,
        now: u64,
        threshold: u64,
    ) -> Stall {
        // It began after the reading before the first that saw it in the call.
        let start = Window {
            lo: a.before_ns.min(a.first_ns),
            hi: a.first_ns,
        };
        let cause = Cause::Syscall(crate::diagnose::Syscall::from_nr(a.nr));
        let record = Stall {
            id: self.next_stall_id,
            task: TaskInfo {
                name: None,
                id: None,
                site: None,
                span: None,
                dependency: false,
                named_by_stack: false,
            },
            worker: WorkerInfo {
                index: i,
                thread_name: name,
                tid: Some(tid),
            },
            layer: LayerKind::Async,
            started_at: self.shared.board.system_time(start.mid()),
            duration: Duration::from_nanos(now.saturating_sub(start.mid())),
            state: StallState::Running,
            threshold: Duration::from_nanos(threshold),
            exact_end: false,
            uncertainty: Duration::from_nanos(start.error()),
            hint: hint_for(LayerKind::Async, &cause),
            cpu: None,
            cause,
            cause_shares: Vec::new(),
            stack: None,
            stack_status: StackStatus::Captured,
            victims: Victims::default(),
            caught_at_end: false,
            probe_free: true,
        };
        self.next_stall_id += 1;
        self.shared.stalls_total.fetch_add(1, Ordering::Relaxed);
        self.shared.bare_stalls.fetch_add(1, Ordering::Relaxed);
        self.shared.in_progress[LayerKind::Async as usize].fetch_add(1, Ordering::Relaxed);
        let key = StallKey {
            kind: self.bare_kind(),
            layer: LayerKind::Async,
            cause,
        };
        if let Ok(mut m) = self.shared.stall_counts.lock() {
            *m.entry(key).or_insert(0) += 1;
        }
        record
    }

    /// A probe-free stall's call ended: after the last reading that saw it, by `now`.
    fn bare_ended(&mut self, a: super::bare::Asleep, now: u64) {
        let Verdict::Stall(mut record, raw) = a.verdict else {
            return;
        };
        let end = Window {
            lo: a.last_ns.min(now),
            hi: now,
        };
        let start = Window {
            lo: a.before_ns.min(a.first_ns),
            hi: a.first_ns,
        };
        record.state = StallState::Ended;
        record.duration = Duration::from_nanos(end.mid().saturating_sub(start.mid()));
        record.uncertainty = Duration::from_nanos(start.error() + end.error());
        self.shared.in_progress[LayerKind::Async as usize].fetch_sub(1, Ordering::Relaxed);
        let kind = self.bare_kind();
        self.feed_stall(kind, &record);
        self.send(*record, raw);
    }

    /// Death by a thousand cuts: one worker inside a poll read every `cuts::SAMPLE_EVERY` ticks, in turn
    /// (see `cuts.rs`); each window, the kinds that kept the workers asleep in a call.
    fn sample_cuts<P: SlotPort>(&mut self, now: u64, slots: &[P]) {
        if let Some(i) = self.cuts.pick(self.ticks, slots.len(), now) {
            self.sample_cut(i, &slots[i], now);
        }
        let kinds = &self.shared.board.kinds;
        let label = |k: KindId| -> Arc<str> { kinds.get(k).label().into() };
        let before = self.notices.len();
        self.cuts.judge(now, label, &mut self.notices);
        self.bare_cuts.judge(now, label, &mut self.notices);
        let said = (self.notices.len() - before) as u64;
        self.shared.cut_reports.fetch_add(said, Ordering::Relaxed);
    }

    fn sample_cut(&mut self, i: usize, slot: &impl SlotPort, now: u64) {
        let r = slot.read();
        // A stall is reported on its own; a phantom is nobody's; outside a poll, nothing.
        let counted = r.stable
            && r.in_poll()
            && self.states[i].open.is_none()
            && slot.marked_phantom() != r.seq;
        let tid = slot.meta().and_then(|m| m.tid);
        let (kind, layer) = self.resolve(r.word);
        // Named after the poll's named culprit where the task has no name of its own (the
        // handler's span inside tokio's task span), as its reports are.
        let kind = self.label_kind(kind, r.named);
        let (Some(tid), true) = (tid, counted && kind != OWN && layer != LayerKind::Blocking)
        else {
            // Blocking jobs are meant to block; loopwatch's own task is not the application's.
            self.cuts.skip(i, now);
            return;
        };
        if self.cut_threads.len() <= i {
            self.cut_threads.resize_with(i + 1, || None);
        }
        let thread = match &mut self.cut_threads[i] {
            Some((t, th)) if *t == tid => th,
            other => &mut other.insert((tid, self.kernel.open(tid))).1,
        };
        // The syscall file alone (one `pread`): the kernel shows a call's number only while
        // the thread sleeps (a runnable thread reads `running`), and a sample needs no CPU
        // clock. (Full readings, which open and read `stat` too, cost +1.4 % of a core at
        // every other tick in the watchdog bench: see `cuts::SAMPLE_EVERY`.)
        let reading = self.kernel.peek(thread).map(|activity| Reading {
            at_ns: now,
            cpu_ns: None,
            activity,
        });
        // The same poll still (else the reading may be of the next one, or of none).
        match reading {
            Some(reading) if slot.read().seq == r.seq => {
                let sample = self.cuts.add(i, kind, layer, &reading);
                self.count_poll_time(sample);
            }
            _ => self.cuts.skip(i, now),
        }
    }

    /// Adds what a thousand-cuts sample stood for to the running totals
    /// (`loopwatch_blocked_seconds_total`, `loopwatch_running_seconds_total`).
    fn count_poll_time(&self, sample: Option<(crate::shared::PollTimeKey, u64)>) {
        let Some((key, ns)) = sample else {
            return;
        };
        if let Ok(mut m) = self.shared.poll_time.lock() {
            *m.entry(key).or_insert(0) += ns;
        }
    }

    /// The kernel port (tests script it).
    #[cfg(test)]
    pub(crate) fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// The stack port (tests script it).
    #[cfg(test)]
    pub(crate) fn stacks_mut(&mut self) -> &mut S {
        &mut self.stacks
    }

    /// Sends every stall still held for its victims (the watchdog is stopping).
    pub(crate) fn release_all(&mut self, now: u64) {
        for i in 0..self.states.len() {
            self.release_held(i, now, true);
        }
    }

    /// Counts the polls (and slow polls) slot `i` finished since the last tick; returns the
    /// polls. A thread serves one layer (workers, the blocking pool, a CPU pool): its polls
    /// count for the layer of its latest one.
    fn count_polls(&mut self, i: usize, slot: &impl SlotPort, r: &SlotRead) -> u64 {
        let st = &mut self.states[i];
        let done = r.seq >> 1;
        let new = done.saturating_sub(st.done);
        st.done = done;
        let layer = r.word.layer() as usize;
        if new > 0 {
            self.shared.polls_by_layer[layer].fetch_add(new, Ordering::Relaxed);
        }
        let slow = slot.slow_polls();
        if slow > st.slow_done {
            self.shared.slow_by_layer[layer].fetch_add(slow - st.slow_done, Ordering::Relaxed);
            st.slow_done = slow;
        }
        new
    }

    /// The window of a time read off the watchdog's clock as `read` (a poll's coarse start or
    /// end): at or after that clock was published, before the next one was (the owner would
    /// have read that one), and no later than `upper`, a time it is known to have passed by.
    /// On time, a tick wide; a watchdog that a busy host held back widens it.
    pub(crate) fn window_after(&self, read: u64, upper: u64) -> Window {
        let next = self
            .published
            .iter()
            .map(|&t| t & !crate::board::EXACT)
            .filter(|&t| t > read)
            .min();
        let hi = next.map_or(upper, |t| t.min(upper)).max(read);
        Window { lo: read, hi }
    }

    /// The clock the tick before this one published (what it read of the slots came after).
    fn previous_tick(&self) -> u64 {
        let i = self.published_at.wrapping_sub(2) % PUBLISHED;
        if self.published_at < 2 {
            0
        } else {
            self.published[i]
        }
    }

    /// Is the poll `r` on slot `i` a stall? If so, flag it, report it, and follow it.
    fn check(&mut self, i: usize, slot: &impl SlotPort, r: &SlotRead, now: u64) -> Option<Open> {
        let (kind, layer) = self.resolve(r.word);
        let threshold = self.shared.board.threshold_ns(layer);
        if threshold == u64::MAX || kind == OWN {
            return None;
        }
        let first_seen = self.states[i].first_seen_ns;
        // The lower bound of the poll's age: with the exact start, the exact age; otherwise the
        // poll began before the tick that first saw it, whatever the watchdog's lateness.
        let (age_lower, start) = if self.shared.cfg.precise_start || is_exact(r.start_ns) {
            (now.saturating_sub(r.start_ns), Window::exact(r.start_ns))
        } else {
            // It began after the clock value it read (or the tick before an idle sleep) and
            // before the next was published (at the latest, `first_seen`): its start is the
            // middle of that window (half a tick off when ticks are on time, more when the
            // watchdog was held back, and the record says by how much).
            let lo = self.states[i].start_lo_ns.min(first_seen);
            let w = self.window_after(lo, first_seen);
            (now.saturating_sub(w.hi), w)
        };
        let start_ns = start.mid();
        if slot.marked_phantom() == r.seq {
            return None;
        }
        // A suspect (half-way to the threshold): sample its thread, so the cause is known from
        // several samples by the time it becomes a stall.
        if age_lower >= threshold / 2 {
            self.sample(i, slot, r, now);
            if self.parked(i, slot, r) {
                self.shared.phantoms_parked.fetch_add(1, Ordering::Relaxed);
                self.note_phantom(now, kind, None);
                return None;
            }
        }
        if age_lower < threshold {
            return None;
        }
        slot.flag(r.seq);
        self.states[i].flagged_seq = r.seq;
        let span = (start_ns, now.saturating_sub(start_ns));
        let mut record = self.new_stall(i, slot, kind, layer, r, span, threshold);
        record.uncertainty = Duration::from_nanos(start.error());
        self.shared.in_progress[layer as usize].fetch_add(1, Ordering::Relaxed);
        let mut open = Open {
            kind: self.label_kind(kind, r.named),
            seq: r.seq,
            start_ns,
            record,
            pending: None,
            retry_until_ns: None,
            running_sent: false,
            raw_stack: None,
        };
        self.ask_stack(i, slot, &mut open, now);
        Some(open)
    }

    /// A new stall record (running, no stack yet) for poll `r` of `kind` on slot `i`, which
    /// began at `span.0` and has lasted `span.1` nanoseconds, with the verdict of what was
    /// sampled of it; counted in `stalls_total`.
    #[allow(clippy::too_many_arguments)]
    fn new_stall(
        &mut self,
        i: usize,
        slot: &impl SlotPort,
        kind: KindId,
        layer: LayerKind,
        r: &SlotRead,
        span: (u64, u64),
        threshold: u64,
    ) -> Stall {
        let (cause, cause_shares, cpu) = self.verdict(i, r.seq, threshold);
        let record = Stall {
            id: self.next_stall_id,
            task: self.task_info(kind, r),
            worker: worker_info(i, slot),
            layer,
            started_at: self.shared.board.system_time(span.0),
            duration: Duration::from_nanos(span.1),
            state: StallState::Running,
            threshold: Duration::from_nanos(threshold),
            exact_end: false,
            uncertainty: Duration::ZERO,
            hint: hint_for(layer, &cause),
            cpu,
            cause,
            cause_shares,
            stack: None,
            stack_status: StackStatus::Disabled,
            victims: Victims {
                tracked: self.shared.board.waits_known(),
                ..Victims::default()
            },
            caught_at_end: false,
            probe_free: false,
        };
        self.next_stall_id += 1;
        self.shared.stalls_total.fetch_add(1, Ordering::Relaxed);
        record
    }

    /// Asks for the stack of the stall `open` on slot `i`; if another capture holds the slot,
    /// tries again on the next ticks, for at most [`STACK_WAIT_NS`].
    fn ask_stack(&mut self, i: usize, slot: &impl SlotPort, open: &mut Open, now: u64) {
        let tid = self.states[i]
            .tid
            .or_else(|| slot.meta().and_then(|m| m.tid));
        let ask = self
            .sampler
            .ask_stack(&mut self.stacks, tid, now, &self.shared.diag);
        if let Some(reason) = self.sampler.take_lost() {
            // Said once: in the snapshot, and as a notice.
            if let Ok(mut e) = self.shared.stack_setup_error.lock() {
                *e = Some(reason.clone());
            }
            self.out.push(Report::Notice(Notice::StacksOff { reason }));
        }
        // The running report never waits for the stack: it goes out now ("pending"), and the
        // stack follows as an update of the same stall when it comes in.
        match ask {
            Ask::Pending(p) => {
                open.pending = Some(p);
                open.retry_until_ns = None;
                open.record.stack_status = StackStatus::Pending;
                if !open.running_sent {
                    self.send_running(i, open);
                }
            }
            Ask::Busy => {
                let until = *open.retry_until_ns.get_or_insert(now + STACK_WAIT_NS);
                if now >= until {
                    self.shared
                        .diag
                        .stacks_failed
                        .fetch_add(1, Ordering::Relaxed);
                    open.retry_until_ns = None;
                    open.record.stack_status = StackStatus::TimedOut;
                }
                if !open.running_sent {
                    if open.retry_until_ns.is_some() {
                        open.record.stack_status = StackStatus::Pending;
                    }
                    self.send_running(i, open);
                }
            }
            Ask::Captured(ips) => {
                open.retry_until_ns = None;
                open.raw_stack = Some(ips.into());
                open.record.stack_status = StackStatus::Captured;
                if open.running_sent {
                    let update = open.record.clone();
                    self.send(update, open.raw_stack.clone());
                } else {
                    self.send_running(i, open);
                }
            }
            Ask::Not(status) => {
                open.retry_until_ns = None;
                open.record.stack_status = status;
                if !open.running_sent {
                    self.send_running(i, open);
                }
            }
        }
    }

    /// Samples the thread of the poll in progress on slot `i`.
    fn sample(&mut self, i: usize, slot: &impl SlotPort, r: &SlotRead, now: u64) {
        let st = &mut self.states[i];
        match &st.probe {
            Some(p) if p.seq == r.seq => {
                // A long stall: after the first readings (enough for a verdict), read it one
                // tick in eight.
                if p.readings() >= DENSE_READINGS && !self.ticks.is_multiple_of(8) {
                    return;
                }
            }
            _ => st.tid = slot.meta().and_then(|m| m.tid),
        }
        self.sampler.observe(
            &mut self.kernel,
            &mut st.probe,
            r.seq,
            st.tid,
            now,
            &self.shared.diag,
        );
    }

    /// The cause of poll `seq` on slot `i` from the samples so far, for a layer whose
    /// threshold is `threshold_ns`; its shares; its CPU time.
    fn verdict(
        &self,
        i: usize,
        seq: u64,
        threshold_ns: u64,
    ) -> (Cause, Vec<CauseShare>, Option<CpuTime>) {
        match &self.states[i].probe {
            Some(p) if p.seq == seq => p.verdict(threshold_ns),
            _ => (Cause::Unknown, Vec::new(), None),
        }
    }

    /// Picks up a pending stack capture: once it is in, the running stall is reported again
    /// with it (an update); one that never comes leaves its status for the ended report.
    fn progress(&mut self, open: &mut Open, now: u64) {
        let Some(p) = open.pending else { return };
        let Some(got) = self
            .sampler
            .poll_stack(&mut self.stacks, p, now, &self.shared.diag)
        else {
            return;
        };
        open.pending = None;
        match got {
            Ok(ips) => {
                open.raw_stack = Some(ips.into());
                open.record.stack_status = StackStatus::Captured;
                let update = open.record.clone();
                self.send(update, open.raw_stack.clone());
            }
            Err(status) => open.record.stack_status = status,
        }
    }

    /// Sends the running report, with the cause as sampled up to now.
    fn send_running(&mut self, i: usize, open: &mut Open) {
        let threshold = open.record.threshold.as_nanos() as u64;
        let (cause, shares, cpu) = self.verdict(i, open.seq, threshold);
        open.record.cause = cause;
        open.record.hint = hint_for(open.record.layer, &cause);
        open.record.cause_shares = shares;
        open.record.cpu = cpu;
        open.running_sent = true;
        let key = StallKey {
            kind: open.kind,
            layer: open.record.layer,
            cause,
        };
        if let Ok(mut m) = self.shared.stall_counts.lock() {
            *m.entry(key).or_insert(0) += 1;
        }
        let stall = open.record.clone();
        self.send(stall, open.raw_stack.clone());
    }

    /// Was the thread of poll `r` on slot `i` seen parked in the runtime while the poll was
    /// still open? Then the poll is not running: a phantom (a span entered with `span.enter()`
    /// and held across an `.await`, on a worker that then went idle). It is marked, so the
    /// owner ends it at its next enter. The slot is read again after the reading: a poll that
    /// ended just before it (its worker then parked) is a real one.
    fn parked(&mut self, i: usize, slot: &impl SlotPort, r: &SlotRead) -> bool {
        let parked = matches!(&self.states[i].probe, Some(p) if p.seq == r.seq && p.parked());
        if parked && slot.read().seq == r.seq {
            slot.mark_phantom(r.seq);
            return true;
        }
        false
    }

    /// The stall `open` on slot `i` was a phantom: it is dropped, not reported as ended (its
    /// running report said what was known then; the notice says what it was).
    fn end_phantom(&mut self, i: usize, open: Open, now: u64) {
        self.states[i].probe = None;
        self.shared.in_progress[open.record.layer as usize].fetch_sub(1, Ordering::Relaxed);
        self.shared.phantom_stalls.fetch_add(1, Ordering::Relaxed);
        self.note_phantom(now, open.kind, Some(open.record.id));
    }

    /// Says (at most every [`PHANTOM_NOTICE_NS`]) that a poll of `kind` was a phantom.
    fn note_phantom(&mut self, now: u64, kind: KindId, stall: Option<u64>) {
        self.phantoms_unsaid += 1;
        if self
            .phantom_said_ns
            .is_some_and(|t| now.saturating_sub(t) < PHANTOM_NOTICE_NS)
            && stall.is_none()
        {
            return;
        }
        self.phantom_said_ns = Some(now);
        let label: Arc<str> = self.shared.board.kinds.get(kind).label().into();
        self.out.push(Report::Notice(Notice::Phantom {
            kind: label,
            stall,
            since_last: std::mem::take(&mut self.phantoms_unsaid),
        }));
    }

    fn end_stall(
        &mut self,
        i: usize,
        slot: &impl SlotPort,
        r: &SlotRead,
        mut open: Open,
        now: u64,
    ) {
        // It ended before its stack came in: one last look (the ended report carries it, with
        // no running update), else the stack's status as it ended.
        if let Some(p) = open.pending.take() {
            let last = Pending {
                deadline_ns: now,
                ..p
            };
            match self
                .sampler
                .poll_stack(&mut self.stacks, last, now, &self.shared.diag)
            {
                Some(Ok(ips)) => {
                    open.raw_stack = Some(ips.into());
                    open.record.stack_status = StackStatus::Captured;
                }
                Some(Err(status)) => open.record.stack_status = status,
                None => open.record.stack_status = StackStatus::TimedOut,
            }
        }
        if open.retry_until_ns.take().is_some() {
            // It ended while waiting for another stall's capture to finish.
            self.shared
                .diag
                .stacks_failed
                .fetch_add(1, Ordering::Relaxed);
            open.record.stack_status = StackStatus::Failed;
        }
        if !open.running_sent {
            self.send_running(i, &mut open);
        }
        let exact = slot.flagged_end_ns();
        // The flag and the end crossed: the owner did not see the flag, but timed the end
        // itself and published it as caught (the watchdog, descheduled on a busy host, may
        // have flagged the poll long after the clock it last published).
        let caught = slot
            .caught()
            .filter(|c| c.seq == open.seq)
            .map(|c| c.end_ns);
        let end = if exact != 0 {
            Window::exact(exact)
        } else if let Some(end) = caught {
            Window::exact(end)
        } else {
            // The poll ended in the instant it was flagged (the two crossed) and its owner did
            // not time it: it ended after the last tick saw it running, and before now or the
            // clock after the one it read as it ended.
            let seen = self.previous_tick();
            match slot.end_coarse_ns() {
                c if c != CLOCK_UNKNOWN && r.seq == open.seq + 1 => {
                    let w = self.window_after(c, now);
                    Window {
                        lo: w.lo.max(seen).min(w.hi),
                        hi: w.hi,
                    }
                }
                _ => Window {
                    lo: seen.min(now),
                    hi: now,
                },
            }
        };
        let exact_end = end.lo == end.hi;
        let end_err = end.error();
        let end = end.mid().max(open.start_ns);
        let threshold = open.record.threshold.as_nanos() as u64;
        self.sampler
            .finish(&mut self.kernel, &mut self.states[i].probe);
        let (cause, shares, cpu) = self.verdict(i, open.seq, threshold);
        let mut record = open.record;
        record.state = StallState::Ended;
        record.duration = Duration::from_nanos(end.saturating_sub(open.start_ns));
        record.exact_end = exact_end;
        record.uncertainty += Duration::from_nanos(end_err);
        record.cause = cause;
        record.hint = hint_for(record.layer, &cause);
        record.cause_shares = shares;
        record.cpu = cpu;
        self.states[i].probe = None;
        self.shared.in_progress[record.layer as usize].fetch_sub(1, Ordering::Relaxed);
        self.deliver_ended(
            i,
            open.kind,
            record,
            open.raw_stack,
            open.start_ns,
            end,
            now,
        );
    }

    /// Sends an ended stall of `kind` on slot `i` (its poll ran from `start_ns` to `end_ns`),
    /// or holds it a moment for the tasks queued behind it, when victims are tracked: their
    /// records say how long they waited.
    #[allow(clippy::too_many_arguments)]
    fn deliver_ended(
        &mut self,
        i: usize,
        kind: KindId,
        record: Stall,
        raw_stack: Option<Arc<[usize]>>,
        start_ns: u64,
        end_ns: u64,
        now: u64,
    ) {
        if self.shared.board.waits_known() {
            let window = hold_window_ns(record.threshold.as_nanos() as u64);
            let stalled_task = record.task.id.unwrap_or(0);
            self.states[i].victims.hold(Held {
                kind,
                record,
                raw_stack,
                start_ns,
                end_ns,
                until_ns: now.max(end_ns) + window,
                acc: VictimAcc::of(stalled_task),
            });
            return;
        }
        self.feed_stall(kind, &record);
        self.send(record, raw_stack);
    }

    /// A poll that ended past its threshold between two of the watchdog's looks (or whose
    /// age's lower bound never reached the threshold while it ran): its owner timed its end
    /// with the real clock. It becomes an ended stall with its identity, its duration (the
    /// start within half a tick, unless it was exact), and the verdict of whatever was
    /// sampled of it; no running report, no stack.
    fn catch(&mut self, i: usize, slot: &impl SlotPort, c: Caught, now: u64) {
        let (kind, layer) = self.resolve(c.word);
        let threshold = self.shared.board.threshold_ns(layer);
        if threshold == u64::MAX || kind == OWN {
            return;
        }
        let start = if is_exact(c.start_ns) {
            Window::exact(c.start_ns)
        } else {
            // It began in the window after the clock it read (a tick wide when the watchdog is
            // on time); judged as if it began three quarters of the way in, so a short poll
            // that began late in a window a busy host widened is not taken for a stall.
            let st = &self.states[i];
            let upper = if st.seen_seq == c.seq {
                st.first_seen_ns.min(c.end_ns)
            } else {
                c.end_ns
            };
            let w = self.window_after(c.start_ns.min(upper), upper);
            if c.end_ns.saturating_sub(w.late()) < threshold {
                return;
            }
            w
        };
        if c.end_ns.saturating_sub(start.lo) < threshold {
            return;
        }
        // Its likeliest start: the middle of that window.
        let from = start.mid().min(c.end_ns);
        let duration = c.end_ns - from;
        self.sampler
            .finish(&mut self.kernel, &mut self.states[i].probe);
        let read = SlotRead {
            seq: c.seq,
            stable: true,
            word: c.word,
            task: c.task,
            named: c.named,
            inner: CulpritWord::NONE,
            start_ns: c.start_ns,
        };
        let mut record = self.new_stall(i, slot, kind, layer, &read, (from, duration), threshold);
        record.state = StallState::Ended;
        record.exact_end = true;
        record.uncertainty = Duration::from_nanos(start.error());
        record.stack_status = StackStatus::EndedFirst;
        record.caught_at_end = true;
        let cause = record.cause;
        self.shared.stalls_caught.fetch_add(1, Ordering::Relaxed);
        let kind = self.label_kind(kind, c.named);
        let key = StallKey { kind, layer, cause };
        if let Ok(mut m) = self.shared.stall_counts.lock() {
            *m.entry(key).or_insert(0) += 1;
        }
        if matches!(&self.states[i].probe, Some(p) if p.seq == c.seq) {
            self.states[i].probe = None;
        }
        self.deliver_ended(i, kind, record, None, from, c.end_ns, now);
    }

    /// Hands `f` the exporters' feed, when something is exported.
    fn with_feed(&self, f: impl FnOnce(&mut Feed)) {
        if let Some(Ok(mut feed)) = self.shared.feed.as_ref().map(std::sync::Mutex::lock) {
            f(&mut feed);
        }
    }

    /// An ended stall's exact duration, for the stall-duration histogram.
    fn feed_stall(&self, kind: KindId, record: &Stall) {
        let key = StallKey {
            kind,
            layer: record.layer,
            cause: record.cause,
        };
        let ns = record.duration.as_nanos() as u64;
        self.with_feed(|f| Feed::keep(&mut f.stalls, Feed::STALL_CAP, &mut f.dropped, [(key, ns)]));
    }

    fn send(&mut self, stall: Stall, raw_stack: Option<Arc<[usize]>>) {
        self.out.push(Report::Stall { stall, raw_stack });
    }

    /// The kind a poll of `kind` is counted under in the metrics: its named culprit (`named`:
    /// a route the tower layer names inside a task with no name, such as axum's connection
    /// task under the poll hooks) where the task itself has no name, as its report names it.
    fn label_kind(&mut self, kind: KindId, named: CulpritWord) -> KindId {
        if named.is_none() || kind == OWN || self.shared.board.kinds.get(kind).name.is_some() {
            return kind;
        }
        self.resolve(named).0
    }

    fn resolve(&mut self, word: CulpritWord) -> (KindId, LayerKind) {
        match word.decode() {
            Culprit::Location(_) => {
                let board = &self.shared.board;
                let kind = *self
                    .locations
                    .entry(word)
                    .or_insert_with(|| board.resolve(word).0);
                (kind, LayerKind::Async)
            }
            _ => self.shared.board.resolve(word),
        }
    }

    /// Names the task of a poll: its id and site come from the outermost culprit (the task
    /// itself: tokio's task span or poll hook, or the outermost span); its name from the
    /// outermost culprit that has one; `span` is the innermost span open, if another.
    fn task_info(&mut self, kind: KindId, r: &SlotRead) -> TaskInfo {
        let k = self.shared.board.kinds.get(kind).clone();
        let mut info = TaskInfo {
            name: k.name.clone(),
            id: (r.task != 0).then_some(r.task),
            site: k.site.clone(),
            span: None,
            dependency: k.dependency,
            named_by_stack: false,
        };
        if info.name.is_none() && !r.named.is_none() {
            let (n, _) = self.resolve(r.named);
            info.name = self.shared.board.kinds.get(n).name.clone();
        }
        if !r.inner.is_none() {
            let (inner, _) = self.resolve(r.inner);
            let ik = self.shared.board.kinds.get(inner);
            // tokio's task span inside a poll hook is the task itself (same site): not a span.
            if inner != kind && ik.site != k.site {
                info.span = Some(match (&ik.name, &ik.site) {
                    (Some(n), Some(s)) => format!("{n} ({s})").into(),
                    _ => ik.label().into(),
                });
            }
        }
        info
    }

    /// Schedule delays drained from slot `i`: timed ones go into the histograms; long ones are
    /// matched with the stalls that ended on that slot (their victims).
    fn take_waits(&mut self, i: usize, now: u64) {
        let floor = self.shared.board.threshold_ns(LayerKind::Async) / 10;
        let mut waits = std::mem::take(&mut self.waits);
        let mut timed = Vec::new();
        for r in waits.drain(..) {
            let waited = r.measure.nanos();
            let (kind, layer) = self.resolve(r.word);
            if kind == OWN {
                continue;
            }
            if r.measure.is_timed_wait() {
                timed.push(((kind, layer), waited));
            }
            if layer == LayerKind::Blocking {
                if waited >= floor * 10 {
                    if let Some(n) = self.pools.slow_start(&self.shared, kind, waited, now) {
                        self.out.push(Report::Notice(n));
                    }
                }
                continue;
            }
            // A poll queued behind a stall is a victim whatever its span: it was noted only
            // because a stall had just ended on its worker.
            let queued = r.measure.is_queued();
            if waited < floor && !queued {
                continue;
            }
            let to_ns = if r.start == CLOCK_UNKNOWN {
                now
            } else {
                r.start
            };
            self.states[i].victims.note(WaitRec {
                kind,
                task: r.task,
                from_ns: to_ns.saturating_sub(waited),
                to_ns,
                queued,
            });
        }
        self.waits = waits;
        self.states[i].victims.forget_old(now);
        if timed.is_empty() {
            return;
        }
        record_all(&self.shared.sched_hist, &timed);
        self.with_feed(|f| {
            Feed::keep(
                &mut f.sched,
                Feed::CAP,
                &mut f.dropped,
                timed.iter().copied(),
            )
        });
    }

    /// Sends the held stalls of slot `i` whose wait for victims is over (all with `force`).
    fn release_held(&mut self, i: usize, now: u64, force: bool) {
        let Some(st) = self.states.get_mut(i) else {
            return;
        };
        for h in st.victims.ready(now, force) {
            let Held {
                kind,
                mut record,
                raw_stack,
                acc,
                ..
            } = h;
            record.victims = acc.victims(&self.shared.board.kinds);
            let key = (record.layer, record.cause.kind());
            if acc.count > 0 {
                if let Ok(mut m) = self.shared.victim_counts.lock() {
                    *m.entry(key).or_insert(0) += acc.count;
                }
                let waits = acc.waits.iter().map(|&w| (key, w));
                self.with_feed(|f| Feed::keep(&mut f.victims, Feed::CAP, &mut f.dropped, waits));
            }
            self.feed_stall(kind, &record);
            self.send(record, raw_stack);
        }
    }

    fn fold_samples(&mut self) {
        if self.samples.is_empty() {
            return;
        }
        let mut samples = std::mem::take(&mut self.samples);
        let mut resolved = std::mem::take(&mut self.resolved);
        resolved.extend(
            samples
                .drain(..)
                .map(|(word, nanos)| (self.resolve(word), nanos))
                .filter(|((kind, _), _)| *kind != OWN),
        );
        self.samples = samples;
        record_all(&self.shared.hist, &resolved);
        self.with_feed(|f| {
            Feed::keep(
                &mut f.polls,
                Feed::CAP,
                &mut f.dropped,
                resolved.iter().copied(),
            );
        });
        resolved.clear();
        self.resolved = resolved;
    }
}

fn worker_info(index: usize, slot: &impl SlotPort) -> WorkerInfo {
    let meta = slot.meta();
    WorkerInfo {
        index,
        thread_name: meta.as_ref().and_then(|m| m.name.clone()),
        tid: meta.and_then(|m| m.tid),
    }
}

/// The name of this process's thread `tid` (`/proc/self/task/<tid>/comm`), where it can be read.
fn thread_name(tid: u64) -> Option<Arc<str>> {
    #[cfg(target_os = "linux")]
    {
        let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
        Some(comm.trim_end().into())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = tid;
        None
    }
}

/// The one-line hint for a stall with `cause` on `layer`: a CPU pool's job sitting in a system
/// call is the pool used for waiting, whatever the call; otherwise the cause's own hint.
fn hint_for(layer: LayerKind, cause: &Cause) -> Option<&'static str> {
    match (layer, cause) {
        (LayerKind::Cpu, Cause::Syscall(_)) => Some(crate::hints::CPU_POOL_WAITING),
        _ => cause.hint(),
    }
}
