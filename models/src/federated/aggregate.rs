//! How a coordinator combines site updates into one.
//!
//! - **FedAvg** (McMahan et al. 2017): the mean weighted by each site's sample count.
//!   **FedProx** (Li et al. 2020) aggregates the same way; its proximal term `mu` acts
//!   in the sites' local training, which reads it from [`Aggregation::proximal_mu`].
//! - **Trimmed mean** (Yin et al. 2018): per coordinate, drop the `trim` share of the
//!   largest and of the smallest values, average the rest.
//! - **Median**: per coordinate, the median (the mean of the two middle values for an
//!   even count).
//! - **Krum** (Blanchard et al. 2017): the one update whose summed squared distance to
//!   its `n - f - 2` nearest others is smallest, tolerating `f` Byzantine sites when
//!   `n > 2f + 2`.
//!
//! The robust rules ignore sample counts: a site that lies about its data could lie
//! about its count too.

use serde::{Deserialize, Serialize};

use super::FederatedError;

/// How a round combines its site updates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum Aggregation {
    #[serde(rename = "fedavg")]
    FedAvg,
    #[serde(rename = "fedprox")]
    FedProx {
        mu: f64,
    },
    TrimmedMean {
        trim: f64,
    },
    Median,
    Krum {
        byzantine: usize,
    },
}

impl Aggregation {
    /// The rule's name as configs and reports write it (serde's tag says the same).
    pub fn name(&self) -> &'static str {
        match self {
            Aggregation::FedAvg => "fedavg",
            Aggregation::FedProx { .. } => "fedprox",
            Aggregation::TrimmedMean { .. } => "trimmed_mean",
            Aggregation::Median => "median",
            Aggregation::Krum { .. } => "krum",
        }
    }

    /// The weight of the proximal term `mu/2 · ‖w − w_global‖²` in local training.
    pub fn proximal_mu(&self) -> f64 {
        match self {
            Aggregation::FedProx { mu } => *mu,
            _ => 0.0,
        }
    }

    pub fn validate(&self) -> Result<(), FederatedError> {
        match *self {
            Aggregation::FedProx { mu } if !(mu.is_finite() && mu >= 0.0) => {
                Err(FederatedError::Invalid {
                    field: "mu",
                    value: mu.to_string(),
                    reason: "must be a finite number, at least 0",
                })
            }
            Aggregation::TrimmedMean { trim } if !(0.0..0.5).contains(&trim) => {
                Err(FederatedError::Invalid {
                    field: "trim",
                    value: trim.to_string(),
                    reason: "must be at least 0 and below 0.5 (the share cut from each end)",
                })
            }
            _ => Ok(()),
        }
    }
}

/// What one site sends for a round: its weight delta and how many samples it trained on.
#[derive(Debug, Clone, Copy)]
pub struct SiteUpdate<'a> {
    pub delta: &'a [f32],
    pub samples: u64,
}

/// Combines `updates` by `rule`. Every update must have the same length and finite
/// values; FedAvg and FedProx also need a positive sample count from each.
pub fn aggregate(
    rule: &Aggregation,
    updates: &[SiteUpdate<'_>],
) -> Result<Vec<f32>, FederatedError> {
    rule.validate()?;
    let first = updates.first().ok_or(FederatedError::NoUpdates)?;
    let len = first.delta.len();
    for (index, update) in updates.iter().enumerate() {
        if update.delta.len() != len {
            return Err(FederatedError::LengthMismatch {
                index,
                expected: len,
                got: update.delta.len(),
            });
        }
        if let Some((position, value)) = update
            .delta
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
        {
            return Err(FederatedError::NotFinite {
                index,
                position,
                value: *value,
            });
        }
    }
    match *rule {
        Aggregation::FedAvg | Aggregation::FedProx { .. } => weighted_mean(updates, len),
        Aggregation::TrimmedMean { trim } => {
            let cut = (trim * updates.len() as f64).floor() as usize;
            Ok(per_coordinate(updates, len, |column| {
                let kept = &column[cut..column.len() - cut];
                kept.iter().sum::<f64>() / kept.len() as f64
            }))
        }
        Aggregation::Median => Ok(per_coordinate(updates, len, |column| {
            let middle = column.len() / 2;
            if column.len() % 2 == 1 {
                column[middle]
            } else {
                (column[middle - 1] + column[middle]) / 2.0
            }
        })),
        Aggregation::Krum { byzantine } => krum(updates, byzantine),
    }
}

fn weighted_mean(updates: &[SiteUpdate<'_>], len: usize) -> Result<Vec<f32>, FederatedError> {
    if let Some(index) = updates.iter().position(|u| u.samples == 0) {
        return Err(FederatedError::NoSamples { index });
    }
    let total: f64 = updates.iter().map(|u| u.samples as f64).sum();
    let mut sum = vec![0f64; len];
    for update in updates {
        let weight = update.samples as f64 / total;
        for (s, v) in sum.iter_mut().zip(update.delta) {
            *s += weight * f64::from(*v);
        }
    }
    Ok(sum.into_iter().map(|v| v as f32).collect())
}

/// Applies `reduce` to each coordinate's values across the updates, sorted ascending.
fn per_coordinate(
    updates: &[SiteUpdate<'_>],
    len: usize,
    reduce: impl Fn(&[f64]) -> f64,
) -> Vec<f32> {
    let mut column = vec![0f64; updates.len()];
    (0..len)
        .map(|i| {
            for (c, update) in column.iter_mut().zip(updates) {
                *c = f64::from(update.delta[i]);
            }
            column.sort_by(f64::total_cmp);
            reduce(&column) as f32
        })
        .collect()
}

fn krum(updates: &[SiteUpdate<'_>], byzantine: usize) -> Result<Vec<f32>, FederatedError> {
    let n = updates.len();
    let needed = 2 * byzantine + 2;
    if n <= needed {
        return Err(FederatedError::TooFewUpdates {
            rule: "krum",
            needed,
            got: n,
        });
    }
    let neighbours = n - byzantine - 2;
    let distance = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
            .sum()
    };
    let mut best: Option<(f64, usize)> = None;
    for i in 0..n {
        let mut distances: Vec<f64> = (0..n)
            .filter(|j| *j != i)
            .map(|j| distance(updates[i].delta, updates[j].delta))
            .collect();
        distances.sort_by(f64::total_cmp);
        let score: f64 = distances[..neighbours].iter().sum();
        if best.is_none_or(|(b, _)| score < b) {
            best = Some((score, i));
        }
    }
    let (_, chosen) = best.ok_or(FederatedError::NoUpdates)?;
    Ok(updates[chosen].delta.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Regression: serde's tag was `fed_avg` while configs and reports say `fedavg`.
    #[test]
    fn a_config_names_each_rule_as_reports_do() {
        for rule in [
            Aggregation::FedAvg,
            Aggregation::FedProx { mu: 0.1 },
            Aggregation::TrimmedMean { trim: 0.1 },
            Aggregation::Median,
            Aggregation::Krum { byzantine: 1 },
        ] {
            let json = serde_json::to_value(rule).unwrap();
            assert_eq!(json["rule"], rule.name());
            assert_eq!(serde_json::from_value::<Aggregation>(json).unwrap(), rule);
        }
    }

    fn updates(rows: &[Vec<f32>]) -> Vec<SiteUpdate<'_>> {
        rows.iter()
            .map(|delta| SiteUpdate { delta, samples: 1 })
            .collect()
    }

    fn sites(n: std::ops::Range<usize>, len: usize) -> impl Strategy<Value = Vec<Vec<f32>>> {
        n.prop_flat_map(move |n| {
            proptest::collection::vec(proptest::collection::vec(-100f32..100.0, len), n)
        })
    }

    proptest! {
        #[test]
        fn fedavg_is_the_sample_weighted_mean(
            rows in sites(1..8, 5),
            counts in proptest::collection::vec(1u64..1000, 8),
        ) {
            let updates: Vec<SiteUpdate<'_>> = rows
                .iter()
                .zip(&counts)
                .map(|(delta, samples)| SiteUpdate { delta, samples: *samples })
                .collect();
            let merged = aggregate(&Aggregation::FedAvg, &updates).unwrap();
            let total: f64 = updates.iter().map(|u| u.samples as f64).sum();
            for (i, got) in merged.iter().enumerate() {
                let want: f64 = updates
                    .iter()
                    .map(|u| u.samples as f64 * f64::from(u.delta[i]))
                    .sum::<f64>()
                    / total;
                prop_assert!((f64::from(*got) - want).abs() < 1e-3, "{got} vs {want}");
            }
            let prox = aggregate(&Aggregation::FedProx { mu: 0.01 }, &updates).unwrap();
            prop_assert_eq!(prox, merged);
        }

        #[test]
        fn every_rule_ignores_the_order_of_the_sites(rows in sites(5..9, 4), seed: u64) {
            let mut shuffled = rows.clone();
            crate::SplitMix64::new(seed).shuffle(&mut shuffled);
            for rule in [
                Aggregation::FedAvg,
                Aggregation::TrimmedMean { trim: 0.2 },
                Aggregation::Median,
            ] {
                let a = aggregate(&rule, &updates(&rows)).unwrap();
                let b = aggregate(&rule, &updates(&shuffled)).unwrap();
                for (x, y) in a.iter().zip(&b) {
                    prop_assert!((x - y).abs() < 1e-3, "{}: {x} vs {y}", rule.name());
                }
            }
        }

        #[test]
        fn robust_rules_stay_within_each_coordinates_range(rows in sites(1..9, 6)) {
            for rule in [Aggregation::TrimmedMean { trim: 0.25 }, Aggregation::Median] {
                let merged = aggregate(&rule, &updates(&rows)).unwrap();
                for (i, v) in merged.iter().enumerate() {
                    let low = rows.iter().map(|r| r[i]).fold(f32::INFINITY, f32::min);
                    let high = rows.iter().map(|r| r[i]).fold(f32::NEG_INFINITY, f32::max);
                    prop_assert!(*v >= low - 1e-3 && *v <= high + 1e-3);
                }
            }
        }

        #[test]
        fn a_trimmed_mean_that_trims_nothing_is_the_plain_mean(rows in sites(1..8, 3)) {
            let trimmed = aggregate(&Aggregation::TrimmedMean { trim: 0.0 }, &updates(&rows)).unwrap();
            let mean = aggregate(&Aggregation::FedAvg, &updates(&rows)).unwrap();
            for (a, b) in trimmed.iter().zip(&mean) {
                prop_assert!((a - b).abs() < 1e-3);
            }
        }
    }

    /// Seven honest sites near the true update and two poisoned ones (sign flipped and
    /// scaled ×10): FedAvg is dragged away, the robust rules are not.
    #[test]
    fn poisoned_sites_move_fedavg_but_not_the_robust_rules() {
        let truth = [1.0f32, -2.0, 0.5, 3.0];
        let mut rng = crate::SplitMix64::new(7);
        let mut rows: Vec<Vec<f32>> = (0..7)
            .map(|_| {
                truth
                    .iter()
                    .map(|t| t + 0.05 * rng.normal() as f32)
                    .collect()
            })
            .collect();
        rows.push(truth.iter().map(|t| -10.0 * t).collect());
        rows.push(truth.iter().map(|t| -10.0 * t).collect());
        let error = |merged: &[f32]| -> f32 {
            merged
                .iter()
                .zip(&truth)
                .map(|(m, t)| (m - t).abs())
                .fold(0.0, f32::max)
        };
        let fedavg = aggregate(&Aggregation::FedAvg, &updates(&rows)).unwrap();
        assert!(error(&fedavg) > 3.0, "fedavg {fedavg:?}");
        for rule in [
            Aggregation::TrimmedMean { trim: 0.25 },
            Aggregation::Median,
            Aggregation::Krum { byzantine: 2 },
        ] {
            let merged = aggregate(&rule, &updates(&rows)).unwrap();
            assert!(error(&merged) < 0.2, "{}: {merged:?}", rule.name());
        }
    }

    #[test]
    fn bad_updates_are_named() {
        let a = vec![1.0f32, 2.0];
        let b = vec![1.0f32];
        let nan = vec![1.0f32, f32::NAN];
        let refused = |rows: &[Vec<f32>], rule: Aggregation| {
            aggregate(&rule, &updates(rows)).unwrap_err().to_string()
        };
        assert_eq!(
            aggregate(&Aggregation::FedAvg, &[]).unwrap_err(),
            FederatedError::NoUpdates
        );
        assert!(
            refused(&[a.clone(), b], Aggregation::FedAvg).contains("site update 1 has 1 values")
        );
        assert!(refused(&[a.clone(), nan], Aggregation::Median).contains("value 1 is NaN"));
        assert!(
            refused(&[a.clone(), a.clone()], Aggregation::Krum { byzantine: 1 })
                .contains("krum needs more than 4 updates, it got 2")
        );
        assert!(refused(
            std::slice::from_ref(&a),
            Aggregation::TrimmedMean { trim: 0.5 }
        )
        .contains("trim = 0.5"));
        let no_samples = [SiteUpdate {
            delta: &a,
            samples: 0,
        }];
        assert_eq!(
            aggregate(&Aggregation::FedAvg, &no_samples).unwrap_err(),
            FederatedError::NoSamples { index: 0 }
        );
    }
}
