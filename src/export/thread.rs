//! loopwatch's exporter threads: each an OS thread of its own (never the watched runtime) with
//! a current-thread tokio runtime for its I/O.

use std::future::Future;
use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Error;

/// How the thread's body says it has started (or why it could not).
pub(crate) type Ready = Sender<Result<(), Error>>;

/// Starts the thread `name`, builds its runtime, and runs `body` on it. Returns once `body`
/// has sent its start-up result (its error, if any, is returned and the thread joined).
pub(crate) fn start<Fut>(
    name: &'static str,
    body: impl FnOnce(Ready) -> Fut + Send + 'static,
) -> Result<JoinHandle<()>, Error>
where
    Fut: Future<Output = ()>,
{
    let (ready, started) = channel();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            crate::board::mark_own_thread();
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(name)
                .build()
            {
                Ok(rt) => rt.block_on(body(ready)),
                Err(source) => {
                    let _ = ready.send(Err(Error::SpawnThread {
                        thread: name,
                        source,
                    }));
                }
            }
        })
        .map_err(|source| Error::SpawnThread {
            thread: name,
            source,
        })?;
    let result = started.recv().unwrap_or_else(|_| {
        Err(Error::SpawnThread {
            thread: name,
            source: std::io::Error::other("the thread ended while starting"),
        })
    });
    match result {
        Ok(()) => Ok(thread),
        Err(e) => {
            let _ = thread.join();
            Err(e)
        }
    }
}

/// Joins `thread` if it finishes within `wait`; otherwise leaves it to end on its own.
pub(crate) fn join_within(thread: JoinHandle<()>, wait: Duration) {
    let deadline = Instant::now() + wait;
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if thread.is_finished() {
        let _ = thread.join();
    }
}
