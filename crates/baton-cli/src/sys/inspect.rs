//! Looking at a generation from outside: which TCP ports it listens on by
//! itself, rather than on the sockets baton passed. An app that binds its
//! own port (a plain Gin `r.Run()`) cannot be reloaded by handing over
//! sockets: the next generation fails with "address already in use". baton
//! detects that to say so, instead of leaving a bare exit status.
//!
//! The listening sockets of baton's network namespace come from the
//! kernel's socket diagnostics (`sock_diag(7)`, `NETLINK_SOCK_DIAG`) with a
//! LISTEN-only state filter: the kernel never walks established or
//! TIME_WAIT sockets for the answer, so the cost does not grow with the
//! host's traffic (reading `/proc/net/tcp` did: 0.7 s and megabytes per read
//! with 43 000 TIME_WAIT sockets). No privilege is needed. They are matched
//! by inode against the process's descriptors in `/proc/<pid>/fd`, of which
//! at most [`MAX_FDS`] are looked at.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// Descriptors of a process looked at, at most: a freshly started app has
/// a few dozen; one with thousands of connections is not scanned past this.
pub const MAX_FDS: usize = 4096;

/// The inode of a socket baton holds, to tell its listeners apart.
pub fn inode(fd: &OwnedFd) -> Option<u64> {
    rustix::fs::fstat(fd).ok().map(|st| st.st_ino)
}

/// Whether process `pid` holds one of the sockets whose inodes are
/// `inodes` (among its first [`MAX_FDS`] descriptors).
pub fn holds_any(pid: i32, inodes: &[u64]) -> bool {
    if inodes.is_empty() {
        return false;
    }
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.filter_map(Result::ok).take(MAX_FDS).any(|entry| {
        std::fs::read_link(entry.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
                .is_some_and(|inode| inodes.contains(&inode))
        })
    })
}

/// The inodes of the TCP sockets listening on `port` (any address, IPv4
/// or IPv6), from `/proc/net/tcp` and `/proc/net/tcp6`.
pub fn listening_inodes(port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let listening = *state == "0A";
            let on_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening
                && on_port
                && let Ok(inode) = inode.parse()
            {
                out.push(inode);
            }
        }
    }
    out
}

/// A process that holds a TCP socket listening on `port`, and its command
/// name (of the first 4096 processes in `/proc` that can be looked at).
pub fn holder_of(port: u16) -> Option<(i32, String)> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return None;
    }
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .take(MAX_FDS)
        .find(|pid| holds_any(*pid, &inodes))
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_owned())
        })
}

/// Whether process `pid` holds a TCP socket listening on `port`.
pub fn listens_on(pid: i32, port: u16) -> bool {
    holds_any(pid, &listening_inodes(port))
}

/// When process `pid` started, in clock ticks after boot (field 22 of
/// `/proc/<pid>/stat`): with the pid, it names one process for good.
pub fn start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|(_, start)| start)
}

/// The resident memory of process `pid` in bytes (`VmRSS` of
/// `/proc/<pid>/status`).
pub fn rss(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Whether process `pid` runs and is the one that started at `start_time`
/// (`None`: any): not gone, not a zombie, not a later process that reuses
/// the pid.
pub fn alive(pid: i32, start_time: Option<u64>) -> bool {
    pid > 0
        && stat(pid).is_some_and(|(state, start)| {
            !matches!(state, 'Z' | 'X') && start_time.is_none_or(|s| s == start)
        })
}

/// Whether process `pid` runs and started at exactly `start_time`, for a
/// process named by a file: without a start time, it is never taken for
/// ours (a file could name any process).
pub fn alive_exactly(pid: i32, start_time: Option<u64>) -> bool {
    start_time.is_some() && alive(pid, start_time)
}

/// The state letter and start time of process `pid`.
fn stat(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'. Field 3 (the state) is the first after it.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// TCP addresses process `pid` listens on through sockets other than
/// `inherited` (inodes), sorted.
pub fn own_listeners(pid: i32, inherited: &HashSet<u64>) -> Vec<SocketAddr> {
    let sockets: HashSet<u64> = socket_inodes(pid)
        .into_iter()
        .filter(|inode| !inherited.contains(inode))
        .collect();
    if sockets.is_empty() {
        return Vec::new();
    }
    let mut found: Vec<SocketAddr> = tcp_listeners()
        .unwrap_or_default()
        .into_iter()
        .filter(|(inode, _)| sockets.contains(inode))
        .map(|(_, addr)| addr)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Inodes of the sockets among the first [`MAX_FDS`] descriptors of `pid`.
fn socket_inodes(pid: i32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.take(MAX_FDS)
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

// Netlink and inet_diag wire format (<linux/netlink.h>,
// <linux/inet_diag.h>): native-endian integers, except ports and addresses,
// which are big-endian.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const TCP_LISTEN: u32 = 10;
const IPPROTO_TCP: u8 = 6;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg` up to and including `idiag_inode`.
const MSG_LEN: usize = 72;

/// Every listening TCP socket of this network namespace, as (inode,
/// address), IPv4 and IPv6.
pub fn tcp_listeners() -> io::Result<Vec<(u64, SocketAddr)>> {
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )?;
    let mut out = Vec::new();
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        rustix::net::sendto(
            &fd,
            &request(seq, family),
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;
        let mut buf = vec![0u8; 32 * 1024];
        'dump: loop {
            let (n, _, from) = rustix::net::recvfrom(&fd, &mut buf[..], RecvFlags::empty())?;
            if n == 0 {
                break;
            }
            // Only the kernel (port 0) answers a dump; anything else that
            // reached this socket is ignored.
            let from_kernel = from
                .and_then(|a| SocketAddrNetlink::try_from(a).ok())
                .is_some_and(|a| a.pid() == 0);
            if !from_kernel {
                continue;
            }
            for message in messages(&buf[..n], seq) {
                match message {
                    Message::Done => break 'dump,
                    Message::Error(errno) => {
                        // An IPv6-less kernel answers the AF_INET6 dump so.
                        if family == libc::AF_INET6 as u8 {
                            break 'dump;
                        }
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                    Message::Socket(inode, addr) => out.push((inode, addr)),
                    Message::Other => {}
                }
            }
        }
    }
    Ok(out)
}

/// A dump request for listening TCP sockets of `family`.
fn request(seq: u32, family: u8) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    m.extend_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states, then an
    // all-zero inet_diag_sockid (no address filter).
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    m.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    m.resize(NLMSG_HDRLEN + REQ_LEN, 0);
    m
}

#[derive(Debug, PartialEq, Eq)]
enum Message {
    Socket(u64, SocketAddr),
    Done,
    Error(i32),
    Other,
}

/// The netlink messages of dump `seq` in one datagram (others are
/// skipped). Malformed lengths end the walk.
fn messages(mut buf: &[u8], seq: u32) -> Vec<Message> {
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        let kind = u16_at(buf, 4);
        let body = &buf[NLMSG_HDRLEN..len];
        out.push(match kind {
            _ if u32_at(buf, 8) != seq => Message::Other,
            NLMSG_DONE => Message::Done,
            NLMSG_ERROR if body.len() >= 4 => Message::Error(
                i32::from_ne_bytes([body[0], body[1], body[2], body[3]]).wrapping_neg(),
            ),
            SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => socket(body, u32_at(body, 68)),
            _ => Message::Other,
        });
        // Messages are aligned to 4 bytes.
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or_default();
    }
    out
}

/// One `inet_diag_msg`: family at 0, the source port at 4 (big-endian),
/// the source address at 8 (4 or 16 bytes).
fn socket(body: &[u8], inode: u32) -> Message {
    let port = u16::from_be_bytes([body[4], body[5]]);
    let ip = match body[0] {
        f if f == libc::AF_INET as u8 => {
            std::net::IpAddr::V4(Ipv4Addr::new(body[8], body[9], body[10], body[11]))
        }
        f if f == libc::AF_INET6 as u8 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[8..24]);
            std::net::IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return Message::Other,
    };
    Message::Socket(u64::from(inode), SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_this_process() {
        let me = std::process::id() as i32;
        let t = start_time(me).expect("start time");
        assert_eq!(start_time(me), Some(t));
        assert!(start_time(0).is_none());
        // A process named by a file must be named exactly.
        assert!(alive(me, None) && alive(me, Some(t)));
        assert!(alive_exactly(me, Some(t)));
        assert!(!alive_exactly(me, None), "no start time never matches");
        assert!(!alive_exactly(me, Some(t + 1)));
    }

    #[test]
    fn finds_a_listener_of_this_process() {
        let own = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = own.local_addr().unwrap();
        let found = own_listeners(std::process::id() as i32, &HashSet::new());
        assert!(found.contains(&addr), "{found:?}");
        let inode = inode(&OwnedFd::from(own.try_clone().unwrap())).unwrap();
        let found = own_listeners(std::process::id() as i32, &[inode].into());
        assert!(!found.contains(&addr), "{found:?}");
    }

    #[test]
    fn sees_ipv6_listeners_and_not_connections() {
        let Ok(v6) = std::net::TcpListener::bind("[::1]:0") else {
            return; // no IPv6 here
        };
        let addr = v6.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (server, _) = v6.accept().unwrap();
        let all = tcp_listeners().unwrap();
        assert!(all.iter().any(|(_, a)| *a == addr), "{all:?}");
        // Neither end of the connection is a listener.
        let ends = [client.local_addr().unwrap(), server.local_addr().unwrap()];
        assert!(
            !all.iter().any(|(_, a)| *a == ends[0]),
            "a connection was listed: {all:?}"
        );
    }

    #[test]
    fn malformed_datagrams_end_the_walk() {
        assert!(messages(&[], 1).is_empty());
        assert!(messages(&[0xff; 8], 1).is_empty());
        // A length that runs past the end.
        let mut m = request(1, 2);
        m[0] = 200;
        assert!(messages(&m, 1).is_empty());
        // A done message of this dump, and of another one.
        let mut done = vec![0u8; 20];
        done[0] = 20;
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        done[8..12].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(messages(&done, 7), vec![Message::Done]);
        assert_eq!(messages(&done, 8), vec![Message::Other]);
        // An error code that cannot be negated does not panic.
        let mut error = vec![0u8; 20];
        error[0] = 20;
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error[16..20].copy_from_slice(&i32::MIN.to_ne_bytes());
        assert_eq!(messages(&error, 0), vec![Message::Error(i32::MIN)]);
    }
}
