//! Test harness: runs the real `baton` binary (with its embedded demo app as
//! the service), reads its log lines as events, and cleans up after itself.
//!
//! Every wait here has a deadline and waits for an event (a log line, a pid's
//! exit, a condition); no test sleeps and hopes.

#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A generous upper bound for anything that should take well under a second.
pub const LONG: Duration = Duration::from_secs(30);

/// The `baton` binary under test. Tests of other workspace packages (the
/// examples) find it next to their own binaries, building it if needed.
pub fn exe() -> &'static str {
    if let Some(exe) = option_env!("CARGO_BIN_EXE_baton") {
        return exe;
    }
    static EXE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let me = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test> -> target/<profile>/baton
        let exe = me
            .parent()
            .and_then(Path::parent)
            .expect("test binary in target/<profile>/deps")
            .join("baton");
        if !exe.exists() {
            let cargo = option_env!("CARGO").unwrap_or("cargo");
            let status = Command::new(cargo)
                .args(["build", "-p", "baton-cli", "--bin", "baton"])
                .status()
                .expect("running cargo build");
            assert!(status.success(), "cargo build -p baton-cli failed");
        }
        exe.to_string_lossy().into_owned()
    })
}

/// Lines of output, shared with the reader thread.
#[derive(Default)]
struct Lines {
    all: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A child process whose stderr is read line by line (by a thread) as
/// events to wait for; killed on drop if still running. The one helper for
/// every process a test starts and watches.
pub struct Proc {
    child: Child,
    lines: Arc<Lines>,
    command: String,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with its stderr piped (and its stdout discarded unless
    /// the caller set it).
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stderr(Stdio::piped());
        let command = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command}: {e}"));
        let lines = Arc::new(Lines::default());
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            // Bytes, read on to the end: an app's line that is not UTF-8
            // (copied by `--log-prefix`) must not stop the reading.
            let mut reader = BufReader::new(stderr);
            let mut raw = Vec::new();
            while reader.read_until(b'\n', &mut raw).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&raw);
                let line = line.strip_suffix('\n').unwrap_or(&line).to_owned();
                raw.clear();
                sink.all.lock().expect("lines").push(line);
                sink.changed.notify_all();
            }
        });
        Proc {
            child,
            lines,
            command,
            exited: None,
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line it wrote to stderr so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.all.lock().expect("lines").clone()
    }

    /// The command, status and output, for failure messages.
    pub fn dump(&self) -> String {
        format!(
            "command: {}\nexit: {:?}\n--- stderr ---\n{}\n---",
            self.command,
            self.exited,
            self.lines().join("\n")
        )
    }

    /// Waits for a line matching `pred` (searching all lines so far), or
    /// panics with a dump after `timeout`.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut all = self.lines.all.lock().expect("lines");
        loop {
            if let Some(line) = all.iter().find(|l| pred(l)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(all);
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.dump()
                );
            }
            all = self.lines.changed.wait_timeout(all, left).expect("lines").0;
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.exited.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for it to exit, or panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return status;
            }
            if Instant::now() >= deadline {
                panic!("it did not exit within {timeout:?}\n{}", self.dump());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks it to stop (SIGTERM), then kills it if it is still running
    /// after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        if !self.running() {
            return;
        }
        send(self.pid(), rustix::process::Signal::TERM);
        let deadline = Instant::now() + grace;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.exited = Some(status);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `baton run`.
pub struct Baton {
    proc: Proc,
    /// Per-test directory (control socket, reports, faults file).
    pub dir: tempfile::TempDir,
    /// The control socket.
    pub control: PathBuf,
    /// `BATON_INSTANCE` in baton's environment, inherited by everything it
    /// starts: how leftovers of this very baton are found.
    instance: String,
}

/// Builder for [`Baton`].
pub struct BatonBuilder {
    run_args: Vec<OsString>,
    app: Vec<OsString>,
    wrapper: Option<String>,
    env: Vec<(OsString, OsString)>,
    dir: tempfile::TempDir,
    control: Option<PathBuf>,
    stdin: Option<std::os::fd::OwnedFd>,
    /// `--config-dir`: the services come from there, no command.
    no_app: bool,
    /// The directory baton starts in.
    cwd: Option<PathBuf>,
}

impl BatonBuilder {
    /// Starts baton in `dir`.
    pub fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_owned());
        self
    }

    /// Runs every service of `dir` (`--config-dir`) instead of one command.
    pub fn config_dir(mut self, dir: &Path) -> Self {
        self.run_args
            .extend(["--config-dir".into(), dir.as_os_str().to_owned()]);
        self.no_app = true;
        self
    }

    /// Adds `baton run` options.
    pub fn run_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.run_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds `baton demo-app` options (the default service).
    pub fn app_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.app.extend(args.into_iter().map(Into::into));
        self
    }

    /// Replaces the whole service command.
    pub fn command<I, S>(mut self, cmd: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.app = cmd.into_iter().map(Into::into).collect();
        self
    }

    /// Starts baton through `sh -c '<script>; exec "$@"'`, to change what it
    /// inherits (e.g. `trap '' USR1`).
    pub fn via_shell(mut self, script: &str) -> Self {
        self.wrapper = Some(script.to_owned());
        self
    }

    /// Sets an environment variable for baton (and so for the app).
    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The per-test directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Uses this control socket (another baton's, say) instead of one in
    /// the per-test directory.
    pub fn control(mut self, path: &Path) -> Self {
        self.control = Some(path.to_owned());
        self
    }

    /// Gives baton `fd` as its stdin (a way to hand it a descriptor, which
    /// a `via_shell` script can move elsewhere).
    pub fn stdin(mut self, fd: std::os::fd::OwnedFd) -> Self {
        self.stdin = Some(fd);
        self
    }

    /// Starts baton.
    pub fn start(self) -> Baton {
        let control = self
            .control
            .clone()
            .unwrap_or_else(|| self.dir.path().join("control.sock"));
        let mut argv: Vec<OsString> = vec![
            exe().into(),
            "run".into(),
            "--control".into(),
            control.clone().into(),
        ];
        argv.extend(self.run_args);
        if !self.no_app {
            argv.push("--".into());
            argv.extend(self.app);
        }
        let mut cmd = match &self.wrapper {
            Some(script) => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c")
                    .arg(format!("{script}; exec \"$@\""))
                    .arg("sh")
                    .args(&argv);
                c
            }
            None => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let instance = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        cmd.env("BATON_INSTANCE", &instance);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.env_remove("RUST_LOG")
            .stdin(self.stdin.map_or_else(Stdio::null, Stdio::from))
            .stdout(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Baton {
            proc: Proc::spawn(cmd),
            dir: self.dir,
            control,
            instance,
        }
    }
}

impl Baton {
    /// A builder for `baton run --listen 127.0.0.1:0 … -- baton demo-app …`
    /// with a fresh directory.
    pub fn builder() -> BatonBuilder {
        BatonBuilder {
            run_args: Vec::new(),
            app: vec![exe().into(), "demo-app".into()],
            wrapper: None,
            env: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
            control: None,
            stdin: None,
            no_app: false,
            cwd: None,
        }
    }

    /// baton on `127.0.0.1:0` with the demo app and these app options; waits
    /// until generation 1 is ready.
    pub fn serving(run_args: &[&str], app_args: &[&str]) -> Baton {
        let b = Baton::builder()
            .run_args(["--listen", "127.0.0.1:0"])
            .run_args(run_args.iter().copied())
            .app_args(app_args.iter().copied())
            .start();
        b.wait_for_event("ready", 1);
        b
    }

    /// baton --proxy MODE on `127.0.0.1:0` in front of the demo app, which
    /// binds `{port}`; waits until generation 1 is ready.
    pub fn behind_proxy(mode: &str, run_args: &[&str], app_args: &[&str]) -> Baton {
        let b = Baton::builder()
            .run_args(["--proxy", mode, "--listen", "127.0.0.1:0"])
            .run_args(run_args.iter().copied())
            .app_args(["--listen", "127.0.0.1:{port}"])
            .app_args(app_args.iter().copied())
            .start();
        b.wait_for_event("ready", 1);
        b
    }

    /// baton's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Every line baton (and the app) wrote to stderr so far.
    pub fn lines(&self) -> Vec<String> {
        self.proc.lines()
    }

    /// The command, status and output, for failure messages.
    pub fn dump(&self) -> String {
        self.proc.dump()
    }

    /// Waits for a line matching `pred` (searching all lines so far), or
    /// panics with a dump after `timeout`.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        self.proc.wait_for(what, pred, timeout)
    }

    /// Waits for the log event `event` (e.g. "ready") of generation `generation`.
    pub fn wait_for_event(&self, event: &str, generation: u64) -> String {
        let gen_field = format!("generation={generation}");
        self.wait_for(
            &format!("{event} {gen_field}"),
            |l| is_event(l, event) && l.split_whitespace().any(|w| w == gen_field),
            LONG,
        )
    }

    /// The `retire` line of `generation` that says when its stop signal
    /// went (proxy mode): with `drained_after_ms`, or, held to the drain
    /// wait, `in_flight` and `waited_ms`.
    pub fn stop_signal_line(&self, generation: u64) -> String {
        let gen_field = format!("generation={generation}");
        self.wait_for(
            &format!("the stop signal of generation {generation}"),
            |l| {
                is_event(l, "retire")
                    && l.split_whitespace().any(|w| w == gen_field)
                    && field(l, "signal").is_some()
            },
            LONG,
        )
    }

    /// Whether a line for `event` of `generation` was logged.
    pub fn has_event(&self, event: &str, generation: u64) -> bool {
        let gen_field = format!("generation={generation}");
        self.lines()
            .iter()
            .any(|l| is_event(l, event) && l.split_whitespace().any(|w| w == gen_field))
    }

    /// How many `event` lines were logged.
    pub fn count_events(&self, event: &str) -> usize {
        self.lines().iter().filter(|l| is_event(l, event)).count()
    }

    /// The pid of generation `generation` (from its `spawn` line).
    pub fn gen_pid(&self, generation: u64) -> u32 {
        let line = self.wait_for_event("spawn", generation);
        field(&line, "pid")
            .and_then(|p| p.parse().ok())
            .expect("spawn line has a pid")
    }

    /// The address of the `index`-th listener (from its `listening` line).
    pub fn addr(&self, index: usize) -> String {
        self.wait_for(
            "listening",
            |l| is_event(l, "listening") && l.contains(&format!("fd={}", 3 + index)),
            LONG,
        );
        let line = self
            .lines()
            .into_iter()
            .find(|l| is_event(l, "listening") && l.contains(&format!("fd={}", 3 + index)))
            .expect("listening line");
        field(&line, "addr").expect("addr").to_owned()
    }

    /// The TCP port of the first listener.
    pub fn port(&self) -> u16 {
        let addr: SocketAddr = self.addr(0).parse().expect("a TCP address");
        addr.port()
    }

    /// Runs `baton <args> --control <this baton's socket>` to completion.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut all: Vec<OsString> = args.iter().map(OsString::from).collect();
        all.push("--control".into());
        all.push(self.control.clone().into());
        run(&all, LONG)
    }

    /// `baton reload --json`: its exit code and its answer.
    pub fn reload_json(&self) -> (Option<i32>, serde_json::Value) {
        let out = self.ctl(&["reload", "--json"]);
        let json = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("reload --json: {e}: {out:?}\n{}", self.dump()));
        (out.code, json)
    }

    /// `baton reload --json`, which the bake's judge must revert for its
    /// error rate, generation 1 serving on; returns its answer and the
    /// status after.
    pub fn reload_reverted_for_errors(&self) -> (serde_json::Value, serde_json::Value) {
        let (code, json) = self.reload_json();
        assert_eq!(code, Some(1), "{json}\n{}", self.dump());
        assert_eq!(json["reason"]["kind"], "reverted", "{json}");
        assert_eq!(json["reason"]["cause"], "error_rate", "{json}");
        let status = self.status_json();
        assert_eq!(status["serving"], 1, "{status}");
        (json, status)
    }

    /// `baton status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.ctl(&["status", "--json"]);
        assert_eq!(out.code, Some(0), "{out:?}\n{}", self.dump());
        serde_json::from_str(&out.stdout).expect("status JSON")
    }

    /// A counter of `status --json`'s `guard` section, e.g.
    /// `notify_rejected`; `None` while baton does not answer (not started
    /// yet, or gone).
    pub fn guard(&self, key: &str) -> Option<u64> {
        let out = self.ctl(&["status", "--json"]);
        if out.code != Some(0) {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
        Some(
            json["guard"][key]
                .as_u64()
                .unwrap_or_else(|| panic!("guard.{key} in status JSON: {json}")),
        )
    }

    /// Sends `signal` to baton.
    pub fn signal(&self, signal: rustix::process::Signal) {
        send(self.pid(), signal);
    }

    /// Waits for baton to exit, or panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.proc.wait_exit(timeout)
    }

    /// The pids of every generation spawned so far.
    pub fn spawned_pids(&self) -> Vec<u32> {
        self.lines()
            .iter()
            // (A service's lines, with --config-dir: `service{…}: spawn`.)
            .filter(|l| is_event(l, "spawn") || l.contains("}: spawn "))
            .filter_map(|l| field(l, "pid")?.parse().ok())
            .collect()
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        self.proc.terminate(Duration::from_secs(10));
        // Generations left behind (baton killed, or a test that failed
        // midway). Pids are reused quickly (pid_max can be 32768), so only
        // a process that this very baton started is killed: it inherited
        // this baton's BATON_INSTANCE.
        let ours = format!("BATON_INSTANCE={}", self.instance);
        for pid in self.spawned_pids() {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let started_here = environ.split(|b| *b == 0).any(|kv| kv == ours.as_bytes());
            if started_here && let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
            }
        }
    }
}

/// Whether `line` is the log event `event` (the message right after the level).
pub fn is_event(line: &str, event: &str) -> bool {
    let mut words = line.split_whitespace();
    // "<timestamp> <LEVEL> <event> ..." (warnings read "<event>: why").
    words.nth(2).map(|w| w.trim_end_matches(':')) == Some(event)
}

/// The value of `name=` in a log line.
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key.as_str()))
        .map(|v| v.trim_matches('"'))
}

/// Sends a signal; a process that is gone is fine.
pub fn send(pid: u32, signal: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, signal);
    }
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
pub fn pid_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Polls `cond` until it holds, or panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The output of a command run to completion.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `baton <args>` to completion (killing it after `timeout`).
pub fn run(args: &[OsString], timeout: Duration) -> Output {
    // `baton run` without --control or --name would use the default path,
    // named after the command: tests running at once would share it.
    let own = tempfile::tempdir().expect("tempdir");
    let mut args = args.to_vec();
    let named = args.iter().any(|a| a == "--control" || a == "--name");
    if args.first().is_some_and(|a| a == "run") && !named {
        args.insert(1, own.path().join("control.sock").into());
        args.insert(1, "--control".into());
    }
    let mut child = Command::new(exe())
        .args(&args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning baton");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait().expect("wait");
            panic!("`baton {args:?}` did not finish within {timeout:?} ({status})");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        code: status.code(),
        stdout: out_thread.join().expect("stdout thread"),
        stderr: err_thread.join().expect("stderr thread"),
    }
}

/// Runs `baton <args>` given as strings.
pub fn baton(args: &[&str]) -> Output {
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    run(&args, LONG)
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub pid: Option<u32>,
    pub generation: Option<u64>,
    pub body: String,
}

/// `GET path` on a new connection to `127.0.0.1:port`, `Connection: close`.
/// The error says what failed (connect refused, reset, empty reply, …).
pub fn get(port: u16, path: &str, timeout: Duration) -> Result<Reply, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    // Nothing listening on an ephemeral-range port can mean a self-connect.
    if stream.local_addr().ok() == stream.peer_addr().ok() {
        return Err("connect: refused (self-connect)".into());
    }
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Result<Reply, String> {
    if raw.is_empty() {
        return Err("empty reply".into());
    }
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("truncated reply: {text:?}"))?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head:?}"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    Ok(Reply {
        status,
        pid: header("x-pid").and_then(|v| v.parse().ok()),
        generation: header("x-baton-generation").and_then(|v| v.parse().ok()),
        body: body.to_owned(),
    })
}

/// Load from `clients` threads, each opening a new connection per request,
/// until `stop` is set (bounded by `max_requests` per client and `max_time`).
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Pids that answered.
    pub seen: Arc<Mutex<HashSet<u32>>>,
    /// Every failure, described.
    pub failures: Arc<Mutex<Vec<String>>>,
    /// Requests that succeeded.
    pub ok: Arc<std::sync::atomic::AtomicU64>,
}

impl Load {
    /// Starts the load.
    pub fn start(port: u16, clients: usize, max_requests: u64, max_time: Duration) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let ok = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let threads = (0..clients)
            .map(|_| {
                let (stop, seen, failures, ok) = (
                    Arc::clone(&stop),
                    Arc::clone(&seen),
                    Arc::clone(&failures),
                    Arc::clone(&ok),
                );
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed)
                        && n < max_requests
                        && started.elapsed() < max_time
                    {
                        n += 1;
                        match get(port, "/", Duration::from_secs(10)) {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if let Some(pid) = r.pid {
                                    seen.lock().expect("seen").insert(pid);
                                }
                            }
                            Ok(r) => failures
                                .lock()
                                .expect("failures")
                                .push(format!("status {}", r.status)),
                            Err(e) => failures.lock().expect("failures").push(e),
                        }
                    }
                })
            })
            .collect();
        let _: &AtomicU64 = &ok;
        Load {
            stop,
            threads,
            seen,
            failures,
            ok,
        }
    }

    /// Whether `pid` has answered yet.
    pub fn has_seen(&self, pid: u32) -> bool {
        self.seen.lock().expect("seen").contains(&pid)
    }

    /// Stops the load and waits for the clients.
    pub fn finish(self) -> (u64, Vec<String>, HashSet<u32>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.finish_when_done()
    }

    /// Waits for the clients to make all their requests (or run out of
    /// time).
    pub fn finish_when_done(mut self) -> (u64, Vec<String>, HashSet<u32>) {
        for t in self.threads.drain(..) {
            t.join().expect("client thread");
        }
        let ok = self.ok.load(std::sync::atomic::Ordering::Relaxed);
        let failures = self.failures.lock().expect("failures").clone();
        let seen = self.seen.lock().expect("seen").clone();
        (ok, failures, seen)
    }
}

/// Open fds of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Zombie children of `parent`.
pub fn zombies_of(parent: u32) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut f = rest.split_whitespace();
            let state = f.next();
            let ppid: Option<u32> = f.next().and_then(|p| p.parse().ok());
            state == Some("Z") && ppid == Some(parent)
        })
        .collect()
}

/// Keep-alive load: `clients` threads, each reusing one connection for as
/// long as the server keeps it open (reconnecting after `Connection: close`),
/// until `stop` is set or `max_time` passes.
pub struct KeepAlive {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<ClientTally>>,
    seen: Arc<Mutex<HashSet<u32>>>,
}

/// What one keep-alive client saw.
#[derive(Debug, Default, Clone)]
pub struct ClientTally {
    pub ok: u64,
    pub connections: u64,
    pub failures: Vec<String>,
}

impl KeepAlive {
    pub fn start(port: u16, clients: usize, max_time: Duration) -> KeepAlive {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let started = Instant::now();
        let threads = (0..clients)
            .map(|_| {
                let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
                std::thread::spawn(move || {
                    let mut tally = ClientTally::default();
                    let mut conn: Option<BufReader<TcpStream>> = None;
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < max_time {
                        let reused = conn.is_some();
                        if conn.is_none() {
                            match TcpStream::connect(("127.0.0.1", port)) {
                                Ok(s) if s.local_addr().ok() == s.peer_addr().ok() => {
                                    tally
                                        .failures
                                        .push("connect: refused (self-connect)".into());
                                    continue;
                                }
                                Ok(s) => {
                                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                                    let _ = s.set_nodelay(true);
                                    tally.connections += 1;
                                    conn = Some(BufReader::new(s));
                                }
                                Err(e) => {
                                    tally.failures.push(format!("connect: {e}"));
                                    continue;
                                }
                            }
                        }
                        let Some(reader) = conn.as_mut() else {
                            continue;
                        };
                        match keep_alive_request(reader) {
                            Ok((pid, close)) => {
                                tally.ok += 1;
                                if let Some(pid) = pid {
                                    seen.lock().expect("seen").insert(pid);
                                }
                                if close {
                                    conn = None;
                                }
                            }
                            Err(e) => {
                                let on = if reused { "reused" } else { "new" };
                                tally.failures.push(format!("{e} (on a {on} connection)"));
                                conn = None;
                            }
                        }
                    }
                    tally
                })
            })
            .collect();
        KeepAlive {
            stop,
            threads,
            seen,
        }
    }

    /// Whether `pid` has answered yet.
    pub fn has_seen(&self, pid: u32) -> bool {
        self.seen.lock().expect("seen").contains(&pid)
    }

    /// Stops the clients and sums up what they saw.
    pub fn finish(mut self) -> ClientTally {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = ClientTally::default();
        for t in self.threads.drain(..) {
            let tally = t.join().expect("client thread");
            total.ok += tally.ok;
            total.connections += tally.connections;
            total.failures.extend(tally.failures);
        }
        total
    }
}

/// One `GET /` on an open connection: the responder's pid, and whether the
/// server said `Connection: close`.
fn keep_alive_request(reader: &mut BufReader<TcpStream>) -> Result<(Option<u32>, bool), String> {
    reader
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut status = String::new();
    match reader.read_line(&mut status) {
        Ok(0) => return Err("empty reply".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("read: {e}")),
    }
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("status line {status:?}"));
    }
    let (mut length, mut pid, mut close) = (0usize, None, false);
    loop {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                length = value.parse().map_err(|_| "bad content-length".to_owned())?
            }
            "x-pid" => pid = value.parse().ok(),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = vec![0u8; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| format!("read body: {e}"))?;
    Ok((pid, close))
}

/// Load that records which pids answered.
pub trait Seen {
    /// Whether `pid` has answered yet.
    fn seen(&self, pid: u32) -> bool;
}

impl Seen for Load {
    fn seen(&self, pid: u32) -> bool {
        self.has_seen(pid)
    }
}

impl Seen for KeepAlive {
    fn seen(&self, pid: u32) -> bool {
        self.has_seen(pid)
    }
}

/// Reloads `b` once for each of `generations`, each time waiting until the
/// new generation has answered `load`; returns the new pids.
pub fn reload_through(
    b: &Baton,
    generations: std::ops::RangeInclusive<u64>,
    load: &impl Seen,
) -> Vec<u32> {
    let first = *generations.start();
    if first > 1 {
        let previous = b.gen_pid(first - 1);
        wait_until(&format!("generation {} answered", first - 1), LONG, || {
            load.seen(previous)
        });
    }
    generations
        .map(|generation| {
            let out = b.ctl(&["reload"]);
            assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
            let pid = b.gen_pid(generation);
            wait_until(&format!("generation {generation} answered"), LONG, || {
                load.seen(pid)
            });
            pid
        })
        .collect()
}

/// Whether the long trials run (`BATON_LONG=1`, set by `.ci/run`): soak
/// runs of hundreds of reloads and the like, which a quick local run skips,
/// saying so.
pub fn long(what: &str) -> bool {
    let on = std::env::var_os("BATON_LONG").is_some_and(|v| v == "1");
    if !on {
        eprintln!("skipped: {what} is a long trial (BATON_LONG=1 runs it)");
    }
    on
}

/// Whether this runs as root, which `what` needs; says so when not (and
/// fails then with `BATON_REQUIRE_PEERS`, like a missing peer).
pub fn root_for(what: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        assert!(
            std::env::var_os("BATON_REQUIRE_PEERS").is_none(),
            "BATON_REQUIRE_PEERS is set but {what} needs root"
        );
        eprintln!("skipped: {what} needs root");
    }
    root
}

/// Whether the real peer `command` (from Debian's packages) is installed.
/// Tests that need it skip, saying so, when it is not; with
/// `BATON_REQUIRE_PEERS=1` (set by `.ci/run`, which installs them) they fail
/// instead.
pub fn peer(command: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()));
    if !found {
        assert!(
            std::env::var_os("BATON_REQUIRE_PEERS").is_none(),
            "BATON_REQUIRE_PEERS is set but `{command}` is missing: apt-get install {package}"
        );
        eprintln!("skipped: needs `{command}` (apt-get install {package})");
    }
    found
}

/// Whether the real peer at `path` (from Debian's `package`) is installed;
/// like [`peer`], for a program needed at one exact path.
pub fn peer_at(path: &str, package: &str) -> bool {
    let found = Path::new(path).is_file();
    if !found {
        assert!(
            std::env::var_os("BATON_REQUIRE_PEERS").is_none(),
            "BATON_REQUIRE_PEERS is set but `{path}` is missing: apt-get install {package}"
        );
        eprintln!("skipped: needs `{path}` (apt-get install {package})");
    }
    found
}

/// Asserts that no request failed, showing the first failures if some did.
pub fn assert_no_failures(ok: u64, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(20)]
    );
}

/// Starts a `/slow?ms=MS` request to generation 1, reloads once the app has
/// logged that the request arrived, and returns the request's outcome and
/// generation 1's pid.
pub fn slow_request_across_a_reload(b: &Baton, ms: u64) -> (Result<Reply, String>, u32) {
    let (slow, old) = slow_request(b, ms);
    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    (slow.join().expect("the request's thread"), old)
}

/// Starts a `ms`-long request to generation 1 and waits until it arrived;
/// returns its thread and generation 1's pid.
pub fn slow_request(b: &Baton, ms: u64) -> (std::thread::JoinHandle<Result<Reply, String>>, u32) {
    let (port, old) = (b.port(), b.gen_pid(1));
    let slow = std::thread::spawn(move || get(port, &format!("/slow?ms={ms}"), LONG));
    let started = format!("pid {old} started a {ms} ms request");
    b.wait_for(
        "the slow request to reach generation 1",
        |l| l.contains(&started),
        LONG,
    );
    (slow, old)
}

/// Raises this test process's soft descriptor limit to its hard limit (the
/// tests that open thousands of connections need it); returns the limit.
pub fn raise_own_nofile() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// This process's hard descriptor limit.
pub fn hard_nofile() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX)
}

/// A number from `/proc/<pid>/status`, e.g. `RssAnon` (kB) or `Threads`.
pub fn proc_status(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `(soft, hard)` "Max open files" of process `pid`.
pub fn nofile_of(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let mut words = line["Max open files".len()..].split_whitespace();
    (
        words.next().unwrap_or_default().to_owned(),
        words.next().unwrap_or_default().to_owned(),
    )
}

/// `n` connections to `127.0.0.1:port` that send nothing.
pub fn idle_clients(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("idle client {i} of {n}: {e}"))
        })
        .collect()
}

/// Whether the server closed `stream` (end of file or reset); never blocks.
pub fn closed_by_server(stream: &TcpStream) -> bool {
    let _ = stream.set_nonblocking(true);
    let mut byte = [0u8; 1];
    let closed = match (&*stream).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

/// The connection counters of `status --json` for `socket` (`proxy` or
/// `control`), or `None` while baton does not answer.
pub fn connections(b: &Baton, socket: &str) -> Option<serde_json::Value> {
    let out = b.ctl(&["status", "--json"]);
    if out.code != Some(0) {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
    json["guard"]["connections"]
        .as_array()?
        .iter()
        .find(|c| c["socket"] == socket)
        .cloned()
}

/// Runs the test `name` again in a network namespace of its own, when this
/// machine allows it (root, `unshare`, `ip`), so that its thousands of
/// connections (and the TIME_WAIT sockets they leave for a minute) touch
/// nothing else. Returns true when the test ran there (the caller is done:
/// the child's result was checked); false when the caller should run the
/// test body itself, here (inside the namespace, or where none can be made).
pub fn in_own_network(path: &str) -> bool {
    const INSIDE: &str = "BATON_TEST_NETNS";
    // `it::endurance::name` (module_path! of the test) is `endurance::name`
    // to the test harness.
    let name = path
        .split_once("::")
        .map(|(_, rest)| rest)
        .expect("a test's full path: concat!(module_path!(), \"::name\")");
    if std::env::var_os(INSIDE).is_some() || !rustix::process::geteuid().is_root() {
        return false;
    }
    let have = |tool: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
    };
    if !have("unshare") || !have("ip") {
        return false;
    }
    let me = std::env::current_exe().expect("the test binary");
    let out = Command::new("unshare")
        .args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ])
        .arg(&me)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .stdin(Stdio::null())
        .output()
        .expect("unshare (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name} in a network namespace of its own: {}\n{text}",
        out.status
    );
    eprintln!("{}", text.trim_end());
    true
}

/// A loopback port nothing listens on now (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Builds the Go example `examples/NAME` with its `build.sh` (offline,
/// from Debian's Go and packaged sources), once per test run; the
/// directory of its binaries, or `None` without `go` (which fails instead
/// with `BATON_REQUIRE_GO=1`, set by `.ci/run`).
pub fn go_example(name: &str) -> Option<PathBuf> {
    static BUILT: Mutex<Vec<(String, Option<PathBuf>)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, out)) = built.iter().find(|(n, _)| n == name) {
        return out.clone();
    }
    let packages = "golang-go golang-github-gin-gonic-gin-dev golang-github-coreos-go-systemd-dev \
                    golang-google-grpc-dev";
    let have_go = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    let out = if have_go {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name)
            .join("build.sh");
        let done = Command::new("/bin/sh")
            .arg(&script)
            .arg(&out)
            .output()
            .expect("running build.sh");
        assert!(
            done.status.success(),
            "building the {name} example failed:\n{}{}",
            String::from_utf8_lossy(&done.stdout),
            String::from_utf8_lossy(&done.stderr)
        );
        Some(out)
    } else {
        assert!(
            std::env::var_os("BATON_REQUIRE_GO").is_none(),
            "BATON_REQUIRE_GO is set but `go` is missing: apt-get install {packages}"
        );
        eprintln!("skipped: no `go` (apt-get install {packages})");
        None
    };
    built.push((name.to_owned(), out.clone()));
    out
}

/// The name of the user the tests run as.
pub fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
