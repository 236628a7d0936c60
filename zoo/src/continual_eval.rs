//! `fogmesh eval continual`: continual learning on a real regime change in the
//! Tennessee Eastman recordings. An anomaly expert trained on one operating point meets
//! the plant after a sustained disturbance its controllers absorb into a new steady
//! state, and three policies are compared on the same data: never update, naive
//! fine-tuning on the new windows, and fogmesh's continual learning (replay + EWC,
//! through the validation gate).
//!
//! The protocol, step by step:
//!
//! 1. **Pick the regime change from the data.** Every `idvNN` run is cut into hours and
//!    standardised with the normal training runs' statistics. A run *settles* from the
//!    first hour after its onset from which no hour-to-hour change of the hourly means is
//!    larger than the largest one in the normal training runs (for at least three hours,
//!    to the end of the run); it is a *new regime* when some variable's mean over the
//!    settled rows lies further from normal than any normal hour does. The earliest to
//!    settle is chosen (it leaves the most settled rows) unless the caller names one.
//! 2. **Old regime**: the incumbent autoencoder trains on the `normal-train-*` runs
//!    (a small epoch budget), then serves `normal-calibration`, whose q0.99 score is
//!    its threshold; `normal-test` is held out. **New regime**: the settled rows,
//!    split in time: the first [`ContinualEvalOptions::stream_fraction`] streams in, the
//!    rest is held out. The transient between the onset and the settled rows belongs to
//!    neither and is left out: the stream is the run's own rows before the onset followed
//!    by the settled rows (a new batch of material arriving).
//! 3. **Detect**: each streamed window's score, in units of the incumbent's threshold,
//!    goes to a Page–Hinkley detector; the delay counts the new-regime rows it saw.
//! 4. **Adapt**: the next [`ContinualEvalOptions::collect`] windows after the detection
//!    are collected; their latest [`ContinualEvalOptions::gate_fraction`] and the same
//!    share of the reservoir are kept for the gate, the rest fine-tunes the candidates.
//!    The reservoir samples every window the incumbent *served* before the detection
//!    (`normal-calibration`, then the stream), as it would on a node: its own training
//!    windows would make the old regime look easier than unseen old data is, and so
//!    lower the candidate's recalibrated threshold.
//! 5. **Score** each policy's serving model with its own threshold: false alarms on
//!    the held-out new-regime rows (quality), on `normal-test` (forgetting), and the
//!    detection rate after the onset of every other fault run (so a model that never
//!    alarms cannot win).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use fogmesh_models::continual::{
    evaluate as loss_on, fine_tune, FineTuneOptions, FineTuned, GateReport, ReplayItem, Reservoir,
    ValidationGate,
};
use fogmesh_models::drift::PageHinkley;
use fogmesh_models::served::Architecture;
use fogmesh_models::store::{InputSpec, Manifest};
use fogmesh_models::{
    quantile, AutoencoderConfig, ConvAutoencoder, ModelError, Recording, TrainOptions,
};
use serde::Serialize;

use crate::tep_eval::{tep_autoencoder_config, TepEvalError, TepEvalOptions, TepRuns};

#[derive(Debug, Clone)]
pub struct ContinualEvalOptions {
    /// The folder `just setup` fills (`data/tep`).
    pub data: PathBuf,
    /// The `idvNN` run to adapt to; `None` picks the earliest to settle (step 1).
    pub regime_change: Option<String>,
    /// Rows per window.
    pub window: usize,
    /// Threshold rule of every model: this quantile of its scores on held-out normal
    /// windows.
    pub limit_quantile: f64,
    /// The incumbent's training on the old regime.
    pub incumbent_train: TrainOptions,
    /// Share of the settled rows that streams in; the rest is held out.
    pub stream_fraction: f64,
    /// New-regime windows collected after the detection.
    pub collect: usize,
    /// Share of the collected windows (the latest) and of the reservoir kept for the
    /// gate rather than fine-tuning.
    pub gate_fraction: f64,
    /// Windows the replay reservoir keeps, and its seed.
    pub reservoir: usize,
    pub reservoir_seed: u64,
    /// Page–Hinkley on scores in threshold units: tolerated change, firing sum, and
    /// values seen before testing.
    pub drift_delta: f64,
    pub drift_lambda: f64,
    pub drift_min_values: u64,
    /// fogmesh's continual learning; naive fine-tuning runs the same options with no
    /// replay and no EWC.
    pub fine_tune: FineTuneOptions,
    pub gate: ValidationGate,
    /// libtorch intra-op threads.
    pub threads: usize,
}

impl Default for ContinualEvalOptions {
    fn default() -> Self {
        let tep = TepEvalOptions::default();
        ContinualEvalOptions {
            data: tep.data,
            regime_change: None,
            window: tep.window,
            limit_quantile: tep.limit_quantile,
            incumbent_train: TrainOptions {
                epochs: 8,
                max_seconds: Some(30.0),
                ..tep.train
            },
            stream_fraction: 0.5,
            collect: 800,
            gate_fraction: 0.2,
            reservoir: 512,
            reservoir_seed: 17,
            drift_delta: 0.1,
            drift_lambda: 25.0,
            drift_min_values: 30,
            fine_tune: FineTuneOptions::default(),
            gate: ValidationGate::default(),
            threads: 1,
        }
    }
}

impl ContinualEvalOptions {
    fn validate(&self) -> Result<(), ModelError> {
        let invalid = |field, value: String, reason: &str| {
            Err(ModelError::InvalidOption {
                field,
                value,
                reason: reason.into(),
            })
        };
        if !(1..=256).contains(&self.threads) {
            return invalid("threads", self.threads.to_string(), "must lie in 1..=256");
        }
        if self.window < 2 {
            return invalid("window", self.window.to_string(), "must be at least 2 rows");
        }
        if !(self.stream_fraction > 0.0 && self.stream_fraction < 1.0) {
            return invalid(
                "stream_fraction",
                self.stream_fraction.to_string(),
                "must lie in (0, 1): some settled rows stream in, the rest are held out",
            );
        }
        if !(self.gate_fraction > 0.0 && self.gate_fraction < 1.0) {
            return invalid(
                "gate_fraction",
                self.gate_fraction.to_string(),
                "must lie in (0, 1): the gate and the fine-tuning both need windows",
            );
        }
        if self.collect < 10 {
            return invalid(
                "collect",
                self.collect.to_string(),
                "at least 10 windows: the gate and the fine-tuning split them",
            );
        }
        if self.reservoir < 10 {
            return invalid(
                "reservoir",
                self.reservoir.to_string(),
                "at least 10 windows: the gate and the replay split them",
            );
        }
        self.fine_tune.validate()?;
        self.gate.validate()?;
        self.incumbent_train.validate()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContinualEvalError {
    #[error(transparent)]
    Tep(#[from] TepEvalError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(
        "no IDV run settles to a new steady state in {}: {candidates}",
        data.display()
    )]
    NoRegimeChange { data: PathBuf, candidates: String },
    #[error("{run} is not a regime change to adapt to: {reason}")]
    NotARegimeChange { run: String, reason: String },
    #[error(
        "Page-Hinkley (delta {delta}, lambda {lambda}) did not detect the change to {run} \
         in {windows} streamed windows"
    )]
    NotDetected {
        run: String,
        delta: f64,
        lambda: f64,
        windows: usize,
    },
    #[error(
        "{run}: drift detected at streamed window {at} of {streamed}, which leaves {left} \
         windows to collect before the held-out rows; {needed} were asked (lower `collect` \
         or `stream_fraction`'s complement)"
    )]
    TooFewWindows {
        run: String,
        at: usize,
        streamed: usize,
        left: usize,
        needed: usize,
    },
}

/// How one IDV run behaves after its onset (step 1 of the protocol).
#[derive(Debug, Clone, Serialize)]
pub struct Settling {
    pub run: String,
    pub fault: u32,
    /// The disturbance, from the recording's description.
    pub disturbance: String,
    /// Hours from the onset to the first settled hour; `None` when it never settles.
    pub settled_after_h: Option<f64>,
    /// The variable whose mean over the settled rows (all rows after the onset when it
    /// never settles) lies furthest from normal, and how far, in standard deviations.
    pub variable: String,
    pub shift_std: f64,
    /// The largest hour-to-hour change of the standardised hourly means from the
    /// settled hour on.
    pub largest_hourly_change: Option<f64>,
}

/// The chosen regime change and where its rows went.
#[derive(Debug, Clone, Serialize)]
pub struct RegimeChange {
    #[serde(flatten)]
    pub settling: Settling,
    pub onset_row: usize,
    pub settled_from_row: usize,
    /// Rows `[from, to)` that stream in, and that are held out.
    pub streamed_rows: [usize; 2],
    pub held_out_rows: [usize; 2],
    /// The largest hour-to-hour change and the largest hourly mean (any variable,
    /// standard deviations) in the normal training runs: the limits of "settled" and
    /// of "new".
    pub normal_hourly_change: f64,
    pub normal_shift_std: f64,
    pub why: String,
}

/// One policy's serving model after the regime change, scored on held-out data.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyOutcome {
    pub policy: &'static str,
    /// False alarms on the held-out settled rows of the new regime.
    pub far_new: f64,
    /// False alarms on `normal-test` (old regime).
    pub far_old: f64,
    /// Mean share of alarmed windows after the onset over the other fault runs.
    pub detection_rate: f64,
    /// Whether the policy's fine-tuned version replaced the incumbent. Naive
    /// fine-tuning always replaces it; its `gate` says what fogmesh's gate would have
    /// decided.
    pub promoted: bool,
    pub threshold: f64,
    pub gate: Option<GateReport>,
    pub fine_tune_s: Option<f64>,
    pub fine_tune_steps: Option<usize>,
    pub detection_by_run: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContinualReport {
    pub dataset: &'static str,
    pub regime_change: RegimeChange,
    /// Every IDV run's settling, for the choice in `regime_change`.
    pub candidates: Vec<Settling>,
    pub policies: Vec<PolicyOutcome>,
    /// New-regime windows (one per row) the detector saw when it fired, and the plant
    /// hours they span.
    pub drift_delay_windows: usize,
    pub drift_delay_h: f64,
    /// Detections before the change (on the old regime's own rows).
    pub false_drift_detections: usize,
    pub collected_windows: usize,
    pub collection_h: f64,
    pub fine_tune_s: f64,
    pub validation_s: f64,
    /// Detection to promotion of the continual candidate: plant time collecting plus
    /// wall time fine-tuning and validating; `None` when the gate kept the incumbent.
    pub drift_to_promotion_s: Option<f64>,
    pub incumbent_train_s: f64,
    pub reservoir_seen: u64,
    pub seconds: f64,
}

impl ContinualReport {
    /// The readable summary the CLI prints on stderr.
    pub fn table(&self) -> String {
        let change = &self.regime_change;
        let pct = |v: f64| format!("{:.1} %", 100.0 * v);
        let mut lines = vec![
            format!("regime change: {}", change.why),
            format!(
                "rows {}..{} stream in, {}..{} held out; drift detected after {} windows \
                 ({:.2} h) of the new regime ({} false detections before it)",
                change.streamed_rows[0],
                change.streamed_rows[1],
                change.held_out_rows[0],
                change.held_out_rows[1],
                self.drift_delay_windows,
                self.drift_delay_h,
                self.false_drift_detections
            ),
            format!(
                "collected {} windows ({:.1} h), fine-tuned in {:.1} s, validated in {:.2} s",
                self.collected_windows, self.collection_h, self.fine_tune_s, self.validation_s
            ),
            format!(
                "  {:<22} {:>9} {:>9} {:>10} {:>9}",
                "policy", "FAR new", "FAR old", "detection", "promoted"
            ),
        ];
        for policy in &self.policies {
            lines.push(format!(
                "  {:<22} {:>9} {:>9} {:>10} {:>9}",
                policy.policy,
                pct(policy.far_new),
                pct(policy.far_old),
                pct(policy.detection_rate),
                if policy.promoted { "yes" } else { "no" }
            ));
        }
        for policy in &self.policies {
            if let Some(gate) = &policy.gate {
                lines.push(format!("gate on {}: {}", policy.policy, gate.reason));
            }
        }
        lines.join("\n")
    }
}

/// Rows per hour block of the settling analysis.
fn rows_per_hour(run: &Recording) -> usize {
    ((3600.0 / run.header.sample_period_s).round() as usize).max(1)
}

/// Standardised means of each whole hour of `rows`.
fn hourly_means(rows: &[f32], runs: &TepRuns, hour: usize) -> Vec<Vec<f64>> {
    rows.chunks_exact(hour * runs.columns)
        .map(|block| standardised_mean(block, runs))
        .collect()
}

fn standardised_mean(rows: &[f32], runs: &TepRuns) -> Vec<f64> {
    let n = (rows.len() / runs.columns) as f64;
    let mut sums = vec![0.0f64; runs.columns];
    for row in rows.chunks_exact(runs.columns) {
        for (c, v) in row.iter().enumerate() {
            sums[c] += f64::from((v - runs.mean[c]) / runs.std[c]);
        }
    }
    sums.into_iter().map(|s| s / n).collect()
}

/// The largest Euclidean change between consecutive hourly means.
fn largest_change(hours: &[Vec<f64>]) -> f64 {
    hours
        .windows(2)
        .map(|pair| {
            pair[0]
                .iter()
                .zip(&pair[1])
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .fold(0.0, f64::max)
}

/// The disturbance's name in a TEP recording's description ("Fault IDV(4) (Reactor
/// cooling water inlet temperature) switched on ...").
fn disturbance(run: &Recording) -> String {
    let description = &run.header.description;
    description
        .split_once(") (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map_or_else(String::new, |(name, _)| name.to_string())
}

/// A settled stretch must last this many hours, so the end of a run cannot pass for
/// a steady state.
const MIN_SETTLED_HOURS: usize = 3;

/// Step 1 for one run: the first settled hour after the onset, and the shift.
fn settling(
    name: &str,
    run: &Recording,
    runs: &TepRuns,
    change_limit: f64,
) -> Option<(Settling, usize)> {
    let (fault, onset) = (run.header.fault?, run.header.fault_onset_row? as usize);
    let hour = rows_per_hour(run);
    let hours = hourly_means(&run.values, runs, hour);
    let first = onset.div_ceil(hour);
    let settled = (first..hours.len().saturating_sub(MIN_SETTLED_HOURS - 1))
        .find(|&h| largest_change(&hours[h..]) <= change_limit);
    let from_row = settled.map_or(onset, |h| h * hour);
    let mean = standardised_mean(&run.values[from_row * runs.columns..], runs);
    let (column, shift) = mean
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        .map(|(c, s)| (c, *s))?;
    let settling = Settling {
        run: name.to_string(),
        fault,
        disturbance: disturbance(run),
        settled_after_h: settled.map(|_| (from_row - onset) as f64 / hour as f64),
        variable: run.header.columns[column].clone(),
        shift_std: shift,
        largest_hourly_change: settled.map(|h| largest_change(&hours[h..])),
    };
    Some((settling, from_row))
}

/// A fine-tuned candidate, loaded to be scored.
fn load(config: &AutoencoderConfig, tuned: &FineTuned) -> Result<ConvAutoencoder, ModelError> {
    ConvAutoencoder::from_safetensors(
        config.clone(),
        &tuned.weights,
        Some(&tuned.sha256),
        fogmesh_models::default_device(),
    )
}

fn items(windows: &[f32], per_window: usize) -> Vec<ReplayItem> {
    windows
        .chunks_exact(per_window)
        .map(|w| ReplayItem {
            window: w.to_vec(),
            label: None,
        })
        .collect()
}

fn alarm_rate(scores: &[f32], threshold: f32) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    scores.iter().filter(|s| **s > threshold).count() as f64 / scores.len() as f64
}

/// What a policy serves and the data it is scored on.
struct Scoring<'a> {
    runs: &'a TepRuns,
    window: usize,
    new_held_out: &'a [f32],
    old_held_out: &'a [f32],
    faults: &'a [(String, &'a Recording)],
}

impl Scoring<'_> {
    fn score(
        &self,
        policy: &'static str,
        model: &ConvAutoencoder,
        threshold: f32,
    ) -> Result<PolicyOutcome, ModelError> {
        let mut detection_by_run = BTreeMap::new();
        for (name, run) in self.faults {
            let onset = run.header.fault_onset_row.unwrap_or(0) as usize;
            // Window i ends at row i + window − 1; it is faulty once that row is.
            let first = onset.saturating_sub(self.window - 1);
            let rows = &run.values[first * self.runs.columns..];
            if rows.len() < self.window * self.runs.columns {
                continue;
            }
            let scores = model.score(&self.runs.windows(rows, self.window))?;
            detection_by_run.insert(name.clone(), alarm_rate(&scores, threshold));
        }
        let detection_rate = if detection_by_run.is_empty() {
            0.0
        } else {
            detection_by_run.values().sum::<f64>() / detection_by_run.len() as f64
        };
        Ok(PolicyOutcome {
            policy,
            far_new: alarm_rate(&model.score(self.new_held_out)?, threshold),
            far_old: alarm_rate(&model.score(self.old_held_out)?, threshold),
            detection_rate,
            promoted: false,
            threshold: f64::from(threshold),
            gate: None,
            fine_tune_s: None,
            fine_tune_steps: None,
            detection_by_run,
        })
    }
}

pub fn evaluate(options: &ContinualEvalOptions) -> Result<ContinualReport, ContinualEvalError> {
    let started = Instant::now();
    options.validate()?;
    let runs = TepRuns::read(&options.data)?;
    tch::set_num_threads(options.threads as i32);
    let columns = runs.columns;
    let window = options.window;
    let per_window = columns * window;

    // Step 1: what settled and shifted looks like in the normal runs, then every IDV run.
    let run_length = runs.train.len() / 3;
    let normal_hours: Vec<Vec<Vec<f64>>> = runs
        .train
        .chunks(run_length)
        .map(|run| hourly_means(run, &runs, rows_per_hour(&runs.calibration)))
        .collect();
    let change_limit = normal_hours
        .iter()
        .map(|h| largest_change(h))
        .fold(0.0, f64::max);
    let shift_limit = normal_hours
        .iter()
        .flatten()
        .flatten()
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let mut candidates = Vec::new();
    let mut settled_rows = BTreeMap::new();
    for (name, run) in &runs.tests {
        if let Some((settling, from_row)) = settling(name, run, &runs, change_limit) {
            settled_rows.insert(name.clone(), from_row);
            candidates.push(settling);
        }
    }
    let is_new_regime =
        |s: &Settling| s.settled_after_h.is_some() && s.shift_std.abs() > shift_limit;
    let chosen = match &options.regime_change {
        Some(name) => {
            let settling = candidates.iter().find(|s| &s.run == name).ok_or_else(|| {
                ContinualEvalError::NotARegimeChange {
                    run: name.clone(),
                    reason: "no such fault run in the data folder".into(),
                }
            })?;
            if !is_new_regime(settling) {
                return Err(ContinualEvalError::NotARegimeChange {
                    run: name.clone(),
                    reason: match settling.settled_after_h {
                        None => format!(
                            "it never settles: some hour-to-hour change of its hourly means \
                             stays above {change_limit:.2}, the largest in the normal runs"
                        ),
                        Some(_) => format!(
                            "it settles where it was: its largest shift ({}, {:.2} std) is \
                             within normal hours' {shift_limit:.2}",
                            settling.variable, settling.shift_std
                        ),
                    },
                });
            }
            settling.clone()
        }
        None => candidates
            .iter()
            .filter(|s| is_new_regime(s))
            .min_by(|a, b| {
                let hours = |s: &Settling| s.settled_after_h.unwrap_or(f64::INFINITY);
                hours(a).total_cmp(&hours(b))
            })
            .cloned()
            .ok_or_else(|| ContinualEvalError::NoRegimeChange {
                data: options.data.clone(),
                candidates: candidates
                    .iter()
                    .map(|s| format!("{} shift {:.1} std", s.run, s.shift_std))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
    };
    let run = runs
        .tests
        .iter()
        .find(|(name, _)| *name == chosen.run)
        .map(|(_, run)| run)
        .expect("candidates come from the test runs");
    let onset = run.header.fault_onset_row.unwrap_or(0) as usize;
    let settled_from = settled_rows[&chosen.run];
    let split =
        settled_from + ((run.rows() - settled_from) as f64 * options.stream_fraction) as usize;
    let settled_list: Vec<String> = candidates
        .iter()
        .filter(|s| is_new_regime(s))
        .map(|s| format!("{} ({:.1} h)", s.run, s.settled_after_h.unwrap_or_default()))
        .collect();
    let choice = if options.regime_change.is_some() {
        "named by the caller"
    } else {
        "the first to settle, which leaves the most settled rows"
    };
    let regime_change = RegimeChange {
        why: format!(
            "{} (IDV({}), {}): the controllers absorb it into a new steady operating point. \
             From {:.1} h after the onset no hour-to-hour change of the standardised hourly \
             means exceeds {:.2} (normal runs: up to {change_limit:.2}), and {} sits {:+.1} \
             standard deviations from normal (normal hours: within {shift_limit:.2}). Runs \
             that settle at a new point (hours after their onset): {}; {} is {choice}.",
            chosen.run,
            chosen.fault,
            chosen.disturbance.to_lowercase(),
            chosen.settled_after_h.unwrap_or_default(),
            chosen.largest_hourly_change.unwrap_or_default(),
            chosen.variable,
            chosen.shift_std,
            settled_list.join(", "),
            chosen.run,
        ),
        settling: chosen.clone(),
        onset_row: onset,
        settled_from_row: settled_from,
        streamed_rows: [settled_from, split],
        held_out_rows: [split, run.rows()],
        normal_hourly_change: change_limit,
        normal_shift_std: shift_limit,
    };

    // Step 2: the incumbent on the old regime, and its threshold.
    let config = tep_autoencoder_config(columns, window);
    let trained = Instant::now();
    let mut incumbent = ConvAutoencoder::new(
        config.clone(),
        fogmesh_models::default_device(),
        options.incumbent_train.seed,
    )?;
    let train_windows = runs.train_windows(window);
    incumbent.fit(&train_windows, &options.incumbent_train, &mut |_| {})?;
    let incumbent_train_s = trained.elapsed().as_secs_f64();
    let served = runs.windows(&runs.calibration.values, window);
    let calibration = incumbent.score(&served)?;
    let incumbent_threshold = quantile(&calibration, options.limit_quantile)?;
    let (weights, sha256) = incumbent.to_safetensors()?;
    let architecture = Architecture::ConvAutoencoder(config.clone());
    let manifest = Manifest {
        input: InputSpec {
            shape: vec![-1, columns as i64, window as i64],
            description: format!("{window} rows of the {columns} TEP variables, standardised"),
        },
        metrics: BTreeMap::from([("threshold".into(), f64::from(incumbent_threshold))]),
        weights_sha256: sha256,
        weights_bytes: weights.len() as u64,
        ..architecture.manifest("tep-autoencoder", "incumbent")
    };

    // Step 3: stream the old regime's rows, then the settled ones, and detect.
    let mut stream_rows = run.values[..onset * columns].to_vec();
    stream_rows.extend_from_slice(&run.values[settled_from * columns..split * columns]);
    let stream = runs.windows(&stream_rows, window);
    let stream_scores = incumbent.score(&stream)?;
    // The first window that holds a row of the new regime: the one ending at `onset`.
    let first_new = (onset + 1)
        .checked_sub(window)
        .filter(|first| *first as u64 > options.drift_min_values)
        .ok_or_else(|| ContinualEvalError::NotARegimeChange {
            run: chosen.run.clone(),
            reason: format!(
                "its onset at row {onset} leaves too few old-regime windows for the detector \
                 to learn the old level ({} needed)",
                options.drift_min_values
            ),
        })?;
    let mut detector = PageHinkley::new(
        options.drift_delta,
        options.drift_lambda,
        options.drift_min_values,
    )?;
    let mut false_drift_detections = 0;
    let mut detected = None;
    for (i, score) in stream_scores.iter().enumerate() {
        if detector
            .update(f64::from(score / incumbent_threshold))
            .is_some()
        {
            if i < first_new {
                false_drift_detections += 1;
            } else {
                detected = Some(i);
                break;
            }
        }
    }
    let streamed = stream_scores.len();
    let at = detected.ok_or_else(|| ContinualEvalError::NotDetected {
        run: chosen.run.clone(),
        delta: options.drift_delta,
        lambda: options.drift_lambda,
        windows: streamed,
    })?;
    let hours_per_row = run.header.sample_period_s / 3600.0;
    let drift_delay_windows = at + 1 - first_new;
    if at + options.collect >= streamed {
        return Err(ContinualEvalError::TooFewWindows {
            run: chosen.run.clone(),
            at,
            streamed,
            left: streamed - at - 1,
            needed: options.collect,
        });
    }

    // Step 4: the reservoir holds what was served before the detection; collect, split,
    // fine-tune, gate.
    let mut reservoir = Reservoir::new(options.reservoir, options.reservoir_seed)?;
    for w in served
        .chunks_exact(per_window)
        .chain(stream[..(at + 1) * per_window].chunks_exact(per_window))
    {
        reservoir.offer(ReplayItem {
            window: w.to_vec(),
            label: None,
        });
    }
    let collected = items(
        &stream[(at + 1) * per_window..(at + 1 + options.collect) * per_window],
        per_window,
    );
    // Where a set splits into (fine-tuning, gate): at least one window on each side
    // when there are two.
    let for_gate = |n: usize| {
        n - ((n as f64 * options.gate_fraction).round() as usize)
            .min(n.saturating_sub(1))
            .max(1)
            .min(n)
    };
    let (adapt, gate_new) = collected.split_at(for_gate(collected.len()));
    // Reservoir slots hold uniformly drawn windows in no particular order, so the last
    // slots are as random a pick as any.
    let (replay, gate_old) = reservoir.items().split_at(for_gate(reservoir.len()));

    let device = fogmesh_models::default_device();
    let naive_options = FineTuneOptions {
        replay_fraction: 0.0,
        ewc_lambda: 0.0,
        ..options.fine_tune.clone()
    };
    let naive = fine_tune(&manifest, &weights, adapt, &[], &naive_options, device)?;
    let continual = fine_tune(
        &manifest,
        &weights,
        adapt,
        replay,
        &options.fine_tune,
        device,
    )?;

    let validated = Instant::now();
    let old_before = loss_on(&manifest, &weights, gate_old, device)?;
    let new_before = loss_on(&manifest, &weights, gate_new, device)?;
    let judge = |candidate: &FineTuned| -> Result<GateReport, ModelError> {
        let manifest = Manifest {
            weights_sha256: candidate.sha256.clone(),
            ..manifest.clone()
        };
        Ok(options.gate.judge(
            old_before,
            loss_on(&manifest, &candidate.weights, gate_old, device)?,
            new_before,
            loss_on(&manifest, &candidate.weights, gate_new, device)?,
        ))
    };
    let continual_gate = judge(&continual)?;
    let validation_s = validated.elapsed().as_secs_f64();
    let naive_gate = judge(&naive)?;

    // Step 5: score what each policy serves.
    let new_held_out = runs.windows(&run.values[split * columns..], window);
    let old_held_out = runs
        .tests
        .iter()
        .find(|(name, _)| name == "normal-test")
        .map(|(_, r)| runs.windows(&r.values, window))
        .unwrap_or_else(|| runs.windows(&runs.calibration.values, window));
    let faults: Vec<(String, &Recording)> = runs
        .tests
        .iter()
        .filter(|(name, r)| *name != chosen.run && r.header.fault.is_some())
        .map(|(name, r)| (name.clone(), r))
        .collect();
    let scoring = Scoring {
        runs: &runs,
        window,
        new_held_out: &new_held_out,
        old_held_out: &old_held_out,
        faults: &faults,
    };
    let threshold_of = |tuned: &FineTuned| {
        tuned
            .metrics
            .get("threshold")
            .map_or(incumbent_threshold, |t| *t as f32)
    };
    let never = scoring.score("never update", &incumbent, incumbent_threshold)?;
    let mut naive_outcome = scoring.score(
        "naive fine-tuning",
        &load(&config, &naive)?,
        threshold_of(&naive),
    )?;
    naive_outcome.promoted = true;
    naive_outcome.gate = Some(naive_gate);
    naive_outcome.fine_tune_s = Some(naive.elapsed_s);
    naive_outcome.fine_tune_steps = Some(naive.steps);
    let promoted = continual_gate.promote;
    let mut continual_outcome = if promoted {
        scoring.score(
            "continual (fogmesh)",
            &load(&config, &continual)?,
            threshold_of(&continual),
        )?
    } else {
        // The gate kept the incumbent: this policy serves what "never update" serves.
        PolicyOutcome {
            policy: "continual (fogmesh)",
            ..never.clone()
        }
    };
    continual_outcome.promoted = promoted;
    continual_outcome.gate = Some(continual_gate);
    continual_outcome.fine_tune_s = Some(continual.elapsed_s);
    continual_outcome.fine_tune_steps = Some(continual.steps);

    let collection_h = options.collect as f64 * hours_per_row;
    Ok(ContinualReport {
        dataset: "tep",
        regime_change,
        candidates,
        policies: vec![never, naive_outcome, continual_outcome],
        drift_delay_windows,
        drift_delay_h: drift_delay_windows as f64 * hours_per_row,
        false_drift_detections,
        collected_windows: options.collect,
        collection_h,
        fine_tune_s: continual.elapsed_s,
        validation_s,
        drift_to_promotion_s: promoted
            .then_some(collection_h * 3600.0 + continual.elapsed_s + validation_s),
        incumbent_train_s,
        reservoir_seen: reservoir.seen(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_change_is_the_biggest_step_between_consecutive_hours() {
        let hours = vec![vec![0.0, 0.0], vec![3.0, 4.0], vec![3.0, 5.0]];
        assert_eq!(largest_change(&hours), 5.0);
        assert_eq!(largest_change(&hours[1..]), 1.0);
        assert_eq!(largest_change(&hours[2..]), 0.0);
    }
}
