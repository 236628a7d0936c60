//! The learned mixture-of-experts gate: which expert(s) should score a window.
//!
//! The router calls the gate for every window on the async runtime, so serving is plain
//! Rust over exported weights (a few hundred flops and three small vectors per call,
//! no libtorch); only training uses tch. The model is a linear softmax
//! classifier over cheap summary features: per channel the mean and the population
//! standard deviation of the window, laid out as `[mean_0 .. mean_{C-1}, std_0 ..
//! std_{C-1}]`. Windows use the autoencoder's layout: channel-major, C rows of L
//! samples. Training standardises the features for a well-conditioned problem and then
//! folds the standardisation into the exported weights, so serving needs no extra state.

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Reduction, TchError, Tensor};

use crate::error::ModelError;
use crate::rng::SplitMix64;
use crate::training::{self, TrainOptions, TrainReport};

/// Features whose spread over the training set is below this are treated as constant:
/// dividing by a near-zero spread would blow the folded weights up.
const MIN_FEATURE_SCALE: f64 = 1e-6;

/// A linear softmax gate over E experts, servable from its JSON form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SoftmaxGate {
    pub channels: usize,
    pub window: usize,
    pub experts: usize,
    /// E rows of 2C feature weights, row-major.
    pub weight: Vec<f32>,
    /// One bias per expert.
    pub bias: Vec<f32>,
}

impl SoftmaxGate {
    /// An untrained gate with small random weights (uniform in ±0.01) from `seed` and
    /// zero biases, so it routes almost uniformly.
    pub fn seeded(channels: usize, window: usize, experts: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let weight = (0..experts * 2 * channels)
            .map(|_| rng.uniform(-0.01, 0.01))
            .collect();
        Self {
            channels,
            window,
            experts,
            weight,
            bias: vec![0.0; experts],
        }
    }

    fn feature_count(&self) -> usize {
        self.channels.saturating_mul(2)
    }

    /// Saturates rather than overflows: no slice is `usize::MAX` long, so a saturated
    /// length still fails the length checks cleanly.
    fn window_len(&self) -> usize {
        self.channels.saturating_mul(self.window)
    }

    /// Sizes are positive and the weight vectors match them; cheap enough for every call.
    fn check_shapes(&self) -> Result<(), ModelError> {
        for (field, value) in [
            ("channels", self.channels),
            ("window", self.window),
            ("experts", self.experts),
        ] {
            if value == 0 {
                return Err(ModelError::InvalidOption {
                    field,
                    value: "0".into(),
                    reason: "a gate needs at least one".into(),
                });
            }
        }
        let weights = self
            .channels
            .checked_mul(self.window)
            .and_then(|_| self.experts.checked_mul(2))
            .and_then(|n| n.checked_mul(self.channels));
        let Some(weights) = weights else {
            return Err(ModelError::InvalidOption {
                field: "channels",
                value: self.channels.to_string(),
                reason: format!(
                    "{} channels x {} samples x {} experts overflows",
                    self.channels, self.window, self.experts
                ),
            });
        };
        if self.weight.len() != weights {
            return Err(ModelError::Shape {
                what: "gate weight",
                expected: format!(
                    "{} experts x {} features = {weights} values",
                    self.experts,
                    self.feature_count()
                ),
                got: format!("{} values", self.weight.len()),
            });
        }
        if self.bias.len() != self.experts {
            return Err(ModelError::Shape {
                what: "gate bias",
                expected: format!("{} values, one per expert", self.experts),
                got: format!("{} values", self.bias.len()),
            });
        }
        Ok(())
    }

    /// Consistent sizes and finite parameters; call it after deserialising a gate.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.check_shapes()?;
        for (what, values) in [("gate weight", &self.weight), ("gate bias", &self.bias)] {
            if let Some(index) = values.iter().position(|v| !v.is_finite()) {
                return Err(ModelError::NonFinite { what, index });
            }
        }
        Ok(())
    }

    /// The 2C features of one window (means, then standard deviations). Errors with
    /// `Shape` when the window is not C*L values and `NonFinite` when a sample is NaN or
    /// infinite.
    pub fn features(&self, window: &[f32]) -> Result<Vec<f32>, ModelError> {
        if window.len() != self.window_len() || self.window == 0 {
            return Err(ModelError::Shape {
                what: "gate window",
                expected: format!(
                    "{} channels x {} samples = {} values",
                    self.channels,
                    self.window,
                    self.window_len()
                ),
                got: format!("{} values", window.len()),
            });
        }
        let mut features = vec![0.0; self.feature_count()];
        for (c, row) in window.chunks_exact(self.window).enumerate() {
            let n = row.len() as f64;
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            // Two passes: the one-pass formula loses all precision on large offsets.
            let variance = row
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            if !(mean.is_finite() && variance.is_finite()) {
                let offset = row.iter().position(|v| !v.is_finite()).unwrap_or(0);
                return Err(ModelError::NonFinite {
                    what: "gate window",
                    index: c * self.window + offset,
                });
            }
            features[c] = mean as f32;
            features[self.channels + c] = variance.sqrt() as f32;
        }
        Ok(features)
    }

    /// Softmax over the experts' logits for one window; sums to 1. The largest logit is
    /// subtracted first, so large features cannot overflow `exp`.
    pub fn probabilities(&self, window: &[f32]) -> Result<Vec<f32>, ModelError> {
        self.check_shapes()?;
        let features = self.features(window)?;
        let logits: Vec<f64> = self
            .weight
            .chunks_exact(features.len())
            .zip(&self.bias)
            .map(|(row, &bias)| {
                let dot: f64 = row
                    .iter()
                    .zip(&features)
                    .map(|(&w, &x)| f64::from(w) * f64::from(x))
                    .sum();
                f64::from(bias) + dot
            })
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut exps = logits;
        for value in &mut exps {
            *value = (*value - max).exp();
        }
        let total: f64 = exps.iter().sum();
        Ok(exps.iter().map(|&e| (e / total) as f32).collect())
    }

    /// The `k` most probable experts, most probable first (ties: lower index first),
    /// with probabilities renormalised to sum to 1. `k` is clamped to `1..=experts`.
    pub fn top_k(&self, window: &[f32], k: usize) -> Result<Vec<(usize, f32)>, ModelError> {
        let probabilities = self.probabilities(window)?;
        let mut order: Vec<usize> = (0..probabilities.len()).collect();
        order.sort_by(|&a, &b| {
            probabilities[b]
                .total_cmp(&probabilities[a])
                .then(a.cmp(&b))
        });
        order.truncate(k.clamp(1, self.experts));
        let kept: f32 = order.iter().map(|&i| probabilities[i]).sum();
        Ok(order
            .into_iter()
            .map(|i| (i, probabilities[i] / kept))
            .collect())
    }

    /// Trains a gate with cross-entropy on windows labelled with the index of the expert
    /// that should take them, using Adam and the split / early stopping of
    /// [`TrainOptions`]; `options.seed` also seeds the initial weights. Runs on the CPU:
    /// the problem is a few thousand flops per batch, below any GPU's launch overhead.
    pub fn fit(
        channels: usize,
        window: usize,
        experts: usize,
        windows: &[f32],
        targets: &[usize],
        options: &TrainOptions,
    ) -> Result<(Self, TrainReport), ModelError> {
        options.validate()?;
        let mut gate = Self::seeded(channels, window, experts, options.seed as u64);
        gate.check_shapes()?;
        let per_window = gate.window_len();
        if windows.is_empty() || !windows.len().is_multiple_of(per_window) {
            return Err(ModelError::Shape {
                what: "gate training windows",
                expected: format!(
                    "a positive multiple of {channels} channels x {window} samples = {per_window} values"
                ),
                got: format!("{} values", windows.len()),
            });
        }
        let samples = windows.len() / per_window;
        if targets.len() != samples {
            return Err(ModelError::Shape {
                what: "gate targets",
                expected: format!("{samples} labels, one per window"),
                got: format!("{} labels", targets.len()),
            });
        }
        if let Some((i, t)) = targets.iter().enumerate().find(|(_, &t)| t >= experts) {
            return Err(ModelError::InvalidOption {
                field: "targets",
                value: format!("targets[{i}] = {t}"),
                reason: format!("expert indices must be below {experts}"),
            });
        }

        let width = gate.feature_count();
        let mut features = Vec::with_capacity(samples * width);
        for (i, w) in windows.chunks_exact(per_window).enumerate() {
            let row = gate.features(w).map_err(|err| match err {
                ModelError::NonFinite { index, .. } => ModelError::NonFinite {
                    what: "gate training windows",
                    index: i * per_window + index,
                },
                other => other,
            })?;
            features.extend(row);
        }
        let (mean, scale) = standardisation(&features, width);
        let standardised: Vec<f32> = features
            .iter()
            .enumerate()
            .map(|(i, &x)| ((f64::from(x) - mean[i % width]) / scale[i % width]) as f32)
            .collect();

        let vs = nn::VarStore::new(Device::Cpu);
        let x = Tensor::f_from_slice(&standardised)?.f_view([samples as i64, width as i64])?;
        let labels: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
        let y = Tensor::f_from_slice(&labels)?;
        let initial_weight =
            Tensor::f_from_slice(&gate.weight)?.f_view([experts as i64, width as i64])?;
        let w = vs.root().f_var_copy("weight", &initial_weight)?;
        let b = vs
            .root()
            .f_var_copy("bias", &Tensor::f_from_slice(&gate.bias)?)?;
        let loss = |indices: &Tensor| -> Result<Tensor, TchError> {
            let logits = x
                .f_index_select(0, indices)?
                .f_matmul(&w.f_transpose(0, 1)?)?
                .f_add(&b)?;
            logits.f_cross_entropy_loss::<Tensor>(
                &y.f_index_select(0, indices)?,
                None,
                Reduction::Mean,
                -100,
                0.0,
            )
        };
        let report = training::train(&vs, samples, options, &loss, &mut |_| {})?;

        let trained_weight = Vec::<f32>::try_from(&w.f_detach()?.f_flatten(0, -1)?)?;
        let trained_bias = Vec::<f32>::try_from(&b.f_detach()?)?;
        // w·((x - m) / s) + b  =  (w / s)·x + (b - w·(m / s))
        for (e, row) in trained_weight.chunks_exact(width).enumerate() {
            let mut shift = 0.0;
            for (j, &wj) in row.iter().enumerate() {
                gate.weight[e * width + j] = (f64::from(wj) / scale[j]) as f32;
                shift += f64::from(wj) * mean[j] / scale[j];
            }
            gate.bias[e] = (f64::from(trained_bias[e]) - shift) as f32;
        }
        Ok((gate, report))
    }
}

/// Per-feature mean and scale (standard deviation, or 1 for a near-constant feature) of
/// row-major `features` with `width` columns.
fn standardisation(features: &[f32], width: usize) -> (Vec<f64>, Vec<f64>) {
    let rows = (features.len() / width) as f64;
    let mut mean = vec![0.0; width];
    for row in features.chunks_exact(width) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += f64::from(x) / rows;
        }
    }
    let mut variance = vec![0.0; width];
    for row in features.chunks_exact(width) {
        for ((v, &x), m) in variance.iter_mut().zip(row).zip(&mean) {
            *v += (f64::from(x) - m).powi(2) / rows;
        }
    }
    let scale = variance
        .iter()
        .zip(&mean)
        .map(|(v, m)| {
            let s = v.sqrt();
            if s > MIN_FEATURE_SCALE * m.abs().max(1.0) {
                s
            } else {
                1.0
            }
        })
        .collect();
    (mean, scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gate_and_window() -> impl Strategy<Value = (SoftmaxGate, Vec<f32>, usize)> {
        (1usize..5, 1usize..17, 1usize..7).prop_flat_map(|(channels, window, experts)| {
            let features = 2 * channels;
            (
                prop::collection::vec(-10.0f32..10.0, experts * features),
                prop::collection::vec(-10.0f32..10.0, experts),
                prop::collection::vec(-1000.0f32..1000.0, channels * window),
                0usize..10,
            )
                .prop_map(move |(weight, bias, samples, k)| {
                    let gate = SoftmaxGate {
                        channels,
                        window,
                        experts,
                        weight,
                        bias,
                    };
                    (gate, samples, k)
                })
        })
    }

    proptest! {
        #[test]
        fn probabilities_sum_to_one_and_top_k_is_sorted_and_renormalised(
            (gate, window, k) in gate_and_window()
        ) {
            let p = gate.probabilities(&window).expect("consistent gate");
            prop_assert_eq!(p.len(), gate.experts);
            prop_assert!(p.iter().all(|&v| (0.0..=1.0).contains(&v)));
            prop_assert!((p.iter().sum::<f32>() - 1.0).abs() <= 1e-5);

            let top = gate.top_k(&window, k).expect("consistent gate");
            prop_assert_eq!(top.len(), k.clamp(1, gate.experts));
            prop_assert!(top.windows(2).all(|pair| pair[0].1 >= pair[1].1));
            prop_assert!((top.iter().map(|t| t.1).sum::<f32>() - 1.0).abs() <= 1e-5);
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            prop_assert_eq!(p[top[0].0], max);
            let kept: f32 = top.iter().map(|&(i, _)| p[i]).sum();
            for &(i, w) in &top {
                prop_assert!((w - p[i] / kept).abs() <= 1e-6);
            }
        }
    }

    #[test]
    fn features_are_channel_means_then_standard_deviations() {
        let gate = SoftmaxGate::seeded(2, 4, 3, 1);
        let features = gate
            .features(&[1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
            .expect("2 x 4 window");
        assert_eq!(features[..2], [2.5, 5.0]);
        assert!((features[2] - 1.25f32.sqrt()).abs() < 1e-6);
        assert_eq!(features[3], 0.0);
    }

    #[test]
    fn bad_windows_and_inconsistent_gates_are_errors() {
        let gate = SoftmaxGate::seeded(2, 4, 3, 1);
        assert!(matches!(
            gate.probabilities(&[0.0; 7]),
            Err(ModelError::Shape {
                what: "gate window",
                ..
            })
        ));
        let mut window = [0.0; 8];
        window[5] = f32::NAN;
        assert!(matches!(
            gate.top_k(&window, 1),
            Err(ModelError::NonFinite { index: 5, .. })
        ));

        let short = SoftmaxGate {
            bias: vec![0.0; 2],
            ..gate.clone()
        };
        assert!(matches!(
            short.probabilities(&[0.0; 8]),
            Err(ModelError::Shape {
                what: "gate bias",
                ..
            })
        ));
        let none = SoftmaxGate {
            experts: 0,
            weight: vec![],
            bias: vec![],
            ..gate.clone()
        };
        assert!(matches!(
            none.validate(),
            Err(ModelError::InvalidOption {
                field: "experts",
                ..
            })
        ));
        let mut poisoned = gate.clone();
        poisoned.weight[4] = f32::INFINITY;
        assert!(matches!(
            poisoned.validate(),
            Err(ModelError::NonFinite {
                what: "gate weight",
                index: 4
            })
        ));
    }

    #[test]
    fn json_round_trip_validates() {
        let gate = SoftmaxGate::seeded(3, 8, 4, 9);
        let json = serde_json::to_string(&gate).expect("serialises");
        let back: SoftmaxGate = serde_json::from_str(&json).expect("deserialises");
        back.validate().expect("consistent");
        assert_eq!(back, gate);
    }

    /// Windows of expert `i` have every channel's mean offset by `3 i`.
    fn separable(
        channels: usize,
        window: usize,
        experts: usize,
        per_expert: usize,
        seed: u64,
    ) -> (Vec<f32>, Vec<usize>) {
        let mut rng = SplitMix64::new(seed);
        let mut windows = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..per_expert {
            for expert in 0..experts {
                for _ in 0..channels * window {
                    windows.push((3.0 * expert as f64 + rng.normal()) as f32);
                }
                targets.push(expert);
            }
        }
        (windows, targets)
    }

    #[test]
    fn fit_separates_offset_experts() {
        let (channels, window, experts) = (4, 16, 3);
        let (windows, targets) = separable(channels, window, experts, 100, 1);
        let options = TrainOptions {
            learning_rate: 0.05,
            batch_size: 32,
            ..Default::default()
        };
        let (gate, report) =
            SoftmaxGate::fit(channels, window, experts, &windows, &targets, &options)
                .expect("trains");
        gate.validate().expect("exported gate is consistent");
        assert!(report.best_epoch >= 1);

        let (test_windows, test_targets) = separable(channels, window, experts, 50, 2);
        let correct = test_windows
            .chunks_exact(channels * window)
            .zip(&test_targets)
            .filter(|(w, &t)| gate.top_k(w, 1).expect("valid window")[0].0 == t)
            .count();
        let accuracy = correct as f64 / test_targets.len() as f64;
        assert!(accuracy > 0.95, "top-1 accuracy {accuracy}");
    }

    #[test]
    fn fit_rejects_bad_labels() {
        let (windows, mut targets) = separable(2, 4, 2, 5, 1);
        let options = TrainOptions::default();
        targets[3] = 2;
        match SoftmaxGate::fit(2, 4, 2, &windows, &targets, &options) {
            Err(ModelError::InvalidOption {
                field: "targets",
                value,
                ..
            }) => assert_eq!(value, "targets[3] = 2"),
            other => panic!("expected InvalidOption on targets, got {other:?}"),
        }
        assert!(matches!(
            SoftmaxGate::fit(2, 4, 2, &windows, &targets[..4], &options),
            Err(ModelError::Shape {
                what: "gate targets",
                ..
            })
        ));
    }
}
