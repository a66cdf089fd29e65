//! Accepting: a listener registered with the runtime ([`AsyncListener`]),
//! an acceptor that registers the socket afresh after a hang-up
//! ([`Acceptor`]), and the accepted stream, TCP or Unix ([`Stream`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::listen::Listener;

/// A listener registered with the tokio runtime.
#[derive(Debug)]
#[non_exhaustive]
pub enum AsyncListener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// Unix-domain stream socket.
    Unix(tokio::net::UnixListener),
}

impl AsyncListener {
    /// Registers an inherited listener with the current tokio runtime, setting
    /// it non-blocking first (tokio requires it, and an inherited socket is
    /// blocking by default). Must be called within a runtime.
    pub fn from_listener(listener: Listener) -> io::Result<AsyncListener> {
        listener.set_nonblocking(true)?;
        match listener {
            Listener::Tcp(l) => Ok(AsyncListener::Tcp(tokio::net::TcpListener::from_std(l)?)),
            Listener::Unix(l) => Ok(AsyncListener::Unix(tokio::net::UnixListener::from_std(l)?)),
        }
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            AsyncListener::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
            AsyncListener::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
        }
    }
}

impl From<tokio::net::TcpListener> for AsyncListener {
    fn from(l: tokio::net::TcpListener) -> Self {
        AsyncListener::Tcp(l)
    }
}

impl From<tokio::net::UnixListener> for AsyncListener {
    fn from(l: tokio::net::UnixListener) -> Self {
        AsyncListener::Unix(l)
    }
}

/// Accepts on a listener, never spinning on a stale hang-up.
///
/// A listening socket shut down by another process that holds it (an app
/// calling `shutdown(2)` on an inherited listener) reports a hang-up, and
/// tokio keeps a hang-up readiness for good: once the supervisor makes the
/// socket listen again, tokio's own accept would retry forever inside one
/// poll. This acceptor sees the hang-up with the `WouldBlock` and registers
/// the socket afresh instead.
#[derive(Debug)]
pub struct Acceptor {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    unix: bool,
}

impl Acceptor {
    /// Takes over `listener` (registered anew with the current runtime).
    pub fn new(listener: AsyncListener) -> io::Result<Acceptor> {
        let (fd, unix) = match listener {
            AsyncListener::Tcp(l) => (std::os::fd::OwnedFd::from(l.into_std()?), false),
            AsyncListener::Unix(l) => (std::os::fd::OwnedFd::from(l.into_std()?), true),
        };
        Ok(Acceptor {
            fd: crate::sys::register_readable(fd)?,
            unix,
        })
    }

    /// Accepts one connection.
    pub async fn accept(&mut self) -> io::Result<Stream> {
        self.accept_from().await.map(|(stream, _)| stream)
    }

    /// Accepts one connection, with the client's address (TCP only),
    /// which then costs no system call of its own.
    pub async fn accept_from(&mut self) -> io::Result<(Stream, Option<SocketAddr>)> {
        let (conn, peer) = self.accept_raw().await?;
        Ok(if self.unix {
            let std = std::os::unix::net::UnixStream::from(conn);
            (Stream::Unix(tokio::net::UnixStream::from_std(std)?), None)
        } else {
            let std = std::net::TcpStream::from(conn);
            (Stream::Tcp(tokio::net::TcpStream::from_std(std)?), peer)
        })
    }

    /// Accepts one connection as a bare non-blocking socket, not registered
    /// with the runtime (for a server that registers it only if it must
    /// wait on it), with the client's address (TCP only).
    pub async fn accept_raw(&mut self) -> io::Result<(std::os::fd::OwnedFd, Option<SocketAddr>)> {
        use std::os::fd::AsFd;
        loop {
            let mut ready = self.fd.readable().await?;
            let hung_up = ready.ready().is_read_closed();
            let accepted = ready.try_io(|fd| crate::sys::accept_nonblocking(fd.as_fd()));
            drop(ready);
            match accepted {
                Ok(accepted) => return accepted,
                // Nothing to accept. After a hang-up that readiness would
                // never clear: start over with a fresh registration.
                // (On failure the old registration stays, and the caller
                // backs off before trying again.)
                Err(_) if hung_up => {
                    let copy = self.fd.get_ref().try_clone()?;
                    self.fd = crate::sys::register_readable(copy)?;
                }
                Err(_) => {}
            }
        }
    }

    /// Whether this listens on a Unix socket.
    pub fn is_unix(&self) -> bool {
        self.unix
    }
}

/// An accepted client connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum Stream {
    /// TCP.
    Tcp(tokio::net::TcpStream),
    /// Unix-domain stream socket.
    Unix(tokio::net::UnixStream),
}

/// A client connection waited on for its first byte ([`first_byte`](super::first_byte)).
pub trait FirstByte {
    /// Waits until the client has sent something (or closed).
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Whether the client has sent something not yet read.
    fn has_data(&self) -> bool;
}

impl FirstByte for Stream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        Stream::readable(self)
    }

    fn has_data(&self) -> bool {
        Stream::has_data(self)
    }
}

impl Stream {
    /// Waits until the client has sent something (or closed). tokio's
    /// readiness can be a false positive (a fresh socket shows readable), so
    /// it is confirmed by a peek that consumes nothing.
    pub async fn readable(&self) -> io::Result<()> {
        use std::os::fd::AsFd;
        loop {
            let peeked = match self {
                Stream::Tcp(s) => {
                    s.readable().await?;
                    s.try_io(tokio::io::Interest::READABLE, || {
                        crate::sys::peek(s.as_fd())
                    })
                }
                Stream::Unix(s) => {
                    s.readable().await?;
                    s.try_io(tokio::io::Interest::READABLE, || {
                        crate::sys::peek(s.as_fd())
                    })
                }
            };
            match peeked {
                Ok(_) => return Ok(()),
                // Not really readable: tokio cleared the readiness; wait.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the client has sent something not yet read (without
    /// waiting or consuming it).
    pub fn has_data(&self) -> bool {
        use std::os::fd::AsFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        };
        matches!(crate::sys::peek(fd), Ok(n) if n > 0)
    }

    /// The client's address (TCP only).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        match self {
            Stream::Tcp(s) => s.peer_addr().ok(),
            Stream::Unix(_) => None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
