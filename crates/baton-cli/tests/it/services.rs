//! Many services under one baton (`baton run --config-dir DIR`): start
//! order, commands that name a service, `baton update`, isolation, bad
//! directories, and the instance's metrics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// A service file running the demo app on a port of its own.
fn app(extra: &str) -> String {
    format!(
        "command = [{:?}, \"demo-app\"]\nlisten = [\"127.0.0.1:0\"]\n{extra}",
        exe()
    )
}

/// A service file for a worker without a port.
fn worker(extra: &str) -> String {
    format!("command = [\"/bin/sh\", \"-c\", \"exec sleep 600\"]\nready = \"delay:50ms\"\n{extra}")
}

/// A directory of service files.
fn services_dir(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let top = tempfile::tempdir().expect("tempdir");
    let dir = top.path().join("shop");
    std::fs::create_dir(&dir).expect("mkdir");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write");
    }
    (top, dir)
}

/// `baton status --json` of the instance: one object per service.
fn services(b: &Baton) -> Vec<Value> {
    let out = b.ctl(&["status", "--json"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
    serde_json::from_str::<Vec<Value>>(&out.stdout).expect("a JSON array")
}

/// A service's state; empty while baton does not answer yet.
fn state_of(b: &Baton, name: &str) -> String {
    let out = b.ctl(&["status", "--json"]);
    if out.code != Some(0) {
        return String::new();
    }
    serde_json::from_str::<Vec<Value>>(&out.stdout)
        .unwrap_or_default()
        .iter()
        .find(|s| s["service"] == name)
        .map(|s| s["state"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// Waits until every service named is running.
fn wait_running(b: &Baton, names: &[&str]) {
    let deadline = std::time::Instant::now() + LONG;
    while !names.iter().all(|n| state_of(b, n) == "running") {
        assert!(
            std::time::Instant::now() < deadline,
            "{names:?} not running after {LONG:?}\n{}",
            b.dump()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `baton status SVC --json` of a running service.
fn status_of(b: &Baton, name: &str) -> Value {
    let out = b.ctl(&["status", name, "--json"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
    serde_json::from_str(&out.stdout).expect("status JSON")
}

/// The pid of a running service's serving generation.
fn serving_pid(b: &Baton, name: &str) -> u32 {
    let s = status_of(b, name);
    let serving = s["serving"]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} serves: {s}\n{}", b.dump()));
    s["generations"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["generation"] == serving))
        .and_then(|g| g["pid"].as_u64())
        .expect("its pid") as u32
}

/// The port of a running service's first listener.
fn port_of(b: &Baton, name: &str) -> u16 {
    let s = status_of(b, name);
    let addr = s["listeners"][0]["addr"].as_str().expect("a listener");
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

/// `times` reloads of `name`, each once `load` has met its serving
/// generation.
fn reload_under(b: &Baton, name: &str, load: &Load, times: usize) {
    for _ in 0..times {
        let before = serving_pid(b, name);
        wait_until("the load meets the serving generation", LONG, || {
            load.has_seen(before)
        });
        let out = b.ctl(&["reload", name]);
        assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
    }
}

fn start(dir: &Path) -> Baton {
    Baton::builder().config_dir(dir).start()
}

#[test]
fn the_services_of_a_directory_start_in_order_and_are_named_by_every_command() {
    let metrics = free_port();
    let (_top, dir) = services_dir(&[
        (
            "baton.toml",
            &format!("metrics = \"127.0.0.1:{metrics}\"\n"),
        ),
        // Name order would start it first; `after` starts it once api serves.
        ("a-web.toml", &app("after = [\"api\"]\n")),
        ("api.toml", &app("")),
        (
            "worker.toml",
            "command = [\"/bin/sh\", \"-c\", \"echo worker says hello; exec sleep 600\"]\nready = \"delay:50ms\"\nlog-file = \"worker.log\"\n",
        ),
        ("spare.toml", &worker("autostart = false\n")),
    ]);
    let mut b = Baton::builder().cwd(&dir).config_dir(&dir).start();
    wait_running(&b, &["api", "a-web", "worker"]);
    // Each service's own log file (relative to where baton runs).
    wait_until("the worker's line is in its log file", LONG, || {
        std::fs::read_to_string(dir.join("worker.log"))
            .is_ok_and(|t| t.contains("worker says hello"))
    });
    assert!(
        !b.dump().contains("worker says hello"),
        "not on baton's stderr"
    );
    let all = services(&b);
    let names: Vec<&str> = all.iter().filter_map(|s| s["service"].as_str()).collect();
    assert_eq!(names, ["api", "a-web", "spare", "worker"], "{all:?}");
    assert_eq!(state_of(&b, "spare"), "not-started");
    // A second baton on the same directory is refused.
    let other = b.dir.path().join("other.sock");
    let out = run(
        &[
            "run".into(),
            "--control".into(),
            other.into_os_string(),
            "--config-dir".into(),
            dir.clone().into_os_string(),
        ],
        LONG,
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("another baton runs the services"),
        "{out:?}"
    );
    // One keeper process holds for every service.
    let keepers: std::collections::HashSet<u64> = ["api", "a-web", "worker"]
        .iter()
        .map(|n| status_of(&b, n)["keeper_pid"].as_u64().expect("a keeper"))
        .collect();
    assert_eq!(keepers.len(), 1, "{keepers:?}");
    let keeper = *keepers.iter().next().expect("one");
    let cmdline = std::fs::read(format!("/proc/{keeper}/cmdline")).expect("cmdline");
    assert!(
        cmdline.split(|c| *c == 0).any(|a| a == b"--host"),
        "{cmdline:?}"
    );
    // A worker without a port gets no socket variables.
    let env =
        std::fs::read(format!("/proc/{}/environ", serving_pid(&b, "worker"))).expect("environ");
    assert!(
        !env.split(|c| *c == 0).any(|kv| kv.starts_with(b"LISTEN_")),
        "{}",
        String::from_utf8_lossy(&env)
    );
    // a-web's first generation was spawned only once api was ready.
    let lines = b.lines();
    let api_ready = lines
        .iter()
        .position(|l| l.contains("service=\"api\"}: ready "))
        .unwrap_or_else(|| panic!("api ready\n{}", b.dump()));
    let web_spawn = lines
        .iter()
        .position(|l| l.contains("service=\"a-web\"}: spawn "))
        .unwrap_or_else(|| panic!("a-web spawn\n{}", b.dump()));
    assert!(api_ready < web_spawn, "{}", b.dump());
    // Each answers on its own port, from its own process.
    for name in ["api", "a-web"] {
        let reply = get(port_of(&b, name), "/", LONG).expect("an answer");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.pid, Some(serving_pid(&b, name)));
    }
    // Commands name a service; without one, those that need one say so.
    let out = b.ctl(&["reload", "api", "--json"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("name one (api, a-web, spare, worker)"),
        "{out:?}"
    );
    let out = b.ctl(&["reload", "nope"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("no service \"nope\"")
            && out.stderr.contains("api, a-web, spare, worker"),
        "{out:?}"
    );
    let out = b.ctl(&["status"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.lines().count(), 4, "one line each: {out:?}");
    // (WINCH: ignored by every app here.)
    let out = b.ctl(&["signal", "WINCH"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout.lines().count(),
        3,
        "every running service: {out:?}"
    );
    // Start and stop one service.
    let out = b.ctl(&["start", "spare"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(state_of(&b, "spare"), "running");
    let spare = serving_pid(&b, "spare");
    let out = b.ctl(&["start", "spare"]);
    assert_eq!(out.code, Some(1), "already running: {out:?}");
    let out = b.ctl(&["stop", "spare"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(pid_gone(spare));
    assert_eq!(state_of(&b, "spare"), "stopped");
    // A service that does not run: its object, not a list.
    let one: Value =
        serde_json::from_str(&b.ctl(&["status", "spare", "--json"]).stdout).expect("status JSON");
    assert_eq!(one["state"], "stopped", "{one}");
    // Output into a pipe nobody reads any more ends the client quietly.
    let (reader, writer) = rustix::pipe::pipe().expect("pipe");
    drop(reader);
    let piped = std::process::Command::new(exe())
        .args(["status", "--json", "--control"])
        .arg(&b.control)
        .stdout(std::process::Stdio::from(writer))
        .output()
        .expect("baton status");
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = b.ctl(&["reload", "spare"]);
    assert_eq!(out.code, Some(1), "not running: {out:?}");
    assert!(out.stderr.contains("baton start spare"), "{out:?}");
    // Metrics carry the service; each metric has one head.
    let text = get(metrics, "/metrics", LONG).expect("metrics").body;
    assert!(
        text.contains("baton_generation{service=\"api\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("baton_generation{service=\"a-web\"} 1"),
        "{text}"
    );
    assert_eq!(
        text.matches("# TYPE baton_generation gauge").count(),
        1,
        "{text}"
    );
    // Stopping the instance stops every service.
    let pids: Vec<u32> = ["api", "a-web", "worker"]
        .iter()
        .map(|n| serving_pid(&b, n))
        .collect();
    let out = b.ctl(&["stop"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(b.wait_exit(LONG).success());
    for pid in pids {
        assert!(pid_gone(pid), "{pid} outlived baton");
    }
    assert!(!b.control.exists(), "the control socket is removed");
}

#[test]
fn a_reload_of_one_service_under_load_fails_nothing_and_touches_no_other() {
    let (_top, dir) = services_dir(&[
        ("api.toml", &app("")),
        ("web.toml", &app("")),
        ("worker.toml", &worker("")),
    ]);
    let b = start(&dir);
    wait_running(&b, &["api", "web", "worker"]);
    let (web, work) = (serving_pid(&b, "web"), serving_pid(&b, "worker"));
    let load = Load::start(port_of(&b, "api"), 4, 100_000, Duration::from_secs(60));
    reload_under(&b, "api", &load, 3);
    let last = serving_pid(&b, "api");
    wait_until("the load meets the last generation", LONG, || {
        load.has_seen(last)
    });
    let (ok, failures, seen) = load.finish();
    assert_no_failures(ok, &failures);
    assert_eq!(seen.len(), 4, "every generation answered: {seen:?}");
    assert_eq!(serving_pid(&b, "web"), web, "web untouched");
    assert_eq!(serving_pid(&b, "worker"), work, "worker untouched");
    assert_eq!(status_of(&b, "web")["reloads_ok"], 0);
}

#[test]
fn update_applies_added_removed_and_changed_files_and_touches_nothing_else() {
    let (_top, dir) = services_dir(&[
        ("keep.toml", &app("")),
        ("change.toml", &app("")),
        ("gone.toml", &worker("")),
        ("moved.toml", &app("")),
    ]);
    let mut b = start(&dir);
    wait_running(&b, &["keep", "change", "gone", "moved"]);
    let keep = serving_pid(&b, "keep");
    let changed = serving_pid(&b, "change");
    let gone = serving_pid(&b, "gone");
    let moved_port = port_of(&b, "moved");
    std::fs::write(dir.join("new.toml"), worker("")).expect("write");
    std::fs::remove_file(dir.join("gone.toml")).expect("rm");
    std::fs::write(
        dir.join("change.toml"),
        app("env = { FLAVOUR = \"two\" }\nstop-timeout = \"7s\"\n"),
    )
    .expect("write");
    // A change of proxy mode: a graceful restart, on the same port.
    std::fs::write(
        dir.join("moved.toml"),
        format!(
            "command = [{:?}, \"demo-app\", \"--listen\", \"127.0.0.1:{{port}}\"]\nlisten = [\"127.0.0.1:{moved_port}\"]\nproxy = \"http\"\n",
            exe()
        ),
    )
    .expect("write");
    let out = b.ctl(&["update", "--json"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
    let changes: Vec<Value> = serde_json::from_str(&out.stdout).expect("JSON");
    let action = |name: &str| {
        changes.iter().find(|c| c["service"] == name).map(|c| {
            (
                c["action"].as_str().unwrap_or_default().to_owned(),
                c["ok"] == true,
            )
        })
    };
    assert_eq!(action("new"), Some(("started".into(), true)), "{changes:?}");
    assert_eq!(
        action("gone"),
        Some(("stopped".into(), true)),
        "{changes:?}"
    );
    assert_eq!(
        action("change"),
        Some(("reloaded".into(), true)),
        "{changes:?}"
    );
    assert_eq!(
        action("moved"),
        Some(("restarted".into(), true)),
        "{changes:?}"
    );
    assert_eq!(action("keep"), None, "{changes:?}");
    assert_eq!(changes.len(), 4, "{changes:?}");
    assert_eq!(serving_pid(&b, "keep"), keep, "keep untouched");
    assert!(pid_gone(gone));
    assert!(services(&b).iter().all(|s| s["service"] != "gone"));
    assert_ne!(serving_pid(&b, "change"), changed);
    let env =
        std::fs::read(format!("/proc/{}/environ", serving_pid(&b, "change"))).expect("environ");
    assert!(
        env.split(|c| *c == 0).any(|kv| kv == b"FLAVOUR=two"),
        "the new env"
    );
    assert_eq!(state_of(&b, "new"), "running");
    assert_eq!(
        status_of(&b, "moved")["listeners"][0]["addr"],
        format!("127.0.0.1:{moved_port}")
    );
    let reply = get(moved_port, "/", LONG).expect("through the proxy");
    assert_eq!(reply.status, 200);
    // Nothing changed: nothing done.
    let out = b.ctl(&["update"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("nothing changed"), "{out:?}");
    // A file that cannot be used is skipped and named; its service (and
    // every other) is left as it was.
    std::fs::write(dir.join("keep.toml"), app("workers = \"lots\"\n")).expect("write");
    let out = b.ctl(&["update"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("keep.toml:3: workers"), "{out:?}");
    assert_eq!(serving_pid(&b, "keep"), keep, "keep untouched");
    // A reload that rolls back keeps the previous settings.
    let before = serving_pid(&b, "change");
    std::fs::write(
        dir.join("change.toml"),
        format!(
            "command = [{:?}, \"demo-app\", \"--exit-before-ready\", \"3\"]\nlisten = [\"127.0.0.1:0\"]\n",
            exe()
        ),
    )
    .expect("write");
    std::fs::write(dir.join("keep.toml"), app("")).expect("write");
    let out = b.ctl(&["update"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("change: reloaded:"), "{out:?}");
    assert_eq!(serving_pid(&b, "change"), before);
    let command = status_of(&b, "change")["command"].clone();
    assert!(
        !command.to_string().contains("exit-before-ready"),
        "{command}"
    );
    // SIGHUP is an update.
    std::fs::write(dir.join("late.toml"), worker("")).expect("write");
    b.signal(rustix::process::Signal::HUP);
    wait_running(&b, &["late"]);
    let out = b.ctl(&["stop"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(b.wait_exit(LONG).success());
}

#[test]
fn one_service_that_fails_leaves_the_others_alone() {
    let (_top, dir) = services_dir(&[
        ("api.toml", &app("")),
        (
            "broken.toml",
            "command = [\"/bin/sh\", \"-c\", \"exit 3\"]\n",
        ),
        (
            "flaky.toml",
            "command = [\"/bin/sh\", \"-c\", \"sleep 0.2; exit 1\"]\nready = \"delay:50ms\"\nrestart = \"always\"\nrestart-delay = \"10ms\"\nstart-limit = \"1000/1s\"\n",
        ),
    ]);
    let b = start(&dir);
    wait_running(&b, &["api"]);
    let api = serving_pid(&b, "api");
    wait_until("broken fails", LONG, || state_of(&b, "broken") == "failed");
    wait_until("flaky restarts a few times", LONG, || {
        state_of(&b, "flaky") == "running" && status_of(&b, "flaky")["restarts"].as_u64() >= Some(3)
    });
    let all = services(&b);
    let broken = all
        .iter()
        .find(|s| s["service"] == "broken")
        .expect("broken");
    assert!(
        broken["exit_code"].as_u64().is_some_and(|c| c != 0),
        "{broken}"
    );
    let out = b.ctl(&["start", "broken"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("never served"), "{out:?}");
    assert_eq!(serving_pid(&b, "api"), api, "api untouched");
    assert_eq!(status_of(&b, "api")["restarts"], 0);
}

#[test]
fn bad_directories_are_refused_naming_the_file() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("api.toml", "command = [\"x\"]\nmetrics = \":9\"\n")],
            "api.toml:2: metrics: belongs to the whole instance",
        ),
        (
            &[
                ("api.toml", "command = [\"x\"]\nlisten = [\":18123\"]\n"),
                (
                    "web.toml",
                    "command = [\"x\"]\nlisten = [\"127.0.0.1:18123\"]\n",
                ),
            ],
            "both listen on port 18123",
        ),
        (
            &[("a b.toml", "command = [\"x\"]\n")],
            "invalid name \"a b\"",
        ),
        (
            &[("api.toml", "command = [\"x\"]\nready-timeout = \"soon\"\n")],
            "api.toml:2: ready-timeout",
        ),
        (
            &[
                ("a.toml", "command = [\"x\"]\nafter = [\"b\"]\n"),
                ("b.toml", "command = [\"x\"]\nafter = [\"a\"]\n"),
            ],
            "in a circle",
        ),
        (
            &[
                ("api.toml", "command = [\"x\"]\n"),
                ("baton.toml", "user = \"nobody\"\n"),
            ],
            "baton.toml:1: user",
        ),
    ];
    for (files, expected) in cases {
        let (_top, dir) = services_dir(files);
        let out = run(
            &[
                "run".into(),
                "--config-dir".into(),
                dir.clone().into_os_string(),
            ],
            LONG,
        );
        assert_eq!(out.code, Some(2), "{files:?}: {out:?}");
        assert!(out.stderr.contains(expected), "{files:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "one line: {out:?}");
    }
}

#[test]
fn the_services_example_runs_as_written() {
    // examples/services as a newcomer runs it, its ports moved to free ones.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/services");
    let top = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(top.path().join("services")).expect("mkdir");
    let ports: Vec<(String, String)> = ["8081", "8082", "9100"]
        .iter()
        .map(|p| (format!(":{p}\""), format!(":{}\"", free_port())))
        .collect();
    for file in [
        "app.py",
        "worker.sh",
        "services/baton.toml",
        "services/api.toml",
        "services/web.toml",
        "services/worker.toml",
    ] {
        let mut text = std::fs::read_to_string(example.join(file)).expect("example file");
        for (from, to) in &ports {
            text = text.replace(from, to);
        }
        std::fs::write(top.path().join(file), text).expect("write");
        let mode = std::fs::metadata(example.join(file))
            .expect("meta")
            .permissions();
        std::fs::set_permissions(top.path().join(file), mode).expect("chmod");
    }
    let mut b = Baton::builder()
        .cwd(top.path())
        .config_dir(Path::new("services"))
        .start();
    wait_running(&b, &["api", "web", "worker"]);
    for (name, greeting) in [("api", "api from pid"), ("web", "web from pid")] {
        let reply = get(port_of(&b, name), "/", LONG).expect("an answer");
        assert!(reply.body.starts_with(greeting), "{reply:?}");
    }
    let (web, worker) = (serving_pid(&b, "web"), serving_pid(&b, "worker"));
    let load = Load::start(port_of(&b, "api"), 4, 100_000, Duration::from_secs(60));
    reload_under(&b, "api", &load, 2);
    let (ok, failures, _) = load.finish();
    assert_no_failures(ok, &failures);
    assert_eq!(
        (serving_pid(&b, "web"), serving_pid(&b, "worker")),
        (web, worker)
    );
    let web_file = top.path().join("services/web.toml");
    let text = std::fs::read_to_string(&web_file).expect("read");
    std::fs::write(&web_file, format!("{text}stop-timeout = \"10s\"\n")).expect("write");
    let out = b.ctl(&["update"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("web: reloaded:"), "{out:?}");
    let out = b.ctl(&["stop"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(b.wait_exit(LONG).success());
    assert!(pid_gone(worker));
}

#[test]
fn a_killed_baton_s_services_are_adopted_by_the_next_one() {
    // One on a port of its own, one on port 0 (any port: the one it got
    // is taken back).
    let api_file = app("").replace(":0\"", &format!(":{}\"", free_port()));
    let (_top, dir) = services_dir(&[
        ("api.toml", &api_file),
        ("any.toml", &app("")),
        ("worker.toml", &worker("")),
    ]);
    let mut first = start(&dir);
    wait_running(&first, &["api", "any", "worker"]);
    let (any, any_port) = (serving_pid(&first, "any"), port_of(&first, "any"));
    let (api, work, port) = (
        serving_pid(&first, "api"),
        serving_pid(&first, "worker"),
        port_of(&first, "api"),
    );
    let load = Load::start(port, 2, 100_000, Duration::from_secs(60));
    wait_until("the load meets api", LONG, || load.has_seen(api));
    let keeper = status_of(&first, "api")["keeper_pid"]
        .as_u64()
        .expect("a keeper") as u32;
    first.signal(rustix::process::Signal::KILL);
    first.wait_exit(LONG);
    let second = Baton::builder()
        .control(&first.control)
        .config_dir(&dir)
        .start();
    wait_running(&second, &["api", "any", "worker"]);
    assert_eq!(
        serving_pid(&second, "any"),
        any,
        "adopted, not started again"
    );
    assert_eq!(port_of(&second, "any"), any_port);
    assert_eq!(get(any_port, "/", LONG).expect("served").pid, Some(any));
    assert_eq!(
        serving_pid(&second, "api"),
        api,
        "adopted, not started again"
    );
    assert_eq!(
        serving_pid(&second, "worker"),
        work,
        "adopted, not started again"
    );
    for name in ["api", "worker"] {
        assert!(status_of(&second, name)["adopted_from"].as_u64().is_some());
    }
    // The dead baton's keeper handed everything over, and went.
    wait_until("the old keeper exits", LONG, || pid_gone(keeper));
    assert_ne!(status_of(&second, "api")["keeper_pid"], keeper);
    let out = second.ctl(&["reload", "api"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", second.dump());
    let new = serving_pid(&second, "api");
    wait_until("the load meets the new api", LONG, || load.has_seen(new));
    let (ok, failures, _) = load.finish();
    assert_no_failures(ok, &failures);
    assert!(pid_gone(api), "the adopted generation was retired");
}

#[test]
fn update_carries_new_listeners_by_a_reload_and_closes_those_no_longer_named() {
    let (p1, p2) = (free_port(), free_port());
    let listen = |ports: &[u16]| {
        let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        format!(
            "command = [{:?}, \"demo-app\"]\nlisten = [{}]\n",
            exe(),
            list.join(", ")
        )
    };
    let (_top, dir) = services_dir(&[("api.toml", &listen(&[p1]))]);
    let b = start(&dir);
    wait_running(&b, &["api"]);
    let load = Load::start(p1, 4, 100_000, Duration::from_secs(60));
    wait_until("the load meets api", LONG, || {
        load.has_seen(serving_pid(&b, "api"))
    });
    // A listener added: bound now, the port already served stays open.
    std::fs::write(dir.join("api.toml"), listen(&[p1, p2])).expect("write");
    let out = b.ctl(&["update"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
    assert!(out.stdout.starts_with("api: reloaded:"), "{out:?}");
    let second = serving_pid(&b, "api");
    wait_until("the load meets the new generation", LONG, || {
        load.has_seen(second)
    });
    let (ok, failures, _) = load.finish();
    assert_no_failures(ok, &failures);
    for port in [p1, p2] {
        assert_eq!(get(port, "/", LONG).expect("served").pid, Some(second));
    }
    // A listener no longer named: closed once no generation has it.
    let load = Load::start(p2, 2, 100_000, Duration::from_secs(60));
    std::fs::write(dir.join("api.toml"), listen(&[p2])).expect("write");
    let out = b.ctl(&["update"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
    assert!(
        pid_gone(second) || {
            wait_until("the old generation exits", LONG, || pid_gone(second));
            true
        }
    );
    let third = serving_pid(&b, "api");
    wait_until("the load meets the third generation", LONG, || {
        load.has_seen(third)
    });
    let (ok, failures, _) = load.finish();
    assert_no_failures(ok, &failures);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", p1)).is_err(),
        "{p1} is closed"
    );
    let addrs: Vec<Value> = status_of(&b, "api")["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| l["addr"].clone())
        .collect();
    assert_eq!(addrs, [Value::from(format!("127.0.0.1:{p2}"))]);
    // New listeners with a release that fails: rolled back, the listeners
    // of before stay, the new one is closed again.
    let p3 = free_port();
    let failing = listen(&[p2, p3]).replace(
        "\"demo-app\"",
        "\"demo-app\", \"--exit-before-ready\", \"3\"",
    );
    std::fs::write(dir.join("api.toml"), failing).expect("write");
    let out = b.ctl(&["update"]);
    assert_eq!(out.code, Some(1), "{out:?}\n{}", b.dump());
    assert_eq!(serving_pid(&b, "api"), third);
    wait_until("the new listener is closed again", LONG, || {
        std::net::TcpStream::connect(("127.0.0.1", p3)).is_err()
    });
    assert_eq!(get(p2, "/", LONG).expect("served").pid, Some(third));
    let out = b.ctl(&["reload", "api"]);
    assert_eq!(out.code, Some(0), "the previous settings are back: {out:?}");
    let listeners = status_of(&b, "api")["listeners"]
        .as_array()
        .expect("listeners")
        .len();
    assert_eq!(listeners, 1);
}

#[test]
fn an_instance_of_several_services_is_upgraded_in_place_under_load() {
    let proxied = format!(
        "command = [{:?}, \"demo-app\", \"--listen\", \"127.0.0.1:{{port}}\"]\nlisten = [\"127.0.0.1:0\"]\nproxy = \"http\"\n",
        exe()
    );
    let (top, dir) = services_dir(&[
        ("api.toml", &app("")),
        ("web.toml", &proxied),
        ("worker.toml", &worker("")),
        ("spare.toml", &worker("autostart = false\n")),
    ]);
    let b = start(&dir);
    wait_running(&b, &["api", "web", "worker"]);
    let names = ["api", "web", "worker"];
    let pids: Vec<u32> = names.iter().map(|n| serving_pid(&b, n)).collect();
    let api = Load::start(port_of(&b, "api"), 4, 1_000_000, Duration::from_secs(120));
    let web = Load::start(port_of(&b, "web"), 4, 1_000_000, Duration::from_secs(120));
    wait_until("both loads answered", LONG, || {
        api.has_seen(pids[0]) && web.has_seen(pids[1])
    });
    let binary = top.path().join("baton-next");
    std::fs::copy(exe(), &binary).expect("copy baton");
    for _ in 0..3 {
        let out = b.ctl(&[
            "upgrade",
            "--binary",
            binary.to_str().expect("utf-8"),
            "--json",
        ]);
        assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
        let answer: Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
        assert_eq!(answer["pid"], b.pid(), "{answer}");
        let now: Vec<u32> = names.iter().map(|n| serving_pid(&b, n)).collect();
        assert_eq!(now, pids, "nothing restarted");
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", b.pid())).expect("exe"),
        binary
    );
    let (ok, failures, _) = api.finish();
    assert_no_failures(ok, &failures);
    let (ok, failures, _) = web.finish();
    assert_no_failures(ok, &failures);
    // The new image goes on as the old one would.
    assert_eq!(state_of(&b, "spare"), "not-started");
    let out = b.ctl(&["reload", "web"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
    let out = b.ctl(&["update"]);
    assert!(out.stdout.contains("nothing changed"), "{out:?}");
    std::fs::write(dir.join("late.toml"), worker("")).expect("write");
    let out = b.ctl(&["update"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
    assert_eq!(status_of(&b, "api")["upgrades"], 3);
    assert_eq!(serving_pid(&b, "worker"), pids[2]);
}

#[test]
fn a_restart_that_cannot_start_leaves_the_service_serving_and_keeps_its_sockets() {
    let port = free_port();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = busy.local_addr().expect("addr").port();
    let file = |extra: &str| {
        format!(
            "command = [{:?}, \"demo-app\"]\nlisten = [\"localhost:{port}\"{extra}]\n",
            exe()
        )
    };
    let (top, dir) = services_dir(&[("api.toml", &file(""))]);
    let b = start(&dir);
    wait_running(&b, &["api"]);
    let first = serving_pid(&b, "api");
    let load = Load::start(port, 4, 1_000_000, Duration::from_secs(60));
    wait_until("the load meets api", LONG, || load.has_seen(first));
    // Changes a reload cannot carry, that cannot start: refused before
    // anything stops.
    let log = top.path().join("api.log");
    let bad = [
        format!("{}log-file = \"/nonexistent/dir/api.log\"\n", file("")),
        format!(
            "{}log-file = {log:?}\n",
            file(&format!(", \"127.0.0.1:{busy}\""))
        ),
        format!("{}watch = \"/nonexistent\"\n", file("")),
    ];
    for text in &bad {
        std::fs::write(dir.join("api.toml"), text).expect("write");
        let out = b.ctl(&["update"]);
        assert_eq!(out.code, Some(1), "{text}: {out:?}");
        assert!(out.stderr.contains("left as it was"), "{out:?}");
        assert_eq!(serving_pid(&b, "api"), first, "untouched");
    }
    // One that can: a graceful restart on the same sockets (a host name's
    // too), nothing refused.
    std::fs::write(
        dir.join("api.toml"),
        format!("{}log-file = {log:?}\n", file("")),
    )
    .expect("write");
    let out = b.ctl(&["update"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
    assert!(out.stdout.contains("api: restarted:"), "{out:?}");
    let second = serving_pid(&b, "api");
    assert_ne!(second, first);
    wait_until("the load meets the restarted api", LONG, || {
        load.has_seen(second)
    });
    let (ok, failures, _) = load.finish();
    assert_no_failures(ok, &failures);
    // Its port moved to another service in one update: the new one
    // starts once the old one has let the port go.
    std::fs::remove_file(dir.join("api.toml")).expect("rm");
    std::fs::write(dir.join("next.toml"), file("")).expect("write");
    let out = b.ctl(&["update"]);
    assert_eq!(out.code, Some(0), "{out:?}\n{}", b.dump());
    assert!(out.stdout.contains("next: started"), "{out:?}");
    assert_eq!(
        get(port, "/", LONG).expect("served").pid,
        Some(serving_pid(&b, "next"))
    );
    // One update at a time: another while one is under way is refused.
    std::fs::write(
        dir.join("next.toml"),
        file("").replace("\"demo-app\"", "\"demo-app\", \"--startup\", \"2s\""),
    )
    .expect("write");
    let control = b.control.clone();
    let first = std::thread::spawn(move || {
        run(&["update".into(), "--control".into(), control.into()], LONG)
    });
    wait_until("the reload is under way", LONG, || {
        status_of(&b, "next")["starting"].as_u64().is_some()
    });
    let out = b.ctl(&["update"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("an update is under way"), "{out:?}");
    let out = first.join().expect("first update");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("next: reloaded"), "{out:?}");
}
