//! `fogmesh eval multimodal`: does fusing an asset's sensor window with the operator's
//! note about it diagnose the Tennessee Eastman plant better than either alone?
//!
//! Each window of a TEP run is paired with an operator note of the same class (the
//! same fault episode), drawn at random (seeded) from the project-made notes set: the
//! training windows from the notes' training split, the test windows from its test
//! split, so no test note was seen in training. Windows and splits are the diagnosis
//! protocol of `fogmesh eval tep` (fault runs cut at 60 % of their faulty part).
//!
//! Three models are scored on the same test pairs:
//! - sensors only: the [`FaultClassifier`] of the diagnosis protocol;
//! - text only: the [`NoteClassifier`] over the notes' MiniLM embeddings;
//! - fused: the [`FusionClassifier`], trained on the training pairs.

use std::path::PathBuf;
use std::time::Instant;

use fogmesh_models::fusion::{FusionClassifier, FusionConfig};
use fogmesh_models::minilm::MiniLm;
use fogmesh_models::notes::{NoteClassifier, NoteClassifierConfig, NotesError, OperatorNotes};
use fogmesh_models::{ModelError, SplitMix64, TrainOptions};
use serde::Serialize;
use tch::Tensor;

use crate::tep_eval::{Diagnosis, TepEvalError, TepEvalOptions, TepRuns};

#[derive(Debug, Clone)]
pub struct FusionEvalOptions {
    pub tep: PathBuf,
    pub notes: PathBuf,
    pub minilm: PathBuf,
    pub notes_test_fraction: f64,
    pub seed: u64,
    /// The diagnosis protocol and the sensor-only classifier's training.
    pub diagnosis: TepEvalOptions,
    pub text_train: TrainOptions,
    pub fusion_train: TrainOptions,
    pub hidden: i64,
    pub modality_dropout: f64,
}

impl Default for FusionEvalOptions {
    fn default() -> Self {
        let diagnosis = TepEvalOptions::default();
        FusionEvalOptions {
            tep: PathBuf::from("data/tep"),
            notes: PathBuf::from("models/data/tep_operator_notes.tsv"),
            minilm: PathBuf::from("data/minilm"),
            notes_test_fraction: 0.3,
            seed: 17,
            text_train: TrainOptions {
                epochs: 200,
                batch_size: 32,
                learning_rate: 5e-3,
                validation_fraction: 0.15,
                patience: 20,
                seed: 17,
                max_seconds: Some(20.0),
            },
            fusion_train: TrainOptions {
                seed: 19,
                ..diagnosis.classifier_train.clone()
            },
            diagnosis,
            hidden: 64,
            modality_dropout: 0.3,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FusionEvalError {
    #[error(transparent)]
    Tep(#[from] TepEvalError),
    #[error(transparent)]
    Notes(#[from] NotesError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{}: the notes set has no note of class {class} for the TEP runs' windows", path.display())]
    MissingClass { path: PathBuf, class: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct FusionReport {
    pub dataset: &'static str,
    pub classes: usize,
    pub train_pairs: usize,
    pub test_pairs: usize,
    pub accuracy_sensors: f64,
    pub accuracy_text: f64,
    pub accuracy_fused: f64,
    pub fused_beats_each: bool,
    /// Per class: (sensors, text, fused) accuracy on its test pairs.
    pub per_class: Vec<(String, f64, f64, f64)>,
    pub seconds: f64,
}

fn accuracy(predicted: &[i64], truth: &[i64]) -> f64 {
    let right = predicted.iter().zip(truth).filter(|(p, t)| p == t).count();
    right as f64 / truth.len().max(1) as f64
}

/// Embeddings `[N, 384]` of one random note per label, drawn from `pool` (note
/// indices by class).
fn paired_notes(
    labels: &[i64],
    pool: &[Vec<usize>],
    embeddings: &Tensor,
    rng: &mut SplitMix64,
) -> Result<(Tensor, Vec<i64>), ModelError> {
    let picks: Vec<i64> = labels
        .iter()
        .map(|&l| {
            let members = &pool[l as usize];
            members[(rng.next_u64() % members.len() as u64) as usize] as i64
        })
        .collect();
    let index = Tensor::f_from_slice(&picks)?;
    Ok((embeddings.f_index_select(0, &index)?, picks))
}

pub fn evaluate(options: &FusionEvalOptions) -> Result<FusionReport, FusionEvalError> {
    Ok(train(options, &mut |_| {})?.report)
}

/// The trained fused expert, its class names, and how it and the single modalities
/// did.
pub struct FusionOutcome {
    pub model: FusionClassifier,
    pub classes: Vec<String>,
    pub report: FusionReport,
    pub training: fogmesh_models::TrainReport,
}

/// Trains the three models (`progress` follows the fused one's epochs) and scores them.
pub fn train(
    options: &FusionEvalOptions,
    progress: &mut dyn FnMut(&fogmesh_models::EpochReport),
) -> Result<FusionOutcome, FusionEvalError> {
    let started = Instant::now();
    let runs = TepRuns::read(&options.tep)?;
    let notes = OperatorNotes::read(&options.notes)?;
    let device = fogmesh_models::default_device();
    let encoder = MiniLm::load(&options.minilm, device)?;
    let embeddings = encoder
        .embed(&notes.texts())?
        .f_to_device(tch::Device::Cpu)?;

    let diagnosis = Diagnosis::train(
        &options.diagnosis,
        &runs.train,
        runs.columns,
        &runs.tests,
        &runs.mean,
        &runs.std,
        &mut |_| {},
    )?;
    let class_names = diagnosis.class_names();
    // TEP class index → notes label (both name the classes the same way).
    let note_label = |name: &str| {
        fogmesh_models::notes::TEP_CLASSES
            .iter()
            .position(|c| *c == name)
            .ok_or_else(|| FusionEvalError::MissingClass {
                path: options.notes.clone(),
                class: name.to_string(),
            })
    };
    let to_note: Vec<usize> = class_names
        .iter()
        .map(|n| note_label(n))
        .collect::<Result<_, _>>()?;

    let (train_ids, test_ids) =
        notes.stratified_split(options.notes_test_fraction, options.seed)?;
    let by_class = |ids: &[usize]| -> Result<Vec<Vec<usize>>, FusionEvalError> {
        let mut pool = vec![Vec::new(); class_names.len()];
        for &i in ids {
            if let Some(c) = to_note.iter().position(|&l| l == notes.notes[i].label) {
                pool[c].push(i);
            }
        }
        match pool.iter().position(Vec::is_empty) {
            Some(c) => Err(FusionEvalError::MissingClass {
                path: options.notes.clone(),
                class: class_names[c].clone(),
            }),
            None => Ok(pool),
        }
    };
    let train_pool = by_class(&train_ids)?;
    let test_pool = by_class(&test_ids)?;

    // Text only: the note classifier on the training notes, in TEP class indices.
    let text_labels: Vec<i64> = train_ids
        .iter()
        .map(|&i| {
            to_note
                .iter()
                .position(|&l| l == notes.notes[i].label)
                .map_or(-1, |c| c as i64)
        })
        .collect();
    let keep: Vec<i64> = (0..train_ids.len() as i64)
        .filter(|&k| text_labels[k as usize] >= 0)
        .collect();
    let train_rows = Tensor::f_from_slice(
        &keep
            .iter()
            .map(|&k| train_ids[k as usize] as i64)
            .collect::<Vec<_>>(),
    )?;
    let mut text = NoteClassifier::new(
        NoteClassifierConfig {
            input: MiniLm::dim(),
            hidden: 0,
            classes: class_names.len() as i64,
        },
        device,
        options.seed,
    )?;
    text.fit(
        &embeddings.f_index_select(0, &train_rows)?,
        &keep
            .iter()
            .map(|&k| text_labels[k as usize])
            .collect::<Vec<_>>(),
        &options.text_train,
        &mut |_| {},
    )?;

    // Fused: training windows paired with training notes of their class.
    let mut rng = SplitMix64::new(options.seed);
    let (train_windows, train_labels) = diagnosis.training_windows(
        &runs.train,
        runs.columns,
        &runs.tests,
        &runs.mean,
        &runs.std,
    );
    let (train_text, _) = paired_notes(&train_labels, &train_pool, &embeddings, &mut rng)?;
    let config = diagnosis.model.config();
    let mut fused = FusionClassifier::new(
        FusionConfig {
            channels: config.channels,
            window: config.window,
            text: MiniLm::dim(),
            hidden: options.hidden,
            classes: class_names.len() as i64,
            modality_dropout: options.modality_dropout,
        },
        device,
        options.fusion_train.seed,
    )?;
    let training = fused.fit(
        &train_windows,
        &train_text,
        &train_labels,
        &options.fusion_train,
        progress,
    )?;

    let (mut test_windows, mut truth) = (Vec::new(), Vec::new());
    for (_, run) in &runs.tests {
        if let Some((w, class)) = diagnosis.test_windows(run, runs.columns, &runs.mean, &runs.std) {
            let n = w.len() / (config.channels * config.window) as usize;
            truth.extend(std::iter::repeat_n(class, n));
            test_windows.extend(w);
        }
    }
    let (test_text, _) = paired_notes(&truth, &test_pool, &embeddings, &mut rng)?;
    let by_sensors = diagnosis.model.predict(&test_windows)?;
    let by_text = text.predict(&test_text)?;
    let by_both = fused.predict(&test_windows, &test_text)?;
    let per_class = (0..class_names.len())
        .map(|c| {
            let rows: Vec<usize> = (0..truth.len()).filter(|&i| truth[i] == c as i64).collect();
            let acc = |p: &[i64]| {
                rows.iter().filter(|&&i| p[i] == c as i64).count() as f64 / rows.len().max(1) as f64
            };
            (
                class_names[c].clone(),
                acc(&by_sensors),
                acc(&by_text),
                acc(&by_both),
            )
        })
        .collect();
    let (sensors, text, both) = (
        accuracy(&by_sensors, &truth),
        accuracy(&by_text, &truth),
        accuracy(&by_both, &truth),
    );
    let report = FusionReport {
        dataset: "tep + tep-operator-notes (fogmesh-made)",
        classes: class_names.len(),
        train_pairs: train_labels.len(),
        test_pairs: truth.len(),
        accuracy_sensors: sensors,
        accuracy_text: text,
        accuracy_fused: both,
        fused_beats_each: both > sensors && both > text,
        per_class,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(FusionOutcome {
        model: fused,
        classes: class_names,
        report,
        training,
    })
}
