//! `baton run`: the guardian. One event loop owns all state and carries out
//! what [`policy::Policy`] decides.
//!
//! Theory of operation: baton binds the listeners once and never closes them
//! while it runs. Each generation of the app inherits them as fds 3, 4, …
//! (`sd_listen_fds(3)`), and gets a notification socket of its own
//! (`sd_notify(3)`). A reload starts generation N+1 next to N; only when N+1
//! says it is ready is N asked to drain and exit. Connections that arrive in
//! between wait in the kernel's accept queue and are accepted by whichever
//! generation is accepting, so none is refused. If N+1 fails, it is killed
//! and N serves on, untouched.
//!
//! The loop (`Guardian::run`) waits on: signals (HUP/USR2 reload, TERM/INT
//! stop, QUIT/USR1/WINCH forwarded to the serving generation), SIGCHLD (the
//! one reaper), control requests, notification datagrams, readiness checks
//! and file watches (from helper tasks, which only send messages), and the
//! policy's next deadline. It runs on a single-threaded runtime, which keeps
//! `fork` simple and ordering obvious.

pub mod metrics;
mod output;
pub mod policy;
mod pressure;
mod ready;
mod upstream;
mod watch;

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use baton::vars;
use tokio::signal::unix::{Signal as SignalStream, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::cli::NotifyAccess;
use crate::config::{ListenerCheck, RunConfig};
use crate::control::proto::{
    ConnectionsInfo, GenerationInfo, Guard, ListenerInfo, Request, Response, Status,
};
use crate::control::server::ControlRequest;
use crate::exit::ExitStatus;
use crate::spec::{ReadyMode, Signal};
use crate::sys;
use crate::sys::notify_socket::{Datagram, Fields, NotifySocket};

use policy::{Action, Outcome, Phase, Policy, SignalCause, Trigger};

/// Whoever waits for a reload's outcome.
type Waiter = oneshot::Sender<Response>;

/// Messages from helper tasks to the loop.
#[derive(Debug)]
enum Event {
    /// A datagram arrived on a generation's notification socket.
    Notify { generation: u64, datagram: Datagram },
    /// `--ready delay:` elapsed for a generation.
    DelayElapsed(u64),
    /// Time to run (again) the `--ready exec:` check of a generation.
    RunCheck(u64),
    /// A ready generation listens on these TCP addresses by itself.
    SelfBound {
        generation: u64,
        addrs: Vec<std::net::SocketAddr>,
    },
    /// The `--watch` file was replaced.
    Watched,
    /// Proxy mode: a generation passed its health check.
    Healthy(u64),
    /// Proxy mode: nothing is in flight any more to a retired generation.
    Drained(u64),
}

/// Who a child pid is.
#[derive(Debug, Clone, Copy)]
enum Owner {
    Generation(u64),
    Check(u64),
}

/// Resources of a live generation that the loop must release.
#[derive(Debug, Default)]
struct Live {
    pid: i32,
    tasks: Vec<AbortHandle>,
    check: Option<i32>,
    /// Ports it listens on by itself (not baton's sockets), once known.
    self_bound: Vec<std::net::SocketAddr>,
    /// When it was asked to stop after its successor became ready.
    retired_at: Option<Instant>,
    /// Proxy mode: how the proxy reaches it.
    upstream: Option<std::sync::Arc<crate::proxy::Upstream>>,
    /// Proxy mode: the stop signal held back until its traffic drained.
    pending_stop: Option<Signal>,
    /// Proxy mode: it passed its health check.
    healthy: bool,
    /// It sent READY=1.
    notified: bool,
    /// Its last `STATUS=`.
    status: Option<String>,
}

impl Drop for Live {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(check) = self.check {
            let _ = sys::signal::send_group(check, Signal::KILL);
        }
    }
}

/// Runs the guardian until every generation is gone after a stop (or the
/// first generation never became ready), and returns baton's exit code.
pub async fn run(cfg: RunConfig) -> anyhow::Result<ExitCode> {
    let mut signals = Signals::new().context("installing signal handlers")?;
    if let Err(e) = sys::reaper::become_subreaper() {
        warn!(error = %e, "cannot become a child subreaper; orphans of the app will go to init");
    }
    let control = cfg
        .control
        .listener
        .try_clone()
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        })
        .context("registering the control socket")?;
    let (control_tx, mut control_rx) = mpsc::unbounded_channel();
    let control_connections =
        baton::serve::Connections::new(crate::control::server::MAX_CONNECTIONS);
    let control_task = tokio::spawn(crate::control::server::serve(
        control,
        control_tx,
        std::sync::Arc::clone(&control_connections),
    ));
    info!(
        soft = cfg.nofile.soft,
        hard = cfg.nofile.hard,
        app_soft = cfg.nofile.original_soft,
        "descriptors"
    );

    for (i, l) in cfg.listeners.iter().enumerate() {
        info!(addr = %l.local, name = %l.name, fd = vars::LISTEN_FDS_START + i as i32, "listening");
    }
    info!(path = %cfg.control.path.display(), name = %cfg.name, pid = std::process::id(), "control");

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let metrics = metrics::Shared::default();
    let metrics_task = cfg
        .metrics
        .as_ref()
        .map(|listener| {
            let listener = listener.try_clone().context("the metrics listener")?;
            if let Ok(addr) = listener.local_addr() {
                info!(addr = %addr, "metrics");
            }
            anyhow::Ok(tokio::spawn(metrics::serve(
                listener,
                std::sync::Arc::clone(&metrics),
            )))
        })
        .transpose()?;
    let watch_task = cfg
        .watch
        .clone()
        .map(|path| watch::spawn(path, events_tx.clone(), || Event::Watched));
    let ids = cfg.user.as_ref().map(|u| sys::spawn::Ids {
        uid: u.uid,
        gid: u.gid,
        groups: u.groups.clone(),
    });
    let app_uid = cfg
        .user
        .as_ref()
        .map_or_else(|| rustix::process::geteuid().as_raw(), |u| u.uid);
    let proxy = match &cfg.proxy {
        None => None,
        Some(p) => {
            let shared = crate::proxy::Proxy::new(cfg.policy.ready_timeout, p.limits.clone());
            let fds = cfg
                .listeners
                .iter()
                .map(|l| Ok((l.fd.try_clone()?, l.local.starts_with("unix:"))))
                .collect::<std::io::Result<Vec<_>>>()
                .context("duplicating the listeners for the proxy")?;
            let handle =
                crate::proxy::start(p.mode, fds, std::sync::Arc::clone(&shared), p.threads)
                    .context("starting the proxy")?;
            let serve = &p.limits.serve;
            info!(
                mode = ?p.mode,
                port_env = %p.port_env,
                max_connections = serve.connections.max(),
                header_timeout_ms = serve.header_timeout.map_or(0, |d| d.as_millis() as u64),
                idle_timeout_ms = serve.idle_timeout.map_or(0, |d| d.as_millis() as u64),
                upstream_timeout_ms = p.limits.upstream_timeout.as_millis() as u64,
                "proxy"
            );
            Some((shared, handle))
        }
    };
    let now = Instant::now();
    let listener_inodes = std::sync::Arc::new(
        cfg.listeners
            .iter()
            .filter_map(|l| sys::inspect::inode(&l.fd))
            .collect(),
    );
    let rejected = std::sync::Arc::new(pressure::Rejected::default());
    let mut caps = vec![("control", std::sync::Arc::clone(&control_connections))];
    if let Some((shared, _)) = &proxy {
        caps.push(("proxy", std::sync::Arc::clone(shared.connections())));
    }
    let pressure = pressure::Pressure::new(std::sync::Arc::clone(&rejected), caps);
    if let Ok(mut m) = metrics.lock() {
        m.control = Some(control_connections);
        m.nofile_limit = cfg.nofile.soft;
    }
    let (notify_tx, mut notify_rx) = mpsc::channel(NOTIFY_QUEUE);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut g = Guardian {
        proxy,
        notify_tx,
        rejected,
        pressure,
        status_log: pressure::Throttle::new(20, pressure::INTERVAL),
        listener_rearms: 0,
        failed_hint: None,
        listener_inodes,
        metrics,
        upstream: upstream::Upstream::default(),
        ids,
        app_uid,
        policy: Policy::new(cfg.policy.clone()),
        cfg,
        pids: HashMap::new(),
        live: HashMap::new(),
        events: events_tx,
        started: now,
        event_at: now,
        exit: None,
    };
    // Children that exited before the handler was installed are reaped on
    // the first SIGCHLD or here.
    g.reap();
    let start = g.policy.start(now);
    g.apply(start);

    while g.exit.is_none() {
        let deadline = g.policy.next_deadline();
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signals.chld.recv() => g.reap(),
            _ = signals.hup.recv() => g.trigger(Trigger::Signal(Signal::HUP), None),
            _ = signals.usr2.recv() => g.trigger(Trigger::Signal(Signal::USR2), None),
            _ = signals.term.recv() => g.stop("SIGTERM"),
            _ = signals.int.recv() => g.stop("SIGINT"),
            _ = signals.quit.recv() => { g.forward(Signal::QUIT); }
            _ = signals.usr1.recv() => { g.forward(Signal::USR1); }
            _ = signals.winch.recv() => { g.forward(Signal::WINCH); }
            Some(req) = control_rx.recv() => g.control(req),
            Some(event) = events.recv() => g.event(event),
            Some((generation, datagram)) = notify_rx.recv() => {
                g.event(Event::Notify { generation, datagram });
            }
            _ = housekeeping.tick() => g.housekeeping(),
            () = sleep => {
                g.event_at = Instant::now();
                g.stash_proxy_hints();
                let actions = g.policy.tick(g.event_at);
                g.apply(actions);
            }
        }
        g.publish();
    }
    control_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    if let Some(task) = watch_task {
        task.abort();
    }
    let code = g.exit.unwrap_or(1);
    info!(code, "stopped");
    Ok(ExitCode::from(code))
}

/// The signal streams the loop waits on. Installed before the first spawn so
/// that no SIGCHLD (or stop request) is missed.
struct Signals {
    chld: SignalStream,
    hup: SignalStream,
    usr2: SignalStream,
    term: SignalStream,
    int: SignalStream,
    quit: SignalStream,
    usr1: SignalStream,
    winch: SignalStream,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            chld: signal(SignalKind::child())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            usr1: signal(SignalKind::user_defined1())?,
            winch: signal(SignalKind::window_change())?,
        })
    }
}

/// Who may speak for a generation on its notify socket. Checked by the
/// socket's reader, so that a flood from elsewhere never reaches the loop.
#[derive(Debug, Clone, Copy)]
struct NotifyFilter {
    /// The uid the app runs as.
    app_uid: u32,
    /// `--notify-access main`.
    main_only: bool,
    /// The generation's main process.
    pid: i32,
}

impl NotifyFilter {
    fn check(&self, datagram: &Datagram) -> Result<(), &'static str> {
        // Anyone on the machine can find an abstract socket: only the app's
        // own user (or root) may speak for a generation.
        if !matches!(datagram.uid, Some(uid) if uid == self.app_uid || uid == 0) {
            return Err("from another user");
        }
        if self.main_only && datagram.pid != Some(self.pid) {
            return Err(
                "from a process other than the generation's main one (--notify-access main)",
            );
        }
        Ok(())
    }
}

/// How often the guardian looks at its listeners and reports pressure.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// Notifications queued from the sockets' readers to the loop, at most; a
/// reader waits (and the datagrams wait in its socket) beyond that.
const NOTIFY_QUEUE: usize = 256;

struct Guardian {
    /// Proxy mode: the shared current generation, and the proxy's thread.
    proxy: Option<(std::sync::Arc<crate::proxy::Proxy>, crate::proxy::Handle)>,
    /// Where the notify sockets' readers send what passed their checks.
    notify_tx: mpsc::Sender<(u64, Datagram)>,
    /// Notifications the readers refused.
    rejected: std::sync::Arc<pressure::Rejected>,
    /// Summaries of what caps and filters turned away.
    pressure: pressure::Pressure,
    /// `STATUS=` lines logged, at most so many per interval.
    status_log: pressure::Throttle,
    /// Listeners found shut down and re-armed.
    listener_rearms: u64,
    /// Proxy mode: why the last generation that failed its check failed.
    failed_hint: Option<String>,
    /// The `/metrics` snapshot.
    metrics: metrics::Shared,
    /// What systemd (if it runs baton) has been told.
    upstream: upstream::Upstream,
    /// `--user`, as ids for the child.
    ids: Option<sys::spawn::Ids>,
    /// The uid the app runs as: only it (or root) may notify.
    app_uid: u32,
    /// Inodes of baton's listening sockets.
    listener_inodes: std::sync::Arc<std::collections::HashSet<u64>>,
    cfg: RunConfig,
    policy: Policy<Waiter>,
    pids: HashMap<i32, Owner>,
    live: HashMap<u64, Live>,
    events: mpsc::UnboundedSender<Event>,
    started: Instant,
    /// When the event being handled arrived: baton's own latency (trigger to
    /// exec, ready to stop signal) is measured from here.
    event_at: Instant,
    exit: Option<u8>,
}

impl Guardian {
    fn trigger(&mut self, trigger: Trigger, waiter: Option<Waiter>) {
        self.event_at = Instant::now();
        let actions = self.policy.trigger(self.event_at, trigger, waiter);
        self.apply(actions);
    }

    fn stop(&mut self, why: &str) {
        self.event_at = Instant::now();
        let actions = self.policy.stop(self.event_at, why);
        self.apply(actions);
    }

    /// Passes `signal` on to the serving generation (PID 1 duty, and
    /// `baton signal`). Returns the generation and pid it went to.
    fn forward(&mut self, signal: Signal) -> Option<(u64, i32)> {
        let Some(generation) = self.policy.serving() else {
            warn!(%signal, "no generation is serving; signal not forwarded");
            return None;
        };
        let pid = self.live.get(&generation)?.pid;
        match sys::signal::send(pid, signal) {
            Ok(()) => {
                info!(generation, pid, %signal, "forwarded");
                Some((generation, pid))
            }
            Err(e) => {
                warn!(generation, pid, %signal, error = %e, "cannot forward signal");
                None
            }
        }
    }

    /// Proxy mode: new traffic goes to the serving generation (or, while
    /// none serves, waits for one).
    fn sync_proxy(&self) {
        let Some((proxy, _)) = &self.proxy else {
            return;
        };
        let desired = self
            .policy
            .serving()
            .and_then(|g| self.live.get(&g))
            .and_then(|l| l.upstream.clone());
        let current = proxy.current();
        let same = match (&desired, &current) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            if let Some(up) = &desired {
                info!(generation = up.generation, addr = %up.addr, "switch");
            }
            proxy.switch(desired);
        }
    }

    /// Proxy mode: a retired generation's traffic is done; stop it now.
    fn drained(&mut self, generation: u64) {
        let Some(live) = self.live.get_mut(&generation) else {
            return;
        };
        let Some(signal) = live.pending_stop.take() else {
            return;
        };
        let pid = live.pid;
        let waited = live
            .retired_at
            .map_or(0, |t| t.elapsed().as_millis() as u64);
        let in_flight = live.upstream.as_ref().map_or(0, |u| u.active());
        if let Err(e) = sys::signal::send(pid, signal) {
            warn!(generation, pid, %signal, error = %e, "cannot signal generation");
        }
        if in_flight == 0 {
            info!(generation, pid, %signal, drained_after_ms = waited, "retire: its proxied traffic is done");
        } else {
            warn!(generation, pid, %signal, in_flight, waited_ms = waited,
                "retire: still busy at half the stop timeout; sending the stop signal anyway");
        }
    }

    /// Refreshes what `/metrics`, the proxy and systemd see.
    fn publish(&mut self) {
        self.sync_proxy();
        if self.policy.is_stopping() {
            self.upstream.stopping();
            if let Some((_, handle)) = &self.proxy {
                handle.stop();
            }
        }
        if let Ok(mut m) = self.metrics.lock() {
            let stats = self.policy.stats();
            m.reloads_ok = stats.reloads_ok;
            m.reloads_rolled_back = stats.reloads_failed;
            m.restarts = stats.restarts;
            m.generation = self.policy.serving().unwrap_or(0);
            m.generations_alive = self.policy.generations().count() as u64;
            if m.proxy.is_none()
                && let Some((proxy, _)) = &self.proxy
            {
                m.proxy = Some(std::sync::Arc::clone(proxy));
            }
        }
    }

    fn control(&mut self, req: ControlRequest) {
        match req.request {
            Request::Reload => self.trigger(Trigger::Control, Some(req.reply)),
            Request::Status => {
                let _ = req.reply.send(Response::Status(Box::new(self.status())));
            }
            Request::Stop => {
                let _ = req.reply.send(Response::Stopping);
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
            Event::Notify {
                generation,
                datagram,
            } => self.notified(generation, datagram),
            Event::DelayElapsed(generation) => {
                let actions = self.policy.ready(self.event_at, generation);
                self.apply(actions);
            }
            Event::RunCheck(generation) => self.run_check(generation),
            Event::Healthy(generation) => {
                let wants_notify = self.cfg.proxy.as_ref().is_some_and(|p| p.require_notify);
                let notified = match self.live.get_mut(&generation) {
                    Some(live) => {
                        live.healthy = true;
                        live.notified
                    }
                    None => false,
                };
                if !wants_notify || notified {
                    let actions = self.policy.ready(self.event_at, generation);
                    self.apply(actions);
                }
            }
            Event::Drained(generation) => self.drained(generation),
            Event::Watched => {
                let actions = self.policy.trigger(self.event_at, Trigger::Watch, None);
                self.apply(actions);
            }
            Event::SelfBound { generation, addrs } => {
                if let Some(live) = self.live.get_mut(&generation) {
                    let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                    warn!(generation, pid = live.pid, addrs = %shown.join(","),
                        "the app listens on its own port, not on the sockets baton passed: a new \
                         generation will fail to bind it; use the inherited sockets (LISTEN_FDS) or proxy mode");
                    live.self_bound = addrs;
                }
            }
        }
    }

    /// Reaps every exited child and routes each exit to its owner.
    fn reap(&mut self) {
        // A generation's leftovers are swept (SIGKILL to its process group)
        // while its exited leader is still an unreaped zombie: until then the
        // group id cannot belong to anyone else.
        for (pid, owner) in &self.pids {
            if matches!(owner, Owner::Generation(_)) && sys::reaper::has_exited(*pid) {
                let _ = sys::signal::send_group(*pid, Signal::KILL);
            }
        }
        for (pid, status) in sys::reaper::reap() {
            self.event_at = Instant::now();
            match self.pids.remove(&pid) {
                Some(Owner::Generation(generation)) => {
                    if self.policy.phase(generation) == Some(Phase::Starting)
                        && let Some(live) = self.live.get(&generation)
                    {
                        self.failed_hint = self.proxy_hint(generation, live);
                    }
                    if let Some(live) = self.live.remove(&generation)
                        && let Ok(mut m) = self.metrics.lock()
                    {
                        m.exited(status);
                        if let Some(at) = live.retired_at {
                            m.drained(self.event_at.saturating_duration_since(at));
                        }
                    }
                    self.check_listeners(Some((generation, pid)));
                    let actions = self.policy.exited(self.event_at, generation, status);
                    self.apply(actions);
                }
                Some(Owner::Check(generation)) => self.check_done(generation, pid, status),
                None => debug!(pid, %status, "reaped an orphan"),
            }
        }
    }

    fn notified(&mut self, generation: u64, datagram: Datagram) {
        let Some(live) = self.live.get_mut(&generation) else {
            return;
        };
        let fields = Fields::parse(&datagram.text);
        if let Some(status) = fields.status
            && live.status.as_ref() != Some(&status)
        {
            let (log, suppressed) = self.status_log.allow(self.event_at);
            if suppressed > 0 {
                warn!(suppressed, "STATUS= lines not logged (too many)");
            }
            if log {
                info!(generation, pid = live.pid, status = %status, "status");
            }
            live.status = Some(status);
        }
        if fields.stopping {
            debug!(generation, pid = live.pid, "generation reports STOPPING=1");
        }
        if fields.ready {
            debug!(generation, sender = datagram.pid, "READY=1");
            if let Some(proxy) = &self.cfg.proxy {
                // Proxy mode: ready means answering on the private port;
                // with --ready notify, READY=1 is needed as well.
                live.notified = true;
                if !(proxy.require_notify && live.healthy) {
                    return;
                }
            }
            let actions = self.policy.ready(self.event_at, generation);
            self.apply(actions);
        }
    }

    /// Carries out the policy's actions, and those that follow from them.
    fn apply(&mut self, actions: Vec<Action<Waiter>>) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn { generation } => match self.spawn(generation) {
                    Ok(pid) => {
                        self.policy.spawned(generation, pid);
                        if self.policy.serving().is_some() {
                            self.upstream.reloading(generation);
                        }
                    }
                    Err(e) => {
                        let now = Instant::now();
                        queue.extend(self.policy.spawn_failed(now, generation, &e));
                    }
                },
                Action::Signal {
                    generation,
                    pid,
                    signal,
                    cause,
                } if cause == SignalCause::Retire
                    && self
                        .live
                        .get(&generation)
                        .is_some_and(|l| l.upstream.is_some()) =>
                {
                    // Proxy mode: switch first, then hold the stop signal
                    // until nothing is in flight to the old generation.
                    self.sync_proxy();
                    if let Some(live) = self.live.get_mut(&generation) {
                        live.pending_stop = Some(signal);
                        live.retired_at = Some(Instant::now());
                        if let Some(upstream) = &live.upstream {
                            info!(
                                generation,
                                pid,
                                in_flight = upstream.active(),
                                handover_us = self.event_at.elapsed().as_micros() as u64,
                                "retire: no new traffic; stop signal once in-flight requests finish"
                            );
                            // Long-lived streams must not hold it until the
                            // SIGKILL: the stop signal goes at half the stop
                            // timeout at the latest.
                            live.tasks.push(ready::after(
                                self.cfg.policy.stop_timeout / 2,
                                self.events.clone(),
                                Event::Drained(generation),
                            ));
                            upstream.retire();
                        }
                    }
                }
                Action::Signal {
                    generation,
                    pid,
                    signal,
                    cause,
                } => {
                    if let Err(e) = sys::signal::send(pid, signal) {
                        warn!(generation, pid, %signal, error = %e, "cannot signal generation");
                    }
                    if cause == SignalCause::Retire {
                        info!(generation, pid, %signal,
                            handover_us = self.event_at.elapsed().as_micros() as u64, "retire");
                        if let Some(live) = self.live.get_mut(&generation) {
                            live.retired_at = Some(Instant::now());
                        }
                    } else {
                        debug!(generation, pid, %signal, "stop signal sent");
                    }
                }
                // After an exit the group was swept before reaping (see
                // `reap`); once reaped, its id may belong to someone else.
                Action::KillGroup { generation, .. } if !self.live.contains_key(&generation) => {}
                Action::KillGroup { generation, pid } => {
                    if let Err(e) = sys::signal::send_group(pid, Signal::KILL) {
                        warn!(generation, pid, error = %e, "cannot kill process group");
                    }
                }
                Action::Report { waiters, outcome } => {
                    let mut response = response(&outcome);
                    match (&outcome, &mut response) {
                        (
                            Outcome::Reloaded {
                                generation,
                                pid,
                                ready_after,
                            },
                            _,
                        ) => {
                            self.sync_proxy();
                            if self.proxy.is_none() {
                                self.inspect(*generation, *pid);
                            }
                            self.upstream.serving(*generation);
                            if let Ok(mut m) = self.metrics.lock() {
                                m.ready(*ready_after);
                            }
                        }
                        (
                            Outcome::RolledBack {
                                serving, reason, ..
                            },
                            Response::RolledBack { message, .. },
                        ) => {
                            let hint = match &self.proxy {
                                Some(_) => self.failed_hint.take(),
                                None => self.self_bound_hint(),
                            };
                            if let Some(hint) = hint {
                                warn!("hint: {hint}");
                                message.push_str("; ");
                                message.push_str(&hint);
                            }
                            self.upstream.rolled_back(*serving, &reason.to_string());
                        }
                        _ => {}
                    }
                    for waiter in waiters {
                        let _ = waiter.send(response.clone());
                    }
                }
                Action::Exit { code } => self.exit = Some(code),
            }
        }
    }

    /// Starts generation `generation`: its notification socket, environment
    /// and fds, then fork/exec.
    fn spawn(&mut self, generation: u64) -> std::io::Result<i32> {
        if self.cfg.proxy.is_some() {
            return self.spawn_behind_proxy(generation);
        }
        self.check_listeners(None);
        let notify = NotifySocket::bind(generation)?;
        let mut env = self.cfg.base_env.clone();
        let names: Vec<&str> = self.cfg.listeners.iter().map(|l| l.name.as_str()).collect();
        let starter: Vec<String> = self
            .cfg
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                format!(
                    "{}={}",
                    l.server_starter_key,
                    vars::LISTEN_FDS_START + i as i32
                )
            })
            .collect();
        let mut set = |k: &str, v: String| env.push((OsString::from(k), OsString::from(v)));
        set(vars::LISTEN_FDS, self.cfg.listeners.len().to_string());
        set(vars::LISTEN_FDNAMES, names.join(":"));
        set(vars::NOTIFY_SOCKET, notify.address.clone());
        set(vars::SERVER_STARTER_PORT, starter.join(";"));
        set(vars::BATON_GENERATION, generation.to_string());
        let fds: Vec<_> = self.cfg.listeners.iter().map(|l| l.fd.as_fd()).collect();
        let pid = self.start_process(generation, &self.cfg.args, &env, &fds, true)?;
        drop(fds);
        self.pids.insert(pid, Owner::Generation(generation));
        info!(
            generation,
            pid,
            spawn_us = self.event_at.elapsed().as_micros() as u64,
            "spawn"
        );
        let reader = self.read_notifications(generation, pid, notify);
        let mut live = Live {
            pid,
            tasks: vec![reader],
            check: None,
            self_bound: Vec::new(),
            retired_at: None,
            upstream: None,
            pending_stop: None,
            healthy: false,
            notified: false,
            status: None,
        };
        match &self.cfg.ready {
            ReadyMode::Notify => {}
            ReadyMode::Delay(delay) => {
                live.tasks.push(ready::after(
                    *delay,
                    self.events.clone(),
                    Event::DelayElapsed(generation),
                ));
            }
            ReadyMode::Exec(_) => {
                live.tasks.push(ready::after(
                    Duration::ZERO,
                    self.events.clone(),
                    Event::RunCheck(generation),
                ));
            }
        }
        self.live.insert(generation, live);
        Ok(pid)
    }

    /// Forks and execs the app for `generation` with `args`, `env` and the
    /// listeners `fds` (fds 3..), its output through `--log-prefix` pipes if
    /// asked. The caller registers the pid.
    fn start_process(
        &self,
        generation: u64,
        args: &[OsString],
        env: &[(OsString, OsString)],
        fds: &[std::os::fd::BorrowedFd<'_>],
        listen_pid: bool,
    ) -> std::io::Result<i32> {
        let pipes = if self.cfg.log_prefix {
            Some(output::pipes(&self.cfg.name, generation)?)
        } else {
            None
        };
        let pid = sys::spawn::spawn(&sys::spawn::Command {
            program: &self.cfg.program,
            args,
            env,
            fds,
            listen_pid,
            stdout: pipes.as_ref().map(|p| p.stdout.as_fd()),
            stderr: pipes.as_ref().map(|p| p.stderr.as_fd()),
            user: self.ids.as_ref(),
            nofile: Some((self.cfg.nofile.original_soft, self.cfg.nofile.hard)),
        })?;
        // The child has its copies; ours must go, or the copying never ends.
        drop(pipes);
        Ok(pid)
    }

    /// Passes `generation`'s notifications to the loop, once they passed
    /// the checks of [`NotifyFilter`]; the rest are only counted.
    fn read_notifications(&self, generation: u64, pid: i32, notify: NotifySocket) -> AbortHandle {
        let to_loop = self.notify_tx.clone();
        let filter = NotifyFilter {
            app_uid: self.app_uid,
            main_only: self.cfg.notify_access == NotifyAccess::Main,
            pid,
        };
        let rejected = std::sync::Arc::clone(&self.rejected);
        tokio::spawn(async move {
            loop {
                match notify.recv().await {
                    Ok(datagram) => {
                        if let Err(why) = filter.check(&datagram) {
                            rejected.note(format!(
                                "generation {generation}: {why} (sender pid {}, uid {})",
                                datagram.pid.unwrap_or(0),
                                datagram
                                    .uid
                                    .map_or_else(|| "?".to_owned(), |u| u.to_string()),
                            ));
                            continue;
                        }
                        if to_loop.send((generation, datagram)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(generation, error = %e, "notification socket failed");
                        break;
                    }
                }
            }
        })
        .abort_handle()
    }

    /// Proxy mode: starts generation `generation` on a private port of its
    /// own, and checks it until it answers there.
    fn spawn_behind_proxy(&mut self, generation: u64) -> std::io::Result<i32> {
        let Some(proxy_cfg) = self.cfg.proxy.clone() else {
            return Err(std::io::Error::other("not in proxy mode"));
        };
        let port = crate::proxy::private_port()?;
        let addr = crate::proxy::private_addr(port);
        let notify = NotifySocket::bind(generation)?;
        let mut env = self.cfg.base_env.clone();
        env.retain(|(k, _)| k != proxy_cfg.port_env.as_str());
        env.push((proxy_cfg.port_env.clone().into(), port.to_string().into()));
        env.push((vars::NOTIFY_SOCKET.into(), notify.address.clone().into()));
        env.push((vars::BATON_GENERATION.into(), generation.to_string().into()));
        let args: Vec<OsString> = self
            .cfg
            .args
            .iter()
            .map(|a| match a.to_str() {
                Some(text) if text.contains("{port}") => {
                    text.replace("{port}", &port.to_string()).into()
                }
                _ => a.clone(),
            })
            .collect();
        let pid = self.start_process(generation, &args, &env, &[], false)?;
        self.pids.insert(pid, Owner::Generation(generation));
        info!(
            generation,
            pid,
            port,
            spawn_us = self.event_at.elapsed().as_micros() as u64,
            "spawn"
        );
        let events = self.events.clone();
        let upstream = crate::proxy::Upstream::new(
            generation,
            addr,
            proxy_cfg.limits.pool_idle(),
            Box::new(move |g| {
                let _ = events.send(Event::Drained(g));
            }),
        );
        let reader = self.read_notifications(generation, pid, notify);
        // Check the private port until it answers; meanwhile, look for the
        // app listening somewhere else (ignoring $PORT).
        let events = self.events.clone();
        let health = proxy_cfg.health.clone();
        let checker = tokio::spawn(async move {
            let mut looked = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if health.passes(addr).await {
                    let _ = events.send(Event::Healthy(generation));
                    return;
                }
                // At most twice a second, and only while it starts.
                if looked.elapsed() >= Duration::from_millis(500) {
                    looked = Instant::now();
                    let found = sys::inspect::own_listeners(pid, &std::collections::HashSet::new());
                    let elsewhere: Vec<_> =
                        found.into_iter().filter(|a| a.port() != port).collect();
                    if !elsewhere.is_empty() {
                        let _ = events.send(Event::SelfBound {
                            generation,
                            addrs: elsewhere,
                        });
                    }
                }
            }
        });
        self.live.insert(
            generation,
            Live {
                pid,
                tasks: vec![reader, checker.abort_handle()],
                check: None,
                self_bound: Vec::new(),
                retired_at: None,
                upstream: Some(upstream),
                pending_stop: None,
                healthy: false,
                notified: false,
                status: None,
            },
        );
        Ok(pid)
    }

    /// Proxy mode: before a tick may time out a starting generation, keep
    /// the hint about it.
    fn stash_proxy_hints(&mut self) {
        if self.proxy.is_none() {
            return;
        }
        if let Some(generation) = self.policy.starting()
            && let Some(live) = self.live.get(&generation)
        {
            self.failed_hint = self.proxy_hint(generation, live);
        }
    }

    /// Proxy mode: why a generation that never passed its check failed.
    fn proxy_hint(&self, generation: u64, live: &Live) -> Option<String> {
        let proxy = self.cfg.proxy.as_ref()?;
        let port = live.upstream.as_ref()?.addr.port();
        let elsewhere = if live.self_bound.is_empty() {
            String::new()
        } else {
            let addrs: Vec<String> = live.self_bound.iter().map(ToString::to_string).collect();
            format!(" but bound {} itself", addrs.join(", "))
        };
        Some(format!(
            "generation {generation} was given {}={port}{elsewhere}; in proxy mode it must listen on \
             127.0.0.1:${} (an app that binds the public address itself fails with 'address already in use')",
            proxy.port_env, proxy.port_env
        ))
    }

    /// Looks for ports a ready generation binds by itself. Cheap enough to
    /// run on the loop (see `sys::inspect`), and run once per generation.
    fn inspect(&self, generation: u64, pid: i32) {
        let addrs = sys::inspect::own_listeners(pid, &self.listener_inodes);
        if !addrs.is_empty() {
            let _ = self.events.send(Event::SelfBound { generation, addrs });
        }
    }

    /// Why a reload may have failed, when the serving generation binds its
    /// own port.
    fn self_bound_hint(&self) -> Option<String> {
        let serving = self.policy.serving()?;
        let live = self.live.get(&serving)?;
        if live.self_bound.is_empty() {
            return None;
        }
        let addrs: Vec<String> = live.self_bound.iter().map(ToString::to_string).collect();
        Some(format!(
            "generation {serving} (pid {}) listens on {} by itself, not on the sockets baton passed, \
             so a new generation cannot bind the same port (address already in use): make the app use \
             the inherited sockets (LISTEN_FDS; see examples/gin-hello) or run it in proxy mode (--proxy)",
            live.pid,
            addrs.join(", ")
        ))
    }

    /// Runs the `--ready exec:` command for a starting generation.
    fn run_check(&mut self, generation: u64) {
        let ReadyMode::Exec(command) = &self.cfg.ready else {
            return;
        };
        if self.policy.phase(generation) != Some(Phase::Starting) {
            return;
        }
        let Some(live) = self.live.get_mut(&generation) else {
            return;
        };
        let mut env = self.cfg.base_env.clone();
        env.push((vars::BATON_GENERATION.into(), generation.to_string().into()));
        env.push(("BATON_PID".into(), live.pid.to_string().into()));
        let args = ready::shell_args(command);
        let spawned = sys::spawn::spawn(&sys::spawn::Command {
            program: ready::SHELL.as_ref(),
            args: &args,
            env: &env,
            fds: &[],
            listen_pid: false,
            stdout: None,
            stderr: None,
            user: self.ids.as_ref(),
            nofile: Some((self.cfg.nofile.original_soft, self.cfg.nofile.hard)),
        });
        match spawned {
            Ok(pid) => {
                live.check = Some(pid);
                self.pids.insert(pid, Owner::Check(generation));
            }
            Err(e) => {
                warn!(generation, error = %e, "cannot run the readiness check; retrying");
                live.tasks.push(ready::after(
                    ready::CHECK_INTERVAL,
                    self.events.clone(),
                    Event::RunCheck(generation),
                ));
            }
        }
    }

    fn check_done(&mut self, generation: u64, pid: i32, status: ExitStatus) {
        if let Some(live) = self.live.get_mut(&generation) {
            if live.check == Some(pid) {
                live.check = None;
            }
            if status.success() {
                let actions = self.policy.ready(self.event_at, generation);
                self.apply(actions);
            } else if self.policy.phase(generation) == Some(Phase::Starting) {
                debug!(generation, %status, "readiness check failed; trying again");
                live.tasks.push(ready::after(
                    ready::CHECK_INTERVAL,
                    self.events.clone(),
                    Event::RunCheck(generation),
                ));
            }
        }
    }

    /// Once a second: listeners, pressure summaries, metrics.
    fn housekeeping(&mut self) {
        self.check_listeners(None);
        self.pressure.report(Instant::now());
        if self.pressure.should_trim() {
            let returned = sys::memory::trim();
            debug!(returned, "freed memory given back after connections closed");
        }
        let descriptors = self
            .cfg
            .metrics
            .is_some()
            .then(|| sys::limits::open_descriptors().unwrap_or(0) as u64);
        if let Ok(mut m) = self.metrics.lock() {
            m.notify_rejected = self.rejected.count();
            m.listener_rearms = self.listener_rearms;
            if let Some(n) = descriptors {
                m.descriptors = n;
            }
        }
    }

    /// Makes sure every listener still listens (socket mode: apps hold the
    /// same sockets and may shut them down). `exited` is the generation that
    /// just exited, the likely culprit.
    fn check_listeners(&mut self, exited: Option<(u64, i32)>) {
        if self.proxy.is_some() {
            return;
        }
        let mut replaced = false;
        for l in &mut self.cfg.listeners {
            let check = l.ensure_listening();
            if matches!(check, Ok(ListenerCheck::Listening)) {
                l.broken_reported = false;
                continue;
            }
            let by = match exited {
                Some((generation, pid)) => {
                    format!("generation {generation} (pid {pid}), as it exited")
                }
                None => {
                    let alive: Vec<String> = self
                        .live
                        .iter()
                        .map(|(g, live)| format!("{g} (pid {})", live.pid))
                        .collect();
                    format!("one of generations {}", alive.join(", "))
                }
            };
            match check {
                Ok(ListenerCheck::Listening) => {}
                Ok(how) => {
                    self.listener_rearms += 1;
                    l.broken_reported = false;
                    let generation = exited.map_or(0, |(g, _)| g);
                    warn!(addr = %l.local, generation, by = %by,
                        how = if how == ListenerCheck::Replaced { "replaced (a new socket, for new generations)" } else { "listening again" },
                        "listener shut down by the app (shutdown(2) on an inherited socket); re-armed");
                    replaced |= how == ListenerCheck::Replaced;
                }
                Err(e) if !l.broken_reported => {
                    l.broken_reported = true;
                    warn!(addr = %l.local, by = %by, error = %e,
                        "listener shut down by the app, and it cannot listen again");
                }
                Err(_) => {}
            }
        }
        if replaced {
            self.listener_inodes = std::sync::Arc::new(
                self.cfg
                    .listeners
                    .iter()
                    .filter_map(|l| sys::inspect::inode(&l.fd))
                    .collect(),
            );
            // A Unix socket was replaced: the serving generation holds the
            // dead one, and only a new generation can serve the new one.
            // (A TCP socket listens again for everyone: no reload, or an app
            // that shuts its listener at every exit would reload forever.)
            if self.policy.serving().is_some() && !self.policy.is_stopping() {
                self.trigger(Trigger::Listener, None);
            }
        }
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        let stats = self.policy.stats();
        Status {
            name: self.cfg.name.clone(),
            pid: std::process::id(),
            uptime_ms: now.duration_since(self.started).as_millis() as u64,
            command: self
                .cfg
                .args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            listeners: self
                .cfg
                .listeners
                .iter()
                .enumerate()
                .map(|(i, l)| ListenerInfo {
                    name: l.name.clone(),
                    addr: l.local.clone(),
                    fd: vars::LISTEN_FDS_START + i as i32,
                })
                .collect(),
            generations: self
                .policy
                .generations()
                .map(|g| GenerationInfo {
                    generation: g.id,
                    pid: g.pid,
                    phase: match g.phase {
                        Phase::Starting => "starting",
                        Phase::Ready => "ready",
                        Phase::Draining => "draining",
                        Phase::Killed => "killed",
                    }
                    .to_owned(),
                    age_ms: now.saturating_duration_since(g.spawned_at).as_millis() as u64,
                    ready_ms: g.ready_after.map(|d| d.as_millis() as u64),
                })
                .collect(),
            serving: self.policy.serving(),
            starting: self.policy.starting(),
            stopping: self.policy.is_stopping(),
            reloads_ok: stats.reloads_ok,
            reloads_failed: stats.reloads_failed,
            restarts: stats.restarts,
            last_reload: stats.last_reload.clone(),
            guard: self.guard(),
        }
    }

    /// What `status` says of baton's own limits.
    fn guard(&self) -> Guard {
        let connections = self
            .pressure
            .caps()
            .map(|(socket, c)| {
                let s = c.stats();
                ConnectionsInfo {
                    socket: socket.to_owned(),
                    open: s.open as u64,
                    max: s.max as u64,
                    evicted: s.evicted,
                    paused: s.paused,
                    header_timeouts: s.header_timeouts,
                    idle_timeouts: s.idle_timeouts,
                }
            })
            .collect();
        Guard {
            descriptors: sys::limits::open_descriptors().unwrap_or(0) as u64,
            descriptors_limit: self.cfg.nofile.soft,
            app_descriptors_limit: self.cfg.nofile.original_soft,
            notify_rejected: self.rejected.count(),
            listener_rearms: self.listener_rearms,
            connections,
        }
    }
}

fn response(outcome: &Outcome) -> Response {
    match outcome {
        Outcome::Reloaded {
            generation,
            pid,
            ready_after,
        } => Response::Reloaded {
            generation: *generation,
            pid: *pid,
            ready_ms: ready_after.as_millis() as u64,
        },
        Outcome::RolledBack {
            generation,
            pid,
            reason,
            serving,
        } => Response::RolledBack {
            generation: *generation,
            pid: *pid,
            reason: reason.clone(),
            message: outcome.message(),
            serving: *serving,
        },
    }
}
