//! Training options and reports, and the one training loop every trainable model shares.
//!
//! The autoencoder (reconstruction MSE) and the gate (cross-entropy) differ only in how
//! the loss of a batch is computed, so the loop lives here once: the seeded
//! train/validation split, per-epoch shuffling, Adam, early stopping, the wall-clock cap,
//! restoring the best weights, and the per-epoch reports the CLI turns into progress bars.
//! Shuffling uses the crate's own seeded generator, so a run is reproducible from
//! `TrainOptions::seed` without touching libtorch's global generator.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Device, TchError, Tensor};

use crate::error::ModelError;
use crate::rng::SplitMix64;

/// How to train a model. Missing fields take their defaults when deserialised, so a
/// config file only needs the fields it changes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainOptions {
    /// Upper bound on passes over the training windows.
    pub epochs: usize,
    /// Windows per Adam step.
    pub batch_size: usize,
    /// Adam's step size.
    pub learning_rate: f64,
    /// Share of the windows held out for validation, in [0, 1). When it leaves no
    /// validation window (0, or very few windows), the training windows stand in, so
    /// early stopping then watches the training loss.
    pub validation_fraction: f64,
    /// Training stops after this many consecutive epochs without a lower validation loss.
    pub patience: usize,
    /// Fixes the train/validation split and the batch order.
    pub seed: i64,
    /// Wall-clock budget; checked after every batch, so an epoch may end early.
    pub max_seconds: Option<f64>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch_size: 64,
            learning_rate: 1e-3,
            validation_fraction: 0.2,
            patience: 5,
            seed: 7,
            max_seconds: None,
        }
    }
}

impl TrainOptions {
    /// Checks every field's range, naming the first offending field and its value.
    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |field, value: String, reason: &str| ModelError::InvalidOption {
            field,
            value,
            reason: reason.to_string(),
        };
        if self.epochs == 0 {
            return Err(invalid(
                "epochs",
                "0".into(),
                "at least one epoch is needed",
            ));
        }
        if self.batch_size == 0 {
            return Err(invalid(
                "batch_size",
                "0".into(),
                "a batch needs at least one window",
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(invalid(
                "learning_rate",
                self.learning_rate.to_string(),
                "must be positive and finite",
            ));
        }
        if !(0.0..1.0).contains(&self.validation_fraction) {
            return Err(invalid(
                "validation_fraction",
                self.validation_fraction.to_string(),
                "must lie in [0, 1): the windows not held out are the training set",
            ));
        }
        if self.patience == 0 {
            return Err(invalid(
                "patience",
                "0".into(),
                "must be at least 1 epoch without improvement",
            ));
        }
        if let Some(seconds) = self.max_seconds {
            if !(seconds.is_finite() && seconds > 0.0) {
                return Err(invalid(
                    "max_seconds",
                    seconds.to_string(),
                    "must be positive and finite (leave it unset for no limit)",
                ));
            }
        }
        Ok(())
    }
}

/// What one epoch achieved, passed to the progress callback after every epoch.
#[derive(Clone, Debug, Serialize)]
pub struct EpochReport {
    /// 1-based number of this epoch.
    pub epoch: usize,
    /// The configured maximum, for "epoch 3/30" displays.
    pub epochs: usize,
    /// Mean training loss over the batches of this epoch.
    pub train_loss: f64,
    /// Mean loss over the validation windows after this epoch.
    pub validation_loss: f64,
    /// Training windows per second of optimisation steps in this epoch.
    pub samples_per_s: f64,
    /// Seconds since training started.
    pub elapsed_s: f64,
}

/// The outcome of a whole training run. The model holds the weights of `best_epoch`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrainReport {
    pub epochs_run: usize,
    /// 1-based epoch whose weights were restored at the end.
    pub best_epoch: usize,
    pub best_validation_loss: f64,
    /// True when patience or the wall-clock cap ended training before all epochs ran.
    pub stopped_early: bool,
    /// Training windows per second of optimisation steps over the whole run.
    pub samples_per_s: f64,
    pub elapsed_s: f64,
}

/// The class of each training sample as an int64 tensor on `device`, after checking
/// there is one per sample and each is in `0..classes`; `(what, unit)` name the labels
/// and what they label in errors ("fusion labels", "pair").
pub(crate) fn class_targets(
    labels: &[i64],
    samples: usize,
    classes: i64,
    (what, unit): (&'static str, &str),
    device: Device,
) -> Result<Tensor, ModelError> {
    if labels.len() != samples {
        return Err(ModelError::Shape {
            what,
            expected: format!("one per {unit} ({samples})"),
            got: format!("{} labels", labels.len()),
        });
    }
    if let Some((index, bad)) = labels
        .iter()
        .enumerate()
        .find(|(_, l)| !(0..classes).contains(*l))
    {
        return Err(ModelError::InvalidOption {
            field: "label",
            value: bad.to_string(),
            reason: format!("label {index}: classes are 0..{classes}"),
        });
    }
    Ok(Tensor::f_from_slice(labels)?.f_to_device(device)?)
}

/// Mean loss of one batch, given its window indices (int64, on the model's device).
pub(crate) type BatchLoss<'a> = dyn Fn(&Tensor) -> Result<Tensor, TchError> + 'a;

/// Trains the trainable variables of `vs` on `samples` windows with Adam, early stopping
/// and best-weight restoration. On `ModelError::Diverged` the weights are rolled back to
/// the best epoch so far (or to the initial weights).
pub(crate) fn train(
    vs: &nn::VarStore,
    samples: usize,
    options: &TrainOptions,
    batch_loss: &BatchLoss<'_>,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<TrainReport, ModelError> {
    options.validate()?;
    if samples == 0 {
        return Err(ModelError::Shape {
            what: "training set",
            expected: "at least one window".into(),
            got: "0 windows".into(),
        });
    }
    let started = Instant::now();
    // A budget too large for `Instant` arithmetic is no budget at all.
    let deadline = options
        .max_seconds
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .and_then(|d| started.checked_add(d));
    let out_of_time = || deadline.is_some_and(|d| Instant::now() >= d);
    let device = vs.device();

    let mut rng = SplitMix64::new(options.seed as u64);
    let (mut train_indices, validation_indices) =
        split(samples, options.validation_fraction, &mut rng);
    let evaluation_indices = if validation_indices.is_empty() {
        &train_indices
    } else {
        &validation_indices
    };
    let evaluation_batches = evaluation_indices
        .chunks(options.batch_size)
        .map(|chunk| Ok((index_tensor(chunk, device)?, chunk.len())))
        .collect::<Result<Vec<_>, TchError>>()?;

    let mut optimizer = FlatAdam::new(vs, options.learning_rate)?;
    let mut best = Snapshot::take(vs)?;
    let mut best_loss = f64::INFINITY;
    let mut best_epoch = 0;
    let mut epochs_since_best = 0;
    let mut epochs_run = 0;
    let mut stopped_early = false;
    let mut trained_samples = 0usize;
    let mut train_seconds = 0.0;

    for epoch in 1..=options.epochs {
        rng.shuffle(&mut train_indices);
        let epoch_started = Instant::now();
        // Read after the epoch, so a GPU run synchronises once per epoch, not per batch,
        // and a step costs no kernels beyond its own.
        let mut losses = Vec::with_capacity(train_indices.len() / options.batch_size + 1);
        let mut seen = 0usize;
        let mut cut_short = false;
        for batch in train_indices.chunks(options.batch_size) {
            let loss = batch_loss(&index_tensor(batch, device)?)?;
            optimizer.step(&loss)?;
            losses.push((loss.f_detach()?, batch.len()));
            seen += batch.len();
            if out_of_time() {
                cut_short = true;
                break;
            }
        }
        let mut loss_sum = 0.0;
        for (loss, n) in &losses {
            loss_sum += loss.f_double_value(&[])? * *n as f64;
        }
        let train_loss = loss_sum / seen as f64;
        let step_seconds = epoch_started.elapsed().as_secs_f64();
        let validation_loss = evaluate(batch_loss, &evaluation_batches)?;
        epochs_run = epoch;
        trained_samples += seen;
        train_seconds += step_seconds;

        for loss in [train_loss, validation_loss] {
            if !loss.is_finite() {
                best.restore()?;
                return Err(ModelError::Diverged { epoch, loss });
            }
        }
        if validation_loss < best_loss {
            best_loss = validation_loss;
            best_epoch = epoch;
            epochs_since_best = 0;
            best.update()?;
        } else {
            epochs_since_best += 1;
        }

        progress(&EpochReport {
            epoch,
            epochs: options.epochs,
            train_loss,
            validation_loss,
            samples_per_s: rate(seen, step_seconds),
            elapsed_s: started.elapsed().as_secs_f64(),
        });

        if cut_short || epochs_since_best >= options.patience || out_of_time() {
            stopped_early = cut_short || epoch < options.epochs;
            break;
        }
    }

    best.restore()?;
    Ok(TrainReport {
        epochs_run,
        best_epoch,
        best_validation_loss: best_loss,
        stopped_early,
        samples_per_s: rate(trained_samples, train_seconds),
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// Seeded shuffle, then the last `validation_fraction` of the windows are held out. At
/// least one window always stays in the training set.
fn split(samples: usize, validation_fraction: f64, rng: &mut SplitMix64) -> (Vec<i64>, Vec<i64>) {
    let mut order: Vec<i64> = (0..samples as i64).collect();
    rng.shuffle(&mut order);
    let held_out = ((samples as f64 * validation_fraction).round() as usize).min(samples - 1);
    let validation = order.split_off(samples - held_out);
    (order, validation)
}

fn index_tensor(indices: &[i64], device: Device) -> Result<Tensor, TchError> {
    Tensor::f_from_slice(indices)?.f_to_device(device)
}

/// Window-weighted mean loss over the evaluation batches, without gradients.
fn evaluate(batch_loss: &BatchLoss<'_>, batches: &[(Tensor, usize)]) -> Result<f64, TchError> {
    let _no_grad = tch::no_grad_guard();
    let mut sum = 0.0;
    let mut count = 0usize;
    for (indices, len) in batches {
        sum += batch_loss(indices)?.f_double_value(&[])? * *len as f64;
        count += len;
    }
    Ok(sum / count as f64)
}

fn rate(samples: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        samples as f64 / seconds
    } else {
        0.0
    }
}

/// Adam (Kingma & Ba, with libtorch's defaults: β = (0.9, 0.999), ε = 1e-8, no weight
/// decay) over every trainable variable at once.
///
/// The variables become views into one flat buffer, and each step gathers their
/// gradients into one flat gradient, so a step is about ten tensor operations whatever
/// the number of variables. libtorch's own Adam runs about seven per variable, plus a
/// zeroing of each gradient. For the small networks a fog node trains, those per-operation
/// dispatches cost as much as the arithmetic. Gradients are taken with
/// `autograd::grad` (tch's `run_backward`), never accumulated into `.grad`, so
/// nothing needs zeroing between steps.
struct FlatAdam {
    /// The trainable variables: views into `flat` after `new`.
    params: Vec<Tensor>,
    flat: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: i32,
    learning_rate: f64,
}

impl FlatAdam {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vs: &nn::VarStore, learning_rate: f64) -> Result<Self, TchError> {
        let _no_grad = tch::no_grad_guard();
        let mut params = vs.trainable_variables();
        let pieces = params
            .iter()
            .map(|p| p.f_detach()?.f_reshape([-1]))
            .collect::<Result<Vec<_>, TchError>>()?;
        let flat = if pieces.is_empty() {
            Tensor::f_zeros([0], (tch::Kind::Float, vs.device()))?
        } else {
            Tensor::f_cat(&pieces, 0)?
        };
        let mut offset = 0;
        for param in &mut params {
            let len = param.numel() as i64;
            let view = flat
                .f_narrow(0, offset, len)?
                .f_view(param.size().as_slice())?;
            // Every holder of the variable (the VarStore, the model's fields) shares its
            // TensorImpl, so they all see the new storage.
            param.f_set_data(&view)?;
            offset += len;
        }
        Ok(Self {
            params,
            exp_avg: flat.f_zeros_like()?,
            exp_avg_sq: flat.f_zeros_like()?,
            flat,
            steps: 0,
            learning_rate,
        })
    }

    /// One step down the gradient of `loss`.
    fn step(&mut self, loss: &Tensor) -> Result<(), TchError> {
        if self.params.is_empty() {
            return Ok(());
        }
        let grads = Tensor::f_run_backward(&[loss], &self.params, false, false)?;
        let _no_grad = tch::no_grad_guard();
        let pieces = grads
            .iter()
            .zip(&self.params)
            .map(|(grad, param)| {
                // A variable the loss does not reach has no gradient: it stays put.
                if grad.defined() {
                    grad.f_reshape([-1])
                } else {
                    param.f_zeros_like()?.f_reshape([-1])
                }
            })
            .collect::<Result<Vec<_>, TchError>>()?;
        let mut grad = Tensor::f_cat(&pieces, 0)?;
        self.steps += 1;
        let correction1 = 1.0 - Self::BETA1.powi(self.steps);
        let correction2 = 1.0 - Self::BETA2.powi(self.steps);
        // In-place operations also return their tensor; the handles are not needed.
        let _ = self.exp_avg.f_lerp_(&grad, 1.0 - Self::BETA1)?;
        let _ = grad.f_square_()?;
        let _ = self.exp_avg_sq.f_lerp_(&grad, 1.0 - Self::BETA2)?;
        // flat -= lr / c1 · m / (√v / √c2 + ε), with the step size folded into the
        // denominator so the update is one addcdiv.
        let mut denominator = self.exp_avg_sq.f_sqrt()?;
        let _ = denominator.f_mul_scalar_(1.0 / correction2.sqrt())?;
        let _ = denominator.f_add_scalar_(Self::EPS)?;
        let _ = denominator.f_mul_scalar_(-correction1 / self.learning_rate)?;
        let _ = self.flat.f_addcdiv_(&self.exp_avg, &denominator)?;
        Ok(())
    }
}

/// Copies of the trainable variables, paired with the live variables they came from.
struct Snapshot {
    pairs: Vec<(Tensor, Tensor)>,
}

impl Snapshot {
    fn take(vs: &nn::VarStore) -> Result<Self, TchError> {
        let _no_grad = tch::no_grad_guard();
        let pairs = vs
            .trainable_variables()
            .into_iter()
            .map(|live| {
                let mut copy = live.f_zeros_like()?;
                copy.f_copy_(&live)?;
                Ok((live, copy))
            })
            .collect::<Result<_, TchError>>()?;
        Ok(Self { pairs })
    }

    fn update(&mut self) -> Result<(), TchError> {
        let _no_grad = tch::no_grad_guard();
        for (live, copy) in &mut self.pairs {
            copy.f_copy_(live)?;
        }
        Ok(())
    }

    fn restore(&mut self) -> Result<(), TchError> {
        let _no_grad = tch::no_grad_guard();
        for (live, copy) in &mut self.pairs {
            live.f_copy_(copy)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// One scalar parameter `w` fitted to `targets` by squared error.
    fn scalar_problem(targets: &[f32]) -> (nn::VarStore, Tensor, Tensor) {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().zeros("w", &[1]);
        (vs, w, Tensor::from_slice(targets))
    }

    #[test]
    fn defaults_match_the_documented_values_and_validate() {
        let options = TrainOptions::default();
        assert_eq!(options.epochs, 30);
        assert_eq!(options.batch_size, 64);
        assert_eq!(options.learning_rate, 1e-3);
        assert_eq!(options.validation_fraction, 0.2);
        assert_eq!(options.patience, 5);
        assert_eq!(options.seed, 7);
        assert_eq!(options.max_seconds, None);
        options.validate().expect("defaults are valid");
    }

    #[test]
    fn partial_json_falls_back_to_defaults() {
        let options: TrainOptions =
            serde_json::from_str(r#"{"epochs": 3, "max_seconds": 1.5}"#).expect("valid json");
        assert_eq!(options.epochs, 3);
        assert_eq!(options.max_seconds, Some(1.5));
        assert_eq!(options.batch_size, 64);
    }

    #[test]
    fn validate_names_the_offending_field() {
        let cases: [(TrainOptions, &str); 7] = [
            (
                TrainOptions {
                    epochs: 0,
                    ..Default::default()
                },
                "epochs",
            ),
            (
                TrainOptions {
                    batch_size: 0,
                    ..Default::default()
                },
                "batch_size",
            ),
            (
                TrainOptions {
                    learning_rate: f64::NAN,
                    ..Default::default()
                },
                "learning_rate",
            ),
            (
                TrainOptions {
                    learning_rate: -1.0,
                    ..Default::default()
                },
                "learning_rate",
            ),
            (
                TrainOptions {
                    validation_fraction: 1.0,
                    ..Default::default()
                },
                "validation_fraction",
            ),
            (
                TrainOptions {
                    patience: 0,
                    ..Default::default()
                },
                "patience",
            ),
            (
                TrainOptions {
                    max_seconds: Some(0.0),
                    ..Default::default()
                },
                "max_seconds",
            ),
        ];
        for (options, expected) in cases {
            match options.validate() {
                Err(ModelError::InvalidOption { field, .. }) => assert_eq!(field, expected),
                other => panic!("{expected}: expected InvalidOption, got {other:?}"),
            }
        }
    }

    #[test]
    fn split_is_seeded_disjoint_and_keeps_a_training_window() {
        let (train, validation) = split(10, 0.2, &mut SplitMix64::new(5));
        assert_eq!((train.len(), validation.len()), (8, 2));
        assert_eq!(
            split(10, 0.2, &mut SplitMix64::new(5)),
            (train.clone(), validation.clone())
        );
        let mut all: Vec<i64> = train.into_iter().chain(validation).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(split(1, 0.5, &mut SplitMix64::new(5)).0.len(), 1);
    }

    #[test]
    fn flat_loss_stops_after_patience_epochs() {
        let (vs, w, _) = scalar_problem(&[0.0]);
        let loss = |_: &Tensor| w.f_sum(Kind::Float)?.f_mul_scalar(0.0)?.f_add_scalar(1.0);
        let options = TrainOptions {
            epochs: 50,
            patience: 3,
            ..Default::default()
        };
        let mut reports = Vec::new();
        let report = train(&vs, 20, &options, &loss, &mut |r| reports.push(r.clone()))
            .expect("training runs");
        assert_eq!(report.epochs_run, 4);
        assert_eq!(report.best_epoch, 1);
        assert!(report.stopped_early);
        assert_eq!(
            reports.iter().map(|r| r.epoch).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn best_weights_are_restored_after_oscillation() {
        let targets: Vec<f32> = (0..64).map(|i| (i % 8) as f32).collect();
        let (vs, w, x) = scalar_problem(&targets);
        let loss = |idx: &Tensor| {
            x.f_index_select(0, idx)?
                .f_sub(&w)?
                .f_square()?
                .f_mean(Kind::Float)
        };
        // A step size this large makes Adam overshoot, so the last epoch is not the best.
        let options = TrainOptions {
            epochs: 12,
            batch_size: 8,
            learning_rate: 2.5,
            validation_fraction: 0.0,
            patience: 12,
            ..Default::default()
        };
        let report = train(&vs, targets.len(), &options, &loss, &mut |_| {}).expect("trains");
        let all: Vec<i64> = (0..targets.len() as i64).collect();
        let final_loss = tch::no_grad(|| loss(&Tensor::from_slice(&all)))
            .expect("loss evaluates")
            .double_value(&[]);
        assert!(
            (final_loss - report.best_validation_loss).abs() < 1e-5,
            "restored weights give {final_loss}, best was {}",
            report.best_validation_loss
        );
    }

    #[test]
    fn tiny_time_budget_stops_after_one_batch() {
        let (vs, w, x) = scalar_problem(&[1.0; 100]);
        let loss = |idx: &Tensor| {
            x.f_index_select(0, idx)?
                .f_sub(&w)?
                .f_square()?
                .f_mean(Kind::Float)
        };
        let options = TrainOptions {
            batch_size: 10,
            max_seconds: Some(1e-9),
            ..Default::default()
        };
        let report = train(&vs, 100, &options, &loss, &mut |_| {}).expect("trains");
        assert_eq!(report.epochs_run, 1);
        assert!(report.stopped_early);
    }

    #[test]
    fn nan_loss_reports_divergence_and_keeps_initial_weights() {
        let (vs, w, _) = scalar_problem(&[0.0]);
        let loss = |_: &Tensor| w.f_sum(Kind::Float)?.f_mul_scalar(f64::NAN);
        let err = train(&vs, 4, &TrainOptions::default(), &loss, &mut |_| {})
            .expect_err("nan loss must fail");
        assert!(
            matches!(err, ModelError::Diverged { epoch: 1, .. }),
            "{err}"
        );
        assert_eq!(w.double_value(&[0]), 0.0);
    }

    /// Two variables of different shapes and a third the loss never reaches. Drawn
    /// from SplitMix64, not libtorch's process-global generator: a test on another
    /// thread drawing between the seed and the draws gave two "same seed" problems
    /// different weights.
    fn two_layer_problem(seed: u64) -> (nn::VarStore, Tensor, Tensor, Tensor) {
        let mut rng = crate::rng::SplitMix64::new(seed);
        let mut normal = |shape: &[i64]| {
            let count = shape.iter().product::<i64>() as usize;
            let values: Vec<f32> = (0..count).map(|_| rng.normal() as f32).collect();
            Tensor::from_slice(&values).view(shape)
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let a = root.var_copy("a", &normal(&[3, 4]));
        let b = root.var_copy("b", &normal(&[4]));
        let unused = root.var_copy("unused", &normal(&[2]));
        (vs, a, b, unused)
    }

    #[test]
    fn flat_adam_takes_libtorch_adams_steps() {
        use tch::nn::OptimizerConfig;
        let x = Tensor::from_slice(&[
            0.5f32, -1.0, 2.0, 0.25, 1.5, -0.75, 0.0, 1.0, -2.0, 0.3, 0.7, -0.1,
        ])
        .view([3, 4]);
        let loss_of = |a: &Tensor, b: &Tensor| {
            (a * &x + b).tanh().sum(Kind::Float) + (a.square().sum(Kind::Float) * 0.1)
        };
        let (reference_vs, ra, rb, _) = two_layer_problem(3);
        let mut reference = nn::Adam::default()
            .build(&reference_vs, 0.05)
            .expect("adam");
        let (vs, a, b, unused) = two_layer_problem(3);
        let unused_before = unused.copy();
        let mut flat = FlatAdam::new(&vs, 0.05).expect("flat adam");
        for _ in 0..25 {
            reference.backward_step(&loss_of(&ra, &rb));
            flat.step(&loss_of(&a, &b)).expect("step");
        }
        let difference = |p: &Tensor, q: &Tensor| (p - q).abs().max().double_value(&[]);
        assert!(
            difference(&ra, &a) < 1e-5,
            "a differs by {}",
            difference(&ra, &a)
        );
        assert!(
            difference(&rb, &b) < 1e-5,
            "b differs by {}",
            difference(&rb, &b)
        );
        assert!(
            difference(&ra, &two_layer_problem(3).1) > 0.1,
            "a never moved"
        );
        assert!(
            unused.equal(&unused_before),
            "a variable without a gradient moved"
        );
        // The store still holds the trained values (its variables are the same tensors).
        let stored = vs.variables();
        assert!(stored["a"].equal(&a));
    }
}
