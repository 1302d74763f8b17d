//! Task kinds: a task's name and spawn site, interned into a capped, lock-free table.
//!
//! A kind is what metrics and histograms are keyed by (never a task id, which is unbounded).
//! Interning happens when a span or a watched future is created, or on the watchdog thread,
//! never on the poll hot path. Past the cap, new kinds become [`OTHER`] and are counted.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::config::MAX_NAME_BYTES;

/// The id of an interned kind. `0` is [`OTHER`].
pub(crate) type KindId = u32;

/// The kind every task gets once the table is full.
pub(crate) const OTHER: KindId = 0;

/// loopwatch's own task on a watched runtime (the loop-lag heartbeat): never the
/// application's, so never a stall, a histogram sample or a victim. Not in the table.
pub(crate) const OWN: KindId = KindId::MAX;

/// Entries of the keyed cache (see [`Kinds::intern_at`]).
const KEYED: usize = 256;

const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

/// What a task kind is: the task's name (if it has one) and where it was spawned or declared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskKind {
    /// The task's name: `tokio::task::Builder::name`, the span's name, or a watched future's name.
    pub name: Option<Arc<str>>,
    /// `file:line:column` (or `file:line`) of the spawn site or of the instrumented span, with
    /// the file as loopwatch shows paths: relative to its crate for a dependency
    /// (`axum-0.8.9/src/serve/mod.rs:389:5`), never an absolute path of the build machine.
    pub site: Option<Arc<str>>,
    /// The site is in a dependency (a crate from the registry, a git checkout or `vendor/`,
    /// or the standard library), not in the application's own code.
    pub dependency: bool,
}

impl TaskKind {
    /// The label used for this kind: its name, else its site, else `unknown`.
    pub fn label(&self) -> &str {
        self.name
            .as_deref()
            .or(self.site.as_deref())
            .unwrap_or("unknown")
    }

    pub(crate) fn other() -> TaskKind {
        TaskKind {
            name: Some(Arc::from("other")),
            site: None,
            dependency: false,
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.name, &self.site) {
            (Some(n), Some(s)) => write!(f, "{n} ({s})"),
            (Some(n), None) => f.write_str(n),
            (None, Some(s)) => f.write_str(s),
            (None, None) => f.write_str("unknown"),
        }
    }
}

struct Entry {
    state: AtomicU8,
    hash: AtomicU64,
    id: AtomicU32,
    kind: OnceLock<Interned>,
}

/// A kind in the table, with its site's parts as interned: a look-up compares them as they
/// are, parsing nothing (`watch()` interns at every call).
struct Interned {
    kind: TaskKind,
    /// The length of the file's part of `kind.site`, its line and its column (0: none).
    site: Option<(usize, u32, u32)>,
}

/// The capped intern table.
pub(crate) struct Kinds {
    entries: Box<[Entry]>,
    /// `entries` index of each id, in insertion order (`ids[id - 1]`).
    ids: Box<[AtomicUsize]>,
    /// Kinds found again by a `'static` key (see [`intern_at`](Self::intern_at)): a
    /// direct-mapped cache, each entry the key shifted left 16 bits with the kind's id in the
    /// low 16 (0: empty), written once.
    keyed: Box<[AtomicU64]>,
    len: AtomicUsize,
    cap: usize,
    overflow: AtomicU64,
    other: TaskKind,
}

impl fmt::Debug for Kinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kinds")
            .field("len", &self.len.load(Ordering::Relaxed))
            .field("cap", &self.cap)
            .field("overflow", &self.overflow.load(Ordering::Relaxed))
            .finish()
    }
}

impl Kinds {
    pub(crate) fn new(cap: usize) -> Kinds {
        let size = (cap * 2).next_power_of_two().max(8);
        Kinds {
            entries: (0..size)
                .map(|_| Entry {
                    state: AtomicU8::new(EMPTY),
                    hash: AtomicU64::new(0),
                    id: AtomicU32::new(OTHER),
                    kind: OnceLock::new(),
                })
                .collect(),
            ids: (0..cap).map(|_| AtomicUsize::new(usize::MAX)).collect(),
            len: AtomicUsize::new(0),
            cap,
            overflow: AtomicU64::new(0),
            keyed: (0..KEYED).map(|_| AtomicU64::new(0)).collect(),
            other: TaskKind::other(),
        }
    }

    /// Kinds that did not fit and were counted as [`OTHER`].
    pub(crate) fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }

    /// The kind of `id`.
    pub(crate) fn get(&self, id: KindId) -> &TaskKind {
        if id == OTHER {
            return &self.other;
        }
        let slot = self
            .ids
            .get(id as usize - 1)
            .map(|i| i.load(Ordering::Acquire))
            .unwrap_or(usize::MAX);
        self.entries
            .get(slot)
            .and_then(|e| e.kind.get())
            .map(|i| &i.kind)
            .unwrap_or(&self.other)
    }

    /// The kind last interned with `key` by [`intern_at`](Self::intern_at), if the cache still
    /// holds it: for a key that always comes with the same name and site (a span's
    /// `Metadata`), the kind itself; for one whose name varies (a `watch()` call site), a kind
    /// whose name is still to be compared.
    #[inline]
    pub(crate) fn find_at(&self, key: usize) -> Option<KindId> {
        let k = key as u64;
        let cached = self.keyed_entry(k).load(Ordering::Acquire);
        (k != 0 && cached >> 16 == k).then_some((cached & 0xffff) as KindId)
    }

    fn keyed_entry(&self, k: u64) -> &AtomicU64 {
        &self.keyed[(k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as usize % KEYED]
    }

    /// [`intern`](Self::intern) for a kind whose site `key` stands for: the address of a
    /// `'static` value that always comes with the same `site` (a call site's `Location`, a
    /// span's `Metadata`). Found again from a small cache by that address and the name alone
    /// (compared with the kind's), without hashing or showing the site's path: `watch()` and
    /// the layer intern at every future and span. A key seen with several names keeps the
    /// first; the others take [`intern`](Self::intern).
    pub(crate) fn intern_at(
        &self,
        key: usize,
        name: Option<&str>,
        site: Option<(&str, u32, u32)>,
    ) -> KindId {
        let name = name.filter(|n| !n.is_empty());
        if let Some(id) = self.find_at(key) {
            if self.get(id).name.as_deref() == name {
                return id;
            }
        }
        let id = self.intern(name, site);
        let k = key as u64;
        // The key fits beside a 16-bit id (user-space addresses are below 2^48 but with
        // 5-level paging). Written once: a key whose name varies does not take the line from
        // the readers at every call.
        if k != 0 && k >> 48 == 0 && id != OTHER && id <= 0xffff {
            // Released: a reader that sees the entry sees the kind (`ids` and the entry are
            // stored before `intern` returns).
            let _ = self.keyed_entry(k).compare_exchange(
                0,
                (k << 16) | u64::from(id),
                Ordering::Release,
                Ordering::Relaxed,
            );
        }
        id
    }

    /// Interns a kind from its parts. `site` is `(file, line, column)`; a column of 0 is left out.
    /// A name longer than [`MAX_NAME_BYTES`] is cut (names that differ only past the cut are one
    /// kind).
    pub(crate) fn intern(&self, name: Option<&str>, site: Option<(&str, u32, u32)>) -> KindId {
        let shown = site.map(|(f, l, c)| (crate::paths::show(f), l, c));
        let dependency = shown.as_ref().is_some_and(|(s, _, _)| s.dependency);
        let site = shown.as_ref().map(|(s, l, c)| (s.path.as_ref(), *l, *c));
        let cut;
        let name = match name.filter(|n| !n.is_empty()) {
            Some(n) if n.len() > MAX_NAME_BYTES => {
                cut = cut_name(n);
                Some(cut.as_str())
            }
            other => other,
        };
        let mut h = FxHasher(0);
        name.hash(&mut h);
        site.hash(&mut h);
        let hash = h.finish() | 1; // never 0
        let mask = self.entries.len() - 1;
        let mut i = (hash as usize) & mask;
        for _ in 0..self.entries.len() {
            let e = &self.entries[i];
            loop {
                match e.state.load(Ordering::Acquire) {
                    READY => {
                        if e.hash.load(Ordering::Relaxed) == hash {
                            if let Some(k) = e.kind.get() {
                                if matches(k, name, site) {
                                    return e.id.load(Ordering::Relaxed);
                                }
                            }
                        }
                        break;
                    }
                    WRITING => std::hint::spin_loop(),
                    _ => {
                        // Empty: claim it, unless the table is full.
                        if self.len.load(Ordering::Relaxed) >= self.cap {
                            self.overflow.fetch_add(1, Ordering::Relaxed);
                            return OTHER;
                        }
                        if e.state
                            .compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Acquire)
                            .is_err()
                        {
                            continue; // someone else is writing here; look again
                        }
                        let n = self.len.fetch_add(1, Ordering::Relaxed);
                        if n >= self.cap {
                            self.len.fetch_sub(1, Ordering::Relaxed);
                            e.state.store(EMPTY, Ordering::Release);
                            self.overflow.fetch_add(1, Ordering::Relaxed);
                            return OTHER;
                        }
                        let _ = e.kind.set(Interned {
                            kind: TaskKind {
                                name: name.map(Arc::from),
                                site: site.map(|(f, l, c)| Arc::from(format_site(f, l, c))),
                                dependency,
                            },
                            site: site.map(|(f, l, c)| (f.len(), l, c)),
                        });
                        e.hash.store(hash, Ordering::Relaxed);
                        e.id.store(n as KindId + 1, Ordering::Relaxed);
                        self.ids[n].store(i, Ordering::Release);
                        e.state.store(READY, Ordering::Release);
                        return n as KindId + 1;
                    }
                }
            }
            i = (i + 1) & mask;
        }
        self.overflow.fetch_add(1, Ordering::Relaxed);
        OTHER
    }
}

/// `name` cut to at most [`MAX_NAME_BYTES`] bytes on a character boundary, ending in `…`.
fn cut_name(name: &str) -> String {
    const MARK: &str = "…";
    let mut end = MAX_NAME_BYTES - MARK.len();
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut s = String::with_capacity(end + MARK.len());
    s.push_str(&name[..end]);
    s.push_str(MARK);
    s
}

fn matches(k: &Interned, name: Option<&str>, site: Option<(&str, u32, u32)>) -> bool {
    k.kind.name.as_deref() == name
        && match (site, k.site, &k.kind.site) {
            (None, None, _) => true,
            (Some((f, l, c)), Some((len, line, col)), Some(s)) => {
                l == line
                    && c == col
                    && len == f.len()
                    && s.as_bytes().get(..len) == Some(f.as_bytes())
            }
            _ => false,
        }
}

/// A fast, non-cryptographic hasher (the `FxHash` scheme): interning runs on span creation.
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// `s == format_site(file, line, col)`, without allocating.
pub(crate) fn format_site(file: &str, line: u32, col: u32) -> String {
    if col == 0 {
        format!("{file}:{line}")
    } else {
        format!("{file}:{line}:{col}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_name_is_cut_on_a_character_boundary() {
        let kinds = Kinds::new(8);
        let huge = "é".repeat(1 << 19); // 1 MiB of two-byte characters
        let k = kinds.intern(Some(&huge), None);
        let name = kinds.get(k).name.clone().unwrap();
        assert!(name.len() <= MAX_NAME_BYTES, "{}", name.len());
        assert!(name.ends_with('…') && name.starts_with("éé"), "{name}");
        // The same long name is the same kind; a short one is kept whole.
        assert_eq!(kinds.intern(Some(&huge), None), k);
        let short = kinds.intern(Some("short"), None);
        assert_eq!(kinds.get(short).name.as_deref(), Some("short"));
        let exact = "x".repeat(MAX_NAME_BYTES);
        let e = kinds.intern(Some(&exact), None);
        assert_eq!(kinds.get(e).name.as_deref(), Some(exact.as_str()));
    }

    #[test]
    fn same_parts_give_the_same_id() {
        let k = Kinds::new(4);
        let a = k.intern(Some("a"), Some(("src/x.rs", 1, 2)));
        let b = k.intern(Some("b"), Some(("src/x.rs", 1, 2)));
        assert_ne!(a, OTHER);
        assert_ne!(a, b);
        assert_eq!(k.intern(Some("a"), Some(("src/x.rs", 1, 2))), a);
        assert_eq!(k.get(a).name.as_deref(), Some("a"));
        assert_eq!(k.get(a).site.as_deref(), Some("src/x.rs:1:2"));
        // An empty name is no name.
        let c = k.intern(Some(""), Some(("src/y.rs", 3, 0)));
        assert_eq!(k.get(c).label(), "src/y.rs:3");
    }

    #[test]
    fn a_site_matches_by_its_parts_only() {
        let k = Kinds::new(16);
        let base = k.intern(Some("w"), Some(("src/x.rs", 10, 5)));
        let again = |f, l, c| k.intern(Some("w"), Some((f, l, c)));
        assert_eq!(again("src/x.rs", 10, 5), base);
        for other in [
            again("src/x.rs", 10, 6),
            again("src/x.rs", 11, 5),
            again("src/x.rs", 10, 0),
            again("src/x.r", 10, 5),
            again("src/x.rsx", 10, 5),
        ] {
            assert_ne!(other, base);
            assert_ne!(other, OTHER);
        }
        // Two sites that read alike ("a.rs:1:2" both: a file whose name has a colon) are two
        // kinds, each found again.
        let colon = k.intern(None, Some(("a.rs:1", 2, 0)));
        let plain = k.intern(None, Some(("a.rs", 1, 2)));
        assert_ne!(colon, plain);
        assert_eq!(k.get(colon).site, k.get(plain).site);
        assert_eq!(k.intern(None, Some(("a.rs:1", 2, 0))), colon);
        assert_eq!(k.intern(None, Some(("a.rs", 1, 2))), plain);
        assert_eq!(k.intern(None, None), k.intern(None, None));
        assert_ne!(k.intern(None, None), colon);
    }

    #[test]
    fn a_kind_found_again_by_its_key_is_the_one_its_parts_give() {
        static SITE_A: u8 = 0;
        static SITE_B: u8 = 0;
        let (a, b) = (&SITE_A as *const u8 as usize, &SITE_B as *const u8 as usize);
        let k = Kinds::new(16);
        let first = k.intern_at(a, Some("w"), Some(("src/x.rs", 1, 2)));
        assert_eq!(first, k.intern(Some("w"), Some(("src/x.rs", 1, 2))));
        assert_eq!(k.intern_at(a, Some("w"), Some(("src/x.rs", 1, 2))), first);
        // Another name at the same key is another kind, each found again.
        let other = k.intern_at(a, Some("v"), Some(("src/x.rs", 1, 2)));
        assert_ne!(other, first);
        assert_eq!(k.get(other).name.as_deref(), Some("v"));
        assert_eq!(k.intern_at(a, Some("v"), Some(("src/x.rs", 1, 2))), other);
        assert_eq!(k.intern_at(a, Some("w"), Some(("src/x.rs", 1, 2))), first);
        // No name, an empty one: the same kind.
        let unnamed = k.intern_at(b, None, Some(("src/y.rs", 3, 0)));
        assert_eq!(k.intern_at(b, Some(""), Some(("src/y.rs", 3, 0))), unnamed);
        assert_eq!(k.get(unnamed).label(), "src/y.rs:3");
        // A key too wide to keep, and 0: interned each time, the same kind.
        for key in [0, 1 << 56] {
            assert_eq!(k.intern_at(key, Some("w"), Some(("src/x.rs", 1, 2))), first);
        }
        // A full table gives OTHER, never cached as a kind.
        let full = Kinds::new(1);
        let one = full.intern_at(a, Some("one"), None);
        assert_ne!(one, OTHER);
        assert_eq!(full.intern_at(b, Some("two"), None), OTHER);
        assert_eq!(full.intern_at(b, Some("two"), None), OTHER);
        assert_eq!(full.overflow(), 2);
    }

    #[test]
    fn overflow_goes_to_other_and_is_counted() {
        let k = Kinds::new(2);
        k.intern(Some("a"), None);
        k.intern(Some("b"), None);
        assert_eq!(k.intern(Some("c"), None), OTHER);
        assert_eq!(k.intern(Some("d"), None), OTHER);
        assert_eq!(k.overflow(), 2);
        assert_eq!(k.get(OTHER).label(), "other");
        // Known kinds are still found.
        assert_ne!(k.intern(Some("a"), None), OTHER);
    }

    #[test]
    fn concurrent_interning_agrees() {
        let k = Arc::new(Kinds::new(64));
        let ids: Vec<Vec<KindId>> = (0..4)
            .map(|_| {
                let k = k.clone();
                std::thread::spawn(move || {
                    (0..32)
                        .map(|i| k.intern(Some(&format!("t{i}")), None))
                        .collect()
                })
            })
            .map(|h| h.join().unwrap())
            .collect();
        for other in &ids[1..] {
            assert_eq!(&ids[0], other);
        }
        assert_eq!(k.overflow(), 0);
    }
}
