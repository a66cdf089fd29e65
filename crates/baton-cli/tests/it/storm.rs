//! A storm of reload signals coalesces: reloads are serialized, and those
//! asked for during one become at most one more.

use crate::support;

use support::{Baton, LONG};

#[test]
fn a_hundred_sighups_give_at_most_two_reloads() {
    // A slow start keeps the first reload in progress during the storm.
    let b = Baton::serving(&[], &["--startup", "300ms"]);
    for _ in 0..100 {
        b.signal(rustix::process::Signal::HUP);
    }
    b.wait_for_event("ready", 2);
    // A reload asked for now starts after whatever the storm queued, so its
    // generation number tells how many reloads the storm caused.
    let out = b.ctl(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let generation: u64 = out
        .stdout
        .split("generation ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|g| g.parse().ok())
        .expect("generation in the answer");
    assert!(
        (3..=4).contains(&generation),
        "the storm caused {} reloads\n{}",
        generation - 2,
        b.dump()
    );
    assert_eq!(b.count_events("spawn") as u64, generation, "{}", b.dump());
    // No pile-up: at most the serving generation and one draining remain.
    let status = b.ctl(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&status.stdout).expect("status JSON");
    let live = json["generations"].as_array().expect("generations").len();
    assert!(live <= 2, "{live} generations alive: {json}");
    let _ = LONG;
}
