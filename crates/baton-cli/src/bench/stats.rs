//! From raw request records to the figures a report shows: failures by kind,
//! latency percentiles in steady state and inside each restart window, the
//! unavailable span around each trigger, and the handover (trigger to the
//! first answer from a new generation, and to the last from the old one).
//!
//! Definitions (also in docs/usage.md):
//! - a restart window is [trigger, trigger + 2 s); a request is in it if it
//!   started in it; steady state is every request in no window;
//! - latency percentiles are over successful (2xx) requests;
//! - a trigger's failures are those that started between it and the next
//!   trigger; its unavailable span runs from the start of the first of them
//!   to the end of the last (0 when there are none);
//! - the old responder is the one that answered last before the trigger; a
//!   new one is any responder not seen since the trigger before (so that
//!   generation numbers that start again with a restarted baton count as
//!   new).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Serialize;

use super::load::{FailureKind, Record, Responder};

/// The restart window after each trigger.
pub const WINDOW: Duration = Duration::from_secs(2);

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Successful requests measured.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

impl Latency {
    fn of(mut us: Vec<u64>) -> Latency {
        if us.is_empty() {
            return Latency::default();
        }
        us.sort_unstable();
        let pick = |q: f64| {
            let rank = ((q * us.len() as f64).ceil() as usize).clamp(1, us.len());
            us[rank - 1] as f64 / 1000.0
        };
        Latency {
            count: us.len() as u64,
            p50_ms: pick(0.50),
            p99_ms: pick(0.99),
            max_ms: us[us.len() - 1] as f64 / 1000.0,
        }
    }
}

/// When a trigger ran and how it went.
#[derive(Debug, Clone, Serialize)]
pub struct TriggerRecord {
    /// µs since the run began.
    pub at_us: u64,
    /// When the trigger command returned, µs since the run began.
    pub done_us: u64,
    /// Whether it reported success.
    pub ok: bool,
    /// What it said.
    pub message: String,
}

/// The figures around one trigger.
#[derive(Debug, Clone, Serialize)]
pub struct WindowStats {
    /// When the trigger ran, ms since the run began.
    pub at_ms: f64,
    /// Whether the trigger reported success.
    pub trigger_ok: bool,
    /// What it said.
    pub trigger_message: String,
    /// Requests that started in the window.
    pub requests: u64,
    /// Failures attributed to this trigger.
    pub failed: u64,
    /// Those failures by kind.
    pub failures: BTreeMap<&'static str, u64>,
    /// Latency of the window's successful requests.
    pub latency: Latency,
    /// First to last failure attributed to this trigger, ms.
    pub unavailable_ms: f64,
    /// Trigger to the first answer from a new responder, ms.
    pub first_new_ms: Option<f64>,
    /// Trigger to the last answer from the old responder, ms.
    pub last_old_ms: Option<f64>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// How long the load ran, s.
    pub duration_s: f64,
    /// Requests sent.
    pub requests: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Failed requests.
    pub failed: u64,
    /// Failed / requests, in percent.
    pub failure_rate_pct: f64,
    /// Failures by kind (every kind listed).
    pub failures: BTreeMap<&'static str, u64>,
    /// Successful requests per second.
    pub throughput_rps: f64,
    /// Latency outside restart windows.
    pub steady: Latency,
    /// Latency inside restart windows.
    pub restart: Latency,
    /// Per trigger.
    pub windows: Vec<WindowStats>,
    /// The longest unavailable span, ms.
    pub unavailable_max_ms: f64,
    /// Mean unavailable span per trigger, ms.
    pub unavailable_mean_ms: f64,
}

fn by_kind(failures: impl Iterator<Item = FailureKind>) -> BTreeMap<&'static str, u64> {
    let mut map: BTreeMap<&'static str, u64> =
        FailureKind::ALL.iter().map(|k| (k.name(), 0)).collect();
    for kind in failures {
        *map.entry(kind.name()).or_default() += 1;
    }
    map
}

/// Computes the summary of `records` (any order) given the triggers.
pub fn summarize(records: &[Record], triggers: &[TriggerRecord], duration: Duration) -> Summary {
    let window_us = WINDOW.as_micros() as u64;
    let in_window = |start: u64| {
        triggers
            .iter()
            .any(|t| start >= t.at_us && start < t.at_us + window_us)
    };
    let ok_latency = |pred: &dyn Fn(&Record) -> bool| {
        Latency::of(
            records
                .iter()
                .filter(|r| r.outcome.is_ok() && pred(r))
                .map(Record::latency_us)
                .collect(),
        )
    };

    let mut by_end: Vec<&Record> = records.iter().collect();
    by_end.sort_by_key(|r| r.end_us);

    let windows: Vec<WindowStats> = triggers
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let next = triggers.get(i + 1).map_or(u64::MAX, |n| n.at_us);
            let in_this = |r: &Record| r.start_us >= t.at_us && r.start_us < t.at_us + window_us;
            let failures: Vec<&Record> = records
                .iter()
                .filter(|r| r.outcome.is_err() && r.start_us >= t.at_us && r.start_us < next)
                .collect();
            let unavailable_us = match (
                failures.iter().map(|r| r.start_us).min(),
                failures.iter().map(|r| r.end_us).max(),
            ) {
                (Some(first), Some(last)) => last.saturating_sub(first),
                _ => 0,
            };
            let since = i.checked_sub(1).map_or(0, |p| triggers[p].at_us);
            let before: Vec<&&Record> = by_end
                .iter()
                .filter(|r| r.end_us < t.at_us && r.end_us >= since)
                .collect();
            let seen: HashSet<Responder> = before
                .iter()
                .filter_map(|r| r.outcome.ok().flatten())
                .collect();
            let old = before.iter().rev().find_map(|r| r.outcome.ok().flatten());
            let after = by_end.iter().filter(|r| r.end_us >= t.at_us);
            let mut first_new = None;
            let mut last_old = None;
            for r in after {
                let Ok(Some(who)) = r.outcome else { continue };
                if Some(who) == old {
                    last_old = Some(r.end_us);
                } else if first_new.is_none() && !seen.contains(&who) {
                    first_new = Some(r.end_us);
                }
            }
            let ms = |us: u64| us.saturating_sub(t.at_us) as f64 / 1000.0;
            WindowStats {
                at_ms: t.at_us as f64 / 1000.0,
                trigger_ok: t.ok,
                trigger_message: t.message.clone(),
                requests: records.iter().filter(|r| in_this(r)).count() as u64,
                failed: failures.len() as u64,
                failures: by_kind(failures.iter().filter_map(|r| r.outcome.err())),
                latency: ok_latency(&in_this),
                unavailable_ms: unavailable_us as f64 / 1000.0,
                first_new_ms: first_new.map(ms),
                last_old_ms: last_old.map(ms),
            }
        })
        .collect();

    let requests = records.len() as u64;
    let failed = records.iter().filter(|r| r.outcome.is_err()).count() as u64;
    let ok = requests - failed;
    let spans: Vec<f64> = windows.iter().map(|w| w.unavailable_ms).collect();
    Summary {
        duration_s: duration.as_secs_f64(),
        requests,
        ok,
        failed,
        failure_rate_pct: if requests == 0 {
            0.0
        } else {
            100.0 * failed as f64 / requests as f64
        },
        failures: by_kind(records.iter().filter_map(|r| r.outcome.err())),
        throughput_rps: ok as f64 / duration.as_secs_f64().max(1e-9),
        steady: ok_latency(&|r: &Record| !in_window(r.start_us)),
        restart: ok_latency(&|r: &Record| in_window(r.start_us)),
        unavailable_max_ms: spans.iter().copied().fold(0.0, f64::max),
        unavailable_mean_ms: if spans.is_empty() {
            0.0
        } else {
            spans.iter().sum::<f64>() / spans.len() as f64
        },
        windows,
    }
}

/// One slice of the timeline, for the plot.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bucket {
    /// Start of the slice, s since the run began.
    pub at_s: f64,
    /// Successful requests per second in the slice.
    pub ok_rps: f64,
    /// Failed requests in the slice.
    pub failed: u64,
    /// 99th percentile latency of the slice's successes, ms.
    pub p99_ms: f64,
}

/// The run cut into `width` slices (by request end time).
pub fn timeline(records: &[Record], duration: Duration, width: Duration) -> Vec<Bucket> {
    let width_us = width.as_micros().max(1) as u64;
    let n = (duration.as_micros() as u64).div_ceil(width_us).max(1) as usize;
    let mut oks: Vec<Vec<u64>> = vec![Vec::new(); n];
    let mut failed = vec![0u64; n];
    for r in records {
        let i = ((r.end_us / width_us) as usize).min(n - 1);
        match r.outcome {
            Ok(_) => oks[i].push(r.latency_us()),
            Err(_) => failed[i] += 1,
        }
    }
    oks.into_iter()
        .zip(failed)
        .enumerate()
        .map(|(i, (lat, failed))| Bucket {
            at_s: (i as u64 * width_us) as f64 / 1e6,
            ok_rps: lat.len() as f64 / width.as_secs_f64(),
            failed,
            p99_ms: Latency::of(lat).p99_ms,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(start_ms: u64, end_ms: u64, who: u64) -> Record {
        Record {
            start_us: start_ms * 1000,
            end_us: end_ms * 1000,
            outcome: Ok(Some(Responder::Pid(who))),
        }
    }

    fn fail(start_ms: u64, end_ms: u64, kind: FailureKind) -> Record {
        Record {
            start_us: start_ms * 1000,
            end_us: end_ms * 1000,
            outcome: Err(kind),
        }
    }

    fn trigger(at_ms: u64) -> TriggerRecord {
        TriggerRecord {
            at_us: at_ms * 1000,
            done_us: at_ms * 1000,
            ok: true,
            message: String::new(),
        }
    }

    #[test]
    fn percentiles() {
        let l = Latency::of((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!(
            (l.count, l.p50_ms, l.p99_ms, l.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        assert_eq!(Latency::of(vec![]), Latency::default());
    }

    #[test]
    fn failures_spans_and_handover() {
        let records = vec![
            ok(0, 1, 10),
            ok(900, 901, 10),
            // trigger at 1000: the old pid answers twice more, then refusals,
            // then the new pid.
            ok(1001, 1002, 10),
            ok(1100, 1150, 10),
            fail(1200, 1201, FailureKind::Refused),
            fail(1400, 1405, FailureKind::Refused),
            fail(1500, 1502, FailureKind::Reset),
            ok(1600, 1610, 20),
            ok(5000, 5001, 20),
        ];
        let s = summarize(&records, &[trigger(1000)], Duration::from_secs(6));
        assert_eq!((s.requests, s.ok, s.failed), (9, 6, 3));
        assert_eq!(s.failures["refused"], 2);
        assert_eq!(s.failures["reset"], 1);
        assert_eq!(s.failures["timeout"], 0);
        let w = &s.windows[0];
        assert_eq!(w.requests, 6);
        assert_eq!(w.failed, 3);
        assert_eq!(w.unavailable_ms, 302.0);
        assert_eq!(w.first_new_ms, Some(610.0));
        assert_eq!(w.last_old_ms, Some(150.0));
        assert_eq!(s.steady.count, 3);
        assert_eq!(s.restart.count, 3);
        assert!((s.failure_rate_pct - 100.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn generation_numbers_that_start_again_still_show_the_handover() {
        let answer = |start: u64, g: u64, pid: u64| Record {
            start_us: start * 1000,
            end_us: (start + 1) * 1000,
            outcome: Ok(Some(Responder::GenerationPid(g, pid))),
        };
        // Generation 1 served, then 2 (trigger at 1000); baton was then
        // started again, and its own generation 1 serves; at 3000 its
        // generation 2 takes over: a number already seen, a new process.
        let records = vec![
            answer(0, 1, 100),
            answer(1500, 2, 200),
            answer(2500, 1, 300),
            answer(3100, 2, 400),
        ];
        let s = summarize(
            &records,
            &[trigger(1000), trigger(3000)],
            Duration::from_secs(4),
        );
        assert_eq!(s.windows[0].first_new_ms, Some(501.0));
        assert_eq!(s.windows[1].first_new_ms, Some(101.0), "{:?}", s.windows[1]);
        assert_eq!(s.windows[1].last_old_ms, None);
    }

    #[test]
    fn a_clean_run_has_no_unavailability() {
        let records: Vec<Record> = (0..100)
            .map(|i| ok(i * 10, i * 10 + 1, 1 + i / 50))
            .collect();
        let s = summarize(&records, &[trigger(490)], Duration::from_secs(1));
        assert_eq!(s.failed, 0);
        assert_eq!(s.windows[0].unavailable_ms, 0.0);
        assert_eq!(s.unavailable_max_ms, 0.0);
        assert_eq!(s.windows[0].first_new_ms, Some(11.0));
        assert_eq!(s.windows[0].last_old_ms, Some(1.0));
    }

    #[test]
    fn timeline_buckets() {
        let records = vec![
            ok(0, 50, 1),
            ok(60, 90, 1),
            fail(100, 150, FailureKind::Timeout),
        ];
        let t = timeline(
            &records,
            Duration::from_millis(200),
            Duration::from_millis(100),
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].ok_rps, 20.0);
        assert_eq!(t[1].failed, 1);
    }
}
