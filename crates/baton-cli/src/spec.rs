//! The values people type: listen addresses, readiness modes, signals and
//! durations. Each is a type with `FromStr` whose error says what was
//! expected, so clap reports bad input before anything starts.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// One `--listen` value: `[name=]ADDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// The fd's name in `LISTEN_FDNAMES`, if given.
    pub name: Option<String>,
    /// Where to listen.
    pub addr: ListenAddr,
}

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `:PORT`: every interface, IPv6 and IPv4.
    AnyHost(u16),
    /// `IP:PORT` or `[IPv6]:PORT`.
    Ip(SocketAddr),
    /// `HOST:PORT`: resolved when baton starts.
    Host(String, u16),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl ListenAddr {
    /// Whether this `--listen` address is the address `local` an inherited
    /// socket is bound to.
    pub fn is_bound_at(&self, local: &str) -> bool {
        match self {
            ListenAddr::Ip(a) => local.parse::<SocketAddr>().is_ok_and(|l| l == *a),
            ListenAddr::AnyHost(port) => local
                .parse::<SocketAddr>()
                .is_ok_and(|l| l.port() == *port && l.ip().is_unspecified()),
            ListenAddr::Unix(path) => local.strip_prefix("unix:") == path.to_str(),
            ListenAddr::Host(..) => false,
        }
    }

    /// [`ListenAddr::is_bound_at`], where port 0 (any port) takes the
    /// port `local` was given: a socket kept for this address (by a
    /// keeper, or passed to baton) is this address's.
    pub fn accepts(&self, local: &str) -> bool {
        let any_port = |ip: std::net::IpAddr| {
            local
                .parse::<SocketAddr>()
                .is_ok_and(|l| l.ip() == ip || (ip.is_unspecified() && l.ip().is_unspecified()))
        };
        match self {
            ListenAddr::Ip(a) if a.port() == 0 => any_port(a.ip()),
            ListenAddr::AnyHost(0) => {
                any_port(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
            }
            _ => self.is_bound_at(local),
        }
    }
}

const LISTEN_EXPECTED: &str = "expected HOST:PORT, :PORT or unix:PATH, optionally prefixed NAME=";

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("invalid listen address {s:?}: {LISTEN_EXPECTED}");
        let (name, rest) = match s.split_once('=') {
            Some((name, rest)) if !name.contains([':', '/', '[']) => {
                validate_fd_name(name)
                    .map_err(|why| format!("invalid listen name {name:?}: {why}"))?;
                (Some(name.to_owned()), rest)
            }
            _ => (None, s),
        };
        let addr = if let Some(path) = rest.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid());
            }
            ListenAddr::Unix(PathBuf::from(path))
        } else if let Some(port) = rest.strip_prefix(':') {
            ListenAddr::AnyHost(port.parse().map_err(|_| invalid())?)
        } else if let Ok(addr) = rest.parse::<SocketAddr>() {
            ListenAddr::Ip(addr)
        } else {
            let (host, port) = rest.rsplit_once(':').ok_or_else(invalid)?;
            let port: u16 = port.parse().map_err(|_| invalid())?;
            let hostname_like = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                && host.chars().any(|c| c.is_ascii_alphabetic());
            if !hostname_like {
                return Err(invalid());
            }
            ListenAddr::Host(host.to_owned(), port)
        };
        Ok(ListenSpec { name, addr })
    }
}

/// A name is valid in `LISTEN_FDNAMES` when it is 1 to 255 printable ASCII
/// characters without `:` (systemd's rule for `FileDescriptorName=`).
pub fn validate_fd_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 255 {
        return Err("expected 1 to 255 characters");
    }
    if !name.chars().all(|c| c.is_ascii_graphic() && c != ':') {
        return Err("expected printable ASCII characters other than ':'");
    }
    Ok(())
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::AnyHost(port) => write!(f, ":{port}"),
            ListenAddr::Ip(addr) => write!(f, "{addr}"),
            ListenAddr::Host(host, port) => write!(f, "{host}:{port}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name}={}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// How baton learns that a new generation is ready to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyMode {
    /// The app sends `READY=1` to `$NOTIFY_SOCKET` (`sd_notify(3)`).
    Notify,
    /// Ready this long after it started.
    Delay(Duration),
    /// Ready once this shell command exits 0 (run again every 100 ms until
    /// it does).
    Exec(String),
}

impl FromStr for ReadyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "notify" {
            Ok(ReadyMode::Notify)
        } else if let Some(d) = s.strip_prefix("delay:") {
            Ok(ReadyMode::Delay(parse_duration(d)?))
        } else if let Some(cmd) = s.strip_prefix("exec:").filter(|c| !c.trim().is_empty()) {
            Ok(ReadyMode::Exec(cmd.to_owned()))
        } else {
            Err(format!(
                "invalid readiness mode {s:?}: expected notify, delay:DURATION or exec:COMMAND"
            ))
        }
    }
}

impl fmt::Display for ReadyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadyMode::Notify => write!(f, "notify"),
            ReadyMode::Delay(d) => write!(f, "delay:{}", humantime::format_duration(*d)),
            ReadyMode::Exec(cmd) => write!(f, "exec:{cmd}"),
        }
    }
}

/// A Unix signal, by number; parsed from `TERM`, `SIGTERM` or `15`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signal(i32);

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

impl Signal {
    /// SIGTERM.
    pub const TERM: Signal = Signal(libc::SIGTERM);
    /// SIGKILL.
    pub const KILL: Signal = Signal(libc::SIGKILL);
    /// SIGHUP.
    pub const HUP: Signal = Signal(libc::SIGHUP);
    /// SIGUSR2.
    pub const USR2: Signal = Signal(libc::SIGUSR2);
    /// SIGINT.
    pub const INT: Signal = Signal(libc::SIGINT);
    /// SIGQUIT.
    pub const QUIT: Signal = Signal(libc::SIGQUIT);
    /// SIGUSR1.
    pub const USR1: Signal = Signal(libc::SIGUSR1);
    /// SIGWINCH.
    pub const WINCH: Signal = Signal(libc::SIGWINCH);

    /// The signal with this number, if it is one this system has.
    pub fn from_number(n: i32) -> Option<Signal> {
        SIGNALS
            .iter()
            .any(|(_, num)| *num == n)
            .then_some(Signal(n))
    }

    /// The signal number.
    pub fn number(self) -> i32 {
        self.0
    }
}

impl FromStr for Signal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || {
            format!(
                "invalid signal {s:?}: expected a name like TERM or SIGTERM, or a number like 15"
            )
        };
        if let Ok(n) = s.parse::<i32>() {
            return Signal::from_number(n).ok_or_else(invalid);
        }
        let upper = s.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        SIGNALS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, num)| Signal(*num))
            .ok_or_else(invalid)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match SIGNALS.iter().find(|(_, n)| *n == self.0) {
            Some((name, _)) => write!(f, "SIG{name}"),
            None => write!(f, "signal {}", self.0),
        }
    }
}

/// What to do when the serving generation exits on its own (systemd's
/// `Restart=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    /// Never start it again: baton exits with its status.
    Never,
    /// Start it again unless it exited with status 0.
    OnFailure,
    /// Always start it again.
    Always,
}

impl RestartMode {
    /// The policy as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartMode::Never => "never",
            RestartMode::OnFailure => "on-failure",
            RestartMode::Always => "always",
        }
    }
}

impl FromStr for RestartMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" | "no" => Ok(RestartMode::Never),
            "on-failure" => Ok(RestartMode::OnFailure),
            "always" => Ok(RestartMode::Always),
            _ => Err(format!(
                "invalid restart policy {s:?}: expected never, on-failure or always"
            )),
        }
    }
}

/// At most `burst` crash restarts within `interval` (systemd's
/// `StartLimitBurst=`/`StartLimitIntervalSec=`); `off` for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLimit {
    /// No limit.
    Off,
    /// The limit.
    Limit {
        /// Restarts allowed within `interval`.
        burst: u32,
        /// The sliding window.
        interval: Duration,
    },
}

impl FromStr for StartLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(StartLimit::Off);
        }
        let invalid =
            || format!("invalid start limit {s:?}: expected BURST/INTERVAL like 5/10s, or off");
        let (burst, interval) = s.split_once('/').ok_or_else(invalid)?;
        let burst: u32 = burst
            .trim()
            .parse()
            .ok()
            .filter(|b| *b > 0)
            .ok_or_else(invalid)?;
        let interval = parse_duration(interval).map_err(|_| invalid())?;
        if interval.is_zero() {
            return Err(invalid());
        }
        Ok(StartLimit::Limit { burst, interval })
    }
}

/// `--user NAME[:GROUP]` (names or numeric ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    /// The user.
    pub user: String,
    /// The group, if not the user's primary group.
    pub group: Option<String>,
}

impl FromStr for UserSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid =
            || format!("invalid user {s:?}: expected USER or USER:GROUP (names or numbers)");
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let ok = |part: &str| !part.is_empty() && !part.contains([' ', '/', ':']);
        if !ok(user) || group.is_some_and(|g| !ok(g)) {
            return Err(invalid());
        }
        Ok(UserSpec {
            user: user.to_owned(),
            group: group.map(str::to_owned),
        })
    }
}

/// Who may send `READY=1` for a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyAccess {
    /// Any process (the socket is private to one generation).
    All,
    /// Only the generation's main process.
    Main,
}

/// What a baton that dies without stopping leaves behind.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Orphans {
    /// The serving generation goes on serving, for the next `baton run`
    /// with the same control socket to adopt.
    #[default]
    Keep,
    /// Every generation gets SIGTERM when baton dies (a parent-death
    /// signal).
    Stop,
}

/// `--workers N` or `--workers auto` (the CPUs this process may use,
/// respecting affinity and cgroup quotas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// This many.
    Count(usize),
    /// One per available CPU.
    Auto,
}

/// The most workers a generation may have.
pub const MAX_WORKERS: usize = 256;

impl FromStr for Workers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "auto" {
            return Ok(Workers::Auto);
        }
        match s.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(Workers::Count(n)),
            _ => Err(format!(
                "invalid workers {s:?}: expected a number from 1 to {MAX_WORKERS}, or auto"
            )),
        }
    }
}

impl Workers {
    /// How many, on this machine.
    pub fn count(self) -> usize {
        match self {
            Workers::Count(n) => n,
            Workers::Auto => std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(MAX_WORKERS),
        }
    }
}

/// `--max-rss 300M`: a size in bytes, with K, M or G (powers of 1024), at
/// least 1M.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size_from(s, 1 << 20, "1M")
}

/// `--log-max-size 50M`: a size as [`parse_size`]'s, at least 1K.
pub fn parse_log_size(s: &str) -> Result<u64, String> {
    parse_size_from(s, 1 << 10, "1K")
}

fn parse_size_from(s: &str, least: u64, says: &str) -> Result<u64, String> {
    let t = s.trim();
    let (number, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let scale: u64 = match unit.trim().to_ascii_uppercase().trim_end_matches('B') {
        "" => 1,
        "K" | "KI" => 1 << 10,
        "M" | "MI" => 1 << 20,
        "G" | "GI" => 1 << 30,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 && scale > 0 && n.checked_mul(scale).is_some_and(|b| b >= least) => {
            Ok(n * scale)
        }
        _ => Err(format!(
            "invalid size {s:?}: expected at least {says}, like 300M or 2G"
        )),
    }
}

/// `--metrics ADDR`: `127.0.0.1:9100`, `[::1]:9100`, or `:9100` (every
/// interface, IPv6 and IPv4, as `--listen :PORT`), which a probe from
/// outside the host (the kubelet) needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAddr {
    /// One address.
    Ip(SocketAddr),
    /// Every interface.
    AnyHost(u16),
}

impl FromStr for AdminAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("invalid address {s:?}: expected IP:PORT or :PORT");
        match s.strip_prefix(':') {
            Some(port) => port.parse().map(AdminAddr::AnyHost).map_err(|_| invalid()),
            None => s.parse().map(AdminAddr::Ip).map_err(|_| invalid()),
        }
    }
}

impl fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminAddr::Ip(addr) => write!(f, "{addr}"),
            AdminAddr::AnyHost(port) => write!(f, ":{port}"),
        }
    }
}

/// `--canary 10` or `--canary 10,50`: the share of requests (or, in tcp
/// mode, connections) a release on probation gets, in steps that split the
/// bake evenly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canary(pub Vec<u8>);

impl FromStr for Canary {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let steps: Result<Vec<u8>, _> = s
            .split(',')
            .map(|p| match p.trim().trim_end_matches('%').parse::<u8>() {
                Ok(n) if (1..=100).contains(&n) => Ok(n),
                _ => Err(()),
            })
            .collect();
        match steps {
            Ok(steps) if !steps.is_empty() && steps.len() <= 10 => Ok(Canary(steps)),
            _ => Err(format!(
                "invalid canary {s:?}: expected per cents from 1 to 100, like 10 or 10,50 (at most 10 steps)"
            )),
        }
    }
}

/// `--max-error-rate 5`: a per cent above 0 and at most 100.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().trim_end_matches('%').parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 100.0 => Ok(r),
        _ => Err(format!(
            "invalid rate {s:?}: expected a per cent above 0 and at most 100, like 5 or 0.5"
        )),
    }
}

/// The longest duration any option accepts: a day. Every deadline baton
/// computes is "now + at most this", which can never overflow a clock, and
/// no wait longer than a day makes sense for a restart.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Parses `300ms`, `5s`, `2m`, `1h 30m`, up to [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|_| {
        format!("invalid duration {s:?}: expected a number and a unit, like 300ms, 5s or 2m")
    })?;
    if d > MAX_DURATION {
        return Err(format!(
            "invalid duration {s:?}: the longest accepted is 24h"
        ));
    }
    Ok(d)
}

/// Parses a timeout: a duration as [`parse_duration`], and not zero.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("invalid timeout {s:?}: it must be longer than 0"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs() {
        let ok: &[(&str, Option<&str>, ListenAddr)] = &[
            (
                "127.0.0.1:8080",
                None,
                ListenAddr::Ip("127.0.0.1:8080".parse().unwrap()),
            ),
            (
                "[::1]:8080",
                None,
                ListenAddr::Ip("[::1]:8080".parse().unwrap()),
            ),
            (":8080", None, ListenAddr::AnyHost(8080)),
            (
                "127.0.0.1:0",
                None,
                ListenAddr::Ip("127.0.0.1:0".parse().unwrap()),
            ),
            (
                "localhost:80",
                None,
                ListenAddr::Host("localhost".into(), 80),
            ),
            (
                "unix:/run/app.sock",
                None,
                ListenAddr::Unix("/run/app.sock".into()),
            ),
            ("unix:rel.sock", None, ListenAddr::Unix("rel.sock".into())),
            ("http=:80", Some("http"), ListenAddr::AnyHost(80)),
            (
                "admin=[::1]:9000",
                Some("admin"),
                ListenAddr::Ip("[::1]:9000".parse().unwrap()),
            ),
            (
                "api=unix:/tmp/a=b.sock",
                Some("api"),
                ListenAddr::Unix("/tmp/a=b.sock".into()),
            ),
            (
                "unix:/tmp/a=b.sock",
                None,
                ListenAddr::Unix("/tmp/a=b.sock".into()),
            ),
        ];
        for (text, name, addr) in ok {
            let spec: ListenSpec = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(spec.name.as_deref(), *name, "{text}");
            assert_eq!(&spec.addr, addr, "{text}");
            assert_eq!(spec.to_string(), *text, "round trip");
        }
    }

    #[test]
    fn bad_listen_specs_say_what_was_expected() {
        for text in [
            "8o80", "8080", ":http", ":99999", "unix:", "", "1.2.3:80", "host:", "=:80", "[::1]",
        ] {
            let err = text.parse::<ListenSpec>().expect_err(text);
            assert!(err.contains("expected"), "{text}: {err}");
        }
        let err = "8o80".parse::<ListenSpec>().unwrap_err();
        assert_eq!(
            err,
            "invalid listen address \"8o80\": expected HOST:PORT, :PORT or unix:PATH, optionally prefixed NAME="
        );
    }

    #[test]
    fn ready_modes() {
        assert_eq!("notify".parse(), Ok(ReadyMode::Notify));
        assert_eq!(
            "delay:300ms".parse(),
            Ok(ReadyMode::Delay(Duration::from_millis(300)))
        );
        assert_eq!(
            "exec:curl -sf localhost".parse(),
            Ok(ReadyMode::Exec("curl -sf localhost".into()))
        );
        for bad in [
            "",
            "notify:1",
            "delay:",
            "delay:soon",
            "exec:",
            "exec:  ",
            "http",
        ] {
            let err = bad.parse::<ReadyMode>().expect_err(bad);
            assert!(err.contains("expected"), "{bad}: {err}");
        }
    }

    #[test]
    fn signals() {
        for (text, n) in [
            ("TERM", libc::SIGTERM),
            ("SIGTERM", libc::SIGTERM),
            ("sigterm", libc::SIGTERM),
            ("term", libc::SIGTERM),
            ("15", libc::SIGTERM),
            ("HUP", libc::SIGHUP),
            ("SIGUSR2", libc::SIGUSR2),
            ("9", libc::SIGKILL),
        ] {
            assert_eq!(text.parse::<Signal>().map(Signal::number), Ok(n), "{text}");
        }
        for bad in ["", "SIG", "TERMINATE", "0", "99", "-1"] {
            let err = bad.parse::<Signal>().expect_err(bad);
            assert!(err.contains("expected"), "{bad}: {err}");
        }
        assert_eq!(Signal::TERM.to_string(), "SIGTERM");
    }

    #[test]
    fn restart_modes_limits_and_users() {
        assert_eq!("on-failure".parse(), Ok(RestartMode::OnFailure));
        assert_eq!("always".parse(), Ok(RestartMode::Always));
        assert_eq!("no".parse(), Ok(RestartMode::Never));
        assert!(
            "sometimes"
                .parse::<RestartMode>()
                .unwrap_err()
                .contains("expected")
        );
        assert_eq!(
            "5/10s".parse(),
            Ok(StartLimit::Limit {
                burst: 5,
                interval: Duration::from_secs(10)
            })
        );
        assert_eq!("off".parse(), Ok(StartLimit::Off));
        for bad in ["5", "0/10s", "5/0s", "x/10s", "5/soon", "/"] {
            assert!(
                bad.parse::<StartLimit>().unwrap_err().contains("expected"),
                "{bad}"
            );
        }
        assert_eq!(
            "www:web".parse(),
            Ok(UserSpec {
                user: "www".into(),
                group: Some("web".into())
            })
        );
        assert_eq!(
            "1000".parse(),
            Ok(UserSpec {
                user: "1000".into(),
                group: None
            })
        );
        for bad in ["", ":g", "u:", "a b", "u:g:h"] {
            assert!(
                bad.parse::<UserSpec>().unwrap_err().contains("expected"),
                "{bad}"
            );
        }
    }

    #[test]
    fn durations() {
        for (text, ms) in [
            ("300ms", 300),
            ("5s", 5000),
            ("2m", 120_000),
            (" 1s ", 1000),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for bad in ["", "5", "5x", "soon", "-1s"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("expected"), "{bad}: {err}");
        }
        // The maximum, and values that would overflow a clock.
        assert_eq!(parse_duration("24h"), Ok(MAX_DURATION));
        for huge in [
            "24h 1ms",
            "25h",
            "18446744073709551615s",
            "99999999999999999999y",
        ] {
            let err = parse_duration(huge).expect_err(huge);
            assert!(
                err.contains("24h") || err.contains("expected"),
                "{huge}: {err}"
            );
        }
        assert_eq!(parse_timeout("1ms"), Ok(Duration::from_millis(1)));
        assert!(parse_timeout("0s").unwrap_err().contains("longer than 0"));
    }
}
