//! The multimodal expert: one decision for one asset from its sensor window and the
//! embedding of the last operator note or alarm text about it.
//!
//! Two branches meet in one head: the sensor window goes through the fault classifier's
//! trunk (two 1-D convolutions over time, then the mean over time), the note's sentence
//! embedding (MiniLM, 384 wide, computed outside and frozen) through one dense layer;
//! their features are concatenated and a linear layer gives one logit per class.
//!
//! Why train the branches together rather than average two classifiers' outputs: the
//! modalities fail on different classes (the sensors confuse faults the controller
//! hides, notes confuse faults with the same symptom), and a joint head learns which
//! branch to trust for which pattern. While training, each example drops one whole
//! branch with probability `modality_dropout` (its features are zeroed), so the head
//! does not lean on one modality alone and still decides when a note says little.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, TchError, Tensor};

use crate::error::ModelError;
use crate::layout;
use crate::network::{self, Network};
use crate::training::{self, EpochReport, TrainOptions, TrainReport};

/// Sizes of the fusion classifier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusionConfig {
    /// Sensor window: channels × window samples.
    pub channels: i64,
    pub window: i64,
    /// Width of the text embedding (384 for MiniLM).
    pub text: i64,
    /// Features per branch.
    pub hidden: i64,
    pub classes: i64,
    /// Chance, per training example, that one branch is zeroed.
    pub modality_dropout: f64,
}

impl FusionConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        for (field, value) in [
            ("channels", self.channels),
            ("window", self.window),
            ("text", self.text),
            ("hidden", self.hidden),
        ] {
            if value <= 0 {
                return Err(ModelError::InvalidOption {
                    field,
                    value: value.to_string(),
                    reason: "must be positive".into(),
                });
            }
        }
        if self.classes < 2 {
            return Err(ModelError::InvalidOption {
                field: "classes",
                value: self.classes.to_string(),
                reason: "a classifier needs at least two classes".into(),
            });
        }
        if !(0.0..1.0).contains(&self.modality_dropout) {
            return Err(ModelError::InvalidOption {
                field: "modality_dropout",
                value: self.modality_dropout.to_string(),
                reason: "must be in [0, 1)".into(),
            });
        }
        Ok(())
    }

    fn sensor_len(&self) -> usize {
        (self.channels * self.window) as usize
    }
}

#[derive(Debug)]
pub struct FusionClassifier {
    config: FusionConfig,
    vs: nn::VarStore,
    conv1: nn::Conv1D,
    conv2: nn::Conv1D,
    text: nn::Linear,
    head: nn::Linear,
}

impl FusionClassifier {
    pub fn new(config: FusionConfig, device: Device, seed: i64) -> Result<Self, ModelError> {
        config.validate()?;
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let conv = nn::ConvConfig {
            padding: 2,
            ..Default::default()
        };
        let h = config.hidden;
        Ok(FusionClassifier {
            conv1: nn::conv1d(&root / "sensor_conv1", config.channels, h, 5, conv),
            conv2: nn::conv1d(&root / "sensor_conv2", h, h, 5, conv),
            text: nn::linear(&root / "text", config.text, h, Default::default()),
            head: nn::linear(&root / "head", 2 * h, config.classes, Default::default()),
            config,
            vs,
        })
    }

    /// Sensor features, then text features, side by side:
    /// (`[batch, channels, window]`, `[batch, text]`) → `[batch, 2 × hidden]`.
    fn features(&self, sensors: &Tensor, texts: &Tensor) -> Result<Tensor, TchError> {
        let s = layout::pooled_sensor_features(sensors, &self.conv1, &self.conv2)?;
        let t = self.text.forward(texts).f_relu()?;
        Tensor::f_cat(&[s, t], 1)
    }

    /// Checks and shapes the inputs: `sensors` channel-major windows back to back,
    /// `texts` `[N, text]`.
    fn inputs(&self, sensors: &[f32], texts: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
        let per = self.config.sensor_len();
        if sensors.is_empty() || !sensors.len().is_multiple_of(per) {
            return Err(ModelError::Shape {
                what: "fusion sensor windows",
                expected: format!("a positive multiple of {per} values"),
                got: format!("{} values", sensors.len()),
            });
        }
        if let Some(index) = sensors.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                what: "fusion sensor windows",
                index,
            });
        }
        let n = (sensors.len() / per) as i64;
        if texts.size() != [n, self.config.text] {
            return Err(ModelError::Shape {
                what: "fusion text embeddings",
                expected: format!("[{n}, {}]", self.config.text),
                got: format!("{:?}", texts.size()),
            });
        }
        let device = self.vs.device();
        let sensors = Tensor::f_from_slice(sensors)?
            .f_view([n, self.config.channels, self.config.window])?
            .f_to_device(device)?;
        Ok((sensors, texts.f_to_kind(Kind::Float)?.f_to_device(device)?))
    }

    /// Trains on pairs (sensor window, note embedding) with one class per pair.
    pub fn fit(
        &mut self,
        sensors: &[f32],
        texts: &Tensor,
        labels: &[i64],
        options: &TrainOptions,
        progress: &mut dyn FnMut(&EpochReport),
    ) -> Result<TrainReport, ModelError> {
        let (sensors, texts) = self.inputs(sensors, texts)?;
        let samples = sensors.size()[0] as usize;
        let targets = training::class_targets(
            labels,
            samples,
            self.config.classes,
            ("fusion labels", "pair"),
            self.vs.device(),
        )?;
        let hidden = self.config.hidden;
        let dropout = self.config.modality_dropout;
        let loss = |indices: &Tensor| {
            let s = sensors.f_index_select(0, indices)?;
            let t = texts.f_index_select(0, indices)?;
            let mut features = self.features(&s, &t)?;
            if dropout > 0.0 && features.requires_grad() {
                // Per example: keep both branches, or zero one of them (either with
                // equal chance).
                let n = features.size()[0];
                let device = features.device();
                let drop = Tensor::f_rand([n, 1], (Kind::Float, device))?.f_lt(dropout)?;
                let which = Tensor::f_rand([n, 1], (Kind::Float, device))?.f_lt(0.5)?;
                let keep_sensor = drop.f_logical_and(&which)?.f_logical_not()?;
                let keep_text = drop
                    .f_logical_and(&which.f_logical_not()?)?
                    .f_logical_not()?;
                let mask = Tensor::f_cat(
                    &[
                        keep_sensor.f_expand([n, hidden], false)?,
                        keep_text.f_expand([n, hidden], false)?,
                    ],
                    1,
                )?
                .f_to_kind(Kind::Float)?;
                features = features.f_mul(&mask)?;
            }
            let target = targets.f_index_select(0, indices)?;
            self.head.forward(&features).f_cross_entropy_loss::<Tensor>(
                &target,
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )
        };
        training::train(&self.vs, samples, options, &loss, progress)
    }

    /// Class probabilities `[N, classes]` on the CPU.
    pub fn predict_proba(&self, sensors: &[f32], texts: &Tensor) -> Result<Tensor, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let (sensors, texts) = self.inputs(sensors, texts)?;
        let logits = self.head.forward(&self.features(&sensors, &texts)?);
        Ok(logits.f_softmax(1, Kind::Float)?.f_to_device(Device::Cpu)?)
    }

    pub fn predict(&self, sensors: &[f32], texts: &Tensor) -> Result<Vec<i64>, ModelError> {
        let p = self.predict_proba(sensors, texts)?;
        Ok(Vec::<i64>::try_from(&p.f_argmax(1, false)?)?)
    }
}

impl Network for FusionClassifier {
    type Config = FusionConfig;

    const WEIGHTS_ORIGIN: &'static str = "fusion weights";

    fn new(config: FusionConfig, device: Device, seed: i64) -> Result<Self, ModelError> {
        // Inherent associated functions take precedence: this is the constructor above.
        FusionClassifier::new(config, device, seed)
    }

    fn config(&self) -> &FusionConfig {
        &self.config
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
}

network::inherent_network_methods!(FusionClassifier, FusionConfig);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Four classes. The sensors tell {0,1} from {2,3} (channel 0 raised for 2 and 3);
    /// the text tells {0,2} from {1,3} (component 0 of the embedding raised for 1 and
    /// 3). Only both together tell all four apart.
    fn pairs(n: usize, seed: u64) -> (Vec<f32>, Tensor, Vec<i64>) {
        let mut rng = SplitMix64::new(seed);
        let (mut sensors, mut texts, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let class = (i % 4) as i64;
            for c in 0..2 {
                for _ in 0..8 {
                    let raised = c == 0 && class >= 2;
                    sensors.push((0.3 * rng.normal() + if raised { 1.5 } else { 0.0 }) as f32);
                }
            }
            for d in 0..6 {
                let raised = d == 0 && class % 2 == 1;
                texts.push((0.3 * rng.normal() + if raised { 1.5 } else { 0.0 }) as f32);
            }
            labels.push(class);
        }
        (
            sensors,
            Tensor::from_slice(&texts).view([n as i64, 6]),
            labels,
        )
    }

    fn config() -> FusionConfig {
        FusionConfig {
            channels: 2,
            window: 8,
            text: 6,
            hidden: 8,
            classes: 4,
            modality_dropout: 0.2,
        }
    }

    #[test]
    fn fusion_tells_apart_what_neither_modality_can_alone() {
        let mut model = FusionClassifier::new(config(), Device::Cpu, 1).unwrap();
        let (s, t, y) = pairs(400, 1);
        let options = TrainOptions {
            epochs: 60,
            batch_size: 32,
            learning_rate: 1e-2,
            patience: 10,
            ..Default::default()
        };
        model.fit(&s, &t, &y, &options, &mut |_| {}).unwrap();
        let (s, t, y) = pairs(100, 2);
        let predicted = model.predict(&s, &t).unwrap();
        let right = predicted.iter().zip(&y).filter(|(p, y)| p == y).count();
        // Either modality alone caps at 50 %.
        assert!(right >= 90, "{right}/100");
    }

    #[test]
    fn weights_round_trip_and_bad_inputs_are_refused() {
        let model = FusionClassifier::new(config(), Device::Cpu, 3).unwrap();
        let (s, t, y) = pairs(5, 3);
        let (bytes, sha) = model.to_safetensors().unwrap();
        let copy =
            FusionClassifier::from_safetensors(config(), &bytes, Some(&sha), Device::Cpu).unwrap();
        assert_eq!(
            model.predict_proba(&s, &t).unwrap(),
            copy.predict_proba(&s, &t).unwrap()
        );
        assert!(model.predict_proba(&s[..10], &t).is_err());
        assert!(model.predict_proba(&s, &t.narrow(0, 0, 4)).is_err());
        let mut nan = s.clone();
        nan[3] = f32::NAN;
        assert!(model.predict_proba(&nan, &t).is_err());
        let mut bad = y.clone();
        bad[0] = 9;
        let mut m = FusionClassifier::new(config(), Device::Cpu, 3).unwrap();
        let err = m
            .fit(&s, &t, &bad, &TrainOptions::default(), &mut |_| {})
            .unwrap_err();
        assert!(err.to_string().contains("label"), "{err}");
        let err = FusionClassifier::new(
            FusionConfig {
                modality_dropout: 1.0,
                ..config()
            },
            Device::Cpu,
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("modality_dropout"), "{err}");
    }
}
