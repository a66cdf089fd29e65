//! Showing a run: a table for people, JSON for scripts, an SVG plot of
//! throughput and latency over time with the reload moments marked.

use std::fmt::Write as _;

use serde::Serialize;

use super::stats::{Bucket, Latency, Summary, TriggerRecord};

/// How a run was set up (the `setup` part of the JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// The URL loaded.
    pub url: String,
    /// Concurrent clients.
    pub clients: usize,
    /// Keep-alive (true) or a new connection per request.
    pub keep_alive: bool,
    /// Length of the run, s.
    pub duration_s: f64,
    /// Per-request timeout, ms.
    pub timeout_ms: u64,
    /// When reloads were triggered, s after the start.
    pub reload_at_s: Vec<f64>,
    /// What the trigger was.
    pub trigger: String,
}

/// Everything about a run (the JSON output).
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// How it was set up.
    pub setup: Setup,
    /// The figures.
    pub summary: Summary,
    /// Each trigger as it ran.
    pub triggers: Vec<TriggerRecord>,
    /// Throughput, failures and latency per 100 ms.
    pub timeline: Vec<Bucket>,
}

fn lat(l: &Latency) -> String {
    if l.count == 0 {
        return "-".to_owned();
    }
    format!(
        "p50 {:.2} ms  p99 {:.2} ms  max {:.1} ms",
        l.p50_ms, l.p99_ms, l.max_ms
    )
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0} ms"))
}

/// The table for people.
pub fn table(run: &Run) -> String {
    let (setup, s) = (&run.setup, &run.summary);
    let mut out = String::new();
    let mode = if setup.keep_alive {
        "keep-alive"
    } else {
        "new connection per request"
    };
    let _ = writeln!(
        out,
        "{}: {} clients, {mode}, {:.1} s, {} reloads ({})",
        setup.url,
        setup.clients,
        setup.duration_s,
        setup.reload_at_s.len(),
        setup.trigger
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "requests   {:>9}   ({:.0} ok/s)",
        s.requests, s.throughput_rps
    );
    let kinds: Vec<String> = s
        .failures
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "failed     {:>9}   ({:.3} %: {})",
        s.failed,
        s.failure_rate_pct,
        kinds.join(", ")
    );
    let _ = writeln!(out, "latency    steady state      {}", lat(&s.steady));
    let _ = writeln!(out, "           restart windows   {}", lat(&s.restart));
    if !s.windows.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "reload  at        failed  unavailable  p99 in window  first new  last old  trigger"
        );
        for (i, w) in s.windows.iter().enumerate() {
            let p99 = if w.latency.count == 0 {
                "-".to_owned()
            } else {
                format!("{:.2} ms", w.latency.p99_ms)
            };
            let _ = writeln!(
                out,
                "{:<6}  {:>6.2} s  {:>6}  {:>8.0} ms  {:>13}  {:>9}  {:>8}  {}",
                i + 1,
                w.at_ms / 1000.0,
                w.failed,
                w.unavailable_ms,
                p99,
                opt_ms(w.first_new_ms),
                opt_ms(w.last_old_ms),
                if w.trigger_ok {
                    w.trigger_message.clone()
                } else {
                    format!("FAILED: {}", w.trigger_message)
                }
            );
        }
    }
    out
}

/// An SVG plot: throughput (and failures) on top, p99 latency below, the
/// reloads as dashed lines.
pub fn svg(run: &Run) -> String {
    const W: f64 = 900.0;
    const H: f64 = 420.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 20.0;
    let plot_w = W - LEFT - RIGHT;
    let (top_y, top_h) = (40.0, 160.0);
    let (bot_y, bot_h) = (250.0, 130.0);
    let dur = run.setup.duration_s.max(1e-3);
    let x = |t: f64| LEFT + plot_w * (t / dur).clamp(0.0, 1.0);
    let max_rps = run.timeline.iter().map(|b| b.ok_rps).fold(1.0, f64::max);
    let max_p99 = run.timeline.iter().map(|b| b.p99_ms).fold(1.0, f64::max);
    let max_failed = run
        .timeline
        .iter()
        .map(|b| b.failed)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let bucket_s = run.timeline.get(1).map_or(0.1, |b| b.at_s);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="14">{} — {} clients, {}, {} failed of {}</text>"#,
        escape(&run.setup.url),
        run.setup.clients,
        if run.setup.keep_alive {
            "keep-alive"
        } else {
            "new connection per request"
        },
        run.summary.failed,
        run.summary.requests
    );
    for (y, h, label) in [
        (top_y, top_h, "ok requests/s"),
        (bot_y, bot_h, "p99 latency (ms)"),
    ] {
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{y}" width="{plot_w}" height="{h}" fill="none" stroke="#999"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}" transform="rotate(-90 10 {})" text-anchor="middle">{label}</text>"#,
            y + h / 2.0,
            y + h / 2.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end">{max_rps:.0}</text>"#,
        LEFT - 4.0,
        top_y + 10.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end">{max_p99:.1}</text>"#,
        LEFT - 4.0,
        bot_y + 10.0
    );
    // Failures: red bars in the top panel, scaled to their own maximum.
    for b in run.timeline.iter().filter(|b| b.failed > 0) {
        let h = top_h * b.failed as f64 / max_failed;
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#d33" opacity="0.6"><title>{} failed</title></rect>"##,
            x(b.at_s),
            top_y + top_h - h,
            (x(b.at_s + bucket_s) - x(b.at_s)).max(1.0),
            b.failed
        );
    }
    let line = |value: &dyn Fn(&Bucket) -> f64, y: f64, h: f64, max: f64| {
        run.timeline
            .iter()
            .map(|b| {
                format!(
                    "{:.1},{:.1}",
                    x(b.at_s + bucket_s / 2.0),
                    y + h - h * (value(b) / max).min(1.0)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#26a" stroke-width="1.5" points="{}"/>"##,
        line(&|b| b.ok_rps, top_y, top_h, max_rps)
    );
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#a62" stroke-width="1.5" points="{}"/>"##,
        line(&|b| b.p99_ms, bot_y, bot_h, max_p99)
    );
    for (i, t) in run.triggers.iter().enumerate() {
        let tx = x(t.at_us as f64 / 1e6);
        let _ = writeln!(
            s,
            r##"<line x1="{tx:.1}" y1="{top_y}" x2="{tx:.1}" y2="{}" stroke="#555" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" font-size="11">reload {}</text>"##,
            bot_y + bot_h,
            tx + 3.0,
            top_y + 12.0,
            i + 1
        );
    }
    for i in 0..=4 {
        let t = dur * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{t:.1} s</text>"#,
            x(t),
            bot_y + bot_h + 16.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
