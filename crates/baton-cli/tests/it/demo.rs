//! `baton demo`, the main job, end to end (short runs): hot reloads lose
//! nothing, cold restarts lose requests for about the app's startup.

use crate::support;

#[test]
fn the_demo_shows_hot_reloads_losing_nothing_and_cold_restarts_losing_requests() {
    let out = support::run(
        &["demo", "--json", "-d", "2s", "--restarts", "1", "-c", "8"].map(Into::into),
        std::time::Duration::from_secs(120),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 4);
    for row in rows {
        let s = &row["run"]["summary"];
        let hot = row["strategy"]
            .as_str()
            .expect("strategy")
            .starts_with("hot");
        assert!(s["requests"].as_u64().expect("requests") > 0, "{row}");
        let window = &s["windows"][0];
        assert_eq!(window["trigger_ok"], true, "{window}");
        if hot {
            assert_eq!(s["failed"], 0, "{s}");
            // The new generation answers after its 300 ms startup.
            assert!(
                window["first_new_ms"].as_f64().expect("handover") >= 300.0,
                "{window}"
            );
        } else {
            assert!(s["failed"].as_u64().expect("failed") > 0, "{s}");
            assert!(
                window["unavailable_ms"].as_f64().expect("span") > 100.0,
                "{window}"
            );
        }
    }
}
