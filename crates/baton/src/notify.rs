//! Readiness and status notifications, the `sd_notify(3)` protocol.
//!
//! The supervisor names a datagram socket in `NOTIFY_SOCKET`: a filesystem
//! path (`/run/...`) or an abstract socket written with a leading `@`. Each
//! notification is one datagram of newline-separated `KEY=VALUE` lines. The
//! receiver learns who sent it from the kernel (`SCM_CREDENTIALS`), so nothing
//! here needs to say its own pid. Without `NOTIFY_SOCKET` every call is a
//! successful no-op, so the same binary runs without a supervisor.

use std::os::unix::net::{SocketAddr, UnixDatagram};

use crate::error::Error;
use crate::vars;

/// Sends a raw notification, e.g. `"READY=1\nSTATUS=serving"`.
///
/// Returns `Ok(false)` when `NOTIFY_SOCKET` is unset (nothing to tell), and
/// `Ok(true)` once the datagram was sent.
pub fn notify(state: &str) -> Result<bool, Error> {
    let Some(target) = std::env::var_os(vars::NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    if target.is_empty() {
        return Ok(false);
    }
    let addr = socket_addr(&target)?;
    let socket =
        UnixDatagram::unbound().map_err(|e| Error::io("creating a notification socket", e))?;
    socket
        .send_to_addr(state.as_bytes(), &addr)
        .map_err(|e| Error::io(format!("notifying ${}={target}", vars::NOTIFY_SOCKET), e))?;
    Ok(true)
}

/// Tells the supervisor this process is ready to serve (`READY=1`).
pub fn ready() -> Result<bool, Error> {
    notify("READY=1")
}

/// Sets a free-form status line the supervisor shows (`STATUS=...`).
pub fn status(message: &str) -> Result<bool, Error> {
    notify(&format!("STATUS={}", message.replace('\n', " ")))
}

/// Tells the supervisor this process has begun to shut down (`STOPPING=1`).
pub fn stopping() -> Result<bool, Error> {
    notify("STOPPING=1")
}

/// Tells the supervisor this process is reloading its configuration in place
/// (`RELOADING=1`); send [`ready`] when done.
pub fn reloading() -> Result<bool, Error> {
    notify("RELOADING=1")
}

/// Keep-alive ping for a supervisor's watchdog (`WATCHDOG=1`).
pub fn watchdog() -> Result<bool, Error> {
    notify("WATCHDOG=1")
}

/// Parses `NOTIFY_SOCKET`: `/path` or `@abstract-name`.
fn socket_addr(target: &str) -> Result<SocketAddr, Error> {
    let bad = || Error::BadVar {
        var: vars::NOTIFY_SOCKET,
        value: target.to_owned(),
        expected: "an absolute socket path or @abstract-name",
    };
    if let Some(name) = target.strip_prefix('@') {
        if name.is_empty() {
            return Err(bad());
        }
        abstract_addr(name.as_bytes()).ok_or_else(bad)
    } else if target.starts_with('/') {
        SocketAddr::from_pathname(target).map_err(|_| bad())
    } else {
        Err(bad())
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> Option<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name).ok()
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> Option<SocketAddr> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(socket_addr("/run/notify").is_ok());
        assert!(socket_addr("@baton/1/2").is_ok());
        for bad in ["relative/path", "notify", "@"] {
            let err = socket_addr(bad).map(|_| ()).unwrap_err();
            assert!(err.to_string().contains("NOTIFY_SOCKET"), "{err}");
        }
    }
}
