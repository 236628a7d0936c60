//! Continual learning: a stored model version adapted to a new operating regime without
//! forgetting the old one, and the gate that decides whether the adapted version may
//! replace the one serving.
//!
//! A plant that settles at a new steady operating point (another feed batch, a hotter
//! cooling-water supply) makes an anomaly expert alarm on every window of the "new
//! normal". Fine-tuning on the new windows alone fixes that and forgets the old regime,
//! to which the plant may return at any time. Two classic remedies, combined here:
//!
//! - **Replay**: a [`Reservoir`] keeps a uniform, bounded sample of every window the
//!   expert saw (Vitter's algorithm R), and each fine-tuning batch draws a share
//!   ([`FineTuneOptions::replay_fraction`]) of old windows from it;
//! - **EWC** (elastic weight consolidation, Kirkpatrick et al. 2017): a quadratic penalty
//!   `λ/2 · Σ F_i (θ_i − θ*_i)²` holds each weight near the incumbent's value `θ*` in
//!   proportion to its diagonal Fisher information `F` on the old windows, so weights the
//!   old regime depends on move least. Replay covers what the reservoir holds; EWC also
//!   protects what a small reservoir misses.
//!
//! [`fine_tune`] works on a shadow copy rebuilt from the stored bytes; the incumbent keeps
//! serving, untouched. Before a candidate replaces it, the [`ValidationGate`] compares
//! both on held-out windows of each regime: the candidate must gain on the new regime and
//! must not lose more than a set share on the old one, so a bad adaptation (too few
//! windows, a fault mistaken for a new regime, forgetting) never reaches the router.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Reduction, TchError, Tensor};

use crate::autoencoder::ConvAutoencoder;
use crate::calibration::quantile;
use crate::classifier::FaultClassifier;
use crate::error::ModelError;
use crate::network::Network;
use crate::rng::SplitMix64;
use crate::served::Architecture;
use crate::store::Manifest;
use crate::training::{self, TrainOptions};

/// One window an expert saw (flat, channel-major, as routers carry it) and, for
/// classifiers, its class when someone labelled it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayItem {
    pub window: Vec<f32>,
    pub label: Option<i64>,
}

/// A bounded, uniform sample of every window offered: Vitter's algorithm R. After `n`
/// offers each of them is kept with probability `capacity / n` (all of them while
/// `n ≤ capacity`, in the order offered), using O(capacity) memory and one random draw
/// per offer. The draws come from the crate's seeded generator, so a reservoir is
/// reproducible from its seed.
pub struct Reservoir {
    capacity: usize,
    seen: u64,
    items: Vec<ReplayItem>,
    rng: SplitMix64,
}

impl std::fmt::Debug for Reservoir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservoir")
            .field("capacity", &self.capacity)
            .field("seen", &self.seen)
            .field("len", &self.items.len())
            .finish()
    }
}

impl Reservoir {
    /// An empty reservoir keeping at most `capacity` windows; capacity 0 is refused.
    pub fn new(capacity: usize, seed: u64) -> Result<Reservoir, ModelError> {
        if capacity == 0 {
            return Err(ModelError::InvalidOption {
                field: "capacity",
                value: "0".into(),
                reason: "a reservoir must keep at least 1 window".into(),
            });
        }
        Ok(Reservoir {
            capacity,
            seen: 0,
            items: Vec::new(),
            rng: SplitMix64::new(seed),
        })
    }

    /// Offers one window; true when it was kept (possibly replacing an older one).
    pub fn offer(&mut self, item: ReplayItem) -> bool {
        let offered_before = self.seen;
        self.seen += 1;
        if self.items.len() < self.capacity {
            self.items.push(item);
            return true;
        }
        // Algorithm R: the new item takes slot j, uniform in 0..=offered_before, when j
        // is a slot that exists; so it is kept with probability capacity / seen.
        let slot = below(&mut self.rng, offered_before + 1);
        match usize::try_from(slot) {
            Ok(slot) if slot < self.capacity => {
                self.items[slot] = item;
                true
            }
            _ => false,
        }
    }

    /// Windows offered since construction or the last [`Reservoir::clear`].
    pub fn seen(&self) -> u64 {
        self.seen
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn items(&self) -> &[ReplayItem] {
        &self.items
    }

    /// Takes back what a snapshot of [`Reservoir::items`] and [`Reservoir::seen`] held
    /// (a learner restarted): later offers go on sampling as if it had never stopped.
    /// Items past the capacity are dropped.
    pub fn restore(&mut self, seen: u64, mut items: Vec<ReplayItem>) {
        items.truncate(self.capacity);
        self.seen = seen.max(items.len() as u64);
        self.items = items;
    }

    /// Empties the reservoir and restarts the count, so the next stream is sampled
    /// uniformly on its own (the generator continues; it is not reseeded).
    pub fn clear(&mut self) {
        self.items.clear();
        self.seen = 0;
    }
}

/// Uniform in 0..n (n > 0) by Lemire's multiply-shift, on u64 counts so a reservoir
/// that has seen more than `usize::MAX` windows on a 32-bit node stays uniform.
fn below(rng: &mut SplitMix64, n: u64) -> u64 {
    ((u128::from(rng.next_u64()) * u128::from(n)) >> 64) as u64
}

/// How to fine-tune. Missing fields take their defaults when deserialised.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FineTuneOptions {
    /// Passes over the fine-tuning windows (the best pass's weights are kept).
    pub epochs: usize,
    /// Windows per Adam step.
    pub batch_size: usize,
    /// Adam's step size; smaller than from scratch, the start is already good.
    pub learning_rate: f64,
    /// EWC strength; 0 turns the regulariser off.
    pub ewc_lambda: f64,
    /// Share of each batch drawn from replay (old regime); 0 = naive fine-tuning on new
    /// data only.
    pub replay_fraction: f64,
    /// Fixes the hold-back, the replay draws and the batch order.
    pub seed: i64,
    /// Wall-clock budget of the optimisation steps (as [`TrainOptions::max_seconds`]).
    pub max_seconds: Option<f64>,
    /// Share of the new windows (the latest ones) and of the replay windows held back
    /// from training to calibrate the threshold and report the losses.
    pub validation_fraction: f64,
    /// The autoencoder's threshold: this quantile of its scores on the held-back
    /// windows (the q0.99 rule of the project's stored autoencoders).
    pub threshold_quantile: f64,
    /// Replay windows the Fisher information is estimated on, one gradient each.
    pub fisher_samples: usize,
}

impl Default for FineTuneOptions {
    fn default() -> Self {
        FineTuneOptions {
            epochs: 60,
            batch_size: 32,
            learning_rate: 1e-3,
            ewc_lambda: 100.0,
            replay_fraction: 0.75,
            seed: 7,
            max_seconds: Some(120.0),
            validation_fraction: 0.2,
            threshold_quantile: 0.99,
            fisher_samples: 256,
        }
    }
}

fn invalid(field: &'static str, value: impl ToString, reason: &str) -> ModelError {
    ModelError::InvalidOption {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

impl FineTuneOptions {
    /// Checks every field's range, naming the first offending field, its value and the
    /// limit.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.epochs == 0 {
            return Err(invalid("epochs", 0, "at least 1 epoch is needed"));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", 0, "a batch needs at least 1 window"));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(invalid(
                "learning_rate",
                self.learning_rate,
                "must be positive and finite",
            ));
        }
        if !(self.ewc_lambda.is_finite() && self.ewc_lambda >= 0.0) {
            return Err(invalid(
                "ewc_lambda",
                self.ewc_lambda,
                "must be finite and >= 0 (0 turns EWC off)",
            ));
        }
        if !(0.0..1.0).contains(&self.replay_fraction) {
            return Err(invalid(
                "replay_fraction",
                self.replay_fraction,
                "must lie in [0, 1): a batch needs new windows",
            ));
        }
        if let Some(seconds) = self.max_seconds {
            if !(seconds.is_finite() && seconds > 0.0) {
                return Err(invalid(
                    "max_seconds",
                    seconds,
                    "must be positive and finite (leave it unset for no limit)",
                ));
            }
        }
        if !(0.0..1.0).contains(&self.validation_fraction) {
            return Err(invalid(
                "validation_fraction",
                self.validation_fraction,
                "must lie in [0, 1)",
            ));
        }
        if !(self.threshold_quantile > 0.0 && self.threshold_quantile <= 1.0) {
            return Err(invalid(
                "threshold_quantile",
                self.threshold_quantile,
                "must lie in (0, 1]",
            ));
        }
        if self.fisher_samples == 0 {
            return Err(invalid(
                "fisher_samples",
                0,
                "the Fisher information needs at least 1 window",
            ));
        }
        Ok(())
    }
}

/// A fine-tuned candidate version: its weights (safetensors, checked like any stored
/// version's), their hash, and what the run measured.
#[derive(Debug, Clone)]
pub struct FineTuned {
    pub weights: Vec<u8>,
    pub sha256: String,
    /// `new_loss` and `old_loss` (held-back windows of each regime; `old_loss` only with
    /// replay), `threshold` (autoencoders), `train_objective`, `ewc_penalty`,
    /// `epochs_run`, `train_windows`, `replay_windows`, `held_back_windows`.
    pub metrics: BTreeMap<String, f64>,
    pub elapsed_s: f64,
    /// Adam steps taken.
    pub steps: usize,
}

/// The networks continual learning and federated rounds adapt, rebuilt from a stored
/// version or from the weights a round hands a site.
pub(crate) enum Shadow {
    Autoencoder(ConvAutoencoder),
    // Boxed: a classifier's handles are larger than the autoencoder's.
    Classifier(Box<FaultClassifier>),
}

impl Shadow {
    /// The manifest's network with `weights` loaded and checked against its hash.
    fn load(manifest: &Manifest, weights: &[u8], device: Device) -> Result<Shadow, ModelError> {
        let architecture = Architecture::from_manifest(manifest)?;
        Shadow::build(
            &architecture,
            weights,
            Some(manifest.weights_sha256.as_str()),
            device,
        )
        .map_err(|error| match error {
            ModelError::InvalidOption { field, reason, .. } if field == "architecture" => {
                ModelError::InvalidOption {
                    field,
                    value: format!("{} ({})", manifest.architecture, manifest.id()),
                    reason,
                }
            }
            other => other,
        })
    }

    /// `architecture`'s network with `weights` loaded (checked against `sha256` when
    /// given).
    pub(crate) fn build(
        architecture: &Architecture,
        weights: &[u8],
        sha256: Option<&str>,
        device: Device,
    ) -> Result<Shadow, ModelError> {
        match architecture {
            Architecture::ConvAutoencoder(config) => Ok(Shadow::Autoencoder(
                ConvAutoencoder::from_safetensors(config.clone(), weights, sha256, device)?,
            )),
            Architecture::FaultClassifier { config, .. } => Ok(Shadow::Classifier(Box::new(
                FaultClassifier::from_safetensors(*config, weights, sha256, device)?,
            ))),
            other => Err(ModelError::InvalidOption {
                field: "architecture",
                value: other.manifest_fields().0,
                reason: "only conv_autoencoder and fault_classifier are trained on a node".into(),
            }),
        }
    }

    /// `[channels, length]` of one window.
    pub(crate) fn shape(&self) -> [i64; 2] {
        match self {
            Shadow::Autoencoder(model) => [model.config().channels, model.config().window],
            Shadow::Classifier(model) => [model.config().channels, model.config().window],
        }
    }

    pub(crate) fn var_store(&self) -> &nn::VarStore {
        match self {
            Shadow::Autoencoder(model) => model.var_store(),
            Shadow::Classifier(model) => model.var_store(),
        }
    }

    /// The classes of a classifier; `None` for the self-supervised autoencoder.
    pub(crate) fn classes(&self) -> Option<i64> {
        match self {
            Shadow::Autoencoder(_) => None,
            Shadow::Classifier(model) => Some(model.config().classes),
        }
    }

    /// Whether an item can contribute to the loss: every window for the autoencoder,
    /// labelled ones for the classifier.
    pub(crate) fn usable(&self, item: &ReplayItem) -> bool {
        self.classes().is_none() || item.label.is_some()
    }

    /// Mean loss of a `[B, C, L]` batch: reconstruction MSE, or cross-entropy against
    /// `targets`.
    pub(crate) fn loss(
        &self,
        windows: &Tensor,
        targets: Option<&Tensor>,
    ) -> Result<Tensor, TchError> {
        match (self, targets) {
            (Shadow::Autoencoder(model), _) => model
                .try_forward(windows)?
                .f_mse_loss(windows, Reduction::Mean),
            (Shadow::Classifier(model), Some(targets)) => model
                .logits(windows)?
                .f_cross_entropy_loss::<Tensor>(targets, None, Reduction::Mean, -100, 0.0),
            (Shadow::Classifier(_), None) => Err(TchError::Shape(
                "a classifier's loss needs the windows' classes".into(),
            )),
        }
    }

    /// What the network says about a `[B, C, L]` batch, the thing distillation
    /// matches: class probabilities `[B, classes]`, or reconstructions `[B, C, L]`.
    pub(crate) fn outputs(&self, windows: &Tensor) -> Result<Tensor, TchError> {
        match self {
            Shadow::Autoencoder(model) => model.try_forward(windows),
            Shadow::Classifier(model) => model.logits(windows)?.f_softmax(1, Kind::Float),
        }
    }

    /// How far the network's outputs on a batch are from `targets` (outputs of the same
    /// shape): soft cross-entropy `−Σ p log q` for a classifier, MSE for an autoencoder.
    pub(crate) fn distillation_loss(
        &self,
        windows: &Tensor,
        targets: &Tensor,
    ) -> Result<Tensor, TchError> {
        match self {
            Shadow::Autoencoder(model) => model
                .try_forward(windows)?
                .f_mse_loss(targets, Reduction::Mean),
            Shadow::Classifier(model) => model
                .logits(windows)?
                .f_log_softmax(1, Kind::Float)?
                .f_mul(targets)?
                .f_sum_dim_intlist(1, false, Kind::Float)?
                .f_mean(Kind::Float)?
                .f_neg(),
        }
    }

    pub(crate) fn to_safetensors(&self) -> Result<(Vec<u8>, String), ModelError> {
        match self {
            Shadow::Autoencoder(model) => model.to_safetensors(),
            Shadow::Classifier(model) => model.to_safetensors(),
        }
    }

    /// Checks every item's length and values; `what` names the set in errors.
    pub(crate) fn check(&self, what: &'static str, items: &[ReplayItem]) -> Result<(), ModelError> {
        let [channels, length] = self.shape();
        let expected = (channels * length) as usize;
        for (index, item) in items.iter().enumerate() {
            if item.window.len() != expected {
                return Err(ModelError::Shape {
                    what,
                    expected: format!(
                        "{channels} channels x {length} samples = {expected} values per window"
                    ),
                    got: format!("{} values in window {index}", item.window.len()),
                });
            }
            if let Some(at) = item.window.iter().position(|v| !v.is_finite()) {
                return Err(ModelError::NonFinite {
                    what,
                    index: index * expected + at,
                });
            }
        }
        Ok(())
    }

    /// The items' windows as one `[n, C, L]` tensor and, for classifiers, their classes.
    pub(crate) fn batch(
        &self,
        items: &[&ReplayItem],
        device: Device,
    ) -> Result<(Tensor, Option<Tensor>), ModelError> {
        let windows = self.windows(items, device)?;
        let targets = match self.classes() {
            None => None,
            Some(classes) => {
                let labels: Vec<i64> = items.iter().filter_map(|i| i.label).collect();
                Some(training::class_targets(
                    &labels,
                    items.len(),
                    classes,
                    ("continual-learning labels", "window"),
                    device,
                )?)
            }
        };
        Ok((windows, targets))
    }

    /// The items' windows as one `[n, C, L]` tensor, labels ignored.
    pub(crate) fn windows(
        &self,
        items: &[&ReplayItem],
        device: Device,
    ) -> Result<Tensor, ModelError> {
        let [channels, length] = self.shape();
        let flat: Vec<f32> = items
            .iter()
            .flat_map(|i| i.window.iter().copied())
            .collect();
        Ok(Tensor::f_from_slice(&flat)?
            .f_view([items.len() as i64, channels, length])?
            .f_to_device(device)?)
    }

    /// Window-weighted mean loss over `items`, without gradients, in chunks that bound
    /// memory.
    pub(crate) fn mean_loss(
        &self,
        items: &[&ReplayItem],
        device: Device,
    ) -> Result<f64, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let mut sum = 0.0;
        for chunk in items.chunks(256) {
            let (windows, targets) = self.batch(chunk, device)?;
            sum += self.loss(&windows, targets.as_ref())?.f_double_value(&[])? * chunk.len() as f64;
        }
        Ok(sum / items.len() as f64)
    }
}

/// Elastic weight consolidation's penalty `λ/2 · Σ F_i (θ_i − θ*_i)²` over a model's
/// trainable variables, anchored at their values when it was estimated.
pub(crate) struct Ewc {
    lambda: f64,
    /// (live variable, anchor copy, diagonal Fisher information), per variable.
    terms: Vec<(Tensor, Tensor, Tensor)>,
}

impl Ewc {
    /// Anchors at the current values of `variables` and estimates the diagonal
    /// empirical Fisher information as the mean over `samples` of the squared gradient
    /// of `sample_loss(i)`, the loss of sample `i` alone. One gradient per sample, not
    /// per batch: squaring a batch's mean gradient would cancel the samples' disagreement
    /// and underestimate it.
    pub(crate) fn estimate(
        variables: Vec<Tensor>,
        samples: usize,
        lambda: f64,
        sample_loss: &dyn Fn(usize) -> Result<Tensor, TchError>,
    ) -> Result<Ewc, ModelError> {
        if samples == 0 {
            return Err(invalid(
                "fisher_samples",
                0,
                "the Fisher information needs at least 1 window",
            ));
        }
        let mut fisher = variables
            .iter()
            .map(|v| v.f_zeros_like())
            .collect::<Result<Vec<_>, _>>()?;
        for sample in 0..samples {
            let gradients =
                Tensor::f_run_backward(&[sample_loss(sample)?], &variables, false, false)?;
            let _no_grad = tch::no_grad_guard();
            for (sum, gradient) in fisher.iter_mut().zip(&gradients) {
                *sum = sum.f_add(&gradient.f_square()?)?;
            }
        }
        let _no_grad = tch::no_grad_guard();
        let terms = variables
            .into_iter()
            .zip(fisher)
            .map(|(live, sum)| {
                let mut anchor = live.f_zeros_like()?;
                anchor.f_copy_(&live)?;
                Ok((live, anchor, sum.f_div_scalar(samples as f64)?))
            })
            .collect::<Result<_, TchError>>()?;
        Ok(Ewc { lambda, terms })
    }

    /// FedProx's proximal term `mu/2 · ‖θ − θ*‖²` (Li et al. 2020): EWC with a Fisher
    /// information of 1 everywhere, anchored at the variables' current values (the
    /// round's global weights).
    pub(crate) fn proximal(variables: Vec<Tensor>, mu: f64) -> Result<Ewc, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let terms = variables
            .into_iter()
            .map(|live| {
                let mut anchor = live.f_zeros_like()?;
                anchor.f_copy_(&live)?;
                let ones = live.f_ones_like()?;
                Ok((live, anchor, ones))
            })
            .collect::<Result<_, TchError>>()?;
        Ok(Ewc { lambda: mu, terms })
    }

    /// The penalty at the variables' current values: 0 at the anchor, quadratic around it.
    pub(crate) fn penalty(&self) -> Result<Tensor, TchError> {
        let mut total = Tensor::f_zeros([], (Kind::Float, self.device()))?;
        for (live, anchor, fisher) in &self.terms {
            let moved = live
                .f_sub(anchor)?
                .f_square()?
                .f_mul(fisher)?
                .f_sum(Kind::Float)?;
            total = total.f_add(&moved)?;
        }
        total.f_mul_scalar(self.lambda / 2.0)
    }

    fn device(&self) -> Device {
        self.terms
            .first()
            .map_or(Device::Cpu, |(live, _, _)| live.device())
    }
}

/// `count` indices, shuffled by `rng` when one is given (else in order), split into
/// (kept, held back): the last `fraction` held back, at least one kept.
fn hold_back(
    count: usize,
    fraction: f64,
    rng: Option<&mut SplitMix64>,
) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..count).collect();
    if let Some(rng) = rng {
        rng.shuffle(&mut order);
    }
    let held = ((count as f64 * fraction).round() as usize).min(count.saturating_sub(1));
    let back = order.split_off(count - held);
    (order, back)
}

fn pick<'a>(set: &[&'a ReplayItem], indices: &[usize]) -> Vec<&'a ReplayItem> {
    indices.iter().map(|&i| set[i]).collect()
}

/// Fine-tunes a shadow copy of the stored version (`manifest` + safetensors `weights`):
/// the incumbent stays untouched. Supports `conv_autoencoder` (self-supervised:
/// reconstruction) and `fault_classifier` (needs labels; items without one are not used
/// for the loss). EWC's anchor is the incumbent's weights, its diagonal Fisher estimated
/// on `replay`. For the autoencoder the returned metrics carry a recalibrated `threshold`
/// (the [`FineTuneOptions::threshold_quantile`] quantile, q0.99 by default as for the
/// project's stored autoencoders) computed on held-back windows of both regimes.
///
/// `new` is taken in arrival order: its latest windows are the ones held back, because
/// windows cut one row apart overlap, and a random pick would calibrate on near-copies of
/// training windows. The replay windows (a reservoir: already a random sample) are held
/// back by a seeded shuffle. Each training epoch holds the new windows kept plus
/// `replay_fraction / (1 − replay_fraction)` times as many replay draws (cycling when the
/// reservoir holds fewer), so batches carry that share of old windows on average.
pub fn fine_tune(
    manifest: &Manifest,
    weights: &[u8],
    new: &[ReplayItem],
    replay: &[ReplayItem],
    options: &FineTuneOptions,
    device: Device,
) -> Result<FineTuned, ModelError> {
    let started = Instant::now();
    options.validate()?;
    let shadow = Shadow::load(manifest, weights, device)?;
    shadow.check("new windows", new)?;
    shadow.check("replay windows", replay)?;
    let new: Vec<&ReplayItem> = new.iter().filter(|i| shadow.usable(i)).collect();
    let replay: Vec<&ReplayItem> = replay.iter().filter(|i| shadow.usable(i)).collect();
    let unit = if shadow.classes().is_some() {
        "labelled window"
    } else {
        "window"
    };
    if new.is_empty() {
        return Err(ModelError::Shape {
            what: "new windows",
            expected: format!("at least one {unit}"),
            got: "none".into(),
        });
    }
    for (field, value, used) in [
        (
            "replay_fraction",
            options.replay_fraction,
            options.replay_fraction > 0.0,
        ),
        ("ewc_lambda", options.ewc_lambda, options.ewc_lambda > 0.0),
    ] {
        if used && replay.is_empty() {
            return Err(invalid(
                field,
                value,
                &format!("needs replay windows (at least one {unit}), none were given"),
            ));
        }
    }

    let mut rng = SplitMix64::new(options.seed as u64);
    let (new_kept, new_held) = hold_back(new.len(), options.validation_fraction, None);
    let (replay_kept, replay_held) =
        hold_back(replay.len(), options.validation_fraction, Some(&mut rng));
    let (new_held, replay_held) = (pick(&new, &new_held), pick(&replay, &replay_held));
    let mut train_items = pick(&new, &new_kept);
    let replay_draws = if options.replay_fraction > 0.0 {
        let share = options.replay_fraction / (1.0 - options.replay_fraction);
        ((train_items.len() as f64 * share).round() as usize).max(1)
    } else {
        0
    };
    let replay_train = pick(&replay, &replay_kept);
    train_items.extend(replay_train.iter().cycle().take(replay_draws));

    let ewc = if options.ewc_lambda > 0.0 {
        let fisher_items = &replay_train[..replay_train.len().min(options.fisher_samples)];
        let (windows, targets) = shadow.batch(fisher_items, device)?;
        let sample_loss = |i: usize| {
            let target = targets
                .as_ref()
                .map(|t| t.f_narrow(0, i as i64, 1))
                .transpose()?;
            shadow.loss(&windows.f_narrow(0, i as i64, 1)?, target.as_ref())
        };
        Some(Ewc::estimate(
            shadow.var_store().trainable_variables(),
            fisher_items.len(),
            options.ewc_lambda,
            &sample_loss,
        )?)
    } else {
        None
    };

    let (data, targets) = shadow.batch(&train_items, device)?;
    let steps = Cell::new(0usize);
    let objective = |indices: &Tensor| {
        let batch = data.f_index_select(0, indices)?;
        let target = targets
            .as_ref()
            .map(|t| t.f_index_select(0, indices))
            .transpose()?;
        let mut loss = shadow.loss(&batch, target.as_ref())?;
        if let Some(ewc) = &ewc {
            loss = loss.f_add(&ewc.penalty()?)?;
        }
        // The loop also evaluates the objective without gradients after each epoch;
        // only the calls that will take an Adam step track gradients.
        if loss.requires_grad() {
            steps.set(steps.get() + 1);
        }
        Ok(loss)
    };
    // No validation split inside the loop: the hold-back above is chosen by time, which
    // the loop's random split cannot do. The loop keeps the epoch with the lowest
    // objective on the training windows, and runs the whole budget.
    let train_options = TrainOptions {
        epochs: options.epochs,
        batch_size: options.batch_size,
        learning_rate: options.learning_rate,
        validation_fraction: 0.0,
        patience: options.epochs,
        seed: options.seed,
        max_seconds: options.max_seconds,
    };
    let report = training::train(
        shadow.var_store(),
        train_items.len(),
        &train_options,
        &objective,
        &mut |_| {},
    )?;

    let mut metrics = BTreeMap::from([
        ("train_objective".to_string(), report.best_validation_loss),
        ("epochs_run".to_string(), report.epochs_run as f64),
        ("train_windows".to_string(), train_items.len() as f64),
        ("replay_windows".to_string(), replay_draws as f64),
        (
            "held_back_windows".to_string(),
            (new_held.len() + replay_held.len()) as f64,
        ),
    ]);
    if let Some(ewc) = &ewc {
        let _no_grad = tch::no_grad_guard();
        metrics.insert("ewc_penalty".into(), ewc.penalty()?.f_double_value(&[])?);
    }
    // With nothing held back (a single new window), the training windows stand in.
    let new_check = if new_held.is_empty() {
        pick(&new, &new_kept)
    } else {
        new_held
    };
    metrics.insert("new_loss".into(), shadow.mean_loss(&new_check, device)?);
    if !replay_held.is_empty() {
        metrics.insert("old_loss".into(), shadow.mean_loss(&replay_held, device)?);
    }
    if let Shadow::Autoencoder(model) = &shadow {
        let calibration: Vec<f32> = new_check
            .iter()
            .chain(&replay_held)
            .flat_map(|i| i.window.iter().copied())
            .collect();
        let scores = model.score(&calibration)?;
        let threshold = quantile(&scores, options.threshold_quantile)?;
        metrics.insert("threshold".into(), f64::from(threshold));
        metrics.insert("threshold_quantile".into(), options.threshold_quantile);
    }
    let (weights, sha256) = shadow.to_safetensors()?;
    Ok(FineTuned {
        weights,
        sha256,
        metrics,
        elapsed_s: started.elapsed().as_secs_f64(),
        steps: steps.get(),
    })
}

/// Loss of a version on `items` (lower is better): mean reconstruction MSE for the
/// autoencoder, mean cross-entropy on the labelled items for the classifier.
pub fn evaluate(
    manifest: &Manifest,
    weights: &[u8],
    items: &[ReplayItem],
    device: Device,
) -> Result<f64, ModelError> {
    let shadow = Shadow::load(manifest, weights, device)?;
    shadow.check("evaluation windows", items)?;
    let usable: Vec<&ReplayItem> = items.iter().filter(|i| shadow.usable(i)).collect();
    if usable.is_empty() {
        return Err(ModelError::Shape {
            what: "evaluation windows",
            expected: if shadow.classes().is_some() {
                "at least one labelled window".into()
            } else {
                "at least one window".into()
            },
            got: format!("{} usable of {}", usable.len(), items.len()),
        });
    }
    shadow.mean_loss(&usable, device)
}

/// When a fine-tuned candidate may replace the incumbent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationGate {
    /// The candidate's new-regime loss must be at most (1 − min_gain) × the incumbent's
    pub min_gain: f64,
    /// and its old-regime loss at most (1 + max_forgetting) × the incumbent's.
    pub max_forgetting: f64,
}

impl Default for ValidationGate {
    /// A swap must win at least 10 % on the new regime and may lose at most 10 % on the
    /// old one: a hot swap is cheap but not free (the next windows run on a new version,
    /// every threshold moves), so noise-sized gains do not justify one.
    fn default() -> Self {
        ValidationGate {
            min_gain: 0.1,
            max_forgetting: 0.1,
        }
    }
}

/// The gate's decision and the numbers behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub old_before: f64,
    pub old_after: f64,
    pub new_before: f64,
    pub new_after: f64,
    pub promote: bool,
    /// why, in words, with the numbers and limits
    pub reason: String,
}

/// Four significant digits, in scientific notation where fixed would hide them.
fn show(x: f64) -> String {
    if x == 0.0 || (1e-3..1e6).contains(&x.abs()) {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

impl ValidationGate {
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(0.0..1.0).contains(&self.min_gain) {
            return Err(invalid(
                "min_gain",
                self.min_gain,
                "must lie in [0, 1): the share the new-regime loss must fall by",
            ));
        }
        if !(self.max_forgetting.is_finite() && self.max_forgetting >= 0.0) {
            return Err(invalid(
                "max_forgetting",
                self.max_forgetting,
                "must be finite and >= 0: the share the old-regime loss may rise by",
            ));
        }
        Ok(())
    }

    /// Promotes when the new-regime loss fell to at most (1 − min_gain) × its value
    /// before and the old-regime loss rose to at most (1 + max_forgetting) × its value
    /// before (both limits inclusive); a loss that is not finite never promotes.
    pub fn judge(
        &self,
        old_before: f64,
        old_after: f64,
        new_before: f64,
        new_after: f64,
    ) -> GateReport {
        let new_limit = (1.0 - self.min_gain) * new_before;
        let old_limit = (1.0 + self.max_forgetting) * old_before;
        let finite = [old_before, old_after, new_before, new_after]
            .iter()
            .all(|x| x.is_finite());
        let gains = new_after <= new_limit;
        let keeps = old_after <= old_limit;
        let promote = finite && gains && keeps;
        let compare = |ok: bool| if ok { "<=" } else { ">" };
        let numbers = format!(
            "new-regime loss {} {} (1 - {}) x {} = {}; old-regime loss {} {} (1 + {}) x {} = {}",
            show(new_after),
            compare(gains),
            self.min_gain,
            show(new_before),
            show(new_limit),
            show(old_after),
            compare(keeps),
            self.max_forgetting,
            show(old_before),
            show(old_limit),
        );
        let verdict = if !finite {
            "keep the incumbent: a loss is not finite"
        } else if promote {
            "promote"
        } else if !gains && !keeps {
            "keep the incumbent: too little gain on the new regime and too much forgetting"
        } else if !gains {
            "keep the incumbent: too little gain on the new regime"
        } else {
            "keep the incumbent: too much forgetting of the old regime"
        };
        GateReport {
            old_before,
            old_after,
            new_before,
            new_after,
            promote,
            reason: format!("{verdict}: {numbers}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One scalar variable `w`, anchored at `start`, with per-sample losses `(w − x_i)²`.
    fn scalar_ewc(start: f32, xs: &[f32], lambda: f64) -> (nn::VarStore, Tensor, Ewc) {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs
            .root()
            .f_var_copy("w", &Tensor::from_slice(&[start]))
            .unwrap();
        let xs = Tensor::from_slice(xs);
        let loss = |i: usize| {
            w.f_sub(&xs.f_get(i as i64)?)?
                .f_square()?
                .f_sum(Kind::Float)
        };
        let ewc = Ewc::estimate(
            vs.trainable_variables(),
            xs.size()[0] as usize,
            lambda,
            &loss,
        )
        .unwrap();
        (vs, w, ewc)
    }

    fn set(w: &Tensor, value: f32) {
        let _no_grad = tch::no_grad_guard();
        w.shallow_clone().copy_(&Tensor::from_slice(&[value]));
    }

    #[test]
    fn ewc_fisher_is_the_mean_squared_sample_gradient() {
        // At w = 0 the gradients of (w − 1)² and (w − 2)² are −2 and −4: F = (4 + 16) / 2.
        let (_vs, _w, ewc) = scalar_ewc(0.0, &[1.0, 2.0], 2.0);
        assert_eq!(ewc.terms.len(), 1);
        assert_eq!(ewc.terms[0].2.double_value(&[0]), 10.0);
    }

    #[test]
    fn ewc_penalty_is_zero_at_the_anchor_and_grows_quadratically() {
        // λ/2 · F · (w − 0)² = 2/2 · 10 · w² = 10 w².
        let (_vs, w, ewc) = scalar_ewc(0.0, &[1.0, 2.0], 2.0);
        let penalty = |value: f32| {
            set(&w, value);
            ewc.penalty().unwrap().double_value(&[])
        };
        assert_eq!(penalty(0.0), 0.0);
        for (value, expected) in [
            (0.5, 2.5),
            (1.0, 10.0),
            (-1.0, 10.0),
            (2.0, 40.0),
            (3.0, 90.0),
        ] {
            let got = penalty(value);
            assert!(
                (got - expected).abs() < 1e-4,
                "w = {value}: {got} vs {expected}"
            );
        }
        // Its gradient pulls back towards the anchor: d/dw 10 w² = 20 w.
        set(&w, 1.5);
        let gradient = Tensor::run_backward(&[ewc.penalty().unwrap()], &[&w], false, false);
        assert!((gradient[0].double_value(&[0]) - 30.0).abs() < 1e-4);
    }

    #[test]
    fn ewc_anchor_is_a_copy_not_the_live_variable() {
        let (_vs, w, ewc) = scalar_ewc(0.5, &[1.0], 1.0);
        set(&w, 1.5);
        assert_eq!(ewc.terms[0].1.double_value(&[0]), 0.5);
        // F at w = 0.5 for (w − 1)²: (2 · −0.5)² = 1; penalty 1/2 · 1 · 1² = 0.5.
        assert!((ewc.penalty().unwrap().double_value(&[]) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn gate_decides_at_its_boundaries_inclusively() {
        // Powers of two: every limit is exact in f64.
        let gate = ValidationGate {
            min_gain: 0.5,
            max_forgetting: 0.25,
        };
        gate.validate().unwrap();
        let at = |old_after, new_after| gate.judge(4.0, old_after, 8.0, new_after);
        // New limit (1 − 0.5) × 8 = 4; old limit (1 + 0.25) × 4 = 5.
        assert!(at(5.0, 4.0).promote, "{}", at(5.0, 4.0).reason);
        let slightly = |x: f64| x + x * f64::EPSILON;
        let too_little_gain = at(5.0, slightly(4.0));
        assert!(!too_little_gain.promote);
        assert!(
            too_little_gain.reason.contains("too little gain"),
            "{}",
            too_little_gain.reason
        );
        let forgets = at(slightly(5.0), 4.0);
        assert!(!forgets.promote);
        assert!(
            forgets.reason.contains("too much forgetting"),
            "{}",
            forgets.reason
        );
        assert!(!at(6.0, 7.0).promote);
        assert!(at(6.0, 7.0).reason.contains("and too much forgetting"));
        assert!(at(0.0, 0.0).promote, "better everywhere promotes");
        let nan = gate.judge(4.0, f64::NAN, 8.0, 1.0);
        assert!(
            !nan.promote && nan.reason.contains("not finite"),
            "{}",
            nan.reason
        );
        let report = at(5.0, 4.0);
        assert_eq!(
            report.reason,
            "promote: new-regime loss 4.0000 <= (1 - 0.5) x 8.0000 = 4.0000; \
             old-regime loss 5.0000 <= (1 + 0.25) x 4.0000 = 5.0000"
        );
        assert_eq!(
            (
                report.old_before,
                report.old_after,
                report.new_before,
                report.new_after
            ),
            (4.0, 5.0, 8.0, 4.0)
        );
    }

    #[test]
    fn gate_with_no_gain_asked_and_no_forgetting_allowed_needs_no_loss_anywhere() {
        let strict = ValidationGate {
            min_gain: 0.0,
            max_forgetting: 0.0,
        };
        assert!(strict.judge(1.0, 1.0, 1.0, 1.0).promote);
        assert!(!strict.judge(1.0, 1.0 + 1e-12, 1.0, 0.0).promote);
    }

    #[test]
    fn gate_and_options_refuse_bad_values_naming_the_field() {
        for (gate, field) in [
            (
                ValidationGate {
                    min_gain: 1.0,
                    ..Default::default()
                },
                "min_gain",
            ),
            (
                ValidationGate {
                    min_gain: -0.1,
                    ..Default::default()
                },
                "min_gain",
            ),
            (
                ValidationGate {
                    max_forgetting: f64::NAN,
                    ..Default::default()
                },
                "max_forgetting",
            ),
            (
                ValidationGate {
                    max_forgetting: -1.0,
                    ..Default::default()
                },
                "max_forgetting",
            ),
        ] {
            match gate.validate() {
                Err(ModelError::InvalidOption { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        ValidationGate::default().validate().unwrap();
        FineTuneOptions::default().validate().unwrap();
    }

    #[test]
    fn hold_back_keeps_the_latest_new_windows_and_at_least_one() {
        assert_eq!(hold_back(10, 0.2, None), ((0..8).collect(), vec![8, 9]));
        assert_eq!(hold_back(1, 0.5, None), (vec![0], vec![]));
        assert_eq!(hold_back(0, 0.5, None), (vec![], vec![]));
        let (kept, back) = hold_back(10, 0.3, Some(&mut SplitMix64::new(1)));
        let mut all: Vec<usize> = kept.iter().chain(&back).copied().collect();
        all.sort_unstable();
        assert_eq!(
            (kept.len(), back.len(), all),
            (7, 3, (0..10).collect::<Vec<_>>())
        );
    }
}
