//! The messages helper tasks send to the guardian's loop: a leaf that the
//! loop and the rooms that feed it both import.

use std::net::SocketAddr;

use super::generation::Slot;
use super::readiness::Source;
use crate::sys::notify_socket::Datagram;

/// Messages from helper tasks to the loop.
#[derive(Debug)]
pub enum Event {
    /// A datagram arrived on a generation's notification socket (and
    /// passed its reader's checks).
    Notify {
        /// The worker process.
        slot: Slot,
        /// The datagram.
        datagram: Datagram,
    },
    /// A source of readiness passed for a worker process (a delay, a
    /// health check).
    Ready(Slot, Source),
    /// Time to run (again) the `--ready exec:` check of a worker process.
    RunCheck(Slot),
    /// A worker process listens on these TCP addresses by itself.
    SelfBound {
        /// The worker process.
        slot: Slot,
        /// What it listens on.
        addrs: Vec<SocketAddr>,
    },
    /// The `--watch` file was replaced.
    Watched,
    /// Proxy mode: nothing is in flight any more to a retired generation
    /// (or its drain wait passed).
    Drained(Slot),
    /// Before an upgrade: what had to finish first did (true), or did not
    /// within the stop timeout (false).
    Quiesced(bool),
    /// An adopted process (not our child) exited.
    Gone(i32),
    /// Proxy mode, stopping: the clients' connections have ended (or the
    /// drain wait passed); the stop proper follows.
    ClientsGone,
    /// Proxy mode: the release on probation answers clearly worse than the
    /// previous one.
    Worse {
        /// The generation.
        generation: u64,
        /// The evidence.
        why: String,
    },
}
