//! `--log-prefix` and `--log-file`: the app's stdout and stderr go through
//! pipes that baton reads line by line and writes out again: with
//! `[NAME gen N] ` in front (so that people reading a terminal know which
//! generation said what), and to baton's stdout and stderr or to the log
//! file. Without either the app inherits baton's stdout and stderr and
//! baton stays out of the way.

use std::io::{self, Write};
use std::os::fd::OwnedFd;

use rustix::fs::OFlags;
use rustix::pipe::PipeFlags;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Where a generation's output goes.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// `[NAME gen N] ` before each line (`--log-prefix`).
    pub prefix: bool,
    /// The log file's writer (`--log-file`); none: baton's own stdout and
    /// stderr.
    pub sink: Option<super::logfile::LogSink>,
}

impl Output {
    /// Whether the output goes through baton at all.
    pub fn piped(&self) -> bool {
        self.prefix || self.sink.is_some()
    }
}

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
pub fn pipes(output: &Output, name: &str, slot: super::generation::Slot) -> io::Result<Pipes> {
    let (out_read, stdout) = pipe()?;
    let (err_read, stderr) = pipe()?;
    let readers = (out_read.try_clone()?, err_read.try_clone()?);
    resume(output, name, slot, out_read, err_read)?;
    Ok(Pipes {
        stdout,
        stderr,
        readers,
    })
}

/// Copies a generation's output from the read ends `stdout` and `stderr`
/// (new, or handed over by a previous image).
pub fn resume(
    output: &Output,
    name: &str,
    slot: super::generation::Slot,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> io::Result<()> {
    // Raw only into a log file without `--log-prefix` (pipes adopted from
    // a baton that had them are copied as that baton did).
    let prefix = if output.prefix || output.sink.is_none() {
        format!("[{name} gen {}] ", slot.label())
    } else {
        String::new()
    };
    rustix::fs::fcntl_setfl(&stdout, OFlags::NONBLOCK)?;
    rustix::fs::fcntl_setfl(&stderr, OFlags::NONBLOCK)?;
    copy(stdout, prefix.clone(), Target::of(output, false))?;
    copy(stderr, prefix, Target::of(output, true))
}

/// Where one pipe's lines are written.
enum Target {
    Stdout,
    Stderr,
    Log(super::logfile::LogSink),
}

impl Target {
    fn of(output: &Output, stderr: bool) -> Target {
        match (&output.sink, stderr) {
            (Some(sink), _) => Target::Log(sink.clone()),
            (None, false) => Target::Stdout,
            (None, true) => Target::Stderr,
        }
    }

    fn write(&self, line: Vec<u8>) {
        let _ = match self {
            Target::Stdout => io::stdout().lock().write_all(&line),
            Target::Stderr => io::stderr().lock().write_all(&line),
            Target::Log(sink) => {
                sink.push(line);
                Ok(())
            }
        };
    }
}

/// A close-on-exec pipe whose read end is non-blocking (for tokio); the
/// write end stays blocking, as a program expects of its stdout.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
    rustix::fs::fcntl_setfl(&read, OFlags::NONBLOCK)?;
    Ok((read, write))
}

/// The longest line copied whole; a longer one is cut into pieces of this
/// size, each written as a line of its own (the app's output is not
/// held in memory without bound).
pub const MAX_LINE: usize = 64 * 1024;

fn copy(read: OwnedFd, prefix: String, to: Target) -> io::Result<()> {
    let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    tokio::spawn(async move {
        let mut reader = BufReader::new(receiver);
        let mut line = Vec::new();
        let emit = |line: &[u8]| {
            let mut out = Vec::with_capacity(prefix.len() + line.len() + 1);
            out.extend_from_slice(prefix.as_bytes());
            out.extend_from_slice(line);
            if !line.ends_with(b"\n") {
                out.push(b'\n');
            }
            to.write(out);
        };
        // Bytes, not text: a line that is not UTF-8 is copied as it is.
        while let Ok(buf) = reader.fill_buf().await {
            if buf.is_empty() {
                break;
            }
            let (taken, whole) = take_line(buf, MAX_LINE - line.len());
            line.extend_from_slice(&buf[..taken]);
            reader.consume(taken);
            if whole || line.len() >= MAX_LINE {
                emit(&line);
                line.clear();
            }
        }
        if !line.is_empty() {
            emit(&line);
        }
    });
    Ok(())
}

/// How much of `buf` to take into a line with `room` left in it, and
/// whether that ends the line (a newline was taken).
fn take_line(buf: &[u8], room: usize) -> (usize, bool) {
    match memchr::memchr(b'\n', buf) {
        Some(i) if i < room => (i + 1, true),
        _ => (buf.len().min(room), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_at_their_newline_or_at_the_room_left() {
        assert_eq!(take_line(b"ab\ncd", 10), (3, true));
        assert_eq!(take_line(b"abcd", 10), (4, false));
        assert_eq!(take_line(b"abcd", 2), (2, false));
        // A newline just past the room: the line is cut before it.
        assert_eq!(take_line(b"ab\n", 2), (2, false));
        assert_eq!(take_line(b"\n", 1), (1, true));
    }
}
