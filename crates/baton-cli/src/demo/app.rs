//! `baton demo-app`: the embedded example app, which is also the probe the
//! integration tests run under the guardian.
//!
//! It is an HTTP/1.1 server built on the `baton` library the way any app
//! would be: take the inherited listeners, warm up, notify readiness, serve,
//! and drain on SIGTERM. Every response names the process (`x-pid`) and the
//! generation (`x-baton-generation`). It can report what it inherited (fds,
//! `LISTEN_*`, `NOTIFY_SOCKET`, signal mask) and misbehave on purpose
//! (`--exit-before-ready`, `--never-ready`, `--ignore-term`), also through a
//! faults file read at start, so a test can make only a *later* generation
//! misbehave.

use std::convert::Infallible;
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use baton::serve::{AsyncListener, Drain};
use baton::{Listener, vars};
use bytes::Bytes;
use clap::{Args, Parser};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::spec::parse_duration;

/// `baton demo-app` options.
#[derive(Debug, Clone, Args)]
pub struct AppArgs {
    /// Address to bind when no socket was inherited.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// How long a drain may take after SIGTERM.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,

    /// While draining, how long an idle keep-alive connection is kept open
    /// before it is closed.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
    pub idle_grace: Duration,

    /// Write what this process inherited, as JSON, to this file at start.
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,

    /// Read more fault switches from this file at start, if it exists
    /// (whitespace-separated, e.g. `--exit-before-ready 3`).
    #[arg(long, value_name = "PATH")]
    pub faults_file: Option<PathBuf>,

    #[command(flatten)]
    pub faults: Faults,
}

/// Ways to misbehave.
#[derive(Debug, Clone, Default, Args)]
pub struct Faults {
    /// Wait this long before reporting ready (stands for opening pools and
    /// warming caches).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub startup: Option<Duration>,

    /// Exit with this code instead of becoming ready.
    #[arg(long, value_name = "CODE")]
    pub exit_before_ready: Option<u8>,

    /// Never report ready.
    #[arg(long)]
    pub never_ready: bool,

    /// Ignore SIGTERM and SIGINT (only SIGKILL ends it).
    #[arg(long)]
    pub ignore_term: bool,

    /// Bind this address instead of --listen (an app ignoring $PORT).
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<String>,

    /// On exit, shut down (shutdown(2)) the inherited listeners, as some
    /// servers do on close: the shared socket then stops listening for
    /// every process that holds it.
    #[arg(long)]
    pub shutdown_listeners: bool,

    /// Exit with code 1 this long after reporting ready (a release that
    /// crashes soon after a deploy).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub crash_after: Option<Duration>,

    /// Answer every request of `/` with this HTTP status (a release that
    /// serves errors).
    #[arg(long, value_name = "CODE")]
    pub status: Option<u16>,
}

#[derive(Debug, Parser)]
#[command(no_binary_name = true)]
struct FaultLine {
    #[command(flatten)]
    faults: Faults,
}

impl Faults {
    /// These switches, overridden by those in `path` if the file exists.
    fn with_file(self, path: Option<&Path>) -> anyhow::Result<Faults> {
        let Some(path) = path else {
            return Ok(self);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(self),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let more = FaultLine::try_parse_from(text.split_whitespace())
            .with_context(|| format!("faults file {}", path.display()))?
            .faults;
        Ok(Faults {
            startup: more.startup.or(self.startup),
            exit_before_ready: more.exit_before_ready.or(self.exit_before_ready),
            never_ready: more.never_ready || self.never_ready,
            ignore_term: more.ignore_term || self.ignore_term,
            bind: more.bind.or(self.bind),
            shutdown_listeners: more.shutdown_listeners || self.shutdown_listeners,
            crash_after: more.crash_after.or(self.crash_after),
            status: more.status.or(self.status),
        })
    }
}

/// What the process found at start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Its pid.
    pub pid: u32,
    /// Its process group.
    pub pgid: i32,
    /// `BATON_GENERATION`.
    pub generation: Option<String>,
    /// `LISTEN_PID`.
    pub listen_pid: Option<String>,
    /// `LISTEN_FDS`.
    pub listen_fds: Option<String>,
    /// `LISTEN_FDNAMES`.
    pub listen_fdnames: Option<String>,
    /// `NOTIFY_SOCKET`.
    pub notify_socket: Option<String>,
    /// `SERVER_STARTER_PORT`.
    pub server_starter_port: Option<String>,
    /// Open fds and what they point to (`/proc/self/fd`).
    pub fds: Vec<(i32, String)>,
    /// `SigBlk` from `/proc/self/status`.
    pub sig_blocked: String,
    /// `SigIgn` from `/proc/self/status`.
    pub sig_ignored: String,
    /// The listeners it serves on, as addresses.
    pub listeners: Vec<String>,
    /// `LISTEN_*` still in the environment after the library took the fds.
    pub listen_vars_left: bool,
}

impl Report {
    fn collect() -> Report {
        let var = |name| std::env::var(name).ok();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        Report {
            pid: std::process::id(),
            pgid: rustix::process::getpgrp().as_raw_nonzero().get(),
            generation: var(vars::BATON_GENERATION),
            listen_pid: var(vars::LISTEN_PID),
            listen_fds: var(vars::LISTEN_FDS),
            listen_fdnames: var(vars::LISTEN_FDNAMES),
            notify_socket: var(vars::NOTIFY_SOCKET),
            server_starter_port: var(vars::SERVER_STARTER_PORT),
            fds: open_fds(),
            sig_blocked: field("SigBlk:"),
            sig_ignored: field("SigIgn:"),
            listeners: Vec::new(),
            listen_vars_left: false,
        }
    }
}

/// The fds open in this process, except the one used to list them.
fn open_fds() -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut fds: Vec<(i32, String)> = dir
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let fd: i32 = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        // The directory being read is itself an open fd.
        .filter(|(_, target)| !(target.starts_with("/proc/") && target.ends_with("/fd")))
        .collect();
    fds.sort();
    fds
}

/// Runs the app until SIGTERM (then drains) or a fault ends it.
pub fn run(args: AppArgs) -> anyhow::Result<ExitCode> {
    // Read the environment before the library takes (and unsets) LISTEN_*.
    let mut report = Report::collect();
    let faults = args.faults.clone().with_file(args.faults_file.as_deref())?;
    // Before any thread starts (see `baton::Listeners::from_env`).
    // With nothing inherited, `serve` binds `--listen` itself, after the
    // startup delay, as a plain app binds once it has initialized.
    let listeners = baton::listeners()
        .and_then(|mut l| l.take_all())
        .context("taking inherited sockets")?;
    report.listeners = listeners.iter().map(Listener::describe).collect();
    report.listen_vars_left = std::env::var_os(vars::LISTEN_PID).is_some();
    if let Some(path) = &args.report {
        write_report(path, &report)?;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(args, faults, listeners, report))
}

fn write_report(path: &Path, report: &Report) -> anyhow::Result<()> {
    // Write then rename, so a reader never sees half a file.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

async fn serve(
    args: AppArgs,
    faults: Faults,
    listeners: Vec<Listener>,
    report: Report,
) -> anyhow::Result<ExitCode> {
    // Install the handlers first: a SIGTERM during startup must not kill the
    // process with the default action.
    let shutdown = baton::shutdown::signal().context("installing signal handlers")?;
    // Say so when SIGUSR1 arrives (tests of signal forwarding read this).
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("installing signal handlers")?;
    let pid = report.pid;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            say(format_args!("demo-app: pid {pid} got SIGUSR1"));
        }
    });
    if let Some(startup) = faults.startup {
        tokio::time::sleep(startup).await;
    }
    if let Some(code) = faults.exit_before_ready {
        return Ok(ExitCode::from(code));
    }
    let listeners = if listeners.is_empty() {
        let addr = faults.bind.as_deref().unwrap_or(&args.listen);
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        say(format_args!("demo-app: listening on {}", l.local_addr()?));
        vec![Listener::Tcp(l)]
    } else {
        listeners
    };
    // Copies of the inherited sockets, to shut down on exit if asked.
    let to_shut: Vec<std::os::fd::OwnedFd> = if faults.shutdown_listeners {
        listeners
            .iter()
            .map(|l| l.as_fd().try_clone_to_owned())
            .collect::<std::io::Result<_>>()
            .context("duplicating listeners")?
    } else {
        Vec::new()
    };
    let listeners = listeners
        .into_iter()
        .map(AsyncListener::from_listener)
        .collect::<std::io::Result<Vec<_>>>()
        .context("registering listeners")?;
    if !faults.never_ready {
        baton::ready().context("notifying readiness")?;
    }
    let ignore_term = faults.ignore_term;
    let shutdown = async move {
        if ignore_term {
            // Keep the handlers installed (so the signals do nothing) forever.
            let _keep = shutdown;
            std::future::pending::<()>().await;
        } else {
            shutdown.await;
        }
        let _ = baton::stopping();
    };
    if let Some(after) = faults.crash_after {
        let pid = report.pid;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            say(format_args!(
                "demo-app: pid {pid} crashes now (--crash-after)"
            ));
            std::process::exit(1);
        });
    }
    let app = Arc::new(App {
        status: faults
            .status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK),
        pid: report.pid,
        generation: report.generation.clone().unwrap_or_default(),
        report: serde_json::to_string(&report)?,
    });
    let service = hyper::service::service_fn(move |req| {
        let app = Arc::clone(&app);
        async move { Ok::<_, Infallible>(app.handle(req).await) }
    });
    let drain = Drain {
        idle_grace: args.idle_grace,
        deadline: args.drain,
    };
    baton::serve::serve(listeners, service, shutdown, drain)
        .await
        .context("serving")?;
    for fd in &to_shut {
        crate::sys::socket::shut_down(fd).context("shutting down a listener")?;
    }
    Ok(ExitCode::SUCCESS)
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(bytes: Bytes) -> AppBody {
    use http_body_util::BodyExt;
    Full::new(bytes).map_err(|e| match e {}).boxed()
}

/// A body that yields `chunk`, then fails.
fn broken_after(chunk: Bytes) -> AppBody {
    use http_body_util::BodyExt;
    Broken(Some(chunk), None).boxed()
}

/// See [`broken_after`]: the chunk, a pause (so it is flushed), an error.
struct Broken(
    Option<Bytes>,
    Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
);

impl hyper::body::Body for Broken {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        use std::future::Future;
        if let Some(chunk) = self.0.take() {
            self.1 = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))));
        }
        if let Some(pause) = self.1.as_mut() {
            std::task::ready!(pause.as_mut().poll(cx));
        }
        std::task::Poll::Ready(Some(Err(std::io::Error::other("broken on purpose"))))
    }
}

struct App {
    /// What `/` answers.
    status: StatusCode,
    pid: u32,
    generation: String,
    report: String,
}

impl App {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<AppBody> {
        let query = |key: &str| {
            req.uri()
                .query()
                .and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                })
                .and_then(|v| v.parse::<u64>().ok())
        };
        let req_path_is_root = req.uri().path() == "/";
        let body = match req.uri().path() {
            "/" => format!(
                "hello from generation {} (pid {})\n",
                self.generation, self.pid
            ),
            "/slow" => {
                let ms = query("ms").unwrap_or(1000).min(600_000);
                // Tests wait for this line to know the request arrived.
                say(format_args!(
                    "demo-app: pid {} started a {ms} ms request",
                    self.pid
                ));
                tokio::time::sleep(Duration::from_millis(ms)).await;
                format!(
                    "slept {ms} ms in generation {} (pid {})\n",
                    self.generation, self.pid
                )
            }
            "/report" => self.report.clone(),
            // Keeps N MiB more for good (a leak, for `--max-rss` tests).
            "/leak" => {
                let mb = query("mb").unwrap_or(1).min(64) as usize;
                static LEAKED: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
                if let Ok(mut leaked) = LEAKED.lock() {
                    leaked.push(vec![1u8; mb << 20]);
                }
                format!("leaked {mb} MiB in pid {}\n", self.pid)
            }
            // The request's headers, one per line (proxy tests).
            "/headers" => req
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
                .collect(),
            // N bytes of a repeating pattern (large downloads).
            "/bytes" => {
                let n = query("n").unwrap_or(1024).min(256 << 20) as usize;
                let data: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
                let mut res = self.respond(StatusCode::OK, String::new());
                *res.body_mut() = full(Bytes::from(data));
                return res;
            }
            // The request body's length and byte sum (large uploads).
            "/echo" => {
                use http_body_util::BodyExt;
                match req.into_body().collect().await {
                    Ok(body) => {
                        let bytes = body.to_bytes();
                        let sum: u64 = bytes.iter().map(|b| u64::from(*b)).sum();
                        format!("{} bytes, sum {sum}\n", bytes.len())
                    }
                    Err(e) => format!("body error: {e}\n"),
                }
            }
            // Promises 1 MiB, sends 10 bytes, then breaks the connection (a
            // generation failing mid-response).
            "/broken" => {
                let first = broken_after(Bytes::from_static(b"0123456789"));
                let mut res = self.respond(StatusCode::OK, String::new());
                res.headers_mut()
                    .insert(hyper::header::CONTENT_LENGTH, (1u32 << 20).into());
                *res.body_mut() = first;
                return res;
            }
            // Upgrade to a byte-echo protocol (how WebSocket handshakes go).
            "/upgrade" => {
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(upgraded) = upgrade.await {
                        let (mut r, mut w) =
                            tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                });
                let mut res = self.respond(StatusCode::SWITCHING_PROTOCOLS, String::new());
                res.headers_mut()
                    .insert("upgrade", hyper::header::HeaderValue::from_static("echo"));
                res.headers_mut().insert(
                    "connection",
                    hyper::header::HeaderValue::from_static("upgrade"),
                );
                return res;
            }
            _ => {
                return self.respond(StatusCode::NOT_FOUND, "not found\n".to_owned());
            }
        };
        let status = if req_path_is_root {
            self.status
        } else {
            StatusCode::OK
        };
        self.respond(status, body)
    }

    fn respond(&self, status: StatusCode, body: String) -> Response<AppBody> {
        let mut res = Response::new(full(Bytes::from(body)));
        *res.status_mut() = status;
        let headers = res.headers_mut();
        headers.insert("x-pid", self.pid.into());
        if let Ok(generation) = self.generation.parse() {
            headers.insert("x-baton-generation", generation);
        }
        res
    }
}

/// Writes one line to stderr in a single `write`: the workers of a pool share
/// one pipe, and a line written in pieces would interleave with theirs.
fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let line = format!("{line}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
