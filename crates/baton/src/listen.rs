//! Inherited listening sockets, taken exactly as `sd_listen_fds(3)` describes.
//!
//! A supervisor (baton, systemd, `systemd-socket-activate`) passes sockets as
//! fds `3 .. 3+LISTEN_FDS`, names them in `LISTEN_FDNAMES`, and says whom they
//! are for in `LISTEN_PID`. Invariants kept here:
//!
//! - the fds are taken only when `LISTEN_PID` equals this process's pid;
//! - each fd is owned at most once per process (a second call finds nothing);
//! - every taken fd gets `FD_CLOEXEC`, so the app's own children never inherit
//!   them, and the three variables are removed from the environment when that
//!   is sound (see [`Listeners::from_env`]);
//! - a malformed variable or an fd that is not a socket is an [`Error`] that
//!   names the culprit, never a panic.

use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::Error;
use crate::{sys, vars};

/// Set once this process has taken ownership of its inherited fds.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// One inherited listening socket, converted to the std type that fits it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Listener {
    /// A TCP listener (IPv4 or IPv6).
    Tcp(TcpListener),
    /// A Unix-domain stream listener.
    Unix(UnixListener),
}

impl Listener {
    /// The address this listener accepts on, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".to_owned(), |a| a.to_string()),
            Listener::Unix(l) => match l.local_addr() {
                Ok(a) => match a.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".to_owned(),
                },
                Err(_) => "unix:?".to_owned(),
            },
        }
    }

    /// Puts the socket in non-blocking mode, which async runtimes require.
    pub fn set_nonblocking(&self, nonblocking: bool) -> std::io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(nonblocking),
            Listener::Unix(l) => l.set_nonblocking(nonblocking),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }
}

#[derive(Debug)]
struct Inherited {
    fd: OwnedFd,
    raw: RawFd,
    name: String,
}

/// The sockets this process inherited, by index and by name.
///
/// Each socket can be taken once; what is never taken is closed when the
/// `Listeners` value is dropped.
#[derive(Debug, Default)]
pub struct Listeners {
    slots: Vec<Option<Inherited>>,
    names: Vec<String>,
}

impl Listeners {
    /// Takes the sockets passed by the supervisor, following `sd_listen_fds(3)`.
    ///
    /// Returns an empty set when `LISTEN_FDS` or `LISTEN_PID` is unset, when
    /// `LISTEN_PID` names another process, or when this process already took
    /// its sockets. Every taken fd gets `FD_CLOEXEC`.
    ///
    /// The variables are removed from the environment, so that programs the
    /// app starts do not see them, when this process has a single thread:
    /// removing environment variables is only sound while no other thread can
    /// read the environment. Call this at the top of `main`, before starting
    /// an async runtime or any thread. If other threads already run, the
    /// variables stay (they are harmless: `LISTEN_PID` names this process, and
    /// the fds are close-on-exec).
    pub fn from_env() -> Result<Listeners, Error> {
        let get = |var: &'static str| std::env::var(var).ok();
        let parsed = parse_env(
            std::process::id(),
            get(vars::LISTEN_PID).as_deref(),
            get(vars::LISTEN_FDS).as_deref(),
            get(vars::LISTEN_FDNAMES).as_deref(),
        );
        unset_env_if_single_threaded();
        let Some(wanted) = parsed? else {
            return Ok(Listeners::default());
        };
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Ok(Listeners::default());
        }
        let mut slots = Vec::with_capacity(wanted.len());
        let mut names = Vec::with_capacity(wanted.len());
        for (raw, name) in wanted {
            names.push(name.clone());
            match adopt(raw, name) {
                Ok(inherited) => slots.push(Some(inherited)),
                Err(e) => {
                    // Leave every inherited fd open, as found: the caller
                    // reports the error and decides.
                    for inherited in slots.into_iter().flatten() {
                        std::mem::forget(inherited.fd);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Listeners { slots, names })
    }

    /// Sockets received some other way (over a Unix socket with
    /// `SCM_RIGHTS`, say), with their names, as if inherited in this order.
    /// They are checked when taken, like inherited ones.
    pub fn from_fds(fds: impl IntoIterator<Item = (OwnedFd, String)>) -> Listeners {
        let mut slots = Vec::new();
        let mut names = Vec::new();
        for (fd, name) in fds {
            names.push(name.clone());
            slots.push(Some(Inherited {
                raw: fd.as_raw_fd(),
                fd,
                name,
            }));
        }
        Listeners { slots, names }
    }

    /// Puts `other`'s sockets after these.
    pub fn extend(&mut self, other: Listeners) {
        self.slots.extend(other.slots);
        self.names.extend(other.names);
    }

    /// How many inherited sockets have not been taken yet.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Whether no inherited socket is left to take.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names of all inherited sockets, in fd order (taken ones included).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Takes the socket at `index` (0 is fd 3), if there is one.
    pub fn take(&mut self, index: usize) -> Result<Option<Listener>, Error> {
        match self.slots.get_mut(index).and_then(Option::take) {
            Some(inherited) => convert(inherited).map(Some),
            None => Ok(None),
        }
    }

    /// Takes the first not yet taken socket called `name` in `LISTEN_FDNAMES`.
    pub fn take_named(&mut self, name: &str) -> Result<Option<Listener>, Error> {
        let index = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.name == name));
        match index {
            Some(index) => self.take(index),
            None => Ok(None),
        }
    }

    /// Takes every socket not taken yet, in fd order.
    pub fn take_all(&mut self) -> Result<Vec<Listener>, Error> {
        let mut all = Vec::new();
        for index in 0..self.slots.len() {
            if let Some(l) = self.take(index)? {
                all.push(l);
            }
        }
        Ok(all)
    }

    /// Takes the TCP listener at `index`, or binds `addr` when nothing was
    /// inherited there: the same binary then runs standalone, under baton and
    /// under systemd socket activation.
    pub fn tcp_or_bind<A: ToSocketAddrs + std::fmt::Debug>(
        &mut self,
        index: usize,
        addr: A,
    ) -> Result<TcpListener, Error> {
        match self.take(index)? {
            Some(Listener::Tcp(l)) => Ok(l),
            Some(Listener::Unix(_)) => Err(Error::WrongKind {
                fd: vars::LISTEN_FDS_START + index as RawFd,
                name: self.name_of(index),
                wanted: "TCP listener",
            }),
            None => TcpListener::bind(&addr).map_err(|e| Error::io(format!("binding {addr:?}"), e)),
        }
    }

    /// Takes the Unix listener at `index`, or binds `path` when nothing was
    /// inherited there.
    pub fn unix_or_bind(
        &mut self,
        index: usize,
        path: impl AsRef<Path>,
    ) -> Result<UnixListener, Error> {
        let path = path.as_ref();
        match self.take(index)? {
            Some(Listener::Unix(l)) => Ok(l),
            Some(Listener::Tcp(_)) => Err(Error::WrongKind {
                fd: vars::LISTEN_FDS_START + index as RawFd,
                name: self.name_of(index),
                wanted: "Unix listener",
            }),
            None => UnixListener::bind(path)
                .map_err(|e| Error::io(format!("binding unix:{}", path.display()), e)),
        }
    }

    fn name_of(&self, index: usize) -> String {
        self.names.get(index).cloned().unwrap_or_default()
    }
}

/// Shorthand for [`Listeners::from_env`].
pub fn listeners() -> Result<Listeners, Error> {
    Listeners::from_env()
}

/// The decision of `sd_listen_fds(3)`, free of process state: which fds (and
/// names) are ours, given our pid and the three variables. `Ok(None)` means
/// "nothing was passed to this process".
pub(crate) fn parse_env(
    own_pid: u32,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
) -> Result<Option<Vec<(RawFd, String)>>, Error> {
    let (Some(listen_pid), Some(listen_fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: u32 = listen_pid.trim().parse().map_err(|_| Error::BadVar {
        var: vars::LISTEN_PID,
        value: listen_pid.to_owned(),
        expected: "a process id",
    })?;
    if pid != own_pid {
        return Ok(None);
    }
    let count: usize = listen_fds
        .trim()
        .parse()
        .ok()
        .filter(|n| *n <= 4096)
        .ok_or_else(|| Error::BadVar {
            var: vars::LISTEN_FDS,
            value: listen_fds.to_owned(),
            expected: "a number of fds from 0 to 4096",
        })?;
    let names: Vec<String> = match names {
        None => vec![vars::DEFAULT_FD_NAME.to_owned(); count],
        Some(list) => {
            let parts: Vec<String> = if list.is_empty() && count == 0 {
                Vec::new()
            } else {
                list.split(':').map(str::to_owned).collect()
            };
            if parts.len() != count {
                return Err(Error::BadVar {
                    var: vars::LISTEN_FDNAMES,
                    value: list.to_owned(),
                    expected: "one colon-separated name per fd in $LISTEN_FDS",
                });
            }
            parts
        }
    };
    Ok(Some(
        names
            .into_iter()
            .enumerate()
            .map(|(i, name)| (vars::LISTEN_FDS_START + i as RawFd, name))
            .collect(),
    ))
}

/// Takes ownership of inherited fd `raw` after checking that it is an open
/// socket, and marks it close-on-exec.
fn adopt(raw: RawFd, name: String) -> Result<Inherited, Error> {
    if !sys::fd_is_open(raw) {
        return Err(Error::NotOpen { fd: raw, name });
    }
    // SAFETY: `raw` is open (checked above), and the socket-activation
    // protocol hands these fds to this process (`LISTEN_PID` was checked by
    // `parse_env`); the `TAKEN` flag makes sure this happens once per process,
    // so no other `OwnedFd` owns the same number.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let socket =
        sys::is_socket(fd.as_fd()).map_err(|e| Error::io(format!("fstat of fd {raw}"), e))?;
    if !socket {
        // Keep the fd open: it is not ours to close if it is something else.
        std::mem::forget(fd);
        return Err(Error::NotASocket { fd: raw, name });
    }
    sys::set_cloexec(fd.as_fd())
        .map_err(|e| Error::io(format!("setting FD_CLOEXEC on fd {raw}"), e))?;
    Ok(Inherited { fd, raw, name })
}

/// Turns an inherited socket into a std listener of the matching kind.
fn convert(inherited: Inherited) -> Result<Listener, Error> {
    let Inherited { fd, raw, name } = inherited;
    let option = |option, what: &str| {
        sys::socket_option(fd.as_fd(), option)
            .map_err(|e| Error::io(format!("reading {what} of fd {raw}"), e))
    };
    let stream = option(libc::SO_TYPE, "SO_TYPE")? == libc::SOCK_STREAM;
    let listening = option(libc::SO_ACCEPTCONN, "SO_ACCEPTCONN").unwrap_or(0) != 0;
    if !stream || !listening {
        return Err(Error::WrongKind {
            fd: raw,
            name,
            wanted: "listening stream socket",
        });
    }
    match option(libc::SO_DOMAIN, "SO_DOMAIN")? {
        libc::AF_INET | libc::AF_INET6 => Ok(Listener::Tcp(TcpListener::from(fd))),
        libc::AF_UNIX => Ok(Listener::Unix(UnixListener::from(fd))),
        _ => Err(Error::WrongKind {
            fd: raw,
            name,
            wanted: "TCP or Unix socket",
        }),
    }
}

/// Removes `LISTEN_*` from the environment when no other thread can be
/// reading it.
fn unset_env_if_single_threaded() {
    if !single_threaded() {
        return;
    }
    for var in [vars::LISTEN_PID, vars::LISTEN_FDS, vars::LISTEN_FDNAMES] {
        // SAFETY: `remove_var` is unsound only while another thread may read
        // or write the environment; `single_threaded()` just saw this process
        // with one thread, and only that thread (this one) could start another.
        unsafe { std::env::remove_var(var) };
    }
}

/// Whether this process has exactly one thread, from `/proc/self/stat`.
/// Unknown (no `/proc`) counts as "no".
fn single_threaded() -> bool {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return false;
    };
    // Field 20 is num_threads; fields after the `)` that closes comm start at 3.
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    after.split_whitespace().nth(17) == Some("1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(
        pid: u32,
        listen_pid: Option<&str>,
        fds: Option<&str>,
        names: Option<&str>,
    ) -> Option<Vec<(RawFd, String)>> {
        parse_env(pid, listen_pid, fds, names).expect("valid environment")
    }

    #[test]
    fn nothing_passed() {
        assert_eq!(ok(7, None, None, None), None);
        assert_eq!(ok(7, Some("7"), None, None), None);
        assert_eq!(ok(7, None, Some("2"), None), None);
    }

    #[test]
    fn other_pid_takes_nothing() {
        assert_eq!(ok(7, Some("8"), Some("2"), Some("a:b")), None);
    }

    #[test]
    fn zero_fds() {
        assert_eq!(ok(7, Some("7"), Some("0"), None), Some(vec![]));
        assert_eq!(ok(7, Some("7"), Some("0"), Some("")), Some(vec![]));
    }

    #[test]
    fn names_by_fd() {
        assert_eq!(
            ok(7, Some("7"), Some("2"), Some("http:admin")),
            Some(vec![(3, "http".into()), (4, "admin".into())])
        );
        assert_eq!(
            ok(7, Some("7"), Some("1"), None),
            Some(vec![(3, "unknown".into())])
        );
    }

    #[test]
    fn malformed_values_name_the_variable() {
        let cases = [
            (Some("x"), Some("1"), None, "LISTEN_PID"),
            (Some("7"), Some("-1"), None, "LISTEN_FDS"),
            (Some("7"), Some("lots"), None, "LISTEN_FDS"),
            (Some("7"), Some("99999"), None, "LISTEN_FDS"),
            (Some("7"), Some("2"), Some("one"), "LISTEN_FDNAMES"),
        ];
        for (pid, fds, names, var) in cases {
            let err = parse_env(7, pid, fds, names).expect_err("malformed");
            assert!(err.to_string().contains(var), "{err} should name {var}");
        }
    }
}
