//! `--metrics ADDR`: baton's admin endpoint. Prometheus text at `/metrics`,
//! and the probes of Kubernetes and load balancers:
//!
//! - `/healthz` (liveness): 200 whenever it answers. It is served by a task
//!   of the guardian's own single-threaded runtime, so an answer means the
//!   event loop runs; a crash backoff, a slow first start or a reload never
//!   make it fail (a liveness failure gets the pod killed).
//! - `/readyz` (readiness): 200 while a generation serves, every listener
//!   listens and baton is not shutting down (which starts with
//!   `--shutdown-delay`); 503 with the reason otherwise.
//!
//! The event loop updates a shared snapshot after each event; the task
//! reads it under a short lock and never waits for a reload.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tracing::warn;

use crate::exit::ExitStatus;

/// What `/metrics` shows.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Why `/readyz` says no (`None`: ready).
    pub not_ready: Option<&'static str>,
    /// Reloads that put a new generation in service.
    pub reloads_ok: u64,
    /// Reloads that rolled back.
    pub reloads_rolled_back: u64,
    /// Replacements of generations that died while serving.
    pub restarts: u64,
    /// Releases reverted during their bake, by cause.
    pub reverts: crate::guardian::policy::Reverts,
    /// The generation serving now (0: none).
    pub generation: u64,
    /// Live generations (serving, starting, draining).
    pub generations_alive: u64,
    /// Proxy mode: the proxy, whose counters are read live.
    pub proxy: Option<Arc<crate::proxy::Proxy>>,
    /// The control socket's connections, read live.
    pub control: Option<Arc<baton::serve::Connections>>,
    /// Notifications ignored: from another user, or (with `--notify-access
    /// main`) another process.
    pub notify_rejected: u64,
    /// Listeners found shut down by an app and made to listen again.
    pub listener_rearms: u64,
    /// baton's descriptor limit (soft, after raising it).
    pub nofile_limit: u64,
    /// What the loop observed: readiness and drain times, exits, and the
    /// like (copied in whole at each publication).
    pub observed: Observed,
}

/// What the guardian's loop observes as it goes, kept without a lock and
/// published with the rest of the snapshot after each event.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// Workers replaced because they grew past `--max-rss`.
    pub rss_replacements: u64,
    /// Descriptors baton has open (at the last housekeeping round).
    pub descriptors: u64,
    ready_sum: f64,
    ready_count: u64,
    drain_sum: f64,
    drain_count: u64,
    exits: BTreeMap<String, u64>,
}

/// The snapshot shared with the HTTP task.
pub type Shared = Arc<Mutex<Metrics>>;

impl Observed {
    /// A generation took `d` to become ready.
    pub fn ready(&mut self, d: Duration) {
        self.ready_sum += d.as_secs_f64();
        self.ready_count += 1;
    }

    /// A retired generation took `d` to drain and exit.
    pub fn drained(&mut self, d: Duration) {
        self.drain_sum += d.as_secs_f64();
        self.drain_count += 1;
    }

    /// A generation's main process exited.
    pub fn exited(&mut self, status: ExitStatus) {
        let label = match status {
            ExitStatus::Exited(code) => format!("exit_{code}"),
            ExitStatus::Signaled(sig) => format!("signal_{sig}"),
            ExitStatus::Unknown => "unknown".to_owned(),
        };
        *self.exits.entry(label).or_default() += 1;
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        render(&self.families(None))
    }

    /// Its metric families; each line labelled with `service` if given.
    fn families(&self, service: Option<&str>) -> Vec<Family> {
        let mut out: Vec<Family> = Vec::new();
        // Each line is (suffix, value): a label set such as `{outcome="ok"}`,
        // or `_sum`/`_count` for summaries.
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
            out.push(Family {
                name: name.to_owned(),
                head: format!("# HELP {name} {help}\n# TYPE {name} {kind}"),
                lines: lines
                    .iter()
                    .map(|(labels, value)| format!("{name}{} {value}", labelled(labels, service)))
                    .collect(),
            });
        };
        metric(
            "baton_reloads_total",
            "counter",
            "Reloads by outcome.",
            &[
                ("{outcome=\"ok\"}".into(), self.reloads_ok.to_string()),
                (
                    "{outcome=\"rolled_back\"}".into(),
                    self.reloads_rolled_back.to_string(),
                ),
            ],
        );
        metric(
            "baton_reverts_total",
            "counter",
            "Releases reverted during their bake, by cause.",
            &[
                ("{cause=\"exited\"}".into(), self.reverts.exited.to_string()),
                (
                    "{cause=\"error_rate\"}".into(),
                    self.reverts.error_rate.to_string(),
                ),
            ],
        );
        metric(
            "baton_worker_replacements_total",
            "counter",
            "Workers replaced, by reason.",
            &[(
                "{reason=\"max-rss\"}".into(),
                self.observed.rss_replacements.to_string(),
            )],
        );
        metric(
            "baton_restarts_total",
            "counter",
            "Generations started because the serving one died.",
            &[(String::new(), self.restarts.to_string())],
        );
        metric(
            "baton_generation",
            "gauge",
            "The generation serving now (0: none).",
            &[(String::new(), self.generation.to_string())],
        );
        metric(
            "baton_generations_alive",
            "gauge",
            "Generations running (starting, serving, draining).",
            &[(String::new(), self.generations_alive.to_string())],
        );
        metric(
            "baton_ready_seconds",
            "summary",
            "Time from spawn to ready.",
            &[
                ("_sum".into(), format!("{:.6}", self.observed.ready_sum)),
                ("_count".into(), self.observed.ready_count.to_string()),
            ],
        );
        metric(
            "baton_drain_seconds",
            "summary",
            "Time from the stop signal to the exit of a retired generation.",
            &[
                ("_sum".into(), format!("{:.6}", self.observed.drain_sum)),
                ("_count".into(), self.observed.drain_count.to_string()),
            ],
        );
        let exits: Vec<(String, String)> = self
            .observed
            .exits
            .iter()
            .map(|(status, n)| (format!("{{status=\"{status}\"}}"), n.to_string()))
            .collect();
        metric(
            "baton_child_exits_total",
            "counter",
            "Exits of generations' main processes, by status.",
            &exits,
        );
        metric(
            "baton_notify_rejected_total",
            "counter",
            "Notifications ignored: sent by another user or, with --notify-access main, another process.",
            &[(String::new(), self.notify_rejected.to_string())],
        );
        metric(
            "baton_listener_rearms_total",
            "counter",
            "Listeners an app shut down that baton made listen again.",
            &[(String::new(), self.listener_rearms.to_string())],
        );
        metric(
            "baton_descriptors",
            "gauge",
            "Descriptors baton has open.",
            &[(String::new(), self.observed.descriptors.to_string())],
        );
        metric(
            "baton_descriptors_limit",
            "gauge",
            "baton's descriptor limit (RLIMIT_NOFILE, raised to the hard limit at start).",
            &[(String::new(), self.nofile_limit.to_string())],
        );
        let mut connections = Vec::new();
        if let Some(proxy) = &self.proxy {
            connections.push(("proxy", proxy.connections().stats()));
        }
        if let Some(control) = &self.control {
            connections.push(("control", control.stats()));
        }
        let per = |f: fn(&baton::serve::ConnectionStats) -> u64| -> Vec<(String, String)> {
            connections
                .iter()
                .map(|(name, s)| (format!("{{socket=\"{name}\"}}"), f(s).to_string()))
                .collect()
        };
        metric(
            "baton_connections",
            "gauge",
            "Client connections open.",
            &per(|s| s.open as u64),
        );
        metric(
            "baton_connections_max",
            "gauge",
            "The connection cap.",
            &per(|s| s.max as u64),
        );
        metric(
            "baton_connections_evicted_total",
            "counter",
            "Connections that had sent nothing, closed at the cap to make room.",
            &per(|s| s.evicted),
        );
        metric(
            "baton_connections_paused_total",
            "counter",
            "Times accepting paused at the cap (new clients waited in the kernel's queue).",
            &per(|s| s.paused),
        );
        metric(
            "baton_connections_header_timeouts_total",
            "counter",
            "Connections cut because a request head did not arrive within the header timeout.",
            &per(|s| s.header_timeouts),
        );
        metric(
            "baton_connections_idle_timeouts_total",
            "counter",
            "Connections closed after the idle timeout.",
            &per(|s| s.idle_timeouts),
        );
        if let Some(proxy) = &self.proxy {
            use std::sync::atomic::Ordering::Relaxed;
            let retries = proxy.counters.retries.load(Relaxed);
            let errors = proxy.counters.upstream_errors.load(Relaxed);
            metric(
                "baton_proxy_upstream_timeouts_total",
                "counter",
                "Proxied requests answered 504: no answer within --upstream-timeout.",
                &[(
                    String::new(),
                    proxy.counters.upstream_timeouts.load(Relaxed).to_string(),
                )],
            );
            metric(
                "baton_proxy_idle_relays_total",
                "counter",
                "TCP relays closed after --idle-timeout without a byte either way.",
                &[(
                    String::new(),
                    proxy.counters.idle_relays.load(Relaxed).to_string(),
                )],
            );
            metric(
                "baton_proxy_stray_answers_total",
                "counter",
                "Connections to the app closed because it sent bytes no request asked for.",
                &[(
                    String::new(),
                    proxy.counters.stray_answers.load(Relaxed).to_string(),
                )],
            );
            metric(
                "baton_proxy_retries_total",
                "counter",
                "Proxied requests retried because none of them reached the generation.",
                &[(String::new(), retries.to_string())],
            );
            metric(
                "baton_proxy_upstream_errors_total",
                "counter",
                "Proxied requests a generation failed (no answer, or a broken one).",
                &[(String::new(), errors.to_string())],
            );
        }
        out
    }
}

/// One metric: its HELP and TYPE lines, and its samples.
#[derive(Debug)]
struct Family {
    name: String,
    head: String,
    lines: Vec<String>,
}

/// `labels` (`{a="b"}`, `_sum`, or nothing) with `service="NAME"` added.
fn labelled(labels: &str, service: Option<&str>) -> String {
    let Some(service) = service else {
        return labels.to_owned();
    };
    let label = format!("service=\"{service}\"");
    match labels.find('{') {
        Some(at) => format!("{}{{{label},{}", &labels[..at], &labels[at + 1..]),
        None => format!("{labels}{{{label}}}"),
    }
}

/// The exposition of `families`, those of one name under one head.
fn render(families: &[Family]) -> String {
    let mut out = String::new();
    let mut names: Vec<&str> = Vec::new();
    for f in families {
        if !names.contains(&f.name.as_str()) {
            names.push(&f.name);
        }
    }
    for name in names {
        let mut of = families.iter().filter(|f| f.name == name).peekable();
        if let Some(first) = of.peek() {
            let _ = writeln!(out, "{}", first.head);
        }
        for f in of {
            for line in &f.lines {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    out
}

/// One service's snapshot (unnamed: the only one).
type Entry = (Option<String>, Shared);

/// What the metrics endpoint serves: one snapshot, or one per service
/// (`--config-dir`), each labelled with its service.
#[derive(Debug, Clone, Default)]
pub struct Board {
    entries: Arc<Mutex<Vec<Entry>>>,
}

impl Board {
    /// Serves `shared` (as the only one if `service` is `None`).
    pub fn insert(&self, service: Option<String>, shared: Shared) {
        if let Ok(mut e) = self.entries.lock() {
            e.retain(|(s, _)| *s != service);
            e.push((service, shared));
        }
    }

    /// No longer serves `service`'s.
    pub fn remove(&self, service: &str) {
        if let Ok(mut e) = self.entries.lock() {
            e.retain(|(s, _)| s.as_deref() != Some(service));
        }
    }

    fn render(&self) -> Option<String> {
        let entries = self.entries.lock().ok()?;
        let mut families = Vec::new();
        for (service, shared) in entries.iter() {
            families.extend(shared.lock().ok()?.families(service.as_deref()));
        }
        Some(render(&families))
    }

    /// Why `/readyz` says no, if it does: every service must be ready.
    fn not_ready(&self) -> Option<Option<String>> {
        let entries = self.entries.lock().ok()?;
        let mut why = None;
        for (service, shared) in entries.iter() {
            if let Some(no) = shared.lock().ok()?.not_ready {
                why = Some(match service {
                    Some(s) => format!("{s}: {no}"),
                    None => no.to_owned(),
                });
                break;
            }
        }
        Some(why)
    }
}

/// Serves `/metrics` on `listener` until the task is aborted, under the
/// same timeouts as the proxy (a short header timeout, since scrapers send
/// their request at once) and a small connection cap.
pub async fn serve(listener: std::net::TcpListener, metrics: Board) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "metrics listener failed");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let (status, body) = match req.uri().path() {
            "/metrics" => match metrics.render() {
                Some(text) => (StatusCode::OK, Bytes::from(text)),
                None => (StatusCode::INTERNAL_SERVER_ERROR, Bytes::new()),
            },
            "/healthz" => (StatusCode::OK, Bytes::from_static(b"ok\n")),
            "/readyz" => match metrics.not_ready() {
                Some(None) => (StatusCode::OK, Bytes::from_static(b"ready\n")),
                Some(Some(why)) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::from(format!("not ready: {why}\n")),
                ),
                None => (StatusCode::SERVICE_UNAVAILABLE, Bytes::new()),
            },
            _ => (
                StatusCode::NOT_FOUND,
                Bytes::from_static(b"not found; try /metrics, /healthz or /readyz\n"),
            ),
        };
        async move {
            let mut res = Response::new(Full::new(body));
            *res.status_mut() = status;
            res.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok::<_, Infallible>(res)
        }
    });
    let mut options = baton::serve::Options::default();
    options.header_timeout = Some(Duration::from_secs(5));
    options.idle_timeout = Some(Duration::from_secs(10));
    options.connections = baton::serve::Connections::new(crate::sys::limits::METRICS_CONNECTIONS);
    let _ = baton::serve::serve_with(
        [baton::serve::AsyncListener::from(listener)],
        service,
        std::future::pending(),
        options,
    )
    .await;
}
