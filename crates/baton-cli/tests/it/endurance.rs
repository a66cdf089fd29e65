//! Nothing a client or an app does takes baton down: descriptor limits,
//! connection caps, timeouts, half-closed clients, shut-down listeners,
//! floods, and flat resources over many reloads.
//!
//! Every load here is bounded in count and time and talks to loopback (or
//! to a network namespace the test made itself).

use crate::support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use support::{Baton, LONG, Load, get, pid_gone, wait_until};

/// A hard limit to run baton under, if this machine allows it: `want`, or
/// less if the hard limit here is lower (root may raise it).
fn hard_limit(want: u64) -> Option<u64> {
    let root = rustix::process::geteuid().is_root();
    let have = support::hard_nofile();
    if root || have >= want {
        Some(want)
    } else {
        eprintln!("skipped: needs a hard descriptor limit of {want} (have {have}; or root)");
        None
    }
}

/// A `via_shell` script that starts baton with these descriptor limits (the
/// soft one first: a hard limit below the soft one is refused).
fn limits(soft: u64, hard: u64) -> String {
    format!("ulimit -Sn {soft} && ulimit -Hn {hard} || exit 97")
}

#[test]
fn baton_raises_its_descriptor_limit_and_apps_get_the_original() {
    let Some(hard) = hard_limit(8192) else {
        return;
    };
    let b = Baton::builder()
        .via_shell(&limits(1024, hard))
        .run_args(["--listen", "127.0.0.1:0"])
        .start();
    b.wait_for_event("ready", 1);
    let hard = hard.to_string();
    assert_eq!(support::nofile_of(b.pid()), (hard.clone(), hard.clone()));
    assert_eq!(support::nofile_of(b.gen_pid(1)), ("1024".to_owned(), hard));
    let json = b.status_json();
    assert_eq!(json["guard"]["app_descriptors_limit"], 1024);
}

#[test]
fn thousands_of_idle_clients_on_the_port_and_the_control_socket_lock_nobody_out() {
    if support::in_own_network(concat!(
        module_path!(),
        "::thousands_of_idle_clients_on_the_port_and_the_control_socket_lock_nobody_out"
    )) {
        return;
    }
    // Soft limit 1 024 (systemd's default), hard 16 384: 3 000 idle clients
    // on the public port and 3 000 on the control socket at once.
    let Some(hard) = hard_limit(16_384) else {
        return;
    };
    if support::raise_own_nofile() < 7000 {
        eprintln!("skipped: this test process needs 7 000 descriptors");
        return;
    }
    let b = Baton::builder()
        .via_shell(&limits(1024, hard))
        .run_args(["--proxy", "http", "--listen", "127.0.0.1:0"])
        .app_args(["--listen", "127.0.0.1:{port}"])
        .start();
    b.wait_for_event("ready", 1);
    let idle_public = support::idle_clients(b.port(), 3000);
    let idle_control: Vec<UnixStream> = (0..3000)
        .map(|i| UnixStream::connect(&b.control).unwrap_or_else(|e| panic!("control {i}: {e}")))
        .collect();
    let t = Instant::now();
    let reply = get(b.port(), "/", LONG).expect("a request among idle clients");
    assert_eq!(reply.status, 200);
    let request_ms = t.elapsed().as_millis();
    let t = Instant::now();
    let proxy = support::connections(&b, "proxy").expect("status answers");
    let status_ms = t.elapsed().as_millis();
    // The public clients fit under the cap and are still open (the header
    // timeout is 10 s); the control socket made room by closing its silent
    // ones.
    assert!(proxy["open"].as_u64() >= Some(3000), "{proxy}");
    let control = support::connections(&b, "control").expect("status answers");
    assert!(control["evicted"].as_u64() > Some(0), "{control}");
    eprintln!(
        "with 3000 + 3000 idle clients: a request took {request_ms} ms, status {status_ms} ms"
    );
    drop((idle_public, idle_control));
}

#[test]
fn with_no_descriptors_to_spare_idle_clients_cannot_stop_service_or_restarts() {
    if support::in_own_network(concat!(
        module_path!(),
        "::with_no_descriptors_to_spare_idle_clients_cannot_stop_service_or_restarts"
    )) {
        return;
    }
    // Hard limit 1 024: nothing to raise. 1 500 idle clients are more than
    // the proxy's share of descriptors.
    if support::raise_own_nofile() < 2000 {
        eprintln!("skipped: this test process needs 2 000 descriptors");
        return;
    }
    let b = Baton::builder()
        .via_shell(&limits(1024, 1024))
        .run_args(["--proxy", "http", "--listen", "127.0.0.1:0"])
        .run_args(["--header-timeout", "2s"])
        .app_args(["--listen", "127.0.0.1:{port}"])
        .start();
    b.wait_for_event("ready", 1);
    let idle = support::idle_clients(b.port(), 1500);
    let proxy = support::connections(&b, "proxy").expect("status answers");
    assert!(proxy["max"].as_u64() < Some(1024), "{proxy}");
    // The app dies: it is restarted (spawning needs descriptors too).
    support::send(b.gen_pid(1), rustix::process::Signal::KILL);
    b.wait_for_event("ready", 2);
    let reply = get(b.port(), "/", LONG).expect("served among idle clients");
    assert_eq!(reply.status, 200);
    // Every idle client is cut, by eviction or by the header timeout.
    wait_until("every idle client was closed", LONG, || {
        idle.iter().all(support::closed_by_server)
    });
    let proxy = support::connections(&b, "proxy").expect("status answers");
    let cut =
        proxy["evicted"].as_u64().unwrap_or(0) + proxy["header_timeouts"].as_u64().unwrap_or(0);
    assert!(cut >= 1500, "{proxy}");
    assert!(!pid_gone(b.pid()), "baton exited\n{}", b.dump());
}

#[test]
fn slowloris_clients_are_cut_at_the_header_timeout_and_others_are_served() {
    if support::in_own_network(concat!(
        module_path!(),
        "::slowloris_clients_are_cut_at_the_header_timeout_and_others_are_served"
    )) {
        return;
    }
    let b = Baton::behind_proxy("http", &["--header-timeout", "2s"], &[]);
    let load = Load::start(b.port(), 2, 100_000, Duration::from_secs(60));
    // 300 clients sending their request head a byte at a time, a byte every
    // 200 ms per client: none would ever finish within a minute.
    let mut slow: Vec<Option<TcpStream>> = support::idle_clients(b.port(), 300)
        .into_iter()
        .map(Some)
        .collect();
    let head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ";
    let started = Instant::now();
    let mut sent = 0;
    while slow.iter().any(Option::is_some) && started.elapsed() < LONG {
        let byte = [head.get(sent).copied().unwrap_or(b'a')];
        sent += 1;
        for slot in &mut slow {
            let Some(stream) = slot else { continue };
            if support::closed_by_server(stream) || stream.write_all(&byte).is_err() {
                *slot = None;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let cut_after = started.elapsed();
    assert!(
        slow.iter().all(Option::is_none),
        "slow clients still open after {cut_after:?}"
    );
    let (ok, failures, _) = load.finish();
    support::assert_no_failures(ok, &failures);
    let proxy = support::connections(&b, "proxy").expect("status");
    assert!(proxy["header_timeouts"].as_u64() >= Some(300), "{proxy}");
    eprintln!("300 slow clients cut after {cut_after:?}; {ok} other requests served");
}

#[test]
fn an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not() {
    let b = Baton::behind_proxy("http", &["--idle-timeout", "1s"], &[]);
    let request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    // Busy: a request every 200 ms for 2 s, all on one connection.
    let mut busy = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    let mut reader = std::io::BufReader::new(busy.try_clone().expect("clone"));
    for i in 0..10 {
        busy.write_all(request).expect("write");
        read_response(&mut reader).unwrap_or_else(|e| panic!("request {i}: {e}"));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Idle: after its answer, the connection is closed by baton.
    let mut idle = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    idle.write_all(request).expect("write");
    let mut idle_reader = std::io::BufReader::new(idle.try_clone().expect("clone"));
    read_response(&mut idle_reader).expect("answer");
    idle.set_read_timeout(Some(LONG)).expect("timeout");
    let mut rest = Vec::new();
    let n = idle_reader
        .read_to_end(&mut rest)
        .expect("closed, not reset");
    assert_eq!(n, 0, "unexpected bytes: {rest:?}");
    let proxy = support::connections(&b, "proxy").expect("status");
    assert!(proxy["idle_timeouts"].as_u64() >= Some(1), "{proxy}");
}

/// Reads one response with a Content-Length body.
fn read_response(reader: &mut std::io::BufReader<TcpStream>) -> Result<String, String> {
    use std::io::BufRead;
    let mut status = String::new();
    reader.read_line(&mut status).map_err(|e| e.to_string())?;
    if status.is_empty() {
        return Err("closed".into());
    }
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().map_err(|_| "bad length".to_owned())?;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(status)
}

#[test]
fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let b = Baton::behind_proxy("http", &[], &[]);
    let mut s = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    s.set_read_timeout(Some(LONG)).expect("timeout");
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("write");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
}

#[test]
fn a_request_the_app_never_answers_gets_504_and_is_not_sent_again() {
    let b = Baton::behind_proxy(
        "http",
        &["--upstream-timeout", "1s", "--metrics", "127.0.0.1:0"],
        &[],
    );
    let reply = get(b.port(), "/slow?ms=3000", LONG).expect("an answer");
    assert_eq!(reply.status, 504, "{reply:?}");
    assert!(reply.body.contains("--upstream-timeout"), "{reply:?}");
    let metrics = scrape(&b);
    assert_eq!(
        metric(&metrics, "baton_proxy_upstream_timeouts_total"),
        Some(1)
    );
    assert_eq!(metric(&metrics, "baton_proxy_retries_total"), Some(0));
    // The next request is served as usual.
    assert_eq!(get(b.port(), "/", LONG).expect("answer").status, 200);
}

/// `/metrics` of a baton started with `--metrics 127.0.0.1:0`.
fn scrape(b: &Baton) -> String {
    let line = b.wait_for("metrics", |l| support::is_event(l, "metrics"), LONG);
    let addr: std::net::SocketAddr = support::field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .expect("metrics address");
    get(addr.port(), "/metrics", LONG).expect("metrics").body
}

/// An unlabelled value in Prometheus text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

#[test]
fn pooled_connections_to_the_app_close_after_the_idle_timeout() {
    let b = Baton::behind_proxy("http", &["--idle-timeout", "1s"], &[]);
    let app = b.gen_pid(1);
    let baseline = sockets_of(app);
    // Eight concurrent clients leave up to eight pooled connections.
    let load = Load::start(b.port(), 8, 20, LONG);
    let (ok, failures, _) = load.finish_when_done();
    support::assert_no_failures(ok, &failures);
    wait_until("the pooled connections were closed", LONG, || {
        sockets_of(app) <= baseline
    });
}

/// Sockets open in process `pid`.
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|t| t.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_listener_an_app_shuts_down_is_re_armed() {
    // (A port the kernel chose is given up by the shutdown and bound
    // again: in a namespace of its own no other test can take it between.)
    if support::in_own_network(concat!(
        module_path!(),
        "::a_listener_an_app_shuts_down_is_re_armed"
    )) {
        return;
    }
    // Generation 1 shuts down the inherited listeners when it exits (some
    // servers do, on close), which would stop them for everyone.
    let dir = tempfile::tempdir().expect("tempdir");
    let unix = dir.path().join("app.sock");
    let faults = dir.path().join("faults");
    std::fs::write(&faults, "--shutdown-listeners").expect("faults file");
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .run_args(["--listen".into(), format!("unix:{}", unix.display())])
        .app_args(["--faults-file".into(), faults.display().to_string()])
        .start();
    b.wait_for_event("ready", 1);
    let port = b.port();
    std::fs::remove_file(&faults).expect("only generation 1 misbehaves");
    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    // Generation 1 exits after its drain, shutting both sockets down: the
    // TCP one listens again; the Unix one is replaced, which a new
    // generation (3) serves.
    b.wait_for_event("exit", 1);
    wait_until("both listeners re-armed", LONG, || {
        b.guard("listener_rearms").is_some_and(|n| n >= 2)
    });
    b.wait_for_event("ready", 3);
    let reply = get(port, "/", LONG).unwrap_or_else(|e| panic!("TCP: {e}\n{}", b.dump()));
    assert_eq!(reply.status, 200);
    let mut s = UnixStream::connect(&unix).expect("the Unix socket listens");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // Generation 2 saw its sockets hang up under it; it still drains and
    // exits on its own (the library's accept loop does not spin on the
    // stale hang-up), rather than at the SIGKILL.
    let exit = b.wait_for_event("exit", 2);
    assert_eq!(support::field(&exit, "status"), Some("0"), "{exit}");
    // And reloads go on working.
    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
}

#[test]
fn resources_stay_flat_over_300_reloads_with_20_000_time_wait_sockets() {
    if !support::long("300 reloads with 20 000 TIME_WAIT sockets") {
        return;
    }
    // In a network namespace of the test's own, so that the TIME_WAIT
    // sockets disturb nothing else.
    let python = "/usr/bin/python3";
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    if !support::peer("unshare", "util-linux")
        || !support::peer("nsenter", "util-linux")
        || !support::peer("ip", "iproute2")
        || !support::peer_at(python, "python3")
    {
        return;
    }
    let b = Baton::builder()
        .via_shell("exec unshare --net sh -c 'ip link set lo up && exec \"$0\" \"$@\"' \"$@\"")
        .run_args(["--listen", "127.0.0.1:0"])
        .start();
    b.wait_for_event("ready", 1);
    let pid = b.pid();
    let netns = format!("--net=/proc/{pid}/ns/net");
    // 22 000 connections opened and closed client-first: each leaves a
    // TIME_WAIT socket for a minute (in this namespace, loopback connects
    // may not reuse them early).
    let churn = "import socket\n\
        open('/proc/sys/net/ipv4/tcp_tw_reuse','w').write('0')\n\
        l=socket.socket(); l.bind(('127.0.0.1',0)); l.listen(4096)\n\
        for i in range(22000):\n    \
            c=socket.create_connection(l.getsockname()); s,_=l.accept(); c.close(); s.close()\n";
    let status = std::process::Command::new("nsenter")
        .args([netns.as_str(), python, "-c", churn])
        .status()
        .expect("nsenter");
    assert!(status.success());
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).expect("tcp table");
    let time_wait = table
        .lines()
        .filter(|l| l.split_whitespace().nth(3) == Some("06"))
        .count();
    assert!(time_wait >= 20_000, "{time_wait} TIME_WAIT sockets");

    let measure = || {
        (
            support::proc_status(pid, "RssAnon").expect("RssAnon"),
            support::fd_count(pid),
            support::proc_status(pid, "Threads").expect("Threads"),
        )
    };
    // A few reloads first, so that one-time allocations are behind us.
    for _ in 0..10 {
        assert_eq!(b.ctl(&["reload"]).code, Some(0));
    }
    let (anon_before, fds_before, _) = measure();
    let started = Instant::now();
    for i in 0..300 {
        let out = b.ctl(&["reload"]);
        assert_eq!(out.code, Some(0), "reload {i}: {out:?}");
    }
    let took = started.elapsed();
    wait_until("the last retired generation exited", LONG, || {
        b.status_json()["generations"].as_array().map(Vec::len) == Some(1)
    });
    // (A control connection may still be closing: wait for it.)
    wait_until("descriptors back where they were", LONG, || {
        support::fd_count(pid) <= fds_before
    });
    let (anon_after, fds_after, threads) = measure();
    eprintln!(
        "300 reloads in {took:?} with {time_wait} TIME_WAIT sockets: RssAnon {anon_before} -> {anon_after} kB, \
         fds {fds_before} -> {fds_after}, threads {threads}"
    );
    assert!(
        anon_after < anon_before + 2048,
        "anonymous memory grew from {anon_before} to {anon_after} kB"
    );
    assert!(fds_after <= fds_before);
    assert!(threads <= 8, "{threads} threads");
    assert!(support::zombies_of(pid).is_empty());
}

#[test]
fn a_control_connection_must_send_its_request_in_time_but_may_wait_for_its_answer() {
    // The generation after the first takes longer to start than a control
    // client may take to send its request: waiting for the answer is not
    // idleness.
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = dir.path().join("faults");
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .app_args(["--faults-file".into(), faults.display().to_string()])
        .start();
    b.wait_for_event("ready", 1);
    std::fs::write(&faults, "--startup 6s").expect("faults file");
    // A client that sends half a request and stops is closed.
    let mut stalled = UnixStream::connect(&b.control).expect("connect");
    stalled.write_all(b"{\"Sta").expect("write");
    stalled.set_read_timeout(Some(LONG)).expect("timeout");
    let mut rest = Vec::new();
    stalled.read_to_end(&mut rest).expect("closed by baton");
    assert!(rest.is_empty(), "{rest:?}");
    // A reload that takes longer than that still gets its answer.
    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
}

#[test]
fn a_tcp_relay_that_moves_nothing_is_closed_after_the_idle_timeout() {
    let b = Baton::behind_proxy(
        "tcp",
        &["--idle-timeout", "1s", "--metrics", "127.0.0.1:0"],
        &[],
    );
    let mut silent = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    silent.set_read_timeout(Some(LONG)).expect("timeout");
    let mut rest = Vec::new();
    silent.read_to_end(&mut rest).expect("closed by baton");
    assert!(rest.is_empty());
    wait_until("the idle relay counted", LONG, || {
        metric(&scrape(&b), "baton_proxy_idle_relays_total") == Some(1)
    });
    // A relay in use is not cut.
    let reply = get(b.port(), "/", LONG).expect("served");
    assert_eq!(reply.status, 200);
}

#[test]
fn an_upload_slower_than_the_upstream_timeout_is_answered() {
    // The upstream timeout counts from the end of the body: a client that
    // takes 2 s to send its body (a part every 400 ms) to an app that
    // answers once it has it all gets that answer with a 1 s timeout.
    let b = Baton::behind_proxy("http", &["--upstream-timeout", "1s"], &[]);
    let mut s = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    s.set_read_timeout(Some(LONG)).expect("timeout");
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\n",
    )
    .expect("head");
    for byte in b"hello" {
        std::thread::sleep(Duration::from_millis(400));
        s.write_all(&[*byte]).expect("a part of the body");
    }
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("5 bytes"), "{answer:?}");
}

#[test]
fn an_app_that_shuts_its_listener_at_every_exit_does_not_cause_a_reload_loop() {
    if support::in_own_network(concat!(
        module_path!(),
        "::an_app_that_shuts_its_listener_at_every_exit_does_not_cause_a_reload_loop"
    )) {
        return;
    }
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .app_args(["--shutdown-listeners", "--drain", "1s"])
        .start();
    b.wait_for_event("ready", 1);
    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    b.wait_for_event("exit", 1);
    wait_until("the listener re-armed", LONG, || {
        b.guard("listener_rearms").is_some_and(|n| n >= 1)
    });
    assert_eq!(get(b.port(), "/", LONG).expect("served").status, 200);
    // The next reload makes generation 3: re-arming a TCP listener started
    // no generation of its own.
    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(b.status_json()["serving"], 3, "{}", b.dump());
}

#[test]
fn a_head_started_late_on_a_keep_alive_connection_gets_the_header_timeout() {
    let b = Baton::behind_proxy(
        "http",
        &["--header-timeout", "1s", "--idle-timeout", "1m"],
        &[],
    );
    let mut s = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    let mut reader = std::io::BufReader::new(s.try_clone().expect("clone"));
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    read_response(&mut reader).expect("first answer");
    // Half a head, then nothing: cut by the header timeout, long before the
    // idle timeout of a minute.
    s.write_all(b"GET / HT").expect("write");
    s.set_read_timeout(Some(LONG)).expect("timeout");
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let proxy = support::connections(&b, "proxy").expect("status");
    assert_eq!(proxy["header_timeouts"], 1, "{proxy}");
    assert_eq!(proxy["idle_timeouts"], 0, "{proxy}");
}
