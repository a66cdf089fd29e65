//! Proxy mode (`--proxy http|tcp`): for apps that bind their own port and
//! will never read `LISTEN_FDS`. baton keeps the public listeners and
//! accepts every client connection itself; each generation listens on a
//! private loopback port of its own (handed in `$PORT`); new traffic goes to
//! the generation that is current, switched atomically when a new one is
//! ready.
//!
//! Invariants:
//! - a client connection belongs to baton, never to a generation: after a
//!   switch its next request goes to the new generation, so a reload never
//!   closes a connection under a client (HTTP mode);
//! - a retired generation gets its stop signal only once nothing baton sent
//!   it is still in flight (or at the stop timeout);
//! - a request is retried (once) only when no byte of it reached the
//!   generation: a refused connect, or a pooled connection found closed.
//!
//! The proxy runs on its own multi-threaded runtime, in its own thread, so
//! the data path uses every core while the guardian's event loop stays
//! single-threaded. They talk through [`Proxy`] (shared, lock-light) and the
//! guardian's event channel (drained upstreams).

mod conn_io;
mod frames;
mod health;
pub mod http;
mod http2;
mod judge;
pub mod pool;
mod route;
mod senders;
mod slot;
mod socket;
pub mod tcp;
mod threads;
pub mod upstream;

pub use health::{CONNECT_TIMEOUT, Health, connect, private_addr, private_port};
pub use route::{Counters, Limits, Mode, Proxy, UpstreamProtocol};
pub use slot::{slot, threads};
pub use threads::{Handle, default_threads, start};
pub use upstream::Upstream;
