//! Turning captured addresses into a [`Stack`] a person can read, on loopwatch's reporter
//! thread: names from the symbol table (so a release build without debug info still has
//! function names), `file:line` where debug info exists, and the frames of the signal handler,
//! the runtime, the standard library and loopwatch folded away so the first frame shown is the
//! user's code.

use super::{Frame, Stack};

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

pub(crate) fn symbolize(ips: &[usize]) -> Stack {
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
        frames.extend(resolve(&[ip]));
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
pub(crate) fn resolve(ips: &[usize]) -> Vec<Frame> {
    let mut frames = Vec::with_capacity(ips.len());
    for &ip in ips {
        let before = frames.len();
        backtrace::resolve(ip as *mut std::ffi::c_void, |sym| {
            let (location, dependency) = match (sym.filename(), sym.lineno()) {
                (Some(file), Some(line)) => {
                    let file = file.to_string_lossy();
                    // Debug info holds the build machine's absolute paths: shown as
                    // loopwatch shows every path (relative to the crate, or `src/…`).
                    let shown = crate::paths::show(&file);
                    (Some(format!("{}:{line}", shown.path)), shown.dependency)
                }
                _ => (None, false),
            };
            frames.push(Frame {
                function: sym.name().map(|n| format!("{n:#}")),
                location,
                ip,
                dependency,
            });
        });
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
