//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps memory freed in the middle of its heaps (and in
//! the per-thread arenas of the proxy threads) for reuse: after ten
//! thousand clients came and went, baton would keep their memory for good.
//! `malloc_trim(3)` returns the free pages of every arena to the kernel. It
//! walks the heaps, so it is called rarely: after many connections closed.

/// Returns free heap pages to the system; whether any were returned.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() -> bool {
    // SAFETY: malloc_trim takes a plain integer (the padding to keep at the
    // top of the main heap) and only touches the allocator's own state,
    // under its own locks; it is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Returns free heap pages to the system (not available with this libc).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}
