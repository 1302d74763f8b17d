//! The `tracing` probe: a [`tracing_subscriber::Layer`] that sees polls as span enter/exit.
//!
//! Two kinds of spans are followed:
//!
//! - tokio's own `runtime.spawn` spans (tokio's `tracing` feature, built with
//!   `--cfg tokio_unstable`): one per task, entered on every poll, carrying the task's id, name
//!   and spawn location. Every task is seen with no user code changed.
//! - any other span (`#[instrument]`, `.instrument(span)`): its enter/exit on a runtime thread
//!   is a poll of the instrumented future. This works on stable tokio.
//!
//! tokio's resource spans (`runtime.resource*`, targets `tokio::*`) are ignored.

use std::fmt::{self, Write as _};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use tracing_core::dispatcher::WeakDispatch;
use tracing_core::field::{Field, Visit};
use tracing_core::span::{Attributes, Id};
use tracing_core::{Dispatch, Subscriber};
use tracing_subscriber::layer::Context;

use crate::board::Board;
use crate::probe::spans::SpanTable;
use crate::stall::LayerKind;
use crate::words::{CulpritWord, Wait};

/// What the layer shares with the rest of loopwatch.
#[derive(Debug)]
pub(crate) struct LayerShared {
    pub(crate) board: Arc<Board>,
    pub(crate) spans: SpanTable,
    /// The subscriber the layer was added to, so reports go to the same place.
    pub(crate) dispatch: Mutex<Option<WeakDispatch>>,
}

impl LayerShared {
    /// The layer's state over `board`, following at most `max_live_spans` spans at once.
    pub(crate) fn new(board: Arc<Board>, max_live_spans: usize) -> LayerShared {
        LayerShared {
            board,
            spans: SpanTable::new(max_live_spans),
            dispatch: Mutex::new(None),
        }
    }
}

/// Enters span `id`, of culprit `word` and task `task` (0: not recorded, read now).
#[inline(always)]
fn enter_span(shared: &LayerShared, id: u64, word: CulpritWord, task: u64) {
    shared.board.enter(
        id,
        word,
        || if task != 0 { task } else { current_task_id() },
        Wait::UNKNOWN,
    );
}

/// Enters span `id` if it is followed and not in its home entry (or not followed at all).
#[inline(never)]
fn enter_elsewhere(shared: &LayerShared, id: u64) {
    if let Some((word, task)) = shared.spans.get_rest(id) {
        enter_span(shared, id, word, task);
    }
}

/// The `tracing_subscriber` layer that probes polls. Add it to a registry:
///
/// ```
/// use tracing_subscriber::prelude::*;
/// let (layer, _guard) = loopwatch::builder()
/// #   .metrics(loopwatch::MetricsExport::Off) // doctests run side by side: no listener
///     .build()?;
/// let _subscriber = tracing_subscriber::registry().with(layer);
/// # Ok::<(), loopwatch::Error>(())
/// ```
///
/// A disabled loopwatch (`LOOPWATCH_ENABLE=0`) gives a layer that does nothing.
#[derive(Debug, Clone)]
pub struct LoopwatchLayer {
    shared: Option<Arc<LayerShared>>,
}

impl LoopwatchLayer {
    pub(crate) fn new(shared: Option<Arc<LayerShared>>) -> Self {
        LoopwatchLayer { shared }
    }
}

/// tokio's task id as a number (`tokio::task::Id` shows it only through `Display` and `Hash`;
/// its `Hash` writes the number with `write_u64`).
pub(crate) fn task_id_u64(id: tokio::task::Id) -> u64 {
    use std::hash::{Hash, Hasher};
    struct Capture(u64);
    impl Hasher for Capture {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 << 8) | u64::from(*b);
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = n;
        }
    }
    let mut h = Capture(0);
    id.hash(&mut h);
    h.0
}

/// The id of the task being polled on this thread, 0 outside a task.
#[inline]
pub(crate) fn current_task_id() -> u64 {
    tokio::task::try_id().map_or(0, task_id_u64)
}

/// A small string on the stack, for field values read when a span is created.
struct StackStr<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackStr<N> {
    fn new() -> Self {
        StackStr {
            buf: [0; N],
            len: 0,
        }
    }
    fn as_str(&self) -> &str {
        let bytes = &self.buf[..self.len];
        debug_assert!(std::str::from_utf8(bytes).is_ok());
        // SAFETY: `buf[..len]` is only ever written by `write_str`, with whole `&str`s cut at
        // a char boundary: valid UTF-8. (Validated at each read, it cost ~50 instructions per
        // field, four per spawned task with tokio's task spans.)
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

impl<const N: usize> fmt::Write for StackStr<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = N - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The fields of a tokio `runtime.spawn` span, read without allocating.
struct TaskFields {
    kind: StackStr<16>,
    /// The function of a `spawn_blocking` job (tokio's `fn` field), its start only.
    func: StackStr<32>,
    name: StackStr<96>,
    file: StackStr<256>,
    id: u64,
    line: u32,
    col: u32,
}

impl Visit for TaskFields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "task.id" => self.id = value,
            "loc.line" => self.line = u32::try_from(value).unwrap_or(u32::MAX),
            "loc.col" => self.col = u32::try_from(value).unwrap_or(u32::MAX),
            _ => {}
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Ok(v) = u64::try_from(value) {
            self.record_u64(field, v);
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = match field.name() {
            "loc.file" => self.file.write_str(value),
            "kind" => self.kind.write_str(value),
            "task.name" => self.name.write_str(value),
            "fn" => self.func.write_str(value),
            _ => Ok(()),
        };
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let _ = match field.name() {
            "loc.file" => write!(self.file, "{value:?}"),
            "kind" => write!(self.kind, "{value:?}"),
            "task.name" => write!(self.name, "{value:?}"),
            "fn" => write!(self.func, "{value:?}"),
            _ => Ok(()),
        };
    }
}

impl LayerShared {
    fn span_created(&self, attrs: &Attributes<'_>, id: &Id) {
        let meta = attrs.metadata();
        let key = std::ptr::from_ref(meta) as usize;
        // A span of a callsite seen before (its metadata's address: the same name and site,
        // always): its kind from the cache, no test of its name or target. Only followed
        // spans of the application's own are cached (below).
        if let Some(kind) = self.board.kinds.find_at(key) {
            self.spans.insert(
                id.into_u64(),
                CulpritWord::kind(kind, LayerKind::Async, true),
                0,
            );
            return;
        }
        let target = meta.target();
        let (word, task) = if meta.name() == "runtime.spawn" && target.starts_with("tokio::task") {
            let mut f = TaskFields {
                kind: StackStr::new(),
                func: StackStr::new(),
                name: StackStr::new(),
                file: StackStr::new(),
                id: 0,
                line: 0,
                col: 0,
            };
            attrs.record(&mut f);
            if f.kind.as_str() == "blocking" && f.func.as_str().starts_with("tokio::runtime::") {
                // tokio starts its multi-thread workers as blocking tasks: that span is a
                // worker's whole life, not a job (inside it, every task poll is nested).
                return;
            }
            let file = f.file.as_str();
            if crate::board::is_own_site(file, f.line, f.col) {
                return; // loopwatch's own task (the loop-lag heartbeat): not the application's
            }
            let site = (!file.is_empty()).then_some((file, f.line, f.col));
            let layer = if f.kind.as_str() == "blocking" {
                LayerKind::Blocking
            } else {
                LayerKind::Async
            };
            let name = f.name.as_str();
            let named = !name.is_empty();
            let kind = self.board.kinds.intern(named.then_some(name), site);
            (CulpritWord::kind(kind, layer, named), f.id)
        } else if target.starts_with("tokio") || target.starts_with("runtime") {
            return; // tokio's resource spans: not polls
        } else {
            let site = meta.file().map(|f| (f, meta.line().unwrap_or(0), 0));
            let kind = self.board.kinds.intern_at(key, Some(meta.name()), site);
            (CulpritWord::kind(kind, LayerKind::Async, true), 0)
        };
        self.spans.insert(id.into_u64(), word, task);
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for LoopwatchLayer {
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        if let Some(shared) = &self.shared {
            if let Ok(mut d) = shared.dispatch.lock() {
                *d = Some(subscriber.downgrade());
            }
        }
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        if let Some(shared) = &self.shared {
            let _ = catch_unwind(AssertUnwindSafe(|| shared.span_created(attrs, id)));
        }
    }

    #[inline]
    fn on_enter(&self, id: &Id, _ctx: Context<'_, S>) {
        if let Some(shared) = &self.shared {
            let id = id.into_u64();
            // A span in its home entry (most): looked up and entered inline; others out of
            // line (no result to merge from two look-ups on the common path).
            match shared.spans.get_home(id) {
                Some((word, task)) => enter_span(shared, id, word, task),
                None => enter_elsewhere(shared, id),
            }
        }
    }

    #[inline]
    fn on_exit(&self, id: &Id, _ctx: Context<'_, S>) {
        if let Some(shared) = &self.shared {
            // No look-up in the span table on the common path: the board closes what was
            // entered with this id on this thread, and ignores an exit that matches nothing
            // open (a span it does not follow: no two live spans share an id). Only past the
            // depth whose ids it keeps does it ask.
            let id = id.into_u64();
            shared
                .board
                .exit_if(id, move || shared.spans.get(id).is_some());
        }
    }

    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        if let Some(shared) = &self.shared {
            shared.spans.remove(id.into_u64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_read_through_hash_match_display() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (id, shown) = rt.block_on(async {
            tokio::spawn(async {
                let id = tokio::task::id();
                (task_id_u64(id), id.to_string())
            })
            .await
            .unwrap()
        });
        assert_ne!(id, 0);
        assert_eq!(id.to_string(), shown);
    }

    #[test]
    fn a_callsite_seen_again_is_followed_as_its_kind_and_tokios_resource_spans_never_are() {
        use tracing_subscriber::prelude::*;
        let cfg = crate::config::Config::default();
        let board = Arc::new(Board::for_config(&cfg));
        let shared = Arc::new(LayerShared::new(board, 64));
        let subscriber =
            tracing_subscriber::registry().with(LoopwatchLayer::new(Some(shared.clone())));
        tracing::subscriber::with_default(subscriber, || {
            let (mut mine, mut resources) = (Vec::new(), Vec::new());
            // The same callsites three times: the first interns (and caches), the others
            // take the cache (mine) or the tests again (tokio's).
            for _ in 0..3 {
                let a = tracing::info_span!("mine");
                let b = tracing::info_span!(target: "tokio::sync::semaphore", "runtime.resource");
                let c = tracing::info_span!(target: "runtime::resource", "poll_op");
                let id = |s: &tracing::Span| s.id().expect("enabled").into_u64();
                mine.push(shared.spans.get(id(&a)).map(|(word, _)| word));
                resources.push(shared.spans.get(id(&b)));
                resources.push(shared.spans.get(id(&c)));
                // Kept alive to the end of the round: no id reused within it.
                drop((a, b, c));
            }
            let word = mine[0].expect("an application's span is followed");
            assert!(mine.iter().all(|w| *w == Some(word)), "{mine:?}");
            let crate::words::Culprit::Kind(id, LayerKind::Async) = word.decode() else {
                panic!("{word:?}");
            };
            let kind = shared.board.kinds.get(id);
            assert_eq!(kind.name.as_deref(), Some("mine"));
            let site = kind.site.as_deref().unwrap_or_default();
            assert!(site.starts_with("src/probe/layer.rs:"), "{kind:?}");
            assert!(resources.iter().all(Option::is_none), "{resources:?}");
        });
    }

    #[test]
    fn stack_strings_truncate_on_char_boundaries() {
        let mut s = StackStr::<96>::new();
        let long = "é".repeat(100);
        let _ = s.write_str(&long);
        assert!(s.as_str().len() <= 96);
        assert!(s.as_str().chars().all(|c| c == 'é'));
    }
}
