//! baton's descriptor limit, and the budget it is spent on.
//!
//! The usual soft limit (1 024, systemd's default) is far below what a
//! proxy holding client and upstream connections needs, and far below the
//! hard limit the system grants. At start baton raises its soft
//! `RLIMIT_NOFILE` to the hard limit (clamped to `fs.nr_open`), as Go's
//! runtime and nginx's `worker_rlimit_nofile` do, and each child gets the
//! original soft limit back before `exec`, so apps see what they would see
//! without baton (`select(2)`-based code breaks above 1 024).

use std::io;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors kept out of the connection budget: listeners, notify and
/// control sockets, spawning (pipes, a health check), logs.
pub const RESERVE: u64 = 128;

/// Control-socket connections served at once.
pub const CONTROL_CONNECTIONS: usize = 64;

/// `/metrics` connections served at once.
pub const METRICS_CONNECTIONS: usize = 16;

/// The limit as baton found it and as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Nofile {
    /// The soft limit baton was started with (restored for children);
    /// `u64::MAX` for unlimited.
    pub original_soft: u64,
    /// The hard limit (unchanged); `u64::MAX` for unlimited.
    pub hard: u64,
    /// baton's soft limit now.
    pub soft: u64,
}

/// `RLIM_INFINITY` as a number.
const INFINITY: u64 = u64::MAX;

/// Raises the soft descriptor limit as far as allowed. Never fails: if the
/// limit cannot be read or raised, baton goes on with what it has.
pub fn raise_nofile() -> Nofile {
    let now = getrlimit(Resource::Nofile);
    let original_soft = now.current.unwrap_or(INFINITY);
    let hard = now.maximum.unwrap_or(INFINITY);
    // The kernel refuses a limit above fs.nr_open, even for an unlimited
    // hard limit.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(nr_open);
    let mut soft = original_soft;
    if target > original_soft {
        let raised = Rlimit {
            current: Some(target),
            maximum: now.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            soft = target;
        }
    }
    Nofile {
        original_soft,
        hard,
        soft,
    }
}

/// The soft limit in effect now.
pub fn current_soft() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(INFINITY)
}

/// Descriptors this process has open now.
pub fn open_descriptors() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_to_the_hard_limit_and_remembers_the_original() {
        let before = getrlimit(Resource::Nofile);
        let n = raise_nofile();
        assert_eq!(n.original_soft, before.current.unwrap_or(INFINITY));
        assert!(n.soft >= n.original_soft);
        assert!(n.soft <= n.hard);
        assert_eq!(current_soft(), n.soft);
        // Put it back for the other tests of this process.
        let _ = setrlimit(Resource::Nofile, before);
    }
}
