//! `fogmesh eval notes`: the language expert alone, on the project's labelled Tennessee
//! Eastman operator notes: which of the 13 TEP classes (normal and 12 faults) a note was
//! written for, from its text only.
//!
//! - The notes (`models/data/tep_operator_notes.tsv`) are split per class, seeded:
//!   [`NotesEvalOptions::test_fraction`] (30 %) of each class is the test set.
//! - Every note is embedded once by the frozen all-MiniLM-L6-v2 encoder
//!   ([`MiniLm`], from `data/minilm`); a [`NoteClassifier`] learns the classes from the
//!   training embeddings and is scored on the test embeddings.
//! - The baseline is nearest centroid on the same embeddings (cosine similarity to each
//!   class's mean training embedding): no training loop, no keywords.
//!
//! About a third of each class's notes describe symptoms that related faults share, on
//! purpose, so text alone cannot be perfect; that is what fusing it with sensor windows
//! is for. The set is fogmesh's own, so no published score exists to compare with.

use std::path::PathBuf;
use std::time::Instant;

use fogmesh_models::minilm::MiniLm;
use fogmesh_models::notes::{
    NoteClassifier, NoteClassifierConfig, NotesError, OperatorNotes, TEP_CLASSES,
};
use fogmesh_models::{ModelError, TrainOptions};
use serde::Serialize;
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct NotesEvalOptions {
    /// The labelled notes (`models/data/tep_operator_notes.tsv`).
    pub data: PathBuf,
    /// The MiniLM folder `just setup` exports (`data/minilm`).
    pub minilm: PathBuf,
    pub test_fraction: f64,
    pub split_seed: u64,
    /// Hidden units of the classifier head; 0 for a linear softmax.
    pub hidden: i64,
    pub model_seed: u64,
    pub train: TrainOptions,
}

impl Default for NotesEvalOptions {
    fn default() -> Self {
        NotesEvalOptions {
            data: PathBuf::from("models/data/tep_operator_notes.tsv"),
            minilm: PathBuf::from("data/minilm"),
            test_fraction: 0.3,
            split_seed: 7,
            hidden: 0,
            model_seed: 7,
            train: TrainOptions {
                epochs: 300,
                batch_size: 32,
                learning_rate: 1e-2,
                validation_fraction: 0.15,
                patience: 30,
                seed: 7,
                max_seconds: Some(60.0),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotesEvalError {
    #[error(transparent)]
    Notes(#[from] NotesError),
    #[error("loading the MiniLM encoder from {}: {source}", .path.display())]
    Encoder {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// One class on the test notes.
#[derive(Debug, Clone, Serialize)]
pub struct ClassScore {
    pub class: &'static str,
    pub test_notes: usize,
    /// Share of this class's test notes put in this class (its recall).
    pub accuracy: f64,
    pub f1: f64,
}

/// Accuracy and macro F1 of one method on the test notes.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub model: String,
    pub accuracy: f64,
    pub macro_f1: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NotesReport {
    pub dataset: &'static str,
    pub model: String,
    pub classes: usize,
    pub train_notes: usize,
    pub test_notes: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Accuracy of always guessing one class of a balanced set.
    pub chance: f64,
    pub per_class: Vec<ClassScore>,
    pub baseline: Scores,
    pub epochs_run: usize,
    /// Notes embedded per second by the MiniLM encoder (all notes, one batch call).
    pub embed_notes_per_s: f64,
    pub seconds: f64,
    /// Always null: no published score exists for a project-made set.
    pub published: Option<f64>,
    pub note: &'static str,
}

/// Per-class scores and (accuracy, macro F1) of `predicted` against `truth`.
fn score(predicted: &[i64], truth: &[i64]) -> (Vec<ClassScore>, f64, f64) {
    let right = predicted.iter().zip(truth).filter(|(p, t)| p == t).count();
    let accuracy = right as f64 / truth.len().max(1) as f64;
    let mut per_class = Vec::new();
    for (class, name) in TEP_CLASSES.iter().enumerate() {
        let class = class as i64;
        let count = |f: &dyn Fn(i64, i64) -> bool| {
            predicted
                .iter()
                .zip(truth)
                .filter(|(p, t)| f(**p, **t))
                .count() as f64
        };
        let true_positives = count(&|p, t| p == class && t == class);
        let predicted_here = count(&|p, _| p == class);
        let actual = count(&|_, t| t == class);
        if actual == 0.0 {
            continue;
        }
        let recall = true_positives / actual;
        let precision = if predicted_here > 0.0 {
            true_positives / predicted_here
        } else {
            0.0
        };
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        per_class.push(ClassScore {
            class: name,
            test_notes: actual as usize,
            accuracy: recall,
            f1,
        });
    }
    let macro_f1 = per_class.iter().map(|c| c.f1).sum::<f64>() / per_class.len().max(1) as f64;
    (per_class, accuracy, macro_f1)
}

/// Nearest centroid by cosine similarity: each test embedding takes the class whose
/// normalised mean training embedding is closest.
fn nearest_centroid(
    train: &Tensor,
    train_labels: &[i64],
    test: &Tensor,
) -> Result<Vec<i64>, ModelError> {
    let device = train.device();
    let mut centroids = Vec::with_capacity(TEP_CLASSES.len());
    for class in 0..TEP_CLASSES.len() as i64 {
        let members: Vec<i64> = (0..train_labels.len() as i64)
            .filter(|&i| train_labels[i as usize] == class)
            .collect();
        let centroid = if members.is_empty() {
            // A class with no training note can never be chosen (similarity -inf).
            Tensor::f_full([MiniLm::dim()], f64::NAN, (Kind::Float, device))?
        } else {
            let index = Tensor::f_from_slice(&members)?.f_to_device(device)?;
            train
                .f_index_select(0, &index)?
                .f_mean_dim([0i64].as_slice(), false, Kind::Float)?
        };
        centroids.push(centroid);
    }
    let centroids = Tensor::f_stack(&centroids, 0)?;
    let norms = centroids
        .f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?
        .f_clamp_min(1e-12)?;
    let similarity = test
        .f_matmul(&centroids.f_div(&norms)?.f_transpose(0, 1)?)?
        .f_nan_to_num(f64::NEG_INFINITY, None, None)?;
    Ok(Vec::<i64>::try_from(
        &similarity
            .f_argmax(1, false)?
            .f_to_device(tch::Device::Cpu)?,
    )?)
}

pub fn evaluate(options: &NotesEvalOptions) -> Result<NotesReport, NotesEvalError> {
    Ok(train(options, &mut |_| {})?.0)
}

/// Trains the note classifier (`progress` follows its epochs) and scores it; also
/// returns the classifier and its training summary, for `fogmesh train`.
pub fn train(
    options: &NotesEvalOptions,
    progress: &mut dyn FnMut(&fogmesh_models::EpochReport),
) -> Result<(NotesReport, NoteClassifier, fogmesh_models::TrainReport), NotesEvalError> {
    let started = Instant::now();
    let notes = OperatorNotes::read(&options.data)?;
    let (train, test) = notes.stratified_split(options.test_fraction, options.split_seed)?;
    let encoder =
        MiniLm::load(&options.minilm, fogmesh_models::default_device()).map_err(|source| {
            NotesEvalError::Encoder {
                path: options.minilm.clone(),
                source,
            }
        })?;

    let embed_started = Instant::now();
    let embeddings = encoder.embed(&notes.texts())?;
    let embed_seconds = embed_started.elapsed().as_secs_f64();
    let labels = notes.labels();
    let pick = |indices: &[usize]| -> Result<(Tensor, Vec<i64>), ModelError> {
        let rows: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let index = Tensor::f_from_slice(&rows)?.f_to_device(embeddings.device())?;
        Ok((
            embeddings.f_index_select(0, &index)?,
            indices.iter().map(|&i| labels[i]).collect(),
        ))
    };
    let (train_x, train_y) = pick(&train)?;
    let (test_x, test_y) = pick(&test)?;

    let config = NoteClassifierConfig {
        input: MiniLm::dim(),
        hidden: options.hidden,
        classes: TEP_CLASSES.len() as i64,
    };
    let mut classifier =
        NoteClassifier::new(config, fogmesh_models::default_device(), options.model_seed)?;
    let report = classifier.fit(&train_x, &train_y, &options.train, progress)?;
    let (per_class, accuracy, macro_f1) = score(&classifier.predict(&test_x)?, &test_y);
    let (_, baseline_accuracy, baseline_f1) =
        score(&nearest_centroid(&train_x, &train_y, &test_x)?, &test_y);

    let head = if options.hidden > 0 {
        format!("a {}-unit ReLU layer and a softmax head", options.hidden)
    } else {
        "a linear softmax head".to_string()
    };
    let notes_report = NotesReport {
        dataset: "tep-operator-notes (fogmesh-made)",
        model: format!("all-MiniLM-L6-v2 embeddings (frozen, fogmesh tch) + {head}"),
        classes: TEP_CLASSES.len(),
        train_notes: train.len(),
        test_notes: test.len(),
        accuracy,
        macro_f1,
        chance: 1.0 / TEP_CLASSES.len() as f64,
        per_class,
        baseline: Scores {
            model: "nearest centroid (cosine) on the same embeddings".into(),
            accuracy: baseline_accuracy,
            macro_f1: baseline_f1,
        },
        epochs_run: report.epochs_run,
        embed_notes_per_s: notes.len() as f64 / embed_seconds.max(f64::EPSILON),
        seconds: started.elapsed().as_secs_f64(),
        published: None,
        note: "no published score exists: the notes are a set the fogmesh project wrote itself (models/data/README.md)",
    };
    Ok((notes_report, classifier, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_count_recall_precision_and_macro_f1() {
        // Class 0: 2 of 2 right; class 1: 1 of 2 right, one note taken for class 0.
        let (per_class, accuracy, macro_f1) = score(&[0, 0, 1, 0], &[0, 0, 1, 1]);
        assert_eq!(accuracy, 0.75);
        assert_eq!(per_class.len(), 2);
        assert_eq!((per_class[0].class, per_class[0].accuracy), ("normal", 1.0));
        assert_eq!((per_class[1].class, per_class[1].accuracy), ("idv01", 0.5));
        // Class 0: precision 2/3, recall 1 -> F1 0.8; class 1: precision 1, recall 0.5.
        assert!((per_class[0].f1 - 0.8).abs() < 1e-12);
        assert!((per_class[1].f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((macro_f1 - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn nearest_centroid_picks_the_closest_class_and_never_an_unseen_one() {
        let dim = MiniLm::dim() as usize;
        let axis = |k: usize, scale: f32| {
            let mut v = vec![0.0f32; dim];
            v[k] = scale;
            v
        };
        let train: Vec<f32> = [axis(0, 1.0), axis(0, 2.0), axis(1, 1.0)].concat();
        let train = Tensor::from_slice(&train).view([3, dim as i64]);
        let test: Vec<f32> = [axis(1, 0.5), axis(0, 3.0), axis(2, 1.0)].concat();
        let test = Tensor::from_slice(&test).view([3, dim as i64]);
        let predicted = nearest_centroid(&train, &[4, 4, 9], &test).unwrap();
        assert_eq!(predicted[..2], [9, 4]);
        assert!([4, 9].contains(&predicted[2]), "{predicted:?}");
    }
}
