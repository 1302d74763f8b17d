//! Waiting on a `std::sync::Mutex` held by another thread is `syscall(futex)`, with the
//! lock hint.
#![cfg(all(target_os = "linux", not(loopwatch_portable)))]

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use loopwatch::Cause;

#[test]
fn a_contended_std_mutex_is_a_futex_syscall() {
    let _serial = common::serial();
    let h = common::diagnosing(Duration::from_millis(10));
    let lock = Arc::new(Mutex::new(0u64));
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let holder = {
        let lock = lock.clone();
        std::thread::spawn(move || {
            let mut g = lock.lock().unwrap();
            held_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(150));
            *g += 1;
        })
    };
    held_rx.recv().unwrap();
    let s = common::stall_of(&h, "locker", async move {
        *lock.lock().unwrap() += 1;
    });
    holder.join().unwrap();
    let Cause::Syscall(sc) = s.cause else {
        panic!("expected a syscall: {s:#?}");
    };
    assert_eq!(sc.name, Some("futex"), "{s:#?}");
    assert!(s.hint.unwrap().contains("tokio::sync::Mutex"));
}
