//! A new generation that fails is killed; the old one keeps serving, and
//! `baton reload` says why with exit code 1.

mod support;

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

    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("generation 2 (pid ")
            && out
                .stderr
                .contains("exited with status 3 before it was ready"),
        "{out:?}"
    );
    assert!(out.stderr.contains("generation 1 keeps serving"), "{out:?}");
    b.wait_for_event("rollback", 2);

    let reply = get(b.port(), "/", LONG).expect("still serving");
    assert_eq!(reply.pid, Some(old), "the old generation serves on");

    // Fixed: the next reload goes through.
    std::fs::remove_file(&faults).expect("remove faults");
    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("generation 3"), "{out:?}");
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

    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("was not ready within 1s"), "{out:?}");
    assert!(
        out.stderr.contains("READY=1"),
        "the message hints at the notify protocol: {out:?}"
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
    let line = b.wait_for_event("rollback", 2);
    assert!(
        line.contains("exited with status 7 before it was ready"),
        "{line}"
    );
    assert!(line.contains("generation 1 keeps serving"), "{line}");
    assert_eq!(
        get(b.port(), "/", LONG).expect("serving").generation,
        Some(1)
    );
}
