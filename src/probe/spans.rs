//! A fixed-size, lock-free map from live span ids to what the layer needs on enter: the
//! culprit word (kind and layer) and the task id.
//!
//! Written when a span is created and removed when it closes (both off the poll path), read on
//! every enter and exit. A span that finds no room is not followed, and is counted.

use crate::words::CulpritWord;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many neighbouring entries a span id may land in.
const WINDOW: usize = 8;

#[derive(Debug, Default)]
struct Entry {
    id: AtomicU64,
    word: AtomicU64,
    task: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct SpanTable {
    entries: Box<[Entry]>,
    mask: usize,
    dropped: AtomicU64,
}

impl SpanTable {
    pub(crate) fn new(capacity: usize) -> SpanTable {
        let size = capacity.next_power_of_two().max(WINDOW);
        SpanTable {
            entries: (0..size).map(|_| Entry::default()).collect(),
            mask: size - 1,
            dropped: AtomicU64::new(0),
        }
    }

    #[inline]
    fn home(&self, id: u64) -> usize {
        (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.mask
    }

    /// Spans that found no room.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn insert(&self, id: u64, word: CulpritWord, task: u64) -> bool {
        let home = self.home(id);
        for i in 0..WINDOW {
            let e = &self.entries[(home + i) & self.mask];
            if e.id.load(Ordering::Relaxed) == 0
                && e.id
                    .compare_exchange(0, u64::MAX, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                e.word.store(word.bits(), Ordering::Relaxed);
                e.task.store(task, Ordering::Relaxed);
                e.id.store(id, Ordering::Release);
                return true;
            }
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    #[inline]
    pub(crate) fn get(&self, id: u64) -> Option<(CulpritWord, u64)> {
        let home = self.home(id);
        for i in 0..WINDOW {
            let e = &self.entries[(home + i) & self.mask];
            if e.id.load(Ordering::Acquire) == id {
                return Some((
                    CulpritWord::from_bits(e.word.load(Ordering::Relaxed)),
                    e.task.load(Ordering::Relaxed),
                ));
            }
        }
        None
    }

    pub(crate) fn remove(&self, id: u64) {
        let home = self.home(id);
        for i in 0..WINDOW {
            let e = &self.entries[(home + i) & self.mask];
            if e.id.load(Ordering::Relaxed) == id {
                e.id.store(0, Ordering::Release);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(bits: u64) -> CulpritWord {
        CulpritWord::from_bits(bits)
    }

    #[test]
    fn insert_get_remove() {
        let t = SpanTable::new(16);
        assert!(t.insert(7, w(70), 700));
        assert_eq!(t.get(7), Some((w(70), 700)));
        t.remove(7);
        assert_eq!(t.get(7), None);
    }

    #[test]
    fn a_full_neighbourhood_drops_and_counts() {
        let t = SpanTable::new(8);
        for id in 1..=8 {
            assert!(t.insert(id, w(id), 0));
        }
        assert!(!t.insert(9, w(9), 0));
        assert_eq!(t.dropped(), 1);
        for id in 1..=8 {
            assert_eq!(t.get(id), Some((w(id), 0)));
        }
        t.remove(3);
        assert!(t.insert(9, w(9), 0));
        assert_eq!(t.get(9), Some((w(9), 0)));
    }
}
