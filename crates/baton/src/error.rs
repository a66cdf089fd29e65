//! The library's one error type. It names the fd, variable or operation at
//! fault, and it is returned (never panicked) for any bad environment.

use std::fmt;
use std::io;
use std::os::fd::RawFd;

/// Everything that can go wrong while taking sockets from the environment or
/// talking to the supervisor.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An environment variable is set but its value is malformed.
    BadVar {
        /// The variable's name.
        var: &'static str,
        /// The offending value.
        value: String,
        /// What was expected instead.
        expected: &'static str,
    },
    /// An inherited fd is not open.
    NotOpen {
        /// The fd number.
        fd: RawFd,
        /// Its name from `LISTEN_FDNAMES`.
        name: String,
    },
    /// An inherited fd is open but is not a socket.
    NotASocket {
        /// The fd number.
        fd: RawFd,
        /// Its name from `LISTEN_FDNAMES`.
        name: String,
    },
    /// An inherited socket is not of the kind that was asked for (for
    /// example a UDP socket where a TCP listener was wanted).
    WrongKind {
        /// The fd number.
        fd: RawFd,
        /// Its name from `LISTEN_FDNAMES`.
        name: String,
        /// The kind that was asked for.
        wanted: &'static str,
    },
    /// No inherited socket has this name or index, and no fallback was given.
    Missing {
        /// The name or index that was asked for.
        what: String,
    },
    /// A system call failed.
    Io {
        /// What was being done, e.g. `"binding 127.0.0.1:8080"`.
        op: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: impl Into<String>, source: impl Into<io::Error>) -> Error {
        Error::Io {
            op: op.into(),
            source: source.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadVar {
                var,
                value,
                expected,
            } => write!(f, "invalid ${var}={value:?}: expected {expected}"),
            Error::NotOpen { fd, name } => {
                write!(f, "inherited fd {fd} ({name}) is not open")
            }
            Error::NotASocket { fd, name } => {
                write!(f, "inherited fd {fd} ({name}) is not a socket")
            }
            Error::WrongKind { fd, name, wanted } => {
                write!(f, "inherited fd {fd} ({name}) is not a {wanted}")
            }
            Error::Missing { what } => write!(f, "no inherited socket {what}"),
            Error::Io { op, .. } => write!(f, "{op}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        let kind = match &err {
            Error::Io { source, .. } => source.kind(),
            Error::Missing { .. } => io::ErrorKind::NotFound,
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, err)
    }
}
