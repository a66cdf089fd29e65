//! The library's only `unsafe` code: the few system calls std does not
//! offer, through `libc`. Everything else in the crate sees `OwnedFd`,
//! `BorrowedFd` and `io::Result`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Whether `fd` is an open file descriptor of this process.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: `fcntl(F_GETFD)` only reads the fd's flags; on a number that is
    // not open the kernel answers EBADF and nothing else happens.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Whether `fd` refers to a socket (`fstat`, `S_ISSOCK`).
pub fn is_socket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `fd` is open for the borrow's lifetime and `stat` is valid for
    // writes of one `struct stat`, which `fstat` fills on success.
    check(unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) })?;
    // SAFETY: `fstat` succeeded, so `stat` is initialized.
    let mode = unsafe { stat.assume_init() }.st_mode;
    Ok(mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// Peeks at a stream socket without blocking or consuming anything: the
/// number of bytes waiting (at most 1), 0 at end of file, or `WouldBlock`.
pub fn peek(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut byte = 0u8;
    // SAFETY: `fd` is open for the borrow's lifetime and `byte` is valid for
    // writes of the one byte asked for; MSG_PEEK leaves the data queued.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Accepts a connection on listening socket `fd`, without blocking, as a
/// non-blocking, close-on-exec socket (`accept4`), with the peer's address
/// when it is an IP one.
pub fn accept_nonblocking(
    fd: BorrowedFd<'_>,
) -> io::Result<(OwnedFd, Option<std::net::SocketAddr>)> {
    let mut addr = std::mem::MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `fd` is open for the borrow's lifetime; `addr` is valid for
    // writes of `len` bytes, the size of a `sockaddr_storage`, which holds
    // any address, and the kernel writes back the length it used.
    let conn = check(unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            addr.as_mut_ptr().cast(),
            &raw mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: `accept4` succeeded, so `conn` is a new descriptor this
    // process owns and nothing else refers to.
    let conn = unsafe { OwnedFd::from_raw_fd(conn) };
    // SAFETY: zero-initialized, then (in part) written by the kernel: every
    // byte of a `sockaddr_storage` (plain integers) is initialized.
    let addr = unsafe { addr.assume_init() };
    Ok((conn, socket_addr(&addr, len)))
}

/// An IP address as the kernel wrote it into `addr` (`len` bytes).
fn socket_addr(
    addr: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    let len = len as usize;
    match i32::from(addr.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a `sockaddr_in`, of
            // which the kernel wrote all `len` bytes; `sockaddr_storage` is
            // aligned for every address type.
            let a = unsafe { &*(std::ptr::from_ref(addr).cast::<libc::sockaddr_in>()) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for a `sockaddr_in6`.
            let a = unsafe { &*(std::ptr::from_ref(addr).cast::<libc::sockaddr_in6>()) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(
                SocketAddrV6::new(
                    ip,
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )
                .into(),
            )
        }
        _ => None,
    }
}

/// Sets `FD_CLOEXEC` on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is open for the borrow's lifetime; F_SETFD only changes
    // its descriptor flags.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) }).map(drop)
}

/// An integer socket option (`getsockopt(SOL_SOCKET, option)`).
pub fn socket_option(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is open for the borrow's lifetime; `value` and `len` are
    // valid for writes and `len` holds the size of `value`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// A close-on-exec, non-blocking pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: `fds` is valid for writes of two fds.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
    // SAFETY: `pipe2` succeeded: both fds are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Blocks until `fd` is readable (EINTR is returned as an error).
pub fn wait_readable(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid `pollfd` for the duration of the call.
    check(unsafe { libc::poll(&mut pfd, 1, -1) }).map(drop)
}

/// Reads and discards whatever is in `fd` (non-blocking).
pub fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 64];
    // SAFETY: `buf` is valid for writes of its length; `fd` is open.
    while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

/// Installs `handler` for `signal`, with SA_RESTART and an empty mask.
pub fn set_handler(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    // SAFETY: a zeroed `sigaction` with a handler that is an
    // `extern "C" fn(c_int)`, an empty mask and SA_RESTART is a valid
    // disposition; the handler itself must be async-signal-safe (the caller's
    // duty, documented at the handler).
    check(unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut())
    })
    .map(drop)
}

/// `write(fd, bytes)` for signal handlers: async-signal-safe, keeps errno.
pub fn signal_safe_write(fd: RawFd, bytes: &[u8]) {
    // SAFETY: reading and restoring errno through libc's thread-local
    // accessor and calling `write` are async-signal-safe; `bytes` is valid
    // for reads of its length. A bad `fd` only makes `write` fail.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        *libc::__errno_location() = errno;
    }
}

/// Closes `fd`, an fd this process owns but keeps no `OwnedFd` for.
///
/// # Safety
///
/// Nothing else may own or use `fd` afterwards.
pub unsafe fn close_raw(fd: RawFd) {
    // SAFETY: the caller guarantees `fd` is owned and unused elsewhere.
    unsafe { libc::close(fd) };
}

/// Registers an owned socket with the current tokio runtime, for reading.
#[cfg(feature = "tokio")]
pub fn register_readable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the `AsyncFd` owns `fd`: it stays open, and `as_raw_fd`
    // returns the same number, until the `AsyncFd` is dropped or gives it
    // back (`into_inner`), as `register_with_interest` requires.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}
