//! Hints for apps that listen where baton does not expect them: the words
//! added to a warning or to a rollback's message, so that a user learns
//! what to change. Pure functions of what was seen; the launch strategy
//! decides which apply (socket-passing advice never appears in proxy mode).

use std::net::SocketAddr;

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Socket mode: a generation that binds its own port while it serves.
pub fn binds_own_port(generation: u64, pid: i32, addrs: &[SocketAddr]) -> String {
    format!(
        "generation {generation} (pid {pid}) listens on {} by itself, not on the sockets baton \
         passed, so a new generation cannot bind the same port (address already in use): make the \
         app use the inherited sockets (LISTEN_FDS; see examples/gin-hello) or run it in proxy \
         mode (--proxy http)",
        list(addrs)
    )
}

/// Socket mode: a starting generation that never became ready and binds a
/// port of its own (it does not know about the sockets baton passed).
pub fn not_ready_binds_own_port(generation: u64, pid: i32, addrs: &[SocketAddr]) -> String {
    format!(
        "generation {generation} (pid {pid}) listens on {} by itself, not on the sockets baton \
         passed (LISTEN_FDS): an app that binds its own port runs unchanged with --proxy http",
        list(addrs)
    )
}

/// Proxy mode: a generation that was given a private port.
pub fn proxy_port(generation: u64, port_env: &str, port: u16, elsewhere: &[SocketAddr]) -> String {
    let elsewhere = if elsewhere.is_empty() {
        String::new()
    } else {
        format!(" but bound {} itself", list(elsewhere))
    };
    format!(
        "generation {generation} was given {port_env}={port}{elsewhere}; in proxy mode it must \
         listen on 127.0.0.1:${port_env} (an app that binds the public address itself fails with \
         'address already in use')"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_generation_and_the_way_out() {
        let addrs: Vec<SocketAddr> = vec!["0.0.0.0:8080".parse().unwrap()];
        let h = binds_own_port(2, 42, &addrs);
        assert!(
            h.contains("generation 2 (pid 42) listens on 0.0.0.0:8080"),
            "{h}"
        );
        assert!(h.contains("--proxy"), "{h}");
        let h = not_ready_binds_own_port(1, 7, &addrs);
        assert!(h.contains("--proxy http"), "{h}");
        let h = proxy_port(3, "PORT", 40000, &addrs);
        assert!(
            h.contains("PORT=40000 but bound 0.0.0.0:8080 itself"),
            "{h}"
        );
        assert!(!h.contains("LISTEN_FDS"), "{h}");
        assert!(!proxy_port(3, "PORT", 40000, &[]).contains("bound"));
    }
}
