//! `--orphans keep`: a baton that is killed leaves its service serving, and
//! the next `baton run` with the same control socket adopts it.
//!
//! While baton runs it keeps two things next to its control socket: the
//! state file ([`super::state`]), rewritten whenever its state changes, and
//! a descriptor keeper ([`super::keeper`]) holding copies of the listeners.
//! A new `baton run` that finds a state file whose baton is gone
//! ([`find`], before it binds anything) takes the listeners back from the
//! keeper (they must be the ones it was asked for), and then
//! (`takeover.rs`) watches the processes still alive through pidfds
//! (they are not its children, so their exit status is unknown), listens
//! again on their notification sockets, and goes on as if it had started
//! them: the serving generation serves on, and the next reload replaces it
//! with the usual handover. A generation that was starting or draining
//! when baton died is stopped.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::children::{Children, Exit, Owner};
use super::generation::{Process, Route, Slot, State as GenState};
use super::policy::Snapshot;
use super::state::{self, State};
use super::{handover, keeper};
use crate::config::RunConfig;
use crate::error::StartupError;
use crate::spec::{ListenSpec, Orphans as Mode};
use crate::sys;

/// How many times a keeper that exits on its own is started again.
const KEEPER_RESTARTS: u32 = 5;

/// The state file and the keeper of a running baton.
#[derive(Debug)]
pub struct Orphans {
    keep: bool,
    state_path: PathBuf,
    keeper_path: PathBuf,
    keeper: Option<Process>,
    keeper_restarts: u32,
    written: Vec<u8>,
    write_failed: bool,
    /// The pid of the baton that died, whose service this one adopted.
    pub adopted_from: Option<i32>,
    /// Calls to the keeper, made off the loop (a keeper that is stopped or
    /// slow never holds the loop up).
    courier: Option<Courier>,
    /// The keeper process this service's keeper runs in, shared with the
    /// other services of the baton (`--config-dir`); `None`: a process of
    /// its own.
    shared: Option<std::sync::Arc<keeper::Host>>,
}

/// A call to the keeper, carried by the courier thread.
#[derive(Debug)]
enum Call {
    /// Hold a worker's output pipes.
    Hold(Slot, OwnedFd, OwnedFd),
    /// Hold a worker's pidfd.
    Pid(Slot, OwnedFd),
    /// Hold a copy of the serialized state (a memfd).
    State(OwnedFd),
    /// Let a worker's pipes and pidfd go.
    Release(Slot),
}

/// The calls to one keeper (at `path`), carried by the courier thread.
#[derive(Debug)]
struct Courier {
    path: PathBuf,
    tx: std::sync::mpsc::Sender<(PathBuf, Call)>,
}

impl Courier {
    fn send(&self, call: Call) {
        let _ = self.tx.send((self.path.clone(), call));
    }
}

/// The thread that makes the calls to the keepers (one for every service
/// of a baton), one after another, each bounded by the keeper client's
/// timeouts: started once.
static COURIER: std::sync::OnceLock<std::sync::mpsc::Sender<(PathBuf, Call)>> =
    std::sync::OnceLock::new();

/// The calls to the keeper at `path`.
fn courier(path: PathBuf) -> Courier {
    let tx = COURIER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<(PathBuf, Call)>();
        let spawned = std::thread::Builder::new()
            .name("baton-keeper-calls".into())
            .spawn(move || {
                // Signals go to the guardian's thread alone.
                let _ = sys::exec::block_signals();
                for (path, call) in rx {
                    deliver(&path, call);
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "keeper: no thread for its calls; outputs are not held");
        }
        tx
    });
    Courier {
        path,
        tx: tx.clone(),
    }
}

/// Makes one call to the keeper at `path`.
fn deliver(path: &Path, call: Call) {
    match call {
        Call::Hold(slot, out, err) => {
            if let Err(e) = keeper::hold(path, slot, out.as_fd(), err.as_fd()) {
                warn!(generation = %slot, error = %e, "keeper: cannot hold the generation's output; if baton dies, its next log line fails");
            }
        }
        Call::Pid(slot, pidfd) => {
            if let Err(e) = keeper::pid(path, slot, pidfd.as_fd()) {
                warn!(generation = %slot, error = %e, "keeper: cannot hold the process's pidfd; if baton dies, it is not adopted");
            }
        }
        Call::State(memfd) => {
            if let Err(e) = keeper::state(path, memfd.as_fd()) {
                warn!(error = %e, "keeper: cannot hold a copy of the state; if baton dies, the state file is all an adoption has");
            }
        }
        Call::Release(slot) => {
            let _ = keeper::release(path, slot);
        }
    }
}

impl Orphans {
    /// For `cfg`; `keeper` was started by a previous image (an upgrade).
    pub fn new(cfg: &RunConfig, keeper: Option<Process>) -> Orphans {
        Orphans {
            keep: cfg.orphans == Mode::Keep,
            state_path: state::path(&cfg.control_path),
            keeper_path: state::keeper_path(&cfg.control_path),
            keeper,
            keeper_restarts: 0,
            written: Vec::new(),
            write_failed: false,
            adopted_from: None,
            courier: (cfg.orphans == Mode::Keep)
                .then(|| courier(state::keeper_path(&cfg.control_path))),
            shared: None,
        }
    }

    /// The shared keeper process died: this service's keeper with it.
    pub fn keeper_gone(&mut self) {
        self.keeper = None;
        self.shared = None;
    }

    /// Its keeper runs in `host`, with the other services' keepers.
    pub fn share(&mut self, host: std::sync::Arc<keeper::Host>) {
        self.shared = Some(host);
    }

    /// The keeper, if one runs.
    pub fn keeper(&self) -> Option<Process> {
        self.keeper
    }

    /// With `--orphans keep`, why no keeper runs (so a crash of baton now
    /// would leave the service unadoptable); `None` when one runs or none
    /// is wanted.
    pub fn no_keeper(&self) -> Option<String> {
        (self.keep && self.keeper.is_none()).then(|| {
            format!(
                "no descriptor keeper runs (it could not be started, or exited {} times): if baton \
                 dies now, the next baton run cannot adopt the service",
                self.keeper_restarts
            )
        })
    }

    /// Starts the keeper (with `--orphans keep`). A keeper that cannot be
    /// started costs only the adoption after a crash: baton goes on.
    pub fn start_keeper(&mut self, cfg: &RunConfig, children: &mut Children) {
        if !self.keep {
            return;
        }
        match self.spawn_keeper(cfg, children) {
            Ok(p) => {
                info!(pid = p.pid, path = %self.keeper_path.display(), "keeper: holding the listeners in case baton dies");
                self.keeper = Some(p);
                // It gets the state at the next record.
                self.written.clear();
            }
            Err(e) => warn!(
                error = %e,
                "keeper: not started; if baton is killed, the next `baton run` cannot adopt the service"
            ),
        }
    }

    fn spawn_keeper(&self, cfg: &RunConfig, children: &mut Children) -> io::Result<Process> {
        // Bound under a name of its own, made 0600, and renamed over the
        // fixed path only once the keeper runs: a keeper that handed its
        // listeners to this baton keeps answering there until this one does
        // (it exits once told `done`), a baton killed in between leaves it
        // there, and one left by a baton that is gone is replaced.
        let temporary = self
            .keeper_path
            .with_extension(format!("sock.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        let socket = std::os::unix::net::UnixListener::bind(&temporary)?;
        if let Err(e) = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
        {
            let _ = std::fs::remove_file(&temporary);
            return Err(e);
        }
        let mut fds = vec![socket.as_fd()];
        fds.extend(cfg.listeners.iter().map(|l| l.fd.as_fd()));
        let mut args: Vec<std::ffi::OsString> = vec![
            "baton".into(),
            "keeper".into(),
            "--listeners".into(),
            cfg.listeners.len().to_string().into(),
            "--state".into(),
            self.state_path.clone().into(),
            "--name".into(),
            cfg.name.clone().into(),
            "--owner".into(),
            {
                let me = std::process::id() as i32;
                let start = sys::inspect::start_time(me).map_or(String::new(), |s| s.to_string());
                format!("{me}:{start}").into()
            },
        ];
        // Every worker of two generations (a reload), their replacements,
        // and room to spare.
        let max_held = (4 * cfg.policy.workers + 16).max(crate::knobs::KEEPER_MAX_HELD);
        args.extend(["--max-held".into(), max_held.to_string().into()]);
        if let Some(log) = &cfg.log_file {
            args.extend([
                "--log-file".into(),
                log.path.clone().into(),
                "--log-max-size".into(),
                log.max_size.to_string().into(),
                "--log-keep".into(),
                log.keep.to_string().into(),
            ]);
        }
        // Raw lines only into a log file without `--log-prefix`, as baton
        // copies them.
        if cfg.log_file.is_some() && !cfg.log_prefix {
            args.push("--no-prefix".into());
        }
        if let Some(host) = &self.shared {
            let added = host.add(&args, &fds).and_then(|()| {
                std::fs::rename(&temporary, &self.keeper_path).inspect_err(|_| {
                    let _ = keeper::quit(&temporary);
                })
            });
            if let Err(e) = added {
                let _ = std::fs::remove_file(&temporary);
                return Err(e);
            }
            return Ok(host.process);
        }
        // The running image, even if its file was replaced since.
        let started = children.start_helper(
            Owner::Keeper,
            Path::new("/proc/self/exe"),
            &args,
            &cfg.base_env,
            &fds,
        );
        let pid = match started.and_then(|pid| {
            std::fs::rename(&temporary, &self.keeper_path)
                .map(|()| pid)
                .inspect_err(|_| {
                    let _ = sys::signal::send(pid, crate::spec::Signal::KILL);
                })
        }) {
            Ok(pid) => pid,
            Err(e) => {
                let _ = std::fs::remove_file(&temporary);
                return Err(e);
            }
        };
        Ok(Process {
            pid,
            start_time: sys::inspect::start_time(pid),
        })
    }

    /// Gives the keeper generation `generation`'s output pipes (read ends),
    /// for it to copy if baton dies.
    pub fn hold(&self, slot: Slot, readers: &(OwnedFd, OwnedFd)) {
        if self.keeper.is_none() {
            return;
        }
        match (readers.0.try_clone(), readers.1.try_clone()) {
            (Ok(out), Ok(err)) => {
                if let Some(courier) = &self.courier {
                    courier.send(Call::Hold(slot, out, err));
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                warn!(generation = %slot, error = %e, "keeper: cannot hold the generation's output; if baton dies, its next log line fails");
            }
        }
    }

    /// Gives the keeper what it holds of worker process `slot`: its pidfd
    /// and its output pipes.
    pub fn keep(&self, slot: Slot, h: &super::generation::Handles) {
        if let Some(pidfd) = &h.pidfd {
            self.pid(slot, pidfd);
        }
        if let Some(readers) = &h.log_readers {
            self.hold(slot, readers);
        }
    }

    /// Gives the keeper a pidfd of worker process `slot`: how an adoption
    /// knows it, if baton dies.
    pub fn pid(&self, slot: Slot, pidfd: &OwnedFd) {
        if self.keeper.is_none() {
            return;
        }
        match pidfd.try_clone() {
            Ok(fd) => {
                if let Some(courier) = &self.courier {
                    courier.send(Call::Pid(slot, fd));
                }
            }
            Err(e) => {
                warn!(generation = %slot, error = %e, "keeper: cannot hold the process's pidfd; if baton dies, it is not adopted");
            }
        }
    }

    /// Worker process `slot` is gone: the keeper lets its pipes go.
    pub fn release(&self, slot: Slot) {
        if self.keeper.is_some()
            && let Some(courier) = &self.courier
        {
            courier.send(Call::Release(slot));
        }
    }

    /// The listeners changed (`baton update`): a new keeper holds the new
    /// ones, and the old one goes (the caller hands the new one what the
    /// old one held of the live processes).
    pub fn replace_keeper(&mut self, cfg: &RunConfig, children: &mut Children) {
        if self.shared.is_some() {
            // The old one answers at the path until the new one does.
            if self.keeper.take().is_some() {
                let _ = keeper::quit(&self.keeper_path);
            }
            self.start_keeper(cfg, children);
            return;
        }
        let old = self.keeper.take();
        self.start_keeper(cfg, children);
        if let Some(k) = old
            && sys::inspect::alive_exactly(k.pid, k.start_time)
        {
            let _ = sys::signal::send(k.pid, crate::spec::Signal::TERM);
        }
    }

    /// The keeper exited: started again unless baton is stopping.
    pub fn keeper_exited(
        &mut self,
        cfg: &RunConfig,
        children: &mut Children,
        exit: Exit,
        stopping: bool,
    ) {
        if self.keeper.map(|k| k.pid) != Some(exit.pid) {
            return;
        }
        self.keeper = None;
        if stopping {
            return;
        }
        self.keeper_restarts += 1;
        if self.keeper_restarts > KEEPER_RESTARTS {
            warn!(pid = exit.pid, status = %exit.status.word(), "keeper: exited again; not started any more");
            return;
        }
        warn!(pid = exit.pid, status = %exit.status.word(), "keeper: exited; starting another");
        self.start_keeper(cfg, children);
    }

    /// Rewrites the state file if the state changed.
    pub fn record(&mut self, cfg: &RunConfig, policy: &Snapshot) {
        if !self.keep {
            return;
        }
        let me = std::process::id() as i32;
        let s = State {
            version: state::VERSION,
            baton: Process {
                pid: me,
                start_time: sys::inspect::start_time(me),
            },
            baton_version: super::handover::baton_version().to_owned(),
            keeper: self.keeper,
            name: cfg.name.clone(),
            listeners: cfg.listeners.iter().map(handover::Listener::from).collect(),
            proxied: cfg.proxy.is_some(),
            generations: policy.generations.clone(),
            serving: policy.serving,
            next_id: policy.next_id,
            stats: policy.stats.clone(),
        };
        let Ok(bytes) = serde_json::to_vec(&s) else {
            return;
        };
        if bytes == self.written {
            return;
        }
        if self.keeper.is_some()
            && let Some(courier) = &self.courier
        {
            match sys::exec::memfd("baton-state", &bytes) {
                Ok(memfd) => {
                    courier.send(Call::State(memfd));
                }
                Err(e) => warn!(error = %e, "keeper: cannot hand it a copy of the state"),
            }
        }
        match state::write(&self.state_path, &s) {
            Ok(()) => self.write_failed = false,
            Err(e) if !self.write_failed => {
                self.write_failed = true;
                warn!(path = %self.state_path.display(), error = %e, "state file not written; if baton and its keeper both die, the service cannot be adopted");
            }
            Err(_) => {}
        }
        // Written again at the next change (the keeper holds a copy).
        self.written = bytes;
    }

    /// baton stopped: the keeper exits and the files go (nothing is left
    /// to adopt).
    pub fn finish(&mut self) {
        if let Some(k) = self.keeper.take()
            && keeper::quit(&self.keeper_path).is_err()
            && self.shared.is_none()
            && sys::inspect::alive_exactly(k.pid, k.start_time)
        {
            let _ = sys::signal::send(k.pid, crate::spec::Signal::TERM);
        }
        state::remove(&self.state_path);
        let _ = std::fs::remove_file(&self.keeper_path);
    }
}

/// What a new `baton run` found of a baton that died.
#[derive(Debug)]
pub struct Found {
    /// Its state (its keeper's copy if it had one, else the file's).
    pub state: State,
    /// The listeners taken back from its keeper (in the state's order).
    pub listeners: Option<Vec<OwnedFd>>,
    /// The worker processes' output pipes its keeper held.
    pub logs: Vec<(Slot, OwnedFd, OwnedFd)>,
    /// The worker processes of its state known to be the ones it ran, by
    /// slot: with a pidfd from its keeper, or (no keeper) checked by start
    /// time and the listening socket they hold.
    pub identified: HashMap<Slot, Option<OwnedFd>>,
    /// Its keeper, waiting to hear that this baton's own keeper holds
    /// copies (see [`keeper::Handoff`]).
    pub handoff: Option<keeper::Handoff>,
    /// Whether something of it still runs, to adopt.
    pub adopt: bool,
}

/// What a baton that died here leaves to this one.
#[derive(Debug, Default)]
pub struct Left {
    /// Its service, if something of it still runs.
    pub adoption: Option<Adoption>,
    /// Its keeper, to be told once this baton's own keeper holds copies.
    pub handoff: Option<keeper::Handoff>,
}

/// The service of a baton that died, to adopt.
#[derive(Debug)]
pub struct Adoption {
    /// Its state.
    pub state: State,
    /// The worker processes' output pipes (stdout's and stderr's read
    /// ends).
    pub logs: Vec<(Slot, OwnedFd, OwnedFd)>,
    /// Its worker processes known to be its own (see [`Found`]).
    pub identified: HashMap<Slot, Option<OwnedFd>>,
}

/// A state of an older baton numbers no workers: each process of a
/// generation is one, in order.
fn number_workers(s: &mut State) {
    for g in &mut s.generations {
        let mut seen = std::collections::HashSet::new();
        for (i, p) in g.processes.iter_mut().enumerate() {
            if !seen.insert((p.worker, p.incarnation)) {
                (p.worker, p.incarnation) = (i as u32, 0);
            }
        }
    }
}

/// What a baton that died left here: its keeper's, then its file's.
fn left_state(path: &Path, taken: Option<&keeper::Taken>) -> Result<Option<State>, String> {
    if let Some(bytes) = taken.and_then(|t| t.state.as_deref()) {
        match serde_json::from_slice::<State>(bytes) {
            Ok(s) if s.version == state::VERSION => return Ok(Some(s)),
            Ok(s) => warn!(
                version = s.version,
                "the keeper's copy of the state is of another version; reading the file"
            ),
            Err(e) => {
                warn!(error = %e, "the keeper's copy of the state cannot be read; reading the file")
            }
        }
    }
    state::read(path)
}

/// Which of `s`'s worker processes are its own: those the keeper holds a
/// pidfd of (naming the same pid), and without one, those with a recorded
/// start time that hold the very listening socket (one of `listeners`, or
/// their private port in proxy mode). A pid read from a file alone is
/// never believed.
fn identify(
    s: &State,
    pids: Vec<(Slot, OwnedFd)>,
    listeners: &[OwnedFd],
) -> HashMap<Slot, Option<OwnedFd>> {
    let mut pids: HashMap<Slot, OwnedFd> = pids.into_iter().collect();
    // The listening sockets: the copies taken back, else (no keeper) those
    // listening on the state's TCP ports now.
    let inodes: Vec<u64> = if listeners.is_empty() {
        s.listeners
            .iter()
            .filter_map(|l| l.tcp)
            .flat_map(|a| sys::inspect::listening_inodes(a.port()))
            .collect()
    } else {
        listeners.iter().filter_map(sys::inspect::inode).collect()
    };
    let mut out = HashMap::new();
    for g in &s.generations {
        for p in &g.processes {
            let slot = p.slot(g.id);
            let pid = p.process.pid;
            if let Some(fd) = pids.remove(&slot) {
                if sys::fdpass::pidfd_pid(fd.as_fd()) == Some(pid) {
                    out.insert(slot, Some(fd));
                } else {
                    warn!(generation = %slot, pid, "the state names a process its keeper does not: not adopted, not signalled");
                }
                continue;
            }
            let holds = match p.route.unwrap_or(g.route) {
                Route::Private { port } => sys::inspect::listens_on(pid, port),
                Route::Sockets => sys::inspect::holds_any(pid, &inodes),
            };
            if sys::inspect::alive_exactly(pid, p.process.start_time) && holds {
                out.insert(slot, None);
            }
        }
    }
    out
}

/// Looks for a baton that died, before `baton run` binds its listeners
/// (`specs`): its keeper first, then its state file. `Ok(None)`: nothing
/// of one here. An error leaves everything as it was (the keeper keeps its
/// listeners, the service its processes).
pub fn find(control: &Path, specs: &[ListenSpec]) -> Result<Option<Found>, StartupError> {
    let path = state::path(control);
    let keeper_path = state::keeper_path(control);
    let taken = keeper::take(&keeper_path);
    let mut s = match left_state(&path, taken.as_ref().ok()) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(None),
        Err(e) => {
            // Never deleted: it may be the only record of a service that
            // still runs. A keeper that answers says one does.
            if let Some(keeper) = keeper::alive(&keeper_path) {
                return Err(StartupError::Invalid(format!(
                    "the state file cannot be read ({e}), and the descriptor keeper of a baton that \
                     died (pid {keeper}, on {}) still holds its service's sockets but no copy of \
                     its state: stop that service (the keeper and the app it serves) or start this \
                     one with another --control",
                    keeper_path.display()
                )));
            }
            warn!(
                "a state file that cannot be read is left as it is ({e}); no keeper answers, so \
                 starting fresh (if a port is in use, a service of the baton that died may still hold it)"
            );
            return Ok(None);
        }
    };
    number_workers(&mut s);
    if sys::inspect::alive_exactly(s.baton.pid, s.baton.start_time) {
        return Err(StartupError::Invalid(format!(
            "baton pid {} (which wrote {}) still runs but does not answer on {}; stop it first",
            s.baton.pid,
            path.display(),
            control.display()
        )));
    }
    let (listeners, logs, pids, handoff) = match taken {
        Ok(t) => (Some(t.listeners), t.logs, t.pids, Some(t.handoff)),
        Err(_) => (None, Vec::new(), Vec::new(), None),
    };
    let identified = identify(&s, pids, listeners.as_deref().unwrap_or_default());
    let live: Vec<(Slot, i32)> = s
        .generations
        .iter()
        .flat_map(|g| {
            g.processes
                .iter()
                .map(move |p| (p.slot(g.id), p.process.pid))
        })
        .filter(|(slot, _)| identified.contains_key(slot))
        .collect();
    let matches = same_listeners(specs, &s);
    if let (Some(&(slot, pid)), Err(why)) = (live.first(), &matches) {
        return Err(StartupError::Invalid(format!(
            "generation {} (pid {pid}) of the baton that died (pid {}) still runs, and {why}: \
             run with the same --listen to adopt it, or stop it first",
            slot.generation, s.baton.pid
        )));
    }
    let listeners = listeners.filter(|l| l.len() == s.listeners.len() && matches.is_ok());
    if listeners.is_none() && !live.is_empty() && !s.proxied {
        let (slot, pid) = live[0];
        return Err(StartupError::Invalid(format!(
            "generation {} (pid {pid}) of the baton that died (pid {}) still runs and holds the \
             listeners, but no keeper answers on {} to hand them back: stop it first",
            slot.generation,
            s.baton.pid,
            keeper_path.display()
        )));
    }
    if live.is_empty() {
        info!(
            pid = s.baton.pid,
            "a previous baton died and nothing of its service runs: starting fresh"
        );
    }
    Ok(Some(Found {
        adopt: !live.is_empty(),
        state: s,
        listeners,
        logs,
        identified,
        handoff,
    }))
}

/// Whether `specs` ask for exactly the listeners of `s`.
fn same_listeners(specs: &[ListenSpec], s: &State) -> Result<(), String> {
    let had: Vec<&str> = s.listeners.iter().map(|l| l.local.as_str()).collect();
    let same = specs.len() == had.len()
        && specs
            .iter()
            .all(|spec| had.iter().any(|local| spec.addr.accepts(local)));
    if same {
        Ok(())
    } else {
        let asked: Vec<String> = specs.iter().map(|s| s.addr.to_string()).collect();
        Err(format!(
            "it listens on {} but this `baton run` asks for {}",
            had.join(", "),
            if asked.is_empty() {
                "nothing".to_owned()
            } else {
                asked.join(", ")
            }
        ))
    }
}

/// What an adopting baton goes on from: the generations of a baton that
/// died that still have a live process, each process by its record.
#[derive(Debug)]
pub struct Plan {
    /// The policy's state: the serving generation serving (a release on
    /// probation too: its bake ended with the baton that ran it), the rest
    /// draining from `now`.
    pub snapshot: Snapshot,
    /// The generations that were starting or serving beside it: to be
    /// asked to stop.
    pub stop: Vec<(Slot, i32)>,
}

/// The plan for adopting `s` at `now`: processes for which `alive` says no
/// (not known to be its own, or gone) are left out, and generations with
/// none left.
pub fn plan(s: &State, now: Instant, stop_timeout: Duration, alive: impl Fn(Slot) -> bool) -> Plan {
    let stop_deadline = Some(crate::knobs::later(now, stop_timeout));
    let mut stop = Vec::new();
    let mut generations = Vec::new();
    for g in &s.generations {
        let mut g = g.clone();
        let id = g.id;
        g.processes.retain(|p| alive(p.slot(id)));
        if g.processes.is_empty() {
            continue;
        }
        let serving =
            s.serving == Some(g.id) && matches!(g.state, GenState::Serving | GenState::Baking);
        if serving {
            g.enter(GenState::Serving, now, None);
        } else {
            if !matches!(g.state, GenState::Draining | GenState::Killed) {
                stop.extend(g.processes.iter().map(|p| (p.slot(g.id), p.process.pid)));
            }
            warn!(generation = g.id, pid = g.pid().unwrap_or_default(), state = %g.state, "a generation of the baton that died was not serving: stopping it");
            g.enter(GenState::Draining, now, stop_deadline);
        }
        // A state file of an older baton says nothing of readiness: a
        // serving generation's processes served.
        let unknown = !g.processes.iter().any(|p| p.ready);
        for p in &mut g.processes {
            p.replaced |= !serving;
            p.ready |= serving && unknown;
        }
        generations.push(g);
    }
    let serving = generations
        .iter()
        .find(|g| g.state == GenState::Serving)
        .map(|g| g.id);
    Plan {
        snapshot: Snapshot {
            generations,
            next_id: s.next_id,
            serving,
            restart_at: None,
            failures: 0,
            ever_ready: serving.is_some(),
            recent_restarts: Vec::new(),
            stats: s.stats.clone(),
        },
        stop,
    }
}
