//! The HTTP proxy on the wire, against an app that writes raw HTTP (Python,
//! a socket and nothing else): answers in pieces, without a length,
//! chunked, informational; requests pipelined, chunked, ambiguous.

use crate::support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use support::{Baton, LONG};

/// A raw HTTP/1.1 app on `$PORT`. Every request is counted; `/count`
/// answers how many came before it.
const APP: &str = r#"
import os, socket, threading, time
count = 0
last_body = 0
lock = threading.Lock()

def answer(c, status, body, extra=b""):
    c.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)

def serve(c):
    global count, last_body
    f = c.makefile("rb")
    while True:
        line = f.readline()
        if not line:
            return
        method, path, _ = line.decode().split(" ", 2)
        headers = {}
        while True:
            h = f.readline()
            if h in (b"\r\n", b""):
                break
            k, v = h.decode().split(":", 1)
            headers[k.strip().lower()] = v.strip()
        with lock:
            seen = count
            count += 1
        if headers.get("expect", "").lower() == "100-continue":
            c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = b""
        if path == "/early":
            # Answers before it reads the body (once the proxy's writes of
            # it are blocked), then reads all of it.
            time.sleep(0.3)
            answer(c, b"200 OK", b"early")
            time.sleep(0.3)
            got = len(f.read(int(headers["content-length"])))
            with lock:
                last_body = got
            continue
        if path == "/duplex":
            # Answers at once, then echoes each line of the body as it
            # comes (as a chunk).
            c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            left = int(headers["content-length"])
            while left > 0:
                line = f.readline()
                left -= len(line)
                c.sendall(b"%x\r\n%s\r\n" % (len(line), line))
            c.sendall(b"0\r\n\r\n")
            continue
        if "content-length" in headers:
            body = f.read(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(f.readline().split(b";")[0], 16)
                if size == 0:
                    # Like many servers, a bare LF ends a line too.
                    while f.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += f.read(size)
                f.readline()
        if path == "/two":
            # The head, then the body: two writes (Nagle holds the second
            # until the first is acknowledged).
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
            c.sendall(b"pieces")
        elif path == "/close":
            c.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil the app closes")
            c.close()
            return
        elif path == "/chunked":
            c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")
        elif path == "/hints":
            c.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n")
            answer(c, b"200 OK", b"after hints")
        elif path == "/last":
            answer(c, b"200 OK", str(last_body).encode())
        elif path == "/count":
            answer(c, b"200 OK", str(seen).encode())
        elif path == "/body":
            answer(c, b"200 OK", method.encode() + b" " + body)
        else:
            answer(c, b"200 OK", b"hello\n", b"X-Method: " + method.encode() + b"\r\n")

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

fn raw_app() -> Baton {
    let b = Baton::builder()
        .run_args(["--proxy", "http", "--listen", "127.0.0.1:0"])
        .command(["python3", "-c", APP])
        .start();
    b.wait_for_event("ready", 1);
    b
}

fn connect(b: &Baton) -> BufReader<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    s.set_read_timeout(Some(LONG)).expect("timeout");
    BufReader::new(s)
}

/// One answer: its head (lower case) and body (by Content-Length, chunked
/// as it is on the wire, or to the end of the stream).
fn answer(r: &mut BufReader<TcpStream>, head_request: bool) -> (String, Vec<u8>) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).expect("head") > 0, "closed: {head}");
        head.push_str(&line.to_ascii_lowercase());
        if line == "\r\n" {
            break;
        }
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|n| n.trim().parse::<usize>().expect("length"));
    let mut body = Vec::new();
    if head_request || head.starts_with("http/1.1 1") {
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body).expect("body");
    } else if head.contains("transfer-encoding: chunked") {
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("chunk");
            body.extend_from_slice(line.as_bytes());
            if body.ends_with(b"\r\n\r\n") {
                break;
            }
        }
    } else {
        r.read_to_end(&mut body).expect("to the end");
    }
    (head, body)
}

fn send(r: &mut BufReader<TcpStream>, bytes: &[u8]) {
    r.get_mut().write_all(bytes).expect("send");
}

fn closed(r: &mut BufReader<TcpStream>) -> bool {
    matches!(r.read(&mut [0u8; 1]), Ok(0))
}

#[test]
fn answers_written_in_two_pieces_arrive_whole_on_a_kept_connection() {
    let b = raw_app();
    let mut c = connect(&b);
    for _ in 0..20 {
        send(&mut c, b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n");
        let (head, body) = answer(&mut c, false);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, b"pieces");
    }
}

#[test]
fn an_answer_without_a_length_is_relayed_to_the_end_and_closes_the_connection() {
    let b = raw_app();
    let mut c = connect(&b);
    send(&mut c, b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = answer(&mut c, false);
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"until the app closes");
    // The proxy still serves on new connections.
    let mut c = connect(&b);
    send(&mut c, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(answer(&mut c, false).1, b"hello\n");
}

#[test]
fn chunked_answers_pass_as_they_are_and_reach_http10_clients_as_plain_data() {
    let b = raw_app();
    let mut c = connect(&b);
    send(&mut c, b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = answer(&mut c, false);
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(
        String::from_utf8_lossy(&body),
        "5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    );
    // Kept alive after a chunked answer.
    send(&mut c, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(answer(&mut c, false).1, b"hello\n");

    let mut c = connect(&b);
    send(&mut c, b"GET /chunked HTTP/1.0\r\n\r\n");
    let (head, body) = answer(&mut c, false);
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"hello world");
}

#[test]
fn informational_answers_come_before_the_final_one() {
    let b = raw_app();
    let mut c = connect(&b);
    send(&mut c, b"GET /hints HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, _) = answer(&mut c, false);
    assert!(head.starts_with("http/1.1 103"), "{head}");
    assert!(head.contains("link: </style.css>"), "{head}");
    assert_eq!(answer(&mut c, false).1, b"after hints");

    // Expect: 100-continue: the client sends its body only once told to.
    send(
        &mut c,
        b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    );
    let (head, _) = answer(&mut c, false);
    assert!(head.starts_with("http/1.1 100"), "{head}");
    send(&mut c, b"data");
    assert_eq!(answer(&mut c, false).1, b"POST data");
}

#[test]
fn pipelined_requests_are_answered_in_order_and_head_answers_have_no_body() {
    let b = raw_app();
    let mut c = connect(&b);
    send(
        &mut c,
        b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nPOST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let (head, _) = answer(&mut c, true);
    assert!(head.contains("x-method: head"), "{head}");
    assert!(head.contains("content-length: 6"), "{head}");
    assert_eq!(answer(&mut c, false).1, b"POST abc");
    let (head, body) = answer(&mut c, false);
    assert!(head.contains("x-method: get"), "{head}");
    assert_eq!(body, b"hello\n");
}

#[test]
fn a_chunked_upload_in_pieces_reaches_the_app_whole() {
    let b = raw_app();
    let mut c = connect(&b);
    send(
        &mut c,
        b"PUT /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
    );
    send(&mut c, b"c\r\n");
    send(&mut c, b"4;ext=1\r\ndefg\r\n0\r\n\r\n");
    assert_eq!(answer(&mut c, false).1, b"PUT abcdefg");
}

#[test]
fn requests_with_ambiguous_framing_are_refused_and_never_reach_the_app() {
    let b = raw_app();
    let count = |b: &Baton| {
        let mut c = connect(b);
        send(&mut c, b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n");
        String::from_utf8(answer(&mut c, false).1).expect("count")
    };
    let before = count(&b);
    for request in [
        &b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabcd",
        b"POST /body HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\nContent-Length: 3\r\n\r\nabc",
    ] {
        let mut c = connect(&b);
        send(&mut c, request);
        let (head, body) = answer(&mut c, false);
        assert!(head.starts_with("http/1.1 400"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(String::from_utf8_lossy(&body).starts_with("baton proxy: "));
        assert!(closed(&mut c));
    }
    // A head over 64 KiB.
    let mut c = connect(&b);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70_000)
    );
    send(&mut c, big.as_bytes());
    let (head, _) = answer(&mut c, false);
    assert!(head.starts_with("http/1.1 431"), "{head}");
    // Only the two counting requests reached the app.
    let after: u64 = count(&b).parse().expect("number");
    assert_eq!(after, before.parse::<u64>().expect("number") + 1);
}

#[test]
fn a_kept_connection_costs_baton_one_descriptor() {
    let b = raw_app();
    let before = support::fd_count(b.pid());
    // Each connection has had an answer and now waits for its next request:
    // registered with the runtime, holding its socket.
    let conns: Vec<_> = (0..50)
        .map(|_| {
            let mut c = connect(&b);
            send(&mut c, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(answer(&mut c, false).1, b"hello\n");
            c
        })
        .collect();
    let after = support::fd_count(b.pid());
    // The client sockets, plus the few pooled connections to the app (and
    // give or take a descriptor of baton's own that came or went, such as
    // a state file being written): one each, not two.
    assert!(
        after - before >= 45 && after - before <= 60,
        "{before} descriptors before, {after} with 50 kept connections"
    );
    drop(conns);
}

#[test]
fn an_app_that_answers_while_it_reads_the_body_gets_the_rest_of_it() {
    let b = raw_app();
    let mut c = connect(&b);
    send(
        &mut c,
        b"POST /duplex HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\none\n",
    );
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(c.read_line(&mut head).expect("head") > 0, "{head}");
    }
    assert!(
        head.to_ascii_lowercase().starts_with("http/1.1 200"),
        "{head}"
    );
    // Each line comes back before the next is sent: both directions flow.
    for line in ["one\n", "two\n", "six\n"] {
        if line != "one\n" {
            send(&mut c, line.as_bytes());
        }
        let mut size = String::new();
        c.read_line(&mut size).expect("chunk size");
        assert_eq!(size, "4\r\n");
        let mut data = [0u8; 6];
        c.read_exact(&mut data).expect("chunk");
        assert_eq!(&data, format!("{line}\r\n").as_bytes());
    }
    let mut end = String::new();
    c.read_line(&mut end).expect("last chunk");
    assert_eq!(end, "0\r\n");
}

#[test]
fn an_answer_before_a_large_body_loses_no_byte_of_it_and_poisons_no_connection() {
    let b = raw_app();
    let n = 8 << 20;
    let mut c = connect(&b);
    let mut upload = c.get_ref().try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let head = format!("POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n");
        upload.write_all(head.as_bytes()).expect("head");
        upload.write_all(&vec![b'u'; n]).expect("body");
    });
    let (head, body) = answer(&mut c, false);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"early");
    sender.join().expect("sent");
    let last = |b: &Baton| {
        let mut c = connect(b);
        send(&mut c, b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n");
        String::from_utf8(answer(&mut c, false).1).expect("number")
    };
    support::wait_until("the app read the whole body", LONG, || {
        last(&b) == n.to_string()
    });
    // Later requests, on whatever pooled connection, get their own answers.
    for _ in 0..5 {
        let mut c = connect(&b);
        send(&mut c, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(answer(&mut c, false).1, b"hello\n");
    }
}

#[test]
fn a_chunked_body_ended_by_a_bare_lf_smuggles_nothing() {
    let b = raw_app();
    let count = |b: &Baton| -> u64 {
        let mut c = connect(b);
        send(&mut c, b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n");
        String::from_utf8(answer(&mut c, false).1)
            .expect("text")
            .parse()
            .expect("number")
    };
    let before = count(&b);
    let mut c = connect(&b);
    // The app's chunked reader takes a bare LF as the end of the trailers;
    // baton must not let what follows reach it as a request of its own.
    send(
        &mut c,
        b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains("hello"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    // The POST reached the app (its head), the smuggled GET did not.
    assert!(count(&b) <= before + 2);
}
