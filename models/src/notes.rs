//! Operator notes as evidence of a fault: the project's labelled Tennessee Eastman notes
//! (`models/data/tep_operator_notes.tsv`, see `models/data/README.md`), a seeded
//! stratified train/test split of them, and [`NoteClassifier`], a softmax head over
//! frozen [`crate::minilm::MiniLm`] sentence embeddings that says which TEP class a note
//! was written for.
//!
//! The classes are [`TEP_CLASSES`], named like the recordings
//! `scripts/make_tep_recordings.py` writes (`normal-*` runs are `normal`, `idv01.fogrec`
//! is `idv01`), so a note's class and a sensor window's run line up when the two
//! modalities are fused.
//!
//! The head is linear (`hidden = 0`) or has one ReLU hidden layer, trained with
//! cross-entropy through the crate's shared loop (split, early stopping, time cap). The
//! encoder stays frozen: a few hundred notes are far too few to fine-tune 22 M
//! parameters, and frozen embeddings can be computed once and reused.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, TchError, Tensor};

use crate::error::ModelError;
use crate::network::{self, Network};
use crate::rng::SplitMix64;
use crate::training::{self, EpochReport, TrainOptions, TrainReport};

/// The Tennessee Eastman classes fogmesh simulates: normal operation, then the faults in
/// IDV order. A class's index is its label everywhere (notes, classifiers, reports).
pub const TEP_CLASSES: [&str; 13] = [
    "normal", "idv01", "idv02", "idv04", "idv05", "idv06", "idv07", "idv08", "idv10", "idv11",
    "idv12", "idv13", "idv14",
];

/// The header line every notes file has after its `#` comments.
const HEADER: &str = "label\tnote\tsource";

/// A notes file that cannot be read, or a line of it that is not a note.
#[derive(Debug, thiserror::Error)]
pub enum NotesError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `line` counts from 1, comments and blank lines included, as an editor shows it.
    #[error("{}:{line}: {reason}", .path.display())]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: no notes after the header", .path.display())]
    Empty { path: PathBuf },
}

/// One labelled note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorNote {
    /// Index into [`TEP_CLASSES`].
    pub label: usize,
    pub text: String,
    /// Where the note comes from (`fogmesh-made` for the project's own set).
    pub source: String,
    /// Its line in the file, from 1.
    pub line: usize,
}

impl OperatorNote {
    pub fn class(&self) -> &'static str {
        TEP_CLASSES[self.label]
    }
}

/// A notes file's notes, in file order.
#[derive(Debug, Clone)]
pub struct OperatorNotes {
    pub path: PathBuf,
    pub notes: Vec<OperatorNote>,
}

impl OperatorNotes {
    /// Reads a notes file (UTF-8, tab-separated, `#` comments, the header
    /// `label<TAB>note<TAB>source`). Errors name the file and line: a wrong column count,
    /// a label outside [`TEP_CLASSES`], an empty note or source, text that is not UTF-8.
    pub fn read(path: &Path) -> Result<Self, NotesError> {
        let bytes = std::fs::read(path).map_err(|source| NotesError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// [`Self::read`] on bytes already in memory; `path` only names them in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, NotesError> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let error = |line: usize, reason: String| NotesError::Line {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let mut header_seen = false;
        let mut notes = Vec::new();
        for (index, raw) in bytes.split(|b| *b == b'\n').enumerate() {
            let line = index + 1;
            let text =
                std::str::from_utf8(raw).map_err(|err| error(line, format!("not UTF-8: {err}")))?;
            let text = text.strip_suffix('\r').unwrap_or(text);
            if text.trim().is_empty() || text.starts_with('#') {
                continue;
            }
            if !header_seen {
                if text != HEADER {
                    return Err(error(
                        line,
                        format!("expected the header {HEADER:?}, found {text:?}"),
                    ));
                }
                header_seen = true;
                continue;
            }
            let columns: Vec<&str> = text.split('\t').collect();
            let [label, note, source] = columns.as_slice() else {
                return Err(error(
                    line,
                    format!(
                        "expected 3 tab-separated columns (label, note, source), found {}",
                        columns.len()
                    ),
                ));
            };
            let label = TEP_CLASSES
                .iter()
                .position(|class| class == label)
                .ok_or_else(|| {
                    error(
                        line,
                        format!(
                            "unknown label {label:?}; the labels are {}",
                            TEP_CLASSES.join(", ")
                        ),
                    )
                })?;
            let note = note.trim();
            if note.is_empty() {
                return Err(error(line, "empty note".into()));
            }
            let source = source.trim();
            if source.is_empty() {
                return Err(error(line, "empty source".into()));
            }
            notes.push(OperatorNote {
                label,
                text: note.to_string(),
                source: source.to_string(),
                line,
            });
        }
        if notes.is_empty() {
            return Err(NotesError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(OperatorNotes {
            path: path.to_path_buf(),
            notes,
        })
    }

    pub fn len(&self) -> usize {
        self.notes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.notes.is_empty()
    }

    pub fn texts(&self) -> Vec<&str> {
        self.notes.iter().map(|n| n.text.as_str()).collect()
    }

    pub fn labels(&self) -> Vec<i64> {
        self.notes.iter().map(|n| n.label as i64).collect()
    }

    /// Note indices `(train, test)`, each ascending: per class, a seeded shuffle puts
    /// `round(test_fraction * n)` of its n notes in the test set, but always leaves one
    /// in training, so every class the file has is learned.
    pub fn stratified_split(
        &self,
        test_fraction: f64,
        seed: u64,
    ) -> Result<(Vec<usize>, Vec<usize>), ModelError> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(ModelError::InvalidOption {
                field: "test_fraction",
                value: test_fraction.to_string(),
                reason: "must lie in (0, 1)".into(),
            });
        }
        let mut rng = SplitMix64::new(seed);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for class in 0..TEP_CLASSES.len() {
            let mut members: Vec<usize> = (0..self.notes.len())
                .filter(|&i| self.notes[i].label == class)
                .collect();
            if members.is_empty() {
                continue;
            }
            rng.shuffle(&mut members);
            let held =
                ((members.len() as f64 * test_fraction).round() as usize).min(members.len() - 1);
            test.extend_from_slice(&members[..held]);
            train.extend_from_slice(&members[held..]);
        }
        train.sort_unstable();
        test.sort_unstable();
        Ok((train, test))
    }
}

/// Sizes of the note classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoteClassifierConfig {
    /// Embedding size (384 for MiniLM).
    pub input: i64,
    /// Units of the ReLU hidden layer; 0 for a linear softmax head.
    pub hidden: i64,
    pub classes: i64,
}

impl NoteClassifierConfig {
    fn validate(&self) -> Result<(), ModelError> {
        let invalid = |field, value: i64, reason: &str| ModelError::InvalidOption {
            field,
            value: value.to_string(),
            reason: reason.into(),
        };
        if self.input <= 0 {
            return Err(invalid("input", self.input, "must be positive"));
        }
        if self.hidden < 0 {
            return Err(invalid(
                "hidden",
                self.hidden,
                "must be 0 (linear) or positive",
            ));
        }
        if self.classes < 2 {
            return Err(invalid(
                "classes",
                self.classes,
                "a classifier needs at least two classes",
            ));
        }
        Ok(())
    }
}

/// A dense layer's variables (shallow handles onto the `VarStore`).
#[derive(Debug)]
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

/// Softmax classifier over sentence embeddings.
#[derive(Debug)]
pub struct NoteClassifier {
    config: NoteClassifierConfig,
    vs: nn::VarStore,
    hidden: Option<Dense>,
    head: Dense,
}

impl NoteClassifier {
    /// A fresh classifier with PyTorch's default `Linear` initialisation (uniform in
    /// ±1/sqrt(fan_in)) drawn from `seed` by the crate's own generator, so concurrently
    /// built models stay reproducible.
    pub fn new(
        config: NoteClassifierConfig,
        device: Device,
        seed: u64,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let mut rng = SplitMix64::new(seed);
        let vs = nn::VarStore::new(device);
        let mut dense = |name: &str, out: i64, input: i64| -> Result<Dense, TchError> {
            let bound = 1.0 / (input as f64).sqrt();
            let mut draw = |shape: &[i64]| {
                let count = shape.iter().product::<i64>() as usize;
                let values: Vec<f32> = (0..count).map(|_| rng.uniform(-bound, bound)).collect();
                Tensor::f_from_slice(&values)?.f_view(shape)
            };
            let layer = vs.root().sub(name);
            Ok(Dense {
                weight: layer.f_var_copy("weight", &draw(&[out, input])?)?,
                bias: layer.f_var_copy("bias", &draw(&[out])?)?,
            })
        };
        let (hidden, head) = if config.hidden > 0 {
            let hidden = dense("hidden", config.hidden, config.input)?;
            (Some(hidden), dense("head", config.classes, config.hidden)?)
        } else {
            (None, dense("head", config.classes, config.input)?)
        };
        Ok(NoteClassifier {
            config,
            vs,
            hidden,
            head,
        })
    }

    /// One logit per class: `[batch, input]` → `[batch, classes]`.
    fn logits(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let x = match &self.hidden {
            Some(hidden) => x.f_linear(&hidden.weight, Some(&hidden.bias))?.f_relu()?,
            None => x.shallow_clone(),
        };
        x.f_linear(&self.head.weight, Some(&self.head.bias))
    }

    /// `embeddings` checked (`[N, input]`, finite) as f32 on the model's device.
    fn inputs(&self, embeddings: &Tensor) -> Result<Tensor, ModelError> {
        let size = embeddings.size();
        if size.len() != 2 || size[1] != self.config.input {
            return Err(ModelError::Shape {
                what: "note embeddings",
                expected: format!("[N, {}]", self.config.input),
                got: format!("{size:?}"),
            });
        }
        let x = embeddings
            .f_detach()?
            .f_to_device(self.vs.device())?
            .f_to_kind(Kind::Float)?;
        let bad = x
            .f_isfinite()?
            .f_logical_not()?
            .f_flatten(0, -1)?
            .f_to_kind(Kind::Int64)?;
        if size[0] > 0 && bad.f_max()?.int64_value(&[]) > 0 {
            // argmax returns the first maximum: the first non-finite value.
            let index = bad.f_argmax(0, false)?.int64_value(&[]) as usize;
            return Err(ModelError::NonFinite {
                what: "note embeddings",
                index,
            });
        }
        Ok(x)
    }

    /// Trains on `embeddings` `[N, input]` with one class per row; see [`TrainOptions`]
    /// for the validation split, early stopping and time cap. The model ends with the
    /// weights of its best validation epoch.
    pub fn fit(
        &mut self,
        embeddings: &Tensor,
        labels: &[i64],
        options: &TrainOptions,
        progress: &mut dyn FnMut(&EpochReport),
    ) -> Result<TrainReport, ModelError> {
        let data = self.inputs(embeddings)?;
        let samples = data.size()[0] as usize;
        let targets = training::class_targets(
            labels,
            samples,
            self.config.classes,
            ("note labels", "embedding"),
            self.vs.device(),
        )?;
        let loss = |indices: &Tensor| {
            let batch = data.f_index_select(0, indices)?;
            let target = targets.f_index_select(0, indices)?;
            self.logits(&batch)?.f_cross_entropy_loss::<Tensor>(
                &target,
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )
        };
        training::train(&self.vs, samples, options, &loss, progress)
    }

    /// Class probabilities `[N, classes]` (f32, on the CPU) of each embedding.
    pub fn predict_proba(&self, embeddings: &Tensor) -> Result<Tensor, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let x = self.inputs(embeddings)?;
        Ok(self
            .logits(&x)?
            .f_softmax(1, Kind::Float)?
            .f_to_device(Device::Cpu)?)
    }

    /// The most likely class of each embedding.
    pub fn predict(&self, embeddings: &Tensor) -> Result<Vec<i64>, ModelError> {
        let probabilities = self.predict_proba(embeddings)?;
        Ok(Vec::<i64>::try_from(&probabilities.f_argmax(1, false)?)?)
    }
}

impl Network for NoteClassifier {
    type Config = NoteClassifierConfig;

    const WEIGHTS_ORIGIN: &'static str = "note classifier weights";

    /// The inherent constructor with the seed's bits read as `u64`, the type of the
    /// crate's generator, which the inherent one takes directly.
    fn new(config: NoteClassifierConfig, device: Device, seed: i64) -> Result<Self, ModelError> {
        NoteClassifier::new(config, device, seed as u64)
    }

    fn config(&self) -> &NoteClassifierConfig {
        &self.config
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
}

network::inherent_network_methods!(NoteClassifier, NoteClassifierConfig);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OperatorNotes, NotesError> {
        OperatorNotes::parse(text.as_bytes(), Path::new("notes.tsv"))
    }

    fn line_error(text: &str) -> (usize, String) {
        match parse(text) {
            Err(NotesError::Line { line, reason, .. }) => (line, reason),
            other => panic!("expected a line error, got {other:?}"),
        }
    }

    #[test]
    fn the_shipped_notes_cover_every_class_evenly() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tep_operator_notes.tsv");
        let notes = OperatorNotes::read(&path).expect("the shipped notes parse");
        for (class, name) in TEP_CLASSES.iter().enumerate() {
            let count = notes.notes.iter().filter(|n| n.label == class).count();
            assert!((25..=30).contains(&count), "{name}: {count} notes");
        }
        assert!(notes.notes.iter().all(|n| n.source == "fogmesh-made"));
        let bytes = std::fs::metadata(&path).unwrap().len();
        assert!(bytes < 100_000, "{bytes} bytes");
    }

    #[test]
    fn comments_blank_lines_and_crlf_are_accepted() {
        let notes = parse(
            "\u{feff}# made here\n\nlabel\tnote\tsource\r\nidv06\t A feed lost \tlog\r\n# x\nnormal\tall quiet\tlog\n",
        )
        .unwrap();
        assert_eq!(notes.len(), 2);
        assert_eq!(notes.notes[0].class(), "idv06");
        assert_eq!(notes.notes[0].text, "A feed lost");
        assert_eq!(notes.notes[0].line, 4);
        assert_eq!(notes.labels(), [5, 0]);
        assert_eq!(notes.texts(), ["A feed lost", "all quiet"]);
    }

    #[test]
    fn bad_lines_are_refused_naming_the_line_and_the_problem() {
        let head = "# c\nlabel\tnote\tsource\nnormal\tfine\tlog\n";
        let (line, reason) = line_error(&format!("{head}idv03\tsomething\tlog\n"));
        assert_eq!(line, 4);
        assert!(reason.contains("unknown label \"idv03\""), "{reason}");
        let (line, reason) = line_error(&format!("{head}normal\tno source\n"));
        assert_eq!(line, 4);
        assert!(reason.contains("found 2"), "{reason}");
        let (line, reason) = line_error(&format!("{head}normal\ta\tb\tc\n"));
        assert_eq!(line, 4);
        assert!(reason.contains("found 4"), "{reason}");
        let (line, reason) = line_error(&format!("{head}idv01\t  \tlog\n"));
        assert_eq!(line, 4);
        assert_eq!(reason, "empty note");
        let (line, reason) = line_error("label,note,source\n");
        assert_eq!(line, 1);
        assert!(reason.contains("header"), "{reason}");
        let mut bytes = head.as_bytes().to_vec();
        bytes.extend_from_slice(b"normal\t\xff\xfe\tlog\n");
        let err = OperatorNotes::parse(&bytes, Path::new("n.tsv")).unwrap_err();
        assert!(err.to_string().starts_with("n.tsv:4: not UTF-8"), "{err}");
        assert!(matches!(
            parse("label\tnote\tsource\n"),
            Err(NotesError::Empty { .. })
        ));
        let err = OperatorNotes::read(Path::new("/nonexistent/notes.tsv")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/notes.tsv"), "{err}");
    }

    #[test]
    fn the_split_is_stratified_seeded_and_disjoint() {
        let mut text = String::from("label\tnote\tsource\n");
        for i in 0..20 {
            text.push_str(&format!("normal\tn{i}\tlog\nidv01\ta{i}\tlog\n"));
        }
        text.push_str("idv14\tonly one\tlog\n");
        let notes = parse(&text).unwrap();
        let (train, test) = notes.stratified_split(0.3, 9).unwrap();
        assert_eq!(
            notes.stratified_split(0.3, 9).unwrap(),
            (train.clone(), test.clone())
        );
        assert_ne!(notes.stratified_split(0.3, 10).unwrap().1, test);
        let count = |set: &[usize], class: usize| {
            set.iter()
                .filter(|&&i| notes.notes[i].label == class)
                .count()
        };
        assert_eq!(
            (count(&test, 0), count(&test, 1), count(&test, 12)),
            (6, 6, 0)
        );
        assert_eq!(count(&train, 12), 1);
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..notes.len()).collect::<Vec<_>>());
        assert!(notes.stratified_split(1.0, 9).is_err());
        assert!(notes.stratified_split(f64::NAN, 9).is_err());
    }

    /// Class k: a unit vector near axis k, with noise.
    fn clusters(n: usize, classes: usize, dim: usize, seed: u64) -> (Tensor, Vec<i64>) {
        let mut rng = SplitMix64::new(seed);
        let mut values = Vec::with_capacity(n * dim);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let class = i % classes;
            for d in 0..dim {
                let centre = if d == class { 1.0 } else { 0.0 };
                values.push((centre + 0.25 * rng.normal()) as f32);
            }
            labels.push(class as i64);
        }
        (
            Tensor::from_slice(&values).view([n as i64, dim as i64]),
            labels,
        )
    }

    #[test]
    fn separable_embeddings_are_learned_by_both_heads_and_survive_a_round_trip() {
        for hidden in [0, 16] {
            let config = NoteClassifierConfig {
                input: 8,
                hidden,
                classes: 4,
            };
            let mut model = NoteClassifier::new(config, Device::Cpu, 3).unwrap();
            let (x, y) = clusters(200, 4, 8, 1);
            let options = TrainOptions {
                epochs: 60,
                batch_size: 32,
                learning_rate: 1e-2,
                patience: 10,
                ..Default::default()
            };
            model.fit(&x, &y, &options, &mut |_| {}).unwrap();
            let (test, truth) = clusters(80, 4, 8, 2);
            let predicted = model.predict(&test).unwrap();
            let correct = predicted.iter().zip(&truth).filter(|(p, t)| p == t).count();
            assert!(correct >= 76, "hidden {hidden}: {correct}/80");

            let p = model.predict_proba(&test).unwrap();
            assert_eq!(p.size(), [80, 4]);
            let sums = p.sum_dim_intlist(1, false, Kind::Float);
            assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-5);

            let (bytes, sha) = model.to_safetensors().unwrap();
            let loaded =
                NoteClassifier::from_safetensors(config, &bytes, Some(&sha), Device::Cpu).unwrap();
            let diff = (loaded.predict_proba(&test).unwrap() - &p)
                .abs()
                .max()
                .double_value(&[]);
            assert_eq!(diff, 0.0);
            let other = NoteClassifierConfig {
                hidden: if hidden == 0 { 4 } else { 0 },
                ..config
            };
            assert!(NoteClassifier::from_safetensors(other, &bytes, None, Device::Cpu).is_err());
        }
    }

    #[test]
    fn bad_inputs_labels_and_configs_are_refused() {
        let config = NoteClassifierConfig {
            input: 8,
            hidden: 0,
            classes: 3,
        };
        let mut model = NoteClassifier::new(config, Device::Cpu, 0).unwrap();
        let (x, mut y) = clusters(6, 3, 8, 1);
        let options = TrainOptions::default();
        assert!(model.fit(&x, &y[..5], &options, &mut |_| {}).is_err());
        y[1] = 3;
        assert!(model.fit(&x, &y, &options, &mut |_| {}).is_err());
        assert!(model.predict(&x.narrow(1, 0, 7)).is_err());
        let bad = x.copy();
        let _ = bad.get(2).get(3).fill_(f64::NAN);
        match model.predict(&bad) {
            Err(ModelError::NonFinite { index, .. }) => assert_eq!(index, 2 * 8 + 3),
            other => panic!("expected NonFinite, got {other:?}"),
        }
        for bad in [
            NoteClassifierConfig {
                classes: 1,
                ..config
            },
            NoteClassifierConfig { input: 0, ..config },
            NoteClassifierConfig {
                hidden: -1,
                ..config
            },
        ] {
            assert!(NoteClassifier::new(bad, Device::Cpu, 0).is_err());
        }
    }
}
