//! Proxy mode: apps that bind their own port (`$PORT`), behind baton.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::{Baton, KeepAlive, LONG, Load, get, pid_gone, wait_until};

/// baton --proxy MODE in front of the demo app, which binds `{port}`.
fn behind(mode: &str, run_args: &[&str], app_args: &[&str]) -> Baton {
    Baton::behind_proxy(mode, run_args, app_args)
}

#[test]
fn http_keep_alive_clients_lose_nothing_even_when_the_app_closes_idle_connections_at_once() {
    // --idle-grace 0ms: the app closes idle keep-alive connections the
    // moment it drains, as Go's http.Server.Shutdown does.
    let b = behind("http", &[], &["--startup", "50ms", "--idle-grace", "0ms"]);
    let load = KeepAlive::start(b.port(), 8, Duration::from_secs(120));
    support::reload_through(&b, 2..=11, &load);
    let tally = load.finish();
    support::assert_no_failures(tally.ok, &tally.failures);
    // The clients' connections belong to baton: none was closed under them.
    assert!(
        tally.connections <= 8,
        "{} connections for 8 clients",
        tally.connections
    );
    eprintln!(
        "{} requests on {} client connections across 10 reloads",
        tally.ok, tally.connections
    );
}

#[test]
fn http_new_connection_clients_lose_nothing_and_every_generation_serves() {
    let b = behind("http", &[], &["--startup", "20ms"]);
    let load = Load::start(b.port(), 4, 50_000, Duration::from_secs(120));
    support::reload_through(&b, 2..=21, &load);
    let (ok, failures, _) = load.finish();
    support::assert_no_failures(ok, &failures);
}

#[test]
fn http_forwarding_headers_and_host_are_set() {
    let b = behind("http", &[], &[]);
    let reply = get(b.port(), "/headers", LONG).expect("answer");
    let body = reply.body.to_ascii_lowercase();
    assert!(body.contains("host: 127.0.0.1\n"), "{body}");
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(
        body.contains("forwarded: for=127.0.0.1;proto=http;host=\"127.0.0.1\"\n"),
        "{body}"
    );
    assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
    assert!(
        !body.contains("connection: close"),
        "hop-by-hop headers stay with baton: {body}"
    );
    assert_eq!(reply.generation, Some(1));
}

/// `method path` with `body` on a new connection; the whole raw answer.
fn exchange(port: u16, head: &str, body: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(LONG)).expect("timeout");
    s.write_all(head.as_bytes()).expect("head");
    s.write_all(body).expect("body");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn http_large_bodies_stream_both_ways() {
    let b = behind("http", &[], &[]);
    let n = 32 << 20;
    let down = exchange(
        b.port(),
        &format!("GET /bytes?n={n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        b"",
    );
    let split = down
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head")
        + 4;
    assert_eq!(down.len() - split, n, "the whole download");
    assert!(
        down[split..]
            .iter()
            .enumerate()
            .all(|(i, c)| *c == b'a' + (i % 26) as u8)
    );

    let upload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let sum: u64 = upload.iter().map(|b| u64::from(*b)).sum();
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    );
    let up = String::from_utf8_lossy(&exchange(b.port(), &head, &upload)).into_owned();
    assert!(up.contains(&format!("{n} bytes, sum {sum}")), "{up}");
}

#[test]
fn http_upgrades_are_spliced() {
    let b = behind("http", &[], &[]);
    let mut s = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    s.set_read_timeout(Some(LONG)).expect("timeout");
    s.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).expect("read"),
            1,
            "{}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for message in [
        &b"ping"[..],
        b"a longer message over the upgraded connection",
    ] {
        s.write_all(message).expect("write");
        let mut echo = vec![0u8; message.len()];
        s.read_exact(&mut echo).expect("echo");
        assert_eq!(echo, message);
    }
}

#[test]
fn a_broken_upstream_response_closes_the_client_connection_and_is_counted() {
    let port = support::free_port();
    let b = behind("http", &["--metrics", &format!("127.0.0.1:{port}")], &[]);
    let got = exchange(b.port(), "GET /broken HTTP/1.1\r\nHost: x\r\n\r\n", b"");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let split = got.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    assert!(got.len() - split < 1 << 20, "cut short, not completed");
    wait_until("the error is counted", LONG, || {
        get(port, "/metrics", LONG)
            .map(|r| r.body.contains("baton_proxy_upstream_errors_total 1"))
            .unwrap_or(false)
    });
}

#[test]
fn an_app_that_ignores_port_is_rolled_back_with_a_clear_reason() {
    let other = support::free_port();
    let builder = Baton::builder();
    let faults = builder.dir().join("faults");
    let b = builder
        .run_args([
            "--proxy",
            "http",
            "--listen",
            "127.0.0.1:0",
            "--health-timeout",
            "2s",
        ])
        .app_args(["--listen", "127.0.0.1:{port}", "--faults-file"])
        .app_args([faults.clone()])
        .start();
    b.wait_for_event("ready", 1);
    let old = b.gen_pid(1);
    // The next generation listens on a fixed port of its own instead.
    std::fs::write(&faults, format!("--bind 127.0.0.1:{other}")).expect("faults");
    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    for needle in [
        "was not ready within 2s",
        "in proxy mode it must listen on 127.0.0.1:$PORT",
        &format!("bound 127.0.0.1:{other} itself"),
    ] {
        assert!(out.stderr.contains(needle), "{needle:?} in {}", out.stderr);
    }
    assert_eq!(
        get(b.port(), "/", LONG).expect("still served").pid,
        Some(old)
    );
}

#[test]
fn a_crashed_generation_behind_the_proxy_is_replaced_while_clients_wait() {
    let b = behind("http", &[], &["--startup", "200ms"]);
    support::send(b.gen_pid(1), rustix::process::Signal::KILL);
    let reply = get(b.port(), "/", LONG).expect("answered by the replacement");
    assert_eq!(reply.generation, Some(2), "{reply:?}\n{}", b.dump());
}

#[test]
fn tcp_relays_reload_without_failures_and_keep_connections_on_their_generation() {
    let b = behind("tcp", &[], &["--startup", "20ms"]);
    let port = b.port();
    // A keep-alive connection opened now stays with generation 1.
    let mut pinned = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    pinned.set_read_timeout(Some(LONG)).expect("timeout");
    let ask = |s: &mut TcpStream| -> String {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(ask(&mut pinned).contains("generation 1"));

    let load = Load::start(port, 4, 50_000, Duration::from_secs(120));
    support::reload_through(&b, 2..=11, &load);
    let (ok, failures, _) = load.finish();
    support::assert_no_failures(ok, &failures);

    // Still generation 1 on the pinned connection; it is not stopped while
    // the connection lasts, and is once it closes.
    assert!(ask(&mut pinned).contains("generation 1"));
    let first = b.gen_pid(1);
    assert!(!pid_gone(first));
    drop(pinned);
    wait_until(
        "generation 1 stopped after its last connection",
        LONG,
        || pid_gone(first),
    );
}

#[test]
fn http_forwarding_headers_cannot_be_spoofed_and_chains_are_kept() {
    let b = behind("http", &[], &[]);
    let head = "GET /headers HTTP/1.1\r\nHost: a.b:8080\r\nX-Forwarded-Proto: https\r\n\
                X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\nConnection: close\r\n\r\n";
    let got = String::from_utf8_lossy(&exchange(b.port(), head, b"")).to_ascii_lowercase();
    assert!(got.contains("x-forwarded-proto: http\n"), "{got}");
    assert!(
        got.contains("x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\n"),
        "{got}"
    );
    assert!(
        got.contains("forwarded: for=127.0.0.1;proto=http;host=\"a.b:8080\"\n"),
        "{got}"
    );
}

#[test]
fn http_hosts_are_required_or_made_and_underscore_headers_are_dropped_unless_kept() {
    let b = behind("http", &[], &[]);
    // HTTP/1.1 without Host: refused, never the app's.
    let got = String::from_utf8_lossy(&exchange(b.port(), "GET /headers HTTP/1.1\r\n\r\n", b""))
        .to_ascii_lowercase();
    assert!(got.starts_with("http/1.1 400"), "{got}");
    // HTTP/1.0 without Host: the app gets the address the client reached.
    let got = String::from_utf8_lossy(&exchange(b.port(), "GET /headers HTTP/1.0\r\n\r\n", b""))
        .to_ascii_lowercase();
    assert!(got.starts_with("http/1.1 200"), "{got}");
    assert!(
        got.contains(&format!("host: 127.0.0.1:{}\n", b.port())),
        "{got}"
    );
    // A name with an underscore is dropped: CGI-style apps would read it
    // as the X-Forwarded-Proto that baton sets.
    let head = "GET /headers HTTP/1.1\r\nHost: x\r\nX_Forwarded_Proto: https\r\nX-Kept: 1\r\n\
                Connection: close\r\n\r\n";
    let got = String::from_utf8_lossy(&exchange(b.port(), head, b"")).to_ascii_lowercase();
    assert!(!got.contains("x_forwarded_proto"), "{got}");
    assert!(got.contains("x-kept: 1\n"), "{got}");
    let kept = behind("http", &["--keep-underscore-headers"], &[]);
    let got = String::from_utf8_lossy(&exchange(kept.port(), head, b"")).to_ascii_lowercase();
    assert!(got.contains("x_forwarded_proto: https\n"), "{got}");
}

#[test]
fn a_long_lived_connection_does_not_hold_the_stop_signal_past_half_the_stop_timeout() {
    let b = behind("tcp", &["--stop-timeout", "4s"], &[]);
    let mut pinned = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    pinned.set_read_timeout(Some(LONG)).expect("timeout");
    pinned
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut buf = [0u8; 512];
    assert!(pinned.read(&mut buf).expect("read") > 0);
    assert_eq!(b.ctl(&["reload"]).code, Some(0));
    // The connection stays open; the old generation still gets its SIGTERM
    // (at 2 s), drains, and exits before the 4 s SIGKILL.
    let line = b.wait_for(
        "the held signal sent",
        |l| l.contains("still busy after the drain wait"),
        LONG,
    );
    assert!(line.contains("generation=1"), "{line}");
    let exit = b.wait_for_event("exit", 1);
    assert_eq!(
        support::field(&exit, "status"),
        Some("0"),
        "drained, not killed: {exit}"
    );
    assert!(!b.has_event("kill", 1));
    drop(pinned);
}

#[test]
fn an_app_on_the_wrong_port_gets_proxy_advice_once() {
    // Python's http.server told to bind a fixed port, not $PORT, as a new
    // user would: proxy-mode advice, once, never socket-passing advice.
    let python = "/usr/bin/python3";
    if !support::peer_at(python, "python3") {
        return;
    }
    let port = support::free_port().to_string();
    let mut b = Baton::builder()
        .run_args(["--proxy", "http", "--listen", "127.0.0.1:0"])
        .run_args(["--health-timeout", "3s"])
        .command([python, "-m", "http.server", &port, "--bind", "127.0.0.1"])
        .start();
    // Never healthy on its private port: the first generation fails.
    assert_eq!(b.wait_exit(LONG).code(), Some(1), "{}", b.dump());
    let lines = b.lines();
    let advice: Vec<&String> = lines
        .iter()
        .filter(|l| support::is_event(l, "listens"))
        .collect();
    assert_eq!(advice.len(), 1, "{advice:#?}");
    assert!(
        advice[0].contains(&format!("127.0.0.1:{port}")),
        "{advice:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("LISTEN_FDS")),
        "socket-passing advice in proxy mode:\n{}",
        b.dump()
    );
    let rollback = b.wait_for_event("rollback", 1);
    assert!(rollback.contains("127.0.0.1:$PORT"), "{rollback}");
}

#[test]
fn a_first_generation_that_binds_its_own_port_is_pointed_to_proxy_mode() {
    // Socket mode: an app that ignores LISTEN_FDS and never notifies.
    let python = "/usr/bin/python3";
    if !support::peer_at(python, "python3") {
        return;
    }
    let port = support::free_port().to_string();
    let mut b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--ready-timeout", "2s"])
        .command([python, "-m", "http.server", &port, "--bind", "127.0.0.1"])
        .start();
    assert_eq!(b.wait_exit(LONG).code(), Some(1), "{}", b.dump());
    b.wait_for_event("rollback", 1);
    let hint = b.wait_for("the hint", |l| support::is_event(l, "hint"), LONG);
    assert!(hint.contains(&format!("127.0.0.1:{port}")), "{hint}");
    assert!(hint.contains("--proxy http"), "{hint}");
}

#[test]
fn an_app_that_binds_its_own_port_is_named_early_and_baton_s_sockets_never_are() {
    let python = "/usr/bin/python3";
    if !support::peer_at(python, "python3") {
        return;
    }
    let port = support::free_port().to_string();
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--ready-timeout", "60s"])
        .command([python, "-m", "http.server", &port, "--bind", "127.0.0.1"])
        .start();
    // Long before the ready timeout: the port it bound, and what to do.
    let warning = b.wait_for(
        "the early warning",
        |l| support::is_event(l, "listens"),
        LONG,
    );
    assert!(warning.contains(&format!("127.0.0.1:{port}")), "{warning}");
    assert!(warning.contains("--proxy http"), "{warning}");
    assert!(
        !warning.contains(&format!("127.0.0.1:{}", b.port())),
        "baton's own socket is not the app's: {warning}"
    );
    // And what baton still waits for, with the time left.
    let waiting = b.wait_for("the reminder", |l| support::is_event(l, "waiting"), LONG);
    assert!(waiting.contains("READY=1"), "{waiting}");
    assert!(support::field(&waiting, "left_s").is_some(), "{waiting}");
}

#[test]
fn in_proxy_mode_an_app_that_ignores_port_is_named_early() {
    let mut b = Baton::builder()
        .run_args([
            "--proxy",
            "http",
            "--listen",
            "127.0.0.1:0",
            "--health-timeout",
            "60s",
        ])
        .app_args(["--bind", "127.0.0.1:0"])
        .start();
    let waiting = b.wait_for("the reminder", |l| support::is_event(l, "waiting"), LONG);
    assert!(waiting.contains("nothing listens yet"), "{waiting}");
    b.signal(rustix::process::Signal::TERM);
    b.wait_exit(LONG);
}

/// A `--proxy tcp` app that echoes what each connection sends and keeps
/// it open until the client closes.
const ECHO_APP: &str = "import os, socket, threading\n\
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen(64)\n\
def echo(c):\n\
\x20   while True:\n\
\x20       d = c.recv(65536)\n\
\x20       if not d: return\n\
\x20       c.sendall(d)\n\
while True:\n\
\x20   c, _ = s.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()\n";

/// A connection through `port` that sent `opening` and got it echoed.
fn relayed(port: u16, opening: &[u8]) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(LONG)).expect("timeout");
    c.write_all(opening).expect("write");
    let mut back = vec![0u8; opening.len()];
    c.read_exact(&mut back).expect("echoed");
    c
}

#[test]
fn tcp_http2_connections_do_not_hold_the_drain_and_others_hold_it_for_the_drain_wait() {
    if !support::peer("python3", "python3") {
        return;
    }
    let b = Baton::builder()
        .run_args(["--proxy", "tcp", "--listen", "127.0.0.1:0"])
        .run_args(["--drain-wait", "3s", "--stop-timeout", "20s"])
        .command(["python3", "-c", ECHO_APP])
        .start();
    b.wait_for_event("ready", 1);
    // An HTTP/2 connection (the preface) on generation 1: at the reload its
    // generation gets the stop signal at once (its own graceful stop would
    // send GOAWAY), with the connection still open.
    let h2 = relayed(b.port(), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert_eq!(b.ctl(&["reload"]).code, Some(0), "{}", b.dump());
    let line = b.stop_signal_line(1);
    assert!(
        support::field(&line, "drained_after_ms").is_some(),
        "{line}"
    );
    // Any other byte stream holds its generation until the drain wait.
    let plain = relayed(b.port(), b"HELLO\r\n");
    assert_eq!(b.ctl(&["reload"]).code, Some(0), "{}", b.dump());
    let line = b.stop_signal_line(2);
    assert_eq!(support::field(&line, "in_flight"), Some("1"), "{line}");
    let waited: u64 = support::field(&line, "waited_ms")
        .and_then(|v| v.parse().ok())
        .expect("waited_ms");
    assert!(waited >= 3000, "held for the drain wait: {line}");
    drop((h2, plain));
}

#[test]
fn tcp_a_client_that_resets_its_connection_takes_the_relay_to_the_app_with_it() {
    if !support::peer("python3", "python3") {
        return;
    }
    // The app never closes a connection of its own accord: before, a
    // reset client left the relay (and its generation's drain) waiting
    // on the app until the idle timeout.
    let b = Baton::builder()
        .run_args(["--proxy", "tcp", "--listen", "127.0.0.1:0"])
        .command(["python3", "-c", ECHO_APP])
        .start();
    b.wait_for_event("ready", 1);
    let open = || support::connections(&b, "proxy").and_then(|c| c["open"].as_u64());
    for _ in 0..4 {
        let c = relayed(b.port(), b"HELLO\r\n");
        rustix::net::sockopt::set_socket_linger(&c, Some(Duration::ZERO)).expect("linger");
        drop(c); // a reset
    }
    wait_until("the relays of reset clients are closed", LONG, || {
        open() == Some(0)
    });
}
