//! Victims: the tasks that waited behind a stall. A probe that knows schedule delays (tokio's
//! poll hooks with schedule latency, or watched futures' wake notes) hands the watchdog a wait
//! record for each long wait; the poll hooks without them hand it a *queued* record for each
//! of the polls that follow a stall on its worker, as many as were queued on it at the stall's
//! end. The watchdog holds an ended stall back for a moment ([`hold_window_ns`]) and counts
//! every record on the same worker that overlapped it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::kinds::{KindId, Kinds};
use crate::stall::{Stall, Victim, Victims};

/// Victims listed one by one per stall, at most (the longest waits); the rest are counted.
pub(crate) const MAX_VICTIMS: usize = 16;

/// Waits kept per stall for the victim-wait histogram, at most.
const MAX_WAITS: usize = 4096;

/// Recent waits kept per slot, at most: when full, the older half goes.
const MAX_RECENT: usize = 512;

/// A wait older than this (board nanoseconds) cannot belong to a stall still to be seen ending.
const RECENT_HORIZON_NS: u64 = 1_000_000_000;

pub(crate) use crate::board::hold_window_ns;

/// A task that waited at least the wait floor before a poll on this slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WaitRec {
    pub(crate) kind: KindId,
    /// Its task id (0: unknown).
    pub(crate) task: u64,
    /// From its wake to its poll's start (board clock).
    pub(crate) from_ns: u64,
    pub(crate) to_ns: u64,
    /// Queued behind a stall that ended on its worker, its wake not known: `from_ns` is that
    /// stall's start, and the wait is not measured.
    pub(crate) queued: bool,
}

/// An ended stall waiting for its victims' records.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) kind: KindId,
    pub(crate) record: Stall,
    pub(crate) raw_stack: Option<Arc<[usize]>>,
    pub(crate) start_ns: u64,
    pub(crate) end_ns: u64,
    /// Sent when the watchdog's clock passes this.
    pub(crate) until_ns: u64,
    pub(crate) acc: VictimAcc,
}

/// Victims gathered so far for one stall.
#[derive(Debug, Default)]
pub(crate) struct VictimAcc {
    /// The stalled task's id (0: unknown): a task never waits behind its own poll.
    stalled_task: u64,
    pub(crate) count: u64,
    /// Of `count`, those queued behind the stall whose waits were not measured.
    pub(crate) unmeasured: u64,
    pub(crate) total_ns: u64,
    pub(crate) worst_ns: u64,
    /// The longest waits (kind, task id, ns), at most [`MAX_VICTIMS`].
    top: Vec<(KindId, u64, u64)>,
    kinds: HashMap<KindId, u64>,
    /// Each victim's wait behind the stall (for the histogram), at most [`MAX_WAITS`].
    pub(crate) waits: Vec<u64>,
}

impl VictimAcc {
    /// Victims of a stall of the task `stalled_task` (0: unknown).
    pub(crate) fn of(stalled_task: u64) -> VictimAcc {
        VictimAcc {
            stalled_task,
            ..VictimAcc::default()
        }
    }

    /// Counts `w` if it overlapped the stall `[stall_start, stall_end]`: the overlap is how long
    /// it waited behind this stall.
    pub(crate) fn add(&mut self, w: &WaitRec, stall_start: u64, stall_end: u64) {
        if w.task != 0 && w.task == self.stalled_task {
            return;
        }
        let overlap = w
            .to_ns
            .min(stall_end)
            .saturating_sub(w.from_ns.max(stall_start));
        if overlap == 0 {
            return;
        }
        self.count += 1;
        *self.kinds.entry(w.kind).or_insert(0) += 1;
        // A queued task's wait is not known: it is listed (with no wait) only while there is
        // room, and adds nothing to the waits.
        if w.queued {
            self.unmeasured += 1;
            if self.top.len() < MAX_VICTIMS {
                self.top.push((w.kind, w.task, 0));
            }
            return;
        }
        self.total_ns = self.total_ns.saturating_add(overlap);
        self.worst_ns = self.worst_ns.max(overlap);
        if self.waits.len() < MAX_WAITS {
            self.waits.push(overlap);
        }
        if self.top.len() < MAX_VICTIMS {
            self.top.push((w.kind, w.task, overlap));
        } else if let Some(min) = self.top.iter_mut().min_by_key(|t| t.2) {
            if min.2 < overlap {
                *min = (w.kind, w.task, overlap);
            }
        }
    }

    /// The stall's [`Victims`]: the longest waits one by one, and the five commonest kinds.
    pub(crate) fn victims(&self, kinds: &Kinds) -> Victims {
        let label = |k: KindId| -> Arc<str> { Arc::from(kinds.get(k).label()) };
        let mut tasks: Vec<Victim> = self
            .top
            .iter()
            .map(|&(k, task, ns)| Victim {
                kind: label(k),
                task_id: (task != 0).then_some(task),
                waited: Duration::from_nanos(ns),
            })
            .collect();
        tasks.sort_by_key(|v| std::cmp::Reverse(v.waited));
        let mut top: Vec<(KindId, u64)> = self.kinds.iter().map(|(&k, &n)| (k, n)).collect();
        top.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        top.truncate(5);
        Victims {
            tracked: true,
            count: self.count,
            unmeasured: self.unmeasured,
            total_wait: Duration::from_nanos(self.total_ns),
            worst_wait: Duration::from_nanos(self.worst_ns),
            tasks,
            top_kinds: top.into_iter().map(|(k, n)| (label(k), n)).collect(),
        }
    }
}

/// One slot's victim book: the stalls held for their victims, and the recent long waits (a
/// victim's record can be drained before the watchdog sees the stall's end).
#[derive(Debug, Default)]
pub(crate) struct SlotVictims {
    held: Vec<Held>,
    recent: Vec<WaitRec>,
}

impl SlotVictims {
    /// Holds an ended stall; the recent waits that overlapped it count at once.
    pub(crate) fn hold(&mut self, mut held: Held) {
        for w in &self.recent {
            held.acc.add(w, held.start_ns, held.end_ns);
        }
        self.held.push(held);
    }

    /// A long wait on this slot: a victim of every held stall it overlapped, and kept a while
    /// for the stalls whose end is still to be seen.
    pub(crate) fn note(&mut self, w: WaitRec) {
        for h in &mut self.held {
            h.acc.add(&w, h.start_ns, h.end_ns);
        }
        if self.recent.len() >= MAX_RECENT {
            self.recent.drain(..MAX_RECENT / 2);
        }
        self.recent.push(w);
    }

    /// Forgets the waits too old to belong to a stall still to be seen ending.
    pub(crate) fn forget_old(&mut self, now: u64) {
        let horizon = now.saturating_sub(RECENT_HORIZON_NS);
        self.recent.retain(|w| w.to_ns >= horizon);
    }

    pub(crate) fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// The held stalls whose wait for victims is over at `now` (all of them with `force`).
    pub(crate) fn ready(&mut self, now: u64, force: bool) -> Vec<Held> {
        let (ready, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| force || now >= h.until_ns);
        self.held = keep;
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::OTHER;

    fn wait(task: u64, from_ns: u64, to_ns: u64) -> WaitRec {
        WaitRec {
            kind: OTHER,
            task,
            from_ns,
            to_ns,
            queued: false,
        }
    }

    fn queued(task: u64, stall_start: u64, polled: u64) -> WaitRec {
        WaitRec {
            queued: true,
            ..wait(task, stall_start, polled)
        }
    }

    #[test]
    fn a_queued_task_counts_as_a_victim_with_no_wait_and_makes_way_for_measured_ones() {
        let mut acc = VictimAcc::of(7);
        // Queued behind the stall [10, 30]: polled after it, noted from its start.
        acc.add(&queued(1, 10, 31), 10, 30);
        acc.add(&queued(2, 10, 32), 10, 30);
        // The stalled task itself, and a record of a later stall, are not its victims.
        acc.add(&queued(7, 10, 33), 10, 30);
        acc.add(&queued(3, 40, 45), 10, 30);
        acc.add(&wait(4, 0, 31), 10, 30);
        assert_eq!((acc.count, acc.unmeasured), (3, 2));
        assert_eq!((acc.total_ns, acc.worst_ns), (20, 20));
        assert_eq!(acc.waits, vec![20]);
        let v = acc.victims(&Kinds::new(4));
        assert_eq!((v.count, v.unmeasured), (3, 2));
        // The measured wait first; the queued ones with no wait.
        let listed: Vec<_> = v.tasks.iter().map(|t| (t.task_id, t.waited)).collect();
        assert_eq!(
            listed,
            vec![
                (Some(4), Duration::from_nanos(20)),
                (Some(1), Duration::ZERO),
                (Some(2), Duration::ZERO)
            ]
        );
        // Full of queued ones, a measured wait still takes a place.
        let mut acc = VictimAcc::of(0);
        for task in 1..=MAX_VICTIMS as u64 {
            acc.add(&queued(task, 0, 101), 0, 100);
        }
        acc.add(&wait(99, 50, 101), 0, 100);
        let v = acc.victims(&Kinds::new(4));
        assert_eq!(
            (v.count, v.unmeasured),
            (MAX_VICTIMS as u64 + 1, MAX_VICTIMS as u64)
        );
        assert_eq!(v.tasks.len(), MAX_VICTIMS);
        assert_eq!(v.tasks[0].task_id, Some(99));
    }

    #[test]
    fn a_victim_counts_for_its_overlap_with_the_stall_only() {
        let mut acc = VictimAcc::of(7);
        acc.add(&wait(1, 0, 50), 10, 30);
        acc.add(&wait(2, 15, 20), 10, 30);
        acc.add(&wait(3, 30, 40), 10, 30);
        acc.add(&wait(7, 0, 50), 10, 30);
        assert_eq!((acc.count, acc.total_ns, acc.worst_ns), (2, 25, 20));
        assert_eq!(acc.waits, vec![20, 5]);
    }

    #[test]
    fn only_the_longest_waits_are_listed_one_by_one() {
        let mut acc = VictimAcc::of(0);
        for task in 1..=(MAX_VICTIMS as u64 + 4) {
            acc.add(&wait(task, 100 - task, 100), 0, 100);
        }
        let kinds = Kinds::new(4);
        let v = acc.victims(&kinds);
        assert_eq!(v.count, MAX_VICTIMS as u64 + 4);
        assert_eq!(v.tasks.len(), MAX_VICTIMS);
        assert_eq!(v.tasks[0].task_id, Some(MAX_VICTIMS as u64 + 4));
        assert!(
            v.tasks.iter().all(|t| t.task_id.unwrap() > 4),
            "{:?}",
            v.tasks
        );
    }

    #[test]
    fn a_wait_seen_before_the_stall_was_held_still_counts() {
        let mut book = SlotVictims::default();
        book.note(wait(1, 5, 25));
        book.hold(Held {
            kind: OTHER,
            record: crate::stall::tests_support::stall(),
            raw_stack: None,
            start_ns: 10,
            end_ns: 20,
            until_ns: 30,
            acc: VictimAcc::of(0),
        });
        assert!(book.ready(29, false).is_empty());
        let h = book.ready(30, false);
        assert_eq!(h[0].acc.count, 1);
        assert_eq!(h[0].acc.total_ns, 10);
    }

    #[test]
    fn waits_older_than_a_second_are_forgotten() {
        let mut book = SlotVictims::default();
        book.note(wait(1, 0, 10));
        book.forget_old(2_000_000_000);
        book.hold(Held {
            kind: OTHER,
            record: crate::stall::tests_support::stall(),
            raw_stack: None,
            start_ns: 0,
            end_ns: 20,
            until_ns: 0,
            acc: VictimAcc::of(0),
        });
        assert_eq!(book.ready(0, true)[0].acc.count, 0);
    }
}
