//! Turning captured addresses into a [`Stack`] a person can read, on loopwatch's reporter
//! thread: names from the symbol table (so a release build without debug info still has
//! function names), `file:line` where debug info exists, and the frames of the signal handler,
//! the runtime, the standard library and loopwatch folded away so the first frame shown is the
//! user's code.

use std::ops::Range;
use std::sync::Mutex;

use super::{elf, Frame, Stack};

/// Crates whose frames are folded: they are the machinery around the user's code.
const FOLDED_CRATES: &[&str] = &[
    "std",
    "core",
    "alloc",
    "tokio",
    "loopwatch",
    "backtrace",
    "tracing",
    "tracing_core",
    "tracing_subscriber",
    "futures_util",
    "futures_core",
    "futures_executor",
    "pin_project_lite",
];

/// At most this many frames are shown.
const SHOWN: usize = 24;

/// The frames of `ips`, folded; with `locations`, `file:line` and inlined functions from the
/// debug info (read at the first such request), else the symbol table's names alone.
pub(crate) fn symbolize(ips: &[usize], locations: bool) -> Stack {
    // Resolving an address loads the debug info of its compilation unit, which is slow the
    // first time (hundreds of milliseconds in a debug build). The frames that matter are the
    // innermost: stop at SHOWN user frames, or once past the user's frames a long run of
    // machinery frames says we are in the runtime's outer layers.
    let mut frames = Vec::new();
    let mut shown = 0;
    let mut machinery_run = 0;
    let mut resolved = 0;
    for (i, &ip) in ips.iter().enumerate() {
        let before = frames.len();
        frames.extend(resolve(&[ip], locations));
        resolved = i + 1;
        for f in &frames[before..] {
            if is_machinery(f) {
                machinery_run += 1;
            } else {
                shown += 1;
                machinery_run = 0;
            }
        }
        if shown >= SHOWN || (shown > 0 && machinery_run >= 16) {
            break;
        }
    }
    let mut stack = fold(frames);
    stack.folded += ips.len() - resolved;
    stack
}

/// Names every address, folding nothing. An address inside inlined code gives one frame per
/// inlined function, innermost first (as debug info tells; without it, one frame).
pub(crate) fn resolve(ips: &[usize], locations: bool) -> Vec<Frame> {
    let mut frames = Vec::with_capacity(ips.len());
    // One symbolizer for the process: the reporter's symbol thread, and tests. Never on a
    // watched thread.
    static SYMBOLS: Mutex<Option<Symbols>> = Mutex::new(None);
    let mut guard = SYMBOLS.lock().unwrap_or_else(|p| p.into_inner());
    let symbols = guard.get_or_insert_with(Symbols::default);
    for &ip in ips {
        let before = frames.len();
        symbols.frames(ip, locations, &mut frames);
        if frames.len() == before {
            frames.push(Frame {
                function: None,
                location: None,
                ip,
                dependency: false,
            });
        }
    }
    frames
}

type Reader = gimli::EndianSlice<'static, gimli::LittleEndian>;

/// The modules of this process, each loaded at its first address.
#[derive(Default)]
struct Symbols {
    modules: Vec<Module>,
    /// When the module list was last read: an address in no known module (a library loaded
    /// since) reads it again, at most once a second.
    listed: Option<std::time::Instant>,
}

/// One loaded object: where it is mapped, and its symbols once read.
struct Module {
    path: String,
    bias: u64,
    ranges: Vec<Range<u64>>,
    symbols: Option<Option<Loaded>>,
}

/// A module's functions (by address) and, once a lookup asked for locations, its DWARF (if
/// it has debug info).
struct Loaded {
    data: &'static [u8],
    file: elf::Elf<'static>,
    functions: Vec<Function>,
    dwarf: Option<Option<addr2line::Context<Reader>>>,
}

/// A function of the symbol table: its start and size (file addresses), and where its name is
/// in the mapped file.
#[derive(Clone, Copy)]
struct Function {
    start: u64,
    name_at: u64,
    size: u32,
    name_len: u32,
}

impl Symbols {
    /// Pushes the frames of return address `ip` (none if no module holds it); with
    /// `locations`, from the debug info where the module has it.
    fn frames(&mut self, ip: usize, locations: bool, out: &mut Vec<Frame>) {
        let avma = ip as u64;
        let mut found = self.module_of(avma);
        if found.is_none() && self.listed.is_none_or(|t| t.elapsed().as_secs() >= 1) {
            self.list();
            found = self.module_of(avma);
        }
        let Some(m) = found.and_then(|i| self.modules.get_mut(i)) else {
            return;
        };
        let bias = m.bias;
        let Some(loaded) = m.symbols.get_or_insert_with(|| Loaded::open(&m.path)) else {
            return;
        };
        if locations && loaded.dwarf.is_none() {
            loaded.dwarf = Some(loaded.read_dwarf());
        }
        // A return address is one past its call: look the call up.
        let probe = avma.saturating_sub(1).wrapping_sub(bias);
        let before = out.len();
        if let (true, Some(Some(dwarf))) = (locations, &loaded.dwarf) {
            if let Ok(mut iter) = dwarf.find_frames(probe).skip_all_loads() {
                while let Ok(Some(f)) = iter.next() {
                    let function = f
                        .function
                        .as_ref()
                        .and_then(|n| n.raw_name().ok())
                        .map(|raw| demangled(&raw));
                    let (location, dependency) = match f.location {
                        Some(addr2line::Location {
                            file: Some(file),
                            line: Some(line),
                            ..
                        }) => {
                            // Debug info holds the build machine's absolute paths: shown as
                            // loopwatch shows every path (relative to the crate, or `src/…`).
                            let shown = crate::paths::show(file);
                            (Some(format!("{}:{line}", shown.path)), shown.dependency)
                        }
                        _ => (None, false),
                    };
                    out.push(Frame {
                        function,
                        location,
                        ip,
                        dependency,
                    });
                }
            }
        }
        // The symbol table's name, looked up (and demangled) only where the debug info gave
        // none: for the outermost frame, or for an address it does not cover.
        if out.len() > before {
            if let Some(last) = out.last_mut().filter(|l| l.function.is_none()) {
                last.function = loaded.name_of(probe);
            }
        } else if let Some(function) = loaded.name_of(probe) {
            out.push(Frame {
                function: Some(function),
                location: None,
                ip,
                dependency: false,
            });
        }
    }

    fn module_of(&self, avma: u64) -> Option<usize> {
        self.modules
            .iter()
            .position(|m| m.ranges.iter().any(|r| r.contains(&avma)))
    }

    /// Reads the list of loaded objects, keeping what is already loaded of those still there.
    fn list(&mut self) {
        self.listed = Some(std::time::Instant::now());
        let mut found: Vec<Module> = Vec::new();
        // SAFETY: dl_iterate_phdr calls `each` with a valid `dl_phdr_info` for every loaded
        // object; `each` only reads it and pushes to the `Vec` passed as `data`.
        unsafe {
            libc::dl_iterate_phdr(Some(each), (&mut found as *mut Vec<Module>).cast());
        }
        for m in &mut found {
            if let Some(old) = self
                .modules
                .iter_mut()
                .find(|o| o.path == m.path && o.bias == m.bias)
            {
                m.symbols = old.symbols.take();
            }
        }
        self.modules = found;
    }
}

unsafe extern "C" fn each(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `Vec` `list` passed; `info` is valid for this call.
    let (out, info) = unsafe { (&mut *data.cast::<Vec<Module>>(), &*info) };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: dlpi_phdr points to dlpi_phnum program headers of the object.
        let phdrs =
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
        let bias = info.dlpi_addr;
        let ranges: Vec<Range<u64>> = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD)
            .map(|p| bias + p.p_vaddr..bias + p.p_vaddr + p.p_memsz)
            .collect();
        let name = elf::object_name(info);
        // The executable comes first, with no name.
        let path = if name.is_empty() && out.is_empty() {
            "/proc/self/exe".to_string()
        } else {
            name
        };
        if !path.is_empty() && !ranges.is_empty() {
            out.push(Module {
                path,
                bias,
                ranges,
                symbols: None,
            });
        }
    }));
    0
}

impl Loaded {
    /// Maps the module's file and reads its symbols; `None` if it cannot be read (the vDSO,
    /// a deleted library, not ELF).
    fn open(path: &str) -> Option<Loaded> {
        let data = elf::map(path).ok()?;
        let file = elf::Elf::parse(data).ok()?;
        let base = data.as_ptr() as u64;
        let mut functions = Vec::new();
        file.functions(&mut |name, value, size| {
            if let (Ok(size), Ok(name_len)) = (u32::try_from(size), u32::try_from(name.len())) {
                functions.push(Function {
                    start: value,
                    name_at: name.as_ptr() as u64 - base,
                    size,
                    name_len,
                });
            }
        });
        functions.sort_by_key(|f| f.start);
        functions.shrink_to_fit();
        Some(Loaded {
            data,
            file,
            functions,
            dwarf: None,
        })
    }

    /// The module's DWARF, if it has debug info (uncompressed).
    fn read_dwarf(&self) -> Option<addr2line::Context<Reader>> {
        self.file.section(".debug_info").filter(|d| !d.is_empty())?;
        let dwarf = gimli::Dwarf::load(|id| {
            Ok::<_, ()>(gimli::EndianSlice::new(
                self.file.section(id.name()).unwrap_or(&[]),
                gimli::LittleEndian,
            ))
        })
        .ok()?;
        addr2line::Context::from_dwarf(dwarf).ok()
    }

    /// The symbol table's name (demangled) of the function holding file address `probe`.
    fn name_of(&self, probe: u64) -> Option<String> {
        let i = self.functions.partition_point(|f| f.start <= probe);
        let f = self.functions.get(i.checked_sub(1)?)?;
        // A size of 0 (some assembly) covers up to the next function.
        if f.size != 0 && probe >= f.start.saturating_add(u64::from(f.size)) {
            return None;
        }
        let at = usize::try_from(f.name_at).ok()?;
        let raw = self.data.get(at..at + f.name_len as usize)?;
        Some(demangled(&String::from_utf8_lossy(raw)))
    }
}

/// A symbol as shown: a Rust name demangled without its hash, any other as it is.
fn demangled(raw: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(raw))
}

/// Drops the frames up to and including the signal trampoline (the handler and the unwinder),
/// then folds machinery frames.
pub(crate) fn fold(frames: Vec<Frame>) -> Stack {
    let total = frames.len();
    // The handler's frame is followed by the signal trampoline (`__restore_rt`, often unnamed
    // in libc's symbol table), then the interrupted function.
    let start = frames
        .iter()
        .rposition(|f| {
            f.function
                .as_deref()
                .is_some_and(|n| n.contains("diagnose::stack::handler"))
        })
        .map(|h| match frames.get(h + 1) {
            Some(t)
                if t.function.is_none()
                    || t.function
                        .as_deref()
                        .is_some_and(|n| n.contains("restore_rt")) =>
            {
                h + 2
            }
            _ => h + 1,
        })
        .unwrap_or(0);
    let shown: Vec<Frame> = frames
        .into_iter()
        .skip(start)
        .filter(|f| !is_machinery(f))
        .take(SHOWN)
        .collect();
    Stack {
        folded: total - shown.len(),
        frames: shown,
    }
}

/// The crate a demangled symbol belongs to: `tokio::runtime::..` → `tokio`,
/// `<tokio::x::Y as core::future::Future>::poll` → `tokio`, `<&T as ..>` → the type's crate.
fn crate_of(name: &str) -> Option<&str> {
    let n = name
        .trim_start_matches('<')
        .trim_start_matches('&')
        .trim_start_matches("mut ");
    let end = n.find("::")?;
    let c = &n[..end];
    (!c.is_empty() && c.chars().all(|ch| ch.is_alphanumeric() || ch == '_')).then_some(c)
}

fn is_machinery(f: &Frame) -> bool {
    match f.function.as_deref() {
        // No name, or a C function (libc's syscall wrappers, the thread start): not user code.
        None => true,
        Some(n) => match crate_of(n) {
            Some(c) => FOLDED_CRATES.contains(&c),
            None => true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str) -> Frame {
        Frame {
            function: Some(name.to_string()),
            location: None,
            ip: 1,
            dependency: false,
        }
    }

    #[test]
    fn the_first_frame_shown_is_the_users() {
        let s = fold(vec![
            f("backtrace::backtrace::trace_unsynchronized"),
            f("loopwatch::diagnose::stack::handler"),
            Frame {
                function: None,
                location: None,
                ip: 7,
                dependency: false,
            },
            f("__GI___clock_nanosleep"),
            f("std::thread::sleep"),
            f("myapp::handlers::fetch_config"),
            f("myapp::handlers::fetch_config::{{closure}}"),
            f("<tracing::instrument::Instrumented<T> as core::future::Future>::poll"),
            f("<myapp::Svc as tower::Service>::call"),
            f("tokio::runtime::task::harness::poll_future"),
            f("start_thread"),
        ]);
        assert_eq!(
            s.frames[0].function.as_deref(),
            Some("myapp::handlers::fetch_config")
        );
        assert_eq!(s.frames.len(), 3);
        assert_eq!(s.folded, 8);
    }

    #[test]
    fn crates_are_read_from_trait_impls() {
        assert_eq!(
            crate_of("<tokio::x::Y as core::future::Future>::poll"),
            Some("tokio")
        );
        assert_eq!(crate_of("myapp::f"), Some("myapp"));
        assert_eq!(crate_of("<&mut myapp::T as Foo>::f"), Some("myapp"));
        assert_eq!(crate_of("memcpy"), None);
    }
}
