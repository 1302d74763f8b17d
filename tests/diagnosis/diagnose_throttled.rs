//! A poll in a cgroup whose CPU quota runs out (the CFS bandwidth limit of a container) is
//! runnable without a CPU for most of its stall, and its own CPU time stays under the
//! threshold: the cause is `throttled`, naming the quota. A real cgroup (v1's `cpu`
//! controller, with the worker thread alone moved into it); skipped, saying why, where none can
//! be made.
#![cfg(all(target_os = "linux", not(loopwatch_portable)))]

use crate::common;

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use loopwatch::{Cause, StallState};

const THRESHOLD: Duration = Duration::from_millis(20);

/// A cgroup of the v1 `cpu` controller allowed 2 ms of CPU per 50 ms, removed on drop.
struct Quota {
    dir: PathBuf,
    parent: PathBuf,
}

impl Quota {
    fn make() -> Result<Quota, String> {
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let mount = mountinfo
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let r: Vec<&str> = right.split(' ').collect();
                let cpu = r.first() == Some(&"cgroup") && r.get(2)?.split(',').any(|o| o == "cpu");
                let l: Vec<&str> = left.split(' ').collect();
                (cpu && l.get(3) == Some(&"/")).then(|| PathBuf::from(l[4]))
            })
            .ok_or(
                "no cgroup v1 `cpu` hierarchy is mounted (cgroup v2 only moves whole processes)",
            )?;
        let dir = mount.join(format!("loopwatch-throttle-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let q = Quota { dir, parent: mount };
        std::fs::write(q.dir.join("cpu.cfs_period_us"), "50000").map_err(|e| e.to_string())?;
        std::fs::write(q.dir.join("cpu.cfs_quota_us"), "2000").map_err(|e| e.to_string())?;
        Ok(q)
    }

    fn enter(dir: &Path) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        std::fs::write(dir.join("tasks"), tid.to_string()).expect("move the thread");
    }
}

impl Drop for Quota {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[test]
fn a_poll_held_by_its_cgroups_quota_is_throttled() {
    let _serial = common::serial();
    let q = match Quota::make() {
        Ok(q) => q,
        Err(why) => {
            eprintln!("skipped: no cgroup with a CPU quota can be made here: {why}");
            return;
        }
    };
    let h = common::diagnosing(THRESHOLD);
    let measured = std::sync::Arc::new(std::sync::Mutex::new(None));
    let m = measured.clone();
    // A current-thread runtime on this thread, moved into the cgroup before the poll starts
    // (as a container's threads are from their start): the watchdog finds the thread's cgroup
    // when it first reads it, at half the threshold.
    let rt = h.current_thread();
    let _sub = h.enter();
    Quota::enter(&q.dir);
    rt.block_on(h.guard.watch("quota-bound", async move {
        let (c0, t0) = (thread_cpu(), Instant::now());
        // 15 ms of CPU (under the 20 ms threshold) with 2 ms allowed per 50 ms: held back by
        // the quota for six periods or more, whatever the phase it starts in.
        while thread_cpu() - c0 < Duration::from_millis(15) && t0.elapsed() < Duration::from_secs(3)
        {
            std::hint::spin_loop();
        }
        *m.lock().unwrap() = Some((thread_cpu() - c0, t0.elapsed()));
    }));
    Quota::enter(&q.parent);
    let s = h
        .wait_for(common::ENDED_WAIT, |s| {
            s.state == StallState::Ended && s.task.name.as_deref() == Some("quota-bound")
        })
        .unwrap_or_else(|| panic!("no ended stall: {:#?}", h.seen.lock().unwrap()));
    let (cpu, wall) = measured.lock().unwrap().expect("the poll ran");
    assert_eq!(s.state, StallState::Ended);
    assert!(
        wall >= Duration::from_millis(200),
        "the quota held it back: {wall:?}"
    );
    let Cause::Throttled(quota) = s.cause else {
        panic!("{cpu:?} of CPU over {wall:?} in a 0.04-CPU cgroup: {s}")
    };
    assert_eq!((quota.quota_us, quota.period_us), (2_000, 50_000));
    assert!(
        s.to_string().contains("throttled(0.04 CPU: 2ms per 50ms)"),
        "{s}"
    );
    assert!(s.hint.is_some_and(|h| h.contains("CPU quota")), "{s}");
}
