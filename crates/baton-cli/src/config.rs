//! From the raw command line to a [`RunConfig`] with every fallible setup
//! done: the command is resolved and executable, the control socket and
//! every listener are bound. Any failure here is a [`StartupError`] (exit 2)
//! and nothing has been spawned; what was already bound is released.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton::vars;

use crate::cli::RunArgs;
use crate::control;
use crate::error::StartupError;
pub use crate::knobs::{PolicyConfig, later};
use crate::spec::NotifyAccess;
use crate::spec::{ListenAddr, ListenSpec, ReadyMode};
use crate::sys::socket;

/// Everything `baton run` needs, validated and set up.
#[derive(Debug)]
pub struct RunConfig {
    /// The listeners, in fd order (the first becomes fd 3).
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
    /// `--shutdown-delay`: how long baton serves on, not ready, after a
    /// stop request.
    pub shutdown_delay: Option<Duration>,
    /// `--workers`: processes per generation.
    pub workers: usize,
    /// `--max-rss`: bytes.
    pub max_rss: Option<u64>,
    /// Timeouts, signals and backoff.
    pub policy: PolicyConfig,
    /// The service's name.
    pub name: String,
    /// The bound control socket.
    pub control: ControlSocket,
    /// Who the app runs as (`--user`).
    pub user: Option<crate::sys::user::Credentials>,
    /// The bound metrics listener (`--metrics`).
    pub metrics: Option<std::net::TcpListener>,
    /// The file whose replacement triggers a reload (`--watch`).
    pub watch: Option<PathBuf>,
    /// Whether the app's output is tagged with its generation.
    pub log_prefix: bool,
    /// Proxy mode, if on.
    pub proxy: Option<ProxyConfig>,
    /// The descriptor limit, raised at start; children get the original.
    pub nofile: crate::sys::limits::Nofile,
    /// The path baton was started from (the default for `baton upgrade`:
    /// re-read then, so that a new binary installed there is taken).
    pub exe: PathBuf,
    /// baton's command line, for the image an upgrade starts.
    pub argv: Vec<OsString>,
    /// The service of a baton that died, which this one adopts.
    pub adopt: Option<crate::guardian::orphans::Adoption>,
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
}

/// A listening socket baton owns.
#[derive(Debug)]
pub struct BoundListener {
    /// The name in `LISTEN_FDNAMES`.
    pub name: String,
    /// The socket.
    pub fd: OwnedFd,
    /// The bound address, e.g. `127.0.0.1:43125` (the real port after `:0`)
    /// or `unix:/run/app.sock`.
    pub local: String,
    /// The key of this socket in `SERVER_STARTER_PORT`.
    pub server_starter_key: String,
    /// The TCP address it is bound to (the real port after `:0`).
    tcp: Option<SocketAddr>,
    /// It was found shut down and could not be re-armed; said once.
    pub broken_reported: bool,
    /// A socket file baton created, removed when baton exits.
    unix_path: Option<PathBuf>,
}

/// What [`BoundListener::ensure_listening`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum ListenerCheck {
    /// It listens.
    Listening,
    /// It had been shut down; it listens again (same socket).
    Relistened,
    /// It had been shut down; a new socket listens on its path. Only
    /// generations started from now on have it.
    Replaced,
}

impl BoundListener {
    /// What an upgrade hands over of it (its descriptor by number).
    pub fn handover(&self) -> crate::guardian::handover::Listener {
        use std::os::fd::AsRawFd;
        crate::guardian::handover::Listener {
            fd: self.fd.as_raw_fd(),
            name: self.name.clone(),
            local: self.local.clone(),
            server_starter_key: self.server_starter_key.clone(),
            tcp: self.tcp,
            unix_path: self.unix_path.clone(),
        }
    }

    /// Makes sure the socket still listens, after an app may have shut it
    /// down: a TCP socket listens again; a Unix socket cannot, so a new one
    /// is bound to the same path.
    pub fn ensure_listening(&mut self) -> io::Result<ListenerCheck> {
        if socket::is_listening(&self.fd) {
            return Ok(ListenerCheck::Listening);
        }
        if let Some(addr) = self.tcp {
            socket::relisten_tcp(&self.fd, addr)?;
            return Ok(ListenerCheck::Relistened);
        }
        // Only a socket file baton made itself is replaced: one passed to
        // baton (systemd's) belongs to whoever made it.
        let Some(path) = self.unix_path.clone() else {
            return Err(io::Error::other(
                "a Unix socket passed to baton cannot be re-armed; restart its socket unit",
            ));
        };
        // (Its file is still there and refuses connections: it goes.)
        self.fd = socket::bind_unix(&path)?;
        Ok(ListenerCheck::Replaced)
    }
}

impl Drop for BoundListener {
    fn drop(&mut self) {
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The control socket: a Unix stream listener, mode 0600, in a 0700
/// directory; the file is removed when baton exits.
#[derive(Debug)]
pub struct ControlSocket {
    /// The listener, until the guardian takes it.
    pub listener: Option<std::os::unix::net::UnixListener>,
    /// Its path.
    pub path: PathBuf,
    /// The file was removed already: never remove it again (by then it
    /// may be another baton's).
    removed: bool,
}

impl ControlSocket {
    /// Removes the socket file, once: after its listener is closed a new
    /// baton may take the path.
    pub fn remove(&mut self) {
        if !std::mem::replace(&mut self.removed, true) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

impl RunConfig {
    /// Validates `args` (the command line merged with `--config`) and sets
    /// everything up, or says what is wrong. `inherited` are sockets passed
    /// to baton itself (systemd socket activation); they are used instead of
    /// binding where a `--listen` matches them, and passed on otherwise.
    ///
    /// With `handover` (this image was started by `baton upgrade`), the
    /// control socket, listeners and metrics endpoint are the previous
    /// image's, by descriptor number, and nothing is bound.
    pub fn from_args(
        args: RunArgs,
        inherited: baton::Listeners,
        handover: Option<&crate::guardian::handover::Handover>,
    ) -> Result<RunConfig, StartupError> {
        let nofile = match handover {
            Some(h) => h.nofile,
            None => crate::sys::limits::raise_nofile(),
        };
        let (first, _) = args.command.split_first().ok_or_else(|| {
            StartupError::Invalid("no command given: baton run [OPTIONS] -- CMD [ARGS...] (or command = [...] in --config)".into())
        })?;
        let workdir = match args.workdir {
            Some(dir) => {
                let meta = std::fs::metadata(&dir).map_err(|e| {
                    StartupError::Invalid(format!("--workdir {}: {e}", dir.display()))
                })?;
                if !meta.is_dir() {
                    return Err(StartupError::Invalid(format!(
                        "--workdir {}: not a directory",
                        dir.display()
                    )));
                }
                std::path::absolute(&dir).unwrap_or(dir)
            }
            None => default_workdir(),
        };
        let program = resolve_command(first, &workdir)?;
        let name = match args.name {
            Some(name) => name,
            None => Path::new(first)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "baton".to_owned()),
        };
        control::validate_name(&name).map_err(StartupError::Invalid)?;
        let user = args
            .user
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
            .transpose()?;
        if let Some(path) = &args.watch {
            std::fs::metadata(path)
                .map_err(|e| StartupError::Invalid(format!("--watch {}: {e}", path.display())))?;
        }
        let control_path = match args.control {
            Some(path) => path,
            None => control::default_path(&name),
        };
        let (control, listeners, metrics, adopt) = match handover {
            Some(h) => {
                let (control, listeners, metrics) = handed_over(h, control_path)?;
                (control, listeners, metrics, None)
            }
            None => {
                let control = bind_control(&control_path)?;
                // What a baton that died here left: its listeners (from its
                // keeper) are used like sockets passed to baton.
                let found = crate::guardian::orphans::find(&control_path, &args.listen)?;
                let mut inherited = inherited;
                let mut adopt = None;
                let mut unix_paths = Vec::new();
                if let Some(found) = found {
                    if let Some(fds) = found.listeners {
                        unix_paths = found
                            .state
                            .listeners
                            .iter()
                            .map(|l| (l.local.clone(), l.unix_path.clone()))
                            .collect();
                        inherited.extend(baton::Listeners::from_fds(
                            fds.into_iter()
                                .zip(found.state.listeners.iter().map(|l| l.name.clone())),
                        ));
                    }
                    adopt = found.adopt.then_some(crate::guardian::orphans::Adoption {
                        state: found.state,
                        logs: found.logs,
                    });
                }
                let mut listeners = listeners(&args.listen, inherited)?;
                // Socket files the dead baton made are this one's to remove.
                for l in &mut listeners {
                    if let Some((_, path)) = unix_paths.iter().find(|(local, _)| *local == l.local)
                    {
                        l.unix_path.clone_from(path);
                    }
                }
                let metrics = args
                    .metrics
                    .map(|addr| {
                        let (bound, as_listen) = match addr {
                            crate::spec::AdminAddr::Ip(ip) => {
                                (socket::bind_tcp(ip, false), ListenAddr::Ip(ip))
                            }
                            crate::spec::AdminAddr::AnyHost(port) => {
                                (bind_any_host(port), ListenAddr::AnyHost(port))
                            }
                        };
                        bound.map(std::net::TcpListener::from).map_err(|source| {
                            StartupError::Bind {
                                addr: format!("{addr} (--metrics)"),
                                hint: bind_hint(&as_listen, &source),
                                error: source,
                            }
                        })
                    })
                    .transpose()?;
                (control, listeners, metrics, adopt)
            }
        };

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
                || args.close_after_body)
        {
            return Err(StartupError::Invalid(
                "--health, --health-timeout, --upstream-port-env, --proxy-threads, --max-connections, \
                 --header-timeout, --idle-timeout, --upstream-timeout, --keep-underscore-headers and \
                 --close-after-body need --proxy http|tcp"
                    .into(),
            ));
        }
        if args.proxy == Some(crate::proxy::Mode::Tcp)
            && (args.header_timeout.is_some()
                || args.upstream_timeout.is_some()
                || args.keep_underscore_headers
                || args.close_after_body)
        {
            return Err(StartupError::Invalid(
                "--header-timeout, --upstream-timeout, --keep-underscore-headers and \
                 --close-after-body apply to --proxy http only (tcp mode has --idle-timeout)"
                    .into(),
            ));
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
        if args.proxy.is_some()
            && matches!(args.ready, Some(ReadyMode::Delay(_) | ReadyMode::Exec(_)))
        {
            return Err(StartupError::Invalid(
                "--ready delay:/exec: do not apply with --proxy: there a generation is ready when it passes \
                 --health on its private port (add --ready notify to also require READY=1)"
                    .into(),
            ));
        }
        let stop_timeout = args
            .stop_timeout
            .unwrap_or(PolicyConfig::default().stop_timeout);
        let proxy = args
            .proxy
            .map(|mode| {
                let threads = args
                    .proxy_threads
                    .unwrap_or_else(crate::proxy::default_threads);
                let max_connections =
                    max_connections(nofile.soft, threads, listeners.len(), args.max_connections)?;
                let mut serve = baton::serve::Options::default();
                serve.drain = baton::serve::Drain {
                    idle_grace: std::time::Duration::from_millis(500),
                    deadline: stop_timeout,
                };
                serve.header_timeout = Some(args.header_timeout.unwrap_or(DEFAULT_HEADER_TIMEOUT));
                serve.idle_timeout = Some(args.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT));
                serve.connections = baton::serve::Connections::new(max_connections);
                Ok(ProxyConfig {
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
                    },
                    canary: args.canary.clone().map(|c| c.0).unwrap_or_default(),
                    max_error_rate: args.max_error_rate.unwrap_or(DEFAULT_MAX_ERROR_RATE) / 100.0,
                })
            })
            .transpose()?;
        let ready = args.ready.unwrap_or(ReadyMode::Notify);
        let not_ready_hint = match (&proxy, &ready) {
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
        let policy = PolicyConfig {
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
            ..defaults
        };
        Ok(RunConfig {
            listeners,
            program,
            args: args.command,
            base_env: base_env(user.as_ref()),
            ready,
            notify_access: args.notify_access.unwrap_or(NotifyAccess::All),
            orphans: args.orphans.unwrap_or_default(),
            workdir,
            shutdown_delay: args.shutdown_delay.filter(|d| !d.is_zero()),
            workers: args.workers.map_or(1, crate::spec::Workers::count),
            max_rss: args.max_rss,
            policy,
            name,
            control,
            user,
            metrics,
            watch: args.watch,
            log_prefix: args.log_prefix,
            proxy,
            nofile,
            exe: match handover {
                Some(h) => h.exe.clone(),
                None => std::fs::read_link("/proc/self/exe").unwrap_or_default(),
            },
            argv: match handover {
                Some(h) => h.argv.clone(),
                None => std::env::args_os().collect(),
            },
            adopt,
        })
    }
}

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
fn max_connections(
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

/// The control socket, listeners and metrics endpoint a previous image
/// handed over.
fn handed_over(
    h: &crate::guardian::handover::Handover,
    control_path: PathBuf,
) -> Result<
    (
        ControlSocket,
        Vec<BoundListener>,
        Option<std::net::TcpListener>,
    ),
    StartupError,
> {
    use crate::sys::exec::take_fd;
    let lost = |what: &str, e: io::Error| {
        StartupError::Invalid(format!("the upgrade handed over no usable {what}: {e}"))
    };
    let control = ControlSocket {
        listener: Some(
            take_fd(h.control_fd)
                .map(std::os::unix::net::UnixListener::from)
                .map_err(|e| lost("control socket", e))?,
        ),
        path: control_path,
        removed: false,
    };
    let listeners = h
        .listeners
        .iter()
        .map(|l| {
            Ok(BoundListener {
                name: l.name.clone(),
                fd: take_fd(l.fd).map_err(|e| lost("listener", e))?,
                local: l.local.clone(),
                server_starter_key: l.server_starter_key.clone(),
                tcp: l.tcp,
                broken_reported: false,
                unix_path: l.unix_path.clone(),
            })
        })
        .collect::<Result<Vec<_>, StartupError>>()?;
    let metrics = h
        .metrics_fd
        .map(|fd| {
            take_fd(fd)
                .map(std::net::TcpListener::from)
                .map_err(|e| lost("metrics listener", e))
        })
        .transpose()?;
    Ok((control, listeners, metrics))
}

/// The listeners: for each `--listen`, an inherited socket with its name or
/// address, else a new one; then inherited sockets no `--listen` asked for.
fn listeners(
    specs: &[ListenSpec],
    mut inherited: baton::Listeners,
) -> Result<Vec<BoundListener>, StartupError> {
    let names = inherited.names().to_vec();
    let mut adopted: Vec<Option<BoundListener>> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let taken = inherited
            .take(i)
            .map_err(|e| StartupError::Invalid(format!("sockets passed to baton: {e}")))?;
        adopted.push(taken.map(|l| adopt(name, l)).transpose()?);
    }
    let mut out = Vec::new();
    for spec in specs {
        let found = adopted.iter_mut().find(|slot| {
            slot.as_ref().is_some_and(|l| {
                spec.name.as_deref() == Some(l.name.as_str()) || same_address(&spec.addr, &l.local)
            })
        });
        match found.and_then(Option::take) {
            Some(mut l) => {
                if let Some(name) = &spec.name {
                    l.name.clone_from(name);
                }
                tracing::info!(addr = %l.local, name = %l.name, "using a socket passed to baton");
                out.push(l);
            }
            None => out.push(bind_listener(spec)?),
        }
    }
    // The rest is passed on, except second descriptors of a socket already
    // taken (systemd's descriptor store and baton's keeper may both hold
    // one).
    let taken: HashSet<u64> = out
        .iter()
        .filter_map(|l| crate::sys::inspect::inode(&l.fd))
        .collect();
    out.extend(
        adopted
            .into_iter()
            .flatten()
            .filter(|l| crate::sys::inspect::inode(&l.fd).is_none_or(|i| !taken.contains(&i))),
    );
    if out.is_empty() {
        return Err(StartupError::Invalid(
            "nothing to listen on: give --listen ADDR (or listen = [...] in --config, or sockets from systemd)".into(),
        ));
    }
    Ok(out)
}

/// A socket passed to baton itself, as one of its listeners.
fn adopt(name: &str, listener: baton::Listener) -> Result<BoundListener, StartupError> {
    let local = listener.describe();
    let (fd, key) = match listener {
        baton::Listener::Tcp(l) => (OwnedFd::from(l), local.clone()),
        baton::Listener::Unix(l) => (
            OwnedFd::from(l),
            local.strip_prefix("unix:").unwrap_or(&local).to_owned(),
        ),
        _ => {
            return Err(StartupError::Invalid(format!(
                "the socket {name} passed to baton is neither TCP nor Unix"
            )));
        }
    };
    let tcp = local.parse().ok();
    Ok(BoundListener {
        name: name.to_owned(),
        fd,
        local,
        server_starter_key: key,
        tcp,
        broken_reported: false,
        unix_path: None,
    })
}

/// Whether a `--listen` address is the address `local` an inherited socket
/// is bound to.
pub(crate) fn same_address(addr: &ListenAddr, local: &str) -> bool {
    match addr {
        ListenAddr::Ip(a) => local.parse::<SocketAddr>().is_ok_and(|l| l == *a),
        ListenAddr::AnyHost(port) => local
            .parse::<SocketAddr>()
            .is_ok_and(|l| l.port() == *port && l.ip().is_unspecified()),
        ListenAddr::Unix(path) => local.strip_prefix("unix:") == path.to_str(),
        ListenAddr::Host(..) => false,
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
/// with `--user`, that user's `USER`, `LOGNAME` and `HOME`.
fn base_env(user: Option<&crate::sys::user::Credentials>) -> Vec<(OsString, OsString)> {
    const OURS: [&str; 7] = [
        crate::guardian::handover::ENV,
        vars::LISTEN_FDS,
        vars::LISTEN_PID,
        vars::LISTEN_FDNAMES,
        vars::NOTIFY_SOCKET,
        vars::SERVER_STARTER_PORT,
        vars::BATON_GENERATION,
    ];
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

fn bind_control(path: &Path) -> Result<ControlSocket, StartupError> {
    let err = |source| StartupError::Control {
        path: path.to_owned(),
        error: source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    match socket::clear_stale_socket(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            return Err(StartupError::ControlInUse {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(err(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
    let control = ControlSocket {
        listener: Some(listener),
        path: path.to_owned(),
        removed: false,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(control)
}

/// Binds `port` on every interface: IPv6 and IPv4 at once, or IPv4 alone
/// on a machine without IPv6.
fn bind_any_host(port: u16) -> io::Result<OwnedFd> {
    let v6: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
    match socket::bind_tcp(v6, true) {
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            socket::bind_tcp((std::net::Ipv4Addr::UNSPECIFIED, port).into(), false)
        }
        other => other,
    }
}

fn bind_listener(spec: &ListenSpec) -> Result<BoundListener, StartupError> {
    let shown = spec.addr.to_string();
    let bind_err = |source: io::Error| {
        let hint = bind_hint(&spec.addr, &source);
        StartupError::Bind {
            addr: shown.clone(),
            error: source,
            hint,
        }
    };
    let name = spec
        .name
        .clone()
        .unwrap_or_else(|| vars::DEFAULT_FD_NAME.to_owned());
    let (fd, local, key, unix_path) = match &spec.addr {
        ListenAddr::Unix(path) => {
            let fd = socket::bind_unix(path).map_err(bind_err)?;
            let shown_path = path.display().to_string();
            (
                fd,
                format!("unix:{shown_path}"),
                shown_path,
                Some(path.clone()),
            )
        }
        ListenAddr::AnyHost(port) => {
            let fd = bind_any_host(*port).map_err(bind_err)?;
            let local = socket::tcp_local_addr(&fd).map_err(bind_err)?;
            (fd, local.to_string(), local.port().to_string(), None)
        }
        ListenAddr::Ip(addr) => {
            let fd = socket::bind_tcp(*addr, false).map_err(bind_err)?;
            let local = socket::tcp_local_addr(&fd).map_err(bind_err)?;
            (fd, local.to_string(), local.to_string(), None)
        }
        ListenAddr::Host(host, port) => {
            let addr = (host.as_str(), *port)
                .to_socket_addrs()
                .and_then(|mut a| {
                    a.next()
                        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
                })
                .map_err(|source| StartupError::Resolve {
                    addr: shown.clone(),
                    error: source,
                })?;
            let fd = socket::bind_tcp(addr, false).map_err(bind_err)?;
            let local = socket::tcp_local_addr(&fd).map_err(bind_err)?;
            (fd, local.to_string(), local.to_string(), None)
        }
    };
    let tcp = local.parse().ok();
    Ok(BoundListener {
        name,
        fd,
        local,
        server_starter_key: key,
        tcp,
        broken_reported: false,
        unix_path,
    })
}

/// How to fix a failed bind, as "; …".
fn bind_hint(addr: &ListenAddr, err: &io::Error) -> String {
    let unix = matches!(addr, ListenAddr::Unix(_));
    match err.kind() {
        io::ErrorKind::AddrInUse if unix => "; is another server running on it?".into(),
        io::ErrorKind::AddrInUse => {
            "; is another server running? (try --listen 127.0.0.1:0 for any free port)".into()
        }
        io::ErrorKind::PermissionDenied if !unix => {
            "; ports below 1024 need root or CAP_NET_BIND_SERVICE".into()
        }
        io::ErrorKind::PermissionDenied => "; check the directory's permissions".into(),
        io::ErrorKind::AddrNotAvailable => "; that address is not on this machine".into(),
        io::ErrorKind::AlreadyExists => "; remove it or choose another path".into(),
        io::ErrorKind::IsADirectory => {
            "; give the path of a socket file in it, like unix:DIR/app.sock".into()
        }
        io::ErrorKind::NotFound if unix => "; does the directory exist?".into(),
        _ => String::new(),
    }
}
