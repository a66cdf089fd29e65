//! How generations and baton end: the log line of a retired generation's
//! exit, and the exit code a stop leads to.

use std::time::Duration;

use tracing::info;

use crate::exit::ExitStatus;
use crate::guardian::generation::{Generation, State};
use crate::spec::Signal;

/// The `exit` event of a retired generation `g` whose process `pid` exited
/// last: how long it drained, unless it had to be killed.
pub fn log_exit(g: &Generation, pid: i32, status: ExitStatus, lived: Duration) {
    let id = g.id;
    if g.state == State::Killed {
        info!(
            generation = id,
            pid,
            status = %status.word(),
            "exit: generation {id} {status}"
        );
    } else {
        let drain_ms = lived.as_millis() as u64;
        info!(
            generation = id,
            pid,
            status = %status.word(),
            drain_ms,
            "exit: generation {id} {status}"
        );
    }
}

/// A stop in progress, and what baton's exit code will be. For a requested
/// stop: 0 if every generation exited 0 or died of the stop signal baton
/// sent; otherwise a generation's own code (128+N for a signal baton did
/// not send; the serving generation's first); else 137 if one had to be
/// killed.
#[derive(Debug)]
pub struct Stopping {
    /// The generation serving when the stop began.
    serving: Option<u64>,
    /// An exit code decided up front (a failed first start, `--restart
    /// never`, the start limit).
    code: Option<u8>,
    /// A generation's own failure code, if one failed.
    failed: Option<u8>,
    /// Whether a generation had to be killed.
    killed: bool,
    /// A second stop request killed everything.
    pub forced: bool,
}

impl Stopping {
    /// A stop that began while `serving` served, with `code` decided up
    /// front (if any).
    pub fn new(serving: Option<u64>, code: Option<u8>) -> Stopping {
        Stopping {
            serving,
            code,
            failed: None,
            killed: false,
            forced: false,
        }
    }

    /// Generation `g` ended with `status` during the stop (`stop_signal`
    /// being the one baton sent).
    pub fn exited(&mut self, g: &Generation, status: ExitStatus, stop_signal: Signal) {
        match status {
            ExitStatus::Exited(0) => {}
            ExitStatus::Signaled(sig) if sig == stop_signal.number() => {}
            // An adopted generation asked to stop: it is gone, and nothing
            // says it failed.
            ExitStatus::Unknown => {}
            ExitStatus::Signaled(9) if g.state == State::Killed => self.killed = true,
            _ => {
                if self.failed.is_none() || self.serving == Some(g.id) {
                    self.failed = Some(status.shell_code());
                }
            }
        }
    }

    /// baton's exit code.
    pub fn code(&self) -> u8 {
        self.code
            .or(self.failed)
            .or(self.killed.then_some(137))
            .unwrap_or(0)
    }
}
