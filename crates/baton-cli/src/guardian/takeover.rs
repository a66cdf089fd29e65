//! An image's first steps when it takes over a running service rather than
//! starting one: [`resume`] after `baton upgrade` (the previous
//! image's processes are still this pid's children, its descriptors were
//! inherited) and [`adopt`] after a baton was killed (its
//! processes are watched through pidfds, its notification sockets bound
//! again, its output pipes taken back from the keeper). Both rebuild each
//! worker process's handles from its record in the policy's state with
//! one step, [`processes::Processes::restore`].
//!
//! This room builds on the loop's [`Guardian`] (`running.rs` calls it once,
//! before the loop runs); the loop does not call into it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::children::Owner;
use super::generation::{Route, Slot};
use super::orphans::Adoption;
use super::policy::Policy;
use super::{Guardian, handover, orphans, processes, release};
use crate::control::proto::Response;
use crate::sys;
use crate::sys::notify_socket::NotifySocket;

/// The worker processes of the policy's live generations: slot, pid
/// and route.
fn recorded_workers(g: &Guardian) -> Vec<(Slot, i32, Route)> {
    g.policy
        .generations()
        .flat_map(|g| {
            g.processes
                .iter()
                .map(move |p| (p.slot(g.id), p.process.pid, p.route.unwrap_or(g.route)))
        })
        .collect()
}

/// The new image's first steps after `baton upgrade`: the previous
/// image's generations are ours (their processes are still this pid's
/// children), their notification sockets and output pipes are read
/// again, and the client is told.
pub fn resume(g: &mut Guardian, h: handover::Handover) {
    resume_service(g, &h, true);
    let took_ms = took_ms(h.upgrade_began_ns);
    info!(
        from = %h.from,
        to = handover::baton_version(),
        upgrades = h.upgrades,
        took_ms,
        generations = g.procs.handles.len(),
        "upgraded: this image took over"
    );
    if let Some(fd) = h.reply_fd {
        answer_upgraded(fd, &h.from, took_ms);
    }
    // The signals blocked for the exec: what arrived meanwhile is
    // delivered now, to the handlers installed above.
    sys::exec::unblock_signals();
    g.reap();
}

/// How long ago the upgrade began (`CLOCK_MONOTONIC` nanoseconds then).
pub fn took_ms(began_ns: u64) -> u64 {
    sys::clock::monotonic_ns(Instant::now()).saturating_sub(began_ns) / 1_000_000
}

/// Tells the `baton upgrade` client on `fd` that this image serves.
pub fn answer_upgraded(fd: std::os::fd::RawFd, from: &str, took_ms: u64) {
    match sys::exec::take_fd(fd) {
        Ok(fd) => {
            let mut conn = std::os::unix::net::UnixStream::from(fd);
            let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
            let answer = Response::Upgraded {
                from: from.to_owned(),
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

/// One service's part of [`resume`]: its releases, its generations'
/// processes (still this pid's children) and their descriptors. With
/// `own_keeper`, the keeper it names is this service's child.
pub fn resume_service(g: &mut Guardian, h: &handover::Handover, own_keeper: bool) {
    let mut releases = Vec::new();
    for (info, fd) in &h.releases {
        match sys::exec::take_fd(*fd) {
            Ok(exe) => releases.push(release::Release::handed_over(info.clone(), exe)),
            Err(e) => warn!(release = info.id, error = %e, "a release was not handed over"),
        }
    }
    let served = h.releases_served.min(releases.len());
    g.releases = release::Releases::restore(releases, served, h.release_next_id);
    if let Some(k) = h.keeper
        && own_keeper
    {
        g.procs.children.adopt(k.pid, Owner::Keeper);
    }
    let mut fds: HashMap<Slot, &handover::WorkerFds> =
        h.workers.iter().map(|w| (w.slot, w)).collect();
    let notify: HashMap<Slot, String> = g
        .policy
        .generations()
        .flat_map(|g| g.processes.iter().map(move |p| (p.slot(g.id), p)))
        .filter_map(|(slot, p)| Some((slot, p.notify.clone()?)))
        .collect();
    for (slot, pid, route) in recorded_workers(g) {
        g.procs.children.adopt(pid, Owner::Generation(slot));
        let w = fds.remove(&slot);
        let notify = w.and_then(|w| w.notify).and_then(|fd| {
            let address = notify.get(&slot)?.clone();
            sys::exec::take_fd(fd)
                .and_then(|fd| NotifySocket::from_fd(fd, address))
                .map_err(|e| warn!(generation = %slot, error = %e, "its notification socket was not handed over"))
                .ok()
        });
        let logs = w.and_then(|w| w.log_readers).and_then(|(out, err)| {
            sys::exec::take_fd(out)
                .and_then(|o| Ok((o, sys::exec::take_fd(err)?)))
                .map_err(|e| warn!(generation = %slot, error = %e, "its output pipes were not handed over"))
                .ok()
        });
        let self_bound = w.map(|w| w.self_bound.clone()).unwrap_or_default();
        let from = processes::Restored {
            notify,
            logs,
            self_bound,
            pidfd: None,
        };
        g.procs.restore(&g.cfg, slot, pid, route, from);
    }
    // A worker whose replacement was pending starts again now.
    g.policy.restore_workers(Instant::now());
    g.cut_over();
}

/// Goes on from the state of a baton that died: what still runs of it
/// is watched and kept (the serving generation) or stopped (the rest);
/// if nothing serves, a new generation starts as usual.
pub fn adopt(g: &mut Guardian, adoption: Adoption) {
    let Adoption {
        state: s,
        mut logs,
        mut identified,
    } = adoption;
    let now = Instant::now();
    g.orphans.adopted_from = Some(s.baton.pid);
    let mut plan = orphans::plan(&s, now, g.cfg.policy.stop_timeout, |slot| {
        identified.contains_key(&slot)
    });
    for (slot, pid) in &plan.stop {
        let _ = sys::signal::send_group(*pid, g.cfg.policy.stop_signal);
        info!(generation = %slot, pid, "asked to stop");
    }
    // Each of its processes is watched (it is not our child) through the
    // pidfd its keeper held, or one opened now for a process checked by
    // its start time; one gone meanwhile is left out. This baton's keeper
    // gets a copy.
    let mut pidfds: HashMap<Slot, std::os::fd::OwnedFd> = HashMap::new();
    for generation in &mut plan.snapshot.generations {
        let id = generation.id;
        generation.processes.retain(|p| {
            let slot = p.slot(id);
            let pid = p.process.pid;
            let pidfd = match identified.remove(&slot).flatten() {
                Some(fd) => Ok(fd),
                None => sys::fdpass::pidfd(pid, p.process.start_time),
            };
            let watched = pidfd.and_then(|fd| {
                let copy = fd.try_clone();
                g.procs
                    .children
                    .watch_pidfd(fd, pid, slot, &g.procs.events)?;
                copy
            });
            match watched {
                Ok(copy) => {
                    pidfds.insert(slot, copy);
                    true
                }
                Err(e) => {
                    warn!(generation = %slot, pid, error = %e, "gone before it could be watched");
                    false
                }
            }
        });
    }
    plan.snapshot
        .generations
        .retain(|g| !g.processes.is_empty());
    if plan
        .snapshot
        .serving
        .is_some_and(|id| !plan.snapshot.generations.iter().any(|g| g.id == id))
    {
        plan.snapshot.serving = None;
        plan.snapshot.ever_ready = false;
    }
    let notify: HashMap<Slot, String> = plan
        .snapshot
        .generations
        .iter()
        .flat_map(|g| g.processes.iter().map(move |p| (p.slot(g.id), p)))
        .filter_map(|(slot, p)| Some((slot, p.notify.clone()?)))
        .collect();
    let serving = plan.snapshot.serving;
    g.policy = Policy::restore(g.cfg.policy.clone(), plan.snapshot);
    g.policy.restore_workers(now);
    for (slot, pid, route) in recorded_workers(g) {
        let notify = notify.get(&slot).and_then(|address| {
            NotifySocket::bind_name(address)
                .map_err(|e| warn!(generation = %slot, error = %e, "its notification socket cannot be bound again"))
                .ok()
        });
        let logs = logs
            .iter()
            .position(|(id, _, _)| *id == slot)
            .map(|i| logs.swap_remove(i))
            .map(|(_, out, err)| (out, err));
        let from = processes::Restored {
            notify,
            logs,
            self_bound: Vec::new(),
            pidfd: pidfds.remove(&slot),
        };
        g.procs.restore(&g.cfg, slot, pid, route, from);
        if let Some(h) = g.procs.handles.get(&slot) {
            g.orphans.keep(slot, h);
        }
    }
    match serving {
        Some(id) => {
            let pid = g
                .policy
                .generations()
                .find(|g| g.id == id)
                .and_then(|g| g.pid())
                .unwrap_or_default();
            let addrs: Vec<&str> = g.cfg.listeners.iter().map(|l| l.local.as_str()).collect();
            let serving = match addrs.is_empty() {
                true => "running (it listens on nothing)".to_owned(),
                false => format!("serving {}", addrs.join(", ")),
            };
            info!(
                generation = id,
                pid,
                from = s.baton.pid,
                addr = %addrs.join(","),
                "adopted generation {id} (pid {pid}) {serving}; its exit status will not be known"
            );
            g.cut_over();
            g.systemd.serving(id);
        }
        None => {
            info!(
                from = s.baton.pid,
                "nothing of the baton that died serves any more: starting a new generation"
            );
            let start = g.policy.start(now);
            g.apply(start);
        }
    }
}
