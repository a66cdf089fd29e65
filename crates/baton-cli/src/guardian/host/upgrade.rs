//! `baton upgrade` of a baton that runs several services: the same steps
//! as for one (`guardian/upgrade.rs`: refused during a reload or a stop,
//! the candidate's check, what cannot be handed over finished, then
//! `execve`), with a handover of the whole instance: its control socket,
//! metrics endpoint and keeper process, and each service's own handover.
//! The new image ([`Host::resumed`]) goes on from it: every service's
//! generations are still this pid's children, nothing is restarted.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Common, Control, Entry, Host, Idle, Note, Service, Then, running};
use crate::cli::RunArgs;
use crate::config_dir;
use crate::control::server::ControlRequest;
use crate::exit::ExitStatus;
use crate::guardian::handover::{self, Instance, ServiceHandover};
use crate::guardian::upgrade::{Step, Upgrade};
use crate::guardian::{keeper, metrics, systemd, takeover};
use crate::spec::Signal;
use crate::sys;

/// How long a candidate's check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

impl Host {
    /// `baton upgrade`: refused at once during a stop, another upgrade or
    /// a reload of any service; else the candidate's check starts.
    pub(super) fn upgrade_begin(
        &mut self,
        conn: std::os::unix::net::UnixStream,
        binary: Option<PathBuf>,
        check_only: bool,
    ) {
        let binary = binary.unwrap_or_else(|| self.exe.clone());
        let mut up = Upgrade::new(conn, binary, check_only, CHECK_TIMEOUT);
        let started = if self.upgrade.is_some() {
            Err("an upgrade is already under way".to_owned())
        } else if self.stopping.is_some() {
            Err("baton is stopping".to_owned())
        } else {
            let env: Vec<_> = std::env::vars_os()
                .filter(|(k, _)| k != handover::ENV)
                .collect();
            self.handover(None, up.nonce).and_then(|(state, _)| {
                up.start_check_with(&state, |binary, args, fds| {
                    sys::spawn::helper(binary, args, &env, fds, false)
                })
            })
        };
        if let Some(up) = up.begun(started) {
            self.upgrade = Some(up);
        }
    }

    /// Whether `pid` was the candidate's check (its outcome taken).
    pub(super) fn upgrade_checked(&mut self, pid: i32, status: ExitStatus) -> bool {
        let Some(up) = self.upgrade.as_mut() else {
            return false;
        };
        if up.check.as_ref().is_none_or(|(p, _)| *p != pid) {
            return false;
        }
        // What it left behind (its group) goes with it.
        let _ = sys::signal::send_group(pid, Signal::KILL);
        let step = up.checked(pid, status);
        self.upgrade_step(step);
        true
    }

    /// A check past its deadline is killed, and the upgrade is over.
    pub(super) fn upgrade_tick(&mut self, now: Instant) {
        if let Some(up) = self.upgrade.as_mut()
            && let Some(pid) = up.overdue(now, CHECK_TIMEOUT)
        {
            let _ = sys::signal::send_group(pid, Signal::KILL);
            self.upgrade = None;
        }
    }

    /// baton stops: the upgrade is abandoned.
    pub(super) fn upgrade_stopping(&mut self) {
        if let Some(mut up) = self.upgrade.take()
            && let Some(pid) = up.stopping()
        {
            let _ = sys::signal::send_group(pid, Signal::KILL);
        }
    }

    fn upgrade_step(&mut self, step: Step) {
        match step {
            Step::Wait => {}
            Step::Over => self.upgrade = None,
            Step::Exec => self.exec_pending = true,
            Step::Quiesce => {
                // Each proxy's client connections finish first (new ones
                // wait in the accept queue), within the longest
                // --stop-timeout.
                let limit = self.quiesce_limit();
                let waits: Vec<_> = self
                    .running()
                    .filter_map(|s| s.g.procs.launch.quiesce())
                    .collect();
                if waits.is_empty() {
                    self.exec_pending = true;
                    return;
                }
                info!("upgrade: waiting for client connections to finish; new ones wait");
                let notes = self.notes.clone();
                tokio::spawn(async move {
                    let all = async {
                        for wait in waits {
                            wait.await;
                        }
                    };
                    let finished = tokio::time::timeout(limit, all).await.is_ok();
                    let _ = notes.send(Note::Quiesced(finished));
                });
            }
        }
    }

    fn quiesce_limit(&self) -> Duration {
        self.entries
            .iter()
            .filter_map(|e| e.run.as_ref())
            .map(|s| s.g.cfg.policy.stop_timeout)
            .max()
            .unwrap_or(Duration::from_secs(30))
    }

    /// What an upgrade waited for has finished, or not in time.
    pub(super) fn upgrade_quiesced(&mut self, finished: bool) {
        let limit = self.quiesce_limit();
        if let Some(up) = self.upgrade.as_mut() {
            let step = up.quiesced(finished, limit);
            if step == Step::Over {
                self.serve_again();
            }
            self.upgrade_step(step);
        }
    }

    /// Every proxy serves again (an upgrade did not happen).
    fn serve_again(&mut self) {
        for s in self.running() {
            if let Err(e) = s.g.procs.launch.resume(&s.g.cfg) {
                warn!(error = %format!("{e:#}"), "the proxy could not serve again");
            }
        }
    }

    /// Replaces this image with the checked binary; returns only if that
    /// failed (the client is told, and baton goes on). Called with every
    /// signal blocked.
    pub(super) fn upgrade_exec(&mut self) {
        let Some(mut up) = self.upgrade.take() else {
            return;
        };
        let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
        let failed = self
            .handover(Some((up.conn.as_raw_fd(), up.began)), up.nonce)
            .and_then(|(state, fds)| Err::<(), _>(up.exec(&state, fds, &argv)));
        if let Err(why) = failed {
            self.serve_again();
            up.failed(&why);
        }
    }

    /// What the next image needs, and the descriptors it names.
    fn handover(
        &self,
        reply: Option<(std::os::fd::RawFd, Instant)>,
        nonce: u64,
    ) -> Result<(Instance, Vec<BorrowedFd<'_>>), String> {
        let mut fds = vec![self.control.listener.as_fd(), self.lock.as_fd()];
        let metrics_fd = self.metrics.as_ref().map(|m| {
            fds.push(m.as_fd());
            m.as_raw_fd()
        });
        let keeper = self.keeper.as_ref().map(|k| {
            fds.push(k.conn());
            (k.process, k.conn().as_raw_fd())
        });
        let mut services = Vec::new();
        for e in &self.entries {
            let handover = match &e.run {
                Some(s) => {
                    let (h, theirs) =
                        s.g.handover(None, nonce)
                            .map_err(|why| format!("{}: {why}", e.def.name))?;
                    fds.extend(theirs);
                    Some(Box::new(h))
                }
                None => None,
            };
            services.push(ServiceHandover {
                name: e.def.name.clone(),
                file: e.def.file.clone(),
                text: e.def.text.clone(),
                idle: e.run.is_none().then(|| e.idle.clone()),
                handover,
            });
        }
        let state = Instance {
            version: handover::VERSION,
            from: handover::baton_version().to_owned(),
            name: self.name.clone(),
            exe: self.exe.clone(),
            control_path: self.control_path.clone(),
            control_fd: self.control.listener.as_raw_fd(),
            metrics_fd,
            keeper,
            keeper_restarts: self.keeper_restarts,
            services,
            nofile: self.nofile,
            upgrades: self.upgrades + 1,
            upgrade_began_ns: sys::clock::monotonic_ns(reply.map_or_else(Instant::now, |r| r.1)),
            reply_fd: reply.map(|r| r.0),
            systemd_ready: self.systemd.is_ready(),
            nonce,
            lock_fd: self.lock.as_raw_fd(),
            orphans: self.instance.orphans,
            proxy_threads: self.instance.proxy_threads,
            max_connections: self.instance.max_connections,
        };
        Ok((state, fds))
    }

    /// The new image's start after `baton upgrade`: the instance goes on
    /// from the handover `i`, every service's generations are ours, and
    /// the client is told.
    pub(super) fn resumed(
        dir: PathBuf,
        cli: RunArgs,
        i: Instance,
        control_tx: mpsc::UnboundedSender<ControlRequest>,
        notes_tx: mpsc::UnboundedSender<Note>,
    ) -> anyhow::Result<(Host, Option<tokio::task::JoinHandle<()>>)> {
        let take = sys::exec::take_fd;
        let listener = std::os::unix::net::UnixListener::from(
            take(i.control_fd).context("the control socket")?,
        );
        let control = Control::serve(listener, control_tx)?;
        let lock = take(i.lock_fd).context("the directory's lock")?;
        let metrics = i
            .metrics_fd
            .map(|fd| take(fd).map(std::net::TcpListener::from))
            .transpose()
            .context("the metrics listener")?;
        let keeper = i.keeper.and_then(|(process, fd)| {
            keeper::Host::handed_over(process, fd)
                .inspect_err(|e| warn!(error = %e, "the keeper's connection was not handed over"))
                .ok()
                .map(Arc::new)
        });
        let instance = RunArgs {
            name: Some(i.name.clone()),
            control: Some(i.control_path.clone()),
            orphans: i.orphans,
            proxy_threads: i.proxy_threads,
            max_connections: i.max_connections,
            ..RunArgs::default()
        };
        let mut host = Host {
            dir,
            cli,
            name: i.name.clone(),
            control_path: i.control_path.clone(),
            nofile: i.nofile,
            entries: Vec::new(),
            board: metrics::Board::default(),
            control,
            metrics,
            systemd: systemd::Systemd::resume(i.systemd_ready),
            stopping: None,
            stop_waiters: Vec::new(),
            notes: notes_tx,
            keeper,
            keeper_restarts: i.keeper_restarts,
            socket: crate::bound::ControlSocket {
                listener: None,
                path: i.control_path.clone(),
                removed: false,
            },
            upgrade: None,
            upgrades: i.upgrades,
            exec_pending: false,
            instance,
            exe: i.exe.clone(),
            lock,
            updating: false,
        };
        let metrics_task = running::serve_metrics(host.metrics.as_ref(), &host.board)?;
        for sh in i.services {
            let def = match config_dir::parse_service(&sh.file, sh.text, &host.cli, &host.instance)
            {
                Ok(def) => def,
                Err(e) => {
                    warn!(service = %sh.name, error = %e, "upgrade: the service's settings do not read any more; its processes are stopped");
                    stop_handed_over(sh.handover.as_deref());
                    continue;
                }
            };
            host.entries.push(Entry {
                def,
                run: None,
                idle: sh.idle.unwrap_or(Idle::Waiting),
                start_waiters: Vec::new(),
                then: Then::Nothing,
                stop_asked: false,
                retired: Vec::new(),
                prepared: None,
            });
            if let Some(h) = sh.handover {
                let at = host.entries.len() - 1;
                if let Err(e) = host.resume_service(at, &h) {
                    let why = format!("{e:#}");
                    warn!(service = %sh.name, "upgrade: the service could not go on ({why}); its processes are stopped");
                    stop_handed_over(Some(&h));
                    host.entries[at].idle = Idle::Failed(2, why);
                }
            }
        }
        let took_ms = takeover::took_ms(i.upgrade_began_ns);
        info!(
            from = %i.from,
            to = handover::baton_version(),
            upgrades = i.upgrades,
            took_ms,
            services = host.entries.len(),
            "upgraded: this image took over"
        );
        if let Some(fd) = i.reply_fd {
            takeover::answer_upgraded(fd, &i.from, took_ms);
        }
        // The signals blocked for the exec: what arrived meanwhile is
        // delivered now.
        sys::exec::unblock_signals();
        host.reap();
        Ok((host, metrics_task))
    }

    /// Service `at` goes on from its handover `h`.
    fn resume_service(&mut self, at: usize, h: &handover::Handover) -> anyhow::Result<()> {
        let def = self.entries[at].def.clone();
        let (mut cfg, _) =
            crate::startup::start(self.args(&def), baton::Listeners::default(), Some(h))?;
        // The instance's control socket serves it (its own copy goes).
        cfg.control = None;
        let common = Common {
            control: &self.control.listener,
            control_connections: &self.control.connections,
            board: &self.board,
            service: Some(&def.name),
            keeper: self.keeper.as_ref(),
        };
        let mut s = Service::new(cfg, Some(h), &common)?;
        s.with(|g| takeover::resume_service(g, h, false));
        self.entries[at].run = Some(s);
        Ok(())
    }
}

/// A service that cannot go on after an upgrade: its processes (this
/// pid's children) get SIGTERM, and are reaped as orphans.
fn stop_handed_over(h: Option<&handover::Handover>) {
    for g in h
        .map(|h| h.policy.generations.as_slice())
        .unwrap_or_default()
    {
        for p in &g.processes {
            let _ = sys::signal::send_group(p.process.pid, Signal::TERM);
        }
    }
}
