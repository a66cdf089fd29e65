//! baton's listening sockets, checked where generations hold them: an app
//! that calls `shutdown(2)` on its inherited listener stops it for every
//! process. A TCP listener is made to listen again; a Unix one baton bound
//! is replaced by a new socket on the same path (see
//! `config::BoundListener::ensure_listening`).

use tracing::warn;

use crate::config::{BoundListener, ListenerCheck};

/// What [`check`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// Listeners re-armed.
    pub rearmed: u64,
    /// Whether one was replaced by a new socket (only new generations
    /// have it).
    pub replaced: bool,
}

/// Checks every listener and re-arms those that were shut down. `exited` is
/// the generation (and pid) that just exited, the likely culprit; else one
/// of `alive` is.
pub fn check(
    listeners: &mut [BoundListener],
    exited: Option<(u64, i32)>,
    alive: &[(u64, i32)],
) -> Checked {
    let mut checked = Checked::default();
    for l in listeners {
        let check = l.ensure_listening();
        if matches!(check, Ok(ListenerCheck::Listening)) {
            l.broken_reported = false;
            continue;
        }
        let by = match exited {
            Some((generation, pid)) => format!("generation {generation} (pid {pid}), as it exited"),
            None => {
                let alive: Vec<String> = alive
                    .iter()
                    .map(|(id, pid)| format!("{id} (pid {pid})"))
                    .collect();
                format!("one of generations {}", alive.join(", "))
            }
        };
        match check {
            Ok(ListenerCheck::Listening) => {}
            Ok(how) => {
                checked.rearmed += 1;
                l.broken_reported = false;
                let generation = exited.map_or(0, |(g, _)| g);
                warn!(addr = %l.local, generation, by = %by,
                    how = if how == ListenerCheck::Replaced { "replaced by a new socket, for new generations" } else { "listening again" },
                    "listener shut down by the app (shutdown(2) on an inherited socket); re-armed");
                checked.replaced |= how == ListenerCheck::Replaced;
            }
            Err(e) if !l.broken_reported => {
                l.broken_reported = true;
                warn!(addr = %l.local, by = %by, error = %e,
                    "listener shut down by the app, and it cannot listen again");
            }
            Err(_) => {}
        }
    }
    checked
}
