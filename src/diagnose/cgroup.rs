//! CPU-quota throttling (Linux): the CFS bandwidth limit of a thread's cgroup (v2 `cpu.max`,
//! v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) and how long the cgroup has been throttled
//! (`cpu.stat`: v2 `throttled_usec`, v1 `throttled_time`).
//!
//! In a container the commonest starvation is the quota, not neighbours: a thread that is
//! runnable and gets no CPU while its cgroup is throttled was throttled. The files are found
//! once per followed thread (off the poll path, on the watchdog): the thread's cgroup from
//! `/proc/self/task/<tid>/cgroup`, the hierarchy's mount point from `/proc/self/mountinfo`,
//! then the nearest cgroup on the way up that has a quota. `cpu.stat` is kept open and re-read
//! with `pread`.
//!
//! The kernel adds to `throttled_*` when a throttled group is let run again (at the next
//! period), so a stall's throttling shows up to one period late: the running report of a stall
//! may say `starved` where its ended report says `throttled`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::CpuQuota;

/// Which cgroup hierarchy the limit lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// The CPU limit of one thread's cgroup, with its `cpu.stat` kept open.
#[derive(Debug)]
pub(crate) struct CpuLimit {
    stat: File,
    version: Version,
    pub(crate) quota: CpuQuota,
}

impl CpuLimit {
    /// The limit of thread `tid` of this process, if its cgroup (or an ancestor visible here)
    /// has a CPU quota.
    pub(crate) fn of_thread(tid: u64) -> Option<CpuLimit> {
        let cgroups = std::fs::read_to_string(format!("/proc/self/task/{tid}/cgroup")).ok()?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        // v2 first (the unified hierarchy), then v1's `cpu` controller.
        for version in [Version::V2, Version::V1] {
            let Some(path) = cgroup_path(&cgroups, version) else {
                continue;
            };
            let Some((mount, root)) = mount_point(&mountinfo, version) else {
                continue;
            };
            let Some(dir) = hierarchy_dir(Path::new(&mount), &root, &path) else {
                continue;
            };
            if let Some(limit) = Self::nearest(&dir, Path::new(&mount), version) {
                return Some(limit);
            }
        }
        None
    }

    /// The nearest cgroup from `dir` up to `mount` with a quota.
    fn nearest(dir: &Path, mount: &Path, version: Version) -> Option<CpuLimit> {
        let mut at = Some(dir);
        while let Some(d) = at {
            if let Some(quota) = read_quota(d, version) {
                let stat = File::open(d.join("cpu.stat")).ok()?;
                return Some(CpuLimit {
                    stat,
                    version,
                    quota,
                });
            }
            if d == mount {
                break;
            }
            at = d.parent().filter(|p| p.starts_with(mount));
        }
        None
    }

    /// How long the cgroup has been throttled, in nanoseconds (summed over its CPUs).
    pub(crate) fn throttled_ns(&self) -> Option<u64> {
        let mut buf = [0u8; 1024];
        let n = loop {
            match self.stat.read_at(&mut buf, 0) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        };
        parse_throttled_ns(std::str::from_utf8(&buf[..n]).ok()?, self.version)
    }
}

/// The thread's path in one hierarchy, from its `cgroup` file: v2 `0::/path`; v1
/// `N:controllers:/path` with `cpu` among the controllers.
fn cgroup_path(cgroups: &str, version: Version) -> Option<String> {
    cgroups.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let wanted = match version {
            Version::V2 => id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "cpu"),
        };
        wanted.then(|| path.to_string())
    })
}

/// Where the hierarchy is mounted, and which of its cgroups is the mount's root (not `/` in a
/// bind mount): from `/proc/self/mountinfo`
/// (`id parent major:minor root mount-point options - fstype source super-options`).
fn mount_point(mountinfo: &str, version: Version) -> Option<(String, String)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        let (root, mount) = (*l.get(3)?, *l.get(4)?);
        let fstype = *r.first()?;
        let ok = match version {
            Version::V2 => fstype == "cgroup2",
            Version::V1 => fstype == "cgroup" && r.get(2)?.split(',').any(|o| o == "cpu"),
        };
        ok.then(|| (unescape(mount), unescape(root)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` under a hierarchy mounted at `mount` whose root is `root`.
fn hierarchy_dir(mount: &Path, root: &str, path: &str) -> Option<PathBuf> {
    let rel = if root == "/" {
        path
    } else {
        path.strip_prefix(root)?
    };
    let rel = rel.trim_start_matches('/');
    if rel.split('/').any(|c| c == "..") {
        return None;
    }
    Some(if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    })
}

/// The quota set on cgroup directory `dir`, if any.
fn read_quota(dir: &Path, version: Version) -> Option<CpuQuota> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    match version {
        Version::V2 => parse_cpu_max(&read("cpu.max")?),
        Version::V1 => parse_v1_quota(&read("cpu.cfs_quota_us")?, &read("cpu.cfs_period_us")?),
    }
}

/// v2 `cpu.max`: `max 100000` (no quota) or `50000 100000`.
fn parse_cpu_max(text: &str) -> Option<CpuQuota> {
    let mut f = text.split_whitespace();
    let quota = f.next()?.parse::<u64>().ok()?;
    let period = f.next()?.parse::<u64>().ok()?;
    CpuQuota::from_us(quota, period)
}

/// v1: `cpu.cfs_quota_us` (`-1`: no quota) and `cpu.cfs_period_us`.
fn parse_v1_quota(quota: &str, period: &str) -> Option<CpuQuota> {
    let quota = quota.trim().parse::<i64>().ok()?;
    let period = period.trim().parse::<u64>().ok()?;
    CpuQuota::from_us(u64::try_from(quota).ok()?, period)
}

/// The throttled time of a `cpu.stat`, in nanoseconds.
fn parse_throttled_ns(text: &str, version: Version) -> Option<u64> {
    let (key, scale) = match version {
        Version::V2 => ("throttled_usec", 1_000),
        Version::V1 => ("throttled_time", 1),
    };
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| {
            v.trim()
                .parse::<u64>()
                .ok()
                .map(|v| v.saturating_mul(scale))
        })?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_files_parse() {
        let cg = "9:name=systemd:/\n4:memory:/x\n2:cpuacct:/\n1:cpu,cpuacct:/lw/a\n0::/svc/web\n";
        assert_eq!(cgroup_path(cg, Version::V2).as_deref(), Some("/svc/web"));
        assert_eq!(cgroup_path(cg, Version::V1).as_deref(), Some("/lw/a"));
        assert_eq!(cgroup_path("0::/\n", Version::V1), None);
    }

    #[test]
    fn mount_points_parse() {
        let mi = "\
30 25 0:26 / /sys/fs/cgroup/unified rw,relatime shared:4 - cgroup2 cgroup2 rw
31 25 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:5 - cgroup cgroup rw,cpu
32 25 0:28 / /sys/fs/cgroup/cpuacct rw,relatime shared:6 - cgroup cgroup rw,cpuacct
";
        assert_eq!(
            mount_point(mi, Version::V2),
            Some(("/sys/fs/cgroup/unified".into(), "/".into()))
        );
        assert_eq!(
            mount_point(mi, Version::V1),
            Some(("/sys/fs/cgroup/cpu".into(), "/".into()))
        );
        let bind = "40 1 0:30 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_point(bind, Version::V2),
            Some(("/sys/fs/cgroup".into(), "/kubepods/pod1".into()))
        );
        assert_eq!(unescape(r"/a\040b"), "/a b");
    }

    #[test]
    fn a_cgroup_path_maps_into_its_mount() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(hierarchy_dir(m, "/", "/"), Some(m.to_path_buf()));
        assert_eq!(hierarchy_dir(m, "/", "/a/b"), Some(m.join("a/b")));
        assert_eq!(
            hierarchy_dir(m, "/kube/pod", "/kube/pod/c"),
            Some(m.join("c"))
        );
        assert_eq!(hierarchy_dir(m, "/kube/pod", "/other"), None);
        assert_eq!(hierarchy_dir(m, "/", "/a/../b"), None);
    }

    #[test]
    fn quotas_and_throttled_time_parse() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        let q = parse_cpu_max("50000 100000\n").unwrap();
        assert_eq!((q.quota_us, q.period_us), (50_000, 100_000));
        assert_eq!(parse_v1_quota("-1\n", "100000\n"), None);
        assert_eq!(
            parse_v1_quota("20000\n", "100000\n").map(|q| q.quota_us),
            Some(20_000)
        );
        let v2 = "usage_usec 5\nuser_usec 3\nsystem_usec 2\nnr_periods 9\nnr_throttled 4\nthrottled_usec 1234\n";
        assert_eq!(parse_throttled_ns(v2, Version::V2), Some(1_234_000));
        let v1 = "nr_periods 9\nnr_throttled 4\nthrottled_time 5678\n";
        assert_eq!(parse_throttled_ns(v1, Version::V1), Some(5678));
        assert_eq!(parse_throttled_ns("nr_periods 1\n", Version::V1), None);
    }

    #[test]
    fn the_nearest_cgroup_with_a_quota_is_found_on_the_way_up() {
        let root = std::env::temp_dir().join(format!("lw-cgroup-{}", std::process::id()));
        let leaf = root.join("svc/web");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(root.join("cpu.max"), "max 100000\n").unwrap();
        std::fs::write(root.join("svc/cpu.max"), "25000 50000\n").unwrap();
        std::fs::write(root.join("svc/cpu.stat"), "throttled_usec 7\n").unwrap();
        std::fs::write(leaf.join("cpu.max"), "max 100000\n").unwrap();
        let limit = CpuLimit::nearest(&leaf, &root, Version::V2).expect("svc's quota");
        assert_eq!(
            (limit.quota.quota_us, limit.quota.period_us),
            (25_000, 50_000)
        );
        assert_eq!(limit.throttled_ns(), Some(7_000));
        assert!(CpuLimit::nearest(&root, &root, Version::V2).is_none());
        let _ = std::fs::remove_dir_all(root);
    }
}
