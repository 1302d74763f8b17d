//! Source paths as loopwatch shows them: never an absolute path of the machine that built the
//! program. A spawn site or a frame in a dependency is shown relative to its crate
//! (`axum-0.8.9/src/serve/mod.rs`) and marked as a dependency; the standard library's from
//! `library/`; any other absolute path from its last `src`, `examples`, `tests` or `benches`
//! directory (else the file name alone). Relative paths (the application's own code, as cargo
//! compiles a workspace) are shown as they are.

use std::borrow::Cow;

/// A path as shown, and whether it is in a dependency (or the standard library).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shown<'a> {
    pub(crate) path: Cow<'a, str>,
    pub(crate) dependency: bool,
}

/// How `path` is shown. Cheap: no allocation unless the path must be rewritten (a git
/// checkout's revision left out, or `\` separators), since spans are interned by their site
/// as they are created.
pub(crate) fn show(path: &str) -> Shown<'_> {
    if !is_absolute(path) {
        return Shown {
            path: Cow::Borrowed(path),
            dependency: false,
        };
    }
    let (from, dependency) = shown_from(path);
    let rest = &path[from..];
    let path = if rest.contains('\\') {
        Cow::Owned(rest.replace('\\', "/"))
    } else if dependency && git_rev(path).is_some() {
        Cow::Owned(without_git_rev(rest))
    } else {
        Cow::Borrowed(rest)
    };
    Shown { path, dependency }
}

/// Where the shown part of absolute `path` begins, and whether it is a dependency's.
fn shown_from(path: &str) -> (usize, bool) {
    let comp = |name: &str| -> Option<usize> {
        // The start of the last component `name` followed by more path.
        let b = path.as_bytes();
        let mut found = None;
        let mut i = 0;
        while let Some(j) = path[i..].find(name) {
            let at = i + j;
            let end = at + name.len();
            let before = at == 0 || matches!(b[at - 1], b'/' | b'\\');
            let after = b.get(end).is_some_and(|c| matches!(c, b'/' | b'\\'));
            if before && after && end + 1 < b.len() {
                found = Some(at);
            }
            i = at + 1;
        }
        found
    };
    let next = |at: usize| -> Option<usize> {
        // The start of the component after the one starting at `at`.
        path[at..]
            .find(['/', '\\'])
            .map(|k| at + k + 1)
            .filter(|&n| n < path.len())
    };
    // cargo's registry: …/registry/src/<index>/<crate-version>/…
    if let Some(r) = comp("registry") {
        if let Some(s) = next(r).filter(|&s| path[s..].starts_with("src")) {
            if let Some(crate_dir) = next(s).and_then(next) {
                return (crate_dir, true);
            }
        }
    }
    // git dependencies: …/git/checkouts/<repo-hash>/<rev>/… (the revision is left out later)
    if let Some(c) = comp("checkouts") {
        if let Some(repo) = next(c) {
            return (repo, true);
        }
    }
    // The standard library, as rustc records it: /rustc/<commit>/library/…
    if path[1..].starts_with("rustc") {
        if let Some(l) = comp("library") {
            return (l, true);
        }
    }
    // `cargo vendor`: …/vendor/<crate>/…
    if let Some(v) = comp("vendor") {
        if let Some(c) = next(v) {
            return (c, true);
        }
    }
    let own = ["src", "examples", "tests", "benches"]
        .iter()
        .filter_map(|d| comp(d))
        .max();
    match own {
        Some(at) => (at, false),
        None => (path.rfind(['/', '\\']).map_or(0, |k| k + 1), false),
    }
}

/// The revision component of a git checkout path, if it is one.
fn git_rev(path: &str) -> Option<()> {
    path.contains("checkouts").then_some(())
}

/// `<repo-hash>/<rev>/rest` → `<repo-hash>/rest`.
fn without_git_rev(rest: &str) -> String {
    let mut parts = rest.splitn(3, ['/', '\\']);
    match (parts.next(), parts.next(), parts.next()) {
        (Some(repo), Some(_rev), Some(tail)) => format!("{repo}/{tail}"),
        _ => rest.to_string(),
    }
}

/// `/…`, `\…` or `C:\…` / `C:/…`.
fn is_absolute(path: &str) -> bool {
    let b = path.as_bytes();
    matches!(b.first(), Some(b'/' | b'\\'))
        || (b.len() > 2
            && b[0].is_ascii_alphabetic()
            && b[1] == b':'
            && matches!(b[2], b'/' | b'\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(p: &str) -> (String, bool) {
        let s = show(p);
        (s.path.into_owned(), s.dependency)
    }

    #[test]
    fn no_absolute_path_is_shown() {
        assert_eq!(
            shown("/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/axum-0.8.9/src/serve/mod.rs"),
            ("axum-0.8.9/src/serve/mod.rs".into(), true)
        );
        assert_eq!(
            shown("/home/ci/.cargo/git/checkouts/tokio-3f0a9e1b2c/5d1e2f3/tokio/src/task/spawn.rs"),
            ("tokio-3f0a9e1b2c/tokio/src/task/spawn.rs".into(), true)
        );
        assert_eq!(
            shown("/rustc/59807616e1fa2540724bfbac14d7976d7e4a3860/library/std/src/thread/mod.rs"),
            ("library/std/src/thread/mod.rs".into(), true)
        );
        assert_eq!(
            shown("/builds/acme/svc/vendor/serde_json/src/de.rs"),
            ("serde_json/src/de.rs".into(), true)
        );
        assert_eq!(
            shown("/work/main/examples/demo.rs"),
            ("examples/demo.rs".into(), false)
        );
        assert_eq!(
            shown("/builds/acme/svc/crates/api/src/handlers/report.rs"),
            ("src/handlers/report.rs".into(), false)
        );
        assert_eq!(
            shown("/opt/build/generated.rs"),
            ("generated.rs".into(), false)
        );
        assert_eq!(
            shown(
                r"C:\Users\ci\.cargo\registry\src\index.crates.io-6f17d22bba15001f\hyper-1.6.0\src\server\conn\http1.rs"
            ),
            ("hyper-1.6.0/src/server/conn/http1.rs".into(), true)
        );
    }

    #[test]
    fn relative_paths_are_shown_as_they_are() {
        assert_eq!(shown("src/main.rs"), ("src/main.rs".into(), false));
        assert_eq!(
            shown("examples/demo.rs"),
            ("examples/demo.rs".into(), false)
        );
        assert!(matches!(show("src/main.rs").path, Cow::Borrowed(_)));
        // No allocation for the common absolute cases either.
        assert!(matches!(
            show("/root/.cargo/registry/src/index.crates.io-1/axum-0.8.9/src/lib.rs").path,
            Cow::Borrowed(_)
        ));
        assert!(matches!(
            show("/work/main/examples/demo.rs").path,
            Cow::Borrowed(_)
        ));
    }
}
