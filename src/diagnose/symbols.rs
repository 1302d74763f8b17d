//! Symbol loading and symbolizing, on a thread of its own (`loopwatch-symbols`): turning a
//! stall's raw stack addresses into frames can take hundreds of milliseconds the first time (the
//! binary's debug info is parsed on first use), so the reporter never waits on it for more than
//! a few milliseconds, and a report that went out without frames is sent once more with them.

use std::collections::{HashMap, HashSet};
use std::panic::catch_unwind;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Stack;
use crate::stall::{Notice, StackStatus, Stall, StallState};

/// The longest a running report waits for its stack to be symbolized; past it the report goes
/// out without frames, and the stall is reported once more when they are ready.
const SYMBOLIZE_WAIT: Duration = Duration::from_millis(5);
/// The same for an ended report. Short too: the reporter waits here, and a running report of
/// the next stall would wait behind it (the detection-latency bench saw 100–230 ms with 250);
/// an ended report whose frames are not ready is held back for them instead (`HOLD_ENDED`).
const SYMBOLIZE_WAIT_ENDED: Duration = Duration::from_millis(5);

/// Symbolizes on a thread of its own (`loopwatch-symbols`), so the reporter never waits more
/// than [`SYMBOLIZE_WAIT`]: the first stack of a process reads the symbol tables (tens of
/// milliseconds; hundreds with `stack_locations`, whose debug info is parsed on first use).
/// Finished stacks by stall id, and the condition variable that says one has arrived.
type Done = Arc<(Mutex<HashMap<u64, Arc<Stack>>>, Condvar)>;

struct Symbolizer {
    jobs: SyncSender<(u64, Arc<[usize]>)>,
    done: Done,
    /// Jobs submitted and not finished: a report waits for its stack only when its job is the
    /// only one, so a backlog never makes every report wait.
    outstanding: Arc<AtomicUsize>,
}

impl Symbolizer {
    fn start(locations: bool) -> Option<Symbolizer> {
        let (jobs, rx) = sync_channel::<(u64, Arc<[usize]>)>(64);
        let done: Done = Arc::default();
        let out = done.clone();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let count = outstanding.clone();
        std::thread::Builder::new()
            .name("loopwatch-symbols".into())
            .spawn(move || {
                lower_priority();
                while let Ok((id, raw)) = rx.recv() {
                    // The first job reads the symbol tables (tens of milliseconds, more with
                    // `stack_locations`): nothing is read before a stack needs it.
                    let stack = catch_unwind(|| symbolize(&raw, locations)).unwrap_or_default();
                    SYMBOLS_READY.store(true, Ordering::Release);
                    let (map, cv) = &*out;
                    if let Ok(mut m) = map.lock() {
                        if m.len() >= 1024 {
                            m.clear(); // bounded: results nobody picked up
                        }
                        m.insert(id, Arc::new(stack));
                    }
                    count.fetch_sub(1, Ordering::AcqRel);
                    cv.notify_all();
                }
            })
            .ok()?;
        Some(Symbolizer {
            jobs,
            done,
            outstanding,
        })
    }

    fn submit(&self, id: u64, raw: Arc<[usize]>) -> bool {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let ok = self.jobs.try_send((id, raw)).is_ok();
        if !ok {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
        }
        ok
    }

    /// How long a report in `state` may wait for its stack now.
    fn patience(&self, state: StallState) -> Duration {
        match (self.outstanding.load(Ordering::Acquire) <= 1, state) {
            (false, _) => Duration::ZERO,
            (true, StallState::Ended) => SYMBOLIZE_WAIT_ENDED,
            (true, _) => SYMBOLIZE_WAIT,
        }
    }

    /// The stack of stall `id`, waiting at most `wait` for it.
    fn get(&self, id: u64, wait: Duration) -> Option<Arc<Stack>> {
        let (map, cv) = &*self.done;
        let deadline = Instant::now() + wait;
        let mut m = map.lock().ok()?;
        loop {
            if let Some(s) = m.get(&id) {
                return Some(s.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            m = cv.wait_timeout(m, left).ok()?.0;
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut m) = self.done.0.lock() {
            m.remove(&id);
        }
    }
}

/// How long a notice is held for its sampled stack's frames (the first stacks of a process
/// can take hundreds of milliseconds; a notice sums 10 s, and is worth a second's wait).
const NOTICE_WAIT: Duration = Duration::from_secs(2);

/// The longest an ended report whose frames are not ready is held back for them. The symbolizer
/// runs at a lowered priority, so on a loaded host the first stacks of a process can take
/// seconds; an ended report is history, and is worth more late with its frames than on time
/// without them.
const HOLD_ENDED: Duration = Duration::from_secs(10);
/// Ended reports held at most; past that one goes out without its frames.
const MAX_HELD: usize = 64;

/// The reporter's side of stacks: which stalls were submitted, the running reports that went
/// out before their frames were ready, and the ended reports held back for theirs.
pub(crate) struct Stacks {
    symbolizer: Option<Symbolizer>,
    submitted: HashSet<u64>,
    late: Vec<Stall>,
    held: Vec<(Stall, Instant)>,
    /// The id the last notice's stack was symbolized under (counting down from the top).
    next_notice_id: u64,
    /// Notices waiting for their stack's frames: id, notice, until when.
    held_notices: Vec<(u64, Notice, Instant)>,
}

impl Stacks {
    /// The reporter's stacks: with a symbolizer thread when `on` (stacks asked for and
    /// diagnosis on), or none (every raw stack is then left unsymbolized); frames with
    /// `file:line` when `locations` (process-wide from then on).
    pub(crate) fn new(on: bool, locations: bool) -> Stacks {
        Stacks {
            symbolizer: on.then(|| Symbolizer::start(locations)).flatten(),
            submitted: HashSet::new(),
            late: Vec::new(),
            held: Vec::new(),
            next_notice_id: u64::MAX,
            held_notices: Vec::new(),
        }
    }

    /// Gives `stall` its frames, waiting for them a few milliseconds at most. Returns the
    /// report to deliver now, or `None` if it is an ended report held back for its frames
    /// (it comes out of [`ready_late`](Self::ready_late) later).
    pub(crate) fn attach(&mut self, mut stall: Stall, raw: Option<&Arc<[usize]>>) -> Option<Stall> {
        let Some(raw) = raw else { return Some(stall) };
        let Some(sym) = &self.symbolizer else {
            return Some(stall);
        };
        if self.submitted.len() >= 1024 {
            self.submitted.clear(); // bounded: ids whose ended report was dropped
        }
        if self.submitted.insert(stall.id) && !sym.submit(stall.id, raw.clone()) {
            stall.stack_status = StackStatus::Failed;
            return Some(stall);
        }
        match sym.get(stall.id, sym.patience(stall.state)) {
            Some(stack) => {
                stall.stack = Some(stack);
                stall.name_by_stack();
            }
            None => {
                stall.stack_status = StackStatus::Loading;
                if stall.state == StallState::Running && self.late.len() < 64 {
                    self.late.push(stall.clone());
                }
            }
        }
        if stall.state == StallState::Ended {
            self.submitted.remove(&stall.id);
            self.late.retain(|s| s.id != stall.id);
            if stall.stack.is_none() && self.held.len() < MAX_HELD {
                self.held.push((stall, Instant::now() + HOLD_ENDED));
                return None;
            }
            sym.forget(stall.id);
        }
        Some(stall)
    }

    /// A thousand-cuts notice with a sampled stack: held until its frames are ready (to name
    /// the code by its top frame) for [`NOTICE_WAIT`] at most; `Some` if it goes out now
    /// (no symbolizer, or its queue is full).
    pub(crate) fn hold_notice(&mut self, n: Notice) -> Option<Notice> {
        let Notice::ThousandCuts {
            stack: Some(raw), ..
        } = &n
        else {
            return Some(n);
        };
        let Some(sym) = &self.symbolizer else {
            return Some(n);
        };
        if self.held_notices.len() >= MAX_HELD {
            return Some(n);
        }
        // Ids from the top down: stall ids count up from 1 and never get there.
        self.next_notice_id = self.next_notice_id.wrapping_sub(1).max(u64::MAX / 2);
        let id = self.next_notice_id;
        if !sym.submit(id, raw.clone()) {
            return Some(n);
        }
        self.held_notices
            .push((id, n, Instant::now() + NOTICE_WAIT));
        None
    }

    /// Held notices whose frames are ready (named by the top frame of the application's own
    /// code), or that waited [`NOTICE_WAIT`] (unnamed); all of them when `all`.
    pub(crate) fn ready_notices(&mut self, all: bool) -> Vec<Notice> {
        let Some(sym) = &self.symbolizer else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut ready = Vec::new();
        self.held_notices.retain_mut(|(id, n, deadline)| {
            let stack = sym.get(*id, Duration::ZERO);
            if stack.is_none() && !all && now < *deadline {
                return true;
            }
            sym.forget(*id);
            if let Notice::ThousandCuts { top_frame, .. } = n {
                *top_frame = stack.as_deref().and_then(|s| {
                    let name = s.top_user_frame()?.function_name()?;
                    Some(name.into())
                });
            }
            ready.push(n.clone());
            false
        });
        ready
    }

    /// Is an ended report (or a notice) held back for its frames?
    pub(crate) fn holding(&self) -> bool {
        !self.held.is_empty() || !self.held_notices.is_empty()
    }

    /// Reports whose frames are now ready, with `true` for a running report reported once
    /// more (it went out without them), `false` for an ended report held back until now (with
    /// its frames, or without them once it was held [`HOLD_ENDED`]).
    pub(crate) fn ready_late(&mut self) -> Vec<(Stall, bool)> {
        let Some(sym) = &self.symbolizer else {
            return Vec::new();
        };
        let mut ready = Vec::new();
        self.late.retain(|s| match sym.get(s.id, Duration::ZERO) {
            Some(stack) => {
                let mut s = s.clone();
                s.stack = Some(stack);
                s.stack_status = StackStatus::Captured;
                s.name_by_stack();
                ready.push((s, true));
                false
            }
            None => true,
        });
        let now = Instant::now();
        let mut i = 0;
        while i < self.held.len() {
            let id = self.held[i].0.id;
            let stack = sym.get(id, Duration::ZERO);
            if stack.is_none() && now < self.held[i].1 {
                i += 1;
                continue;
            }
            let (mut s, _) = self.held.swap_remove(i);
            if let Some(stack) = stack {
                s.stack = Some(stack);
                s.stack_status = StackStatus::Captured;
                s.name_by_stack();
            }
            sym.forget(id);
            ready.push((s, false));
        }
        ready
    }

    /// The ended reports still held (loopwatch is stopping): they go out as they are.
    pub(crate) fn release_held(&mut self) -> Vec<Stall> {
        let held = std::mem::take(&mut self.held);
        if let Some(sym) = &self.symbolizer {
            for (s, _) in &held {
                sym.forget(s.id);
            }
        }
        held.into_iter().map(|(s, _)| s).collect()
    }
}

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
fn symbolize(raw: &[usize], locations: bool) -> Stack {
    super::symbolize::symbolize(raw, locations)
}

#[cfg(not(all(target_os = "linux", not(loopwatch_portable))))]
fn symbolize(_raw: &[usize], _locations: bool) -> Stack {
    Stack::default()
}

/// Set once the symbol tables of the executable are loaded (by the first stack, or by
/// [`wait_for_symbols`]).
static SYMBOLS_READY: AtomicBool = AtomicBool::new(false);

/// Loads the symbol tables now (on a thread of its own, once; with the debug info when
/// `locations`) and waits up to `timeout` for them: loopwatch otherwise reads them at the first stack, so a process that never stalls
/// never pays for them.
pub(crate) fn wait_for_symbols(timeout: Duration, locations: bool) -> bool {
    static LOAD: std::sync::Once = std::sync::Once::new();
    if !SYMBOLS_READY.load(Ordering::Acquire) {
        LOAD.call_once(|| {
            let spawned = std::thread::Builder::new()
                .name("loopwatch-symbols-load".into())
                .spawn(move || {
                    crate::board::mark_own_thread();
                    let here = [wait_for_symbols as *const () as usize];
                    let _ = catch_unwind(|| symbolize(&here, locations));
                    SYMBOLS_READY.store(true, Ordering::Release);
                });
            if spawned.is_err() {
                SYMBOLS_READY.store(true, Ordering::Release); // nothing to wait for
            }
        });
    }
    let deadline = Instant::now() + timeout;
    while !SYMBOLS_READY.load(Ordering::Acquire) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// The symbolizer thread runs at a lowered priority (nice 10): symbolizing is work nobody
/// waits on, and never takes a core from the service.
fn lower_priority() {
    crate::board::mark_own_thread();
    #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
    // SAFETY: setpriority on the calling thread (0), valid arguments.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}
