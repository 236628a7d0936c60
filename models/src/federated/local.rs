//! A site's local work in a federated round: the round's global weights loaded into the
//! site's network, a few epochs of Adam on windows the site has seen (they never leave
//! it), and the difference between the weights after and the global ones.
//!
//! With a proximal weight `mu > 0` (FedProx, Li et al. 2020) the objective gains
//! `mu/2 · ‖w − w_global‖²`, which keeps a site with unusual data from walking far from
//! the others; it is continual learning's EWC penalty with a Fisher information of 1.
//! Local work trains the networks continual learning adapts (`conv_autoencoder`:
//! reconstruction, `fault_classifier`: cross-entropy on labelled windows).

use tch::{Device, Tensor};

use crate::continual::{Ewc, ReplayItem, Shadow};
use crate::error::ModelError;
use crate::merge::{MergeError, Weights};
use crate::served::Architecture;
use crate::training::{self, TrainOptions};

/// What a site does with the global weights each round (`[experts.federation.local]`
/// in a mesh spec, where the proximal weight comes from `aggregation` instead).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalWork {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// FedProx's proximal weight; 0 for plain FedAvg local work.
    #[serde(skip)]
    pub proximal_mu: f64,
    /// The batch order of round `r` comes from `seed + r`.
    pub seed: i64,
    /// A cap on one round's training, in seconds.
    pub max_seconds: Option<f64>,
}

impl Default for LocalWork {
    /// One epoch, batches of 32, Adam at 1e-3, no proximal term.
    fn default() -> Self {
        LocalWork {
            epochs: 1,
            batch_size: 32,
            learning_rate: 1e-3,
            proximal_mu: 0.0,
            seed: 7,
            max_seconds: None,
        }
    }
}

impl LocalWork {
    fn train_options(&self, round: u64) -> TrainOptions {
        TrainOptions {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            // Every window the site has trains; the loop keeps the epoch with the
            // lowest objective on them and runs the whole budget.
            validation_fraction: 0.0,
            patience: self.epochs.max(1),
            seed: self.seed.wrapping_add(round as i64),
            max_seconds: self.max_seconds,
        }
    }

    /// Refuses settings the training loop would refuse, naming the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.proximal_mu.is_finite() && self.proximal_mu >= 0.0) {
            return Err(ModelError::InvalidOption {
                field: "mu",
                value: self.proximal_mu.to_string(),
                reason: "must be a finite number, at least 0".into(),
            });
        }
        self.train_options(0).validate()
    }
}

/// What a site's local work produced.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalUpdate {
    /// Weights after minus the global weights, in [`Weights`] order.
    pub delta: Vec<f32>,
    /// Windows that took part in the loss: FedAvg's weight.
    pub samples: u64,
    /// The objective (loss plus proximal term) on the site's windows after the work.
    pub loss: f64,
}

/// Why a site could not do its part of a round.
#[derive(Debug, thiserror::Error)]
pub enum LocalTrainingError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the site's weights cannot be read back as a flat update: {0}")]
    Weights(#[from] MergeError),
}

/// Trains `architecture`'s network, starting from `global` (safetensors), on `items`;
/// windows without a label are skipped by a classifier.
pub fn train_locally(
    architecture: &Architecture,
    global: &[u8],
    items: &[ReplayItem],
    work: &LocalWork,
    round: u64,
    device: Device,
) -> Result<LocalUpdate, LocalTrainingError> {
    work.validate()?;
    let shadow = Shadow::build(architecture, global, None, device)?;
    shadow.check("site windows", items)?;
    let usable: Vec<&ReplayItem> = items.iter().filter(|i| shadow.usable(i)).collect();
    if usable.is_empty() {
        let unit = if shadow.classes().is_some() {
            "labelled window"
        } else {
            "window"
        };
        return Err(ModelError::Shape {
            what: "site windows",
            expected: format!("at least one {unit}"),
            got: format!("{} windows, none usable", items.len()),
        }
        .into());
    }
    let proximal = if work.proximal_mu > 0.0 {
        Some(Ewc::proximal(
            shadow.var_store().trainable_variables(),
            work.proximal_mu,
        )?)
    } else {
        None
    };
    let (data, targets) = shadow.batch(&usable, device)?;
    let objective = |indices: &Tensor| {
        let batch = data.f_index_select(0, indices)?;
        let target = targets
            .as_ref()
            .map(|t| t.f_index_select(0, indices))
            .transpose()?;
        let loss = shadow.loss(&batch, target.as_ref())?;
        match &proximal {
            Some(term) => loss.f_add(&term.penalty()?),
            None => Ok(loss),
        }
    };
    let report = training::train(
        shadow.var_store(),
        usable.len(),
        &work.train_options(round),
        &objective,
        &mut |_| {},
    )?;
    let before = Weights::from_safetensors(global, "the round's global weights")?;
    let (after, _) = shadow.to_safetensors()?;
    let after = Weights::from_safetensors(&after, "the site's trained weights")?;
    let delta = after
        .values()
        .iter()
        .zip(before.values())
        .map(|(a, b)| a - b)
        .collect();
    Ok(LocalUpdate {
        delta,
        samples: usable.len() as u64,
        loss: report.best_validation_loss,
    })
}

/// The mean loss of `architecture`'s network with `weights` on a site's held-out
/// `items` (federated evaluation), and how many windows it was measured on.
pub fn held_out_loss(
    architecture: &Architecture,
    weights: &[u8],
    items: &[ReplayItem],
    device: Device,
) -> Result<(f64, u64), LocalTrainingError> {
    let shadow = Shadow::build(architecture, weights, None, device)?;
    shadow.check("held-out windows", items)?;
    let usable: Vec<&ReplayItem> = items.iter().filter(|i| shadow.usable(i)).collect();
    if usable.is_empty() {
        return Err(ModelError::Shape {
            what: "held-out windows",
            expected: "at least one usable window".into(),
            got: format!("{} windows, none usable", items.len()),
        }
        .into());
    }
    Ok((shadow.mean_loss(&usable, device)?, usable.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::{ClassifierConfig, FaultClassifier};
    use crate::served::Classes;
    use crate::SplitMix64;

    fn classifier() -> (Architecture, Vec<u8>) {
        let config = ClassifierConfig {
            channels: 2,
            window: 8,
            hidden: 8,
            classes: 2,
        };
        let model = FaultClassifier::new(config, Device::Cpu, 3).unwrap();
        let (bytes, _) = model.to_safetensors().unwrap();
        let classes = Classes {
            names: vec!["normal".into(), "fault".into()],
            normal: 0,
        };
        (Architecture::FaultClassifier { config, classes }, bytes)
    }

    /// Class 1 windows sit at +1, class 0 at −1, with noise.
    fn items(n: usize, seed: u64) -> Vec<ReplayItem> {
        let mut rng = SplitMix64::new(seed);
        (0..n)
            .map(|i| {
                let label = (i % 2) as i64;
                let level = if label == 1 { 1.0 } else { -1.0 };
                ReplayItem {
                    window: (0..16).map(|_| level + 0.3 * rng.normal() as f32).collect(),
                    label: Some(label),
                }
            })
            .collect()
    }

    fn norm(values: &[f32]) -> f64 {
        values
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn local_work_moves_the_weights_and_the_proximal_term_holds_them_back() {
        let (architecture, global) = classifier();
        let data = items(64, 5);
        let work = LocalWork {
            epochs: 5,
            learning_rate: 1e-2,
            ..LocalWork::default()
        };
        let free = train_locally(&architecture, &global, &data, &work, 0, Device::Cpu).unwrap();
        let held = train_locally(
            &architecture,
            &global,
            &data,
            &LocalWork {
                proximal_mu: 10.0,
                ..work.clone()
            },
            0,
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(free.samples, 64);
        assert!(norm(&free.delta) > 0.0);
        assert!(
            norm(&held.delta) < 0.8 * norm(&free.delta),
            "proximal {} against free {}",
            norm(&held.delta),
            norm(&free.delta)
        );
        // The same round and seed give the same update.
        let again = train_locally(&architecture, &global, &data, &work, 0, Device::Cpu).unwrap();
        assert_eq!(again.delta, free.delta);
        // And the trained weights do better on windows of the same kind.
        let mut trained = Weights::from_safetensors(&global, "global").unwrap();
        for (w, d) in trained.values_mut().iter_mut().zip(&free.delta) {
            *w += d;
        }
        let (trained, _) = trained.to_safetensors().unwrap();
        let held = items(32, 9);
        let (before, n) = held_out_loss(&architecture, &global, &held, Device::Cpu).unwrap();
        let (after, _) = held_out_loss(&architecture, &trained, &held, Device::Cpu).unwrap();
        assert_eq!(n, 32);
        assert!(after < 0.5 * before, "held-out loss {before} -> {after}");
    }

    #[test]
    fn unlabelled_windows_and_bad_settings_are_refused_by_name() {
        let (architecture, global) = classifier();
        let unlabelled: Vec<ReplayItem> = items(4, 1)
            .into_iter()
            .map(|i| ReplayItem { label: None, ..i })
            .collect();
        let refused = train_locally(
            &architecture,
            &global,
            &unlabelled,
            &LocalWork::default(),
            0,
            Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(refused.contains("labelled window"), "{refused}");
        let refused = train_locally(
            &architecture,
            &global,
            &items(4, 1),
            &LocalWork {
                proximal_mu: -1.0,
                ..LocalWork::default()
            },
            0,
            Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(refused.contains("mu = -1"), "{refused}");
    }
}
