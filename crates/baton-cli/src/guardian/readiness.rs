//! When is a generation ready: one gate that merges its sources.
//!
//! The sources are `READY=1` on its notification socket, a fixed delay
//! (`--ready delay:DUR`), a command that must exit 0 (`--ready exec:CMD`,
//! retried every [`CHECK_INTERVAL`]) and, in proxy mode, a health check on
//! its private port. The launch strategy says which of them a generation
//! needs; each passes once, and the gate opens when all that are needed
//! have passed. The deadline (`--ready-timeout`) is the policy's. Timers
//! and checks only post events to the loop; the check command is spawned
//! and reaped by the loop like every other child.

use std::ffi::OsString;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;

/// The shell that runs `exec:` commands.
pub const SHELL: &str = "/bin/sh";

/// Pause between two failed runs of the readiness command.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// A source of readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `READY=1`.
    Notify,
    /// `--ready delay:` elapsed.
    Delay,
    /// The `--ready exec:` command exited 0.
    Exec,
    /// The health check passed on the private port (proxy mode).
    Health,
}

impl Source {
    fn bit(self) -> u8 {
        match self {
            Source::Notify => 1,
            Source::Delay => 2,
            Source::Exec => 4,
            Source::Health => 8,
        }
    }
}

/// Which sources a generation needs, and which have passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gate {
    needed: u8,
    /// Any one of `needed` is enough (else all of them).
    any: bool,
    passed: u8,
    open: bool,
}

impl Gate {
    /// A gate that opens once every one of `needed` has passed.
    pub fn all(needed: &[Source]) -> Gate {
        Gate {
            needed: needed.iter().fold(0, |all, s| all | s.bit()),
            ..Gate::default()
        }
    }

    /// A gate that opens once any one of `needed` has passed.
    pub fn any(needed: &[Source]) -> Gate {
        Gate {
            any: true,
            ..Gate::all(needed)
        }
    }

    /// `source` passed. True exactly once: when this opens the gate. A
    /// source the gate does not need changes nothing.
    pub fn pass(&mut self, source: Source) -> bool {
        if self.open || self.needed & source.bit() == 0 {
            return false;
        }
        self.passed |= source.bit();
        self.open = self.any || self.passed & self.needed == self.needed;
        self.open
    }

    /// Whether `source` is one this gate waits for.
    pub fn needs(&self, source: Source) -> bool {
        self.needed & source.bit() != 0
    }
}

/// The argument vector that runs `command` through the shell.
pub fn shell_args(command: &str) -> Vec<OsString> {
    vec!["sh".into(), "-c".into(), command.into()]
}

/// Posts `event` to the loop after `delay`; abort the handle to cancel.
pub fn after<T: Send + 'static>(delay: Duration, to: UnboundedSender<T>, event: T) -> AbortHandle {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = to.send(event);
    })
    .abort_handle()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_opens_once_when_everything_needed_passed() {
        let mut g = Gate::all(&[Source::Health, Source::Notify]);
        assert!(!g.pass(Source::Delay), "not needed");
        assert!(!g.pass(Source::Notify));
        assert!(!g.pass(Source::Notify), "again");
        assert!(g.pass(Source::Health));
        assert!(!g.pass(Source::Health), "open already");
        let mut one = Gate::all(&[Source::Notify]);
        assert!(one.needs(Source::Notify) && !one.needs(Source::Exec));
        assert!(one.pass(Source::Notify));
        // Either READY=1 or the delay, whichever comes first.
        let mut either = Gate::any(&[Source::Notify, Source::Delay]);
        assert!(either.pass(Source::Delay));
        assert!(!either.pass(Source::Notify));
    }
}
