//! Binding the listening sockets baton owns and hands to every generation.
//!
//! All sockets are created close-on-exec: only the spawn path decides which
//! fds a child inherits. Listeners get `SO_REUSEADDR` (a restarted baton can
//! bind while old connections sit in TIME_WAIT) and a deep backlog, because
//! during a handover connections queue in the kernel until a generation
//! accepts them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};

/// Accept-queue length asked for; the kernel caps it at `net.core.somaxconn`
/// (4096 by default on current kernels).
pub const BACKLOG: i32 = 4096;

/// Binds a TCP listener. `dual_stack` makes an IPv6 socket accept IPv4 too
/// (for `:PORT`).
pub fn bind_tcp(addr: SocketAddr, dual_stack: bool) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv6() {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    if addr.is_ipv6() && dual_stack {
        sockopt::set_ipv6_v6only(&fd, false)?;
    }
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, BACKLOG)?;
    Ok(fd)
}

/// Binds a Unix stream listener at `path`, replacing a stale socket file
/// left by a process that died, but never one somebody still listens on.
pub fn bind_unix(path: &Path) -> io::Result<OwnedFd> {
    clear_stale_socket(path)?;
    let fd = OwnedFd::from(UnixListener::bind(path)?);
    rustix::net::listen(&fd, BACKLOG)?;
    Ok(fd)
}

/// Removes `path` if it is a socket nobody listens on. Fails with
/// `AddrInUse` if something answers there (or its queue is full), and
/// `AlreadyExists` if `path` is not a socket. Never blocks: the check is a
/// non-blocking connect.
pub fn clear_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "it is a directory",
        ));
    }
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    let probe = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    let addr = rustix::net::SocketAddrUnix::new(path)?;
    match rustix::net::connect(&probe, &addr) {
        // Accepted, or queued (EAGAIN: the queue is full): in use.
        Ok(()) | Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INPROGRESS) => {
            Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is listening on it",
            ))
        }
        Err(rustix::io::Errno::CONNREFUSED) => std::fs::remove_file(path),
        Err(e) => Err(e.into()),
    }
}

/// The address a TCP listener is bound to (the real port after `:0`).
pub fn tcp_local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    let any = rustix::net::getsockname(fd)?;
    SocketAddr::try_from(any).map_err(|_| io::Error::other("not an IP socket"))
}

/// Whether a listener still takes connections. Apps share baton's
/// listening sockets, and one that calls `shutdown(2)` on its copy (some
/// servers do on close) shuts the socket for everyone: a TCP listener then
/// leaves the LISTEN state, a Unix one stays in it but refuses every
/// connect. Both show as a hang-up to `poll(2)`.
pub fn is_listening(fd: &OwnedFd) -> bool {
    if matches!(sockopt::socket_acceptconn(fd), Ok(false)) {
        return false;
    }
    let mut fds = [PollFd::new(fd, PollFlags::RDHUP)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&zero)) {
        Ok(0) | Err(_) => true,
        Ok(_) => !fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR),
    }
}

/// Makes a TCP listener that was shut down listen again on `addr`, the
/// address it was bound to. A socket bound to an explicit port keeps its
/// port through a shutdown (binding again fails with `EINVAL`) and only
/// needs `listen`; one whose port the kernel chose (`:0`) lost it, and
/// `listen` alone would pick another one, so it is bound again first
/// (`getsockname` still shows the old port either way).
pub fn relisten_tcp(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    match rustix::net::bind(fd, &addr) {
        Ok(()) | Err(rustix::io::Errno::INVAL) => {}
        Err(e) => return Err(e.into()),
    }
    rustix::net::listen(fd, BACKLOG)?;
    Ok(())
}

/// `shutdown(SHUT_RDWR)` on a socket (the demo app's fault switch that
/// shuts down an inherited listener).
pub fn shut_down(fd: &OwnedFd) -> io::Result<()> {
    rustix::net::shutdown(fd, rustix::net::Shutdown::Both)?;
    Ok(())
}

/// Reads what a connection has already received into the spare capacity of
/// `buf`, without waiting: `Ok(0)` at the end of the stream, `WouldBlock`
/// if nothing came yet. Unlike a read through the runtime, it does not
/// depend on the runtime having polled the socket, so a fresh connection's
/// first request is read at once.
pub fn recv_now(fd: std::os::fd::BorrowedFd<'_>, buf: &mut bytes::BytesMut) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let ((filled, _), _) = rustix::net::recv(fd, spare, rustix::net::RecvFlags::DONTWAIT)?;
    let n = filled.len();
    // SAFETY: `recv` initialized the first `n` bytes of the spare capacity,
    // which directly follows the `buf.len()` bytes already initialized.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// What waits to be read on a connected socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Nothing.
    Nothing,
    /// Bytes.
    Bytes,
    /// The end of the stream, or an error.
    End,
}

/// What waits to be read on a connected socket, asked of the kernel (a
/// `recv(MSG_PEEK | MSG_DONTWAIT)`), not of a runtime's cached readiness.
pub fn waiting(fd: std::os::fd::BorrowedFd<'_>) -> Waiting {
    let mut byte = [0u8; 1];
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    match rustix::net::recv(fd, &mut byte, flags) {
        Err(rustix::io::Errno::AGAIN) => Waiting::Nothing,
        Ok((n, _)) if n > 0 => Waiting::Bytes,
        _ => Waiting::End,
    }
}

/// Receives into the unfilled part of `buf` without waiting: `Ok(0)` at
/// the end of the stream, `WouldBlock` if nothing is there.
pub fn recv_into(
    fd: std::os::fd::BorrowedFd<'_>,
    buf: &mut tokio::io::ReadBuf<'_>,
) -> io::Result<usize> {
    // SAFETY: the unfilled part is only written to (by the kernel), never
    // de-initialized.
    let unfilled = unsafe { buf.unfilled_mut() };
    let ((filled, _), _) = rustix::net::recv(fd, unfilled, rustix::net::RecvFlags::DONTWAIT)?;
    let n = filled.len();
    // SAFETY: `recv` initialized the first `n` bytes of the unfilled part.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(n)
}

/// A descriptor number as the runtime's registration holds it, borrowed
/// from a [`LazySocket`].
#[derive(Debug)]
pub struct FdNumber(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for FdNumber {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// A socket and, once asked for, its registration with the runtime for
/// readiness both ways. The registration borrows the socket's descriptor
/// instead of a duplicate, so a socket costs one descriptor either way.
#[derive(Debug)]
pub struct LazySocket {
    /// Declared before `fd`: dropped (deregistered) before it closes.
    registration: std::sync::OnceLock<tokio::io::unix::AsyncFd<FdNumber>>,
    fd: OwnedFd,
}

impl LazySocket {
    /// Takes `fd` (a non-blocking socket).
    pub fn new(fd: OwnedFd) -> LazySocket {
        LazySocket {
            registration: std::sync::OnceLock::new(),
            fd,
        }
    }

    /// The descriptor.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// The registration, if there is one yet.
    pub fn registration(&self) -> Option<&tokio::io::unix::AsyncFd<FdNumber>> {
        self.registration.get()
    }

    /// The registration, made now if needed. Must be called within a
    /// runtime.
    pub fn register(&self) -> io::Result<&tokio::io::unix::AsyncFd<FdNumber>> {
        use std::os::fd::AsRawFd;
        if let Some(registration) = self.registration.get() {
            return Ok(registration);
        }
        let interest = tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE;
        let number = FdNumber(self.fd.as_raw_fd());
        // SAFETY: `register_with_interest` needs the number to stay open and
        // name the same socket for the registration's whole life. `fd` is
        // private to this struct, never closed or replaced while it lives,
        // and the registration is dropped before it (field order), so it
        // does.
        let registration =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(number, interest) }
                .map_err(io::Error::from)?;
        let _ = self.registration.set(registration);
        self.registration
            .get()
            .ok_or_else(|| io::Error::other("socket registration lost"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_tcp_listener_shut_down_listens_again_on_its_port() {
        // An explicit port (kept through the shutdown) and a kernel-chosen
        // one (lost, so bound again).
        let probe = bind_tcp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let explicit = tcp_local_addr(&probe).unwrap();
        drop(probe);
        for asked in [explicit, "127.0.0.1:0".parse().unwrap()] {
            let fd = bind_tcp(asked, false).unwrap();
            let addr = tcp_local_addr(&fd).unwrap();
            assert!(is_listening(&fd));
            shut_down(&fd).unwrap();
            assert!(!is_listening(&fd), "{asked}");
            assert!(std::net::TcpStream::connect(addr).is_err(), "{asked}");
            relisten_tcp(&fd, addr).unwrap();
            assert!(is_listening(&fd), "{asked}");
            assert_eq!(tcp_local_addr(&fd).unwrap(), addr, "{asked}");
            std::net::TcpStream::connect(addr).expect("connects again");
        }
    }

    #[test]
    fn a_unix_listener_shut_down_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let fd = bind_unix(&path).unwrap();
        assert!(is_listening(&fd));
        shut_down(&fd).unwrap();
        assert!(!is_listening(&fd));
        assert!(UnixStream::connect(&path).is_err());
        // A new socket on the same path.
        let again = bind_unix(&path).unwrap();
        assert!(is_listening(&again));
        UnixStream::connect(&path).expect("connects to the new socket");
    }
}
