//! Syscall numbers to names, for the architectures loopwatch diagnoses (Linux x86_64 and
//! aarch64). The list covers the calls that block a thread in practice; any other number is
//! reported as `syscall(#N)`.

/// The name of syscall `nr` on this architecture, if known.
/// Is `nr` the call a tokio worker parks in while it holds the I/O driver (mio's
/// `epoll_wait`)? A thread asleep in it is between polls, whatever its slot says.
pub(crate) fn is_runtime_park(nr: i64) -> bool {
    matches!(
        name(nr),
        Some("epoll_wait" | "epoll_pwait" | "epoll_pwait2")
    )
}

pub(crate) fn name(nr: i64) -> Option<&'static str> {
    TABLE
        .iter()
        .find(|&&(n, _)| i64::from(n) == nr)
        .map(|&(_, name)| name)
}

#[cfg(target_arch = "x86_64")]
const TABLE: &[(u16, &str)] = &[
    (0, "read"),
    (1, "write"),
    (2, "open"),
    (3, "close"),
    (4, "stat"),
    (5, "fstat"),
    (6, "lstat"),
    (7, "poll"),
    (8, "lseek"),
    (9, "mmap"),
    (10, "mprotect"),
    (11, "munmap"),
    (12, "brk"),
    (16, "ioctl"),
    (17, "pread64"),
    (18, "pwrite64"),
    (19, "readv"),
    (20, "writev"),
    (21, "access"),
    (23, "select"),
    (24, "sched_yield"),
    (26, "msync"),
    (34, "pause"),
    (35, "nanosleep"),
    (40, "sendfile"),
    (41, "socket"),
    (42, "connect"),
    (43, "accept"),
    (44, "sendto"),
    (45, "recvfrom"),
    (46, "sendmsg"),
    (47, "recvmsg"),
    (48, "shutdown"),
    (49, "bind"),
    (56, "clone"),
    (57, "fork"),
    (59, "execve"),
    (61, "wait4"),
    (62, "kill"),
    (65, "semop"),
    (70, "msgrcv"),
    (72, "fcntl"),
    (73, "flock"),
    (74, "fsync"),
    (75, "fdatasync"),
    (76, "truncate"),
    (77, "ftruncate"),
    (78, "getdents"),
    (82, "rename"),
    (83, "mkdir"),
    (84, "rmdir"),
    (87, "unlink"),
    (162, "sync"),
    (202, "futex"),
    (208, "io_getevents"),
    (217, "getdents64"),
    (230, "clock_nanosleep"),
    (232, "epoll_wait"),
    (247, "waitid"),
    (257, "openat"),
    (270, "pselect6"),
    (271, "ppoll"),
    (275, "splice"),
    (277, "sync_file_range"),
    (281, "epoll_pwait"),
    (288, "accept4"),
    (299, "recvmmsg"),
    (306, "syncfs"),
    (307, "sendmmsg"),
    (318, "getrandom"),
    (326, "copy_file_range"),
    (327, "preadv2"),
    (328, "pwritev2"),
    (332, "statx"),
    (426, "io_uring_enter"),
    (441, "epoll_pwait2"),
    (449, "futex_waitv"),
];

#[cfg(target_arch = "aarch64")]
const TABLE: &[(u16, &str)] = &[
    (4, "io_getevents"),
    (17, "getcwd"),
    (21, "epoll_ctl"),
    (22, "epoll_pwait"),
    (25, "fcntl"),
    (29, "ioctl"),
    (32, "flock"),
    (34, "mkdirat"),
    (35, "unlinkat"),
    (38, "renameat"),
    (56, "openat"),
    (57, "close"),
    (61, "getdents64"),
    (62, "lseek"),
    (63, "read"),
    (64, "write"),
    (65, "readv"),
    (66, "writev"),
    (67, "pread64"),
    (68, "pwrite64"),
    (71, "sendfile"),
    (72, "pselect6"),
    (73, "ppoll"),
    (76, "splice"),
    (79, "newfstatat"),
    (80, "fstat"),
    (81, "sync"),
    (82, "fsync"),
    (83, "fdatasync"),
    (84, "sync_file_range"),
    (95, "waitid"),
    (98, "futex"),
    (101, "nanosleep"),
    (115, "clock_nanosleep"),
    (124, "sched_yield"),
    (129, "kill"),
    (188, "msgrcv"),
    (193, "semop"),
    (198, "socket"),
    (200, "bind"),
    (202, "accept"),
    (203, "connect"),
    (206, "sendto"),
    (207, "recvfrom"),
    (210, "shutdown"),
    (211, "sendmsg"),
    (212, "recvmsg"),
    (215, "munmap"),
    (220, "clone"),
    (221, "execve"),
    (222, "mmap"),
    (226, "mprotect"),
    (227, "msync"),
    (242, "accept4"),
    (243, "recvmmsg"),
    (260, "wait4"),
    (267, "syncfs"),
    (269, "sendmmsg"),
    (278, "getrandom"),
    (285, "copy_file_range"),
    (286, "preadv2"),
    (287, "pwritev2"),
    (291, "statx"),
    (426, "io_uring_enter"),
    (441, "epoll_pwait2"),
    (449, "futex_waitv"),
];

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const TABLE: &[(u16, &str)] = &[];

#[cfg(test)]
mod tests {
    #[test]
    fn common_blocking_calls_have_names() {
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(super::name(35), Some("nanosleep"));
            assert_eq!(super::name(202), Some("futex"));
            assert_eq!(super::name(0), Some("read"));
        }
        #[cfg(target_arch = "aarch64")]
        {
            assert_eq!(super::name(101), Some("nanosleep"));
            assert_eq!(super::name(98), Some("futex"));
            assert_eq!(super::name(63), Some("read"));
        }
        assert_eq!(super::name(-1), None);
        assert_eq!(super::name(100_000), None);
    }
}
