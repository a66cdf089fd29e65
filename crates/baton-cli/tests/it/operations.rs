//! Operations: a config file, systemd's notify protocol and socket
//! activation of baton itself, Prometheus metrics, `--user`, and baton as
//! PID 1 of a fresh pid namespace.

use crate::support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Baton, LONG, baton, get, wait_until};

#[test]
fn a_config_file_sets_options_and_the_command_line_wins() {
    let builder = Baton::builder();
    let config = builder.dir().join("baton.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"web=127.0.0.1:0\"]\nready-timeout = \"7s\"\nname = \"from-file\"\ncommand = [\"{}\", \"demo-app\"]\n",
            support::exe()
        ),
    )
    .expect("config");
    let b = Baton::builder()
        .run_args([
            "--config".into(),
            config.into_os_string(),
            "--name".into(),
            "from-cli".into(),
        ])
        .command(Vec::<String>::new())
        .start();
    b.wait_for_event("ready", 1);
    let listening = b.wait_for("the listener", |l| l.contains(" listening "), LONG);
    assert!(listening.contains("name=web"), "{listening}");
    let status = b.ctl(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&status.stdout).expect("JSON");
    assert_eq!(json["name"], "from-cli");
}

#[test]
fn a_bad_config_file_names_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("baton.toml");
    let path = config.to_str().expect("utf-8");
    for (text, expected) in [
        (
            "listen = [\"127.0.0.1:0\"]\nstop-timeout = \"soon\"\n",
            "baton.toml:2: stop-timeout: invalid duration \"soon\"",
        ),
        (
            "listen = [\"127.0.0.1:0\"]\nstop_timeout = \"1s\"\n",
            "baton.toml:2: unknown field `stop_timeout`",
        ),
    ] {
        std::fs::write(&config, text).expect("write");
        let out = baton(&["run", "--config", path, "--", "true"]);
        assert_eq!(out.code, Some(2), "{out:?}");
        assert!(
            out.stderr.contains(expected),
            "{expected:?} in {}",
            out.stderr
        );
    }
}

/// Datagrams baton sends to a fake service manager, but for the
/// descriptor-store ones (see `adopt.rs`).
fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).expect("a notification from baton");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if !text.starts_with("FDSTORE=1") {
            return text;
        }
    }
}

#[test]
fn under_systemd_baton_reports_ready_reloading_and_stopping() {
    let builder = Baton::builder();
    let path = builder.dir().join("notify.sock");
    let manager = UnixDatagram::bind(&path).expect("bind");
    manager.set_read_timeout(Some(LONG)).expect("timeout");
    let mut b = builder
        .run_args(["--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", path.clone().into_os_string())
        .start();
    let first = next_message(&manager);
    assert!(first.contains("READY=1"), "{first}");
    assert!(
        first.contains(&format!("MAINPID={}", b.pid())),
        "MAINPID stays baton: {first}"
    );
    assert_eq!(b.ctl(&["reload"]).code, Some(0));
    let reloading = next_message(&manager);
    assert!(
        reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="),
        "{reloading}"
    );
    let ready = next_message(&manager);
    assert!(
        ready.starts_with("READY=1") && ready.contains("generation 2"),
        "{ready}"
    );
    // The app got its own NOTIFY_SOCKET, not systemd's.
    b.signal(rustix::process::Signal::TERM);
    let stopping = next_message(&manager);
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    assert_eq!(b.wait_exit(LONG).code(), Some(0));
}

#[test]
fn under_systemd_socket_activation_baton_uses_the_passed_socket() {
    if !support::peer("systemd-socket-activate", "systemd") {
        return;
    }
    let port = support::free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("control.sock");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args([
        "-l",
        &format!("127.0.0.1:{port}"),
        "--fdname=web",
        support::exe(),
        "run",
        "--control",
    ])
    .arg(&control)
    .args(["--", support::exe(), "demo-app"])
    .stdout(Stdio::null());
    let mut activator = support::Proc::spawn(cmd);
    // Once it listens, the first connection starts baton.
    activator.wait_for("Listening on", |l| l.contains("Listening on"), LONG);
    let reply = get(port, "/", LONG).expect("served through the activated socket");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.generation, Some(1));
    // baton itself is the activated process; a reload keeps the socket.
    let out = support::run(
        &[
            "reload".into(),
            "--control".into(),
            control.clone().into_os_string(),
        ],
        LONG,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        get(port, "/", LONG).expect("still served").generation,
        Some(2)
    );
    support::send(activator.pid(), rustix::process::Signal::TERM);
    assert_eq!(activator.wait_exit(LONG).code(), Some(0));
}

#[test]
fn metrics_count_reloads_exits_and_durations() {
    let port = support::free_port();
    let b = Baton::serving(&["--metrics", &format!("127.0.0.1:{port}")], &[]);
    assert_eq!(b.ctl(&["reload"]).code, Some(0));
    b.wait_for_event("exit", 1);
    let mut body = String::new();
    support::wait_until("metrics show the reload", LONG, || {
        body = get(port, "/metrics", LONG)
            .map(|r| r.body)
            .unwrap_or_default();
        body.contains("baton_generation 2")
    });
    for line in [
        "baton_reloads_total{outcome=\"ok\"} 1",
        "baton_reloads_total{outcome=\"rolled_back\"} 0",
        "baton_child_exits_total{status=\"exit_0\"} 1",
        "baton_ready_seconds_count 2",
        "baton_drain_seconds_count 1",
        "baton_restarts_total 0",
    ] {
        assert!(body.lines().any(|l| l == line), "{line:?} in\n{body}");
    }
}

#[test]
fn the_app_runs_as_another_user_on_a_port_bound_as_root() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: --user needs root");
        return;
    }
    // A free privileged port, bound by baton as root.
    let port = (900..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1000");
    let builder = Baton::builder();
    // The app (as nobody) writes its report in a directory of its own: the
    // control socket's directory must stay writable by baton's user alone.
    let open = builder.dir().join("open");
    std::fs::create_dir(&open).expect("dir");
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let report = open.join("report.json");
    let b = builder
        .run_args(["--listen", &format!("127.0.0.1:{port}"), "--user", "nobody"])
        .app_args(["--report".into(), report.clone().into_os_string()])
        .start();
    b.wait_for_event("ready", 1);
    let status = std::fs::read_to_string(format!("/proc/{}/status", b.gen_pid(1))).expect("status");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert!(
        uid.split_whitespace().skip(1).all(|id| id == "65534"),
        "{uid}"
    );
    assert_eq!(get(port, "/", LONG).expect("serves").status, 200);
    let out = baton(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--user",
        "no-such-user-baton",
        "--",
        "true",
    ]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("unknown user \"no-such-user-baton\""),
        "{}",
        out.stderr
    );
}

#[test]
fn as_pid_1_of_a_pid_namespace_it_reaps_orphans_and_passes_the_exit_status() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: a new pid namespace needs root here");
        return;
    }
    if !support::peer("unshare", "util-linux") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("control.sock");
    // The app leaves orphans behind (a subshell's background sleeps), and
    // ignores SIGTERM so that the stop ends with SIGKILL: exit 128+9.
    let script = format!(
        "(sleep 0.1 &); (sleep 0.2 &); exec {} demo-app --ignore-term",
        support::exe()
    );
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--pid",
        "--fork",
        "--mount-proc",
        support::exe(),
        "run",
        "--log-level",
        "debug",
    ])
    .args([
        "--listen",
        "127.0.0.1:0",
        "--stop-timeout",
        "500ms",
        "--control",
    ])
    .arg(&control)
    .args(["--", "/bin/sh", "-c", &script])
    .stdout(Stdio::null());
    let mut child = support::Proc::spawn(cmd);
    let wait_line = |needle: &str| child.wait_for(needle, |l| l.contains(needle), LONG);
    let control_line = wait_line(" control ");
    assert!(
        control_line.contains("pid=1"),
        "baton is PID 1: {control_line}"
    );
    wait_line(" ready ");
    let reaped = wait_line("reaped an orphan");
    assert_eq!(support::field(&reaped, "status"), Some("0"), "{reaped}");
    // From outside the namespace: the control socket still works.
    let out = support::run(
        &["stop".into(), "--control".into(), control.into_os_string()],
        LONG,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let status = child.wait_exit(LONG);
    assert_eq!(
        status.code(),
        Some(137),
        "SIGKILL after the stop timeout: {}",
        child.dump()
    );
}

#[test]
fn the_control_socket_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let b = Baton::serving(&[], &[]);
    let mode = std::fs::metadata(&b.control)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // A directory baton creates for it is 0700.
    let dir = tempfile::tempdir().expect("tempdir");
    let nested = dir.path().join("baton").join("svc.sock");
    let mut c = Command::new(support::exe())
        .args(["run", "--listen", "127.0.0.1:0", "--control"])
        .arg(&nested)
        .args(["--", support::exe(), "demo-app"])
        .stderr(Stdio::null())
        .spawn()
        .expect("baton");
    support::wait_until("the control socket exists", LONG, || nested.exists());
    let dir_mode = std::fs::metadata(nested.parent().expect("dir"))
        .expect("dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    // Stop once generation 1 serves (a stop during its start would end it
    // before it installed its SIGTERM handler).
    support::wait_until("generation 1 serves", LONG, || {
        let out = support::run(
            &[
                "status".into(),
                "--json".into(),
                "--control".into(),
                nested.clone().into_os_string(),
            ],
            LONG,
        );
        out.stdout.contains("\"serving\": 1")
    });
    let out = support::run(
        &["stop".into(), "--control".into(), nested.into_os_string()],
        LONG,
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(c.wait().expect("wait").success());
}

#[test]
fn under_a_systemd_watchdog_baton_pings_from_its_loop_and_keeps_it_from_the_app() {
    let builder = Baton::builder();
    let path = builder.dir().join("notify.sock");
    let manager = UnixDatagram::bind(&path).expect("bind");
    manager.set_read_timeout(Some(LONG)).expect("timeout");
    let b = builder
        .run_args(["--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", path.clone().into_os_string())
        .env("WATCHDOG_USEC", "200000")
        .start();
    b.wait_for_event("ready", 1);
    let mut pings = 0;
    while pings < 3 {
        if next_message(&manager).contains("WATCHDOG=1") {
            pings += 1;
        }
    }
    // The watchdog is baton's: the app does not see it.
    let app = b.gen_pid(1);
    let env = std::fs::read(format!("/proc/{app}/environ")).expect("environ");
    assert!(
        !env.split(|&c| c == 0).any(|v| v.starts_with(b"WATCHDOG_")),
        "the app sees no WATCHDOG_ variable"
    );
    // A loop that is stuck says nothing: systemd would kill it.
    b.signal(rustix::process::Signal::STOP);
    manager.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 4096];
    while manager.recv(&mut buf).is_ok() {}
    manager.set_nonblocking(false).expect("blocking");
    manager
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    assert!(
        manager.recv(&mut buf).is_err(),
        "no WATCHDOG=1 for five periods while the loop is stopped"
    );
    b.signal(rustix::process::Signal::CONT);
    manager.set_read_timeout(Some(LONG)).expect("timeout");
    wait_until("the pings resume", LONG, || {
        next_message(&manager).contains("WATCHDOG=1")
    });
}
