//! `baton reload | status | stop | signal`: one request, one answer, shown
//! as text or as the JSON document the README describes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::error::ControlError;

use super::proto::{Request, Response, ServiceStatus, Status};

/// Which running baton to talk to: `control` (a socket path) wins over
/// `name`; with neither, the only socket in the default directory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Target<'a> {
    /// The service's `--name`.
    pub name: Option<&'a str>,
    /// Path of the control socket.
    pub control: Option<&'a Path>,
    /// The service inside it (a baton run with `--config-dir`).
    pub service: Option<&'a str>,
}

/// Finds the control socket: `--control`, else `--name`'s default path, else
/// the only socket in the default directory.
pub fn locate(target: &Target<'_>) -> Result<PathBuf, ControlError> {
    if let Some(path) = target.control {
        return Ok(path.to_owned());
    }
    if let Some(name) = target.name {
        super::validate_name(name).map_err(ControlError::NoSocket)?;
        return Ok(super::default_path(name));
    }
    find_in(&super::default_dir())
}

/// The only live control socket in `dir`: keepers' sockets are not
/// services, and a socket nothing listens on any more (a baton that was
/// killed) is skipped and mentioned.
fn find_in(dir: &Path) -> Result<PathBuf, ControlError> {
    let (mut live, stale) = sockets(dir);
    let names = |paths: &[PathBuf]| {
        paths
            .iter()
            .filter_map(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let skipped = if stale.is_empty() {
        String::new()
    } else {
        format!(
            " (skipped, nothing listens on them any more: {})",
            names(&stale)
        )
    };
    match live.len() {
        1 => Ok(live.remove(0)),
        0 => Err(ControlError::NoSocket(format!(
            "no running baton's control socket in {}{skipped}; is `baton run` running? (or pass --name or --control)",
            dir.display()
        ))),
        _ => Err(ControlError::NoSocket(format!(
            "several services run ({}){skipped}; pass --name to choose one",
            names(&live)
        ))),
    }
}

/// The control sockets in `dir`, those that answer and those nothing
/// listens on any more (keepers' sockets are not services).
fn sockets(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().ends_with(".keeper.sock"))
                })
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates.into_iter().partition(|p| {
        !matches!(
            std::os::unix::net::UnixStream::connect(p),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
}

/// The other batons running beside the one at `mine` (in the default
/// directory), as words to add to a message: empty if none.
pub fn others(mine: &Path) -> String {
    let (live, _) = sockets(&super::default_dir());
    let names: Vec<String> = live
        .iter()
        .filter(|p| p.as_path() != mine)
        .filter_map(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!("; other batons running: {}", names.join(", "))
    }
}

/// Sends `request` to the baton at `path` and waits for its answer (for a
/// reload, until the new generation is ready or rolled back; for a stop,
/// until baton has stopped), at most `timeout` if given.
pub fn call(
    path: &Path,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<Response, ControlError> {
    call_for(path, None, request, timeout)
}

/// [`call`], for service `service` of the baton at `path`. An answer that
/// there is no such service is an error.
pub fn call_for(
    path: &Path,
    service: Option<&str>,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<Response, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_owned(),
        error: source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ControlError::NotRunning {
        path: path.to_owned(),
        error: source,
    })?;
    stream.set_read_timeout(timeout).map_err(io_err)?;
    let mut value = serde_json::to_value(request).map_err(|e| io_err(std::io::Error::other(e)))?;
    if let (Some(service), Some(fields)) = (service, value.as_object_mut()) {
        fields.insert("service".to_owned(), service.into());
    }
    let mut line = value.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(io_err)?;
    if answer.trim().is_empty() {
        return Err(io_err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "baton closed the connection without answering (is it stopping?)",
        )));
    }
    match serde_json::from_str(answer.trim())
        .map_err(|e| io_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?
    {
        Response::UnknownService { message } => Err(ControlError::UnknownService(message)),
        response => Ok(response),
    }
}

/// `baton reload`: 0 when the new generation serves, 1 on a rollback.
pub fn reload(target: &Target<'_>, json: bool, rollback: bool) -> anyhow::Result<ExitCode> {
    let path = locate(target)?;
    let request = if rollback {
        Request::Rollback
    } else {
        Request::Reload
    };
    let response = call_for(&path, target.service, &request, None)?;
    if json
        && matches!(
            response,
            Response::Reloaded { .. } | Response::RolledBack { .. } | Response::NoPrevious { .. }
        )
    {
        println!("{}", serde_json::to_string(&response)?);
    }
    match response {
        Response::Reloaded {
            generation,
            pid,
            ready_ms,
            baked_ms,
        } => {
            if !json {
                let verb = if rollback { "rolled back" } else { "reloaded" };
                let bake = baked_ms.map_or(String::new(), |ms| {
                    format!(
                        ", and passed its {} bake",
                        humantime::format_duration(std::time::Duration::from_millis(ms))
                    )
                });
                println!(
                    "{verb}: generation {generation} (pid {pid}) is serving, ready after {ready_ms} ms{bake}"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::RolledBack { message, .. } => {
            if rollback {
                eprintln!("baton: rollback failed: {message}");
            } else {
                eprintln!("baton: reload rolled back: {message}");
            }
            Ok(ExitCode::from(1))
        }
        Response::NoPrevious { message } => {
            eprintln!("baton: {message}");
            Ok(ExitCode::from(2))
        }
        other => unexpected(other),
    }
}

/// `baton status`.
pub fn status(target: &Target<'_>, json: bool) -> anyhow::Result<ExitCode> {
    let path = locate(target)?;
    match call_for(&path, target.service, &Request::Status, None)? {
        Response::Status(status) if json => {
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        Response::Status(status) => print!("{}", describe(&status)),
        // One service that does not run: its line, or its object.
        Response::Services { services } if json && target.service.is_some() => {
            if let Some(one) = services.first() {
                println!("{}", serde_json::to_string_pretty(one)?);
            }
        }
        Response::Services { services } if json => {
            println!("{}", serde_json::to_string_pretty(&services)?);
        }
        Response::Services { services } => print!("{}", describe_services(&services)),
        _ => anyhow::bail!("unexpected answer from baton at {}", path.display()),
    }
    Ok(ExitCode::SUCCESS)
}

/// Every service of a baton that runs several, one line each.
fn describe_services(services: &[ServiceStatus]) -> String {
    use std::fmt::Write as _;
    let width = services.iter().map(|s| s.service.len()).max().unwrap_or(0);
    let mut out = String::new();
    for s in services {
        let detail = match &s.status {
            Some(st) => {
                let serving = st
                    .serving
                    .and_then(|id| st.generations.iter().find(|g| g.generation == id));
                let pid = serving
                    .and_then(|g| g.pid)
                    .map_or_else(|| "-".to_owned(), |p| p.to_string());
                let listen: Vec<&str> = st.listeners.iter().map(|l| l.addr.as_str()).collect();
                let mut d = format!(
                    "generation {} pid {pid}, up {} s, reloads {} ok {} rolled back, restarts {}",
                    st.serving.map_or_else(|| "-".to_owned(), |g| g.to_string()),
                    st.uptime_ms / 1000,
                    st.reloads_ok,
                    st.reloads_failed,
                    st.restarts
                );
                if !listen.is_empty() {
                    let _ = write!(d, ", {}", listen.join(" "));
                }
                if let Some(why) = &st.not_ready {
                    let _ = write!(d, " (not ready: {why})");
                }
                d
            }
            None => match (&s.message, s.exit_code) {
                (Some(why), Some(code)) => format!("{why} (code {code})"),
                (Some(why), None) => why.clone(),
                (None, Some(code)) => format!("code {code}"),
                (None, None) => String::new(),
            },
        };
        let _ = writeln!(
            out,
            "{:width$}  {:11} {detail}",
            s.service,
            s.state.to_uppercase()
        );
    }
    out
}

/// `status` as text.
fn describe(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} (baton {} pid {}, up {} s)",
        status.name,
        status.version,
        status.pid,
        status.uptime_ms / 1000
    );
    if let Some(ago) = status.upgraded_ms_ago {
        let _ = writeln!(
            out,
            "upgraded in place {} time(s), last {} s ago",
            status.upgrades,
            ago / 1000
        );
    }
    if let Some(from) = status.adopted_from {
        let _ = writeln!(
            out,
            "adopted the service of baton pid {from}, which died (adopted processes' exit status is not known)"
        );
    }
    if let Some(ms) = status.shutdown_in_ms {
        let _ = writeln!(
            out,
            "shutting down: not ready (/readyz 503), stopping in {:.1} s (--shutdown-delay)",
            ms as f64 / 1000.0
        );
    } else if let Some(why) = &status.not_ready {
        let _ = writeln!(out, "not ready: {why}");
    }
    if let Some(keeper) = status.keeper_pid {
        let _ = writeln!(
            out,
            "keeper:  pid {keeper} holds the listeners in case baton dies"
        );
    }
    if let Some(why) = &status.no_keeper {
        let _ = writeln!(out, "warning: {why}");
    }
    let _ = writeln!(out, "command: {}", status.command.join(" "));
    for l in &status.listeners {
        let _ = writeln!(out, "listen:  fd {} {} ({})", l.fd, l.addr, l.name);
    }
    for g in &status.generations {
        let pid = g.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
        let ready = g
            .ready_ms
            .map_or_else(String::new, |ms| format!(", ready after {ms} ms"));
        let release = g
            .release
            .map_or_else(String::new, |r| format!(", release {r}"));
        let degraded = if g.degraded { ", degraded" } else { "" };
        let _ = writeln!(
            out,
            "generation {}: pid {pid}, {}, started {} s ago{ready}{release}{degraded}",
            g.generation,
            g.state,
            g.age_ms / 1000
        );
        if g.workers.len() > 1 {
            for w in &g.workers {
                let rss = w
                    .rss_bytes
                    .map_or_else(String::new, |b| format!(", {} MB", b >> 20));
                let _ = writeln!(
                    out,
                    "  worker {}: pid {}, {}{rss}, restarts {}",
                    w.worker, w.pid, w.state, w.restarts
                );
            }
        }
    }
    for r in &status.releases {
        let _ = writeln!(
            out,
            "release {} ({}): {} {} in {}",
            r.id,
            r.role,
            r.program.display(),
            r.hash.as_deref().unwrap_or("(hashing)"),
            r.cwd.display()
        );
    }
    let _ = writeln!(
        out,
        "reloads: {} ok, {} rolled back; restarts after crashes: {}",
        status.reloads_ok, status.reloads_failed, status.restarts
    );
    if let Some(last) = &status.last_reload {
        let _ = writeln!(out, "last reload: {last}");
    }
    if status.stopping {
        let _ = writeln!(out, "stopping");
    }
    out
}

/// `baton stop`: waits until baton has stopped (at most `timeout`) and
/// reports its exit code.
pub fn stop(target: &Target<'_>, timeout: Duration) -> anyhow::Result<ExitCode> {
    let path = locate(target)?;
    match call_for(&path, target.service, &Request::Stop, Some(timeout)) {
        Ok(Response::Stopped { code }) => {
            match target.service {
                Some(service) => println!("stopped: {service} exited with code {code}"),
                None => println!("stopped: baton exited with code {code}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Ok(other) => unexpected(other),
        Err(e) if e.timed_out() => {
            anyhow::bail!(
                "baton at {} has not stopped within {} (its --stop-timeout may be longer: pass \
                 --timeout); it goes on stopping",
                path.display(),
                humantime::format_duration(timeout)
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// `baton upgrade`: 0 once the new image serves (or, with `check_only`,
/// the candidate accepts), 1 if the upgrade was refused or failed (the
/// running baton goes on unchanged).
pub fn upgrade(
    target: &Target<'_>,
    binary: Option<&Path>,
    check_only: bool,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let path = locate(target)?;
    let request = Request::Upgrade {
        binary: binary.map(Path::to_owned),
        check_only,
    };
    let response = match call(&path, &request, Some(timeout)) {
        Err(e) if e.timed_out() => {
            anyhow::bail!(
                "no answer from baton at {} within {}; see its log",
                path.display(),
                humantime::format_duration(timeout)
            )
        }
        other => other?,
    };
    if json {
        println!("{}", serde_json::to_string(&response)?);
    }
    match response {
        Response::Upgraded {
            from,
            to,
            pid,
            took_ms,
        } => {
            if !json {
                println!(
                    "upgraded: baton {from} -> {to} (pid {pid}), serving again after {took_ms} ms"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::UpgradeChecked { binary, version } => {
            if !json {
                println!(
                    "{}: baton {version}, takes over the running baton's state",
                    binary.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error { message } => {
            eprintln!("baton: {message}");
            Ok(ExitCode::from(1))
        }
        other => unexpected(other),
    }
}

/// `baton signal`: the signal goes to the serving generation.
pub fn signal(target: &Target<'_>, signal: crate::spec::Signal) -> anyhow::Result<ExitCode> {
    let path = locate(target)?;
    let request = Request::Signal {
        signal: signal.number(),
    };
    match call_for(&path, target.service, &request, None)? {
        Response::Signaled { generation, pid } => {
            println!("{signal}: sent to generation {generation} (pid {pid})");
            Ok(ExitCode::SUCCESS)
        }
        Response::SignaledAll { signaled, missed } => {
            for s in &signaled {
                println!(
                    "{signal}: sent to {} generation {} (pid {})",
                    s.service, s.generation, s.pid
                );
            }
            for m in &missed {
                eprintln!("baton: {signal}: not sent to {}: {}", m.service, m.message);
            }
            Ok(if missed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        other => unexpected(other),
    }
}

/// `baton start SVC`: 0 once its first generation serves, 1 if it failed.
pub fn start(target: &Target<'_>, json: bool) -> anyhow::Result<ExitCode> {
    let path = locate(target)?;
    let response = call_for(&path, target.service, &Request::Start, None)?;
    if json {
        println!("{}", serde_json::to_string(&response)?);
    }
    match response {
        Response::Started { service } => {
            if !json {
                println!("started: {service} is serving");
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error { message } => {
            eprintln!("baton: {message}");
            Ok(ExitCode::from(1))
        }
        other => unexpected(other),
    }
}

/// `baton update`: what changed in the directory is applied; 1 if any
/// part failed.
pub fn update(target: &Target<'_>, json: bool) -> anyhow::Result<ExitCode> {
    let path = locate(target)?;
    let response = call_for(&path, None, &Request::Update, None)?;
    let Response::Updated { changes } = response else {
        return unexpected(response);
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&changes)?);
    } else if changes.is_empty() {
        println!("update: nothing changed");
    }
    if !json {
        for c in &changes {
            let line = format!("{}: {}: {}", c.service, c.action, c.message);
            if c.ok {
                println!("{line}");
            } else {
                eprintln!("baton: {line}");
            }
        }
    }
    Ok(if changes.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn unexpected(response: Response) -> anyhow::Result<ExitCode> {
    match response {
        Response::Error { message } => anyhow::bail!("baton refused the request: {message}"),
        Response::Stopping => anyhow::bail!("baton is stopping"),
        other => anyhow::bail!("unexpected answer from baton: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_only_live_service_is_found_past_keepers_and_stale_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listen = |name: &str| {
            std::os::unix::net::UnixListener::bind(dir.path().join(name)).expect("bind")
        };
        let _app = listen("app.sock");
        let _keeper = listen("app.keeper.sock");
        drop(listen("dead.sock"));
        assert_eq!(
            find_in(dir.path()).expect("found"),
            dir.path().join("app.sock")
        );
        let _other = listen("web.sock");
        let err = find_in(dir.path()).unwrap_err().to_string();
        assert!(err.contains("several services run (app, web)"), "{err}");
        assert!(
            err.contains("skipped, nothing listens on them any more: dead"),
            "{err}"
        );
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(
            find_in(empty.path())
                .unwrap_err()
                .to_string()
                .contains("no running baton")
        );
    }
}
