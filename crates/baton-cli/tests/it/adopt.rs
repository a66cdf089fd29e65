//! A baton that is killed leaves its service serving (`--orphans keep`, the
//! default), and the next `baton run` with the same control socket adopts
//! it; with `--orphans stop` the service dies with baton.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rustix::process::Signal;

use crate::support;

use support::{Baton, LONG, Load, get, pid_gone, wait_until};

/// `status --json` of the baton at `control`, or `None` while none answers.
fn status_at(control: &Path) -> Option<serde_json::Value> {
    let out = support::run(
        &[
            "status".into(),
            "--json".into(),
            "--control".into(),
            control.into(),
        ],
        LONG,
    );
    (out.code == Some(0)).then(|| serde_json::from_str(&out.stdout).expect("status JSON"))
}

/// A second `baton run` on `first`'s control socket and port.
fn second_baton(first: &Baton, port: u16, run_args: &[&str]) -> Baton {
    let proxied = run_args.contains(&"--proxy");
    Baton::builder()
        .control(&first.control)
        .run_args(["--listen", &format!("127.0.0.1:{port}")])
        .run_args(run_args.iter().copied())
        .app_args(if proxied {
            &["--listen", "127.0.0.1:{port}"][..]
        } else {
            &[]
        })
        .start()
}

/// The state file beside `b`'s control socket.
fn state_file(b: &Baton) -> std::path::PathBuf {
    let name = b.control.file_name().expect("name").to_string_lossy();
    b.control
        .with_file_name(name.replace(".sock", ".state.json"))
}

/// Waits until the baton at `b`'s control socket has adopted the service of
/// the baton `from`; returns its status.
fn wait_adopted(b: &Baton, from: u32) -> serde_json::Value {
    let mut status = None;
    wait_until("the new baton adopted the service", LONG, || {
        status = status_at(&b.control).filter(|s| s["adopted_from"] == from);
        status.is_some()
    });
    status.expect("status")
}

/// A connection to `port` with a request sent, while nothing accepts.
fn queued_request(port: u16) -> std::net::TcpStream {
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("write");
    client
}

/// The whole answer on `client`.
fn answer_to(mut client: std::net::TcpStream) -> String {
    client.set_read_timeout(Some(LONG)).expect("timeout");
    let mut answer = String::new();
    client.read_to_string(&mut answer).expect("answer");
    answer
}

/// Kills `b` with SIGKILL, once its state (written before it answers)
/// shows a generation serving, and waits for it to be gone.
fn kill(b: &mut Baton) {
    wait_until("a generation serves", LONG, || {
        b.status_json()["serving"].is_u64()
    });
    b.signal(Signal::KILL);
    b.wait_exit(LONG);
}

#[test]
fn a_killed_baton_leaves_the_app_serving_and_the_next_baton_adopts_it() {
    let mut first = Baton::serving(&[], &[]);
    let port = first.port();
    let app = first.gen_pid(1);
    let load = Load::start(port, 16, 1_000_000, Duration::from_secs(120));
    wait_until("the load was answered", LONG, || load.has_seen(app));
    kill(&mut first);
    // Nothing serves on baton's behalf: the app does, on its own.
    let at_kill = load.ok.load(Relaxed);
    wait_until("500 more requests answered", LONG, || {
        load.ok.load(Relaxed) >= at_kill + 500
    });
    assert!(!pid_gone(app), "the app outlived baton");

    let second = second_baton(&first, port, &[]);
    let status = wait_adopted(&second, first.pid());
    assert_eq!(status["serving"], 1, "{status}");
    assert_eq!(status["generations"][0]["pid"], app, "{status}");
    assert!(status["keeper_pid"].as_u64().is_some(), "{status}");
    // The next reload replaces the adopted generation as usual.
    let (code, json) = second.reload_json();
    assert_eq!(code, Some(0), "{json}\n{}", second.dump());
    assert_eq!(json["generation"], 2, "{json}");
    wait_until("the adopted generation drained and exited", LONG, || {
        pid_gone(app)
    });
    wait_until("baton saw it exit (its pidfd)", LONG, || {
        second.status_json()["generations"].as_array().map(Vec::len) == Some(1)
    });
    let (ok, failures, _) = load.finish();
    support::assert_no_failures(ok, &failures);
    eprintln!("SIGKILL of baton, adoption and a reload: {ok} requests, 0 failed");
}

#[test]
fn a_damaged_state_file_is_only_a_hint_the_keeper_holds_the_truth() {
    let mut first = Baton::serving(&[], &[]);
    let port = first.port();
    let app = first.gen_pid(1);
    kill(&mut first);
    let state = state_file(&first);
    assert!(state.is_file(), "{}", state.display());
    // Damaged, and then not even a file: the keeper's copy of the state is
    // what the adoption starts from.
    std::fs::write(&state, b"{damaged").expect("damage it");
    let mut second = second_baton(&first, port, &[]);
    let status = wait_adopted(&second, first.pid());
    assert_eq!(status["generations"][0]["pid"], app, "{status}");
    kill(&mut second);
    std::fs::remove_file(&state).expect("remove");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &state,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    let mut third = second_baton(&first, port, &[]);
    let status = wait_adopted(&third, second.pid());
    assert_eq!(status["generations"][0]["pid"], app, "{status}");
    assert_eq!(get(port, "/", LONG).map(|r| r.status).ok(), Some(200));
    // With baton and its keeper both killed, an unreadable file is all
    // there is: never deleted, and nothing is touched.
    let keeper = third.status_json()["keeper_pid"]
        .as_u64()
        .expect("a keeper");
    kill(&mut third);
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(keeper as i32).expect("pid"),
        Signal::KILL,
    );
    wait_until("the keeper is gone", LONG, || pid_gone(keeper as u32));
    std::fs::write(&state, b"{damaged").expect("damage it");
    let out = support::run(
        &[
            "run".into(),
            "--control".into(),
            first.control.clone().into(),
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
            "--".into(),
            support::exe().into(),
            "demo-app".into(),
        ],
        LONG,
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("cannot be read"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("pid {app} (")),
        "the app holding the port is named: {}",
        out.stderr
    );
    assert_eq!(std::fs::read(&state).expect("kept"), b"{damaged");
    assert!(!pid_gone(app), "the app serves on");
    assert_eq!(get(port, "/", LONG).map(|r| r.status).ok(), Some(200));
    // Clean up what the killed batons left running.
    let _ = rustix::process::kill_process_group(
        rustix::process::Pid::from_raw(app as i32).expect("pid"),
        Signal::KILL,
    );
}

/// Field `n` (1-based, after the command's name) of `/proc/PID/stat`.
fn stat_field(pid: u32, n: usize) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(n - 3)?.parse().ok()
}

#[test]
fn a_stopped_keeper_outlives_its_baton_and_the_service_is_adopted() {
    let mut first = Baton::serving(&[], &[]);
    let port = first.port();
    let app = first.gen_pid(1);
    let keeper = first.status_json()["keeper_pid"]
        .as_u64()
        .expect("a keeper") as u32;
    // A session of its own (field 6), and SIGHUP means nothing to it.
    assert_eq!(stat_field(keeper, 6), Some(i64::from(keeper)));
    support::send(keeper, Signal::HUP);
    support::send(keeper, Signal::STOP);
    kill(&mut first);
    // Had its group been orphaned with it stopped, the kernel would have
    // sent it SIGHUP and SIGCONT.
    assert!(!pid_gone(keeper), "the keeper lives");
    support::send(keeper, Signal::CONT);
    let second = second_baton(&first, port, &[]);
    let status = wait_adopted(&second, first.pid());
    assert_eq!(status["generations"][0]["pid"], app, "{status}");
    assert_eq!(get(port, "/", LONG).map(|r| r.status).ok(), Some(200));
}

#[test]
fn status_says_when_no_keeper_will_be_started_again() {
    let b = Baton::serving(&[], &[]);
    assert!(b.status_json()["no_keeper"].is_null());
    // Kill every keeper baton starts, until it gives up.
    let mut killed = 0;
    let gave_up = loop {
        let status = b.status_json();
        if let Some(why) = status["no_keeper"].as_str() {
            break why.to_owned();
        }
        assert!(killed < 20, "baton never gave up: {status}");
        if let Some(pid) = status["keeper_pid"].as_u64() {
            support::send(pid as u32, Signal::KILL);
            wait_until("a new keeper, or none", LONG, || {
                let s = b.status_json();
                s["keeper_pid"].as_u64() != Some(pid)
            });
            killed += 1;
        }
    };
    assert!(gave_up.contains("cannot adopt"), "{gave_up}");
    let text = b.ctl(&["status"]);
    assert!(
        text.stdout.contains("warning: no descriptor keeper runs"),
        "{text:?}"
    );
}

#[test]
fn a_stopped_keeper_holds_up_no_reload_and_gets_the_outputs_once_it_runs() {
    let b = Baton::serving(&["--log-prefix", "--workers", "3"], &[]);
    let keeper = b.status_json()["keeper_pid"].as_u64().expect("a keeper") as u32;
    support::send(keeper, Signal::STOP);
    // The calls that hand the keeper the new workers' pipes wait on their
    // own thread; the reload and status do not wait on them.
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}\n{}", b.dump());
    assert_eq!(b.status_json()["serving"], 2);
    support::send(keeper, Signal::CONT);
    let (code, json) = b.reload_json();
    assert_eq!(code, Some(0), "{json}\n{}", b.dump());
    assert_eq!(
        b.status_json()["keeper_pid"],
        keeper,
        "the same keeper serves on"
    );
}

#[test]
fn a_state_file_that_names_a_process_without_its_start_time_is_not_believed() {
    let mut first = Baton::serving(&[], &[]);
    let port = first.port();
    let app = first.gen_pid(1);
    let keeper = first.status_json()["keeper_pid"]
        .as_u64()
        .expect("a keeper") as u32;
    kill(&mut first);
    // Nothing of the service is left: the file alone speaks of it.
    support::send(app, Signal::KILL);
    support::send(keeper, Signal::KILL);
    wait_until("the app and the keeper are gone", LONG, || {
        pid_gone(app) && pid_gone(keeper)
    });
    // An unrelated process of the same user, named in the file with no
    // start time (which used to match any).
    struct Bystander(std::process::Child);
    impl Drop for Bystander {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let bystander = Bystander(
        std::process::Command::new("sleep")
            .arg("600")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("sleep"),
    );
    let path = state_file(&first);
    let original = std::fs::read(&path).expect("state");
    // Named with no start time, then with its true one: neither is enough
    // (it holds none of the service's listening sockets).
    let true_start = stat_field(bystander.0.id(), 22).expect("start time");
    for start_time in [serde_json::Value::Null, serde_json::json!(true_start)] {
        let mut state: serde_json::Value = serde_json::from_slice(&original).expect("json");
        state["generations"][0]["processes"] = serde_json::json!([
            {"pid": bystander.0.id(), "start_time": start_time}
        ]);
        std::fs::write(&path, serde_json::to_vec(&state).expect("json")).expect("forge");
        let mut second = second_baton(&first, port, &[]);
        second.wait_for_event("ready", 1);
        let status = second.status_json();
        assert!(status["adopted_from"].is_null(), "not adopted: {status}");
        assert!(
            !pid_gone(bystander.0.id()),
            "the bystander was not signalled\n{}",
            second.dump()
        );
        second.signal(Signal::TERM);
        second.wait_exit(LONG);
    }
}

#[test]
fn an_adopter_killed_at_any_moment_leaves_a_service_the_next_one_adopts() {
    let mut first = Baton::serving(&[], &[]);
    let port = first.port();
    let app = first.gen_pid(1);
    kill(&mut first);
    // Each adopter is killed at a moment swept from 0 to 50 ms after it
    // starts (before, during or after it takes the listeners from the
    // keeper and starts its own), then five at the worst moment: once it
    // has taken them and logged its control socket, before its own keeper
    // runs.
    let trials: u64 = 20;
    for trial in 0..trials + 5 {
        let mut adopter = second_baton(&first, port, &[]);
        if trial < trials {
            std::thread::sleep(Duration::from_micros(trial * 50_000 / (trials - 1)));
        } else {
            adopter.wait_for(
                "the control line",
                |l| support::is_event(l, "control"),
                LONG,
            );
        }
        adopter.signal(Signal::KILL);
        adopter.wait_exit(LONG);
        assert!(!pid_gone(app), "trial {trial}: the app serves on");
    }
    let last = second_baton(&first, port, &[]);
    let mut status = None;
    wait_until("the last baton adopted the service", LONG, || {
        status = status_at(&last.control).filter(|s| s["adopted_from"].is_u64());
        status.is_some()
    });
    let status = status.expect("status");
    assert_eq!(status["generations"][0]["pid"], app, "{status}");
    assert_eq!(get(port, "/", LONG).map(|r| r.status).ok(), Some(200));
    let (code, json) = last.reload_json();
    assert_eq!(code, Some(0), "{json}\n{}", last.dump());
}

#[test]
fn silent_clients_of_the_keeper_do_not_keep_the_next_baton_out() {
    let mut first = Baton::serving(&[], &[]);
    let port = first.port();
    let app = first.gen_pid(1);
    let name = first
        .control
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let keeper = first
        .control
        .with_file_name(name.replace(".sock", ".keeper.sock"));
    // Each holds a connection and says nothing (the keeper used to serve
    // one client at a time, waiting up to 500 ms on each).
    let silent: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&keeper).expect("connect to the keeper"))
        .collect();
    kill(&mut first);
    let second = second_baton(&first, port, &[]);
    let status = wait_adopted(&second, first.pid());
    assert_eq!(status["generations"][0]["pid"], app, "{status}");
    drop(silent);
}

#[test]
fn with_orphans_stop_the_app_dies_with_baton() {
    let mut b = Baton::serving(&["--orphans", "stop"], &[]);
    let app = b.gen_pid(1);
    assert!(b.status_json()["keeper_pid"].is_null());
    kill(&mut b);
    wait_until("the app got SIGTERM and exited", LONG, || pid_gone(app));
}

#[test]
fn when_nothing_is_left_the_keeper_lets_go_and_the_next_baton_starts_fresh() {
    let mut first = Baton::serving(&[], &[]);
    let port = first.port();
    let app = first.gen_pid(1);
    let keeper = first.status_json()["keeper_pid"]
        .as_u64()
        .expect("a keeper") as u32;
    kill(&mut first);
    support::send(app, Signal::KILL);
    wait_until("the keeper exited on its own", LONG, || pid_gone(keeper));

    let second = second_baton(&first, port, &[]);
    second.wait_for_event("ready", 1);
    let status = second.status_json();
    assert!(status["adopted_from"].is_null(), "{status}");
    let reply = get(port, "/", LONG).expect("served");
    assert_ne!(reply.pid, Some(app));
}

#[test]
fn other_listeners_are_refused_and_nothing_is_lost() {
    let mut first = Baton::serving(&[], &[]);
    let port = first.port();
    let app = first.gen_pid(1);
    kill(&mut first);
    let other = format!("127.0.0.1:{}", support::free_port());
    let out = support::run(
        &[
            "run".into(),
            "--control".into(),
            first.control.clone().into(),
            "--listen".into(),
            other.into(),
            "--".into(),
            support::exe().into(),
            "demo-app".into(),
        ],
        LONG,
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("run with the same --listen"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert_eq!(get(port, "/", LONG).expect("served").pid, Some(app));
    // The keeper still holds the listeners: the right command adopts.
    let second = second_baton(&first, port, &[]);
    wait_adopted(&second, first.pid());
}

#[test]
fn in_proxy_mode_clients_wait_in_the_backlog_until_the_next_baton() {
    let mut first = Baton::behind_proxy("http", &[], &[]);
    let port = first.port();
    let app = first.gen_pid(1);
    kill(&mut first);
    // Nobody accepts now; the keeper holds the public listener, so this
    // client is queued, not refused.
    let client = queued_request(port);
    let second = second_baton(&first, port, &["--proxy", "http"]);
    wait_adopted(&second, first.pid());
    let answer = answer_to(client);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\n{}",
        second.dump()
    );
    assert!(
        answer.contains(&format!("(pid {app})")),
        "the adopted app answered: {answer}"
    );
}

#[test]
fn an_upgraded_baton_keeps_its_keeper_and_can_still_be_adopted() {
    let mut first = Baton::serving(&[], &[]);
    let port = first.port();
    let app = first.gen_pid(1);
    let keeper = first.status_json()["keeper_pid"].clone();
    assert!(keeper.is_u64());
    let out = first.ctl(&["upgrade"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(first.status_json()["keeper_pid"], keeper);
    kill(&mut first);
    let second = second_baton(&first, port, &[]);
    let status = wait_adopted(&second, first.pid());
    assert_eq!(status["generations"][0]["pid"], app, "{status}");
}

#[test]
fn the_keeper_shrugs_off_bad_clients_and_is_replaced_if_killed() {
    let mut first = Baton::serving(&[], &[]);
    let port = first.port();
    let keeper_path = first.control.with_file_name("control.keeper.sock");
    let keeper = first.status_json()["keeper_pid"]
        .as_u64()
        .expect("a keeper") as u32;
    // Garbage, a line far too long, and a client that says nothing: each
    // gets an error or is dropped, and the keeper goes on.
    for request in [&b"give me everything\n"[..], &[b'x'; 10_000][..], b""] {
        let mut conn = UnixStream::connect(&keeper_path).expect("connect to the keeper");
        conn.write_all(request).expect("write");
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        assert!(!answer.starts_with("ok"), "{answer}");
    }
    assert!(!pid_gone(keeper));
    // A keeper that dies is replaced.
    support::send(keeper, Signal::KILL);
    let mut replaced = None;
    wait_until("another keeper started", LONG, || {
        replaced = first.status_json()["keeper_pid"]
            .as_u64()
            .filter(|&p| p != u64::from(keeper));
        replaced.is_some()
    });
    // And the new one works.
    let app = first.gen_pid(1);
    kill(&mut first);
    let second = second_baton(&first, port, &[]);
    let status = wait_adopted(&second, first.pid());
    assert_eq!(status["generations"][0]["pid"], app, "{status}");
}

/// A stand-in for systemd: the datagram socket named by NOTIFY_SOCKET.
fn fake_manager(dir: &Path) -> (std::os::unix::net::UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify");
    let manager = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
    manager.set_read_timeout(Some(LONG)).expect("timeout");
    (manager, path)
}

/// The listener baton handed to `manager`'s descriptor store, checked to
/// be the one on `port`.
fn stored_listener(manager: &std::os::unix::net::UnixDatagram, port: u16) -> std::os::fd::OwnedFd {
    let stored = loop {
        let (text, fds) = recv_with_fds(manager);
        if text.starts_with("FDSTORE=1") {
            assert_eq!(text, "FDSTORE=1\nFDNAME=web");
            assert_eq!(fds.len(), 1, "one descriptor with it");
            break fds.into_iter().next().expect("fd");
        }
        assert!(fds.is_empty(), "{text}");
    };
    let local = rustix::net::getsockname(&stored).expect("getsockname");
    let local = std::net::SocketAddr::try_from(local).expect("an IP address");
    assert_eq!(local, format!("127.0.0.1:{port}").parse().expect("addr"));
    stored
}

/// A baton started as systemd starts one again: `stored` in LISTEN_FDS.
fn restarted_by_systemd(stored: &std::os::fd::OwnedFd, port: u16, control: Option<&Path>) -> Baton {
    use std::os::fd::AsFd;
    let mut b = Baton::builder()
        .stdin(stored.as_fd().try_clone_to_owned().expect("dup"))
        .via_shell("exec 3<&0 0</dev/null; export LISTEN_FDS=1 LISTEN_FDNAMES=web LISTEN_PID=$$")
        .run_args(["--listen", &format!("web=127.0.0.1:{port}")]);
    if let Some(control) = control {
        b = b.control(control);
    }
    b.start()
}

/// baton run with NOTIFY_SOCKET naming a stand-in for systemd (with
/// `run_args`), and the listener it handed to the descriptor store; the
/// baton has been killed.
struct UnderSystemd {
    _dir: tempfile::TempDir,
    first: Baton,
    port: u16,
    app: u32,
    stored: std::os::fd::OwnedFd,
}

fn killed_under_systemd(run_args: &[&str]) -> UnderSystemd {
    let dir = tempfile::tempdir().expect("tempdir");
    let (manager, notify_path) = fake_manager(dir.path());
    let mut first = Baton::builder()
        .env("NOTIFY_SOCKET", &notify_path)
        .run_args(["--listen", "web=127.0.0.1:0"])
        .run_args(run_args.iter().copied())
        .start();
    first.wait_for_event("ready", 1);
    let port = first.port();
    let app = first.gen_pid(1);
    let stored = stored_listener(&manager, port);
    kill(&mut first);
    UnderSystemd {
        _dir: dir,
        first,
        port,
        app,
        stored,
    }
}

#[test]
fn under_systemd_the_listeners_go_to_the_descriptor_store_and_come_back() {
    // As under systemd's default KillMode, the app dies with baton.
    let s = killed_under_systemd(&["--orphans", "stop"]);
    wait_until("the app died with baton", LONG, || pid_gone(s.app));
    // Nothing runs, but the listener lives on in the store: a client is
    // queued, not refused. (Binding the port again would fail: the stored
    // socket holds it.)
    let client = queued_request(s.port);
    let second = restarted_by_systemd(&s.stored, s.port, None);
    second.wait_for_event("ready", 1);
    let answer = answer_to(client);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\n{}",
        second.dump()
    );
}

#[test]
fn a_listener_both_stored_and_kept_is_used_once_on_adoption() {
    // KillMode=process: the app and the keeper outlive baton, and systemd
    // also passes the stored listener back.
    let s = killed_under_systemd(&[]);
    let second = restarted_by_systemd(&s.stored, s.port, Some(&s.first.control));
    let status = wait_adopted(&second, s.first.pid());
    assert_eq!(status["generations"][0]["pid"], s.app, "{status}");
    assert_eq!(
        status["listeners"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    let (code, json) = second.reload_json();
    assert_eq!(code, Some(0), "{json}");
}

/// One datagram and the descriptors that came with it.
fn recv_with_fds(socket: &std::os::unix::net::UnixDatagram) -> (String, Vec<std::os::fd::OwnedFd>) {
    use std::mem::MaybeUninit;
    let mut buf = [0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        socket,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &mut control,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )
    .expect("a datagram from baton");
    let mut fds = Vec::new();
    for m in control.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    (String::from_utf8_lossy(&buf[..msg.bytes]).into_owned(), fds)
}

#[test]
fn with_log_prefix_the_keeper_copies_the_output_until_the_next_baton() {
    let mut first = Baton::serving(&["--log-prefix"], &[]);
    let port = first.port();
    let app = first.gen_pid(1);
    kill(&mut first);
    // Each request writes a line to the app's stderr, a pipe whose reader
    // (baton) is gone: more than a pipe holds (64 KiB), so the keeper must
    // both hold the pipe (else SIGPIPE) and empty it (else the app blocks).
    for i in 0..2_000 {
        let reply = get(port, "/slow?ms=0", LONG)
            .unwrap_or_else(|e| panic!("request {i} after baton died: {e}"));
        assert_eq!(reply.pid, Some(app));
    }
    let copied = |b: &Baton| {
        b.lines()
            .iter()
            .filter(|l| l.contains(" gen 1] demo-app: pid"))
            .count()
    };
    wait_until("the keeper copied the app's output", LONG, || {
        copied(&first) >= 2_000
    });
    let second = second_baton(&first, port, &[]);
    wait_adopted(&second, first.pid());
    get(port, "/slow?ms=0", LONG).expect("served");
    wait_until(
        "the new baton copies the adopted app's output",
        LONG,
        || copied(&second) >= 1,
    );
}

#[test]
fn killed_and_adopted_again_and_again_the_app_and_one_keeper_remain() {
    let mut b = Baton::serving(&[], &[]);
    let port = b.port();
    let app = b.gen_pid(1);
    let mut dead = Vec::new();
    for round in 1..=5 {
        let keeper = b.status_json()["keeper_pid"].as_u64().expect("a keeper") as u32;
        kill(&mut b);
        let next = second_baton(&b, port, &[]);
        let status = wait_adopted(&next, b.pid());
        assert_eq!(
            status["generations"][0]["pid"], app,
            "round {round}: {status}"
        );
        wait_until("the old keeper handed over and exited", LONG, || {
            pid_gone(keeper)
        });
        dead.push(std::mem::replace(&mut b, next));
    }
    assert_eq!(get(port, "/", LONG).expect("served").pid, Some(app));
}

#[test]
fn a_release_on_probation_when_baton_dies_is_adopted_as_serving() {
    let mut first = Baton::serving(&["--bake", "60s"], &[]);
    let port = first.port();
    // The reload waits through the bake: ask without waiting.
    first.signal(Signal::HUP);
    let mut baking = None;
    wait_until("generation 2 is on probation", LONG, || {
        baking = first.status_json()["baking"].as_u64();
        baking == Some(2)
    });
    let new = first.gen_pid(2);
    first.signal(Signal::KILL);
    first.wait_exit(LONG);
    let second = second_baton(&first, port, &[]);
    let status = wait_adopted(&second, first.pid());
    assert_eq!(status["serving"], 2, "{status}");
    assert!(status["baking"].is_null(), "{status}");
    assert_eq!(get(port, "/", LONG).expect("served").pid, Some(new));
}

/// The processes whose environment holds `mark` (apps and keepers of one
/// test, which sets it on every baton it starts).
fn marked(mark: &str) -> Vec<u32> {
    let needle = format!("BATON_TEST_MARK={mark}");
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
        })
        .filter(|pid| !pid_gone(*pid))
        .collect()
}

#[test]
fn a_randomized_run_of_kills_and_damage_strands_no_app_and_signals_no_bystander() {
    if !support::long("the randomized adoption run") {
        return;
    }
    let seed: u64 = std::env::var("BATON_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_ad07);
    let mut rng = seed;
    let mut next = move |n: u64| {
        // xorshift64*
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    };
    let mark = format!("adopt-{}-{seed}", std::process::id());
    let start = |control: Option<&Path>, port: u16| {
        let b = Baton::builder().env("BATON_TEST_MARK", &mark);
        let b = match control {
            Some(c) => b.control(c),
            None => b,
        };
        b.run_args(["--listen", &format!("127.0.0.1:{port}")])
            .start()
    };
    // A process of the same user that forged state files name, with its
    // true start time.
    let mut bystander = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("sleep");
    let bystander_pid = bystander.id();
    let bystander_start = stat_field(bystander_pid, 22).expect("start time");
    let mut b = start(None, 0);
    b.wait_for_event("ready", 1);
    let port = b.port();
    let control = b.control.clone();
    let state = state_file(&b);
    let trials = 50;
    let mut kinds = [0u32; 5];
    let mut gone = Vec::new();
    for trial in 0..trials {
        let kind = next(5) as usize;
        kinds[kind] += 1;
        let from = b.pid();
        match kind {
            // baton killed.
            0 => kill(&mut b),
            // baton killed, its state file then damaged or replaced.
            1 => {
                kill(&mut b);
                let damage: &[u8] = match next(3) {
                    0 => b"{damaged",
                    1 => b"",
                    _ => b"\xff\xfe not json at all",
                };
                std::fs::write(&state, damage).expect("damage");
            }
            // baton killed, its file forged to name the bystander.
            2 => {
                kill(&mut b);
                let mut s: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&state).expect("state")).expect("json");
                s["generations"][0]["processes"][0]["pid"] = serde_json::json!(bystander_pid);
                s["generations"][0]["processes"][0]["start_time"] =
                    serde_json::json!(bystander_start);
                std::fs::write(&state, serde_json::to_vec(&s).expect("json")).expect("forge");
            }
            // The keeper killed while baton runs: baton starts another.
            3 => {
                let keeper = b.status_json()["keeper_pid"].as_u64().expect("a keeper") as u32;
                support::send(keeper, Signal::KILL);
                wait_until("another keeper runs", LONG, || {
                    b.status_json()["keeper_pid"]
                        .as_u64()
                        .is_some_and(|k| k as u32 != keeper)
                });
                assert_eq!(get(port, "/", LONG).map(|r| r.status).ok(), Some(200));
                continue;
            }
            // baton killed, then its adopter killed at a random moment.
            _ => {
                kill(&mut b);
                let mut adopter = start(Some(&control), port);
                std::thread::sleep(Duration::from_micros(next(50_000)));
                adopter.signal(Signal::KILL);
                adopter.wait_exit(LONG);
                gone.push(adopter);
            }
        }
        // The killed baton's directory (the control socket's) stays.
        gone.push(std::mem::replace(&mut b, start(Some(&control), port)));
        let mut status = None;
        wait_until(&format!("trial {trial}: a baton serves"), LONG, || {
            status = status_at(&control).filter(|s| s["serving"].is_u64());
            status.is_some()
        });
        let status = status.expect("status");
        assert!(
            status["adopted_from"].is_u64() || status["serving"] == 1,
            "trial {trial} (kind {kind}, from {from}): {status}\n{}",
            b.dump()
        );
        assert_eq!(
            get(port, "/", LONG).map(|r| r.status).ok(),
            Some(200),
            "trial {trial}"
        );
        assert!(
            matches!(bystander.try_wait(), Ok(None)),
            "trial {trial}: the bystander was signalled\n{}",
            b.dump()
        );
    }
    // A clean stop ends every app and keeper the run ever started: none was
    // left to run unsupervised.
    assert!(marked(&mark).len() >= 2, "the app and a keeper are marked");
    b.signal(Signal::TERM);
    b.wait_exit(LONG);
    let left = || {
        marked(&mark)
            .into_iter()
            .map(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                format!(
                    "{pid}: {}",
                    String::from_utf8_lossy(&cmd).replace('\0', " ")
                )
            })
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + LONG;
    while !left().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(left().is_empty(), "left behind: {:?}\n{}", left(), b.dump());
    assert!(
        matches!(bystander.try_wait(), Ok(None)),
        "the bystander lives"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    eprintln!(
        "randomized adoption run (seed {seed}): {trials} trials, by kind {kinds:?} \
         (killed, damaged file, forged file, keeper killed, adopter killed): \
         0 apps stranded, bystander untouched"
    );
}
