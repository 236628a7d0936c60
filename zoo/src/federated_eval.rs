//! `fogmesh eval federated`: the Tennessee Eastman fault classifier trained by six
//! sites whose data never meet, against each site alone and against all data in one
//! place, on the same split.
//!
//! - **Data**: the labelled windows of `fogmesh eval tep`'s diagnosis (normal operation
//!   from the training runs, each fault from the first part of its run after the onset),
//!   every `stride`-th one. Tested on the pooled test windows of every run (later in
//!   time than anything trained on).
//! - **Splits**: `by_fault` (every site sees a share of normal operation and its own two
//!   faults, no fault at two sites) and Dirichlet (each class shared out over the sites
//!   in proportions drawn from Dir(α): α = 0.5 is skewed, 0.1 nearly one site per class).
//! - **Policies**: `local_only` (each site trains alone for up to as many epochs as a
//!   federation has rounds, with early stopping on a tenth of its windows; scored as
//!   the mean over sites on the pooled test set), `centralised` (all windows, trained
//!   the same way: the upper bound), `fedavg`, `fedprox`, `fedavg` with compressed
//!   updates and with differential privacy, and one poisoned site (the one with the
//!   most windows, its update sign flipped and scaled ×10) under FedAvg, the trimmed
//!   mean and the median; and
//!   `distillation`: sites with classifiers of different widths (32, 64, 96 hidden
//!   channels) exchanging only their outputs on a shared set of unlabelled windows
//!   (every 20th training window, kept out of every site's data), scored like
//!   `local_only`.
//! - Every round runs the mesh's own arithmetic: [`train_locally`] at each site, the
//!   site's [`Compressor`], the coordinator's [`RoundAggregator`].
//!
//! `bytes` counts what sites send up (updates; for `centralised`, the training windows
//! themselves as f32; for `distillation`, outputs on the shared windows);
//! `bytes_down` what the coordinator sends down (the global weights, or the consensus,
//! to every site each round).

use std::str::FromStr;
use std::time::Instant;

use fogmesh_models::classifier::{ClassifierConfig, FaultClassifier};
use fogmesh_models::continual::ReplayItem;
use fogmesh_models::federated::distill::{consensus, distill_locally, outputs_on};
use fogmesh_models::federated::{
    train_locally, Aggregation, Compression, Compressor, Contribution, FederatedError,
    LocalTrainingError, LocalWork, Privacy, RoundAggregator,
};
use fogmesh_models::merge::{MergeError, Weights};
use fogmesh_models::served::{Architecture, Classes};
use fogmesh_models::{ModelError, SplitMix64, TrainOptions};
use serde::Serialize;

use crate::tep_eval::{Diagnosis, TepEvalError, TepEvalOptions, TepRuns};

/// How the evaluation trains and what it compares.
#[derive(Debug, Clone)]
pub struct FederatedEvalOptions {
    /// The diagnosis' windows and split (`data`, `classifier_window`,
    /// `classifier_split`, the initial weights' seed).
    pub tep: TepEvalOptions,
    pub sites: usize,
    pub rounds: usize,
    /// Every `stride`-th labelled training window is used.
    pub stride: usize,
    pub work: LocalWork,
    pub fedprox_mu: f64,
    /// The coordinator's server momentum (0: plain FedAvg steps).
    pub server_momentum: f64,
    /// The Dirichlet splits' concentrations; `by_fault` is always run.
    pub alphas: Vec<f64>,
    pub compression: Compression,
    pub privacy: Privacy,
    /// The robust rule against the poisoned site besides the median.
    pub trim: f64,
    pub policies: Vec<Policy>,
    pub seed: u64,
    /// Runs of each policy on the same split, run `r` with the local work's and the
    /// aggregator's seeds plus `r`: the spread training randomness alone gives.
    pub repeats: usize,
    /// libtorch intra-op threads; with more than one a run's sums may add up in
    /// another order, and top-k's choices make such differences grow.
    pub threads: usize,
}

impl Default for FederatedEvalOptions {
    fn default() -> Self {
        FederatedEvalOptions {
            tep: TepEvalOptions::default(),
            sites: 6,
            rounds: 40,
            stride: 3,
            // Two local epochs: with one, FedProx ends 5 points under centralised on
            // the split by fault (76.3 against 81.8); with two, within 3 on every split.
            work: LocalWork {
                epochs: 2,
                batch_size: 64,
                learning_rate: 2e-3,
                proximal_mu: 0.0,
                seed: 11,
                max_seconds: None,
            },
            fedprox_mu: 0.01,
            server_momentum: 0.0,
            alphas: vec![0.5, 0.1],
            compression: Compression::TopKInt8 { fraction: 0.25 },
            privacy: Privacy {
                clip_norm: 1.0,
                noise_multiplier: 0.3,
                delta: 1e-5,
            },
            trim: 0.2,
            policies: Policy::ALL.to_vec(),
            seed: 17,
            repeats: 1,
            threads: 1,
        }
    }
}

/// One way of training the classifier on a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    LocalOnly,
    Centralised,
    Fedavg,
    Fedprox,
    FedavgCompressed,
    FedavgDp,
    FedavgPoisoned,
    TrimmedMeanPoisoned,
    MedianPoisoned,
    Distillation,
}

impl Policy {
    pub const ALL: [Policy; 10] = [
        Policy::LocalOnly,
        Policy::Centralised,
        Policy::Fedavg,
        Policy::Fedprox,
        Policy::FedavgCompressed,
        Policy::FedavgDp,
        Policy::FedavgPoisoned,
        Policy::TrimmedMeanPoisoned,
        Policy::MedianPoisoned,
        Policy::Distillation,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Policy::LocalOnly => "local_only",
            Policy::Centralised => "centralised",
            Policy::Fedavg => "fedavg",
            Policy::Fedprox => "fedprox",
            Policy::FedavgCompressed => "fedavg_compressed",
            Policy::FedavgDp => "fedavg_dp",
            Policy::FedavgPoisoned => "fedavg_poisoned",
            Policy::TrimmedMeanPoisoned => "trimmed_mean_poisoned",
            Policy::MedianPoisoned => "median_poisoned",
            Policy::Distillation => "distillation",
        }
    }
}

/// A policy name `fogmesh eval federated` does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy `{name}`: one of {}", Policy::ALL.map(|p| p.name()).join(", "))]
pub struct UnknownPolicy {
    pub name: String,
}

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPolicy { name: s.into() })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FederatedEvalError {
    #[error(transparent)]
    Tep(#[from] TepEvalError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Weights(Box<MergeError>),
    #[error(transparent)]
    Round(#[from] FederatedError),
    #[error(transparent)]
    Local(Box<LocalTrainingError>),
    #[error("invalid {field} = {value}: {reason}")]
    Option {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl From<MergeError> for FederatedEvalError {
    fn from(error: MergeError) -> Self {
        FederatedEvalError::Weights(Box::new(error))
    }
}

impl From<LocalTrainingError> for FederatedEvalError {
    fn from(error: LocalTrainingError) -> Self {
        FederatedEvalError::Local(Box::new(error))
    }
}

/// One policy on one split. With repeats, `accuracy` is their mean and every other
/// figure the first run's.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyResult {
    pub policy: &'static str,
    /// Share of the pooled test windows classified right (the mean over repeats).
    pub accuracy: f64,
    /// Each repeat's accuracy, in the order of their seeds.
    pub accuracy_runs: Vec<f64>,
    /// Per site, on the test windows of the classes that site trains on (`null` for a
    /// site the split left without windows).
    pub per_site: Vec<Option<f64>>,
    pub rounds: usize,
    /// The first round after which accuracy (on every fourth test window) stayed within
    /// one point of the last round's; federated policies only.
    pub rounds_to_converge: Option<usize>,
    /// Accuracy on every fourth test window after each round (federated policies
    /// only): the curve `rounds_to_converge` reads.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub accuracy_by_round: Vec<f64>,
    pub bytes: u64,
    pub bytes_down: u64,
    /// ε of `(ε, 1e-5)`-DP spent (`fedavg_dp` only).
    pub epsilon: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SplitResult {
    pub split: &'static str,
    pub alpha: Option<f64>,
    /// Training windows per site.
    pub site_windows: Vec<usize>,
    pub policies: Vec<PolicyResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FederatedEvalReport {
    pub dataset: &'static str,
    pub sites: usize,
    pub rounds: usize,
    pub classes: usize,
    pub train_windows: usize,
    pub test_windows: usize,
    pub compression: String,
    pub privacy: Privacy,
    pub splits: Vec<SplitResult>,
    pub seconds: f64,
}

/// The labelled windows and what every policy shares.
struct Bench {
    config: ClassifierConfig,
    architecture: Architecture,
    initial: Vec<u8>,
    per_window: usize,
    train: Vec<ReplayItem>,
    /// Unlabelled windows every site may see (distillation's shared set), kept out of
    /// `train`.
    shared: Vec<ReplayItem>,
    test_inputs: Vec<f32>,
    test_labels: Vec<i64>,
    classes: usize,
}

impl Bench {
    fn read(options: &FederatedEvalOptions) -> Result<Bench, FederatedEvalError> {
        let runs = TepRuns::read(&options.tep.data)?;
        let diagnosis = Diagnosis::untrained(&options.tep, runs.columns, &runs.tests)?;
        let (inputs, labels) = diagnosis.training_windows(
            &runs.train,
            runs.columns,
            &runs.tests,
            &runs.mean,
            &runs.std,
        );
        let per_window = runs.columns * options.tep.classifier_window;
        let (mut train, mut shared) = (Vec::new(), Vec::new());
        for (i, (window, label)) in inputs
            .chunks(per_window)
            .zip(&labels)
            .step_by(options.stride)
            .enumerate()
        {
            if i % SHARED_EVERY == SHARED_EVERY - 1 {
                shared.push(ReplayItem {
                    window: window.to_vec(),
                    label: None,
                });
            } else {
                train.push(ReplayItem {
                    window: window.to_vec(),
                    label: Some(*label),
                });
            }
        }
        let (mut test_inputs, mut test_labels) = (Vec::new(), Vec::new());
        for (_, run) in &runs.tests {
            if let Some((w, class)) =
                diagnosis.test_windows(run, runs.columns, &runs.mean, &runs.std)
            {
                test_labels.extend(std::iter::repeat_n(class, w.len() / per_window));
                test_inputs.extend(w);
            }
        }
        let names = diagnosis.class_names();
        let classes = names.len();
        let config = *diagnosis.model.config();
        let architecture = Architecture::FaultClassifier {
            config,
            classes: Classes { names, normal: 0 },
        };
        let (initial, _) = diagnosis.model.to_safetensors()?;
        Ok(Bench {
            config,
            architecture,
            initial,
            per_window,
            train,
            shared,
            test_inputs,
            test_labels,
            classes,
        })
    }

    fn model(&self, weights: &[u8]) -> Result<FaultClassifier, ModelError> {
        self.model_of(self.config, weights)
    }

    fn model_of(
        &self,
        config: ClassifierConfig,
        weights: &[u8],
    ) -> Result<FaultClassifier, ModelError> {
        FaultClassifier::from_safetensors(config, weights, None, fogmesh_models::default_device())
    }

    /// Predicted classes of every `step`-th test window.
    fn predict(&self, weights: &[u8], step: usize) -> Result<Vec<i64>, ModelError> {
        self.predict_with(self.config, weights, step)
    }

    /// The same, by a classifier of another width.
    fn predict_with(
        &self,
        config: ClassifierConfig,
        weights: &[u8],
        step: usize,
    ) -> Result<Vec<i64>, ModelError> {
        let inputs: Vec<f32> = self
            .test_inputs
            .chunks(self.per_window)
            .step_by(step)
            .flatten()
            .copied()
            .collect();
        self.model_of(config, weights)?.predict(&inputs)
    }

    fn accuracy(&self, predicted: &[i64], step: usize, among: Option<&[bool]>) -> Option<f64> {
        let (mut right, mut total) = (0usize, 0usize);
        for (p, truth) in predicted.iter().zip(self.test_labels.iter().step_by(step)) {
            if among.is_none_or(|classes| classes[*truth as usize]) {
                total += 1;
                right += usize::from(p == truth);
            }
        }
        (total > 0).then(|| right as f64 / total as f64)
    }
}

/// Every `SHARED_EVERY`-th training window goes, unlabelled, to the shared set.
const SHARED_EVERY: usize = 20;

/// The widths of the sites' classifiers under distillation, by site (cycled): small
/// edge models beside larger ones.
const DISTILLED_WIDTHS: [i64; 3] = [32, 64, 96];

/// Federated distillation over classifiers of different widths: rounds of outputs on
/// the shared windows, a consensus, and local training that matches it. The mean
/// pooled accuracy over the sites, per-site accuracy, bytes up and down.
fn distillation(
    bench: &Bench,
    options: &FederatedEvalOptions,
    sites: &[Vec<ReplayItem>],
    trained: &[Vec<bool>],
    result: &mut PolicyResult,
) -> Result<(), FederatedEvalError> {
    let device = fogmesh_models::default_device();
    let mut members = Vec::new();
    for (site, items) in sites.iter().enumerate() {
        if items.is_empty() {
            continue;
        }
        let config = ClassifierConfig {
            hidden: DISTILLED_WIDTHS[site % DISTILLED_WIDTHS.len()],
            ..bench.config
        };
        let Architecture::FaultClassifier { classes, .. } = &bench.architecture else {
            return Err(FederatedEvalError::Option {
                field: "architecture",
                value: bench.architecture.manifest_fields().0,
                reason: "distillation here compares fault classifiers",
            });
        };
        let architecture = Architecture::FaultClassifier {
            config,
            classes: classes.clone(),
        };
        let model = FaultClassifier::new(config, device, options.tep.classifier_train.seed)?;
        members.push((site, config, architecture, model.to_safetensors()?.0));
    }
    let (mut up, mut down) = (0u64, 0u64);
    for round in 0..options.rounds {
        let mut outputs = Vec::with_capacity(members.len());
        for (site, _, architecture, weights) in &members {
            let out = outputs_on(architecture, weights, &bench.shared, device)?;
            up += (out.len() * 4) as u64;
            outputs.push((out, sites[*site].len() as u64));
        }
        let views: Vec<(&[f32], u64)> = outputs.iter().map(|(o, w)| (o.as_slice(), *w)).collect();
        let agreed = consensus(&views)?;
        for (site, _, architecture, weights) in &mut members {
            down += (agreed.len() * 4) as u64;
            *weights = distill_locally(
                architecture,
                weights,
                &sites[*site],
                &bench.shared,
                &agreed,
                1.0,
                &options.work,
                round as u64,
                device,
            )?
            .weights;
        }
    }
    let mut per_site = vec![None; sites.len()];
    let mut pooled = Vec::new();
    for (site, config, _, weights) in &members {
        let predicted = bench.predict_with(*config, weights, 1)?;
        pooled.push(bench.accuracy(&predicted, 1, None).unwrap_or(0.0));
        per_site[*site] = bench.accuracy(&predicted, 1, Some(&trained[*site]));
    }
    result.accuracy = pooled.iter().sum::<f64>() / pooled.len().max(1) as f64;
    result.per_site = per_site;
    result.bytes = up;
    result.bytes_down = down;
    Ok(())
}

/// Gamma(shape, 1) by Marsaglia and Tsang (2000); shapes below 1 through
/// Gamma(shape + 1) · U^(1/shape).
fn gamma(shape: f64, rng: &mut SplitMix64) -> f64 {
    if shape < 1.0 {
        let u = 1.0 - rng.next_f64();
        return gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = rng.normal();
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.next_f64();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

fn dirichlet(alpha: f64, n: usize, rng: &mut SplitMix64) -> Vec<f64> {
    let draws: Vec<f64> = (0..n).map(|_| gamma(alpha, rng)).collect();
    let total: f64 = draws.iter().sum();
    if total > 0.0 {
        draws.iter().map(|d| d / total).collect()
    } else {
        vec![1.0 / n as f64; n]
    }
}

/// Window indices per site, by class.
fn split(
    labels: &[i64],
    classes: usize,
    sites: usize,
    alpha: Option<f64>,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64::new(seed);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, label) in labels.iter().enumerate() {
        by_class[*label as usize].push(i);
    }
    let mut out = vec![Vec::new(); sites];
    for (class, mut indices) in by_class.into_iter().enumerate() {
        rng.shuffle(&mut indices);
        match alpha {
            // Normal operation everywhere, each fault at one site.
            None if class == 0 => {
                for (i, index) in indices.into_iter().enumerate() {
                    out[i % sites].push(index);
                }
            }
            None => out[(class - 1) % sites].extend(indices),
            Some(alpha) => {
                let shares = dirichlet(alpha, sites, &mut rng);
                let n = indices.len();
                let mut from = 0;
                let mut cumulative = 0.0;
                for (site, share) in shares.iter().enumerate() {
                    cumulative += share;
                    let to = if site + 1 == sites {
                        n
                    } else {
                        ((cumulative * n as f64).round() as usize).clamp(from, n)
                    };
                    out[site].extend_from_slice(&indices[from..to]);
                    from = to;
                }
            }
        }
    }
    for site in &mut out {
        site.sort_unstable();
    }
    out
}

fn add(weights: &mut Weights, delta: &[f32]) {
    for (w, d) in weights.values_mut().iter_mut().zip(delta) {
        *w += d;
    }
}

/// Rounds of one federated policy.
struct Federation<'a> {
    aggregation: Aggregation,
    privacy: Option<Privacy>,
    compression: Compression,
    poisoned: bool,
    work: LocalWork,
    momentum: f64,
    sites: &'a [Vec<ReplayItem>],
}

/// What a federated policy's rounds produced.
struct Rounds {
    weights: Vec<u8>,
    /// Accuracy on every fourth test window after each round.
    tracked: Vec<f64>,
    up: u64,
    down: u64,
    epsilon: Option<f64>,
}

fn federate(
    bench: &Bench,
    federation: &Federation<'_>,
    rounds: usize,
    seed: u64,
) -> Result<Rounds, FederatedEvalError> {
    let mut global = Weights::from_safetensors(&bench.initial, "the initial classifier")?;
    let mut compressors: Vec<Compressor> = federation
        .sites
        .iter()
        .map(|_| Compressor::new(federation.compression))
        .collect();
    let mut aggregator = RoundAggregator::new(federation.aggregation, federation.privacy, seed)?
        .with_momentum(federation.momentum)?;
    // The attacker is the site with the most windows: the one FedAvg listens to most.
    let poisoner =
        (0..federation.sites.len()).max_by_key(|s| (federation.sites[*s].len(), usize::MAX - s));
    let (mut up, mut down) = (0u64, 0u64);
    let mut tracked = Vec::with_capacity(rounds);
    let mut bytes = bench.initial.clone();
    for round in 0..rounds {
        let mut contributions = Vec::new();
        for (site, items) in federation.sites.iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            down += bytes.len() as u64;
            let mut update = train_locally(
                &bench.architecture,
                &bytes,
                items,
                &federation.work,
                round as u64,
                fogmesh_models::default_device(),
            )?;
            if federation.poisoned && Some(site) == poisoner {
                update.delta.iter_mut().for_each(|v| *v *= -10.0);
            }
            let encoded = compressors[site].compress(&update.delta);
            up += encoded.bytes.len() as u64;
            contributions.push(Contribution {
                update: encoded,
                samples: update.samples,
                staleness: 0,
            });
        }
        let combined = aggregator.combine(&contributions)?;
        add(&mut global, &combined.delta);
        bytes = global.to_safetensors()?.0;
        let predicted = bench.predict(&bytes, 4)?;
        tracked.push(bench.accuracy(&predicted, 4, None).unwrap_or(0.0));
    }
    Ok(Rounds {
        weights: bytes,
        tracked,
        up,
        down,
        epsilon: aggregator.epsilon(),
    })
}

/// Trains alone on `items` as the zoo trains the classifier: up to `epochs` epochs,
/// a tenth of the windows held out, stopped after 5 epochs without improvement, the
/// best epoch's weights kept. The weights after.
fn alone(
    bench: &Bench,
    items: &[ReplayItem],
    work: &LocalWork,
    epochs: usize,
) -> Result<Vec<u8>, FederatedEvalError> {
    let mut model = bench.model(&bench.initial)?;
    let windows: Vec<f32> = items
        .iter()
        .flat_map(|i| i.window.iter().copied())
        .collect();
    let labels: Vec<i64> = items.iter().map(|i| i.label.unwrap_or(0)).collect();
    let options = TrainOptions {
        epochs: epochs * work.epochs,
        batch_size: work.batch_size,
        learning_rate: work.learning_rate,
        validation_fraction: 0.1,
        patience: 5,
        seed: work.seed,
        max_seconds: None,
    };
    model.fit(&windows, &labels, &options, &mut |_| {})?;
    Ok(model.to_safetensors()?.0)
}

fn run_policy(
    bench: &Bench,
    options: &FederatedEvalOptions,
    policy: Policy,
    sites: &[Vec<ReplayItem>],
    trained: &[Vec<bool>],
) -> Result<PolicyResult, FederatedEvalError> {
    let started = Instant::now();
    let rounds = options.rounds;
    let per_site = |weights: &[u8]| -> Result<Vec<Option<f64>>, FederatedEvalError> {
        let predicted = bench.predict(weights, 1)?;
        Ok(trained
            .iter()
            .map(|classes| bench.accuracy(&predicted, 1, Some(classes)))
            .collect())
    };
    let mut result = PolicyResult {
        policy: policy.name(),
        accuracy: 0.0,
        accuracy_runs: Vec::new(),
        per_site: Vec::new(),
        rounds,
        rounds_to_converge: None,
        accuracy_by_round: Vec::new(),
        bytes: 0,
        bytes_down: 0,
        epsilon: None,
        seconds: 0.0,
    };
    match policy {
        Policy::LocalOnly => {
            let mut pooled = Vec::new();
            for (site, items) in sites.iter().enumerate() {
                if items.is_empty() {
                    result.per_site.push(None);
                    continue;
                }
                let weights = alone(bench, items, &options.work, rounds)?;
                let predicted = bench.predict(&weights, 1)?;
                pooled.push(bench.accuracy(&predicted, 1, None).unwrap_or(0.0));
                result
                    .per_site
                    .push(bench.accuracy(&predicted, 1, Some(&trained[site])));
            }
            result.accuracy = pooled.iter().sum::<f64>() / pooled.len().max(1) as f64;
        }
        Policy::Distillation => distillation(bench, options, sites, trained, &mut result)?,
        Policy::Centralised => {
            let all: Vec<ReplayItem> = sites.iter().flatten().cloned().collect();
            let weights = alone(bench, &all, &options.work, rounds)?;
            let predicted = bench.predict(&weights, 1)?;
            result.accuracy = bench.accuracy(&predicted, 1, None).unwrap_or(0.0);
            result.per_site = per_site(&weights)?;
            result.bytes = (all.len() * bench.per_window * 4) as u64;
        }
        _ => {
            let (aggregation, poisoned) = match policy {
                Policy::Fedprox => (
                    Aggregation::FedProx {
                        mu: options.fedprox_mu,
                    },
                    false,
                ),
                Policy::FedavgPoisoned => (Aggregation::FedAvg, true),
                Policy::TrimmedMeanPoisoned => {
                    (Aggregation::TrimmedMean { trim: options.trim }, true)
                }
                Policy::MedianPoisoned => (Aggregation::Median, true),
                _ => (Aggregation::FedAvg, false),
            };
            let federation = Federation {
                aggregation,
                privacy: (policy == Policy::FedavgDp).then_some(options.privacy),
                compression: if policy == Policy::FedavgCompressed {
                    options.compression
                } else {
                    Compression::None
                },
                poisoned,
                work: LocalWork {
                    proximal_mu: aggregation.proximal_mu(),
                    ..options.work.clone()
                },
                momentum: options.server_momentum,
                sites,
            };
            let Rounds {
                weights,
                tracked,
                up,
                down,
                epsilon,
            } = federate(bench, &federation, rounds, options.seed)?;
            let predicted = bench.predict(&weights, 1)?;
            result.accuracy = bench.accuracy(&predicted, 1, None).unwrap_or(0.0);
            result.per_site = per_site(&weights)?;
            let last = tracked.last().copied().unwrap_or(0.0);
            // tracked[r] follows round r + 1; convergence starts after the last miss.
            let last_miss = tracked.iter().rposition(|a| *a < last - 0.01);
            result.rounds_to_converge = Some(last_miss.map_or(1, |r| r + 2));
            result.accuracy_by_round = tracked;
            result.bytes = up;
            result.bytes_down = down;
            result.epsilon = epsilon;
        }
    }
    result.seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

pub fn evaluate(
    options: &FederatedEvalOptions,
    progress: &mut dyn FnMut(&SplitResult, &PolicyResult),
) -> Result<FederatedEvalReport, FederatedEvalError> {
    for (field, value) in [
        ("sites", options.sites),
        ("rounds", options.rounds),
        ("stride", options.stride),
        ("repeats", options.repeats),
        ("threads", options.threads),
    ] {
        if value == 0 {
            return Err(FederatedEvalError::Option {
                field,
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
    }
    if let Some(alpha) = options
        .alphas
        .iter()
        .find(|a| !(a.is_finite() && **a > 0.0))
    {
        return Err(FederatedEvalError::Option {
            field: "alpha",
            value: alpha.to_string(),
            reason: "a Dirichlet concentration must be a finite number above 0",
        });
    }
    options.work.validate()?;
    tch::set_num_threads(options.threads as i32);
    let started = Instant::now();
    let bench = Bench::read(options)?;
    let labels: Vec<i64> = bench.train.iter().filter_map(|i| i.label).collect();
    let mut splits = Vec::new();
    for alpha in std::iter::once(None).chain(options.alphas.iter().copied().map(Some)) {
        let indices = split(&labels, bench.classes, options.sites, alpha, options.seed);
        let sites: Vec<Vec<ReplayItem>> = indices
            .iter()
            .map(|site| site.iter().map(|i| bench.train[*i].clone()).collect())
            .collect();
        let trained: Vec<Vec<bool>> = indices
            .iter()
            .map(|site| {
                let mut seen = vec![false; bench.classes];
                for i in site {
                    seen[labels[*i] as usize] = true;
                }
                seen
            })
            .collect();
        let mut result = SplitResult {
            split: if alpha.is_some() {
                "dirichlet"
            } else {
                "by_fault"
            },
            alpha,
            site_windows: sites.iter().map(Vec::len).collect(),
            policies: Vec::new(),
        };
        for policy in &options.policies {
            let mut outcome: Option<PolicyResult> = None;
            for repeat in 0..options.repeats {
                let options = FederatedEvalOptions {
                    work: LocalWork {
                        seed: options.work.seed + repeat as i64,
                        ..options.work.clone()
                    },
                    seed: options.seed + repeat as u64,
                    ..options.clone()
                };
                let run = run_policy(&bench, &options, *policy, &sites, &trained)?;
                match &mut outcome {
                    None => {
                        outcome = Some(PolicyResult {
                            accuracy_runs: vec![run.accuracy],
                            ..run
                        })
                    }
                    Some(first) => first.accuracy_runs.push(run.accuracy),
                }
            }
            if let Some(mut outcome) = outcome {
                outcome.accuracy =
                    outcome.accuracy_runs.iter().sum::<f64>() / outcome.accuracy_runs.len() as f64;
                progress(&result, &outcome);
                result.policies.push(outcome);
            }
        }
        splits.push(result);
    }
    Ok(FederatedEvalReport {
        dataset: "tep",
        sites: options.sites,
        rounds: options.rounds,
        classes: bench.classes,
        train_windows: bench.train.len(),
        test_windows: bench.test_labels.len(),
        compression: options.compression.to_string(),
        privacy: options.privacy,
        splits,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_fault_puts_each_fault_at_one_site_and_normal_everywhere() {
        let labels: Vec<i64> = (0..130).map(|i| i % 13).collect();
        let sites = split(&labels, 13, 6, None, 1);
        let mut seen_at = vec![Vec::new(); 13];
        for (site, indices) in sites.iter().enumerate() {
            for i in indices {
                if !seen_at[labels[*i] as usize].contains(&site) {
                    seen_at[labels[*i] as usize].push(site);
                }
            }
        }
        assert_eq!(seen_at[0].len(), 6);
        assert!(seen_at[1..].iter().all(|s| s.len() == 1));
        let every: usize = sites.iter().map(Vec::len).sum();
        assert_eq!(every, 130);
    }

    #[test]
    fn a_small_alpha_concentrates_each_class_and_every_window_goes_somewhere() {
        let labels: Vec<i64> = (0..6000).map(|i| i % 6).collect();
        let concentration = |alpha| {
            let sites = split(&labels, 6, 6, Some(alpha), 3);
            assert_eq!(sites.iter().map(Vec::len).sum::<usize>(), 6000);
            // The mean over classes of the largest site's share of that class.
            (0..6)
                .map(|class| {
                    let counts: Vec<usize> = sites
                        .iter()
                        .map(|s| s.iter().filter(|i| labels[**i] == class).count())
                        .collect();
                    *counts.iter().max().unwrap() as f64 / 1000.0
                })
                .sum::<f64>()
                / 6.0
        };
        let (skewed, even) = (concentration(0.1), concentration(100.0));
        assert!(skewed > 0.7, "alpha 0.1: {skewed}");
        assert!(even < 0.3, "alpha 100: {even}");
    }

    #[test]
    fn gamma_draws_have_their_shape_as_mean() {
        let mut rng = SplitMix64::new(5);
        for shape in [0.1, 0.5, 2.0] {
            let mean = (0..20_000).map(|_| gamma(shape, &mut rng)).sum::<f64>() / 20_000.0;
            assert!(
                (mean - shape).abs() < 0.05 * shape.max(1.0),
                "{shape}: {mean}"
            );
        }
    }

    #[test]
    fn policies_read_by_name() {
        assert_eq!("fedprox".parse::<Policy>(), Ok(Policy::Fedprox));
        let refused = "fedsgd".parse::<Policy>().unwrap_err().to_string();
        assert!(
            refused.contains("fedsgd") && refused.contains("local_only"),
            "{refused}"
        );
    }
}

/// A short `fogmesh eval federated` on the recordings `just setup` generates.
#[cfg(test)]
mod scenario_tests {
    use std::path::PathBuf;

    use super::*;

    fn policy<'a>(split: &'a SplitResult, name: &str) -> &'a PolicyResult {
        split
            .policies
            .iter()
            .find(|p| p.policy == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    #[test]
    fn federation_beats_sites_alone_and_robust_rules_hold_against_a_poisoned_site() {
        let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/tep");
        assert!(
            data.join("manifest.json").exists(),
            "{} has no TEP recordings: run `just setup` first",
            data.display()
        );
        let defaults = FederatedEvalOptions::default();
        let options = FederatedEvalOptions {
            tep: TepEvalOptions {
                data,
                ..defaults.tep.clone()
            },
            rounds: 6,
            stride: 6,
            alphas: vec![0.1],
            policies: vec![
                Policy::LocalOnly,
                Policy::Fedavg,
                Policy::FedavgPoisoned,
                Policy::MedianPoisoned,
            ],
            ..defaults
        };
        let mut seen = 0;
        let report = evaluate(&options, &mut |_, _| seen += 1).unwrap();
        assert_eq!(seen, 8);
        assert_eq!(report.classes, 13);
        let splits: Vec<(&str, Option<f64>)> =
            report.splits.iter().map(|s| (s.split, s.alpha)).collect();
        assert_eq!(splits, [("by_fault", None), ("dirichlet", Some(0.1))]);
        for split in &report.splits {
            assert_eq!(
                split.site_windows.iter().sum::<usize>(),
                report.train_windows
            );
            let alone = policy(split, "local_only");
            let fedavg = policy(split, "fedavg");
            assert_eq!((alone.bytes, alone.per_site.len()), (0, 6));
            assert!(fedavg.bytes > 0 && fedavg.bytes_down > 0);
            // A site sending its update flipped and ×10 wrecks FedAvg; the median holds.
            let (broken, held) = (
                policy(split, "fedavg_poisoned"),
                policy(split, "median_poisoned"),
            );
            assert!(
                broken.accuracy + 0.2 < fedavg.accuracy && held.accuracy > broken.accuracy + 0.2,
                "{}: fedavg {} poisoned {} median {}",
                split.split,
                fedavg.accuracy,
                broken.accuracy,
                held.accuracy
            );
        }
        // With each class concentrated at one or two sites, sites alone know little of
        // the plant; together they know it.
        let skewed = &report.splits[1];
        let (alone, fedavg) = (policy(skewed, "local_only"), policy(skewed, "fedavg"));
        assert!(
            fedavg.accuracy > alone.accuracy + 0.1,
            "fedavg {} local-only {}",
            fedavg.accuracy,
            alone.accuracy
        );
    }
}
