//! `baton run`: the guardian. One event loop owns all state and carries out
//! what [`policy::Policy`] decides.
//!
//! Theory of operation: baton binds the listeners once and never closes them
//! while it runs. Each generation of the app either inherits them as fds 3,
//! 4, … (`sd_listen_fds(3)`) or, in proxy mode, listens on a private port
//! behind baton's proxy ([`launch`]); either way it gets a notification
//! socket of its own (`sd_notify(3)`). A reload starts generation N+1 next
//! to N; only when N+1 is ready ([`readiness`]) is N asked to drain and
//! exit. Clients that arrive in between wait (in the kernel's accept queue,
//! or in the proxy) and are served by whichever generation serves, so none
//! is refused. If N+1 fails, it is killed and N serves on, untouched.
//!
//! The rooms: [`policy`] decides (pure, tested on a fake clock) and owns
//! the one map of [`generation`]s; [`launch`] is how a generation reaches
//! clients, chosen once at start; [`readiness`] merges the sources of
//! readiness into one event; [`children`] starts and reaps processes;
//! [`diagnose`] words the hints; `report` builds status and metrics. This
//! module is the loop: it waits on signals (HUP/USR2 reload, TERM/INT stop,
//! QUIT/USR1/WINCH forwarded), SIGCHLD (the one reaper), control requests,
//! notifications, helper tasks' events and the policy's next deadline, and
//! dispatches. It runs on a single-threaded runtime, which keeps `fork`
//! simple and ordering obvious.

mod backoff;
pub mod children;
mod clients_first;
pub mod diagnose;
pub mod event;
pub mod generation;
pub mod handover;
pub mod host;
pub mod keeper;
pub mod launch;
mod listeners;
pub mod logfile;
pub mod metrics;
mod notify;
pub mod orphans;
mod output;
pub mod policy;
mod pressure;
pub mod processes;
pub mod readiness;
pub mod release;
mod report;
pub mod running;
pub mod stamp;
pub mod state;
mod systemd;
mod takeover;
pub mod upgrade;
mod watch;

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::config::RunConfig;
use crate::control::proto::{Request, Response};
use crate::control::server::ControlRequest;
use crate::exit::ExitStatus;
use crate::spec::Signal;
use crate::sys;
use crate::sys::notify_socket::{Datagram, Fields};

use children::Owner;
pub use event::Event;
use generation::{Slot, State};
use policy::{Action, Outcome, Policy, SignalCause, Trigger};
use readiness::Source;

/// Whoever waits for a reload's (or a stop's) outcome.
type Waiter = oneshot::Sender<Response>;

struct Guardian {
    cfg: RunConfig,
    /// A second descriptor of the control socket's listener, for an
    /// upgrade to hand over.
    control_fd: OwnedFd,
    /// The upgrade under way, if any.
    upgrade: Option<upgrade::Upgrade>,
    /// In-place upgrades since baton first started.
    upgrades: u64,
    /// The state file and the descriptor keeper (`--orphans keep`).
    orphans: orphans::Orphans,
    /// The releases kept for a rollback.
    releases: release::Releases,
    /// When this image took over.
    upgraded_at: Option<Instant>,
    /// The decisions, and the one map of generations' data.
    policy: Policy<Waiter>,
    /// The worker processes' runtime side.
    procs: processes::Processes,
    /// Summaries of what caps and filters turned away.
    pressure: pressure::Pressure,
    /// `STATUS=` lines logged, at most so many per interval.
    status_log: pressure::Throttle,
    /// Listeners found shut down and re-armed.
    listener_rearms: u64,
    /// Why the last generation that failed before it was ready failed.
    failed_hint: Option<String>,
    /// The `/metrics` snapshot, written by `publish` alone.
    metrics: metrics::Shared,
    /// What the loop observed since it started, for the snapshot.
    observed: metrics::Observed,
    /// What systemd (if it runs baton) has been told.
    systemd: systemd::Systemd,
    /// `baton stop` clients, answered when baton has stopped.
    stop_waiters: Vec<Waiter>,
    /// Proxy mode: a stop waits for the clients to go first (why it was
    /// asked for), see [`Guardian::stop`].
    clients_first: Option<String>,
    started: Instant,
    /// When the event being handled arrived: baton's own latency (trigger to
    /// exec, ready to stop signal) is measured from here.
    event_at: Instant,
    exit: Option<u8>,
    /// The upgrade is ready to exec: the loop does it next, with every
    /// signal blocked and those already taken raised again (`running.rs`).
    exec_pending: bool,
}

impl Guardian {
    fn trigger(&mut self, trigger: Trigger, waiter: Option<Waiter>) {
        self.event_at = Instant::now();
        let actions = self.policy.trigger(self.event_at, trigger, waiter);
        self.apply(actions);
    }

    /// A stop request (a signal, `baton stop`; see [`Policy::stop`] for
    /// `--shutdown-delay`, and `clients_first.rs` for proxy mode).
    fn stop(&mut self, why: &str) {
        self.event_at = Instant::now();
        let first = self.clients_first.is_none()
            && !self.policy.is_stopping()
            && self.policy.lame_duck().is_none()
            && self.cfg.policy.shutdown_delay.is_none();
        if first && clients_first::start(self.cfg.proxy.as_ref(), &mut self.procs, why) {
            self.clients_first = Some(why.to_owned());
            self.systemd.stopping();
            return;
        }
        let why = self.clients_first.take().unwrap_or_else(|| why.to_owned());
        let actions = self.policy.stop(self.event_at, &why);
        self.apply(actions);
    }

    /// The earliest moment `tick` has something to do.
    fn next_deadline(&self) -> Option<Instant> {
        [
            self.policy.next_deadline(),
            self.upgrade.as_ref().and_then(upgrade::Upgrade::deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// `baton rollback`: the previous release, with the usual handover, if
    /// there is one and it can be reproduced; refused during a reload.
    fn rollback(&mut self, reply: Waiter) {
        let refused = if let Err(why) = self.policy.snapshot() {
            Some(Response::Error { message: why })
        } else {
            match self.releases.previous() {
                None => Some(Response::NoPrevious {
                    message: "no previous release to go back to (baton keeps the releases that \
                              served since it started)"
                        .to_owned(),
                }),
                Some(r) => release::check(r).err().map(|why| Response::Error {
                    message: format!(
                        "the previous release cannot be run as it ran: {why}; nothing changed"
                    ),
                }),
            }
        };
        match refused {
            Some(answer) => {
                if let Response::Error { message } | Response::NoPrevious { message } = &answer {
                    warn!("rollback refused: {message}");
                }
                let _ = reply.send(answer);
            }
            None => self.trigger(Trigger::Rollback, Some(reply)),
        }
    }

    /// The policy's deadlines. Before a starting generation may be timed
    /// out, the launch strategy looks at it while it is still there.
    fn tick(&mut self) {
        self.event_at = Instant::now();
        let now = self.event_at;
        if let Some(up) = self.upgrade.as_mut()
            && let Some(pid) = up.overdue(now, self.cfg.check_timeout)
        {
            let _ = sys::signal::send_group(pid, Signal::KILL);
            self.upgrade = None;
        }
        let timing_out = self
            .policy
            .generations()
            .find(|g| g.state == State::Starting && g.deadline.is_some_and(|d| d <= now))
            .and_then(|g| g.processes.iter().find(|p| !p.ready).map(|p| p.slot(g.id)));
        if let Some(slot) = timing_out
            && let Some(pid) = self.procs.handles.get(&slot).map(|h| h.pid)
        {
            self.failed_hint = self.procs.failure_hint(slot, pid);
        }
        let actions = self.policy.tick(now);
        self.apply(actions);
    }

    /// Passes `signal` on to the serving generation (PID 1 duty, and
    /// `baton signal`). Returns the generation and pid it went to.
    fn forward(&mut self, signal: Signal) -> Option<(u64, i32)> {
        let Some(generation) = self.policy.serving() else {
            warn!(%signal, "no generation is serving; the signal is not forwarded");
            return None;
        };
        let pid = self.procs.forward(generation, signal)?;
        Some((generation, pid))
    }

    /// New traffic goes to the serving generation (or, while none serves,
    /// waits for one).
    fn cut_over(&mut self) {
        self.procs.cut_over(&self.policy);
    }

    /// Refreshes what `/metrics`, the launch strategy and systemd see.
    fn publish(&mut self) {
        self.cut_over();
        let bake = self.policy.baking().and_then(|(new, old)| {
            let g = self.policy.generations().find(|g| g.id == new)?;
            let total = self.cfg.policy.bake?;
            let elapsed = Instant::now().saturating_duration_since(g.state_since);
            Some(launch::Probation {
                new: processes::serving_handles(&self.policy, &self.procs.handles, new),
                old: old
                    .map(|o| processes::serving_handles(&self.policy, &self.procs.handles, o))
                    .unwrap_or_default(),
                progress: elapsed.as_secs_f64() / total.as_secs_f64().max(1e-9),
            })
        });
        self.procs.launch.probation(bake, &self.procs.events);
        if self.policy.is_stopping() {
            self.systemd.stopping();
            self.procs.launch.stop();
        }
        self.orphans.record(&self.cfg, &self.policy.record());
        let not_ready = self.not_ready();
        if let Ok(mut m) = self.metrics.lock() {
            m.not_ready = not_ready;
            m.observed.clone_from(&self.observed);
            m.notify_rejected = self.procs.rejected.count();
            m.listener_rearms = self.listener_rearms;
            let stats = self.policy.stats();
            m.reloads_ok = stats.reloads_ok;
            m.reloads_rolled_back = stats.reloads_failed;
            m.restarts = stats.restarts;
            m.reverts = stats.reverts;
            m.generation = self.policy.serving().unwrap_or(0);
            m.generations_alive = self.policy.generations().count() as u64;
        }
    }

    fn control(&mut self, req: ControlRequest) {
        match req.request {
            Request::Reload => self.trigger(Trigger::Control, Some(req.reply)),
            Request::Rollback => self.rollback(req.reply),
            Request::Status => {
                let counters = report::Counters {
                    notify_rejected: self.procs.rejected.count(),
                    listener_rearms: self.listener_rearms,
                    upgrades: self.upgrades,
                    upgraded_at: self.upgraded_at,
                    keeper: self.orphans.keeper().map(|k| k.pid),
                    no_keeper: self.orphans.no_keeper(),
                    adopted_from: self.orphans.adopted_from,
                    releases: self.releases.describe(),
                    not_ready: self.not_ready(),
                    shutdown_at: self.policy.lame_duck(),
                    stray_answers: self.pressure.stray_answers(),
                };
                let status = report::status(
                    &self.cfg,
                    &self.policy,
                    &self.pressure,
                    counters,
                    self.started,
                );
                let _ = req.reply.send(Response::Status(Box::new(status)));
            }
            Request::Upgrade { binary, check_only } => {
                if let Some(conn) = req.conn {
                    self.upgrade_begin(conn, binary, check_only);
                }
            }
            Request::Stop => {
                // Answered once every generation is gone (see `run`).
                self.stop_waiters.push(req.reply);
                self.stop("control");
            }
            Request::Start | Request::Update => {
                let _ = req.reply.send(Response::Error {
                    message: format!(
                        "this baton runs one service ({}); start and update are for a baton run with --config-dir",
                        self.cfg.name
                    ),
                });
            }
            Request::Signal { signal } => {
                let answer = match Signal::from_number(signal) {
                    None => Response::Error {
                        message: format!("unknown signal number {signal}"),
                    },
                    Some(signal) => match self.forward(signal) {
                        Some((generation, pid)) => Response::Signaled { generation, pid },
                        None => Response::Error {
                            message: "no generation is serving".to_owned(),
                        },
                    },
                };
                let _ = req.reply.send(answer);
            }
        }
    }

    fn event(&mut self, event: Event) {
        self.event_at = Instant::now();
        match event {
            Event::Notify { slot, datagram } => self.notified(slot, datagram),
            Event::Ready(slot, source) => self.ready(slot, source),
            Event::RunCheck(slot) => {
                let ready = self.is_ready(slot);
                self.procs.run_check(&self.cfg, slot, ready);
            }
            Event::Drained(slot) => self.procs.drained(slot),
            Event::Watched => self.trigger(Trigger::Watch, None),
            Event::Quiesced(done) => self.upgrade_quiesced(done),
            Event::ClientsGone => {
                if let Some(why) = self.clients_first.take() {
                    let actions = self.policy.stop(self.event_at, &why);
                    self.apply(actions);
                }
            }
            Event::Gone(pid) => {
                if let Some(exit) = self.procs.children.gone(pid) {
                    self.exited(exit);
                }
            }
            Event::Worse { generation, why } => {
                if self.policy.baking().map(|(g, _)| g) == Some(generation) {
                    let actions = self.policy.revert(self.event_at, "error_rate", why);
                    self.apply(actions);
                }
            }
            Event::SelfBound { slot, addrs } => self.procs.self_bound(slot, addrs),
        }
    }

    /// A source of readiness passed for worker process `slot`: once its
    /// gate opens, the policy hears it is ready (see
    /// [`Policy::worker_ready`]).
    fn ready(&mut self, slot: Slot, source: Source) {
        let Some(handles) = self.procs.handles.get_mut(&slot) else {
            return;
        };
        if !handles.gate.pass(source) {
            return;
        }
        let actions = self.policy.worker_ready(self.event_at, slot);
        self.cut_over();
        self.apply(actions);
    }

    /// Whether the policy knows worker process `slot` as ready.
    fn is_ready(&self, slot: Slot) -> bool {
        self.policy
            .generations()
            .find(|g| g.id == slot.generation)
            .and_then(|g| g.process(slot))
            .is_some_and(|p| p.ready)
    }

    /// Reaps every exited child and routes each exit to its owner.
    fn reap(&mut self) {
        for exit in self.procs.children.reap() {
            self.exited(exit);
        }
    }

    /// A child (or an adopted process) exited.
    fn exited(&mut self, exit: children::Exit) {
        {
            self.event_at = Instant::now();
            match exit.owner {
                Some(Owner::Generation(slot)) => self.worker_exited(slot, exit),
                Some(Owner::Check(slot)) => {
                    let ready = self.is_ready(slot);
                    if self.procs.check_done(slot, exit.pid, exit.status, ready) {
                        self.ready(slot, Source::Exec);
                    }
                }
                Some(Owner::UpgradeCheck) => {
                    // What it left behind (its group) goes with it.
                    let _ = sys::signal::send_group(exit.pid, Signal::KILL);
                    self.upgrade_checked(exit.pid, exit.status);
                }
                Some(Owner::Keeper) => {
                    let stopping = self.policy.is_stopping();
                    self.orphans
                        .keeper_exited(&self.cfg, &mut self.procs.children, exit, stopping);
                    // A new keeper holds the live processes' pidfds and
                    // output too.
                    for (slot, h) in &self.procs.handles {
                        self.orphans.keep(*slot, h);
                    }
                }
                None => {}
            }
        }
    }

    fn notified(&mut self, slot: Slot, datagram: Datagram) {
        let generation = slot.generation;
        let Some(handles) = self.procs.handles.get_mut(&slot) else {
            return;
        };
        let pid = handles.pid;
        let fields = Fields::parse(&datagram.text);
        if let Some(status) = fields.status
            && handles.status.as_ref() != Some(&status)
        {
            let (log, suppressed) = self.status_log.allow(self.event_at);
            if suppressed > 0 {
                warn!(suppressed, "STATUS= lines not logged (too many)");
            }
            if log {
                info!(generation, pid, status = %status, "status");
            }
            handles.status = Some(status);
        }
        if fields.stopping {
            debug!(generation, pid, "the generation reports STOPPING=1");
        }
        if fields.ready {
            debug!(
                generation,
                worker = slot.worker,
                sender = datagram.pid,
                "READY=1"
            );
            self.ready(slot, Source::Notify);
        }
    }

    /// Carries out the policy's actions, and those that follow from them.
    fn apply(&mut self, actions: Vec<Action<Waiter>>) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn {
                    generation,
                    release,
                } => match self.spawn(generation, release) {
                    Ok((route, release)) => {
                        self.policy.spawned(generation, route, release);
                        if self.policy.serving().is_some() {
                            self.systemd.reloading(generation);
                        }
                    }
                    Err(e) => {
                        let now = Instant::now();
                        queue.extend(self.policy.spawn_failed(now, generation, &e));
                    }
                },
                Action::SpawnWorker { slot } => {
                    if let Err(e) = self.spawn_worker(slot) {
                        let now = Instant::now();
                        queue.extend(self.policy.worker_spawn_failed(now, slot, &e));
                    }
                }
                Action::Signal {
                    slot,
                    signal,
                    cause: SignalCause::Retire,
                    ..
                } => self.retire_slot(slot, signal),
                Action::Signal {
                    slot,
                    pid,
                    signal,
                    cause: SignalCause::Stop,
                } => {
                    if self.procs.live(slot, pid) {
                        if let Err(e) = sys::signal::send(pid, signal) {
                            warn!(generation = slot.generation, worker = slot.worker, pid, %signal, error = %e, "cannot signal the generation");
                        }
                        debug!(generation = slot.generation, worker = slot.worker, pid, %signal, "stop signal sent");
                    }
                }
                // After an exit the group was swept before reaping (see
                // `Children::reap`); once reaped, its id may belong to
                // someone else, so only a live worker's.
                Action::KillGroup { slot, pid } => {
                    if self.procs.live(slot, pid)
                        && let Err(e) = sys::signal::send_group(pid, Signal::KILL)
                    {
                        warn!(generation = slot.generation, worker = slot.worker, pid, error = %e, "cannot kill the process group");
                    }
                }
                Action::LameDuck { .. } => {
                    self.systemd.stopping();
                    self.procs.launch.lame_duck();
                }
                Action::Report { waiters, outcome } => self.report(waiters, &outcome),
                Action::Exit { code } => self.exit = Some(code),
            }
        }
        // A stop abandons an upgrade under way.
        if self.policy.is_stopping()
            && let Some(mut up) = self.upgrade.take()
            && let Some(pid) = up.stopping()
        {
            let _ = sys::signal::send_group(pid, Signal::KILL);
        }
    }

    /// A reload ended: its effects, then the answer to whoever asked.
    /// Why `/readyz` says no (`None`: ready to take traffic).
    fn not_ready(&self) -> Option<&'static str> {
        if self.policy.lame_duck().is_some() || self.policy.is_stopping() {
            Some("shutting down")
        } else if self.policy.serving().is_none() {
            Some("no generation serves")
        } else if self.cfg.listeners.iter().any(|l| l.broken_reported) {
            Some("a listener does not listen")
        } else {
            None
        }
    }

    fn report(&mut self, waiters: Vec<Waiter>, outcome: &Outcome) {
        let mut response = report::response(outcome);
        if let Outcome::RolledBack {
            reason: crate::error::RollbackReason::Reverted { .. },
            ..
        } = outcome
        {
            self.releases.reverted();
        }
        if let Outcome::Reloaded { generation, .. } = outcome
            && let Some(release) = self
                .policy
                .generations()
                .find(|g| g.id == *generation)
                .and_then(|g| g.release)
        {
            self.releases.served(release);
        }
        match (outcome, &mut response) {
            (
                Outcome::Reloaded {
                    generation,
                    ready_after,
                    ..
                },
                _,
            ) => {
                self.cut_over();
                self.procs.serving(&self.cfg, *generation);
                self.systemd.serving(*generation);
                self.observed.ready(*ready_after);
            }
            (
                Outcome::RolledBack {
                    serving, reason, ..
                },
                Response::RolledBack { message, .. },
            ) => {
                let hint = self
                    .failed_hint
                    .take()
                    .or_else(|| self.procs.reload_hint((*serving)?));
                if let Some(hint) = hint {
                    warn!("hint: {hint}");
                    message.push_str("; ");
                    message.push_str(&hint);
                }
                self.systemd.rolled_back(*serving, &reason.to_string());
            }
            _ => {}
        }
        for waiter in waiters {
            let _ = waiter.send(response.clone());
        }
    }

    /// Starts generation `generation` through the launch strategy, and
    /// reads its notifications.
    fn spawn(
        &mut self,
        generation: u64,
        pick: policy::Pick,
    ) -> std::io::Result<(generation::Route, u64)> {
        if self.procs.launch.shares_listeners() {
            self.check_listeners(None);
        }
        let release = match self.releases.kept(pick)? {
            Some(r) => r,
            None => self.resolve_command()?,
        };
        let mut route = None;
        for worker in 0..self.cfg.policy.workers.max(1) as u32 {
            match self.spawn_slot(Slot::new(generation, worker), &release) {
                Ok(r) => {
                    route.get_or_insert(r);
                }
                Err(e) => {
                    // The workers already started go: the generation failed.
                    for (_, pid) in self.procs.pids_of(generation) {
                        let _ = sys::signal::send_group(pid, Signal::KILL);
                    }
                    return Err(e);
                }
            }
        }
        let route = route.ok_or_else(|| std::io::Error::other("no workers"))?;
        Ok((route, release.info.id))
    }

    /// The command as it is now, as a release.
    fn resolve_command(&mut self) -> std::io::Result<release::Release> {
        self.releases.resolve(
            &self.cfg.program,
            &self.cfg.workdir,
            &self.cfg.args,
            self.cfg.base_env.len(),
            self.cfg.user.as_ref().map(|u| u.name.as_str()),
        )
    }

    /// Starts worker process `slot` of a live generation again (a
    /// replacement, or a `--max-rss` successor), from the release its
    /// generation runs (the command as it is now if that one is not kept).
    fn spawn_worker(&mut self, slot: Slot) -> std::io::Result<()> {
        let kept = self
            .policy
            .generations()
            .find(|g| g.id == slot.generation)
            .and_then(|g| g.release)
            .and_then(|id| self.releases.get(id))
            .filter(|r| release::check(r).is_ok())
            .cloned();
        let release = match kept {
            Some(r) => r,
            None => self.resolve_command()?,
        };
        self.spawn_slot(slot, &release)?;
        info!(
            generation = slot.generation,
            worker = slot.worker,
            "worker {} started again",
            slot.worker
        );
        Ok(())
    }

    /// Starts worker process `slot` from `release`, and tells the policy.
    fn spawn_slot(
        &mut self,
        slot: Slot,
        release: &release::Release,
    ) -> std::io::Result<generation::Route> {
        let record = self.procs.start(&self.cfg, slot, release)?;
        if let Some(h) = self.procs.handles.get(&slot) {
            self.orphans.keep(slot, h);
        }
        let route = record.route.unwrap_or(generation::Route::Sockets);
        self.policy.worker_spawned(slot, record);
        Ok(route)
    }

    /// Makes sure every listener still listens, where generations hold them
    /// (and may shut them down). `exited` is the generation that just
    /// exited, the likely culprit.
    fn check_listeners(&mut self, exited: Option<(u64, i32)>) {
        if !self.procs.launch.shares_listeners() {
            return;
        }
        let alive: Vec<(u64, i32)> = self
            .procs
            .handles
            .iter()
            .map(|(slot, h)| (slot.generation, h.pid))
            .collect();
        let checked = listeners::check(&mut self.cfg.listeners, exited, &alive);
        self.listener_rearms += checked.rearmed;
        if checked.replaced {
            self.procs.listener_inodes = processes::listener_inodes(&self.cfg);
            // A Unix socket was replaced: the serving generation holds the
            // dead one, and only a new generation can serve the new one.
            // (A TCP socket listens again for everyone: no reload, or an app
            // that shuts its listener at every exit would reload forever.)
            if self.policy.serving().is_some() && !self.policy.is_stopping() {
                self.trigger(Trigger::Listener, None);
            }
        }
    }

    /// Once a second: listeners, pressure summaries, metrics.
    fn housekeeping(&mut self) {
        self.check_listeners(None);
        self.procs.remind(&self.cfg, &self.policy, Instant::now());
        self.check_rss();
        self.releases.recheck();
        self.pressure.report(Instant::now());
        if self.pressure.should_trim() {
            let returned = sys::memory::trim();
            debug!(returned, "freed memory given back after connections closed");
        }
        if self.cfg.metrics.is_some() {
            self.observed.descriptors = sys::limits::open_descriptors().unwrap_or(0) as u64;
        }
    }

    /// `baton upgrade`: refuses at once what cannot be done, else starts
    /// the candidate's check.
    fn upgrade_begin(
        &mut self,
        conn: std::os::unix::net::UnixStream,
        binary: Option<std::path::PathBuf>,
        check_only: bool,
    ) {
        let binary = binary.unwrap_or_else(|| self.cfg.exe.clone());
        let mut up = upgrade::Upgrade::new(conn, binary, check_only, self.cfg.check_timeout);
        let started = if self.upgrade.is_some() {
            Err("an upgrade is already under way".to_owned())
        } else {
            let state = self.handover(None, up.nonce).map(|(state, _)| state);
            state.and_then(|state| {
                up.start_check(&state, &mut self.procs.children, &self.cfg.base_env)
            })
        };
        if let Some(up) = up.begun(started) {
            self.upgrade = Some(up);
        }
    }

    /// The candidate's check ended.
    fn upgrade_checked(&mut self, pid: i32, status: ExitStatus) {
        if let Some(up) = self.upgrade.as_mut() {
            let step = up.checked(pid, status);
            self.upgrade_step(step);
        }
    }

    /// What had to finish before an upgrade did, or not.
    fn upgrade_quiesced(&mut self, finished: bool) {
        if let Some(up) = self.upgrade.as_mut() {
            let step = up.quiesced(finished, self.cfg.policy.stop_timeout);
            if step == upgrade::Step::Over
                && let Err(e) = self.procs.launch.resume(&self.cfg)
            {
                warn!(error = %format!("{e:#}"), "the proxy could not serve again");
            }
            self.upgrade_step(step);
        }
    }

    /// Carries out an upgrade's next step.
    fn upgrade_step(&mut self, step: upgrade::Step) {
        match step {
            upgrade::Step::Wait => {}
            upgrade::Step::Over => self.upgrade = None,
            upgrade::Step::Exec => self.exec_pending = true,
            upgrade::Step::Quiesce => match self.procs.launch.quiesce() {
                None => self.exec_pending = true,
                Some(done) => {
                    info!("upgrade: waiting for client connections to finish; new ones wait");
                    let events = self.procs.events.clone();
                    let limit = self.cfg.policy.stop_timeout;
                    tokio::spawn(async move {
                        let finished = tokio::time::timeout(limit, done).await.is_ok();
                        let _ = events.send(Event::Quiesced(finished));
                    });
                }
            },
        }
    }

    /// Replaces this image with the checked binary. Returns only if that
    /// failed (the client is told, and baton goes on). Called by the loop
    /// with every signal blocked.
    fn upgrade_exec(&mut self) {
        let Some(mut up) = self.upgrade.take() else {
            return;
        };
        let failed = self
            .handover(Some((up.conn.as_raw_fd(), up.began)), up.nonce)
            .and_then(|(state, fds)| Err::<(), _>(up.exec(&state, fds, &self.cfg.argv)));
        if let Err(why) = failed {
            if let Err(e) = self.procs.launch.resume(&self.cfg) {
                warn!(error = %format!("{e:#}"), "the proxy could not serve again");
            }
            up.failed(&why);
        }
    }

    /// What the next image needs, and the descriptors it names. `reply` is
    /// the upgrade client's connection and when it asked.
    fn handover(
        &self,
        reply: Option<(std::os::fd::RawFd, Instant)>,
        nonce: u64,
    ) -> Result<(handover::Handover, Vec<std::os::fd::BorrowedFd<'_>>), String> {
        Ok(handover::build(handover::Parts {
            cfg: &self.cfg,
            policy: self.policy.snapshot()?,
            handles: &self.procs.handles,
            control_fd: self.control_fd.as_fd(),
            listener_rearms: self.listener_rearms,
            notify_rejected: self.procs.rejected.count(),
            upgrades: self.upgrades,
            started: self.started,
            reply,
            systemd_ready: self.systemd.is_ready(),
            keeper: self.orphans.keeper(),
            releases: &self.releases,
            nonce,
        }))
    }

    /// A worker process exited: its effects here, then the policy's
    /// decision (see [`Policy::worker_exited`]).
    fn worker_exited(&mut self, slot: Slot, exit: children::Exit) {
        let generation = slot.generation;
        if self.policy.state(generation) == Some(State::Starting)
            && self.procs.handles.contains_key(&slot)
        {
            self.failed_hint = self.procs.failure_hint(slot, exit.pid);
        }
        self.orphans.release(slot);
        if let Some(h) = self.procs.handles.remove(&slot) {
            self.observed.exited(exit.status);
            if let Some(at) = h.retired_at {
                self.observed
                    .drained(self.event_at.saturating_duration_since(at));
            }
        }
        self.check_listeners(Some((generation, exit.pid)));
        let actions = self.policy.worker_exited(self.event_at, slot, exit.status);
        self.cut_over();
        self.apply(actions);
    }

    /// `--max-rss`: a serving worker above the limit gets a successor; it
    /// is retired once the successor is ready.
    fn check_rss(&mut self) {
        let Some(limit) = self.cfg.max_rss else {
            return;
        };
        let Some(generation) = self.policy.serving() else {
            return;
        };
        let candidates: Vec<(Slot, i32)> = self
            .policy
            .generations()
            .filter(|g| g.id == generation)
            .flat_map(|g| g.processes.iter().filter(|p| p.serves()))
            .map(|p| (p.slot(generation), p.process.pid))
            .collect();
        for (slot, pid) in candidates {
            let Some(rss) = sys::inspect::rss(pid).filter(|&rss| rss > limit) else {
                continue;
            };
            let actions = self.policy.worker_too_big(slot);
            if actions.is_empty() {
                continue;
            }
            warn!(
                generation,
                worker = slot.worker,
                pid,
                rss_mb = rss >> 20,
                limit_mb = limit >> 20,
                "max-rss: worker {} uses {} MB, over the limit: starting its successor, then retiring it",
                slot.worker,
                rss >> 20
            );
            self.observed.rss_replacements += 1;
            self.apply(actions);
        }
    }

    /// Asks worker process `slot` to drain with `signal`: no new traffic,
    /// then the signal.
    fn retire_slot(&mut self, slot: Slot, signal: Signal) {
        let handover_us = self.event_at.elapsed().as_micros() as u64;
        self.cut_over();
        self.procs.drain(&self.cfg, slot, signal, handover_us);
    }
}
