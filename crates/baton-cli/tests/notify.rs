//! Readiness through the real `systemd-notify`, and whose notifications
//! count (`--notify-access`).

mod support;

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
            "2s",
        ])
        .command(["/bin/sh", "-c", &script])
        .start();
    b.wait_for(
        "the notification ignored",
        |l| l.contains("ignoring a notification"),
        LONG,
    );
    b.wait_for_event("rollback", 1);
    // The first generation never became ready: baton gives up with code 1.
    assert_eq!(b.wait_exit(LONG).code(), Some(1), "{}", b.dump());
    assert!(!b.has_event("ready", 1));
}

#[test]
fn another_user_cannot_mark_a_generation_ready() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to send as another user");
        return;
    }
    if !support::peer("systemd-notify", "systemd") || !support::peer("setpriv", "util-linux") {
        return;
    }
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .app_args(["--never-ready"])
        .start();
    let pid = b.gen_pid(1);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let socket = environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("NOTIFY_SOCKET="))
        .expect("NOTIFY_SOCKET in the app's environment")
        .to_owned();
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
    let line = b.wait_for(
        "the notification refused",
        |l| l.contains("from another user"),
        LONG,
    );
    assert!(line.contains("sender_uid=65534"), "{line}");
    assert!(!b.has_event("ready", 1));
}
