//! The settings and counts that several rooms share, kept in a leaf that
//! imports no other room: the guardian's policy knobs, the deadline helper
//! every timer uses, and the revert counts that travel over the control
//! socket. Nothing here does I/O.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::spec::{RestartMode, Signal, StartLimit};

/// The environment variable naming the memfd that holds an upgrade's
/// handover (never passed on to the app).
pub const UPGRADE_STATE_ENV: &str = "BATON_UPGRADE_STATE";

/// The policy's knobs.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// How long a new generation may take to become ready.
    pub ready_timeout: Duration,
    /// How long a generation may take to exit after the stop signal.
    pub stop_timeout: Duration,
    /// The signal that asks a generation to drain and exit.
    pub stop_signal: Signal,
    /// Delay before the first restart of a crashed generation.
    pub restart_delay: Duration,
    /// Ceiling of the doubling restart delay.
    pub restart_delay_max: Duration,
    /// A generation that served this long before dying resets the backoff.
    pub stable_after: Duration,
    /// How long after SIGKILL a process is waited for before it is given up.
    pub kill_grace: Duration,
    /// A hint appended to "was not ready within …" messages.
    pub not_ready_hint: String,
    /// Whether a serving generation that exits on its own is replaced.
    pub restart: RestartMode,
    /// At most this many crash restarts within an interval.
    pub start_limit: StartLimit,
    /// `--bake`: how long a new release is on probation after cutover.
    pub bake: Option<Duration>,
    /// During a bake, keep the previous generation running (proxy mode:
    /// it takes no new traffic, or its canary share, and a revert is a
    /// switch back to it).
    pub keep_warm: bool,
    /// `--workers`: processes per generation.
    pub workers: usize,
    /// `--shutdown-delay`: at a stop, how long baton serves on, not ready
    /// (`/readyz` 503), before it stops the app.
    pub shutdown_delay: Option<Duration>,
}

/// `now + d`, for deadlines. Durations are capped at parse time
/// ([`crate::spec::MAX_DURATION`]), so this never saturates in practice; it
/// exists so that no arithmetic in the guardian can panic.
pub fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(crate::spec::MAX_DURATION))
        .unwrap_or(now)
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            ready_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(30),
            stop_signal: Signal::TERM,
            restart_delay: Duration::from_millis(200),
            restart_delay_max: Duration::from_secs(10),
            stable_after: Duration::from_secs(10),
            kill_grace: Duration::from_secs(5),
            not_ready_hint: String::new(),
            restart: RestartMode::OnFailure,
            start_limit: StartLimit::Limit {
                burst: 5,
                interval: Duration::from_secs(10),
            },
            bake: None,
            keep_warm: false,
            workers: 1,
            shutdown_delay: None,
        }
    }
}

/// Reverts by cause (`--bake`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reverts {
    /// The release on probation exited.
    pub exited: u64,
    /// It answered clearly worse than the previous one (proxy http).
    pub error_rate: u64,
}

/// Variables baton sets itself for each generation, which `--env` may not.
pub const SET_BY_BATON: [&str; 9] = [
    UPGRADE_STATE_ENV,
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    baton::vars::LISTEN_FDS,
    baton::vars::LISTEN_PID,
    baton::vars::LISTEN_FDNAMES,
    baton::vars::NOTIFY_SOCKET,
    baton::vars::SERVER_STARTER_PORT,
    baton::vars::BATON_GENERATION,
];

/// `--env NAME=VALUE` (and each of the config file's `env`): a portable
/// name (letters, digits and `_`, not starting with a digit), not one
/// that baton sets; a value without NUL.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=VALUE"))?;
    let portable = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !portable {
        return Err(format!(
            "{name:?}: an environment variable's name is letters, digits and _, not starting with a digit"
        ));
    }
    if SET_BY_BATON.contains(&name) {
        return Err(format!(
            "{name} is set by baton for each generation and cannot be given"
        ));
    }
    if value.contains('\0') {
        return Err(format!("{name}: a value cannot hold a NUL byte"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// The most worker processes whose output pipes and pidfds baton's keeper
/// holds, if baton does not say (`baton keeper --max-held`, sized from
/// `--workers`).
pub const KEEPER_MAX_HELD: usize = 64;
