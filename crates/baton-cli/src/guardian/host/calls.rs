//! What the service host asks of one guardian, or of the machine, apart
//! from its loop: a request as the guardian takes it, its status, new
//! settings for its next generation, and the keeper process every
//! service's keeper runs in.

use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::control::proto::{Request, Response, Status};
use crate::control::server::ControlRequest;
use crate::guardian::{Guardian, Waiter};
use crate::sys;

/// How many times the shared keeper process is started again after it
/// exits on its own.
pub(super) const KEEPER_RESTARTS: u32 = 5;

/// The keeper process of every service (`--orphans keep`); if it cannot
/// be started, each service starts a keeper of its own.
pub(super) fn start_keeper() -> Option<std::sync::Arc<crate::guardian::keeper::Host>> {
    // baton's environment, without what describes baton itself.
    let env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !(k.starts_with("LISTEN_") || k.starts_with("WATCHDOG_") || k == "NOTIFY_SOCKET")
        })
        .collect();
    match crate::guardian::keeper::Host::start(&env) {
        Ok(host) => {
            info!(
                pid = host.process.pid,
                "keeper: one process holds every service's listeners in case baton dies"
            );
            Some(std::sync::Arc::new(host))
        }
        Err(e) => {
            warn!(error = %e, "keeper: the shared process did not start; each service starts its own");
            None
        }
    }
}

/// A request for one guardian, as its loop takes it.
pub(super) fn plain(request: Request, reply: Waiter) -> ControlRequest {
    ControlRequest {
        request,
        reply,
        conn: None,
        service: None,
    }
}

/// A guardian's status, as `baton status SVC` shows it.
pub(super) fn status_of(g: &mut Guardian) -> Option<Status> {
    let (tx, mut rx) = oneshot::channel();
    g.control(plain(Request::Status, tx));
    match rx.try_recv() {
        Ok(Response::Status(s)) => Some(*s),
        _ => None,
    }
}

/// New settings for a running service (`update`), carried by its next
/// generation: what is read when a generation starts.
pub(super) fn reconfigure(g: &mut Guardian, new: crate::config::RunConfig) {
    g.procs
        .children
        .set_user(new.user.as_ref().map(|u| sys::spawn::Ids {
            uid: u.uid,
            gid: u.gid,
            groups: u.groups.clone(),
        }));
    g.procs.app_uid = new
        .user
        .as_ref()
        .map_or_else(|| rustix::process::geteuid().as_raw(), |u| u.uid);
    g.policy.reconfigure(new.policy.clone());
    let cfg = &mut g.cfg;
    cfg.program = new.program;
    cfg.args = new.args;
    cfg.base_env = new.base_env;
    cfg.ready = new.ready;
    cfg.notify_access = new.notify_access;
    cfg.workdir = new.workdir;
    cfg.max_rss = new.max_rss;
    cfg.policy = new.policy;
    cfg.user = new.user;
    cfg.check_timeout = new.check_timeout;
    if cfg.listen != new.listen {
        cfg.listen = new.listen;
        cfg.listeners = new.listeners;
        g.procs.listener_inodes = crate::guardian::processes::listener_inodes(&g.cfg);
        // The keeper holds the listeners of its start: a new one holds
        // these, and what the old one held of the live processes.
        g.orphans.replace_keeper(&g.cfg, &mut g.procs.children);
        for (slot, h) in &g.procs.handles {
            g.orphans.keep(*slot, h);
        }
        for l in &g.cfg.listeners {
            info!(addr = %l.local, name = %l.name, "listening");
        }
    }
}
