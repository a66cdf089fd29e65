//! Passing descriptors between processes over a Unix stream socket
//! (`SCM_RIGHTS`), and watching a process that is not our child (pidfd).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most descriptors one message carries (the kernel's `SCM_MAX_FD` is
/// 253).
pub const MAX_FDS: usize = 250;

/// Sends `text` with `fds` attached. The text must fit one write (it is a
/// short line).
pub fn send(stream: &UnixStream, text: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let sent = with_rights(fds, |control| {
        rustix::net::sendmsg(
            stream.as_fd(),
            &[io::IoSlice::new(text)],
            control,
            SendFlags::NOSIGNAL,
        )
    })?;
    if sent != text.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the message was cut short",
        ));
    }
    Ok(())
}

/// Sends one datagram, `text` with `fds` attached, to the Unix socket
/// `target` (`/path` or `@abstract`), from an unbound socket: how
/// descriptors go to systemd's file-descriptor store (`FDSTORE=1`).
pub fn send_datagram(target: &str, text: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let addr = match target.strip_prefix('@') {
        Some(name) => rustix::net::SocketAddrUnix::new_abstract_name(name.as_bytes())?,
        None => rustix::net::SocketAddrUnix::new(target)?,
    };
    let socket = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::DGRAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    with_rights(fds, |control| {
        rustix::net::sendmsg_addr(
            &socket,
            &addr,
            &[io::IoSlice::new(text)],
            control,
            SendFlags::NOSIGNAL,
        )
    })?;
    Ok(())
}

/// Runs `send` with a control buffer carrying `fds` (`SCM_RIGHTS`).
fn with_rights(
    fds: &[BorrowedFd<'_>],
    send: impl FnOnce(&mut SendAncillaryBuffer<'_, '_, '_>) -> rustix::io::Result<usize>,
) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors; at most {MAX_FDS} are passed", fds.len()),
        ));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("the descriptors do not fit the message"));
    }
    Ok(send(&mut control)?)
}

/// A connected pair of sequenced-packet sockets (message boundaries kept,
/// descriptors passed as on a stream), close-on-exec.
pub fn seqpacket_pair() -> io::Result<(UnixStream, UnixStream)> {
    let (a, b) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    Ok((UnixStream::from(a), UnixStream::from(b)))
}

/// Receives one message of at most `max` bytes and the descriptors that
/// came with it (close-on-exec). A message whose descriptors were cut
/// (more than [`MAX_FDS`]) is an error.
pub fn recv(stream: &UnixStream, max: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; max];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        stream.as_fd(),
        &mut [io::IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::other("descriptors were cut from the message"));
    }
    buf.truncate(msg.bytes);
    Ok((buf, fds))
}

/// A descriptor that becomes readable when process `pid` exits, opened
/// only if `pid` is still the process that started at `start_time` (so a
/// reused pid is never watched by mistake).
pub fn pidfd(pid: i32, start_time: Option<u64>) -> io::Result<OwnedFd> {
    let raw = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid 0"))?;
    let fd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())?;
    // Checked after opening: from here on the pidfd pins this very process,
    // so if the start time still matches, it is the one we meant.
    if start_time.is_some() && super::inspect::start_time(pid) != start_time {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("pid {pid} is another process now"),
        ));
    }
    Ok(fd)
}

/// Whether the process of `pidfd` has exited (its pidfd is readable then).
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut polled = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut polled, Some(&zero)) {
        Ok(n) => n > 0,
        // Cannot be told: taken as gone (nothing is done to a process one
        // cannot be sure of).
        Err(_) => true,
    }
}

/// The pid of the live process `pidfd` refers to (the `Pid:` line of its
/// `/proc/self/fdinfo` entry), `None` if it exited or `pidfd` is no pidfd.
pub fn pidfd_pid(pidfd: BorrowedFd<'_>) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    let pid: i32 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()?;
    (pid > 0 && !pidfd_exited(pidfd)).then_some(pid)
}

/// Registers `fd` (a pidfd, say) with the current tokio runtime, to wait
/// until it is readable.
pub fn register_readable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the `AsyncFd` owns `fd`: it stays open, and `as_raw_fd`
    // returns the same number, until the `AsyncFd` is dropped or gives it
    // back (`into_inner`), as `register_with_interest` requires.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

#[cfg(test)]
mod pidfd_tests {
    use super::*;

    #[test]
    fn a_pidfd_names_its_live_process_and_says_when_it_exited() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        let fd = pidfd(pid, None).expect("pidfd");
        assert!(!pidfd_exited(fd.as_fd()));
        assert_eq!(pidfd_pid(fd.as_fd()), Some(pid));
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(pidfd_exited(fd.as_fd()));
        assert_eq!(pidfd_pid(fd.as_fd()), None);
    }
}
