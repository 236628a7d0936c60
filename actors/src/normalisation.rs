//! Per-channel normalisation to zero mean and unit variance, the scale the experts were
//! trained on.
//!
//! Two modes: `Frozen` uses statistics fitted on normal operation (what a deployed
//! expert needs: a fault must not be normalised away), `Online` keeps running
//! statistics with Welford's algorithm for streams that have no reference yet.

use serde::{Deserialize, Serialize};

/// How a stream scales its channels; part of the stream's spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum NormalisationSpec {
    /// Pass values through unchanged.
    None,
    /// Running mean and variance, updated by every sample before it is scaled.
    Online,
    /// Fixed statistics, one entry per channel.
    Frozen { mean: Vec<f32>, std: Vec<f32> },
}

/// Standard deviations below this are treated as this, so a constant channel maps to 0
/// instead of dividing by zero.
pub const MIN_STD: f32 = 1e-6;

/// Running per-channel statistics (Welford), numerically stable over long streams.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningStats {
    count: u64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl RunningStats {
    pub fn new(channels: usize) -> Self {
        RunningStats {
            count: 0,
            mean: vec![0.0; channels],
            m2: vec![0.0; channels],
        }
    }

    pub fn update(&mut self, values: &[f32]) {
        self.count += 1;
        let n = self.count as f64;
        for ((mean, m2), &x) in self.mean.iter_mut().zip(&mut self.m2).zip(values) {
            let x = f64::from(x);
            let delta = x - *mean;
            *mean += delta / n;
            *m2 += delta * (x - *mean);
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn mean(&self) -> Vec<f32> {
        self.mean.iter().map(|m| *m as f32).collect()
    }

    /// Population standard deviation per channel.
    pub fn std(&self) -> Vec<f32> {
        let n = self.count.max(1) as f64;
        self.m2.iter().map(|m2| (m2 / n).sqrt() as f32).collect()
    }
}

/// The normaliser a stream runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Normaliser {
    Identity,
    Online(RunningStats),
    Frozen { mean: Vec<f32>, inv_std: Vec<f32> },
}

impl Normaliser {
    /// `spec` has been validated against `channels` by the node spec.
    pub fn new(spec: &NormalisationSpec, channels: usize) -> Self {
        match spec {
            NormalisationSpec::None => Normaliser::Identity,
            NormalisationSpec::Online => Normaliser::Online(RunningStats::new(channels)),
            NormalisationSpec::Frozen { mean, std } => Normaliser::Frozen {
                mean: mean.clone(),
                inv_std: std.iter().map(|s| 1.0 / s.max(MIN_STD)).collect(),
            },
        }
    }

    /// Scales `values` in place (updating running statistics first in online mode).
    pub fn apply(&mut self, values: &mut [f32]) {
        match self {
            Normaliser::Identity => {}
            Normaliser::Online(stats) => {
                stats.update(values);
                let n = stats.count as f64;
                for ((x, mean), m2) in values.iter_mut().zip(&stats.mean).zip(&stats.m2) {
                    let std = ((m2 / n).sqrt() as f32).max(MIN_STD);
                    *x = ((f64::from(*x) - mean) as f32) / std;
                }
            }
            Normaliser::Frozen { mean, inv_std } => {
                for ((x, m), s) in values.iter_mut().zip(mean.iter()).zip(inv_std.iter()) {
                    *x = (*x - m) * s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn welford_matches_two_pass(rows in prop::collection::vec(prop::collection::vec(-1e4f32..1e4, 3), 1..200)) {
            let mut stats = RunningStats::new(3);
            for row in &rows {
                stats.update(row);
            }
            let n = rows.len() as f64;
            for c in 0..3 {
                let mean = rows.iter().map(|r| f64::from(r[c])).sum::<f64>() / n;
                let var = rows.iter().map(|r| (f64::from(r[c]) - mean).powi(2)).sum::<f64>() / n;
                let scale = mean.abs().max(1.0);
                prop_assert!((f64::from(stats.mean()[c]) - mean).abs() <= 1e-5 * scale);
                prop_assert!((f64::from(stats.std()[c]) - var.sqrt()).abs() <= 1e-3 * var.sqrt().max(1.0));
            }
        }

        #[test]
        fn frozen_normalisation_inverts(values in prop::collection::vec(-1e3f32..1e3, 4),
                                        mean in prop::collection::vec(-1e2f32..1e2, 4),
                                        std in prop::collection::vec(0.01f32..1e2, 4)) {
            let mut normaliser = Normaliser::new(&NormalisationSpec::Frozen { mean: mean.clone(), std: std.clone() }, 4);
            let mut scaled = values.clone();
            normaliser.apply(&mut scaled);
            for c in 0..4 {
                let back = scaled[c] * std[c] + mean[c];
                prop_assert!((back - values[c]).abs() <= 1e-3 * values[c].abs().max(1.0));
            }
        }
    }

    #[test]
    fn online_normalisation_centres_a_long_stream() {
        let mut normaliser = Normaliser::new(&NormalisationSpec::Online, 1);
        let mut last = 0.0;
        for t in 0..10_000 {
            let mut v = [50.0 + 5.0 * ((t as f32) * 0.37).sin()];
            normaliser.apply(&mut v);
            last = v[0];
        }
        assert!(
            last.abs() < 3.0,
            "a sample of the stream's own distribution lands near 0, got {last}"
        );
    }

    #[test]
    fn constant_channel_maps_to_zero() {
        let mut normaliser = Normaliser::new(
            &NormalisationSpec::Frozen {
                mean: vec![2.0],
                std: vec![0.0],
            },
            1,
        );
        let mut v = [2.0];
        normaliser.apply(&mut v);
        assert_eq!(v[0], 0.0);
    }
}
