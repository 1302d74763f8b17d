//! The wrapper probe: a future polled inside [`Watched`] is watched like a task, on stable
//! tokio, with no span and no subscriber needed.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use crate::board::{kind_word, Board};
use crate::probe::layer::current_task_id;
use crate::stall::LayerKind;

/// The board of the most recently started [`Guard`](crate::Guard), for [`watch`].
static CURRENT: Mutex<Option<Weak<Board>>> = Mutex::new(None);

pub(crate) fn set_current(board: &Arc<Board>) {
    if let Ok(mut c) = CURRENT.lock() {
        *c = Some(Arc::downgrade(board));
    }
}

pub(crate) fn clear_current(board: &Arc<Board>) {
    if let Ok(mut c) = CURRENT.lock() {
        if c.as_ref()
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(board)))
        {
            *c = None;
        }
    }
}

pub(crate) fn current() -> Option<Arc<Board>> {
    CURRENT.lock().ok()?.as_ref()?.upgrade()
}

pin_project_lite::pin_project! {
    /// A future whose polls loopwatch watches. Made by [`watch`] or
    /// [`WatchExt::watched`]; with no loopwatch running it only forwards the polls.
    #[derive(Debug)]
    pub struct Watched<F> {
        #[pin]
        inner: F,
        word: u64,
        // The task it runs in, learnt at its first poll.
        task: u64,
        board: Option<Arc<Board>>,
    }
}

impl<F> Watched<F> {
    pub(crate) fn new(
        board: Option<Arc<Board>>,
        name: &str,
        inner: F,
        site: &'static std::panic::Location<'static>,
    ) -> Self {
        let word = board.as_ref().map_or(0, |b| {
            let kind = b
                .kinds
                .intern(Some(name), Some((site.file(), site.line(), site.column())));
            kind_word(kind, LayerKind::Async, true)
        });
        Watched {
            inner,
            word,
            task: 0,
            board,
        }
    }
}

struct ExitOnDrop<'a>(&'a Arc<Board>);

impl Drop for ExitOnDrop<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.exit();
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        match this.board {
            Some(board) => {
                let task = this.task;
                board.enter(
                    *this.word,
                    || {
                        if *task == 0 {
                            *task = current_task_id();
                        }
                        *task
                    },
                    crate::board::NO_WAIT,
                );
                let _exit = ExitOnDrop(board);
                this.inner.poll(cx)
            }
            None => this.inner.poll(cx),
        }
    }
}

/// Watches the polls of `future` under the name `name`, with the caller's location as its
/// site. Use it for futures you spawn without a `tracing` span on stable tokio:
///
/// ```
/// # async fn handle() {}
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// tokio::spawn(loopwatch::watch("handle", handle()));
/// # }
/// ```
///
/// It reports to the most recently started [`Guard`](crate::Guard) that is still alive; with
/// none, the wrapper costs one branch per poll. [`Guard::watch`](crate::Guard::watch) names the
/// guard explicitly.
#[track_caller]
pub fn watch<F: Future>(name: &str, future: F) -> Watched<F> {
    Watched::new(current(), name, future, std::panic::Location::caller())
}

/// `.watched(name)` on any future: the method form of [`watch`].
pub trait WatchExt: Future + Sized {
    /// See [`watch`].
    #[track_caller]
    fn watched(self, name: &str) -> Watched<Self> {
        Watched::new(current(), name, self, std::panic::Location::caller())
    }
}

impl<F: Future> WatchExt for F {}
