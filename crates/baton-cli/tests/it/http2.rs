//! HTTP/2 through `--proxy http`: clients speaking cleartext HTTP/2 by
//! prior knowledge on the same port as HTTP/1 (curl, and a client on one
//! long-lived connection), the app reached over HTTP/1.1; the limits, and
//! bad input written frame by frame. gRPC with a real grpc-go service is
//! in `grpc.rs`.

use crate::support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Baton, LONG, get};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types and error codes (RFC 9113 §6, §7).
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;
const NO_ERROR: u32 = 0;
const FLOW_CONTROL_ERROR: u32 = 3;
const ENHANCE_YOUR_CALM: u32 = 11;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A request head in HPACK without Huffman coding or dynamic table:
/// GET http://`authority`/ and, literally, each of `extra`.
fn request_block(authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    request_block_to("/", authority, extra)
}

/// As [`request_block`], for `path`.
fn request_block_to(path: &str, authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    // :method GET, :scheme http (static table 2, 6), :path literal (4).
    let mut out = vec![0x82, 0x86, 0x04];
    literal(&mut out, path.as_bytes());
    // :authority, literal value without indexing, name index 1.
    out.push(0x01);
    literal(&mut out, authority.as_bytes());
    for (name, value) in extra {
        out.push(0x00);
        literal(&mut out, name.as_bytes());
        literal(&mut out, value.as_bytes());
    }
    out
}

/// An HPACK string literal (no Huffman) with a 7-bit prefixed length.
fn literal(out: &mut Vec<u8>, s: &[u8]) {
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128 + 128) as u8);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

/// One frame read back: type, flags, stream, payload.
#[derive(Debug)]
struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// A GOAWAY's error code.
    fn goaway_code(&self) -> Option<u32> {
        (self.kind == GOAWAY && self.payload.len() >= 8).then(|| {
            u32::from_be_bytes([
                self.payload[4],
                self.payload[5],
                self.payload[6],
                self.payload[7],
            ])
        })
    }
}

/// Reads frames until the server closes, `until` holds of the frames so
/// far, or [`LONG`] passed.
fn read_frames(stream: &mut TcpStream, until: impl Fn(&[Frame]) -> bool) -> Vec<Frame> {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let deadline = Instant::now() + LONG;
    let (mut buf, mut frames) = (Vec::new(), Vec::new());
    let mut chunk = [0u8; 16 * 1024];
    while Instant::now() < deadline && !until(&frames) {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => break,
        }
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            frames.push(Frame {
                kind: buf[3],
                stream,
                payload: buf[9..9 + len].to_vec(),
            });
            buf.drain(..9 + len);
        }
    }
    frames
}

/// Sends `bytes` on a new connection (a writer thread, so that a server
/// that stops reading cannot block the test) and reads what comes back
/// until a GOAWAY, the close, or [`LONG`].
fn attack(port: u16, bytes: Vec<u8>) -> Vec<Frame> {
    exchange(port, bytes, |f| goaway(f).is_some())
}

/// Like [`attack`], reading until `until` holds of the frames so far.
fn exchange(port: u16, bytes: Vec<u8>, until: impl Fn(&[Frame]) -> bool) -> Vec<Frame> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let sending = std::thread::spawn(move || {
        let _ = writer.set_write_timeout(Some(LONG));
        let _ = writer.write_all(&bytes);
    });
    let frames = read_frames(&mut stream, until);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = sending.join();
    frames
}

fn goaway(frames: &[Frame]) -> Option<u32> {
    frames.iter().find_map(Frame::goaway_code)
}

/// The server's first SETTINGS: (identifier, value) pairs.
fn server_settings(frames: &[Frame]) -> Vec<(u16, u32)> {
    let first = frames
        .iter()
        .find(|f| f.kind == SETTINGS && f.payload.len() % 6 == 0 && !f.payload.is_empty())
        .expect("the server's SETTINGS");
    first
        .payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect()
}

/// A Python app on `$PORT` that writes one line per request it gets to
/// `seen` (its path, and the port of the connection it came on): what
/// reached the app.
fn recording_app(seen: &std::path::Path) -> Baton {
    let script = "import http.server, os, sys\n\
        seen = sys.argv[1]\n\
        class H(http.server.BaseHTTPRequestHandler):\n\
        \x20   protocol_version = 'HTTP/1.1'\n\
        \x20   def do_GET(self):\n\
        \x20       with open(seen, 'a') as f: f.write('%s %d\\n' % (self.path, self.client_address[1]))\n\
        \x20       self.send_response(200); self.send_header('content-length', '3'); self.end_headers(); self.wfile.write(b'ok\\n')\n\
        \x20   def log_message(self, *a): pass\n\
        http.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n";
    let b = Baton::builder()
        .run_args(["--proxy", "http", "--listen", "127.0.0.1:0"])
        .command([
            "python3".into(),
            "-c".into(),
            script.into(),
            seen.as_os_str().to_owned(),
        ])
        .start();
    b.wait_for_event("ready", 1);
    b
}

#[test]
fn http2_and_http1_share_the_port_and_one_http2_connection_reaches_every_generation() {
    let b = Baton::behind_proxy("http", &[], &[]);
    // curl, by prior knowledge: HTTP/2 end to end, forwarding headers set.
    if support::peer("curl", "curl") {
        let text = curl_h2(&[&format!("http://127.0.0.1:{}/headers", b.port())]);
        assert!(text.starts_with("http/2 200"), "{text}");
        assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
        assert!(text.contains("x-forwarded-proto: http\n"), "{text}");
        assert!(
            text.contains(&format!("host: 127.0.0.1:{}\n", b.port())),
            "{text}"
        );
    }
    // HTTP/1 on the same port, as before.
    assert_eq!(get(b.port(), "/", LONG).expect("HTTP/1").status, 200);

    // Four streams at a time on one connection, through three reloads.
    let client = OneConnection::start(b.port(), 4);
    client.wait_seen(b.gen_pid(1));
    for generation in 2..=4 {
        let (code, json) = b.reload_json();
        assert_eq!(code, Some(0), "{json}\n{}", b.dump());
        // The same connection's next streams reach the new generation.
        client.wait_seen(b.gen_pid(generation));
    }
    let (ok, failed) = client.finish();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 0);
}

/// An HTTP/2 client on one connection, `streams` requests at a time.
struct OneConnection {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashSet<u32>>>,
    thread: std::thread::JoinHandle<(u64, Vec<String>)>,
}

impl OneConnection {
    fn start(port: u16, streams: usize) -> OneConnection {
        OneConnection::start_on(port, streams, "/")
    }

    fn start_on(port: u16, streams: usize, path: &'static str) -> OneConnection {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let (stop2, seen2) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(run_one_connection(port, streams, path, stop2, seen2))
        });
        OneConnection { stop, seen, thread }
    }

    fn wait_seen(&self, pid: u32) {
        support::wait_until(&format!("the connection reaches pid {pid}"), LONG, || {
            self.seen.lock().expect("seen").contains(&pid)
        });
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("client thread")
    }
}

async fn run_one_connection(
    port: u16,
    streams: usize,
    path: &'static str,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashSet<u32>>>,
) -> (u64, Vec<String>) {
    use http_body_util::{BodyExt, Empty};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let (mut sender, stop, seen) = (sender.clone(), Arc::clone(&stop), Arc::clone(&seen));
        tasks.spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let request = hyper::Request::get(format!("http://127.0.0.1:{port}{path}"))
                    .body(Empty::<bytes::Bytes>::new())
                    .expect("request");
                let answer = tokio::time::timeout(LONG, async {
                    let answer = sender.send_request(request).await?;
                    let (parts, body) = answer.into_parts();
                    body.collect().await?;
                    Ok::<_, hyper::Error>(parts)
                })
                .await;
                match answer {
                    Ok(Ok(parts)) if parts.status == 200 => {
                        ok += 1;
                        let pid = parts
                            .headers
                            .get("x-pid")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok());
                        if let Some(pid) = pid {
                            seen.lock().expect("seen").insert(pid);
                        }
                    }
                    Ok(Ok(parts)) => failed.push(format!("status {}", parts.status)),
                    Ok(Err(e)) => failed.push(e.to_string()),
                    Err(_) => failed.push("no answer within 30 s".into()),
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, Vec::new());
    while let Some(done) = tasks.join_next().await {
        let (o, f) = done.expect("stream task");
        ok += o;
        failed.extend(f);
    }
    (ok, failed)
}

#[test]
fn http2_limits_are_advertised_and_bad_frames_and_floods_get_goaway_without_reaching_the_app() {
    if !support::peer("python3", "python3") {
        return;
    }
    let seen = tempfile::NamedTempFile::new().expect("file");
    let b = recording_app(seen.path());
    let port = b.port();
    let settings = frame(SETTINGS, 0, 0, &[]);
    let with_preface = |rest: &[u8]| [PREFACE, &settings, rest].concat();

    // A well-formed exchange first: the limits the server advertises.
    let answered = |f: &[Frame]| f.iter().any(|f| f.kind == DATA && f.stream == 1);
    let request = frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &request_block("x", &[]),
    );
    let ok = exchange(port, with_preface(&request), answered);
    let advertised = server_settings(&ok);
    assert!(
        advertised.contains(&(3, 100)),
        "MAX_CONCURRENT_STREAMS: {advertised:?}"
    );
    assert!(
        advertised.contains(&(6, 65536)),
        "MAX_HEADER_LIST_SIZE: {advertised:?}"
    );
    assert!(
        ok.iter().any(|f| f.kind == DATA && f.stream == 1),
        "the request is answered: {ok:?}"
    );
    assert_eq!(
        std::fs::read_to_string(seen.path())
            .expect("seen")
            .lines()
            .count(),
        1
    );

    // The preface followed by garbage.
    let frames = attack(
        port,
        [
            PREFACE,
            b"this is not a frame at all, not even close" as &[u8],
        ]
        .concat(),
    );
    assert!(
        goaway(&frames).is_some_and(|c| c != NO_ERROR),
        "garbage: {frames:?}"
    );

    // A malformed frame: SETTINGS whose length is not a multiple of 6.
    let frames = attack(port, with_preface(&frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0])));
    assert!(
        goaway(&frames).is_some_and(|c| c != NO_ERROR),
        "bad SETTINGS: {frames:?}"
    );

    // A connection window pushed past 2^31 - 1.
    let frames = attack(
        port,
        with_preface(&frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes())),
    );
    assert_eq!(goaway(&frames), Some(FLOW_CONTROL_ERROR), "{frames:?}");

    // CONTINUATION flood: a header block that never ends, past the limit.
    let mut flood = frame(HEADERS, 0, 1, &request_block("x", &[]));
    let mut one = Vec::new();
    one.push(0x00);
    literal(&mut one, b"x-flood");
    literal(&mut one, &[b'a'; 4000]);
    for _ in 0..1000 {
        flood.extend(frame(CONTINUATION, 0, 1, &one));
    }
    let frames = attack(port, with_preface(&flood));
    assert!(goaway(&frames).is_some(), "CONTINUATION flood: {frames:?}");

    // SETTINGS flood: 100 000 frames sent without reading the ACKs.
    let mut flood = Vec::new();
    for _ in 0..100_000 {
        flood.extend_from_slice(&settings);
    }
    let rss_before = support::proc_status(b.pid(), "VmRSS").expect("rss");
    let frames = attack(port, with_preface(&flood));
    assert_eq!(goaway(&frames), Some(ENHANCE_YOUR_CALM), "SETTINGS flood");
    let rss_after = support::proc_status(b.pid(), "VmRSS").expect("rss");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "SETTINGS flood grew baton from {rss_before} kB to {rss_after} kB"
    );
    // PING flood, unread: answered one at a time, nothing piles up (and
    // a gRPC client's many PINGs are no flood).
    let flood: Vec<u8> = (0..100_000u64)
        .flat_map(|i| frame(PING, 0, 0, &i.to_be_bytes()))
        .collect();
    let mut unread = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    unread
        .set_write_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let _ = unread.write_all(&with_preface(&flood));
    let rss_pinged = support::proc_status(b.pid(), "VmRSS").expect("rss");
    assert!(
        rss_pinged < rss_before + 64 * 1024,
        "an unread PING flood grew baton from {rss_before} kB to {rss_pinged} kB"
    );
    drop(unread);

    // Rapid reset (CVE-2023-44487): streams opened and cancelled at once.
    let mut flood = Vec::new();
    for i in 0..2000u32 {
        let stream = 2 * i + 3;
        flood.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &request_block("x", &[]),
        ));
        flood.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
    }
    let frames = attack(port, with_preface(&flood));
    assert!(goaway(&frames).is_some(), "rapid reset: {frames:?}");
    let reached = std::fs::read_to_string(seen.path())
        .expect("seen")
        .lines()
        .count();

    // None of the bad input reached the app, but for the rapid reset's
    // streams that it got before the GOAWAY; baton serves on.
    assert!(
        reached < 1 + 2000 / 4,
        "{} of 2000 reset streams reached the app",
        reached - 1
    );
    assert_eq!(get(port, "/after", LONG).expect("HTTP/1 after").status, 200);
    let frames = exchange(port, with_preface(&request), answered);
    assert!(answered(&frames), "HTTP/2 after: {frames:?}");
}

#[test]
fn http2_idle_connections_get_goaway_and_so_do_all_at_the_shutdown_delay() {
    let mut b = Baton::behind_proxy(
        "http",
        &["--idle-timeout", "1s", "--shutdown-delay", "2s"],
        &[],
    );
    // Idle: a connection with no stream gets GOAWAY (NO_ERROR), then closes.
    let mut idle = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    idle.write_all(&[PREFACE, &frame(SETTINGS, 0, 0, &[])].concat())
        .expect("write");
    let frames = read_frames(&mut idle, |f| goaway(f).is_some());
    assert_eq!(goaway(&frames), Some(NO_ERROR), "{frames:?}");

    // The shutdown delay: GOAWAY while baton still serves (lame duck).
    let mut held = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    held.write_all(&[PREFACE, &frame(SETTINGS, 0, 0, &[])].concat())
        .expect("write");
    let _ = read_frames(&mut held, |f| f.iter().any(|f| f.kind == SETTINGS));
    b.signal(rustix::process::Signal::TERM);
    let frames = read_frames(&mut held, |f| goaway(f).is_some());
    assert_eq!(goaway(&frames), Some(NO_ERROR), "{frames:?}");
    assert!(
        b.ctl(&["status", "--json"]).code == Some(0),
        "GOAWAY came in the shutdown delay, while baton still runs"
    );
    assert!(b.wait_exit(LONG).success());
}

#[test]
fn http2_upstream_timeout_is_a_504_and_grpc_to_an_http1_app_says_why() {
    if !support::peer("curl", "curl") {
        return;
    }
    let b = Baton::behind_proxy("http", &["--upstream-timeout", "1s"], &[]);
    let slow = curl_h2(&[&format!("http://127.0.0.1:{}/slow?ms=5000", b.port())]);
    assert!(slow.starts_with("http/2 504"), "{slow}");
    assert!(slow.contains("--upstream-timeout"), "{slow}");
    let grpc = curl_h2(&[
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        "",
        &format!("http://127.0.0.1:{}/grpc.health.v1.Health/Check", b.port()),
    ]);
    assert!(grpc.starts_with("http/2 200"), "{grpc}");
    assert!(grpc.contains("grpc-status: 12\r\n"), "{grpc}");
    assert!(grpc.contains("--upstream-protocol h2c"), "{grpc}");
}

#[test]
fn http2_requests_to_an_http1_app_reuse_their_connections_to_it() {
    if !support::peer("python3", "python3") {
        return;
    }
    let seen = tempfile::NamedTempFile::new().expect("file");
    let b = recording_app(seen.path());
    let lines = || std::fs::read_to_string(seen.path()).unwrap_or_default();
    let client = OneConnection::start(b.port(), 1);
    support::wait_until("200 requests reached the app", LONG, || {
        lines().lines().count() >= 200
    });
    let (ok, failed) = client.finish();
    assert!(failed.is_empty() && ok >= 200, "{failed:?}");
    let connections: HashSet<String> = lines()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    assert_eq!(
        connections.len(),
        1,
        "one kept connection to the app: {connections:?}"
    );
}

#[test]
fn http2_streams_to_an_http1_app_open_no_more_connections_than_the_cap_allows() {
    // 100 streams at once on one connection, each a slow request to an
    // HTTP/1.1 app: each needs a connection to the app of its own, and
    // those count under --max-connections (before, one client could make
    // baton open a hundred).
    let b = Baton::behind_proxy("http", &["--max-connections", "20"], &[]);
    let before = support::fd_count(b.pid());
    let client = OneConnection::start_on(b.port(), 100, "/slow?ms=200");
    let mut peak = before;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        peak = peak.max(support::fd_count(b.pid()));
        std::thread::sleep(Duration::from_millis(5));
    }
    let (ok, failed) = client.finish();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok >= 100, "{ok}");
    // The client's connection and at most 19 more under the cap of 20.
    assert!(
        peak <= before + 20,
        "descriptors went from {before} to {peak}"
    );
    eprintln!(
        "100 concurrent slow streams, cap 20: {ok} answered, descriptors {before} -> at most {peak}"
    );
}

#[test]
fn http2_authority_wins_over_host_for_an_http1_app() {
    // RFC 9113 §8.3.1: `:authority` is the request's host; a `host` header
    // that disagrees must not reach the app as its Host.
    let b = Baton::behind_proxy("http", &[], &[]);
    let block = request_block_to("/headers", "good.example", &[("host", "evil.example")]);
    let request = frame(HEADERS, END_HEADERS | END_STREAM, 1, &block);
    let frames = exchange(
        b.port(),
        [PREFACE, &frame(SETTINGS, 0, 0, &[]), &request].concat(),
        |f| f.iter().any(|f| f.kind == DATA && f.stream == 1),
    );
    let body: Vec<u8> = frames
        .iter()
        .filter(|f| f.kind == DATA && f.stream == 1)
        .flat_map(|f| f.payload.clone())
        .collect();
    let body = String::from_utf8_lossy(&body).to_ascii_lowercase();
    assert!(body.contains("host: good.example\n"), "{body}");
    assert!(!body.contains("evil.example"), "{body}");
}

#[test]
fn http2_a_stop_lets_clients_go_first_and_streams_opened_meanwhile_are_answered() {
    // Without --shutdown-delay: the app gets its stop signal only once the
    // clients' connections have ended, so a stream a client opens after
    // baton's GOAWAY left (before it arrived, as far as the client knew)
    // still reaches an app that serves. Before, the app was stopping
    // already and the stream got 502.
    let mut b = Baton::behind_proxy("http", &[], &[]);
    let app = b.gen_pid(1);
    let mut c = TcpStream::connect(("127.0.0.1", b.port())).expect("connect");
    let slow = request_block_to("/slow?ms=1500", "x", &[]);
    c.write_all(
        &[
            PREFACE,
            &frame(SETTINGS, 0, 0, &[]),
            &frame(HEADERS, END_HEADERS | END_STREAM, 1, &slow),
        ]
        .concat(),
    )
    .expect("write");
    b.wait_for(
        "the slow request reached the app",
        |l| l.contains("started a 1500 ms request"),
        LONG,
    );
    b.signal(rustix::process::Signal::TERM);
    let frames = read_frames(&mut c, |f| goaway(f).is_some());
    assert_eq!(goaway(&frames), Some(NO_ERROR), "{frames:?}");
    assert!(!support::pid_gone(app), "the app still serves");
    c.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &request_block("x", &[]),
    ))
    .expect("write");
    let answered =
        |f: &[Frame], stream: u32| f.iter().any(|f| f.kind == DATA && f.stream == stream);
    let frames = read_frames(&mut c, |f| answered(f, 1) && answered(f, 3));
    for stream in [1, 3] {
        let head = frames
            .iter()
            .find(|f| f.kind == HEADERS && f.stream == stream)
            .unwrap_or_else(|| panic!("stream {stream} answered: {frames:?}"));
        // `:status 200` is HPACK's static entry 8.
        assert_eq!(
            head.payload.first(),
            Some(&0x88),
            "stream {stream}: {head:?}"
        );
    }
    drop(c);
    assert!(b.wait_exit(LONG).success());
}

/// curl, HTTP/2 by prior knowledge, with `args`: the answer's head and
/// body, lowercased.
fn curl_h2(args: &[&str]) -> String {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-D",
            "-",
            "--max-time",
            "30",
        ])
        .args(args)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
}
