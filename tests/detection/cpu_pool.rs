//! The CPU layer (feature `rayon`): a pool fed 1M jobs of ~1 µs gets the "too fine" report; fed
//! 1k jobs of ~5 ms, it does not. A job that waits in a system call on the pool is a `cpu`
//! stall with a `syscall` cause and the "waiting on a CPU pool" hint.
#![cfg(feature = "rayon")]

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loopwatch::LayerKind;

fn feed(pool: &loopwatch::CpuPool, jobs: usize, each: Duration) {
    let done = Arc::new(AtomicUsize::new(0));
    for _ in 0..jobs {
        let done = done.clone();
        pool.spawn(move || {
            common::spin_for(each);
            done.fetch_add(1, Ordering::Release);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::Acquire) < jobs {
        assert!(
            Instant::now() < deadline,
            "the pool did not finish its jobs"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn pool(h: &common::Harness, name: &str) -> loopwatch::CpuPool {
    h.guard
        .cpu_pool(name, rayon::ThreadPoolBuilder::new().num_threads(2))
        .unwrap()
}

#[test]
fn too_fine_jobs_are_reported_and_coarse_ones_are_not() {
    let _serial = common::serial();
    let h = common::harness(loopwatch::builder());
    let fine = pool(&h, "fine");
    feed(&fine, 1_000_000, Duration::from_micros(1));
    let (jobs, too_fine) = fine.jobs();
    assert_eq!(jobs, 1_000_000);
    assert!(too_fine > 900_000, "{too_fine}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.guard.snapshot().cpu_too_fine_reports == 0 {
        assert!(Instant::now() < deadline, "no too-fine report");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Job durations on the cpu layer.
    let snap = h.guard.snapshot();
    assert!(snap
        .poll_durations
        .iter()
        .any(|k| k.layer == LayerKind::Cpu && k.histogram.count > 1_000));

    let h2 = common::harness(loopwatch::builder());
    let coarse = pool(&h2, "coarse");
    feed(&coarse, 1_000, Duration::from_millis(5));
    assert_eq!(coarse.jobs(), (1_000, 0));
    std::thread::sleep(Duration::from_millis(1_500)); // past the watchdog's next look
    assert_eq!(h2.guard.snapshot().cpu_too_fine_reports, 0);
}

#[cfg(all(target_os = "linux", not(loopwatch_portable)))]
#[test]
fn a_cpu_job_waiting_in_a_syscall_is_named() {
    let _serial = common::serial();
    let h = common::harness(
        loopwatch::builder()
            .cpu_threshold(Duration::from_millis(100))
            .stacks(false),
    );
    let p = pool(&h, "waiter");
    p.install(|| std::thread::sleep(Duration::from_millis(400)));
    let s = h
        .wait_for(common::ENDED_WAIT, |s| {
            s.layer == LayerKind::Cpu && s.state == loopwatch::StallState::Ended
        })
        .expect("a stall on the cpu layer");
    assert!(matches!(s.cause, loopwatch::Cause::Syscall(_)), "{s}");
    assert!(s.hint.unwrap().contains("CPU pool job waiting"), "{s}");
    assert_eq!(s.task.name.as_deref(), Some("waiter"));
}
