//! A blocking `std::net` read on a loopback socket is `syscall(read)` or `syscall(recvfrom)`,
//! with the tokio I/O hint.
#![cfg(all(target_os = "linux", not(loopwatch_portable)))]

use crate::common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use loopwatch::Cause;

#[test]
fn a_blocking_socket_read_is_a_read_syscall() {
    let _serial = common::serial();
    let h = common::diagnosing(Duration::from_millis(10));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = TcpStream::connect(addr).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    // The peer answers 150 ms later: the read blocks the worker until then.
    let answer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        server.write_all(b"x").unwrap();
        server
    });
    let s = common::stall_of(&h, "reader", async move {
        let mut client = client;
        let mut buf = [0u8; 1];
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.read_exact(&mut buf).unwrap();
    });
    drop(answer.join());
    let Cause::Syscall(sc) = s.cause else {
        panic!("expected a syscall: {s:#?}");
    };
    assert!(
        matches!(sc.name, Some("read" | "recvfrom" | "recvmsg")),
        "{sc:?}"
    );
    assert!(s.hint.unwrap().contains("tokio::net"), "{:?}", s.hint);
}
