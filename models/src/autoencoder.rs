//! The W1 expert: a 1-D convolutional autoencoder whose reconstruction error is the
//! anomaly score of a multichannel sensor window.
//!
//! Four same-padded convolutions (C → hidden → bottleneck → hidden → C, ReLU between)
//! squeeze each window through a narrow channel bottleneck; a model trained on normal
//! operation reconstructs normal windows well and faulty ones badly. The weights live in
//! a `VarStore` under stable names (`enc1.weight`, `enc1.bias`, `enc2.*`, `dec1.*`,
//! `dec2.*`) so safetensors files written here load in PyTorch and vice versa, and each
//! file is pinned by its sha256. Initial weights come from the crate's own seeded
//! generator, never libtorch's global one, so concurrently built experts stay
//! reproducible.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Reduction, TchError, Tensor};

use crate::error::ModelError;
use crate::layout;
use crate::network::{self, Network};
use crate::rng::SplitMix64;
use crate::training::{self, EpochReport, TrainOptions, TrainReport};
use crate::weights::{self, WeightFile};

/// Layer names in forward order; each holds `<name>.weight` and `<name>.bias`.
const LAYERS: [&str; 4] = ["enc1", "enc2", "dec1", "dec2"];

/// Every tensor of the model, in the order of `LAYERS`.
const TENSOR_NAMES: [&str; 8] = [
    "enc1.weight",
    "enc1.bias",
    "enc2.weight",
    "enc2.bias",
    "dec1.weight",
    "dec1.bias",
    "dec2.weight",
    "dec2.bias",
];

/// Sizes of the autoencoder. Windows are `channels` rows of `window` samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderConfig {
    pub channels: i64,
    pub window: i64,
    pub hidden: i64,
    pub bottleneck: i64,
    /// Odd, so that padding `kernel / 2` keeps the window length.
    pub kernel: i64,
}

impl AutoencoderConfig {
    /// The W1 benchmark shape: hidden 32, bottleneck 16, kernel 5.
    pub fn w1(channels: i64, window: i64) -> Self {
        Self {
            channels,
            window,
            hidden: 32,
            bottleneck: 16,
            kernel: 5,
        }
    }

    /// Positive sizes, an odd kernel no longer than the window, and a window length
    /// that fits in memory.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (field, value) in [
            ("channels", self.channels),
            ("window", self.window),
            ("hidden", self.hidden),
            ("bottleneck", self.bottleneck),
            ("kernel", self.kernel),
        ] {
            if value <= 0 {
                return Err(ModelError::InvalidOption {
                    field,
                    value: value.to_string(),
                    reason: "must be positive".into(),
                });
            }
        }
        if self.kernel % 2 == 0 {
            return Err(ModelError::InvalidOption {
                field: "kernel",
                value: self.kernel.to_string(),
                reason: "must be odd so that padding kernel/2 keeps the window length".into(),
            });
        }
        if self.kernel > self.window {
            return Err(ModelError::InvalidOption {
                field: "kernel",
                value: self.kernel.to_string(),
                reason: format!("must not exceed the window length {}", self.window),
            });
        }
        let fits = self
            .channels
            .checked_mul(self.window)
            .is_some_and(|n| usize::try_from(n).is_ok());
        if !fits {
            return Err(ModelError::InvalidOption {
                field: "window",
                value: self.window.to_string(),
                reason: format!(
                    "{} channels x {} samples overflows",
                    self.channels, self.window
                ),
            });
        }
        Ok(())
    }

    /// Values in one window, `channels * window`; 0 for a config that does not validate.
    pub fn window_len(&self) -> usize {
        if self.channels <= 0 || self.window <= 0 {
            return 0;
        }
        self.channels
            .checked_mul(self.window)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0)
    }

    /// `(out channels, in channels)` of each layer in `LAYERS` order.
    fn layer_dims(&self) -> [(i64, i64); 4] {
        [
            (self.hidden, self.channels),
            (self.bottleneck, self.hidden),
            (self.hidden, self.bottleneck),
            (self.channels, self.hidden),
        ]
    }

    /// The shape of every tensor in `TENSOR_NAMES` order.
    fn tensor_shapes(&self) -> [(&'static str, Vec<i64>); 8] {
        let [l0, l1, l2, l3] = self.layer_dims();
        let k = self.kernel;
        [
            (TENSOR_NAMES[0], vec![l0.0, l0.1, k]),
            (TENSOR_NAMES[1], vec![l0.0]),
            (TENSOR_NAMES[2], vec![l1.0, l1.1, k]),
            (TENSOR_NAMES[3], vec![l1.0]),
            (TENSOR_NAMES[4], vec![l2.0, l2.1, k]),
            (TENSOR_NAMES[5], vec![l2.0]),
            (TENSOR_NAMES[6], vec![l3.0, l3.1, k]),
            (TENSOR_NAMES[7], vec![l3.0]),
        ]
    }
}

/// One convolution's parameters (shallow handles onto the `VarStore` variables).
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
}

/// The convolutional autoencoder. `Send` (not `Sync`): each expert owns one on its own
/// OS thread.
#[derive(Debug)]
pub struct ConvAutoencoder {
    config: AutoencoderConfig,
    vs: nn::VarStore,
    /// In `LAYERS` order.
    layers: [Conv; LAYERS.len()],
}

impl ConvAutoencoder {
    /// A fresh model with PyTorch's default `Conv1d` initialisation (weights and biases
    /// uniform in ±1/sqrt(fan_in)), drawn from `seed`.
    pub fn new(config: AutoencoderConfig, device: Device, seed: i64) -> Result<Self, ModelError> {
        config.validate()?;
        let mut rng = SplitMix64::new(seed as u64);
        let mut fan_in = 1;
        Self::build(config, device, |_name, shape| {
            // A weight comes before its bias, so the bias reuses the weight's fan-in.
            if shape.len() == 3 {
                fan_in = shape[1] * shape[2];
            }
            let bound = 1.0 / (fan_in as f64).sqrt();
            let count = shape.iter().product::<i64>() as usize;
            Ok((0..count).map(|_| rng.uniform(-bound, bound)).collect())
        })
    }

    /// Creates the variables in `TENSOR_NAMES` order, filled by `values(name, shape)`.
    fn build(
        config: AutoencoderConfig,
        device: Device,
        mut values: impl FnMut(&'static str, &[i64]) -> Result<Vec<f32>, ModelError>,
    ) -> Result<Self, ModelError> {
        let vs = nn::VarStore::new(device);
        let mut tensors = Vec::with_capacity(TENSOR_NAMES.len());
        for (name, shape) in config.tensor_shapes() {
            let data = values(name, &shape)?;
            let (layer, param) = name
                .split_once('.')
                .expect("every tensor name is <layer>.<param>");
            let init = Tensor::f_from_slice(&data)?.f_view(shape.as_slice())?;
            tensors.push(vs.root().sub(layer).f_var_copy(param, &init)?);
        }
        let mut tensors = tensors.into_iter();
        let layers = std::array::from_fn(|_| Conv {
            weight: tensors.next().expect("build created a weight per layer"),
            bias: tensors.next().expect("build created a bias per layer"),
        });
        Ok(Self { config, vs, layers })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Reconstructs a batch on the model's device:
    /// `[batch, channels, window]` → `[batch, channels, window]`.
    ///
    /// # Panics
    /// When `windows` is not a float `[B, C, L]` tensor on the model's device, like
    /// `tch::nn::Module::forward`. `score` and `fit` check their input instead.
    pub fn forward(&self, windows: &Tensor) -> Tensor {
        match self.try_forward(windows) {
            Ok(reconstruction) => reconstruction,
            Err(err) => panic!(
                "ConvAutoencoder::forward on input {:?}: {err}",
                windows.size()
            ),
        }
    }

    /// [`Self::forward`] with libtorch's errors returned, not raised:
    /// `[batch, channels, window]` → `[batch, channels, window]`.
    pub(crate) fn try_forward(&self, windows: &Tensor) -> Result<Tensor, TchError> {
        let padding = self.config.kernel / 2;
        let conv = |x: &Tensor, layer: &Conv| {
            layout::conv_along_time(x, &layer.weight, Some(&layer.bias), padding, 1)
        };
        let mut hidden = conv(&layout::sequence(windows)?, &self.layers[0])?.f_relu()?;
        for layer in &self.layers[1..3] {
            hidden = conv(&hidden, layer)?.f_relu()?;
        }
        conv(&hidden, &self.layers[3])?.f_squeeze_dim(2)
    }

    /// Number of whole windows in a flat buffer; a Shape error if it is empty or ragged.
    fn window_count(&self, windows: &[f32], what: &'static str) -> Result<i64, ModelError> {
        let per_window = self.config.window_len();
        if windows.is_empty() || !windows.len().is_multiple_of(per_window) {
            return Err(ModelError::Shape {
                what,
                expected: format!(
                    "a positive multiple of {} channels x {} samples = {per_window} values",
                    self.config.channels, self.config.window
                ),
                got: format!("{} values", windows.len()),
            });
        }
        Ok((windows.len() / per_window) as i64)
    }

    /// Flat channel-major windows → a `[n, C, L]` tensor on the model's device.
    fn windows_tensor(&self, windows: &[f32], what: &'static str) -> Result<Tensor, ModelError> {
        let n = self.window_count(windows, what)?;
        Ok(Tensor::f_from_slice(windows)?
            .f_view([n, self.config.channels, self.config.window])?
            .f_to_device(self.device())?)
    }

    /// One anomaly score per window: the mean squared reconstruction error.
    ///
    /// `windows` holds n windows back to back, each channel-major (C rows of L samples).
    /// A window with a NaN or infinite sample scores NaN or infinity; the others are
    /// unaffected. Errors with `ModelError::Shape` when the length is 0 or not a multiple
    /// of C*L.
    pub fn score(&self, windows: &[f32]) -> Result<Vec<f32>, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let x = self.windows_tensor(windows, "scored windows")?;
        // In place: the reconstruction is scratch, so the residual reuses its buffer.
        let errors = self.try_forward(&x)?.f_sub_(&x)?.f_square_()?.f_mean_dim(
            [1i64, 2].as_slice(),
            false,
            Kind::Float,
        )?;
        Ok(Vec::<f32>::try_from(&errors)?)
    }

    /// Trains on normal-operation windows (the `score` layout) to minimise reconstruction
    /// MSE. See [`TrainOptions`] for the split, early stopping and time cap; the model
    /// ends with the weights of the best validation epoch. Windows must be finite.
    pub fn fit(
        &mut self,
        windows: &[f32],
        options: &TrainOptions,
        progress: &mut dyn FnMut(&EpochReport),
    ) -> Result<TrainReport, ModelError> {
        options.validate()?;
        if let Some(index) = windows.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                what: "training windows",
                index,
            });
        }
        let data = self.windows_tensor(windows, "training windows")?;
        let samples = data.size()[0] as usize;
        let loss = |indices: &Tensor| {
            let batch = data.f_index_select(0, indices)?;
            self.try_forward(&batch)?
                .f_mse_loss(&batch, Reduction::Mean)
        };
        training::train(&self.vs, samples, options, &loss, progress)
    }

    /// Reads the tensors in forward order, so a file of another config is refused
    /// naming its first layer that disagrees, not the first by name.
    fn from_bytes(
        config: AutoencoderConfig,
        bytes: &[u8],
        expected_sha256: Option<&str>,
        device: Device,
        origin: &str,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let file = WeightFile::parse(bytes, expected_sha256, origin)?;
        let model = Self::build(config, device, |name, shape| file.values(name, shape))?;
        file.refuse_others(
            |name| TENSOR_NAMES.contains(&name),
            &format!("the conv autoencoder has only {}", TENSOR_NAMES.join(", ")),
        )?;
        Ok(model)
    }

    /// Writes the safetensors bytes to `path` and returns their sha256.
    pub fn save(&self, path: &Path) -> Result<String, ModelError> {
        let (bytes, sha256) = self.to_safetensors()?;
        std::fs::write(path, bytes).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(sha256)
    }

    /// Reads a safetensors file with the checks of [`Network::from_safetensors`]; errors
    /// name the path.
    pub fn load(
        config: AutoencoderConfig,
        path: &Path,
        expected_sha256: Option<&str>,
        device: Device,
    ) -> Result<Self, ModelError> {
        Self::from_bytes(
            config,
            &weights::read_file(path)?,
            expected_sha256,
            device,
            &path.display().to_string(),
        )
    }
}

impl Network for ConvAutoencoder {
    type Config = AutoencoderConfig;

    const WEIGHTS_ORIGIN: &'static str = "in-memory safetensors";

    fn new(config: AutoencoderConfig, device: Device, seed: i64) -> Result<Self, ModelError> {
        // Inherent associated functions take precedence: this is the constructor above.
        ConvAutoencoder::new(config, device, seed)
    }

    fn config(&self) -> &AutoencoderConfig {
        &self.config
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// The provided method's checks, made in forward order (see `from_bytes`).
    fn from_safetensors(
        config: AutoencoderConfig,
        bytes: &[u8],
        expected_sha256: Option<&str>,
        device: Device,
    ) -> Result<Self, ModelError> {
        Self::from_bytes(config, bytes, expected_sha256, device, Self::WEIGHTS_ORIGIN)
    }
}

network::inherent_network_methods!(ConvAutoencoder, AutoencoderConfig);

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{SafeTensors, TensorView};

    fn small() -> AutoencoderConfig {
        AutoencoderConfig {
            channels: 3,
            window: 16,
            hidden: 8,
            bottleneck: 4,
            kernel: 3,
        }
    }

    /// `n` windows of per-channel sines with random phase and a little noise.
    fn sine_windows(config: &AutoencoderConfig, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let mut out = Vec::with_capacity(n * config.window_len());
        for _ in 0..n {
            let phase = rng.next_f64() * std::f64::consts::TAU;
            for c in 0..config.channels {
                let freq = 0.2 + 0.1 * c as f64;
                for t in 0..config.window {
                    let noise = 0.05 * rng.normal();
                    out.push(((freq * t as f64 + phase).sin() + noise) as f32);
                }
            }
        }
        out
    }

    #[test]
    fn is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<ConvAutoencoder>();
    }

    #[test]
    fn config_validation_names_the_field() {
        let cases = [
            (
                AutoencoderConfig {
                    channels: 0,
                    ..small()
                },
                "channels",
            ),
            (
                AutoencoderConfig {
                    bottleneck: -1,
                    ..small()
                },
                "bottleneck",
            ),
            (
                AutoencoderConfig {
                    kernel: 4,
                    ..small()
                },
                "kernel",
            ),
            (
                AutoencoderConfig {
                    kernel: 17,
                    ..small()
                },
                "kernel",
            ),
            (
                AutoencoderConfig {
                    window: i64::MAX,
                    channels: 4,
                    ..small()
                },
                "window",
            ),
        ];
        for (config, expected) in cases {
            match config.validate() {
                Err(ModelError::InvalidOption { field, .. }) => assert_eq!(field, expected),
                other => panic!("{config:?}: expected InvalidOption on {expected}, got {other:?}"),
            }
        }
        assert_eq!(AutoencoderConfig::w1(8, 64).window_len(), 512);
        assert_eq!(
            AutoencoderConfig {
                channels: -2,
                ..small()
            }
            .window_len(),
            0
        );
    }

    #[test]
    fn forward_keeps_the_shape_and_names_are_stable() {
        let model = ConvAutoencoder::new(AutoencoderConfig::w1(8, 64), Device::Cpu, 1)
            .expect("valid config");
        let x = Tensor::randn([4, 8, 64], (Kind::Float, Device::Cpu));
        assert_eq!(model.forward(&x).size(), [4, 8, 64]);
        let mut names: Vec<String> = model.vs.variables().into_keys().collect();
        names.sort();
        let mut expected: Vec<String> = TENSOR_NAMES.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(names, expected);
    }

    #[test]
    fn same_seed_same_weights() {
        let a = ConvAutoencoder::new(small(), Device::Cpu, 11).expect("valid");
        let b = ConvAutoencoder::new(small(), Device::Cpu, 11).expect("valid");
        let c = ConvAutoencoder::new(small(), Device::Cpu, 12).expect("valid");
        let sha = |m: &ConvAutoencoder| m.to_safetensors().expect("serialises").1;
        assert_eq!(sha(&a), sha(&b));
        assert_ne!(sha(&a), sha(&c));
    }

    #[test]
    fn score_gives_one_non_negative_value_per_window() {
        let config = small();
        let model = ConvAutoencoder::new(config.clone(), Device::Cpu, 2).expect("valid");
        let windows = sine_windows(&config, 5, 3);
        let scores = model.score(&windows).expect("whole windows");
        assert_eq!(scores.len(), 5);
        assert!(
            scores.iter().all(|s| s.is_finite() && *s >= 0.0),
            "{scores:?}"
        );

        let single = model
            .score(&windows[..config.window_len()])
            .expect("one window");
        assert!((single[0] - scores[0]).abs() <= 1e-6 * scores[0].max(1.0));
    }

    #[test]
    fn score_rejects_empty_and_ragged_input() {
        let model = ConvAutoencoder::new(small(), Device::Cpu, 2).expect("valid");
        for len in [0, 47, 49] {
            match model.score(&vec![0.0; len]) {
                Err(ModelError::Shape { what, got, .. }) => {
                    assert_eq!(what, "scored windows");
                    assert_eq!(got, format!("{len} values"));
                }
                other => panic!("len {len}: expected Shape, got {other:?}"),
            }
        }
    }

    #[test]
    fn fit_rejects_non_finite_windows() {
        let config = small();
        let mut model = ConvAutoencoder::new(config.clone(), Device::Cpu, 2).expect("valid");
        let mut windows = sine_windows(&config, 4, 1);
        windows[17] = f32::NAN;
        let err = model
            .fit(&windows, &TrainOptions::default(), &mut |_| {})
            .expect_err("nan must be rejected");
        assert!(
            matches!(err, ModelError::NonFinite { index: 17, .. }),
            "{err}"
        );
    }

    #[test]
    fn training_on_sines_lowers_loss_and_separates_anomalies() {
        let config = AutoencoderConfig::w1(3, 32);
        let mut model = ConvAutoencoder::new(config.clone(), Device::Cpu, 5).expect("valid");
        let windows = sine_windows(&config, 256, 9);
        let options = TrainOptions {
            epochs: 15,
            batch_size: 32,
            learning_rate: 3e-3,
            ..Default::default()
        };
        let mut reports = Vec::new();
        let report = model
            .fit(&windows, &options, &mut |r| reports.push(r.clone()))
            .expect("training runs");
        assert_eq!(reports.len(), report.epochs_run);
        let first = reports[0].validation_loss;
        assert!(
            report.best_validation_loss < 0.5 * first,
            "validation loss {first} -> {}",
            report.best_validation_loss
        );

        let normal = sine_windows(&config, 1, 1234);
        let mut rng = SplitMix64::new(99);
        let noisy: Vec<f32> = normal
            .iter()
            .map(|v| v + 0.8 * rng.normal() as f32)
            .collect();
        let shifted: Vec<f32> = normal.iter().map(|v| v + 2.0).collect();
        let mut batch = normal.clone();
        batch.extend(&noisy);
        batch.extend(&shifted);
        let scores = model.score(&batch).expect("whole windows");
        assert!(
            scores[1] > 2.0 * scores[0],
            "noisy {} vs normal {}",
            scores[1],
            scores[0]
        );
        assert!(
            scores[2] > 2.0 * scores[0],
            "shifted {} vs normal {}",
            scores[2],
            scores[0]
        );
    }

    #[test]
    fn safetensors_round_trip_is_bit_identical() {
        let config = small();
        let model = ConvAutoencoder::new(config.clone(), Device::Cpu, 21).expect("valid");
        let windows = sine_windows(&config, 6, 4);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("w1.safetensors");
        let sha = model.save(&path).expect("saves");
        assert_eq!(sha.len(), 64);
        assert!(sha
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));

        let loaded = ConvAutoencoder::load(config.clone(), &path, Some(&sha), Device::Cpu)
            .expect("loads with matching hash");
        let before: Vec<u32> = model
            .score(&windows)
            .expect("scores")
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let after: Vec<u32> = loaded
            .score(&windows)
            .expect("scores")
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(before, after);
        assert_eq!(loaded.to_safetensors().expect("serialises").1, sha);
    }

    #[test]
    fn flipped_byte_is_a_hash_mismatch_naming_the_file() {
        let config = small();
        let model = ConvAutoencoder::new(config.clone(), Device::Cpu, 21).expect("valid");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("w1.safetensors");
        let sha = model.save(&path).expect("saves");
        let mut bytes = std::fs::read(&path).expect("readable");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).expect("writable");
        match ConvAutoencoder::load(config, &path, Some(&sha), Device::Cpu) {
            Err(ModelError::HashMismatch {
                origin,
                expected,
                actual,
            }) => {
                assert_eq!(origin, path.display().to_string());
                assert_eq!(expected, sha);
                assert_ne!(actual, sha);
            }
            other => panic!("expected HashMismatch, got {other:?}"),
        }
    }

    #[test]
    fn other_hidden_size_names_the_mismatched_tensor() {
        let model = ConvAutoencoder::new(small(), Device::Cpu, 1).expect("valid");
        let (bytes, _) = model.to_safetensors().expect("serialises");
        let wider = AutoencoderConfig {
            hidden: 12,
            ..small()
        };
        match ConvAutoencoder::from_safetensors(wider, &bytes, None, Device::Cpu) {
            Err(err @ ModelError::TensorShape { .. }) => {
                let message = err.to_string();
                assert!(message.contains("enc1.weight"), "{message}");
                assert!(
                    message.contains("[12, 3, 3]") && message.contains("[8, 3, 3]"),
                    "{message}"
                );
            }
            other => panic!("expected TensorShape, got {other:?}"),
        }
    }

    #[test]
    fn missing_and_extra_tensors_are_rejected() {
        let config = small();
        let model = ConvAutoencoder::new(config.clone(), Device::Cpu, 1).expect("valid");
        let (bytes, _) = model.to_safetensors().expect("serialises");
        let file = SafeTensors::deserialize(&bytes).expect("valid file");
        let keep = |skip: &str, extra: Option<&str>| {
            let mut views: Vec<(String, TensorView<'_>)> = file
                .tensors()
                .into_iter()
                .filter(|(n, _)| n != skip)
                .collect();
            if let Some(extra) = extra {
                let view = file.tensor("enc1.bias").expect("present");
                views.push((extra.to_string(), view));
            }
            safetensors::serialize(views, None).expect("serialises")
        };

        match ConvAutoencoder::from_safetensors(
            config.clone(),
            &keep("dec2.bias", None),
            None,
            Device::Cpu,
        ) {
            Err(ModelError::MissingTensor { name, .. }) => assert_eq!(name, "dec2.bias"),
            other => panic!("expected MissingTensor, got {other:?}"),
        }
        match ConvAutoencoder::from_safetensors(
            config.clone(),
            &keep("", Some("head.bias")),
            None,
            Device::Cpu,
        ) {
            Err(err @ ModelError::Weights { .. }) => {
                assert!(err.to_string().contains("head.bias"), "{err}")
            }
            other => panic!("expected Weights, got {other:?}"),
        }
        match ConvAutoencoder::from_safetensors(config, b"not safetensors", None, Device::Cpu) {
            Err(ModelError::Weights { origin, .. }) => assert_eq!(origin, "in-memory safetensors"),
            other => panic!("expected Weights, got {other:?}"),
        }
    }
}
