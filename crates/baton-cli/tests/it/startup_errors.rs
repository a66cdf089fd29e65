//! Bad input gets one clear line and exit code 2, before anything starts.

use crate::support;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;

use support::{Baton, baton};

fn assert_startup_error(out: &support::Output, needle: &str) {
    assert_eq!(out.code, Some(2), "exit code; stderr: {}", out.stderr);
    assert!(
        out.stderr.contains(needle),
        "stderr should mention {needle:?}: {}",
        out.stderr
    );
}

#[test]
fn bad_listen_address() {
    let out = baton(&["run", "--listen", "8o80", "--", "true"]);
    assert_startup_error(
        &out,
        "invalid listen address \"8o80\": expected HOST:PORT, :PORT or unix:PATH",
    );
}

#[test]
fn bad_duration_and_signal_and_ready_mode() {
    let out = baton(&[
        "run",
        "--listen",
        ":0",
        "--ready-timeout",
        "5x",
        "--",
        "true",
    ]);
    assert_startup_error(&out, "invalid duration \"5x\"");
    let out = baton(&[
        "run",
        "--listen",
        ":0",
        "--stop-signal",
        "TERMINATE",
        "--",
        "true",
    ]);
    assert_startup_error(&out, "invalid signal \"TERMINATE\"");
    let out = baton(&["run", "--listen", ":0", "--ready", "http", "--", "true"]);
    assert_startup_error(&out, "invalid readiness mode \"http\"");
    let out = baton(&["run", "--listen", ":0", "--orphans", "maybe", "--", "true"]);
    assert_startup_error(&out, "invalid value 'maybe' for '--orphans <WHAT>'");
}

#[test]
fn port_in_use_names_the_address_and_starts_nothing() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("started");
    let control = dir.path().join("control.sock");
    let script = format!("touch {}", marker.display());
    let out = baton(&[
        "run",
        "--listen",
        &addr,
        "--control",
        control.to_str().expect("utf-8"),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_startup_error(&out, &format!("binding {addr}: "));
    assert!(out.stderr.contains("in use"), "{}", out.stderr);
    assert!(
        out.stderr.contains("--listen 127.0.0.1:0"),
        "hint: {}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    assert!(!marker.exists(), "the command must not have run");
    assert!(!control.exists(), "the control socket must be cleaned up");
}

#[test]
fn missing_or_non_executable_command() {
    let out = baton(&["run", "--listen", "127.0.0.1:0", "--", "/nonexistent/app"]);
    assert_startup_error(&out, "command \"/nonexistent/app\" not found");

    let out = baton(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--",
        "no-such-command-baton-test",
    ]);
    assert_startup_error(
        &out,
        "command \"no-such-command-baton-test\" not found in $PATH",
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("app");
    std::fs::write(&file, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = baton(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--",
        file.to_str().expect("utf-8"),
    ]);
    // As root, access(X_OK) on a 0644 file still fails: no execute bit at all.
    assert_startup_error(&out, "is not executable");
}

#[test]
fn a_second_baton_on_the_same_control_socket_is_refused() {
    let first = Baton::serving(&[], &[]);
    let control = first.control.to_str().expect("utf-8").to_owned();
    let out = baton(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--control",
        &control,
        "--",
        "true",
    ]);
    assert_startup_error(&out, "is in use by another running baton");
    // The first one still answers.
    let reply = support::get(first.port(), "/", support::LONG).expect("first baton serves");
    assert_eq!(reply.status, 200);
}

#[test]
fn control_commands_without_a_running_baton() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("nobody.sock");
    let out = baton(&["reload", "--control", control.to_str().expect("utf-8")]);
    assert_startup_error(&out, "no baton is running at");
}

#[test]
fn nothing_to_listen_on_and_no_command() {
    let out = baton(&["run", "--", "true"]);
    assert_startup_error(&out, "nothing to listen on: give --listen ADDR");
    let out = baton(&["run", "--listen", "127.0.0.1:0"]);
    assert_startup_error(&out, "no command given");
    let out = baton(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--restart",
        "sometimes",
        "--",
        "true",
    ]);
    assert_startup_error(&out, "invalid restart policy \"sometimes\"");
    let out = baton(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--watch",
        "/nonexistent/app",
        "--",
        "true",
    ]);
    assert_startup_error(&out, "--watch /nonexistent/app");
}

#[test]
fn proxy_options_need_proxy_mode_and_exclude_other_readiness() {
    let out = baton(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--health",
        "tcp",
        "--",
        "true",
    ]);
    assert_startup_error(&out, "need --proxy http|tcp");
    let out = baton(&[
        "run",
        "--proxy",
        "http",
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "delay:1s",
        "--",
        "true",
    ]);
    assert_startup_error(&out, "do not apply with --proxy");
    let out = baton(&[
        "run",
        "--proxy",
        "http",
        "--listen",
        "127.0.0.1:0",
        "--health",
        "http",
        "--",
        "true",
    ]);
    assert_startup_error(
        &out,
        "invalid health check \"http\": expected tcp or http:/PATH",
    );
    for flag in ["--keep-underscore-headers", "--close-after-body"] {
        let out = baton(&["run", "--listen", "127.0.0.1:0", flag, "--", "true"]);
        assert_startup_error(&out, "need --proxy http|tcp");
        let out = baton(&[
            "run",
            "--proxy",
            "tcp",
            "--listen",
            "127.0.0.1:0",
            flag,
            "--",
            "true",
        ]);
        assert_startup_error(&out, "apply to --proxy http only");
    }
}

#[test]
fn huge_durations_and_connection_caps_are_refused_at_parse_time() {
    // Every duration has a maximum (24h): values that would overflow a
    // clock (they used to panic at start or at the first reload) are one
    // clear line and exit 2.
    for flag in ["--ready-timeout", "--stop-timeout", "--restart-delay"] {
        let out = baton(&[
            "run",
            "--listen",
            "127.0.0.1:0",
            flag,
            "18446744073709551615s",
            "--",
            "true",
        ]);
        assert_startup_error(&out, "the longest accepted is 24h");
    }
    let cases: &[(&[&str], &str)] = &[
        (
            &["--proxy", "http", "--header-timeout", "0s"],
            "must be longer than 0",
        ),
        (
            &["--proxy", "http", "--idle-timeout", "25h"],
            "the longest accepted is 24h",
        ),
        (&["--proxy", "http", "--max-connections", "0"], "at least 1"),
        (
            &["--proxy", "http", "--max-connections", "100000000"],
            "raise the limit",
        ),
        (&["--header-timeout", "5s"], "need --proxy http|tcp"),
        (&["--max-connections", "10"], "need --proxy http|tcp"),
        (
            &["--proxy", "tcp", "--upstream-timeout", "5s"],
            "apply to --proxy http only",
        ),
        (&["--proxy", "http", "--proxy-threads", "0"], "1 to 1024"),
        (
            &["--proxy", "tcp", "--upstream-protocol", "h2c"],
            "apply to --proxy http only",
        ),
        (&["--upstream-protocol", "h2c"], "need --proxy http|tcp"),
        (&["--drain-wait", "1s"], "need --proxy http|tcp"),
        (
            &["--proxy", "http", "--drain-wait", "1m"],
            "must not exceed --stop-timeout",
        ),
        (
            &[
                "--proxy",
                "http",
                "--upstream-protocol",
                "h2c",
                "--health",
                "http:/",
            ],
            "use --health tcp",
        ),
        (&["--env", "LISTEN_FDS=3"], "set by baton"),
        (&["--env", "1X=a"], "letters, digits and _"),
        (&["--env", "NOEQUALS"], "expected NAME=VALUE"),
        (&["--proxy", "http", "--env", "PORT=80"], "private port"),
        (&["--log-keep", "3"], "give --log-file"),
        (
            &["--log-file", "/nonexistent/dir/app.log"],
            "/nonexistent/dir/app.log",
        ),
        (
            &["--log-file", "/tmp/x.log", "--log-max-size", "10"],
            "at least 1K",
        ),
        (
            &["--log-file", "/tmp/x.log", "--log-keep", "5000"],
            "at most 1000",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["run", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "true"]);
        let out = baton(&all);
        assert_startup_error(&out, needle);
    }
}

#[test]
fn a_directory_where_a_socket_file_belongs_gets_advice_that_fits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8");
    let out = baton(&["run", "--listen", &format!("unix:{d}"), "--", "true"]);
    assert_startup_error(
        &out,
        "it is a directory; give the path of a socket file in it",
    );
    let out = baton(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--control",
        d,
        "--",
        "true",
    ]);
    assert_startup_error(
        &out,
        "it is a directory; --control takes the path of a socket file",
    );
}

#[test]
fn a_mistyped_option_is_a_usage_error_not_the_command() {
    let out = baton(&["run", "--lisen", "127.0.0.1:0", "--", "true"]);
    assert_startup_error(&out, "unexpected argument '--lisen'");
    assert!(out.stderr.contains("--listen"), "{}", out.stderr);
}

#[test]
fn canary_and_error_rate_need_a_bake_and_the_proxy() {
    for (args, expected) in [
        (&["--proxy", "http", "--canary", "10"][..], "give --bake"),
        (&["--bake", "5s", "--canary", "10"][..], "give --proxy"),
        (
            &["--proxy", "tcp", "--bake", "5s", "--max-error-rate", "5"][..],
            "--proxy http",
        ),
        (
            &["--proxy", "http", "--bake", "5s", "--canary", "0"][..],
            "invalid canary",
        ),
        (
            &["--proxy", "http", "--bake", "5s", "--max-error-rate", "200"][..],
            "invalid rate",
        ),
    ] {
        let mut all = vec!["run", "--listen", ":0"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "true"]);
        let out = baton(&all);
        assert_startup_error(&out, expected);
    }
}

#[test]
fn a_control_directory_another_user_could_write_to_is_refused() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root, to give a directory to another user");
        return;
    }
    let top = tempfile::tempdir().expect("tempdir");
    let run = |control: &std::path::Path| {
        baton(&[
            "run",
            "--control",
            control.to_str().expect("path"),
            "--listen",
            "127.0.0.1:0",
            "--",
            "true",
        ])
    };
    let mode = |dir: &std::path::Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    // Another user's directory, open to all: squatted.
    let squatted = top.path().join("squatted");
    std::fs::create_dir(&squatted).expect("dir");
    mode(&squatted, 0o777);
    std::os::unix::fs::chown(&squatted, Some(65534), Some(65534)).expect("chown");
    let out = run(&squatted.join("app.sock"));
    assert_startup_error(&out, "belongs to another user (owner uid 65534, mode 777");
    // One's own, but group-writable.
    let shared = top.path().join("shared");
    std::fs::create_dir(&shared).expect("dir");
    mode(&shared, 0o770);
    assert_startup_error(
        &run(&shared.join("app.sock")),
        "may be written by other users",
    );
    // A symlink to a good directory.
    let good = top.path().join("good");
    std::fs::create_dir(&good).expect("dir");
    mode(&good, 0o755);
    let link = top.path().join("link");
    std::os::unix::fs::symlink(&good, &link).expect("symlink");
    assert_startup_error(&run(&link.join("app.sock")), "is a symlink");
    // A directory baton makes is exactly 0700.
    let made = top.path().join("made").join("baton");
    let out = run(&made.join("app.sock"));
    assert_ne!(out.code, Some(2), "{out:?}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&made).expect("made").mode() & 0o7777,
        0o700
    );
}
