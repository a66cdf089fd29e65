//! From the raw command line to a validated [`RunConfig`]: the command is
//! resolved and executable, the user exists, every option fits the others.
//! Any failure here is a [`StartupError`] (exit 2). Nothing is bound here:
//! `startup` binds the sockets (or takes them from an upgrade or from a
//! baton that died) once the settings are known to be good.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::bound::{BoundListener, ControlSocket, ListenerCheck};
use crate::cli::RunArgs;
use crate::control;
use crate::error::StartupError;
pub use crate::knobs::{PolicyConfig, later};
use crate::spec::NotifyAccess;
use crate::spec::{ListenSpec, ReadyMode};

/// Everything `baton run` needs, validated and set up.
#[derive(Debug)]
pub struct RunConfig {
    /// `--listen`, as asked.
    pub listen: Vec<ListenSpec>,
    /// The listeners, in fd order (the first becomes fd 3; set by
    /// `startup`).
    pub listeners: Vec<BoundListener>,
    /// The resolved executable.
    pub program: PathBuf,
    /// The argument vector, `argv[0]` as the user typed it.
    pub args: Vec<OsString>,
    /// baton's environment minus the protocol variables it sets itself.
    pub base_env: Vec<(OsString, OsString)>,
    /// How readiness is detected.
    pub ready: ReadyMode,
    /// Who may report readiness.
    pub notify_access: NotifyAccess,
    /// What a dead baton leaves behind.
    pub orphans: crate::spec::Orphans,
    /// The app's working directory, as given (resolved at each start).
    pub workdir: PathBuf,
    /// `--max-rss`: bytes.
    pub max_rss: Option<u64>,
    /// Timeouts, signals and backoff.
    pub policy: PolicyConfig,
    /// The service's name.
    pub name: String,
    /// The control socket's path.
    pub control_path: PathBuf,
    /// The bound control socket (set by `startup`).
    pub control: Option<ControlSocket>,
    /// Who the app runs as (`--user`).
    pub user: Option<crate::sys::user::Credentials>,
    /// `--metrics`: where to serve it.
    pub metrics_addr: Option<crate::spec::AdminAddr>,
    /// The bound metrics listener (set by `startup`).
    pub metrics: Option<std::net::TcpListener>,
    /// The file whose replacement triggers a reload (`--watch`).
    pub watch: Option<PathBuf>,
    /// Whether the app's output is tagged with its generation.
    pub log_prefix: bool,
    /// `--log-file`: the app's output goes there, rotated.
    pub log_file: Option<crate::guardian::logfile::LogSpec>,
    /// Proxy mode, if on.
    pub proxy: Option<ProxyConfig>,
    /// The descriptor limit, raised at start; children get the original.
    pub nofile: crate::sys::limits::Nofile,
    /// The path baton was started from (the default for `baton upgrade`:
    /// re-read then, so that a new binary installed there is taken).
    pub exe: PathBuf,
    /// baton's command line, for the image an upgrade starts.
    pub argv: Vec<OsString>,
    /// How long an upgrade candidate's check may take.
    pub check_timeout: Duration,
}

/// `--proxy` and its options.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// http or tcp.
    pub mode: crate::proxy::Mode,
    /// The variable that carries the private port (`PORT`).
    pub port_env: String,
    /// The readiness check.
    pub health: crate::proxy::Health,
    /// Threads serving the proxy.
    pub threads: usize,
    /// `--ready notify` was asked for: READY=1 is needed besides the check.
    pub require_notify: bool,
    /// Timeouts and the connection cap.
    pub limits: crate::proxy::Limits,
    /// `--canary`: the new release's share during a bake, in steps (empty:
    /// all of it).
    pub canary: Vec<u8>,
    /// `--max-error-rate`, as a fraction (HTTP mode, during a bake).
    pub max_error_rate: f64,
    /// `--max-connections`, as asked (none: what the limit allows).
    pub max_connections_asked: Option<usize>,
    /// `--drain-wait`: how long a retired generation keeps its proxied
    /// traffic before its stop signal.
    pub drain_wait: std::time::Duration,
}

impl RunConfig {
    /// Validates `args` (the command line merged with `--config`), or says
    /// what is wrong. `nofile`: baton's descriptor limits (raised at start,
    /// or an upgrade's). Binds nothing. One small step per concept: the
    /// command, who runs it, which options go together, the proxy, the
    /// policy.
    pub fn from_args(
        args: RunArgs,
        nofile: crate::sys::limits::Nofile,
    ) -> Result<RunConfig, StartupError> {
        let (first, _) = args.command.split_first().ok_or_else(|| {
            StartupError::Invalid("no command given: baton run [OPTIONS] -- CMD [ARGS...] (or command = [...] in --config)".into())
        })?;
        let workdir = workdir(&args)?;
        let log_file = log_file(&args)?;
        let program = resolve_command(first, &workdir)?;
        let name = name(&args, first);
        control::validate_name(&name).map_err(StartupError::Invalid)?;
        let user = user(&args)?;
        if let Some(path) = &args.watch {
            std::fs::metadata(path)
                .map_err(|e| StartupError::Invalid(format!("--watch {}: {e}", path.display())))?;
        }
        let control_path = match &args.control {
            Some(path) => path.clone(),
            None => control::default_path(&name),
        };
        check_combinations(&args)?;
        let proxy = proxy(&args, nofile)?;
        let ready = args.ready.clone().unwrap_or(ReadyMode::Notify);
        let policy = policy(&args, proxy.as_ref(), &ready);
        Ok(RunConfig {
            listen: args.listen,
            listeners: Vec::new(),
            program,
            args: args.command,
            base_env: base_env(user.as_ref(), &args.env),
            ready,
            notify_access: args.notify_access.unwrap_or(NotifyAccess::All),
            orphans: args.orphans.unwrap_or_default(),
            workdir,
            max_rss: args.max_rss,
            policy,
            name,
            control_path,
            control: None,
            user,
            metrics_addr: args.metrics,
            metrics: None,
            watch: args.watch,
            log_prefix: args.log_prefix,
            log_file,
            proxy,
            nofile,
            exe: std::fs::read_link("/proc/self/exe").unwrap_or_default(),
            argv: std::env::args_os().collect(),
            check_timeout: args.check_timeout.unwrap_or(DEFAULT_CHECK_TIMEOUT),
        })
    }
}

/// `--workdir`, checked, or the directory baton was started in.
fn workdir(args: &RunArgs) -> Result<PathBuf, StartupError> {
    Ok(match args.workdir.clone() {
        Some(dir) => {
            let meta = std::fs::metadata(&dir)
                .map_err(|e| StartupError::Invalid(format!("--workdir {}: {e}", dir.display())))?;
            if !meta.is_dir() {
                return Err(StartupError::Invalid(format!(
                    "--workdir {}: not a directory",
                    dir.display()
                )));
            }
            std::path::absolute(&dir).unwrap_or(dir)
        }
        None => default_workdir(),
    })
}

/// `--name`, or the command's file name.
fn name(args: &RunArgs, first: &OsString) -> String {
    match args.name.clone() {
        Some(name) => name,
        None => Path::new(first)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "baton".to_owned()),
    }
}

/// `--user`, resolved; only root may run the app as another user.
fn user(args: &RunArgs) -> Result<Option<crate::sys::user::Credentials>, StartupError> {
    args.user
        .as_ref()
        .map(|spec| {
            let creds = crate::sys::user::resolve(spec).map_err(StartupError::Invalid)?;
            let me = rustix::process::geteuid();
            if !me.is_root() && creds.uid != me.as_raw() {
                return Err(StartupError::Invalid(format!(
                    "--user {} needs baton to run as root (it runs as uid {})",
                    spec.user,
                    me.as_raw()
                )));
            }
            Ok(creds)
        })
        .transpose()
}

/// `--log-file` and its size and count, checked by opening the file.
fn log_file(args: &RunArgs) -> Result<Option<crate::guardian::logfile::LogSpec>, StartupError> {
    let Some(path) = &args.log_file else {
        if args.log_max_size.is_some() || args.log_keep.is_some() {
            return Err(StartupError::Invalid(
                "--log-max-size and --log-keep rotate --log-file: give --log-file PATH too".into(),
            ));
        }
        return Ok(None);
    };
    let max_size = args
        .log_max_size
        .unwrap_or(crate::guardian::logfile::DEFAULT_MAX_SIZE);
    let keep = args
        .log_keep
        .unwrap_or(crate::guardian::logfile::DEFAULT_KEEP);
    if keep > 1000 {
        return Err(StartupError::Invalid("--log-keep: at most 1000".into()));
    }
    let spec = crate::guardian::logfile::LogSpec {
        path: std::path::absolute(path).unwrap_or_else(|_| path.clone()),
        max_size,
        keep,
    };
    crate::guardian::logfile::LogFile::open(&spec)
        .map_err(|e| StartupError::Invalid(e.to_string()))?;
    Ok(Some(spec))
}

/// Options that only make sense together.
fn check_combinations(args: &RunArgs) -> Result<(), StartupError> {
    if args.proxy.is_none()
        && (args.health.is_some()
            || args.health_timeout.is_some()
            || args.upstream_port_env.is_some()
            || args.proxy_threads.is_some()
            || args.max_connections.is_some()
            || args.header_timeout.is_some()
            || args.idle_timeout.is_some()
            || args.upstream_timeout.is_some()
            || args.keep_underscore_headers
            || args.close_after_body
            || args.upstream_protocol.is_some()
            || args.drain_wait.is_some())
    {
        return Err(StartupError::Invalid(
            "--health, --health-timeout, --upstream-port-env, --proxy-threads, --max-connections, \
                 --header-timeout, --idle-timeout, --upstream-timeout, --keep-underscore-headers, \
                 --close-after-body, --upstream-protocol and --drain-wait need --proxy http|tcp"
                .into(),
        ));
    }
    if args.proxy == Some(crate::proxy::Mode::Tcp)
        && (args.header_timeout.is_some()
            || args.upstream_timeout.is_some()
            || args.keep_underscore_headers
            || args.close_after_body
            || args.upstream_protocol.is_some())
    {
        return Err(StartupError::Invalid(
            "--header-timeout, --upstream-timeout, --keep-underscore-headers, \
                 --close-after-body and --upstream-protocol apply to --proxy http only \
                 (tcp mode relays bytes, whatever the protocol)"
                .into(),
        ));
    }
    if args.upstream_protocol == Some(crate::proxy::UpstreamProtocol::H2c)
        && matches!(args.health, Some(crate::proxy::Health::Http(_)))
    {
        return Err(StartupError::Invalid(
            "--health http: asks over HTTP/1.1, which an h2c app (--upstream-protocol h2c) may \
                 not speak: use --health tcp"
                .into(),
        ));
    }
    let port_env = args.upstream_port_env.as_deref().unwrap_or("PORT");
    if args.proxy.is_some() && args.env.iter().any(|(name, _)| name == port_env) {
        return Err(StartupError::Invalid(format!(
            "--env {port_env}: in proxy mode baton sets ${port_env} to each generation's private port"
        )));
    }
    let stop_timeout = args
        .stop_timeout
        .unwrap_or(PolicyConfig::default().stop_timeout);
    if args.drain_wait.is_some_and(|wait| wait > stop_timeout) {
        return Err(StartupError::Invalid(format!(
            "--drain-wait must not exceed --stop-timeout ({}): the stop signal comes after the \
                 drain wait, and the stop timeout counts from it",
            humantime::format_duration(stop_timeout)
        )));
    }
    if (args.canary.is_some() || args.max_error_rate.is_some()) && args.bake.is_none() {
        return Err(StartupError::Invalid(
                "--canary and --max-error-rate judge a release during its bake: give --bake DURATION too"
                    .into(),
            ));
    }
    if args.canary.is_some() && args.proxy.is_none() {
        return Err(StartupError::Invalid(
            "--canary splits traffic between two generations, which only the proxy can do: give \
                 --proxy http|tcp too"
                .into(),
        ));
    }
    if args.max_error_rate.is_some() && args.proxy != Some(crate::proxy::Mode::Http) {
        return Err(StartupError::Invalid(
            "--max-error-rate judges HTTP answers: it needs --proxy http".into(),
        ));
    }
    if args.proxy_threads == Some(0) || args.proxy_threads.is_some_and(|n| n > 1024) {
        return Err(StartupError::Invalid(
            "--proxy-threads: expected 1 to 1024".into(),
        ));
    }
    if args.proxy.is_some() && matches!(args.ready, Some(ReadyMode::Delay(_) | ReadyMode::Exec(_)))
    {
        return Err(StartupError::Invalid(
                "--ready delay:/exec: do not apply with --proxy: there a generation is ready when it passes \
                 --health on its private port (add --ready notify to also require READY=1)"
                    .into(),
            ));
    }
    Ok(())
}

/// `--proxy` and its options.
fn proxy(
    args: &RunArgs,
    nofile: crate::sys::limits::Nofile,
) -> Result<Option<ProxyConfig>, StartupError> {
    let stop_timeout = args
        .stop_timeout
        .unwrap_or(PolicyConfig::default().stop_timeout);
    args.proxy
        .map(|mode| {
            let threads = args
                .proxy_threads
                .unwrap_or_else(crate::proxy::default_threads);
            // Checked again once the listeners are known (`startup`);
            // first with those asked for, so that a bad value is said
            // before anything is bound.
            let max_connections = max_connections(
                nofile.soft,
                threads,
                args.listen.len(),
                args.max_connections,
            )?;
            let mut serve = baton::serve::Options::default();
            serve.drain = baton::serve::Drain {
                idle_grace: std::time::Duration::from_millis(500),
                deadline: stop_timeout,
            };
            serve.header_timeout = Some(args.header_timeout.unwrap_or(DEFAULT_HEADER_TIMEOUT));
            serve.idle_timeout = Some(args.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT));
            serve.connections = baton::serve::Connections::new(max_connections);
            Ok(ProxyConfig {
                max_connections_asked: args.max_connections,
                mode,
                port_env: args
                    .upstream_port_env
                    .clone()
                    .unwrap_or_else(|| "PORT".to_owned()),
                health: args.health.clone().unwrap_or(crate::proxy::Health::Tcp),
                threads,
                require_notify: args.ready == Some(ReadyMode::Notify),
                limits: crate::proxy::Limits {
                    serve,
                    upstream_timeout: args.upstream_timeout.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT),
                    keep_underscores: args.keep_underscore_headers,
                    close_after_body: args.close_after_body,
                    upstream_protocol: args.upstream_protocol.unwrap_or_default(),
                },
                drain_wait: args.drain_wait.unwrap_or(stop_timeout / 2),
                canary: args.canary.clone().map(|c| c.0).unwrap_or_default(),
                max_error_rate: args.max_error_rate.unwrap_or(DEFAULT_MAX_ERROR_RATE) / 100.0,
            })
        })
        .transpose()
}

/// The policy's knobs, and the hint a generation that is never ready gets.
fn policy(args: &RunArgs, proxy: Option<&ProxyConfig>, ready: &ReadyMode) -> PolicyConfig {
    let not_ready_hint = match (proxy, ready) {
        (Some(p), _) => format!(
            "; in proxy mode the app must listen on 127.0.0.1:${} (its private port) and pass the {} check",
            p.port_env,
            match &p.health {
                crate::proxy::Health::Tcp => "tcp".to_owned(),
                crate::proxy::Health::Http(path) => format!("http:{path}"),
            }
        ),
        (None, ReadyMode::Notify) => {
            "; with --ready notify the app must send READY=1 to $NOTIFY_SOCKET (sd_notify); \
                 use --ready delay:DURATION for apps that cannot"
                .to_owned()
        }
        (None, _) => String::new(),
    };
    let defaults = PolicyConfig::default();
    PolicyConfig {
        ready_timeout: args
            .health_timeout
            .filter(|_| proxy.is_some())
            .or(args.ready_timeout)
            .unwrap_or(defaults.ready_timeout),
        stop_timeout: args.stop_timeout.unwrap_or(defaults.stop_timeout),
        stop_signal: args.stop_signal.unwrap_or(defaults.stop_signal),
        restart: args.restart.unwrap_or(defaults.restart),
        restart_delay: args.restart_delay.unwrap_or(defaults.restart_delay),
        restart_delay_max: args.restart_delay_max.unwrap_or(defaults.restart_delay_max),
        start_limit: args.start_limit.unwrap_or(defaults.start_limit),
        not_ready_hint,
        bake: args.bake.filter(|d| !d.is_zero()),
        keep_warm: proxy.is_some(),
        workers: args.workers.map_or(1, crate::spec::Workers::count),
        shutdown_delay: args.shutdown_delay.filter(|d| !d.is_zero()),
        ..defaults
    }
}

/// `--check-timeout` by default.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// `--max-error-rate` by default, per cent.
pub const DEFAULT_MAX_ERROR_RATE: f64 = 5.0;
/// `--header-timeout` by default: within nginx's and HAProxy's usual range.
pub const DEFAULT_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// `--idle-timeout` by default (nginx's keepalive_timeout is 75 s).
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// `--upstream-timeout` by default (nginx's proxy_read_timeout).
pub const DEFAULT_UPSTREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The default connection cap never goes above this.
pub const MAX_CONNECTIONS_DEFAULT_CEILING: usize = 16_384;

/// The proxy's connection cap: `asked`, or what the descriptor limit
/// `nofile` allows. Each client connection may hold a connection to the
/// app too, and the upstream pools, the control socket and the metrics
/// endpoint have their own shares.
pub fn max_connections(
    nofile: u64,
    threads: usize,
    listeners: usize,
    asked: Option<usize>,
) -> Result<usize, StartupError> {
    use crate::sys::limits::{CONTROL_CONNECTIONS, METRICS_CONNECTIONS, RESERVE};
    let fixed = RESERVE
        + 8 * listeners as u64
        + CONTROL_CONNECTIONS as u64
        + METRICS_CONNECTIONS as u64
        + (threads * crate::proxy::pool::POOL_MAX) as u64;
    let allowed = nofile.saturating_sub(fixed) / 2;
    let allowed = usize::try_from(allowed).unwrap_or(usize::MAX);
    match asked {
        Some(0) => Err(StartupError::Invalid(
            "--max-connections must be at least 1".into(),
        )),
        Some(n) if n > allowed => Err(StartupError::Invalid(format!(
            "--max-connections {n} needs about {} descriptors, but baton may open {nofile} \
             (its hard limit); raise the limit (ulimit -Hn, LimitNOFILE= in a systemd unit) or ask for at most {allowed}",
            fixed.saturating_add((n as u64).saturating_mul(2))
        ))),
        Some(n) => Ok(n),
        None if allowed < 16 => Err(StartupError::Invalid(format!(
            "the descriptor limit ({nofile}) is too low for proxy mode, which needs about {} \
             (raise it: ulimit -Hn, LimitNOFILE= in a systemd unit)",
            fixed + 32
        ))),
        None => Ok(allowed.min(MAX_CONNECTIONS_DEFAULT_CEILING)),
    }
}

/// The directory baton was started in, as the shell named it (`$PWD`, which
/// may go through a `current` symlink) when that names the same directory;
/// else the resolved one.
fn default_workdir() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let same = |a: &Path, b: &Path| {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    };
    match std::env::var_os("PWD").map(PathBuf::from) {
        Some(pwd) if pwd.is_absolute() && same(&pwd, &cwd) => pwd,
        _ => cwd,
    }
}

/// baton's environment without the variables baton sets per generation;
/// with `--user`, that user's `USER`, `LOGNAME` and `HOME`; then `--env`
/// (each replacing a variable of the same name).
fn base_env(
    user: Option<&crate::sys::user::Credentials>,
    extra: &[(String, String)],
) -> Vec<(OsString, OsString)> {
    // systemd's watchdog is baton's to keep (`WatchdogSec=`), as are the
    // protocol variables.
    const OURS: [&str; 9] = crate::knobs::SET_BY_BATON;
    const IDENTITY: [&str; 3] = ["USER", "LOGNAME", "HOME"];
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !OURS.iter().any(|o| k == o))
        .filter(|(k, _)| user.is_none() || !IDENTITY.iter().any(|o| k == o))
        .collect();
    if let Some(user) = user {
        env.push(("USER".into(), user.name.clone().into()));
        env.push(("LOGNAME".into(), user.name.clone().into()));
        env.push(("HOME".into(), user.home.clone().into()));
    }
    for (name, value) in extra {
        env.retain(|(k, _)| k != name.as_str());
        env.push((name.into(), value.into()));
    }
    env
}

/// Finds the executable the way `execvp` would, so that a typo is reported
/// now rather than by every generation.
pub fn resolve_command(command: &OsString, workdir: &Path) -> Result<PathBuf, StartupError> {
    let text = command.to_string_lossy().into_owned();
    if text.is_empty() {
        return Err(StartupError::Invalid("the command is empty".into()));
    }
    let candidates: Vec<PathBuf> = if text.contains('/') {
        // A relative path is the app's, from its working directory.
        vec![workdir.join(command)]
    } else {
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|dir| dir.join(command))
            .collect()
    };
    let mut not_executable = None;
    for candidate in candidates {
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        if meta.is_dir() {
            not_executable.get_or_insert((candidate, "it is a directory".to_owned()));
            continue;
        }
        match rustix::fs::access(&candidate, rustix::fs::Access::EXEC_OK) {
            Ok(()) => return Ok(candidate),
            Err(e) => {
                not_executable.get_or_insert((candidate, io::Error::from(e).to_string()));
            }
        }
    }
    match not_executable {
        Some((path, why)) => Err(StartupError::NotExecutable { path, why }),
        None => Err(StartupError::CommandNotFound {
            command: text.clone(),
            where_: if text.contains('/') { "" } else { " in $PATH" },
        }),
    }
}
