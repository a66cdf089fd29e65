//! The environment variables of the protocols baton speaks: one source of
//! truth for the library and for the `baton` supervisor.
//!
//! Socket passing follows systemd's socket activation (`sd_listen_fds(3)`),
//! readiness follows `sd_notify(3)`, and `SERVER_STARTER_PORT` is the variable
//! of Perl's Server::Starter, exported too so that apps written for
//! `start_server` work unchanged.

use std::os::fd::RawFd;

/// Number of inherited listening sockets, starting at [`LISTEN_FDS_START`].
pub const LISTEN_FDS: &str = "LISTEN_FDS";

/// PID of the process the sockets are meant for; any other process must
/// ignore them (`sd_listen_fds(3)`).
pub const LISTEN_PID: &str = "LISTEN_PID";

/// Colon-separated names of the inherited sockets, one per fd.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";

/// Address of the datagram socket that readiness notifications go to: a
/// filesystem path, or an abstract socket name written with a leading `@`.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// The generation number baton gives each start of the app (1, 2, …).
pub const BATON_GENERATION: &str = "BATON_GENERATION";

/// Server::Starter's socket list: `addr=fd` pairs joined by `;`.
pub const SERVER_STARTER_PORT: &str = "SERVER_STARTER_PORT";

/// The first inherited fd: 0, 1 and 2 are stdin, stdout and stderr.
pub const LISTEN_FDS_START: RawFd = 3;

/// The name a socket gets when `LISTEN_FDNAMES` is not set, as in
/// `sd_listen_fds_with_names(3)`.
pub const DEFAULT_FD_NAME: &str = "unknown";
