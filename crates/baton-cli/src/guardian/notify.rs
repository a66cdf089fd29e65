//! A generation's notification socket (`sd_notify(3)`), read by a task of
//! its own: only datagrams that pass [`Filter`] reach the loop, through a
//! bounded queue; the rest are counted (`pressure::Rejected`), so that a
//! flood from another user costs the loop nothing.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::warn;

use super::generation::Slot;
use super::pressure::Rejected;
use crate::sys::notify_socket::{Datagram, NotifySocket};

/// Notifications queued from the sockets' readers to the loop, at most; a
/// reader waits (and the datagrams wait in its socket) beyond that.
pub const QUEUE: usize = 256;

/// Who may speak for a generation on its notify socket.
#[derive(Debug, Clone, Copy)]
pub struct Filter {
    /// The uid the app runs as.
    pub app_uid: u32,
    /// `--notify-access main`.
    pub main_only: bool,
    /// The generation's main process.
    pub pid: i32,
}

impl Filter {
    /// Whether `datagram` may speak for the generation, or why not.
    pub fn check(&self, datagram: &Datagram) -> Result<(), &'static str> {
        // Anyone on the machine can find an abstract socket: only the app's
        // own user (or root) may speak for a generation.
        if !matches!(datagram.uid, Some(uid) if uid == self.app_uid || uid == 0) {
            return Err("from another user");
        }
        if self.main_only && datagram.pid != Some(self.pid) {
            return Err(
                "from a process other than the generation's main one (--notify-access main)",
            );
        }
        Ok(())
    }
}

/// Reads `socket` for `generation` until it fails or the loop is gone.
pub fn read(
    slot: Slot,
    socket: NotifySocket,
    filter: Filter,
    to_loop: mpsc::Sender<(Slot, Datagram)>,
    rejected: Arc<Rejected>,
) -> AbortHandle {
    tokio::spawn(async move {
        loop {
            match socket.recv().await {
                Ok(datagram) => {
                    if let Err(why) = filter.check(&datagram) {
                        rejected.note(format!(
                            "generation {slot}: {why} (sender pid {}, uid {})",
                            datagram.pid.unwrap_or(0),
                            datagram
                                .uid
                                .map_or_else(|| "?".to_owned(), |u| u.to_string()),
                        ));
                        continue;
                    }
                    if to_loop.send((slot, datagram)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    warn!(generation = %slot, error = %e, "the notification socket failed");
                    break;
                }
            }
        }
    })
    .abort_handle()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_apps_user_and_with_main_the_main_process() {
        let filter = Filter {
            app_uid: 1000,
            main_only: false,
            pid: 42,
        };
        let datagram = |pid, uid| Datagram {
            pid: Some(pid),
            uid: Some(uid),
            text: "READY=1".into(),
        };
        assert!(filter.check(&datagram(7, 1000)).is_ok());
        assert!(filter.check(&datagram(7, 0)).is_ok(), "root may");
        assert!(filter.check(&datagram(7, 65534)).is_err());
        let main = Filter {
            main_only: true,
            ..filter
        };
        assert!(main.check(&datagram(42, 1000)).is_ok());
        assert!(main.check(&datagram(7, 1000)).is_err());
    }
}
