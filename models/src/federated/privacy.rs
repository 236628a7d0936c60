//! Differential privacy for site updates: each site clips its update to an L2 norm and
//! the aggregate gets Gaussian noise of `noise_multiplier × clip_norm`, and an
//! accountant says how much privacy the rounds so far have spent.
//!
//! The accountant composes the Gaussian mechanism in Rényi differential privacy
//! (Mironov 2017): a round with noise multiplier `z` is `(α, α / (2z²))`-RDP for every
//! order `α > 1`, `R` rounds compose to `(α, R·α / (2z²))`, and converting to
//! `(ε, δ)`-DP, `ε = R·α / (2z²) + ln(1/δ) / (α − 1)`, minimised over `α`, gives
//! `ε = R / (2z²) + √(2R·ln(1/δ)) / z`. Every site takes part in every round here, so
//! no amplification by subsampling is claimed: the figure is an upper bound.

use super::FederatedError;

/// Scales `update` down to L2 norm `max_norm` if it is longer; its norm before.
pub fn clip(update: &mut [f32], max_norm: f64) -> f64 {
    let norm = update
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt();
    if norm > max_norm && norm > 0.0 {
        let factor = (max_norm / norm) as f32;
        for v in update.iter_mut() {
            *v *= factor;
        }
    }
    norm
}

/// Adds N(0, std²) to every value of `update`, from `rng`.
pub fn add_noise(update: &mut [f32], std: f64, rng: &mut crate::SplitMix64) {
    for v in update.iter_mut() {
        *v += (std * rng.normal()) as f32;
    }
}

/// The privacy a sequence of Gaussian rounds has spent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianAccountant {
    noise_multiplier: f64,
    delta: f64,
    rounds: u64,
}

impl GaussianAccountant {
    /// `noise_multiplier` > 0 (the noise's standard deviation over the clip norm);
    /// `delta` in (0, 1).
    pub fn new(noise_multiplier: f64, delta: f64) -> Result<Self, FederatedError> {
        if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
            return Err(FederatedError::Invalid {
                field: "noise_multiplier",
                value: noise_multiplier.to_string(),
                reason: "must be a finite number above 0",
            });
        }
        if !(delta > 0.0 && delta < 1.0) {
            return Err(FederatedError::Invalid {
                field: "delta",
                value: delta.to_string(),
                reason: "must be above 0 and below 1",
            });
        }
        Ok(GaussianAccountant {
            noise_multiplier,
            delta,
            rounds: 0,
        })
    }

    /// One more round spent.
    pub fn record_round(&mut self) {
        self.rounds += 1;
    }

    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// ε of `(ε, δ)`-DP for the rounds so far (0 before the first).
    pub fn epsilon(&self) -> f64 {
        let r = self.rounds as f64;
        let z = self.noise_multiplier;
        if self.rounds == 0 {
            return 0.0;
        }
        r / (2.0 * z * z) + (2.0 * r * (1.0 / self.delta).ln()).sqrt() / z
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn after(rounds: u64, z: f64, delta: f64) -> f64 {
        let mut accountant = GaussianAccountant::new(z, delta).unwrap();
        for _ in 0..rounds {
            accountant.record_round();
        }
        accountant.epsilon()
    }

    #[test]
    fn one_round_at_noise_1_costs_what_the_rdp_bound_says() {
        // min over α of α/2 + ln(1e5)/(α − 1): α ≈ 5.80, ε ≈ 5.30.
        assert!((after(1, 1.0, 1e-5) - 5.2985).abs() < 1e-3);
        assert_eq!(after(0, 1.0, 1e-5), 0.0);
    }

    proptest! {
        #[test]
        fn the_closed_form_is_the_minimum_over_orders(
            rounds in 1u64..500,
            z in 0.3f64..5.0,
            delta_exp in 3i32..9,
        ) {
            let delta = 10f64.powi(-delta_exp);
            let closed = after(rounds, z, delta);
            let r = rounds as f64;
            let grid = (1..20_000)
                .map(|i| 1.0 + f64::from(i) * 0.01)
                .map(|alpha| r * alpha / (2.0 * z * z) + (1.0 / delta).ln() / (alpha - 1.0))
                .fold(f64::INFINITY, f64::min);
            prop_assert!(closed <= grid + 1e-9, "{closed} above the grid's {grid}");
            prop_assert!(grid - closed < 0.01 * grid.max(1.0), "{closed} far below {grid}");
        }

        #[test]
        fn more_rounds_cost_more_and_more_noise_less(rounds in 1u64..200, z in 0.5f64..4.0) {
            prop_assert!(after(rounds + 1, z, 1e-5) > after(rounds, z, 1e-5));
            prop_assert!(after(rounds, z * 1.5, 1e-5) < after(rounds, z, 1e-5));
        }

        #[test]
        fn clipping_bounds_the_norm_and_keeps_the_direction(
            update in proptest::collection::vec(-100f32..100.0, 1..40),
            max_norm in 0.1f64..50.0,
        ) {
            let mut clipped = update.clone();
            let before = clip(&mut clipped, max_norm);
            let after: f64 = clipped.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            prop_assert!(after <= max_norm * (1.0 + 1e-5) + 1e-6);
            if before <= max_norm {
                prop_assert_eq!(&clipped, &update);
            } else {
                for (c, u) in clipped.iter().zip(&update) {
                    prop_assert!((f64::from(*c) - f64::from(*u) * max_norm / before).abs() < 1e-3);
                }
            }
        }
    }

    #[test]
    fn noise_has_the_asked_spread_and_settings_out_of_range_are_named() {
        let mut update = vec![0f32; 20_000];
        add_noise(&mut update, 2.0, &mut crate::SplitMix64::new(3));
        let variance = update.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 20_000.0;
        assert!((variance.sqrt() - 2.0).abs() < 0.05, "{}", variance.sqrt());
        let refused = GaussianAccountant::new(0.0, 1e-5).unwrap_err().to_string();
        assert!(refused.contains("noise_multiplier = 0"), "{refused}");
        let refused = GaussianAccountant::new(1.0, 1.0).unwrap_err().to_string();
        assert!(refused.contains("delta = 1"), "{refused}");
    }
}
