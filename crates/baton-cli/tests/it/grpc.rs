//! gRPC under baton, with a real grpc-go service and client
//! (`examples/grpc-go`, built offline from Debian's packaged sources): 8
//! unary clients on long-lived HTTP/2 connections and 4 open server
//! streams through 3 reloads, in sockets, tcp and http modes; and a gRPC
//! release judged by its `grpc-status` during its bake.

use crate::support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use support::{Baton, LONG};

const CLIENTS: usize = 8;

/// The built `grpc-hello` and `grpc-load`, or `None` without Go.
fn binaries() -> Option<(PathBuf, PathBuf)> {
    let out = support::go_example("grpc-go")?;
    Some((out.join("grpc-hello"), out.join("grpc-load")))
}

/// A running `grpc-load`: its report goes to `out`; `seen` logs which
/// client met which process first, as it happens.
struct GrpcLoad {
    child: Child,
    out: PathBuf,
    seen: PathBuf,
}

impl GrpcLoad {
    fn start(load: &Path, port: u16, streams: usize, dir: &Path) -> GrpcLoad {
        let (out, seen) = (dir.join("load.json"), dir.join("seen.log"));
        let child = Command::new(load)
            .args(["-addr", &format!("127.0.0.1:{port}")])
            .args(["-conns", &CLIENTS.to_string()])
            .args(["-streams", &streams.to_string()])
            .args(["-duration", "120s", "-wait-ready", "0"])
            .arg("-seen")
            .arg(&seen)
            .stdout(std::fs::File::create(&out).expect("report file"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("grpc-load");
        GrpcLoad { child, out, seen }
    }

    /// For each client, when it first met `pid` (Unix ms).
    fn met(&self, pid: u32) -> HashMap<usize, u64> {
        let text = std::fs::read_to_string(&self.seen).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let client = w.next()?.parse().ok()?;
                let p: u32 = w.next()?.parse().ok()?;
                let ms = w.next()?.parse().ok()?;
                (p == pid).then_some((client, ms))
            })
            .collect()
    }

    /// Waits until every client was answered by `pid`.
    fn wait_all_met(&self, pid: u32) -> HashMap<usize, u64> {
        support::wait_until(
            &format!("all {CLIENTS} clients meet pid {pid}"),
            LONG,
            || self.met(pid).len() == CLIENTS,
        );
        self.met(pid)
    }

    /// Ends the load; its report.
    fn finish(mut self) -> serde_json::Value {
        support::send(self.child.id(), rustix::process::Signal::TERM);
        let status = self.child.wait().expect("grpc-load");
        assert!(status.success(), "grpc-load: {status}");
        let text = std::fs::read_to_string(&self.out).expect("report");
        serde_json::from_str(text.trim()).expect("grpc-load JSON")
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 3 reloads under the load; every RPC and stream must succeed (a stream
/// may end with UNAVAILABLE, as its server stops) and every client must
/// meet every generation. Returns, per reload, the slowest client's
/// delay from the reload's answer to its first call to the new generation.
fn three_reloads(b: &Baton, load: &Path) -> Vec<i64> {
    let dir = tempfile::tempdir().expect("dir");
    let load = GrpcLoad::start(load, b.port(), 4, dir.path());
    load.wait_all_met(b.gen_pid(1));
    let mut delays = Vec::new();
    for generation in 2..=4 {
        let (code, json) = b.reload_json();
        assert_eq!(code, Some(0), "{json}\n{}", b.dump());
        let cut_over = now_ms() as i64;
        let met = load.wait_all_met(b.gen_pid(generation));
        delays.push(
            met.values()
                .map(|&ms| ms as i64 - cut_over)
                .max()
                .unwrap_or(0),
        );
    }
    let report = load.finish();
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["streams_failed"], serde_json::json!({}), "{report}");
    let ended: HashSet<&str> = report["streams_ended"]
        .as_object()
        .expect("streams_ended")
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        ended.is_subset(&HashSet::from(["Unavailable", "OK"])),
        "{report}"
    );
    eprintln!(
        "{} RPCs, 0 failed; streams opened {}, ended {}; slowest client to each new generation: {delays:?} ms",
        report["rpcs"], report["streams_opened"], report["streams_ended"]
    );
    delays
}

#[test]
fn grpc_in_sockets_mode_reloads_lose_no_call_and_reach_every_generation() {
    let Some((hello, load)) = binaries() else {
        return;
    };
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .command([hello.as_os_str()])
        .start();
    b.wait_for_event("ready", 1);
    three_reloads(&b, &load);
}

#[test]
fn grpc_in_tcp_mode_the_old_generation_is_stopped_at_the_cut_over_and_clients_move() {
    let Some((hello, load)) = binaries() else {
        return;
    };
    // A drain wait longer than the test: only the HTTP/2 rule can move the
    // clients.
    let b = Baton::builder()
        .run_args(["--proxy", "tcp", "--listen", "127.0.0.1:0"])
        .run_args(["--stop-timeout", "2m", "--drain-wait", "1m"])
        .command([hello.as_os_str()])
        .start();
    b.wait_for_event("ready", 1);
    three_reloads(&b, &load);
    for generation in 1..=3 {
        let line = b.stop_signal_line(generation);
        assert!(
            support::field(&line, "drained_after_ms").is_some(),
            "its HTTP/2 connections did not hold it: {line}"
        );
    }
}

#[test]
fn grpc_in_http_mode_every_call_goes_to_the_current_generation() {
    let Some((hello, load)) = binaries() else {
        return;
    };
    let b = Baton::builder()
        .run_args(["--proxy", "http", "--listen", "127.0.0.1:0"])
        .run_args(["--upstream-protocol", "h2c", "--drain-wait", "2s"])
        .command([hello.as_os_str()])
        .start();
    b.wait_for_event("ready", 1);
    three_reloads(&b, &load);
}

#[test]
fn grpc_a_release_that_answers_unavailable_is_judged_by_grpc_status_and_reverted() {
    let Some((hello, load)) = binaries() else {
        return;
    };
    let flags = tempfile::NamedTempFile::new().expect("flags");
    // The release's flags come from a file read at each start.
    let script = format!("exec {} $(cat {})", hello.display(), flags.path().display());
    let b = Baton::builder()
        .run_args(["--proxy", "http", "--listen", "127.0.0.1:0"])
        .run_args(["--upstream-protocol", "h2c", "--bake", "60s"])
        .run_args(["--max-error-rate", "5"])
        .command(["/bin/sh", "-c", &script])
        .start();
    b.wait_for_event("ready", 1);
    let dir = tempfile::tempdir().expect("dir");
    let running = GrpcLoad::start(&load, b.port(), 0, dir.path());
    running.wait_all_met(b.gen_pid(1));
    std::fs::write(flags.path(), "-fail unavailable").expect("flags");
    let (json, _) = b.reload_reverted_for_errors();
    let report = running.finish();
    // Only what generation 2 answered during its short probation failed.
    assert!(
        report["rpcs"].as_u64() > report["failed"].as_u64(),
        "{report}"
    );
    assert!(
        report["errors"]
            .as_object()
            .is_some_and(|e| e.keys().all(|k| k == "Unavailable")),
        "{report}"
    );
    eprintln!(
        "gRPC revert: {} of {} calls failed before the verdict; {}",
        report["failed"], report["rpcs"], json["reason"]["why"]
    );
}

/// The raw answer to `head` sent on a new connection to `port`.
fn raw_exchange(port: u16, head: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(LONG)).expect("timeout");
    c.write_all(head.as_bytes()).expect("write");
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn grpc_h2c_mode_refuses_hosts_that_are_not_a_host_before_the_app_sees_them() {
    let Some((hello, _)) = binaries() else { return };
    let b = Baton::builder()
        .run_args(["--proxy", "http", "--listen", "127.0.0.1:0"])
        .run_args(["--upstream-protocol", "h2c"])
        .command([hello.as_os_str()])
        .start();
    b.wait_for_event("ready", 1);
    // HTTP/1 clients go to the h2c app through hyper: a Host with a path
    // in it must not become the request's path.
    for (head, status) in [
        (
            "GET /public HTTP/1.1\r\nHost: x/admin#\r\nConnection: close\r\n\r\n",
            "400",
        ),
        (
            "GET /public HTTP/1.1\r\nHost: x/admin?\r\nConnection: close\r\n\r\n",
            "400",
        ),
        (
            "GET /public HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
            "400",
        ),
        (
            "GET /public HTTP/1.1\r\nHost: u:p@x\r\nConnection: close\r\n\r\n",
            "400",
        ),
        (
            "GET /public HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
            "400",
        ),
        ("GET /public HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (
            "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\nConnection: close\r\n\r\n",
            "405",
        ),
    ] {
        let answer = raw_exchange(b.port(), head);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{head:?}: {answer}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("x-baton-error: 1"),
            "baton's own: {answer}"
        );
    }
}
