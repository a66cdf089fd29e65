//! What goes into the policy and what comes out: the triggers of a new
//! generation, the actions the loop carries out, the outcomes it reports,
//! the counters, and the snapshot an upgrade or an adoption starts from.

use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::RollbackReason;
use crate::guardian::generation::{Generation, Slot};
use crate::knobs::Reverts;
use crate::spec::Signal;

/// What asked for a new generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// baton started.
    Start,
    /// A signal (SIGHUP, SIGUSR2).
    Signal(Signal),
    /// A `reload` request on the control socket.
    Control,
    /// The `--watch` file was replaced.
    Watch,
    /// A Unix listener an app shut down was replaced by a new socket, which
    /// only a new generation can serve.
    Listener,
    /// The serving generation died and is being replaced.
    Restart,
    /// `baton rollback`: the previous release again.
    Rollback,
    /// A release failed its bake: the one before it again.
    Revert,
}

impl Trigger {
    /// Whether someone asked for it (a reload or a rollback), as opposed to
    /// baton's own start and crash restarts: counted in `reloads_*`.
    pub fn requested(self) -> bool {
        matches!(
            self,
            Trigger::Signal(_)
                | Trigger::Control
                | Trigger::Watch
                | Trigger::Listener
                | Trigger::Rollback
        )
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Start => write!(f, "start"),
            Trigger::Signal(s) => write!(f, "{s}"),
            Trigger::Control => write!(f, "control"),
            Trigger::Watch => write!(f, "watch"),
            Trigger::Listener => write!(f, "listener"),
            Trigger::Restart => write!(f, "restart"),
            Trigger::Rollback => write!(f, "rollback"),
            Trigger::Revert => write!(f, "revert"),
        }
    }
}

/// How a reload ended, as reported to whoever asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new generation is ready and serving.
    Reloaded {
        /// The new generation.
        generation: u64,
        /// Its pid.
        pid: i32,
        /// How long it took to become ready.
        ready_after: Duration,
        /// The bake it passed (`--bake`), if it was on probation.
        baked: Option<Duration>,
    },
    /// The new generation was not put in service.
    RolledBack {
        /// The failed generation, if one was spawned.
        generation: Option<u64>,
        /// Its pid, if it had one.
        pid: Option<i32>,
        /// Why.
        reason: RollbackReason,
        /// The generation still serving, if any.
        serving: Option<u64>,
    },
}

impl Outcome {
    /// The outcome in one line, naming the generation and pid.
    pub fn message(&self) -> String {
        match self {
            Outcome::Reloaded {
                generation,
                pid,
                ready_after,
                baked,
            } => format!(
                "generation {generation} (pid {pid}) is serving, ready after {} ms{}",
                ready_after.as_millis(),
                baked.map_or(String::new(), |b| format!(
                    ", passed its {} bake",
                    humantime::format_duration(b)
                ))
            ),
            Outcome::RolledBack {
                generation,
                pid,
                reason,
                serving,
            } => {
                let culprit = match (generation, pid) {
                    (Some(g), Some(p)) => format!("generation {g} (pid {p})"),
                    (Some(g), None) => format!("generation {g}"),
                    _ => "the reload".to_owned(),
                };
                let after = match serving {
                    Some(s) => format!("; generation {s} keeps serving"),
                    None if *reason == RollbackReason::Stopping => String::new(),
                    None => "; no generation is serving".to_owned(),
                };
                format!("{culprit} {reason}{after}")
            }
        }
    }
}

/// Which release a new generation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The command as it is now (a deploy's new file, `current` switched).
    Command,
    /// The release that last passed (served, and its bake if any): what a
    /// failed bake reverts to.
    Current,
    /// The one before it (`baton rollback`).
    Previous,
}

/// Why a signal is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalCause {
    /// Its successor is ready: drain and exit.
    Retire,
    /// baton is stopping.
    Stop,
}

/// What the event loop must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<W> {
    /// Start generation `generation` (then call `spawned` or `spawn_failed`).
    Spawn {
        /// The generation to start.
        generation: u64,
        /// Which release it runs.
        release: Pick,
    },
    /// Start worker process `slot` (a replacement, or a `--max-rss`
    /// successor) from its generation's release (then call
    /// `worker_spawned` or `worker_spawn_failed`).
    SpawnWorker {
        /// The worker process to start.
        slot: Slot,
    },
    /// Send `signal` to worker process `slot`.
    Signal {
        /// The worker process.
        slot: Slot,
        /// Its pid.
        pid: i32,
        /// The signal.
        signal: Signal,
        /// Why.
        cause: SignalCause,
    },
    /// SIGKILL worker process `slot`'s whole process group.
    KillGroup {
        /// The worker process.
        slot: Slot,
        /// Its pid, which is also its process group id.
        pid: i32,
    },
    /// A stop with `--shutdown-delay` began: not ready any more (`/readyz`
    /// 503), serving on for `delay` before the stop proper.
    LameDuck {
        /// How long.
        delay: Duration,
    },
    /// Tell the waiters how their reload ended.
    Report {
        /// Whoever asked.
        waiters: Vec<W>,
        /// The outcome.
        outcome: Outcome,
    },
    /// Every generation is gone; exit with this code.
    Exit {
        /// The process exit code.
        code: u8,
    },
}

/// Counters for `baton status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Reloads that put a new generation in service.
    pub reloads_ok: u64,
    /// Reloads that rolled back.
    pub reloads_failed: u64,
    /// Replacements of a generation that died while serving.
    pub restarts: u64,
    /// The last reload's outcome, in words.
    pub last_reload: Option<String>,
    /// Releases reverted during their bake, by cause.
    #[serde(default)]
    pub reverts: Reverts,
}

/// The policy's state between events, when no reload is under way and
/// baton is not stopping: what an upgraded or adopting baton starts from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// The live generations.
    pub generations: Vec<Generation>,
    /// The number the next generation gets.
    pub next_id: u64,
    /// The generation serving.
    pub serving: Option<u64>,
    /// When a crashed generation's replacement starts.
    #[serde(with = "crate::guardian::stamp::option")]
    pub restart_at: Option<Instant>,
    /// Consecutive failures (for the restart delay).
    pub failures: u32,
    /// Whether a generation was ever ready.
    pub ever_ready: bool,
    /// Recent crash restarts (for the start limit).
    #[serde(with = "crate::guardian::stamp::vec")]
    pub recent_restarts: Vec<Instant>,
    /// The counters.
    pub stats: Stats,
}
