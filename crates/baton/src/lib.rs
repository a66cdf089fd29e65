//! Make a network service restartable without dropping a request.
//!
//! A supervisor such as `baton run` (or systemd socket activation) owns the
//! listening sockets and hands them to each new start of the app. The app needs
//! three calls:
//!
//! 1. [`listeners()`]: take the inherited sockets (`sd_listen_fds(3)`), or bind
//!    a fallback address when run standalone;
//! 2. [`ready()`]: say it is ready to serve (`sd_notify(3)`), so the supervisor
//!    retires the previous generation only now;
//! 3. drain on SIGTERM: stop accepting and finish what is in flight
//!    ([`shutdown::signal`] and [`serve::serve`] with the `tokio` and `hyper`
//!    features).
//!
//! ```no_run
//! use std::io::Write;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // 1. Before any thread starts: take the sockets baton passed, or bind.
//!     let listener = baton::listeners()?.tcp_or_bind(0, "127.0.0.1:8080")?;
//!     // 2. Warm up, then tell the supervisor.
//!     baton::ready()?;
//!     // 3. Serve. (A real server drains on SIGTERM; see `serve::serve`.)
//!     for stream in listener.incoming() {
//!         stream?.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\n")?;
//!     }
//!     Ok(())
//! }
//! ```
//!
//! The core depends on `std` and `libc` only (its system calls are in one
//! private module); `tokio`, `hyper` and `axum` sit behind features of the
//! same names. Without a
//! supervisor every call degrades gracefully: no sockets inherited,
//! notifications are no-ops.
//!
//! Feature `hyper` adds [`serve::serve`], feature `axum` adds
//! `serve::serve_router`: HTTP/1.1 servers with a lame-duck drain that never
//! closes a keep-alive connection under a busy client. [`shutdown::Hooks`]
//! runs cleanup steps after the drain, last registered first, each bounded by
//! the time left.

#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
pub mod listen;
pub mod notify;
#[cfg(feature = "hyper")]
pub mod serve;
pub mod shutdown;
mod sys;
pub mod vars;

pub use error::Error;
pub use listen::{Listener, Listeners, listeners};
pub use notify::{notify, ready, reloading, status, stopping, watchdog};

/// The generation number the supervisor gave this start of the app
/// (`BATON_GENERATION`), if any.
pub fn generation() -> Option<u64> {
    std::env::var(vars::BATON_GENERATION).ok()?.parse().ok()
}
