//! Fifty reloads leave baton with the fds it started with and no zombies;
//! orphans of the app are reaped.

use crate::support;

use support::{Baton, LONG, fd_count, wait_until, zombies_of};

#[test]
fn fifty_reloads_leak_no_fd_and_leave_no_zombie() {
    let b = Baton::serving(&[], &[]);
    let baton = b.pid();
    let before = fd_count(baton);
    for n in 2..=51 {
        let out = b.ctl(&["reload"]);
        assert_eq!(out.code, Some(0), "reload to generation {n}: {out:?}");
    }
    b.wait_for_event("exit", 50);
    // (`before` may count a descriptor that was open for a moment, such as
    // the netlink socket that looks at a new generation: at most as many.)
    wait_until(&format!("baton is back to {before} fds"), LONG, || {
        fd_count(baton) <= before
    });
    wait_until("no zombie children", LONG, || zombies_of(baton).is_empty());
    assert_eq!(b.count_events("spawn"), 51);
}

#[test]
fn orphans_of_the_app_are_reaped() {
    let exe = support::exe();
    // The subshell leaves a `sleep` behind as an orphan, which is reparented
    // to baton (a child subreaper) and must be reaped when it exits.
    let script = format!("(sleep 0.2 &) ; exec {exe} demo-app");
    let b = Baton::builder()
        .run_args(["--listen", "127.0.0.1:0", "--log-level", "debug"])
        .command(["/bin/sh", "-c", &script])
        .start();
    b.wait_for_event("ready", 1);
    b.wait_for(
        "the orphan reaped",
        |l| l.contains("reaped an orphan"),
        LONG,
    );
    wait_until("no zombie children", LONG, || {
        zombies_of(b.pid()).is_empty()
    });
}
