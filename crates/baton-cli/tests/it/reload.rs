//! Reloads under load: no request fails, every generation serves, and a
//! request in flight during a reload completes.

use crate::support;

use std::time::Duration;

use support::{Baton, LONG, Load, get, wait_until};

/// The pid in `baton reload`'s answer.
fn reloaded_pid(out: &support::Output) -> u32 {
    out.stdout
        .split("(pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"))
}

#[test]
fn twenty_five_reloads_under_load_fail_no_request() {
    let b = Baton::serving(&[], &["--startup", "20ms"]);
    let port = b.port();
    let mut pids = vec![b.gen_pid(1)];
    let load = Load::start(port, 4, 50_000, Duration::from_secs(120));
    wait_until("the first generation answered the load", LONG, || {
        load.has_seen(pids[0])
    });
    for _ in 0..25 {
        let out = b.ctl(&["reload"]);
        assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
        let pid = reloaded_pid(&out);
        // The next reload only once the load has reached this generation.
        wait_until(&format!("pid {pid} answered the load"), LONG, || {
            load.has_seen(pid)
        });
        pids.push(pid);
    }
    let (ok, failures, seen) = load.finish();
    support::assert_no_failures(ok, &failures);
    for pid in &pids {
        assert!(seen.contains(pid), "pid {pid} never answered");
    }
    assert_eq!(b.count_events("rollback"), 0, "{}", b.dump());
    eprintln!("{ok} requests over {} generations, none failed", pids.len());
}

#[test]
fn signals_trigger_reloads() {
    let b = Baton::serving(&[], &[]);
    b.signal(rustix::process::Signal::HUP);
    b.wait_for_event("ready", 2);
    b.wait_for_event("exit", 1);
    b.signal(rustix::process::Signal::USR2);
    b.wait_for_event("ready", 3);
    // Generation 2 may still answer what it accepted before its SIGTERM.
    b.wait_for_event("exit", 2);
    let reply = get(b.port(), "/", LONG).expect("serving");
    assert_eq!(reply.generation, Some(3));
}

#[test]
fn a_request_in_flight_during_a_reload_completes() {
    let b = Baton::serving(&[], &[]);
    let (reply, old) = support::slow_request_across_a_reload(&b, 1500);
    let reply = reply.expect("the slow request completes");
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.pid,
        Some(old),
        "served by the old generation while it drained"
    );
    b.wait_for_event("exit", 1);
}
