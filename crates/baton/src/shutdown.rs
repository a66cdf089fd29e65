//! Knowing when to stop: the supervisor asks for a graceful shutdown with
//! SIGTERM (baton's and systemd's default stop signal), a terminal with
//! SIGINT.
//!
//! The async [`signal`] future needs the `tokio` feature. Register it early
//! (create the future before serving): a signal that arrives before the
//! handler is installed would otherwise kill the process with the default
//! action.

#[cfg(feature = "tokio")]
pub use imp::*;

#[cfg(feature = "tokio")]
mod imp {
    use std::future::Future;
    use std::io;

    use tokio::signal::unix::{SignalKind, signal as listen};

    /// Which shutdown signal arrived.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[non_exhaustive]
    pub enum Shutdown {
        /// SIGTERM: the supervisor's stop signal.
        Terminate,
        /// SIGINT: Ctrl-C on a terminal.
        Interrupt,
    }

    /// Installs SIGTERM and SIGINT handlers now and returns a future that
    /// completes when either signal arrives.
    ///
    /// Must be called within a tokio runtime. Fails only if the handlers
    /// cannot be installed.
    pub fn signal() -> io::Result<impl Future<Output = Shutdown> + Send + 'static> {
        let mut term = listen(SignalKind::terminate())?;
        let mut int = listen(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => Shutdown::Terminate,
                _ = int.recv() => Shutdown::Interrupt,
            }
        })
    }
}
