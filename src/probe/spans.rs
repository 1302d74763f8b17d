//! A lock-free map from live span ids to what the layer needs on enter: the culprit word
//! (kind and layer) and the task id.
//!
//! Written when a span is created and removed when it closes (both off the poll path), read on
//! every enter and exit. It starts with one table of up to 65,536 entries and adds tables of
//! twice the size of the last as live spans outgrow it (never moving an entry, so a read needs
//! no lock), up to the configured number of spans; a span that finds no room then is not
//! followed, and is counted. A look-up tries the tables in order: a service with up to tens of
//! thousands of live spans pays for one.

use crate::words::CulpritWord;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::OnceLock;

/// How many neighbouring entries a span id may land in.
const WINDOW: usize = 8;
/// Entries of the first table, at most.
const FIRST: usize = 1 << 16;
/// Tables at most: enough for 2^16 · (2^19 - 1) entries, far past any limit accepted.
const TABLES: usize = 19;

#[derive(Debug, Default)]
struct Entry {
    id: AtomicU64,
    word: AtomicU64,
    task: AtomicU64,
}

#[derive(Debug)]
struct Table {
    /// A power of two of them.
    entries: Box<[Entry]>,
    mask: usize,
}

impl Table {
    fn new(size: usize) -> Table {
        assert!(size.is_power_of_two());
        Table {
            entries: (0..size).map(|_| Entry::default()).collect(),
            mask: size - 1,
        }
    }

    /// Where `id` lands first.
    #[inline]
    fn home(&self, id: u64) -> usize {
        (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize
    }

    /// The entry `i` places past `home` (wrapping).
    #[inline]
    fn at(&self, home: usize, i: usize) -> &Entry {
        // SAFETY: `mask` is the length less one, a power of two less one (see `new`), so the
        // index is in bounds. (The bounds check is most of a look-up's cost otherwise.)
        unsafe { self.entries.get_unchecked((home + i) & self.mask) }
    }

    #[inline]
    fn window(&self, id: u64) -> impl Iterator<Item = &Entry> {
        let home = self.home(id);
        (0..WINDOW).map(move |i| self.at(home, i))
    }

    /// What `id` holds if it is in its home entry (the common case).
    #[inline]
    fn get_home(&self, id: u64) -> Option<(CulpritWord, u64)> {
        let e = self.at(self.home(id), 0);
        // Relaxed, then a fence on a match only: the entry's fields are read after its id,
        // as `insert` published them (the id stored last, with release).
        if e.id.load(Ordering::Relaxed) != id {
            return None;
        }
        fence(Ordering::Acquire);
        Some((
            CulpritWord::from_bits(e.word.load(Ordering::Relaxed)),
            e.task.load(Ordering::Relaxed),
        ))
    }

    fn insert(&self, id: u64, word: CulpritWord, task: u64) -> bool {
        for e in self.window(id) {
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
        false
    }
}

#[derive(Debug)]
pub(crate) struct SpanTable {
    /// The first table (made with the map: no "is it there" test on the common look-up).
    first: Table,
    /// The tables added as live spans outgrow the ones before.
    rest: [OnceLock<Table>; TABLES - 1],
    /// Entries at most, over all tables.
    limit: usize,
    dropped: AtomicU64,
}

impl SpanTable {
    /// A table that follows up to about `capacity` live spans (its first table allocated now,
    /// the others as they are needed).
    pub(crate) fn new(capacity: usize) -> SpanTable {
        let limit = capacity.max(WINDOW);
        SpanTable {
            first: Table::new(Self::size(0, limit)),
            rest: Default::default(),
            limit,
            dropped: AtomicU64::new(0),
        }
    }

    /// The size of table `k`: the first holds up to [`FIRST`] (fewer if the limit is lower),
    /// each next one twice the one before.
    fn size(k: usize, limit: usize) -> usize {
        limit.min(FIRST).next_power_of_two().max(WINDOW) << k
    }

    /// Spans that found no room.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Entries allocated (for the memory a run costs: 24 bytes each).
    #[cfg(test)]
    pub(crate) fn allocated(&self) -> usize {
        self.tables().map(|t| t.entries.len()).sum()
    }

    /// The tables made so far, in order.
    fn tables(&self) -> impl Iterator<Item = &Table> {
        std::iter::once(&self.first).chain(self.rest.iter().map_while(OnceLock::get))
    }

    pub(crate) fn insert(&self, id: u64, word: CulpritWord, task: u64) -> bool {
        let mut allocated = 0;
        for k in 0..TABLES {
            let table = match k.checked_sub(1).map(|r| &self.rest[r]) {
                None => &self.first,
                Some(t) => match t.get() {
                    Some(t) => t,
                    None => {
                        let size = Self::size(k, self.limit);
                        if allocated >= self.limit {
                            break;
                        }
                        // Racing creators: one table wins, the others' are dropped unused.
                        t.get_or_init(|| Table::new(size))
                    }
                },
            };
            if table.insert(id, word, task) {
                return true;
            }
            allocated += table.entries.len();
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// What the layer keeps of live span `id`, if it follows it.
    pub(crate) fn get(&self, id: u64) -> Option<(CulpritWord, u64)> {
        self.get_home(id).or_else(|| self.get_rest(id))
    }

    /// [`get`](Self::get) of a span in its home entry of the first table (most of them), in a
    /// few instructions; `None` may mean it is elsewhere (see [`get_rest`](Self::get_rest)).
    #[inline]
    pub(crate) fn get_home(&self, id: u64) -> Option<(CulpritWord, u64)> {
        self.first.get_home(id)
    }

    /// [`get`](Self::get) past the first table's home entry.
    #[inline(never)]
    pub(crate) fn get_rest(&self, id: u64) -> Option<(CulpritWord, u64)> {
        for table in self.tables() {
            for e in table.window(id) {
                if e.id.load(Ordering::Acquire) == id {
                    return Some((
                        CulpritWord::from_bits(e.word.load(Ordering::Relaxed)),
                        e.task.load(Ordering::Relaxed),
                    ));
                }
            }
        }
        None
    }

    pub(crate) fn remove(&self, id: u64) {
        for table in self.tables() {
            for e in table.window(id) {
                if e.id.load(Ordering::Relaxed) == id {
                    e.id.store(0, Ordering::Release);
                    return;
                }
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
    fn a_million_live_spans_are_all_followed_in_tables_added_as_needed() {
        let t = SpanTable::new(1 << 21);
        assert_eq!(t.allocated(), 1 << 16, "one table until it is outgrown");
        let n = 1_000_000u64;
        for id in 1..=n {
            assert!(t.insert(id, w(id), id * 10), "span {id}");
        }
        assert_eq!(t.dropped(), 0);
        for id in (1..=n).step_by(997) {
            assert_eq!(t.get(id), Some((w(id), id * 10)));
        }
        // 2^16 + 2^17 + ... : at most 2^21 entries of 24 bytes (48 MiB) for a million.
        let entries = t.allocated();
        assert!(entries <= 1 << 21, "{entries}");
        for id in 1..=n {
            t.remove(id);
        }
        assert_eq!(t.get(5), None);
        // Removed entries are reused: the table does not grow again.
        for id in n + 1..=2 * n {
            assert!(t.insert(id, w(id), 0));
        }
        assert_eq!(t.allocated(), entries);
    }

    #[test]
    fn past_its_limit_a_span_is_dropped_and_counted() {
        let t = SpanTable::new(64);
        let mut followed = 0;
        for id in 1..=10_000 {
            followed += u64::from(t.insert(id, w(id), 0));
        }
        assert!(followed >= 64, "{followed}");
        assert!(t.allocated() <= 256, "{}", t.allocated());
        assert_eq!(t.dropped(), 10_000 - followed);
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
