//! What a generation inherits: exactly the listeners as fds 3.., the
//! socket-activation variables with LISTEN_PID equal to its own pid, its own
//! process group, and clean signal state.

use crate::support;

use support::{Baton, LONG};

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct Report {
    pid: u32,
    pgid: i32,
    generation: Option<String>,
    listen_pid: Option<String>,
    listen_fds: Option<String>,
    listen_fdnames: Option<String>,
    notify_socket: Option<String>,
    server_starter_port: Option<String>,
    fds: Vec<(i32, String)>,
    sig_blocked: String,
    sig_ignored: String,
    listeners: Vec<String>,
    listen_vars_left: bool,
}

fn read_report(path: &std::path::Path) -> Report {
    let text = std::fs::read_to_string(path).expect("report written");
    serde_json::from_str(&text).expect("report is JSON")
}

#[test]
fn the_app_gets_its_listeners_as_fds_3_and_up_and_nothing_else() {
    let builder = Baton::builder();
    let dir = builder.dir().to_owned();
    let report = dir.join("report.json");
    let sock = dir.join("admin.sock");
    let b = builder
        .run_args(["--listen", "127.0.0.1:0", "--listen"])
        .run_args([format!("admin=unix:{}", sock.display())])
        // baton ignores SIGUSR1 (inherited); the app must not.
        .via_shell("trap '' USR1")
        .app_args(["--report".into(), report.clone().into_os_string()])
        .start();
    b.wait_for_event("ready", 1);
    let pid = b.gen_pid(1);
    let r = read_report(&report);

    assert_eq!(r.pid, pid);
    assert_eq!(
        r.listen_pid.as_deref(),
        Some(pid.to_string().as_str()),
        "LISTEN_PID is the app's own pid"
    );
    assert_eq!(r.listen_fds.as_deref(), Some("2"));
    assert_eq!(r.listen_fdnames.as_deref(), Some("unknown:admin"));
    assert_eq!(r.generation.as_deref(), Some("1"));
    assert!(
        r.notify_socket
            .as_deref()
            .is_some_and(|s| s.starts_with('@')),
        "{r:?}"
    );
    let tcp = b.addr(0);
    assert_eq!(
        r.server_starter_port.as_deref(),
        Some(format!("{tcp}=3;{}=4", sock.display()).as_str())
    );

    // fds: stdio, then exactly the two listeners, then nothing.
    let numbers: Vec<i32> = r.fds.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(numbers, vec![0, 1, 2, 3, 4], "open fds: {:?}", r.fds);
    assert!(
        r.fds[3].1.starts_with("socket:") && r.fds[4].1.starts_with("socket:"),
        "{:?}",
        r.fds
    );
    assert_eq!(
        r.listeners,
        vec![tcp.clone(), format!("unix:{}", sock.display())]
    );

    // The library took the fds and cleaned the environment.
    assert!(!r.listen_vars_left);
    // Its own process group; no blocked signals; only SIGPIPE ignored (by
    // the Rust runtime of the app itself), not the SIGUSR1 baton inherited.
    assert_eq!(r.pgid, pid as i32);
    assert_eq!(r.sig_blocked, "0000000000000000");
    assert_eq!(r.sig_ignored, "0000000000001000", "only SIGPIPE (bit 13)");

    // And it serves on both.
    let reply = support::get(
        tcp.rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("port"),
        "/",
        LONG,
    )
    .expect("tcp");
    assert_eq!(reply.pid, Some(pid));
    assert_eq!(reply.generation, Some(1));
    let mut unix = std::os::unix::net::UnixStream::connect(&sock).expect("unix listener");
    use std::io::{Read, Write};
    unix.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    unix.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(&format!("x-pid: {pid}")), "{answer}");
}

#[test]
fn every_generation_gets_its_own_listen_pid_and_the_same_sockets() {
    let builder = Baton::builder();
    let report = builder.dir().join("report.json");
    let b = builder
        .run_args(["--listen", "127.0.0.1:0"])
        .app_args(["--report".into(), report.clone().into_os_string()])
        .start();
    b.wait_for_event("ready", 1);
    let first = read_report(&report);
    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
    let second = read_report(&report);
    assert_eq!(second.pid, b.gen_pid(2));
    assert_eq!(
        second.listen_pid.as_deref(),
        Some(second.pid.to_string().as_str())
    );
    assert_eq!(second.generation.as_deref(), Some("2"));
    assert_eq!(
        second.listeners, first.listeners,
        "same socket, same address"
    );
    assert_eq!(
        second.fds[3].1, first.fds[3].1,
        "the very same socket (inode)"
    );
    assert_ne!(
        second.notify_socket, first.notify_socket,
        "a notify socket per generation"
    );
}

#[test]
fn env_from_the_command_line_and_the_config_file_reaches_the_app_and_the_command_line_wins() {
    let builder = Baton::builder();
    let dir = builder.dir().to_owned();
    let config = dir.join("app.toml");
    std::fs::write(
        &config,
        "env = { GIN_MODE = \"debug\", FROM_FILE = \"yes\" }\n",
    )
    .expect("config");
    let seen = dir.join("env.txt");
    let script = format!(
        "env > {}; exec {} demo-app --listen 127.0.0.1:0",
        seen.display(),
        support::exe()
    );
    let b = builder
        .run_args(["--listen", "127.0.0.1:0", "--config"])
        .run_args([config.display().to_string()])
        .run_args(["--env", "GIN_MODE=release", "--env", "WITH_EQUALS=a=b"])
        .command(["/bin/sh", "-c", &script])
        .start();
    b.wait_for_event("ready", 1);
    let env = std::fs::read_to_string(&seen).expect("env written");
    let lines: Vec<&str> = env.lines().collect();
    let count = |line: &str| lines.iter().filter(|l| **l == line).count();
    assert_eq!(count("GIN_MODE=release"), 1, "{env}");
    assert!(!lines.contains(&"GIN_MODE=debug"), "{env}");
    assert_eq!(count("FROM_FILE=yes"), 1, "{env}");
    assert_eq!(count("WITH_EQUALS=a=b"), 1, "{env}");
}
