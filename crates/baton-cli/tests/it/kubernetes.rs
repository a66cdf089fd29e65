//! Kubernetes and load balancers: `/healthz` and `/readyz` on the admin
//! endpoint, `--shutdown-delay`, `--metrics :PORT`, and the manifests in
//! examples/kubernetes checked against the real binary.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::support;

use support::{Baton, LONG, Load, get, wait_until};

/// `GET path` on the admin endpoint at `port`: the status.
fn probe(port: u16, path: &str) -> u16 {
    get(port, path, LONG)
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .status
}

/// baton with `--metrics 127.0.0.1:PORT` and these options; its admin port.
fn with_admin(run_args: &[&str], app_args: &[&str]) -> (Baton, u16) {
    let admin = support::free_port();
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--metrics"])
        .run_args([format!("127.0.0.1:{admin}")])
        .run_args(run_args.iter().copied())
        .app_args(app_args.iter().copied())
        .start();
    (b, admin)
}

#[test]
fn healthz_is_alive_while_readyz_waits_for_a_serving_generation() {
    // A first start that takes long (here: forever, within a minute).
    let (b, admin) = with_admin(&["--ready-timeout", "1m"], &["--never-ready"]);
    b.wait_for_event("spawn", 1);
    wait_until("the admin endpoint answers", LONG, || {
        get(admin, "/healthz", LONG).is_ok_and(|r| r.status == 200)
    });
    let reply = get(admin, "/readyz", LONG).expect("readyz");
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        reply.body.contains("no generation serves"),
        "{}",
        reply.body
    );
    assert_eq!(b.status_json()["ready"], false);
    assert_eq!(probe(admin, "/metrics"), 200);
    assert_eq!(probe(admin, "/nothing"), 404);
}

#[test]
fn readyz_stays_ready_through_a_reload() {
    let (b, admin) = with_admin(&[], &["--startup", "1s"]);
    b.wait_for_event("ready", 1);
    wait_until("/readyz says ready", LONG, || {
        probe(admin, "/readyz") == 200
    });
    assert_eq!(b.status_json()["ready"], true);
    let reload = std::thread::spawn({
        let control = b.control.clone();
        move || support::run(&["reload".into(), "--control".into(), control.into()], LONG)
    });
    // The new generation takes a second to start: both probes answer 200
    // all along.
    let mut probes = 0;
    while !reload.is_finished() {
        assert_eq!(probe(admin, "/readyz"), 200, "during the reload");
        assert_eq!(probe(admin, "/healthz"), 200, "during the reload");
        probes += 1;
    }
    assert_eq!(reload.join().expect("reload").code, Some(0));
    assert!(probes > 0);
    eprintln!("{probes} probe pairs answered 200 during a reload");
}

#[test]
fn a_crash_backoff_keeps_healthz_up_and_readyz_down() {
    let (b, admin) = with_admin(&["--restart-delay", "5s"], &[]);
    b.wait_for_event("ready", 1);
    let app = b.gen_pid(1);
    support::send(app, Signal::KILL);
    wait_until("/readyz says no generation serves", LONG, || {
        get(admin, "/readyz", LONG)
            .is_ok_and(|r| r.status == 503 && r.body.contains("no generation serves"))
    });
    assert_eq!(probe(admin, "/healthz"), 200);
}

#[test]
fn a_shutdown_delay_keeps_serving_while_not_ready_then_stops_cleanly() {
    let (mut b, admin) = with_admin(&["--shutdown-delay", "3s"], &[]);
    b.wait_for_event("ready", 1);
    let app = b.gen_pid(1);
    let load = Load::start(b.port(), 16, 1_000_000, Duration::from_secs(60));
    wait_until("the load was answered", LONG, || load.has_seen(app));
    let sent = Instant::now();
    b.signal(Signal::TERM);
    wait_until("/readyz turns 503", LONG, || probe(admin, "/readyz") == 503);
    let unready_after = sent.elapsed();
    let at_term = load.ok.load(Relaxed);
    // Still serving, not ready: until a second of the delay is left.
    let mut status = serde_json::Value::Null;
    wait_until("the delay is nearly over", LONG, || {
        status = b.status_json();
        status["shutdown_in_ms"]
            .as_u64()
            .is_some_and(|ms| ms < 1000)
    });
    assert_eq!(status["ready"], false, "{status}");
    assert_eq!(status["not_ready"], "shutting down", "{status}");
    let (ok, failures, _) = load.finish();
    support::assert_no_failures(ok, &failures);
    assert!(ok > at_term, "requests were served during the delay");
    let exit = b.wait_exit(LONG);
    assert_eq!(exit.code(), Some(0), "{}", b.dump());
    assert!(support::pid_gone(app));
    eprintln!(
        "shutdown delay: /readyz 503 seen {} ms after SIGTERM; {} requests during the delay, 0 failed",
        unready_after.as_millis(),
        ok - at_term
    );
}

#[test]
fn during_the_delay_reloads_are_refused_and_a_second_signal_stops_at_once() {
    let (mut b, admin) = with_admin(&["--shutdown-delay", "10m"], &[]);
    b.wait_for_event("ready", 1);
    b.signal(Signal::TERM);
    wait_until("/readyz turns 503", LONG, || probe(admin, "/readyz") == 503);
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(1), "{json}");
    assert_eq!(json["reason"]["kind"], "stopping", "{json}");
    // Not ten minutes: the second SIGTERM skips the delay.
    b.signal(Signal::TERM);
    let exit = b.wait_exit(LONG);
    assert_eq!(exit.code(), Some(0), "{}", b.dump());
}

#[test]
fn in_proxy_mode_keep_alive_clients_are_told_to_go_during_the_delay() {
    let admin = support::free_port();
    let mut b = Baton::builder()
        .run_args(["--proxy", "http", "--listen", "127.0.0.1:0", "--metrics"])
        .run_args([format!("127.0.0.1:{admin}")])
        .run_args(["--shutdown-delay", "10m"])
        .app_args(["--listen", "127.0.0.1:{port}"])
        .start();
    b.wait_for_event("ready", 1);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    conn.set_read_timeout(Some(LONG)).expect("timeout");
    let ask = |conn: &mut std::net::TcpStream| {
        conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("write");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            conn.read_exact(&mut byte).expect("read");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("content-length");
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).expect("body");
        head
    };
    assert!(!ask(&mut conn).contains("connection: close"));
    b.signal(Signal::TERM);
    wait_until("/readyz turns 503", LONG, || probe(admin, "/readyz") == 503);
    let head = ask(&mut conn);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    b.signal(Signal::TERM);
    assert_eq!(b.wait_exit(LONG).code(), Some(0), "{}", b.dump());
}

#[test]
fn metrics_takes_a_port_alone_for_every_interface() {
    let admin = support::free_port();
    let b = Baton::serving(&["--metrics", &format!(":{admin}")], &[]);
    wait_until("/readyz on 127.0.0.1", LONG, || {
        get(admin, "/readyz", LONG).is_ok_and(|r| r.status == 200)
    });
    let out = support::baton(&["run", "--listen", ":0", "--metrics", "9100", "--", "true"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("IP:PORT or :PORT"), "{}", out.stderr);
    drop(b);
}

#[test]
fn a_configmap_update_reloads_the_app_in_the_pod() {
    // The kubelet's layout: app.toml -> ..data/app.toml, ..data -> a
    // timestamped directory, swapped by renaming a new symlink over ..data.
    let dir = tempfile::tempdir().expect("tempdir");
    let version = |name: &str, text: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("app.toml"), text).expect("write");
    };
    version("..2026_12_01_v1", "greeting = 1\n");
    std::os::unix::fs::symlink("..2026_12_01_v1", dir.path().join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/app.toml", dir.path().join("app.toml")).expect("symlink");
    let config = dir.path().join("app.toml");
    let b = Baton::serving(&["--watch", config.to_str().expect("utf-8")], &[]);
    version("..2026_12_01_v2", "greeting = 2\n");
    let tmp = dir.path().join("..data_tmp");
    std::os::unix::fs::symlink("..2026_12_01_v2", &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.path().join("..data")).expect("swap");
    b.wait_for_event("ready", 2);
    assert_eq!(b.status_json()["serving"], 2);
}

/// The manifests' directory.
fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/kubernetes")
}

fn yaml(name: &str) -> serde_yaml::Value {
    let path = manifests().join(name);
    let text = std::fs::read_to_string(&path).expect("manifest");
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A `DURATION` argument after `flag` in `args`.
fn duration_arg(args: &[String], flag: &str) -> Duration {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} in {args:?}"));
    humantime::parse_duration(&args[i + 1]).expect("a duration")
}

#[test]
fn the_kubernetes_manifests_match_what_the_binary_serves() {
    for name in ["service.yaml", "configmap.yaml"] {
        assert!(yaml(name)["kind"].is_string(), "{name}");
    }
    let deployment = yaml("deployment.yaml");
    assert_eq!(deployment["kind"], "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<String> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("a string").to_owned())
        .collect();
    // The admin endpoint binds every interface, on the port the probes use.
    let metrics = &args[args
        .iter()
        .position(|a| a == "--metrics")
        .expect("--metrics")
        + 1];
    let port: u16 = metrics
        .strip_prefix(':')
        .expect(":PORT, for the pod IP")
        .parse()
        .expect("a port");
    let admin_port = container["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "admin")
        .and_then(|p| p["containerPort"].as_u64())
        .expect("the admin port");
    assert_eq!(u64::from(port), admin_port);
    // The grace period covers the delay and the stop timeout.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    let needed = duration_arg(&args, "--shutdown-delay") + duration_arg(&args, "--stop-timeout");
    assert!(grace > needed.as_secs(), "{grace} s <= {needed:?}");
    // No preStop sleep: baton does it.
    assert!(container["lifecycle"]["preStop"].is_null());
    // The ConfigMap mount updates (no subPath).
    for mount in container["volumeMounts"].as_sequence().expect("mounts") {
        assert!(mount["subPath"].is_null(), "{mount:?}");
    }
    // Every probe path answers as its probe expects, from baton started
    // with the manifest's own options (the app and the watched file are
    // stand-ins, the admin port a free one).
    let dir = tempfile::tempdir().expect("tempdir");
    let watched = dir.path().join("app.toml");
    std::fs::write(&watched, "").expect("write");
    let free = support::free_port();
    let dashdash = args.iter().position(|a| a == "--").expect("--");
    let run_args: Vec<String> = args[1..dashdash]
        .iter()
        .map(|a| match a.as_str() {
            a if a == metrics => format!(":{free}"),
            "/etc/app/app.toml" => watched.to_string_lossy().into_owned(),
            "http=:8080" => "http=127.0.0.1:0".to_owned(),
            a => a.to_owned(),
        })
        .collect();
    let b = Baton::builder().run_args(run_args).start();
    b.wait_for_event("ready", 1);
    for probe_kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let probe = &container[probe_kind]["httpGet"];
        assert_eq!(probe["port"], "admin", "{probe_kind}");
        let path = probe["path"].as_str().expect("path");
        wait_until(&format!("{probe_kind} {path} answers 200"), LONG, || {
            get(free, path, LONG).is_ok_and(|r| r.status == 200)
        });
    }
}
