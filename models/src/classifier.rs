//! The fault classifier: which fault a plant is in, not only that something is wrong
//! (diagnosis after detection). A window of process variables goes through two 1-D
//! convolutions over time and a global average, then a linear layer gives one logit
//! per class (class 0 is normal operation).
//!
//! The average over time makes the prediction depend on what the window shows, not
//! where in the window it shows it; two convolutions of width 5 see patterns spanning
//! 9 samples, a few minutes of a process sampled every 36 s. Trained with cross-entropy
//! through the same loop (split, early stopping, time cap) as the autoencoder.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, TchError, Tensor};

use crate::error::ModelError;
use crate::layout;
use crate::network::{self, Network};
use crate::training::{self, EpochReport, TrainOptions, TrainReport};

/// Sizes of the classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    pub channels: i64,
    pub window: i64,
    pub hidden: i64,
    pub classes: i64,
}

#[derive(Debug)]
pub struct FaultClassifier {
    config: ClassifierConfig,
    vs: nn::VarStore,
    conv1: nn::Conv1D,
    conv2: nn::Conv1D,
    head: nn::Linear,
}

impl FaultClassifier {
    /// A fresh classifier; `seed` fixes libtorch's generator for the initialisation.
    pub fn new(config: ClassifierConfig, device: Device, seed: i64) -> Result<Self, ModelError> {
        for (field, value) in [
            ("channels", config.channels),
            ("window", config.window),
            ("hidden", config.hidden),
            ("classes", config.classes),
        ] {
            if value <= 0 {
                return Err(ModelError::InvalidOption {
                    field,
                    value: value.to_string(),
                    reason: "must be positive".into(),
                });
            }
        }
        if config.classes < 2 {
            return Err(ModelError::InvalidOption {
                field: "classes",
                value: config.classes.to_string(),
                reason: "a classifier needs at least two classes".into(),
            });
        }
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(device);
        let conv = nn::ConvConfig {
            padding: 2,
            ..Default::default()
        };
        let root = vs.root();
        let conv1 = nn::conv1d(&root / "conv1", config.channels, config.hidden, 5, conv);
        let conv2 = nn::conv1d(&root / "conv2", config.hidden, config.hidden, 5, conv);
        let head = nn::linear(
            &root / "head",
            config.hidden,
            config.classes,
            Default::default(),
        );
        Ok(FaultClassifier {
            config,
            vs,
            conv1,
            conv2,
            head,
        })
    }

    /// The pooled features the head classifies, what a fusion expert takes from this
    /// model: `[batch, channels, window]` → `[batch, hidden]`.
    fn features(&self, windows: &Tensor) -> Result<Tensor, TchError> {
        layout::pooled_sensor_features(windows, &self.conv1, &self.conv2)
    }

    /// One logit per class: `[batch, channels, window]` → `[batch, classes]`.
    pub(crate) fn logits(&self, windows: &Tensor) -> Result<Tensor, TchError> {
        Ok(self.head.forward(&self.features(windows)?))
    }

    fn windows_tensor(&self, windows: &[f32]) -> Result<Tensor, ModelError> {
        let per_window = (self.config.channels * self.config.window) as usize;
        if windows.is_empty() || !windows.len().is_multiple_of(per_window) {
            return Err(ModelError::Shape {
                what: "classifier windows",
                expected: format!("a positive multiple of {per_window} values"),
                got: format!("{} values", windows.len()),
            });
        }
        if let Some(index) = windows.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                what: "classifier windows",
                index,
            });
        }
        Ok(Tensor::f_from_slice(windows)?
            .f_view([-1, self.config.channels, self.config.window])?
            .f_to_device(self.vs.device())?)
    }

    /// Trains on `windows` (channel-major, back to back) with one class per window.
    pub fn fit(
        &mut self,
        windows: &[f32],
        labels: &[i64],
        options: &TrainOptions,
        progress: &mut dyn FnMut(&EpochReport),
    ) -> Result<TrainReport, ModelError> {
        let data = self.windows_tensor(windows)?;
        let samples = data.size()[0] as usize;
        let targets = training::class_targets(
            labels,
            samples,
            self.config.classes,
            ("classifier labels", "window"),
            self.vs.device(),
        )?;
        let loss = |indices: &Tensor| {
            let batch = data.f_index_select(0, indices)?;
            let target = targets.f_index_select(0, indices)?;
            self.logits(&batch)?.f_cross_entropy_loss::<Tensor>(
                &target,
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )
        };
        training::train(&self.vs, samples, options, &loss, progress)
    }

    /// The most likely class of each window.
    pub fn predict(&self, windows: &[f32]) -> Result<Vec<i64>, ModelError> {
        let probabilities = self.predict_proba(windows)?;
        Ok(Vec::<i64>::try_from(&probabilities.f_argmax(1, false)?)?)
    }

    /// Class probabilities of each window, `[N, classes]` on the CPU.
    pub fn predict_proba(&self, windows: &[f32]) -> Result<Tensor, ModelError> {
        self.batched(windows, |chunk| {
            Ok(self.logits(chunk)?.f_softmax(1, Kind::Float)?)
        })
    }

    /// The pooled features of each window, `[N, hidden]` on the CPU.
    pub fn embed(&self, windows: &[f32]) -> Result<Tensor, ModelError> {
        self.batched(windows, |chunk| Ok(self.features(chunk)?))
    }

    fn batched(
        &self,
        windows: &[f32],
        f: impl Fn(&Tensor) -> Result<Tensor, ModelError>,
    ) -> Result<Tensor, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let x = self.windows_tensor(windows)?;
        // Batches bound the activations' memory on long recordings.
        let parts = x
            .split(1024, 0)
            .iter()
            .map(|chunk| Ok(f(chunk)?.f_to_device(Device::Cpu)?))
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Tensor::f_cat(&parts, 0)?)
    }
}

impl Network for FaultClassifier {
    type Config = ClassifierConfig;

    const WEIGHTS_ORIGIN: &'static str = "fault classifier weights";

    fn new(config: ClassifierConfig, device: Device, seed: i64) -> Result<Self, ModelError> {
        // Inherent associated functions take precedence: this is the constructor above.
        FaultClassifier::new(config, device, seed)
    }

    fn config(&self) -> &ClassifierConfig {
        &self.config
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
}

network::inherent_network_methods!(FaultClassifier, ClassifierConfig);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Class 0: noise; class 1: channel 0 raised; class 2: channel 1 oscillating.
    fn data(n: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
        let mut rng = SplitMix64::new(seed);
        let (channels, window) = (3, 16);
        let mut windows = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let class = (i % 3) as i64;
            for c in 0..channels {
                for t in 0..window {
                    let mut v = 0.3 * rng.normal();
                    if class == 1 && c == 0 {
                        v += 2.0;
                    }
                    if class == 2 && c == 1 {
                        v += 2.0 * (t as f64 * 1.5).sin();
                    }
                    windows.push(v as f32);
                }
            }
            labels.push(class);
        }
        (windows, labels)
    }

    #[test]
    fn separable_faults_are_told_apart() {
        let config = ClassifierConfig {
            channels: 3,
            window: 16,
            hidden: 16,
            classes: 3,
        };
        let mut model = FaultClassifier::new(config, Device::Cpu, 3).unwrap();
        let (windows, labels) = data(300, 1);
        let options = TrainOptions {
            epochs: 40,
            batch_size: 32,
            learning_rate: 5e-3,
            ..Default::default()
        };
        model.fit(&windows, &labels, &options, &mut |_| {}).unwrap();
        let (test, truth) = data(90, 2);
        let predicted = model.predict(&test).unwrap();
        let correct = predicted.iter().zip(&truth).filter(|(p, t)| p == t).count();
        assert!(correct >= 85, "{correct}/90 correct");
    }

    #[test]
    fn weights_round_trip_and_probabilities_sum_to_one() {
        let config = ClassifierConfig {
            channels: 3,
            window: 16,
            hidden: 8,
            classes: 3,
        };
        let model = FaultClassifier::new(config, Device::Cpu, 5).unwrap();
        let (windows, _) = data(7, 3);
        let (bytes, sha) = model.to_safetensors().unwrap();
        let copy =
            FaultClassifier::from_safetensors(config, &bytes, Some(&sha), Device::Cpu).unwrap();
        let p = model.predict_proba(&windows).unwrap();
        assert_eq!(p.size(), [7, 3]);
        assert_eq!(p, copy.predict_proba(&windows).unwrap());
        let sums =
            Vec::<f32>::try_from(p.sum_dim_intlist([1i64].as_slice(), false, Kind::Float)).unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        assert_eq!(model.embed(&windows).unwrap().size(), [7, 8]);
        let wider = ClassifierConfig {
            hidden: 9,
            ..config
        };
        assert!(FaultClassifier::from_safetensors(wider, &bytes, None, Device::Cpu).is_err());
    }

    #[test]
    fn bad_labels_and_shapes_are_refused() {
        let config = ClassifierConfig {
            channels: 3,
            window: 16,
            hidden: 4,
            classes: 3,
        };
        let mut model = FaultClassifier::new(config, Device::Cpu, 3).unwrap();
        let (windows, mut labels) = data(6, 1);
        let options = TrainOptions::default();
        labels[2] = 7;
        assert!(model.fit(&windows, &labels, &options, &mut |_| {}).is_err());
        assert!(model
            .fit(&windows, &labels[..3], &options, &mut |_| {})
            .is_err());
        assert!(model.predict(&windows[..10]).is_err());
        assert!(FaultClassifier::new(
            ClassifierConfig {
                classes: 1,
                ..config
            },
            Device::Cpu,
            0
        )
        .is_err());
    }
}
