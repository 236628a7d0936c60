//! `fogmesh eval tep`: fault detection on the Tennessee Eastman recordings, fogmesh's
//! convolutional autoencoder against the PCA T²/Q baseline, both fitted and limited on
//! the same normal data and scored on the same rows.
//!
//! - Fitted on the three `normal-train-*` runs; alarm limits are the 0.99 quantiles of
//!   each statistic on `normal-calibration` (so about 1 % false alarms by design).
//! - Scored per row on `normal-test` and every `idvNN` run: fault detection rate (FDR,
//!   alarmed rows after the fault's onset) and false alarm rate (FAR, alarmed rows
//!   before it, or in all of `normal-test`).
//! - PCA keeps the components explaining 90 % of the variance and alarms when T² or Q
//!   is over its limit. The autoencoder sees all 53 variables in windows of
//!   [`TepEvalOptions::window`] rows ending at the scored row (rows before the first
//!   full window count as normal).
//!
//! Diagnosis: a [`FaultClassifier`] learns which fault the plant is in from windows of
//! [`TepEvalOptions::classifier_window`] rows: normal operation from the training runs,
//! each fault from the first [`TepEvalOptions::classifier_split`] of its run after the
//! onset. It is tested on `normal-test` and on the rest of each fault run (later in
//! time than anything it saw), and the report gives the accuracy overall and per run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fogmesh_models::classifier::{ClassifierConfig, FaultClassifier};
use fogmesh_models::pca::Pca;
use fogmesh_models::{
    column_stats, quantile, AutoencoderConfig, ConvAutoencoder, ModelError, Recording, TrainOptions,
};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct TepEvalOptions {
    /// The folder `just setup` fills (`data/tep`).
    pub data: PathBuf,
    pub window: usize,
    pub explained: f64,
    pub limit_quantile: f64,
    pub train: TrainOptions,
    pub classifier_window: usize,
    pub classifier_split: f64,
    pub classifier_train: TrainOptions,
}

impl Default for TepEvalOptions {
    fn default() -> Self {
        TepEvalOptions {
            data: PathBuf::from("data/tep"),
            window: 10,
            explained: 0.9,
            limit_quantile: 0.99,
            train: TrainOptions {
                epochs: 30,
                batch_size: 64,
                learning_rate: 1e-3,
                validation_fraction: 0.1,
                patience: 4,
                seed: 7,
                max_seconds: Some(30.0),
            },
            classifier_window: 20,
            classifier_split: 0.6,
            classifier_train: TrainOptions {
                epochs: 40,
                batch_size: 64,
                learning_rate: 2e-3,
                validation_fraction: 0.1,
                patience: 5,
                seed: 11,
                max_seconds: Some(40.0),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TepEvalError {
    #[error("{}: {source} (run `just setup` to generate the recordings)", path.display())]
    Recording {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("{}: {} columns, the training runs have {expected}", path.display(), got)]
    Columns {
        path: PathBuf,
        expected: usize,
        got: usize,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Detection of one run by one method.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Detection {
    pub fdr: Option<f64>,
    pub far: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunDetection {
    pub run: String,
    pub fault: Option<u32>,
    pub pca: Detection,
    pub pca_t2: Detection,
    pub pca_q: Detection,
    pub fogmesh: Detection,
    /// Share of this run's test windows the classifier put in the right class.
    pub diagnosed: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TepReport {
    pub dataset: &'static str,
    pub pca_components: usize,
    pub runs: Vec<RunDetection>,
    /// Means over the fault runs (FDR) and over every run's normal rows (FAR).
    pub mean_fdr_pca: f64,
    pub mean_fdr_fogmesh: f64,
    pub mean_far_pca: f64,
    pub mean_far_fogmesh: f64,
    /// Fault classification accuracy over every test window (normal and faulty).
    pub classification_accuracy: f64,
    pub classes: usize,
    pub seconds: f64,
}

fn read(path: &Path) -> Result<Recording, TepEvalError> {
    Recording::read(path).map_err(|source| TepEvalError::Recording {
        path: path.to_path_buf(),
        source,
    })
}

/// Per-column mean and deviation of row-major `rows`, as f32 for the windows.
fn standardiser(rows: &[f32], columns: usize) -> (Vec<f32>, Vec<f32>) {
    let (mean, std) = column_stats(rows, columns);
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (f32s(mean), f32s(std))
}

/// Channel-major windows of `window` rows ending at each row from `window - 1` on.
fn windows(rows: &[f32], columns: usize, window: usize, mean: &[f32], std: &[f32]) -> Vec<f32> {
    let n = rows.len() / columns;
    let mut out = Vec::with_capacity(n.saturating_sub(window - 1) * columns * window);
    for end in window - 1..n {
        for c in 0..columns {
            out.extend(
                (end + 1 - window..=end).map(|r| (rows[r * columns + c] - mean[c]) / std[c]),
            );
        }
    }
    out
}

fn rate(alarmed: &[bool], rows: std::ops::Range<usize>) -> Option<f64> {
    let n = rows.len();
    (n > 0).then(|| alarmed[rows].iter().filter(|a| **a).count() as f64 / n as f64)
}

fn detection(alarmed: &[bool], onset: Option<usize>) -> Detection {
    match onset {
        Some(onset) => Detection {
            fdr: rate(alarmed, onset..alarmed.len()),
            far: rate(alarmed, 0..onset),
        },
        None => Detection {
            fdr: None,
            far: rate(alarmed, 0..alarmed.len()),
        },
    }
}

fn mean(values: impl Iterator<Item = Option<f64>>) -> f64 {
    let values: Vec<f64> = values.flatten().collect();
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// The TEP recordings as the evaluations and `fogmesh train` split them.
pub(crate) struct TepRuns {
    /// The three `normal-train-*` runs back to back (row-major).
    pub train: Vec<f32>,
    pub columns: usize,
    pub calibration: Recording,
    /// `normal-test` and every `idvNN` run, by name, sorted.
    pub tests: Vec<(String, Recording)>,
    /// Per-column mean and deviation of `train`.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl TepRuns {
    pub fn read(data: &Path) -> Result<TepRuns, TepEvalError> {
        let mut train = Vec::new();
        let mut columns = 0;
        for i in 1..=3 {
            let run = read(&data.join(format!("normal-train-{i}.fogrec")))?;
            columns = run.columns();
            train.extend_from_slice(&run.values);
        }
        let calibration = read(&data.join("normal-calibration.fogrec"))?;
        let mut names: Vec<String> = std::fs::read_dir(data)
            .map_err(|e| TepEvalError::Recording {
                path: data.to_path_buf(),
                source: ModelError::Io {
                    path: data.to_path_buf(),
                    source: e,
                },
            })?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| {
                (n.starts_with("idv") || n == "normal-test.fogrec") && n.ends_with(".fogrec")
            })
            .collect();
        names.sort();
        let mut tests = Vec::new();
        for name in names {
            let path = data.join(&name);
            let run = read(&path)?;
            if run.columns() != columns {
                return Err(TepEvalError::Columns {
                    path,
                    expected: columns,
                    got: run.columns(),
                });
            }
            tests.push((name.trim_end_matches(".fogrec").to_string(), run));
        }
        let (mean, std) = standardiser(&train, columns);
        Ok(TepRuns {
            train,
            columns,
            calibration,
            tests,
            mean,
            std,
        })
    }

    /// Standardised windows of `window` rows of each training run (none straddles two
    /// runs).
    pub fn train_windows(&self, window: usize) -> Vec<f32> {
        self.train
            .chunks(self.train.len() / 3)
            .flat_map(|run| self.windows(run, window))
            .collect()
    }

    /// Standardised windows of `window` rows ending at each row of `rows`.
    pub fn windows(&self, rows: &[f32], window: usize) -> Vec<f32> {
        windows(rows, self.columns, window, &self.mean, &self.std)
    }
}

/// The autoencoder both `fogmesh eval tep` and `fogmesh train` fit to TEP windows.
pub(crate) fn tep_autoencoder_config(columns: usize, window: usize) -> AutoencoderConfig {
    AutoencoderConfig {
        channels: columns as i64,
        window: window as i64,
        hidden: 64,
        bottleneck: 16,
        kernel: 3,
    }
}

pub fn evaluate(
    options: &TepEvalOptions,
    progress: &mut dyn FnMut(&RunDetection),
) -> Result<TepReport, TepEvalError> {
    let started = Instant::now();
    let runs_read = TepRuns::read(&options.data)?;
    let TepRuns {
        train,
        columns,
        calibration,
        ..
    } = &runs_read;
    let (train, columns) = (train.as_slice(), *columns);
    let window = options.window;

    let pca = Pca::fit(train, columns, options.explained)?;
    let calibration_scores = pca.score(&calibration.values)?;
    let t2: Vec<f32> = calibration_scores.iter().map(|s| s.t2 as f32).collect();
    let q: Vec<f32> = calibration_scores.iter().map(|s| s.q as f32).collect();
    let t2_limit = f64::from(quantile(&t2, options.limit_quantile)?);
    let q_limit = f64::from(quantile(&q, options.limit_quantile)?);

    let (mu, sd) = (&runs_read.mean, &runs_read.std);
    let mut model = ConvAutoencoder::new(
        tep_autoencoder_config(columns, window),
        fogmesh_models::default_device(),
        options.train.seed,
    )?;
    model.fit(
        &runs_read.train_windows(window),
        &options.train,
        &mut |_| {},
    )?;
    let calibration_errors = model.score(&runs_read.windows(&calibration.values, window))?;
    let ae_limit = quantile(&calibration_errors, options.limit_quantile)?;
    let recordings = &runs_read.tests;

    let diagnosis = Diagnosis::train(options, train, columns, recordings, mu, sd, &mut |_| {})?;
    let mut runs = Vec::new();
    let mut correct = 0usize;
    let mut tested = 0usize;
    for (name, run) in recordings {
        let onset = run.header.fault_onset_row.map(|r| r as usize);
        let scores = pca.score(&run.values)?;
        let by = |f: &dyn Fn(&fogmesh_models::pca::PcaScores) -> bool| -> Vec<bool> {
            scores.iter().map(f).collect()
        };
        let pca_t2 = by(&|s| s.t2 > t2_limit);
        let pca_q = by(&|s| s.q > q_limit);
        let pca_any: Vec<bool> = pca_t2.iter().zip(&pca_q).map(|(a, b)| *a || *b).collect();
        let errors = model.score(&runs_read.windows(&run.values, window))?;
        let mut ae = vec![false; window - 1];
        ae.extend(errors.iter().map(|e| *e > ae_limit));
        let (right, total) = diagnosis.test(run, columns, mu, sd)?;
        correct += right;
        tested += total;
        let result = RunDetection {
            run: name.clone(),
            fault: run.header.fault,
            pca: detection(&pca_any, onset),
            pca_t2: detection(&pca_t2, onset),
            pca_q: detection(&pca_q, onset),
            fogmesh: detection(&ae, onset),
            diagnosed: (total > 0).then(|| right as f64 / total as f64),
        };
        progress(&result);
        runs.push(result);
    }
    Ok(TepReport {
        dataset: "tep",
        pca_components: pca.components(),
        mean_fdr_pca: mean(runs.iter().map(|r| r.pca.fdr)),
        mean_fdr_fogmesh: mean(runs.iter().map(|r| r.fogmesh.fdr)),
        mean_far_pca: mean(runs.iter().map(|r| r.pca.far)),
        mean_far_fogmesh: mean(runs.iter().map(|r| r.fogmesh.far)),
        classification_accuracy: if tested > 0 {
            correct as f64 / tested as f64
        } else {
            0.0
        },
        classes: diagnosis.classes.len(),
        runs,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The fault classifier and the class of each fault.
pub(crate) struct Diagnosis {
    pub model: FaultClassifier,
    /// Fault number of each class; class 0 is normal operation (`None`).
    pub classes: Vec<Option<u32>>,
    pub training: fogmesh_models::TrainReport,
    window: usize,
    split: f64,
}

impl Diagnosis {
    fn class_of(&self, fault: Option<u32>) -> i64 {
        self.classes
            .iter()
            .position(|c| *c == fault)
            .map_or(0, |i| i as i64)
    }

    /// The first row of a fault run's test part: the rows after the onset split at
    /// `split`.
    fn test_from(&self, run: &Recording, onset: usize) -> usize {
        onset + ((run.rows() - onset) as f64 * self.split) as usize
    }

    pub fn train(
        options: &TepEvalOptions,
        train: &[f32],
        columns: usize,
        recordings: &[(String, Recording)],
        mu: &[f32],
        sd: &[f32],
        progress: &mut dyn FnMut(&fogmesh_models::EpochReport),
    ) -> Result<Diagnosis, TepEvalError> {
        let mut diagnosis = Diagnosis::untrained(options, columns, recordings)?;
        let (inputs, labels) = diagnosis.training_windows(train, columns, recordings, mu, sd);
        diagnosis.training =
            diagnosis
                .model
                .fit(&inputs, &labels, &options.classifier_train, progress)?;
        Ok(diagnosis)
    }

    /// A classifier with one class for normal operation and one per fault run, before
    /// any training: what a federation starts every site from.
    pub fn untrained(
        options: &TepEvalOptions,
        columns: usize,
        recordings: &[(String, Recording)],
    ) -> Result<Diagnosis, TepEvalError> {
        let window = options.classifier_window;
        let mut classes: Vec<Option<u32>> = vec![None];
        classes.extend(
            recordings
                .iter()
                .filter_map(|(_, r)| r.header.fault.map(Some)),
        );
        Ok(Diagnosis {
            model: FaultClassifier::new(
                ClassifierConfig {
                    channels: columns as i64,
                    window: window as i64,
                    hidden: 64,
                    classes: classes.len() as i64,
                },
                fogmesh_models::default_device(),
                options.classifier_train.seed,
            )?,
            classes,
            training: fogmesh_models::TrainReport::default(),
            window,
            split: options.classifier_split,
        })
    }

    /// The labelled training windows: every window of the normal training runs
    /// (class 0), and of each fault run the windows ending between the onset and the
    /// split.
    pub fn training_windows(
        &self,
        train: &[f32],
        columns: usize,
        recordings: &[(String, Recording)],
        mu: &[f32],
        sd: &[f32],
    ) -> (Vec<f32>, Vec<i64>) {
        let window = self.window;
        let mut inputs = Vec::new();
        let mut labels = Vec::new();
        for run in train.chunks(train.len() / 3) {
            let w = windows(run, columns, window, mu, sd);
            labels.extend(std::iter::repeat_n(0, w.len() / (columns * window)));
            inputs.extend(w);
        }
        for (_, run) in recordings {
            let (Some(fault), Some(onset)) = (run.header.fault, run.header.fault_onset_row) else {
                continue;
            };
            let onset = onset as usize;
            let end = self.test_from(run, onset);
            // Windows that end in [onset, end): the fault is on at their last row.
            let first = onset.saturating_sub(window - 1);
            let part = &run.values[first * columns..end * columns];
            let w = windows(part, columns, window, mu, sd);
            let class = self.class_of(Some(fault));
            labels.extend(std::iter::repeat_n(class, w.len() / (columns * window)));
            inputs.extend(w);
        }
        (inputs, labels)
    }

    /// `run`'s test windows and their class: all of a normal run, the part after the
    /// split of a fault run; `None` when the run is too short for one.
    pub fn test_windows(
        &self,
        run: &Recording,
        columns: usize,
        mu: &[f32],
        sd: &[f32],
    ) -> Option<(Vec<f32>, i64)> {
        let from = match run.header.fault_onset_row {
            Some(onset) if run.header.fault.is_some() => self
                .test_from(run, onset as usize)
                .saturating_sub(self.window - 1),
            _ => 0,
        };
        if run.rows() < from + self.window {
            return None;
        }
        let w = windows(&run.values[from * columns..], columns, self.window, mu, sd);
        Some((w, self.class_of(run.header.fault)))
    }

    /// (right, tested) over `run`'s test windows.
    pub fn test(
        &self,
        run: &Recording,
        columns: usize,
        mu: &[f32],
        sd: &[f32],
    ) -> Result<(usize, usize), TepEvalError> {
        let Some((w, truth)) = self.test_windows(run, columns, mu, sd) else {
            return Ok((0, 0));
        };
        let predicted = self.model.predict(&w)?;
        let right = predicted.iter().filter(|p| **p == truth).count();
        Ok((right, predicted.len()))
    }

    /// The class names: `normal`, then `idvNN` per fault.
    pub fn class_names(&self) -> Vec<String> {
        self.classes
            .iter()
            .map(|c| c.map_or_else(|| "normal".to_string(), |f| format!("idv{f:02}")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_split_at_the_onset() {
        let alarmed = [false, true, false, false, true, true, true, false];
        let d = detection(&alarmed, Some(4));
        assert_eq!((d.far, d.fdr), (Some(0.25), Some(0.75)));
        let normal = detection(&alarmed, None);
        assert_eq!((normal.far, normal.fdr), (Some(0.5), None));
    }

    #[test]
    fn windows_end_at_each_row_and_are_standardised() {
        // 4 rows of 2 columns: column 0 = row, column 1 = 10 * row.
        let rows: Vec<f32> = (0..4).flat_map(|r| [r as f32, 10.0 * r as f32]).collect();
        let w = windows(&rows, 2, 3, &[0.0, 0.0], &[1.0, 10.0]);
        // Ends at rows 2 and 3; channel-major.
        assert_eq!(
            w,
            vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
        );
    }
}

/// The TEP evaluation on the recordings `just setup` generates, against the PCA baseline on the same rows.
#[cfg(test)]
mod scenario_tests {
    use std::path::PathBuf;

    use super::{evaluate, TepEvalOptions};

    fn tep_data() -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/tep");
        assert!(
            dir.join("manifest.json").exists(),
            "{} has no TEP recordings: run `just setup` first",
            dir.display()
        );
        dir
    }

    #[test]
    fn tep_detection_is_reported_against_the_pca_baseline_on_the_same_rows() {
        let defaults = TepEvalOptions::default();
        let options = TepEvalOptions {
            data: tep_data(),
            // A shorter training budget than `fogmesh eval tep`: enough to tell faults apart.
            classifier_train: fogmesh_models::TrainOptions {
                max_seconds: Some(10.0),
                ..defaults.classifier_train.clone()
            },
            ..defaults
        };
        let mut seen = Vec::new();
        let report =
            evaluate(&options, &mut |r| seen.push(r.run.clone())).expect("the evaluation runs");
        assert!(seen.contains(&"normal-test".to_string()) && seen.contains(&"idv01".to_string()));
        let run = |name: &str| report.runs.iter().find(|r| r.run == name).unwrap();
        // Step faults every method in the literature detects.
        for fault in ["idv01", "idv04", "idv07"] {
            let r = run(fault);
            assert!(
                r.pca.fdr.unwrap() > 0.95 && r.fogmesh.fdr.unwrap() > 0.95,
                "{r:?}"
            );
        }
        // Limits at the 0.99 quantile of calibration data: few alarms on unseen normal data.
        assert!(run("normal-test").fogmesh.far.unwrap() < 0.05);
        assert!(run("normal-test").pca.far.unwrap() < 0.05);
        assert!(report.pca_components >= 1);
        // Diagnosis: 13 classes, of which the largest (normal) is a fifth of the test
        // windows; step faults are told apart nearly always.
        assert_eq!(report.classes, 13);
        assert!(
            report.classification_accuracy > 0.5,
            "{}",
            report.classification_accuracy
        );
        for fault in ["idv01", "idv04", "idv07"] {
            assert!(run(fault).diagnosed.unwrap() > 0.8, "{:?}", run(fault));
        }
    }
}
