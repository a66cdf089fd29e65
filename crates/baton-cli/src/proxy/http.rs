//! `--proxy http`: an HTTP/1.1 reverse proxy in front of the current
//! generation. Client connections are served by the library's lame-duck
//! server (`baton::serve`), so baton's own stop drains them gently; each
//! request goes to whichever generation is current when it arrives, over a
//! pooled keep-alive connection to that generation's private port.
//!
//! Bodies stream both ways (nothing is buffered); `Upgrade` requests
//! (WebSocket) are spliced once both sides agreed (101). `Host` is kept;
//! `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded` are added.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1 as client;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::body::{Bounded, Progress};
use super::upstream::{Active, UpBody, UpConn};
use super::{Proxy, Upstream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the proxy answers with.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// The proxy as a hyper service.
#[derive(Debug, Clone)]
pub struct HttpProxy {
    proxy: Arc<Proxy>,
}

impl HttpProxy {
    /// A service forwarding to `proxy`'s current generation.
    pub fn new(proxy: Arc<Proxy>) -> HttpProxy {
        HttpProxy { proxy }
    }
}

impl hyper::service::Service<Request<Incoming>> for HttpProxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let proxy = Arc::clone(&self.proxy);
        Box::pin(async move {
            let mut response = forward(&proxy, req).await;
            if proxy.lame_duck.load(Ordering::Relaxed)
                && response.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        })
    }
}

/// Forwards one request; retries once if none of it reached a generation.
async fn forward(proxy: &Arc<Proxy>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let peer = req
        .extensions()
        .get::<baton::serve::PeerAddr>()
        .map(|p| p.0);
    let upgrade = is_upgrade(req.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    prepare_request(&mut req, peer, upgrade);
    // A bodiless idempotent request can be sent again if the generation
    // died before answering (RFC 9110 §9.2.2); keep its head for that.
    let replay = (!upgrade && is_idempotent(req.method()) && req.body().is_end_stream())
        .then(|| head_of(&req));
    // A client that stops sending its body is cut after the idle timeout;
    // the upstream timeout runs from the end of the body (or from the last
    // part the app took, if it stops reading it).
    let stall = proxy.limits.serve.idle_timeout;
    let progress = (!req.body().is_end_stream()).then(|| Arc::new(Progress::new()));
    let mut req: Request<UpBody> = req.map(|body| {
        let body = Bounded::new(body, stall);
        Either::Left(match &progress {
            Some(progress) => body.with_progress(Arc::clone(progress)),
            None => body,
        })
    });

    let Some((mut upstream, mut active)) = proxy.acquire().await else {
        proxy
            .counters
            .upstream_errors
            .fetch_add(1, Ordering::Relaxed);
        return error(StatusCode::SERVICE_UNAVAILABLE, "no generation is serving");
    };
    // Connect failures (nothing sent) may move on to the next generation
    // twice; a request that was sent is tried again at most once.
    let (mut connect_retries, mut send_retried, mut fresh) = (0, false, false);
    loop {
        let pooled = if fresh { None } else { upstream.checkout() };
        fresh = false;
        let mut conn = match pooled {
            Some(conn) => conn,
            None => match connect(upstream.addr).await {
                Ok(conn) => conn,
                Err(e) => {
                    if connect_retries < 2 {
                        connect_retries += 1;
                        proxy.counters.retries.fetch_add(1, Ordering::Relaxed);
                        // This one is gone or not listening: wait for the
                        // guardian to switch to another.
                        if let Some(next) = proxy.next(Some(&upstream)).await
                            && let Some(entered) = next.enter_if_open()
                        {
                            (upstream, active) = (next, entered);
                            continue;
                        }
                    }
                    let why = format!(
                        "generation {} at {}: {e}",
                        upstream.generation, upstream.addr
                    );
                    upstream.record(true);
                    proxy
                        .counters
                        .upstream_errors
                        .fetch_add(1, Ordering::Relaxed);
                    return error(StatusCode::BAD_GATEWAY, &why);
                }
            },
        };
        // Without a body (a replay has none) the clock starts at once.
        let timeout = proxy.limits.upstream_timeout;
        let body_progress = progress
            .as_ref()
            .filter(|_| matches!(req.body(), Either::Left(_)));
        let deadline = async {
            match body_progress {
                Some(progress) => progress.deadline(timeout).await,
                None => tokio::time::sleep(timeout).await,
            }
        };
        let sent = async {
            tokio::select! {
                sent = conn.sender.try_send_request(req) => Ok(sent),
                () = deadline => Err(()),
            }
        };
        match sent.await {
            Ok(Ok(response)) => {
                let proxy = Arc::clone(proxy);
                return respond(response, conn, active, upstream, client_side, proxy).await;
            }
            // No answer in time: the app may still be working on it, so it
            // is never sent again. Dropping the connection closes it.
            Err(_) => {
                drop(conn);
                upstream.record(true);
                proxy
                    .counters
                    .upstream_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                let why = format!(
                    "generation {} did not answer within {} (--upstream-timeout)",
                    upstream.generation,
                    humantime::format_duration(proxy.limits.upstream_timeout)
                );
                return error(StatusCode::GATEWAY_TIMEOUT, &why);
            }
            Ok(Err(mut e)) => {
                let again = match e.take_message() {
                    // The request never left (a pooled connection was closed).
                    Some(unsent) => Some(unsent),
                    // It left, but no answer came: safe to repeat if idempotent.
                    None => replay.as_ref().map(rebuild),
                };
                let Some(next_req) = again.filter(|_| !send_retried) else {
                    let why = format!("generation {}: {}", upstream.generation, e.error());
                    upstream.record(true);
                    proxy
                        .counters
                        .upstream_errors
                        .fetch_add(1, Ordering::Relaxed);
                    return error(StatusCode::BAD_GATEWAY, &why);
                };
                debug!(generation = upstream.generation, error = %e.error(), "retrying a request no generation answered");
                send_retried = true;
                proxy.counters.retries.fetch_add(1, Ordering::Relaxed);
                req = next_req;
                let failed = Arc::clone(&upstream);
                drop(active);
                // The current generation; if that is still this one (a stale
                // keep-alive connection), at once, on a new connection.
                let Some((next, entered)) = proxy.acquire().await else {
                    proxy
                        .counters
                        .upstream_errors
                        .fetch_add(1, Ordering::Relaxed);
                    return error(StatusCode::BAD_GATEWAY, "no generation is serving");
                };
                fresh = Arc::ptr_eq(&next, &failed);
                (upstream, active) = (next, entered);
            }
        }
    }
}

/// What is needed to send a bodiless request again.
struct Head {
    method: hyper::Method,
    uri: hyper::Uri,
    version: hyper::Version,
    headers: HeaderMap,
}

fn head_of<B>(req: &Request<B>) -> Head {
    Head {
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        headers: req.headers().clone(),
    }
}

fn rebuild(head: &Head) -> Request<UpBody> {
    let mut req = Request::new(Either::Right(Empty::new()));
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    req
}

fn is_idempotent(method: &hyper::Method) -> bool {
    use hyper::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// Passes the generation's answer on; the connection goes back to the pool
/// once the body has been relayed in full.
async fn respond(
    mut response: Response<Incoming>,
    conn: UpConn,
    active: Active,
    upstream: Arc<Upstream>,
    client_side: Option<hyper::upgrade::OnUpgrade>,
    proxy: Arc<Proxy>,
) -> Response<ProxyBody> {
    let generation = upstream.generation;
    upstream.record(response.status().is_server_error());
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_side) = client_side
    {
        let upstream_side = hyper::upgrade::on(&mut response);
        let streams = Arc::clone(&proxy);
        streams.counters.open_streams.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _active = active;
            let _open = OpenStream(streams);
            if let (Ok(client), Ok(server)) = (client_side.await, upstream_side.await) {
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(client),
                    &mut TokioIo::new(server),
                )
                .await;
            }
            drop(conn);
        });
        let (parts, _) = response.into_parts();
        let mut out = Response::from_parts(parts, empty());
        stamp(out.headers_mut(), generation);
        return out;
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    stamp(&mut parts.headers, generation);
    let body = Relayed {
        inner: Bounded::new(body, Some(proxy.limits.upstream_timeout)),
        conn: Some(conn),
        upstream,
        active: Some(active),
        proxy,
    };
    Response::from_parts(parts, body.boxed())
}

/// Counts a relay or splice as open while alive.
pub(super) struct OpenStream(pub(super) Arc<Proxy>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.counters.open_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `x-baton-generation` on answers whose app did not set it.
fn stamp(headers: &mut HeaderMap, generation: u64) {
    let name = HeaderName::from_static("x-baton-generation");
    if !headers.contains_key(&name) {
        headers.insert(name, HeaderValue::from(generation));
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<UpConn> {
    let stream = super::connect(addr).await?;
    let (sender, connection) = client::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    let task = tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    Ok(UpConn::new(sender, task.abort_handle()))
}

/// Headers meaningful for one hop only (RFC 9110 §7.6.1), plus those named
/// in `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Hop-by-hop headers out (but the upgrade handshake), forwarding headers in.
fn prepare_request(req: &mut Request<Incoming>, peer: Option<SocketAddr>, upgrade: bool) {
    let headers = req.headers_mut();
    let upgrade_to = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(headers);
    if upgrade && let Some(protocol) = upgrade_to {
        headers.insert(header::UPGRADE, protocol);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if let Some(peer) = peer {
        let ip = peer.ip().to_canonical();
        let xff = HeaderName::from_static("x-forwarded-for");
        // Every X-Forwarded-For line the client sent, then this hop.
        let mut chain: Vec<String> = headers
            .get_all(&xff)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect();
        chain.push(ip.to_string());
        if let Ok(v) = HeaderValue::from_str(&chain.join(", ")) {
            headers.insert(xff, v);
        }
        let node = if ip.is_ipv6() {
            format!("\"[{ip}]\"")
        } else {
            ip.to_string()
        };
        // RFC 7239 quoted-string: a host with odd characters is escaped, so
        // it cannot add parameters of its own.
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| format!(";host=\"{}\"", h.replace('\\', "\\\\").replace('"', "\\\"")))
            .unwrap_or_default();
        let element = format!("for={node};proto=http{host}");
        let mut forwarded: Vec<String> = headers
            .get_all(header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect();
        forwarded.push(element);
        if let Ok(v) = HeaderValue::from_str(&forwarded.join(", ")) {
            headers.insert(header::FORWARDED, v);
        }
    }
    // The scheme of this hop, whatever the client claimed.
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
}

fn empty() -> ProxyBody {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

fn error(status: StatusCode, why: &str) -> Response<ProxyBody> {
    let body = http_body_util::Full::new(Bytes::from(format!("baton proxy: {why}\n")))
        .map_err(|e| match e {})
        .boxed();
    let mut res = Response::new(body);
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    res
}

/// A generation's answer body on its way to the client: counts as in flight
/// until done, then returns the connection to the pool.
struct Relayed {
    inner: Bounded<Incoming>,
    conn: Option<UpConn>,
    upstream: Arc<Upstream>,
    active: Option<Active>,
    proxy: Arc<Proxy>,
}

impl Relayed {
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.upstream.checkin(conn);
        }
        self.active.take();
    }
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.finish(),
            // A broken or stalled upstream body: the connection is not
            // reusable.
            Some(Err(_)) => {
                self.conn.take();
                self.active.take();
                self.proxy
                    .counters
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        // An empty body may never be polled; it is complete all the same.
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}
