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
    set_disposition(libc::SIGHUP, libc::SIG_IGN)
}

/// SIGPIPE ends the process again, as it does any command-line tool
/// (Rust ignores it by default): for the client commands, whose output
/// may go to a pipe that closes early (`baton status --json | head -1`).
pub fn default_pipe() -> io::Result<()> {
    set_disposition(libc::SIGPIPE, libc::SIG_DFL)
}

/// Sets `signal`'s disposition to `SIG_IGN` or `SIG_DFL` (never a handler).
fn set_disposition(signal: libc::c_int, disposition: libc::sighandler_t) -> io::Result<()> {
    // SAFETY: `sigaction` with `SIG_IGN` or `SIG_DFL` (the only values
    // passed here) installs no handler (no code of ours runs on a signal)
    // and reads only the zeroed struct on this stack frame, whose mask is
    // empty; it is sound at any time.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = disposition;
        libc::sigaction(signal, &action, std::ptr::null_mut())
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
