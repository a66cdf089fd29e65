//! The proxy never hands one client's answer to another, whatever the app
//! sends: bodies after answers that have none (HEAD, 204, 304), bytes
//! after an answer's length, answers before the end of a request body,
//! bytes on an idle connection. A raw app (Python, a socket and nothing
//! else) misbehaves on request while other clients check that every answer
//! carries their own token. Also: the gunicorn HEAD race, and a seeded fuzz
//! of whole exchanges.

use crate::support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::{Baton, LONG};

/// A raw HTTP/1.1 app on `$PORT`, misbehaving on request. The path names
/// what it does, `t=` is the client's token and `d=` a delay in ms:
/// - `/ok`: `tok=TOKEN`, with `X-Conn:` the app's number for the
///   connection;
/// - `/head` (to HEAD): a head with a length, then after the delay a body
///   that reads as a whole forged answer;
/// - `/204`, `/304`: the answer, then after the delay a forged answer;
/// - `/extra`: a correct answer, then after the delay a forged one (with
///   no delay, in the same write);
/// - `/early` (POST): answers before reading the body, reads it after the
///   delay, then sends a forged answer;
/// - `/count`: how many requests came before it.
///
/// In `$MARKS` it creates `sent-TOKEN` once a forged answer is sent and
/// `eof-TOKEN` when the connection that carried TOKEN's request is closed.
const APP: &str = r#"
import os, socket, threading, time
FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Injected: yes\r\n\r\nPOISONED"
MARKS = os.environ["MARKS"]
count = 0
conns = 0
lock = threading.Lock()

def mark(name):
    open(os.path.join(MARKS, name), "w").close()

def head(f):
    line = f.readline()
    while line in (b"\r\n", b"\n"):
        line = f.readline()
    if not line:
        return None
    method, target, _ = line.decode().split(" ", 2)
    headers = {}
    while True:
        h = f.readline()
        if h in (b"\r\n", b"\n"):
            return method, target, headers
        if not h:
            return None
        k, v = h.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()

def body(f, headers):
    if headers.get("transfer-encoding", "").lower() == "chunked":
        data = b""
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b""):
                    pass
                return data
            data += f.read(size)
            if f.read(2) != b"\r\n":
                raise ValueError("bad chunk")
    return f.read(int(headers.get("content-length", "0")))

def serve(c, cid):
    global count
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = c.makefile("rb")
    token = "-"
    try:
        while True:
            h = head(f)
            if h is None:
                break
            method, target, headers = h
            path, _, query = target.partition("?")
            params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            token = params.get("t", "-")
            delay = float(params.get("d", "0")) / 1000
            with lock:
                seen = count
                count += 1
            if path != "/early":
                body(f, headers)
            text = ("tok=" + token).encode()
            if path == "/count":
                text = str(seen).encode()
            ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Conn: %d\r\n\r\n%s" % (len(text), cid, text)
            if path == "/head":
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(FORGED))
            elif path in ("/204", "/304"):
                c.sendall(b"HTTP/1.1 %s Nothing\r\n\r\n" % path[1:].encode())
            elif path == "/early":
                c.sendall(ok)
                time.sleep(delay)
                body(f, headers)
            elif path == "/extra" and delay == 0:
                # In the same write as the answer.
                c.sendall(ok + FORGED)
                mark("sent-" + token)
                continue
            else:
                c.sendall(ok)
            if path in ("/head", "/204", "/304", "/extra", "/early"):
                if path != "/early":
                    time.sleep(delay)
                c.sendall(FORGED)
                mark("sent-" + token)
    except (OSError, ValueError):
        pass
    mark("eof-" + token)
    c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(128)
while True:
    c, _ = s.accept()
    conns += 1
    threading.Thread(target=serve, args=(c, conns), daemon=True).start()
"#;

/// The raw app behind `baton run --proxy http` with `extra` flags; the
/// app's marks go to the returned directory.
fn raw_app(extra: &[&str]) -> (Baton, tempfile::TempDir) {
    let marks = tempfile::tempdir().expect("marks");
    let mut args = vec!["--proxy", "http", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let b = Baton::builder()
        .run_args(args)
        .env("MARKS", marks.path())
        .command(["python3", "-c", APP])
        .start();
    b.wait_for_event("ready", 1);
    (b, marks)
}

fn connect(port: u16) -> BufReader<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(LONG)).expect("timeout");
    BufReader::new(s)
}

/// One answer: status, head (lower case), body. `None` if the connection
/// closed or broke first.
fn answer(r: &mut BufReader<TcpStream>, head_request: bool) -> Option<(u16, String, Vec<u8>)> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        head.push_str(&line.to_ascii_lowercase());
        if line == "\r\n" {
            break;
        }
    }
    let status = head.get(9..12)?.parse().ok()?;
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(Some(0), |n| n.trim().parse::<usize>().ok())?;
    let mut body = vec![0; if head_request { 0 } else { length }];
    r.read_exact(&mut body).ok()?;
    Some((status, head, body))
}

fn wait_mark(marks: &Path, name: &str) {
    support::wait_until(&format!("the app's mark {name}"), LONG, || {
        marks.join(name).exists()
    });
}

/// Clients that each keep one connection and send `GET /ok?t=…` until
/// told to stop (or a bounded number of times), checking that each answer
/// carries their own token.
struct Victims {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Victims {
    fn start(port: u16, n: usize, tag: &str) -> Victims {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|i| {
                let stop = Arc::clone(&stop);
                let tag = format!("{tag}v{i}");
                std::thread::spawn(move || {
                    let (mut ok, mut wrong) = (0, Vec::new());
                    let mut c = connect(port);
                    for k in 0..2_000 {
                        if stop.load(Ordering::SeqCst) && k > 0 {
                            break;
                        }
                        let token = format!("{tag}r{k}");
                        let request = format!("GET /ok?t={token} HTTP/1.1\r\nHost: x\r\n\r\n");
                        if c.get_mut().write_all(request.as_bytes()).is_err() {
                            wrong.push(format!("{token}: send failed"));
                            c = connect(port);
                            continue;
                        }
                        match answer(&mut c, false) {
                            Some((200, _, body)) if body == format!("tok={token}").as_bytes() => {
                                ok += 1
                            }
                            got => {
                                wrong.push(format!(
                                    "{token}: got {:?}",
                                    got.map(|(s, h, b)| (
                                        s,
                                        h,
                                        String::from_utf8_lossy(&b).into_owned()
                                    ))
                                ));
                                c = connect(port);
                            }
                        }
                    }
                    (ok, wrong)
                })
            })
            .collect();
        Victims { stop, threads }
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let (mut ok, mut wrong) = (0, Vec::new());
        for t in self.threads {
            let (o, w) = t.join().expect("victim");
            ok += o;
            wrong.extend(w);
        }
        (ok, wrong)
    }
}

/// Asserts that no answer was another client's (or failed).
fn all_their_own(ok: u64, wrong: &[String]) {
    assert!(
        wrong.is_empty(),
        "{} of {} answers were not the client's own, first: {:?}",
        wrong.len(),
        ok + wrong.len() as u64,
        &wrong[..wrong.len().min(5)]
    );
}

/// Sends one misbehaving request on `c` and reads its answer.
fn attack(c: &mut BufReader<TcpStream>, case: &str, token: &str, delay: u64) {
    let path = format!("/{case}?t={token}&d={delay}");
    match case {
        "head" => {
            let request = format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            c.get_mut().write_all(request.as_bytes()).expect("send");
            let (status, ..) = answer(c, true).expect("an answer to HEAD");
            assert_eq!(status, 200);
        }
        "early" => {
            // More than the kernel buffers of an untouched loopback
            // connection hold (the sender's 4 MiB at most, and the
            // receiver's, which grows only as the app reads): the answer
            // comes while baton still sends the body, and baton sees it.
            let n = 16 << 20;
            let mut upload = c.get_ref().try_clone().expect("clone");
            let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n");
            let sender = std::thread::spawn(move || {
                upload.write_all(head.as_bytes()).expect("head");
                upload.write_all(&vec![b'u'; n]).expect("body");
            });
            let (status, head, body) = answer(c, false).expect("an early answer");
            assert_eq!((status, body), (200, format!("tok={token}").into_bytes()));
            // baton saw the answer come before the body's end (it then
            // closes the client's connection): the premise of this case.
            assert!(head.contains("connection: close"), "{head}");
            sender.join().expect("sent");
        }
        _ => {
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            c.get_mut().write_all(request.as_bytes()).expect("send");
            let (status, ..) = answer(c, case != "extra").expect("an answer");
            assert!(matches!(status, 200 | 204 | 304), "{status}");
        }
    }
}

#[test]
fn answers_whose_end_cannot_be_proven_never_reach_another_client() {
    let (b, marks) = raw_app(&[]);
    let delays = [0, 1, 2, 5, 10, 20, 50, 75, 100];
    let (mut ok, mut wrong, mut runs) = (0, Vec::new(), 0);
    for case in ["head", "204", "304", "early"] {
        // Each early answer moves 16 MiB: fewer delays for it.
        let delays = if case == "early" {
            &[0, 1, 5, 20, 100][..]
        } else {
            &delays[..]
        };
        for &delay in delays {
            let tag = format!("{case}d{delay}");
            let victims = Victims::start(b.port(), 4, &tag);
            let mut c = connect(b.port());
            for i in 0..3 {
                let token = format!("{tag}a{i}");
                if case == "early" {
                    // An answer before the end of the body closes the
                    // client's connection.
                    c = connect(b.port());
                }
                attack(&mut c, case, &token, delay);
                // The forged answer is out while the victims still ask.
                wait_mark(marks.path(), &format!("sent-{token}"));
            }
            let (o, w) = victims.finish();
            ok += o;
            wrong.extend(w);
            runs += 1;
        }
    }
    assert!(runs >= 32 && ok > 0, "{runs} runs, {ok} answers");
    all_their_own(ok, &wrong);
    assert!(
        !b.lines().iter().any(|l| l.contains("panicked")),
        "{}",
        b.dump()
    );
}

#[test]
fn bytes_that_arrive_on_an_idle_connection_close_it_before_anyone_reuses_it() {
    // One proxy thread: the next request checks out the very connection
    // the bytes arrived on.
    let (b, marks) = raw_app(&["--proxy-threads", "1"]);
    let mut runs = 0;
    for delay in [0, 1, 2, 3, 5, 10, 15, 20, 35, 50, 75, 100] {
        for wait_for_close in [false, true] {
            let token = format!("x{delay}{wait_for_close}");
            let mut c = connect(b.port());
            let request = format!("GET /extra?t={token}&d={delay} HTTP/1.1\r\nHost: x\r\n\r\n");
            c.get_mut().write_all(request.as_bytes()).expect("send");
            let (status, _, body) = answer(&mut c, false).expect("answer");
            assert_eq!((status, body), (200, format!("tok={token}").into_bytes()));
            wait_mark(marks.path(), &format!("sent-{token}"));
            if wait_for_close {
                // Closed by baton while idle, with nobody asking.
                wait_mark(marks.path(), &format!("eof-{token}"));
            }
            // Before its checkout, or while pooled: either way, the next
            // client gets its own answer.
            let next = format!("{token}next");
            let request = format!("GET /ok?t={next} HTTP/1.1\r\nHost: x\r\n\r\n");
            c.get_mut().write_all(request.as_bytes()).expect("send");
            let (status, _, body) = answer(&mut c, false).expect("answer");
            assert_eq!(
                (status, String::from_utf8_lossy(&body).into_owned()),
                (200, format!("tok={next}")),
                "{}",
                b.dump()
            );
            runs += 1;
        }
    }
    assert_eq!(runs, 24);
    let stray = b.guard("stray_answers").expect("status");
    assert!(stray >= 24, "every stray answer counted: {stray}");
}

#[test]
fn a_broken_chunked_body_from_a_client_retires_the_app_connection() {
    let (b, _marks) = raw_app(&["--proxy-threads", "1"]);
    let conn_of = |c: &mut BufReader<TcpStream>, token: &str| -> String {
        let request = format!("GET /ok?t={token} HTTP/1.1\r\nHost: x\r\n\r\n");
        c.get_mut().write_all(request.as_bytes()).expect("send");
        let (status, head, _) = answer(c, false).expect("answer");
        assert_eq!(status, 200);
        head.lines()
            .find_map(|l| l.strip_prefix("x-conn: "))
            .expect("x-conn")
            .trim()
            .to_owned()
    };
    let mut c = connect(b.port());
    let first = conn_of(&mut c, "before");
    // The pooled connection carries the head and a chunk; then the
    // client's chunked framing breaks.
    let mut bad = connect(b.port());
    bad.get_mut()
        .write_all(
            b"POST /ok?t=bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\nZZ\r\nGET /ok?t=smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .expect("send");
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains("smuggled"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    let after = conn_of(&mut c, "after");
    assert_ne!(
        first, after,
        "the connection that carried the broken body is not reused"
    );
}

/// gunicorn 20.1's gthread worker sends the body of an answer to HEAD
/// after its head, in a second write: clients that send HEAD must not make
/// others get wrong answers.
#[test]
fn the_gunicorn_head_race_misdelivers_nothing() {
    if !support::peer("gunicorn", "gunicorn") {
        return;
    }
    let app = tempfile::tempdir().expect("dir");
    std::fs::write(
        app.path().join("echo.py"),
        "def app(environ, start_response):\n\
         \x20   body = ('tok=' + environ.get('QUERY_STRING', '')[2:]).encode()\n\
         \x20   start_response('200 OK', [('Content-Length', str(len(body)))])\n\
         \x20   return [body]\n",
    )
    .expect("app");
    let b = Baton::builder()
        .run_args(["--proxy", "http", "--listen", "127.0.0.1:0"])
        .command([
            "sh".to_owned(),
            "-c".to_owned(),
            format!(
                "cd {} && exec gunicorn --threads 4 --keep-alive 30 --bind 127.0.0.1:$PORT echo:app",
                app.path().display()
            ),
        ])
        .start();
    b.wait_for_event("ready", 1);
    let port = b.port();
    let stop = Arc::new(AtomicBool::new(false));
    let heads = Arc::new(AtomicU64::new(0));
    let head_clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, heads) = (Arc::clone(&stop), Arc::clone(&heads));
            std::thread::spawn(move || {
                let mut c = connect(port);
                let started = Instant::now();
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(60) {
                    let request = format!("HEAD /?t=h{i} HTTP/1.1\r\nHost: x\r\n\r\n");
                    let sent = c.get_mut().write_all(request.as_bytes()).is_ok();
                    if !sent || answer(&mut c, true).is_none() {
                        c = connect(port);
                    }
                    heads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // 6 clients, 3 500 requests each: 21 000 that must all be their own.
    let victims: Vec<_> = (0..6)
        .map(|i| {
            std::thread::spawn(move || {
                let (mut ok, mut wrong) = (0u64, Vec::new());
                let mut c = connect(port);
                for k in 0..3_500 {
                    let token = format!("g{i}r{k}");
                    let request = format!("GET /?t={token} HTTP/1.1\r\nHost: x\r\n\r\n");
                    let got = c
                        .get_mut()
                        .write_all(request.as_bytes())
                        .ok()
                        .and_then(|()| answer(&mut c, false));
                    match got {
                        Some((200, _, body)) if body == format!("tok={token}").as_bytes() => {
                            ok += 1
                        }
                        got => {
                            wrong.push(format!("{token}: {got:?}"));
                            c = connect(port);
                        }
                    }
                }
                (ok, wrong)
            })
        })
        .collect();
    let (mut ok, mut wrong) = (0, Vec::new());
    for v in victims {
        let (o, w) = v.join().expect("victim");
        ok += o;
        wrong.extend(w);
    }
    stop.store(true, Ordering::SeqCst);
    for h in head_clients {
        h.join().expect("head client");
    }
    assert!(
        heads.load(Ordering::Relaxed) > 100,
        "HEAD requests ran alongside"
    );
    all_their_own(ok, &wrong);
    assert_eq!(ok, 21_000);
}

/// A small seeded generator (xorshift), so that a failing run can be
/// repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes `bytes` in a few random pieces.
fn send_in_pieces(c: &mut BufReader<TcpStream>, bytes: &[u8], rng: &mut Rng) -> bool {
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = if rng.below(3) == 0 {
            rest.len()
        } else {
            1 + rng.below(rest.len() as u64) as usize
        };
        if c.get_mut().write_all(&rest[..n]).is_err() {
            return false;
        }
        rest = &rest[n..];
    }
    true
}

/// A body: random bytes, sometimes a whole request of its own.
fn fuzz_body(rng: &mut Rng) -> Vec<u8> {
    if rng.below(4) == 0 {
        return b"GET /ok?t=smuggled HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    }
    let n = rng.below(3000) as usize;
    let alphabet = b"abc\r\n0:;GET /";
    (0..n)
        .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
        .collect()
}

/// Several clients send seeded random exchanges at once: bodies framed by
/// length or chunked in odd pieces, pipelined requests, HTTP/1.0 without a
/// Host, bad heads, and requests the app misbehaves on (bodies after HEAD,
/// 204 and 304, bytes after an answer). No answer may cross clients, and the
/// app may see no request the clients did not send.
#[test]
fn a_seeded_fuzz_of_whole_exchanges_crosses_no_answers_and_smuggles_no_request() {
    let (b, _marks) = raw_app(&[]);
    let port = b.port();
    let seed: u64 = std::env::var("BATON_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_ba70);
    let clients: Vec<_> = (0..4u64)
        .map(|client| {
            std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (client + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let (mut sent, mut answers, mut wrong) = (0u64, 0u64, Vec::new());
                let mut c = connect(port);
                for i in 0..150 {
                    let token = format!("f{client}i{i}");
                    let own = format!("tok={token}").into_bytes();
                    let mut check = |got: Option<(u16, String, Vec<u8>)>, what: &str| {
                        match got {
                            Some((200, _, body)) if body == own => {
                                answers += 1;
                                true
                            }
                            got => {
                                wrong.push(format!("{what} {token}: {got:?}"));
                                false
                            }
                        }
                    };
                    let action = rng.below(10);
                    let fine = match action {
                        0 | 1 => {
                            let request = format!("GET /ok?t={token} HTTP/1.1\r\nHost: x\r\n\r\n");
                            sent += 1;
                            send_in_pieces(&mut c, request.as_bytes(), &mut rng)
                                && check(answer(&mut c, false), "get")
                        }
                        2 => {
                            let body = fuzz_body(&mut rng);
                            let mut request = format!(
                                "POST /ok?t={token} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            request.extend_from_slice(&body);
                            sent += 1;
                            send_in_pieces(&mut c, &request, &mut rng)
                                && check(answer(&mut c, false), "post")
                        }
                        3 => {
                            let body = fuzz_body(&mut rng);
                            let mut request = format!(
                                "POST /ok?t={token} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            )
                            .into_bytes();
                            let mut rest = &body[..];
                            while !rest.is_empty() {
                                let n = 1 + rng.below(rest.len() as u64) as usize;
                                let ext = if rng.below(3) == 0 { ";x=y" } else { "" };
                                request.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
                                request.extend_from_slice(&rest[..n]);
                                request.extend_from_slice(b"\r\n");
                                rest = &rest[n..];
                            }
                            request.extend_from_slice(b"0\r\n\r\n");
                            sent += 1;
                            send_in_pieces(&mut c, &request, &mut rng)
                                && check(answer(&mut c, false), "chunked")
                        }
                        4 => {
                            let request = format!(
                                "GET /ok?t={token} HTTP/1.1\r\nHost: x\r\n\r\nGET /ok?t={token} HTTP/1.1\r\nHost: x\r\n\r\n"
                            );
                            sent += 2;
                            send_in_pieces(&mut c, request.as_bytes(), &mut rng)
                                && check(answer(&mut c, false), "pipelined")
                                && check(answer(&mut c, false), "pipelined second")
                        }
                        5 => {
                            let (method, case) = match rng.below(4) {
                                0 => ("HEAD", "head"),
                                1 => ("GET", "204"),
                                2 => ("GET", "304"),
                                _ => ("GET", "extra"),
                            };
                            let delay = if case == "extra" { 0 } else { rng.below(10) };
                            let request = format!(
                                "{method} /{case}?t={token}&d={delay} HTTP/1.1\r\nHost: x\r\n\r\n"
                            );
                            sent += 1;
                            let got = send_in_pieces(&mut c, request.as_bytes(), &mut rng)
                                .then(|| answer(&mut c, case != "extra"))
                                .flatten();
                            match got {
                                Some((200 | 204 | 304, ..)) => {
                                    answers += 1;
                                    true
                                }
                                got => {
                                    wrong.push(format!("{case} {token}: {got:?}"));
                                    false
                                }
                            }
                        }
                        6 => {
                            // HTTP/1.0 without Host: answered, then closed.
                            let request = format!("GET /ok?t={token} HTTP/1.0\r\n\r\n");
                            sent += 1;
                            let ok = send_in_pieces(&mut c, request.as_bytes(), &mut rng)
                                && check(answer(&mut c, false), "http/1.0");
                            c = connect(port);
                            ok
                        }
                        7 => {
                            // A bad head: refused by baton, never the app's.
                            let junk = match rng.below(3) {
                                0 => "GET /ok HTTP/1.1\r\nBad Header\r\n\r\n".to_owned(),
                                1 => format!("POST /ok?t={token} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
                                _ => "GET /ok HTTP/1.1\r\n\r\n".to_owned(),
                            };
                            let refused = send_in_pieces(&mut c, junk.as_bytes(), &mut rng)
                                .then(|| answer(&mut c, false))
                                .flatten();
                            c = connect(port);
                            match refused {
                                Some((400..=499, ..)) => {
                                    answers += 1;
                                    true
                                }
                                got => {
                                    wrong.push(format!("junk {token}: {got:?}"));
                                    false
                                }
                            }
                        }
                        _ => {
                            // A client that goes away in the middle of its
                            // body (the app may or may not see its head).
                            let request = format!(
                                "POST /ok?t={token} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf"
                            );
                            sent += 1;
                            let _ = c.get_mut().write_all(request.as_bytes());
                            c = connect(port);
                            true
                        }
                    };
                    if !fine {
                        c = connect(port);
                    }
                }
                (sent, answers, wrong)
            })
        })
        .collect();
    let (mut sent, mut answers, mut wrong) = (0, 0, Vec::new());
    for c in clients {
        let (s, a, w) = c.join().expect("client");
        sent += s;
        answers += a;
        wrong.extend(w);
    }
    assert!(
        wrong.is_empty(),
        "seed {seed:#x}: {} wrong of {answers} answers, first: {:?}\n{}",
        wrong.len(),
        &wrong[..wrong.len().min(5)],
        b.dump()
    );
    let mut c = connect(port);
    c.get_mut()
        .write_all(b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let (_, _, body) = answer(&mut c, false).expect("count");
    let seen: u64 = String::from_utf8_lossy(&body).parse().expect("number");
    assert!(
        seen <= sent,
        "seed {seed:#x}: the app saw {seen} requests, the clients sent {sent}"
    );
    assert!(answers > 400, "{answers} answers");
}
