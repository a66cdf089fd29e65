//! `Listeners::from_env` against real inherited fds. Each case runs in a
//! child process (this test binary, re-executed through `sh`), because the
//! protocol is about process state: `LISTEN_PID` must be the child's own pid
//! (`$$` survives `exec`), and the fds must sit at 3, 4, ….

use std::os::fd::AsRawFd;
use std::process::Command;

/// The environment variable that tells a re-executed test which case to run.
const CASE: &str = "BATON_TEST_CASE";

/// Runs test `name` in a child: `setup` is shell code run before `exec`
/// (it places fds and exports variables); `keep` are fds of this process the
/// child inherits (as themselves).
fn in_child(name: &str, setup: &str, keep: &[&std::net::TcpListener]) {
    for listener in keep {
        // Let the shell inherit it: clear close-on-exec.
        rustix::io::fcntl_setfd(listener, rustix::io::FdFlags::empty()).expect("clear CLOEXEC");
    }
    let script = format!("{setup}; exec \"$0\" --exact {name} --nocapture --test-threads=1");
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg(std::env::current_exe().expect("current_exe"))
        .env(CASE, name)
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child case {name} failed\nstdout: {stdout}\nstderr: {stderr}"
    );
}

/// Whether this process is the child of case `name`.
fn is_child(name: &str) -> bool {
    std::env::var(CASE).as_deref() == Ok(name)
}

#[test]
fn named_sockets_by_index_and_by_name() {
    if is_child("named_sockets_by_index_and_by_name") {
        let mut l = baton::listeners().expect("valid environment");
        assert_eq!(l.len(), 2);
        assert_eq!(l.names(), ["web", "admin"]);
        let admin = l.take_named("admin").expect("ok").expect("admin is there");
        assert!(matches!(admin, baton::Listener::Tcp(_)));
        assert!(l.take_named("admin").expect("ok").is_none(), "taken once");
        let web = l
            .tcp_or_bind(0, "127.0.0.1:1")
            .expect("fd 3 is a TCP listener");
        assert_eq!(
            web.local_addr().expect("addr").port(),
            std::env::var("WEB_PORT").unwrap().parse::<u16>().unwrap()
        );
        // A second call finds nothing: the fds are owned once.
        assert!(baton::listeners().expect("ok").is_empty());
        return;
    }
    let web = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let admin = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let setup = format!(
        "exec 3<&{w} 4<&{a}; export WEB_PORT={port} LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=web:admin",
        w = web.as_raw_fd(),
        a = admin.as_raw_fd(),
        port = web.local_addr().expect("addr").port()
    );
    in_child(
        "named_sockets_by_index_and_by_name",
        &setup,
        &[&web, &admin],
    );
}

#[test]
fn another_pid_takes_nothing_and_touches_nothing() {
    if is_child("another_pid_takes_nothing_and_touches_nothing") {
        let l = baton::listeners().expect("not ours is not an error");
        assert!(l.is_empty());
        // fd 3 (not a socket) was not examined, let alone closed.
        assert!(std::fs::read_link("/proc/self/fd/3").is_ok());
        return;
    }
    in_child(
        "another_pid_takes_nothing_and_touches_nothing",
        "exec 3</dev/null; export LISTEN_PID=1 LISTEN_FDS=1",
        &[],
    );
}

#[test]
fn zero_fds_is_none() {
    if is_child("zero_fds_is_none") {
        assert!(baton::listeners().expect("ok").is_empty());
        return;
    }
    in_child("zero_fds_is_none", "export LISTEN_PID=$$ LISTEN_FDS=0", &[]);
}

#[test]
fn a_non_socket_fd_is_a_clear_error() {
    if is_child("a_non_socket_fd_is_a_clear_error") {
        let err = baton::listeners().expect_err("fd 3 is /dev/null");
        assert_eq!(err.to_string(), "inherited fd 3 (unknown) is not a socket");
        return;
    }
    in_child(
        "a_non_socket_fd_is_a_clear_error",
        "exec 3</dev/null; export LISTEN_PID=$$ LISTEN_FDS=1",
        &[],
    );
}

#[test]
fn a_missing_fd_is_a_clear_error() {
    if is_child("a_missing_fd_is_a_clear_error") {
        let err = baton::listeners().expect_err("fd 3 is closed");
        assert_eq!(err.to_string(), "inherited fd 3 (web) is not open");
        return;
    }
    in_child(
        "a_missing_fd_is_a_clear_error",
        "exec 3<&-; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web",
        &[],
    );
}

#[test]
fn names_that_do_not_match_the_count_are_an_error() {
    if is_child("names_that_do_not_match_the_count_are_an_error") {
        let err = baton::listeners().expect_err("one name for two fds");
        assert!(err.to_string().contains("$LISTEN_FDNAMES"), "{err}");
        return;
    }
    in_child(
        "names_that_do_not_match_the_count_are_an_error",
        "export LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=web",
        &[],
    );
}

#[test]
fn the_blocking_shutdown_wakes_on_sigterm() {
    if is_child("the_blocking_shutdown_wakes_on_sigterm") {
        let shutdown = baton::shutdown::Shutdown::install().expect("install");
        assert_eq!(shutdown.requested(), None);
        let me = rustix::process::getpid();
        std::thread::spawn(move || {
            rustix::process::kill_process(me, rustix::process::Signal::TERM).expect("kill");
        });
        assert_eq!(shutdown.wait(), baton::shutdown::Signal::Terminate);
        assert_eq!(
            shutdown.requested(),
            Some(baton::shutdown::Signal::Terminate)
        );
        return;
    }
    in_child("the_blocking_shutdown_wakes_on_sigterm", "true", &[]);
}
