//! Every hint loopwatch gives a user, in one place: one line each saying what to do about what
//! was seen. Plain text with no dependency, so the rules that choose a hint (the cause's, in
//! `diagnose`; the layer's, in the watchdog; the pool notices', in the reporter) stay where their
//! facts are, and a reviewer reads every word a user is told here.

/// A poll that ran on the CPU past the threshold.
pub(crate) const CPU: &str = "CPU-bound poll: move the work to tokio::task::spawn_blocking or a \
     CPU pool (rayon), or yield (tokio::task::yield_now) inside the loop";

/// A poll whose thread was runnable but got no CPU.
pub(crate) const STARVED: &str = "the thread was runnable but got no CPU: the host is out of CPU \
     (limits, noisy neighbours), not this code";

/// A CPU pool's job asleep in a system call (whatever the call).
pub(crate) const CPU_POOL_WAITING: &str = "a CPU pool job waiting in a system call: a parallel \
     layer used for waiting holds a core's worth of thread; do the waiting on async tasks or the \
     blocking pool";

/// A CPU pool fed jobs too small to be worth a dispatch.
pub(crate) const CPU_JOBS_TOO_FINE: &str = "batch these: give each job at least 50-100 µs of work \
     (par_chunks, with_min_len, or a loop over several items per job); below that, dispatch \
     costs more than the parallelism gains";

/// Jobs waiting for a thread of a full blocking pool.
/// Throttled by the cgroup's CPU quota.
pub(crate) const THROTTLED: &str = "the container's CPU quota (cgroup cpu.max) ran out: every \
    thread of the process waits for the next period; raise the quota (the pod's CPU limit), or \
    size the runtime to it (worker_threads, blocking and CPU pools); not this poll's code alone";

/// A span guard held across an `.await`: loopwatch's phantom notice.
pub(crate) const SPAN_GUARD_ACROSS_AWAIT: &str = "a span entered with `span.enter()` is held \
    across an `.await` (tracing's docs warn against it): use `.instrument(span)` on the future, \
    or `span.in_scope(..)` around code with no `.await`";

pub(crate) const BLOCKING_POOL_FULL: &str = "the blocking pool is full: jobs that wait (sleep, \
     poll, hold locks) occupy its threads; make them async, raise max_blocking_threads, or give \
     long jobs a pool of their own";

/// An async worker asleep in the system call `name` (its name as the syscall table has it, or
/// `""` for a call loopwatch cannot name).
pub(crate) fn syscall(name: &str) -> &'static str {
    match name {
        "nanosleep" | "clock_nanosleep" => SLEEP,
        "futex" | "futex_waitv" => LOCK,
        "fsync" | "fdatasync" | "sync" | "syncfs" | "sync_file_range" => FSYNC,
        "epoll_wait" | "epoll_pwait" | "epoll_pwait2" => NESTED_LOOP,
        "read" | "readv" | "pread64" | "preadv2" | "recvfrom" | "recvmsg" | "recvmmsg"
        | "write" | "writev" | "pwrite64" | "pwritev2" | "sendto" | "sendmsg" | "sendmmsg"
        | "connect" | "accept" | "accept4" | "poll" | "ppoll" | "select" | "pselect6"
        | "openat" | "open" | "sendfile" | "splice" => BLOCKING_IO,
        _ => BLOCKING_CALL,
    }
}

const SLEEP: &str = "std::thread::sleep on an async worker: use tokio::time::sleep";
const LOCK: &str = "a lock or blocking channel holds the worker: shorten the critical section, \
     or use the async primitive (tokio::sync::Mutex, tokio::sync::mpsc)";
const FSYNC: &str = "a blocking fsync on an async worker: move it to tokio::task::spawn_blocking";
const NESTED_LOOP: &str = "a nested event loop (block_on inside a task?) blocks the worker: await \
     the future instead";
const BLOCKING_IO: &str = "blocking I/O on an async worker: use the tokio equivalent (tokio::net, \
     tokio::fs) or tokio::task::spawn_blocking";
const BLOCKING_CALL: &str =
    "a blocking system call on an async worker: move it to tokio::task::spawn_blocking";

/// Each stall hint, and the few words of it a one-line log message has room for.
const SHORT: &[(&str, &str)] = &[
    (CPU, "move it to spawn_blocking or a CPU pool, or yield"),
    (STARVED, "the host is out of CPU, not this code"),
    (
        THROTTLED,
        "the CPU quota ran out: raise it or size the runtime to it",
    ),
    (
        CPU_POOL_WAITING,
        "a CPU pool job waits in a call: wait on async tasks instead",
    ),
    (SLEEP, "std::thread::sleep: use tokio::time::sleep"),
    (
        LOCK,
        "a lock holds the worker: shorten it or use tokio::sync",
    ),
    (FSYNC, "fsync: move it to spawn_blocking"),
    (NESTED_LOOP, "a nested block_on: await the future instead"),
    (
        BLOCKING_IO,
        "blocking I/O: use tokio::net/tokio::fs or spawn_blocking",
    ),
    (BLOCKING_CALL, "a blocking call: move it to spawn_blocking"),
];

/// The short form of a stall's `hint` for a one-line log message (the whole hint stays in the
/// report and its `hint` field); a hint with no short form as it is.
pub(crate) fn short(hint: &'static str) -> &'static str {
    SHORT
        .iter()
        .find(|(full, _)| *full == hint)
        .map_or(hint, |(_, short)| short)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_call_family_has_its_own_advice() {
        assert!(syscall("nanosleep").contains("tokio::time::sleep"));
        assert!(syscall("futex").contains("tokio::sync::Mutex"));
        assert!(syscall("recvfrom").contains("tokio::net"));
        assert!(syscall("fdatasync").contains("spawn_blocking"));
        assert!(syscall("epoll_wait").contains("block_on"));
        assert_eq!(syscall(""), syscall("made_up"));
    }

    #[test]
    fn every_stall_hint_has_a_short_form_that_keeps_its_key_words() {
        for call in [
            "nanosleep",
            "futex",
            "fsync",
            "epoll_wait",
            "read",
            "made_up",
        ] {
            let full = syscall(call);
            assert_ne!(short(full), full, "{call}");
        }
        for (full, s) in SHORT {
            assert!(s.len() <= 64, "{s}");
            assert!(s.len() < full.len(), "{s}");
        }
        assert!(short(SLEEP).contains("tokio::time::sleep"));
        assert!(short(CPU).contains("spawn_blocking"));
        assert_eq!(
            short(BLOCKING_POOL_FULL),
            BLOCKING_POOL_FULL,
            "a notice's hint"
        );
    }
}
