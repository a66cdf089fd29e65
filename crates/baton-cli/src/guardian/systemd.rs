//! Telling the supervisor that runs baton (systemd, `Type=notify`) what
//! baton is doing, with the same `sd_notify(3)` protocol apps use: READY=1
//! once the first generation serves, RELOADING=1 … READY=1 around each
//! reload, STOPPING=1 when stopping. MAINPID stays baton's own pid, so
//! systemd keeps watching baton, not a generation. Without `NOTIFY_SOCKET`
//! in baton's environment every call is a no-op.
//!
//! At start baton also hands its listeners to systemd's file-descriptor
//! store (`FDSTORE=1` with `FDNAME=`, the descriptors attached), so that a
//! baton that dies or is restarted (`systemctl restart`) does not close
//! them: systemd keeps them open, clients wait in their backlog, and the
//! next baton gets them back in `LISTEN_FDS` (matched to its `--listen`
//! by name or address). The unit must allow it (`FileDescriptorStoreMax=`);
//! otherwise systemd drops them and nothing changes.
//!
//! With `WatchdogSec=` systemd sets `WATCHDOG_USEC` (and `WATCHDOG_PID`):
//! baton sends `WATCHDOG=1` from its event loop at half that period, so a
//! loop that is stuck is noticed, and the app never sees the variables (the
//! watchdog is baton's, not the app's).

use std::os::fd::AsFd;
use std::time::Duration;

use tracing::debug;

/// What has been said upstream so far.
#[derive(Debug, Default)]
pub struct Systemd {
    ready: bool,
    reloading: bool,
    stopping: bool,
    /// One service of several (`--config-dir`): the instance speaks for
    /// them all, so this one says nothing.
    muted: bool,
}

impl Systemd {
    /// Whether systemd was told READY=1.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Goes on from what a previous image told systemd.
    pub fn resume(ready: bool) -> Systemd {
        Systemd {
            ready,
            ..Systemd::default()
        }
    }

    /// For one service of several: says nothing.
    pub fn muted() -> Systemd {
        Systemd {
            muted: true,
            ..Systemd::default()
        }
    }

    fn send(&self, state: &str) {
        if self.muted {
            return;
        }
        match baton::notify(state) {
            Ok(true) => debug!(state = %state.replace('\n', " "), "notified the service manager"),
            Ok(false) => {}
            Err(e) => debug!(error = %e, "cannot notify the service manager"),
        }
    }

    /// A generation became ready.
    pub fn serving(&mut self, generation: u64) {
        if self.stopping {
            return;
        }
        if !self.ready || self.reloading {
            self.ready = true;
            self.reloading = false;
            self.send(&format!(
                "READY=1\nMAINPID={}\nSTATUS=serving generation {generation}",
                std::process::id()
            ));
        }
    }

    /// Every service of several has started (`--config-dir`): READY=1
    /// once, with `status`.
    pub fn instance_ready(&mut self, status: &str) {
        if !self.ready && !self.stopping {
            self.ready = true;
            self.send(&format!(
                "READY=1\nMAINPID={}\nSTATUS={status}",
                std::process::id()
            ));
        }
    }

    /// A reload began while something serves.
    pub fn reloading(&mut self, generation: u64) {
        if self.stopping || !self.ready || self.reloading {
            return;
        }
        self.reloading = true;
        // systemd 253+ wants the time of the request with RELOADING=1.
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading: starting generation {generation}"
        ));
    }

    /// A reload ended without a new generation; the old one serves on.
    pub fn rolled_back(&mut self, serving: Option<u64>, why: &str) {
        if self.stopping || !self.reloading {
            return;
        }
        self.reloading = false;
        let status = match serving {
            Some(g) => format!("serving generation {g}; last reload rolled back: {why}"),
            None => format!("last reload rolled back: {why}"),
        };
        self.send(&format!("READY=1\nSTATUS={}", status.replace('\n', " ")));
    }

    /// Hands `listeners` to the file-descriptor store, one datagram each.
    pub fn store(&self, listeners: &[crate::config::BoundListener]) {
        if self.muted {
            return;
        }
        let Some(target) = std::env::var_os(baton::vars::NOTIFY_SOCKET) else {
            return;
        };
        let target = target.to_string_lossy();
        for l in listeners {
            let text = format!("FDSTORE=1\nFDNAME={}", l.name);
            match crate::sys::fdpass::send_datagram(&target, text.as_bytes(), &[l.fd.as_fd()]) {
                Ok(()) => {
                    debug!(addr = %l.local, name = %l.name, "listener handed to the service manager's descriptor store")
                }
                Err(e) => {
                    debug!(addr = %l.local, error = %e, "cannot hand the listener to the service manager");
                    return;
                }
            }
        }
    }

    /// The service manager's watchdog period, if it watches this process
    /// (`WATCHDOG_USEC`, and `WATCHDOG_PID` naming baton when it is set).
    pub fn watchdog() -> Option<Duration> {
        std::env::var_os(baton::vars::NOTIFY_SOCKET)?;
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID")
            && pid.parse::<u32>().ok() != Some(std::process::id())
        {
            return None;
        }
        (usec > 0).then(|| Duration::from_micros(usec))
    }

    /// The loop is alive: `WATCHDOG=1`.
    pub fn watchdog_ping(&self) {
        self.send("WATCHDOG=1");
    }

    /// baton is stopping.
    pub fn stopping(&mut self) {
        if !self.stopping {
            self.stopping = true;
            self.send("STOPPING=1\nSTATUS=stopping");
        }
    }
}
