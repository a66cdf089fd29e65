//! The per-generation notification socket (`sd_notify(3)`, receiving side).
//!
//! Each generation gets its own datagram socket in the abstract namespace
//! (`@baton/<baton pid>/<generation>/<nonce>`): no file to clean up, no
//! directory permissions to get wrong when the app runs as another user, and
//! the generation a message is about is known from the socket it arrives on.
//! `SO_PASSCRED` makes the kernel attach the sender's credentials to every
//! datagram, so baton also knows which process (and user) sent it. Abstract
//! sockets have no permissions and their names are visible in
//! `/proc/net/unix`, so the guardian must check those credentials.

use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
use tokio::io::Interest;

/// The largest notification accepted; systemd's limit is about the same.
const MAX_MESSAGE: usize = 4096;

/// A bound notification socket.
#[derive(Debug)]
pub struct NotifySocket {
    socket: tokio::net::UnixDatagram,
    /// The value for `NOTIFY_SOCKET` (`@name`).
    pub address: String,
}

/// One datagram: who sent it and its `KEY=VALUE` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The sender's pid, from `SCM_CREDENTIALS`.
    pub pid: Option<i32>,
    /// The sender's uid, from `SCM_CREDENTIALS`.
    pub uid: Option<u32>,
    /// The payload, as text.
    pub text: String,
}

impl NotifySocket {
    /// Binds a fresh abstract socket for generation `generation`. Must be
    /// called within a tokio runtime.
    pub fn bind(label: &str) -> io::Result<NotifySocket> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("baton/{}/{label}/{nonce:08x}", std::process::id());
        NotifySocket::bind_name(&name)
    }

    /// Binds the abstract socket `@name` (again, after a baton that had it
    /// died: generations keep sending to the name they were given).
    pub fn bind_name(name: &str) -> io::Result<NotifySocket> {
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = UnixDatagram::bind_addr(&addr)?;
        NotifySocket::from_std(socket, format!("@{name}"))
    }

    fn from_std(socket: UnixDatagram, address: String) -> io::Result<NotifySocket> {
        rustix::net::sockopt::set_socket_passcred(&socket, true)?;
        socket.set_nonblocking(true)?;
        Ok(NotifySocket {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            address,
        })
    }

    /// The socket behind `fd` (handed over by a previous image), whose
    /// address is `address`.
    pub fn from_fd(fd: std::os::fd::OwnedFd, address: String) -> io::Result<NotifySocket> {
        NotifySocket::from_std(UnixDatagram::from(fd), address)
    }

    /// A second descriptor for this socket (to hand over).
    pub fn dup(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.socket.as_fd().try_clone_to_owned()
    }

    /// Waits for the next datagram. Any fds sent along (`FDSTORE=1`) are
    /// closed: baton does not keep them.
    pub async fn recv(&self) -> io::Result<Datagram> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let got = self
                .socket
                .async_io(Interest::READABLE, || recv_one(&self.socket, &mut buf))
                .await?;
            if let Some(datagram) = got {
                return Ok(datagram);
            }
        }
    }
}

/// One `recvmsg`; `Ok(None)` for a datagram that was too large (dropped).
fn recv_one(socket: &tokio::net::UnixDatagram, buf: &mut [u8]) -> io::Result<Option<Datagram>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16), ScmCredentials(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(
        socket,
        &mut iov,
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )?;
    let (mut pid, mut uid) = (None, None);
    for message in control.drain() {
        match message {
            RecvAncillaryMessage::ScmCredentials(cred) => {
                pid = Some(cred.pid.as_raw_nonzero().get());
                uid = Some(cred.uid.as_raw());
            }
            // Dropping the fds closes them.
            RecvAncillaryMessage::ScmRights(fds) => fds.for_each(drop),
            _ => {}
        }
    }
    if msg.flags.contains(ReturnFlags::TRUNC) {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&buf[..msg.bytes]).into_owned();
    Ok(Some(Datagram { pid, uid, text }))
}

/// The fields of a notification that baton acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// `READY=1`.
    pub ready: bool,
    /// `RELOADING=1`.
    pub reloading: bool,
    /// `STOPPING=1`.
    pub stopping: bool,
    /// `WATCHDOG=1`.
    pub watchdog: bool,
    /// `STATUS=…`.
    pub status: Option<String>,
    /// `MAINPID=…`.
    pub main_pid: Option<i32>,
}

impl Fields {
    /// Parses the newline-separated `KEY=VALUE` lines; unknown keys are
    /// ignored, as `sd_notify(3)` requires of receivers.
    pub fn parse(text: &str) -> Fields {
        let mut f = Fields::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => f.ready = true,
                Some(("RELOADING", "1")) => f.reloading = true,
                Some(("STOPPING", "1")) => f.stopping = true,
                Some(("WATCHDOG", "1")) => f.watchdog = true,
                Some(("STATUS", s)) => f.status = Some(s.to_owned()),
                Some(("MAINPID", p)) => f.main_pid = p.parse().ok(),
                _ => {}
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        let f = Fields::parse("READY=1\nSTATUS=warming up\nMAINPID=42\nX_CUSTOM=1\n");
        assert!(f.ready && !f.stopping);
        assert_eq!(f.status.as_deref(), Some("warming up"));
        assert_eq!(f.main_pid, Some(42));
        assert_eq!(Fields::parse("READY=0"), Fields::default());
        assert!(Fields::parse("STOPPING=1").stopping);
    }

    #[tokio::test]
    async fn receives_with_credentials() {
        let socket = NotifySocket::bind("1").expect("bind");
        let name = socket.address.strip_prefix('@').expect("abstract");
        let to = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let sender = UnixDatagram::unbound().expect("socket");
        sender
            .send_to_addr(b"READY=1\nSTATUS=hi", &to)
            .expect("send");
        let got = socket.recv().await.expect("recv");
        assert_eq!(got.pid, Some(std::process::id() as i32));
        assert_eq!(got.uid, Some(rustix::process::geteuid().as_raw()));
        assert_eq!(got.text, "READY=1\nSTATUS=hi");
    }
}
