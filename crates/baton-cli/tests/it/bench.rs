//! `baton bench` counts what it should: nothing on a clean run, an outage of
//! the right length when a trigger takes the server down, and each kind of
//! failure as its kind.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::{Baton, LONG, baton, pid_gone, wait_until};

fn bench_json(args: &[&str]) -> serde_json::Value {
    bench_json_exiting(args, 0)
}

/// `baton bench --json ARGS`, which must exit with `code` (1 when nothing
/// answered).
fn bench_json_exiting(args: &[&str], code: i32) -> serde_json::Value {
    let mut all = vec!["bench", "--json"];
    all.extend_from_slice(args);
    let out = baton(&all);
    assert_eq!(out.code, Some(code), "{out:?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn failures(run: &serde_json::Value) -> Vec<(String, u64)> {
    run["summary"]["failures"]
        .as_object()
        .expect("failures")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("count")))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[test]
fn a_clean_run_counts_no_failure_and_reloads_under_baton_lose_nothing() {
    let b = Baton::serving(&[], &["--startup", "100ms"]);
    let url = format!("http://127.0.0.1:{}/", b.port());
    let control = b.control.to_str().expect("utf-8").to_owned();
    let run = bench_json(&[
        "--url",
        &url,
        "-c",
        "8",
        "-d",
        "3s",
        "--reload-at",
        "1s,2s",
        "--control",
        &control,
    ]);
    let s = &run["summary"];
    assert!(s["requests"].as_u64().expect("requests") > 100, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    let windows = s["windows"].as_array().expect("windows");
    assert_eq!(windows.len(), 2);
    for w in windows {
        assert_eq!(w["trigger_ok"], true, "{w}");
        assert_eq!(w["unavailable_ms"], 0.0);
        // Each reload hands over to a new generation after its startup.
        let first_new = w["first_new_ms"]
            .as_f64()
            .expect("a new generation answered");
        assert!(first_new >= 100.0, "{w}");
    }
    assert_eq!(b.count_events("ready"), 3);
}

#[test]
fn a_server_down_for_a_second_shows_a_second_of_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = support::free_port();
    let pidfile = dir.path().join("pid");
    let exe = support::exe();
    let start = format!(
        "{exe} demo-app --listen 127.0.0.1:{port} >/dev/null 2>&1 & echo $! > {}",
        pidfile.display()
    );
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&start)
        .status()
        .expect("sh");
    assert!(status.success());
    let first: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    wait_until("the server answers", LONG, || {
        support::get(port, "/", LONG).is_ok()
    });
    // The trigger stops the server and starts it again one second later
    // (the scenario under test: a cold restart with a slow start).
    let trigger = format!("kill $(cat {pf}); sleep 1; {start}", pf = pidfile.display());
    let url = format!("http://127.0.0.1:{port}/");
    let run = bench_json(&[
        "--url",
        &url,
        "-c",
        "4",
        "-d",
        "4s",
        "--new-conn",
        "--reload-at",
        "1s",
        "--trigger",
        &trigger,
    ]);
    let second: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    support::send(second, rustix::process::Signal::TERM);
    wait_until("the first server is gone", LONG, || pid_gone(first));

    let s = &run["summary"];
    let w = &s["windows"][0];
    assert_eq!(w["trigger_ok"], true, "{w}");
    assert!(s["failed"].as_u64().expect("failed") > 0, "{s}");
    // Refused while nothing listens; connections still queued when the old
    // server closed its listener are reset.
    let kinds = failures(&run);
    assert!(
        kinds.iter().all(|(k, _)| k == "refused" || k == "reset"),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|(k, n)| k == "refused" && *n > 0),
        "{kinds:?}"
    );
    let unavailable = w["unavailable_ms"].as_f64().expect("span");
    assert!(
        (900.0..3000.0).contains(&unavailable),
        "about a second down: {unavailable} ms"
    );
    let first_new = w["first_new_ms"].as_f64().expect("the new server answered");
    assert!(first_new >= unavailable, "{w}");
    wait_until("the second server is gone", LONG, || pid_gone(second));
}

/// A misbehaving server on a thread: `handle` gets each accepted connection.
struct BadServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BadServer {
    fn start(
        handle: impl Fn(std::net::TcpStream, &mut Vec<std::net::TcpStream>) + Send + 'static,
    ) -> BadServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    handle(stream, &mut held);
                }
            }
        });
        BadServer {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for BadServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_request(stream: &mut std::net::TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 4096];
    let _ = stream.read(&mut buf);
}

fn only_kind(url: &str, extra: &[&str], kind: &str) {
    let mut args = vec!["--url", url, "-c", "2", "-d", "500ms"];
    args.extend_from_slice(extra);
    // Every request fails: baton bench says nothing answered (exit 1).
    let run = bench_json_exiting(&args, 1);
    let kinds = failures(&run);
    assert!(!kinds.is_empty(), "{run}");
    assert!(
        kinds.iter().all(|(k, _)| k == kind),
        "expected only {kind}: {kinds:?}"
    );
    assert_eq!(run["summary"]["ok"], 0);
}

#[test]
fn a_refused_connection_is_counted_as_refused() {
    let port = support::free_port();
    only_kind(&format!("http://127.0.0.1:{port}/"), &[], "refused");
}

#[test]
fn a_reset_is_counted_as_reset() {
    let server = BadServer::start(|mut s, _| {
        read_request(&mut s);
        // SO_LINGER 0: close with RST.
        rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO)).expect("linger");
    });
    only_kind(&server.url(), &[], "reset");
}

#[test]
fn a_connection_closed_without_an_answer_is_counted_as_closed() {
    let server = BadServer::start(|mut s, _| {
        read_request(&mut s);
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    only_kind(&server.url(), &[], "closed");
}

#[test]
fn a_non_2xx_answer_is_counted_as_status() {
    let server = BadServer::start(|mut s, _| {
        read_request(&mut s);
        let _ = s.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
    });
    only_kind(&server.url(), &[], "status");
}

#[test]
fn no_answer_in_time_is_counted_as_timeout() {
    let server = BadServer::start(|s, held| held.push(s));
    only_kind(&server.url(), &["--timeout", "100ms"], "timeout");
}

#[test]
fn bad_bench_input_is_a_usage_error() {
    let out = baton(&["bench", "--url", "https://example.com/"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("expected http://HOST:PORT/PATH"),
        "{}",
        out.stderr
    );
    let out = baton(&["bench", "--url", "notaurl"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    let out = baton(&["bench", "--url", "http://127.0.0.1:1/", "--reload-at", "1s"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("need a trigger"), "{}", out.stderr);
}

#[test]
fn a_run_where_nothing_answered_fails() {
    // A port nothing listens on (bound, then released).
    let port = support::free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let out = baton(&["bench", "--url", &url, "-c", "2", "-d", "300ms"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("nothing answered"), "{}", out.stderr);
}

#[test]
fn without_a_url_it_loads_the_baton_it_is_pointed_at() {
    let b = Baton::serving(&[], &[]);
    let control = b.control.to_str().expect("utf-8").to_owned();
    let run = bench_json(&[
        "--control",
        &control,
        "-c",
        "2",
        "-d",
        "500ms",
        "--reload-at",
        "200ms",
    ]);
    assert_eq!(
        run["setup"]["url"],
        format!("http://127.0.0.1:{}/", b.port())
    );
    assert!(run["summary"]["ok"].as_u64() > Some(0), "{run}");
    assert_eq!(run["summary"]["failed"], 0, "{run}");
}

#[test]
fn a_plot_shows_throughput_latency_and_the_reloads() {
    let b = Baton::serving(&[], &[]);
    let url = format!("http://127.0.0.1:{}/", b.port());
    let control = b.control.to_str().expect("utf-8").to_owned();
    let plot = b.dir.path().join("run.svg");
    let out = baton(&[
        "bench",
        "--url",
        &url,
        "-c",
        "2",
        "-d",
        "1s",
        "--reload-at",
        "500ms",
        "--control",
        &control,
        "--plot",
        plot.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("requests"),
        "the table still prints: {out:?}"
    );
    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    assert!(
        svg.contains("ok requests/s") && svg.contains("p99 latency"),
        "both panels"
    );
    assert!(svg.contains("reload 1"), "the reload is marked");
    assert_eq!(
        svg.matches("<polyline").count(),
        2,
        "throughput and latency lines"
    );
}

#[test]
fn a_reload_that_fails_makes_bench_exit_1_and_say_which() {
    // The next generation exits before it is ready: the reload rolls back.
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = dir.path().join("faults");
    let b = Baton::serving(&[], &["--faults-file", faults.to_str().expect("utf-8")]);
    std::fs::write(&faults, "--exit-before-ready 3").expect("faults");
    let control = b.control.to_str().expect("utf-8").to_owned();
    let url = format!("http://127.0.0.1:{}/", b.port());
    let out = support::run(
        &[
            "bench".into(),
            "--url".into(),
            url.into(),
            "-c".into(),
            "2".into(),
            "-d".into(),
            "800ms".into(),
            "--reload-at".into(),
            "200ms".into(),
            "--control".into(),
            control.into(),
        ],
        LONG,
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("1 of 1 reloads failed") && out.stderr.contains("rolled back"),
        "{}",
        out.stderr
    );
}
