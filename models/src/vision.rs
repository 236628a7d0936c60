//! The vision expert: a small convolutional network that tells defective solar cells
//! from functional ones in electroluminescence images (ELPV, see [`crate::elpv`]), and
//! hands its pooled features to a fusion expert.
//!
//! Each image is first standardised by its own mean and deviation: how bright a cell
//! glows depends on the module's current and the camera's exposure, not on its
//! defects. Then four blocks, each a 3×3 same-padded convolution (no bias: batch norm
//! follows), batch norm, 2×2 max pooling and ReLU, widen the channels `base, 2·base,
//! 4·base, 8·base` while halving the image four times; a global average over what is
//! left gives the `8·base` features ([`DefectCnn::embed`]) and a linear head one logit
//! per class. Max pooling before ReLU equals the usual order (both are monotone) on a
//! quarter of the values. Cracks and dark regions are local and can sit anywhere on a
//! cell, which stacked convolutions and a global average see well; at 64 × 64 the
//! network (under 100 thousand parameters at base 16) trains on one CPU thread in
//! minutes, where the published fine-tuned VGG19 needs a GPU.
//!
//! Training goes through the crate's shared loop. A cell is as valid mirrored or
//! turned by 90° (busbars run both ways, defects have no preferred side), so every
//! training image is transposed (square images only) and flipped either way at random,
//! which shows the network all eight symmetries of the square; the draws come from the
//! crate's seeded generator. [`DefectCnn::predict_proba_symmetric`] averages the
//! verdicts over those symmetries. Weights live in a `VarStore` under PyTorch's names
//! for the same module tree (`blocks.0.conv.weight`, `blocks.0.bn.running_mean`, ...,
//! `head.weight`), so safetensors files move between the two (`scripts/bench_train.py`
//! holds the PyTorch module). Initial weights come from the seeded generator as
//! PyTorch's defaults would (convolutions and head uniform in ±1/sqrt(fan_in),
//! batch-norm scale 1 and shift 0), never from libtorch's global generator.

use std::cell::RefCell;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Reduction, TchError, Tensor};

use crate::error::ModelError;
use crate::layout;
use crate::network::{self, Network};
use crate::rng::SplitMix64;
use crate::training::{self, EpochReport, TrainOptions, TrainReport};

/// Convolution blocks; each halves the image, so a side needs at least 2^4 pixels.
const BLOCKS: usize = 4;
const MIN_SIDE: i64 = 1 << BLOCKS;
/// A side above this is a mistyped size, not a cell image (ELPV's source is 300 px).
const MAX_SIDE: i64 = 1024;
const MAX_CHANNELS_BASE: i64 = 256;
const MAX_CLASSES: i64 = 1024;
/// Images per forward pass outside training, which bounds the activations' memory.
const CHUNK: i64 = 256;
/// PyTorch's `BatchNorm2d` defaults.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
/// Added to each image's variance before standardising, so a flat image stays finite.
const STANDARDISE_EPS: f64 = 1e-6;
/// Mixed into the training seed for the augmentation draws, so they do not repeat the
/// loop's shuffling stream.
const AUGMENT_STREAM: u64 = 0xA076_1D64_78BD_642F;

/// Sizes of the network. Images are `height × width` grey values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub height: i64,
    pub width: i64,
    /// Channels of the first block; the others have 2, 4 and 8 times as many.
    pub channels_base: i64,
    pub classes: i64,
}

impl Default for VisionConfig {
    /// ELPV as `scripts/make_elpv.py` writes it: 64 × 64 cells, functional or defective.
    fn default() -> Self {
        Self {
            height: 64,
            width: 64,
            channels_base: 16,
            classes: 2,
        }
    }
}

impl VisionConfig {
    /// Every field within its limits; names the first offending field, its value and
    /// the limit.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (field, value, low, high, why) in [
            (
                "height",
                self.height,
                MIN_SIDE,
                MAX_SIDE,
                "4 blocks halve the image 4 times",
            ),
            (
                "width",
                self.width,
                MIN_SIDE,
                MAX_SIDE,
                "4 blocks halve the image 4 times",
            ),
            (
                "channels_base",
                self.channels_base,
                1,
                MAX_CHANNELS_BASE,
                "the last block has 8 times as many channels",
            ),
            (
                "classes",
                self.classes,
                2,
                MAX_CLASSES,
                "a classifier needs at least two classes",
            ),
        ] {
            if !(low..=high).contains(&value) {
                return Err(ModelError::InvalidOption {
                    field,
                    value: value.to_string(),
                    reason: format!("must lie in {low}..={high} ({why})"),
                });
            }
        }
        Ok(())
    }

    /// Values in one image, `height × width`; 0 for a config that does not validate.
    pub fn image_len(&self) -> usize {
        if self.validate().is_err() {
            return 0;
        }
        (self.height * self.width) as usize
    }

    /// Views [`DefectCnn::predict_proba_symmetric`] averages: the 8 symmetries of the
    /// square for square images, else the 4 flips.
    pub fn symmetries(&self) -> usize {
        if self.height == self.width {
            8
        } else {
            4
        }
    }

    /// Length of the pooled feature vector [`DefectCnn::embed`] returns.
    pub fn embedding_dim(&self) -> i64 {
        self.channels_base * (1 << (BLOCKS - 1))
    }
}

/// One convolution block's variables (shallow handles onto the `VarStore`).
#[derive(Debug)]
struct Block {
    conv: Tensor,
    scale: Tensor,
    shift: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

/// How batch norm normalises.
#[derive(Clone, Copy)]
enum Norm {
    /// By the batch's own statistics, folding them into the running ones with this
    /// momentum (training, and recalibration after it).
    Batch { momentum: f64 },
    /// By the running statistics (inference and validation).
    Running,
}

/// The defect classifier. `Send` (not `Sync`): an expert owns one on its own thread.
#[derive(Debug)]
pub struct DefectCnn {
    config: VisionConfig,
    vs: nn::VarStore,
    blocks: Vec<Block>,
    head_weight: Tensor,
    head_bias: Tensor,
}

impl DefectCnn {
    /// A fresh network with PyTorch's default initialisation, drawn from `seed`.
    pub fn new(config: VisionConfig, device: Device, seed: i64) -> Result<Self, ModelError> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let mut rng = SplitMix64::new(seed as u64);
        let mut uniform = |shape: &[i64], fan_in: i64| -> Result<Tensor, TchError> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let count = shape.iter().product::<i64>() as usize;
            let values: Vec<f32> = (0..count).map(|_| rng.uniform(-bound, bound)).collect();
            Tensor::f_from_slice(&values)?.f_view(shape)
        };
        let root = vs.root();
        let mut blocks = Vec::with_capacity(BLOCKS);
        let mut inputs = 1;
        for (i, width) in (0..BLOCKS).map(|i| (i, config.channels_base << i)) {
            let block = root.sub("blocks").sub(i.to_string());
            let conv = block.sub("conv");
            let bn = block.sub("bn");
            blocks.push(Block {
                conv: conv.f_var_copy("weight", &uniform(&[width, inputs, 3, 3], inputs * 9)?)?,
                scale: bn.f_var_copy("weight", &Tensor::f_ones([width], (Kind::Float, device))?)?,
                shift: bn.f_var_copy("bias", &Tensor::f_zeros([width], (Kind::Float, device))?)?,
                running_mean: bn.f_zeros_no_train("running_mean", &[width])?,
                running_var: bn.f_ones_no_train("running_var", &[width])?,
            });
            inputs = width;
        }
        let head = root.sub("head");
        let features = config.embedding_dim();
        let head_weight =
            head.f_var_copy("weight", &uniform(&[config.classes, features], features)?)?;
        let head_bias = head.f_var_copy("bias", &uniform(&[config.classes], features)?)?;
        Ok(Self {
            config,
            vs,
            blocks,
            head_weight,
            head_bias,
        })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Trainable parameters (the batch-norm statistics are not).
    pub fn parameter_count(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// The pooled features: `[batch, 1, height, width]` → `[batch, 8·channels_base]`.
    fn features(&self, images: &Tensor, norm: Norm) -> Result<Tensor, TchError> {
        let mean = images.f_mean_dim([2i64, 3].as_slice(), true, Kind::Float)?;
        let centred = images.f_sub(&mean)?;
        let deviation = centred
            .f_square()?
            .f_mean_dim([2i64, 3].as_slice(), true, Kind::Float)?
            .f_add_scalar(STANDARDISE_EPS)?
            .f_sqrt()?;
        let mut hidden = layout::channels_last(&centred.f_div(&deviation)?)?;
        for block in &self.blocks {
            let conv = |weight: &Tensor, bias: Option<&Tensor>| {
                hidden.f_conv2d(weight, bias, [1, 1], [1, 1], [1, 1], 1)
            };
            let normalised = match norm {
                Norm::Batch { momentum } => conv(&block.conv, None)?.f_batch_norm(
                    Some(&block.scale),
                    Some(&block.shift),
                    Some(&block.running_mean),
                    Some(&block.running_var),
                    true,
                    momentum,
                    BN_EPS,
                    true,
                )?,
                // Fixed statistics make batch norm an affine map per channel, folded
                // into the convolution's kernel and bias: one pass over the largest
                // activations instead of two.
                Norm::Running => {
                    let gain = block
                        .scale
                        .f_div(&block.running_var.f_add_scalar(BN_EPS)?.f_sqrt()?)?;
                    let weight = block.conv.f_mul(&gain.f_view([-1, 1, 1, 1])?)?;
                    let bias = block.shift.f_sub(&block.running_mean.f_mul(&gain)?)?;
                    conv(&weight, Some(&bias))?
                }
            };
            hidden = normalised
                .f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?
                .f_relu()?;
        }
        hidden.f_mean_dim([2i64, 3].as_slice(), false, Kind::Float)
    }

    /// One logit per class: `[batch, 1, height, width]` → `[batch, classes]`.
    fn logits(&self, images: &Tensor, norm: Norm) -> Result<Tensor, TchError> {
        self.features(images, norm)?
            .f_linear(&self.head_weight, Some(&self.head_bias))
    }

    /// Flat images → `[N, 1, H, W]` on the model's device; refuses empty, ragged and
    /// non-finite input.
    fn images_tensor(&self, images: &[f32], what: &'static str) -> Result<Tensor, ModelError> {
        let per_image = self.config.image_len();
        if images.is_empty() || !images.len().is_multiple_of(per_image) {
            return Err(ModelError::Shape {
                what,
                expected: format!(
                    "a positive multiple of {} x {} = {per_image} values",
                    self.config.height, self.config.width
                ),
                got: format!("{} values", images.len()),
            });
        }
        if let Some(index) = images.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite { what, index });
        }
        Ok(Tensor::f_from_slice(images)?
            .f_view([-1, 1, self.config.height, self.config.width])?
            .f_to_device(self.device())?)
    }

    /// Trains on `images` (`N × height × width` finite grey values, row-major, back to
    /// back, on any scale since each image is standardised;
    /// [`crate::elpv::ElpvSet::images`] gives [0, 1]) with one class per image (0 is
    /// functional). See [`TrainOptions`] for the split, early stopping and time cap;
    /// the network ends with the weights of the best validation epoch, and its
    /// batch-norm statistics are then recomputed over all of `images` for those weights
    /// (the loop restores trainable weights only).
    pub fn fit(
        &mut self,
        images: &[f32],
        labels: &[i64],
        options: &TrainOptions,
        progress: &mut dyn FnMut(&EpochReport),
    ) -> Result<TrainReport, ModelError> {
        options.validate()?;
        let data = self.images_tensor(images, "training images")?;
        let samples = data.size()[0] as usize;
        let targets = training::class_targets(
            labels,
            samples,
            self.config.classes,
            ("training labels", "image"),
            self.device(),
        )?;
        let rng = RefCell::new(SplitMix64::new(options.seed as u64 ^ AUGMENT_STREAM));
        let loss = |indices: &Tensor| {
            let batch = data.f_index_select(0, indices)?;
            let target = targets.f_index_select(0, indices)?;
            // The shared loop scores validation batches under no_grad, which is how a
            // batch tells a training step (augmented, batch statistics) from validation
            // (as served: raw images, running statistics).
            let logits = if self.head_bias.f_mul_scalar(1.0)?.requires_grad() {
                let batch = self.augment(&batch, &mut rng.borrow_mut())?;
                self.logits(
                    &batch,
                    Norm::Batch {
                        momentum: BN_MOMENTUM,
                    },
                )?
            } else {
                self.logits(&batch, Norm::Running)?
            };
            logits.f_cross_entropy_loss::<Tensor>(&target, None, Reduction::Mean, -100, 0.0)
        };
        let report = training::train(&self.vs, samples, options, &loss, progress)?;
        self.recalibrate(&data)?;
        Ok(report)
    }

    /// Each image of `batch` transposed (square images), mirrored left-right and
    /// upside down, each with probability 1/2.
    fn augment(&self, batch: &Tensor, rng: &mut SplitMix64) -> Result<Tensor, TchError> {
        let n = batch.size()[0];
        let mut mask = || -> Result<Tensor, TchError> {
            let draws: Vec<bool> = (0..n).map(|_| rng.next_u64() >> 63 == 1).collect();
            Tensor::f_from_slice(&draws)?
                .f_view([n, 1, 1, 1])?
                .f_to_device(batch.device())
        };
        let mut images = batch.shallow_clone();
        if self.config.height == self.config.width {
            images = images.f_transpose(2, 3)?.f_where_self(&mask()?, &images)?;
        }
        images = images.f_flip([3])?.f_where_self(&mask()?, &images)?;
        images.f_flip([2])?.f_where_self(&mask()?, &images)
    }

    /// Recomputes every batch-norm layer's running statistics for the current weights:
    /// the size-weighted mean of the per-chunk statistics over `data`, no augmentation.
    fn recalibrate(&self, data: &Tensor) -> Result<(), TchError> {
        let _no_grad = tch::no_grad_guard();
        for block in &self.blocks {
            let _zeroed = block.running_mean.shallow_clone().f_zero_()?;
            let _ones = block.running_var.shallow_clone().f_fill_(1.0)?;
        }
        let mut seen = 0i64;
        for chunk in data.split(CHUNK, 0) {
            let n = chunk.size()[0];
            // Folding chunk k in with weight n_k / (n_1 + ... + n_k) leaves the mean over
            // every chunk so far.
            let momentum = n as f64 / (seen + n) as f64;
            // Only the pass's update of the running statistics is wanted.
            let _features = self.features(&chunk, Norm::Batch { momentum })?;
            seen += n;
        }
        Ok(())
    }

    /// `f` over chunks of the images under no_grad, results concatenated on the CPU.
    fn batched(
        &self,
        images: &[f32],
        f: impl Fn(&Tensor) -> Result<Tensor, TchError>,
    ) -> Result<Tensor, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let x = self.images_tensor(images, "images")?;
        let parts = x
            .split(CHUNK, 0)
            .iter()
            .map(|chunk| f(chunk)?.f_to_device(Device::Cpu))
            .collect::<Result<Vec<_>, TchError>>()?;
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// Class probabilities of each image (`N × height × width` values), `[N, classes]`
    /// on the CPU.
    pub fn class_probabilities(&self, images: &[f32]) -> Result<Tensor, ModelError> {
        self.batched(images, |chunk| {
            self.logits(chunk, Norm::Running)?.f_softmax(1, Kind::Float)
        })
    }

    /// P(defective) of each image: one minus the probability of class 0 (functional),
    /// which for two classes is the probability of class 1.
    pub fn predict_proba(&self, images: &[f32]) -> Result<Vec<f32>, ModelError> {
        defect_probability(&self.class_probabilities(images)?)
    }

    /// [`Self::predict_proba`] averaged over the image's symmetries (the 8 of the square
    /// for square images, else the 4 flips), for 8 (or 4) times the cost: the
    /// network's verdicts on one cell seen different ways disagree a little, and their
    /// mean is steadier than any one of them.
    pub fn predict_proba_symmetric(&self, images: &[f32]) -> Result<Vec<f32>, ModelError> {
        let square = self.config.symmetries() == 8;
        let probabilities = self.batched(images, |chunk| {
            let mut views = Vec::with_capacity(8);
            for flips in [&[][..], &[2], &[3], &[2, 3]] {
                let view = if flips.is_empty() {
                    chunk.shallow_clone()
                } else {
                    chunk.f_flip(flips)?
                };
                if square {
                    views.push(view.f_transpose(2, 3)?);
                }
                views.push(view);
            }
            let mut sum = self
                .logits(&views[0], Norm::Running)?
                .f_softmax(1, Kind::Float)?;
            for view in &views[1..] {
                sum = sum.f_add(
                    &self
                        .logits(view, Norm::Running)?
                        .f_softmax(1, Kind::Float)?,
                )?;
            }
            sum.f_div_scalar(views.len() as f64)
        })?;
        defect_probability(&probabilities)
    }

    /// The most likely class of each image.
    pub fn predict(&self, images: &[f32]) -> Result<Vec<i64>, ModelError> {
        let classes = self.class_probabilities(images)?.f_argmax(1, false)?;
        Ok(Vec::<i64>::try_from(&classes)?)
    }

    /// The pooled features of each image, `[N, 8·channels_base]` on the CPU: what a
    /// fusion expert takes from this model.
    pub fn embed(&self, images: &[f32]) -> Result<Tensor, ModelError> {
        self.batched(images, |chunk| self.features(chunk, Norm::Running))
    }
}

/// The weights include the batch-norm statistics, which are variables of the store.
impl Network for DefectCnn {
    type Config = VisionConfig;

    const WEIGHTS_ORIGIN: &'static str = "defect cnn weights";

    fn new(config: VisionConfig, device: Device, seed: i64) -> Result<Self, ModelError> {
        // Inherent associated functions take precedence: this is the constructor above.
        DefectCnn::new(config, device, seed)
    }

    fn config(&self) -> &VisionConfig {
        &self.config
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
}

network::inherent_network_methods!(DefectCnn, VisionConfig);

/// One minus column 0 of `[N, classes]` probabilities.
fn defect_probability(probabilities: &Tensor) -> Result<Vec<f32>, ModelError> {
    let functional = probabilities.f_select(1, 0)?;
    Ok(Vec::<f32>::try_from(
        &functional.f_neg()?.f_add_scalar(1.0)?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> VisionConfig {
        VisionConfig {
            height: 32,
            width: 32,
            channels_base: 8,
            classes: 2,
        }
    }

    /// `n` bright, noisy 32 × 32 cells with a dark horizontal busbar at a random row;
    /// odd-numbered ones (class 1) also carry a dark crack: a line at a random angle
    /// through a random point.
    fn cells(n: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
        let side = 32usize;
        let mut rng = SplitMix64::new(seed);
        let mut images = Vec::with_capacity(n * side * side);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let cracked = i % 2 == 1;
            let busbar = 4 + rng.below(side - 8);
            let (cx, cy) = (8.0 + rng.next_f64() * 16.0, 8.0 + rng.next_f64() * 16.0);
            let angle = rng.next_f64() * std::f64::consts::PI;
            let (dx, dy) = (angle.cos(), angle.sin());
            for y in 0..side {
                for x in 0..side {
                    let mut v = 0.7 + 0.08 * rng.normal();
                    if y == busbar {
                        v -= 0.4;
                    }
                    // Distance from (x, y) to the crack's line, within 10 px of its centre.
                    let (px, py) = (x as f64 - cx, y as f64 - cy);
                    let along = px * dx + py * dy;
                    let across = (px * dy - py * dx).abs();
                    if cracked && across < 0.8 && along.abs() < 10.0 {
                        v -= 0.4;
                    }
                    images.push(v.clamp(0.0, 1.0) as f32);
                }
            }
            labels.push(i64::from(cracked));
        }
        (images, labels)
    }

    fn quick_options(epochs: usize) -> TrainOptions {
        TrainOptions {
            epochs,
            batch_size: 32,
            learning_rate: 3e-3,
            validation_fraction: 0.15,
            patience: epochs,
            seed: 3,
            max_seconds: None,
        }
    }

    #[test]
    fn is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<DefectCnn>();
    }

    #[test]
    fn config_validation_names_field_value_and_limit() {
        let cases = [
            (
                VisionConfig {
                    height: 15,
                    ..small()
                },
                "height",
                "16..=1024",
            ),
            (
                VisionConfig {
                    width: 2048,
                    ..small()
                },
                "width",
                "16..=1024",
            ),
            (
                VisionConfig {
                    channels_base: 0,
                    ..small()
                },
                "channels_base",
                "1..=256",
            ),
            (
                VisionConfig {
                    classes: 1,
                    ..small()
                },
                "classes",
                "2..=1024",
            ),
        ];
        for (config, expected, limit) in cases {
            match config.validate() {
                Err(err @ ModelError::InvalidOption { field, .. }) => {
                    assert_eq!(field, expected);
                    assert!(err.to_string().contains(limit), "{err}");
                }
                other => panic!("{config:?}: expected InvalidOption, got {other:?}"),
            }
            assert_eq!(config.image_len(), 0);
            assert!(DefectCnn::new(config, Device::Cpu, 0).is_err());
        }
        VisionConfig::default()
            .validate()
            .expect("the default is valid");
        assert_eq!(small().image_len(), 1024);
        assert_eq!(small().embedding_dim(), 64);
        let model = DefectCnn::new(VisionConfig::default(), Device::Cpu, 0).expect("valid");
        // 3x3 convolutions 1→16→32→64→128, two per channel of batch norm, 128→2 head.
        let expected = 9 * (16 + 16 * 32 + 32 * 64 + 64 * 128) + 2 * 240 + 128 * 2 + 2;
        assert_eq!(model.parameter_count(), expected);
    }

    #[test]
    fn learns_to_see_cracks() {
        let mut model = DefectCnn::new(small(), Device::Cpu, 5).expect("valid");
        let (images, labels) = cells(480, 1);
        let report = model
            .fit(&images, &labels, &quick_options(12), &mut |_| {})
            .expect("trains");
        assert!(report.epochs_run > 0);
        let (test, truth) = cells(200, 2);
        let p = model.predict_proba(&test).expect("scores");
        let correct = p
            .iter()
            .zip(&truth)
            .filter(|(p, t)| (**p >= 0.5) == (**t == 1))
            .count();
        assert!(correct >= 180, "{correct}/200 correct");
        assert_eq!(
            model.predict(&test).expect("predicts"),
            p.iter().map(|p| i64::from(*p >= 0.5)).collect::<Vec<_>>()
        );
        assert_eq!(
            model.embed(&test).expect("embeds").size(),
            [200, small().embedding_dim()]
        );
    }

    #[test]
    fn augmentation_gives_a_symmetry_of_each_image() {
        let model = DefectCnn::new(small(), Device::Cpu, 1).expect("valid");
        let (images, _) = cells(16, 4);
        let batch = Tensor::from_slice(&images).view([16, 1, 32, 32]);
        let augmented = model
            .augment(&batch, &mut SplitMix64::new(9))
            .expect("augments");
        let mut moved = 0;
        for i in 0..16 {
            let (original, result) = (batch.get(i), augmented.get(i));
            let symmetries = (0..8).map(|s| {
                let mut t = original.shallow_clone();
                if s & 1 == 1 {
                    t = t.transpose(1, 2);
                }
                if s & 2 == 2 {
                    t = t.flip([2]);
                }
                if s & 4 == 4 {
                    t = t.flip([1]);
                }
                t
            });
            let matched: Vec<bool> = symmetries.map(|t| t.equal(&result)).collect();
            assert!(matched.contains(&true), "image {i} is no symmetry");
            moved += usize::from(!matched[0]);
        }
        assert!(moved >= 10, "only {moved}/16 images were transformed");
    }

    #[test]
    fn safetensors_round_trip_gives_identical_outputs() {
        let config = small();
        let mut model = DefectCnn::new(config, Device::Cpu, 7).expect("valid");
        let (images, labels) = cells(64, 3);
        // Trained, so the batch-norm statistics differ from their initial values.
        model
            .fit(&images, &labels, &quick_options(1), &mut |_| {})
            .expect("trains");
        let (bytes, sha) = model.to_safetensors().expect("serialises");
        let loaded =
            DefectCnn::from_safetensors(config, &bytes, Some(&sha), Device::Cpu).expect("loads");
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(
            bits(model.predict_proba(&images).expect("scores")),
            bits(loaded.predict_proba(&images).expect("scores"))
        );
        assert!(model
            .embed(&images)
            .expect("embeds")
            .equal(&loaded.embed(&images).expect("embeds")));
        assert_eq!(loaded.to_safetensors().expect("serialises").1, sha);
        let fresh = DefectCnn::new(config, Device::Cpu, 7).expect("valid");
        assert_ne!(fresh.to_safetensors().expect("serialises").1, sha);

        let wider = VisionConfig {
            channels_base: 4,
            ..config
        };
        match DefectCnn::from_safetensors(wider, &bytes, None, Device::Cpu) {
            Err(err @ ModelError::TensorShape { .. }) => {
                assert!(err.to_string().contains("blocks.0."), "{err}")
            }
            other => panic!("expected TensorShape, got {other:?}"),
        }
        assert!(matches!(
            DefectCnn::from_safetensors(config, &bytes, Some("00"), Device::Cpu),
            Err(ModelError::HashMismatch { .. })
        ));
    }

    #[test]
    fn verdicts_ignore_exposure_and_symmetric_ones_ignore_mirroring() {
        let mut model = DefectCnn::new(small(), Device::Cpu, 4).expect("valid");
        let (images, labels) = cells(64, 6);
        model
            .fit(&images, &labels, &quick_options(2), &mut |_| {})
            .expect("trains");
        let close = |a: &[f32], b: &[f32], tolerance: f32| {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(worst < tolerance, "differ by {worst}");
        };
        let p = model.predict_proba(&images).expect("scores");
        let dimmer: Vec<f32> = images.iter().map(|v| 0.5 * v + 0.1).collect();
        // Not exact: the variance floor weighs more on the dimmer image.
        close(&p, &model.predict_proba(&dimmer).expect("scores"), 5e-3);

        // Each 32 × 32 image mirrored left-right.
        let mirrored: Vec<f32> = images
            .chunks(32)
            .flat_map(|row| row.iter().rev().copied())
            .collect();
        let symmetric = model.predict_proba_symmetric(&images).expect("scores");
        close(
            &symmetric,
            &model.predict_proba_symmetric(&mirrored).expect("scores"),
            1e-5,
        );
        assert_ne!(symmetric, p);
        assert_eq!(small().symmetries(), 8);
        let wide = VisionConfig {
            width: 48,
            ..small()
        };
        assert_eq!(wide.symmetries(), 4);
    }

    #[test]
    fn inference_folds_batch_norm_without_changing_the_features() {
        let model = DefectCnn::new(small(), Device::Cpu, 3).expect("model");
        tch::manual_seed(5);
        tch::no_grad(|| {
            for block in &model.blocks {
                let channels = block.scale.size()[0];
                let random = |low: f64| Tensor::rand([channels], (Kind::Float, Device::Cpu)) + low;
                for (mut tensor, value) in [
                    (block.scale.shallow_clone(), random(0.5)),
                    (block.shift.shallow_clone(), random(-0.5)),
                    (block.running_mean.shallow_clone(), random(-0.5)),
                    (block.running_var.shallow_clone(), random(0.2)),
                ] {
                    tensor.copy_(&value);
                }
            }
        });
        let (images, _) = cells(6, 11);
        let x = model.images_tensor(&images, "images").expect("images");
        let folded = tch::no_grad(|| model.features(&x, Norm::Running)).expect("features");
        // Batch norm applied after the convolution, from the running statistics.
        let mean = x.mean_dim([2i64, 3].as_slice(), true, Kind::Float);
        let centred = &x - mean;
        let deviation = (centred
            .square()
            .mean_dim([2i64, 3].as_slice(), true, Kind::Float)
            + STANDARDISE_EPS)
            .sqrt();
        let mut hidden = centred / deviation;
        for block in &model.blocks {
            hidden = hidden
                .conv2d(&block.conv, None::<&Tensor>, [1, 1], [1, 1], [1, 1], 1)
                .batch_norm(
                    Some(&block.scale),
                    Some(&block.shift),
                    Some(&block.running_mean),
                    Some(&block.running_var),
                    false,
                    BN_MOMENTUM,
                    BN_EPS,
                    false,
                )
                .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
                .relu();
        }
        let reference = hidden.mean_dim([2i64, 3].as_slice(), false, Kind::Float);
        let error = (&folded - &reference).abs().max().double_value(&[]);
        assert!(error < 1e-4, "folded features differ by {error}");
        assert!(
            reference.abs().max().double_value(&[]) > 0.1,
            "features all zero"
        );
    }

    #[test]
    fn same_seed_same_weights() {
        let sha = |seed| {
            DefectCnn::new(small(), Device::Cpu, seed)
                .expect("valid")
                .to_safetensors()
                .expect("serialises")
                .1
        };
        assert_eq!(sha(11), sha(11));
        assert_ne!(sha(11), sha(12));
    }

    #[test]
    fn bad_images_and_labels_are_refused() {
        let mut model = DefectCnn::new(small(), Device::Cpu, 2).expect("valid");
        let (mut images, mut labels) = cells(4, 1);
        let options = quick_options(1);
        for len in [0, 1023, 1025] {
            match model.predict_proba(&images[..len]) {
                Err(ModelError::Shape { got, .. }) => assert_eq!(got, format!("{len} values")),
                other => panic!("len {len}: expected Shape, got {other:?}"),
            }
        }
        match model.fit(&images, &labels[..3], &options, &mut |_| {}) {
            Err(ModelError::Shape { what, .. }) => assert_eq!(what, "training labels"),
            other => panic!("expected Shape, got {other:?}"),
        }
        labels[2] = 2;
        match model.fit(&images, &labels, &options, &mut |_| {}) {
            Err(err @ ModelError::InvalidOption { field: "label", .. }) => {
                assert!(err.to_string().contains("label 2"), "{err}")
            }
            other => panic!("expected InvalidOption, got {other:?}"),
        }
        labels[2] = -1;
        assert!(model.fit(&images, &labels, &options, &mut |_| {}).is_err());
        labels[2] = 0;
        images[1500] = f32::NAN;
        match model.fit(&images, &labels, &options, &mut |_| {}) {
            Err(ModelError::NonFinite { index, .. }) => assert_eq!(index, 1500),
            other => panic!("expected NonFinite, got {other:?}"),
        }
        match model.embed(&images) {
            Err(ModelError::NonFinite { index, .. }) => assert_eq!(index, 1500),
            other => panic!("expected NonFinite, got {other:?}"),
        }
    }
}
