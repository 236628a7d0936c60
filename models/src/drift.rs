//! Drift detectors: has the stream an expert sees (its inputs, or its own scores)
//! stopped looking like the stream it was trained on?
//!
//! Three detectors with different strengths, each fed one value at a time and
//! answering with a [`Drift`] when it fires (what moved, from what level to what, and
//! how sure):
//!
//! - [`PageHinkley`]: a cumulative-sum test for a shift of the mean in either direction;
//!   cheapest and quickest on an abrupt step (a recalibrated sensor, a new batch).
//! - [`Adwin`]: ADWIN (Bifet and Gavaldà, 2007): keeps the longest recent window whose
//!   two halves, cut anywhere, have means within a Hoeffding-style bound, and drops the
//!   older part when they do not. No threshold to tune besides the confidence; follows
//!   gradual drift (a wearing tool). This version keeps at most `max_window` values and
//!   checks cuts every `clock` values, which bounds the work per value.
//! - [`KsDrift`]: a two-sample Kolmogorov–Smirnov test between a reference window
//!   (the first values after a reset: the regime the model knows) and the most recent
//!   window of the same size; sees changes of shape that leave the mean alone (a noisier
//!   sensor).
//!
//! After firing, every detector resets to learn the new regime as its reference, so one
//! change raises one event, not one per value. Values that are not finite are refused
//! by the caller's data checks and ignored here, so a NaN never raises or hides drift.

use std::collections::VecDeque;

use serde::Serialize;

use crate::error::ModelError;

/// One detected change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drift {
    pub detector: &'static str,
    /// The number of values seen when it fired (counting from 0 at construction).
    pub at: u64,
    /// Mean of the old regime and of the new one, as the detector estimated them.
    pub before: f64,
    pub after: f64,
    /// The test statistic that crossed its limit (the PH sum, ADWIN's mean gap, KS D).
    pub statistic: f64,
    pub limit: f64,
}

impl Drift {
    /// The size of the change in the old regime's terms.
    pub fn magnitude(&self) -> f64 {
        self.after - self.before
    }
}

fn invalid(field: &'static str, value: f64, reason: &str) -> ModelError {
    ModelError::InvalidOption {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Page–Hinkley test for a shift of the mean, both directions.
#[derive(Debug, Clone)]
pub struct PageHinkley {
    /// Changes smaller than this are tolerated (in the value's units).
    delta: f64,
    /// The cumulative deviation that fires.
    lambda: f64,
    /// Values to see before testing: the mean must settle first.
    min_values: u64,
    seen: u64,
    count: u64,
    mean: f64,
    up: f64,
    up_min: f64,
    down: f64,
    down_max: f64,
    recent: VecDeque<f64>,
}

impl PageHinkley {
    pub fn new(delta: f64, lambda: f64, min_values: u64) -> Result<Self, ModelError> {
        if !(delta.is_finite() && delta >= 0.0) {
            return Err(invalid("delta", delta, "must be a finite number >= 0"));
        }
        if !(lambda.is_finite() && lambda > 0.0) {
            return Err(invalid("lambda", lambda, "must be a finite number > 0"));
        }
        Ok(PageHinkley {
            delta,
            lambda,
            min_values: min_values.max(1),
            seen: 0,
            count: 0,
            mean: 0.0,
            up: 0.0,
            up_min: 0.0,
            down: 0.0,
            down_max: 0.0,
            recent: VecDeque::new(),
        })
    }

    fn reset(&mut self) {
        self.count = 0;
        self.mean = 0.0;
        self.up = 0.0;
        self.up_min = 0.0;
        self.down = 0.0;
        self.down_max = 0.0;
        self.recent.clear();
    }

    pub fn update(&mut self, x: f64) -> Option<Drift> {
        if !x.is_finite() {
            return None;
        }
        let at = self.seen;
        self.seen += 1;
        self.count += 1;
        // The test statistic follows the running mean of everything since the reset,
        // so the old regime's mean is the mean before the shift pulls it.
        let before = self.mean;
        self.mean += (x - self.mean) / self.count as f64;
        self.up += x - self.mean - self.delta;
        self.up_min = self.up_min.min(self.up);
        self.down += x - self.mean + self.delta;
        self.down_max = self.down_max.max(self.down);
        self.recent.push_back(x);
        if self.recent.len() > 32 {
            self.recent.pop_front();
        }
        if self.count < self.min_values {
            return None;
        }
        let rise = self.up - self.up_min;
        let fall = self.down_max - self.down;
        let statistic = rise.max(fall);
        if statistic <= self.lambda {
            return None;
        }
        let after = self.recent.iter().sum::<f64>() / self.recent.len() as f64;
        self.reset();
        Some(Drift {
            detector: "page_hinkley",
            at,
            before,
            after,
            statistic,
            limit: self.lambda,
        })
    }
}

/// ADWIN over a bounded window.
#[derive(Debug, Clone)]
pub struct Adwin {
    /// Confidence: a cut is declared when the chance it is noise is below `delta`.
    delta: f64,
    max_window: usize,
    clock: u64,
    min_side: usize,
    seen: u64,
    window: VecDeque<f64>,
}

impl Adwin {
    pub fn new(delta: f64, max_window: usize) -> Result<Self, ModelError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(invalid("delta", delta, "must lie in (0, 1)"));
        }
        if max_window < 64 {
            return Err(invalid(
                "max_window",
                max_window as f64,
                "must be at least 64 values",
            ));
        }
        Ok(Adwin {
            delta,
            max_window,
            clock: 32,
            min_side: 16,
            seen: 0,
            window: VecDeque::with_capacity(max_window),
        })
    }

    /// Values in the current window: the stretch ADWIN believes is one regime.
    pub fn width(&self) -> usize {
        self.window.len()
    }

    pub fn update(&mut self, x: f64) -> Option<Drift> {
        if !x.is_finite() {
            return None;
        }
        let at = self.seen;
        self.seen += 1;
        if self.window.len() == self.max_window {
            self.window.pop_front();
        }
        self.window.push_back(x);
        if !self.seen.is_multiple_of(self.clock) || self.window.len() < 2 * self.min_side {
            return None;
        }
        let n = self.window.len();
        let total: f64 = self.window.iter().sum();
        let mean = total / n as f64;
        let variance = self
            .window
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f64>()
            / n as f64;
        // The bound of ADWIN's paper (Theorem 3's practical form), with the confidence
        // split over the cuts tested.
        let delta_prime = self.delta / (n as f64).ln().max(1.0);
        let log_term = (2.0 / delta_prime).ln();
        let mut best: Option<(usize, f64, f64, f64, f64)> = None;
        let mut head = 0.0;
        for (i, v) in self.window.iter().enumerate().take(n - self.min_side) {
            head += v;
            let n0 = i + 1;
            if n0 < self.min_side {
                continue;
            }
            let n1 = n - n0;
            let m = 1.0 / (1.0 / n0 as f64 + 1.0 / n1 as f64);
            let epsilon = (2.0 / m * variance * log_term).sqrt() + 2.0 / (3.0 * m) * log_term;
            let mean0 = head / n0 as f64;
            let mean1 = (total - head) / n1 as f64;
            let gap = (mean0 - mean1).abs();
            if gap > epsilon && best.is_none_or(|b| gap - epsilon > b.1 - b.2) {
                best = Some((n0, gap, epsilon, mean0, mean1));
            }
        }
        let (cut, gap, epsilon, before, after) = best?;
        self.window.drain(..cut);
        Some(Drift {
            detector: "adwin",
            at,
            before,
            after,
            statistic: gap,
            limit: epsilon,
        })
    }
}

/// Two-sample Kolmogorov–Smirnov test, reference window against the latest window.
#[derive(Debug, Clone)]
pub struct KsDrift {
    size: usize,
    /// Significance: fire when the p-value is below it.
    alpha: f64,
    /// Test every this many values.
    every: u64,
    seen: u64,
    reference: Vec<f64>,
    recent: VecDeque<f64>,
}

impl KsDrift {
    pub fn new(size: usize, alpha: f64) -> Result<Self, ModelError> {
        if size < 20 {
            return Err(invalid(
                "size",
                size as f64,
                "must be at least 20 values per window",
            ));
        }
        if !(alpha > 0.0 && alpha < 1.0) {
            return Err(invalid("alpha", alpha, "must lie in (0, 1)"));
        }
        Ok(KsDrift {
            size,
            alpha,
            every: (size as u64 / 4).max(1),
            seen: 0,
            reference: Vec::with_capacity(size),
            recent: VecDeque::with_capacity(size),
        })
    }

    pub fn update(&mut self, x: f64) -> Option<Drift> {
        if !x.is_finite() {
            return None;
        }
        let at = self.seen;
        self.seen += 1;
        if self.reference.len() < self.size {
            self.reference.push(x);
            return None;
        }
        if self.recent.len() == self.size {
            self.recent.pop_front();
        }
        self.recent.push_back(x);
        if self.recent.len() < self.size || !self.seen.is_multiple_of(self.every) {
            return None;
        }
        let recent: Vec<f64> = self.recent.iter().copied().collect();
        let d = ks_statistic(&self.reference, &recent);
        let p = ks_p_value(d, self.size, self.size);
        if p >= self.alpha {
            return None;
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let drift = Drift {
            detector: "ks",
            at,
            before: mean(&self.reference),
            after: mean(&recent),
            statistic: d,
            limit: ks_critical(self.alpha, self.size, self.size),
        };
        // The new regime becomes the reference.
        self.reference = recent;
        self.recent.clear();
        Some(drift)
    }
}

/// The largest gap between the two samples' empirical distribution functions.
pub fn ks_statistic(a: &[f64], b: &[f64]) -> f64 {
    let mut a: Vec<f64> = a.iter().copied().filter(|v| v.is_finite()).collect();
    let mut b: Vec<f64> = b.iter().copied().filter(|v| v.is_finite()).collect();
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let v = a[i].min(b[j]);
        while i < a.len() && a[i] <= v {
            i += 1;
        }
        while j < b.len() && b[j] <= v {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

/// The asymptotic p-value of D for samples of sizes n and m (Kolmogorov's
/// distribution with Stephens' small-sample correction).
pub fn ks_p_value(d: f64, n: usize, m: usize) -> f64 {
    let en = ((n * m) as f64 / (n + m) as f64).sqrt();
    let lambda = (en + 0.12 + 0.11 / en) * d;
    if lambda < 0.2 {
        return 1.0;
    }
    let mut sum = 0.0;
    for k in 1..=100 {
        let k = k as f64;
        let term = 2.0 * (-1f64).powf(k - 1.0) * (-2.0 * k * k * lambda * lambda).exp();
        sum += term;
        if term.abs() < 1e-12 {
            break;
        }
    }
    sum.clamp(0.0, 1.0)
}

/// The D above which samples of sizes n and m differ at significance `alpha`.
pub fn ks_critical(alpha: f64, n: usize, m: usize) -> f64 {
    let c = (-0.5 * (alpha / 2.0).ln()).sqrt();
    c * (((n + m) as f64) / (n * m) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use proptest::prelude::*;

    /// `n` values of N(0, 1), then N(shift, 1).
    fn stream(n: usize, change_at: usize, shift: f64, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix64::new(seed);
        (0..n)
            .map(|i| rng.normal() + if i >= change_at { shift } else { 0.0 })
            .collect()
    }

    fn first_event(values: &[f64], mut update: impl FnMut(f64) -> Option<Drift>) -> Option<Drift> {
        values.iter().find_map(|&v| update(v))
    }

    #[test]
    fn a_step_is_detected_within_a_bounded_delay_by_every_detector() {
        for seed in 1..=5 {
            let values = stream(4_000, 2_000, 2.0, seed);
            let mut ph = PageHinkley::new(0.25, 25.0, 30).unwrap();
            let mut adwin = Adwin::new(0.002, 1_000).unwrap();
            let mut ks = KsDrift::new(200, 0.001).unwrap();
            for (name, event) in [
                ("ph", first_event(&values, |v| ph.update(v))),
                ("adwin", first_event(&values, |v| adwin.update(v))),
                ("ks", first_event(&values, |v| ks.update(v))),
            ] {
                let event = event.unwrap_or_else(|| panic!("{name} misses the step (seed {seed})"));
                assert!(
                    (2_000..2_250).contains(&event.at),
                    "{name} fired at {} (seed {seed})",
                    event.at
                );
                assert!(event.magnitude() > 0.3, "{name}: {event:?}");
                assert!(event.statistic > event.limit, "{name}: {event:?}");
            }
        }
    }

    #[test]
    fn stationary_noise_raises_nothing() {
        for seed in 11..=15 {
            let values = stream(20_000, usize::MAX, 0.0, seed);
            let mut ph = PageHinkley::new(0.25, 25.0, 30).unwrap();
            let mut adwin = Adwin::new(0.002, 1_000).unwrap();
            let mut ks = KsDrift::new(200, 0.001).unwrap();
            assert_eq!(
                first_event(&values, |v| ph.update(v)),
                None,
                "ph, seed {seed}"
            );
            assert_eq!(
                first_event(&values, |v| adwin.update(v)),
                None,
                "adwin, seed {seed}"
            );
            assert_eq!(
                first_event(&values, |v| ks.update(v)),
                None,
                "ks, seed {seed}"
            );
        }
    }

    #[test]
    fn a_change_of_spread_with_the_same_mean_is_seen_by_ks() {
        let mut rng = SplitMix64::new(3);
        let values: Vec<f64> = (0..3_000)
            .map(|i| rng.normal() * if i >= 1_000 { 3.0 } else { 1.0 })
            .collect();
        let mut ks = KsDrift::new(200, 0.001).unwrap();
        let event = first_event(&values, |v| ks.update(v)).expect("KS sees the wider spread");
        assert!((1_000..1_300).contains(&event.at), "{event:?}");
    }

    #[test]
    fn after_firing_the_new_regime_is_the_reference() {
        let values = stream(8_000, 2_000, 2.0, 7);
        let mut ph = PageHinkley::new(0.25, 25.0, 30).unwrap();
        let events: Vec<Drift> = values.iter().filter_map(|&v| ph.update(v)).collect();
        assert_eq!(events.len(), 1, "{events:?}");
        let mut adwin = Adwin::new(0.002, 1_000).unwrap();
        let events: Vec<Drift> = values.iter().filter_map(|&v| adwin.update(v)).collect();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(adwin.width() > 1_000 - 64, "{}", adwin.width());
    }

    #[test]
    fn bad_settings_are_named_and_nan_is_ignored() {
        assert!(PageHinkley::new(-1.0, 10.0, 1)
            .unwrap_err()
            .to_string()
            .contains("delta"));
        assert!(PageHinkley::new(0.0, 0.0, 1)
            .unwrap_err()
            .to_string()
            .contains("lambda"));
        assert!(Adwin::new(1.5, 100)
            .unwrap_err()
            .to_string()
            .contains("delta"));
        assert!(Adwin::new(0.01, 10)
            .unwrap_err()
            .to_string()
            .contains("max_window"));
        assert!(KsDrift::new(5, 0.01)
            .unwrap_err()
            .to_string()
            .contains("size"));
        assert!(KsDrift::new(50, 0.0)
            .unwrap_err()
            .to_string()
            .contains("alpha"));
        let mut ph = PageHinkley::new(0.05, 5.0, 1).unwrap();
        for _ in 0..1000 {
            assert_eq!(ph.update(f64::NAN), None);
            assert_eq!(ph.update(f64::INFINITY), None);
        }
    }

    #[test]
    fn ks_matches_hand_computed_values() {
        // EDFs of {1,2,3} and {2,3,4,5}: gaps 1/3 at 1, 5/12 at 2, 1/2 at 3, 1/4 at 4.
        let d = ks_statistic(&[1.0, 2.0, 3.0], &[2.0, 3.0, 4.0, 5.0]);
        assert!((d - 0.5).abs() < 1e-12, "{d}");
        assert_eq!(ks_statistic(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(ks_p_value(0.0, 100, 100) > 0.99);
        assert!(ks_p_value(0.5, 100, 100) < 1e-6);
        // The critical value at alpha is where the p-value crosses alpha.
        let c = ks_critical(0.05, 200, 200);
        assert!(
            (ks_p_value(c, 200, 200) - 0.05).abs() < 0.01,
            "{}",
            ks_p_value(c, 200, 200)
        );
    }

    proptest! {
        #[test]
        fn ks_is_symmetric_and_bounded(
            a in proptest::collection::vec(-1e3f64..1e3, 1..60),
            b in proptest::collection::vec(-1e3f64..1e3, 1..60),
        ) {
            let d = ks_statistic(&a, &b);
            prop_assert!((0.0..=1.0).contains(&d));
            prop_assert!((d - ks_statistic(&b, &a)).abs() < 1e-12);
            prop_assert_eq!(ks_statistic(&a, &a), 0.0);
        }
    }
}
