//! `baton run`'s event loop: sets up what it waits on (signals first, so
//! that no SIGCHLD is missed), then one `select!` over signals, control
//! requests, helper events, notifications and the next deadline, each
//! handed to the guardian's dispatch (`mod.rs`); and the finish once every
//! generation is gone.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use baton::vars;
use tokio::signal::unix::{Signal as SignalStream, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::children::Children;
use super::event::Event;
use super::generation::Slot;
use super::launch::{self, Launch};
use super::policy::{Policy, Trigger};
use super::{
    Guardian, handover, metrics, notify, orphans, pressure, processes, release, systemd, takeover,
    watch,
};
use crate::config::RunConfig;
use crate::control::proto::Response;
use crate::control::server::ControlRequest;
use crate::spec::Signal;
use crate::sys;
use crate::sys::notify_socket::Datagram;

/// How often the guardian looks at its listeners and reports pressure.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// How long baton waits, once every generation is gone, for the proxy's
/// client connections to take what was sent them.
pub(super) const CLIENTS_GRACE: Duration = Duration::from_secs(2);

/// Runs the guardian until every generation is gone after a stop (or the
/// first generation never became ready), and returns baton's exit code.
///
/// With `handover`, this image was started by `baton upgrade`: it goes on
/// from the previous image's state instead of starting generation 1.
pub async fn run(
    cfg: RunConfig,
    left: orphans::Left,
    handover: Option<handover::Handover>,
) -> anyhow::Result<ExitCode> {
    let mut running = Running::start(cfg, left, handover)?;
    running.serve().await;
    Ok(running.finish().await)
}

/// The guardian and what its loop waits on.
struct Running {
    s: Service,
    signals: Signals,
    control_rx: mpsc::UnboundedReceiver<ControlRequest>,
    housekeeping: tokio::time::Interval,
    /// `WATCHDOG=1` for the service manager, at half its period.
    watchdog: Option<tokio::time::Interval>,
    control_task: tokio::task::JoinHandle<()>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
}

/// One service's guardian and the inputs that are its own (a baton with
/// `--config-dir` runs several, and their loop shares the rest).
pub(super) struct Service {
    pub(super) g: Guardian,
    pub(super) events: mpsc::UnboundedReceiver<Event>,
    pub(super) notify_rx: mpsc::Receiver<(Slot, Datagram)>,
    pub(super) watch_task: Option<AbortHandle>,
    /// Names the service in its log lines (when the baton runs several).
    span: tracing::Span,
    /// Something happened to it since it last published (`with`): a
    /// baton that runs several publishes only those.
    pub(super) dirty: bool,
}

/// What the services of one baton share.
pub(super) struct Common<'a> {
    /// The control socket's listener (an upgrade hands a copy over).
    pub(super) control: &'a std::os::unix::net::UnixListener,
    /// Its connections.
    pub(super) control_connections: &'a Arc<baton::serve::Connections>,
    /// What `/metrics` serves.
    pub(super) board: &'a metrics::Board,
    /// The service's name, when the baton runs several.
    pub(super) service: Option<&'a str>,
    /// The keeper process shared by the services, if one runs.
    pub(super) keeper: Option<&'a Arc<super::keeper::Host>>,
}

impl Service {
    /// The guardian of `cfg` (whose sockets are bound), not started yet.
    pub(super) fn new(
        cfg: RunConfig,
        handover: Option<&handover::Handover>,
        common: &Common<'_>,
    ) -> anyhow::Result<Service> {
        let control_fd = OwnedFd::from(common.control.try_clone().context("the control socket")?);
        let (events_tx, events) = mpsc::unbounded_channel();
        let metrics = metrics::Shared::default();
        common
            .board
            .insert(common.service.map(str::to_owned), Arc::clone(&metrics));
        let watch_task = cfg
            .watch
            .clone()
            .map(|path| watch::spawn(path, events_tx.clone(), || Event::Watched));
        let mut caps = vec![("control", Arc::clone(common.control_connections))];
        let mut stray = None;
        let launch: Box<dyn Launch> = match &cfg.proxy {
            None => Box::new(launch::Sockets),
            Some(p) => {
                let proxied = launch::Proxied::start(&cfg, p)?;
                caps.push(("proxy", Arc::clone(proxied.proxy().connections())));
                stray = Some(Arc::clone(&proxied.proxy().counters.stray_answers));
                if let Ok(mut m) = metrics.lock() {
                    m.proxy = Some(Arc::clone(proxied.proxy()));
                }
                Box::new(proxied)
            }
        };
        let rejected = Arc::new(pressure::Rejected::starting_at(
            handover.map_or(0, |h| h.notify_rejected),
        ));
        let pressure = pressure::Pressure::new(Arc::clone(&rejected), caps, stray);
        if let Ok(mut m) = metrics.lock() {
            m.control = Some(Arc::clone(common.control_connections));
            m.nofile_limit = cfg.nofile.soft;
        }
        let (notify_tx, notify_rx) = mpsc::channel(notify::QUEUE);
        let now = Instant::now();
        let policy = match handover {
            Some(h) => Policy::restore(cfg.policy.clone(), h.policy.clone()),
            None => Policy::new(cfg.policy.clone()),
        };
        let keeper = handover.and_then(|h| h.keeper);
        let systemd = match common.service {
            Some(_) => systemd::Systemd::muted(),
            None => systemd::Systemd::resume(handover.is_some_and(|h| h.systemd_ready)),
        };
        let mut orphans = orphans::Orphans::new(&cfg, keeper);
        if let Some(host) = common.keeper {
            orphans.share(Arc::clone(host));
        }
        let g = Guardian {
            orphans,
            releases: release::Releases::default(),
            control_fd,
            upgrade: None,
            upgrades: handover.map_or(0, |h| h.upgrades),
            upgraded_at: handover.map(|_| now),
            procs: processes::Processes {
                listener_inodes: processes::listener_inodes(&cfg),
                app_uid: cfg
                    .user
                    .as_ref()
                    .map_or_else(|| rustix::process::geteuid().as_raw(), |u| u.uid),
                children: Children::new(&cfg),
                launch,
                handles: BTreeMap::new(),
                events: events_tx,
                notify_tx,
                rejected,
            },
            policy,
            cfg,
            pressure,
            status_log: pressure::Throttle::new(20, pressure::INTERVAL),
            listener_rearms: handover.map_or(0, |h| h.listener_rearms),
            failed_hint: None,
            metrics,
            observed: metrics::Observed::default(),
            systemd,
            stop_waiters: Vec::new(),
            clients_first: None,
            started: handover.map_or(now, |h| sys::clock::instant(h.started_ns)),
            event_at: now,
            exit: None,
            exec_pending: false,
        };
        let span = match common.service {
            Some(name) => tracing::info_span!("service", service = name),
            None => tracing::Span::none(),
        };
        Ok(Service {
            g,
            events,
            notify_rx,
            watch_task,
            span,
            dirty: true,
        })
    }

    /// Runs `f` on its guardian, its log lines naming the service.
    pub(super) fn with<R>(&mut self, f: impl FnOnce(&mut Guardian) -> R) -> R {
        let _named = self.span.clone().entered();
        self.dirty = true;
        f(&mut self.g)
    }

    /// Starts the service: its keeper, then what a baton that died left
    /// (`left`), or generation 1.
    pub(super) fn begin(&mut self, left: orphans::Left) {
        let _named = self.span.clone().entered();
        let g = &mut self.g;
        g.systemd.store(&g.cfg.listeners);
        g.orphans.start_keeper(&g.cfg, &mut g.procs.children);
        // This baton's keeper holds copies now (or none will): the dead
        // baton's keeper may let go.
        if let Some(handoff) = left.handoff {
            handoff.finish();
        }
        match left.adoption {
            Some(s) => takeover::adopt(g, s),
            None => {
                let start = g.policy.start(Instant::now());
                g.apply(start);
            }
        }
    }

    /// After its last generation: its keeper and state file go, and those
    /// who asked it to stop are told. Returns its exit code, its
    /// listeners (closed when dropped), and the wait for its proxy's last
    /// answers to reach their clients, if it has a proxy.
    pub(super) fn end(
        mut self,
    ) -> (
        u8,
        Vec<crate::config::BoundListener>,
        Option<launch::Quiesced>,
    ) {
        let code = self.g.exit.unwrap_or(1);
        let clients = self.g.procs.launch.quiesce();
        self.g.orphans.finish();
        for waiter in self.g.stop_waiters.drain(..) {
            let _ = waiter.send(Response::Stopped { code });
        }
        if let Some(task) = self.watch_task.take() {
            task.abort();
        }
        let listeners = std::mem::take(&mut self.g.cfg.listeners);
        (code, listeners, clients)
    }

    /// The next of its own inputs, polled beside every other service's:
    /// helper events first, then notifications.
    pub(super) fn poll_input(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Event> {
        poll_inputs(&mut self.events, &mut self.notify_rx, cx)
    }
}

/// A service's next helper event, else its next notification.
fn poll_inputs(
    events: &mut mpsc::UnboundedReceiver<Event>,
    notify_rx: &mut mpsc::Receiver<(Slot, Datagram)>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Event> {
    use std::task::Poll;
    if let Poll::Ready(Some(event)) = events.poll_recv(cx) {
        return Poll::Ready(event);
    }
    if let Poll::Ready(Some((slot, datagram))) = notify_rx.poll_recv(cx) {
        return Poll::Ready(Event::Notify { slot, datagram });
    }
    Poll::Pending
}

/// The control socket's listener and the task that serves it.
pub(super) struct Control {
    pub(super) listener: std::os::unix::net::UnixListener,
    pub(super) connections: Arc<baton::serve::Connections>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

impl Control {
    /// Serves `listener`, each request to `tx`.
    pub(super) fn serve(
        listener: std::os::unix::net::UnixListener,
        tx: mpsc::UnboundedSender<ControlRequest>,
    ) -> anyhow::Result<Control> {
        let served = listener.try_clone().context("the control socket")?;
        served.set_nonblocking(true)?;
        let served =
            tokio::net::UnixListener::from_std(served).context("registering the control socket")?;
        let connections = baton::serve::Connections::new(crate::sys::limits::CONTROL_CONNECTIONS);
        let task = tokio::spawn(crate::control::server::serve(
            served,
            tx,
            Arc::clone(&connections),
        ));
        Ok(Control {
            listener,
            connections,
            task,
        })
    }
}

/// The metrics endpoint, if asked for: serves `board`.
pub(super) fn serve_metrics(
    listener: Option<&std::net::TcpListener>,
    board: &metrics::Board,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    listener
        .map(|listener| {
            let listener = listener.try_clone().context("the metrics listener")?;
            if let Ok(addr) = listener.local_addr() {
                info!(addr = %addr, "metrics");
            }
            anyhow::Ok(tokio::spawn(metrics::serve(listener, board.clone())))
        })
        .transpose()
}

/// The watchdog's tick, at half the period the service manager asked for.
pub(super) fn watchdog() -> Option<tokio::time::Interval> {
    systemd::Systemd::watchdog().map(|period| {
        info!(
            period_ms = period.as_millis() as u64,
            "watchdog: telling the service manager the loop is alive"
        );
        let mut tick = tokio::time::interval((period / 2).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    })
}

/// The housekeeping tick.
pub(super) fn housekeeping() -> tokio::time::Interval {
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    housekeeping
}

impl Running {
    /// Sets up everything the loop waits on (signals first, so that no
    /// SIGCHLD is missed) and starts generation 1.
    fn start(
        mut cfg: RunConfig,
        left: orphans::Left,
        handover: Option<handover::Handover>,
    ) -> anyhow::Result<Running> {
        let signals = Signals::new().context("installing signal handlers")?;
        if let Err(e) = sys::reaper::become_subreaper() {
            warn!(error = %e, "cannot become a child subreaper; orphans of the app will go to init");
        }
        let listener = cfg
            .control
            .as_mut()
            .and_then(|c| c.listener.take())
            .context("the control socket")?;
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let control = Control::serve(listener, control_tx)?;
        info!(
            soft = cfg.nofile.soft,
            hard = cfg.nofile.hard,
            app_soft = cfg.nofile.original_soft,
            "descriptors"
        );
        for (i, l) in cfg.listeners.iter().enumerate() {
            info!(addr = %l.local, name = %l.name, fd = vars::LISTEN_FDS_START + i as i32, "listening");
        }
        info!(path = %cfg.control_path.display(), name = %cfg.name, pid = std::process::id(), "control");
        let board = metrics::Board::default();
        let metrics_task = serve_metrics(cfg.metrics.as_ref(), &board)?;
        let common = Common {
            control: &control.listener,
            control_connections: &control.connections,
            board: &board,
            service: None,
            keeper: None,
        };
        let mut s = Service::new(cfg, handover.as_ref(), &common)?;
        match (handover, left) {
            (Some(h), _) => takeover::resume(&mut s.g, h),
            (None, left) => {
                // Children that exited before the handler was installed are
                // reaped on the first SIGCHLD or here.
                s.g.reap();
                s.begin(left);
            }
        }
        Ok(Running {
            s,
            signals,
            control_rx,
            housekeeping: housekeeping(),
            watchdog: watchdog(),
            control_task: control.task,
            metrics_task,
        })
    }

    /// The loop: until baton exits.
    async fn serve(&mut self) {
        let Running {
            s,
            signals,
            control_rx,
            housekeeping,
            watchdog,
            ..
        } = self;
        while s.g.exit.is_none() {
            let g = &mut s.g;
            if std::mem::take(&mut g.exec_pending) {
                exec_with_signals_kept(signals, || g.upgrade_exec()).await;
            }
            let deadline = g.next_deadline();
            let sleep = async {
                match deadline {
                    Some(at) => {
                        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                    }
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
                Some(req) = control_rx.recv() => match &req.service {
                    Some(other) if *other != g.cfg.name => {
                        let _ = req.reply.send(Response::UnknownService {
                            message: format!(
                                "no service {other:?} here: this baton runs one service, {}{}",
                                g.cfg.name,
                                crate::control::client::others(&g.cfg.control_path)
                            ),
                        });
                    }
                    _ => g.control(req),
                },
                event = std::future::poll_fn(|cx| poll_inputs(&mut s.events, &mut s.notify_rx, cx)) => {
                    g.event(event);
                }
                _ = housekeeping.tick() => g.housekeeping(),
                _ = async {
                    match watchdog.as_mut() {
                        Some(tick) => tick.tick().await,
                        None => std::future::pending().await,
                    }
                } => g.systemd.watchdog_ping(),
                () = sleep => g.tick(),
            }
            g.publish();
        }
    }

    /// After the loop: the control socket goes first (closed, file
    /// removed), and the listeners (every generation is gone), so that a
    /// new baton may take their paths as soon as `baton stop` returns; then
    /// those waiting for the stop are told, and their answers written.
    async fn finish(self) -> ExitCode {
        let Running {
            s: Service {
                mut g, watch_task, ..
            },
            control_task,
            metrics_task,
            ..
        } = self;
        let code = g.exit.unwrap_or(1);
        // Proxy mode: what clients were sent (answers to their last
        // requests, HTTP/2 streams refused by an app that stopped) goes out
        // before baton does, within a bound.
        if let Some(clients) = g.procs.launch.quiesce() {
            let _ = tokio::time::timeout(CLIENTS_GRACE, clients).await;
        }
        control_task.abort();
        let _ = control_task.await;
        if let Some(control) = g.cfg.control.as_mut() {
            control.remove();
        }
        g.orphans.finish();
        g.cfg.listeners.clear();
        for waiter in g.stop_waiters.drain(..) {
            let _ = waiter.send(Response::Stopped { code });
        }
        let control = g
            .pressure
            .caps()
            .find(|(name, _)| *name == "control")
            .map(|(_, c)| Arc::clone(c));
        if let Some(control) = control {
            let _ = tokio::time::timeout(Duration::from_secs(1), control.closed()).await;
        }
        if let Some(task) = metrics_task {
            task.abort();
        }
        if let Some(task) = watch_task {
            task.abort();
        }
        info!(code, "stopped");
        ExitCode::from(code)
    }
}

/// The signal streams the loop waits on. Installed before the first spawn so
/// that no SIGCHLD (or stop request) is missed.
pub(super) struct Signals {
    pub(super) chld: SignalStream,
    pub(super) hup: SignalStream,
    pub(super) usr2: SignalStream,
    pub(super) term: SignalStream,
    pub(super) int: SignalStream,
    pub(super) quit: SignalStream,
    pub(super) usr1: SignalStream,
    pub(super) winch: SignalStream,
}

impl Signals {
    pub(super) fn new() -> std::io::Result<Signals> {
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

/// The upgrade's exec, losing no signal: every signal is blocked (the
/// proxy's and helper threads block them from their start, so only this
/// thread takes any), those the runtime already took are raised again,
/// now pending, and pending signals survive `execve` for the new image to
/// take once its handlers are installed (children that exit meanwhile are
/// reaped by the new image as it resumes). If the exec fails, the mask is
/// restored and they reach this image's handlers as usual.
pub(super) async fn exec_with_signals_kept(signals: &mut Signals, exec: impl FnOnce()) {
    let Ok(mask) = sys::exec::block_signals() else {
        exec();
        return;
    };
    // A signal taken just before the block is in the runtime's pipe: one
    // turn of the runtime's driver passes it on to its stream.
    tokio::task::yield_now().await;
    for (stream, signal) in [
        (&mut signals.hup, Signal::HUP),
        (&mut signals.usr2, Signal::USR2),
        (&mut signals.term, Signal::TERM),
        (&mut signals.int, Signal::INT),
        (&mut signals.quit, Signal::QUIT),
        (&mut signals.usr1, Signal::USR1),
        (&mut signals.winch, Signal::WINCH),
    ] {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if stream.poll_recv(&mut cx).is_ready() {
            let _ = sys::signal::send(std::process::id() as i32, signal);
        }
    }
    exec();
    sys::exec::restore_signals(&mask);
}
