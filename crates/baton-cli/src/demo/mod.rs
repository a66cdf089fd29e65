//! `baton demo`: the embedded example app (`app`), restarted under load two
//! ways, side by side: hot reloads under `baton run`, and cold restarts
//! (stop, then start anew, as a plain deploy script does). Each way runs
//! twice: clients opening a new connection per request, and keep-alive
//! clients. The app is this very binary (`baton demo-app`), so the demo needs
//! nothing else.

pub mod app;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use crate::bench::load::LoadConfig;
use crate::bench::report::{Run, Setup};
use crate::bench::{self, trigger};
use crate::spec::parse_duration;

/// `baton demo` options.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Length of each of the four runs.
    #[arg(short = 'd', long, value_name = "DURATION", default_value = "8s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Concurrent clients.
    #[arg(short = 'c', long, value_name = "N", default_value_t = 32)]
    pub clients: usize,

    /// Restarts per run.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub restarts: u32,

    /// The app's simulated startup (opening pools, warming caches).
    #[arg(long, value_name = "DURATION", default_value = "300ms", value_parser = parse_duration)]
    pub startup: Duration,

    /// Print JSON (every run in full) instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One row of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// "hot reload (baton)" or "cold restart (stop, start)".
    pub strategy: &'static str,
    /// The run in full.
    pub run: Run,
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.restarts == 0 || args.clients == 0 {
        bail!("--restarts and --clients must be at least 1");
    }
    let exe = std::env::current_exe().context("locating the baton binary")?;
    let dir = std::env::temp_dir().join(format!("baton-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let runtime = bench::runtime()?;
    let result = runtime.block_on(async {
        let mut rows = Vec::new();
        for keep_alive in [false, true] {
            let mode = if keep_alive {
                "keep-alive"
            } else {
                "new connection per request"
            };
            if !args.json {
                eprintln!(
                    "hot reload under baton, {mode}, {:.0} s ...",
                    args.duration.as_secs_f64()
                );
            }
            rows.push(Row {
                strategy: "hot reload (baton)",
                run: hot(&exe, &dir, keep_alive, &args).await?,
            });
            if !args.json {
                eprintln!(
                    "cold restart (stop, start), {mode}, {:.0} s ...",
                    args.duration.as_secs_f64()
                );
            }
            rows.push(Row {
                strategy: "cold restart (stop, start)",
                run: cold(&exe, keep_alive, &args).await?,
            });
        }
        anyhow::Ok(rows)
    });
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table(&rows, &args));
    }
    Ok(ExitCode::SUCCESS)
}

fn restart_times(args: &DemoArgs) -> Vec<Duration> {
    let n = args.restarts + 1;
    (1..n).map(|i| args.duration * i / n).collect()
}

fn load_config(port: u16, keep_alive: bool, args: &DemoArgs) -> LoadConfig {
    LoadConfig {
        addr: ([127, 0, 0, 1], port).into(),
        host: format!("127.0.0.1:{port}"),
        path: "/".to_owned(),
        clients: args.clients,
        duration: args.duration,
        new_conn: !keep_alive,
        timeout: Duration::from_secs(2),
        headers: Vec::new(),
        body: None,
    }
}

fn setup(port: u16, keep_alive: bool, args: &DemoArgs, trigger: &str) -> Setup {
    Setup {
        url: format!("http://127.0.0.1:{port}/"),
        clients: args.clients,
        keep_alive,
        duration_s: args.duration.as_secs_f64(),
        timeout_ms: 2000,
        reload_at_s: restart_times(args)
            .iter()
            .map(Duration::as_secs_f64)
            .collect(),
        trigger: trigger.to_owned(),
    }
}

/// A child process whose stderr lines arrive on a channel; killed on drop.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> anyhow::Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Ok(Proc { child, lines })
    }

    /// Waits (up to 30 s) for a line containing `needle`.
    fn wait_line(&self, needle: &str) -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!("waited 30 s for {needle:?} from {:?}", self.child.id()),
            }
        }
    }

    /// SIGTERM, then wait for the exit (SIGKILL after 30 s).
    fn stop(&mut self) {
        crate::sys::signal::send(self.child.id() as i32, crate::spec::Signal::TERM).ok();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Hot reloads: the app under `baton run`, reloaded through its control socket.
async fn hot(exe: &Path, dir: &Path, keep_alive: bool, args: &DemoArgs) -> anyhow::Result<Run> {
    let control = dir.join(if keep_alive {
        "hot-ka.sock"
    } else {
        "hot.sock"
    });
    let startup = humantime::format_duration(args.startup).to_string();
    let mut baton = Proc::spawn(
        Command::new(exe)
            .args(["run", "--listen", "127.0.0.1:0", "--control"])
            .arg(&control)
            .arg("--")
            .arg(exe)
            .args(["demo-app", "--startup", &startup]),
    )?;
    let listening = baton.wait_line(" listening ")?;
    let port = listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<u16>().ok())
        .context("reading baton's port")?;
    baton.wait_line(" ready ")?;
    let cfg = load_config(port, keep_alive, args);
    let setup = setup(port, keep_alive, args, "baton reload (control socket)");
    let run = bench::measure(
        &cfg,
        Some(trigger::control(control)),
        restart_times(args),
        setup,
        false,
    )
    .await;
    tokio::task::spawn_blocking(move || baton.stop()).await?;
    Ok(run)
}

/// Cold restarts: the app binds its own port; a restart stops it (SIGTERM,
/// wait) and starts a new one, as a plain deploy script would.
async fn cold(exe: &Path, keep_alive: bool, args: &DemoArgs) -> anyhow::Result<Run> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")?
        .port();
    let start_app = {
        let exe = exe.to_owned();
        let startup = humantime::format_duration(args.startup).to_string();
        move || {
            Proc::spawn(
                Command::new(&exe)
                    .args(["demo-app", "--startup", &startup, "--listen"])
                    .arg(format!("127.0.0.1:{port}")),
            )
        }
    };
    let first = start_app()?;
    first.wait_line("listening on")?;
    let current = Arc::new(Mutex::new(Some(first)));
    let restart: trigger::Trigger = {
        let current = Arc::clone(&current);
        let start_app = Arc::new(start_app);
        Arc::new(move || {
            let (current, start_app) = (Arc::clone(&current), Arc::clone(&start_app));
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    let mut slot = current.lock().map_err(|_| "lock".to_owned())?;
                    let old = slot.take().map(|mut p| {
                        p.stop();
                        p.child.id()
                    });
                    let new = start_app().map_err(|e| e.to_string())?;
                    let pid = new.child.id();
                    *slot = Some(new);
                    Ok(format!(
                        "pid {} stopped, pid {pid} started",
                        old.unwrap_or(0)
                    ))
                })
                .await
                .map_err(|e| e.to_string())?
            })
        })
    };
    let cfg = load_config(port, keep_alive, args);
    let setup = setup(port, keep_alive, args, "stop (SIGTERM, wait), start");
    let run = bench::measure(&cfg, Some(restart), restart_times(args), setup, false).await;
    let last = current.lock().ok().and_then(|mut s| s.take());
    tokio::task::spawn_blocking(move || drop(last)).await?;
    Ok(run)
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The side-by-side table.
pub fn table(rows: &[Row], args: &DemoArgs) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nbaton demo: the embedded app ({} ms simulated startup), {} clients, {} s per run, {} restarts per run\n",
        args.startup.as_millis(),
        args.clients,
        args.duration.as_secs_f64(),
        args.restarts
    );
    let _ = writeln!(
        out,
        "{:<30} {:>9} {:>7} {:>9} {:>13} {:>13} {:>10}",
        "", "requests", "failed", "failed %", "unavailable", "p99 restart", "handover"
    );
    let _ = writeln!(
        out,
        "{:<30} {:>9} {:>7} {:>9} {:>13} {:>13} {:>10}",
        "", "", "", "", "per restart", "windows", "(mean)"
    );
    for (i, row) in rows.iter().enumerate() {
        if i % 2 == 0 {
            let mode = if row.run.setup.keep_alive {
                "keep-alive clients"
            } else {
                "new connection per request"
            };
            let _ = writeln!(out, "{mode}");
        }
        let s = &row.run.summary;
        let handover = mean(s.windows.iter().filter_map(|w| w.first_new_ms))
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0} ms"));
        let _ = writeln!(
            out,
            "  {:<28} {:>9} {:>7} {:>8.3}% {:>10.0} ms {:>10.1} ms {:>10}",
            row.strategy,
            s.requests,
            s.failed,
            s.failure_rate_pct,
            s.unavailable_mean_ms,
            s.restart.p99_ms,
            handover
        );
    }
    let _ = writeln!(
        out,
        "\nfailed: requests refused, reset, closed unanswered, timed out (2 s) or not 2xx;\n\
         clients retry at once, so an outage counts many quick refusals (the failed %\n\
         depends on that, the unavailable span does not).\n\
         unavailable: first to last failed request after a restart (0 when none failed).\n\
         p99 restart windows: latency of successful requests in the 2 s after each restart.\n\
         handover: restart to the first answer from the new process; under baton the old\n\
         one serves until then, so it is the app's startup plus baton's share."
    );
    out
}
