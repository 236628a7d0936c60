//! The coordinator's side of a round: the sites' encoded updates decoded, clipped and
//! noised when the round is private, discounted when they are stale, and combined by
//! the round's rule into one delta for the global weights.
//!
//! - **Privacy** (DP-FedAvg, McMahan et al. 2018): each site's update is clipped to
//!   `clip_norm`, the updates are averaged with equal weights, and the average gets
//!   Gaussian noise of `noise_multiplier · clip_norm / sites`. Equal weights, because a
//!   weight by sample count would let one site's share of the average, and so the noise
//!   needed to hide it, grow with its data. Only the averaging rules take noise: the
//!   sensitivity of a median or of Krum's pick is not the mean's.
//! - **Server momentum** (FedAvgM, Hsu et al. 2019): with `momentum` β > 0 the
//!   coordinator applies `v ← β·v + Δ` instead of `Δ`, which carries progress across
//!   rounds when the sites' data differ and each round's average points a little
//!   differently.
//! - **Staleness** (FedBuff, Nguyen et al. 2022): an update computed from weights
//!   `τ` versions old is scaled by `1/√(1 + τ)` before it is combined; a synchronous
//!   round's updates all have `τ = 0`.

use serde::{Deserialize, Serialize};

use super::{add_noise, clip, SiteUpdate};
use super::{
    aggregate, decode, Aggregation, EncodedUpdate, FederatedError, GaussianAccountant, PrivacySpent,
};
use crate::SplitMix64;

/// Differential privacy for every round of a federation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    /// δ of the `(ε, δ)` the accountant reports.
    #[serde(default = "Privacy::default_delta")]
    pub delta: f64,
}

impl Privacy {
    fn default_delta() -> f64 {
        1e-5
    }
}

/// One site's (or one lower-level aggregator's) part of a round.
#[derive(Debug, Clone)]
pub struct Contribution {
    pub update: EncodedUpdate,
    pub samples: u64,
    /// How many versions of the global weights were applied after the ones this update
    /// started from.
    pub staleness: u64,
}

/// A round's combined update.
#[derive(Debug, Clone, PartialEq)]
pub struct Combined {
    pub delta: Vec<f32>,
    /// The contributions' samples together: the weight of this aggregate one level up.
    pub samples: u64,
    pub contributions: usize,
}

/// What a coordinator keeps from round to round: the rule, the privacy accountant and
/// the noise generator (seeded, so a federation's rounds repeat bit for bit).
#[derive(Debug, Clone)]
pub struct RoundAggregator {
    aggregation: Aggregation,
    privacy: Option<(Privacy, GaussianAccountant)>,
    seed: u64,
    rng: SplitMix64,
    momentum: f64,
    velocity: Vec<f32>,
}

impl RoundAggregator {
    pub fn new(
        aggregation: Aggregation,
        privacy: Option<Privacy>,
        seed: u64,
    ) -> Result<Self, FederatedError> {
        aggregation.validate()?;
        let privacy = match privacy {
            None => None,
            Some(privacy) => {
                if !(privacy.clip_norm.is_finite() && privacy.clip_norm > 0.0) {
                    return Err(FederatedError::Invalid {
                        field: "clip_norm",
                        value: privacy.clip_norm.to_string(),
                        reason: "must be a finite number above 0",
                    });
                }
                if !matches!(
                    aggregation,
                    Aggregation::FedAvg | Aggregation::FedProx { .. }
                ) {
                    return Err(FederatedError::Invalid {
                        field: "aggregation",
                        value: aggregation.name().to_string(),
                        reason: "differential privacy calibrates its noise to a mean: use fedavg or fedprox",
                    });
                }
                let accountant = GaussianAccountant::new(privacy.noise_multiplier, privacy.delta)?;
                Some((privacy, accountant))
            }
        };
        Ok(RoundAggregator {
            aggregation,
            privacy,
            seed,
            rng: SplitMix64::new(seed),
            momentum: 0.0,
            velocity: Vec::new(),
        })
    }

    /// Server momentum β in [0, 1); 0 applies each round's combined update as it is.
    pub fn with_momentum(mut self, momentum: f64) -> Result<Self, FederatedError> {
        if !(0.0..1.0).contains(&momentum) {
            return Err(FederatedError::Invalid {
                field: "server_momentum",
                value: momentum.to_string(),
                reason: "must be at least 0 and below 1",
            });
        }
        self.momentum = momentum;
        Ok(self)
    }

    pub fn aggregation(&self) -> &Aggregation {
        &self.aggregation
    }

    /// ε spent by the rounds combined so far; `None` without privacy.
    pub fn epsilon(&self) -> Option<f64> {
        self.privacy.as_ref().map(|(_, a)| a.epsilon())
    }

    /// What the private rounds combined so far spent, this aggregator's predecessors'
    /// included; `None` without privacy.
    pub fn privacy_spent(&self) -> Option<PrivacySpent> {
        self.privacy.as_ref().map(|(_, a)| a.spent())
    }

    /// Goes on from a predecessor's spending (without privacy, nothing to resume). The
    /// noise restarts from a stream of the seed and the rounds spent, so a coordinator
    /// started again never adds the noise its predecessor already added to another
    /// aggregate (two releases with the same noise would give away their difference).
    pub fn resume_privacy(&mut self, spent: PrivacySpent) -> Result<(), FederatedError> {
        if let Some((_, accountant)) = &mut self.privacy {
            accountant.resume(spent)?;
            self.rng =
                SplitMix64::new(self.seed ^ spent.rounds.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        Ok(())
    }

    /// Decodes and combines `contributions`; with privacy, spends one round.
    pub fn combine(&mut self, contributions: &[Contribution]) -> Result<Combined, FederatedError> {
        if contributions.is_empty() {
            return Err(FederatedError::NoUpdates);
        }
        let mut deltas = contributions
            .iter()
            .map(|c| decode(&c.update))
            .collect::<Result<Vec<_>, _>>()?;
        for (delta, contribution) in deltas.iter_mut().zip(contributions) {
            if let Some((privacy, _)) = &self.privacy {
                clip(delta, privacy.clip_norm);
            }
            if contribution.staleness > 0 {
                let discount = (1.0 / (1.0 + contribution.staleness as f64).sqrt()) as f32;
                delta.iter_mut().for_each(|v| *v *= discount);
            }
        }
        let private = self.privacy.is_some();
        let updates: Vec<SiteUpdate<'_>> = deltas
            .iter()
            .zip(contributions)
            .map(|(delta, c)| SiteUpdate {
                delta,
                samples: if private { 1 } else { c.samples },
            })
            .collect();
        let mut delta = aggregate(&self.aggregation, &updates)?;
        if let Some((privacy, accountant)) = &mut self.privacy {
            let std = privacy.noise_multiplier * privacy.clip_norm / contributions.len() as f64;
            add_noise(&mut delta, std, &mut self.rng);
            accountant.record_round();
        }
        if self.momentum > 0.0 {
            if self.velocity.len() != delta.len() {
                self.velocity = vec![0.0; delta.len()];
            }
            let beta = self.momentum as f32;
            for (v, d) in self.velocity.iter_mut().zip(delta.iter_mut()) {
                *v = beta * *v + *d;
                *d = *v;
            }
        }
        Ok(Combined {
            delta,
            samples: contributions.iter().map(|c| c.samples).sum(),
            contributions: contributions.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federated::{Compression, Compressor};

    fn contribution(delta: &[f32], samples: u64, staleness: u64) -> Contribution {
        Contribution {
            update: Compressor::new(Compression::None).compress(delta),
            samples,
            staleness,
        }
    }

    #[test]
    fn a_plain_round_is_the_weighted_mean_and_stale_updates_count_less() {
        let mut aggregator = RoundAggregator::new(Aggregation::FedAvg, None, 1).unwrap();
        let combined = aggregator
            .combine(&[
                contribution(&[1.0, 0.0], 3, 0),
                contribution(&[0.0, 1.0], 1, 0),
            ])
            .unwrap();
        assert_eq!(combined.delta, vec![0.75, 0.25]);
        assert_eq!((combined.samples, combined.contributions), (4, 2));
        // Three versions stale: scaled by 1/2.
        let stale = aggregator
            .combine(&[contribution(&[2.0, 4.0], 1, 3)])
            .unwrap();
        assert_eq!(stale.delta, vec![1.0, 2.0]);
        assert_eq!(aggregator.epsilon(), None);
    }

    #[test]
    fn a_private_round_clips_weighs_sites_equally_adds_noise_and_spends_epsilon() {
        let privacy = Privacy {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            delta: 1e-5,
        };
        let sites = 50;
        // Every site sends a 10-long update of norm 10 along the first axis; clipped to
        // norm 1, averaged, so the mean is (1, 0, ...) and the noise's std is 1/50.
        let updates: Vec<Contribution> = (0..sites)
            .map(|i| {
                let mut delta = vec![0f32; 10_000];
                delta[0] = 10.0;
                contribution(&delta, 1 + i as u64 * 100, 0)
            })
            .collect();
        let mut aggregator = RoundAggregator::new(Aggregation::FedAvg, Some(privacy), 9).unwrap();
        let combined = aggregator.combine(&updates).unwrap();
        assert!(
            (combined.delta[0] - 1.0).abs() < 0.1,
            "{}",
            combined.delta[0]
        );
        let rest = &combined.delta[1..];
        let std =
            (rest.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / rest.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.002, "noise std {std}");
        assert!((aggregator.epsilon().unwrap() - 5.2985).abs() < 1e-3);
        let refused = RoundAggregator::new(Aggregation::Median, Some(privacy), 1)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("aggregation = median"), "{refused}");
        let refused = RoundAggregator::new(
            Aggregation::FedAvg,
            Some(Privacy {
                clip_norm: 0.0,
                ..privacy
            }),
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(refused.contains("clip_norm = 0"), "{refused}");
    }

    #[test]
    fn momentum_carries_earlier_rounds_forward() {
        let mut aggregator = RoundAggregator::new(Aggregation::FedAvg, None, 1)
            .unwrap()
            .with_momentum(0.5)
            .unwrap();
        let first = aggregator.combine(&[contribution(&[1.0], 1, 0)]).unwrap();
        let second = aggregator.combine(&[contribution(&[1.0], 1, 0)]).unwrap();
        assert_eq!((first.delta[0], second.delta[0]), (1.0, 1.5));
        let refused = RoundAggregator::new(Aggregation::FedAvg, None, 1)
            .unwrap()
            .with_momentum(1.0)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("server_momentum = 1"), "{refused}");
    }

    #[test]
    fn the_same_seed_gives_the_same_noise() {
        let privacy = Privacy {
            clip_norm: 1.0,
            noise_multiplier: 0.5,
            delta: 1e-5,
        };
        let run = || {
            let mut aggregator =
                RoundAggregator::new(Aggregation::FedAvg, Some(privacy), 4).unwrap();
            aggregator
                .combine(&[
                    contribution(&[0.5; 32], 1, 0),
                    contribution(&[0.1; 32], 1, 0),
                ])
                .unwrap()
                .delta
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn a_resumed_aggregator_counts_on_and_never_repeats_its_predecessors_noise() {
        let privacy = Privacy {
            clip_norm: 1.0,
            noise_multiplier: 0.5,
            delta: 1e-5,
        };
        let round = [contribution(&[0.0; 32], 1, 0)];
        let mut first = RoundAggregator::new(Aggregation::FedAvg, Some(privacy), 4).unwrap();
        let first_noise = first.combine(&round).unwrap().delta;
        first.combine(&round).unwrap();
        let spent = first.privacy_spent().unwrap();
        assert_eq!(spent.rounds, 2);
        let mut next = RoundAggregator::new(Aggregation::FedAvg, Some(privacy), 4).unwrap();
        next.resume_privacy(spent).unwrap();
        let next_noise = next.combine(&round).unwrap().delta;
        assert_ne!(next_noise, first_noise);
        assert_eq!(next.privacy_spent().unwrap().rounds, 3);
        assert!(next.epsilon().unwrap() > first.epsilon().unwrap());
        let mut plain = RoundAggregator::new(Aggregation::FedAvg, None, 4).unwrap();
        plain.resume_privacy(spent).unwrap();
        assert_eq!(plain.privacy_spent(), None);
    }
}
