//! The CLI's error types, by who must tell them apart:
//!
//! - [`StartupError`]: anything wrong before the first generation starts. It
//!   exits with code 2, and nothing is left half started.
//! - [`RollbackReason`]: why a new generation was not put in service. It is
//!   data as well as an error: it travels over the control socket to
//!   `baton reload`.
//! - [`ControlError`]: talking to a running baton failed.

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::exit::ExitStatus;

/// A problem found while validating the command line and setting up, before
/// anything was spawned. Exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A listen address could not be bound.
    #[error("binding {addr}: {error}{hint}")]
    Bind {
        /// The address as the user wrote it.
        addr: String,
        /// What the kernel said.
        error: io::Error,
        /// How to fix it, starting with "; ".
        hint: String,
    },
    /// A host name in a listen address did not resolve.
    #[error("resolving {addr}: {error}")]
    Resolve {
        /// The address as the user wrote it.
        addr: String,
        /// What the resolver said.
        error: io::Error,
    },
    /// The command is not on `$PATH` (or the given path does not exist).
    #[error("command {command:?} not found{where_}; check the spelling, or give a path to it")]
    CommandNotFound {
        /// The command as given.
        command: String,
        /// " in $PATH" or "".
        where_: &'static str,
    },
    /// The command exists but cannot be executed.
    #[error("command {path:?} is not executable ({why}); fix its permissions, e.g. chmod +x")]
    NotExecutable {
        /// The resolved path.
        path: PathBuf,
        /// Why not.
        why: String,
    },
    /// Another baton already answers on this control socket.
    #[error(
        "control socket {path:?} is in use by another running baton; stop it, or pass a different --name or --control"
    )]
    ControlInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The control socket could not be set up.
    #[error("control socket {path:?}: {error}{}", control_hint(error))]
    Control {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// Any other invalid setting.
    #[error("{0}")]
    Invalid(String),
}

/// How to fix a control socket path, as "; …".
fn control_hint(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::IsADirectory => {
            "; --control takes the path of a socket file, like DIR/app.sock"
        }
        io::ErrorKind::AlreadyExists => "; remove it or choose another path",
        _ => "",
    }
}

/// Why a new generation was not put in service; the previous one (if any)
/// keeps serving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RollbackReason {
    /// It exited before it said it was ready.
    #[error("{status} before it was ready")]
    Exited {
        /// How it ended.
        status: ExitStatus,
    },
    /// It did not become ready within `--ready-timeout`, and was killed.
    #[error("was not ready within {timeout}{hint}")]
    NotReady {
        /// The timeout, human-readable.
        timeout: String,
        /// A hint about the readiness mode, starting with "; " (or empty).
        hint: String,
    },
    /// It could not be started at all.
    #[error("could not be started: {message}")]
    Spawn {
        /// What failed.
        message: String,
        /// The errno of the failed `execve`, if that was it.
        errno: Option<i32>,
    },
    /// baton began to stop before the reload finished.
    #[error("was abandoned because baton is stopping")]
    Stopping,
    /// It served, then failed during its bake (`--bake`), and the release
    /// before it serves again.
    #[error("failed during its bake and was reverted: {why}")]
    Reverted {
        /// `exited` or `error_rate`.
        cause: String,
        /// What happened, in words.
        why: String,
    },
}

/// Talking to a running baton over its control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens on the socket.
    #[error(
        "no baton is running at {path:?} ({error}); is `baton run` started with this --name or --control?"
    )]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        error: io::Error,
    },
    /// No socket was named and none (or several) were found.
    #[error("{0}")]
    NoSocket(String),
    /// The baton there runs no service of that name.
    #[error("{0}")]
    UnknownService(String),
    /// The connection broke or the answer was malformed.
    #[error("talking to baton at {path:?}: {error}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
}

impl ControlError {
    /// Whether baton did not answer within the client's timeout (it may
    /// still be working on the request).
    pub fn timed_out(&self) -> bool {
        matches!(self, ControlError::Io { error, .. } if matches!(
            error.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ))
    }
}
