//! `baton run --config FILE`: every option of the command line in a TOML
//! file, keys named like the long options (`ready-timeout = "10s"`), with
//! `listen` and `command` as arrays. Unknown keys and bad values are errors
//! that name the file and line; the command line wins over the file.
//!
//! ```toml
//! listen = ["http=:8080", "unix:/run/app/admin.sock"]
//! command = ["/usr/local/bin/app", "--config", "/etc/app.toml"]
//! ready-timeout = "20s"
//! stop-timeout = "30s"
//! restart = "on-failure"
//! user = "app"
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use toml::Spanned;

use crate::cli::RunArgs;
use crate::error::StartupError;
use crate::spec::NotifyAccess;
use crate::spec::{self, ListenSpec};

/// The file as written: values that need parsing keep their position.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    listen: Option<Vec<Spanned<String>>>,
    ready: Option<Spanned<String>>,
    ready_timeout: Option<Spanned<String>>,
    stop_signal: Option<Spanned<String>>,
    stop_timeout: Option<Spanned<String>>,
    name: Option<String>,
    control: Option<PathBuf>,
    notify_access: Option<NotifyAccess>,
    orphans: Option<spec::Orphans>,
    workdir: Option<PathBuf>,
    bake: Option<Spanned<String>>,
    shutdown_delay: Option<Spanned<String>>,
    workers: Option<Spanned<Loose>>,
    max_rss: Option<Spanned<String>>,
    restart: Option<Spanned<String>>,
    restart_delay: Option<Spanned<String>>,
    restart_delay_max: Option<Spanned<String>>,
    start_limit: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    watch: Option<PathBuf>,
    log_prefix: Option<bool>,
    log_file: Option<PathBuf>,
    log_max_size: Option<Spanned<String>>,
    log_keep: Option<u32>,
    log_level: Option<String>,
    command: Option<Vec<String>>,
    proxy: Option<crate::proxy::Mode>,
    upstream_port_env: Option<String>,
    health: Option<Spanned<String>>,
    health_timeout: Option<Spanned<String>>,
    proxy_threads: Option<usize>,
    max_connections: Option<usize>,
    header_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    upstream_timeout: Option<Spanned<String>>,
    canary: Option<Spanned<Loose>>,
    max_error_rate: Option<Spanned<Loose>>,
    keep_underscore_headers: Option<bool>,
    check_timeout: Option<Spanned<String>>,
    close_after_body: Option<bool>,
    upstream_protocol: Option<crate::proxy::UpstreamProtocol>,
    drain_wait: Option<Spanned<String>>,
    env: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    after: Option<Vec<String>>,
    autostart: Option<bool>,
}

/// A value written as a string or as a number (`canary = 10`,
/// `max-error-rate = 2.5`, `canary = "10,50"`).
#[derive(Debug)]
struct Loose(String);

impl Loose {
    fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            Text(String),
            Int(i64),
            Float(f64),
        }
        Ok(Loose(match Any::deserialize(d)? {
            Any::Text(s) => s,
            Any::Int(i) => i.to_string(),
            Any::Float(f) => f.to_string(),
        }))
    }
}

/// The file's settings, parsed.
#[derive(Debug, Default)]
pub struct FileSettings {
    /// The options, as if given on the command line.
    pub args: RunArgs,
    /// `log-level`.
    pub log_level: Option<String>,
    /// `after`: the services this one starts after (`--config-dir`).
    pub after: Option<Vec<String>>,
    /// `autostart`: whether it starts with baton (`--config-dir`).
    pub autostart: Option<bool>,
    /// The keys the file sets, each with its line.
    pub keys: Vec<(String, usize)>,
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<FileSettings, StartupError> {
    let text = read_text(path).map_err(|e| {
        StartupError::Invalid(format!("reading config file {}: {e}", path.display()))
    })?;
    parse(path, &text)
}

/// The longest config file read.
pub const MAX_FILE: u64 = 1 << 20;

/// The text of the config file `path`: a regular file (a FIFO or a device
/// is refused without waiting on it) of at most [`MAX_FILE`] bytes.
pub fn read_text(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(format!("larger than {} KiB", MAX_FILE / 1024));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())
}

/// The keys `text` (the contents of `path`) sets, each with its line.
pub fn keys(path: &Path, text: &str) -> Result<Vec<(String, usize)>, StartupError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let keys: std::collections::BTreeMap<Spanned<String>, toml::Value> = toml::from_str(text)
        .map_err(|e: toml::de::Error| {
            let line = e.span().map_or(1, |s| line_of(s.start));
            StartupError::Invalid(format!("{}:{line}: {}", path.display(), e.message().trim()))
        })?;
    Ok(keys
        .into_keys()
        .map(|k| (k.get_ref().clone(), line_of(k.span().start)))
        .collect())
}

/// Parses `text`, the contents of `path`.
pub fn parse(path: &Path, text: &str) -> Result<FileSettings, StartupError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let syntax = |e: toml::de::Error| {
        let line = e.span().map_or(1, |s| line_of(s.start));
        StartupError::Invalid(format!("{}:{line}: {}", path.display(), e.message().trim()))
    };
    let keys = keys(path, text)?;
    let raw: Raw = toml::from_str(text).map_err(syntax)?;
    let value = |key: &str, span: std::ops::Range<usize>, parsed: Result<(), String>| {
        parsed.map_err(|message| {
            StartupError::Invalid(format!(
                "{}:{}: {key}: {message}",
                path.display(),
                line_of(span.start)
            ))
        })
    };
    // Parses one optional value with `parse`, naming key and line on error.
    macro_rules! field {
        ($key:literal, $raw:expr, $parse:expr) => {
            match &$raw {
                Some(v) => {
                    let mut out = None;
                    value(
                        $key,
                        v.span(),
                        $parse(v.get_ref().as_str()).map(|p| out = Some(p)),
                    )?;
                    out
                }
                None => None,
            }
        };
    }
    let mut listen = Vec::new();
    for v in raw.listen.iter().flatten() {
        let mut parsed = None;
        value(
            "listen",
            v.span(),
            ListenSpec::from_str(v.get_ref()).map(|p| parsed = Some(p)),
        )?;
        listen.extend(parsed);
    }
    let args = RunArgs {
        config: None,
        config_dir: None,
        listen,
        ready: field!("ready", raw.ready, spec::ReadyMode::from_str),
        ready_timeout: field!("ready-timeout", raw.ready_timeout, spec::parse_duration),
        stop_signal: field!("stop-signal", raw.stop_signal, spec::Signal::from_str),
        stop_timeout: field!("stop-timeout", raw.stop_timeout, spec::parse_duration),
        name: raw.name,
        control: raw.control,
        notify_access: raw.notify_access,
        orphans: raw.orphans,
        workdir: raw.workdir,
        bake: field!("bake", raw.bake, spec::parse_duration),
        shutdown_delay: field!("shutdown-delay", raw.shutdown_delay, spec::parse_duration),
        workers: field!("workers", raw.workers, spec::Workers::from_str),
        max_rss: field!("max-rss", raw.max_rss, spec::parse_size),
        restart: field!("restart", raw.restart, spec::RestartMode::from_str),
        restart_delay: field!("restart-delay", raw.restart_delay, spec::parse_duration),
        restart_delay_max: field!(
            "restart-delay-max",
            raw.restart_delay_max,
            spec::parse_duration
        ),
        start_limit: field!("start-limit", raw.start_limit, spec::StartLimit::from_str),
        user: field!("user", raw.user, spec::UserSpec::from_str),
        metrics: field!("metrics", raw.metrics, spec::AdminAddr::from_str),
        watch: raw.watch,
        log_prefix: raw.log_prefix.unwrap_or(false),
        log_file: raw.log_file,
        log_max_size: field!("log-max-size", raw.log_max_size, spec::parse_log_size),
        log_keep: raw.log_keep,
        command: raw
            .command
            .unwrap_or_default()
            .into_iter()
            .map(OsString::from)
            .collect(),
        proxy: raw.proxy,
        upstream_port_env: raw.upstream_port_env,
        health: field!("health", raw.health, crate::proxy::Health::from_str),
        health_timeout: field!("health-timeout", raw.health_timeout, spec::parse_duration),
        proxy_threads: raw.proxy_threads,
        max_connections: raw.max_connections,
        header_timeout: field!("header-timeout", raw.header_timeout, spec::parse_timeout),
        idle_timeout: field!("idle-timeout", raw.idle_timeout, spec::parse_timeout),
        upstream_timeout: field!(
            "upstream-timeout",
            raw.upstream_timeout,
            spec::parse_timeout
        ),
        canary: field!("canary", raw.canary, spec::Canary::from_str),
        max_error_rate: field!("max-error-rate", raw.max_error_rate, spec::parse_rate),
        keep_underscore_headers: raw.keep_underscore_headers.unwrap_or(false),
        check_timeout: field!("check-timeout", raw.check_timeout, spec::parse_timeout),
        close_after_body: raw.close_after_body.unwrap_or(false),
        upstream_protocol: raw.upstream_protocol,
        drain_wait: field!("drain-wait", raw.drain_wait, spec::parse_duration),
        env: match &raw.env {
            Some(table) => {
                let mut env = Vec::new();
                for (name, val) in table.get_ref() {
                    let pair = format!("{name}={val}");
                    value(
                        "env",
                        table.span(),
                        crate::knobs::parse_env(&pair).map(|p| env.push(p)),
                    )?;
                }
                env
            }
            None => Vec::new(),
        },
    };
    Ok(FileSettings {
        args,
        log_level: raw.log_level,
        after: raw.after,
        autostart: raw.autostart,
        keys,
    })
}

/// The command line over the file: each option given on the command line
/// replaces the file's.
pub fn merge(cli: RunArgs, file: RunArgs) -> RunArgs {
    RunArgs {
        config: cli.config,
        config_dir: cli.config_dir,
        listen: if cli.listen.is_empty() {
            file.listen
        } else {
            cli.listen
        },
        ready: cli.ready.or(file.ready),
        ready_timeout: cli.ready_timeout.or(file.ready_timeout),
        stop_signal: cli.stop_signal.or(file.stop_signal),
        stop_timeout: cli.stop_timeout.or(file.stop_timeout),
        name: cli.name.or(file.name),
        control: cli.control.or(file.control),
        notify_access: cli.notify_access.or(file.notify_access),
        orphans: cli.orphans.or(file.orphans),
        workdir: cli.workdir.or(file.workdir),
        bake: cli.bake.or(file.bake),
        shutdown_delay: cli.shutdown_delay.or(file.shutdown_delay),
        workers: cli.workers.or(file.workers),
        max_rss: cli.max_rss.or(file.max_rss),
        restart: cli.restart.or(file.restart),
        restart_delay: cli.restart_delay.or(file.restart_delay),
        restart_delay_max: cli.restart_delay_max.or(file.restart_delay_max),
        start_limit: cli.start_limit.or(file.start_limit),
        user: cli.user.or(file.user),
        metrics: cli.metrics.or(file.metrics),
        watch: cli.watch.or(file.watch),
        log_prefix: cli.log_prefix || file.log_prefix,
        log_file: cli.log_file.or(file.log_file),
        log_max_size: cli.log_max_size.or(file.log_max_size),
        log_keep: cli.log_keep.or(file.log_keep),
        command: if cli.command.is_empty() {
            file.command
        } else {
            cli.command
        },
        proxy: cli.proxy.or(file.proxy),
        upstream_port_env: cli.upstream_port_env.or(file.upstream_port_env),
        health: cli.health.or(file.health),
        health_timeout: cli.health_timeout.or(file.health_timeout),
        proxy_threads: cli.proxy_threads.or(file.proxy_threads),
        max_connections: cli.max_connections.or(file.max_connections),
        header_timeout: cli.header_timeout.or(file.header_timeout),
        idle_timeout: cli.idle_timeout.or(file.idle_timeout),
        upstream_timeout: cli.upstream_timeout.or(file.upstream_timeout),
        canary: cli.canary.or(file.canary),
        max_error_rate: cli.max_error_rate.or(file.max_error_rate),
        keep_underscore_headers: cli.keep_underscore_headers || file.keep_underscore_headers,
        check_timeout: cli.check_timeout.or(file.check_timeout),
        close_after_body: cli.close_after_body || file.close_after_body,
        upstream_protocol: cli.upstream_protocol.or(file.upstream_protocol),
        drain_wait: cli.drain_wait.or(file.drain_wait),
        // The file's, then the command line's (which win).
        env: [file.env, cli.env].concat(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse_str(text: &str) -> Result<FileSettings, String> {
        parse(Path::new("baton.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn every_option() {
        let f = parse_str(
            r#"
listen = ["http=:8080", "unix:/tmp/a.sock"]
ready = "delay:1s"
ready-timeout = "20s"
stop-signal = "INT"
stop-timeout = "5s"
name = "api"
control = "/run/api.sock"
notify-access = "main"
orphans = "stop"
workdir = "/srv/app/current"
bake = "5s"
shutdown-delay = "3s"
workers = 4
max-rss = "300M"
restart = "always"
restart-delay = "1s"
restart-delay-max = "1m"
start-limit = "3/30s"
user = "nobody:nogroup"
metrics = "127.0.0.1:9100"
watch = "/usr/local/bin/app"
log-prefix = true
log-file = "/var/log/app.log"
log-max-size = "20M"
log-keep = 3
log-level = "debug"
command = ["app", "--port", "0"]
max-connections = 5000
header-timeout = "5s"
idle-timeout = "30s"
upstream-timeout = "2m"
canary = "10,50"
max-error-rate = 2.5
keep-underscore-headers = true
close-after-body = true
check-timeout = "3s"
upstream-protocol = "h2c"
drain-wait = "2s"
env = { GIN_MODE = "release", EMPTY = "" }
"#,
        )
        .expect("valid");
        let a = f.args;
        assert_eq!(a.listen.len(), 2);
        assert_eq!(a.ready_timeout, Some(Duration::from_secs(20)));
        assert_eq!(a.stop_signal, Some(spec::Signal::INT));
        assert_eq!(a.notify_access, Some(NotifyAccess::Main));
        assert_eq!(a.orphans, Some(spec::Orphans::Stop));
        assert_eq!(a.workdir.as_deref(), Some(Path::new("/srv/app/current")));
        assert_eq!(a.bake, Some(Duration::from_secs(5)));
        assert_eq!(a.shutdown_delay, Some(Duration::from_secs(3)));
        assert_eq!(a.workers, Some(spec::Workers::Count(4)));
        assert_eq!(a.max_rss, Some(300 << 20));
        assert_eq!(a.restart, Some(spec::RestartMode::Always));
        assert_eq!(
            a.start_limit,
            Some(spec::StartLimit::Limit {
                burst: 3,
                interval: Duration::from_secs(30)
            })
        );
        assert_eq!(a.user.as_ref().map(|u| u.user.as_str()), Some("nobody"));
        assert!(a.log_prefix);
        assert_eq!(a.log_file.as_deref(), Some(Path::new("/var/log/app.log")));
        assert_eq!((a.log_max_size, a.log_keep), (Some(20 << 20), Some(3)));
        assert_eq!(a.command, ["app", "--port", "0"]);
        assert_eq!(f.log_level.as_deref(), Some("debug"));
        assert_eq!(a.max_connections, Some(5000));
        assert_eq!(a.header_timeout, Some(Duration::from_secs(5)));
        assert_eq!(a.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(a.upstream_timeout, Some(Duration::from_secs(120)));
        assert_eq!(a.canary, Some(spec::Canary(vec![10, 50])));
        assert_eq!(a.max_error_rate, Some(2.5));
        assert!(a.keep_underscore_headers && a.close_after_body);
        assert_eq!(a.check_timeout, Some(Duration::from_secs(3)));
        assert_eq!(
            a.upstream_protocol,
            Some(crate::proxy::UpstreamProtocol::H2c)
        );
        assert_eq!(a.drain_wait, Some(Duration::from_secs(2)));
        assert_eq!(
            a.env,
            [
                ("EMPTY".to_owned(), String::new()),
                ("GIN_MODE".to_owned(), "release".to_owned())
            ]
        );
        let err = parse_str("env = { LISTEN_FDS = \"3\" }\n").unwrap_err();
        assert!(
            err.contains("LISTEN_FDS") && err.contains("baton.toml:1:"),
            "{err}"
        );
        let err = parse_str("idle-timeout = \"0s\"\n").unwrap_err();
        assert!(err.contains("longer than 0"), "{err}");
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse_str("name = \"x\"\n\nready-timeout = \"5x\"\n").unwrap_err();
        assert!(
            err.starts_with("baton.toml:3: ready-timeout: invalid duration \"5x\""),
            "{err}"
        );
        let err = parse_str("name = \"x\"\nreadytimeout = \"5s\"\n").unwrap_err();
        assert!(
            err.starts_with("baton.toml:2: unknown field `readytimeout`"),
            "{err}"
        );
        let err = parse_str("listen = [\n  \":8080\",\n  \"8o80\",\n]\n").unwrap_err();
        assert!(
            err.starts_with("baton.toml:3: listen: invalid listen address \"8o80\""),
            "{err}"
        );
        let err = parse_str("listen = \":8080\"\n").unwrap_err();
        assert!(err.starts_with("baton.toml:1: "), "{err}");
        let err = parse_str("log-prefix = \"yes\"\n").unwrap_err();
        assert!(err.starts_with("baton.toml:1: "), "{err}");
    }

    #[test]
    fn the_command_line_wins() {
        let file = parse_str("stop-timeout = \"5s\"\nready-timeout = \"9s\"\ncommand = [\"a\"]\n")
            .expect("valid")
            .args;
        let cli = RunArgs {
            stop_timeout: Some(Duration::from_secs(1)),
            command: vec!["b".into()],
            ..RunArgs::default()
        };
        let m = merge(cli, file);
        assert_eq!(m.stop_timeout, Some(Duration::from_secs(1)));
        assert_eq!(m.ready_timeout, Some(Duration::from_secs(9)));
        assert_eq!(m.command, ["b"]);
    }
}
