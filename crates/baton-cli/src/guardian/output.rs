//! `--log-prefix`: the app's stdout and stderr go through pipes that baton
//! reads line by line and writes out again with `[NAME gen N] ` in front, so
//! people reading a terminal know which generation said what. Without it the
//! app inherits baton's stdout and stderr and baton stays out of the way.

use std::io::{self, Write};
use std::os::fd::OwnedFd;

use rustix::fs::OFlags;
use rustix::pipe::PipeFlags;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The write ends for a generation's stdout and stderr.
#[derive(Debug)]
pub struct Pipes {
    /// Becomes the child's fd 1.
    pub stdout: OwnedFd,
    /// Becomes the child's fd 2.
    pub stderr: OwnedFd,
    /// Second descriptors of the read ends (stdout, stderr), so that an
    /// upgraded baton can go on copying.
    pub readers: (OwnedFd, OwnedFd),
}

/// Creates the pipes and starts copying their lines, prefixed, to baton's
/// own stdout and stderr. The copying ends when every writer has closed
/// (the generation and anything it started).
pub fn pipes(name: &str, slot: super::generation::Slot) -> io::Result<Pipes> {
    let (out_read, stdout) = pipe()?;
    let (err_read, stderr) = pipe()?;
    let readers = (out_read.try_clone()?, err_read.try_clone()?);
    resume(name, slot, out_read, err_read)?;
    Ok(Pipes {
        stdout,
        stderr,
        readers,
    })
}

/// Copies a generation's output from the read ends `stdout` and `stderr`
/// (new, or handed over by a previous image).
pub fn resume(
    name: &str,
    slot: super::generation::Slot,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> io::Result<()> {
    let prefix = format!("[{name} gen {}] ", slot.label());
    rustix::fs::fcntl_setfl(&stdout, OFlags::NONBLOCK)?;
    rustix::fs::fcntl_setfl(&stderr, OFlags::NONBLOCK)?;
    copy(stdout, prefix.clone(), false)?;
    copy(stderr, prefix, true)
}

/// A close-on-exec pipe whose read end is non-blocking (for tokio); the
/// write end stays blocking, as a program expects of its stdout.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
    rustix::fs::fcntl_setfl(&read, OFlags::NONBLOCK)?;
    Ok((read, write))
}

fn copy(read: OwnedFd, prefix: String, to_stderr: bool) -> io::Result<()> {
    let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(receiver).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let text = format!("{prefix}{line}\n");
            let _ = if to_stderr {
                io::stderr().lock().write_all(text.as_bytes())
            } else {
                io::stdout().lock().write_all(text.as_bytes())
            };
        }
    });
    Ok(())
}
