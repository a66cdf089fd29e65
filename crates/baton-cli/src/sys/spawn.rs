//! Starting a child with an exact fd layout and `LISTEN_PID` equal to its
//! own pid (`sd_listen_fds(3)`).
//!
//! `LISTEN_PID` cannot be known before `fork`, and the environment cannot be
//! built after it (allocating between `fork` and `exec` is unsound). So the
//! whole `envp` is built before `fork` with a fixed-size `LISTEN_PID=` slot,
//! and the child writes its own pid's digits into that slot in place, then
//! calls `execve` itself. No exec shim, no extra process.
//!
//! In the child, between `fork` and `execve`, only async-signal-safe system
//! calls run, on memory prepared by the parent:
//!
//! 1. `setpgid(0, 0)`: its own process group, so a whole generation can be
//!    signalled at once and a terminal's Ctrl-C reaches only baton;
//! 2. with `parent_death`, `PR_SET_PDEATHSIG(SIGTERM)`: if baton dies, the
//!    child is asked to stop (`--orphans stop`, and baton's short-lived
//!    helpers); without it, a generation outlives a killed baton and goes
//!    on serving (`--orphans keep`);
//! 3. every signal disposition back to default (the signal mask, emptied
//!    last, stays full until then: the parent blocks all signals across
//!    `fork`, so none can run baton's handlers in the child), so
//!    nothing baton set (the Rust runtime ignores SIGPIPE) or inherited
//!    (an ignored SIGHUP from `nohup`) leaks into the app;
//! 4. the listeners are dup'ed to fds 3, 4, … (and pipes to 1 and 2 with
//!    `--log-prefix`), which clears close-on-exec on exactly those, via
//!    scratch copies above that range so that no source is overwritten
//!    before it is copied;
//! 5. every other fd from `3+N` up is marked close-on-exec
//!    (`close_range(CLOSE_RANGE_CLOEXEC)`), so nothing baton inherited leaks;
//! 6. the descriptor limit baton was started with (baton raised its own;
//!    see [`super::limits`]);
//! 7. with `--user`: supplementary groups, group, user (raw system calls),
//!    and the parent-death signal again if asked (a credential change
//!    clears it);
//! 8. with a working directory, `fchdir` to the one held open (the very
//!    directory baton resolved, even if a symlink on its path now points
//!    elsewhere), else `chdir` to its path;
//! 9. `LISTEN_PID` digits, the signal mask emptied, then the exec: of the
//!    held executable (`execveat(fd, "", AT_EMPTY_PATH)`: the very file
//!    baton opened, even if the path now names another), falling back to
//!    `execve` of the path when that fails with ENOENT (a `#!` script run
//!    through a close-on-exec descriptor cannot be reopened by its
//!    interpreter).
//!
//! A failure at any step is reported to the parent as an errno over a
//! close-on-exec pipe (whose write end is kept above the fd range of step 4):
//! the parent reads end-of-file when `execve` succeeds.

use std::ffi::{CString, OsString, c_char, c_uint};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

use rustix::pipe::PipeFlags;

/// `CLOSE_RANGE_CLOEXEC` from `<linux/close_range.h>` (Linux 5.11+).
const CLOSE_RANGE_CLOEXEC: c_uint = 1 << 2;

/// `"LISTEN_PID="` plus room for a 10-digit pid and the NUL.
const PID_SLOT: usize = 32;
const PID_PREFIX: &[u8] = b"LISTEN_PID=";

/// One past the highest signal number on Linux (`_NSIG`).
const NSIG: i32 = 65;

/// The kernel's `sizeof(sigset_t)`: 64 signals.
const KERNEL_SIGSET_BYTES: usize = 8;

/// What to start.
#[derive(Debug)]
pub struct Command<'a> {
    /// Path of the executable (already resolved against `$PATH`).
    pub program: &'a Path,
    /// The argument vector, `argv[0]` included.
    pub args: &'a [OsString],
    /// The complete environment of the child (without `LISTEN_PID`).
    pub env: &'a [(OsString, OsString)],
    /// Sockets that become fds 3, 4, … in the child.
    pub fds: &'a [BorrowedFd<'a>],
    /// Whether to add `LISTEN_PID=<the child's pid>` to the environment.
    pub listen_pid: bool,
    /// Replacements for the child's stdout and stderr (else inherited).
    pub stdout: Option<BorrowedFd<'a>>,
    /// See `stdout`.
    pub stderr: Option<BorrowedFd<'a>>,
    /// Who the child runs as (else as baton).
    pub user: Option<&'a Ids>,
    /// The child's `RLIMIT_NOFILE` as (soft, hard), `u64::MAX` for
    /// unlimited (else baton's own).
    pub nofile: Option<(u64, u64)>,
    /// Whether the child gets SIGTERM when baton dies.
    pub parent_death: bool,
    /// The executable, held open (else `program` is executed by path).
    pub exe: Option<BorrowedFd<'a>>,
    /// The working directory (else baton's).
    pub cwd: Option<&'a Path>,
    /// The working directory, held open (else `cwd` is entered by path).
    pub cwd_fd: Option<BorrowedFd<'a>>,
    /// A session of its own (`setsid`), not only a process group: for a
    /// helper that must outlive baton, whose group then never becomes an
    /// orphaned group with a stopped member (which the kernel sends SIGHUP).
    pub session: bool,
}

/// The ids a child switches to before `exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<libc::gid_t>,
}

/// Starts a helper of baton's own (not the app: no user, limits or
/// output of its own): `program` with `args`, `env` and `fds` as its fds
/// 3, 4, …; it dies with baton unless it `outlives` it (in a session of its
/// own, then).
pub fn helper(
    program: &Path,
    args: &[OsString],
    env: &[(OsString, OsString)],
    fds: &[BorrowedFd<'_>],
    outlives: bool,
) -> io::Result<i32> {
    spawn(&Command {
        program,
        args,
        env,
        fds,
        listen_pid: false,
        stdout: None,
        stderr: None,
        user: None,
        nofile: None,
        parent_death: !outlives,
        exe: None,
        cwd: None,
        cwd_fd: None,
        session: outlives,
    })
}

/// Forks and execs `cmd`; returns the child's pid once `execve` succeeded.
///
/// A failed `execve` (no such file, permission denied, …) is returned as
/// that errno, and the short-lived child is reaped here.
pub fn spawn(cmd: &Command<'_>) -> io::Result<i32> {
    let nul_err = |what| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    };
    let path = CString::new(cmd.program.as_os_str().as_bytes())
        .map_err(|_| nul_err("the command path"))?;
    let cwd = cmd
        .cwd
        .map(|d| {
            CString::new(d.as_os_str().as_bytes()).map_err(|_| nul_err("the working directory"))
        })
        .transpose()?;
    let args: Vec<CString> = cmd
        .args
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| nul_err("an argument")))
        .collect::<io::Result<_>>()?;
    let env: Vec<CString> = cmd
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).map_err(|_| nul_err("an environment variable"))
        })
        .collect::<io::Result<_>>()?;

    let mut pid_slot = [0u8; PID_SLOT];
    pid_slot[..PID_PREFIX.len()].copy_from_slice(PID_PREFIX);
    // One pointer for both the environment entry and the child's write.
    let pid_slot_ptr = pid_slot.as_mut_ptr();

    let mut argv: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(ptr::null());
    let mut envp: Vec<*const c_char> = env.iter().map(|e| e.as_ptr()).collect();
    if cmd.listen_pid {
        envp.push(pid_slot_ptr.cast_const().cast());
    }
    envp.push(ptr::null());

    // (source, target) pairs: stdio replacements, then the listeners at 3…
    let mut mapping: Vec<(RawFd, RawFd)> = Vec::with_capacity(cmd.fds.len() + 2);
    mapping.extend(cmd.stdout.map(|fd| (fd.as_raw_fd(), 1)));
    mapping.extend(cmd.stderr.map(|fd| (fd.as_raw_fd(), 2)));
    mapping.extend(
        cmd.fds
            .iter()
            .enumerate()
            .map(|(i, fd)| (fd.as_raw_fd(), 3 + i as RawFd)),
    );
    let mut scratch: Vec<RawFd> = vec![-1; mapping.len()];
    let floor = 3 + RawFd::try_from(cmd.fds.len()).map_err(io::Error::other)?;

    let (report_rx, report_tx) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
    // Keep the write end (and the executable's descriptor) out of the range
    // the listeners are dup'ed onto.
    let report_tx_high = rustix::io::fcntl_dupfd_cloexec(&report_tx, floor)?;
    drop(report_tx);
    let exe_high = cmd
        .exe
        .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, floor))
        .transpose()?;
    let cwd_high = cmd
        .cwd_fd
        .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, floor))
        .transpose()?;

    let parent = rustix::process::getpid().as_raw_nonzero().get();
    let child = Child {
        path: path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        pid_digits: if cmd.listen_pid {
            // SAFETY: PID_PREFIX.len() < PID_SLOT, so the offset is in bounds.
            unsafe { pid_slot_ptr.add(PID_PREFIX.len()) }
        } else {
            ptr::null_mut()
        },
        mapping: &mapping,
        scratch: scratch.as_mut_ptr(),
        user: cmd.user,
        nofile: cmd.nofile.map(|(soft, hard)| libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        }),
        floor,
        report: report_tx_high.as_raw_fd(),
        parent,
        parent_death: cmd.parent_death,
        session: cmd.session,
        exe: exe_high.as_ref().map_or(-1, AsRawFd::as_raw_fd),
        cwd: cwd.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
        cwd_fd: cwd_high.as_ref().map_or(-1, AsRawFd::as_raw_fd),
    };

    // Block every signal across the fork (as posix_spawn does): until the
    // child has reset its dispositions, a signal would otherwise run baton's
    // handlers in the child and be lost. The child unblocks after the reset,
    // so anything pending then gets the default action.
    let mut old_mask = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `sigfillset` initializes `all`; `pthread_sigmask` reads `all`
    // and writes the previous mask into `old_mask`, both valid for writes.
    let blocked = unsafe {
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old_mask.as_mut_ptr())
    };
    if blocked != 0 {
        return Err(io::Error::from_raw_os_error(blocked));
    }

    // SAFETY: baton may have other threads at this point (the proxy's
    // threads, tokio's blocking-pool thread), and any of them may hold a
    // lock (the allocator's, stdio's) that the child's copy of memory shows
    // as held forever. That is sound because the child only runs
    // `Child::exec`, which makes raw system calls on plain integers and on
    // memory prepared above, takes no lock, allocates nothing, and never
    // returns (it execs or `_exit`s).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the freshly forked child (see above).
        unsafe { child.exec() }
    }
    let fork_error = io::Error::last_os_error();
    // SAFETY: `old_mask` was initialized by the successful call above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old_mask.as_ptr(), ptr::null_mut()) };
    if pid < 0 {
        return Err(fork_error);
    }

    drop(report_tx_high);
    // Keep everything the child pointed into alive until it has exec'd.
    let _keep = (
        &path, &args, &env, &argv, &envp, &pid_slot, &scratch, &mapping, &cwd, &exe_high, &cwd_high,
    );
    let mut errno = [0u8; 4];
    let mut got = 0;
    while got < errno.len() {
        match rustix::io::read(&report_rx, &mut errno[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    super::reaper::reap_pid(pid);
    Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
}

/// Everything the child needs, as raw pointers into the parent's memory
/// (which the child has its own copy of after `fork`).
struct Child<'a> {
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    /// Where the pid's digits go, or null for no `LISTEN_PID`.
    pid_digits: *mut u8,
    mapping: &'a [(RawFd, RawFd)],
    scratch: *mut RawFd,
    user: Option<&'a Ids>,
    nofile: Option<libc::rlimit>,
    floor: RawFd,
    report: RawFd,
    parent: i32,
    parent_death: bool,
    session: bool,
    /// The executable's descriptor (above `floor`), or -1.
    exe: RawFd,
    /// The working directory, or null.
    cwd: *const c_char,
    /// The working directory, held (`-1`: none; else entered by `fchdir`).
    cwd_fd: RawFd,
}

impl Child<'_> {
    /// Runs in the child after `fork`: set up, then `execve`.
    ///
    /// # Safety
    ///
    /// Must be called only in a child just forked by [`spawn`], with every
    /// pointer in `self` valid (they point into `spawn`'s locals).
    unsafe fn exec(&self) -> ! {
        // SAFETY: every call below is a system call on plain integers or on
        // memory `spawn` prepared, through libc wrappers that take no lock
        // and allocate nothing: the async-signal-safe functions of POSIX,
        // plus `prctl`, `setrlimit` (glibc's is the `prlimit64` system call)
        // and the raw `syscall` entries.
        unsafe {
            if self.session {
                if libc::setsid() < 0 {
                    self.fail();
                }
            } else if libc::setpgid(0, 0) != 0 {
                self.fail();
            }
            if self.parent_death {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
            }
            if libc::getppid() != self.parent {
                // baton died before the child could start (or before the
                // prctl took effect): nobody would know of this process.
                libc::_exit(1);
            }

            // The raw system call, not libc's `sigaction`: glibc refuses to
            // touch the two real-time signals it reserves (32 and 33), but an
            // ignored disposition of those is inherited too. An all-zero
            // kernel `struct sigaction` (at most 32 bytes on Linux) is
            // SIG_DFL with no flags and an empty mask.
            let default = [0u64; 4];
            let mut libc_default: libc::sigaction = std::mem::zeroed();
            libc_default.sa_sigaction = libc::SIG_DFL;
            for sig in 1..NSIG {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    let rc = libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        default.as_ptr(),
                        ptr::null_mut::<u64>(),
                        KERNEL_SIGSET_BYTES,
                    );
                    if rc != 0 {
                        // An architecture with a larger kernel sigset: libc's
                        // wrapper still resets everything but 32 and 33.
                        libc::sigaction(sig, &libc_default, ptr::null_mut());
                    }
                }
            }
            for (i, &(src, _)) in self.mapping.iter().enumerate() {
                let copy = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, self.floor);
                if copy < 0 {
                    self.fail();
                }
                *self.scratch.add(i) = copy;
            }
            for (i, &(_, target)) in self.mapping.iter().enumerate() {
                // dup2 clears FD_CLOEXEC on the new fd: exactly these are inherited.
                if libc::dup2(*self.scratch.add(i), target) < 0 {
                    self.fail();
                }
            }
            // Older kernels lack close_range; there baton's own fds are
            // close-on-exec anyway, only fds baton inherited could leak.
            libc::syscall(
                libc::SYS_close_range,
                self.floor as c_uint,
                c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            );

            if let Some(limit) = &self.nofile
                && libc::setrlimit(libc::RLIMIT_NOFILE, limit) != 0
            {
                self.fail();
            }

            if let Some(ids) = self.user {
                // Raw system calls: they change this thread only, which is
                // the whole child, without glibc's all-threads broadcast
                // (which relies on signal 33, just reset above).
                if libc::syscall(libc::SYS_setgroups, ids.groups.len(), ids.groups.as_ptr()) != 0
                    || libc::syscall(libc::SYS_setgid, ids.gid) != 0
                    || libc::syscall(libc::SYS_setuid, ids.uid) != 0
                {
                    self.fail();
                }
                // Changing credentials clears the parent-death signal.
                if self.parent_death {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                    if libc::getppid() != self.parent {
                        libc::_exit(1);
                    }
                }
            }

            if self.cwd_fd >= 0 {
                if libc::fchdir(self.cwd_fd) != 0 {
                    self.fail();
                }
            } else if !self.cwd.is_null() && libc::chdir(self.cwd) != 0 {
                self.fail();
            }
            if !self.pid_digits.is_null() {
                write_decimal(libc::getpid() as u32, self.pid_digits);
            }
            // Last: anything pending now gets its default action.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            if libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut()) != 0 {
                self.fail();
            }
            if self.exe >= 0 {
                let empty = c"".as_ptr();
                libc::syscall(
                    libc::SYS_execveat,
                    self.exe,
                    empty,
                    self.argv,
                    self.envp,
                    libc::AT_EMPTY_PATH,
                );
                if *libc::__errno_location() != libc::ENOENT {
                    self.fail();
                }
            }
            libc::execve(self.path, self.argv, self.envp);
            self.fail()
        }
    }

    /// Reports errno to the parent and exits.
    unsafe fn fail(&self) -> ! {
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        let bytes = errno.to_ne_bytes();
        // SAFETY: `write` and `_exit` are async-signal-safe; `bytes` is a
        // local array and `self.report` the pipe `spawn` opened.
        unsafe {
            libc::write(self.report, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        }
    }
}

/// Writes `n` in decimal followed by a NUL to `out`, which must have room for
/// 11 bytes. Allocation-free, for use between `fork` and `exec`.
///
/// # Safety
///
/// `out` must be valid for writes of 11 bytes.
unsafe fn write_decimal(mut n: u32, out: *mut u8) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: i < len <= 10 < 11, within the caller's guarantee.
        unsafe { *out.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: len <= 10 < 11.
    unsafe { *out.add(len) = 0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal() {
        for n in [0u32, 7, 10, 4242, u32::MAX] {
            let mut buf = [0xffu8; 11];
            // SAFETY: buf has 11 bytes.
            unsafe { write_decimal(n, buf.as_mut_ptr()) };
            let end = buf.iter().position(|&b| b == 0).expect("NUL");
            assert_eq!(std::str::from_utf8(&buf[..end]), Ok(n.to_string().as_str()));
        }
    }
}
