//! The Go/Gin example under baton: built offline with Debian's Go and
//! packaged Gin and go-systemd sources (`examples/gin-hello/build.sh`).
//! Without `go` these tests say so and pass, unless `BATON_REQUIRE_GO=1`
//! (set by `.ci/run`, which installs the packages).

use crate::support;

use std::path::PathBuf;
use std::time::Duration;

use support::{Baton, LONG, Load, get};

/// The built `gin-hello` and `gin-plain`, or `None` without Go.
fn binaries() -> Option<(PathBuf, PathBuf)> {
    let out = support::go_example("gin-hello")?;
    Some((out.join("gin-hello"), out.join("gin-plain")))
}

#[test]
fn gin_reloads_under_load_lose_no_request() {
    let Some((gin, _)) = binaries() else { return };
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .command([gin.as_os_str(), "-startup".as_ref(), "20ms".as_ref()])
        .start();
    b.wait_for_event("ready", 1);
    let load = Load::start(b.port(), 4, 50_000, Duration::from_secs(120));
    let mut pids = vec![b.gen_pid(1)];
    pids.extend(support::reload_through(&b, 2..=21, &load));
    let (ok, failures, seen) = load.finish();
    support::assert_no_failures(ok, &failures);
    assert!(pids.iter().all(|p| seen.contains(p)));
    eprintln!("{ok} requests over 21 Gin generations, none failed");
}

#[test]
fn a_slow_gin_request_finishes_across_a_reload() {
    let Some((gin, _)) = binaries() else { return };
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .command([gin.as_os_str()])
        .start();
    b.wait_for_event("ready", 1);
    let (reply, old) = support::slow_request_across_a_reload(&b, 2000);
    let reply = reply.expect("completes");
    assert_eq!((reply.status, reply.pid), (200, Some(old)));
    let exit = b.wait_for_event("exit", 1);
    assert_eq!(support::field(&exit, "status"), Some("0"), "{exit}");
}

#[test]
fn an_unmodified_gin_app_is_detected_and_the_reload_says_why_it_failed() {
    let Some((_, plain)) = binaries() else { return };
    let port = support::free_port();
    // `r.Run()` binds $PORT itself (on every interface); it never reads
    // LISTEN_FDS or notifies, hence --ready delay.
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--ready", "delay:500ms"])
        .env("PORT", port.to_string())
        .command([plain.as_os_str()])
        .start();
    b.wait_for_event("ready", 1);
    let old = b.gen_pid(1);
    assert_eq!(
        get(port, "/", LONG).expect("serves on its own port").pid,
        Some(old)
    );
    // baton notices the app listening by itself.
    let warning = b.wait_for_event("listens", 1);
    assert!(warning.contains(&format!(":{port}")), "{warning}");

    let (code, json) = b.reload_json();
    assert_eq!(code, Some(1), "{json}\n{}", b.dump());
    assert_eq!(json["reason"]["status"]["exited"], 1, "{json}");
    let message = json["message"].as_str().unwrap_or_default();
    for needle in ["address already in use", "LISTEN_FDS", "--proxy"] {
        assert!(message.contains(needle), "{needle:?} in {json}");
    }
    assert_eq!(get(port, "/", LONG).expect("still serving").pid, Some(old));
}

#[test]
fn an_unmodified_gin_app_reloads_without_failures_in_proxy_mode() {
    let Some((_, plain)) = binaries() else { return };
    // No code change: `r.Run()` binds the $PORT baton gives each generation.
    let b = Baton::builder()
        .run_args(["--proxy", "http", "--listen", "127.0.0.1:0"])
        .command([plain.as_os_str()])
        .start();
    b.wait_for_event("ready", 1);
    let load = support::KeepAlive::start(b.port(), 8, Duration::from_secs(120));
    support::reload_through(&b, 2..=11, &load);
    let tally = load.finish();
    support::assert_no_failures(tally.ok, &tally.failures);
    eprintln!(
        "{} keep-alive requests to an unmodified Gin app across 10 reloads, none failed",
        tally.ok
    );
}

#[test]
fn four_gin_workers_reload_twice_under_load_without_failures() {
    let Some((gin, _)) = binaries() else { return };
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--workers", "4"])
        .command([gin.as_os_str()])
        .start();
    b.wait_for_event("ready", 1);
    let load = Load::start(b.port(), 32, 1_000_000, Duration::from_secs(120));
    let mut met = 0;
    for n in 1..=3u64 {
        if n > 1 {
            let (code, json) = b.reload_json();
            assert_eq!(code, Some(0), "{json}");
        }
        let pids: Vec<u32> = b
            .lines()
            .iter()
            .filter(|l| {
                support::is_event(l, "spawn")
                    && support::field(l, "generation") == Some(&n.to_string())
            })
            .filter_map(|l| support::field(l, "pid")?.parse().ok())
            .collect();
        assert_eq!(pids.len(), 4, "generation {n}: {pids:?}");
        support::wait_until("clients met every worker", LONG, || {
            pids.iter().all(|p| load.has_seen(*p))
        });
        met += pids.len();
    }
    let (ok, failures, seen) = load.finish();
    support::assert_no_failures(ok, &failures);
    assert_eq!(seen.len(), met);
    eprintln!(
        "4 Gin workers, 2 reloads, 32 new-connection clients: {ok} requests, 0 failed, {} processes met",
        seen.len()
    );
}

#[test]
fn gin_keep_alive_clients_in_tcp_mode_lose_only_what_the_app_s_own_close_races() {
    let Some((_, plain)) = binaries() else { return };
    // In tcp mode a keep-alive connection stays with its generation; after
    // the drain wait the generation gets SIGTERM and Gin's Shutdown closes
    // its idle connections: the clients reconnect, to the new generation.
    // A request a client sends just as Go closes its connection is lost
    // unanswered (as it is without baton): a client may send it again, as
    // HTTP/1.1 allows for idempotent requests and as Go's http.Transport,
    // curl and browsers do. Nothing else may fail.
    let b = Baton::builder()
        .run_args(["--proxy", "tcp", "--listen", "127.0.0.1:0"])
        .run_args(["--drain-wait", "1s"])
        .command([plain.as_os_str()])
        .start();
    b.wait_for_event("ready", 1);
    let clients = 8;
    let load = support::KeepAlive::start(b.port(), clients, Duration::from_secs(120));
    let pids = support::reload_through(&b, 2..=4, &load);
    for generation in 1..=3 {
        b.wait_for_event("exit", generation);
    }
    support::wait_until("the clients meet the last generation", LONG, || {
        pids.iter().all(|p| load.has_seen(*p))
    });
    let tally = load.finish();
    let unanswered = "empty reply (on a reused connection)";
    assert!(
        tally.failures.iter().all(|f| f == unanswered),
        "{:?}",
        &tally.failures[..tally.failures.len().min(10)]
    );
    assert!(
        tally.failures.len() <= clients * 3,
        "at most one per connection the app closed: {}",
        tally.failures.len()
    );
    eprintln!(
        "tcp mode, Gin closing idle connections at SIGTERM: {} keep-alive requests on {} connections \
         across 3 reloads; {} sent as Go closed their connection went unanswered, nothing else failed",
        tally.ok,
        tally.connections,
        tally.failures.len()
    );
}

#[test]
fn the_supervisord_program_translated_runs_as_written_and_reloads_under_load() {
    let Some((_, plain)) = binaries() else { return };
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/supervisord/gin-app.toml");
    let text = std::fs::read_to_string(&example).expect("the example");
    let builder = Baton::builder();
    let dir = builder.dir().to_owned();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let log = dir.join("gin-app.log");
    // Its paths pointed here; the app says what it was given, then runs.
    let probe = format!(
        "\"/bin/sh\", \"-c\", \"echo GIN_MODE=$GIN_MODE pwd=$(pwd) user=$(id -un); exec {}\"",
        plain.display()
    );
    let root = rustix::process::geteuid().is_root();
    let mut config = text
        .replace("\"/path/to/your/gin-app\"", &probe)
        .replace("/path/to/your/app", &dir.display().to_string())
        .replace("/var/log/gin-app.log", &log.display().to_string())
        .replace("\"http=:8080\"", "\"http=127.0.0.1:0\"");
    if !root {
        // Only root can run the app as another user.
        config = config
            .lines()
            .filter(|l| !l.starts_with("user ="))
            .collect::<Vec<_>>()
            .join("\n");
    }
    let path = dir.join("gin-app.toml");
    std::fs::write(&path, config).expect("config");
    let b = builder
        .run_args(["--config".to_owned(), path.display().to_string()])
        .command(Vec::<String>::new())
        .start();
    b.wait_for_event("ready", 1);
    let user = if root {
        "www-data".to_owned()
    } else {
        support::whoami()
    };
    let said = format!("GIN_MODE=release pwd={} user={user}", dir.display());
    support::wait_until("the app's line in the log file", LONG, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains(&said))
    });
    let load = support::KeepAlive::start(b.port(), 8, Duration::from_secs(120));
    support::reload_through(&b, 2..=3, &load);
    let tally = load.finish();
    support::assert_no_failures(tally.ok, &tally.failures);
}
