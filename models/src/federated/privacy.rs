//! Differential privacy for site updates: each site clips its update to an L2 norm and
//! the aggregate gets Gaussian noise of `noise_multiplier × clip_norm`, and an
//! accountant says how much privacy the rounds so far have spent.
//!
//! The accountant composes the Gaussian mechanism in Rényi differential privacy
//! (Mironov 2017): a round with noise multiplier `z` is `(α, α / (2z²))`-RDP for every
//! order `α > 1`, `R` rounds compose to `(α, R·α / (2z²))`, and converting to
//! `(ε, δ)`-DP, `ε = R·α / (2z²) + ln(1/δ) / (α − 1)`, minimised over `α`, gives
//! `ε = R / (2z²) + √(2R·ln(1/δ)) / z`; rounds of different `z` add their `1 / (2z²)`
//! (ρ), and `ε = ρ + 2·√(ρ·ln(1/δ))`. Every site takes part in every round here, so
//! no amplification by subsampling is claimed: the figure is an upper bound.

use serde::{Deserialize, Serialize};

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

/// What a federation's private rounds have spent, carried from one coordinator to the
/// next (in each version's lineage and in gossip) so a coordinator started again goes
/// on counting instead of starting from nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacySpent {
    /// Private rounds combined.
    pub rounds: u64,
    /// Their Rényi cost per order: `Σ 1 / (2 z²)` over the rounds, so rounds of
    /// different noise multipliers compose.
    pub rho: f64,
}

/// The privacy a sequence of Gaussian rounds has spent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianAccountant {
    noise_multiplier: f64,
    delta: f64,
    spent: PrivacySpent,
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
            spent: PrivacySpent::default(),
        })
    }

    /// Goes on from what earlier rounds spent (a coordinator's predecessor).
    pub fn resume(&mut self, spent: PrivacySpent) -> Result<(), FederatedError> {
        if !(spent.rho.is_finite() && spent.rho >= 0.0) || (spent.rounds == 0) != (spent.rho == 0.0)
        {
            return Err(FederatedError::Invalid {
                field: "privacy_spent",
                value: format!("{} rounds, rho {}", spent.rounds, spent.rho),
                reason: "rho must be a finite number, above 0 exactly when rounds are",
            });
        }
        self.spent = spent;
        Ok(())
    }

    /// One more round spent.
    pub fn record_round(&mut self) {
        self.spent.rounds += 1;
        self.spent.rho += 1.0 / (2.0 * self.noise_multiplier * self.noise_multiplier);
    }

    pub fn rounds(&self) -> u64 {
        self.spent.rounds
    }

    pub fn spent(&self) -> PrivacySpent {
        self.spent
    }

    /// ε of `(ε, δ)`-DP for the rounds so far (0 before the first): the order-wise
    /// cost `α·ρ` plus `ln(1/δ) / (α − 1)`, minimised over `α`, is
    /// `ρ + 2·√(ρ·ln(1/δ))`.
    pub fn epsilon(&self) -> f64 {
        let rho = self.spent.rho;
        rho + 2.0 * (rho * (1.0 / self.delta).ln()).sqrt()
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
        let mut accountant = GaussianAccountant::new(1.0, 1e-5).unwrap();
        for spent in [
            PrivacySpent {
                rounds: 2,
                rho: f64::NAN,
            },
            PrivacySpent {
                rounds: 2,
                rho: -1.0,
            },
            PrivacySpent {
                rounds: 0,
                rho: 1.0,
            },
            PrivacySpent {
                rounds: 3,
                rho: 0.0,
            },
        ] {
            let refused = accountant.resume(spent).unwrap_err().to_string();
            assert!(refused.contains("privacy_spent"), "{refused}");
        }
    }

    #[test]
    fn a_resumed_accountant_goes_on_counting_across_noise_settings() {
        let mut first = GaussianAccountant::new(1.0, 1e-5).unwrap();
        for _ in 0..3 {
            first.record_round();
        }
        let mut next = GaussianAccountant::new(1.0, 1e-5).unwrap();
        next.resume(first.spent()).unwrap();
        next.record_round();
        assert_eq!(next.rounds(), 4);
        assert!((next.epsilon() - after(4, 1.0, 1e-5)).abs() < 1e-9);
        // Two rounds at z = 2 then two at z = 1 cost less than four at z = 1, more
        // than four at z = 2.
        let mut quieter = GaussianAccountant::new(2.0, 1e-5).unwrap();
        quieter.record_round();
        quieter.record_round();
        let mut louder = GaussianAccountant::new(1.0, 1e-5).unwrap();
        louder.resume(quieter.spent()).unwrap();
        louder.record_round();
        louder.record_round();
        assert!(louder.epsilon() < after(4, 1.0, 1e-5));
        assert!(louder.epsilon() > after(4, 2.0, 1e-5));
    }
}
