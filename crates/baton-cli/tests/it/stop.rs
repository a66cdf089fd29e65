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
fn an_app_killed_on_stop_gives_128_plus_the_signal() {
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
