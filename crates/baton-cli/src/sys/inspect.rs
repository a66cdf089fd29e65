//! Looking at a generation from outside: which TCP ports it listens on by
//! itself, rather than on the sockets baton passed. An app that binds its
//! own port (a plain Gin `r.Run()`) cannot be reloaded by handing over
//! sockets: the next generation fails with "address already in use". baton
//! detects that to say so, instead of leaving a bare exit status.
//!
//! Reads `/proc/<pid>/fd` (socket inodes) and `/proc/<pid>/net/tcp{,6}`
//! (listening sockets of its network namespace). The tables can be large on a
//! busy host, so callers run this off the event loop.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;

/// The inode of a socket baton holds, to tell its listeners apart.
pub fn inode(fd: &OwnedFd) -> Option<u64> {
    rustix::fs::fstat(fd).ok().map(|st| st.st_ino)
}

/// TCP addresses process `pid` listens on through sockets other than
/// `inherited` (inodes), sorted.
pub fn own_listeners(pid: i32, inherited: &HashSet<u64>) -> Vec<SocketAddr> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let sockets: HashSet<u64> = fds
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .filter(|inode| !inherited.contains(inode))
        .collect();
    if sockets.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        found.extend(listening(&text, &sockets));
    }
    found.sort();
    found.dedup();
    found
}

/// Listening entries of a `/proc/net/tcp{,6}` table whose inode is in `inodes`.
fn listening(table: &str, inodes: &HashSet<u64>) -> Vec<SocketAddr> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != LISTEN {
                return None;
            }
            let inode: u64 = cols[9].parse().ok()?;
            inodes
                .contains(&inode)
                .then(|| parse_addr(cols[1]))
                .flatten()
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host
/// byte order as the kernel prints it; the port is big-endian hex.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(SocketAddr::from((
            Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?),
            port,
        ))),
        16 => Some(SocketAddr::from((
            Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?),
            port,
        ))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn proc_net_tcp_lines() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0\n\
           1: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0 100 0 0 10 0\n\
           2: 0100007F:1F90 0100007F:D000 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0 100 0 0 10 0\n";
        let inodes: HashSet<u64> = [111, 333].into();
        assert_eq!(
            listening(table, &inodes),
            vec!["127.0.0.1:8080".parse().unwrap()]
        );
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
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
}
