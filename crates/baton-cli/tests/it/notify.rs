//! Readiness through the real `systemd-notify`, and whose notifications
//! count (`--notify-access`).

use crate::support;

use support::{Baton, LONG};

#[test]
fn systemd_notify_run_by_the_app_marks_its_generation_ready() {
    if !support::peer("systemd-notify", "systemd") {
        return;
    }
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .command([
            "/bin/sh",
            "-c",
            "systemd-notify --ready --status='warmed up' && exec sleep 600",
        ])
        .start();
    let ready = b.wait_for_event("ready", 1);
    assert!(ready.contains(&format!("pid={}", b.gen_pid(1))), "{ready}");
    let status = b.wait_for_event("status", 1);
    assert!(status.contains("warmed up"), "{status}");
}

#[test]
fn with_notify_access_main_only_the_main_process_counts() {
    // The main process (sh) never notifies; its child, the demo app, does,
    // from its own pid. Under `--notify-access main` that is not enough.
    let script = format!(
        "{} demo-app --listen 127.0.0.1:0 & exec sleep 600",
        support::exe()
    );
    let mut b = Baton::builder()
        .run_args([
            "--listen",
            "127.0.0.1:0",
            "--notify-access",
            "main",
            "--ready-timeout",
            "5s",
        ])
        .command(["/bin/sh", "-c", &script])
        .start();
    support::wait_until("the notification ignored", LONG, || {
        b.guard("notify_rejected").is_some_and(|n| n > 0)
    });
    b.wait_for_event("rollback", 1);
    // The first generation never became ready: baton gives up with code 1.
    assert_eq!(b.wait_exit(LONG).code(), Some(1), "{}", b.dump());
    assert!(!b.has_event("ready", 1));
}

/// Whether this test can send as another user (root, and `setpriv`).
fn can_send_as_nobody() -> bool {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to send as another user");
        return false;
    }
    support::peer("setpriv", "util-linux")
}

#[test]
fn another_user_cannot_mark_a_generation_ready() {
    if !can_send_as_nobody() || !support::peer("systemd-notify", "systemd") {
        return;
    }
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .app_args(["--never-ready"])
        .start();
    let socket = notify_socket_of(b.gen_pid(1));
    // nobody finds the abstract socket and claims readiness.
    let status = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "systemd-notify",
            "--ready",
        ])
        .env("NOTIFY_SOCKET", &socket)
        .status()
        .expect("setpriv (util-linux)");
    assert!(status.success());
    // (systemd-notify may send more than one datagram.)
    support::wait_until("the notification refused", LONG, || {
        b.guard("notify_rejected").is_some_and(|n| n >= 1)
    });
    assert!(!b.has_event("ready", 1));
}

#[test]
fn a_flood_from_another_user_is_counted_not_logged_line_by_line() {
    // Debian's python3, which any user may run (a per-user one may not be).
    let python = "/usr/bin/python3";
    if !can_send_as_nobody() || !support::peer_at(python, "python3") {
        return;
    }
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .app_args(["--never-ready"])
        .start();
    let socket = notify_socket_of(b.gen_pid(1));
    // 5 000 datagrams from uid 65534, as fast as the socket takes them.
    const FLOOD: u64 = 5000;
    let sender = format!(
        "import socket,sys\n\
         s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\n\
         a='\\0'+sys.argv[1][1:]\n\
         for i in range({FLOOD}):\n    s.sendto(b'READY=1',a)\n"
    );
    let status = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args([python, "-c", &sender, &socket])
        .status()
        .expect("setpriv (util-linux)");
    assert!(status.success());
    support::wait_until("every datagram counted", LONG, || {
        b.guard("notify_rejected") == Some(FLOOD)
    });
    assert!(!b.has_event("ready", 1));
    // One summary line, not one per datagram.
    let summaries = b
        .lines()
        .iter()
        .filter(|l| support::is_event(l, "ignored"))
        .count();
    assert!(summaries <= 2, "{summaries} lines:\n{}", b.dump());
}

/// The app's NOTIFY_SOCKET, from its environment.
fn notify_socket_of(pid: u32) -> String {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("NOTIFY_SOCKET="))
        .expect("NOTIFY_SOCKET in the app's environment")
        .to_owned()
}
