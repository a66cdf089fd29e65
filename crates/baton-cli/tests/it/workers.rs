//! `--workers N`: a generation is N processes on the same listeners; a
//! worker that dies is replaced alone; `--max-rss` replaces a worker that
//! grows too large, its successor first.

use std::collections::HashSet;
use std::time::Duration;

use rustix::process::Signal;

use crate::support;

use support::{Baton, LONG, Load, get, wait_until};

/// The serving generation's workers from `status --json`: (index, pid,
/// state).
fn workers(b: &Baton) -> Vec<(u64, u64, String)> {
    let status = b.status_json();
    let serving = status["serving"].clone();
    status["generations"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["generation"] == serving))
        .and_then(|g| g["workers"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|w| {
            (
                w["worker"].as_u64().unwrap_or(u64::MAX),
                w["pid"].as_u64().unwrap_or(0),
                w["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Waits until all `n` workers of the serving generation are ready;
/// returns their pids by index.
fn ready_workers(b: &Baton, n: usize) -> Vec<u64> {
    let mut pids = Vec::new();
    wait_until(&format!("{n} ready workers"), LONG, || {
        let ws = workers(b);
        pids = ws.iter().map(|w| w.1).collect();
        ws.len() == n && ws.iter().all(|w| w.2 == "ready")
    });
    pids
}

#[test]
fn four_workers_serve_and_two_reloads_lose_nothing() {
    let b = Baton::serving(&["--workers", "4"], &[]);
    let first = ready_workers(&b, 4);
    assert_eq!(first.iter().collect::<HashSet<_>>().len(), 4, "{first:?}");
    let load = Load::start(b.port(), 32, 1_000_000, Duration::from_secs(120));
    // The kernel does not promise an even spread; all four take some.
    wait_until("clients met the 4 workers", LONG, || {
        first.iter().all(|p| load.has_seen(*p as u32))
    });
    for n in 2..=3 {
        let (code, json) = b.reload_json();
        assert_eq!(code, Some(0), "{json}\n{}", b.dump());
        assert_eq!(json["generation"], n, "{json}");
        let pids = ready_workers(&b, 4);
        wait_until("clients met the new workers", LONG, || {
            pids.iter().all(|p| load.has_seen(*p as u32))
        });
    }
    let (ok, failures, seen) = load.finish();
    support::assert_no_failures(ok, &failures);
    assert_eq!(seen.len(), 12, "3 generations of 4: {seen:?}");
    eprintln!(
        "4 workers, 2 reloads: {ok} requests, 0 failed, {} processes met",
        seen.len()
    );
}

#[test]
fn a_killed_worker_is_replaced_alone() {
    let b = Baton::serving(&["--workers", "4"], &[]);
    let before = ready_workers(&b, 4);
    let load = Load::start(b.port(), 16, 1_000_000, Duration::from_secs(120));
    wait_until("the load was answered", LONG, || {
        load.ok.load(std::sync::atomic::Ordering::Relaxed) > 200
    });
    support::send(before[1] as u32, Signal::KILL);
    let mut after = Vec::new();
    wait_until("worker 1 was replaced", LONG, || {
        after = ready_workers(&b, 4);
        after[1] != before[1]
    });
    assert_eq!(after[0], before[0]);
    assert_eq!(after[2], before[2]);
    assert_eq!(after[3], before[3]);
    let status = b.status_json();
    assert_eq!(status["serving"], 1, "the generation was not replaced");
    assert_eq!(
        status["generations"][0]["workers"][1]["restarts"], 1,
        "{status}"
    );
    let (ok, failures, _) = load.finish();
    // At most what the killed worker had in flight: one per client.
    assert!(
        failures.len() <= 16,
        "{} failed of {ok}: {failures:?}",
        failures.len()
    );
    eprintln!(
        "one of 4 workers killed: {ok} requests, {} failed (its in-flight ones)",
        failures.len()
    );
}

#[test]
fn a_worker_over_its_start_limit_stays_down_and_the_others_serve() {
    let b = Baton::serving(&["--workers", "2", "--start-limit", "1/1m"], &[]);
    let pids = ready_workers(&b, 2);
    support::send(pids[1] as u32, Signal::KILL);
    let mut again = Vec::new();
    wait_until("worker 1 restarted once", LONG, || {
        again = ready_workers(&b, 2);
        again[1] != pids[1]
    });
    support::send(again[1] as u32, Signal::KILL);
    wait_until("worker 1 is down", LONG, || {
        workers(&b).iter().any(|w| w.0 == 1 && w.2 == "down")
    });
    let status = b.status_json();
    assert_eq!(status["generations"][0]["degraded"], true, "{status}");
    assert_eq!(status["serving"], 1);
    assert_eq!(
        get(b.port(), "/", LONG).expect("served").pid,
        Some(pids[0] as u32)
    );
}

#[test]
fn a_signal_reaches_every_worker() {
    let b = Baton::serving(&["--workers", "3"], &[]);
    let pids = ready_workers(&b, 3);
    let out = b.ctl(&["signal", "USR1"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    for pid in pids {
        b.wait_for(
            "each worker got SIGUSR1",
            |l| l.contains(&format!("pid {pid} got SIGUSR1")),
            LONG,
        );
    }
}

#[test]
fn behind_the_proxy_requests_go_round_the_workers() {
    let b = Baton::behind_proxy("http", &["--workers", "3"], &[]);
    let pids = ready_workers(&b, 3);
    let mut seen = HashSet::new();
    for _ in 0..30 {
        seen.insert(get(b.port(), "/", LONG).expect("served").pid.expect("pid"));
    }
    assert_eq!(seen.len(), 3, "{seen:?} of {pids:?}");
    let load = Load::start(b.port(), 16, 1_000_000, Duration::from_secs(120));
    wait_until("the load was answered", LONG, || {
        load.ok.load(std::sync::atomic::Ordering::Relaxed) > 200
    });
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}");
    let (ok, failures, _) = load.finish();
    support::assert_no_failures(ok, &failures);
}

#[test]
fn a_worker_that_grows_past_max_rss_is_replaced_without_a_failed_request() {
    let b = Baton::serving(&["--workers", "2", "--max-rss", "120M"], &[]);
    let before = ready_workers(&b, 2);
    let port = b.port();
    let load = Load::start(port, 8, 1_000_000, Duration::from_secs(120));
    // Another client leaks 4 MiB per request, into whichever worker takes
    // it; bounded in count.
    let leaker = std::thread::spawn(move || {
        let mut failed = 0;
        for _ in 0..200 {
            if get(port, "/leak?mb=4", LONG).map_or(true, |r| r.status != 200) {
                failed += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        failed
    });
    wait_until("a worker was replaced for its size", LONG, || {
        let status = b.status_json();
        status["generations"][0]["workers"]
            .as_array()
            .is_some_and(|ws| ws.iter().any(|w| w["rss_replacements"].as_u64() > Some(0)))
    });
    let leak_failed = leaker.join().expect("leaker");
    let (ok, failures, _) = load.finish();
    support::assert_no_failures(ok, &failures);
    assert_eq!(leak_failed, 0, "the leaking requests were answered too");
    let after = ready_workers(&b, 2);
    assert_ne!(after, before, "{after:?}");
    assert_eq!(
        b.status_json()["serving"],
        1,
        "no reload: workers were replaced"
    );
}

#[test]
fn workers_auto_and_bad_values() {
    let b = Baton::serving(&["--workers", "auto"], &[]);
    let n = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    ready_workers(&b, n);
    for bad in ["0", "many", "100000"] {
        let out = support::baton(&["run", "--listen", ":0", "--workers", bad, "--", "true"]);
        assert_eq!(out.code, Some(2), "{bad}: {out:?}");
        assert!(out.stderr.contains("invalid workers"), "{}", out.stderr);
    }
    let out = support::baton(&["run", "--listen", ":0", "--max-rss", "12", "--", "true"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("invalid size"), "{}", out.stderr);
}

#[test]
fn node_workers_share_the_socket_and_reload_without_failures() {
    if !support::peer("node", "nodejs") {
        return;
    }
    let server = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/node-workers/server.js");
    let b = Baton::builder()
        .run_args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "3",
            "--ready",
            "delay:300ms",
        ])
        .command(["node".into(), server.into_os_string()])
        .start();
    b.wait_for_event("ready", 1);
    let pids = ready_workers(&b, 3);
    let load = Load::start(b.port(), 16, 1_000_000, Duration::from_secs(120));
    wait_until("clients met the 3 node workers", LONG, || {
        pids.iter().all(|p| load.has_seen(*p as u32))
    });
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}\n{}", b.dump());
    let new = ready_workers(&b, 3);
    wait_until("clients met the new workers", LONG, || {
        new.iter().all(|p| load.has_seen(*p as u32))
    });
    let (ok, failures, seen) = load.finish();
    support::assert_no_failures(ok, &failures);
    assert_eq!(seen.len(), 6, "{seen:?}");
}

#[test]
fn workers_survive_an_upgrade_and_are_adopted_after_a_kill() {
    let mut b = Baton::serving(&["--workers", "3"], &[]);
    let port = b.port();
    let pids = ready_workers(&b, 3);
    let out = b.ctl(&["upgrade"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        ready_workers(&b, 3),
        pids,
        "the same workers after the upgrade"
    );
    b.signal(Signal::KILL);
    b.wait_exit(LONG);
    let second = Baton::builder()
        .control(&b.control)
        .run_args(["--listen", &format!("127.0.0.1:{port}"), "--workers", "3"])
        .start();
    let mut adopted = Vec::new();
    wait_until("the new baton adopted the 3 workers", LONG, || {
        let out = second.ctl(&["status", "--json"]);
        out.code == Some(0) && {
            adopted = ready_workers(&second, 3);
            true
        }
    });
    let mut sorted = adopted.clone();
    sorted.sort_unstable();
    let mut expected = pids.clone();
    expected.sort_unstable();
    assert_eq!(sorted, expected);
    let (code, json) = second.reload_json();
    assert_eq!(code, Some(0), "{json}");
}

#[test]
fn a_stop_while_every_worker_waits_to_restart_does_not_wait_for_the_stop_timeout() {
    let mut b = Baton::serving(
        &[
            "--workers",
            "2",
            "--restart-delay",
            "10s",
            "--restart-delay-max",
            "10s",
            // An old baton would wait this out, then a kill grace, for
            // processes that are gone.
            "--stop-timeout",
            "60s",
        ],
        &["--crash-after", "300ms"],
    );
    wait_until("both workers died and wait to restart", LONG, || {
        let ws = workers(&b);
        ws.len() == 2 && ws.iter().all(|(_, _, state)| state == "restarting")
    });
    b.signal(Signal::TERM);
    let status = b.wait_exit(LONG);
    assert!(status.code().is_some(), "{status:?}\n{}", b.dump());
    assert!(
        !b.has_event("kill", 1),
        "no SIGKILL to nobody: {}",
        b.dump()
    );
}
