//! The one reaper: every child exit goes through `wait(-1, WNOHANG)` here,
//! after a SIGCHLD. Nothing else in baton waits for children (the guardian
//! never uses `tokio::process`, which would reap behind its back), except
//! [`super::spawn`] reaping a child whose `execve` failed before it ever
//! became anyone's generation.
//!
//! As PID 1 every orphan of the container is reparented to baton; otherwise
//! baton makes itself a child subreaper (`PR_SET_CHILD_SUBREAPER`), so the
//! orphans of its own descendants come to it instead of to init. Either way
//! they are reaped here, so no zombie accumulates.

use std::io;

use rustix::process::{Pid, WaitOptions, getpid, set_child_subreaper, wait};

use crate::exit::ExitStatus;

/// Whether this process is PID 1 (the init of a container).
pub fn is_pid1() -> bool {
    getpid().is_init()
}

/// Becomes the reaper of orphaned descendants, unless already PID 1.
pub fn become_subreaper() -> io::Result<()> {
    if is_pid1() {
        return Ok(());
    }
    set_child_subreaper(Some(getpid()))?;
    Ok(())
}

/// Reaps every child that has exited, without blocking.
pub fn reap() -> Vec<(i32, ExitStatus)> {
    let mut exits = Vec::new();
    loop {
        match wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                let status = match (status.exit_status(), status.terminating_signal()) {
                    (Some(code), _) => ExitStatus::Exited(code),
                    (None, Some(sig)) => ExitStatus::Signaled(sig),
                    // Stopped or continued: not an exit (we do not ask for
                    // those with WUNTRACED/WCONTINUED, so this is defensive).
                    (None, None) => continue,
                };
                exits.push((pid.as_raw_nonzero().get(), status));
            }
            // No child has exited (yet), or there are no children at all.
            Ok(None) | Err(rustix::io::Errno::CHILD) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
    }
    exits
}

/// Whether child `pid` has exited, without reaping it: while it is an
/// unreaped zombie its pid (and so its process group id) cannot be reused,
/// which makes it safe to signal its process group now.
pub fn has_exited(pid: i32) -> bool {
    let Some(pid) = Pid::from_raw(pid) else {
        return false;
    };
    let options = rustix::process::WaitIdOptions::EXITED
        | rustix::process::WaitIdOptions::NOHANG
        | rustix::process::WaitIdOptions::NOWAIT;
    matches!(
        rustix::process::waitid(rustix::process::WaitId::Pid(pid), options),
        Ok(Some(_))
    )
}

/// Reaps one specific child, blocking: only for a child whose exec failed.
pub(super) fn reap_pid(pid: i32) {
    if let Some(pid) = Pid::from_raw(pid) {
        while let Err(rustix::io::Errno::INTR) =
            rustix::process::waitpid(Some(pid), WaitOptions::empty())
        {}
    }
}
