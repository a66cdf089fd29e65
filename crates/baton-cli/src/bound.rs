//! What a run holds once started: its listening sockets and its control
//! socket, with what keeps them right over the run (a listener an app shut
//! down is made to listen again; socket files baton made are removed when
//! it exits). Bound by `startup`, owned by the guardian.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use crate::sys::socket;

/// A listening socket baton owns.
#[derive(Debug)]
pub struct BoundListener {
    /// The name in `LISTEN_FDNAMES`.
    pub name: String,
    /// The socket.
    pub fd: OwnedFd,
    /// The bound address, e.g. `127.0.0.1:43125` (the real port after `:0`)
    /// or `unix:/run/app.sock`.
    pub local: String,
    /// The key of this socket in `SERVER_STARTER_PORT`.
    pub server_starter_key: String,
    /// The TCP address it is bound to (the real port after `:0`).
    pub tcp: Option<SocketAddr>,
    /// It was found shut down and could not be re-armed; said once.
    pub broken_reported: bool,
    /// A socket file baton created, removed when baton exits.
    pub unix_path: Option<PathBuf>,
}

/// What [`BoundListener::ensure_listening`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum ListenerCheck {
    /// It listens.
    Listening,
    /// It had been shut down; it listens again (same socket).
    Relistened,
    /// It had been shut down; a new socket listens on its path. Only
    /// generations started from now on have it.
    Replaced,
}

impl BoundListener {
    /// Makes sure the socket still listens, after an app may have shut it
    /// down: a TCP socket listens again; a Unix socket cannot, so a new one
    /// is bound to the same path.
    pub fn ensure_listening(&mut self) -> io::Result<ListenerCheck> {
        if socket::is_listening(&self.fd) {
            return Ok(ListenerCheck::Listening);
        }
        if let Some(addr) = self.tcp {
            socket::relisten_tcp(&self.fd, addr)?;
            return Ok(ListenerCheck::Relistened);
        }
        // Only a socket file baton made itself is replaced: one passed to
        // baton (systemd's) belongs to whoever made it.
        let Some(path) = self.unix_path.clone() else {
            return Err(io::Error::other(
                "a Unix socket passed to baton cannot be re-armed; restart its socket unit",
            ));
        };
        // (Its file is still there and refuses connections: it goes.)
        self.fd = socket::bind_unix(&path)?;
        Ok(ListenerCheck::Replaced)
    }
}

impl Drop for BoundListener {
    fn drop(&mut self) {
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The control socket: a Unix stream listener, mode 0600, in a 0700
/// directory; the file is removed when baton exits.
#[derive(Debug)]
pub struct ControlSocket {
    /// The listener, until the guardian takes it.
    pub listener: Option<std::os::unix::net::UnixListener>,
    /// Its path.
    pub path: PathBuf,
    /// The file was removed already: never remove it again (by then it
    /// may be another baton's).
    pub(crate) removed: bool,
}

impl ControlSocket {
    /// Removes the socket file, once: after its listener is closed a new
    /// baton may take the path.
    pub fn remove(&mut self) {
        if !std::mem::replace(&mut self.removed, true) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.remove();
    }
}
