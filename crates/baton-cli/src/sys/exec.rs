//! Replacing baton's own image in place (`baton upgrade`): the same pid,
//! the descriptors it names kept open, its state handed over in a memfd.
//!
//! Before `execve` every signal is blocked: the mask and the pending
//! signals survive the exec, so a SIGCHLD or SIGTERM that arrives in between
//! waits for the new image, which unblocks them once its handlers are in
//! place ([`unblock_signals`]).

use std::ffi::{CString, OsString};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::MemfdFlags;
use rustix::io::FdFlags;

/// A close-on-exec memfd holding `bytes`, positioned at the start.
pub fn memfd(name: &str, bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

/// Everything readable from `fd`, from its start.
pub fn read_all(fd: OwnedFd) -> io::Result<Vec<u8>> {
    let mut file = std::fs::File::from(fd);
    file.rewind()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Makes `fd` non-blocking.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// Whether `fd` survives an `execve` (close-on-exec cleared) or not.
pub fn set_inheritable(fd: BorrowedFd<'_>, inherit: bool) -> io::Result<()> {
    let flags = if inherit {
        FdFlags::empty()
    } else {
        FdFlags::CLOEXEC
    };
    rustix::io::fcntl_setfd(fd, flags)?;
    Ok(())
}

/// Takes ownership of descriptor number `raw`, handed over by the previous
/// image, after checking that it is open; marks it close-on-exec again.
pub fn take_fd(raw: RawFd) -> io::Result<OwnedFd> {
    if raw < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("handed-over descriptor {raw} is not above stdio"),
        ));
    }
    // SAFETY: `raw` is only a number here; `fcntl(F_GETFD)` on it either
    // fails with EBADF (not open) or reads its flags.
    let open = unsafe { libc::fcntl(raw, libc::F_GETFD) } >= 0;
    if !open {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("handed-over descriptor {raw} is not open"),
        ));
    }
    // SAFETY: the previous image of this very process left `raw` open for
    // this image to own (its number is in the handed-over state, which is
    // read once), and nothing else in this process refers to it: the
    // runtime's own descriptors were all created close-on-exec and are gone.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_inheritable(fd.as_fd(), false)?;
    Ok(fd)
}

/// Blocks every signal in the calling thread; returns the previous mask.
pub fn block_signals() -> io::Result<libc::sigset_t> {
    let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `sigfillset` initializes `all`; `pthread_sigmask` reads it and
    // writes the previous mask into `old`, both valid for writes.
    let rc = unsafe {
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr())
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: initialized by the successful call above.
    Ok(unsafe { old.assume_init() })
}

/// Restores a mask returned by [`block_signals`].
pub fn restore_signals(mask: &libc::sigset_t) {
    // SAFETY: `mask` is a valid, initialized signal set.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, mask, std::ptr::null_mut()) };
}

/// Unblocks every signal in the calling thread (the new image, once its
/// handlers are installed: what was pending is delivered now).
pub fn unblock_signals() {
    let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `sigemptyset` initializes `none`, which `pthread_sigmask`
    // then reads.
    unsafe {
        libc::sigemptyset(none.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut());
    }
}

/// Replaces this process's image with `path`, run with `argv` and `env`,
/// all signals blocked. Returns only if `execve` failed (the mask is then
/// restored).
pub fn exec(path: &Path, argv: &[OsString], env: &[(OsString, OsString)]) -> io::Error {
    let nul = |what| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} holds a NUL"));
    let Ok(path) = CString::new(path.as_os_str().as_bytes()) else {
        return nul("the path");
    };
    let Ok(args) = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
    else {
        return nul("an argument");
    };
    let Ok(vars) = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv)
        })
        .collect::<Result<Vec<_>, _>>()
    else {
        return nul("the environment");
    };
    let mut argp: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argp.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = vars.iter().map(|v| v.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mask = match block_signals() {
        Ok(mask) => mask,
        Err(e) => return e,
    };
    // SAFETY: `path`, `argp` and `envp` are NUL-terminated strings and
    // null-terminated arrays that live until this call returns; on success
    // it does not return. Replacing the image of a multi-threaded process is
    // what `execve` does: the other threads simply end.
    unsafe { libc::execve(path.as_ptr(), argp.as_ptr(), envp.as_ptr()) };
    let error = io::Error::last_os_error();
    restore_signals(&mask);
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memfd_round_trip() {
        let fd = memfd("baton-test", b"{\"version\":1}").expect("memfd");
        assert_eq!(read_all(fd).expect("read"), b"{\"version\":1}");
    }

    #[test]
    fn taking_a_descriptor_that_is_not_open_fails() {
        assert!(take_fd(1).is_err(), "stdio is never handed over");
        let err = take_fd(999_999).expect_err("not open");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
