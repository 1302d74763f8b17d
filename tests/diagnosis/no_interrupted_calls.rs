//! The stack signal never interrupts the application's blocking calls. Linux does not restart a
//! socket call with a timeout, `poll` or `nanosleep` after a signal handler, even with
//! `SA_RESTART`, and std's `read` does not retry: with the signal sent into them, 150 of 480 such
//! calls inside stalled polls failed with `Interrupted` (30 of 30 for each kind). Each call here
//! blocks a worker well past the threshold with stacks on: it must end as it would without
//! loopwatch, and the stall is still reported, naming the call, with the stack of the blocked
//! thread read without a signal: its first frame is the function that made the call.
#![cfg(all(target_os = "linux", not(loopwatch_portable)))]

use crate::common;

use std::io::{ErrorKind, Read};
use std::time::Duration;

use loopwatch::{Cause, StackStatus};

const BLOCK: Duration = Duration::from_millis(120);

/// How a blocking call ended: `Ok` with what it says, or the error kind it failed with.
type Outcome = Result<String, ErrorKind>;

/// A blocking call: its name, the call, and how it ends without loopwatch.
type Call = (&'static str, fn() -> Outcome, Outcome);

fn tcp_read_with_timeout() -> Outcome {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let _server = listener.accept().unwrap();
    c.set_read_timeout(Some(BLOCK)).unwrap();
    let mut buf = [0u8; 8];
    c.read(&mut buf)
        .map(|n| format!("read {n}"))
        .map_err(|e| e.kind())
}

fn unix_read_with_timeout() -> Outcome {
    let (mut a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_read_timeout(Some(BLOCK)).unwrap();
    let mut buf = [0u8; 8];
    a.read(&mut buf)
        .map(|n| format!("read {n}"))
        .map_err(|e| e.kind())
}

fn udp_recv_with_timeout() -> Outcome {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(BLOCK)).unwrap();
    let mut buf = [0u8; 8];
    s.recv_from(&mut buf)
        .map(|(n, _)| format!("recv {n}"))
        .map_err(|e| e.kind())
}

fn libc_nanosleep() -> Outcome {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: BLOCK.as_nanos() as i64,
    };
    // SAFETY: nanosleep reads the timespec; no remainder is asked for.
    let rc = unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    if rc == 0 {
        Ok("slept".into())
    } else {
        Err(std::io::Error::last_os_error().kind())
    }
}

fn libc_poll() -> Outcome {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let mut p = libc::pollfd {
        fd: fds[0],
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the descriptors are closed below.
    let rc = unsafe { libc::poll(&mut p, 1, BLOCK.as_millis() as i32) };
    let out = if rc >= 0 {
        Ok(format!("poll {rc}"))
    } else {
        Err(std::io::Error::last_os_error().kind())
    };
    // SAFETY: closing the pipe's two descriptors, ours.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    out
}

fn pipe_read() -> Outcome {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let writer = fds[1];
    let t = std::thread::spawn(move || {
        std::thread::sleep(BLOCK);
        // SAFETY: writing one byte from a valid buffer to the pipe's write end.
        unsafe { libc::write(writer, b"x".as_ptr().cast(), 1) };
    });
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into a valid buffer from the pipe's read end.
    let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
    let out = if n >= 0 {
        Ok(format!("read {n}"))
    } else {
        Err(std::io::Error::last_os_error().kind())
    };
    t.join().unwrap();
    // SAFETY: closing the pipe's two descriptors, ours.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    out
}

fn thread_sleep() -> Outcome {
    std::thread::sleep(BLOCK);
    Ok("slept".into())
}

fn mutex_lock() -> Outcome {
    let m = std::sync::Arc::new(std::sync::Mutex::new(0u32));
    let (held, wait) = std::sync::mpsc::channel();
    let holder = {
        let m = m.clone();
        std::thread::spawn(move || {
            let _g = m.lock().unwrap();
            held.send(()).unwrap();
            std::thread::sleep(BLOCK);
        })
    };
    wait.recv().unwrap();
    let v = *m.lock().unwrap();
    holder.join().unwrap();
    Ok(format!("locked {v}"))
}

fn condvar_wait() -> Outcome {
    let pair = (std::sync::Mutex::new(false), std::sync::Condvar::new());
    let g = pair.0.lock().unwrap();
    let (_g, r) = pair.1.wait_timeout(g, BLOCK).unwrap();
    Ok(format!("timed out {}", r.timed_out()))
}

fn child_wait() -> Outcome {
    std::process::Command::new("sleep")
        .arg(format!("{}", BLOCK.as_secs_f64()))
        .status()
        .map(|s| format!("exit {}", s.success()))
        .map_err(|e| e.kind())
}

#[test]
fn blocking_calls_in_stalled_polls_are_never_interrupted() {
    let _serial = common::serial();
    // Thirty stalls in a few seconds: above the default rate of stacks.
    let h = common::harness(
        loopwatch::builder()
            .threshold(Duration::from_millis(10))
            .max_stacks_per_sec(100),
    );
    assert!(h.guard.wait_for_symbols(Duration::from_secs(120)));
    let calls: [Call; 10] = [
        (
            "tcp-read",
            tcp_read_with_timeout,
            Err(ErrorKind::WouldBlock),
        ),
        (
            "unix-read",
            unix_read_with_timeout,
            Err(ErrorKind::WouldBlock),
        ),
        (
            "udp-recv",
            udp_recv_with_timeout,
            Err(ErrorKind::WouldBlock),
        ),
        ("nanosleep", libc_nanosleep, Ok("slept".into())),
        ("poll", libc_poll, Ok("poll 0".into())),
        // Calls SA_RESTART would resume: never interrupted either, and their stacks too.
        ("pipe-read", pipe_read, Ok("read 1".into())),
        ("thread-sleep", thread_sleep, Ok("slept".into())),
        ("mutex-lock", mutex_lock, Ok("locked 0".into())),
        ("condvar-wait", condvar_wait, Ok("timed out true".into())),
        ("child-wait", child_wait, Ok("exit true".into())),
    ];
    for round in 0..3 {
        for (name, call, expected) in &calls {
            let (tx, rx) = std::sync::mpsc::channel();
            let s = common::stall_of(&h, &format!("{name}-{round}"), {
                let call = *call;
                async move {
                    tx.send(call()).unwrap();
                }
            });
            let got = rx.recv().unwrap();
            assert_eq!(
                &got, expected,
                "{name} (round {round}) ended otherwise: {s:#?}"
            );
            assert!(matches!(s.cause, Cause::Syscall(_)), "{name}: {s:#?}");
            assert_eq!(s.stack_status, StackStatus::Captured, "{name}: {s:#?}");
            let frames = common::first_frames(&s, 1);
            assert!(
                frames.first().is_some_and(|f| f.contains(CALLERS[*name])),
                "{name}: {frames:#?}\n{:?}",
                s.stack
            );
        }
    }
    let snap = h.guard.snapshot();
    assert!(snap.stacks_captured >= 30, "{}", snap.stacks_captured);
    assert_eq!(snap.stacks_in_syscall, 0);
}

/// The function each call is made from (the first frame of its stack).
static CALLERS: std::sync::LazyLock<std::collections::HashMap<&str, &str>> =
    std::sync::LazyLock::new(|| {
        [
            ("tcp-read", "tcp_read_with_timeout"),
            ("unix-read", "unix_read_with_timeout"),
            ("udp-recv", "udp_recv_with_timeout"),
            ("nanosleep", "libc_nanosleep"),
            ("poll", "libc_poll"),
            ("pipe-read", "pipe_read"),
            ("thread-sleep", "thread_sleep"),
            ("mutex-lock", "mutex_lock"),
            ("condvar-wait", "condvar_wait"),
            ("child-wait", "child_wait"),
        ]
        .into_iter()
        .collect()
    });
