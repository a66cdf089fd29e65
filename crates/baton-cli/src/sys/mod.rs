//! The only place in the CLI with `unsafe` code and raw system calls.
//!
//! Everything outside `sys` sees `OwnedFd`/`BorrowedFd` and plain values.
//! The parent side of every call uses `rustix`; the child side of `fork`
//! (in [`spawn`]) uses `libc`, because it needs `fork`, `execve` and
//! `close_range`, which `rustix` offers only as unstable or not at all, and
//! because code between `fork` and `exec` must be a short, auditable list of
//! async-signal-safe calls.

pub mod clock;
pub mod exec;
pub mod fdpass;
pub mod inspect;
pub mod limits;
pub mod memory;
pub mod notify_socket;
pub mod reaper;
pub mod signal;
pub mod socket;
pub mod spawn;
pub mod user;
