//! `--watch PATH`: deploy by copy. A task polls the file and posts one event
//! per completed change: after a change is seen, it waits until the file has
//! stayed the same (inode, size, modification time) for [`QUIET`], so an
//! atomic rename counts at once and a file still being written counts only
//! once the writer is done. Polling (not inotify) works on every filesystem
//! and survives the file being replaced.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;
use tracing::{debug, info};

/// How often the file is looked at.
pub const POLL: Duration = Duration::from_millis(100);
/// How long a change must have settled before it counts.
pub const QUIET: Duration = Duration::from_millis(500);

/// What identifies a version of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

fn version(path: &PathBuf) -> Option<Version> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Version {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
    })
}

/// Watches `path`; sends `event()` for each settled change.
pub fn spawn<T: Send + 'static>(
    path: PathBuf,
    to: UnboundedSender<T>,
    event: impl Fn() -> T + Send + 'static,
) -> AbortHandle {
    tokio::spawn(async move {
        let mut current = version(&path);
        // (the version seen last, when it was first seen)
        let mut pending: Option<(Option<Version>, Instant)> = None;
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            let now = version(&path);
            match &mut pending {
                None if now != current => {
                    debug!(path = %path.display(), "watched file changed; waiting for it to settle");
                    pending = Some((now, Instant::now()));
                }
                Some((seen, since)) if *seen != now => {
                    *seen = now;
                    *since = Instant::now();
                }
                Some((seen, since)) if since.elapsed() >= QUIET => {
                    // A vanished file (mid-replacement) is not a version.
                    if seen.is_some() {
                        info!(path = %path.display(), "watched file replaced");
                        current = seen.take();
                        if to.send(event()).is_err() {
                            break;
                        }
                    }
                    pending = None;
                }
                _ => {}
            }
        }
    })
    .abort_handle()
}
