//! A baton that runs several services (`baton run --config-dir DIR`), as
//! supervisord hosts programs. One process, one loop, one reaper, one
//! control socket and one metrics endpoint; each service is a guardian of
//! its own ([`Service`]) with its own releases, policy, workers, user,
//! environment, keeper and state file, so one service's crash loop, bake
//! or revert never touches another's processes.
//!
//! The loop waits on what the instance owns (signals, control requests,
//! housekeeping) and on every service's own inputs, and hands each event to
//! the service it belongs to. Children are reaped here, once, and each
//! exit goes to the service that owns the pid. Requests name a service
//! (`"service"` beside the request); `status` and `stop` without one are
//! the instance's. `baton update` (and SIGHUP) reads the directory again
//! and applies what changed (see [`Host::update`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use tokio::sync::mpsc;
use tracing::{info, warn};

mod calls;
mod update;
mod upgrade;

use calls::{KEEPER_RESTARTS, plain, reconfigure, start_keeper, status_of};

use super::running::{self, CLIENTS_GRACE, Common, Control, Service, Signals};
use super::{Waiter, metrics, systemd};
use crate::cli::RunArgs;
use crate::config_dir::{self, Change, ServiceDef};
use crate::control::proto::{Request, Response, ServiceProblem, ServiceSignaled, ServiceStatus};
use crate::control::server::ControlRequest;
use crate::error::StartupError;
use crate::spec::Signal;
use crate::sys;

/// Where one service is, when it is not running.
use super::handover::Idle;

/// What to do once a service's last generation is gone.
#[derive(Debug)]
enum Then {
    Nothing,
    /// Its file was removed (`update`).
    Remove,
    /// Start it again with these settings and listeners (`update`: a
    /// change a reload cannot carry).
    Start(Box<ServiceDef>, Vec<crate::config::BoundListener>),
}

/// One service of the instance.
struct Entry {
    def: ServiceDef,
    run: Option<Service>,
    idle: Idle,
    /// `start` (and `update`) requests, answered once it serves or fails.
    start_waiters: Vec<Waiter>,
    then: Then,
    /// It was asked to stop (not a failure when it ends).
    stop_asked: bool,
    /// Listeners an update no longer names, held until the reload with
    /// the new settings has settled.
    retired: Vec<crate::config::BoundListener>,
    /// Its settings checked and its listeners bound, at the instance's
    /// start: it starts with these.
    prepared: Option<Box<(crate::config::RunConfig, super::orphans::Left)>>,
}

/// A message from a helper task to the loop.
enum Note {
    /// A reload with new settings that `update` asked for has settled:
    /// the listeners no longer named close if it succeeded; if it rolled
    /// back, the service goes back to its previous settings (`old`), which
    /// the serving generation runs.
    Settled {
        service: String,
        ok: bool,
        old: Box<ServiceDef>,
    },
    /// What an upgrade waited for has finished (or not in time).
    Quiesced(bool),
    /// An update has been carried out.
    Updated,
}

/// The instance.
struct Host {
    dir: PathBuf,
    cli: RunArgs,
    name: String,
    control_path: PathBuf,
    nofile: sys::limits::Nofile,
    entries: Vec<Entry>,
    board: metrics::Board,
    control: Control,
    metrics: Option<std::net::TcpListener>,
    systemd: systemd::Systemd,
    stopping: Option<String>,
    stop_waiters: Vec<Waiter>,
    notes: mpsc::UnboundedSender<Note>,
    /// The keeper process every service's keeper runs in (`--orphans
    /// keep`), and how many times it was started again.
    keeper: Option<std::sync::Arc<super::keeper::Host>>,
    keeper_restarts: u32,
    /// The control socket's file, removed at the end.
    socket: crate::bound::ControlSocket,
    /// `baton upgrade`: the one under way, and how many this instance had.
    upgrade: Option<super::upgrade::Upgrade>,
    upgrades: u64,
    /// The upgrade is ready to exec (with every signal blocked).
    exec_pending: bool,
    /// The instance's keys, as the next image needs them.
    instance: RunArgs,
    /// The path baton was started from (the default for `baton upgrade`).
    exe: PathBuf,
    /// The directory's lock (see [`config_dir::lock`]).
    lock: std::os::fd::OwnedFd,
    /// An update is under way (another waits for it to finish).
    updating: bool,
}

/// How the instance starts.
#[derive(Debug)]
pub enum Start {
    /// From the directory, read.
    Fresh(Box<config_dir::Dir>),
    /// From the previous image's handover (`baton upgrade`).
    Upgraded(Box<super::handover::Instance>),
}

/// Runs every service of the directory `dir` (the command line `cli`)
/// until the instance is stopped; returns baton's exit code.
pub async fn run(dir: PathBuf, cli: RunArgs, start: Start) -> anyhow::Result<ExitCode> {
    let signals = Signals::new().context("installing signal handlers")?;
    if let Err(e) = sys::reaper::become_subreaper() {
        warn!(error = %e, "cannot become a child subreaper; orphans of the apps will go to init");
    }
    let (control_tx, mut control_rx) = mpsc::unbounded_channel();
    let (notes_tx, mut notes) = mpsc::unbounded_channel();
    let (mut host, metrics_task) = match start {
        Start::Fresh(read) => fresh(dir, cli, *read, control_tx, notes_tx)?,
        Start::Upgraded(i) => Host::resumed(dir, cli, *i, control_tx, notes_tx)?,
    };
    let mut housekeeping = running::housekeeping();
    let mut watchdog = running::watchdog();
    let mut signals = signals;
    loop {
        if std::mem::take(&mut host.exec_pending) {
            running::exec_with_signals_kept(&mut signals, || host.upgrade_exec()).await;
        }
        host.settle();
        if host.stopping.is_some() && host.entries.iter().all(|e| e.run.is_none()) {
            break;
        }
        let deadline = host
            .entries
            .iter()
            .filter_map(|e| e.run.as_ref()?.g.next_deadline())
            .chain(
                host.upgrade
                    .as_ref()
                    .and_then(super::upgrade::Upgrade::deadline),
            )
            .min();
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        let entries = &mut host.entries;
        let input = std::future::poll_fn(|cx| {
            for (i, e) in entries.iter_mut().enumerate() {
                if let Some(s) = e.run.as_mut()
                    && let std::task::Poll::Ready(event) = s.poll_input(cx)
                {
                    return std::task::Poll::Ready((i, event));
                }
            }
            std::task::Poll::Pending
        });
        // In this order, each time: a deadline is acted on only once what
        // already arrived (a readiness, an exit) has been taken.
        tokio::select! {
            biased;
            _ = signals.chld.recv() => host.reap(),
            Some(req) = control_rx.recv() => host.request(req),
            _ = signals.hup.recv() => host.update(None),
            _ = signals.usr2.recv() => host.update(None),
            _ = signals.term.recv() => host.stop_all("SIGTERM"),
            _ = signals.int.recv() => host.stop_all("SIGINT"),
            _ = signals.quit.recv() => { host.forward(Signal::QUIT); }
            _ = signals.usr1.recv() => { host.forward(Signal::USR1); }
            _ = signals.winch.recv() => { host.forward(Signal::WINCH); }
            Some(note) = notes.recv() => host.note(note),
            (i, event) = input => {
                if let Some(s) = host.entries[i].run.as_mut() {
                    s.with(|g| g.event(event));
                }
            }
            _ = housekeeping.tick() => {
                for s in host.running() {
                    s.with(|g| g.housekeeping());
                }
            }
            _ = async {
                match watchdog.as_mut() {
                    Some(tick) => tick.tick().await,
                    None => std::future::pending().await,
                }
            } => host.systemd.watchdog_ping(),
            () = sleep => {
                let now = Instant::now();
                host.upgrade_tick(now);
                for s in host.running() {
                    if s.g.next_deadline().is_some_and(|at| at <= now) {
                        s.with(|g| g.tick());
                    }
                }
            }
        }
    }
    host.control.task.abort();
    let _ = (&mut host.control.task).await;
    host.socket.remove();
    for waiter in host.stop_waiters.drain(..) {
        let _ = waiter.send(Response::Stopped { code: 0 });
    }
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        host.control.connections.closed(),
    )
    .await;
    if let Some(task) = metrics_task {
        task.abort();
    }
    info!(code = 0, "stopped");
    Ok(ExitCode::SUCCESS)
}

/// The instance of `read`, started: its control socket and metrics
/// endpoint bound, every service that starts with it set up first (a bad
/// one stops the start with nothing left running), then started.
fn fresh(
    dir: PathBuf,
    cli: RunArgs,
    read: config_dir::Dir,
    control_tx: mpsc::UnboundedSender<ControlRequest>,
    notes_tx: mpsc::UnboundedSender<Note>,
) -> anyhow::Result<(Host, Option<tokio::task::JoinHandle<()>>)> {
    let lock = config_dir::lock(&dir)?;
    let nofile = sys::limits::raise_nofile();
    let name = read.instance.name.clone().unwrap_or_default();
    let control_path = read
        .instance
        .control
        .clone()
        .unwrap_or_else(|| crate::control::default_path(&name));
    let socket = crate::startup::bind_control(&control_path)?;
    let metrics = read
        .instance
        .metrics
        .map(crate::startup::bind_metrics)
        .transpose()?;
    let mut socket = socket;
    let listener = socket.listener.take().context("the control socket")?;
    let control = Control::serve(listener, control_tx)?;
    let mut host = Host {
        dir,
        cli,
        name,
        control_path,
        nofile,
        entries: Vec::new(),
        board: metrics::Board::default(),
        control,
        metrics,
        systemd: systemd::Systemd::default(),
        stopping: None,
        stop_waiters: Vec::new(),
        notes: notes_tx,
        keeper: None,
        keeper_restarts: 0,
        socket,
        upgrade: None,
        upgrades: 0,
        exec_pending: false,
        instance: read.instance.clone(),
        exe: std::fs::read_link("/proc/self/exe").unwrap_or_default(),
        lock,
        updating: false,
    };
    if read.instance.orphans.unwrap_or_default() == crate::spec::Orphans::Keep {
        host.keeper = start_keeper();
    }
    let metrics_task = running::serve_metrics(host.metrics.as_ref(), &host.board)?;
    // Every service that starts now is set up (checked, bound) before any
    // starts: a bad one stops the start with nothing left running.
    let mut prepared = Vec::new();
    for def in &read.services {
        host.check_paths(def)?;
        let first = def.autostart && def.after.is_empty();
        if first {
            prepared.push(Some(host.prepare(def)?));
        } else {
            prepared.push(None);
        }
    }
    info!(
        path = %host.control_path.display(),
        name = %host.name,
        services = read.services.len(),
        pid = std::process::id(),
        "control"
    );
    host.left_behind(&read.services);
    for (def, ready) in read.services.into_iter().zip(prepared) {
        let idle = if def.autostart {
            Idle::Waiting
        } else {
            Idle::NotStarted
        };
        host.entries.push(Entry {
            def,
            run: None,
            idle,
            start_waiters: Vec::new(),
            then: Then::Nothing,
            stop_asked: false,
            retired: Vec::new(),
            prepared: ready.map(Box::new),
        });
    }
    Ok((host, metrics_task))
}

impl Host {
    fn running(&mut self) -> impl Iterator<Item = &mut Service> {
        self.entries.iter_mut().filter_map(|e| e.run.as_mut())
    }

    /// A service's settings as its guardian takes them: its keeper and
    /// state file are named after the instance and the service.
    fn args(&self, def: &ServiceDef) -> RunArgs {
        let mut args = def.args.clone();
        let stem = self
            .control_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        args.control = Some(
            self.control_path
                .with_file_name(format!("{stem}@{}.sock", def.name)),
        );
        args
    }

    /// Checks `def` and binds its listeners (or takes them from the
    /// keeper of a baton that died).
    fn prepare(
        &self,
        def: &ServiceDef,
    ) -> Result<(crate::config::RunConfig, super::orphans::Left), StartupError> {
        self.check_paths(def)?;
        let none = baton::Listeners::default();
        crate::startup::start_service(self.args(def), self.nofile, none).map_err(|e| {
            StartupError::Invalid(format!("{} ({}): {e}", def.name, def.file.display()))
        })
    }

    /// Services of a baton that died here whose files are gone: their
    /// keepers (and maybe their processes) are named, since nothing here
    /// will adopt them.
    fn left_behind(&self, services: &[ServiceDef]) {
        let stem = self
            .control_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(dir) = self.control_path.parent() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(service) = name
                .strip_prefix(&format!("{stem}@"))
                .and_then(|rest| rest.strip_suffix(".keeper.sock"))
            else {
                continue;
            };
            if services.iter().any(|d| d.name == service) {
                continue;
            }
            if super::keeper::alive(&entry.path()).is_some() {
                warn!(
                    service,
                    keeper = %entry.path().display(),
                    "a service of a baton that died here has no file in the directory any more: nothing adopts it, and its processes, if any, run unsupervised (put its file back and run `baton update`, or stop them)"
                );
            }
        }
    }

    /// Whether the sockets named after `def` (its keeper's, beside the
    /// control socket) fit a Unix socket's path.
    fn check_paths(&self, def: &ServiceDef) -> Result<(), StartupError> {
        // 107 bytes, less the temporary name it is bound under first.
        const ROOM: usize = 107 - 24;
        let Some(control) = self.args(def).control else {
            return Ok(());
        };
        let keeper = super::state::keeper_path(&control);
        let len = keeper.as_os_str().len();
        if len > ROOM {
            return Err(StartupError::Invalid(format!(
                "{}: its keeper's socket {} would be {len} bytes, more than a Unix socket's path takes ({ROOM} here): use a shorter service name or --control path",
                def.file.display(),
                keeper.display()
            )));
        }
        Ok(())
    }

    /// Starts entry `i` with its checked settings.
    fn begin(
        &mut self,
        i: usize,
        cfg: crate::config::RunConfig,
        left: super::orphans::Left,
    ) -> anyhow::Result<()> {
        let name = self.entries[i].def.name.clone();
        for l in &cfg.listeners {
            info!(service = %name, addr = %l.local, name = %l.name, "listening");
        }
        let common = Common {
            control: &self.control.listener,
            control_connections: &self.control.connections,
            board: &self.board,
            service: Some(&name),
            keeper: self.keeper.as_ref(),
        };
        let adopted = left.adoption.is_some();
        let mut s = Service::new(cfg, None, &common)?;
        s.begin(left);
        if adopted {
            info!(service = %name, "adopted: it runs the settings it was started with; `baton reload {name}` applies its file as it is now");
        }
        let e = &mut self.entries[i];
        e.run = Some(s);
        e.stop_asked = false;
        Ok(())
    }

    /// Starts entry `i` now; says why not.
    fn start(&mut self, i: usize) -> Result<(), String> {
        let def = self.entries[i].def.clone();
        let (cfg, left) = self.prepare(&def).map_err(|e| e.to_string())?;
        self.begin(i, cfg, left).map_err(|e| format!("{e:#}"))
    }

    /// After each event: what `/metrics` shows, services whose last
    /// generation has gone, those waiting to start, and the answers due.
    fn settle(&mut self) {
        for e in &mut self.entries {
            if let Some(s) = e.run.as_mut() {
                // Only what something happened to since.
                if std::mem::take(&mut s.dirty) {
                    s.with(|g| g.publish());
                    s.dirty = false;
                }
                let restarting = matches!(e.then, Then::Start(..));
                if s.g.policy.serving().is_some() && !s.g.policy.is_stopping() && !restarting {
                    for w in e.start_waiters.drain(..) {
                        let _ = w.send(Response::Started {
                            service: e.def.name.clone(),
                        });
                    }
                }
            }
        }
        let mut i = 0;
        while i < self.entries.len() {
            if self.entries[i]
                .run
                .as_ref()
                .is_some_and(|s| s.g.exit.is_some())
            {
                self.ended(i);
            }
            if matches!(self.entries[i].then, Then::Remove) && self.entries[i].run.is_none() {
                info!(service = %self.entries[i].def.name, "removed");
                self.entries.remove(i);
                continue;
            }
            i += 1;
        }
        if self.stopping.is_none() {
            self.start_waiting();
        }
        let started = self.entries.iter().all(|e| {
            !e.def.autostart
                || e.run
                    .as_ref()
                    .is_some_and(|s| s.g.policy.serving().is_some())
                || matches!(e.idle, Idle::Failed(..) | Idle::Stopped(_))
                || self.blocked(e)
        });
        if started && self.stopping.is_none() {
            let serving = self.entries.iter().filter(|e| e.run.is_some()).count();
            self.systemd.instance_ready(&format!(
                "{serving} of {} services serving",
                self.entries.len()
            ));
        }
    }

    /// Entry `i`'s last generation is gone.
    fn ended(&mut self, i: usize) {
        let Some(s) = self.entries[i].run.take() else {
            return;
        };
        let served = s.g.policy.ever_ready();
        let (code, listeners, clients) = s.end();
        if let Some(clients) = clients {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(CLIENTS_GRACE, clients).await;
            });
        }
        let e = &mut self.entries[i];
        self.board.remove(&e.def.name);
        e.idle = if e.stop_asked {
            Idle::Stopped(code)
        } else {
            let why = if served {
                "it gave up restarting (see its --restart and --start-limit)"
            } else {
                "its first generation never served"
            };
            warn!(service = %e.def.name, code, "{why}");
            Idle::Failed(code, why.to_owned())
        };
        info!(service = %e.def.name, code, "service stopped");
        match std::mem::replace(&mut e.then, Then::Nothing) {
            Then::Start(def, carried) => {
                e.def = *def;
                let def = e.def.clone();
                // Its old listeners go; the new set is already bound.
                drop(listeners);
                let started =
                    crate::startup::start_service_bound(self.args(&def), self.nofile, carried)
                        .map_err(|e| e.to_string())
                        .and_then(|cfg| {
                            self.begin(i, cfg, super::orphans::Left::default())
                                .map_err(|e| format!("{e:#}"))
                        });
                if let Err(why) = started {
                    warn!(service = %def.name, "not started again: {why}");
                    self.fail_waiters(i, &why);
                    self.entries[i].idle = Idle::Failed(2, why);
                }
            }
            Then::Remove => {
                e.then = Then::Remove;
                self.fail_waiters(i, "its file was removed");
            }
            Then::Nothing => {
                let why = match &e.idle {
                    Idle::Failed(code, why) => {
                        format!(
                            "{} did not start: {why} (exit code {code}; see its log)",
                            e.def.name
                        )
                    }
                    _ => format!("{} stopped before it served", e.def.name),
                };
                self.fail_waiters(i, &why);
            }
        }
    }

    fn fail_waiters(&mut self, i: usize, why: &str) {
        for w in self.entries[i].start_waiters.drain(..) {
            let _ = w.send(Response::Error {
                message: why.to_owned(),
            });
        }
    }

    /// Starts the services waiting for those they start after, once these
    /// serve; gives up on them if one of these has failed.
    fn start_waiting(&mut self) {
        // One at a time, so that the loop goes on taking the started
        // ones' readiness (and everything else) in between.
        let Some(i) = self.next_start() else {
            return;
        };
        let started = match self.entries[i].prepared.take() {
            Some(ready) => {
                let (cfg, left) = *ready;
                self.begin(i, cfg, left).map_err(|e| format!("{e:#}"))
            }
            None => self.start(i),
        };
        if let Err(why) = started {
            warn!(service = %self.entries[i].def.name, "not started: {why}");
            self.fail_waiters(i, &why);
            self.entries[i].idle = Idle::Failed(2, why);
        }
    }

    /// The first service waiting to start whose `after` services serve.
    fn next_start(&self) -> Option<usize> {
        if self.stopping.is_some() {
            return None;
        }
        let serving = |name: &String| {
            self.entries.iter().any(|e| {
                &e.def.name == name
                    && e.run
                        .as_ref()
                        .is_some_and(|s| s.g.policy.serving().is_some())
            })
        };
        // A listener still held by a service that is going (removed, or
        // restarted) is waited for.
        let held = |e: &Entry| {
            self.entries.iter().any(|o| {
                o.run.is_some()
                    && !matches!(o.then, Then::Nothing)
                    && o.def
                        .args
                        .listen
                        .iter()
                        .any(|x| e.def.args.listen.iter().any(|y| config_dir::overlap(x, y)))
            })
        };
        self.entries.iter().position(|e| {
            e.run.is_none()
                && e.idle == Idle::Waiting
                && e.def.after.iter().all(serving)
                && !held(e)
        })
    }

    /// Whether entry `e` waits for a service that will not serve without
    /// being asked (stopped, failed, not started or gone).
    fn blocked(&self, e: &Entry) -> bool {
        e.run.is_none()
            && e.idle == Idle::Waiting
            && e.def.after.iter().any(|name| {
                self.entries
                    .iter()
                    .find(|d| &d.def.name == name)
                    .is_none_or(|d| d.run.is_none() && d.idle != Idle::Waiting)
            })
    }

    /// Reaps every exited child; each exit goes to the service whose
    /// child it was (the rest were orphans of the apps).
    fn reap(&mut self) {
        for s in self.running() {
            s.g.procs.children.sweep();
        }
        for (pid, status) in sys::reaper::reap() {
            if self.upgrade_checked(pid, status) {
                continue;
            }
            if self.keeper.as_ref().is_some_and(|k| k.process.pid == pid) {
                self.keeper_died(status);
                continue;
            }
            let owner = self.running().find(|s| s.g.procs.children.owns(pid));
            match owner {
                Some(s) => {
                    let exit = s.g.procs.children.claim(pid, status);
                    s.with(|g| g.exited(exit));
                }
                None => tracing::debug!(pid, status = %status.word(), "reaped an orphan"),
            }
        }
    }

    /// The shared keeper process exited: every service's keeper with it.
    /// Started again (at most [`KEEPER_RESTARTS`] times), and each running
    /// service's keeper added to it with what it holds.
    fn keeper_died(&mut self, status: crate::exit::ExitStatus) {
        self.keeper = None;
        for s in self.running() {
            s.g.orphans.keeper_gone();
        }
        if self.stopping.is_some() {
            return;
        }
        self.keeper_restarts += 1;
        if self.keeper_restarts > KEEPER_RESTARTS {
            warn!(status = %status.word(), "keeper: exited again; not started any more (if baton dies, its services cannot be adopted)");
            return;
        }
        warn!(status = %status.word(), "keeper: exited; starting another");
        self.keeper = start_keeper();
        let Some(keeper) = self.keeper.clone() else {
            return;
        };
        for s in self.running() {
            s.with(|g| {
                g.orphans.share(std::sync::Arc::clone(&keeper));
                g.orphans.start_keeper(&g.cfg, &mut g.procs.children);
                for (slot, h) in &g.procs.handles {
                    g.orphans.keep(*slot, h);
                }
            });
        }
    }

    /// Stops every service, then the instance.
    fn stop_all(&mut self, why: &str) {
        if self.stopping.is_none() {
            info!(reason = why, "stopping every service");
        }
        self.stopping = Some(why.to_owned());
        self.systemd.stopping();
        self.upgrade_stopping();
        for e in &mut self.entries {
            e.stop_asked = true;
            if let Some(s) = e.run.as_mut() {
                s.with(|g| g.stop(why));
            }
        }
    }

    /// A signal for the apps: to every service's serving generation.
    fn forward(&mut self, signal: Signal) -> (Vec<ServiceSignaled>, Vec<ServiceProblem>) {
        let (mut sent, mut missed) = (Vec::new(), Vec::new());
        for e in &mut self.entries {
            let service = e.def.name.clone();
            match e.run.as_mut().map(|s| s.with(|g| g.forward(signal))) {
                Some(Some((generation, pid))) => sent.push(ServiceSignaled {
                    service,
                    generation,
                    pid,
                }),
                Some(None) => missed.push(ServiceProblem {
                    service,
                    message: "no generation is serving".to_owned(),
                }),
                None => {}
            }
        }
        (sent, missed)
    }

    fn note(&mut self, note: Note) {
        let (service, ok, old) = match note {
            Note::Settled { service, ok, old } => (service, ok, old),
            Note::Quiesced(finished) => {
                self.upgrade_quiesced(finished);
                return;
            }
            Note::Updated => {
                self.updating = false;
                return;
            }
        };
        let Some(i) = self.find(&service) else {
            return;
        };
        let retired = std::mem::take(&mut self.entries[i].retired);
        if ok {
            return;
        }
        let back = crate::config::RunConfig::from_args(self.args(&old), self.nofile);
        let e = &mut self.entries[i];
        let Some(s) = e.run.as_mut() else {
            e.def = *old;
            return;
        };
        match back {
            Ok(mut cfg) => {
                // The listeners of before: those kept, and those retired.
                let mut all = std::mem::take(&mut s.g.cfg.listeners);
                all.extend(retired);
                match crate::startup::rebind(&cfg.listen, &s.g.cfg.listen, all) {
                    Ok((listeners, _)) | Err((_, listeners)) => cfg.listeners = listeners,
                }
                s.with(|g| reconfigure(g, cfg));
                e.def = *old;
                warn!(service = %service, "the reload with the new settings rolled back: the service keeps its previous settings");
            }
            Err(e) => warn!(service = %service, error = %e, "previous settings"),
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.def.name == name)
    }

    /// The answer to a request for a service this instance does not run.
    fn unknown(&self, name: &str) -> Response {
        let names: Vec<&str> = self.entries.iter().map(|e| e.def.name.as_str()).collect();
        Response::UnknownService {
            message: format!(
                "no service {name:?} in baton {} (its services: {}){}",
                self.name,
                names.join(", "),
                crate::control::client::others(&self.control_path)
            ),
        }
    }

    fn request(&mut self, req: ControlRequest) {
        let ControlRequest {
            request,
            reply,
            conn,
            service,
        } = req;
        if let Request::Upgrade { binary, check_only } = request {
            // Answered on the connection itself.
            if let Some(conn) = conn {
                self.upgrade_begin(conn, binary, check_only);
            }
            return;
        }
        let Some(name) = service else {
            self.instance_request(request, reply);
            return;
        };
        let Some(i) = self.find(&name) else {
            let _ = reply.send(self.unknown(&name));
            return;
        };
        let not_running = |e: &Entry| Response::Error {
            message: format!(
                "{} is not running ({}); `baton start {}` starts it",
                e.def.name,
                idle_word(&e.idle),
                e.def.name
            ),
        };
        let e = &mut self.entries[i];
        match request {
            Request::Start => {
                if let Some(s) = &e.run {
                    let message = if s.g.policy.is_stopping() {
                        format!("{} is stopping; start it once it has stopped", e.def.name)
                    } else {
                        format!("{} is already running", e.def.name)
                    };
                    let _ = reply.send(Response::Error { message });
                } else if self.stopping.is_some() {
                    let _ = reply.send(Response::Stopping);
                } else {
                    e.start_waiters.push(reply);
                    if let Err(why) = self.start(i) {
                        warn!(service = %name, "not started: {why}");
                        self.fail_waiters(i, &why);
                        self.entries[i].idle = Idle::Failed(2, why);
                    }
                }
            }
            Request::Status => match e.run.as_mut() {
                Some(s) => s.with(|g| g.control(plain(Request::Status, reply))),
                None => {
                    let _ = reply.send(Response::Services {
                        services: vec![describe(e)],
                    });
                }
            },
            Request::Stop => match e.run.as_mut() {
                Some(s) => {
                    e.stop_asked = true;
                    s.with(|g| g.control(plain(Request::Stop, reply)));
                }
                None => {
                    let code = match e.idle {
                        Idle::Stopped(c) | Idle::Failed(c, _) => c,
                        _ => 0,
                    };
                    let _ = reply.send(Response::Stopped { code });
                }
            },
            Request::Update => self.update(Some(reply)),
            request => match e.run.as_mut() {
                Some(s) => s.with(|g| g.control(plain(request, reply))),
                None => {
                    let _ = reply.send(not_running(e));
                }
            },
        }
    }

    /// A request that names no service.
    fn instance_request(&mut self, request: Request, reply: Waiter) {
        match request {
            Request::Status => {
                let services = self.entries.iter_mut().map(describe).collect();
                let _ = reply.send(Response::Services { services });
            }
            Request::Stop => {
                self.stop_waiters.push(reply);
                self.stop_all("control");
            }
            Request::Update => self.update(Some(reply)),
            Request::Signal { signal } => {
                let answer = match Signal::from_number(signal) {
                    None => Response::Error {
                        message: format!("unknown signal number {signal}"),
                    },
                    Some(signal) => {
                        let (signaled, missed) = self.forward(signal);
                        Response::SignaledAll { signaled, missed }
                    }
                };
                let _ = reply.send(answer);
            }
            _ => {
                let names: Vec<&str> = self.entries.iter().map(|e| e.def.name.as_str()).collect();
                let _ = reply.send(Response::UnknownService {
                    message: format!(
                        "baton {} runs several services: name one ({})",
                        self.name,
                        names.join(", ")
                    ),
                });
            }
        }
    }
}

fn idle_word(idle: &Idle) -> &'static str {
    match idle {
        Idle::Waiting => "waiting",
        Idle::NotStarted => "not-started",
        Idle::Stopped(_) => "stopped",
        Idle::Failed(..) => "failed",
    }
}

/// One line of `status`.
fn describe(e: &mut Entry) -> ServiceStatus {
    let (state, exit_code, message, status) = match e.run.as_mut() {
        Some(s) => {
            let state = if s.g.policy.is_stopping() {
                "stopping"
            } else if s.g.policy.serving().is_some() {
                "running"
            } else {
                "starting"
            };
            (state, None, None, status_of(&mut s.g).map(Box::new))
        }
        None => {
            let (code, message) = match &e.idle {
                Idle::Stopped(c) => (Some(*c), None),
                Idle::Failed(c, why) => (Some(*c), Some(why.clone())),
                Idle::Waiting if e.def.after.is_empty() => {
                    (None, Some("about to start".to_owned()))
                }
                Idle::Waiting => (
                    None,
                    Some(format!("waits for {} to serve", e.def.after.join(", "))),
                ),
                Idle::NotStarted => (None, Some("autostart = false".to_owned())),
            };
            (idle_word(&e.idle), code, message, None)
        }
    };
    ServiceStatus {
        service: e.def.name.clone(),
        state: state.to_owned(),
        exit_code,
        message,
        file: e.def.file.clone(),
        status,
    }
}
