//! The axum example against real peers: standalone, under
//! `systemd-socket-activate`, and under baton with busy keep-alive clients
//! across reloads.

#[path = "../../../crates/baton-cli/tests/it/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

use support::{Baton, KeepAlive, LONG, Proc, get};

const APP: &str = env!("CARGO_BIN_EXE_axum-hello");

#[test]
fn standalone_it_binds_its_own_port() {
    let mut cmd = Command::new(APP);
    cmd.args(["--listen", "127.0.0.1:0"]);
    let app = Proc::spawn(cmd);
    let line = app.wait_for("listening", |l| l.contains("listening on"), LONG);
    let port: u16 = line
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let reply = get(port, "/", LONG).expect("answers");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.pid, Some(app.pid()));
    assert_eq!(reply.generation, Some(0), "no supervisor, no generation");
}

#[test]
fn under_systemd_socket_activate_it_serves_on_the_activated_socket() {
    if !support::peer("systemd-socket-activate", "systemd") {
        return;
    }
    // A port for systemd-socket-activate to bind (it takes no port 0).
    let port = support::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", &addr, "--fdname=http", APP, "--listen", "127.0.0.1:1"]);
    let activator = Proc::spawn(cmd);
    activator.wait_for("listening", |l| l.contains("Listening on"), LONG);
    // The first connection makes it exec the app, which must take fd 3: its
    // own fallback address (port 1) would not even bind.
    let reply = get(port, "/", LONG).expect("served on the activated socket");
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.pid,
        Some(activator.pid()),
        "LISTEN_PID is the exec'd app"
    );
}

#[test]
fn busy_keep_alive_clients_lose_nothing_across_reloads() {
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .command([APP, "--startup", "50ms"])
        .start();
    b.wait_for_event("ready", 1);
    let port = b.port();
    let load = KeepAlive::start(port, 8, Duration::from_secs(120));
    support::reload_through(&b, 2..=11, &load);
    let tally = load.finish();
    support::assert_no_failures(tally.ok, &tally.failures);
    assert!(
        tally.connections > 8,
        "clients reconnected after Connection: close"
    );
    eprintln!(
        "{} keep-alive requests on {} connections across 10 reloads, none failed",
        tally.ok, tally.connections
    );
}

#[test]
fn a_slow_request_finishes_during_the_drain_and_the_old_generation_exits_after_it() {
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .command([APP])
        .start();
    b.wait_for_event("ready", 1);
    let (reply, old) = support::slow_request_across_a_reload(&b, 2000);
    let reply = reply.expect("completes");
    assert_eq!((reply.status, reply.pid), (200, Some(old)));
    // The old generation drained that request, then exited on its own: well
    // before its 20 s drain deadline and baton's 30 s stop timeout.
    let exit = b.wait_for_event("exit", 1);
    assert_eq!(support::field(&exit, "status"), Some("0"), "{exit}");
    let drain_ms: u64 = support::field(&exit, "drain_ms")
        .and_then(|v| v.parse().ok())
        .expect("drain_ms");
    assert!(drain_ms < 20_000, "{exit}");
    assert!(!b.has_event("kill", 1));
}
