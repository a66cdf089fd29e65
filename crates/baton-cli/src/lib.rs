//! The `baton` command: a guardian that owns a service's listening sockets
//! and restarts it without dropping a request. See the README for the
//! architecture; `guardian` holds the theory of operation.

pub mod bench;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod control;
pub mod demo;
pub mod error;
pub mod exit;
pub mod guardian;
pub mod proxy;
pub mod spec;
pub mod sys;

use std::process::ExitCode;

use anyhow::Context;

use cli::{Cli, Command, ControlArgs, StatusArgs};
use control::proto::{Request, Response};
use error::ControlError;

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            // Sockets passed to baton itself (systemd socket activation):
            // taken first, while the process has one thread.
            let inherited = baton::listeners().map_err(|e| {
                error::StartupError::Invalid(format!("sockets passed to baton: {e}"))
            })?;
            let args = *args;
            let (args, file_level) = match &args.config {
                Some(path) => {
                    let file = config_file::load(path)?;
                    (config_file::merge(args, file.args), file.log_level)
                }
                None => (args, None),
            };
            init_logging(cli.log_level.as_deref().or(file_level.as_deref()))?;
            // Validate and set up everything before starting anything.
            let cfg = config::RunConfig::from_args(args, inherited)?;
            // One thread for the loop; the guardian never blocks a pool
            // thread, so the pool is bounded to a single thread.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(1)
                .build()
                .context("starting the runtime")?;
            runtime.block_on(guardian::run(cfg))
        }
        Command::Reload(target) => reload(&target),
        Command::Status(args) => status(&args),
        Command::Stop(target) => {
            let path = control::client::locate(&target)?;
            match control::client::call(&path, &Request::Stop)? {
                Response::Stopping => Ok(ExitCode::SUCCESS),
                other => unexpected(other),
            }
        }
        Command::Signal(args) => {
            let path = control::client::locate(&args.target)?;
            let request = Request::Signal {
                signal: args.signal.number(),
            };
            match control::client::call(&path, &request)? {
                Response::Signaled { generation, pid } => {
                    println!(
                        "{}: sent to generation {generation} (pid {pid})",
                        args.signal
                    );
                    Ok(ExitCode::SUCCESS)
                }
                other => unexpected(other),
            }
        }
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run(args),
        Command::DemoApp(args) => demo::app::run(args),
    }
}

fn reload(target: &ControlArgs) -> anyhow::Result<ExitCode> {
    let path = control::client::locate(target)?;
    match control::client::call(&path, &Request::Reload)? {
        Response::Reloaded {
            generation,
            pid,
            ready_ms,
        } => {
            println!(
                "reloaded: generation {generation} (pid {pid}) is serving, ready after {ready_ms} ms"
            );
            Ok(ExitCode::SUCCESS)
        }
        Response::RolledBack { message, .. } => {
            eprintln!("baton: reload rolled back: {message}");
            Ok(ExitCode::from(1))
        }
        other => unexpected(other),
    }
}

fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let path = control::client::locate(&args.target)?;
    let Response::Status(status) = control::client::call(&path, &Request::Status)? else {
        anyhow::bail!("unexpected answer from baton at {}", path.display());
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} (baton pid {}, up {} s)",
        status.name,
        status.pid,
        status.uptime_ms / 1000
    );
    println!("command: {}", status.command.join(" "));
    for l in &status.listeners {
        println!("listen:  fd {} {} ({})", l.fd, l.addr, l.name);
    }
    for g in &status.generations {
        let pid = g.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
        let ready = g
            .ready_ms
            .map_or_else(String::new, |ms| format!(", ready after {ms} ms"));
        println!(
            "generation {}: pid {pid}, {}, started {} s ago{ready}",
            g.generation,
            g.phase,
            g.age_ms / 1000
        );
    }
    println!(
        "reloads: {} ok, {} rolled back; restarts after crashes: {}",
        status.reloads_ok, status.reloads_failed, status.restarts
    );
    if let Some(last) = &status.last_reload {
        println!("last reload: {last}");
    }
    if status.stopping {
        println!("stopping");
    }
    Ok(ExitCode::SUCCESS)
}

fn unexpected(response: Response) -> anyhow::Result<ExitCode> {
    match response {
        Response::Error { message } => anyhow::bail!("baton refused the request: {message}"),
        Response::Stopping => anyhow::bail!("baton is stopping"),
        other => anyhow::bail!("unexpected answer from baton: {other:?}"),
    }
}

/// Logs go to stderr, one line per event; `--log-level` beats `RUST_LOG`.
fn init_logging(level: Option<&str>) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => EnvFilter::try_new(level).with_context(|| {
            format!("invalid --log-level {level:?}: expected error, warn, info, debug or trace")
        })?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("initializing logging: {e}"))
}

/// The exit code for an error: 2 for usage and startup errors (including not
/// reaching a running baton), 1 for anything else.
pub fn exit_code_for(err: &anyhow::Error) -> ExitCode {
    let startup = err.downcast_ref::<error::StartupError>().is_some()
        || matches!(
            err.downcast_ref::<ControlError>(),
            Some(ControlError::NotRunning { .. } | ControlError::NoSocket(_))
        );
    if startup {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}
