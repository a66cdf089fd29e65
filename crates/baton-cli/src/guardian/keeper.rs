//! The descriptor keeper: a tiny process (`baton keeper`, started by
//! `baton run` with `--orphans keep`) that holds what a baton that is
//! killed would lose, and outlives it, so that the next `baton run` with
//! the same control socket can take it back and adopt the generation still
//! serving: copies of the listening sockets, a pidfd of every worker
//! process, a copy of the serialized state, and the read ends of the
//! workers' `--log-prefix` pipes. (Taking the sockets from the app itself
//! with `pidfd_getfd` would need ptrace rights over it, which an
//! unprivileged baton lacks under the default Yama scope.) What it holds is
//! the truth an adoption starts from; the state file is only a hint, read
//! when no keeper answers.
//!
//! It listens on a Unix socket next to the control socket (its fd 3,
//! bound by baton, 0600 in a 0700 directory) and answers processes of its
//! own user (or root) only, each client on its own with a deadline, many
//! at once, one short message each:
//!
//! - `hold L` with two descriptors: the read ends of the stdout and stderr
//!   pipes of the worker process labelled L (`3`, `3.w1`), answered `ok`;
//! - `pid L` with one descriptor: a pidfd of worker process L, answered
//!   `ok`; `drop L` forgets L's pipes and pidfd;
//! - `state` with one descriptor: a memfd holding the serialized state
//!   (replacing the one held), answered `ok`;
//! - `take`: answers `ok N logs L1,.. pids L1,.. state S` (`-` for an
//!   empty list) with the N
//!   listeners, the held pipes, pidfds and (S = 1) state attached
//!   (`SCM_RIGHTS`; past 250 descriptors, the rest follow in messages of
//!   one byte, `+`, each carrying up to 250 more), then waits on that
//!   connection: `done` (the taker's
//!   own keeper holds copies now) and it exits; the connection closing
//!   first, or no word within [`HANDOFF_TIMEOUT`], and it goes on holding
//!   (the taker died half way: the next one takes again);
//! - `quit`: answers `bye` and exits (baton stopped: nothing to keep).
//!
//! It never accepts on the listeners, and while its baton lives it never
//! reads the pipes. Once its baton is gone it holds the listeners (in proxy
//! mode, clients wait in their backlog) and copies the generations' output
//! (so that an app writing a log line is neither blocked on a full pipe nor
//! killed by SIGPIPE), until it is asked, or until no process it holds a
//! pidfd of is left (nothing to adopt: the ports are freed).

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use super::generation::Slot;
use super::state;
use crate::sys;

/// How long one client may take to ask, or to be answered: the keeper and
/// baton answer at once, and baton's loop never waits on a keeper (its
/// calls are made on a thread of their own).
const CLIENT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a taker has to start its own keeper and say `done`.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `baton run` waits for a dead baton's keeper to hand over what
/// it holds: it answers at once, but at startup a busy machine is no reason
/// to give up on it (nothing else waits meanwhile).
const TAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the keeper looks at its baton and the generations.
const TICK: Duration = Duration::from_millis(500);

/// The longest request.
const MAX_REQUEST: usize = 64;

/// The longest `take` answer's text (its labels).
const MAX_TAKE_TEXT: usize = 1 << 20;

/// What the `take` answer's later messages carry (one byte each, with up
/// to [`sys::fdpass::MAX_FDS`] descriptors).
const MORE: &[u8] = b"+";

/// The most clients served at once; the oldest is dropped beyond.
const MAX_CLIENTS: usize = 64;

/// A generation's output pipes, held.
struct Held {
    label: String,
    /// stdout's read end (`None` once it reached end-of-file), whether the
    /// next byte starts a line.
    out: Option<(OwnedFd, bool)>,
    /// The same for stderr.
    err: Option<(OwnedFd, bool)>,
}

/// What the keeper holds for the next baton.
#[derive(Default)]
struct Holding {
    /// The most worker processes whose pipes, and whose pidfds, are held.
    max_held: usize,
    listeners: Vec<OwnedFd>,
    held: Vec<Held>,
    pids: Vec<(String, OwnedFd)>,
    state: Option<OwnedFd>,
}

/// A client being served.
struct Client {
    conn: UnixStream,
    deadline: Instant,
    /// It took everything and is to say `done`.
    taker: bool,
}

/// What one message from a client leads to.
enum Served {
    /// Nothing to read yet: it stays.
    Later,
    /// It is dropped (not ours, a bad message, or gone).
    Dropped,
    /// The client is answered and gone.
    Answered,
    /// The client took everything: wait for its `done`.
    Taken,
    /// The keeper is done.
    Exit,
}

/// `baton keeper`: fd 3 is the keeper's socket, fds 4.. the `listeners`
/// listeners; `state` is the state file, read once baton is gone if no
/// pidfd is held; `name` prefixes the output it copies then (to its own
/// stdout and stderr, or to the log file). With `--host`, one process
/// keeps for every service of a baton that runs several ([`host`]).
pub fn main(args: crate::cli::KeeperArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    // Its own session already (see `Children::start_helper`); a hangup,
    // from a terminal or an orphaned group, must not end it either.
    sys::signal::ignore_hangup().context("ignoring SIGHUP")?;
    if args.host {
        return host();
    }
    let socket = UnixListener::from(sys::exec::take_fd(3).context("the keeper's socket (fd 3)")?);
    let listeners = (0..args.listeners)
        .map(|i| sys::exec::take_fd(4 + i as i32))
        .collect::<std::io::Result<Vec<_>>>()
        .context("the listeners (fds 4..)")?;
    keep(args, socket, listeners)?;
    Ok(ExitCode::SUCCESS)
}

/// The most keepers one host process runs (a baton's services).
const MAX_KEPT: usize = crate::config_dir::MAX_SERVICES;

/// The longest `add` message: a keeper's command line.
const MAX_ADD: usize = 64 * 1024;

/// `baton keeper --host`: fd 3 is a connection to the baton that runs
/// several services. Each message on it adds a keeper: its command line
/// (`baton keeper ...`, NUL-separated) with its socket and listeners
/// attached, answered `ok` once it runs (on a thread of its own) or
/// `error WHY`. Once that baton is gone (the connection ends), the host
/// exits when its last keeper has: each ends as a lone keeper would.
fn host() -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let conn = UnixStream::from(sys::exec::take_fd(3).context("the host's connection (fd 3)")?);
    let mut kept: Vec<std::thread::JoinHandle<()>> = Vec::new();
    loop {
        let (text, fds) = match sys::fdpass::recv(&conn, MAX_ADD) {
            Ok((text, _)) if text.is_empty() => break,
            Ok(message) => message,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        kept.retain(|t| !t.is_finished());
        let answer = if kept.len() >= MAX_KEPT {
            format!("error more than {MAX_KEPT} keepers")
        } else {
            match add(&text, fds) {
                Ok(thread) => {
                    kept.push(thread);
                    "ok".to_owned()
                }
                Err(e) => format!("error {e:#}"),
            }
        };
        let _ = sys::fdpass::send(&conn, format!("{answer}\n").as_bytes(), &[]);
    }
    for thread in kept {
        let _ = thread.join();
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts the keeper that `text` (its command line) and `fds` (its socket,
/// then its listeners) describe, on a thread.
fn add(text: &[u8], fds: Vec<OwnedFd>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use clap::Parser;
    let argv: Vec<std::ffi::OsString> = text
        .split(|b| *b == 0)
        .map(|a| <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(a).to_owned())
        .collect();
    let crate::cli::Command::Keeper(args) = crate::cli::Cli::try_parse_from(argv)?.command else {
        anyhow::bail!("not a keeper's command line");
    };
    let mut fds = fds.into_iter();
    let socket = UnixListener::from(fds.next().ok_or_else(|| anyhow::anyhow!("no socket"))?);
    let listeners: Vec<OwnedFd> = fds.collect();
    anyhow::ensure!(
        listeners.len() == args.listeners,
        "{} listeners sent for {}",
        listeners.len(),
        args.listeners
    );
    let name = args.name.clone();
    Ok(std::thread::Builder::new()
        .name(format!("keeper-{name}"))
        .spawn(move || {
            if let Err(e) = keep(args, socket, listeners) {
                eprintln!("baton keeper: {name}: {e:#}");
            }
        })?)
}

/// One keeper: holds `listeners` and what baton gives it on `socket`,
/// until it is asked, taken, or has nothing left to adopt.
fn keep(
    args: crate::cli::KeeperArgs,
    socket: UnixListener,
    listeners: Vec<OwnedFd>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let crate::cli::KeeperArgs {
        state, name, owner, ..
    } = args;
    let log = args.log_file.map(|path| super::logfile::LogSpec {
        path,
        max_size: args.log_max_size,
        keep: args.log_keep,
    });
    // Opened when first needed (once baton is gone), and kept.
    let mut log_file: Option<super::logfile::LogFile> = None;
    let mut holding = Holding {
        max_held: args.max_held,
        listeners,
        ..Holding::default()
    };
    // The baton it keeps for: named by it (pid and start time), else its
    // parent. One already gone leaves it orphaned from the start.
    let named = owner.as_deref().and_then(|o| {
        let (pid, start) = o.split_once(':')?;
        Some((pid.parse::<i32>().ok()?, start.parse::<u64>().ok()))
    });
    let (owner, owner_start) = match named {
        Some(named) => named,
        None => {
            let parent = rustix::process::getppid()
                .map(|p| p.as_raw_nonzero().get())
                .unwrap_or(0);
            (parent, sys::inspect::start_time(parent))
        }
    };
    socket.set_nonblocking(true)?;
    // Listening again makes the socket's credentials the keeper's own, so
    // that a client's SO_PEERCRED names the keeper, not the baton that
    // bound the socket.
    rustix::net::listen(&socket, 64).context("listening on the keeper's socket")?;
    let mut orphaned = false;
    let mut clients: Vec<Client> = Vec::new();
    let me = rustix::process::geteuid().as_raw();
    loop {
        let now = Instant::now();
        // The socket, the clients, then (once orphaned) every open pipe.
        let mut polled = vec![PollFd::new(&socket, PollFlags::IN)];
        polled.extend(clients.iter().map(|c| PollFd::new(&c.conn, PollFlags::IN)));
        if orphaned {
            for h in &holding.held {
                for (fd, _) in h.out.iter().chain(h.err.iter()) {
                    polled.push(PollFd::new(fd, PollFlags::IN));
                }
            }
        }
        let wait = clients
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(TICK)
            .min(TICK);
        let timeout = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: wait.as_nanos() as i64,
        };
        let _ = rustix::event::poll(&mut polled, Some(&timeout));
        let socket_ready = !polled[0].revents().is_empty();
        let readable: Vec<bool> = polled[1..=clients.len()]
            .iter()
            .map(|p| !p.revents().is_empty())
            .collect();
        let pipes_ready = polled[clients.len() + 1..]
            .iter()
            .any(|p| !p.revents().is_empty());
        drop(polled);
        // Clients first (in the order they came), then new ones.
        let mut keep = Vec::with_capacity(clients.len());
        for (i, mut c) in clients.drain(..).enumerate() {
            let ready = readable.get(i).copied().unwrap_or(false);
            if !ready {
                if c.deadline > Instant::now() {
                    keep.push(c);
                }
                continue;
            }
            match serve(&c, me, &mut holding) {
                Served::Exit => return Ok(()),
                Served::Taken => {
                    c.taker = true;
                    c.deadline = Instant::now() + HANDOFF_TIMEOUT;
                    keep.push(c);
                }
                Served::Later => keep.push(c),
                Served::Answered | Served::Dropped => {}
            }
        }
        clients = keep;
        if socket_ready {
            while let Ok((conn, _)) = socket.accept() {
                if conn.set_nonblocking(true).is_err() {
                    continue;
                }
                if clients.len() >= MAX_CLIENTS
                    && let Some(oldest) = clients.iter().position(|c| !c.taker)
                {
                    clients.remove(oldest);
                }
                clients.push(Client {
                    conn,
                    deadline: Instant::now() + CLIENT_TIMEOUT,
                    taker: false,
                });
            }
        }
        if orphaned && pipes_ready {
            if let Some(spec) = &log
                && log_file.is_none()
            {
                log_file = super::logfile::LogFile::open(spec)
                    .inspect_err(|e| eprintln!("baton keeper: {e}; copying the output to stderr"))
                    .ok();
            }
            for h in &mut holding.held {
                let prefix = if args.no_prefix {
                    String::new()
                } else {
                    format!("[{name} gen {}] ", h.label)
                };
                match &mut log_file {
                    Some(file) => {
                        copy(&mut h.out, &prefix, file);
                        copy(&mut h.err, &prefix, file);
                    }
                    None => {
                        copy(&mut h.out, &prefix, &mut std::io::stdout());
                        copy(&mut h.err, &prefix, &mut std::io::stderr());
                    }
                }
            }
            holding.held.retain(|h| h.out.is_some() || h.err.is_some());
        }
        if !orphaned && !sys::inspect::alive(owner, owner_start) {
            orphaned = true;
            eprintln!(
                "baton keeper: baton (pid {owner}) is gone; holding {} listener(s) for the next `baton run`",
                holding.listeners.len()
            );
        }
        if orphaned && !clients.iter().any(|c| c.taker) && !anything_to_adopt(&holding, &state) {
            eprintln!(
                "baton keeper: no generation of the dead baton is left; letting the listeners go"
            );
            return Ok(());
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

/// The keeper process of a baton that runs several services: one for all
/// (`baton keeper --host`), each service's keeper a thread of it.
#[derive(Debug)]
pub struct Host {
    /// The process.
    pub process: super::generation::Process,
    conn: UnixStream,
}

impl Host {
    /// Starts it, with `env` (a session of its own: it outlives baton).
    /// Whoever starts it reaps it.
    pub fn start(env: &[(std::ffi::OsString, std::ffi::OsString)]) -> std::io::Result<Host> {
        let (conn, theirs) = sys::fdpass::seqpacket_pair()?;
        let args: Vec<std::ffi::OsString> = [
            "baton",
            "keeper",
            "--host",
            "--listeners",
            "0",
            "--state",
            "/dev/null",
            "--name",
            "host",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let pid = sys::spawn::helper(
            Path::new("/proc/self/exe"),
            &args,
            env,
            &[theirs.as_fd()],
            true,
        )?;
        conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Host {
            process: super::generation::Process {
                pid,
                start_time: sys::inspect::start_time(pid),
            },
            conn,
        })
    }

    /// The keeper process a previous image started (`baton upgrade`), and
    /// that image's connection to it (descriptor `fd`, inherited).
    pub fn handed_over(
        process: super::generation::Process,
        fd: std::os::fd::RawFd,
    ) -> std::io::Result<Host> {
        let conn = UnixStream::from(sys::exec::take_fd(fd)?);
        conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Host { process, conn })
    }

    /// baton's connection to it (for the next image).
    pub fn conn(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }

    /// Adds the keeper of command line `argv` (`baton keeper ...`) with
    /// `fds` (its socket, then its listeners); answered once it runs.
    pub fn add(&self, argv: &[std::ffi::OsString], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let text = argv
            .iter()
            .map(|a| std::os::unix::ffi::OsStrExt::as_bytes(a.as_os_str()))
            .collect::<Vec<_>>()
            .join(&0u8);
        sys::fdpass::send(&self.conn, &text, fds)?;
        expect_ok(&self.conn)
    }
}

/// Reads and answers one message of client `c` (non-blocking: a client
/// that sent nothing yet is left for later).
fn serve(c: &Client, me: u32, holding: &mut Holding) -> Served {
    let ours = rustix::net::sockopt::socket_peercred(&c.conn)
        .is_ok_and(|peer| peer.uid.as_raw() == me || peer.uid.is_root());
    if !ours {
        return Served::Dropped;
    }
    match sys::fdpass::recv(&c.conn, MAX_REQUEST) {
        Ok((request, passed)) => answer(c, &request, passed, holding).unwrap_or(Served::Dropped),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Served::Later,
        Err(_) => Served::Dropped,
    }
}

/// Carries out `request` (with the descriptors `passed`) of client `c`.
fn answer(
    c: &Client,
    request: &[u8],
    mut passed: Vec<OwnedFd>,
    holding: &mut Holding,
) -> Option<Served> {
    let conn = &c.conn;
    let request = String::from_utf8_lossy(request);
    let mut words = request.split_whitespace();
    if c.taker {
        // Anything but `done` (end of file included) leaves everything held.
        return (words.next() == Some("done")).then_some(Served::Exit);
    }
    let reply = |text: &str| {
        let _ = sys::fdpass::send(conn, text.as_bytes(), &[]);
        Some(Served::Answered)
    };
    let label = |w: Option<&str>| {
        w.filter(|l| Slot::parse_label(l).is_some())
            .map(str::to_owned)
    };
    match (words.next(), words.next()) {
        (Some("hold"), w)
            if passed.len() == 2 && holding.held.len() < holding.max_held && label(w).is_some() =>
        {
            let err = passed.pop()?;
            let out = passed.pop()?;
            let label = label(w)?;
            holding.held.retain(|h| h.label != label);
            holding.held.push(Held {
                label,
                out: Some((out, true)),
                err: Some((err, true)),
            });
            reply("ok\n")
        }
        (Some("pid"), w)
            if passed.len() == 1 && holding.pids.len() < holding.max_held && label(w).is_some() =>
        {
            let label = label(w)?;
            holding.pids.retain(|(l, _)| *l != label);
            holding.pids.push((label, passed.pop()?));
            reply("ok\n")
        }
        (Some("state"), None) if passed.len() == 1 => {
            holding.state = passed.pop();
            reply("ok\n")
        }
        (Some("drop"), w) if label(w).is_some() => {
            let label = label(w)?;
            holding.held.retain(|h| h.label != label);
            holding.pids.retain(|(l, _)| *l != label);
            reply("ok\n")
        }
        (Some("take"), None) => {
            let mut all: Vec<BorrowedFd<'_>> = holding.listeners.iter().map(AsFd::as_fd).collect();
            let mut pids = Vec::new();
            for (label, fd) in &holding.pids {
                all.push(fd.as_fd());
                pids.push(label.clone());
            }
            let mut logs = Vec::new();
            for h in &holding.held {
                if let (Some((out, _)), Some((err, _))) = (&h.out, &h.err) {
                    all.push(out.as_fd());
                    all.push(err.as_fd());
                    logs.push(h.label.clone());
                }
            }
            let state = holding
                .state
                .as_ref()
                .map(|s| all.push(s.as_fd()))
                .is_some();
            // An empty list is `-`.
            let list = |l: &[String]| {
                if l.is_empty() {
                    "-".to_owned()
                } else {
                    l.join(",")
                }
            };
            let text = format!(
                "ok {} logs {} pids {} state {}\n",
                holding.listeners.len(),
                list(&logs),
                list(&pids),
                u8::from(state)
            );
            // More than one message carries: the text with the first
            // descriptors, then a byte with each batch of the rest.
            let mut batches = all.chunks(sys::fdpass::MAX_FDS);
            let first = batches.next().unwrap_or(&[]);
            let sent = sys::fdpass::send(conn, text.as_bytes(), first)
                .and_then(|()| batches.try_for_each(|batch| sys::fdpass::send(conn, MORE, batch)));
            match sent {
                Ok(()) => Some(Served::Taken),
                Err(e) => {
                    eprintln!("baton keeper: handing the listeners over: {e}");
                    None
                }
            }
        }
        (Some("quit"), None) => {
            reply("bye\n");
            Some(Served::Exit)
        }
        _ => reply("error: expected hold L, pid L, state, drop L, take or quit\n"),
    }
}

/// Whether a process of the dead baton's service still runs: by the
/// pidfds held if any, else by the state file (an unreadable file counts
/// as yes: better keep the ports than lose them).
fn anything_to_adopt(holding: &Holding, path: &Path) -> bool {
    if !holding.pids.is_empty() {
        return holding
            .pids
            .iter()
            .any(|(_, fd)| !sys::fdpass::pidfd_exited(fd.as_fd()));
    }
    match state::read(path) {
        Ok(Some(s)) => s
            .processes()
            .any(|(_, p)| sys::inspect::alive_exactly(p.pid, p.start_time)),
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
    /// A pidfd of each worker process it knew.
    pub pids: Vec<(Slot, OwnedFd)>,
    /// Its copy of the serialized state.
    pub state: Option<Vec<u8>>,
    /// The connection to say `done` on (see [`Handoff::finish`]).
    pub handoff: Handoff,
}

/// A keeper that handed everything over and waits to hear that the taker
/// holds copies of its own. Dropped without [`Handoff::finish`] (the taker
/// failed, or died), the keeper goes on holding.
#[derive(Debug)]
pub struct Handoff(UnixStream);

impl Handoff {
    /// The taker's own keeper holds everything now: the old one exits.
    pub fn finish(self) {
        let _ = sys::fdpass::send(&self.0, b"done\n", &[]);
    }
}

/// The pid of the keeper that answers on `path`, if one does.
pub fn alive(path: &Path) -> Option<i32> {
    let conn = std::os::unix::net::UnixStream::connect(path).ok()?;
    let cred = rustix::net::sockopt::socket_peercred(&conn).ok()?;
    Some(cred.pid.as_raw_nonzero().get())
}

/// The `take` answer: how many listeners, whose logs and pidfds follow,
/// and whether the state does. A keeper of an older baton lists logs only
/// (the list may be empty and last), holds no pidfds nor state, and has
/// exited already.
fn parse_take(text: &str) -> Option<(usize, Vec<Slot>, Vec<Slot>, bool)> {
    let labels = |w: Option<&str>| -> Option<Vec<Slot>> {
        w?.split(',')
            .filter(|g| !g.is_empty() && *g != "-")
            .map(Slot::parse_label)
            .collect()
    };
    let mut words = text.split_whitespace();
    let (Some("ok"), Some(n), Some("logs")) = (words.next(), words.next(), words.next()) else {
        return None;
    };
    let n = n.parse().ok()?;
    let logs = labels(Some(words.next().unwrap_or("-")))?;
    let (mut pids, mut state) = (Vec::new(), false);
    while let Some(word) = words.next() {
        match (word, words.next()) {
            ("pids", list) => pids = labels(list)?,
            ("state", Some(flag)) => state = flag == "1",
            _ => return None,
        }
    }
    Some((n, logs, pids, state))
}

/// Asks the keeper at `path` for everything it holds; it waits for the
/// [`Handoff`] to finish.
pub fn take(path: &Path) -> std::io::Result<Taken> {
    let conn = ask(path, "take", &[])?;
    conn.set_read_timeout(Some(TAKE_TIMEOUT))?;
    receive_take(conn)
}

/// Reads the `take` answer from `conn`.
fn receive_take(conn: UnixStream) -> std::io::Result<Taken> {
    // The text (its labels may take a few reads) with the first batch of
    // descriptors, then a byte with each further batch.
    let (mut raw, mut fds) = sys::fdpass::recv(&conn, MAX_TAKE_TEXT)?;
    let end = loop {
        if let Some(end) = raw.iter().position(|&b| b == b'\n') {
            break end;
        }
        let (more, batch) = sys::fdpass::recv(&conn, MAX_TAKE_TEXT)?;
        if more.is_empty() || raw.len() + more.len() > MAX_TAKE_TEXT {
            return Err(std::io::Error::other(
                "the keeper's answer to take ended, or ran on, before its end of line",
            ));
        }
        raw.extend_from_slice(&more);
        fds.extend(batch);
    };
    let text = String::from_utf8_lossy(&raw[..end]).into_owned();
    let bad = |got: usize| {
        std::io::Error::other(format!(
            "the keeper answered {:?} with {got} descriptor(s)",
            text.trim(),
        ))
    };
    let (n, logs_of, pids_of, with_state) = parse_take(&text).ok_or_else(|| bad(fds.len()))?;
    let expected = n + pids_of.len() + 2 * logs_of.len() + usize::from(with_state);
    while fds.len() < expected {
        let (more, batch) = sys::fdpass::recv(&conn, MORE.len())?;
        if more != MORE || batch.is_empty() {
            return Err(bad(fds.len()));
        }
        fds.extend(batch);
    }
    if fds.len() != expected {
        return Err(bad(fds.len()));
    }
    let mut fds = fds.into_iter();
    let listeners = fds.by_ref().take(n).collect();
    let pids = pids_of.into_iter().zip(fds.by_ref()).collect();
    let mut logs = Vec::new();
    for slot in logs_of {
        if let (Some(out), Some(err)) = (fds.next(), fds.next()) {
            logs.push((slot, out, err));
        }
    }
    let state = fds.next().map(sys::exec::read_all).transpose()?;
    let _ = conn.set_read_timeout(None);
    Ok(Taken {
        listeners,
        logs,
        pids,
        state,
        handoff: Handoff(conn),
    })
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

/// Gives the keeper at `path` a pidfd of worker process `slot`.
pub fn pid(path: &Path, slot: Slot, pidfd: BorrowedFd<'_>) -> std::io::Result<()> {
    let conn = ask(path, &format!("pid {}", slot.label()), &[pidfd])?;
    expect_ok(&conn)
}

/// Gives the keeper at `path` a copy of the serialized state (a memfd).
pub fn state(path: &Path, memfd: BorrowedFd<'_>) -> std::io::Result<()> {
    let conn = ask(path, "state", &[memfd])?;
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_take_answer_of_more_descriptors_than_a_message_carries_comes_whole() {
        // 300 workers' pipes and pidfds: 901 descriptors, in 4 messages.
        let mut holding = Holding {
            max_held: 400,
            ..Holding::default()
        };
        let (listener, _) = UnixStream::pair().expect("pair");
        holding.listeners.push(OwnedFd::from(listener));
        for w in 0..300 {
            let label = format!("3.w{w}");
            let (out, err) = rustix::pipe::pipe().expect("pipe");
            holding.held.push(Held {
                label: label.clone(),
                out: Some((out, true)),
                err: Some((err, true)),
            });
            let (pidfd, _) = rustix::pipe::pipe().expect("pipe");
            holding.pids.push((label, pidfd));
        }
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let client = Client {
            conn: ours,
            deadline: Instant::now() + CLIENT_TIMEOUT,
            taker: false,
        };
        let receiving = std::thread::spawn(move || receive_take(theirs));
        assert!(matches!(
            answer(&client, b"take", Vec::new(), &mut holding),
            Some(Served::Taken)
        ));
        let taken = receiving.join().expect("thread").expect("taken");
        assert_eq!(taken.listeners.len(), 1);
        assert_eq!(taken.logs.len(), 300);
        assert_eq!(taken.pids.len(), 300);
        assert_eq!(taken.logs[299].0.label(), "3.w299");
        assert_eq!(taken.pids[1].0.label(), "3.w1");
    }

    use super::*;

    #[test]
    fn the_take_answer_of_this_keeper_and_of_an_older_one() {
        let w1 = Slot::parse_label("3.w1").expect("label");
        assert_eq!(
            parse_take("ok 2 logs - pids 3,3.w1 state 1\n"),
            Some((2, vec![], vec![Slot::new(3, 0), w1], true))
        );
        assert_eq!(
            parse_take("ok 1 logs 3.w1 pids - state 0\n"),
            Some((1, vec![w1], vec![], false))
        );
        // An older keeper's.
        assert_eq!(parse_take("ok 1 logs \n"), Some((1, vec![], vec![], false)));
        assert_eq!(
            parse_take("ok 1 logs 3\n"),
            Some((1, vec![Slot::new(3, 0)], vec![], false))
        );
        for bad in [
            "",
            "no",
            "ok x logs -",
            "ok 1 logs nonsense",
            "ok 1 logs - pids x",
            "ok 1 logs - what 1",
        ] {
            assert_eq!(parse_take(bad), None, "{bad:?}");
        }
    }
}
