//! Closed-loop HTTP/1.1 load: each client sends a request, waits for the
//! whole answer, and sends the next. Keep-alive clients reuse their
//! connection until the server closes it (or says `Connection: close`);
//! `--new-conn` clients open one per request. Every request is recorded with
//! its start, end, and outcome, so failures can be told apart by kind and
//! placed in time.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONNECTION, HOST, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The connection was refused: nobody listening.
    Refused,
    /// The connection was reset.
    Reset,
    /// The server closed the connection without answering.
    Closed,
    /// No complete answer within `--timeout`.
    Timeout,
    /// An answer that was not 2xx.
    Status,
    /// Anything else (handshake or protocol errors).
    Other,
}

impl FailureKind {
    /// Every kind, in report order.
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Refused,
        FailureKind::Reset,
        FailureKind::Closed,
        FailureKind::Timeout,
        FailureKind::Status,
        FailureKind::Other,
    ];

    /// The kind's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Reset => "reset",
            FailureKind::Closed => "closed",
            FailureKind::Timeout => "timeout",
            FailureKind::Status => "status",
            FailureKind::Other => "other",
        }
    }
}

/// Who answered: the generation if the server says (`x-baton-generation`),
/// with its pid when it says that too (`x-pid`: generation numbers start
/// again when baton does), else its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Responder {
    /// `x-baton-generation`.
    Generation(u64),
    /// `x-pid`.
    Pid(u64),
    /// Both.
    GenerationPid(u64, u64),
}

/// One request.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// When it was started, in µs since the run began.
    pub start_us: u64,
    /// When it finished (or failed), in µs since the run began.
    pub end_us: u64,
    /// `Ok(responder)` for a 2xx answer, else the failure kind.
    pub outcome: Result<Option<Responder>, FailureKind>,
}

impl Record {
    /// Its latency.
    pub fn latency_us(&self) -> u64 {
        self.end_us.saturating_sub(self.start_us)
    }
}

/// What to load and how.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server's address.
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: String,
    /// The request path (with query).
    pub path: String,
    /// Concurrent clients.
    pub clients: usize,
    /// How long to run.
    pub duration: Duration,
    /// A new connection for every request.
    pub new_conn: bool,
    /// Per-request bound: connect, send and the whole answer.
    pub timeout: Duration,
    /// Extra request headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A body to POST (none: GET).
    pub body: Option<Bytes>,
}

/// Live counters, for progress lines while the load runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests finished.
    pub requests: AtomicU64,
    /// Of which failed.
    pub failed: AtomicU64,
}

/// An upper bound on requests per client, whatever the duration.
const MAX_REQUESTS_PER_CLIENT: usize = 20_000_000;

/// Runs `cfg.clients` clients from `start` for `cfg.duration`; returns every
/// request, unsorted.
pub async fn run(cfg: &LoadConfig, start: Instant, counters: Arc<Counters>) -> Vec<Record> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..cfg.clients {
        let cfg = cfg.clone();
        let counters = Arc::clone(&counters);
        set.spawn(async move { client(cfg, start, counters).await });
    }
    let mut all = Vec::new();
    while let Some(records) = set.join_next().await {
        if let Ok(records) = records {
            all.extend(records);
        }
    }
    all
}

async fn client(cfg: LoadConfig, start: Instant, counters: Arc<Counters>) -> Vec<Record> {
    let mut records = Vec::with_capacity(4096);
    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
    let host = HeaderValue::from_str(&cfg.host).unwrap_or(HeaderValue::from_static("localhost"));
    let end = start + cfg.duration;
    while Instant::now() < end && records.len() < MAX_REQUESTS_PER_CLIENT {
        // A connection the server closed while idle is not a failed request:
        // no request was sent on it. Drop it and connect anew.
        if let Some(sender) = &mut conn
            && sender.ready().await.is_err()
        {
            conn = None;
        }
        let began = Instant::now();
        let start_us = micros(start, began);
        let outcome = tokio::time::timeout(cfg.timeout, exchange(&cfg, &mut conn, &host)).await;
        let outcome = match outcome {
            Ok(Ok((responder, keep))) => {
                if !keep || cfg.new_conn {
                    conn = None;
                }
                Ok(responder)
            }
            Ok(Err(kind)) => {
                conn = None;
                Err(kind)
            }
            Err(_) => {
                conn = None;
                Err(FailureKind::Timeout)
            }
        };
        counters.requests.fetch_add(1, Ordering::Relaxed);
        if outcome.is_err() {
            counters.failed.fetch_add(1, Ordering::Relaxed);
        }
        records.push(Record {
            start_us,
            end_us: micros(start, Instant::now()),
            outcome,
        });
    }
    records
}

/// One request on the client's connection (opening one if needed). Returns
/// who answered and whether the connection may be reused.
async fn exchange(
    cfg: &LoadConfig,
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    host: &HeaderValue,
) -> Result<(Option<Responder>, bool), FailureKind> {
    if conn.is_none() {
        *conn = Some(connect(cfg.addr).await?);
    }
    let sender = conn.as_mut().ok_or(FailureKind::Other)?;
    let method = if cfg.body.is_some() {
        Method::POST
    } else {
        Method::GET
    };
    let mut req = Request::builder()
        .method(method)
        .uri(cfg.path.as_str())
        .body(Full::new(cfg.body.clone().unwrap_or_default()))
        .map_err(|_| FailureKind::Other)?;
    req.headers_mut().insert(HOST, host.clone());
    for (name, value) in &cfg.headers {
        req.headers_mut().append(name.clone(), value.clone());
    }
    if cfg.new_conn {
        req.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    let response = sender.send_request(req).await.map_err(|e| classify(&e))?;
    let status = response.status();
    let keep = !response
        .headers()
        .get(CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let responder = responder(response.headers());
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| classify(&e))?;
    // 304 answers a conditional request (`--header 'If-None-Match: …'`).
    if !status.is_success() && status != StatusCode::NOT_MODIFIED {
        return Err(if status == StatusCode::REQUEST_TIMEOUT {
            FailureKind::Timeout
        } else {
            FailureKind::Status
        });
    }
    Ok((responder, keep))
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, FailureKind> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| classify_io(&e))?;
    // With nothing listening on a port in the ephemeral range, a connect can
    // pick that very port as its source and connect to itself.
    if stream.local_addr().ok() == stream.peer_addr().ok() {
        return Err(FailureKind::Refused);
    }
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| classify(&e))?;
    tokio::spawn(async move {
        // Errors surface on the request that was in flight.
        let _ = connection.await;
    });
    Ok(sender)
}

fn responder(headers: &hyper::HeaderMap) -> Option<Responder> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.parse::<u64>().ok();
    let generation = number("x-baton-generation").filter(|g| *g > 0);
    match (generation, number("x-pid")) {
        (Some(g), Some(p)) => Some(Responder::GenerationPid(g, p)),
        (Some(g), None) => Some(Responder::Generation(g)),
        (None, p) => p.map(Responder::Pid),
    }
}

fn classify_io(e: &io::Error) -> FailureKind {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => FailureKind::Refused,
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => FailureKind::Reset,
        io::ErrorKind::ConnectionAborted | io::ErrorKind::UnexpectedEof => FailureKind::Closed,
        io::ErrorKind::TimedOut => FailureKind::Timeout,
        _ => FailureKind::Other,
    }
}

fn classify(e: &hyper::Error) -> FailureKind {
    // An I/O error anywhere in the chain says the most.
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return classify_io(io);
        }
        source = s.source();
    }
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        FailureKind::Closed
    } else if e.is_timeout() {
        FailureKind::Timeout
    } else {
        FailureKind::Other
    }
}

fn micros(start: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(start).as_micros() as u64
}
