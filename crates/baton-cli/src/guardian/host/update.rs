//! `baton update` (and SIGHUP): the directory read again, and each
//! change applied to its service alone.

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::calls::{plain, reconfigure};
use super::{Change, Entry, Host, Idle, Note, Then};
use crate::config_dir::{self, ServiceDef};
use crate::control::proto::{Request, Response, ServiceChange};
use crate::guardian::Waiter;

impl Host {
    /// `baton update` (and SIGHUP): reads the directory again. Added files
    /// start, removed ones stop gracefully, changed ones are applied (a
    /// reload with the new settings, or a graceful restart for a change a
    /// reload cannot carry), the rest is not touched. A file that cannot
    /// be used is named and its service left as it was. The answer (or,
    /// for SIGHUP, the log) says what was done to each.
    pub(super) fn update(&mut self, reply: Option<Waiter>) {
        if self.stopping.is_some() {
            if let Some(reply) = reply {
                let _ = reply.send(Response::Stopping);
            }
            return;
        }
        if self.updating {
            let why = "an update is under way; run it again once it has finished";
            warn!("update refused: {why}");
            if let Some(reply) = reply {
                let _ = reply.send(Response::Error {
                    message: why.to_owned(),
                });
            }
            return;
        }
        let read = match config_dir::reread(&self.dir, &self.cli) {
            Ok(read) => read,
            Err(e) => {
                let change = failed("*", "read", e.to_string());
                report(reply, vec![Pending::Done(change)]);
                return;
            }
        };
        info!(dir = %self.dir.display(), "update: reading the directory again");
        let mut pending = Vec::new();
        // The instance's own keys are read at start only: a change is
        // named, not applied.
        let i = &read.instance;
        let name = i.name.clone().unwrap_or_default();
        let control = i
            .control
            .clone()
            .unwrap_or_else(|| crate::control::default_path(&name));
        let now = (
            name,
            control,
            i.orphans.unwrap_or_default(),
            i.metrics.is_some(),
            i.proxy_threads,
            i.max_connections,
        );
        let before = (
            self.name.clone(),
            self.control_path.clone(),
            self.instance.orphans.unwrap_or_default(),
            self.metrics.is_some(),
            self.instance.proxy_threads,
            self.instance.max_connections,
        );
        if now != before {
            pending.push(Pending::Done(failed(
                config_dir::INSTANCE_FILE,
                "skipped",
                "the instance's keys changed: they apply when baton starts again".to_owned(),
            )));
        }
        let skipped: Vec<String> = read
            .skipped
            .iter()
            .map(|(file, why)| {
                let stem = file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                pending.push(Pending::Done(failed(
                    &stem,
                    "skipped",
                    format!("{why}; the service is left as it was"),
                )));
                stem
            })
            .collect();
        // Removed.
        let wanted: Vec<&str> = read.services.iter().map(|d| d.name.as_str()).collect();
        for i in 0..self.entries.len() {
            let name = self.entries[i].def.name.clone();
            if wanted.contains(&name.as_str()) || skipped.contains(&name) {
                continue;
            }
            let e = &mut self.entries[i];
            e.then = Then::Remove;
            match e.run.as_mut() {
                Some(s) => {
                    e.stop_asked = true;
                    let (tx, rx) = oneshot::channel();
                    s.with(|g| g.control(plain(Request::Stop, tx)));
                    pending.push(Pending::Wait(name, "stopped", rx));
                }
                None => pending.push(Pending::Done(done(
                    &name,
                    "stopped",
                    "removed (it was not running)",
                ))),
            }
        }
        // Added and changed, in the new order.
        let mut order: Vec<String> = Vec::new();
        for def in read.services {
            order.push(def.name.clone());
            let name = def.name.clone();
            let Some(i) = self.find(&name) else {
                let autostart = def.autostart;
                self.entries.push(Entry {
                    def,
                    run: None,
                    idle: if autostart {
                        Idle::Waiting
                    } else {
                        Idle::NotStarted
                    },
                    start_waiters: Vec::new(),
                    then: Then::Nothing,
                    stop_asked: false,
                    retired: Vec::new(),
                    prepared: None,
                });
                if autostart {
                    let (tx, rx) = oneshot::channel();
                    let i = self.entries.len() - 1;
                    self.entries[i].start_waiters.push(tx);
                    pending.push(Pending::Wait(name, "started", rx));
                } else {
                    pending.push(Pending::Done(done(
                        &name,
                        "added",
                        "autostart = false: not started",
                    )));
                }
                continue;
            };
            let kind = config_dir::change(&self.entries[i].def, &def);
            let e = &mut self.entries[i];
            match (kind, e.run.as_mut()) {
                (Change::None, _) => e.def = def,
                (_, None) if e.def.autostart && matches!(e.idle, Idle::Failed(..)) => {
                    // It failed to start: with its file changed, it tries
                    // again.
                    e.def = def;
                    e.idle = Idle::Waiting;
                    let (tx, rx) = oneshot::channel();
                    e.start_waiters.push(tx);
                    pending.push(Pending::Wait(name, "started", rx));
                }
                (_, None) => {
                    e.def = def;
                    pending.push(Pending::Done(done(
                        &name,
                        "updated",
                        "not running: the new settings apply when it starts",
                    )));
                }
                (Change::Reload, Some(_)) => {
                    let new = crate::config::RunConfig::from_args(self.args(&def), self.nofile);
                    let e = &mut self.entries[i];
                    let Some(s) = e.run.as_mut() else { continue };
                    let new = new.map_err(|e| e.to_string()).and_then(|mut cfg| {
                        if cfg.listen == s.g.cfg.listen {
                            return Ok(cfg);
                        }
                        // New listeners are bound now; those no longer
                        // named are retired (the old generation keeps its
                        // own copies until it exits).
                        let current = std::mem::take(&mut s.g.cfg.listeners);
                        match crate::startup::rebind(&cfg.listen, &s.g.cfg.listen, current) {
                            Ok((listeners, retired)) => {
                                cfg.listeners = listeners;
                                e.retired = retired;
                                Ok(cfg)
                            }
                            Err((why, back)) => {
                                s.g.cfg.listeners = back;
                                Err(why.to_string())
                            }
                        }
                    });
                    match new {
                        Err(why) => pending.push(Pending::Done(failed(
                            &name,
                            "reloaded",
                            format!("{why}; the service is left as it was"),
                        ))),
                        Ok(cfg) => {
                            s.with(|g| reconfigure(g, cfg));
                            let old = std::mem::replace(&mut e.def, def);
                            let (tx, rx) = oneshot::channel();
                            s.with(|g| {
                                g.trigger(crate::guardian::policy::Trigger::Control, Some(tx))
                            });
                            pending.push(Pending::Reload(name, Box::new(old), rx));
                        }
                    }
                }
                (Change::Restart, Some(_)) => {
                    // Checked, and its new listeners bound, before the old
                    // one stops: a change that cannot start leaves the
                    // service as it was.
                    let new = crate::config::RunConfig::from_args(self.args(&def), self.nofile);
                    let e = &mut self.entries[i];
                    let Some(s) = e.run.as_mut() else { continue };
                    let listeners = new
                        .map_err(|e| e.to_string())
                        .and_then(|cfg| carried(&cfg.listen, &mut s.g.cfg));
                    match listeners {
                        Err(why) => pending.push(Pending::Done(failed(
                            &name,
                            "restarted",
                            format!("{why}; the service is left as it was"),
                        ))),
                        Ok(listeners) => {
                            e.stop_asked = true;
                            s.with(|g| g.stop("update"));
                            e.then = Then::Start(Box::new(def), listeners);
                            let (tx, rx) = oneshot::channel();
                            e.start_waiters.push(tx);
                            pending.push(Pending::Wait(name, "restarted", rx));
                        }
                    }
                }
            }
        }
        // Skipped services keep their place; the rest follow the new order.
        self.entries.sort_by_key(|e| {
            order
                .iter()
                .position(|n| *n == e.def.name)
                .unwrap_or(usize::MAX)
        });
        let notes = self.notes.clone();
        self.updating = true;
        tokio::spawn(async move {
            let mut changes = Vec::new();
            for p in pending {
                changes.push(p.outcome(&notes).await);
            }
            let _ = notes.send(Note::Updated);
            send_report(reply, changes);
        });
    }
}

/// The listeners a service restarted with `listen` starts with: those it
/// has that are still named (the same sockets, so nothing is refused
/// while it restarts; their socket files go with them), the others bound
/// now.
fn carried(
    listen: &[crate::spec::ListenSpec],
    cfg: &mut crate::config::RunConfig,
) -> Result<Vec<crate::config::BoundListener>, String> {
    let copies = cfg
        .listeners
        .iter()
        .map(|l| {
            Ok(crate::config::BoundListener {
                name: l.name.clone(),
                fd: l.fd.try_clone()?,
                local: l.local.clone(),
                server_starter_key: l.server_starter_key.clone(),
                tcp: l.tcp,
                broken_reported: false,
                unix_path: None,
            })
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    let (mut listeners, _) =
        crate::startup::rebind(listen, &cfg.listen, copies).map_err(|(e, _)| e.to_string())?;
    for l in &mut listeners {
        if let Some(old) = cfg.listeners.iter_mut().find(|o| o.local == l.local) {
            l.unix_path = old.unix_path.take();
        }
    }
    Ok(listeners)
}

/// One part of an `update`, done or under way.
enum Pending {
    Done(ServiceChange),
    Wait(String, &'static str, oneshot::Receiver<Response>),
    /// A reload with new settings, and the settings before.
    Reload(String, Box<ServiceDef>, oneshot::Receiver<Response>),
}

impl Pending {
    async fn outcome(self, notes: &mpsc::UnboundedSender<Note>) -> ServiceChange {
        match self {
            Pending::Done(c) => c,
            Pending::Wait(name, action, rx) => match rx.await {
                Ok(Response::Started { .. }) if action == "restarted" => done(
                    &name,
                    action,
                    "a change a reload cannot carry (listeners, proxy, log file, watch): restarted gracefully, serving",
                ),
                Ok(Response::Started { .. }) => done(&name, action, "serving"),
                Ok(Response::Stopped { code }) => done(
                    &name,
                    action,
                    &format!("its file is gone: stopped (exit code {code})"),
                ),
                Ok(Response::Error { message }) => failed(&name, action, message),
                Ok(other) => failed(&name, action, format!("{other:?}")),
                Err(_) => failed(&name, action, "baton is stopping".to_owned()),
            },
            Pending::Reload(name, old, rx) => match rx.await {
                Ok(Response::Reloaded {
                    generation, pid, ..
                }) => {
                    let _ = notes.send(Note::Settled {
                        service: name.clone(),
                        ok: true,
                        old,
                    });
                    done(
                        &name,
                        "reloaded",
                        &format!(
                            "generation {generation} (pid {pid}) serves with the new settings"
                        ),
                    )
                }
                Ok(Response::RolledBack { message, .. }) => {
                    let _ = notes.send(Note::Settled {
                        service: name.clone(),
                        ok: false,
                        old,
                    });
                    failed(
                        &name,
                        "reloaded",
                        format!(
                            "{message}; the serving generation and the service's settings are as they were"
                        ),
                    )
                }
                Ok(other) => failed(&name, "reloaded", format!("{other:?}")),
                Err(_) => failed(&name, "reloaded", "baton is stopping".to_owned()),
            },
        }
    }
}

fn report(reply: Option<Waiter>, pending: Vec<Pending>) {
    let changes = pending
        .into_iter()
        .filter_map(|p| match p {
            Pending::Done(c) => Some(c),
            _ => None,
        })
        .collect();
    send_report(reply, changes);
}

/// `update`'s answer; for SIGHUP, its log lines.
fn send_report(reply: Option<Waiter>, changes: Vec<ServiceChange>) {
    for c in &changes {
        if c.ok {
            info!(service = %c.service, action = %c.action, "update: {}", c.message);
        } else {
            warn!(service = %c.service, action = %c.action, "update failed: {}", c.message);
        }
    }
    if let Some(reply) = reply {
        let _ = reply.send(Response::Updated { changes });
    }
}

fn done(service: &str, action: &str, message: &str) -> ServiceChange {
    ServiceChange {
        service: service.to_owned(),
        action: action.to_owned(),
        ok: true,
        message: message.to_owned(),
    }
}

fn failed(service: &str, action: &str, message: String) -> ServiceChange {
    ServiceChange {
        service: service.to_owned(),
        action: action.to_owned(),
        ok: false,
        message,
    }
}
