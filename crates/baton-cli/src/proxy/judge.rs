//! The statistics of a release on probation (`--bake` with
//! `--max-error-rate`): is its failure rate clearly worse than the limit
//! and than the previous release's? Wilson score bounds at 99.5 %, so that
//! a verdict rests on evidence, not on a few unlucky answers. Pure.

/// Answers counted so far: (all, failed).
pub type Tally = (u64, u64);

/// Fewest answers a verdict rests on.
pub const MIN_ANSWERS: u64 = 20;

/// The z score of a one-sided 99.5 % bound.
const Z: f64 = 2.576;

/// Wilson score interval of `failed` out of `all`: (lower, upper).
pub fn wilson(failed: u64, all: u64) -> (f64, f64) {
    if all == 0 {
        return (0.0, 1.0);
    }
    let n = all as f64;
    let p = failed as f64 / n;
    let z2 = Z * Z;
    let center = p + z2 / (2.0 * n);
    let spread = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    let denom = 1.0 + z2 / n;
    (
        ((center - spread) / denom).max(0.0),
        ((center + spread) / denom).min(1.0),
    )
}

/// Whether `new` failed clearly more than `max_rate` and than `base`: the
/// lower bound of its Wilson interval is above both the limit and the upper
/// bound of the baseline's (a baseline with too few answers counts as 0).
/// `None`: not enough answers yet, or not worse.
pub fn clearly_worse(new: Tally, base: Tally, max_rate: f64) -> Option<String> {
    let (all, failed) = new;
    if all < MIN_ANSWERS {
        return None;
    }
    let (lower, _) = wilson(failed, all);
    let base_upper = if base.0 >= MIN_ANSWERS {
        wilson(base.1, base.0).1
    } else {
        0.0
    };
    (lower > max_rate && lower > base_upper).then(|| {
        format!(
            "{failed} of {all} answers failed ({:.1} %, at least {:.1} % with 99.5 % confidence), \
             against at most {:.1} % allowed (--max-error-rate) and {} of {} for the previous release",
            100.0 * failed as f64 / all as f64,
            100.0 * lower,
            100.0 * max_rate,
            base.1,
            base.0
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_is_judged_worse_only_on_clear_evidence() {
        let limit = 0.05;
        // Too few answers: no verdict.
        assert!(clearly_worse((19, 19), (0, 0), limit).is_none());
        // Everything fails: a verdict after 20 answers.
        assert!(clearly_worse((20, 20), (1000, 0), limit).is_some());
        // 10 % of 100 is not clearly above 5 %.
        assert!(clearly_worse((100, 10), (1000, 0), limit).is_none());
        // 10 % of 2 000 is.
        assert!(clearly_worse((2000, 200), (10_000, 0), limit).is_some());
        // Not if the previous release failed as often.
        assert!(clearly_worse((2000, 200), (10_000, 1000), limit).is_none());
        // A steady 4 % never trips a 5 % limit, however long it runs.
        assert!(clearly_worse((1_000_000, 40_000), (0, 0), limit).is_none());
        let (lo, hi) = wilson(0, 0);
        assert!(lo == 0.0 && hi == 1.0);
    }
}
