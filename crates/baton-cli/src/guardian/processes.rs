//! The worker processes as the loop runs them: started through the launch
//! strategy, their notifications read, their readiness checks run, traffic
//! routed to the ones that serve, drained, signalled, and forgotten once
//! reaped. What a process *is* (slot, pid, ready, replaced) is its
//! [`WorkerRecord`] in the policy; this holds the runtime side, keyed by
//! slot ([`Handles`]), and the parts that start and watch processes.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton::vars;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::children::Children;
use super::event::Event;
use super::generation::{Handles, Route, Slot, WorkerRecord};
use super::launch::{Cx, Launch};
use super::policy::Policy;
use super::pressure::Rejected;
use super::release::Release;
use super::{notify, output, readiness};
use crate::config::RunConfig;
use crate::exit::ExitStatus;
use crate::spec::{NotifyAccess, ReadyMode, Signal};
use crate::sys;
use crate::sys::notify_socket::{Datagram, NotifySocket};

/// What a worker process's handles are rebuilt from when a baton takes it
/// over (after an upgrade, or adopting a killed baton's), besides its
/// record.
#[derive(Debug, Default)]
pub struct Restored {
    /// Its notification socket.
    pub notify: Option<NotifySocket>,
    /// Its output pipes' read ends (stdout, stderr).
    pub logs: Option<(OwnedFd, OwnedFd)>,
    /// Ports it was seen listening on by itself.
    pub self_bound: Vec<std::net::SocketAddr>,
    /// A pidfd of it (`None`: opened here, for a child of this process).
    pub pidfd: Option<OwnedFd>,
}

/// The worker processes' runtime side.
pub struct Processes {
    /// How generations reach clients.
    pub launch: Box<dyn Launch>,
    /// Starting and reaping processes.
    pub children: Children,
    /// Each live worker process's runtime handles.
    pub handles: BTreeMap<Slot, Handles>,
    /// The helper tasks' way to the loop.
    pub events: mpsc::UnboundedSender<Event>,
    /// Where the notify sockets' readers send what passed their checks.
    pub notify_tx: mpsc::Sender<(Slot, Datagram)>,
    /// Notifications the readers refused.
    pub rejected: Arc<Rejected>,
    /// The uid the app runs as: only it (or root) may notify.
    pub app_uid: u32,
    /// Inodes of baton's listening sockets (to tell them from an app's own).
    pub listener_inodes: Arc<HashSet<u64>>,
}

impl std::fmt::Debug for Processes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processes")
            .field("handles", &self.handles.len())
            .field("app_uid", &self.app_uid)
            .finish_non_exhaustive()
    }
}

/// Inodes of baton's listening sockets.
pub fn listener_inodes(cfg: &RunConfig) -> Arc<HashSet<u64>> {
    Arc::new(
        cfg.listeners
            .iter()
            .filter_map(|l| sys::inspect::inode(&l.fd))
            .collect(),
    )
}

/// The handles of `generation`'s worker processes that take traffic:
/// ready, and not being replaced.
pub fn serving_handles<'a, W>(
    policy: &Policy<W>,
    handles: &'a BTreeMap<Slot, Handles>,
    generation: u64,
) -> Vec<&'a Handles> {
    let Some(g) = policy.generations().find(|g| g.id == generation) else {
        return Vec::new();
    };
    g.processes
        .iter()
        .filter(|p| p.serves())
        .filter_map(|p| handles.get(&p.slot(generation)))
        .collect()
}

/// What a starting process reached by `route` is waited for, in words
/// (`None`: a fixed delay, nothing to say).
fn waiting_for(cfg: &RunConfig, route: Option<Route>) -> Option<String> {
    if let Some(Route::Private { port }) = route {
        let silent = sys::inspect::listening_inodes(port).is_empty();
        return Some(format!(
            "its health check on 127.0.0.1:{port} (${}){}",
            cfg.proxy.as_ref().map_or("PORT", |p| p.port_env.as_str()),
            if silent {
                ", where nothing listens yet: the app must listen on that port"
            } else {
                ""
            }
        ));
    }
    match &cfg.ready {
        ReadyMode::Notify => Some(
            "READY=1 on $NOTIFY_SOCKET (sd_notify); an app that cannot send it runs with --ready delay:DURATION"
                .to_owned(),
        ),
        ReadyMode::Exec(command) => Some(format!("its readiness check `{command}` to pass")),
        _ => None,
    }
}

impl Processes {
    /// Starts worker process `slot` from `release` through the launch
    /// strategy, and reads its notifications: its record, for the policy.
    pub fn start(
        &mut self,
        cfg: &RunConfig,
        slot: Slot,
        release: &Release,
    ) -> std::io::Result<WorkerRecord> {
        let cx = Cx {
            cfg,
            children: &mut self.children,
            events: &self.events,
        };
        let launched = self.launch.launch(cx, slot, release)?;
        let mut handles = launched.handles;
        handles.pid = launched.process.pid;
        // A child not yet reaped: its pid is its own until then.
        handles.pidfd = sys::fdpass::pidfd(launched.process.pid, None).ok();
        handles.notify = launched.notify.dup().ok();
        let mut record = WorkerRecord::started(
            slot,
            launched.process,
            launched.route,
            Some(launched.notify.address.clone()),
        );
        record.started = Some(Instant::now());
        handles.tasks.push(self.read_notifications(
            cfg,
            slot,
            launched.process.pid,
            launched.notify,
        ));
        self.handles.insert(slot, handles);
        Ok(record)
    }

    /// Worker process `slot`, running as `pid` and reached by `route`, is
    /// this baton's from now on: its notifications are read, its output
    /// copied, and the launch strategy routes to it again.
    pub fn restore(&mut self, cfg: &RunConfig, slot: Slot, pid: i32, route: Route, from: Restored) {
        let mut handles = Handles::of(pid);
        handles.self_bound = from.self_bound;
        handles.pidfd = from.pidfd.or_else(|| sys::fdpass::pidfd(pid, None).ok());
        if let Some(socket) = from.notify {
            handles.notify = socket.dup().ok();
            handles
                .tasks
                .push(self.read_notifications(cfg, slot, pid, socket));
        }
        if let Some((out, err)) = from.logs {
            handles.log_readers = out.try_clone().and_then(|o| Ok((o, err.try_clone()?))).ok();
            if let Err(e) = output::resume(self.children.output(), &cfg.name, slot, out, err) {
                warn!(generation = %slot, error = %e, "its output cannot be copied");
            }
        }
        let cx = Cx {
            cfg,
            children: &mut self.children,
            events: &self.events,
        };
        self.launch.adopt(cx, slot, route, &mut handles);
        self.handles.insert(slot, handles);
    }

    /// Passes `slot`'s notifications to the loop (see `notify`).
    fn read_notifications(
        &self,
        cfg: &RunConfig,
        slot: Slot,
        pid: i32,
        socket: NotifySocket,
    ) -> AbortHandle {
        let filter = notify::Filter {
            app_uid: self.app_uid,
            main_only: cfg.notify_access == NotifyAccess::Main,
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

    /// Runs the `--ready exec:` command for worker process `slot`, unless
    /// it is `ready` already.
    pub fn run_check(&mut self, cfg: &RunConfig, slot: Slot, ready: bool) {
        let ReadyMode::Exec(command) = &cfg.ready else {
            return;
        };
        let Some(pid) = self.handles.get(&slot).map(|h| h.pid) else {
            return;
        };
        if ready || pid <= 0 {
            return;
        }
        let mut env = cfg.base_env.clone();
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

    /// Worker process `slot`'s readiness check `pid` ended with `status`:
    /// whether it passed. One that failed runs again later, unless the
    /// process is `ready` already.
    pub fn check_done(&mut self, slot: Slot, pid: i32, status: ExitStatus, ready: bool) -> bool {
        let Some(handles) = self.handles.get_mut(&slot) else {
            return false;
        };
        if handles.check == Some(pid) {
            handles.check = None;
        }
        if status.success() {
            return true;
        }
        if !ready {
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
        false
    }

    /// New traffic goes to the serving generation (or, while none serves,
    /// waits for one).
    pub fn cut_over<W>(&mut self, policy: &Policy<W>) {
        let serving = policy
            .serving()
            .map(|id| serving_handles(policy, &self.handles, id))
            .unwrap_or_default();
        self.launch.cut_over(&serving);
    }

    /// Asks worker process `slot` to drain with `signal`: no new traffic
    /// (the caller cut over first), then the signal (see
    /// [`Launch::drain`]). `handover_us`: baton's own latency so far.
    pub fn drain(&mut self, cfg: &RunConfig, slot: Slot, signal: Signal, handover_us: u64) {
        let Some(handles) = self.handles.get_mut(&slot) else {
            return;
        };
        let pid = handles.pid;
        let cx = Cx {
            cfg,
            children: &mut self.children,
            events: &self.events,
        };
        self.launch
            .drain(cx, slot, pid, signal, handles, handover_us);
    }

    /// Generation `generation` serves now: the launch strategy hears it of
    /// each of its processes.
    pub fn serving(&mut self, cfg: &RunConfig, generation: u64) {
        let inherited = Arc::clone(&self.listener_inodes);
        for (slot, pid) in self.pids_of(generation) {
            let cx = Cx {
                cfg,
                children: &mut self.children,
                events: &self.events,
            };
            self.launch.serving(cx, slot, pid, &inherited);
        }
    }

    /// The live worker processes of `generation`, with their pids.
    pub fn pids_of(&self, generation: u64) -> Vec<(Slot, i32)> {
        self.handles
            .range(Slot::range(generation))
            .filter(|(_, h)| h.pid > 0)
            .map(|(s, h)| (*s, h.pid))
            .collect()
    }

    /// Whether worker process `slot` is still `pid`, not yet reaped.
    pub fn live(&self, slot: Slot, pid: i32) -> bool {
        pid > 0 && self.handles.get(&slot).is_some_and(|h| h.pid == pid)
    }

    /// Passes `signal` to each process of `generation`; the first pid it
    /// went to.
    pub fn forward(&self, generation: u64, signal: Signal) -> Option<i32> {
        let mut first = None;
        for (slot, pid) in self.pids_of(generation) {
            match sys::signal::send(pid, signal) {
                Ok(()) => {
                    info!(generation, worker = slot.worker, pid, %signal, "forwarded");
                    first.get_or_insert(pid);
                }
                Err(e) => {
                    warn!(generation, worker = slot.worker, pid, %signal, error = %e, "cannot forward the signal");
                }
            }
        }
        first
    }

    /// A drain the launch strategy waited on is over for `slot`.
    pub fn drained(&mut self, slot: Slot) {
        if let Some(handles) = self.handles.get_mut(&slot) {
            let pid = handles.pid;
            self.launch.drained(slot, pid, handles);
        }
    }

    /// Worker process `slot` was seen listening on `addrs` by itself.
    pub fn self_bound(&mut self, slot: Slot, addrs: Vec<std::net::SocketAddr>) {
        if let Some(handles) = self.handles.get_mut(&slot) {
            let pid = handles.pid;
            if let Some(advice) = self.launch.self_bound(slot, pid, handles, &addrs) {
                let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                warn!(generation = slot.generation, worker = slot.worker, pid, addrs = %shown.join(","), "listens on its own port: {advice}");
            }
            handles.self_bound = addrs;
        }
    }

    /// Why worker process `slot` failed before it was ready, if the launch
    /// strategy can tell.
    pub fn failure_hint(&self, slot: Slot, pid: i32) -> Option<String> {
        let handles = self.handles.get(&slot)?;
        self.launch
            .failure_hint(slot, pid, handles, &self.listener_inodes)
    }

    /// Says what each starting worker process still waits for: 2 s after
    /// it started, then every 10 s, with the time left before the ready
    /// timeout; and, from 1 s on, that it listens on a port of its own
    /// (never one of baton's sockets), the moment that is seen.
    pub fn remind<W>(&mut self, cfg: &RunConfig, policy: &Policy<W>, now: Instant) {
        for g in policy.generations() {
            if g.state != super::generation::State::Starting {
                continue;
            }
            for p in g.processes.iter().filter(|p| !p.ready) {
                let slot = p.slot(g.id);
                let pid = p.process.pid;
                let age = p
                    .started
                    .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
                let Some(h) = self.handles.get_mut(&slot) else {
                    continue;
                };
                if age >= Duration::from_secs(1) && h.self_bound.is_empty() {
                    let addrs = sys::inspect::own_listeners(pid, &self.listener_inodes);
                    let addrs = match p.route {
                        Some(Route::Private { port }) => {
                            addrs.into_iter().filter(|a| a.port() != port).collect()
                        }
                        _ => addrs,
                    };
                    if !addrs.is_empty() {
                        self.self_bound(slot, addrs);
                    }
                }
                let Some(h) = self.handles.get_mut(&slot) else {
                    continue;
                };
                let due = Duration::from_secs(2 + 10 * u64::from(h.reminded));
                if age < due {
                    continue;
                }
                h.reminded += 1;
                let Some(what) = waiting_for(cfg, p.route) else {
                    continue;
                };
                let left_s = g
                    .deadline
                    .map_or(0, |d| d.saturating_duration_since(now).as_secs());
                warn!(
                    generation = g.id,
                    worker = slot.worker,
                    pid,
                    waited_s = age.as_secs(),
                    left_s,
                    "waiting: generation {} (pid {pid}) is not ready after {} s: baton waits for {what}; {left_s} s left before the ready timeout",
                    g.id,
                    age.as_secs()
                );
            }
        }
    }

    /// Why a reload failed, as seen from generation `serving`'s first
    /// process.
    pub fn reload_hint(&self, serving: u64) -> Option<String> {
        let (slot, handles) = self.handles.range(Slot::range(serving)).next()?;
        self.launch.reload_hint(*slot, handles.pid, handles)
    }
}
