//! The control protocol's messages, shared by server and client so they
//! cannot drift: one JSON object per line.

use serde::{Deserialize, Serialize};

use crate::error::RollbackReason;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Start a new generation and answer with the outcome.
    Reload,
    /// Start a new generation from the previous release, and answer with
    /// the outcome.
    Rollback,
    /// Describe the service.
    Status,
    /// Stop gracefully; answered once every generation is gone.
    Stop,
    /// Send a signal to the serving generation.
    Signal {
        /// The signal number.
        signal: i32,
    },
    /// Start a service that is not running (`--config-dir`).
    Start,
    /// Read the `--config-dir` again and apply what changed.
    Update,
    /// Replace baton's image with `binary` (default: the path baton was
    /// started from) in place, or only check that it would take over.
    Upgrade {
        /// The new binary.
        binary: Option<std::path::PathBuf>,
        /// Only run the candidate's check.
        check_only: bool,
    },
}

/// The service a request is for, sent beside the request's own fields
/// (`{"cmd":"reload","service":"api"}`); absent for a single-service baton.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addressed {
    /// The service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// What baton answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The new generation is serving.
    Reloaded {
        /// Its number.
        generation: u64,
        /// Its pid.
        pid: i32,
        /// How long it took to become ready.
        ready_ms: u64,
        /// The bake it passed (`--bake`), if it was on probation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        baked_ms: Option<u64>,
    },
    /// The new generation was not put in service.
    RolledBack {
        /// The failed generation, if one was spawned.
        generation: Option<u64>,
        /// Its pid, if it had one.
        pid: Option<i32>,
        /// Why, as data.
        reason: RollbackReason,
        /// Why, in words.
        message: String,
        /// The generation still serving, if any.
        serving: Option<u64>,
    },
    /// The service's state.
    Status(Box<Status>),
    /// baton is stopping (the answer to a reload that could not finish).
    Stopping,
    /// baton has stopped every generation and is exiting with `code`.
    Stopped {
        /// baton's exit code.
        code: u8,
    },
    /// The signal went to this generation.
    Signaled {
        /// The serving generation.
        generation: u64,
        /// Its pid.
        pid: i32,
    },
    /// The new image serves (answered by it).
    Upgraded {
        /// The version before.
        from: String,
        /// The version now.
        to: String,
        /// baton's pid (the same).
        pid: u32,
        /// From the request to the new image serving the control socket.
        took_ms: u64,
    },
    /// The candidate binary accepts baton's state.
    UpgradeChecked {
        /// The binary.
        binary: std::path::PathBuf,
        /// Its version.
        version: String,
    },
    /// `rollback`: there is no previous release to go back to.
    NoPrevious {
        /// Why, in words.
        message: String,
    },
    /// Every service of a baton that runs several (`status` without a
    /// service).
    Services {
        /// In start order.
        services: Vec<ServiceStatus>,
    },
    /// The service was started (`start`); its first generation is on its
    /// way (see its status).
    Started {
        /// The service.
        service: String,
    },
    /// `signal` to every service.
    SignaledAll {
        /// Where it went.
        signaled: Vec<ServiceSignaled>,
        /// Services it did not reach, and why.
        missed: Vec<ServiceProblem>,
    },
    /// `update`: what was done to each service that changed.
    Updated {
        /// One entry per service touched (or that failed).
        changes: Vec<ServiceChange>,
    },
    /// The request named a service this baton does not run.
    UnknownService {
        /// Why, in words, with the services there are.
        message: String,
    },
    /// The request could not be understood.
    Error {
        /// What was wrong.
        message: String,
    },
}

/// One service of a baton that runs several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service's name.
    pub service: String,
    /// running, stopping, stopped, failed (its first generation never
    /// served, or it gave up), or not-started (`autostart = false`).
    pub state: String,
    /// Its exit code, once it has stopped (baton's code for the service:
    /// see `baton run`'s exit codes).
    pub exit_code: Option<u8>,
    /// Why it failed, or what it waits for.
    #[serde(default)]
    pub message: Option<String>,
    /// The file it comes from.
    pub file: std::path::PathBuf,
    /// Its status while it runs.
    pub status: Option<Box<Status>>,
}

/// Where `signal` went, for one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSignaled {
    /// The service.
    pub service: String,
    /// Its serving generation.
    pub generation: u64,
    /// Its pid.
    pub pid: i32,
}

/// A service a request could not be carried out for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceProblem {
    /// The service.
    pub service: String,
    /// Why.
    pub message: String,
}

/// What `update` did to one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceChange {
    /// The service.
    pub service: String,
    /// started (added), stopped (removed), reloaded (changed, carried by
    /// a reload), restarted (changed, a graceful restart), or failed.
    pub action: String,
    /// Whether it was done.
    pub ok: bool,
    /// What happened, in words.
    pub message: String,
}

/// `baton status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The service's name.
    pub name: String,
    /// baton's own pid.
    pub pid: u32,
    /// How long baton has run.
    pub uptime_ms: u64,
    /// The command line of each generation.
    pub command: Vec<String>,
    /// The listeners, in fd order.
    pub listeners: Vec<ListenerInfo>,
    /// The live generations, oldest first.
    pub generations: Vec<GenerationInfo>,
    /// The generation serving now.
    pub serving: Option<u64>,
    /// The generation starting now (a reload in progress).
    pub starting: Option<u64>,
    /// Whether baton is stopping.
    pub stopping: bool,
    /// Reloads that succeeded.
    pub reloads_ok: u64,
    /// Reloads that rolled back.
    pub reloads_failed: u64,
    /// Replacements of generations that died while serving.
    pub restarts: u64,
    /// The last reload's outcome, in words.
    pub last_reload: Option<String>,
    /// What baton's own limits and checks did.
    #[serde(default)]
    pub guard: Guard,
    /// baton's own version.
    #[serde(default)]
    pub version: String,
    /// In-place upgrades since baton first started.
    #[serde(default)]
    pub upgrades: u64,
    /// How long ago the last upgrade was, if any.
    #[serde(default)]
    pub upgraded_ms_ago: Option<u64>,
    /// The descriptor keeper's pid (`--orphans keep`).
    #[serde(default)]
    pub keeper_pid: Option<i32>,
    /// With `--orphans keep`: why the service could not survive a crash of
    /// baton now (no keeper runs, and none will be started again).
    #[serde(default)]
    pub no_keeper: Option<String>,
    /// The pid of the baton that died, whose service this one adopted.
    #[serde(default)]
    pub adopted_from: Option<i32>,
    /// The releases kept for a rollback, the current one last.
    #[serde(default)]
    pub releases: Vec<ReleaseInfo>,
    /// Releases reverted during their bake (`--bake`), by cause.
    #[serde(default)]
    pub reverts: crate::knobs::Reverts,
    /// The generation on probation (`--bake`), if any.
    #[serde(default)]
    pub baking: Option<u64>,
    /// What `/readyz` answers: ready to take traffic.
    #[serde(default)]
    pub ready: bool,
    /// Why not, if not.
    #[serde(default)]
    pub not_ready: Option<String>,
    /// Time left of the shutdown delay (`--shutdown-delay`), if one runs.
    #[serde(default)]
    pub shutdown_in_ms: Option<u64>,
}

/// baton's own resources, and what its limits and checks turned away.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    /// Descriptors baton has open.
    pub descriptors: u64,
    /// baton's descriptor limit (raised to the hard limit at start).
    pub descriptors_limit: u64,
    /// The descriptor limit each generation starts with (baton's original).
    pub app_descriptors_limit: u64,
    /// Notifications ignored (another user; another process with
    /// `--notify-access main`).
    pub notify_rejected: u64,
    /// Listeners an app shut down that baton made listen again.
    pub listener_rearms: u64,
    /// Proxy mode: connections to the app closed because it sent bytes on
    /// them that no request asked for (none of them reached a client).
    #[serde(default)]
    pub stray_answers: u64,
    /// Connection caps: the control socket, and the proxy in proxy mode.
    pub connections: Vec<ConnectionsInfo>,
}

/// One connection cap and its counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionsInfo {
    /// `control` or `proxy`.
    pub socket: String,
    /// Open now.
    pub open: u64,
    /// The cap.
    pub max: u64,
    /// Silent connections closed at the cap to make room.
    pub evicted: u64,
    /// Times accepting paused at the cap.
    pub paused: u64,
    /// Connections cut by the header timeout.
    pub header_timeouts: u64,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: u64,
}

/// One listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    /// Its name in `LISTEN_FDNAMES`.
    pub name: String,
    /// The bound address.
    pub addr: String,
    /// Its fd number in every generation.
    pub fd: i32,
}

/// One generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationInfo {
    /// Its number.
    pub generation: u64,
    /// Its pid.
    pub pid: Option<i32>,
    /// starting, serving, draining or killed.
    pub state: String,
    /// How long since it was started.
    pub age_ms: u64,
    /// How long it took to become ready.
    pub ready_ms: Option<u64>,
    /// The release it runs.
    #[serde(default)]
    pub release: Option<u64>,
    /// Its worker processes (`--workers`; one without).
    #[serde(default)]
    pub workers: Vec<WorkerInfo>,
    /// Some worker is down (over its start limit, or not restarted).
    #[serde(default)]
    pub degraded: bool,
}

/// One worker process of a generation (`status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Its index, 0..N.
    pub worker: u32,
    /// Its pid (0 while down or waiting for its restart).
    pub pid: i32,
    /// starting, ready, replaced (draining after its successor took
    /// over), restarting, or down.
    pub state: String,
    /// Its resident memory.
    pub rss_bytes: Option<u64>,
    /// Replacements after it died.
    pub restarts: u32,
    /// Replacements because it grew past `--max-rss`.
    pub rss_replacements: u32,
}

/// A release baton keeps (`status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    /// Its number.
    pub id: u64,
    /// current, previous, older, or pending (not served yet).
    pub role: String,
    /// The executable's path when it was started.
    pub program: std::path::PathBuf,
    /// A short hash of the executable's contents (`null` while it is
    /// being computed, just after a new release started).
    pub hash: Option<String>,
    /// The working directory, resolved.
    pub cwd: std::path::PathBuf,
}
