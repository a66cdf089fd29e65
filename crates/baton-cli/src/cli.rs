//! The command line: one `Args` struct per subcommand, raw values only.
//! Validation that needs the system (resolving the command, binding) happens
//! in `config.rs`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::spec::{
    ListenSpec, NotifyAccess, Orphans, ReadyMode, RestartMode, Signal, StartLimit, UserSpec,
    parse_duration, parse_timeout,
};

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
    Run(Box<RunArgs>),
    /// Reload a running service and wait for the outcome (exit 1 on rollback).
    Reload(ReloadArgs),
    /// Go back to the release that served before the current one, with the
    /// usual handover (exit 0 done, 1 it failed and the current one serves
    /// on, 2 no previous release).
    Rollback(ReloadArgs),
    /// Show a running service's generations and reloads.
    Status(StatusArgs),
    /// Stop a running service gracefully, and wait until it has stopped.
    Stop(StopArgs),
    /// Send a signal to the serving generation (no reload), e.g. for apps
    /// that reread their configuration on SIGUSR1.
    Signal(SignalArgs),
    /// Start a stopped service of a baton that runs several (--config-dir).
    Start(StartArgs),
    /// Read a --config-dir again: start added services, stop removed ones,
    /// apply changed ones, leave the others alone (exit 1 if any part
    /// failed).
    Update(UpdateArgs),
    /// Replace the running baton with a new binary in place: same pid,
    /// same listeners, the serving generation untouched.
    Upgrade(UpgradeArgs),
    /// Run by `baton upgrade` in the candidate binary: does it take the
    /// running baton's state?
    #[command(name = "upgrade-check", hide = true)]
    UpgradeCheck(UpgradeCheckArgs),
    /// Started by `baton run`: holds its listeners for the next `baton run`
    /// if baton is killed.
    #[command(hide = true)]
    Keeper(KeeperArgs),
    /// Load a service while reloading it; count every failed request.
    Bench(crate::bench::BenchArgs),
    /// Hot reload against cold restart, side by side, on the embedded app.
    Demo(crate::demo::DemoArgs),
    /// The embedded demo and test app (an HTTP server built on the baton
    /// library).
    #[command(name = "demo-app", hide = true)]
    DemoApp(crate::demo::app::AppArgs),
}

/// `baton run`. Options left out here come from `--config`, then from the
/// defaults; the command line wins over the file.
#[derive(Debug, Default, Clone, Args)]
#[command(after_help = EXIT_CODES)]
pub struct RunArgs {
    /// Read options from this TOML file (keys are the long option names,
    /// e.g. ready-timeout = "10s"; listen and command are arrays).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Run every service of this directory under one baton: each DIR/*.toml
    /// is a service named after the file (the keys of --config that belong
    /// to a service, plus `after` and `autostart`); DIR/baton.toml holds the
    /// instance's keys. Options given here apply to every service.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "listen", "command"])]
    pub config_dir: Option<PathBuf>,

    /// Listen address, bound by baton and passed to every generation:
    /// HOST:PORT, [IPv6]:PORT, :PORT (all interfaces) or unix:PATH,
    /// optionally prefixed NAME= (the fd's name in LISTEN_FDNAMES).
    /// Repeatable; fds 3, 4, … follow the order given. Sockets passed to
    /// baton itself (systemd socket activation) are used instead of binding.
    #[arg(long, short = 'l', value_name = "ADDR")]
    pub listen: Vec<ListenSpec>,

    /// How a new generation says it is ready: notify (sd_notify READY=1),
    /// delay:DURATION, or exec:COMMAND (ready once COMMAND exits 0)
    /// [default: notify].
    #[arg(long, value_name = "MODE")]
    pub ready: Option<ReadyMode>,

    /// How long a new generation may take to become ready before it is
    /// killed and the reload rolled back [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ready_timeout: Option<Duration>,

    /// The signal that asks a generation to drain and exit [default: TERM].
    #[arg(long, value_name = "SIGNAL")]
    pub stop_signal: Option<Signal>,

    /// How long a generation may drain after the stop signal before its
    /// process group is killed [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub stop_timeout: Option<Duration>,

    /// Name of this service, for the default control socket path
    /// ($XDG_RUNTIME_DIR/baton/NAME.sock, or /run/baton/NAME.sock as root)
    /// [default: the command's file name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Path of the control socket (overrides the default from --name).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Which process may report readiness on a generation's notify socket:
    /// all (any process of the app's user, e.g. `systemd-notify` run by the
    /// app) or main (only the process baton started) [default: all].
    #[arg(long, value_enum, value_name = "WHO")]
    pub notify_access: Option<NotifyAccess>,

    /// What a baton that is killed (or crashes) leaves behind: keep (the
    /// serving generation goes on serving, and the next `baton run` with
    /// the same control socket adopts it) or stop (every generation gets
    /// SIGTERM when baton dies) [default: keep].
    #[arg(long, value_enum, value_name = "WHAT")]
    pub orphans: Option<Orphans>,

    /// The app's working directory, resolved through symlinks at each
    /// start, so that a deploy that switches `current -> releases/v2` is
    /// picked up by the next reload, and a rollback runs in the directory
    /// the previous release ran in [default: the directory baton was
    /// started in, as the shell named it ($PWD)].
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,

    /// After a reload's cutover, keep the new release on probation this
    /// long: if it exits (for any reason) meanwhile, or in proxy mode
    /// answers clearly worse than the previous one, baton reverts to the
    /// previous release at once; `baton reload` waits through the bake and
    /// exits 0 only if the release passed it [default: no bake].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub bake: Option<std::time::Duration>,

    /// On SIGTERM (or `baton stop`), first turn /readyz to 503 and keep
    /// serving this long, so that load balancers and Kubernetes stop
    /// sending before anything closes; a second request skips the rest
    /// [default: 0s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_delay: Option<std::time::Duration>,

    /// Worker processes per generation, each inheriting the listeners with
    /// its own LISTEN_PID, notification socket and BATON_WORKER (0..N-1):
    /// for one-core runtimes (Node.js, Python, Ruby). `auto`: one per CPU
    /// available [default: 1].
    #[arg(long, value_name = "N|auto")]
    pub workers: Option<crate::spec::Workers>,

    /// Replace a worker whose resident memory grows past SIZE (like 300M):
    /// its successor starts first, then it is retired gracefully.
    #[arg(long, value_name = "SIZE", value_parser = crate::spec::parse_size)]
    pub max_rss: Option<u64>,

    /// When the serving generation exits on its own: never (baton exits with
    /// its status), on-failure (restart unless it exited 0) or always
    /// [default: on-failure].
    #[arg(long, value_name = "POLICY")]
    pub restart: Option<RestartMode>,

    /// Delay before the first restart after a crash; it doubles with each
    /// consecutive failure [default: 200ms].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub restart_delay: Option<Duration>,

    /// Ceiling of the doubling restart delay [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub restart_delay_max: Option<Duration>,

    /// Give up after BURST crash restarts within INTERVAL (like systemd's
    /// StartLimitBurst/StartLimitIntervalSec), or off [default: 5/10s].
    #[arg(long, value_name = "BURST/INTERVAL")]
    pub start_limit: Option<StartLimit>,

    /// Run the app as this user (and group; default: the user's primary
    /// group, plus its supplementary groups). baton binds first, so
    /// privileged ports work; needs root.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<UserSpec>,

    /// Set an environment variable for the app (repeatable; the config
    /// file's `env` table): on top of baton's own environment, as
    /// supervisord's `environment=`. The variables baton sets itself
    /// (`LISTEN_FDS`, `NOTIFY_SOCKET`, …) cannot be set.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = crate::knobs::parse_env)]
    pub env: Vec<(String, String)>,

    /// Serve baton's admin endpoint on ADDR (IP:PORT, or :PORT for every
    /// interface): Prometheus metrics at /metrics, liveness at /healthz and
    /// readiness at /readyz.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<crate::spec::AdminAddr>,

    /// Reload when this file (typically the app's binary) is replaced or
    /// rewritten; waits until it has stopped changing.
    #[arg(long, value_name = "PATH")]
    pub watch: Option<PathBuf>,

    /// Tag each line the app writes to stdout/stderr with its generation.
    #[arg(long)]
    pub log_prefix: bool,

    /// Write the app's output (stdout and stderr) to this file instead of
    /// baton's, as supervisord's `stdout_logfile`: for hosts without a
    /// journal. Rotated by size; written by a thread of its own, and by
    /// baton's keeper when baton has died.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// With --log-file: the size at which the file is rotated (like 50M)
    /// [default: 50M].
    #[arg(long, value_name = "SIZE", value_parser = crate::spec::parse_log_size)]
    pub log_max_size: Option<u64>,

    /// With --log-file: rotated files kept (PATH.1 the newest); 0 cuts the
    /// file back to empty instead [default: 10].
    #[arg(long, value_name = "N")]
    pub log_keep: Option<u32>,

    /// Proxy mode, for apps that bind their own port: baton serves the
    /// public listeners and forwards to each generation's private loopback
    /// port (http: requests over baton's own client connections; tcp: a
    /// byte relay).
    #[arg(long, value_enum, value_name = "MODE")]
    pub proxy: Option<crate::proxy::Mode>,

    /// Proxy mode: the environment variable that gives each generation its
    /// private port; `{port}` in the command's arguments is replaced too
    /// [default: PORT].
    #[arg(long, value_name = "NAME")]
    pub upstream_port_env: Option<String>,

    /// Proxy mode: ready once this check passes on the private port: tcp (a
    /// connect) or http:/PATH (a 2xx answer); READY=1 counts too
    /// [default: tcp].
    #[arg(long, value_name = "CHECK")]
    pub health: Option<crate::proxy::Health>,

    /// Proxy mode: how long a generation may take to pass its check
    /// [default: --ready-timeout].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub health_timeout: Option<Duration>,

    /// Proxy mode: threads serving the proxy, each keeping its connections
    /// to itself [default: half the cores, at least 1].
    #[arg(long, value_name = "N")]
    pub proxy_threads: Option<usize>,

    /// Proxy mode: client connections served at once. At the cap the oldest
    /// connection that has sent nothing is closed to make room, or else new
    /// clients wait in the kernel's accept queue [default: what the
    /// descriptor limit allows after baton's reserve, at most 16384].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Proxy mode (http): how long a client may take to send a request's
    /// head, from the accept or from the first byte of a later request; a
    /// connection that sends nothing is closed after it [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub header_timeout: Option<Duration>,

    /// Proxy mode: how long a keep-alive connection may stay idle between
    /// requests, or a client leave its response unread or its request body
    /// unsent; in tcp mode (and for an upgraded connection), how long a
    /// relay may pass no byte either way [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub idle_timeout: Option<Duration>,

    /// Proxy mode (http): how long a generation may take to send its
    /// answer's head (then 504, never retried), and the longest pause within
    /// an answer's body [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub upstream_timeout: Option<Duration>,

    /// Proxy mode, with --bake: during the bake the new release gets this
    /// share of requests (tcp: connections), the previous one the rest;
    /// `10,50` steps from 10 % to 50 % halfway [default: all of them].
    #[arg(long, value_name = "PERCENT[,PERCENT...]")]
    pub canary: Option<crate::spec::Canary>,

    /// Proxy mode (http), with --bake: revert at once when the new
    /// release's share of failed answers (5xx, no answer, timeouts) is
    /// clearly above this per cent and above the previous release's
    /// [default: 5].
    #[arg(long, value_name = "PERCENT", value_parser = crate::spec::parse_rate)]
    pub max_error_rate: Option<f64>,

    /// `baton upgrade`: how long a candidate binary may take to check the
    /// handover and answer; past it the check is killed and the upgrade
    /// refused [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub check_timeout: Option<Duration>,

    /// Proxy mode (http): pass on request header names that contain an
    /// underscore. By default they are dropped, as nginx does: apps that
    /// read headers CGI-style cannot tell `X_Forwarded_Proto` from the
    /// `X-Forwarded-Proto` that baton sets.
    #[arg(long)]
    pub keep_underscore_headers: bool,

    /// Proxy mode (http): close the connection to the app after each
    /// request with a body instead of reusing it. An app that answers
    /// without reading a body takes the body as the next request on that
    /// connection, and its answer would go to the next client there; this
    /// keeps that answer from any client (the app still runs what it read)
    /// at the cost of a new connection to the app per such request (about
    /// 2.7 times the proxy's CPU per POST).
    #[arg(long)]
    pub close_after_body: bool,

    /// Proxy mode (http): what the app speaks: `h1` (HTTP/1.1; HTTP/2
    /// clients' requests are carried to it as HTTP/1.1, gRPC is refused)
    /// or `h2c` (cleartext HTTP/2, as gRPC servers speak: every request
    /// goes to it as an HTTP/2 stream) [default: h1].
    #[arg(long, value_name = "PROTOCOL")]
    pub upstream_protocol: Option<crate::proxy::UpstreamProtocol>,

    /// Proxy mode: how long a retired generation may keep its proxied
    /// requests (http) or connections (tcp) before it gets its stop signal
    /// anyway. tcp-mode connections that opened with the HTTP/2 preface do
    /// not hold it: the app's own graceful stop sends them GOAWAY
    /// [default: half of --stop-timeout].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_wait: Option<Duration>,

    /// The command to run, and its arguments.
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
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

impl ControlArgs {
    /// The baton these options name, and the service `service` in it.
    pub fn target<'a>(&'a self, service: Option<&'a str>) -> crate::control::client::Target<'a> {
        crate::control::client::Target {
            name: self.name.as_deref(),
            control: self.control.as_deref(),
            service,
        }
    }
}

/// `baton reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// The service, in a baton that runs several (--config-dir).
    #[arg(value_name = "SVC")]
    pub service: Option<String>,

    #[command(flatten)]
    pub target: ControlArgs,

    /// Print the outcome as JSON (the exit code is the same).
    #[arg(long)]
    pub json: bool,
}

/// `baton stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Stop only this service of a baton that runs several (--config-dir);
    /// without it, the whole instance stops.
    #[arg(value_name = "SVC")]
    pub service: Option<String>,

    #[command(flatten)]
    pub target: ControlArgs,

    /// How long to wait for baton to stop (its generations get
    /// --stop-timeout each, then SIGKILL) [default: 2m].
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout, default_value = "2m")]
    pub timeout: Duration,
}

/// `baton upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub target: ControlArgs,

    /// The new binary [default: the path the running baton was started
    /// from, read again now: install the new baton there, then upgrade].
    #[arg(long, value_name = "PATH", conflicts_with = "check")]
    pub binary: Option<PathBuf>,

    /// Only check that PATH would take over (it runs, is a baton, and reads
    /// the running baton's state); change nothing.
    #[arg(long, value_name = "PATH")]
    pub check: Option<PathBuf>,

    /// How long to wait for the upgrade (in proxy mode client connections
    /// finish first, for up to --stop-timeout) [default: 2m].
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout, default_value = "2m")]
    pub timeout: Duration,

    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `baton upgrade-check`.
#[derive(Debug, Args)]
pub struct UpgradeCheckArgs {
    /// The descriptor holding the handover.
    #[arg(long, value_name = "FD")]
    pub state_fd: i32,

    /// The descriptor to answer on.
    #[arg(long, value_name = "FD")]
    pub answer_fd: i32,
}

/// `baton keeper`.
#[derive(Debug, Args)]
pub struct KeeperArgs {
    /// How many listeners it holds (fds 4, 5, …; fd 3 is its socket).
    #[arg(long, value_name = "N")]
    pub listeners: usize,

    /// baton's state file.
    #[arg(long, value_name = "PATH")]
    pub state: PathBuf,

    /// The service's name (to prefix the output it copies).
    #[arg(long, value_name = "NAME")]
    pub name: String,

    /// The baton it keeps for, as PID:START_TIME (its parent if not given;
    /// a baton killed before the keeper runs is no longer its parent).
    #[arg(long, value_name = "PID:START")]
    pub owner: Option<String>,

    /// Copy the output to this log file (rotated as baton does) rather
    /// than to its own stdout and stderr.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// The log file's rotation size.
    #[arg(long, value_name = "BYTES", default_value_t = crate::guardian::logfile::DEFAULT_MAX_SIZE)]
    pub log_max_size: u64,

    /// Rotated log files kept.
    #[arg(long, value_name = "N", default_value_t = crate::guardian::logfile::DEFAULT_KEEP)]
    pub log_keep: u32,

    /// Copy lines as they are, without `[NAME gen N] `.
    #[arg(long)]
    pub no_prefix: bool,

    /// The most worker processes whose output pipes, and whose pidfds, it
    /// holds (baton sizes it from `--workers`).
    #[arg(long, value_name = "N", default_value_t = crate::knobs::KEEPER_MAX_HELD)]
    pub max_held: usize,

    /// Keep for every service of a baton that runs several: fd 3 is a
    /// connection to it, on which it adds one keeper per service (its
    /// other options are then those of each, sent with it).
    #[arg(long)]
    pub host: bool,
}

/// `baton status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One service of a baton that runs several (--config-dir); without
    /// it, every service, one line each.
    #[arg(value_name = "SVC")]
    pub service: Option<String>,

    #[command(flatten)]
    pub target: ControlArgs,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `baton signal`.
#[derive(Debug, Args)]
pub struct SignalArgs {
    /// The signal: a name like USR1 or SIGUSR1, or a number.
    #[arg(value_name = "SIGNAL")]
    pub signal: Signal,

    /// The service, in a baton that runs several (--config-dir); without
    /// it, every service's serving generation.
    #[arg(value_name = "SVC")]
    pub service: Option<String>,

    #[command(flatten)]
    pub target: ControlArgs,
}

/// `baton start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The service to start (stopped, or `autostart = false`).
    #[arg(value_name = "SVC")]
    pub service: String,

    #[command(flatten)]
    pub target: ControlArgs,

    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `baton update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub target: ControlArgs,

    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}
