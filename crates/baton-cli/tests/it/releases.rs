//! Releases and `baton rollback`: what each generation ran is kept, so the
//! previous release runs again even after a deploy replaced its file and
//! switched the `current` symlink; a release that cannot be reproduced is
//! refused.

use std::path::PathBuf;
use std::time::Duration;

use crate::support;

use support::{Baton, LONG, Load, get};

/// Load from 16 clients, each opening a new connection per request, once
/// it has been answered.
fn load(b: &Baton) -> Load {
    let load = Load::start(b.port(), 16, 1_000_000, Duration::from_secs(120));
    support::wait_until("the load was answered", LONG, || {
        load.ok.load(std::sync::atomic::Ordering::Relaxed) > 100
    });
    load
}

/// A deploy layout: `app` (a copy of baton), `releases/v1`, `releases/v2`,
/// and `current -> releases/v1`.
struct Layout {
    dir: tempfile::TempDir,
}

impl Layout {
    fn new() -> Layout {
        let dir = tempfile::tempdir().expect("tempdir");
        for v in ["v1", "v2"] {
            std::fs::create_dir_all(dir.path().join("releases").join(v)).expect("mkdir");
        }
        std::fs::copy(support::exe(), dir.path().join("app")).expect("copy");
        std::os::unix::fs::symlink("releases/v1", dir.path().join("current")).expect("symlink");
        Layout { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Deploys a new `app` the way deploy tools do (a new file renamed over
    /// the path) and points `current` at `v2`.
    fn deploy_v2(&self) {
        let new = self.path("app.new");
        let mut bytes = std::fs::read(support::exe()).expect("read");
        bytes.extend_from_slice(b"\nv2");
        std::fs::write(&new, bytes).expect("write");
        std::fs::set_permissions(&new, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        std::fs::rename(&new, self.path("app")).expect("rename");
        let link = self.path("current.new");
        std::os::unix::fs::symlink("releases/v2", &link).expect("symlink");
        std::fs::rename(&link, self.path("current")).expect("switch current");
    }

    /// baton running `app demo-app` in `current`.
    fn baton(&self) -> Baton {
        self.baton_with(&[])
    }

    /// The same with more `baton run` options; the app reads faults from
    /// `faults` in its release directory.
    fn baton_with(&self, run_args: &[&str]) -> Baton {
        let b = Baton::builder()
            .run_args(["--listen", "127.0.0.1:0", "--workdir"])
            .run_args([self.path("current")])
            .run_args(run_args.iter().copied())
            .command([
                self.path("app").into_os_string(),
                "demo-app".into(),
                "--faults-file".into(),
                "faults".into(),
            ])
            .start();
        b.wait_for_event("ready", 1);
        b
    }
}

impl Layout {
    /// baton --proxy http in front of `demo-app` in `current` (faults from
    /// `faults` in the release directory), with these options.
    fn behind_proxy(&self, run_args: &[&str]) -> Baton {
        let b = Baton::builder()
            .run_args(["--proxy", "http", "--listen", "127.0.0.1:0", "--workdir"])
            .run_args([self.path("current")])
            .run_args(run_args.iter().copied())
            .app_args(["--listen", "127.0.0.1:{port}", "--faults-file", "faults"])
            .start();
        b.wait_for_event("ready", 1);
        b
    }

    /// Points `current` at `v2` (the same executable, another directory).
    fn switch_to_v2(&self) {
        let link = self.path("current.new");
        std::os::unix::fs::symlink("releases/v2", &link).expect("symlink");
        std::fs::rename(&link, self.path("current")).expect("switch current");
    }
}

/// `baton rollback --json`: exit code and answer.
fn rollback(b: &Baton) -> (Option<i32>, serde_json::Value) {
    let out = b.ctl(&["rollback", "--json"]);
    let json = serde_json::from_str(out.stdout.trim()).unwrap_or(serde_json::Value::Null);
    (out.code, json)
}

/// The serving generation's release, from `status --json`, once its hash
/// is known.
fn serving_release(b: &Baton) -> serde_json::Value {
    let mut found = serde_json::Value::Null;
    support::wait_until("the release's hash is known", LONG, || {
        let status = b.status_json();
        let serving = status["serving"].clone();
        let release = status["generations"]
            .as_array()
            .and_then(|gs| gs.iter().find(|g| g["generation"] == serving))
            .map(|g| g["release"].clone())
            .expect("the serving generation");
        found = status["releases"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["id"] == release))
            .cloned()
            .expect("its release");
        found["hash"].is_string()
    });
    found
}

fn link(path: String) -> PathBuf {
    std::fs::read_link(path).expect("readlink")
}

#[test]
fn rollback_runs_the_previous_release_although_its_file_was_replaced_and_loses_nothing() {
    let layout = Layout::new();
    let b = layout.baton();
    let v1 = serving_release(&b);
    assert_eq!(v1["role"], "current");
    assert!(
        v1["cwd"].as_str().expect("cwd").ends_with("releases/v1"),
        "{v1}"
    );
    layout.deploy_v2();
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}");
    let v2 = serving_release(&b);
    assert!(
        v2["cwd"].as_str().expect("cwd").ends_with("releases/v2"),
        "{v2}"
    );
    assert_ne!(v2["hash"], v1["hash"], "a new executable");

    let load = load(&b);
    let (code, json) = rollback(&b);
    assert_eq!(code, Some(0), "{json}\n{}", b.dump());
    assert_eq!(json["result"], "reloaded", "{json}");
    let pid = json["pid"].as_u64().expect("pid");
    let back = serving_release(&b);
    assert_eq!(back["id"], v1["id"], "release 1 again");
    assert_eq!(back["hash"], v1["hash"]);
    // The very file that ran first (now deleted), in v1's directory.
    let exe = link(format!("/proc/{pid}/exe"));
    assert!(exe.to_string_lossy().ends_with("(deleted)"), "{exe:?}");
    assert!(link(format!("/proc/{pid}/cwd")).ends_with("releases/v1"));
    let (ok, failures, _) = load.finish();
    support::assert_no_failures(ok, &failures);
    // Rolling back again goes forward to v2.
    let (code, json) = rollback(&b);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(serving_release(&b)["id"], v2["id"]);
}

#[test]
fn rollback_without_a_previous_release_exits_2_and_changes_nothing() {
    let b = Baton::serving(&[], &[]);
    let app = b.gen_pid(1);
    let (code, json) = rollback(&b);
    assert_eq!(code, Some(2), "{json}");
    assert_eq!(json["result"], "no_previous", "{json}");
    assert_eq!(get(b.port(), "/", LONG).expect("served").pid, Some(app));
}

#[test]
fn a_previous_release_changed_in_place_or_without_its_directory_is_refused() {
    let layout = Layout::new();
    // A script (a running binary cannot be written to: ETXTBSY), the same
    // file in both releases, which differ by their directory.
    let script = layout.path("app.sh");
    let text = format!("#!/bin/sh\nexec {} demo-app\n", support::exe());
    std::fs::write(&script, &text).expect("write");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--workdir"])
        .run_args([layout.path("current")])
        .command([script.clone().into_os_string()])
        .start();
    b.wait_for_event("ready", 1);
    let link_new = layout.path("current.new");
    std::os::unix::fs::symlink("releases/v2", &link_new).expect("symlink");
    std::fs::rename(&link_new, layout.path("current")).expect("switch");
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}");
    let serving = b.gen_pid(2);

    // Its working directory is gone.
    let v1 = layout.path("releases/v1");
    std::fs::rename(&v1, layout.path("v1.moved")).expect("move away");
    let out = b.ctl(&["rollback"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("working directory"), "{}", out.stderr);
    std::fs::rename(layout.path("v1.moved"), &v1).expect("move back");

    // Written into in place: the same inode, other contents.
    std::fs::write(&script, format!("{text}# patched\n")).expect("write in place");
    let out = b.ctl(&["rollback"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("changed in place"), "{}", out.stderr);
    assert_eq!(get(b.port(), "/", LONG).expect("served").pid, Some(serving));
    assert_eq!(b.status_json()["serving"], 2);
}

#[test]
fn releases_survive_an_upgrade_of_baton() {
    let layout = Layout::new();
    let b = layout.baton();
    let v1 = serving_release(&b);
    layout.deploy_v2();
    assert_eq!(b.reload_json().0, Some(0));
    let out = b.ctl(&["upgrade"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let (code, json) = rollback(&b);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(serving_release(&b)["hash"], v1["hash"]);
}

#[test]
fn a_relative_command_is_found_in_the_working_directory() {
    let layout = Layout::new();
    std::fs::copy(support::exe(), layout.path("releases/v1/app")).expect("copy");
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--workdir"])
        .run_args([layout.path("current")])
        .command(["./app", "demo-app"])
        .start();
    b.wait_for_event("ready", 1);
    let pid = b.gen_pid(1);
    assert!(link(format!("/proc/{pid}/exe")).ends_with("releases/v1/app"));
}

#[test]
fn a_release_that_crashes_during_its_bake_is_reverted_to_the_previous_one() {
    let layout = Layout::new();
    std::fs::write(layout.path("releases/v2/faults"), "--crash-after 2s").expect("faults");
    let b = layout.baton_with(&["--bake", "5s"]);
    let v1 = serving_release(&b);
    let load = load(&b);
    layout.deploy_v2();
    // The reload waits through the bake, and says how it ended.
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(1), "{json}\n{}", b.dump());
    assert_eq!(json["result"], "rolled_back", "{json}");
    assert_eq!(json["reason"]["kind"], "reverted", "{json}");
    assert_eq!(json["reason"]["cause"], "exited", "{json}");
    // The previous release serves again, although `app` is the new file.
    support::wait_until("the previous release serves again", LONG, || {
        b.status_json()["serving"].as_u64() == Some(3)
    });
    let back = serving_release(&b);
    assert_eq!(back["id"], v1["id"], "{back}");
    let pid = b.gen_pid(3);
    assert!(link(format!("/proc/{pid}/cwd")).ends_with("releases/v1"));
    let (ok, failures, _) = load.finish();
    // Only requests in flight in the crashing process fail: at most one per
    // client.
    assert!(
        failures.len() <= 16,
        "{} failed of {}: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(5)]
    );
    eprintln!(
        "bake revert: {ok} requests, {} failed (in flight in the crashing process)",
        failures.len()
    );
    let status = b.status_json();
    assert_eq!(status["reloads_failed"], 1, "{status}");
    assert_eq!(status["reverts"]["exited"], 1, "{status}");
}

#[test]
fn a_healthy_release_passes_its_bake_and_rollback_then_loses_nothing() {
    let layout = Layout::new();
    let b = layout.baton_with(&["--bake", "1s"]);
    let v1 = serving_release(&b);
    layout.deploy_v2();
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}\n{}", b.dump());
    assert_eq!(json["result"], "reloaded", "{json}");
    assert_eq!(
        json["baked_ms"], 1000,
        "the reload says the bake passed: {json}"
    );
    let status = b.status_json();
    assert_eq!(status["reloads_ok"], 1, "{status}");
    assert_eq!(status["generations"].as_array().map(Vec::len), Some(1));
    let load = load(&b);
    let (code, json) = rollback(&b);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(serving_release(&b)["id"], v1["id"]);
    let (ok, failures, _) = load.finish();
    support::assert_no_failures(ok, &failures);
}

#[test]
fn a_canary_answering_500_is_judged_by_its_answers_and_reverted_before_the_bake_ends() {
    let layout = Layout::new();
    std::fs::write(layout.path("releases/v2/faults"), "--status 500").expect("faults");
    let b = layout.behind_proxy(&["--bake", "60s", "--canary", "10"]);
    let old = b.gen_pid(1);
    // A 10 s load that spans the deploy.
    let load = Load::start(b.port(), 16, 1_000_000, Duration::from_secs(10));
    support::wait_until("the load was answered", LONG, || load.has_seen(old));
    layout.switch_to_v2();
    // Decided long before the 60 s bake could end, and the generation
    // that never stopped serves again.
    let (json, status) = b.reload_reverted_for_errors();
    assert_eq!(status["reverts"]["error_rate"], 1, "{status}");
    assert_eq!(get(b.port(), "/", LONG).expect("served").pid, Some(old));
    let (ok, failures, _) = load.finish_when_done();
    let all = ok + failures.len() as u64;
    assert!(
        failures.len() as u64 * 100 <= 3 * all,
        "{} of {all} failed",
        failures.len()
    );
    eprintln!(
        "canary revert: {all} requests over 10 s, {} failed ({:.3} %); {}",
        failures.len(),
        100.0 * failures.len() as f64 / all as f64,
        json["reason"]["why"]
    );
}

#[test]
fn in_proxy_mode_a_release_that_crashes_during_its_bake_is_switched_back_at_once() {
    let layout = Layout::new();
    std::fs::write(layout.path("releases/v2/faults"), "--crash-after 1s").expect("faults");
    let b = layout.behind_proxy(&["--bake", "30s"]);
    let old = b.gen_pid(1);
    layout.switch_to_v2();
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(1), "{json}");
    assert_eq!(json["reason"]["cause"], "exited", "{json}");
    // The old generation was kept warm: no new one was started.
    let status = b.status_json();
    assert_eq!(status["serving"], 1, "{status}");
    assert_eq!(get(b.port(), "/", LONG).expect("served").pid, Some(old));
    assert_eq!(b.count_events("spawn"), 2, "{}", b.dump());
}

#[test]
fn a_canary_that_passes_its_bake_takes_all_traffic_and_the_old_generation_drains() {
    let layout = Layout::new();
    let b = layout.behind_proxy(&["--bake", "1s", "--canary", "50"]);
    let old = b.gen_pid(1);
    layout.switch_to_v2();
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}\n{}", b.dump());
    let new = b.gen_pid(2);
    support::wait_until("the old generation drained and exited", LONG, || {
        support::pid_gone(old)
    });
    for _ in 0..20 {
        assert_eq!(get(b.port(), "/", LONG).expect("served").pid, Some(new));
    }
}

#[test]
fn with_workers_any_worker_that_exits_during_the_bake_reverts() {
    let layout = Layout::new();
    std::fs::write(layout.path("releases/v2/faults"), "--crash-after 1s").expect("faults");
    let b = layout.baton_with(&["--bake", "30s", "--workers", "2"]);
    layout.deploy_v2();
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(1), "{json}\n{}", b.dump());
    assert_eq!(json["reason"]["kind"], "reverted", "{json}");
    support::wait_until("the previous release serves again", LONG, || {
        b.status_json()["serving"].as_u64() == Some(3)
    });
}
