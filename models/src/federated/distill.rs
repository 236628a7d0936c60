//! Federated distillation: sites whose networks differ (a narrow classifier on an edge
//! gateway, a wide one in the cloud) cannot average weights, but they can agree on
//! what to say about the same windows (FedMD, Li & Wang 2019; FedDF, Lin et al. 2020).
//!
//! A round: every site gives its outputs on a shared set of unlabelled windows
//! ([`outputs_on`]: class probabilities, or an autoencoder's reconstructions); the
//! coordinator averages them, weighted by the sites' windows ([`consensus`]); every
//! site then trains on its own windows while matching the consensus on the shared
//! ones ([`distill_locally`]). Only outputs on the shared windows cross the mesh: no
//! weights, no site's own windows.

use std::path::Path;

use tch::{Device, Tensor};

use super::local::{LocalTrainingError, LocalWork};
use super::FederatedError;
use crate::autoencoder::ConvAutoencoder;
use crate::classifier::FaultClassifier;
use crate::continual::{ReplayItem, Shadow};
use crate::error::ModelError;
use crate::served::Architecture;
use crate::training;
use crate::weights::WeightFile;

/// A site's network after a distillation round.
#[derive(Debug, Clone, PartialEq)]
pub struct Distilled {
    /// The new weights, safetensors.
    pub weights: Vec<u8>,
    pub samples: u64,
    /// The objective (own loss plus weighted distillation loss) after the work.
    pub loss: f64,
}

/// The network's outputs on `shared`, flat, one row per window.
pub fn outputs_on(
    architecture: &Architecture,
    weights: &[u8],
    shared: &[ReplayItem],
    device: Device,
) -> Result<Vec<f32>, LocalTrainingError> {
    let shadow = Shadow::build(architecture, weights, None, device)?;
    shadow.check("shared windows", shared)?;
    let _no_grad = tch::no_grad_guard();
    let mut out = Vec::new();
    let items: Vec<&ReplayItem> = shared.iter().collect();
    for chunk in items.chunks(256) {
        let windows = shadow.windows(chunk, device)?;
        let outputs = shadow
            .outputs(&windows)
            .and_then(|o| o.f_to_device(Device::Cpu))
            .and_then(|o| o.f_flatten(0, -1))
            .map_err(ModelError::from)?;
        out.extend(Vec::<f32>::try_from(&outputs).map_err(ModelError::from)?);
    }
    Ok(out)
}

/// Puts a noised consensus back among the outputs `architecture` can give: a
/// classifier's class probabilities, per window, clamped at 0 and scaled to sum to 1
/// (uniform where noise left none above 0); an autoencoder's reconstructions as they
/// are. Post-processing: it costs no privacy.
pub fn onto_outputs(architecture: &Architecture, values: &mut [f32]) {
    let Architecture::FaultClassifier { config, .. } = architecture else {
        return;
    };
    let classes = config.classes.max(1) as usize;
    for window in values.chunks_mut(classes) {
        window.iter_mut().for_each(|v| *v = v.max(0.0));
        let sum: f32 = window.iter().sum();
        let n = window.len() as f32;
        window
            .iter_mut()
            .for_each(|v| *v = if sum > 0.0 { *v / sum } else { 1.0 / n });
    }
}

/// The sites' outputs averaged, each weighted by its windows.
pub fn consensus(outputs: &[(&[f32], u64)]) -> Result<Vec<f32>, FederatedError> {
    let (first, _) = outputs.first().ok_or(FederatedError::NoUpdates)?;
    let total: f64 = outputs.iter().map(|(_, w)| *w as f64).sum();
    let mut sum = vec![0f64; first.len()];
    for (index, (values, weight)) in outputs.iter().enumerate() {
        if values.len() != first.len() {
            return Err(FederatedError::LengthMismatch {
                index,
                expected: first.len(),
                got: values.len(),
            });
        }
        if *weight == 0 {
            return Err(FederatedError::NoSamples { index });
        }
        if let Some((position, value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(FederatedError::NotFinite {
                index,
                position,
                value: *value,
            });
        }
        let share = *weight as f64 / total;
        for (s, v) in sum.iter_mut().zip(values.iter()) {
            *s += share * f64::from(*v);
        }
    }
    Ok(sum.into_iter().map(|v| v as f32).collect())
}

/// Most shared windows a distillation federation takes: every round sends them to
/// every site.
pub const MAX_SHARED_WINDOWS: usize = 4096;

/// The tensor of a shared-windows file.
pub const SHARED_TENSOR: &str = "windows";

/// A distillation federation's shared windows from a safetensors file: one f32
/// tensor `windows` of shape `[n, channels, length]` or `[n, channels × length]`
/// matching `input` (`[channels, length]`), with 1 ≤ n ≤ [`MAX_SHARED_WINDOWS`].
pub fn read_shared(path: &Path, input: [i64; 2]) -> Result<Vec<ReplayItem>, ModelError> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ModelError::Weights {
        origin: origin.clone(),
        reason: format!("cannot read the shared windows: {e}"),
    })?;
    let file = WeightFile::parse(&bytes, None, &origin)?;
    let shape = file.shape(SHARED_TENSOR)?;
    let per_window = (input[0] * input[1]) as usize;
    let n = shape.first().copied().unwrap_or(0);
    let fits = match shape.as_slice() {
        [_, values] => *values == per_window,
        [_, channels, length] => [*channels as i64, *length as i64] == input,
        _ => false,
    };
    if !fits || !(1..=MAX_SHARED_WINDOWS).contains(&n) {
        return Err(ModelError::TensorShape {
            origin,
            name: SHARED_TENSOR.into(),
            expected: format!(
                "[n, {}, {}] or [n, {per_window}] with 1 <= n <= {MAX_SHARED_WINDOWS}",
                input[0], input[1]
            ),
            got: format!("{shape:?}"),
        });
    }
    let dims: Vec<i64> = shape.iter().map(|d| *d as i64).collect();
    let values = file.values(SHARED_TENSOR, &dims)?;
    Ok(values
        .chunks(per_window)
        .map(|window| ReplayItem {
            window: window.to_vec(),
            label: None,
        })
        .collect())
}

/// Newly initialised weights of `architecture` (a site whose network differs from the
/// federation's starts from these), safetensors.
pub fn initial_weights(
    architecture: &Architecture,
    seed: i64,
    device: Device,
) -> Result<Vec<u8>, LocalTrainingError> {
    let bytes = match architecture {
        Architecture::ConvAutoencoder(config) => {
            ConvAutoencoder::new(config.clone(), device, seed)?
                .to_safetensors()?
                .0
        }
        Architecture::FaultClassifier { config, .. } => {
            FaultClassifier::new(*config, device, seed)?
                .to_safetensors()?
                .0
        }
        other => {
            return Err(ModelError::InvalidOption {
                field: "architecture",
                value: other.manifest_fields().0,
                reason: "only conv_autoencoder and fault_classifier are distilled".into(),
            }
            .into())
        }
    };
    Ok(bytes)
}

/// Trains the site's network (`weights`) on its own windows, plus `distill_weight` ×
/// the distance between its outputs on `shared` and `consensus` (as [`outputs_on`]
/// lays them out). Each step takes a batch of own windows and the same number of
/// shared ones. With no own windows (a coordinator distilling the consensus into the
/// federation's network, FedDF's server step) only the distance is trained, over the
/// shared windows.
#[allow(clippy::too_many_arguments)]
pub fn distill_locally(
    architecture: &Architecture,
    weights: &[u8],
    own: &[ReplayItem],
    shared: &[ReplayItem],
    consensus: &[f32],
    distill_weight: f64,
    work: &LocalWork,
    round: u64,
    device: Device,
) -> Result<Distilled, LocalTrainingError> {
    work.validate()?;
    if !(distill_weight.is_finite() && distill_weight >= 0.0) {
        return Err(ModelError::InvalidOption {
            field: "distill_weight",
            value: distill_weight.to_string(),
            reason: "must be a finite number, at least 0".into(),
        }
        .into());
    }
    let shadow = Shadow::build(architecture, weights, None, device)?;
    shadow.check("site windows", own)?;
    shadow.check("shared windows", shared)?;
    let own: Vec<&ReplayItem> = own.iter().filter(|i| shadow.usable(i)).collect();
    let server = own.is_empty() && distill_weight > 0.0;
    if (own.is_empty() && !server) || shared.is_empty() {
        return Err(ModelError::Shape {
            what: "distillation windows",
            expected: "at least one shared window, and one usable own window unless only the consensus is matched".into(),
            got: format!("{} own, {} shared", own.len(), shared.len()),
        }
        .into());
    }
    let shared_refs: Vec<&ReplayItem> = shared.iter().collect();
    let shared_windows = shadow.windows(&shared_refs, device)?;
    let per_window = consensus.len() / shared.len();
    if per_window == 0 || per_window * shared.len() != consensus.len() {
        return Err(ModelError::Shape {
            what: "consensus",
            expected: format!(
                "a whole number of outputs for each of {} windows",
                shared.len()
            ),
            got: format!("{} values", consensus.len()),
        }
        .into());
    }
    let mut shape = shadow
        .outputs(&shared_windows.f_narrow(0, 0, 1).map_err(ModelError::from)?)
        .map_err(ModelError::from)?
        .size();
    shape[0] = shared.len() as i64;
    let targets = Tensor::f_from_slice(consensus)
        .and_then(|t| t.f_view(shape.as_slice()))
        .and_then(|t| t.f_to_device(device))
        .map_err(ModelError::from)?;
    let own_batch = if server {
        None
    } else {
        Some(shadow.batch(&own, device)?)
    };
    let n_shared = shared.len() as i64;
    let objective = |indices: &Tensor| {
        // The same positions, wrapped onto the shared windows.
        let picked = indices.f_remainder(n_shared)?;
        let distance = shadow
            .distillation_loss(
                &shared_windows.f_index_select(0, &picked)?,
                &targets.f_index_select(0, &picked)?,
            )?
            .f_mul_scalar(distill_weight)?;
        let Some((data, labels)) = &own_batch else {
            return Ok(distance);
        };
        let target = labels
            .as_ref()
            .map(|t| t.f_index_select(0, indices))
            .transpose()?;
        let own_loss = shadow.loss(&data.f_index_select(0, indices)?, target.as_ref())?;
        own_loss.f_add(&distance)
    };
    let samples = if server { shared.len() } else { own.len() };
    let options = training::TrainOptions {
        epochs: work.epochs,
        batch_size: work.batch_size,
        learning_rate: work.learning_rate,
        validation_fraction: 0.0,
        patience: work.epochs.max(1),
        seed: work.seed.wrapping_add(round as i64),
        max_seconds: work.max_seconds,
    };
    let report = training::train(
        shadow.var_store(),
        samples,
        &options,
        &objective,
        &mut |_| {},
    )?;
    let (weights, _) = shadow.to_safetensors()?;
    Ok(Distilled {
        weights,
        samples: samples as u64,
        loss: report.best_validation_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::{ClassifierConfig, FaultClassifier};
    use crate::served::Classes;
    use crate::SplitMix64;

    fn classifier(hidden: i64, seed: i64) -> (Architecture, Vec<u8>) {
        let config = ClassifierConfig {
            channels: 2,
            window: 8,
            hidden,
            classes: 3,
        };
        let (bytes, _) = FaultClassifier::new(config, Device::Cpu, seed)
            .unwrap()
            .to_safetensors()
            .unwrap();
        let classes = Classes {
            names: vec!["normal".into(), "a".into(), "b".into()],
            normal: 0,
        };
        (Architecture::FaultClassifier { config, classes }, bytes)
    }

    /// Class c's windows sit at level c − 1, with noise.
    fn items(classes: &[i64], n: usize, seed: u64, labelled: bool) -> Vec<ReplayItem> {
        let mut rng = SplitMix64::new(seed);
        (0..n)
            .map(|i| {
                let class = classes[i % classes.len()];
                ReplayItem {
                    window: (0..16)
                        .map(|_| (class as f64 - 1.0 + 0.2 * rng.normal()) as f32)
                        .collect(),
                    label: labelled.then_some(class),
                }
            })
            .collect()
    }

    fn accuracy(architecture: &Architecture, weights: &[u8], test: &[ReplayItem]) -> f64 {
        let Architecture::FaultClassifier { config, .. } = architecture else {
            panic!("a classifier")
        };
        let model = FaultClassifier::from_safetensors(*config, weights, None, Device::Cpu).unwrap();
        let windows: Vec<f32> = test.iter().flat_map(|i| i.window.clone()).collect();
        let predicted = model.predict(&windows).unwrap();
        let right = predicted
            .iter()
            .zip(test)
            .filter(|(p, i)| Some(**p) == i.label)
            .count();
        right as f64 / test.len() as f64
    }

    /// Two sites of different widths, each seeing normal operation and one fault of
    /// its own: alone, neither knows the other's fault; after distillation rounds on
    /// shared unlabelled windows each classifies both.
    #[test]
    fn sites_of_different_widths_learn_each_others_classes() {
        let sites = [
            (classifier(8, 1), items(&[0, 1], 60, 1, true)),
            (classifier(24, 2), items(&[0, 2], 60, 2, true)),
        ];
        let shared = items(&[0, 1, 2], 30, 3, false);
        let test = items(&[0, 1, 2], 90, 4, true);
        let work = LocalWork {
            epochs: 3,
            batch_size: 16,
            learning_rate: 1e-2,
            ..LocalWork::default()
        };
        let mut weights: Vec<Vec<u8>> = sites.iter().map(|((_, w), _)| w.clone()).collect();
        let mut alone = weights.clone();
        for round in 0..6 {
            let outputs: Vec<Vec<f32>> = sites
                .iter()
                .zip(&weights)
                .map(|(((a, _), _), w)| outputs_on(a, w, &shared, Device::Cpu).unwrap())
                .collect();
            let agreed = consensus(&[(&outputs[0], 60), (&outputs[1], 60)]).unwrap();
            for (i, ((architecture, _), own)) in sites.iter().enumerate() {
                let distilled = distill_locally(
                    architecture,
                    &weights[i],
                    own,
                    &shared,
                    &agreed,
                    1.0,
                    &work,
                    round,
                    Device::Cpu,
                )
                .unwrap();
                weights[i] = distilled.weights;
                alone[i] = distill_locally(
                    architecture,
                    &alone[i],
                    own,
                    &shared,
                    &agreed,
                    0.0,
                    &work,
                    round,
                    Device::Cpu,
                )
                .unwrap()
                .weights;
            }
        }
        for (i, ((architecture, _), _)) in sites.iter().enumerate() {
            let (together, by_itself) = (
                accuracy(architecture, &weights[i], &test),
                accuracy(architecture, &alone[i], &test),
            );
            assert!(by_itself < 0.7, "site {i} alone: {by_itself}");
            assert!(together > 0.9, "site {i} distilled: {together}");
        }
    }

    #[test]
    fn shared_windows_are_read_in_either_shape_and_a_wrong_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f32> = (0..3 * 16).map(|v| v as f32).collect();
        let write = |name: &str, shape: &[i64]| {
            let path = dir.path().join(name);
            let tensor = Tensor::from_slice(&values).view(shape);
            Tensor::write_safetensors(&[(SHARED_TENSOR, &tensor)], &path).unwrap();
            path
        };
        for shape in [[3, 2, 8].as_slice(), [3, 16].as_slice()] {
            let shared = read_shared(&write("ok.safetensors", shape), [2, 8]).unwrap();
            assert_eq!(shared.len(), 3);
            assert_eq!(shared[1].window, values[16..32]);
            assert!(shared.iter().all(|w| w.label.is_none()));
        }
        let refused = read_shared(&write("wide.safetensors", &[2, 24]), [2, 8])
            .unwrap_err()
            .to_string();
        for words in ["windows", "[2, 24]", "[n, 2, 8] or [n, 16]", "4096"] {
            assert!(refused.contains(words), "{refused} lacks {words}");
        }
        let missing = read_shared(&dir.path().join("none.safetensors"), [2, 8]).unwrap_err();
        assert!(missing
            .to_string()
            .contains("cannot read the shared windows"));
    }

    #[test]
    fn only_the_networks_distillation_trains_take_another_width() {
        let (architecture, _) = classifier(8, 1);
        let wide = architecture.with_hidden(24).unwrap();
        let Architecture::FaultClassifier { config, .. } = &wide else {
            panic!("a classifier")
        };
        assert_eq!(config.hidden, 24);
        assert!(initial_weights(&wide, 1, Device::Cpu).is_ok());
        let refused = architecture.with_hidden(0).unwrap_err().to_string();
        assert!(refused.contains("hidden") && refused.contains("between 1 and 4096"));
    }

    #[test]
    fn a_consensus_is_the_weighted_mean_and_mismatched_outputs_are_named() {
        let agreed = consensus(&[(&[1.0, 0.0], 3), (&[0.0, 1.0], 1)]).unwrap();
        assert_eq!(agreed, vec![0.75, 0.25]);
        let refused = consensus(&[(&[1.0, 0.0], 3), (&[0.0], 1)]).unwrap_err();
        assert!(matches!(
            refused,
            FederatedError::LengthMismatch { index: 1, .. }
        ));
    }

    #[test]
    fn a_noised_consensus_goes_back_to_probabilities_for_a_classifier_only() {
        let classifier = Architecture::FaultClassifier {
            config: crate::classifier::ClassifierConfig {
                channels: 2,
                window: 8,
                hidden: 4,
                classes: 3,
            },
            classes: crate::served::Classes {
                names: vec!["normal".into(), "leak".into(), "clog".into()],
                normal: 0,
            },
        };
        let mut noised = vec![0.5, -0.25, 1.5, -1.0, -2.0, -0.5];
        onto_outputs(&classifier, &mut noised);
        assert_eq!(noised, [0.25, 0.0, 0.75, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]);
        let autoencoder = Architecture::ConvAutoencoder(crate::AutoencoderConfig::w1(2, 8));
        let mut reconstructions = vec![-0.5, 2.0];
        onto_outputs(&autoencoder, &mut reconstructions);
        assert_eq!(reconstructions, [-0.5, 2.0]);
    }
}
