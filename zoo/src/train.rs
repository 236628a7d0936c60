//! `fogmesh train --model KIND --data SET`: trains one model of the zoo on a plant data
//! set, evaluates it with the data set's standard metric, and stores the result as a
//! new version in the model store, where an expert can serve it (`model =
//! "name@version"` in a node config).
//!
//! Every run is seeded ([`TrainOptions::seed`]), stops early on a validation split
//! (`patience`), reports each epoch through the caller's progress callback (the CLI
//! draws a bar from it), and ends in one [`TrainingOutcome`]: the metric, the
//! published score to compare it with where one exists, the training summary, and the
//! stored version's id. Which model trains on which set:
//!
//! | `--model` | `--data` | metric |
//! |---|---|---|
//! | `autoencoder` | TEP recordings (`data/tep`) | mean fault detection rate at a q0.99 limit, and false alarms |
//! | `forecaster` | TEP recordings | forecast MSE on `normal-test` relative to persistence |
//! | `classifier` | TEP recordings | diagnosis accuracy over 13 classes |
//! | `language` | the project's operator notes | accuracy over 13 TEP classes on held-out notes |
//! | `multimodal` | TEP recordings + the project's operator notes | diagnosis accuracy of sensor window + note, next to each modality alone |
//! | `vision` | ELPV solar cells (`data/elpv`) | accuracy on a stratified held-out quarter (as `fogmesh eval elpv`) |

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use fogmesh_models::forecaster::{persistence_score, ForecasterConfig, TcnForecaster};
use fogmesh_models::notes::TEP_CLASSES;
use fogmesh_models::served::{encoder_sha256, Architecture, Classes};
use fogmesh_models::store::{ModelStore, StoreError};
use fogmesh_models::{
    quantile, ConvAutoencoder, EpochReport, ModelError, TrainOptions, TrainReport,
};
use serde::Serialize;

use crate::elpv_eval::{ElpvEvalError, ElpvEvalOptions};
use crate::fusion_eval::{FusionEvalError, FusionEvalOptions};
use crate::notes_eval::{NotesEvalError, NotesEvalOptions};
use crate::tep_eval::{tep_autoencoder_config, Diagnosis, TepEvalError, TepEvalOptions, TepRuns};

/// The models `fogmesh train` can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelChoice {
    Autoencoder,
    Forecaster,
    Classifier,
    Language,
    Multimodal,
    Vision,
}

impl ModelChoice {
    /// The store name a version gets unless the caller names it.
    pub fn default_name(self) -> &'static str {
        match self {
            ModelChoice::Autoencoder => "tep-autoencoder",
            ModelChoice::Forecaster => "tep-forecaster",
            ModelChoice::Classifier => "tep-diagnosis",
            ModelChoice::Language => "tep-notes",
            ModelChoice::Multimodal => "tep-fused-diagnosis",
            ModelChoice::Vision => "elpv-defects",
        }
    }

    /// The training options a run starts from before the caller's overrides.
    pub fn default_options(self) -> TrainOptions {
        let tep = TepEvalOptions::default();
        match self {
            ModelChoice::Autoencoder => tep.train,
            ModelChoice::Forecaster => TrainOptions {
                learning_rate: 2e-3,
                max_seconds: Some(60.0),
                ..tep.train
            },
            ModelChoice::Classifier => tep.classifier_train,
            ModelChoice::Language => NotesEvalOptions::default().train,
            ModelChoice::Multimodal => FusionEvalOptions::default().fusion_train,
            ModelChoice::Vision => ElpvEvalOptions::default().train,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub model: ModelChoice,
    pub data: PathBuf,
    pub store: PathBuf,
    /// Store name; [`ModelChoice::default_name`] when `None`.
    pub name: Option<String>,
    /// Store version; the next whole number after the stored ones when `None`.
    pub version: Option<String>,
    pub options: TrainOptions,
    /// The MiniLM folder, for models that read text.
    pub minilm: PathBuf,
    /// The operator notes, for models that read them.
    pub notes: PathBuf,
    /// libtorch intra-op threads for this process.
    pub threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Elpv(#[from] ElpvEvalError),
    #[error(transparent)]
    Fusion(#[from] FusionEvalError),
    #[error(transparent)]
    Notes(#[from] NotesEvalError),
    #[error(transparent)]
    Tep(#[from] TepEvalError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model store {}: {source}", store.display())]
    Store {
        store: PathBuf,
        #[source]
        source: StoreError,
    },
}

/// A published score on the same data set and metric, with its source.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    pub model: &'static str,
    pub score: f64,
    pub source: &'static str,
}

/// What `fogmesh train` prints: one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingOutcome {
    /// The stored version, `name@version`.
    pub model: String,
    pub kind: fogmesh_models::store::ModelKind,
    pub architecture: String,
    pub dataset: &'static str,
    /// The data set's standard metric and this model's score on it.
    pub metric: &'static str,
    pub score: f64,
    pub published: Option<Published>,
    /// Every number the evaluation produced, also kept in the manifest.
    pub metrics: BTreeMap<String, f64>,
    pub training: TrainReport,
    pub store: PathBuf,
    pub weights_sha256: String,
    pub seconds: f64,
}

/// The trained network's weights and how it did, before it is stored.
struct Trained {
    architecture: Architecture,
    weights: Vec<u8>,
    dataset: &'static str,
    metric: &'static str,
    published: Option<Published>,
    metrics: BTreeMap<String, f64>,
    training: TrainReport,
    input: String,
    data_summary: serde_json::Value,
}

/// Trains, evaluates and stores one model.
pub fn run(
    request: &TrainRequest,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<TrainingOutcome, TrainError> {
    let started = Instant::now();
    request.options.validate()?;
    if !(1..=256).contains(&request.threads) {
        return Err(ModelError::InvalidOption {
            field: "threads",
            value: request.threads.to_string(),
            reason: "must be between 1 and 256".into(),
        }
        .into());
    }
    tch::set_num_threads(request.threads as i32);
    let trained = match request.model {
        ModelChoice::Autoencoder => train_autoencoder(request, progress)?,
        ModelChoice::Forecaster => train_forecaster(request, progress)?,
        ModelChoice::Classifier => train_classifier(request, progress)?,
        ModelChoice::Language => train_language(request, progress)?,
        ModelChoice::Multimodal => train_multimodal(request, progress)?,
        ModelChoice::Vision => train_vision(request, progress)?,
    };
    let store = ModelStore::open(&request.store);
    let store_error = |source| TrainError::Store {
        store: request.store.clone(),
        source,
    };
    let name = request
        .name
        .clone()
        .unwrap_or_else(|| request.model.default_name().to_string());
    let version = match &request.version {
        Some(version) => version.clone(),
        None => store.next_version(&name, None).map_err(store_error)?,
    };
    let mut manifest = trained.architecture.manifest(&name, &version);
    manifest.input.description = trained.input;
    manifest.training = serde_json::json!({
        "data": trained.data_summary,
        "options": request.options,
        "report": trained.training,
    });
    manifest.metrics = trained.metrics.clone();
    let manifest = store
        .import(manifest, &trained.weights)
        .map_err(store_error)?;
    Ok(TrainingOutcome {
        model: manifest.id(),
        kind: manifest.kind,
        architecture: manifest.architecture.clone(),
        dataset: trained.dataset,
        metric: trained.metric,
        score: trained
            .metrics
            .get(trained.metric)
            .copied()
            .unwrap_or(f64::NAN),
        published: trained.published,
        metrics: trained.metrics,
        training: trained.training,
        store: request.store.clone(),
        weights_sha256: manifest.weights_sha256,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn tep_summary(runs: &TepRuns, window: usize) -> serde_json::Value {
    serde_json::json!({
        "set": "tep",
        "train": ["normal-train-1", "normal-train-2", "normal-train-3"],
        "calibration": "normal-calibration",
        "tests": runs.tests.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(),
        "columns": runs.columns,
        "window": window,
        "mean": runs.mean,
        "std": runs.std,
    })
}

/// Share of `alarmed` rows in `rows`.
fn alarm_rate(alarmed: &[bool]) -> Option<f64> {
    (!alarmed.is_empty())
        .then(|| alarmed.iter().filter(|a| **a).count() as f64 / alarmed.len() as f64)
}

/// A model's score of each window of a flat buffer.
type WindowScores<'a> = dyn Fn(&[f32]) -> Result<Vec<f32>, ModelError> + 'a;

/// Mean detection and false-alarm rates of per-window scores against `limit` over the
/// test runs; window `i` of a run ends at row `i + window - 1`.
fn detection_metrics(
    runs: &TepRuns,
    window: usize,
    limit: f32,
    score: &WindowScores<'_>,
) -> Result<BTreeMap<String, f64>, ModelError> {
    let (mut fdr, mut far) = (Vec::new(), Vec::new());
    for (_, run) in &runs.tests {
        let scores = score(&runs.windows(&run.values, window))?;
        let alarmed: Vec<bool> = scores.iter().map(|s| *s > limit).collect();
        // Window i ends at row i + window - 1; it is faulty once that row is.
        let split = match (run.header.fault, run.header.fault_onset_row) {
            (Some(_), Some(onset)) => (onset as usize + 1)
                .saturating_sub(window)
                .min(alarmed.len()),
            _ => alarmed.len(),
        };
        far.extend(alarm_rate(&alarmed[..split]));
        fdr.extend(alarm_rate(&alarmed[split..]));
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    Ok(BTreeMap::from([
        ("mean_fdr".to_string(), mean(&fdr)),
        ("mean_far".to_string(), mean(&far)),
        ("threshold".to_string(), f64::from(limit)),
    ]))
}

fn train_autoencoder(
    request: &TrainRequest,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<Trained, TrainError> {
    let runs = TepRuns::read(&request.data)?;
    let tep = TepEvalOptions::default();
    let window = tep.window;
    let config = tep_autoencoder_config(runs.columns, window);
    let mut model = ConvAutoencoder::new(
        config.clone(),
        fogmesh_models::default_device(),
        request.options.seed,
    )?;
    let training = model.fit(&runs.train_windows(window), &request.options, progress)?;
    let calibration = model.score(&runs.windows(&runs.calibration.values, window))?;
    let limit = quantile(&calibration, tep.limit_quantile)?;
    let metrics = detection_metrics(&runs, window, limit, &|w| model.score(w))?;
    let (weights, _) = model.to_safetensors()?;
    Ok(Trained {
        architecture: Architecture::ConvAutoencoder(config),
        weights,
        dataset: "tep",
        metric: "mean_fdr",
        published: None,
        metrics,
        training,
        input: format!(
            "{window} rows of the {} TEP variables, standardised with the training mean and std",
            runs.columns
        ),
        data_summary: tep_summary(&runs, window),
    })
}

fn train_forecaster(
    request: &TrainRequest,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<Trained, TrainError> {
    let runs = TepRuns::read(&request.data)?;
    let config = ForecasterConfig {
        channels: runs.columns as i64,
        ..ForecasterConfig::default()
    };
    let (context, horizon) = (config.context as usize, config.horizon as usize);
    let window = context + horizon;
    let mut model = TcnForecaster::new(
        config.clone(),
        fogmesh_models::default_device(),
        request.options.seed,
    )?;
    let training = model.fit(&runs.train_windows(window), &request.options, progress)?;
    let calibration = model.score(&runs.windows(&runs.calibration.values, window))?;
    let limit = quantile(&calibration, TepEvalOptions::default().limit_quantile)?;
    let mut metrics = detection_metrics(&runs, window, limit, &|w| model.score(w))?;
    let normal_test = runs
        .tests
        .iter()
        .find(|(name, _)| name == "normal-test")
        .map(|(_, run)| runs.windows(&run.values, window))
        .unwrap_or_else(|| runs.windows(&runs.calibration.values, window));
    let mse = mean_f32(&model.score(&normal_test)?);
    let naive = mean_f32(&persistence_score(
        &normal_test,
        runs.columns,
        context,
        horizon,
    )?);
    metrics.insert("forecast_mse".into(), mse);
    metrics.insert("persistence_mse".into(), naive);
    metrics.insert("mse_vs_persistence".into(), mse / naive);
    let (weights, _) = model.to_safetensors()?;
    Ok(Trained {
        architecture: Architecture::TcnForecaster(config),
        weights,
        dataset: "tep",
        metric: "mse_vs_persistence",
        published: None,
        metrics,
        training,
        input: format!(
            "{context} rows then the {horizon} rows to forecast, of the {} TEP variables, standardised",
            runs.columns
        ),
        data_summary: tep_summary(&runs, window),
    })
}

fn mean_f32(values: &[f32]) -> f64 {
    values.iter().map(|v| f64::from(*v)).sum::<f64>() / values.len().max(1) as f64
}

fn train_classifier(
    request: &TrainRequest,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<Trained, TrainError> {
    let runs = TepRuns::read(&request.data)?;
    let options = TepEvalOptions {
        classifier_train: request.options.clone(),
        ..TepEvalOptions::default()
    };
    let diagnosis = Diagnosis::train(
        &options,
        &runs.train,
        runs.columns,
        &runs.tests,
        &runs.mean,
        &runs.std,
        progress,
    )?;
    let training = diagnosis.training.clone();
    let (mut right, mut tested) = (0, 0);
    let mut metrics = BTreeMap::new();
    for (name, run) in &runs.tests {
        let (r, t) = diagnosis.test(run, runs.columns, &runs.mean, &runs.std)?;
        if t > 0 {
            metrics.insert(format!("accuracy_{name}"), r as f64 / t as f64);
        }
        right += r;
        tested += t;
    }
    metrics.insert("accuracy".into(), right as f64 / tested.max(1) as f64);
    let names = diagnosis.class_names();
    let config = *diagnosis.model.config();
    let (weights, _) = diagnosis.model.to_safetensors()?;
    Ok(Trained {
        architecture: Architecture::FaultClassifier {
            config,
            classes: Classes { names, normal: 0 },
        },
        weights,
        dataset: "tep",
        metric: "accuracy",
        published: None,
        metrics,
        training,
        input: format!(
            "{} rows of the {} TEP variables, standardised",
            config.window, runs.columns
        ),
        data_summary: tep_summary(&runs, options.classifier_window),
    })
}

/// Token ids a stored multimodal model takes per note: operator notes are a sentence or
/// two, well inside this.
const NOTE_TOKENS: i64 = 128;

fn train_multimodal(
    request: &TrainRequest,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<Trained, TrainError> {
    let options = FusionEvalOptions {
        tep: request.data.clone(),
        notes: request.notes.clone(),
        minilm: request.minilm.clone(),
        fusion_train: request.options.clone(),
        ..FusionEvalOptions::default()
    };
    let outcome = crate::fusion_eval::train(&options, progress)?;
    let report = &outcome.report;
    let metrics = BTreeMap::from([
        ("accuracy".to_string(), report.accuracy_fused),
        ("accuracy_sensors_only".to_string(), report.accuracy_sensors),
        ("accuracy_text_only".to_string(), report.accuracy_text),
    ]);
    let config = *outcome.model.config();
    let (weights, _) = outcome.model.to_safetensors()?;
    Ok(Trained {
        architecture: Architecture::Fusion {
            config,
            tokens: NOTE_TOKENS,
            classes: Classes {
                names: outcome.classes.clone(),
                normal: 0,
            },
            encoder_sha256: encoder_sha256(&request.minilm)?,
        },
        weights,
        dataset: "tep + tep-operator-notes",
        metric: "accuracy",
        published: None,
        metrics,
        training: outcome.training,
        input: format!(
            "{} rows of the {} TEP variables (standardised), then {NOTE_TOKENS} MiniLM token ids of the operator note (0 pads)",
            config.window, config.channels
        ),
        data_summary: serde_json::json!({
            "set": "tep + tep-operator-notes (fogmesh-made)",
            "notes": request.notes,
            "train_pairs": report.train_pairs,
            "test_pairs": report.test_pairs,
        }),
    })
}

fn train_language(
    request: &TrainRequest,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<Trained, TrainError> {
    let options = NotesEvalOptions {
        data: request.data.clone(),
        minilm: request.minilm.clone(),
        train: request.options.clone(),
        ..NotesEvalOptions::default()
    };
    let (report, classifier, training) = crate::notes_eval::train(&options, progress)?;
    let mut metrics = BTreeMap::from([
        ("accuracy".to_string(), report.accuracy),
        ("macro_f1".to_string(), report.macro_f1),
        (
            "nearest_centroid_accuracy".to_string(),
            report.baseline.accuracy,
        ),
    ]);
    for class in &report.per_class {
        metrics.insert(format!("accuracy_{}", class.class), class.accuracy);
    }
    let (weights, _) = classifier.to_safetensors()?;
    Ok(Trained {
        architecture: Architecture::NoteClassifier {
            config: *classifier.config(),
            tokens: NOTE_TOKENS,
            classes: Classes {
                names: TEP_CLASSES.iter().map(|c| c.to_string()).collect(),
                normal: 0,
            },
            encoder_sha256: encoder_sha256(&request.minilm)?,
        },
        weights,
        dataset: "tep-operator-notes",
        metric: "accuracy",
        published: None,
        metrics,
        training,
        input: format!(
            "{NOTE_TOKENS} MiniLM token ids of one operator note or alarm text (0 pads)"
        ),
        data_summary: serde_json::json!({
            "set": "tep-operator-notes (fogmesh-made)",
            "notes": request.data,
            "train_notes": report.train_notes,
            "test_notes": report.test_notes,
        }),
    })
}

/// The classes a stored defect CNN answers with; index 0 is the cell without defects.
const ELPV_CLASSES: [&str; 2] = ["functional", "defective"];

fn train_vision(
    request: &TrainRequest,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<Trained, TrainError> {
    let options = ElpvEvalOptions {
        data: request.data.clone(),
        train: request.options.clone(),
        model_seed: request.options.seed,
        threads: request.threads,
        ..ElpvEvalOptions::default()
    };
    let trained = crate::elpv_eval::train(&options, progress)?;
    let report = &trained.report;
    let metrics = BTreeMap::from([
        ("accuracy".to_string(), report.accuracy),
        ("f1".to_string(), report.f1),
        ("precision".to_string(), report.precision),
        ("recall".to_string(), report.recall),
        ("accuracy_mono".to_string(), report.mono.accuracy),
        ("accuracy_poly".to_string(), report.poly.accuracy),
        ("majority_accuracy".to_string(), report.majority_accuracy),
    ]);
    let config = *trained.model.config();
    let (weights, _) = trained.model.to_safetensors()?;
    Ok(Trained {
        architecture: Architecture::DefectCnn {
            config,
            classes: Classes {
                names: ELPV_CLASSES.iter().map(|c| c.to_string()).collect(),
                normal: 0,
            },
        },
        weights,
        dataset: "elpv",
        metric: "accuracy",
        published: Some(Published {
            model: crate::elpv_eval::PUBLISHED.model,
            score: crate::elpv_eval::PUBLISHED.accuracy,
            source: crate::elpv_eval::PUBLISHED.source,
        }),
        metrics,
        training: trained.training,
        input: format!(
            "one {}x{} electroluminescence cell image, grey levels scaled to 0-1, row by row (each image is standardised inside the network)",
            config.width, config.height
        ),
        data_summary: serde_json::json!({
            "set": "elpv",
            "data": request.data,
            "resolution": report.resolution,
            "train_images": report.train_images,
            "test_images": report.test_images,
            "test_fraction": options.test_fraction,
            "split_seed": options.split_seed,
        }),
    })
}
