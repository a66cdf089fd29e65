//! Stopping: a generation that ignores the stop signal is killed after the
//! stop timeout, and baton exits with the serving generation's status.

use crate::support;

use support::{Baton, LONG, get, pid_gone, wait_until};

#[test]
fn an_old_generation_that_ignores_sigterm_is_killed_after_the_stop_timeout() {
    let builder = Baton::builder();
    let faults = builder.dir().join("faults");
    // Generation 1 ignores SIGTERM; later ones do not.
    std::fs::write(&faults, "--ignore-term").expect("write faults");
    let b = builder
        .run_args(["--listen", "127.0.0.1:0", "--stop-timeout", "1s"])
        .app_args(["--faults-file".into(), faults.clone().into_os_string()])
        .start();
    b.wait_for_event("ready", 1);
    let old = b.gen_pid(1);
    std::fs::remove_file(&faults).expect("remove faults");

    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    b.wait_for_event("retire", 1);
    b.wait_for_event("kill", 1);
    let exit = b.wait_for_event("exit", 1);
    assert_eq!(support::field(&exit, "status"), Some("SIGKILL"), "{exit}");
    wait_until("the old generation is gone", LONG, || pid_gone(old));
    assert_eq!(
        get(b.port(), "/", LONG).expect("serving").generation,
        Some(2)
    );
}

#[test]
fn sigterm_stops_gracefully_and_exits_with_the_apps_status() {
    let mut b = Baton::serving(&[], &[]);
    let app = b.gen_pid(1);
    b.signal(rustix::process::Signal::TERM);
    let status = b.wait_exit(LONG);
    assert_eq!(status.code(), Some(0), "{}", b.dump());
    assert!(pid_gone(app));
    assert!(!b.control.exists(), "control socket removed");
}

#[test]
fn an_app_killed_at_the_stop_timeout_gives_137() {
    let mut b = Baton::serving(&["--stop-timeout", "500ms"], &["--ignore-term"]);
    b.signal(rustix::process::Signal::INT);
    let status = b.wait_exit(LONG);
    assert_eq!(status.code(), Some(137), "SIGKILL is 9: {}", b.dump());
}

#[test]
fn baton_stop_over_the_control_socket() {
    let mut b = Baton::serving(&[], &[]);
    let out = b.ctl(&["stop"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(b.wait_exit(LONG).code(), Some(0));
}

#[test]
fn baton_stop_returns_once_baton_has_stopped_and_its_paths_are_free() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unix = dir.path().join("app.sock");
    let control = dir.path().join("control.sock");
    let start = || {
        let mut cmd = std::process::Command::new(support::exe());
        cmd.args(["run", "--listen"])
            .arg(format!("unix:{}", unix.display()))
            .arg("--control")
            .arg(&control)
            .args(["--", support::exe(), "demo-app"])
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null());
        let p = support::Proc::spawn(cmd);
        p.wait_for("ready", |l| support::is_event(l, "ready"), LONG);
        p
    };
    let mut first = start();
    let out = support::run(
        &["stop".into(), "--control".into(), control.clone().into()],
        LONG,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("exited with code 0"), "{out:?}");
    // The control socket and the listener's path are free at once: a new
    // baton takes them without "in use".
    let mut second = start();
    assert_eq!(first.wait_exit(LONG).code(), Some(0), "{}", first.dump());
    second.terminate(LONG);
}

#[test]
fn an_app_that_dies_of_the_stop_signal_stops_cleanly() {
    // A shell's `sleep` has no SIGTERM handler: it dies of the signal baton
    // sent, which is a clean stop (exit 0), not 143.
    let mut b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--ready", "delay:100ms"])
        .command(["/bin/sh", "-c", "exec sleep 600"])
        .start();
    b.wait_for_event("ready", 1);
    b.signal(rustix::process::Signal::TERM);
    assert_eq!(b.wait_exit(LONG).code(), Some(0), "{}", b.dump());
}
