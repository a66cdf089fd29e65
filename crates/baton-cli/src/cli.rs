//! The command line: one `Args` struct per subcommand, raw values only.
//! Validation that needs the system (resolving the command, binding) happens
//! in `config.rs`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::spec::{ListenSpec, ReadyMode, Signal, parse_duration};

const EXIT_CODES: &str = "\
Exit codes:
  0        success
  1        runtime failure (e.g. `baton reload` rolled back; the first generation never became ready)
  2        usage or startup error (bad address, port in use, command not found, no baton running)
  126/127  the first generation could not be executed (permission denied / not found)
  128+N    on stop, the serving generation died of signal N (otherwise its own exit code)";

/// Restart network services without dropping a request.
#[derive(Debug, Parser)]
#[command(name = "baton", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace (overrides RUST_LOG).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a service: own its sockets, start it, reload it without dropping
    /// connections.
    Run(RunArgs),
    /// Reload a running service and wait for the outcome (exit 1 on rollback).
    Reload(ControlArgs),
    /// Show a running service's generations and reloads.
    Status(StatusArgs),
    /// Stop a running service gracefully.
    Stop(ControlArgs),
    /// Load a service while reloading it; count every failed request.
    Bench(crate::bench::BenchArgs),
    /// Hot reload against cold restart, side by side, on the embedded app.
    Demo(crate::demo::DemoArgs),
    /// The embedded demo and test app (an HTTP server built on the baton
    /// library).
    #[command(name = "demo-app", hide = true)]
    DemoApp(crate::demo::app::AppArgs),
}

/// `baton run`.
#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct RunArgs {
    /// Listen address, bound by baton and passed to every generation:
    /// HOST:PORT, [IPv6]:PORT, :PORT (all interfaces) or unix:PATH,
    /// optionally prefixed NAME= (the fd's name in LISTEN_FDNAMES).
    /// Repeatable; fds 3, 4, … follow the order given.
    #[arg(long, short = 'l', value_name = "ADDR", required = true)]
    pub listen: Vec<ListenSpec>,

    /// How a new generation says it is ready: notify (sd_notify READY=1),
    /// delay:DURATION, or exec:COMMAND (ready once COMMAND exits 0).
    #[arg(long, value_name = "MODE", default_value = "notify")]
    pub ready: ReadyMode,

    /// How long a new generation may take to become ready before it is
    /// killed and the reload rolled back.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub ready_timeout: Duration,

    /// The signal that asks a generation to drain and exit.
    #[arg(long, value_name = "SIGNAL", default_value = "TERM")]
    pub stop_signal: Signal,

    /// How long a generation may drain after the stop signal before its
    /// process group is killed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub stop_timeout: Duration,

    /// Name of this service, for the default control socket path
    /// ($XDG_RUNTIME_DIR/baton/NAME.sock, or /run/baton/NAME.sock as root).
    /// Defaults to the command's file name.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Path of the control socket (overrides the default from --name).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Which process may report readiness on a generation's notify socket:
    /// all (any process of the generation, e.g. `systemd-notify` run by the
    /// app) or main (only the process baton started).
    #[arg(long, value_enum, value_name = "WHO", default_value_t = NotifyAccess::All)]
    pub notify_access: NotifyAccess,

    /// The command to run, and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<OsString>,
}

/// Who may send `READY=1` for a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NotifyAccess {
    /// Any process (the socket is private to one generation).
    All,
    /// Only the generation's main process.
    Main,
}

/// Which running baton to talk to.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The service's --name.
    #[arg(long, value_name = "NAME", conflicts_with = "control")]
    pub name: Option<String>,

    /// Path of the control socket.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// `baton status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: ControlArgs,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
