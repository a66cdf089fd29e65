//! Knowing when to stop, and stopping in order.
//!
//! The supervisor asks for a graceful shutdown with SIGTERM (baton's and
//! systemd's default stop signal); a terminal sends SIGINT. Two ways to wait:
//!
//! - [`Shutdown`]: std only. [`Shutdown::install`] sets handlers for both
//!   signals; [`Shutdown::wait`] blocks until one arrives, and
//!   [`Shutdown::requested`] polls.
//! - [`signal`] (feature `tokio`): a future that completes on either signal.
//!
//! Install early, before serving: a signal that arrives before a handler is
//! installed kills the process with the default action, mid-request.
//!
//! [`Hooks`] run cleanup steps (close a pool, flush a buffer) after the
//! drain, in reverse order of registration, each bounded by what is left of
//! the deadline, so that one stuck step cannot hold the exit hostage.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::sys;

/// Which shutdown signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Signal {
    /// SIGTERM: the supervisor's stop signal.
    Terminate,
    /// SIGINT: Ctrl-C on a terminal.
    Interrupt,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
        })
    }
}

/// The signal number the handler saw first (0: none yet).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Write end of the self-pipe the handler wakes waiters through (-1: none).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// The signal handler: records the signal and wakes the waiter. Only
/// async-signal-safe operations: atomics and `write(2)`.
extern "C" fn on_signal(sig: libc::c_int) {
    let _ = RECEIVED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        sys::signal_safe_write(fd, &[1]);
    }
}

/// Blocking shutdown notification for apps without an async runtime.
#[derive(Debug)]
pub struct Shutdown {
    wake: OwnedFd,
}

impl Shutdown {
    /// Installs SIGTERM and SIGINT handlers. Call once, early in `main`.
    pub fn install() -> Result<Shutdown, Error> {
        let (read, write) = sys::pipe().map_err(|e| Error::io("creating the shutdown pipe", e))?;
        // The write end lives as long as the process: the handler may fire
        // at any time.
        let previous = WAKE_FD.swap(write.as_raw_fd(), Ordering::SeqCst);
        std::mem::forget(write);
        if previous >= 0 {
            // SAFETY: `previous` is a write end forgotten by an earlier
            // `install`; nothing else owns it, and the handler now uses the
            // new one.
            unsafe { sys::close_raw(previous) };
        }
        for sig in [libc::SIGTERM, libc::SIGINT] {
            sys::set_handler(sig, on_signal)
                .map_err(|e| Error::io("installing a signal handler", e))?;
        }
        Ok(Shutdown { wake: read })
    }

    /// Which signal arrived, if one did.
    pub fn requested(&self) -> Option<Signal> {
        match RECEIVED.load(Ordering::SeqCst) {
            libc::SIGTERM => Some(Signal::Terminate),
            libc::SIGINT => Some(Signal::Interrupt),
            _ => None,
        }
    }

    /// Blocks until SIGTERM or SIGINT arrives (returns at once if one
    /// already did).
    pub fn wait(&self) -> Signal {
        loop {
            if let Some(signal) = self.requested() {
                return signal;
            }
            // Errors (EINTR) just loop; the flag is checked first anyway.
            let _ = sys::wait_readable(self.wake.as_fd());
            sys::drain(self.wake.as_fd());
        }
    }
}

/// Installs the handlers and blocks until SIGTERM or SIGINT.
pub fn wait_for_shutdown() -> Result<Signal, Error> {
    Ok(Shutdown::install()?.wait())
}

#[cfg(feature = "tokio")]
pub use self::tokio_signal::signal;

#[cfg(feature = "tokio")]
mod tokio_signal {
    use std::future::Future;
    use std::io;

    use tokio::signal::unix::{SignalKind, signal as listen};

    use super::Signal;

    /// Installs SIGTERM and SIGINT handlers now and returns a future that
    /// completes when either arrives. Must be called within a tokio runtime.
    pub fn signal() -> io::Result<impl Future<Output = Signal> + Send + 'static> {
        let mut term = listen(SignalKind::terminate())?;
        let mut int = listen(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => Signal::Terminate,
                _ = int.recv() => Signal::Interrupt,
            }
        })
    }
}

type Step = Box<dyn FnOnce() + Send + 'static>;

/// Cleanup steps run after the drain, last registered first.
///
/// ```
/// use std::time::{Duration, Instant};
/// let mut hooks = baton::shutdown::Hooks::new();
/// hooks.add("close the database pool", || { /* pool.close() */ });
/// hooks.add("flush the access log", || { /* log.flush() */ });
/// // After the server drained: the log is flushed first, then the pool closes.
/// let report = hooks.run(Instant::now() + Duration::from_secs(5));
/// assert_eq!(report.finished, ["flush the access log", "close the database pool"]);
/// ```
#[derive(Default)]
pub struct Hooks {
    steps: Vec<(String, Step)>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.steps.iter().map(|(name, _)| name))
            .finish()
    }
}

/// What [`Hooks::run`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HooksReport {
    /// Steps that finished, in the order they ran.
    pub finished: Vec<String>,
    /// Steps that panicked.
    pub panicked: Vec<String>,
    /// Steps still running at the deadline (abandoned) or never started.
    pub timed_out: Vec<String>,
}

impl Hooks {
    /// No steps yet.
    pub fn new() -> Hooks {
        Hooks::default()
    }

    /// Registers a step; steps run in reverse order of registration.
    pub fn add(&mut self, name: impl Into<String>, step: impl FnOnce() + Send + 'static) {
        self.steps.push((name.into(), Box::new(step)));
    }

    /// Runs every step, last registered first, each on its own thread and
    /// each bounded by what is left until `deadline`. A step that is still
    /// running at the deadline is abandoned (its thread is left behind, the
    /// process is about to exit), and the remaining ones are reported as
    /// timed out.
    pub fn run(self, deadline: Instant) -> HooksReport {
        let mut report = HooksReport::default();
        let mut steps = self.steps;
        while let Some((name, step)) = steps.pop() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                report.timed_out.push(name);
                continue;
            }
            let (done, finished) = mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name(format!("shutdown hook: {name}"))
                .spawn(move || {
                    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).is_ok();
                    let _ = done.send(ok);
                });
            if spawned.is_err() {
                report.panicked.push(name);
                continue;
            }
            match finished.recv_timeout(left) {
                Ok(true) => report.finished.push(name),
                Ok(false) | Err(mpsc::RecvTimeoutError::Disconnected) => report.panicked.push(name),
                Err(mpsc::RecvTimeoutError::Timeout) => report.timed_out.push(name),
            }
        }
        report
    }

    /// Like [`run`](Hooks::run), with the deadline `budget` from now.
    pub fn run_within(self, budget: Duration) -> HooksReport {
        self.run(Instant::now() + budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_panicking_hook_is_reported_and_the_rest_still_run() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut hooks = Hooks::new();
        for name in ["first", "second"] {
            let order = Arc::clone(&order);
            hooks.add(name, move || order.lock().unwrap().push(name));
        }
        hooks.add("panics", || panic!("on purpose"));
        // A generous deadline: printing the panic (and a backtrace, with
        // RUST_BACKTRACE=1) takes what it takes.
        let report = hooks.run_within(Duration::from_secs(600));
        assert_eq!(report.panicked, ["panics"]);
        assert_eq!(report.finished, ["second", "first"]);
        assert_eq!(*order.lock().unwrap(), ["second", "first"]);
    }

    #[test]
    fn a_stuck_hook_is_abandoned_at_the_deadline_and_the_rest_reported() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut hooks = Hooks::new();
        for name in ["first", "second"] {
            let order = Arc::clone(&order);
            hooks.add(name, move || order.lock().unwrap().push(name));
        }
        hooks.add("stuck", || std::thread::sleep(Duration::from_secs(3600)));
        let report = hooks.run_within(Duration::from_millis(300));
        // The stuck one ran first and used the whole budget: the others
        // never started.
        assert_eq!(report.timed_out, ["stuck", "second", "first"]);
        assert!(report.finished.is_empty() && report.panicked.is_empty());
        assert!(order.lock().unwrap().is_empty());
    }

    #[test]
    fn hooks_finish_in_reverse_order() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut hooks = Hooks::new();
        for name in ["pool", "buffer", "tracing"] {
            let order = Arc::clone(&order);
            hooks.add(name, move || order.lock().unwrap().push(name));
        }
        let report = hooks.run_within(Duration::from_secs(60));
        assert_eq!(report.finished, ["tracing", "buffer", "pool"]);
        assert_eq!(*order.lock().unwrap(), ["tracing", "buffer", "pool"]);
    }
}
