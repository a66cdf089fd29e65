//! What one baton image hands to the next one (`baton upgrade`): the
//! guardian's state, versioned and serialized, with the numbers of the
//! descriptors it keeps open across `execve`. The new image reads it from
//! a memfd named by [`ENV`].
//!
//! Invariant: a handover is written only between events, with no reload
//! under way and baton not stopping ([`super::policy::Policy::snapshot`]):
//! every generation is serving or draining, and every descriptor named
//! here is open and inheritable at the moment of the exec.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::policy::Snapshot;
use crate::sys::limits::Nofile;

/// The version of the handover format this baton writes and reads.
pub const VERSION: u32 = 2;

/// The environment variable naming the memfd that holds the handover.
pub const ENV: &str = crate::knobs::UPGRADE_STATE_ENV;

/// baton's version.
pub fn baton_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// A listener, by descriptor number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listener {
    /// Its descriptor in baton.
    pub fd: RawFd,
    /// Its name in `LISTEN_FDNAMES`.
    pub name: String,
    /// The bound address, as shown.
    pub local: String,
    /// Its key in `SERVER_STARTER_PORT`.
    pub server_starter_key: String,
    /// The TCP address it is bound to.
    pub tcp: Option<SocketAddr>,
    /// The socket file baton made, if any.
    pub unix_path: Option<PathBuf>,
}

/// A live worker process's descriptors in baton (what else is known of
/// it is its record in the policy's state).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerFds {
    /// The worker process.
    pub slot: super::generation::Slot,
    /// Its notification socket.
    pub notify: Option<RawFd>,
    /// The read ends of its `--log-prefix` pipes (stdout, stderr).
    pub log_readers: Option<(RawFd, RawFd)>,
    /// Ports it was seen listening on by itself.
    pub self_bound: Vec<SocketAddr>,
}

/// The handover.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handover {
    /// [`VERSION`] of the baton that wrote it.
    pub version: u32,
    /// That baton's version.
    pub from: String,
    /// The path baton was first started from.
    pub exe: PathBuf,
    /// baton's command line, kept for the next upgrade.
    pub argv: Vec<OsString>,
    /// The listeners.
    pub listeners: Vec<Listener>,
    /// The control socket's listener.
    pub control_fd: RawFd,
    /// The metrics endpoint's listener.
    pub metrics_fd: Option<RawFd>,
    /// The policy's state.
    pub policy: Snapshot,
    /// The live worker processes' descriptors.
    pub workers: Vec<WorkerFds>,
    /// The descriptor limit baton found at its first start.
    pub nofile: Nofile,
    /// Listeners re-armed so far.
    pub listener_rearms: u64,
    /// Notifications refused so far.
    pub notify_rejected: u64,
    /// Upgrades so far, this one included.
    pub upgrades: u64,
    /// When this upgrade began (`CLOCK_MONOTONIC` nanoseconds).
    pub upgrade_began_ns: u64,
    /// When baton first started (`CLOCK_MONOTONIC` nanoseconds).
    pub started_ns: u64,
    /// The `baton upgrade` client's connection, answered by the new image.
    pub reply_fd: Option<RawFd>,
    /// Whether systemd has been told READY=1.
    pub systemd_ready: bool,
    /// The descriptor keeper (`--orphans keep`), a child of this pid.
    pub keeper: Option<super::generation::Process>,
    /// The releases kept, served ones first (oldest first), each with its
    /// executable's descriptor.
    pub releases: Vec<(super::release::Info, RawFd)>,
    /// How many of `releases` served (the rest are pending).
    pub releases_served: usize,
    /// The next release number.
    pub release_next_id: u64,
    /// A number made for this upgrade: a candidate's check must answer it,
    /// so that a program that prints fixed words is not taken for baton.
    #[serde(default)]
    pub nonce: u64,
}

/// What a baton that runs several services (`--config-dir`) hands over:
/// what the instance owns, and each service's own handover.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    /// [`VERSION`] of the baton that wrote it.
    pub version: u32,
    /// That baton's version.
    pub from: String,
    /// The instance's name.
    pub name: String,
    /// The path baton was first started from.
    pub exe: PathBuf,
    /// The control socket's path and listener.
    pub control_path: PathBuf,
    /// See `control_path`.
    pub control_fd: RawFd,
    /// The metrics endpoint's listener.
    pub metrics_fd: Option<RawFd>,
    /// The keeper process every service's keeper runs in, and the
    /// descriptor of baton's connection to it.
    pub keeper: Option<(super::generation::Process, RawFd)>,
    /// Its restarts so far.
    pub keeper_restarts: u32,
    /// The services, in start order.
    pub services: Vec<ServiceHandover>,
    /// The descriptor limit baton found at its first start.
    pub nofile: Nofile,
    /// Upgrades so far, this one included.
    pub upgrades: u64,
    /// When this upgrade began (`CLOCK_MONOTONIC` nanoseconds).
    pub upgrade_began_ns: u64,
    /// The `baton upgrade` client's connection, answered by the new image.
    pub reply_fd: Option<RawFd>,
    /// Whether systemd has been told READY=1.
    pub systemd_ready: bool,
    /// This upgrade's number (see [`Handover::nonce`]).
    pub nonce: u64,
    /// The directory's lock.
    pub lock_fd: RawFd,
    /// The instance's `orphans`, as given.
    pub orphans: Option<crate::spec::Orphans>,
    /// Its `proxy-threads`.
    pub proxy_threads: Option<usize>,
    /// Its `max-connections`.
    pub max_connections: Option<usize>,
}

/// One service of an [`Instance`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceHandover {
    /// Its name.
    pub name: String,
    /// Its file.
    pub file: PathBuf,
    /// The file's text as it was read (the settings it runs with).
    pub text: String,
    /// Where it is when it does not run (`None` while it runs).
    pub idle: Option<Idle>,
    /// Its guardian's handover, while it runs.
    pub handover: Option<Box<Handover>>,
}

/// A service that does not run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Idle {
    /// Waiting for those it starts after.
    Waiting,
    /// `autostart = false`, not started.
    NotStarted,
    /// Stopped when asked, with this exit code.
    Stopped(u8),
    /// Ended on its own, with this exit code and why.
    Failed(u8, String),
}

/// What an upgrade hands over: one service's guardian, or an instance of
/// several.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Any {
    /// `--config-dir`.
    Instance(Box<Instance>),
    /// One service.
    Service(Box<Handover>),
}

impl Any {
    /// Its version, its writer's version and nonce.
    fn stamp(&self) -> (u32, &str, u64) {
        match self {
            Any::Instance(i) => (i.version, &i.from, i.nonce),
            Any::Service(h) => (h.version, &h.from, h.nonce),
        }
    }

    /// Why it cannot be read, if it cannot; else its nonce.
    pub fn check(&self) -> Result<u64, String> {
        let (version, from, nonce) = self.stamp();
        if version == VERSION {
            Ok(nonce)
        } else {
            Err(format!(
                "handover version {version} (from baton {from}); this baton {} reads version {VERSION}",
                baton_version()
            ))
        }
    }
}

/// Why a handover cannot be read.
pub fn check_version(h: &Handover) -> Result<(), String> {
    if h.version == VERSION {
        Ok(())
    } else {
        Err(format!(
            "handover version {} (from baton {}); this baton {} reads version {VERSION}",
            h.version,
            h.from,
            baton_version()
        ))
    }
}

/// The handover this image was started with, if it was started by an
/// upgrade: read from the memfd named in [`ENV`] (and the memfd closed).
pub fn take_from_env() -> anyhow::Result<Option<Handover>> {
    match take_any_from_env()? {
        None => Ok(None),
        Some(Any::Service(h)) => Ok(Some(*h)),
        Some(Any::Instance(_)) => anyhow::bail!(
            "the handed-over state is of a baton that runs several services (--config-dir)"
        ),
    }
}

/// The handover this image was started with, of either kind.
pub fn take_any_from_env() -> anyhow::Result<Option<Any>> {
    use anyhow::Context;
    let Some(raw) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let fd: RawFd = raw
        .to_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{ENV}={raw:?}: not a descriptor number"))?;
    let bytes = crate::sys::exec::take_fd(fd)
        .and_then(crate::sys::exec::read_all)
        .with_context(|| format!("reading the handed-over state ({ENV}={fd})"))?;
    let handover: Any =
        serde_json::from_slice(&bytes).context("the handed-over state is not readable")?;
    handover.check().map_err(anyhow::Error::msg)?;
    Ok(Some(handover))
}

impl From<&crate::bound::BoundListener> for Listener {
    /// What an upgrade hands over of a listener: its descriptor by number.
    fn from(l: &crate::bound::BoundListener) -> Listener {
        use std::os::fd::AsRawFd;
        Listener {
            fd: l.fd.as_raw_fd(),
            name: l.name.clone(),
            local: l.local.clone(),
            server_starter_key: l.server_starter_key.clone(),
            tcp: l.tcp,
            unix_path: l.unix_path.clone(),
        }
    }
}

/// What a handover is made of: the guardian's parts, borrowed.
#[derive(Debug)]
pub struct Parts<'a> {
    /// The settings and the sockets.
    pub cfg: &'a crate::config::RunConfig,
    /// The policy's state.
    pub policy: Snapshot,
    /// Each live worker process's runtime handles.
    pub handles:
        &'a std::collections::BTreeMap<super::generation::Slot, super::generation::Handles>,
    /// A second descriptor of the control socket's listener.
    pub control_fd: std::os::fd::BorrowedFd<'a>,
    /// Counters carried over.
    pub listener_rearms: u64,
    /// Notifications refused so far.
    pub notify_rejected: u64,
    /// Upgrades so far (this one not counted).
    pub upgrades: u64,
    /// When baton first started.
    pub started: std::time::Instant,
    /// The upgrade client's connection, and when it asked.
    pub reply: Option<(RawFd, std::time::Instant)>,
    /// Whether systemd was told READY=1.
    pub systemd_ready: bool,
    /// The descriptor keeper, if one runs.
    pub keeper: Option<super::generation::Process>,
    /// The releases kept.
    pub releases: &'a super::release::Releases,
    /// The upgrade's nonce.
    pub nonce: u64,
}

/// The handover made of `p`, and the descriptors it names (to be kept
/// open and made inheritable across the exec).
pub fn build(p: Parts<'_>) -> (Handover, Vec<std::os::fd::BorrowedFd<'_>>) {
    use std::os::fd::{AsFd, AsRawFd};
    let sys = crate::sys::clock::monotonic_ns;
    let mut fds = Vec::new();
    let listeners = p
        .cfg
        .listeners
        .iter()
        .map(|l| {
            fds.push(l.fd.as_fd());
            Listener::from(l)
        })
        .collect();
    fds.push(p.control_fd);
    let metrics_fd = p.cfg.metrics.as_ref().map(|m| {
        fds.push(m.as_fd());
        m.as_raw_fd()
    });
    let workers = p
        .handles
        .iter()
        .map(|(slot, h)| WorkerFds {
            slot: *slot,
            notify: h.notify.as_ref().map(|fd| {
                fds.push(fd.as_fd());
                fd.as_raw_fd()
            }),
            log_readers: h.log_readers.as_ref().map(|(out, err)| {
                fds.push(out.as_fd());
                fds.push(err.as_fd());
                (out.as_raw_fd(), err.as_raw_fd())
            }),
            self_bound: h.self_bound.clone(),
        })
        .collect();
    let state = Handover {
        version: VERSION,
        from: baton_version().to_owned(),
        exe: p.cfg.exe.clone(),
        argv: p.cfg.argv.clone(),
        listeners,
        control_fd: p.control_fd.as_raw_fd(),
        metrics_fd,
        policy: p.policy,
        workers,
        nofile: p.cfg.nofile,
        listener_rearms: p.listener_rearms,
        notify_rejected: p.notify_rejected,
        upgrades: p.upgrades + 1,
        upgrade_began_ns: sys(p.reply.map_or_else(std::time::Instant::now, |r| r.1)),
        started_ns: sys(p.started),
        reply_fd: p.reply.map(|r| r.0),
        systemd_ready: p.systemd_ready,
        keeper: p.keeper,
        releases: p
            .releases
            .all()
            .map(|r| {
                fds.push(r.exe.as_fd());
                (r.describe(), r.exe.as_raw_fd())
            })
            .collect(),
        releases_served: p.releases.served_count(),
        release_next_id: p.releases.next_id(),
        nonce: p.nonce,
    };
    (state, fds)
}
