//! `baton run --config-dir DIR`: many services under one baton, as
//! supervisord's `conf.d`. Every `DIR/*.toml` is a service named after the
//! file's stem, with the keys of a `--config` file that belong to a service,
//! plus `after = [...]` (start after these services) and `autostart =
//! false` (stay stopped until `baton start`). The keys that belong to the
//! whole instance ([`INSTANCE_KEYS`]) are refused there: they go on the
//! command line or in `DIR/baton.toml`, which holds nothing else.
//!
//! Reading is pure: files in, settings or errors that name file and line
//! out. At start any error is fatal; at `baton update` a bad file is
//! skipped and named, and its running service left as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::cli::RunArgs;
use crate::config_file;
use crate::error::StartupError;
use crate::spec::{ListenAddr, ListenSpec};

/// The instance's own file in the directory.
pub const INSTANCE_FILE: &str = "baton.toml";

/// Keys that belong to the instance, not to one service.
pub const INSTANCE_KEYS: &[&str] = &[
    "name",
    "control",
    "orphans",
    "metrics",
    "log-level",
    "proxy-threads",
    "max-connections",
];

/// The most services one instance runs.
pub const MAX_SERVICES: usize = 256;

/// A service file, read.
#[derive(Debug, Clone)]
pub struct ServiceDef {
    /// The file's stem.
    pub name: String,
    /// The file.
    pub file: PathBuf,
    /// Its settings: the command line's over the file's, the instance's
    /// keys added.
    pub args: RunArgs,
    /// The services it starts after.
    pub after: Vec<String>,
    /// Whether it starts with the instance.
    pub autostart: bool,
    /// The file's text, to tell a changed file from an unchanged one.
    pub text: String,
}

/// The directory, read.
#[derive(Debug)]
pub struct Dir {
    /// The instance's settings (command line over `baton.toml`): its
    /// keys only.
    pub instance: RunArgs,
    /// `log-level` from `baton.toml`.
    pub log_level: Option<String>,
    /// The services, in start order.
    pub services: Vec<ServiceDef>,
    /// Files that could not be used, each with why (only at `update`).
    pub skipped: Vec<(PathBuf, String)>,
}

/// Reads `dir` at start: every problem is an error.
pub fn load(dir: &Path, cli: &RunArgs) -> Result<Dir, StartupError> {
    let read = read(dir, cli, false)?;
    if let Some((_, why)) = read.skipped.first() {
        return Err(StartupError::Invalid(why.clone()));
    }
    Ok(read)
}

/// Reads `dir` again (`baton update`): a file that cannot be used is left
/// out and named in `skipped`; `running` are the services running now,
/// whose settings a skipped file's service keeps.
pub fn reread(dir: &Path, cli: &RunArgs) -> Result<Dir, StartupError> {
    read(dir, cli, true)
}

fn read(dir: &Path, cli: &RunArgs, lenient: bool) -> Result<Dir, StartupError> {
    let invalid = |what: String| StartupError::Invalid(what);
    let entries = std::fs::read_dir(dir)
        .map_err(|e| invalid(format!("--config-dir {}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter(|p| p.file_name().is_some_and(|n| n != INSTANCE_FILE))
        // Hidden files (an editor's lock or swap files) and directories
        // are not services.
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .filter(|p| !p.is_dir())
        .collect();
    files.sort();
    if files.len() > MAX_SERVICES {
        return Err(invalid(format!(
            "--config-dir {}: {} service files; at most {MAX_SERVICES}",
            dir.display(),
            files.len()
        )));
    }
    let (instance, log_level) = instance(dir, cli)?;
    let mut services = Vec::new();
    let mut skipped = Vec::new();
    for file in files {
        match service(&file, cli, &instance) {
            Ok(def) => services.push(def),
            Err(e) if lenient => skipped.push((file, e.to_string())),
            Err(e) => return Err(e),
        }
    }
    if services.is_empty() && skipped.is_empty() {
        return Err(invalid(format!(
            "--config-dir {}: no service files (*.toml other than {INSTANCE_FILE})",
            dir.display()
        )));
    }
    // A clash or a bad `after` names two files: at update, the second one
    // (in name order) is the one left out.
    let mut kept: Vec<ServiceDef> = Vec::new();
    for def in services {
        let problem = kept.iter().find_map(|other| clash(other, &def));
        match problem {
            Some(why) if lenient => skipped.push((def.file.clone(), why)),
            Some(why) => return Err(invalid(why)),
            None => kept.push(def),
        }
    }
    let services = match order(kept.clone()) {
        Ok(ordered) => ordered,
        Err(why) if lenient => {
            // Those whose `after` cannot be met are left out.
            let names: BTreeSet<String> = kept.iter().map(|d| d.name.clone()).collect();
            let (ok, bad): (Vec<_>, Vec<_>) = kept
                .into_iter()
                .partition(|d| d.after.iter().all(|a| names.contains(a)));
            for d in bad {
                skipped.push((d.file.clone(), why.clone()));
            }
            order(ok).map_err(invalid)?
        }
        Err(why) => return Err(invalid(why)),
    };
    Ok(Dir {
        instance,
        log_level,
        services,
        skipped,
    })
}

/// `DIR/baton.toml` (optional) under the command line: the instance's keys
/// only; the name defaults to the directory's.
fn instance(dir: &Path, cli: &RunArgs) -> Result<(RunArgs, Option<String>), StartupError> {
    let path = dir.join(INSTANCE_FILE);
    let (file, log_level) = if path.exists() {
        let settings = config_file::load(&path)?;
        if let Some((key, line)) = settings
            .keys
            .iter()
            .find(|(k, _)| !INSTANCE_KEYS.contains(&k.as_str()))
        {
            return Err(StartupError::Invalid(format!(
                "{}:{line}: {key}: {INSTANCE_FILE} holds the instance's keys only ({}); {key} goes in a service's file",
                path.display(),
                INSTANCE_KEYS.join(", ")
            )));
        }
        (settings.args, settings.log_level)
    } else {
        (RunArgs::default(), None)
    };
    let mut instance = RunArgs {
        name: cli.name.clone().or(file.name),
        control: cli.control.clone().or(file.control),
        orphans: cli.orphans.or(file.orphans),
        metrics: cli.metrics.or(file.metrics),
        proxy_threads: cli.proxy_threads.or(file.proxy_threads),
        max_connections: cli.max_connections.or(file.max_connections),
        ..RunArgs::default()
    };
    if instance.name.is_none() {
        let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        let name = absolute
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        crate::control::validate_name(&name).map_err(|why| {
            StartupError::Invalid(format!(
                "--config-dir {}: the directory's name is the instance's name, and {why}; pass --name",
                dir.display()
            ))
        })?;
        instance.name = Some(name);
    }
    Ok((instance, log_level))
}

/// One service file: its keys, the instance's refused.
fn service(file: &Path, cli: &RunArgs, instance: &RunArgs) -> Result<ServiceDef, StartupError> {
    let text = config_file::read_text(file)
        .map_err(|e| StartupError::Invalid(format!("reading {}: {e}", file.display())))?;
    parse_service(file, text, cli, instance)
}

/// A service file's `text`, as [`service`] reads it (and as an upgrade
/// hands it over: the settings a service runs with).
pub fn parse_service(
    file: &Path,
    text: String,
    cli: &RunArgs,
    instance: &RunArgs,
) -> Result<ServiceDef, StartupError> {
    let invalid = |what: String| StartupError::Invalid(what);
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    crate::control::validate_name(&stem).map_err(|why| {
        invalid(format!(
            "{}: a service is named after its file, and {why}",
            file.display()
        ))
    })?;
    if let Some((key, line)) = config_file::keys(file, &text)?
        .iter()
        .find(|(k, _)| INSTANCE_KEYS.contains(&k.as_str()))
    {
        return Err(invalid(format!(
            "{}:{line}: {key}: belongs to the whole instance, not to one service; set it in {} or on the command line",
            file.display(),
            INSTANCE_FILE
        )));
    }
    let settings = config_file::parse(file, &text)?;
    let mut args = config_file::merge(cli.clone(), settings.args);
    args.config = None;
    args.config_dir = None;
    args.name = Some(stem.clone());
    args.control = None;
    args.orphans = instance.orphans;
    args.metrics = None;
    args.proxy_threads = instance.proxy_threads;
    args.max_connections = instance.max_connections;
    if args.command.is_empty() {
        return Err(invalid(format!(
            "{}: no command: add command = [\"/path/to/app\", ...]",
            file.display()
        )));
    }
    let after = settings.after.unwrap_or_default();
    if let Some(me) = after.iter().find(|a| **a == stem) {
        return Err(invalid(format!(
            "{}: after: {me:?} is this service itself",
            file.display()
        )));
    }
    Ok(ServiceDef {
        name: stem,
        file: file.to_owned(),
        args,
        after,
        autostart: settings.autostart.unwrap_or(true),
        text,
    })
}

/// Why `a` and `b` cannot both run: a listener in common.
fn clash(a: &ServiceDef, b: &ServiceDef) -> Option<String> {
    let (x, y) = a
        .args
        .listen
        .iter()
        .flat_map(|x| b.args.listen.iter().map(move |y| (x, y)))
        .find(|(x, y)| overlap(x, y))?;
    Some(format!(
        "{} and {} both listen on {} ({} and {}): two services cannot share a listener",
        a.file.display(),
        b.file.display(),
        port_or_path(&x.addr),
        x.addr,
        y.addr
    ))
}

fn port_or_path(a: &ListenAddr) -> String {
    match a {
        ListenAddr::AnyHost(p) | ListenAddr::Host(_, p) => format!("port {p}"),
        ListenAddr::Ip(s) => format!("port {}", s.port()),
        ListenAddr::Unix(p) => p.display().to_string(),
    }
}

/// Whether two listeners would take the same address: the same Unix path,
/// or the same TCP port unless both are distinct IP addresses (a host name
/// may resolve to either, and a wildcard takes them all).
pub fn overlap(x: &ListenSpec, y: &ListenSpec) -> bool {
    use ListenAddr::{AnyHost, Host, Ip, Unix};
    let port = |a: &ListenAddr| match a {
        AnyHost(p) | Host(_, p) => Some(*p),
        Ip(s) => Some(s.port()),
        Unix(_) => None,
    };
    if port(&x.addr) == Some(0) || port(&y.addr) == Some(0) {
        return false;
    }
    match (&x.addr, &y.addr) {
        (Unix(a), Unix(b)) => a == b,
        (Ip(a), Ip(b)) if !a.ip().is_unspecified() && !b.ip().is_unspecified() => a == b,
        (a, b) => port(a).is_some_and(|p| Some(p) == port(b)),
    }
}

/// Start order: name order, each service after those its `after` names.
fn order(defs: Vec<ServiceDef>) -> Result<Vec<ServiceDef>, String> {
    let mut left: BTreeMap<String, ServiceDef> =
        defs.into_iter().map(|d| (d.name.clone(), d)).collect();
    for d in left.values() {
        if let Some(missing) = d.after.iter().find(|a| !left.contains_key(*a)) {
            return Err(format!(
                "{}: after: no service named {missing:?} in the directory (add its file, or take it out of after)",
                d.file.display()
            ));
        }
    }
    let mut out: Vec<ServiceDef> = Vec::new();
    while !left.is_empty() {
        let next = left
            .values()
            .find(|d| d.after.iter().all(|a| out.iter().any(|o| &o.name == a)))
            .map(|d| d.name.clone());
        match next.and_then(|n| left.remove(&n)) {
            Some(d) => out.push(d),
            None => {
                let names: Vec<&str> = left.keys().map(String::as_str).collect();
                return Err(format!(
                    "after: the services {} wait for each other in a circle (take one out of another's after)",
                    names.join(", ")
                ));
            }
        }
    }
    Ok(out)
}

/// The directory, locked for one baton: a second `baton run
/// --config-dir` on it (with another control socket) is refused rather
/// than running every service twice. The lock goes with the last
/// descriptor of it (an upgrade hands it over).
pub fn lock(dir: &Path) -> Result<std::os::fd::OwnedFd, StartupError> {
    use rustix::fs::{FlockOperation, Mode, OFlags};
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        StartupError::Invalid(format!(
            "--config-dir {}: {}",
            dir.display(),
            std::io::Error::from(e)
        ))
    })?;
    match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(fd),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(StartupError::Invalid(format!(
            "--config-dir {}: another baton runs the services of this directory (stop it first, or use `baton update` to apply changes)",
            dir.display()
        ))),
        // A file system without locks: nothing to guard with.
        Err(_) => Ok(fd),
    }
}

/// How the settings of a service changed, for `update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Not at all: the service is left alone.
    None,
    /// A new generation with the new settings carries it.
    Reload,
    /// Only a graceful restart does (the proxy mode, the listeners).
    Restart,
}

/// What it takes to go from `old` to `new`: a reload carries what is
/// read when a generation starts (the command, its environment, user and
/// directory, workers, readiness, timeouts, restart and bake settings, and
/// without a proxy the listeners); the rest (the proxy and its settings,
/// the log file, watch) takes a restart.
pub fn change(old: &ServiceDef, new: &ServiceDef) -> Change {
    // (`after` and `autostart` say when it starts, not how it runs.)
    if format!("{:?}", old.args) == format!("{:?}", new.args) {
        return Change::None;
    }
    let sockets = old.args.proxy.is_none() && new.args.proxy.is_none();
    let fixed = |d: &ServiceDef| {
        let a = RunArgs {
            listen: if sockets {
                Vec::new()
            } else {
                d.args.listen.clone()
            },
            command: Vec::new(),
            env: Vec::new(),
            user: None,
            workdir: None,
            workers: None,
            max_rss: None,
            ready: None,
            ready_timeout: None,
            stop_signal: None,
            stop_timeout: None,
            notify_access: None,
            restart: None,
            restart_delay: None,
            restart_delay_max: None,
            start_limit: None,
            bake: None,
            shutdown_delay: None,
            check_timeout: None,
            ..d.args.clone()
        };
        format!("{a:?}")
    };
    if fixed(old) == fixed(new) {
        Change::Reload
    } else {
        Change::Restart
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::Builder::new()
            .prefix("svcdir")
            .tempdir()
            .expect("tempdir");
        for (name, text) in files {
            std::fs::write(d.path().join(name), text).expect("write");
        }
        d
    }

    fn err(files: &[(&str, &str)]) -> String {
        let d = dir(files);
        load(d.path(), &RunArgs::default())
            .expect_err("refused")
            .to_string()
    }

    const APP: &str = "command = [\"/bin/true\"]\n";

    #[test]
    fn services_start_in_name_order_unless_after_says_otherwise() {
        let d = dir(&[
            (
                "web.toml",
                "command = [\"/bin/true\"]\nafter = [\"worker\"]\n",
            ),
            ("api.toml", APP),
            (
                "worker.toml",
                "command = [\"/bin/true\"]\nautostart = false\n",
            ),
        ]);
        let read = load(d.path(), &RunArgs::default()).expect("loads");
        let names: Vec<&str> = read.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["api", "worker", "web"]);
        assert!(!read.services[1].autostart);
        assert_eq!(read.services[0].args.name.as_deref(), Some("api"));
        let dir_name = d.path().file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(read.instance.name.as_deref(), Some(dir_name.as_str()));
    }

    #[test]
    fn instance_keys_are_refused_in_a_service_file_naming_key_and_line() {
        for key in INSTANCE_KEYS {
            let text = format!("command = [\"/bin/true\"]\n{key} = \"x\"\n");
            let e = err(&[("api.toml", &text)]);
            assert!(
                e.contains(&format!("api.toml:2: {key}: belongs to the whole instance")),
                "{e}"
            );
        }
        let e = err(&[("api.toml", APP), ("baton.toml", "stop-timeout = \"5s\"\n")]);
        assert!(e.contains("baton.toml:1: stop-timeout"), "{e}");
    }

    #[test]
    fn two_services_on_one_port_are_refused_naming_both() {
        let e = err(&[
            (
                "a.toml",
                "command = [\"/bin/true\"]\nlisten = [\":8080\"]\n",
            ),
            (
                "b.toml",
                "command = [\"/bin/true\"]\nlisten = [\"127.0.0.1:8080\"]\n",
            ),
        ]);
        assert!(
            e.contains("a.toml and") && e.contains("b.toml both listen on port 8080"),
            "{e}"
        );
        let e = err(&[
            (
                "a.toml",
                "command = [\"/bin/true\"]\nlisten = [\"unix:/tmp/x.sock\"]\n",
            ),
            (
                "b.toml",
                "command = [\"/bin/true\"]\nlisten = [\"unix:/tmp/x.sock\"]\n",
            ),
        ]);
        assert!(e.contains("both listen on /tmp/x.sock"), "{e}");
        // Distinct addresses on one port, and port 0, are fine.
        let d = dir(&[
            (
                "a.toml",
                "command = [\"/bin/true\"]\nlisten = [\"127.0.0.1:8080\", \"127.0.0.1:0\"]\n",
            ),
            (
                "b.toml",
                "command = [\"/bin/true\"]\nlisten = [\"127.0.0.2:8080\", \"127.0.0.1:0\"]\n",
            ),
        ]);
        assert!(load(d.path(), &RunArgs::default()).is_ok());
    }

    #[test]
    fn odd_names_bad_files_and_circles_are_refused() {
        let e = err(&[("a b.toml", APP)]);
        assert!(e.contains("invalid name \"a b\""), "{e}");
        let e = err(&[("-x.toml", APP)]);
        assert!(e.contains("invalid name \"-x\""), "{e}");
        let e = err(&[("caf\u{e9}.toml", APP)]);
        assert!(e.contains("ASCII letters"), "{e}");
        let e = err(&[("api.toml", "command = [\"/bin/true\"]\nstop-timeout = \n")]);
        assert!(e.contains("api.toml:2:"), "{e}");
        let e = err(&[
            ("a.toml", "command = [\"/bin/true\"]\nafter = [\"b\"]\n"),
            ("b.toml", "command = [\"/bin/true\"]\nafter = [\"a\"]\n"),
        ]);
        assert!(e.contains("in a circle"), "{e}");
        let e = err(&[("a.toml", "command = [\"/bin/true\"]\nafter = [\"zz\"]\n")]);
        assert!(e.contains("no service named \"zz\""), "{e}");
        let e = err(&[("baton.toml", "")]);
        assert!(e.contains("no service files"), "{e}");
        let e = err(&[("a.toml", "listen = [\":1\"]\n")]);
        assert!(e.contains("no command"), "{e}");
    }

    #[test]
    fn hidden_files_and_directories_are_not_services_and_odd_files_are_not_read() {
        let d = dir(&[
            ("a.toml", APP),
            (".#a.toml", "junk"),
            (".a.toml.swp", "junk"),
        ]);
        std::fs::create_dir(d.path().join("x.toml")).expect("mkdir");
        let read = load(d.path(), &RunArgs::default()).expect("loads");
        assert_eq!(read.services.len(), 1);
        // A FIFO is refused without waiting on a writer; a device that
        // never ends is refused without reading it whole.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.path().join("f.toml"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        std::os::unix::fs::symlink("/dev/zero", d.path().join("z.toml")).expect("symlink");
        let read = reread(d.path(), &RunArgs::default()).expect("reads");
        assert_eq!(read.services.len(), 1);
        let why: Vec<&str> = read.skipped.iter().map(|(_, w)| w.as_str()).collect();
        assert!(
            why.iter().all(|w| w.contains("not a regular file")),
            "{why:?}"
        );
        assert_eq!(why.len(), 2);
        let big = d.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; 2 << 20]).expect("write");
        let e = load(d.path(), &RunArgs::default())
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("big.toml: larger than 1024 KiB") || e.contains("not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn at_update_a_bad_file_is_skipped_and_named() {
        let d = dir(&[
            ("a.toml", APP),
            ("b.toml", "command = [\"/bin/true\"]\nworkers = \"many\"\n"),
        ]);
        let read = reread(d.path(), &RunArgs::default()).expect("reads");
        assert_eq!(read.services.len(), 1);
        assert_eq!(read.skipped.len(), 1);
        assert!(
            read.skipped[0].1.contains("b.toml:2: workers"),
            "{:?}",
            read.skipped
        );
    }

    #[test]
    fn one_baton_holds_a_directory() {
        let d = dir(&[("a.toml", APP)]);
        let first = lock(d.path()).expect("locked");
        let e = lock(d.path()).expect_err("held").to_string();
        assert!(e.contains("another baton runs the services"), "{e}");
        drop(first);
        assert!(lock(d.path()).is_ok());
    }

    #[test]
    fn changes_are_classified() {
        let d = dir(&[("a.toml", APP)]);
        let one = load(d.path(), &RunArgs::default()).expect("loads").services;
        let mut two = one[0].clone();
        assert_eq!(change(&one[0], &two), Change::None);
        // When it starts is not how it runs.
        two.after = vec!["db".into()];
        two.autostart = false;
        assert_eq!(change(&one[0], &two), Change::None);
        two.text.push_str("# a comment\n");
        assert_eq!(change(&one[0], &two), Change::None);
        two.args.stop_timeout = Some(std::time::Duration::from_secs(3));
        assert_eq!(change(&one[0], &two), Change::Reload);
        two.args.listen = vec!["127.0.0.1:9".parse().expect("spec")];
        assert_eq!(change(&one[0], &two), Change::Reload);
        two.args.proxy = Some(crate::proxy::Mode::Http);
        assert_eq!(change(&one[0], &two), Change::Restart);
    }
}
