//! What a thread's stack says it is doing for tokio, from the return addresses alone (no debug
//! info): inside a task's poll on an async worker, or inside a blocking job or
//! `block_in_place` (a thread that gave its worker up). The probe-free path reports a thread
//! asleep in a call only when its stack says the former: a blocking-pool thread, or a worker
//! that handed its core over, is never taken for a stalled async worker.
//!
//! The address ranges come from the executable's own symbol table (`.symtab`, read once from
//! `/proc/self/exe` and dropped; tokio is linked into it statically): every function of tokio's
//! that runs a task on a worker (`multi_thread::worker::Context::run_task`, and the
//! current-thread scheduler's `Context::run_task` and `CoreGuard::block_on`), and every one
//! that marks the thread as not an async worker (`BlockingTask`'s poll, `block_in_place`). A
//! stripped binary has no `.symtab`: the ranges are then unknown and the probe-free path stays
//! off (said once).

use std::ops::Range;
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
use std::{fs::File, os::unix::fs::FileExt};

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
    let file = File::open("/proc/self/exe").map_err(|e| format!("/proc/self/exe: {e}"))?;
    let mut symbols = Vec::new();
    read_symbols(&file, &mut |name, value, size| {
        if name.contains("tokio") {
            let demangled = format!("{:#}", rustc_demangle::demangle(name));
            if role_of(&demangled).is_some() {
                symbols.push((demangled, value as usize + bias, size as usize));
            }
        }
    })?;
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

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
const SHT_SYMTAB: u32 = 2;
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
const STT_FUNC: u8 = 2;
/// The largest string table read (a 100 MB debug binary's is about 30 MB).
#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
const MAX_STRTAB: u64 = 256 << 20;

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
fn read_at(file: &File, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let len = usize::try_from(len).map_err(|_| "section too large")?;
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| format!("reading the executable: {e}"))?;
    Ok(buf)
}

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
/// Calls `each(name, value, size)` for every function in the ELF64 little-endian `file`'s
/// `.symtab`. Reads the section headers, then the symbol and string tables, in one piece each.
pub(crate) fn read_symbols(
    file: &File,
    each: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), String> {
    let bad = || "not an ELF64 little-endian executable".to_string();
    let header = read_at(file, 0, 64)?;
    if header.get(..4) != Some(b"\x7fELF".as_slice()) || header[4] != 2 || header[5] != 1 {
        return Err(bad());
    }
    let shoff = u64_at(&header, 0x28).ok_or_else(bad)?;
    let shentsize = u64::from(u16_at(&header, 0x3a).ok_or_else(bad)?);
    let shnum = u64::from(u16_at(&header, 0x3c).ok_or_else(bad)?);
    if shentsize < 64 || shnum == 0 {
        return Err(bad());
    }
    let sections = read_at(file, shoff, shentsize * shnum)?;
    let section = |i: u64| -> Option<(u32, u64, u64, u32, u64)> {
        let at = usize::try_from(i * shentsize).ok()?;
        Some((
            u32_at(&sections, at + 4)?,  // type
            u64_at(&sections, at + 24)?, // offset
            u64_at(&sections, at + 32)?, // size
            u32_at(&sections, at + 40)?, // link
            u64_at(&sections, at + 56)?, // entry size
        ))
    };
    let symtab = (0..shnum)
        .filter_map(section)
        .find(|s| s.0 == SHT_SYMTAB)
        .ok_or("the executable has no symbol table (stripped)")?;
    let (_, sym_off, sym_size, link, entsize) = symtab;
    if entsize < 24 {
        return Err(bad());
    }
    let (_, str_off, str_size, _, _) = section(u64::from(link)).ok_or_else(bad)?;
    if str_size > MAX_STRTAB {
        return Err("the symbol table's strings are too large".into());
    }
    let strings = read_at(file, str_off, str_size)?;
    let syms = read_at(file, sym_off, sym_size)?;
    let entsize = entsize as usize;
    for sym in syms.chunks_exact(entsize) {
        if sym[4] & 0xf != STT_FUNC {
            continue;
        }
        let (Some(name_at), Some(value), Some(size)) =
            (u32_at(sym, 0), u64_at(sym, 8), u64_at(sym, 16))
        else {
            continue;
        };
        let Some(rest) = strings.get(name_at as usize..) else {
            continue;
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if let Ok(name) = std::str::from_utf8(&rest[..end]) {
            each(name, value, size);
        }
    }
    Ok(())
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
