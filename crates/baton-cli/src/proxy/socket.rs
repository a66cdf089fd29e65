//! A client socket registered with the runtime only when it must be
//! waited on.
//!
//! Most connections that carry one request never wait: the request came
//! with the handshake and the answer fits in the socket's send buffer. For
//! them, registering with epoll (and deregistering at close) would be two
//! system calls out of eight. [`Socket`] reads and writes the descriptor
//! directly, and registers it the first time an operation would block.

use std::io::{self, IoSlice};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::conn_io::ClientSocket;
use crate::sys::socket::LazySocket;

/// An accepted, non-blocking client socket (TCP or Unix).
#[derive(Debug)]
pub struct Socket {
    socket: LazySocket,
    tcp: bool,
}

impl Socket {
    /// `fd`, non-blocking; `tcp` for a TCP socket.
    pub fn new(fd: OwnedFd, tcp: bool) -> Socket {
        Socket {
            socket: LazySocket::new(fd),
            tcp,
        }
    }

    /// The socket's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.fd()
    }

    /// Runs `op` on the socket; once it would block, waits for readiness
    /// (`read`: readable, else writable) and tries again. `short` tells
    /// from a result that the kernel had no more to give (or take): the
    /// readiness is then cleared at once, which spares the next operation
    /// a system call that would only block.
    fn poll_op<T>(
        &self,
        cx: &mut Context<'_>,
        read: bool,
        mut op: impl FnMut(BorrowedFd<'_>) -> io::Result<T>,
        short: impl Fn(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        if self.socket.registration().is_none() {
            match op(self.fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
        let registration = self.socket.register()?;
        loop {
            let mut guard = if read {
                ready!(registration.poll_read_ready(cx))?
            } else {
                ready!(registration.poll_write_ready(cx))?
            };
            if let Ok(done) = guard.try_io(|_| op(self.fd())) {
                if done.as_ref().is_ok_and(&short) {
                    guard.clear_ready();
                }
                return Poll::Ready(done);
            }
        }
    }

    /// Reads into `buf`.
    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let asked = buf.remaining();
        self.poll_op(
            cx,
            true,
            |fd| crate::sys::socket::recv_into(fd, buf),
            |n| *n > 0 && *n < asked,
        )
        .map_ok(|_| ())
    }

    /// Waits until the client has sent something (or closed), confirmed by
    /// a peek that consumes nothing.
    pub async fn readable(&self) -> io::Result<()> {
        let peek = |fd: BorrowedFd<'_>| {
            rustix::net::recv(
                fd,
                &mut [0u8; 1],
                rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
            )
            .map_err(io::Error::from)
        };
        std::future::poll_fn(|cx| self.poll_op(cx, true, peek, |_| false))
            .await
            .map(|_| ())
    }

    /// Whether the client has sent something not yet read.
    pub fn has_data(&self) -> bool {
        matches!(
            rustix::net::recv(
                self.fd(),
                &mut [0u8; 1],
                rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
            ),
            Ok((_, n)) if n > 0
        )
    }
}

impl baton::serve::FirstByte for Socket {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        Socket::readable(self)
    }

    fn has_data(&self) -> bool {
        Socket::has_data(self)
    }
}

/// One side of a [`Socket`] (both sides are the same socket).
#[derive(Debug, Clone, Copy)]
pub struct Side<'a>(pub &'a Socket);

impl AsyncRead for Side<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_read(cx, buf)
    }
}

impl AsyncWrite for Side<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let send = |fd: BorrowedFd<'_>| {
            rustix::net::send(fd, buf, rustix::net::SendFlags::NOSIGNAL).map_err(io::Error::from)
        };
        self.0.poll_op(cx, false, send, |n| *n < buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let asked: usize = bufs.iter().map(|b| b.len()).sum();
        let send = |fd: BorrowedFd<'_>| {
            let mut control = rustix::net::SendAncillaryBuffer::default();
            rustix::net::sendmsg(fd, bufs, &mut control, rustix::net::SendFlags::NOSIGNAL)
                .map_err(io::Error::from)
        };
        self.0.poll_op(cx, false, send, |n| *n < asked)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            rustix::net::shutdown(self.0.fd(), rustix::net::Shutdown::Write)
                .map_err(io::Error::from),
        )
    }
}

impl ClientSocket for Side<'_> {
    fn no_delay(&self) {
        if self.0.tcp {
            let _ = rustix::net::sockopt::set_tcp_nodelay(self.0.fd(), true);
        }
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        let any = rustix::net::getsockname(self.0.fd()).ok()?;
        std::net::SocketAddr::try_from(any).ok()
    }
}
