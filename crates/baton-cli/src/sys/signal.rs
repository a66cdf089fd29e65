//! Sending signals to a process or to its whole process group.

use std::io;

use rustix::process::{Pid, Signal as RawSignal, kill_process, kill_process_group};

use crate::spec::Signal;

fn convert(pid: i32, signal: Signal) -> io::Result<(Pid, RawSignal)> {
    let pid = Pid::from_raw(pid)
        .filter(|p| p.as_raw_nonzero().get() > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad pid {pid}")))?;
    let raw = RawSignal::from_named_raw(signal.number()).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("bad signal {signal}"))
    })?;
    Ok((pid, raw))
}

/// Ignores SIGHUP from now on (the descriptor keeper, which must outlive
/// its baton and any terminal).
pub fn ignore_hangup() -> io::Result<()> {
    // SAFETY: `sigaction` with `SIG_IGN` installs no handler (no code of
    // ours runs on a signal) and reads only the zeroed struct on this stack
    // frame, whose mask is empty; it is sound at any time.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_IGN;
        libc::sigaction(libc::SIGHUP, &action, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// SIGPIPE ends the process again, as it does any command-line tool
/// (Rust ignores it by default): for the client commands, whose output
/// may go to a pipe that closes early (`baton status --json | head -1`).
pub fn default_pipe() -> io::Result<()> {
    // SAFETY: `sigaction` with `SIG_DFL` installs no handler (no code of
    // ours runs on a signal) and reads only the zeroed struct on this stack
    // frame, whose mask is empty; it is sound at any time.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGPIPE, &action, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `kill(pid, signal)`. A process that is already gone is not an error.
pub fn send(pid: i32, signal: Signal) -> io::Result<()> {
    let (pid, raw) = convert(pid, signal)?;
    match kill_process(pid, raw) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `kill(-pgid, signal)`: every process in the group. An empty group is not
/// an error.
pub fn send_group(pgid: i32, signal: Signal) -> io::Result<()> {
    let (pgid, raw) = convert(pgid, signal)?;
    match kill_process_group(pgid, raw) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
