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
const CLIENTS_GRACE: Duration = Duration::from_secs(2);

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
    g: Guardian,
    signals: Signals,
    control_rx: mpsc::UnboundedReceiver<ControlRequest>,
    events: mpsc::UnboundedReceiver<Event>,
    notify_rx: mpsc::Receiver<(Slot, Datagram)>,
    housekeeping: tokio::time::Interval,
    /// `WATCHDOG=1` for the service manager, at half its period.
    watchdog: Option<tokio::time::Interval>,
    control_task: tokio::task::JoinHandle<()>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    watch_task: Option<AbortHandle>,
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
        let control = cfg
            .control
            .as_mut()
            .and_then(|c| c.listener.take())
            .context("the control socket")?;
        // A second descriptor of it, for an upgrade to hand over.
        let control_fd = OwnedFd::from(control.try_clone().context("the control socket")?);
        control.set_nonblocking(true)?;
        let control = tokio::net::UnixListener::from_std(control)
            .context("registering the control socket")?;
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let control_connections =
            baton::serve::Connections::new(crate::sys::limits::CONTROL_CONNECTIONS);
        let control_task = tokio::spawn(crate::control::server::serve(
            control,
            control_tx,
            Arc::clone(&control_connections),
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
        info!(path = %cfg.control_path.display(), name = %cfg.name, pid = std::process::id(), "control");

        let (events_tx, events) = mpsc::unbounded_channel();
        let metrics = metrics::Shared::default();
        let metrics_task = cfg
            .metrics
            .as_ref()
            .map(|listener| {
                let listener = listener.try_clone().context("the metrics listener")?;
                if let Ok(addr) = listener.local_addr() {
                    info!(addr = %addr, "metrics");
                }
                anyhow::Ok(tokio::spawn(metrics::serve(listener, Arc::clone(&metrics))))
            })
            .transpose()?;
        let watch_task = cfg
            .watch
            .clone()
            .map(|path| watch::spawn(path, events_tx.clone(), || Event::Watched));
        let mut caps = vec![("control", Arc::clone(&control_connections))];
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
            handover.as_ref().map_or(0, |h| h.notify_rejected),
        ));
        let pressure = pressure::Pressure::new(Arc::clone(&rejected), caps, stray);
        if let Ok(mut m) = metrics.lock() {
            m.control = Some(control_connections);
            m.nofile_limit = cfg.nofile.soft;
        }
        let (notify_tx, notify_rx) = mpsc::channel(notify::QUEUE);
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        let watchdog = systemd::Systemd::watchdog().map(|period| {
            info!(
                period_ms = period.as_millis() as u64,
                "watchdog: telling the service manager the loop is alive"
            );
            let mut tick = tokio::time::interval((period / 2).max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let now = Instant::now();
        let policy = match &handover {
            Some(h) => Policy::restore(cfg.policy.clone(), h.policy.clone()),
            None => Policy::new(cfg.policy.clone()),
        };
        let keeper = handover.as_ref().and_then(|h| h.keeper);
        let mut g = Guardian {
            orphans: orphans::Orphans::new(&cfg, keeper),
            releases: release::Releases::default(),
            control_fd,
            upgrade: None,
            upgrades: handover.as_ref().map_or(0, |h| h.upgrades),
            upgraded_at: handover.as_ref().map(|_| now),
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
            listener_rearms: handover.as_ref().map_or(0, |h| h.listener_rearms),
            failed_hint: None,
            metrics,
            observed: metrics::Observed::default(),
            systemd: systemd::Systemd::resume(handover.as_ref().is_some_and(|h| h.systemd_ready)),
            stop_waiters: Vec::new(),
            clients_first: None,
            started: handover
                .as_ref()
                .map_or(now, |h| sys::clock::instant(h.started_ns)),
            event_at: now,
            exit: None,
            exec_pending: false,
        };
        match (handover, left) {
            (Some(h), _) => takeover::resume(&mut g, h),
            (None, left) => {
                // Children that exited before the handler was installed are
                // reaped on the first SIGCHLD or here.
                g.reap();
                g.systemd.store(&g.cfg.listeners);
                g.orphans.start_keeper(&g.cfg, &mut g.procs.children);
                // This baton's keeper holds copies now (or none will): the
                // dead baton's keeper may let go.
                if let Some(handoff) = left.handoff {
                    handoff.finish();
                }
                match left.adoption {
                    Some(s) => takeover::adopt(&mut g, s),
                    None => {
                        let start = g.policy.start(now);
                        g.apply(start);
                    }
                }
            }
        }
        Ok(Running {
            g,
            signals,
            control_rx,
            events,
            notify_rx,
            housekeeping,
            watchdog,
            control_task,
            metrics_task,
            watch_task,
        })
    }

    /// The loop: until baton exits.
    async fn serve(&mut self) {
        let Running {
            g,
            signals,
            control_rx,
            events,
            notify_rx,
            housekeeping,
            watchdog,
            ..
        } = self;
        while g.exit.is_none() {
            if std::mem::take(&mut g.exec_pending) {
                exec_with_signals_kept(g, signals).await;
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
                Some(req) = control_rx.recv() => g.control(req),
                Some(event) = events.recv() => g.event(event),
                Some((slot, datagram)) = notify_rx.recv() => {
                    g.event(Event::Notify { slot, datagram });
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
            mut g,
            control_task,
            metrics_task,
            watch_task,
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

/// The upgrade's exec, losing no signal: every signal is blocked (the
/// proxy's and helper threads block them from their start, so only this
/// thread takes any), those the runtime already took are raised again,
/// now pending, and pending signals survive `execve` for the new image to
/// take once its handlers are installed (children that exit meanwhile are
/// reaped by the new image as it resumes). If the exec fails, the mask is
/// restored and they reach this image's handlers as usual.
async fn exec_with_signals_kept(g: &mut Guardian, signals: &mut Signals) {
    let Ok(mask) = sys::exec::block_signals() else {
        g.upgrade_exec();
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
    g.upgrade_exec();
    sys::exec::restore_signals(&mask);
}
