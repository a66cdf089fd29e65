//! The descriptor keeper: a tiny process (`baton keeper`, started by
//! `baton run` with `--orphans keep`) that holds copies of the listening
//! sockets, and of the read ends of the generations' `--log-prefix` pipes,
//! and outlives a baton that is killed, so that the next `baton run` with
//! the same control socket can take them back and adopt the generation
//! still serving. (Taking them from the app itself with `pidfd_getfd`
//! would need ptrace rights over it, which an unprivileged baton lacks
//! under the default Yama scope.)
//!
//! It listens on a Unix socket next to the control socket (its fd 3,
//! bound by baton, 0600 in a 0700 directory) and answers processes of its
//! own user (or root) only, one short message each:
//!
//! - `hold L` with two descriptors: the read ends of the stdout and stderr
//!   pipes of the worker process labelled L (`3`, `3.w1`), answered `ok`;
//!   `drop L` forgets them;
//! - `take`: answers `ok N logs L1,L2` with the N listeners and the held
//!   pipes attached (`SCM_RIGHTS`), then exits: the taker starts a keeper
//!   of its own;
//! - `quit`: answers `bye` and exits (baton stopped: nothing to keep).
//!
//! It never accepts on the listeners, and while its baton lives it never
//! reads the pipes. Once its baton is gone it holds the listeners (in proxy
//! mode, clients wait in their backlog) and copies the generations' output
//! (so that an app writing a log line is neither blocked on a full pipe nor
//! killed by SIGPIPE), until it is asked, or until no process of the
//! generations the state file lists is left (nothing to adopt: the ports
//! are freed).

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};

use super::generation::Slot;
use super::state;
use crate::sys;

/// How long one client may take to ask, or to be answered: the keeper and
/// baton answer at once, and baton's loop must not wait long on a keeper
/// that is stuck.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(500);

/// How often the keeper looks at its baton and the generations.
const TICK: Duration = Duration::from_millis(500);

/// The longest request.
const MAX_REQUEST: usize = 64;

/// The most generations whose output is held (each costs two descriptors
/// in the `take` answer).
const MAX_HELD: usize = 16;

/// A generation's output pipes, held.
struct Held {
    label: String,
    /// stdout's read end (`None` once it reached end-of-file), whether the
    /// next byte starts a line.
    out: Option<(OwnedFd, bool)>,
    /// The same for stderr.
    err: Option<(OwnedFd, bool)>,
}

/// `baton keeper`: fd 3 is the keeper's socket, fds 4.. the `listeners`
/// listeners; `state` is the state file to read once baton is gone; `name`
/// prefixes the output it copies then.
pub fn main(listeners: usize, state: PathBuf, name: String) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let socket = UnixListener::from(sys::exec::take_fd(3).context("the keeper's socket (fd 3)")?);
    let fds = (0..listeners)
        .map(|i| sys::exec::take_fd(4 + i as i32))
        .collect::<std::io::Result<Vec<_>>>()
        .context("the listeners (fds 4..)")?;
    let owner = rustix::process::getppid()
        .map(|p| p.as_raw_nonzero().get())
        .unwrap_or(0);
    let owner_start = sys::inspect::start_time(owner);
    // Its own session already (see `Children::start_helper`); a hangup,
    // from a terminal or an orphaned group, must not end it either.
    sys::signal::ignore_hangup().context("ignoring SIGHUP")?;
    socket.set_nonblocking(true)?;
    // Listening again makes the socket's credentials the keeper's own, so
    // that a client's SO_PEERCRED names the keeper, not the baton that
    // bound the socket.
    rustix::net::listen(&socket, 64).context("listening on the keeper's socket")?;
    let mut orphaned = false;
    let mut held: Vec<Held> = Vec::new();
    let me = rustix::process::geteuid().as_raw();
    loop {
        // The socket, then (once orphaned) every open pipe.
        let mut polled = vec![PollFd::new(&socket, PollFlags::IN)];
        if orphaned {
            for h in &held {
                for (fd, _) in h.out.iter().chain(h.err.iter()) {
                    polled.push(PollFd::new(fd, PollFlags::IN));
                }
            }
        }
        let timeout = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: TICK.as_nanos() as i64,
        };
        let ready = rustix::event::poll(&mut polled, Some(&timeout)).unwrap_or(0);
        let socket_ready = !polled[0].revents().is_empty();
        let pipes_ready = polled.len() > 1 && polled[1..].iter().any(|p| !p.revents().is_empty());
        drop(polled);
        if ready > 0 && socket_ready {
            while let Ok((conn, _)) = socket.accept() {
                if let Some(done) = serve(conn, me, &fds, &mut held) {
                    return Ok(done);
                }
            }
        }
        if orphaned && pipes_ready {
            for h in &mut held {
                let prefix = format!("[{name} gen {}] ", h.label);
                copy(&mut h.out, &prefix, &mut std::io::stdout());
                copy(&mut h.err, &prefix, &mut std::io::stderr());
            }
            held.retain(|h| h.out.is_some() || h.err.is_some());
        }
        if !orphaned && !sys::inspect::alive(owner, owner_start) {
            orphaned = true;
            eprintln!(
                "baton keeper: baton (pid {owner}) is gone; holding {} listener(s) for the next `baton run`",
                fds.len()
            );
        }
        if orphaned && !anything_to_adopt(&state) {
            eprintln!(
                "baton keeper: no generation of the dead baton is left; letting the listeners go"
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// Copies what a pipe has to `to`, prefixing each line; forgets the pipe at
/// end-of-file.
fn copy(pipe: &mut Option<(OwnedFd, bool)>, prefix: &str, to: &mut dyn Write) {
    let Some((fd, at_line_start)) = pipe else {
        return;
    };
    let mut buf = [0u8; 16 * 1024];
    match rustix::io::read(&*fd, &mut buf) {
        Ok(0) => *pipe = None,
        Ok(n) => {
            let mut text = Vec::with_capacity(n + prefix.len() * 4);
            for &b in &buf[..n] {
                if *at_line_start {
                    text.extend_from_slice(prefix.as_bytes());
                }
                text.push(b);
                *at_line_start = b == b'\n';
            }
            let _ = to.write_all(&text);
            let _ = to.flush();
        }
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
        Err(_) => *pipe = None,
    }
}

/// Answers one client; `Some` if the keeper is done.
fn serve(conn: UnixStream, me: u32, fds: &[OwnedFd], held: &mut Vec<Held>) -> Option<ExitCode> {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = conn.set_write_timeout(Some(CLIENT_TIMEOUT));
    let peer = rustix::net::sockopt::socket_peercred(&conn).ok()?;
    if peer.uid.as_raw() != me && !peer.uid.is_root() {
        return None;
    }
    let (request, mut passed) = sys::fdpass::recv(&conn, MAX_REQUEST).ok()?;
    let request = String::from_utf8_lossy(&request);
    let mut words = request.split_whitespace();
    let reply = |text: &str| {
        let _ = (&conn).write_all(text.as_bytes());
    };
    let label = |w: Option<&str>| {
        w.filter(|l| Slot::parse_label(l).is_some())
            .map(str::to_owned)
    };
    match (words.next(), words.next()) {
        (Some("hold"), w) if passed.len() == 2 && held.len() < MAX_HELD && label(w).is_some() => {
            let err = passed.pop()?;
            let out = passed.pop()?;
            let label = label(w)?;
            held.retain(|h| h.label != label);
            held.push(Held {
                label,
                out: Some((out, true)),
                err: Some((err, true)),
            });
            reply("ok\n");
            None
        }
        (Some("drop"), w) if label(w).is_some() => {
            let label = label(w)?;
            held.retain(|h| h.label != label);
            reply("ok\n");
            None
        }
        (Some("take"), None) => {
            let mut all: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            let mut logs = Vec::new();
            for h in held.iter() {
                if let (Some((out, _)), Some((err, _))) = (&h.out, &h.err) {
                    all.push(out.as_fd());
                    all.push(err.as_fd());
                    logs.push(h.label.clone());
                }
            }
            let text = format!("ok {} logs {}\n", fds.len(), logs.join(","));
            match sys::fdpass::send(&conn, text.as_bytes(), &all) {
                Ok(()) => Some(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("baton keeper: handing the listeners over: {e}");
                    None
                }
            }
        }
        (Some("quit"), None) => {
            reply("bye\n");
            Some(ExitCode::SUCCESS)
        }
        _ => {
            reply("error: expected hold G, drop G, take or quit\n");
            None
        }
    }
}

/// Whether a process of a generation the state file lists still runs (an
/// unreadable file counts as yes: better keep the ports than lose them).
fn anything_to_adopt(path: &Path) -> bool {
    match state::read(path) {
        Ok(Some(s)) => s
            .processes()
            .any(|(_, p)| sys::inspect::alive(p.pid, p.start_time)),
        Ok(None) => false,
        Err(_) => true,
    }
}

/// What a keeper handed over.
#[derive(Debug)]
pub struct Taken {
    /// The listeners, in order.
    pub listeners: Vec<OwnedFd>,
    /// Worker processes' output pipes (stdout's and stderr's read ends).
    pub logs: Vec<(Slot, OwnedFd, OwnedFd)>,
}

/// The pid of the keeper that answers on `path`, if one does.
pub fn alive(path: &Path) -> Option<i32> {
    let conn = std::os::unix::net::UnixStream::connect(path).ok()?;
    let cred = rustix::net::sockopt::socket_peercred(&conn).ok()?;
    Some(cred.pid.as_raw_nonzero().get())
}

/// Asks the keeper at `path` for everything it holds; it exits once it has
/// handed it over.
pub fn take(path: &Path) -> std::io::Result<Taken> {
    let conn = ask(path, "take", &[])?;
    let (text, fds) = sys::fdpass::recv(&conn, 256)?;
    let text = String::from_utf8_lossy(&text);
    let bad = || {
        std::io::Error::other(format!(
            "the keeper answered {:?} with {} descriptor(s)",
            text.trim(),
            fds.len()
        ))
    };
    let mut words = text.split_whitespace();
    let (Some("ok"), Some(n), Some("logs")) = (words.next(), words.next(), words.next()) else {
        return Err(bad());
    };
    let n: usize = n.parse().map_err(|_| bad())?;
    let generations: Vec<Slot> = words
        .next()
        .unwrap_or_default()
        .split(',')
        .filter(|g| !g.is_empty())
        .map(Slot::parse_label)
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    if fds.len() != n + 2 * generations.len() {
        return Err(bad());
    }
    let mut fds = fds.into_iter();
    let listeners = fds.by_ref().take(n).collect();
    let mut logs = Vec::new();
    for generation in generations {
        if let (Some(out), Some(err)) = (fds.next(), fds.next()) {
            logs.push((generation, out, err));
        }
    }
    Ok(Taken { listeners, logs })
}

/// Gives the keeper at `path` worker process `slot`'s output pipes.
pub fn hold(
    path: &Path,
    slot: Slot,
    out: BorrowedFd<'_>,
    err: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let conn = ask(path, &format!("hold {}", slot.label()), &[out, err])?;
    expect_ok(&conn)
}

/// Tells the keeper at `path` that worker process `slot` is gone.
pub fn release(path: &Path, slot: Slot) -> std::io::Result<()> {
    let conn = ask(path, &format!("drop {}", slot.label()), &[])?;
    expect_ok(&conn)
}

/// Tells the keeper at `path` to exit; waits (briefly) for its answer.
pub fn quit(path: &Path) -> std::io::Result<()> {
    let conn = ask(path, "quit", &[])?;
    let _ = sys::fdpass::recv(&conn, MAX_REQUEST)?;
    Ok(())
}

fn expect_ok(conn: &UnixStream) -> std::io::Result<()> {
    let (answer, _) = sys::fdpass::recv(conn, MAX_REQUEST)?;
    if answer.starts_with(b"ok") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "the keeper answered {:?}",
            String::from_utf8_lossy(&answer).trim()
        )))
    }
}

fn ask(path: &Path, what: &str, fds: &[BorrowedFd<'_>]) -> std::io::Result<UnixStream> {
    let conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    sys::fdpass::send(&conn, format!("{what}\n").as_bytes(), fds)?;
    Ok(conn)
}
