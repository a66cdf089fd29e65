//! A serving generation that dies is replaced; meanwhile the listener stays
//! open, so clients wait instead of being refused. Readiness by delay and by
//! command.

use crate::support;

use support::{Baton, LONG, get};

#[test]
fn a_crashed_generation_is_replaced_and_clients_wait_meanwhile() {
    let b = Baton::serving(&[], &["--startup", "200ms"]);
    let port = b.port();
    support::send(b.gen_pid(1), rustix::process::Signal::KILL);
    // Immediately after the crash: the connection is queued, not refused,
    // and answered by the replacement.
    let reply = get(port, "/", LONG).expect("answered after the restart");
    assert_eq!(reply.generation, Some(2));
    let exit = b.wait_for_event("exit", 1);
    assert_eq!(support::field(&exit, "status"), Some("SIGKILL"), "{exit}");
    b.wait_for_event("ready", 2);
}

#[test]
fn a_generation_that_keeps_crashing_is_restarted_with_growing_delays() {
    let builder = Baton::builder();
    let faults = builder.dir().join("faults");
    let b = builder
        .run_args(["--listen", "127.0.0.1:0"])
        .app_args(["--faults-file".into(), faults.clone().into_os_string()])
        .start();
    b.wait_for_event("ready", 1);
    std::fs::write(&faults, "--exit-before-ready 1").expect("faults");
    support::send(b.gen_pid(1), rustix::process::Signal::KILL);
    // Three failed replacements, each delay longer than the one before.
    b.wait_for_event("rollback", 4);
    let delays: Vec<u64> = b
        .lines()
        .iter()
        .filter(|l| l.contains("restart_in_ms="))
        .filter_map(|l| support::field(l, "restart_in_ms")?.parse().ok())
        .collect();
    assert!(delays.len() >= 3, "{delays:?}\n{}", b.dump());
    assert!(
        delays.windows(2).all(|w| w[1] > w[0]),
        "growing: {delays:?}"
    );
    // A fixed app is started again.
    std::fs::remove_file(&faults).expect("remove faults");
    let reply = get(b.port(), "/", LONG).expect("serving again");
    assert_eq!(reply.status, 200);
}

#[test]
fn ready_after_a_delay() {
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--ready", "delay:300ms"])
        .app_args(["--never-ready"])
        .start();
    let line = b.wait_for_event("ready", 1);
    let ms: u64 = support::field(&line, "ready_ms")
        .and_then(|v| v.parse().ok())
        .expect("ready_ms");
    assert!(ms >= 300, "{line}");
}

#[test]
fn ready_when_a_command_succeeds() {
    let builder = Baton::builder();
    let flag = builder.dir().join("ready");
    let check = format!("exec:test -f {}-$BATON_GENERATION", flag.display());
    let b = builder
        .run_args(["--listen", "127.0.0.1:0", "--ready", &check])
        .app_args(["--never-ready"])
        .start();
    b.wait_for_event("spawn", 1);
    assert!(!b.has_event("ready", 1));
    std::fs::write(format!("{}-1", flag.display()), "").expect("flag");
    b.wait_for_event("ready", 1);
}
