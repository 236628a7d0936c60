//! The forecasting expert: a temporal convolution network (TCN) that predicts the next
//! `horizon` samples of every channel from the last `context` ones, and scores a window
//! by how badly it predicted what actually happened.
//!
//! A reconstruction model (the autoencoder) asks "does this window look normal"; a
//! forecaster asks "did the plant do what its own recent past implied", which catches
//! faults that keep every value in range but break the dynamics. The network is the
//! residual TCN of Bai, Kolter and Koltun (2018): `levels` blocks, block `i` holding two
//! causal convolutions dilated by 2^i (padding on the left only, so no output sees a
//! later input), ReLU after each, and a residual connection (through a 1×1 projection
//! where the widths differ). A linear head maps the features of the last context step to
//! `channels × horizon` values, each added to its channel's last context value. Weights
//! live in a `VarStore` under PyTorch's names for the same module tree
//! (`blocks.0.conv1.weight`, `blocks.0.downsample.bias`, `head.weight`, ...), so
//! safetensors files move between the two (`scripts/bench_train.py` holds the PyTorch
//! module), and initial weights come from the crate's seeded generator, never
//! libtorch's global one.
//!
//! Data is channel-major like the other models. A *context* is `channels × context`
//! values; a *scoring window* is `channels × (context + horizon)`: the first `context`
//! steps of each channel are the input, the last `horizon` the truth.

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Reduction, TchError, Tensor};

use crate::error::ModelError;
use crate::layout;
use crate::network::{self, Network};
use crate::rng::SplitMix64;
use crate::training::{self, EpochReport, TrainOptions, TrainReport};

/// Windows per forward pass when forecasting or scoring, which bounds the activations'
/// memory on long recordings.
const CHUNK: i64 = 1024;

/// Parameters above this count (512 MiB of f32) mean a mistyped size, not a plant model.
const MAX_PARAMETERS: i64 = 1 << 27;

/// Sizes of the forecaster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForecasterConfig {
    /// Variables per time step.
    pub channels: i64,
    /// Steps the network sees.
    pub context: i64,
    /// Steps it predicts.
    pub horizon: i64,
    /// Width of every residual block.
    pub hidden: i64,
    /// Residual blocks; block `i` is dilated by 2^i.
    pub levels: i64,
    /// Taps of every convolution.
    pub kernel: i64,
}

impl Default for ForecasterConfig {
    /// The Tennessee Eastman shape: 53 variables, 32 steps (19 minutes at 36 s) in, 4
    /// out. Kernel 3 over 4 levels sees 61 steps, so the whole context reaches the
    /// prediction.
    fn default() -> Self {
        Self {
            channels: 53,
            context: 32,
            horizon: 4,
            hidden: 32,
            levels: 4,
            kernel: 3,
        }
    }
}

impl ForecasterConfig {
    /// Positive sizes, a kernel that looks back, no level dilated past the context, and
    /// a network and window that fit in memory. Names the first offending field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |field, value: i64, reason: String| ModelError::InvalidOption {
            field,
            value: value.to_string(),
            reason,
        };
        for (field, value) in [
            ("channels", self.channels),
            ("context", self.context),
            ("horizon", self.horizon),
            ("hidden", self.hidden),
            ("levels", self.levels),
            ("kernel", self.kernel),
        ] {
            if value <= 0 {
                return Err(invalid(field, value, "must be positive".into()));
            }
        }
        if self.context < 2 {
            return Err(invalid(
                "context",
                self.context,
                "at least 2 steps are needed to see the series move".into(),
            ));
        }
        if self.kernel < 2 {
            return Err(invalid(
                "kernel",
                self.kernel,
                "must be at least 2: a kernel of 1 never looks at earlier steps".into(),
            ));
        }
        let deepest_dilation = u32::try_from(self.levels - 1)
            .ok()
            .and_then(|shift| 1i64.checked_shl(shift))
            .filter(|d| *d > 0);
        if deepest_dilation.is_none_or(|d| d >= self.context) {
            return Err(invalid(
                "levels",
                self.levels,
                format!(
                    "the last level's dilation 2^(levels-1) must stay below the context \
                     {}, or its taps reach only padding",
                    self.context
                ),
            ));
        }
        let window = self
            .context
            .checked_add(self.horizon)
            .and_then(|steps| steps.checked_mul(self.channels))
            .filter(|n| usize::try_from(*n).is_ok());
        if window.is_none() {
            return Err(invalid(
                "context",
                self.context,
                format!(
                    "{} channels x ({} + {}) steps overflows",
                    self.channels, self.context, self.horizon
                ),
            ));
        }
        match self.parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => Ok(()),
            count => Err(invalid(
                "hidden",
                self.hidden,
                format!(
                    "{} channels, {} levels of width {} with kernel {} and horizon {} \
                     make {} parameters, over the limit {MAX_PARAMETERS}",
                    self.channels,
                    self.levels,
                    self.hidden,
                    self.kernel,
                    self.horizon,
                    count.map_or("too many".into(), |n| n.to_string()),
                ),
            )),
        }
    }

    /// Values in one scoring window, `channels × (context + horizon)`; 0 for a config
    /// that does not validate.
    pub fn window_len(&self) -> usize {
        self.values(self.context.saturating_add(self.horizon))
    }

    /// Values in one context, `channels × context`.
    pub fn context_len(&self) -> usize {
        self.values(self.context)
    }

    /// Values in one forecast, `channels × horizon`.
    pub fn forecast_len(&self) -> usize {
        self.values(self.horizon)
    }

    fn values(&self, steps: i64) -> usize {
        if self.channels <= 0 || steps <= 0 {
            return 0;
        }
        self.channels
            .checked_mul(steps)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0)
    }

    /// Every tensor's name and shape, blocks in order, then the head.
    fn tensor_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (h, k) = (self.hidden, self.kernel);
        let mut shapes = Vec::new();
        for level in 0..self.levels {
            let input = if level == 0 { self.channels } else { h };
            let block = format!("blocks.{level}");
            shapes.push((format!("{block}.conv1.weight"), vec![h, input, k]));
            shapes.push((format!("{block}.conv1.bias"), vec![h]));
            shapes.push((format!("{block}.conv2.weight"), vec![h, h, k]));
            shapes.push((format!("{block}.conv2.bias"), vec![h]));
            if input != h {
                shapes.push((format!("{block}.downsample.weight"), vec![h, input, 1]));
                shapes.push((format!("{block}.downsample.bias"), vec![h]));
            }
        }
        let outputs = self.channels * self.horizon;
        shapes.push(("head.weight".into(), vec![outputs, h]));
        shapes.push(("head.bias".into(), vec![outputs]));
        shapes
    }

    /// The number of weights, or None when it overflows; checked before any shape is
    /// built, so `tensor_shapes` never multiplies out of range.
    fn parameter_count(&self) -> Option<i64> {
        let (c, h, k) = (self.channels, self.hidden, self.kernel);
        let conv =
            |inputs: i64, taps: i64| h.checked_mul(inputs)?.checked_mul(taps)?.checked_add(h);
        let mut first = conv(c, k)?.checked_add(conv(h, k)?)?;
        if c != h {
            first = first.checked_add(conv(c, 1)?)?;
        }
        let later = conv(h, k)?.checked_mul(2)?.checked_mul(self.levels - 1)?;
        let head = c
            .checked_mul(self.horizon)?
            .checked_mul(h.checked_add(1)?)?;
        first.checked_add(later)?.checked_add(head)
    }
}

/// One convolution's or linear layer's parameters (shallow handles onto the variables).
#[derive(Debug)]
struct Layer {
    weight: Tensor,
    bias: Tensor,
}

#[derive(Debug)]
struct Block {
    conv1: Layer,
    conv2: Layer,
    /// The 1×1 projection of the residual, where the block changes the width.
    downsample: Option<Layer>,
    dilation: i64,
}

/// The TCN forecaster. `Send` (not `Sync`): each expert owns one on its own OS thread.
#[derive(Debug)]
pub struct TcnForecaster {
    config: ForecasterConfig,
    vs: nn::VarStore,
    blocks: Vec<Block>,
    head: Layer,
}

impl TcnForecaster {
    /// A fresh model with PyTorch's default `Conv1d`/`Linear` initialisation (weights
    /// and biases uniform in ±1/sqrt(fan_in)), drawn from `seed`.
    pub fn new(config: ForecasterConfig, device: Device, seed: i64) -> Result<Self, ModelError> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let mut rng = SplitMix64::new(seed as u64);
        let mut fan_in = 1;
        let mut variables = Vec::new();
        for (name, shape) in config.tensor_shapes() {
            // A weight comes before its bias, so the bias reuses the weight's fan-in.
            if shape.len() > 1 {
                fan_in = shape[1..].iter().product::<i64>();
            }
            let bound = 1.0 / (fan_in as f64).sqrt();
            let count = shape.iter().product::<i64>() as usize;
            let values: Vec<f32> = (0..count).map(|_| rng.uniform(-bound, bound)).collect();
            let init = Tensor::f_from_slice(&values)?.f_view(shape.as_slice())?;
            let (path, param) = name
                .rsplit_once('.')
                .expect("every tensor name is <module path>.<param>");
            let mut module = vs.root();
            for part in path.split('.') {
                module = module.sub(part);
            }
            variables.push(module.f_var_copy(param, &init)?);
        }
        let mut variables = variables.into_iter();
        let mut layer = || Layer {
            weight: variables.next().expect("tensor_shapes lists a weight"),
            bias: variables.next().expect("tensor_shapes lists a bias"),
        };
        let mut blocks = Vec::with_capacity(config.levels as usize);
        for level in 0..config.levels {
            let widens = level == 0 && config.channels != config.hidden;
            blocks.push(Block {
                conv1: layer(),
                conv2: layer(),
                downsample: widens.then(&mut layer),
                dilation: 1 << level,
            });
        }
        let head = layer();
        Ok(Self {
            config,
            vs,
            blocks,
            head,
        })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Values in one scoring window, `channels × (context + horizon)`.
    pub fn window_len(&self) -> usize {
        self.config.window_len()
    }

    /// The forecast of each context: `[batch, channels, context]` →
    /// `[batch, channels, horizon]`.
    fn try_forward(&self, contexts: &Tensor) -> Result<Tensor, TchError> {
        // Padding both sides and keeping the first `steps` outputs is the causal
        // convolution: output t sees inputs t − (k−1)·d ..= t. The outputs past the end
        // are wasted work, but cheaper than copying a left-padded channels-last input.
        let causal = |x: &Tensor, layer: &Layer, dilation: i64| {
            let steps = x.size()[3];
            let padding = (self.config.kernel - 1) * dilation;
            layout::conv_along_time(x, &layer.weight, Some(&layer.bias), padding, dilation)?
                .f_narrow(3, 0, steps)
        };
        let mut x = layout::sequence(contexts)?;
        for block in &self.blocks {
            let out = causal(&x, &block.conv1, block.dilation)?.f_relu()?;
            let out = causal(&out, &block.conv2, block.dilation)?.f_relu()?;
            let residual = match &block.downsample {
                Some(p) => layout::conv_along_time(&x, &p.weight, Some(&p.bias), 0, 1)?,
                None => x,
            };
            x = out.f_add(&residual)?.f_relu()?;
        }
        // The head predicts the change from the last context value: an untrained
        // network then starts near persistence instead of near zero, and smooth
        // channels only need a small correction.
        let last = contexts.f_narrow(2, self.config.context - 1, 1)?;
        x.f_select(2, 0)?
            .f_select(2, -1)?
            .f_linear(&self.head.weight, Some(&self.head.bias))?
            .f_view([-1, self.config.channels, self.config.horizon])?
            .f_add(&last)
    }

    /// Whole windows of `per_window` finite values → `[n, C, steps]` on the model's
    /// device; Shape or NonFinite errors name `what`.
    fn tensor(&self, values: &[f32], steps: i64, what: &'static str) -> Result<Tensor, ModelError> {
        let per_window = self.config.values(steps);
        if values.is_empty() || !values.len().is_multiple_of(per_window) {
            return Err(ModelError::Shape {
                what,
                expected: format!(
                    "a positive multiple of {} channels x {steps} steps = {per_window} values",
                    self.config.channels
                ),
                got: format!("{} values", values.len()),
            });
        }
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite { what, index });
        }
        Ok(Tensor::f_from_slice(values)?
            .f_view([-1, self.config.channels, steps])?
            .f_to_device(self.device())?)
    }

    /// `[n, C, context + horizon]` scoring windows → (inputs, truths).
    fn split(&self, windows: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        let context = self.config.context;
        Ok((
            windows.f_narrow(2, 0, context)?,
            windows.f_narrow(2, context, self.config.horizon)?,
        ))
    }

    /// Forecasts for contexts of `channels × context` values each, back to back: one
    /// forecast of `channels × horizon` values each, channel-major, in the same order.
    /// Refuses an empty or ragged buffer (`Shape`) and non-finite values (`NonFinite`
    /// with the index).
    pub fn forecast(&self, contexts: &[f32]) -> Result<Vec<f32>, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let x = self.tensor(contexts, self.config.context, "forecast contexts")?;
        let mut out = Vec::with_capacity(x.size()[0] as usize * self.config.forecast_len());
        for chunk in x.f_split(CHUNK, 0)? {
            out.extend(Vec::<f32>::try_from(
                &self.try_forward(&chunk)?.f_flatten(0, -1)?,
            )?);
        }
        Ok(out)
    }

    /// One anomaly score per scoring window: the mean squared error of the forecast of
    /// its last `horizon` steps from its first `context` steps. Refuses an empty or
    /// ragged buffer (`Shape`) and non-finite values (`NonFinite` with the index).
    pub fn score(&self, windows: &[f32]) -> Result<Vec<f32>, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let steps = self.config.context + self.config.horizon;
        let x = self.tensor(windows, steps, "scored windows")?;
        let mut scores = Vec::with_capacity(x.size()[0] as usize);
        for chunk in x.f_split(CHUNK, 0)? {
            let (input, truth) = self.split(&chunk)?;
            let errors = self
                .try_forward(&input)?
                .f_sub_(&truth)?
                .f_square_()?
                .f_mean_dim([1i64, 2].as_slice(), false, Kind::Float)?;
            scores.extend(Vec::<f32>::try_from(&errors)?);
        }
        Ok(scores)
    }

    /// Trains on normal-operation scoring windows to minimise the forecast MSE. See
    /// [`TrainOptions`] for the split, early stopping and time cap; the model ends with
    /// the weights of the best validation epoch. Windows must be finite.
    pub fn fit(
        &mut self,
        windows: &[f32],
        options: &TrainOptions,
        progress: &mut dyn FnMut(&EpochReport),
    ) -> Result<TrainReport, ModelError> {
        options.validate()?;
        let steps = self.config.context + self.config.horizon;
        let data = self.tensor(windows, steps, "training windows")?;
        let samples = data.size()[0] as usize;
        let loss = |indices: &Tensor| {
            let (input, truth) = self.split(&data.f_index_select(0, indices)?)?;
            self.try_forward(&input)?
                .f_mse_loss(&truth, Reduction::Mean)
        };
        training::train(&self.vs, samples, options, &loss, progress)
    }
}

impl Network for TcnForecaster {
    type Config = ForecasterConfig;

    const WEIGHTS_ORIGIN: &'static str = "in-memory safetensors";

    fn new(config: ForecasterConfig, device: Device, seed: i64) -> Result<Self, ModelError> {
        // Inherent associated functions take precedence: this is the constructor above.
        TcnForecaster::new(config, device, seed)
    }

    fn config(&self) -> &ForecasterConfig {
        &self.config
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
}

network::inherent_network_methods!(TcnForecaster, ForecasterConfig);

/// The naive baseline's score per scoring window: the mean squared error of repeating
/// each channel's last context value over the horizon. A forecaster is only worth its
/// cost where it beats this, so reports give MSE relative to it. Same layout and
/// refusals as [`TcnForecaster::score`].
pub fn persistence_score(
    windows: &[f32],
    channels: usize,
    context: usize,
    horizon: usize,
) -> Result<Vec<f32>, ModelError> {
    for (field, value) in [
        ("channels", channels),
        ("context", context),
        ("horizon", horizon),
    ] {
        if value == 0 {
            return Err(ModelError::InvalidOption {
                field,
                value: "0".into(),
                reason: "must be positive".into(),
            });
        }
    }
    let steps = context.saturating_add(horizon);
    let per_window = channels.saturating_mul(steps);
    if windows.is_empty() || !windows.len().is_multiple_of(per_window) {
        return Err(ModelError::Shape {
            what: "persistence windows",
            expected: format!(
                "a positive multiple of {channels} channels x {steps} steps = {per_window} values"
            ),
            got: format!("{} values", windows.len()),
        });
    }
    if let Some(index) = windows.iter().position(|v| !v.is_finite()) {
        return Err(ModelError::NonFinite {
            what: "persistence windows",
            index,
        });
    }
    Ok(windows
        .chunks_exact(per_window)
        .map(|window| {
            let sum: f64 = window
                .chunks_exact(steps)
                .map(|series| {
                    let last = f64::from(series[context - 1]);
                    series[context..]
                        .iter()
                        .map(|v| (f64::from(*v) - last).powi(2))
                        .sum::<f64>()
                })
                .sum();
            (sum / (channels * horizon) as f64) as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use safetensors::tensor::{SafeTensors, TensorView};

    fn small() -> ForecasterConfig {
        ForecasterConfig {
            channels: 3,
            context: 24,
            horizon: 4,
            hidden: 16,
            levels: 3,
            kernel: 3,
        }
    }

    /// `n` scoring windows of per-channel sums of two sinusoids, each window at a random
    /// point of the series, with a little noise.
    fn sine_windows(config: &ForecasterConfig, n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let steps = config.context + config.horizon;
        let mut out = Vec::with_capacity(n * config.window_len());
        for _ in 0..n {
            let start = rng.next_f64() * 1000.0;
            for c in 0..config.channels {
                let (slow, fast) = (0.15 + 0.05 * c as f64, 0.7 + 0.1 * c as f64);
                for t in 0..steps {
                    let t = start + t as f64;
                    let value = (slow * t).sin() + 0.5 * (fast * t + c as f64).sin();
                    out.push((value + 0.02 * rng.normal()) as f32);
                }
            }
        }
        out
    }

    fn mean(values: &[f32]) -> f64 {
        values.iter().map(|v| f64::from(*v)).sum::<f64>() / values.len() as f64
    }

    #[test]
    fn is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<TcnForecaster>();
    }

    #[test]
    fn default_config_is_valid_and_sees_its_whole_context() {
        let config = ForecasterConfig::default();
        config.validate().expect("the default is valid");
        let receptive_field = 1 + 2 * (config.kernel - 1) * ((1 << config.levels) - 1);
        assert!(receptive_field >= config.context, "{receptive_field}");
        assert_eq!(config.window_len(), 53 * 36);
        assert_eq!(config.context_len(), 53 * 32);
        assert_eq!(config.forecast_len(), 53 * 4);
    }

    #[test]
    fn config_validation_names_the_field() {
        let with = |f: fn(&mut ForecasterConfig)| {
            let mut config = small();
            f(&mut config);
            config
        };
        let cases = [
            (with(|c| c.channels = 0), "channels"),
            (with(|c| c.context = -3), "context"),
            (with(|c| c.context = 1), "context"),
            (with(|c| c.horizon = 0), "horizon"),
            (with(|c| c.hidden = 0), "hidden"),
            (with(|c| c.levels = 0), "levels"),
            (with(|c| c.kernel = 1), "kernel"),
            // Dilation 16 with 16 steps of context.
            (
                with(|c| {
                    c.levels = 5;
                    c.context = 16
                }),
                "levels",
            ),
            (with(|c| c.levels = i64::MAX), "levels"),
            (with(|c| c.context = i64::MAX), "context"),
            (with(|c| c.hidden = 1 << 20), "hidden"),
        ];
        for (config, expected) in cases {
            match config.validate() {
                Err(ModelError::InvalidOption { field, value, .. }) => {
                    assert_eq!(field, expected, "{config:?}");
                    assert!(!value.is_empty());
                }
                other => panic!("{config:?}: expected InvalidOption on {expected}, got {other:?}"),
            }
            assert!(TcnForecaster::new(config, Device::Cpu, 0).is_err());
        }
        let ok = with(|c| {
            c.levels = 5;
            c.context = 17
        });
        ok.validate().expect("dilation 16 below a context of 17");
    }

    #[test]
    fn names_are_pytorch_paths_and_shapes_follow_the_config() {
        let model = TcnForecaster::new(small(), Device::Cpu, 1).expect("valid");
        let variables = model.vs.variables();
        let mut names: Vec<&str> = variables.keys().map(String::as_str).collect();
        names.sort_unstable();
        let mut expected: Vec<String> = vec![
            "blocks.0.downsample.weight".into(),
            "blocks.0.downsample.bias".into(),
            "head.weight".into(),
            "head.bias".into(),
        ];
        for level in 0..3 {
            for name in ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"] {
                expected.push(format!("blocks.{level}.{name}"));
            }
        }
        expected.sort_unstable();
        assert_eq!(names, expected);
        let numel: i64 = variables
            .values()
            .map(Tensor::numel)
            .map(|n| n as i64)
            .sum();
        assert_eq!(Some(numel), small().parameter_count());
        assert_eq!(variables["blocks.0.conv1.weight"].size(), [16, 3, 3]);
        assert_eq!(variables["blocks.2.conv2.weight"].size(), [16, 16, 3]);
        assert_eq!(variables["head.weight"].size(), [12, 16]);

        let same_width = ForecasterConfig {
            hidden: 3,
            ..small()
        };
        let model = TcnForecaster::new(same_width, Device::Cpu, 1).expect("valid");
        assert!(!model
            .vs
            .variables()
            .keys()
            .any(|name| name.contains("downsample")));
    }

    #[test]
    fn same_seed_same_weights() {
        let sha = |seed| {
            TcnForecaster::new(small(), Device::Cpu, seed)
                .expect("valid")
                .to_safetensors()
                .expect("serialises")
                .1
        };
        assert_eq!(sha(11), sha(11));
        assert_ne!(sha(11), sha(12));
    }

    #[test]
    fn forecast_and_score_agree_and_refuse_bad_input() {
        let config = small();
        let model = TcnForecaster::new(config.clone(), Device::Cpu, 2).expect("valid");
        let windows = sine_windows(&config, 5, 3);
        let steps = (config.context + config.horizon) as usize;
        let context = config.context as usize;
        let contexts: Vec<f32> = windows
            .chunks_exact(steps)
            .flat_map(|series| &series[..context])
            .copied()
            .collect();
        let forecasts = model.forecast(&contexts).expect("whole contexts");
        assert_eq!(forecasts.len(), 5 * config.forecast_len());
        let truths = windows.chunks_exact(steps).flat_map(|s| &s[context..]);
        let per_window = config.forecast_len();
        let expected: Vec<f32> = forecasts
            .iter()
            .zip(truths)
            .map(|(f, t)| (f - t).powi(2))
            .collect::<Vec<_>>()
            .chunks_exact(per_window)
            .map(mean)
            .map(|m| m as f32)
            .collect();
        let scores = model.score(&windows).expect("whole windows");
        for (score, expected) in scores.iter().zip(&expected) {
            assert!(
                (score - expected).abs() <= 1e-5 * expected.max(1.0),
                "{score} {expected}"
            );
        }

        for len in [0, 71, 73] {
            match model.forecast(&vec![0.0; len]) {
                Err(ModelError::Shape { what, got, .. }) => {
                    assert_eq!(what, "forecast contexts");
                    assert_eq!(got, format!("{len} values"));
                }
                other => panic!("len {len}: expected Shape, got {other:?}"),
            }
        }
        assert!(matches!(
            model.score(&windows[1..]),
            Err(ModelError::Shape {
                what: "scored windows",
                ..
            })
        ));
        let mut poisoned = windows.clone();
        poisoned[200] = f32::NAN;
        assert!(matches!(
            model.score(&poisoned),
            Err(ModelError::NonFinite { index: 200, .. })
        ));
        let mut poisoned = contexts.clone();
        poisoned[5] = f32::INFINITY;
        assert!(matches!(
            model.forecast(&poisoned),
            Err(ModelError::NonFinite {
                what: "forecast contexts",
                index: 5
            })
        ));
        let mut model = model;
        assert!(matches!(
            model.fit(&poisoned, &TrainOptions::default(), &mut |_| {}),
            Err(ModelError::Shape { .. })
        ));
        let mut poisoned = windows;
        poisoned[17] = f32::NAN;
        assert!(matches!(
            model.fit(&poisoned, &TrainOptions::default(), &mut |_| {}),
            Err(ModelError::NonFinite {
                what: "training windows",
                index: 17
            })
        ));
    }

    #[test]
    fn no_future_leaks_into_the_forecast() {
        let config = small();
        let model = TcnForecaster::new(config.clone(), Device::Cpu, 4).expect("valid");
        let (context, steps) = (
            config.context as usize,
            (config.context + config.horizon) as usize,
        );
        let window = sine_windows(&config, 1, 5);
        let contexts = |w: &[f32]| -> Vec<f32> {
            w.chunks_exact(steps)
                .flat_map(|s| &s[..context])
                .copied()
                .collect()
        };
        let base = model.forecast(&contexts(&window)).expect("forecasts");
        let base_score = model.score(&window).expect("scores")[0];

        // Rewriting the truth changes the score, never the forecast behind it.
        let mut future = window.clone();
        for series in future.chunks_exact_mut(steps) {
            for v in &mut series[context..] {
                *v += 5.0;
            }
        }
        assert_ne!(model.score(&future).expect("scores")[0], base_score);
        let scores_from_forecast = {
            let mut sum = 0.0;
            let truths = future.chunks_exact(steps).flat_map(|s| &s[context..]);
            for (f, t) in base.iter().zip(truths) {
                sum += f64::from(f - t).powi(2);
            }
            sum / config.forecast_len() as f64
        };
        let shifted = f64::from(model.score(&future).expect("scores")[0]);
        assert!((shifted - scores_from_forecast).abs() < 1e-4 * shifted);

        // The last context step of one channel moves every channel's forecast.
        let mut late = window.clone();
        late[context - 1] += 1.0;
        let moved = model.forecast(&contexts(&late)).expect("forecasts");
        assert!(
            base.iter().zip(&moved).all(|(a, b)| a != b),
            "{base:?} vs {moved:?}"
        );

        // A batch neighbour's values do not leak either.
        let mut pair = contexts(&window);
        pair.extend(contexts(&late));
        let batched = model.forecast(&pair).expect("forecasts");
        // Batched kernels may sum in another order, so equal means equal to rounding.
        for (a, b) in batched.iter().zip(&base) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn learns_sinusoids_far_better_than_persistence() {
        let config = small();
        let mut model = TcnForecaster::new(config.clone(), Device::Cpu, 5).expect("valid");
        let train = sine_windows(&config, 1024, 9);
        // About 2 s on an idle machine; the cap bounds it on a busy one, where even 5
        // epochs (0.016 of persistence's MSE, measured) pass the bound.
        let options = TrainOptions {
            epochs: 30,
            batch_size: 32,
            learning_rate: 1e-2,
            patience: 8,
            max_seconds: Some(15.0),
            ..Default::default()
        };
        let mut reports = Vec::new();
        let report = model
            .fit(&train, &options, &mut |r| reports.push(r.clone()))
            .expect("training runs");
        assert_eq!(reports.len(), report.epochs_run);

        let test = sine_windows(&config, 256, 1234);
        let tcn = mean(&model.score(&test).expect("scores"));
        let naive = mean(
            &persistence_score(&test, 3, config.context as usize, config.horizon as usize)
                .expect("scores"),
        );
        assert!(
            tcn < 0.03 * naive,
            "forecast MSE {tcn} vs persistence {naive} after {} epochs",
            report.epochs_run
        );
    }

    #[test]
    fn persistence_repeats_the_last_context_value() {
        // 2 channels, 3 context steps, 2 horizon steps.
        let window = [0.0, 5.0, 1.0, 2.0, 1.0, 9.0, 9.0, 4.0, 4.0, 6.0];
        let scores = persistence_score(&window, 2, 3, 2).expect("one window");
        // Errors: (2-1)^2, (1-1)^2, (4-4)^2, (6-4)^2.
        assert_eq!(scores, [1.25]);
        assert!(matches!(
            persistence_score(&window[..9], 2, 3, 2),
            Err(ModelError::Shape { .. })
        ));
        assert!(matches!(
            persistence_score(&window, 2, 3, 0),
            Err(ModelError::InvalidOption {
                field: "horizon",
                ..
            })
        ));
        let mut poisoned = window;
        poisoned[7] = f32::NAN;
        assert!(matches!(
            persistence_score(&poisoned, 2, 3, 2),
            Err(ModelError::NonFinite { index: 7, .. })
        ));
    }

    #[test]
    fn safetensors_round_trip_gives_identical_forecasts() {
        let config = small();
        let model = TcnForecaster::new(config.clone(), Device::Cpu, 21).expect("valid");
        let windows = sine_windows(&config, 6, 4);
        let (bytes, sha) = model.to_safetensors().expect("serialises");
        assert_eq!(sha.len(), 64);
        let loaded = TcnForecaster::from_safetensors(
            config.clone(),
            &bytes,
            Some(&sha.to_uppercase()),
            Device::Cpu,
        )
        .expect("loads with matching hash");
        let bits = |m: &TcnForecaster| -> Vec<u32> {
            m.score(&windows)
                .expect("scores")
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&model), bits(&loaded));
        assert_eq!(loaded.to_safetensors().expect("serialises").1, sha);

        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        match TcnForecaster::from_safetensors(config.clone(), &flipped, Some(&sha), Device::Cpu) {
            Err(ModelError::HashMismatch {
                expected, actual, ..
            }) => {
                assert_eq!(expected, sha);
                assert_ne!(actual, sha);
            }
            other => panic!("expected HashMismatch, got {other:?}"),
        }
    }

    #[test]
    fn wrong_shapes_and_missing_tensors_are_refused_naming_them() {
        let config = small();
        let model = TcnForecaster::new(config.clone(), Device::Cpu, 1).expect("valid");
        let (bytes, _) = model.to_safetensors().expect("serialises");

        let longer = ForecasterConfig {
            horizon: 5,
            ..small()
        };
        match TcnForecaster::from_safetensors(longer, &bytes, None, Device::Cpu) {
            Err(err @ ModelError::TensorShape { .. }) => {
                let message = err.to_string();
                assert!(message.contains("head."), "{message}");
                assert!(
                    message.contains("15") && message.contains("12"),
                    "{message}"
                );
            }
            other => panic!("expected TensorShape, got {other:?}"),
        }

        let file = SafeTensors::deserialize(&bytes).expect("valid file");
        let without = |skip: &str| {
            let views: Vec<(String, TensorView<'_>)> = file
                .tensors()
                .into_iter()
                .filter(|(name, _)| name != skip)
                .collect();
            safetensors::serialize(views, None).expect("serialises")
        };
        match TcnForecaster::from_safetensors(
            config.clone(),
            &without("blocks.1.conv2.bias"),
            None,
            Device::Cpu,
        ) {
            Err(ModelError::MissingTensor { name, .. }) => assert_eq!(name, "blocks.1.conv2.bias"),
            other => panic!("expected MissingTensor, got {other:?}"),
        }

        let deeper = ForecasterConfig {
            levels: 4,
            ..small()
        };
        match TcnForecaster::from_safetensors(deeper, &bytes, None, Device::Cpu) {
            Err(ModelError::MissingTensor { name, .. }) => assert!(name.starts_with("blocks.3.")),
            other => panic!("expected MissingTensor, got {other:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn forecast_length_is_n_channels_horizon(
            channels in 1i64..6,
            context in 2i64..20,
            horizon in 1i64..6,
            hidden in 1i64..10,
            levels in 1i64..4,
            kernel in 2i64..5,
            n in 1usize..5,
            seed in 0i64..1000,
        ) {
            let config = ForecasterConfig { channels, context, horizon, hidden, levels, kernel };
            prop_assume!(config.validate().is_ok());
            let model = TcnForecaster::new(config.clone(), Device::Cpu, seed).expect("valid");
            let contexts = vec![0.5f32; n * config.context_len()];
            let forecasts = model.forecast(&contexts).expect("whole contexts");
            prop_assert_eq!(forecasts.len(), n * (channels * horizon) as usize);
            let windows = vec![0.5f32; n * config.window_len()];
            prop_assert_eq!(model.score(&windows).expect("whole windows").len(), n);
        }
    }
}
