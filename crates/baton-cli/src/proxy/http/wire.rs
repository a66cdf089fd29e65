//! HTTP/1.1 on the wire, for the proxy: a request head parsed and rewritten
//! for the app, an answer's head parsed and rewritten for the client, and
//! chunked framing followed byte by byte (RFC 9112).
//!
//! Heads are parsed in place (httparse) and rewritten in one pass into a
//! reused buffer: headers keep their order and spelling. What makes a
//! message's length ambiguous is refused, since a proxy and an app that
//! disagree on where a request ends can be made to see two requests where
//! the other saw one: `Transfer-Encoding` with `Content-Length`, differing
//! `Content-Length`s, a transfer coding other than chunked last, chunked
//! framing in HTTP/1.0, and a `Connection` header naming a framing header.

use std::io::Write;
use std::net::IpAddr;

/// Headers in one head, at most.
pub const MAX_HEADERS: usize = 100;

/// How a message's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// When the sender closes the connection (answers only).
    Close,
}

/// A request head, parsed; its rewritten form is in the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The head's length in the client's bytes.
    pub head_len: usize,
    /// Its body.
    pub framing: Framing,
    /// Idempotent and bodiless: may be sent again if it was not answered.
    pub replayable: bool,
    /// A `HEAD` request: the answer has no body.
    pub head_method: bool,
    /// An HTTP/1.0 client.
    pub http10: bool,
    /// The client asked to close after this answer.
    pub close: bool,
    /// An `Upgrade` request (WebSocket).
    pub upgrade: bool,
    /// An HTTP/1.0 request without `Host`: see [`add_host`].
    pub needs_host: bool,
}

/// A request refused before it reaches an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    /// The status to answer with.
    pub status: u16,
    /// Why, for the answer's body.
    pub reason: &'static str,
}

fn reject(status: u16, reason: &'static str) -> Reject {
    Reject { status, reason }
}

/// An answer's head, parsed; its rewritten form is in the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The head's length in the app's bytes.
    pub head_len: usize,
    /// The status code.
    pub status: u16,
    /// Its body.
    pub framing: Framing,
    /// The body is chunked and the client speaks HTTP/1.0: relay the data
    /// alone, then close.
    pub dechunk: bool,
    /// The connection to the app can carry another request afterwards.
    pub reusable: bool,
    /// The client connection closes after this answer.
    pub close: bool,
}

/// What a `Connection` header says.
#[derive(Debug, Default)]
struct Tokens<'a> {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// Other headers it names: hop-by-hop, not forwarded.
    named: Vec<&'a str>,
}

impl<'a> Tokens<'a> {
    fn add(&mut self, value: &'a [u8]) {
        let Ok(value) = std::str::from_utf8(value) else {
            return;
        };
        for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if token.eq_ignore_ascii_case("close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case("keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case("upgrade") {
                self.upgrade = true;
            } else {
                self.named.push(token);
            }
        }
    }

    fn names(&self, name: &str) -> bool {
        self.named.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// What a head's framing and `Connection` headers say.
#[derive(Debug, Default)]
struct Framed<'a> {
    length: Option<u64>,
    /// A `Transfer-Encoding` header, and whether its last coding is chunked.
    te: bool,
    chunked: bool,
    /// `Transfer-Encoding` headers, and whether each said `chunked` alone.
    te_headers: usize,
    chunked_alone: bool,
    tokens: Tokens<'a>,
}

impl<'a> Framed<'a> {
    /// Notes a header if it is one of those; `Ok(false)` if it is not.
    fn scan(&mut self, name: &str, value: &'a [u8]) -> Result<bool, &'static str> {
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(value).ok_or("invalid Content-Length")?;
            if self.length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length headers");
            }
            self.length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            self.te = true;
            self.chunked = ends_chunked(value);
            self.te_headers += 1;
            self.chunked_alone = std::str::from_utf8(value)
                .is_ok_and(|v| v.trim_matches([' ', '\t']).eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            self.tokens.add(value);
        } else {
            return Ok(false);
        }
        Ok(true)
    }
}

/// Headers that never cross the proxy as they are (RFC 9110 §7.6.1).
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// A `Host` value: `uri-host [":" port]` (RFC 9112 §3.2, RFC 3986 §3.2.2):
/// the characters of a registered name, an IP literal or a port, and
/// nothing else (no space, no comma list). Empty is allowed (a target
/// without an authority).
fn valid_host(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+;=:[]".contains(&b))
}

/// Framing headers, which a `Connection` header may not remove.
fn framing_header(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length")
        || name.eq_ignore_ascii_case("transfer-encoding")
        || name.eq_ignore_ascii_case("host")
}

/// A `Content-Length` value: digits (a list of equal ones is allowed).
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = std::str::from_utf8(value).ok()?;
    let mut length = None;
    for part in value.split(',') {
        let part = part.trim_matches([' ', '\t']);
        if part.is_empty() || part.len() > 18 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = part.parse().ok()?;
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// Whether the last transfer coding of a `Transfer-Encoding` value is
/// chunked.
fn ends_chunked(value: &[u8]) -> bool {
    std::str::from_utf8(value).is_ok_and(|v| {
        v.rsplit(',')
            .map(str::trim)
            .find(|t| !t.is_empty())
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    })
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What this hop adds to a request, and what it lets through.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hop {
    /// The client's address, for the forwarding headers (none: none added).
    pub peer: Option<IpAddr>,
    /// Keep header names that contain an underscore. By default they are
    /// dropped (as nginx does): CGI-style apps read `X_Forwarded_Proto`
    /// and `X-Forwarded-Proto` alike, so a client could pass one off as the
    /// other, which this hop sets.
    pub keep_underscores: bool,
}

/// Parses a request head at the start of `buf` and writes the head to send
/// to the app into `out`: `Ok(None)` if the head is not complete yet.
/// An HTTP/1.0 request without `Host` is marked [`Request::needs_host`]:
/// the caller adds one with [`add_host`].
pub fn parse_request(buf: &[u8], hop: Hop, out: &mut Vec<u8>) -> Result<Option<Request>, Reject> {
    let peer = hop.peer;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(reject(431, "too many request headers"));
        }
        Err(httparse::Error::Version) => return Err(reject(505, "unsupported HTTP version")),
        Err(_) => return Err(reject(400, "malformed request head")),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(reject(400, "malformed request head"));
    };
    if method == "CONNECT" {
        return Err(reject(405, "CONNECT is not proxied"));
    }
    let http10 = version == 0;
    let mut framed = Framed::default();
    let (mut upgrade_to, mut host) = (None, None);
    for h in req.headers.iter() {
        let name = h.name;
        let framing = framed.scan(name, h.value).map_err(|why| reject(400, why))?;
        if !framing && name.eq_ignore_ascii_case("upgrade") {
            upgrade_to = Some(h.value);
        } else if !framing && name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(reject(400, "more than one Host header"));
            }
            if !valid_host(h.value) {
                return Err(reject(400, "an invalid Host header"));
            }
            host = Some(h.value);
        }
    }
    // One framing only, which every app reads the same way: a single
    // `Transfer-Encoding: chunked`, sent on as baton writes it.
    if framed.te_headers > 1 {
        return Err(reject(400, "more than one Transfer-Encoding header"));
    }
    let (length, te, chunked) = (framed.length, framed.te, framed.chunked);
    let chunked_alone = framed.chunked_alone;
    let tokens = framed.tokens;
    if te {
        if http10 {
            return Err(reject(400, "Transfer-Encoding in an HTTP/1.0 request"));
        }
        if !chunked {
            return Err(reject(
                400,
                "a request's last transfer coding must be chunked",
            ));
        }
        if !chunked_alone {
            return Err(reject(
                501,
                "transfer codings other than chunked are not proxied",
            ));
        }
        if length.is_some() {
            return Err(reject(400, "both Transfer-Encoding and Content-Length"));
        }
    }
    if tokens.named.iter().any(|n| framing_header(n)) {
        return Err(reject(400, "Connection names a framing header"));
    }
    // RFC 9112 §3.2: an HTTP/1.1 request must say which host it is for.
    if host.is_none() && !http10 {
        return Err(reject(400, "an HTTP/1.1 request without a Host header"));
    }
    let framing = match (te, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::None,
    };
    let upgrade = upgrade_to.is_some() && tokens.upgrade;
    let idempotent = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"].contains(&method);

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let forwarding = peer.is_some();
    for h in req.headers.iter() {
        let name = h.name;
        if hop_by_hop(name)
            || tokens.names(name)
            || (!hop.keep_underscores && name.contains('_'))
            || name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            || (forwarding
                && (name.eq_ignore_ascii_case("x-forwarded-for")
                    || name.eq_ignore_ascii_case("forwarded")))
        {
            continue;
        }
        header(out, name.as_bytes(), h.value);
    }
    if let Some(n) = length {
        let _ = write!(out, "content-length: {n}\r\n");
    }
    if te {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if upgrade && let Some(protocol) = upgrade_to {
        header(out, b"upgrade", protocol);
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    if let Some(ip) = peer {
        // Every X-Forwarded-For line the client sent, then this hop.
        out.extend_from_slice(b"x-forwarded-for: ");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("x-forwarded-for") {
                out.extend_from_slice(h.value);
                out.extend_from_slice(b", ");
            }
        }
        let _ = write!(out, "{ip}\r\nforwarded: ");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("forwarded") {
                out.extend_from_slice(h.value);
                out.extend_from_slice(b", ");
            }
        }
        if ip.is_ipv6() {
            let _ = write!(out, "for=\"[{ip}]\";proto=http");
        } else {
            let _ = write!(out, "for={ip};proto=http");
        }
        // An RFC 7239 quoted-string: a valid Host has no quote or
        // backslash, so it cannot add parameters of its own.
        if let Some(host) = host {
            out.extend_from_slice(b";host=\"");
            out.extend_from_slice(host);
            out.push(b'"');
        }
        out.extend_from_slice(b"\r\n");
    }
    // The scheme of this hop, whatever the client claimed.
    out.extend_from_slice(b"x-forwarded-proto: http\r\n\r\n");
    Ok(Some(Request {
        head_len,
        framing,
        replayable: idempotent && framing == Framing::None && !upgrade,
        head_method: method == "HEAD",
        http10,
        close: http10 || tokens.close,
        upgrade,
        needs_host: host.is_none(),
    }))
}

/// Adds `Host: local` to a rewritten request head (for an HTTP/1.0
/// request without one, which goes on as HTTP/1.1; apps refuse an
/// HTTP/1.1 request without it). A Unix socket's client gets `localhost`.
pub fn add_host(out: &mut Vec<u8>, local: Option<std::net::SocketAddr>) {
    // Before the empty line that ends the head.
    out.truncate(out.len().saturating_sub(2));
    match local {
        Some(addr) => {
            let _ = write!(out, "host: {addr}\r\n\r\n");
        }
        None => out.extend_from_slice(b"host: localhost\r\n\r\n"),
    }
}

/// Tells when a buffer that grows holds a complete head (an empty line
/// after a non-empty one), looking at each byte once: a head that comes a
/// byte at a time is parsed once, not once per byte. Reset it when the
/// buffer's front moves.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeadEnd {
    /// Bytes looked at so far.
    scanned: usize,
    /// Where the head starts, after the empty lines before it.
    first: Option<usize>,
}

impl HeadEnd {
    /// Whether `buf` holds a complete head. Once it says so, the head is
    /// parsed; if it is still incomplete (empty lines that the parser does
    /// not skip), only bytes that come later are looked at.
    pub fn complete(&mut self, buf: &[u8]) -> bool {
        let mut i = self.scanned.min(buf.len());
        let first = match self.first {
            Some(first) => first,
            None => {
                while i < buf.len() && matches!(buf[i], b'\r' | b'\n') {
                    i += 1;
                }
                if i == buf.len() {
                    self.scanned = i;
                    return false;
                }
                self.first = Some(i);
                i
            }
        };
        // A line ends with LF (CR LF, or a bare LF); a head with an empty
        // line: LF LF or LF CR LF. Step back over what may have been the
        // start of one at the end of the last look.
        let from = i.saturating_sub(2).max(first);
        self.scanned = buf.len();
        // Most heads arrive whole, with nothing after them.
        if buf.ends_with(b"\n\r\n") || buf.ends_with(b"\n\n") {
            return true;
        }
        // The end of the head; or a CR that no LF follows, which the
        // parser refuses at once (without this, a head ending in
        // CR CR LF would wait for the header timeout).
        memchr::memchr2_iter(b'\n', b'\r', &buf[from..]).any(|j| {
            let at = from + j;
            let after = &buf[at + 1..];
            if buf[at] == b'\r' {
                return after.first().is_some_and(|&b| b != b'\n');
            }
            after.starts_with(b"\n") || after.starts_with(b"\r\n")
        })
    }

    /// Starts over (the buffer's front moved).
    pub fn reset(&mut self) {
        *self = HeadEnd::default();
    }
}

/// The length and status of a complete answer head at the start of `buf`.
pub fn head_len(buf: &[u8]) -> Result<Option<(usize, u16)>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Ok(Some((n, res.code.unwrap_or(0)))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err("malformed answer head"),
    }
}

/// Parses the answer head at the start of `buf` (to `request`) and writes
/// the head to send to the client into `out`. `close`: the client
/// connection closes after this answer anyway.
pub fn parse_response(
    buf: &[u8],
    request: &Request,
    generation: u64,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<Option<Response>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed answer head"),
    };
    let (Some(version), Some(status)) = (res.version, res.code) else {
        return Err("malformed answer head");
    };
    let reason = res.reason.unwrap_or("");
    let (mut framed, mut stamped) = (Framed::default(), false);
    for h in res.headers.iter() {
        if !framed.scan(h.name, h.value)? && h.name.eq_ignore_ascii_case("x-baton-generation") {
            stamped = true;
        }
    }
    let (length, te, chunked) = (framed.length, framed.te, framed.chunked);
    let tokens = framed.tokens;
    out.clear();
    let _ = write!(out, "HTTP/1.1 {status} {reason}\r\n");
    if status == 101 {
        if !request.upgrade {
            return Err("101 Switching Protocols to a request that asked for no upgrade");
        }
        // The handshake's headers go on as they are.
        for h in res.headers.iter() {
            header(out, h.name.as_bytes(), h.value);
        }
        stamp(out, stamped, generation);
        out.extend_from_slice(b"\r\n");
        return Ok(Some(Response {
            head_len,
            status,
            framing: Framing::None,
            dechunk: false,
            reusable: false,
            close: true,
        }));
    }
    if status < 200 {
        return Err("an informational answer out of place");
    }
    // Answers that must have no body: an app that sends one anyway (in a
    // later write, where no proxy can tell it from the next answer) makes
    // the connection unfit for another request.
    let bodiless = request.head_method || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::None
    } else if te {
        // An HTTP/1.0 answer with Transfer-Encoding is faulty (RFC 9112
        // §6.1): read until the app closes.
        if chunked && version == 1 {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let keep_alive = if version == 0 {
        tokens.keep_alive
    } else {
        !tokens.close
    };
    let dechunk = framing == Framing::Chunked && request.http10;
    let close = close || request.http10 || framing == Framing::Close;
    for h in res.headers.iter() {
        let name = h.name;
        if hop_by_hop(name)
            || (tokens.names(name) && !framing_header(name))
            || (te && name.eq_ignore_ascii_case("content-length"))
            || ((dechunk || (te && version == 0)) && name.eq_ignore_ascii_case("transfer-encoding"))
        {
            continue;
        }
        header(out, name.as_bytes(), h.value);
    }
    stamp(out, stamped, generation);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(Response {
        head_len,
        status,
        framing,
        dechunk,
        // An HTTP/1.0 answer is not reused even with keep-alive, as nginx
        // does: an app that answers in 1.0 frames its answers loosely.
        reusable: keep_alive && framing != Framing::Close && !bodiless && version == 1,
        close,
    }))
}

/// `x-baton-generation` on answers whose app did not set it.
fn stamp(out: &mut Vec<u8>, stamped: bool, generation: u64) {
    if !stamped {
        let _ = write!(out, "x-baton-generation: {generation}\r\n");
    }
}

/// An answer of baton's own, into `out`.
pub fn error_response(out: &mut Vec<u8>, status: u16, why: &str, close: bool, head_method: bool) {
    let reason = match status {
        400 => "Bad Request",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    };
    let body = format!("baton proxy: {why}\n");
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    if !head_method {
        out.extend_from_slice(body.as_bytes());
    }
}

/// Where a chunked body is, fed its bytes as they come.
#[derive(Debug, Default, Clone)]
pub struct Chunked {
    state: State,
    /// The chunk size being read, then what is left of the chunk.
    size: u64,
    /// Digits of the size, or bytes of an extension or of the trailers.
    count: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    /// Whitespace after the size, before an extension.
    SizeWs,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    Trailer,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// The longest chunk extension, and all trailers together.
const MAX_EXTENSION: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;

impl Chunked {
    /// Whether the body is complete.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Follows `input`; returns how many of its bytes belong to the body
    /// (all, unless it ends within them). With `data`, the chunks' data is
    /// also copied there.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut data: Option<&mut Vec<u8>>,
    ) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < input.len() && self.state != State::Done {
            if self.state == State::Data {
                let n = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - i);
                if let Some(data) = data.as_deref_mut() {
                    data.extend_from_slice(&input[i..i + n]);
                }
                self.size -= n as u64;
                i += n;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (State::Size, b) if b.is_ascii_hexdigit() => {
                    self.count += 1;
                    if self.count > 15 {
                        return Err("chunk size too large");
                    }
                    let digit = (b as char).to_digit(16).unwrap_or(0);
                    self.size = self.size * 16 + u64::from(digit);
                    State::Size
                }
                (State::Size, b' ' | b'\t') if self.count > 0 => State::SizeWs,
                (State::SizeWs, b' ' | b'\t') => State::SizeWs,
                (State::Size | State::SizeWs, b';') if self.count > 0 => {
                    self.count = 0;
                    State::Extension
                }
                (State::Size | State::SizeWs, b'\r') if self.count > 0 => State::SizeLf,
                (State::Extension, b'\r') => State::SizeLf,
                (State::Extension, b'\n') => return Err("bare LF in a chunk extension"),
                (State::Extension, _) => {
                    self.count += 1;
                    if self.count > MAX_EXTENSION {
                        return Err("chunk extension too long");
                    }
                    State::Extension
                }
                (State::SizeLf, b'\n') => {
                    self.count = 0;
                    if self.size == 0 {
                        State::Trailer
                    } else {
                        State::Data
                    }
                }
                (State::DataCr, b'\r') => State::DataLf,
                (State::DataLf, b'\n') => State::Size,
                // Lines end with CRLF only: an app that also takes a bare
                // LF would otherwise end the body where baton does not.
                (State::Trailer, b'\r') => State::EndLf,
                (State::Trailer | State::TrailerLine, b'\n') => {
                    return Err("bare LF in chunked trailers");
                }
                (State::TrailerLine, b'\r') => State::TrailerLf,
                (State::TrailerLf, b'\n') => State::Trailer,
                (State::Trailer | State::TrailerLine, _) => {
                    self.count += 1;
                    if self.count > MAX_TRAILERS {
                        return Err("chunked trailers too long");
                    }
                    State::TrailerLine
                }
                (State::EndLf, b'\n') => State::Done,
                _ => return Err("malformed chunked body"),
            };
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(head: &str) -> (Result<Option<Request>, Reject>, String) {
        let mut out = Vec::new();
        let parsed = parse_request(
            head.as_bytes(),
            Hop {
                peer: Some("10.0.0.7".parse().unwrap()),
                keep_underscores: false,
            },
            &mut out,
        );
        (parsed, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_request_is_rewritten_with_forwarding_headers_and_without_hop_by_hop_ones() {
        let (parsed, out) = req(
            "GET /a?b HTTP/1.1\r\nHost: h.x:80\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\
             Keep-Alive: 5\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\n\r\n",
        );
        let parsed = parsed.unwrap().unwrap();
        assert_eq!(parsed.framing, Framing::None);
        assert!(parsed.replayable && !parsed.close && !parsed.upgrade);
        assert_eq!(
            out,
            "GET /a?b HTTP/1.1\r\nHost: h.x:80\r\nAccept: */*\r\nx-forwarded-for: 1.2.3.4, 10.0.0.7\r\n\
             forwarded: for=10.0.0.7;proto=http;host=\"h.x:80\"\r\nx-forwarded-proto: http\r\n\r\n"
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for head in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n",
        ] {
            let (parsed, _) = req(head);
            assert_eq!(parsed.unwrap_err().status, 400, "{head:?}");
        }
        let (parsed, _) =
            req("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(parsed.unwrap_err().status, 501);
        let (parsed, out) =
            req("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked \r\n\r\n");
        assert_eq!(parsed.unwrap().unwrap().framing, Framing::Chunked);
        assert!(out.contains("\r\ntransfer-encoding: chunked\r\n"), "{out}");
        assert!(
            !out.contains("Chunked"),
            "sent on as baton writes it: {out}"
        );
        let (parsed, out) = req("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n");
        assert_eq!(parsed.unwrap().unwrap().framing, Framing::Length(5));
        assert!(out.contains("content-length: 5\r\n"), "{out}");
    }

    #[test]
    fn partial_and_malformed_heads() {
        assert_eq!(req("GET / HTTP/1.1\r\nHost: x\r\n").0, Ok(None));
        assert_eq!(
            req("GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
                .0
                .unwrap_err()
                .status,
            400
        );
        let many: String = (0..200).map(|i| format!("h{i}: v\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert_eq!(req(&head).0.unwrap_err().status, 431);
    }

    #[test]
    fn an_answer_is_rewritten_and_framed() {
        let request = req("GET / HTTP/1.1\r\nHost: x\r\n\r\n").0.unwrap().unwrap();
        let mut out = Vec::new();
        let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n";
        let parsed = parse_response(answer, &request, 4, false, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.framing, Framing::Chunked);
        assert!(parsed.reusable && !parsed.close && !parsed.dechunk);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-baton-generation: 4\r\n\r\n"
        );
        let answer = b"HTTP/1.0 200 OK\r\nx-baton-generation: 9\r\n\r\n";
        let parsed = parse_response(answer, &request, 4, false, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.framing, Framing::Close);
        assert!(!parsed.reusable && parsed.close);
        let head_request = req("HEAD / HTTP/1.0\r\n\r\n").0.unwrap().unwrap();
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        let parsed = parse_response(answer, &head_request, 4, false, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.framing, Framing::None);
        assert!(parsed.close, "an HTTP/1.0 client");
        assert!(
            parse_response(
                b"HTTP/1.1 101 Switching\r\n\r\n",
                &request,
                4,
                false,
                &mut out
            )
            .is_err()
        );
    }

    #[test]
    fn host_is_required_of_http11_and_made_for_http10() {
        let (parsed, _) = req("GET / HTTP/1.1\r\nAccept: */*\r\n\r\n");
        assert_eq!(parsed.unwrap_err().status, 400);
        let (parsed, out) = req("GET / HTTP/1.0\r\nAccept: */*\r\n\r\n");
        let parsed = parsed.unwrap().unwrap();
        assert!(parsed.needs_host && parsed.http10);
        let mut out = out.into_bytes();
        add_host(&mut out, Some("127.0.0.1:8080".parse().unwrap()));
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("GET / HTTP/1.1\r\n"), "{out}");
        assert!(
            out.ends_with("x-forwarded-proto: http\r\nhost: 127.0.0.1:8080\r\n\r\n"),
            "{out}"
        );
        let mut unix = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        add_host(&mut unix, None);
        assert_eq!(unix, b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n");
        let (parsed, _) = req("GET / HTTP/1.0\r\nHost: h\r\n\r\n");
        assert!(!parsed.unwrap().unwrap().needs_host);
        for bad in ["a b", "a, b", "a\tb", "a/b", "a@b", "\"a\""] {
            let head = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert_eq!(req(&head).0.unwrap_err().status, 400, "{bad:?}");
        }
        for good in [
            "",
            "example.com",
            "example.com:8080",
            "[::1]:80",
            "xn--d1a.ru",
            "a_b.local",
        ] {
            let head = format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n");
            assert!(req(&head).0.unwrap().is_some(), "{good:?}");
        }
    }

    #[test]
    fn header_names_with_underscores_are_dropped_unless_kept() {
        let head = "GET / HTTP/1.1\r\nHost: x\r\nX_Forwarded_Proto: https\r\nContent_Length: 5\r\nX-Ok: 1\r\n\r\n";
        let (parsed, out) = req(head);
        assert_eq!(parsed.unwrap().unwrap().framing, Framing::None);
        assert!(!out.contains('_'), "{out}");
        assert!(out.contains("X-Ok: 1\r\n"), "{out}");
        let mut kept = Vec::new();
        let hop = Hop {
            peer: None,
            keep_underscores: true,
        };
        parse_request(head.as_bytes(), hop, &mut kept)
            .unwrap()
            .unwrap();
        let kept = String::from_utf8(kept).unwrap();
        assert!(kept.contains("X_Forwarded_Proto: https\r\n"), "{kept}");
        // The scheme is still this hop's.
        assert!(kept.contains("x-forwarded-proto: http\r\n"), "{kept}");
    }

    #[test]
    fn answers_that_must_be_bodiless_leave_the_connection_unfit_for_reuse() {
        let get = req("GET / HTTP/1.1\r\nHost: x\r\n\r\n").0.unwrap().unwrap();
        let head = req("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            .0
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        let mut answer = |request: &Request, text: &str| {
            parse_response(text.as_bytes(), request, 1, false, &mut out)
                .unwrap()
                .unwrap()
        };
        let ok = answer(&get, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n");
        assert!(ok.reusable);
        for (request, text) in [
            (&head, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"),
            (&get, "HTTP/1.1 204 No Content\r\n\r\n"),
            (
                &get,
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n",
            ),
        ] {
            let parsed = answer(request, text);
            assert_eq!(parsed.framing, Framing::None, "{text}");
            assert!(!parsed.reusable, "{text}");
            // The client connection itself goes on.
            assert!(!parsed.close, "{text}");
        }
        // An HTTP/1.0 answer with Transfer-Encoding: read until the app
        // closes, its framing headers not passed on.
        let faulty = "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n";
        let mut out = Vec::new();
        let parsed = parse_response(faulty.as_bytes(), &get, 1, false, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.framing, Framing::Close);
        assert!(!parsed.reusable && parsed.close);
        let out = String::from_utf8(out).unwrap().to_ascii_lowercase();
        assert!(
            !out.contains("transfer-encoding") && !out.contains("content-length"),
            "{out}"
        );
    }

    #[test]
    fn the_end_of_a_head_is_found_once_whatever_the_pieces() {
        let heads = [
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\nHost: x\n\n",
            "GET / HTTP/1.1\r\nHost: x\r\n\nBODY",
            "HTTP/1.1 200 OK\r\nA: b\r\n\r\n",
        ];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for head in heads {
            let bytes = head.as_bytes();
            let end = head.find("\n\n").or(head.rfind("\n\r\n")).unwrap();
            for _ in 0..200 {
                let mut scan = HeadEnd::default();
                let mut have = 0;
                let mut found = None;
                while have < bytes.len() {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    have = (have + 1 + (rng % 4) as usize).min(bytes.len());
                    if found.is_none() && scan.complete(&bytes[..have]) {
                        found = Some(have);
                    }
                }
                let found = found.expect(head);
                // Not before the empty line is in, and not later than the
                // piece that brought it.
                assert!(found > end, "{head:?} at {found}");
                let mut fresh = HeadEnd::default();
                assert!(fresh.complete(&bytes[..found]));
                let mut short = HeadEnd::default();
                assert!(!short.complete(&bytes[..=end]), "{head:?}");
            }
        }
        // A CR that no LF follows: parsed (and refused) at once.
        let bare = b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n";
        assert!(HeadEnd::default().complete(bare));
        assert_eq!(
            parse_request(bare, Hop::default(), &mut Vec::new())
                .unwrap_err()
                .status,
            400
        );
        assert!(!HeadEnd::default().complete(b"GET / HTTP/1.1\r"));
        let mut scan = HeadEnd::default();
        assert!(!scan.complete(b"\r\n\r\n\n"), "empty lines alone");
        assert!(!scan.complete(b"\r\n\r\n\nGET / HTTP/1.1\r\n"));
        assert!(scan.complete(b"\r\n\r\n\nGET / HTTP/1.1\r\n\r\n"));
    }

    #[test]
    fn chunked_bodies_are_followed_to_their_end_in_any_pieces() {
        let body = b"4 ;x=y\r\nWiki\r\n5\r\npedia\r\n0\r\nT: v\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..body.len() {
            let mut c = Chunked::default();
            let mut data = Vec::new();
            let a = c.feed(&body[..split], Some(&mut data)).unwrap();
            assert_eq!(a, split.min(end));
            let b = c.feed(&body[a..], Some(&mut data)).unwrap();
            assert_eq!(a + b, end);
            assert!(c.done());
            assert_eq!(data, b"Wikipedia");
        }
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"4\r\nWikiXX",
            b"1234567890123456\r\n",
            b"0\r\n\rX",
            // A bare LF ends the trailers for some apps: refused.
            b"0\r\n\nGET / HTTP/1.1\r\n",
            b"0\r\nT: v\n\r\n",
            b"0\r\nT: v\rX\r\n\r\n",
            // A second number after the size.
            b"5 6\r\nhello\r\n",
            b"5\n",
        ] {
            assert!(Chunked::default().feed(bad, None).is_err(), "{bad:?}");
        }
    }
}
