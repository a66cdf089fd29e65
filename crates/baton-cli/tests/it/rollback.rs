//! A new generation that fails is killed; the old one keeps serving, and
//! `baton reload` says why with exit code 1.

use crate::support;

use support::{Baton, LONG, get, pid_gone, wait_until};

/// baton serving generation 1, whose later generations read fault switches
/// from `faults` in the test directory.
fn with_faults(run_args: &[&str]) -> (Baton, std::path::PathBuf) {
    let builder = Baton::builder();
    let faults = builder.dir().join("faults");
    let b = builder
        .run_args(["--listen", "127.0.0.1:0"])
        .run_args(run_args.iter().copied())
        .app_args(["--faults-file".into(), faults.clone().into_os_string()])
        .start();
    b.wait_for_event("ready", 1);
    (b, faults)
}

#[test]
fn a_generation_that_crashes_at_start_rolls_back() {
    let (b, faults) = with_faults(&[]);
    let old = b.gen_pid(1);
    std::fs::write(&faults, "--exit-before-ready 3").expect("write faults");

    let (code, json) = b.reload_json();
    assert_eq!(code, Some(1), "{json}");
    assert_eq!(json["result"], "rolled_back", "{json}");
    assert_eq!(json["generation"], 2, "{json}");
    assert_eq!(json["reason"]["kind"], "exited", "{json}");
    assert_eq!(json["reason"]["status"]["exited"], 3, "{json}");
    assert_eq!(json["serving"], 1, "{json}");
    b.wait_for_event("rollback", 2);

    let reply = get(b.port(), "/", LONG).expect("still serving");
    assert_eq!(reply.pid, Some(old), "the old generation serves on");

    // Fixed: the next reload goes through.
    std::fs::remove_file(&faults).expect("remove faults");
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["result"], "reloaded", "{json}");
    assert_eq!(json["generation"], 3, "{json}");
    wait_until("the old generation exited", LONG, || pid_gone(old));

    let status = b.ctl(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&status.stdout).expect("status JSON");
    assert_eq!(json["reloads_ok"], 1);
    assert_eq!(json["reloads_failed"], 1);
    assert_eq!(json["serving"], 3);
}

#[test]
fn a_generation_that_never_becomes_ready_is_killed_and_rolled_back() {
    let (b, faults) = with_faults(&["--ready-timeout", "1s"]);
    let old = b.gen_pid(1);
    std::fs::write(&faults, "--never-ready").expect("write faults");

    let (code, json) = b.reload_json();
    assert_eq!(code, Some(1), "{json}");
    assert_eq!(json["reason"]["kind"], "not_ready", "{json}");
    assert_eq!(json["reason"]["timeout"], "1s", "{json}");
    let hint = json["reason"]["hint"].as_str().unwrap_or_default();
    assert!(
        hint.contains("READY=1"),
        "a hint at the notify protocol: {json}"
    );
    let stuck = b.gen_pid(2);
    wait_until("the stuck generation is killed", LONG, || pid_gone(stuck));
    let reply = get(b.port(), "/", LONG).expect("still serving");
    assert_eq!(reply.pid, Some(old));
}

#[test]
fn a_rollback_from_a_signal_is_logged() {
    let (b, faults) = with_faults(&[]);
    std::fs::write(&faults, "--exit-before-ready 7").expect("write faults");
    b.signal(rustix::process::Signal::HUP);
    b.wait_for_event("rollback", 2);
    let status = b.status_json();
    assert_eq!(status["reloads_failed"], 1, "{status}");
    assert_eq!(status["serving"], 1, "{status}");
    assert_eq!(
        get(b.port(), "/", LONG).expect("serving").generation,
        Some(1)
    );
}
