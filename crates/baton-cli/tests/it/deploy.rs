//! Interpreted apps deployed the Capistrano way: `releases/v1`,
//! `releases/v2`, a `current` symlink switched at each deploy, and
//! `--workdir current` with a command relative to it. A release is the
//! directory `current` named when it started, held open: a rollback, or a
//! revert after a crash during the bake, serves the previous release's
//! code, whether the command is a `#!` script, `python3 app.py`, a Node app
//! or a shell wrapper.

use std::path::{Path, PathBuf};

use crate::support;

use support::{Baton, LONG, get, wait_until};

/// An app in Python that takes baton's socket (fd 3), says READY=1, and
/// answers every request with its release's name, read from a module
/// beside it (so the imports come from its release too); at SIGTERM it
/// finishes the request it has and exits. With a file `crash` beside it,
/// it exits 300 ms after it is ready.
const PYTHON_APP: &str = r#"#!/usr/bin/python3
import os, signal, socket, sys, threading
import version

here = os.path.dirname(os.path.abspath(__file__))
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
listener = socket.socket(fileno=3)
listener.settimeout(0.1)
addr = os.environ.get("NOTIFY_SOCKET", "")
if addr:
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", addr)
if os.path.exists(os.path.join(here, "crash")):
    threading.Timer(0.3, lambda: os._exit(3)).start()
while not stopping:
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        continue
    conn.settimeout(5)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(65536)
        if not chunk:
            break
        head += chunk
    body = version.NAME.encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    conn.close()
"#;

/// The same in Node (`listen({fd: 3})`); READY=1 through `systemd-notify`.
const NODE_APP: &str = r#"const http = require("http");
const fs = require("fs");
const path = require("path");
const { execFileSync } = require("child_process");
const name = require("./version.json").name;
const server = http.createServer((req, res) => {
  res.setHeader("Connection", "close");
  res.end(name);
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
server.listen({ fd: 3 }, () => {
  execFileSync("systemd-notify", ["--ready", "--pid=" + process.pid]);
  if (fs.existsSync(path.join(__dirname, "crash"))) setTimeout(() => process.exit(3), 300);
});
"#;

/// A `current -> releases/v1` layout with an app in each release.
struct Deploy {
    dir: tempfile::TempDir,
}

impl Deploy {
    fn new() -> Deploy {
        let dir = tempfile::tempdir().expect("tempdir");
        for v in ["v1", "v2"] {
            let r = dir.path().join("releases").join(v);
            std::fs::create_dir_all(&r).expect("mkdir");
            write(&r.join("app.py"), PYTHON_APP, 0o755);
            write(&r.join("version.py"), &format!("NAME = \"{v}\"\n"), 0o644);
            write(&r.join("app.js"), NODE_APP, 0o644);
            write(
                &r.join("version.json"),
                &format!("{{\"name\": \"{v}\"}}\n"),
                0o644,
            );
            write(
                &r.join("start.sh"),
                "#!/bin/sh\n# A wrapper, as `bundle exec` and friends are.\nexec python3 app.py\n",
                0o755,
            );
        }
        std::os::unix::fs::symlink("releases/v1", dir.path().join("current")).expect("symlink");
        Deploy { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Points `current` at `v2`, as deploy tools do (a new link renamed
    /// over the old one).
    fn switch_to_v2(&self) {
        let link = self.path("current.new");
        std::os::unix::fs::symlink("releases/v2", &link).expect("symlink");
        std::fs::rename(&link, self.path("current")).expect("switch current");
    }

    /// baton running `command` in `current`, with these options.
    fn baton(&self, command: &[&str], run_args: &[&str]) -> Baton {
        let b = Baton::builder()
            .run_args(["--listen", "127.0.0.1:0", "--workdir"])
            .run_args([self.path("current")])
            .run_args(run_args.iter().copied())
            .command(command.iter().copied())
            .start();
        b.wait_for_event("ready", 1);
        b
    }
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .expect("chmod");
}

/// Which release answers, once a single generation is left (the one it
/// replaced finishes what it took before it exits).
fn answer(b: &Baton) -> String {
    wait_until("one generation is left", LONG, || {
        b.status_json()["generations"]
            .as_array()
            .is_some_and(|g| g.len() == 1)
    });
    match get(b.port(), "/", LONG) {
        Ok(r) => r.body,
        Err(e) => format!("no answer: {e}"),
    }
}

/// Deploys v2, then rolls back: each step must serve its release's code,
/// and `status` must show the resolved directories.
fn rolls_back(command: &[&str]) {
    let d = Deploy::new();
    let b = d.baton(command, &[]);
    assert_eq!(answer(&b), "v1", "{}", b.dump());
    d.switch_to_v2();
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}\n{}", b.dump());
    assert_eq!(answer(&b), "v2");
    let out = b.ctl(&["rollback", "--json"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, b.dump());
    assert_eq!(answer(&b), "v1", "the previous release's code serves");
    let status = b.status_json();
    let releases = status["releases"].as_array().expect("releases").clone();
    let current = releases
        .iter()
        .find(|r| r["role"] == "current")
        .expect("a current release");
    let v1 = std::fs::canonicalize(d.path("releases/v1")).expect("v1");
    assert_eq!(current["cwd"], v1.to_string_lossy().as_ref(), "{status}");
    assert!(
        !current["program"]
            .as_str()
            .unwrap_or_default()
            .contains("current"),
        "shown resolved: {status}"
    );
}

/// Deploys a v2 that crashes during its bake: the revert serves v1's code.
fn reverts_a_crash_during_the_bake(command: &[&str]) {
    let d = Deploy::new();
    write(&d.path("releases/v2/crash"), "", 0o644);
    let b = d.baton(command, &["--bake", "3s"]);
    assert_eq!(answer(&b), "v1");
    d.switch_to_v2();
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(1), "{json}\n{}", b.dump());
    assert_eq!(json["reason"]["kind"], "reverted", "{json}");
    wait_until("a generation serves again", LONG, || {
        b.status_json()["serving"].as_u64().is_some_and(|g| g >= 3)
    });
    assert_eq!(answer(&b), "v1", "{}", b.dump());
    let status = b.status_json();
    assert!(
        status["releases"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["role"] == "reverted")),
        "{status}"
    );
}

#[test]
fn a_hashbang_script_rolls_back_to_its_own_code() {
    rolls_back(&["./app.py"]);
}

#[test]
fn an_interpreter_with_a_script_argument_rolls_back_to_its_own_code() {
    rolls_back(&["python3", "app.py"]);
}

#[test]
fn a_node_app_rolls_back_to_its_own_code() {
    if !support::peer("node", "nodejs") {
        return;
    }
    rolls_back(&["node", "app.js"]);
}

#[test]
fn a_shell_wrapper_rolls_back_to_its_own_code() {
    rolls_back(&["./start.sh"]);
}

#[test]
fn a_hashbang_script_that_crashes_during_its_bake_is_reverted_to_its_own_code() {
    reverts_a_crash_during_the_bake(&["./app.py"]);
}

#[test]
fn a_node_app_that_crashes_during_its_bake_is_reverted_to_its_own_code() {
    if !support::peer("node", "nodejs") {
        return;
    }
    reverts_a_crash_during_the_bake(&["node", "app.js"]);
}

#[test]
fn a_script_replaced_in_its_release_directory_is_not_rolled_back_to() {
    let d = Deploy::new();
    let b = d.baton(&["./app.py"], &[]);
    d.switch_to_v2();
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}");
    // v1's script renamed over by another file: its path no longer names
    // what ran, and the kernel would start the new one by that path.
    let new = d.path("releases/v1/app.py.new");
    write(
        &new,
        &PYTHON_APP.replace("version.NAME", "\"tampered\""),
        0o755,
    );
    std::fs::rename(&new, d.path("releases/v1/app.py")).expect("rename over");
    let out = b.ctl(&["rollback"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("another file now"), "{}", out.stderr);
    assert_eq!(answer(&b), "v2", "nothing changed");
}
