//! The startup step, once the settings are valid (`config`): binds the
//! control socket, the listeners and the metrics endpoint, or takes them
//! from the image that started this one (`baton upgrade`), from systemd
//! (sockets passed to baton) or from the keeper of a baton that died here
//! (whose service is then adopted). Checks what depends on how many
//! listeners there are. Any failure is a [`StartupError`] (exit 2), and
//! what was bound is released.

use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::bound::{BoundListener, ControlSocket};
use crate::cli::RunArgs;
use crate::config::RunConfig;
use crate::error::StartupError;
use crate::guardian::handover::Handover;
use crate::guardian::orphans::{self, Adoption, Left};
use crate::spec::{ListenAddr, ListenSpec};
use crate::sys::socket;

/// Validates `args`, then binds what the run needs (or takes it over);
/// returns the settings with their sockets, and the service of a baton
/// that died here, if this one is to adopt it.
pub fn start(
    args: RunArgs,
    inherited: baton::Listeners,
    handover: Option<&Handover>,
) -> Result<(RunConfig, Left), StartupError> {
    let nofile = match handover {
        Some(h) => h.nofile,
        None => crate::sys::limits::raise_nofile(),
    };
    let mut cfg = RunConfig::from_args(args, nofile)?;
    let adopt = match handover {
        Some(h) => {
            handed_over(&mut cfg, h)?;
            cfg.exe.clone_from(&h.exe);
            cfg.argv.clone_from(&h.argv);
            Left::default()
        }
        None => {
            cfg.control = Some(bind_control(&cfg.control_path)?);
            bind(&mut cfg, inherited, false)?
        }
    };
    size_proxy(&mut cfg)?;
    Ok((cfg, adopt))
}

/// [`start`] for one service of several (`--config-dir`): no control
/// socket or metrics endpoint of its own (the instance's serve them all);
/// `inherited`: its listeners kept across a restart by `baton update`.
pub fn start_service(
    args: RunArgs,
    nofile: crate::sys::limits::Nofile,
    inherited: baton::Listeners,
) -> Result<(RunConfig, Left), StartupError> {
    let mut cfg = RunConfig::from_args(args, nofile)?;
    // A worker that takes no connections listens on nothing.
    let none_ok = cfg.proxy.is_none();
    let adopt = bind(&mut cfg, inherited, none_ok)?;
    size_proxy(&mut cfg)?;
    Ok((cfg, adopt))
}

/// [`start_service`] with its listeners already bound (`listeners`, in
/// the order of its `listen`): a service that `baton update` restarts.
pub fn start_service_bound(
    args: RunArgs,
    nofile: crate::sys::limits::Nofile,
    listeners: Vec<BoundListener>,
) -> Result<RunConfig, StartupError> {
    let mut cfg = RunConfig::from_args(args, nofile)?;
    cfg.listeners = listeners;
    size_proxy(&mut cfg)?;
    Ok(cfg)
}

/// The proxy's connection cap, from the descriptor limit.
fn size_proxy(cfg: &mut RunConfig) -> Result<(), StartupError> {
    if let Some(p) = &mut cfg.proxy {
        let n = crate::config::max_connections(
            cfg.nofile.soft,
            p.threads,
            cfg.listeners.len(),
            p.max_connections_asked,
        )?;
        p.limits.serve.connections = baton::serve::Connections::new(n);
    }
    Ok(())
}

/// Binds the control socket, the listeners and the metrics endpoint,
/// using sockets passed to baton and those a dead baton's keeper holds.
fn bind(
    cfg: &mut RunConfig,
    inherited: baton::Listeners,
    none_ok: bool,
) -> Result<Left, StartupError> {
    // What a baton that died here left: its listeners (from its keeper) are
    // used like sockets passed to baton.
    let found = orphans::find(&cfg.control_path, &cfg.listen)?;
    let mut inherited = inherited;
    let mut left = Left::default();
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
        left.handoff = found.handoff;
        left.adoption = found.adopt.then_some(Adoption {
            state: found.state,
            logs: found.logs,
            identified: found.identified,
        });
    }
    let mut listeners = listeners(&cfg.listen, inherited, none_ok)?;
    // Socket files the dead baton made are this one's to remove.
    for l in &mut listeners {
        if let Some((_, path)) = unix_paths.iter().find(|(local, _)| *local == l.local) {
            l.unix_path.clone_from(path);
        }
    }
    cfg.listeners = listeners;
    cfg.metrics = cfg.metrics_addr.map(bind_metrics).transpose()?;
    Ok(left)
}

/// The listeners [`rebind`] made, and those no longer named.
pub type Rebound = (Vec<BoundListener>, Vec<BoundListener>);

/// `baton update` changed a service's listeners from `old` (bound as
/// `current`, in the same order) to `specs`: those still named are taken
/// over as they are (the same socket: nothing is refused), the others
/// bound now. Returns them in the order of `specs`, and those no longer
/// named; nothing is taken if one cannot be bound.
pub fn rebind(
    specs: &[ListenSpec],
    old: &[ListenSpec],
    current: Vec<BoundListener>,
) -> Result<Rebound, (StartupError, Vec<BoundListener>)> {
    let mut current: Vec<Option<BoundListener>> = current.into_iter().map(Some).collect();
    let find = |spec: &ListenSpec, current: &[Option<BoundListener>]| {
        current.iter().enumerate().position(|(i, l)| {
            l.as_ref()
                .is_some_and(|l| old.get(i) == Some(spec) || spec.addr.is_bound_at(&l.local))
        })
    };
    let mut fresh = Vec::new();
    for spec in specs {
        if find(spec, &current).is_none() {
            match bind_listener(spec) {
                Ok(l) => fresh.push((spec, l)),
                Err(e) => return Err((e, current.into_iter().flatten().collect())),
            }
        }
    }
    let mut out = Vec::new();
    for spec in specs {
        match find(spec, &current) {
            Some(i) => out.extend(current[i].take()),
            None => {
                if let Some(at) = fresh.iter().position(|(s, _)| *s == spec) {
                    let (_, mut l) = fresh.remove(at);
                    if let Some(name) = &spec.name {
                        l.name.clone_from(name);
                    }
                    out.push(l);
                }
            }
        }
    }
    Ok((out, current.into_iter().flatten().collect()))
}

/// Binds the metrics endpoint (`--metrics`).
pub fn bind_metrics(addr: crate::spec::AdminAddr) -> Result<std::net::TcpListener, StartupError> {
    let (bound, as_listen) = match addr {
        crate::spec::AdminAddr::Ip(ip) => (socket::bind_tcp(ip, false), ListenAddr::Ip(ip)),
        crate::spec::AdminAddr::AnyHost(port) => (bind_any_host(port), ListenAddr::AnyHost(port)),
    };
    bound
        .map(std::net::TcpListener::from)
        .map_err(|source| StartupError::Bind {
            addr: format!("{addr} (--metrics)"),
            hint: bind_hint(&as_listen, &source),
            error: source,
        })
}

/// The control socket, listeners and metrics endpoint a previous image
/// handed over.
fn handed_over(cfg: &mut RunConfig, h: &Handover) -> Result<(), StartupError> {
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
        path: cfg.control_path.clone(),
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
    cfg.control = Some(control);
    cfg.listeners = listeners;
    cfg.metrics = metrics;
    Ok(())
}

/// The listeners: for each `--listen`, an inherited socket with its name or
/// address, else a new one; then inherited sockets no `--listen` asked for.
fn listeners(
    specs: &[ListenSpec],
    mut inherited: baton::Listeners,
    none_ok: bool,
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
                spec.name.as_deref() == Some(l.name.as_str()) || spec.addr.accepts(&l.local)
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
    if out.is_empty() && !none_ok {
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

/// The control socket's directory holds the state file and the keeper's
/// socket too: another user who may write there could plant a symlink or a
/// state file of their own. It must be baton's user's (or root's), a real
/// directory, and writable by no one else.
fn check_control_dir(dir: &Path) -> Result<(), StartupError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| StartupError::Invalid(format!("control directory {}: {e}", dir.display())))?;
    let me = rustix::process::geteuid().as_raw();
    let why = if meta.file_type().is_symlink() {
        Some("is a symlink")
    } else if !meta.is_dir() {
        Some("is not a directory")
    } else if meta.uid() != me && meta.uid() != 0 {
        Some("belongs to another user")
    } else if meta.mode() & 0o022 != 0 {
        Some("may be written by other users")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(StartupError::Invalid(format!(
            "control directory {} {why} (owner uid {}, mode {:o}; baton runs as uid {me}): \
             give --control a path in a directory of baton's own user, mode 0700 or 0755",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ))),
    }
}

pub fn bind_control(path: &Path) -> Result<ControlSocket, StartupError> {
    let err = |source| StartupError::Control {
        path: path.to_owned(),
        error: source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if std::fs::symlink_metadata(dir).is_err() {
        // 0700 from the start (no window with the umask's mode).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    // (A directory given for the socket gets its own advice, below.)
    if !path.is_dir() {
        check_control_dir(dir)?;
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
        .unwrap_or_else(|| baton::vars::DEFAULT_FD_NAME.to_owned());
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
            let port = match addr {
                ListenAddr::AnyHost(port) | ListenAddr::Host(_, port) => Some(*port),
                ListenAddr::Ip(ip) => Some(ip.port()),
                ListenAddr::Unix(_) => None,
            };
            match port.and_then(crate::sys::inspect::holder_of) {
                Some((pid, command)) => format!(
                    "; pid {pid} ({command}) listens on it: stop it, or if it is the app of a \
                     baton that died with its keeper, it serves on unsupervised and cannot be \
                     adopted (try --listen 127.0.0.1:0 for any free port)"
                ),
                None => "; is another server running? (try --listen 127.0.0.1:0 for any free port)"
                    .into(),
            }
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
