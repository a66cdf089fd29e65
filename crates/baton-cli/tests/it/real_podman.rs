//! baton as a container's PID 1 under a real podman: an image imported
//! offline from the cached Debian rootfs (see `real_systemd.rs`), this
//! build's baton bound in read-only, no network but the container's own
//! loopback (`--network none`), `runc` with cgroupfs and the descriptor
//! limits this machine allows (a `containers.conf` of the test's own). The
//! load runs in the container's network namespace. Covered: HUP reloads
//! under load, no zombie, and `podman stop` with `--shutdown-delay` and a
//! request in flight. Needs root, podman and
//! runc; without them it skips and says so (`BATON_REQUIRE_PEERS=1` makes
//! that a failure). The container is removed at the end, whatever
//! happened.

use std::process::{Command, Stdio};

use crate::support;

use support::{LONG, wait_until};

const CONF: &str = "[containers]\n\
default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
[engine]\n\
runtime = \"runc\"\n\
cgroup_manager = \"cgroupfs\"\n\
events_logger = \"file\"\n";

struct Podman {
    conf: tempfile::TempDir,
    name: String,
}

impl Podman {
    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.conf.path().join("containers.conf"));
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("podman");
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The container's init, as the host sees it.
    fn pid(&self) -> String {
        self.run(&["inspect", "-f", "{{.State.Pid}}", &self.name])
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .args(["rm", "-f", "-t", "0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // With cgroupfs, podman leaves its parent cgroups behind: the empty
        // ones go.
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            remove_empty(&hierarchy.path().join("libpod_parent"));
        }
    }
}

/// Removes an empty cgroup directory and its empty children.
fn remove_empty(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[test]
fn as_pid_1_under_podman_baton_reloads_reaps_and_stops_cleanly() {
    if !support::root_for("the podman test") {
        return;
    }
    if !support::peer("podman", "podman")
        || !support::peer("runc", "runc")
        || !support::peer("mmdebstrap", "mmdebstrap")
    {
        return;
    }
    let conf = tempfile::tempdir().expect("tempdir");
    std::fs::write(conf.path().join("containers.conf"), CONF).expect("conf");
    let p = Podman {
        conf,
        name: format!("baton-ci-{}", std::process::id()),
    };
    // The image, from the cached rootfs (built if missing).
    let root = crate::real_systemd::rootfs();
    let image = "localhost/baton-ci:test";
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    let imported = p
        .cmd()
        .args(["import", "-q", "-", image])
        .stdin(tar.stdout.take().expect("tar's output"))
        .output()
        .expect("podman import");
    assert!(tar.wait().is_ok_and(|s| s.success()), "tar of the rootfs");
    assert!(imported.status.success(), "{imported:?}");
    let baton = support::exe();
    p.run(&[
        "run",
        "-d",
        "--name",
        &p.name,
        "--network",
        "none",
        "-v",
        &format!("{baton}:/usr/local/bin/baton:ro"),
        image,
        "/usr/local/bin/baton",
        "run",
        "--listen",
        "127.0.0.1:8080",
        "--metrics",
        "127.0.0.1:9100",
        "--shutdown-delay",
        "2s",
        "--",
        "/usr/local/bin/baton",
        "demo-app",
        "--startup",
        "300ms",
    ]);
    let pid = p.pid();
    wait_until("baton serves in the container", LONG, || {
        Command::new("nsenter")
            .args(["-t", &pid, "-n", "curl", "-sf", "http://127.0.0.1:8080/"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    // Reloads by signal, under load: nothing lost.
    let conf_path = p.conf.path().join("containers.conf");
    let summary = crate::real_systemd::bench_in(
        &pid,
        "1s,3s",
        &format!(
            "CONTAINERS_CONF={} podman kill -s HUP {}",
            conf_path.display(),
            p.name
        ),
    );
    assert_eq!(summary["failed"], 0, "{summary}");
    // PID 1 reaps: no zombie in the container.
    let stats = p.run(&["exec", &p.name, "sh", "-c", "cat /proc/[0-9]*/stat"]);
    let zombies: Vec<&str> = stats
        .lines()
        .filter(|l| {
            l.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    // podman stop with a 3 s request in flight: answered, exit 0.
    let slow = Command::new("nsenter")
        .args(["-t", &pid, "-n", "curl", "-s", "-m", "20"])
        .arg("http://127.0.0.1:8080/slow?ms=3000")
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    wait_until("the slow request arrived", LONG, || {
        let logs = p.cmd().args(["logs", &p.name]).output();
        logs.is_ok_and(|o| {
            String::from_utf8_lossy(&o.stderr).contains("started a 3000 ms request")
                || String::from_utf8_lossy(&o.stdout).contains("started a 3000 ms request")
        })
    });
    // `podman stop` with `--shutdown-delay`: not ready at once (`/readyz`
    // 503), still serving, then the stop proper.
    let stop = p
        .cmd()
        .args(["stop", "-t", "30", &p.name])
        .stdout(Stdio::null())
        .spawn()
        .expect("podman stop");
    let code = |url: &str| {
        Command::new("nsenter")
            .args([
                "-t",
                &pid,
                "-n",
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                url,
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    wait_until("/readyz says 503", LONG, || {
        code("http://127.0.0.1:9100/readyz") == "503"
    });
    assert_eq!(
        code("http://127.0.0.1:8080/"),
        "200",
        "still serving during the delay"
    );
    assert!(
        stop.wait_with_output().is_ok_and(|o| o.status.success()),
        "podman stop"
    );
    let answer = slow.wait_with_output().expect("curl");
    let answer = String::from_utf8_lossy(&answer.stdout);
    assert!(answer.starts_with("slept 3000 ms"), "answered: {answer:?}");
    assert_eq!(
        p.run(&["inspect", "-f", "{{.State.ExitCode}}", &p.name]),
        "0"
    );
    eprintln!(
        "podman: 2 HUP reloads under load, {} requests, 0 failed; no zombie; podman stop: /readyz 503 while / still served (--shutdown-delay), a 3 s request answered, baton exited 0",
        summary["requests"]
    );
}
