//! What the guardian tells the outside: the `status` document, the
//! `/metrics` snapshot, and the answers to control requests. Built from the
//! policy's generations and counters; nothing here changes state.

use std::time::Instant;

use baton::serve::Connections;

use super::generation::Generation;
use super::policy::{Outcome, Policy};
use super::pressure::Pressure;
use crate::config::RunConfig;
use crate::control::proto::{
    ConnectionsInfo, GenerationInfo, Guard, ListenerInfo, Response, Status, WorkerInfo,
};
use crate::sys;

/// A generation's workers as `status` shows them: each live process, and
/// each worker index with none (restarting, or down).
fn workers(g: &Generation) -> Vec<WorkerInfo> {
    let counts = |i: u32| {
        g.workers
            .get(i as usize)
            .map_or((0, 0), |w| (w.restarts, w.rss_replacements))
    };
    let mut out: Vec<WorkerInfo> = g
        .processes
        .iter()
        .map(|p| {
            let (restarts, rss_replacements) = counts(p.worker);
            WorkerInfo {
                worker: p.worker,
                pid: p.process.pid,
                state: if p.replaced {
                    "replaced"
                } else if p.ready {
                    "ready"
                } else {
                    "starting"
                }
                .to_owned(),
                rss_bytes: sys::inspect::rss(p.process.pid),
                restarts,
                rss_replacements,
            }
        })
        .collect();
    for (i, w) in g.workers.iter().enumerate() {
        let i = i as u32;
        if out.iter().any(|x| x.worker == i) {
            continue;
        }
        out.push(WorkerInfo {
            worker: i,
            pid: 0,
            state: if w.down { "down" } else { "restarting" }.to_owned(),
            rss_bytes: None,
            restarts: w.restarts,
            rss_replacements: w.rss_replacements,
        });
    }
    out.sort_by_key(|w| w.worker);
    out
}

/// Counters the guardian keeps besides the policy's.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Notifications the readers refused.
    pub notify_rejected: u64,
    /// Listeners found shut down and re-armed.
    pub listener_rearms: u64,
    /// In-place upgrades.
    pub upgrades: u64,
    /// When the last one was.
    pub upgraded_at: Option<Instant>,
    /// The descriptor keeper's pid.
    pub keeper: Option<i32>,
    /// Why the service could not survive a crash of baton now.
    pub no_keeper: Option<String>,
    /// The pid of the baton that died, whose service this one adopted.
    pub adopted_from: Option<i32>,
    /// The releases kept.
    pub releases: Vec<crate::control::proto::ReleaseInfo>,
    /// Why `/readyz` says no (`None`: ready).
    pub not_ready: Option<&'static str>,
    /// When the shutdown delay ends, if one runs.
    pub shutdown_at: Option<Instant>,
    /// Connections to the app closed for bytes it sent out of turn.
    pub stray_answers: u64,
}

/// The `status` document.
pub fn status<W>(
    cfg: &RunConfig,
    policy: &Policy<W>,
    pressure: &Pressure,
    counters: Counters,
    started: Instant,
) -> Status {
    let now = Instant::now();
    let stats = policy.stats();
    Status {
        name: cfg.name.clone(),
        pid: std::process::id(),
        uptime_ms: now.duration_since(started).as_millis() as u64,
        command: cfg
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        listeners: cfg
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| ListenerInfo {
                name: l.name.clone(),
                addr: l.local.clone(),
                fd: baton::vars::LISTEN_FDS_START + i as i32,
            })
            .collect(),
        generations: policy
            .generations()
            .map(|g| GenerationInfo {
                generation: g.id,
                pid: g.pid(),
                state: g.state.as_str().to_owned(),
                age_ms: now.saturating_duration_since(g.spawned_at).as_millis() as u64,
                ready_ms: g.ready_after.map(|d| d.as_millis() as u64),
                release: g.release,
                workers: workers(g),
                degraded: g.workers.iter().any(|w| w.down),
            })
            .collect(),
        serving: policy.serving(),
        starting: policy.starting(),
        stopping: policy.is_stopping(),
        reloads_ok: stats.reloads_ok,
        reloads_failed: stats.reloads_failed,
        restarts: stats.restarts,
        last_reload: stats.last_reload.clone(),
        guard: guard(cfg, pressure, &counters),
        version: super::handover::baton_version().to_owned(),
        upgrades: counters.upgrades,
        keeper_pid: counters.keeper,
        no_keeper: counters.no_keeper,
        adopted_from: counters.adopted_from,
        releases: counters.releases.clone(),
        reverts: stats.reverts,
        ready: counters.not_ready.is_none(),
        not_ready: counters.not_ready.map(str::to_owned),
        shutdown_in_ms: counters
            .shutdown_at
            .map(|at| at.saturating_duration_since(now).as_millis() as u64),
        baking: policy.baking().map(|(g, _)| g),
        upgraded_ms_ago: counters
            .upgraded_at
            .map(|at| now.saturating_duration_since(at).as_millis() as u64),
    }
}

/// What `status` says of baton's own limits.
fn guard(cfg: &RunConfig, pressure: &Pressure, counters: &Counters) -> Guard {
    let connections = pressure
        .caps()
        .map(|(socket, c): (&str, &std::sync::Arc<Connections>)| {
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
        descriptors_limit: cfg.nofile.soft,
        app_descriptors_limit: cfg.nofile.original_soft,
        notify_rejected: counters.notify_rejected,
        listener_rearms: counters.listener_rearms,
        stray_answers: counters.stray_answers,
        connections,
    }
}

/// A reload's outcome as the control socket answers it.
pub fn response(outcome: &Outcome) -> Response {
    match outcome {
        Outcome::Reloaded {
            generation,
            pid,
            ready_after,
            baked,
        } => Response::Reloaded {
            generation: *generation,
            pid: *pid,
            ready_ms: ready_after.as_millis() as u64,
            baked_ms: baked.map(|b| b.as_millis() as u64),
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
