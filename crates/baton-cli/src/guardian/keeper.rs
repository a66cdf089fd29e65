//! The descriptor keeper: a tiny process (`baton keeper`, started by
//! `baton run` with `--orphans keep`) that holds copies of the listening
//! sockets and outlives a baton that is killed, so that the next
//! `baton run` with the same control socket can take them back and adopt
//! the generation still serving. (Taking them from the app itself with
//! `pidfd_getfd` would need ptrace rights over it, which an unprivileged
//! baton lacks under the default Yama scope.)
//!
//! It listens on a Unix socket next to the control socket (its fd 3,
//! bound by baton, 0600 in a 0700 directory) and answers processes of its
//! own user (or root) only, one short line each:
//!
//! - `take`: answers `ok N` with the N listeners attached (`SCM_RIGHTS`),
//!   then exits: the taker starts a keeper of its own;
//! - `quit`: answers `bye` and exits (baton stopped: nothing to keep).
//!
//! It never accepts on the listeners. While its baton lives it only waits;
//! once its baton is gone it holds the listeners (in proxy mode, clients
//! wait in their backlog) until it is asked, or until no process of the
//! generations the state file lists is left (nothing to adopt: the ports
//! are freed).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use super::state;
use crate::sys;

/// How long one client may take to ask.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the keeper looks at its baton and the generations.
const TICK: Duration = Duration::from_millis(500);

/// The longest request line.
const MAX_LINE: u64 = 64;

/// `baton keeper`: fd 3 is the keeper's socket, fds 4.. the `listeners`
/// listeners; `state` is the state file to read once baton is gone.
pub fn main(listeners: usize, state: PathBuf) -> anyhow::Result<ExitCode> {
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
    socket.set_nonblocking(true)?;
    let mut orphaned = false;
    let me = rustix::process::geteuid().as_raw();
    loop {
        let readable = rustix::event::poll(
            &mut [rustix::event::PollFd::new(
                &socket,
                rustix::event::PollFlags::IN,
            )],
            Some(&rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: TICK.as_nanos() as i64,
            }),
        );
        if readable.is_ok_and(|n| n > 0)
            && let Ok((conn, _)) = socket.accept()
            && let Some(done) = serve(conn, me, &fds)
        {
            return Ok(done);
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

/// Answers one client; `Some` if the keeper is done.
fn serve(conn: UnixStream, me: u32, fds: &[OwnedFd]) -> Option<ExitCode> {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = conn.set_write_timeout(Some(CLIENT_TIMEOUT));
    let peer = rustix::net::sockopt::socket_peercred(&conn).ok()?;
    if peer.uid.as_raw() != me && !peer.uid.is_root() {
        return None;
    }
    let mut line = String::new();
    BufReader::new(std::io::Read::take(&conn, MAX_LINE))
        .read_line(&mut line)
        .ok()?;
    match line.trim() {
        "take" => {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            let text = format!("ok {}\n", fds.len());
            match sys::fdpass::send(&conn, text.as_bytes(), &borrowed) {
                Ok(()) => Some(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("baton keeper: handing the listeners over: {e}");
                    None
                }
            }
        }
        "quit" => {
            let _ = (&conn).write_all(b"bye\n");
            Some(ExitCode::SUCCESS)
        }
        _ => {
            let _ = (&conn).write_all(b"error: expected take or quit\n");
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

/// Asks the keeper at `path` for the listeners; it exits once it has
/// handed them over.
pub fn take(path: &Path) -> std::io::Result<Vec<OwnedFd>> {
    let conn = ask(path, "take")?;
    let (text, fds) = sys::fdpass::recv(&conn, 64)?;
    let text = String::from_utf8_lossy(&text);
    let count: Option<usize> = text.trim().strip_prefix("ok ").and_then(|n| n.parse().ok());
    match count {
        Some(n) if n == fds.len() => Ok(fds),
        _ => Err(std::io::Error::other(format!(
            "the keeper answered {:?} with {} descriptor(s)",
            text.trim(),
            fds.len()
        ))),
    }
}

/// Tells the keeper at `path` to exit; waits (briefly) for its answer.
pub fn quit(path: &Path) -> std::io::Result<()> {
    let conn = ask(path, "quit")?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(&conn, MAX_LINE)).read_line(&mut answer)?;
    Ok(())
}

fn ask(path: &Path, what: &str) -> std::io::Result<UnixStream> {
    let conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    (&conn).write_all(format!("{what}\n").as_bytes())?;
    Ok(conn)
}
