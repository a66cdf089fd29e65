//! `--log-file`: the app's output in a file of its own, rotated by size
//! (`--log-max-size`, `--log-keep`), as supervisord's `stdout_logfile`
//! with `stdout_logfile_maxbytes` and `_backups`: for hosts without a
//! journal.
//!
//! Rotation renames `PATH` to `PATH.1` (`PATH.1` to `PATH.2`, and so on,
//! the oldest beyond `--log-keep` removed) and starts `PATH` anew; with
//! `--log-keep 0` the file is cut back to empty instead. baton never
//! splits a line across two files (its keeper, copying after baton died,
//! writes what it reads as it comes, and may).
//!
//! The file is written by a thread of its own ([`LogSink`]): the loop and
//! the tasks that read the app's pipes only queue lines, so a slow disk
//! neither blocks baton's loop nor, through a full pipe, the app. The
//! queue is bounded ([`MAX_QUEUED`] bytes); past it lines are dropped,
//! counted, and the count written to the file when it catches up. When
//! baton has died, its keeper writes the file the same way.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

/// `--log-max-size`'s default, as supervisord's `stdout_logfile_maxbytes`.
pub const DEFAULT_MAX_SIZE: u64 = 50 << 20;

/// `--log-keep`'s default, as supervisord's `stdout_logfile_backups`.
pub const DEFAULT_KEEP: u32 = 10;

/// Bytes of output waiting for the file at most.
pub const MAX_QUEUED: usize = 4 << 20;

/// Where and how big.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSpec {
    /// The file.
    pub path: PathBuf,
    /// The size at which it is rotated.
    pub max_size: u64,
    /// Rotated files kept.
    pub keep: u32,
}

/// The log file, open for appending.
#[derive(Debug)]
pub struct LogFile {
    spec: LogSpec,
    file: File,
    size: u64,
}

fn open(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

impl LogFile {
    /// Opens (or creates) `spec.path` for appending; a symlink is refused.
    pub fn open(spec: &LogSpec) -> io::Result<LogFile> {
        let file = open(&spec.path).map_err(|e| {
            io::Error::new(e.kind(), format!("log file {}: {e}", spec.path.display()))
        })?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            spec: spec.clone(),
            file,
            size,
        })
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut name = self.spec.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Moves the full file aside (or, keeping none, empties it).
    fn rotate(&mut self) -> io::Result<()> {
        if self.spec.keep == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(self.numbered(self.spec.keep));
        for n in (1..self.spec.keep).rev() {
            match std::fs::rename(self.numbered(n), self.numbered(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.spec.path, self.numbered(1))?;
        self.file = open(&self.spec.path)?;
        self.size = 0;
        Ok(())
    }

    /// Appends `line` (whole), rotating first if it would not fit.
    pub fn line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.spec.max_size {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }
}

/// The keeper's writes: each as it comes, rotating before one that would
/// not fit.
impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    dropped: u64,
    /// Every sink is gone: the writer ends once it has written the rest.
    closed: bool,
}

impl Queue {
    /// Takes `line` if it fits under [`MAX_QUEUED`]; else counts it.
    fn offer(&mut self, line: Vec<u8>) {
        if self.bytes + line.len() > MAX_QUEUED {
            self.dropped += 1;
        } else {
            self.bytes += line.len();
            self.lines.push_back(line);
        }
    }
}

/// Lines on their way to the log file, written by a thread of its own
/// (which ends, and closes the file, with the last copy of the sink).
#[derive(Debug, Clone)]
pub struct LogSink {
    inner: Arc<Inner>,
}

/// The queue a sink's copies share.
#[derive(Debug)]
struct Inner {
    queue: Arc<(Mutex<Queue>, Condvar)>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let (lock, ready) = &*self.queue;
        if let Ok(mut q) = lock.lock() {
            q.closed = true;
            ready.notify_one();
        }
    }
}

impl LogSink {
    /// Opens the file (an error says which and why) and starts its writer.
    pub fn start(spec: &LogSpec) -> io::Result<LogSink> {
        let mut file = LogFile::open(spec)?;
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let theirs = Arc::clone(&queue);
        std::thread::Builder::new()
            .name("baton-log".into())
            .spawn(move || {
                // Signals are the loop's alone.
                let _ = crate::sys::exec::block_signals();
                let (lock, ready) = &*theirs;
                loop {
                    let (lines, dropped) = {
                        let Ok(mut q) = lock.lock() else { return };
                        while q.lines.is_empty() && q.dropped == 0 {
                            if q.closed {
                                return;
                            }
                            q = match ready.wait(q) {
                                Ok(q) => q,
                                Err(_) => return,
                            };
                        }
                        q.bytes = 0;
                        (std::mem::take(&mut q.lines), std::mem::take(&mut q.dropped))
                    };
                    for line in lines {
                        let _ = file.line(&line);
                    }
                    if dropped > 0 {
                        let note = format!(
                            "baton: {dropped} line(s) of output dropped: the log file could not keep up\n"
                        );
                        let _ = file.line(note.as_bytes());
                    }
                }
            })?;
        Ok(LogSink {
            inner: Arc::new(Inner { queue }),
        })
    }

    /// Queues `line` for the file, never waiting: past [`MAX_QUEUED`]
    /// bytes it is dropped and counted.
    pub fn push(&self, line: Vec<u8>) {
        let (lock, ready) = &*self.inner.queue;
        if let Ok(mut q) = lock.lock() {
            q.offer(line);
            ready.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, max_size: u64, keep: u32) -> LogSpec {
        LogSpec {
            path: dir.join("app.log"),
            max_size,
            keep,
        }
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn the_writer_ends_with_the_last_sink_after_writing_what_was_queued() {
        let dir = tempfile::tempdir().expect("dir");
        let spec = spec(dir.path(), 1 << 20, 1);
        // (Whether this process holds the file open: the writer's end.)
        let open = || {
            std::fs::read_dir("/proc/self/fd").is_ok_and(|fds| {
                fds.filter_map(Result::ok)
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == spec.path))
            })
        };
        let sink = LogSink::start(&spec).expect("start");
        let copy = sink.clone();
        sink.push(b"one\n".to_vec());
        drop(sink);
        copy.push(b"two\n".to_vec());
        drop(copy);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while open() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(read(spec.path.clone()), "one\ntwo\n");
        assert!(!open(), "the writer ended and closed the file");
    }

    #[test]
    fn rotation_keeps_whole_lines_and_the_newest_files() {
        let dir = tempfile::tempdir().expect("dir");
        let spec = spec(dir.path(), 10, 2);
        let mut log = LogFile::open(&spec).expect("open");
        for line in [
            "aaaa\n", "bbbb\n", "cccc\n", "dddd\n", "eeee\n", "ffff\n", "gggg\n",
        ] {
            log.line(line.as_bytes()).expect("write");
        }
        assert_eq!(read(spec.path.clone()), "gggg\n");
        assert_eq!(read(log.numbered(1)), "eeee\nffff\n");
        assert_eq!(read(log.numbered(2)), "cccc\ndddd\n");
        assert!(!log.numbered(3).exists(), "only 2 kept");
        // A line longer than the limit goes whole into a file of its own.
        log.line(b"0123456789abcdef\n").expect("write");
        assert_eq!(read(spec.path.clone()), "0123456789abcdef\n");
        // Opened again, it goes on from its size.
        drop(log);
        let mut log = LogFile::open(&spec).expect("reopen");
        log.line(b"h\n").expect("write");
        assert_eq!(read(spec.path.clone()), "h\n");
        assert_eq!(read(log.numbered(1)), "0123456789abcdef\n");
    }

    #[test]
    fn keeping_none_cuts_the_file_back_and_a_symlink_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let spec0 = spec(dir.path(), 8, 0);
        let mut log = LogFile::open(&spec0).expect("open");
        log.line(b"1234567\n").expect("write");
        log.line(b"abc\n").expect("write");
        assert_eq!(read(spec0.path.clone()), "abc\n");
        assert!(!log.numbered(1).exists());
        let link = LogSpec {
            path: dir.path().join("link.log"),
            ..spec0.clone()
        };
        std::os::unix::fs::symlink(&spec0.path, &link.path).expect("symlink");
        let err = LogFile::open(&link).expect_err("a symlink");
        assert!(err.to_string().contains("link.log"), "{err}");
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_counts_what_it_drops() {
        let mut q = Queue::default();
        q.offer(vec![b'a'; MAX_QUEUED - 10]);
        q.offer(vec![b'b'; 11]);
        q.offer(vec![b'c'; 10]);
        assert_eq!((q.lines.len(), q.bytes, q.dropped), (2, MAX_QUEUED, 1));
    }

    #[test]
    fn the_sink_writes_lines_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let spec = spec(dir.path(), 1 << 30, 1);
        let sink = LogSink::start(&spec).expect("start");
        for i in 0..1000 {
            sink.push(format!("line {i}\n").into_bytes());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !read(spec.path.clone()).contains("line 999\n") {
            assert!(std::time::Instant::now() < deadline, "the writer wrote");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let text = read(spec.path.clone());
        let lines: Vec<&str> = text.lines().collect();
        let expected: Vec<String> = (0..1000).map(|i| format!("line {i}")).collect();
        assert_eq!(lines, expected);
    }
}
