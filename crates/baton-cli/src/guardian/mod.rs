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
pub mod diagnose;
pub mod event;
pub mod generation;
pub mod handover;
pub mod keeper;
pub mod launch;
mod listeners;
pub mod metrics;
mod notify;
pub mod orphans;
mod output;
pub mod policy;
mod pool;
mod pressure;
pub mod readiness;
pub mod release;
mod report;
pub mod running;
pub mod state;
mod systemd;
pub mod upgrade;
mod watch;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton::vars;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::config::RunConfig;
use crate::control::proto::{Request, Response};
use crate::control::server::ControlRequest;
use crate::exit::ExitStatus;
use crate::spec::{NotifyAccess, ReadyMode, Signal};
use crate::sys;
use crate::sys::notify_socket::{Datagram, Fields, NotifySocket};

use children::{Children, Owner};
pub use event::Event;
use generation::{Handles, Slot, State};
use launch::{Cx, Launch};
use policy::{Action, Outcome, Policy, SignalCause, Trigger};
use readiness::Source;

/// Whoever waits for a reload's (or a stop's) outcome.
type Waiter = oneshot::Sender<Response>;

/// The handles of `generation`'s worker processes that take traffic:
/// ready, and not being replaced.
fn serving_handles(handles: &BTreeMap<Slot, Handles>, generation: u64) -> Vec<&Handles> {
    handles
        .range(Slot::range(generation))
        .map(|(_, h)| h)
        .filter(|h| h.ready && !h.replaced)
        .collect()
}

/// Inodes of baton's listening sockets (to tell them from an app's own).
fn listener_inodes(cfg: &RunConfig) -> Arc<HashSet<u64>> {
    Arc::new(
        cfg.listeners
            .iter()
            .filter_map(|l| sys::inspect::inode(&l.fd))
            .collect(),
    )
}

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
    /// When the shutdown delay ends (`--shutdown-delay`), once a stop was
    /// asked for.
    shutdown_at: Option<Instant>,
    /// When this image took over.
    upgraded_at: Option<Instant>,
    /// The decisions, and the one map of generations' data.
    policy: Policy<Waiter>,
    /// How generations reach clients.
    launch: Box<dyn Launch>,
    /// Starting and reaping processes.
    children: Children,
    /// Each live worker process's runtime handles.
    handles: BTreeMap<Slot, Handles>,
    /// Each live generation's pool of workers (`--workers`).
    pools: BTreeMap<u64, pool::Pool>,
    /// The helper tasks' way to the loop.
    events: mpsc::UnboundedSender<Event>,
    /// Where the notify sockets' readers send what passed their checks.
    notify_tx: mpsc::Sender<(Slot, Datagram)>,
    /// Notifications the readers refused.
    rejected: Arc<pressure::Rejected>,
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
    /// The uid the app runs as: only it (or root) may notify.
    app_uid: u32,
    /// Inodes of baton's listening sockets.
    listener_inodes: Arc<HashSet<u64>>,
    /// `baton stop` clients, answered when baton has stopped.
    stop_waiters: Vec<Waiter>,
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
        if self.shutdown_at.is_some() {
            // Shutting down (--shutdown-delay): no new generation.
            info!(%trigger, "reload refused: baton is shutting down (--shutdown-delay)");
            if let Some(waiter) = waiter {
                let outcome = Outcome::RolledBack {
                    generation: None,
                    pid: None,
                    reason: crate::error::RollbackReason::Stopping,
                    serving: self.policy.serving(),
                };
                let _ = waiter.send(report::response(&outcome));
            }
            return;
        }
        let actions = self.policy.trigger(self.event_at, trigger, waiter);
        self.apply(actions);
    }

    /// A stop request (a signal, `baton stop`). With `--shutdown-delay`,
    /// the first one only turns `/readyz` to 503 and keeps serving for the
    /// delay (load balancers notice and move away); the stop proper
    /// follows, or at once on a second request.
    fn stop(&mut self, why: &str) {
        self.event_at = Instant::now();
        if let Some(delay) = self.cfg.shutdown_delay
            && !self.policy.is_stopping()
        {
            if self.shutdown_at.take().is_none() {
                self.shutdown_at = Some(crate::knobs::later(self.event_at, delay));
                info!(
                    reason = why,
                    delay_ms = delay.as_millis() as u64,
                    "shutdown: not ready any more (/readyz 503); serving on for {} before stopping",
                    humantime::format_duration(delay)
                );
                self.systemd.stopping();
                self.launch.lame_duck();
                return;
            }
            info!(
                reason = why,
                "stop requested again: the rest of the shutdown delay is skipped"
            );
        }
        self.stop_now(why);
    }

    /// Stops now: an upgrade under way is abandoned, generations with no
    /// process left are not waited for, and the policy stops the rest.
    fn stop_now(&mut self, why: &str) {
        if let Some(mut up) = self.upgrade.take()
            && let Some(pid) = up.stopping()
        {
            let _ = sys::signal::send_group(pid, Signal::KILL);
        }
        let idle: Vec<u64> = self
            .policy
            .generations()
            .map(|g| g.id)
            .filter(|&id| self.handles.range(Slot::range(id)).next().is_none())
            .collect();
        for id in idle {
            self.policy.no_processes(id);
        }
        let actions = self.policy.stop(self.event_at, why);
        self.apply(actions);
    }

    /// The earliest moment `tick` has something to do.
    fn next_deadline(&self) -> Option<Instant> {
        [
            self.policy.next_deadline(),
            self.shutdown_at,
            self.next_worker_restart(),
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
        if self.shutdown_at.is_some_and(|at| at <= now) {
            self.shutdown_at = None;
            info!("shutdown: the delay is over; stopping");
            self.stop_now("shutdown delay over");
            return;
        }
        self.restart_workers(now);
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
            .map(|g| g.id);
        if let Some(id) = timing_out
            && let Some((slot, handles)) =
                self.handles.range(Slot::range(id)).find(|(_, h)| !h.ready)
        {
            self.failed_hint = self.launch.failure_hint(*slot, handles.pid, handles);
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
        let mut first = None;
        for (slot, pid) in self.pids_of(generation) {
            match sys::signal::send(pid, signal) {
                Ok(()) => {
                    info!(generation, worker = slot.worker, pid, %signal, "forwarded");
                    first.get_or_insert((generation, pid));
                }
                Err(e) => {
                    warn!(generation, worker = slot.worker, pid, %signal, error = %e, "cannot forward the signal");
                }
            }
        }
        first
    }

    /// The live worker processes of `generation`, with their pids.
    fn pids_of(&self, generation: u64) -> Vec<(Slot, i32)> {
        self.handles
            .range(Slot::range(generation))
            .filter(|(_, h)| h.pid > 0)
            .map(|(s, h)| (*s, h.pid))
            .collect()
    }

    /// Tells the policy which processes `generation` has now.
    fn sync_processes(&mut self, generation: u64) {
        let processes: Vec<generation::Process> = self
            .handles
            .range(Slot::range(generation))
            .filter(|(_, h)| h.pid > 0)
            .map(|(_, h)| generation::Process {
                pid: h.pid,
                start_time: h.start_time,
            })
            .collect();
        self.policy.set_processes(generation, processes);
    }

    /// New traffic goes to the serving generation (or, while none serves,
    /// waits for one).
    fn cut_over(&mut self) {
        let serving = self
            .policy
            .serving()
            .map(|id| serving_handles(&self.handles, id))
            .unwrap_or_default();
        self.launch.cut_over(&serving);
    }

    /// Refreshes what `/metrics`, the launch strategy and systemd see.
    fn publish(&mut self) {
        self.cut_over();
        let bake = self.policy.baking().and_then(|(new, old)| {
            let g = self.policy.generations().find(|g| g.id == new)?;
            let total = self.cfg.policy.bake?;
            let elapsed = Instant::now().saturating_duration_since(g.state_since);
            Some(launch::Probation {
                new: serving_handles(&self.handles, new),
                old: old
                    .map(|o| serving_handles(&self.handles, o))
                    .unwrap_or_default(),
                progress: elapsed.as_secs_f64() / total.as_secs_f64().max(1e-9),
            })
        });
        self.launch.probation(bake, &self.events);
        if self.policy.is_stopping() {
            self.systemd.stopping();
            self.launch.stop();
        }
        let notify: Vec<state::Notify> = self
            .handles
            .iter()
            .filter_map(|(slot, h)| {
                Some(state::Notify {
                    generation: slot.generation,
                    worker: slot.worker,
                    incarnation: slot.incarnation,
                    pid: h.pid,
                    route: h.route,
                    address: h.notify.as_ref()?.1.clone(),
                })
            })
            .collect();
        self.orphans
            .record(&self.cfg, &self.policy.record(), &notify);
        let not_ready = self.not_ready();
        if let Ok(mut m) = self.metrics.lock() {
            m.not_ready = not_ready;
            m.observed.clone_from(&self.observed);
            m.notify_rejected = self.rejected.count();
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
                    notify_rejected: self.rejected.count(),
                    listener_rearms: self.listener_rearms,
                    upgrades: self.upgrades,
                    upgraded_at: self.upgraded_at,
                    keeper: self.orphans.keeper().map(|k| k.pid),
                    no_keeper: self.orphans.no_keeper(),
                    adopted_from: self.orphans.adopted_from,
                    releases: self.releases.describe(),
                    not_ready: self.not_ready(),
                    shutdown_at: self.shutdown_at,
                    workers: self.describe_workers(),
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
            Event::RunCheck(slot) => self.run_check(slot),
            Event::Drained(slot) => {
                if let Some(handles) = self.handles.get_mut(&slot) {
                    let pid = handles.pid;
                    self.launch.drained(slot, pid, handles);
                }
            }
            Event::Watched => self.trigger(Trigger::Watch, None),
            Event::Quiesced(done) => self.upgrade_quiesced(done),
            Event::Gone(pid) => {
                if let Some(exit) = self.children.gone(pid) {
                    self.exited(exit);
                }
            }
            Event::Worse { generation, why } => {
                if self.policy.baking().map(|(g, _)| g) == Some(generation) {
                    let actions = self.policy.revert(self.event_at, "error_rate", why);
                    self.apply(actions);
                }
            }
            Event::SelfBound { slot, addrs } => {
                if let Some(handles) = self.handles.get_mut(&slot) {
                    let pid = handles.pid;
                    if let Some(advice) = self.launch.self_bound(slot, pid, handles, &addrs) {
                        let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                        warn!(generation = slot.generation, worker = slot.worker, pid, addrs = %shown.join(","), "listens on its own port: {advice}");
                    }
                    handles.self_bound = addrs;
                }
            }
        }
    }

    /// A source of readiness passed for worker process `slot`: once its
    /// gate opens it is ready; once every worker of a starting generation
    /// is, the policy hears the generation is. A worker started to replace
    /// one (a crash, `--max-rss`) takes its place once ready.
    fn ready(&mut self, slot: Slot, source: Source) {
        let Some(handles) = self.handles.get_mut(&slot) else {
            return;
        };
        if !handles.gate.pass(source) {
            return;
        }
        handles.ready = true;
        let pid = handles.pid;
        let generation = slot.generation;
        match self.policy.state(generation) {
            Some(State::Starting) => {
                let all = self.handles.range(Slot::range(generation)).count();
                let ready = serving_handles(&self.handles, generation).len();
                if all == ready && all == self.cfg.workers {
                    let actions = self.policy.ready(self.event_at, generation);
                    self.apply(actions);
                } else if self.cfg.workers > 1 {
                    debug!(
                        generation,
                        worker = slot.worker,
                        pid,
                        ready,
                        of = self.cfg.workers,
                        "worker ready"
                    );
                }
            }
            Some(State::Serving | State::Baking | State::Ready) => {
                info!(
                    generation,
                    worker = slot.worker,
                    pid,
                    "worker ready: it takes its place"
                );
                // Its predecessors (a `--max-rss` replacement) retire now.
                let older: Vec<Slot> = self
                    .handles
                    .range(Slot::range(generation))
                    .filter(|(s, h)| {
                        s.worker == slot.worker && s.incarnation < slot.incarnation && !h.replaced
                    })
                    .map(|(s, _)| *s)
                    .collect();
                self.cut_over();
                for old in older {
                    self.retire_slot(old, self.cfg.policy.stop_signal);
                }
                self.sync_processes(generation);
            }
            _ => {}
        }
    }

    /// Reaps every exited child and routes each exit to its owner.
    fn reap(&mut self) {
        for exit in self.children.reap() {
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
                    self.check_done(slot, exit.pid, exit.status);
                }
                Some(Owner::UpgradeCheck) => {
                    // What it left behind (its group) goes with it.
                    let _ = sys::signal::send_group(exit.pid, Signal::KILL);
                    self.upgrade_checked(exit.pid, exit.status);
                }
                Some(Owner::Keeper) => {
                    let stopping = self.policy.is_stopping();
                    self.orphans
                        .keeper_exited(&self.cfg, &mut self.children, exit, stopping);
                    // A new keeper holds the live generations' output too.
                    for (id, h) in &self.handles {
                        if let Some(readers) = &h.log_readers {
                            self.orphans.hold(*id, readers);
                        }
                    }
                }
                None => {}
            }
        }
    }

    fn notified(&mut self, slot: Slot, datagram: Datagram) {
        let generation = slot.generation;
        let Some(handles) = self.handles.get_mut(&slot) else {
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
                    Ok((process, route, release)) => {
                        self.policy.spawned(generation, process, route, release);
                        self.sync_processes(generation);
                        if self.policy.serving().is_some() {
                            self.systemd.reloading(generation);
                        }
                    }
                    Err(e) => {
                        let now = Instant::now();
                        queue.extend(self.policy.spawn_failed(now, generation, &e));
                    }
                },
                Action::Signal {
                    generation,
                    signal,
                    cause: SignalCause::Retire,
                    ..
                } => self.retire(generation, signal),
                Action::Signal {
                    generation,
                    signal,
                    cause: SignalCause::Stop,
                    ..
                } => {
                    for (slot, pid) in self.pids_of(generation) {
                        if let Err(e) = sys::signal::send(pid, signal) {
                            warn!(generation, worker = slot.worker, pid, %signal, error = %e, "cannot signal the generation");
                        }
                        debug!(generation, worker = slot.worker, pid, %signal, "stop signal sent");
                    }
                }
                // Each worker's process group. After an exit the group was
                // swept before reaping (see `Children::reap`); once reaped,
                // its id may belong to someone else, so only live workers'.
                Action::KillGroup { generation, .. } => {
                    for (slot, pid) in self.pids_of(generation) {
                        if let Err(e) = sys::signal::send_group(pid, Signal::KILL) {
                            warn!(generation, worker = slot.worker, pid, error = %e, "cannot kill the process group");
                        }
                    }
                }
                Action::Report { waiters, outcome } => self.report(waiters, &outcome),
                Action::Exit { code } => self.exit = Some(code),
            }
        }
    }

    /// Generation `generation` was retired by its successor: the successor
    /// takes the traffic first, then each of the old one's workers is asked
    /// to drain.
    fn retire(&mut self, generation: u64, signal: Signal) {
        self.cut_over();
        for (slot, _) in self.pids_of(generation) {
            self.retire_slot(slot, signal);
        }
    }

    /// A reload ended: its effects, then the answer to whoever asked.
    /// Why `/readyz` says no (`None`: ready to take traffic).
    fn not_ready(&self) -> Option<&'static str> {
        if self.shutdown_at.is_some() || self.policy.is_stopping() {
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
                let inherited = Arc::clone(&self.listener_inodes);
                for (slot, pid) in self.pids_of(*generation) {
                    let cx = Cx {
                        cfg: &self.cfg,
                        children: &mut self.children,
                        events: &self.events,
                    };
                    self.launch.serving(cx, slot, pid, &inherited);
                }
                self.systemd.serving(*generation);
                self.observed.ready(*ready_after);
            }
            (
                Outcome::RolledBack {
                    serving, reason, ..
                },
                Response::RolledBack { message, .. },
            ) => {
                let hint = self.failed_hint.take().or_else(|| {
                    let serving = (*serving)?;
                    let (slot, handles) = self.handles.range(Slot::range(serving)).next()?;
                    self.launch.reload_hint(*slot, handles.pid, handles)
                });
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
    ) -> std::io::Result<(generation::Process, generation::Route, u64)> {
        if self.launch.shares_listeners() {
            self.check_listeners(None);
        }
        let kept = match pick {
            policy::Pick::Command => None,
            policy::Pick::Previous => Some(self.releases.previous().cloned().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "no previous release is kept")
            })?),
            policy::Pick::Current => match self.releases.current() {
                Some(r) => match release::check(r) {
                    Ok(()) => Some(r.clone()),
                    Err(why) => {
                        warn!(
                            "the release that last served cannot be run as it ran ({why}); starting the command as it is now"
                        );
                        None
                    }
                },
                None => None,
            },
        };
        let release = match kept {
            Some(r) => r,
            None => self.releases.resolve(
                &self.cfg.program,
                &self.cfg.workdir,
                &self.cfg.args,
                self.cfg.base_env.len(),
                self.cfg.user.as_ref().map(|u| u.name.as_str()),
            )?,
        };
        if pick == policy::Pick::Previous {
            info!(
                generation,
                release = release.info.id,
                program = %release.info.program.display(),
                hash = %release.describe().hash.unwrap_or_default(),
                cwd = %release.info.cwd.display(),
                "starting the previous release"
            );
        }
        let mut first = None;
        for worker in 0..self.cfg.workers as u32 {
            match self.spawn_slot(Slot::new(generation, worker), &release) {
                Ok(spawned) => {
                    first.get_or_insert(spawned);
                }
                Err(e) => {
                    // The workers already started go: the generation failed.
                    for (_, pid) in self.pids_of(generation) {
                        let _ = sys::signal::send_group(pid, Signal::KILL);
                    }
                    return Err(e);
                }
            }
        }
        self.pools.insert(
            generation,
            pool::Pool::new(self.cfg.workers, Some(release.clone())),
        );
        let (process, route) = first.ok_or_else(|| std::io::Error::other("no workers"))?;
        Ok((process, route, release.info.id))
    }

    /// Starts worker process `slot` from `release` through the launch
    /// strategy, and reads its notifications.
    fn spawn_slot(
        &mut self,
        slot: Slot,
        release: &release::Release,
    ) -> std::io::Result<(generation::Process, generation::Route)> {
        let cx = Cx {
            cfg: &self.cfg,
            children: &mut self.children,
            events: &self.events,
        };
        let launched = self.launch.launch(cx, slot, release)?;
        let mut handles = launched.handles;
        handles.pid = launched.process.pid;
        handles.start_time = launched.process.start_time;
        handles.started_at = Some(Instant::now());
        handles.route = Some(launched.route);
        handles.notify = launched
            .notify
            .dup()
            .ok()
            .map(|fd| (fd, launched.notify.address.clone()));
        handles
            .tasks
            .push(self.read_notifications(slot, launched.process.pid, launched.notify));
        if let Some(readers) = &handles.log_readers {
            self.orphans.hold(slot, readers);
        }
        self.handles.insert(slot, handles);
        Ok((launched.process, launched.route))
    }

    /// Passes `slot`'s notifications to the loop (see `notify`).
    fn read_notifications(&self, slot: Slot, pid: i32, socket: NotifySocket) -> AbortHandle {
        let filter = notify::Filter {
            app_uid: self.app_uid,
            main_only: self.cfg.notify_access == NotifyAccess::Main,
            pid,
        };
        notify::read(
            slot,
            socket,
            filter,
            self.notify_tx.clone(),
            Arc::clone(&self.rejected),
        )
    }

    /// Runs the `--ready exec:` command for a starting worker process.
    fn run_check(&mut self, slot: Slot) {
        let ReadyMode::Exec(command) = &self.cfg.ready else {
            return;
        };
        let Some(handles) = self.handles.get(&slot) else {
            return;
        };
        if handles.ready || handles.pid <= 0 {
            return;
        }
        let pid = handles.pid;
        let mut env = self.cfg.base_env.clone();
        env.push((
            vars::BATON_GENERATION.into(),
            slot.generation.to_string().into(),
        ));
        env.push(("BATON_WORKER".into(), slot.worker.to_string().into()));
        env.push(("BATON_PID".into(), pid.to_string().into()));
        let spawned = self.children.start_check(slot, command, &env);
        let Some(handles) = self.handles.get_mut(&slot) else {
            return;
        };
        match spawned {
            Ok(check) => handles.check = Some(check),
            Err(e) => {
                warn!(generation = slot.generation, worker = slot.worker, error = %e, "cannot run the readiness check; trying again");
                handles.tasks.push(readiness::after(
                    readiness::CHECK_INTERVAL,
                    self.events.clone(),
                    Event::RunCheck(slot),
                ));
            }
        }
    }

    fn check_done(&mut self, slot: Slot, pid: i32, status: ExitStatus) {
        let Some(handles) = self.handles.get_mut(&slot) else {
            return;
        };
        if handles.check == Some(pid) {
            handles.check = None;
        }
        if status.success() {
            self.ready(slot, Source::Exec);
        } else if !handles.ready {
            debug!(
                generation = slot.generation,
                worker = slot.worker,
                status = %status.word(),
                "the readiness check failed; trying again"
            );
            handles.tasks.push(readiness::after(
                readiness::CHECK_INTERVAL,
                self.events.clone(),
                Event::RunCheck(slot),
            ));
        }
    }

    /// Makes sure every listener still listens, where generations hold them
    /// (and may shut them down). `exited` is the generation that just
    /// exited, the likely culprit.
    fn check_listeners(&mut self, exited: Option<(u64, i32)>) {
        if !self.launch.shares_listeners() {
            return;
        }
        let alive: Vec<(u64, i32)> = self
            .handles
            .iter()
            .map(|(slot, h)| (slot.generation, h.pid))
            .collect();
        let checked = listeners::check(&mut self.cfg.listeners, exited, &alive);
        self.listener_rearms += checked.rearmed;
        if checked.replaced {
            self.listener_inodes = listener_inodes(&self.cfg);
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
        let mut up = upgrade::Upgrade {
            conn,
            binary: binary.unwrap_or_else(|| self.cfg.exe.clone()),
            check_only,
            check: None,
            version: None,
            began: Instant::now(),
            nonce: upgrade::nonce(),
            check_deadline: crate::knobs::later(Instant::now(), self.cfg.check_timeout),
        };
        let started = (|| {
            if self.upgrade.is_some() {
                return Err("an upgrade is already under way".to_owned());
            }
            up.binary = upgrade::candidate(&up.binary)?;
            let (state, _) = self.handover(None, up.nonce)?;
            let json = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
            let memfd = sys::exec::memfd("baton-handover", &json).map_err(|e| e.to_string())?;
            let (answer, answer_tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| e.to_string())?;
            let args: Vec<std::ffi::OsString> = vec![
                up.binary.clone().into(),
                "upgrade-check".into(),
                "--state-fd".into(),
                "3".into(),
                "--answer-fd".into(),
                "4".into(),
            ];
            let pid = self
                .children
                .start_helper(
                    Owner::UpgradeCheck,
                    &up.binary,
                    &args,
                    &self.cfg.base_env,
                    &[memfd.as_fd(), answer_tx.as_fd()],
                )
                .map_err(|e| format!("{} could not be started: {e}", up.binary.display()))?;
            up.check = Some((pid, answer));
            Ok(())
        })();
        match started {
            Ok(()) => {
                info!(binary = %up.binary.display(), "upgrade: checking the new binary");
                self.upgrade = Some(up);
            }
            Err(why) => {
                warn!(binary = %up.binary.display(), "upgrade refused: {why}");
                up.answer(&Response::Error {
                    message: format!("upgrade refused: {why}; baton goes on unchanged"),
                });
            }
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
                && let Err(e) = self.launch.resume(&self.cfg)
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
            upgrade::Step::Quiesce => match self.launch.quiesce() {
                None => self.exec_pending = true,
                Some(done) => {
                    info!("upgrade: waiting for client connections to finish; new ones wait");
                    let events = self.events.clone();
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
        let failed = (|| -> Result<(), String> {
            let (state, fds) = self.handover(Some((up.conn.as_raw_fd(), up.began)), up.nonce)?;
            let json = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
            let memfd = sys::exec::memfd("baton-handover", &json).map_err(|e| e.to_string())?;
            let mut keep = fds;
            keep.push(memfd.as_fd());
            keep.push(up.conn.as_fd());
            upgrade::set_inheritable(&keep, true).map_err(|e| e.to_string())?;
            let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
                .filter(|(k, _)| k != handover::ENV)
                .collect();
            env.push((handover::ENV.into(), memfd.as_raw_fd().to_string().into()));
            info!(
                binary = %up.binary.display(),
                to = up.version.as_deref().unwrap_or("?"),
                "upgrade: handing over"
            );
            let error = sys::exec::exec(&up.binary, &self.cfg.argv, &env);
            let _ = upgrade::set_inheritable(&keep, false);
            Err(format!("execve of {} failed: {error}", up.binary.display()))
        })();
        if let Err(why) = failed {
            if let Err(e) = self.launch.resume(&self.cfg) {
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
        if self.shutdown_at.is_some() {
            return Err("baton is shutting down (--shutdown-delay)".to_owned());
        }
        Ok(handover::build(handover::Parts {
            cfg: &self.cfg,
            policy: self.policy.snapshot()?,
            handles: &self.handles,
            control_fd: self.control_fd.as_fd(),
            listener_rearms: self.listener_rearms,
            notify_rejected: self.rejected.count(),
            upgrades: self.upgrades,
            started: self.started,
            reply,
            systemd_ready: self.systemd.is_ready(),
            keeper: self.orphans.keeper(),
            releases: &self.releases,
            nonce,
        }))
    }

    /// The new image's first steps after `baton upgrade`: the previous
    /// image's generations are ours (their processes are still this pid's
    /// children), their notification sockets and output pipes are read
    /// again, and the client is told.
    fn resume(&mut self, h: handover::Handover) {
        let mut releases = Vec::new();
        for (info, fd) in &h.releases {
            match sys::exec::take_fd(*fd) {
                Ok(exe) => releases.push(release::Release::handed_over(info.clone(), exe)),
                Err(e) => warn!(release = info.id, error = %e, "a release was not handed over"),
            }
        }
        let served = h.releases_served.min(releases.len());
        self.releases = release::Releases::restore(releases, served, h.release_next_id);
        if let Some(k) = h.keeper {
            self.children.adopt(k.pid, Owner::Keeper);
        }
        let routes: BTreeMap<u64, (generation::Route, Option<u64>)> = self
            .policy
            .generations()
            .map(|g| (g.id, (g.route, g.release)))
            .collect();
        let now = Instant::now();
        for fds in &h.generations {
            let slot = fds.slot;
            let Some(&(route, release)) = routes.get(&slot.generation) else {
                continue;
            };
            let pid = fds.process.pid;
            self.children.adopt(pid, Owner::Generation(slot));
            let pool = self.pools.entry(slot.generation).or_insert_with(|| {
                pool::Pool::new(
                    self.cfg.workers,
                    release.and_then(|r| self.releases.get(r).cloned()),
                )
            });
            pool::Pool::note_incarnation(pool, slot);
            let mut handles = Handles::running(fds.process, fds.ready, fds.route, now);
            handles.replaced = fds.replaced;
            let route = fds.route.unwrap_or(route);
            handles.self_bound = fds.self_bound.clone();
            if let Some((fd, address)) = &fds.notify {
                match sys::exec::take_fd(*fd)
                    .and_then(|fd| NotifySocket::from_fd(fd, address.clone()))
                {
                    Ok(socket) => {
                        handles.notify = socket.dup().ok().map(|d| (d, address.clone()));
                        handles
                            .tasks
                            .push(self.read_notifications(slot, pid, socket));
                    }
                    Err(e) => {
                        warn!(generation = %slot, error = %e, "its notification socket was not handed over")
                    }
                }
            }
            if let Some((out, err)) = fds.log_readers {
                let taken = sys::exec::take_fd(out).and_then(|o| Ok((o, sys::exec::take_fd(err)?)));
                match taken {
                    Ok((out, err)) => {
                        handles.log_readers =
                            out.try_clone().and_then(|o| Ok((o, err.try_clone()?))).ok();
                        if let Err(e) = output::resume(&self.cfg.name, slot, out, err) {
                            warn!(generation = %slot, error = %e, "its output cannot be copied");
                        }
                    }
                    Err(e) => {
                        warn!(generation = %slot, error = %e, "its output pipes were not handed over")
                    }
                }
            }
            let cx = Cx {
                cfg: &self.cfg,
                children: &mut self.children,
                events: &self.events,
            };
            self.launch.adopt(cx, slot, route, &mut handles);
            self.handles.insert(slot, handles);
        }
        // A worker whose replacement was pending starts again now.
        if let Some(serving) = self.policy.serving() {
            let live: HashSet<u32> = self
                .handles
                .range(Slot::range(serving))
                .map(|(s, _)| s.worker)
                .collect();
            if let Some(pool) = self.pools.get_mut(&serving) {
                for (i, w) in pool.workers.iter_mut().enumerate() {
                    if !live.contains(&(i as u32)) && !w.down {
                        w.restart_at = Some(now);
                    }
                }
            }
        }
        self.cut_over();
        let took_ms =
            sys::clock::monotonic_ns(Instant::now()).saturating_sub(h.upgrade_began_ns) / 1_000_000;
        info!(
            from = %h.from,
            to = handover::baton_version(),
            upgrades = h.upgrades,
            took_ms,
            generations = self.handles.len(),
            "upgraded: this image took over"
        );
        if let Some(fd) = h.reply_fd {
            match sys::exec::take_fd(fd) {
                Ok(fd) => {
                    let mut conn = std::os::unix::net::UnixStream::from(fd);
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
                    let answer = Response::Upgraded {
                        from: h.from.clone(),
                        to: handover::baton_version().to_owned(),
                        pid: std::process::id(),
                        took_ms,
                    };
                    if let Ok(mut line) = serde_json::to_string(&answer) {
                        line.push('\n');
                        let _ = std::io::Write::write_all(&mut conn, line.as_bytes());
                    }
                }
                Err(e) => warn!(error = %e, "the upgrade's client connection was not handed over"),
            }
        }
        // The signals blocked for the exec: what arrived meanwhile is
        // delivered now, to the handlers installed above.
        sys::exec::unblock_signals();
        self.reap();
    }
}
