//! The `baton` command: a guardian that owns a service's listening sockets
//! and restarts it without dropping a request. See the README for the
//! architecture; `guardian` holds the theory of operation.

pub mod bench;
pub mod bound;
pub mod cli;
pub mod config;
pub mod config_dir;
pub mod config_file;
pub mod control;
pub mod demo;
pub mod error;
pub mod exit;
pub mod guardian;
pub mod knobs;
pub mod proxy;
pub mod spec;
pub mod startup;
pub mod sys;

use std::process::ExitCode;

use anyhow::Context;

use cli::{Cli, Command};
use error::ControlError;

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if matches!(
        cli.command,
        Command::Reload(_)
            | Command::Rollback(_)
            | Command::Status(_)
            | Command::Stop(_)
            | Command::Signal(_)
            | Command::Start(_)
            | Command::Update(_)
            | Command::Upgrade(_)
    ) {
        // Their output may go to a pipe that closes early.
        let _ = sys::signal::default_pipe();
    }
    match cli.command {
        Command::Run(args) => {
            // Sockets passed to baton itself (systemd socket activation):
            // taken first, while the process has one thread.
            let inherited = baton::listeners().map_err(|e| {
                error::StartupError::Invalid(format!("sockets passed to baton: {e}"))
            })?;
            let args = *args;
            if let Some(dir) = args.config_dir.clone() {
                return run_dir(dir, args, inherited, cli.log_level.as_deref());
            }
            let (args, file_level) = match &args.config {
                Some(path) => {
                    let file = config_file::load(path)?;
                    if let Some((key, line)) = file
                        .keys
                        .iter()
                        .find(|(k, _)| k == "after" || k == "autostart")
                    {
                        return Err(error::StartupError::Invalid(format!(
                            "{}:{line}: {key}: only a service file of --config-dir takes it",
                            path.display()
                        ))
                        .into());
                    }
                    (config_file::merge(args, file.args), file.log_level)
                }
                None => (args, None),
            };
            init_logging(cli.log_level.as_deref().or(file_level.as_deref()))?;
            // Validate and set up everything before starting anything.
            // Started by `baton upgrade`: the previous image's state.
            let handover = guardian::handover::take_from_env()?;
            let (cfg, adopt) = startup::start(args, inherited, handover.as_ref())?;
            loop_runtime()?.block_on(guardian::running::run(cfg, adopt, handover))
        }
        Command::Reload(args) => control::client::reload(
            &args.target.target(args.service.as_deref()),
            args.json,
            false,
        ),
        Command::Rollback(args) => control::client::reload(
            &args.target.target(args.service.as_deref()),
            args.json,
            true,
        ),
        Command::Status(args) => {
            control::client::status(&args.target.target(args.service.as_deref()), args.json)
        }
        Command::Stop(args) => {
            control::client::stop(&args.target.target(args.service.as_deref()), args.timeout)
        }
        Command::Signal(args) => {
            control::client::signal(&args.target.target(args.service.as_deref()), args.signal)
        }
        Command::Start(args) => {
            control::client::start(&args.target.target(Some(&args.service)), args.json)
        }
        Command::Update(args) => control::client::update(&args.target.target(None), args.json),
        Command::Upgrade(args) => control::client::upgrade(
            &args.target.target(None),
            args.check.as_deref().or(args.binary.as_deref()),
            args.check.is_some(),
            args.timeout,
            args.json,
        ),
        Command::UpgradeCheck(args) => guardian::upgrade::check(args.state_fd, args.answer_fd),
        Command::Keeper(args) => guardian::keeper::main(args),
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run(args),
        Command::DemoApp(args) => demo::app::run(args),
    }
}

/// `baton run --config-dir DIR`: every service of the directory under
/// this one baton.
fn run_dir(
    dir: std::path::PathBuf,
    args: cli::RunArgs,
    inherited: baton::Listeners,
    level: Option<&str>,
) -> anyhow::Result<ExitCode> {
    if !inherited.names().is_empty() {
        return Err(error::StartupError::Invalid(
            "sockets passed to baton (LISTEN_FDS) are not taken with --config-dir: each service binds its own"
                .into(),
        )
        .into());
    }
    // Started by `baton upgrade`: the previous image's state, and nothing
    // read from the directory (its files may have changed since).
    let start = match guardian::handover::take_any_from_env()? {
        Some(guardian::handover::Any::Instance(i)) => {
            init_logging(level)?;
            guardian::host::Start::Upgraded(i)
        }
        Some(guardian::handover::Any::Service(_)) => {
            return Err(error::StartupError::Invalid(
                "the handed-over state is of a baton that runs one service, not --config-dir"
                    .into(),
            )
            .into());
        }
        None => {
            let read = config_dir::load(&dir, &args)?;
            init_logging(level.or(read.log_level.as_deref()))?;
            guardian::host::Start::Fresh(Box::new(read))
        }
    };
    loop_runtime()?.block_on(guardian::host::run(dir, args, start))
}

/// The runtime of `baton run`'s loop: one thread; the guardian never
/// blocks a pool thread, so the pool is bounded to a single thread.
fn loop_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .context("starting the runtime")
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
    // The HTTP/2 stack's own warnings name what a client did wrong, one
    // line each time: a client could fill the log. The connection's
    // GOAWAY answers them.
    let filter = ["h2=error", "hyper=error"]
        .into_iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, EnvFilter::add_directive);
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
            Some(
                ControlError::NotRunning { .. }
                    | ControlError::NoSocket(_)
                    | ControlError::UnknownService(_)
            )
        );
    if startup {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}
