//! How a generation reaches clients, chosen once at start:
//!
//! - [`Sockets`]: the generation inherits baton's listening sockets as fds
//!   3, 4, … (`LISTEN_FDS`) and accepts on them itself; the kernel's accept
//!   queue carries clients across a handover; a retired generation gets its
//!   stop signal at once.
//! - [`Proxied`]: the generation listens on a private loopback port (`$PORT`)
//!   and baton's proxy sends it traffic once it passes its health check; a
//!   retired generation gets its stop signal once nothing baton sent it is
//!   in flight.
//!
//! The event loop calls [`Launch::launch`], [`Launch::cut_over`] and
//! [`Launch::drain`] and never asks which one it has.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton::vars;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use super::children::Children;
use super::diagnose;
use super::event::Event;
use super::generation::{Handles, Process, Route, Slot};
use super::readiness::{self, Gate, Source};
use super::release::Release;
use crate::config::{ProxyConfig, RunConfig};
use crate::spec::{ReadyMode, Signal};
use crate::sys;
use crate::sys::notify_socket::NotifySocket;

/// A generation just started.
#[derive(Debug)]
pub struct Launched {
    /// Its process.
    pub process: Process,
    /// How clients reach it.
    pub route: Route,
    /// Its readiness sources and tasks.
    pub handles: Handles,
    /// Its notification socket, for the loop to read.
    pub notify: NotifySocket,
}

/// What a launch strategy works with.
#[derive(Debug)]
pub struct Cx<'a> {
    /// The configuration.
    pub cfg: &'a RunConfig,
    /// Starting processes.
    pub children: &'a mut Children,
    /// The loop's event channel, for readiness sources and drains.
    pub events: &'a UnboundedSender<Event>,
}

/// Completes once a launch's client connections have finished.
pub type Quiesced = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// How generations reach clients.
pub trait Launch: std::fmt::Debug {
    /// Starts worker process `slot` from `release`: its process,
    /// environment, route and readiness sources.
    fn launch(&mut self, cx: Cx<'_>, slot: Slot, release: &Release) -> std::io::Result<Launched>;

    /// New traffic goes to `serving` (the serving generation's worker
    /// processes that are ready) from now on; empty: to nobody (it waits).
    fn cut_over(&mut self, serving: &[&Handles]);

    /// Asks worker process `slot` (`pid`), retired by its successor, to
    /// drain with `signal`: now, or once its traffic is done (then the loop
    /// hears `Event::Drained` and calls [`Launch::drained`]).
    fn drain(
        &mut self,
        cx: Cx<'_>,
        slot: Slot,
        pid: i32,
        signal: Signal,
        handles: &mut Handles,
        handover_us: u64,
    );

    /// A retired generation's traffic is done (or its drain wait
    /// passed): sends the signal held back by [`Launch::drain`].
    fn drained(&mut self, slot: Slot, pid: i32, handles: &mut Handles) {
        let _ = (slot, pid, handles);
    }

    /// Worker process `slot` (`pid`) serves now: look it over (a port of its
    /// own in socket mode); `inherited` are the inodes of baton's listeners.
    fn serving(
        &mut self,
        cx: Cx<'_>,
        slot: Slot,
        pid: i32,
        inherited: &std::collections::HashSet<u64>,
    ) {
        let _ = (cx, slot, pid, inherited);
    }

    /// It was seen listening on `addrs` by itself: the warning to log, if
    /// any (once per generation).
    fn self_bound(
        &self,
        slot: Slot,
        pid: i32,
        handles: &Handles,
        addrs: &[SocketAddr],
    ) -> Option<String>;

    /// Why the starting worker process `slot` failed, as far as this
    /// strategy can tell (looked at while its process is still there).
    fn failure_hint(
        &self,
        slot: Slot,
        pid: i32,
        handles: &Handles,
        inherited: &std::collections::HashSet<u64>,
    ) -> Option<String>;

    /// Why a reload failed while `serving` (`pid`) serves, if its way of
    /// listening explains it.
    fn reload_hint(&self, serving: Slot, pid: i32, handles: &Handles) -> Option<String>;

    /// Whether the generations hold baton's listening sockets (and so may
    /// shut them down).
    fn shares_listeners(&self) -> bool;

    /// baton is stopping: stop taking new clients.
    fn stop(&mut self) {}

    /// baton is about to stop (`--shutdown-delay`): keep serving, but tell
    /// keep-alive clients to go (proxy mode: `Connection: close`).
    fn lame_duck(&mut self) {}

    /// Before an upgrade's exec: what must finish first, as a future that
    /// completes once it has (proxy mode: client connections drain while
    /// new ones wait in the accept queue); `None`: nothing.
    fn quiesce(&mut self) -> Option<Quiesced> {
        None
    }

    /// The upgrade was abandoned after [`Launch::quiesce`]: serve again.
    fn resume(&mut self, cfg: &RunConfig) -> anyhow::Result<()> {
        let _ = cfg;
        Ok(())
    }

    /// A generation handed over by a previous image: rebuild what reaches
    /// it (proxy mode: its upstream).
    fn adopt(&mut self, cx: Cx<'_>, slot: Slot, route: Route, handles: &mut Handles) {
        let _ = (cx, slot, route, handles);
    }

    /// A release is on probation (`--bake`), or none is (`None`): proxy
    /// mode splits traffic with the generation kept warm (`--canary`) and
    /// judges the new one's answers (`--max-error-rate`).
    fn probation(&mut self, bake: Option<Probation<'_>>, events: &UnboundedSender<Event>) {
        let _ = (bake, events);
    }
}

/// A release on probation, as [`Launch::probation`] sees it.
#[derive(Debug, Clone)]
pub struct Probation<'a> {
    /// The new generation's worker processes.
    pub new: Vec<&'a Handles>,
    /// The generation kept warm's, if any.
    pub old: Vec<&'a Handles>,
    /// How far into the bake (0..1).
    pub progress: f64,
}

/// The environment every generation gets: baton's own, minus the
/// protocol variables, plus its notification socket and number.
fn base_env(cfg: &RunConfig, slot: Slot, notify: &NotifySocket) -> Vec<(OsString, OsString)> {
    let mut env = cfg.base_env.clone();
    env.push((vars::NOTIFY_SOCKET.into(), notify.address.clone().into()));
    env.push((
        vars::BATON_GENERATION.into(),
        slot.generation.to_string().into(),
    ));
    env.push(("BATON_WORKER".into(), slot.worker.to_string().into()));
    env
}

fn log_spawn(slot: Slot, pid: i32, port: Option<u16>, since: Instant) {
    let spawn_us = since.elapsed().as_micros() as u64;
    let (generation, worker) = (slot.generation, slot.worker);
    match port {
        Some(port) => info!(generation, worker, pid, port, spawn_us, "spawn"),
        None => info!(generation, worker, pid, spawn_us, "spawn"),
    }
}

/// Socket passing (`LISTEN_FDS`).
#[derive(Debug, Default)]
pub struct Sockets;

impl Launch for Sockets {
    fn launch(&mut self, cx: Cx<'_>, slot: Slot, release: &Release) -> std::io::Result<Launched> {
        let since = Instant::now();
        let cfg = cx.cfg;
        let notify = NotifySocket::bind(&slot.label())?;
        let mut env = base_env(cfg, slot, &notify);
        let names: Vec<&str> = cfg.listeners.iter().map(|l| l.name.as_str()).collect();
        let starter: Vec<String> = cfg
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
        // A worker without a port (`--config-dir`) gets no socket
        // variables at all.
        if !cfg.listeners.is_empty() {
            set(vars::LISTEN_FDS, cfg.listeners.len().to_string());
            set(vars::LISTEN_FDNAMES, names.join(":"));
            set(vars::SERVER_STARTER_PORT, starter.join(";"));
        }
        let fds: Vec<_> = cfg.listeners.iter().map(|l| l.fd.as_fd()).collect();
        let (process, log_readers) =
            cx.children
                .start(slot, release, &cfg.args, &env, &fds, !fds.is_empty())?;
        drop(fds);
        log_spawn(slot, process.pid, None, since);
        let mut handles = Handles::default();
        handles.log_readers = log_readers;
        // READY=1 counts in every mode; a delay or a check is an
        // alternative for apps that cannot send it.
        match &cfg.ready {
            ReadyMode::Notify => handles.gate = Gate::any(&[Source::Notify]),
            ReadyMode::Delay(delay) => {
                handles.gate = Gate::any(&[Source::Notify, Source::Delay]);
                handles.tasks.push(readiness::after(
                    *delay,
                    cx.events.clone(),
                    Event::Ready(slot, Source::Delay),
                ));
            }
            ReadyMode::Exec(_) => {
                handles.gate = Gate::any(&[Source::Notify, Source::Exec]);
                handles.tasks.push(readiness::after(
                    Duration::ZERO,
                    cx.events.clone(),
                    Event::RunCheck(slot),
                ));
            }
        }
        Ok(Launched {
            process,
            route: Route::Sockets,
            handles,
            notify,
        })
    }

    fn cut_over(&mut self, _serving: &[&Handles]) {
        // The kernel's accept queue: whoever accepts.
    }

    fn drain(
        &mut self,
        _cx: Cx<'_>,
        slot: Slot,
        pid: i32,
        signal: Signal,
        handles: &mut Handles,
        handover_us: u64,
    ) {
        let (generation, worker) = (slot.generation, slot.worker);
        if let Err(e) = sys::signal::send(pid, signal) {
            warn!(generation, worker, pid, %signal, error = %e, "cannot signal the generation");
        }
        info!(generation, worker, pid, %signal, handover_us, "retire");
        handles.retired_at = Some(Instant::now());
    }

    fn serving(
        &mut self,
        cx: Cx<'_>,
        slot: Slot,
        pid: i32,
        inherited: &std::collections::HashSet<u64>,
    ) {
        // Cheap enough to run on the loop (see `sys::inspect`), once.
        let addrs = sys::inspect::own_listeners(pid, inherited);
        if !addrs.is_empty() {
            let _ = cx.events.send(Event::SelfBound { slot, addrs });
        }
    }

    fn self_bound(
        &self,
        slot: Slot,
        pid: i32,
        handles: &Handles,
        addrs: &[SocketAddr],
    ) -> Option<String> {
        handles
            .self_bound
            .is_empty()
            .then(|| diagnose::binds_own_port(slot.generation, pid, addrs))
    }

    fn failure_hint(
        &self,
        slot: Slot,
        pid: i32,
        _handles: &Handles,
        inherited: &std::collections::HashSet<u64>,
    ) -> Option<String> {
        let addrs = sys::inspect::own_listeners(pid, inherited);
        (!addrs.is_empty())
            .then(|| diagnose::not_ready_binds_own_port(slot.generation, pid, &addrs))
    }

    fn reload_hint(&self, serving: Slot, pid: i32, handles: &Handles) -> Option<String> {
        (!handles.self_bound.is_empty())
            .then(|| diagnose::binds_own_port(serving.generation, pid, &handles.self_bound))
    }

    fn shares_listeners(&self) -> bool {
        true
    }
}

/// Copies of `cfg`'s listeners for the proxy, each with whether it is a
/// Unix socket.
fn proxy_listeners(cfg: &RunConfig) -> anyhow::Result<Vec<(OwnedFd, bool)>> {
    use anyhow::Context;
    cfg.listeners
        .iter()
        .map(|l| Ok((l.fd.try_clone()?, l.local.starts_with("unix:"))))
        .collect::<std::io::Result<Vec<_>>>()
        .context("duplicating the listeners for the proxy")
}

/// Proxy mode: a private port per generation behind baton's proxy.
#[derive(Debug)]
pub struct Proxied {
    /// The worker processes whose answers are being judged.
    judged: Vec<Arc<crate::proxy::Upstream>>,
    cfg: ProxyConfig,
    drain_wait: Duration,
    proxy: Arc<crate::proxy::Proxy>,
    handle: crate::proxy::Handle,
}

impl Proxied {
    /// Starts the proxy on `cfg`'s listeners.
    pub fn start(cfg: &RunConfig, proxy_cfg: &ProxyConfig) -> anyhow::Result<Proxied> {
        use anyhow::Context;
        let proxy = crate::proxy::Proxy::new(cfg.policy.ready_timeout, proxy_cfg.limits.clone());
        let fds = proxy_listeners(cfg)?;
        let handle =
            crate::proxy::start(proxy_cfg.mode, fds, Arc::clone(&proxy), proxy_cfg.threads)
                .context("starting the proxy")?;
        let serve = &proxy_cfg.limits.serve;
        info!(
            mode = proxy_cfg.mode.as_str(),
            port_env = %proxy_cfg.port_env,
            max_connections = serve.connections.max(),
            header_timeout_ms = serve.header_timeout.map_or(0, |d| d.as_millis() as u64),
            idle_timeout_ms = serve.idle_timeout.map_or(0, |d| d.as_millis() as u64),
            upstream_timeout_ms = proxy_cfg.limits.upstream_timeout.as_millis() as u64,
            "proxy"
        );
        Ok(Proxied {
            judged: Vec::new(),
            cfg: proxy_cfg.clone(),
            drain_wait: proxy_cfg.drain_wait,
            proxy,
            handle,
        })
    }

    /// The proxy's view of worker process `slot` at `addr`.
    fn upstream(&self, cx: &Cx<'_>, slot: Slot, addr: SocketAddr) -> Arc<crate::proxy::Upstream> {
        let events = cx.events.clone();
        crate::proxy::Upstream::new(
            slot.generation,
            addr,
            self.cfg.limits.pool_idle(),
            Arc::clone(&self.proxy.counters.stray_answers),
            Box::new(move |_| {
                let _ = events.send(Event::Drained(slot));
            }),
        )
    }

    /// The shared proxy (its counters and connection cap).
    pub fn proxy(&self) -> &Arc<crate::proxy::Proxy> {
        &self.proxy
    }
}

impl Launch for Proxied {
    fn launch(&mut self, cx: Cx<'_>, slot: Slot, release: &Release) -> std::io::Result<Launched> {
        let since = Instant::now();
        let cfg = cx.cfg;
        let port = crate::proxy::private_port()?;
        let addr = crate::proxy::private_addr(port);
        let notify = NotifySocket::bind(&slot.label())?;
        let mut env = base_env(cfg, slot, &notify);
        env.retain(|(k, _)| k != self.cfg.port_env.as_str());
        env.push((self.cfg.port_env.clone().into(), port.to_string().into()));
        let args: Vec<OsString> = cfg
            .args
            .iter()
            .map(|a| match a.to_str() {
                Some(text) if text.contains("{port}") => {
                    text.replace("{port}", &port.to_string()).into()
                }
                _ => a.clone(),
            })
            .collect();
        let (process, log_readers) = cx.children.start(slot, release, &args, &env, &[], false)?;
        let pid = process.pid;
        log_spawn(slot, pid, Some(port), since);
        let upstream = self.upstream(&cx, slot, addr);
        // Check the private port until it answers; meanwhile, look for the
        // app listening somewhere else (ignoring $PORT).
        let events = cx.events.clone();
        let health = self.cfg.health.clone();
        let checker = tokio::spawn(async move {
            let mut looked = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if health.passes(addr).await {
                    let _ = events.send(Event::Ready(slot, Source::Health));
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
                            slot,
                            addrs: elsewhere,
                        });
                    }
                }
            }
        });
        let needed: &[Source] = if self.cfg.require_notify {
            &[Source::Health, Source::Notify]
        } else {
            &[Source::Health]
        };
        let mut handles = Handles::default();
        handles.log_readers = log_readers;
        handles.tasks.push(checker.abort_handle());
        handles.gate = Gate::all(needed);
        handles.upstream = Some(upstream);
        Ok(Launched {
            process,
            route: Route::Private { port },
            handles,
            notify,
        })
    }

    fn cut_over(&mut self, serving: &[&Handles]) {
        let desired: Vec<Arc<crate::proxy::Upstream>> =
            serving.iter().filter_map(|h| h.upstream.clone()).collect();
        let current = self.proxy.members();
        let same = desired.len() == current.len()
            && desired
                .iter()
                .zip(current.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            if let Some(up) = desired.first() {
                let addrs: Vec<String> = desired.iter().map(|u| u.addr.to_string()).collect();
                info!(generation = up.generation, addr = %addrs.join(","), "switch");
            }
            self.proxy.switch(desired);
        }
    }

    fn drain(
        &mut self,
        cx: Cx<'_>,
        slot: Slot,
        pid: i32,
        signal: Signal,
        handles: &mut Handles,
        handover_us: u64,
    ) {
        let (generation, worker) = (slot.generation, slot.worker);
        // No new traffic; the stop signal once nothing is in flight, and
        // after the drain wait (--drain-wait) at the latest, so that a long-lived
        // stream cannot turn a graceful stop into a SIGKILL.
        handles.pending_stop = Some(signal);
        handles.retired_at = Some(Instant::now());
        if let Some(upstream) = &handles.upstream {
            info!(
                generation,
                worker,
                pid,
                in_flight = upstream.active(),
                handover_us,
                "retire: no new traffic; the stop signal follows once in-flight requests finish"
            );
            handles.tasks.push(readiness::after(
                self.drain_wait,
                cx.events.clone(),
                Event::Drained(slot),
            ));
            upstream.retire();
        }
    }

    fn drained(&mut self, slot: Slot, pid: i32, handles: &mut Handles) {
        let Some(signal) = handles.pending_stop.take() else {
            return;
        };
        let (generation, worker) = (slot.generation, slot.worker);
        let waited = handles
            .retired_at
            .map_or(0, |t| t.elapsed().as_millis() as u64);
        let in_flight = handles.upstream.as_ref().map_or(0, |u| u.active());
        if let Err(e) = sys::signal::send(pid, signal) {
            warn!(generation, worker, pid, %signal, error = %e, "cannot signal the generation");
        }
        if in_flight == 0 {
            info!(generation, worker, pid, %signal, drained_after_ms = waited, "retire: its proxied traffic is done");
        } else {
            warn!(generation, worker, pid, %signal, in_flight, waited_ms = waited,
                "retire: still busy after the drain wait (--drain-wait); sending the stop signal anyway");
        }
    }

    fn self_bound(
        &self,
        slot: Slot,
        _pid: i32,
        handles: &Handles,
        addrs: &[SocketAddr],
    ) -> Option<String> {
        let port = handles.upstream.as_ref()?.addr.port();
        handles
            .self_bound
            .is_empty()
            .then(|| diagnose::proxy_port(slot.generation, &self.cfg.port_env, port, addrs))
    }

    fn failure_hint(
        &self,
        slot: Slot,
        _pid: i32,
        handles: &Handles,
        _inherited: &std::collections::HashSet<u64>,
    ) -> Option<String> {
        let port = handles.upstream.as_ref()?.addr.port();
        Some(diagnose::proxy_port(
            slot.generation,
            &self.cfg.port_env,
            port,
            &handles.self_bound,
        ))
    }

    fn reload_hint(&self, _serving: Slot, _pid: i32, _handles: &Handles) -> Option<String> {
        None
    }

    fn shares_listeners(&self) -> bool {
        false
    }

    fn stop(&mut self) {
        self.handle.stop();
    }

    fn lame_duck(&mut self) {
        self.proxy
            .lame_duck
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn quiesce(&mut self) -> Option<Quiesced> {
        self.handle.stop();
        Some(Box::pin(self.handle.finished()))
    }

    fn resume(&mut self, cfg: &RunConfig) -> anyhow::Result<()> {
        use anyhow::Context;
        let fds = proxy_listeners(cfg)?;
        self.handle = crate::proxy::start(
            self.cfg.mode,
            fds,
            Arc::clone(&self.proxy),
            self.cfg.threads,
        )
        .context("starting the proxy again")?;
        info!("proxy: serving again");
        Ok(())
    }

    fn probation(&mut self, bake: Option<Probation<'_>>, events: &UnboundedSender<Event>) {
        let upstreams = |hs: &[&Handles]| -> Vec<Arc<crate::proxy::Upstream>> {
            hs.iter().filter_map(|h| h.upstream.clone()).collect()
        };
        let new = bake.as_ref().map(|b| upstreams(&b.new)).unwrap_or_default();
        let Some(bake) = bake.filter(|_| !new.is_empty()) else {
            // No probation (any more): no split, nobody judged.
            if !self.judged.is_empty() {
                for judged in self.judged.drain(..) {
                    judged.set_judge(None);
                }
                self.proxy.split(Vec::new(), 100);
            }
            return;
        };
        let old = upstreams(&bake.old);
        let canary = !self.cfg.canary.is_empty() && !old.is_empty();
        if canary {
            let steps = self.cfg.canary.len();
            let step = ((bake.progress * steps as f64) as usize).min(steps - 1);
            self.proxy.split(old.clone(), self.cfg.canary[step]);
        }
        let fresh: Vec<Arc<crate::proxy::Upstream>> = new
            .into_iter()
            .filter(|n| !self.judged.iter().any(|j| Arc::ptr_eq(j, n)))
            .collect();
        if self.cfg.mode == crate::proxy::Mode::Http {
            use crate::proxy::upstream::{Baseline, Judge, tally_of};
            for member in &fresh {
                // With a canary, against the previous release over the same
                // window; without, against its record before the cutover.
                let baseline = if canary {
                    Baseline::Beside(old.clone(), tally_of(&old))
                } else {
                    Baseline::Before(tally_of(&old))
                };
                let events = events.clone();
                member.set_judge(Some(Judge {
                    baseline,
                    since: member.tally(),
                    max_rate: self.cfg.max_error_rate,
                    on_worse: Box::new(move |generation, why| {
                        let _ = events.send(Event::Worse { generation, why });
                    }),
                }));
            }
        }
        self.judged.extend(fresh);
    }

    fn adopt(&mut self, cx: Cx<'_>, slot: Slot, route: Route, handles: &mut Handles) {
        let Route::Private { port } = route else {
            return;
        };
        handles.upstream = Some(self.upstream(&cx, slot, crate::proxy::private_addr(port)));
    }
}
