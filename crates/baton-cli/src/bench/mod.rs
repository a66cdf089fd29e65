//! `baton bench`: drives HTTP load at a service while triggering reloads,
//! and counts every failed request, the latency inside restart windows, the
//! unavailable span and the handover time (see `stats` for the definitions).

pub mod load;
pub mod report;
pub mod stats;
pub mod trigger;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::spec::parse_duration;
use load::{Counters, LoadConfig};
use report::{Run, Setup};
use trigger::Trigger;

/// `baton bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The URL to load: http://HOST:PORT/PATH [default: the first TCP
    /// listener of the only baton running, or of --name/--control].
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,

    /// Concurrent clients (closed loop: each waits for its answer).
    #[arg(short = 'c', long, value_name = "N", default_value_t = 32)]
    pub clients: usize,

    /// How long to run.
    #[arg(short = 'd', long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Open a new connection for every request (default: keep-alive).
    #[arg(long)]
    pub new_conn: bool,

    /// Per-request timeout (connect, send, whole answer).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Reload at these times after the start, e.g. 2s,5s,8s.
    #[arg(long, value_name = "TIMES", value_delimiter = ',', value_parser = parse_duration, conflicts_with = "reload_every")]
    pub reload_at: Vec<Duration>,

    /// Reload at this interval.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub reload_every: Option<Duration>,

    /// Reload by running this shell command.
    #[arg(long, value_name = "CMD", conflicts_with_all = ["name", "control"])]
    pub trigger: Option<String>,

    /// Reload through the control socket of the baton with this --name.
    #[arg(long, value_name = "NAME", conflicts_with = "control")]
    pub name: Option<String>,

    /// Reload through this control socket.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Send this header with every request (repeatable), e.g.
    /// `--header 'If-None-Match: "v1"'` (a 304 counts as answered).
    #[arg(long, value_name = "NAME: VALUE")]
    pub header: Vec<String>,

    /// POST this body with every request (default: GET).
    #[arg(long, value_name = "TEXT")]
    pub body: Option<String>,

    /// Print JSON (setup, summary, triggers, timeline) instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Also write an SVG plot of throughput and latency over time.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

/// An `http://host:port/path` URL, resolved.
#[derive(Debug, Clone)]
pub struct Target {
    /// The first address the host resolves to.
    pub addr: SocketAddr,
    /// `host:port`, for the Host header.
    pub host: String,
    /// Path and query.
    pub path: String,
}

impl Target {
    /// Parses and resolves `url`.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let rest = url.strip_prefix("http://").with_context(|| {
            format!("invalid URL {url:?}: expected http://HOST:PORT/PATH (https is not supported)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            bail!("invalid URL {url:?}: expected http://HOST:PORT/PATH");
        }
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .with_context(|| format!("{authority} has no address"))?;
        Ok(Target {
            addr,
            host: authority.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// The reload times: explicit, periodic, or none.
pub fn reload_times(args: &BenchArgs) -> Vec<Duration> {
    if let Some(every) = args.reload_every.filter(|d| !d.is_zero()) {
        let mut times = Vec::new();
        let mut at = every;
        while at < args.duration {
            times.push(at);
            at += every;
        }
        return times;
    }
    args.reload_at
        .iter()
        .copied()
        .filter(|t| *t < args.duration)
        .collect()
}

/// A usage error (exit 2), like clap's own.
/// A `--header` value: `Name: value`.
fn parse_header(
    h: &str,
) -> anyhow::Result<(hyper::header::HeaderName, hyper::header::HeaderValue)> {
    let bad = || usage(format!("invalid --header {h:?}: expected NAME: VALUE"));
    let (name, value) = h.split_once(':').ok_or_else(bad)?;
    let name = hyper::header::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
    let value = hyper::header::HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
    Ok((name, value))
}

fn usage(message: String) -> anyhow::Error {
    crate::error::StartupError::Invalid(message).into()
}

/// Without `--url`: the first TCP listener of the baton that `name` or
/// `control` names, or of the only one running.
fn default_url(name: Option<&str>, control: Option<&std::path::Path>) -> anyhow::Result<String> {
    use crate::control::{client, proto};
    let target = client::Target {
        name,
        control,
        service: None,
    };
    let path = client::locate(&target)
        .map_err(|e| usage(format!("no --url given, and no baton to take it from: {e}")))?;
    let proto::Response::Status(status) = client::call(&path, &proto::Request::Status, None)?
    else {
        bail!("unexpected answer from baton at {}", path.display());
    };
    let addr = status
        .listeners
        .iter()
        .find_map(|l| l.addr.parse::<SocketAddr>().ok())
        .ok_or_else(|| {
            usage(format!(
                "no --url given, and {} has no TCP listener to load",
                status.name
            ))
        })?;
    // A wildcard address is reached through loopback.
    let addr = match addr {
        a if a.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], a.port())),
        a => a,
    };
    Ok(format!("http://{addr}/"))
}

/// Runs `baton bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let url = match &args.url {
        Some(url) => url.clone(),
        None => default_url(args.name.as_deref(), args.control.as_deref())?,
    };
    let target = Target::parse(&url).map_err(|e| usage(format!("{e:#}")))?;
    let times = reload_times(&args);
    let (trigger, described): (Option<Trigger>, String) =
        match (&args.trigger, &args.name, &args.control) {
            (Some(cmd), _, _) => (Some(trigger::shell(cmd.clone())), format!("trigger: {cmd}")),
            (None, Some(name), _) => {
                crate::control::validate_name(name).map_err(anyhow::Error::msg)?;
                let path = crate::control::default_path(name);
                (
                    Some(trigger::control(path)),
                    format!("baton reload --name {name}"),
                )
            }
            (None, None, Some(path)) => (
                Some(trigger::control(path.clone())),
                format!("baton reload --control {}", path.display()),
            ),
            // Reloads asked for without a trigger: the one baton running,
            // found as `baton reload` finds it.
            (None, None, None) if !times.is_empty() => {
                let target = crate::control::client::Target::default();
                let path = crate::control::client::locate(&target).map_err(|e| {
                    usage(format!(
                        "--reload-at/--reload-every need a trigger (--trigger CMD, --name NAME or \
                         --control PATH), and none was found: {e}"
                    ))
                })?;
                let described = format!("baton reload --control {}", path.display());
                (Some(trigger::control(path)), described)
            }
            (None, None, None) => (None, "no trigger".to_owned()),
        };
    if args.clients == 0 {
        return Err(usage("--clients must be at least 1".to_owned()));
    }
    let headers = args
        .header
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = LoadConfig {
        addr: target.addr,
        host: target.host.clone(),
        path: target.path.clone(),
        clients: args.clients,
        duration: args.duration,
        new_conn: args.new_conn,
        timeout: args.timeout,
        headers,
        body: args.body.clone().map(bytes::Bytes::from),
    };
    let setup = Setup {
        url: url.clone(),
        clients: args.clients,
        keep_alive: !args.new_conn,
        duration_s: args.duration.as_secs_f64(),
        timeout_ms: args.timeout.as_millis() as u64,
        reload_at_s: times.iter().map(Duration::as_secs_f64).collect(),
        trigger: described,
    };
    let runtime = runtime()?;
    let progress = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let run = runtime.block_on(measure(&cfg, trigger, times, setup, progress));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&run)?);
    } else {
        print!("{}", report::table(&run));
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report::svg(&run))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let failed_triggers: Vec<String> = run
        .summary
        .windows
        .iter()
        .filter(|w| !w.trigger_ok)
        .map(|w| format!("at {:.1} s: {}", w.at_ms / 1000.0, w.trigger_message))
        .collect();
    if !failed_triggers.is_empty() {
        eprintln!(
            "baton: {} of {} reloads failed ({}); the figures above are of a service that did not reload",
            failed_triggers.len(),
            run.summary.windows.len(),
            failed_triggers.join("; ")
        );
        return Ok(ExitCode::from(1));
    }
    if run.summary.requests > 0 && run.summary.ok == 0 {
        eprintln!(
            "baton: nothing answered at {url}: all {} requests failed; is the service running there?",
            run.summary.requests
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The runtime load runs on: one worker per core, like the servers it tests.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// Loads `cfg` while running `trigger` at `times`; summarizes. With
/// `progress`, prints a line to stderr every second.
pub async fn measure(
    cfg: &LoadConfig,
    trigger: Option<Trigger>,
    times: Vec<Duration>,
    setup: Setup,
    progress: bool,
) -> Run {
    let start = Instant::now();
    let counters = Arc::new(Counters::default());
    let triggers = async {
        match trigger {
            Some(trigger) => trigger::schedule(trigger, times, start).await,
            None => Vec::new(),
        }
    };
    let ticker = {
        let counters = Arc::clone(&counters);
        let duration = cfg.duration;
        async move {
            if !progress {
                return;
            }
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let elapsed = start.elapsed();
                if elapsed >= duration {
                    break;
                }
                eprintln!(
                    "  {:>5.1} s / {:.0} s  {:>9} requests  {:>6} failed",
                    elapsed.as_secs_f64(),
                    duration.as_secs_f64(),
                    counters.requests.load(std::sync::atomic::Ordering::Relaxed),
                    counters.failed.load(std::sync::atomic::Ordering::Relaxed)
                );
            }
        }
    };
    let (records, triggers, ()) = tokio::join!(load::run(cfg, start, counters), triggers, ticker);
    let summary = stats::summarize(&records, &triggers, cfg.duration);
    let timeline = stats::timeline(&records, cfg.duration, Duration::from_millis(100));
    Run {
        setup,
        summary,
        triggers,
        timeline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("http://127.0.0.1:8080/slow?ms=5").expect("valid");
        assert_eq!(t.addr, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(
            (t.host.as_str(), t.path.as_str()),
            ("127.0.0.1:8080", "/slow?ms=5")
        );
        let t = Target::parse("http://127.0.0.1:9").expect("valid");
        assert_eq!(t.path, "/");
        for bad in ["https://x:1/", "127.0.0.1:80", "http:///x"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
