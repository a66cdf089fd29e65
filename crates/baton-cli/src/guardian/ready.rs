//! Readiness other than `READY=1`: a fixed delay (`--ready delay:DUR`) or a
//! command that must exit 0 (`--ready exec:CMD`, retried every
//! [`CHECK_INTERVAL`]). Both only post events to the loop; the check command
//! is spawned and reaped by the loop like every other child.

use std::ffi::OsString;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;

/// The shell that runs `exec:` commands.
pub const SHELL: &str = "/bin/sh";

/// Pause between two failed runs of the readiness command.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);

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
