//! `baton upgrade`: the running baton replaced in place (same pid, same
//! listeners, the serving generation untouched), and refused, with nothing
//! changed, when the new binary cannot take over.

use std::time::Duration;

use crate::support;

use support::{Baton, KeepAlive, LONG, Load, get};

/// `baton upgrade ARGS --json` against `b`: its exit code and answer.
fn upgrade(b: &Baton, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut all = vec!["upgrade", "--json"];
    all.extend_from_slice(args);
    let out = b.ctl(&all);
    let json = serde_json::from_str(out.stdout.trim()).unwrap_or(serde_json::Value::Null);
    (out.code, json)
}

/// `/proc/<pid>/exe`.
fn exe_of(pid: u32) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe")
}

/// A copy of the baton binary at a new path (a "new release").
fn copy_of_baton(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::copy(support::exe(), &path).expect("copy baton");
    path
}

/// Five upgrades under new-connection and keep-alive clients.
fn five_upgrades_under_load(b: &Baton, keep_alive_may_fail: bool) {
    let baton = b.pid();
    let app = b.gen_pid(1);
    let new_conn = Load::start(b.port(), 16, 1_000_000, Duration::from_secs(120));
    let keep_alive = KeepAlive::start(b.port(), 16, Duration::from_secs(120));
    support::wait_until("both loads answered", LONG, || {
        new_conn.has_seen(app) && keep_alive.has_seen(app)
    });
    let dir = tempfile::tempdir().expect("tempdir");
    for n in 1..=5 {
        let binary = copy_of_baton(dir.path(), &format!("baton-v{n}"));
        let binary = binary.to_str().expect("utf-8");
        let (code, json) = upgrade(b, &["--binary", binary]);
        assert_eq!(code, Some(0), "upgrade {n}: {json}\n{}", b.dump());
        assert_eq!(json["result"], "upgraded", "{json}");
        assert_eq!(json["pid"], baton, "the same pid");
        assert_eq!(exe_of(baton).to_str(), Some(binary), "the new image runs");
        let status = b.status_json();
        assert_eq!(status["upgrades"], n, "{status}");
        assert_eq!(
            status["serving"], 1,
            "the serving generation was not restarted"
        );
    }
    let (ok, failures, _) = new_conn.finish();
    support::assert_no_failures(ok, &failures);
    let tally = keep_alive.finish();
    if !keep_alive_may_fail {
        support::assert_no_failures(tally.ok, &tally.failures);
    }
    eprintln!(
        "5 upgrades: {ok} new-connection requests and {} keep-alive requests ({} failed)",
        tally.ok,
        tally.failures.len()
    );
    // The app was never restarted, and reloads still work.
    assert_eq!(get(b.port(), "/", LONG).expect("served").pid, Some(app));
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["generation"], 2, "{json}");
}

#[test]
fn five_upgrades_in_socket_mode_lose_nothing_and_keep_the_pid_and_the_app() {
    // The demo app drains keep-alive connections gently, so keep-alive
    // clients lose nothing either (nothing is restarted at all).
    let b = Baton::serving(&[], &[]);
    five_upgrades_under_load(&b, false);
}

#[test]
fn five_upgrades_in_proxy_mode_lose_nothing() {
    let b = Baton::behind_proxy("http", &[], &[]);
    five_upgrades_under_load(&b, false);
}

#[test]
fn a_binary_that_cannot_take_over_is_refused_and_nothing_changes() {
    let b = Baton::serving(&[], &[]);
    let baton = b.pid();
    let before = exe_of(baton);
    let dir = tempfile::tempdir().expect("tempdir");
    // Not baton; not executable; a truncated baton (its headers and the
    // start of its code: a debug build's tail is mostly debug info, so a
    // fraction of the file could still run).
    let truncated = dir.path().join("baton-truncated");
    let bytes = std::fs::read(support::exe()).expect("read baton");
    std::fs::write(&truncated, &bytes[..bytes.len().min(64 * 1024)]).expect("write");
    std::fs::set_permissions(
        &truncated,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let not_executable = dir.path().join("plain-file");
    std::fs::write(&not_executable, "hello").expect("write");
    for binary in [
        "/bin/false",
        "/bin/true",
        truncated.to_str().expect("utf-8"),
        not_executable.to_str().expect("utf-8"),
        "/nonexistent/baton",
    ] {
        let out = b.ctl(&["upgrade", "--binary", binary]);
        assert_eq!(out.code, Some(1), "{binary}: {out:?}");
        assert!(
            out.stderr.contains("baton goes on unchanged"),
            "{binary}: {}",
            out.stderr
        );
        assert_eq!(exe_of(baton), before, "{binary}");
    }
    // --check only checks.
    let candidate = copy_of_baton(dir.path(), "baton-next");
    let (code, json) = upgrade(&b, &["--check", candidate.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["result"], "upgrade_checked", "{json}");
    assert_eq!(exe_of(baton), before);
    // Still serving and reloading.
    assert_eq!(b.status_json()["upgrades"], 0);
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}");
}

#[test]
fn a_candidate_that_prints_fixed_words_or_never_answers_is_refused_and_its_check_killed() {
    let b = Baton::serving(&["--check-timeout", "1s"], &[]);
    let baton = b.pid();
    let before = exe_of(baton);
    let dir = tempfile::tempdir().expect("tempdir");
    let script = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        path.to_str().expect("utf-8").to_owned()
    };
    // The right words, but not this upgrade's nonce: not a baton.
    let mimic = script(
        "mimic",
        "echo 'baton-upgrade-check ok version=9.9.9 nonce=1' >&4; exit 0",
    );
    let out = b.ctl(&["upgrade", "--binary", &mimic]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("nonce"), "{}", out.stderr);
    assert_eq!(exe_of(baton), before);
    // A check that hangs: killed at --check-timeout, the upgrade refused,
    // and the next upgrade is not told one is "already under way".
    let marker = dir.path().join("hung.pid");
    let hang = script(
        "hang",
        &format!("echo $$ > {}; exec sleep 3600", marker.display()),
    );
    let out = b.ctl(&["upgrade", "--binary", &hang]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("--check-timeout"), "{}", out.stderr);
    let pid: u32 = std::fs::read_to_string(&marker)
        .expect("the check ran")
        .trim()
        .parse()
        .expect("pid");
    support::wait_until("the hung check was killed", LONG, || support::pid_gone(pid));
    let candidate = copy_of_baton(dir.path(), "baton-next");
    let (code, json) = upgrade(&b, &["--check", candidate.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{json}");
}

#[test]
fn stopping_during_an_upgrade_check_kills_the_check() {
    let mut b = Baton::serving(&[], &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("hung.pid");
    let hang = dir.path().join("hang");
    std::fs::write(
        &hang,
        format!(
            "#!/bin/sh\necho $$ > {}; exec sleep 3600\n",
            marker.display()
        ),
    )
    .expect("write");
    std::fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let client = upgrade_in_background(&b, &hang);
    let read_pid = || -> Option<u32> {
        std::fs::read_to_string(&marker)
            .ok()
            .and_then(|t| t.trim().parse().ok())
    };
    support::wait_until("the check runs", LONG, || read_pid().is_some());
    let pid = read_pid().expect("pid");
    b.signal(rustix::process::Signal::TERM);
    b.wait_exit(LONG);
    support::wait_until("the check was killed with the stop", LONG, || {
        support::pid_gone(pid)
    });
    let out = client.join().expect("client");
    assert_eq!(out.code, Some(1), "{out:?}");
}

#[test]
fn an_upgrade_during_a_reload_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = dir.path().join("faults");
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--ready-timeout", "10s"])
        .app_args(["--faults-file".into(), faults.display().to_string()])
        .start();
    b.wait_for_event("ready", 1);
    // Generation 2 takes a while to become ready.
    std::fs::write(&faults, "--startup 3s").expect("faults");
    let control = b.control.clone();
    let reload = std::thread::spawn(move || {
        support::run(&["reload".into(), "--control".into(), control.into()], LONG)
    });
    b.wait_for_event("spawn", 2);
    let out = b.ctl(&["upgrade"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("a reload is under way"),
        "{}",
        out.stderr
    );
    assert_eq!(reload.join().expect("reload").code, Some(0));
}

#[test]
fn in_proxy_mode_a_request_longer_than_the_stop_timeout_abandons_the_upgrade_and_is_not_cut() {
    let b = Baton::behind_proxy("http", &["--stop-timeout", "1s"], &[]);
    let port = b.port();
    let (slow, app) = support::slow_request(&b, 3000);
    let out = b.ctl(&["upgrade"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("upgrade abandoned"), "{}", out.stderr);
    assert!(
        out.stderr.contains("baton goes on unchanged"),
        "{}",
        out.stderr
    );
    let reply = slow
        .join()
        .expect("the request's thread")
        .expect("the slow request");
    assert_eq!(reply.status, 200);
    // The proxy serves again, nothing changed.
    assert_eq!(get(port, "/", LONG).expect("served").pid, Some(app));
    assert_eq!(b.status_json()["upgrades"], 0);
}

#[test]
fn upgrades_leave_no_descriptor_behind() {
    let b = Baton::serving(&["--log-prefix"], &[]);
    let baton = b.pid();
    let keeper = b.status_json()["keeper_pid"].clone();
    // Counted between requests (a client's connection is open only while
    // it is answered).
    let before = support::fd_count(baton);
    for n in 1..=20 {
        let (code, json) = upgrade(&b, &[]);
        assert_eq!(code, Some(0), "upgrade {n}: {json}");
    }
    support::wait_until("baton holds as many descriptors as before", LONG, || {
        support::fd_count(baton) <= before
    });
    assert_eq!(b.status_json()["keeper_pid"], keeper, "the same keeper");
}

/// `baton upgrade --binary BINARY` of `b`, on a thread of its own.
fn upgrade_in_background(
    b: &Baton,
    binary: &std::path::Path,
) -> std::thread::JoinHandle<support::Output> {
    let (control, binary) = (b.control.clone(), binary.to_owned());
    std::thread::spawn(move || {
        support::run(
            &[
                "upgrade".into(),
                "--control".into(),
                control.into(),
                "--binary".into(),
                binary.into(),
            ],
            LONG,
        )
    })
}

/// `n` upgrades of `b`, each with `signal` sent to baton the moment it logs
/// that it hands over (the worst moment: between its last look at its
/// signals and the exec). Each upgrade's binary is a link of its own to
/// baton, so that each log line names it.
fn signal_at_each_handover(b: &Baton, n: usize, signal: rustix::process::Signal) {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..n {
        let binary = dir.path().join(format!("baton-link-{i}"));
        std::fs::hard_link(support::exe(), &binary).expect("link");
        let client = upgrade_in_background(b, &binary);
        let name = binary.display().to_string();
        b.wait_for(
            "the handover",
            |l| l.contains("upgrade: handing over") && l.contains(&name),
            LONG,
        );
        b.signal(signal);
        let out = client.join().expect("client");
        assert_eq!(out.code, Some(0), "upgrade {i}: {out:?}\n{}", b.dump());
        if signal == rustix::process::Signal::TERM {
            return;
        }
        support::wait_until(&format!("the SIGHUP of upgrade {i} reloaded"), LONG, || {
            b.status_json()["reloads_ok"].as_u64() == Some(i as u64 + 1)
        });
    }
}

#[test]
fn signals_sent_as_baton_hands_over_are_not_lost() {
    for proxy in [false, true] {
        let trials = if proxy { 10 } else { 30 };
        let start = || {
            if proxy {
                Baton::behind_proxy("http", &[], &[])
            } else {
                Baton::serving(&[], &[])
            }
        };
        // SIGHUP: a reload follows each upgrade.
        let b = start();
        signal_at_each_handover(&b, trials, rustix::process::Signal::HUP);
        // SIGTERM: the new image stops.
        for _ in 0..trials {
            let mut b = start();
            signal_at_each_handover(&b, 1, rustix::process::Signal::TERM);
            let status = b.wait_exit(LONG);
            assert_eq!(status.code(), Some(0), "{}", b.dump());
        }
    }
}
