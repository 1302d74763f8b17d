//! What a thread's stack says it is doing for tokio, from the return addresses alone (no debug
//! info): inside a task's poll on an async worker, or inside a blocking job or
//! `block_in_place` (a thread that gave its worker up). The probe-free path reports a thread
//! asleep in a call only when its stack says the former: a blocking-pool thread, or a worker
//! that handed its core over, is never taken for a stalled async worker.
//!
//! The address ranges come from the executable's own symbol table (`.symtab`, read once from
//! `/proc/self/exe`; tokio is linked into it statically): every function of tokio's
//! that runs a task on a worker (`multi_thread::worker::Context::run_task`, and the
//! current-thread scheduler's `Context::run_task` and `CoreGuard::block_on`), and every one
//! that marks the thread as not an async worker (`BlockingTask`'s poll, `block_in_place`). A
//! stripped binary has no `.symtab`: the ranges are then unknown and the probe-free path stays
//! off (said once).

use std::ops::Range;

/// What a stack says of its thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Inside a task's poll on an async worker (`run_task`, and not in a blocking section).
    TaskPoll,
    /// In an async worker's loop (`Context::run`, or the current-thread `CoreGuard::block_on`,
    /// which also polls the future blocked on), in no task's poll that the stack shows: a
    /// task's poll where an optimized build inlined `run_task`, or the worker's own park.
    WorkerPoll,
    /// Inside a blocking-pool job or `block_in_place`: not holding an async worker.
    NotWorker,
    /// Neither seen (the stack was cut short, or the thread is elsewhere).
    Unknown,
}

/// The address ranges (runtime addresses) of the functions that tell a thread's role.
#[derive(Debug, Default, Clone)]
pub(crate) struct Roles {
    task_poll: Vec<Range<usize>>,
    worker_poll: Vec<Range<usize>>,
    not_worker: Vec<Range<usize>>,
}

impl Roles {
    /// The role of a thread whose stack (return addresses, innermost first) is `ips`. The
    /// innermost marker decides: a blocking section inside a task's poll is not the worker's.
    pub(crate) fn classify(&self, ips: &[usize]) -> Role {
        for &ip in ips {
            // A return address points just past its call.
            let pc = ip.saturating_sub(1);
            if in_any(&self.not_worker, pc) {
                return Role::NotWorker;
            }
            if in_any(&self.task_poll, pc) {
                return Role::TaskPoll;
            }
            if in_any(&self.worker_poll, pc) {
                return Role::WorkerPoll;
            }
        }
        Role::Unknown
    }

    /// Were the functions that tell a worker's poll found at all?
    pub(crate) fn known(&self) -> bool {
        !self.worker_poll.is_empty() || !self.task_poll.is_empty()
    }

    /// Ranges built from symbols (`name`, start, size) given at their runtime addresses.
    pub(crate) fn from_symbols<'a>(
        symbols: impl IntoIterator<Item = (&'a str, usize, usize)>,
    ) -> Roles {
        let mut roles = Roles::default();
        for (name, start, size) in symbols {
            if size == 0 {
                continue;
            }
            let range = start..start.saturating_add(size);
            match role_of(name) {
                Some(Role::TaskPoll) => roles.task_poll.push(range),
                Some(Role::WorkerPoll) => roles.worker_poll.push(range),
                Some(Role::NotWorker) => roles.not_worker.push(range),
                _ => {}
            }
        }
        roles.worker_poll.sort_by_key(|r| r.start);
        roles.task_poll.sort_by_key(|r| r.start);
        roles.not_worker.sort_by_key(|r| r.start);
        roles
    }
}

fn in_any(ranges: &[Range<usize>], pc: usize) -> bool {
    // Sorted by start; functions do not overlap.
    let i = ranges.partition_point(|r| r.start <= pc);
    i > 0 && ranges[i - 1].contains(&pc)
}

/// The role a function of tokio's (by its demangled name, hash stripped) marks.
pub(crate) fn role_of(demangled: &str) -> Option<Role> {
    if !demangled.contains("tokio::") {
        return None;
    }
    if demangled.contains("block_in_place")
        || demangled.contains("tokio::runtime::blocking::task::BlockingTask")
    {
        return Some(Role::NotWorker);
    }
    if demangled.starts_with("tokio::runtime::scheduler::multi_thread::worker::Context::run_task")
        || demangled.starts_with("tokio::runtime::scheduler::current_thread::Context::run_task")
    {
        return Some(Role::TaskPoll);
    }
    // The worker's loop, where an optimized build may have inlined `run_task`: a worker
    // outside a task's poll sleeps only to park (in `epoll_wait`, or `futex`, which is why a
    // `futex` candidate needs `run_task` itself).
    if demangled.starts_with("tokio::runtime::scheduler::multi_thread::worker::Context::run")
        || demangled.starts_with("tokio::runtime::scheduler::current_thread::CoreGuard::block_on")
    {
        return Some(Role::WorkerPoll);
    }
    None
}

/// The ranges of this process's executable, or why there are none.
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
pub(crate) fn load() -> Result<Roles, String> {
    let bias = main_bias().ok_or("the executable's load address is unknown")?;
    // The map is the symbolizer's too (`elf::map` maps each file once and keeps it).
    let file = super::elf::Elf::parse(super::elf::map("/proc/self/exe")?)?;
    let mut symbols = Vec::new();
    let full = file.functions(&mut |name, value, size| {
        if name.windows(5).any(|w| w == b"tokio") {
            let name = String::from_utf8_lossy(name);
            let demangled = format!("{:#}", rustc_demangle::demangle(&name));
            if role_of(&demangled).is_some() {
                symbols.push((demangled, value as usize + bias, size as usize));
            }
        }
    });
    if !full {
        return Err("the executable has no symbol table (stripped)".into());
    }
    let roles = Roles::from_symbols(symbols.iter().map(|(n, s, z)| (n.as_str(), *s, *z)));
    if roles.known() {
        Ok(roles)
    } else {
        Err(
            "tokio's scheduler functions are not in the executable's symbol table (stripped?)"
                .into(),
        )
    }
}

/// Elsewhere there is no way to read a sleeping thread's stack: no roles.
#[cfg(not(all(target_os = "linux", not(loopwatch_portable))))]
pub(crate) fn load() -> Result<Roles, String> {
    Err("the probe-free path needs Linux".into())
}

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
/// The main executable's load bias (its first `dl_iterate_phdr` entry).
fn main_bias() -> Option<usize> {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid info; `data` is the `Option<usize>` below.
        unsafe {
            *data.cast::<Option<usize>>() = Some((*info).dlpi_addr as usize);
        }
        1 // stop: the first object is the executable
    }
    let mut bias: Option<usize> = None;
    // SAFETY: `first` only reads the info it is given and writes through `data`, which points
    // to `bias`, alive for the call.
    unsafe {
        libc::dl_iterate_phdr(Some(first), (&mut bias as *mut Option<usize>).cast());
    }
    bias
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokio_functions_mark_the_role_they_run() {
        assert_eq!(
            role_of("tokio::runtime::scheduler::multi_thread::worker::Context::run_task"),
            Some(Role::TaskPoll)
        );
        assert_eq!(
            role_of("tokio::runtime::scheduler::multi_thread::worker::Context::run"),
            Some(Role::WorkerPoll)
        );
        assert_eq!(
            role_of("tokio::runtime::scheduler::current_thread::CoreGuard::block_on::<F>"),
            Some(Role::WorkerPoll)
        );
        assert_eq!(
            role_of("tokio::runtime::scheduler::multi_thread::worker::block_in_place::<F, R>"),
            Some(Role::NotWorker)
        );
        assert_eq!(
            role_of("<tokio::runtime::blocking::task::BlockingTask<T> as core::future::future::Future>::poll"),
            Some(Role::NotWorker)
        );
        assert_eq!(role_of("tokio::runtime::task::harness::poll_future"), None);
        assert_eq!(role_of("app::run_task"), None);
    }

    #[test]
    fn the_innermost_marker_decides() {
        let roles = Roles::from_symbols([
            (
                "tokio::runtime::scheduler::multi_thread::worker::Context::run_task",
                1000,
                100,
            ),
            ("tokio::task::blocking::block_in_place::<F, R>", 2000, 50),
        ]);
        // Return addresses, innermost first: user code, then the marker's.
        assert_eq!(roles.classify(&[50, 1050, 9000]), Role::TaskPoll);
        assert_eq!(roles.classify(&[50, 2010, 1050]), Role::NotWorker);
        assert_eq!(roles.classify(&[50, 60]), Role::Unknown);
        // A return address one past the end of a function is still its call.
        assert_eq!(roles.classify(&[1100]), Role::TaskPoll);
        assert_eq!(roles.classify(&[1101]), Role::Unknown);
    }

    #[test]
    #[cfg(all(target_os = "linux", not(loopwatch_portable)))]
    fn this_test_binarys_own_tokio_is_found() {
        // The unit-test binary links tokio's multi-thread scheduler.
        let roles = load().expect("roles from the test binary's symbol table");
        assert!(roles.known());
        assert!(!roles.not_worker.is_empty());
    }
}
