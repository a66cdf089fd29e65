//! Supervision: restart policies and the start limit, signals forwarded to
//! the serving generation, `baton signal`, `--log-prefix`, `--watch`.

use crate::support;

use support::{Baton, LONG, get, pid_gone, wait_until};

/// An app that reports ready, serves nothing, and exits with `code` after
/// `after` seconds.
fn exits_after(after: &str, code: u8) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("systemd-notify --ready; sleep {after}; exit {code}"),
    ]
}

#[test]
fn restart_never_exits_with_the_apps_status() {
    if !support::peer("systemd-notify", "systemd") {
        return;
    }
    let mut b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--restart", "never"])
        .command(exits_after("0.2", 3))
        .start();
    b.wait_for_event("ready", 1);
    assert_eq!(b.wait_exit(LONG).code(), Some(3), "{}", b.dump());
    assert_eq!(b.count_events("spawn"), 1);
}

#[test]
fn restart_on_failure_stops_after_a_clean_exit() {
    if !support::peer("systemd-notify", "systemd") {
        return;
    }
    let mut b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0"])
        .command(exits_after("0.2", 0))
        .start();
    b.wait_for_event("ready", 1);
    assert_eq!(b.wait_exit(LONG).code(), Some(0), "{}", b.dump());
    assert_eq!(b.count_events("spawn"), 1);
}

#[test]
fn restart_always_restarts_a_clean_exit_and_the_start_limit_ends_a_crash_loop() {
    if !support::peer("systemd-notify", "systemd") {
        return;
    }
    let mut b = Baton::builder()
        .run_args([
            "--listen",
            "127.0.0.1:0",
            "--restart",
            "always",
            "--restart-delay",
            "50ms",
            "--start-limit",
            "3/1m",
        ])
        .command(exits_after("0.1", 0))
        .start();
    b.wait_for_event("ready", 4);
    let status = b.wait_exit(LONG);
    assert_eq!(status.code(), Some(1), "{}", b.dump());
    let line = b.wait_for("the start limit", |l| l.contains("start limit hit"), LONG);
    assert!(line.contains("3 restarts within 1m"), "{line}");
    assert_eq!(
        b.count_events("spawn"),
        4,
        "the first start and three restarts"
    );
}

#[test]
fn signals_are_forwarded_to_the_serving_generation_and_baton_signal_works() {
    let b = Baton::serving(&[], &[]);
    let pid = b.gen_pid(1);
    b.signal(rustix::process::Signal::USR1);
    let got = format!("pid {pid} got SIGUSR1");
    b.wait_for("SIGUSR1 forwarded", |l| l.contains(&got), LONG);
    let out = b.ctl(&["signal", "USR1"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!("generation 1 (pid {pid})")),
        "{out:?}"
    );
    wait_until("two SIGUSR1 seen", LONG, || {
        b.lines().iter().filter(|l| l.contains(&got)).count() == 2
    });
    // Neither was a reload.
    assert_eq!(b.count_events("spawn"), 1);
}

#[test]
fn log_prefix_tags_the_apps_lines_with_its_generation() {
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--log-prefix", "--name", "probe"])
        .start();
    b.wait_for_event("ready", 1);
    let pid = b.gen_pid(1);
    let port = b.port();
    std::thread::spawn(move || get(port, "/slow?ms=1", LONG));
    let line = b.wait_for(
        "a prefixed line",
        |l| l.contains("started a 1 ms request"),
        LONG,
    );
    assert!(line.starts_with("[probe gen 1] demo-app: pid "), "{line}");
    assert!(line.contains(&pid.to_string()));
}

#[test]
fn log_prefix_copies_bytes_that_are_not_text_and_cuts_endless_lines() {
    // Not UTF-8, then a 200 000-byte line: before, the first stopped the
    // copy (and, the pipe full, the app), the second was held whole.
    let script = format!(
        "printf 'bad \\377\\376 bytes\\n' >&2; head -c 200000 /dev/zero | tr '\\0' x >&2; \
         printf '\\nafter\\n' >&2; exec {} demo-app --listen 127.0.0.1:0",
        support::exe()
    );
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--log-prefix", "--name", "probe"])
        .command(["/bin/sh", "-c", &script])
        .start();
    b.wait_for("the line after", |l| l == "[probe gen 1] after", LONG);
    let lines = b.lines();
    assert!(
        lines.iter().any(|l| l.starts_with("[probe gen 1] bad ")),
        "{}",
        b.dump()
    );
    let pieces: Vec<usize> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("[probe gen 1] "))
        .filter(|l| l.starts_with("xxx"))
        .map(str::len)
        .collect();
    assert_eq!(
        pieces,
        [65536, 65536, 65536, 200_000 - 3 * 65536],
        "{pieces:?}"
    );
    b.wait_for_event("ready", 1);
}

#[test]
fn a_replaced_binary_is_deployed_and_a_broken_one_rolled_back() {
    let builder = Baton::builder();
    let app = builder.dir().join("app");
    let write_app = |body: &str| {
        // Deploy by copy: write aside, then rename over the watched file.
        let tmp = app.with_extension("new");
        std::fs::write(&tmp, body).expect("write");
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        std::fs::rename(&tmp, &app).expect("rename");
    };
    let good = format!("#!/bin/sh\nexec {} demo-app\n", support::exe());
    write_app(&good);
    let b = builder
        .run_args(["--listen", "127.0.0.1:0", "--watch"])
        .run_args([app.clone()])
        .command([app.clone()])
        .start();
    b.wait_for_event("ready", 1);
    let old = b.gen_pid(1);

    write_app(&format!("{good}# version 2\n"));
    let reload = b.wait_for_event("reload", 2);
    assert!(reload.contains("trigger=watch"), "{reload}");
    b.wait_for_event("ready", 2);
    wait_until("the old generation retired", LONG, || pid_gone(old));

    write_app("#!/bin/sh\necho broken >&2\nexit 9\n");
    b.wait_for_event("rollback", 3);
    assert_eq!(b.status_json()["reloads_failed"], 1);
    assert_eq!(
        get(b.port(), "/", LONG).expect("still serving").generation,
        Some(2)
    );
}

#[test]
fn log_file_takes_the_output_rotates_it_and_the_keeper_writes_it_when_baton_is_gone() {
    let builder = Baton::builder();
    let dir = builder.dir().to_owned();
    let log = dir.join("app.log");
    let numbered = |n: u32| dir.join(format!("app.log.{n}"));
    // 300 lines of 10 bytes at start: 3 000 bytes through a 1 KiB file
    // that keeps 2 rotated ones.
    let script = format!(
        "i=100; while [ $i -lt 400 ]; do echo \"line $i.\"; i=$((i+1)); done; \
         exec {} demo-app --listen 127.0.0.1:0",
        support::exe()
    );
    let mut b = builder
        .run_args(["--listen", "127.0.0.1:0", "--name", "probe", "--log-file"])
        .run_args([log.display().to_string()])
        .run_args(["--log-max-size", "1K", "--log-keep", "2"])
        .command(["/bin/sh", "-c", &script])
        .start();
    b.wait_for_event("ready", 1);
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_until("the last line is written", LONG, || {
        read(&log).contains("line 399.")
    });
    assert!(!numbered(3).exists(), "2 rotated files kept");
    let (newest, older, current) = (read(&numbered(1)), read(&numbered(2)), read(&log));
    for text in [&older, &newest, &current] {
        assert!(text.len() <= 1024, "rotated at 1 KiB: {} bytes", text.len());
        assert!(
            text.lines()
                .all(|l| l.starts_with("line ") && l.ends_with('.')),
            "whole lines, no prefix: {text}"
        );
    }
    // In order across the files, the newest last.
    let all: Vec<String> = [older, newest, current]
        .concat()
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = (400 - all.len()..400)
        .map(|i| format!("line {i}."))
        .collect();
    assert_eq!(all, expected);
    assert!(
        !b.lines().iter().any(|l| l.contains("line 399.")),
        "not on baton's stderr"
    );

    // baton dies; its keeper writes what the app says from then on.
    let pid = b.gen_pid(1);
    b.signal(rustix::process::Signal::KILL);
    b.wait_exit(LONG);
    let port = b.port();
    let answer = get(port, "/slow?ms=1", LONG).expect("the app serves on");
    assert_eq!(answer.pid, Some(pid));
    wait_until("the keeper writes the app's line", LONG, || {
        read(&log).contains("started a 1 ms request")
    });
    support::send(pid, rustix::process::Signal::TERM);
}
