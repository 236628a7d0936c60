//! `fogmesh eval elpv` as a user runs it, on the cells `just setup` converts: a shorter
//! training than the default (fixed epochs, no wall-clock cap, so a busy machine does
//! not change the result) must still beat always answering "functional" by a wide
//! margin. And a folder that is missing or damaged is refused with the file named and
//! the fix (`just setup`) in the message, before any training.

use std::path::{Path, PathBuf};

use fogmesh_models::TrainOptions;
use fogmesh_zoo::datasets::elpv::{Cell, CellType, ElpvSet};
use fogmesh_zoo::elpv_eval::{self, ElpvEvalError, ElpvEvalOptions};

fn elpv_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/elpv")
}

fn reduced(data: PathBuf, epochs: usize) -> ElpvEvalOptions {
    let defaults = ElpvEvalOptions::default();
    ElpvEvalOptions {
        data,
        train: TrainOptions {
            epochs,
            patience: epochs,
            max_seconds: None,
            ..defaults.train.clone()
        },
        ..defaults
    }
}

#[test]
fn a_short_training_beats_the_majority_class_by_a_wide_margin() {
    let data = elpv_dir();
    assert!(
        data.join("manifest.json").is_file(),
        "{} is missing: run `just setup` first (it converts the ELPV images)",
        data.display()
    );
    let mut epochs = 0;
    let report =
        elpv_eval::run(&reduced(data, 6), &mut |_| epochs += 1).expect("the evaluation runs");
    eprintln!("{}", report.table());
    assert_eq!(epochs, report.epochs_run);
    assert_eq!((report.train_images, report.test_images), (1968, 656));
    assert_eq!(report.mono.test_images + report.poly.test_images, 656);
    // 451 of the 656 test cells are functional.
    assert!((report.majority_accuracy - 451.0 / 656.0).abs() < 1e-12);
    assert!(
        report.accuracy >= 0.76,
        "accuracy {} vs majority {}",
        report.accuracy,
        report.majority_accuracy
    );
    assert!(report.recall > 0.3, "recall {}", report.recall);
}

/// `n` cells of 16 × 16, alternating functional and defective, mono and poly.
fn fake_set(dir: &Path, n: usize) {
    let cells: Vec<Cell> = (0..n)
        .map(|i| Cell {
            source: format!("images/cell{i:04}.png"),
            probability: if i % 2 == 0 { 0.0 } else { 1.0 },
            kind: if i % 4 < 2 {
                CellType::Mono
            } else {
                CellType::Poly
            },
        })
        .collect();
    let pixels: Vec<u8> = (0..n * 256).map(|i| (i * 37 % 256) as u8).collect();
    ElpvSet::write(dir, "test", 16, 16, &cells, &pixels).expect("writes the fake set");
}

#[test]
fn missing_or_damaged_folders_are_refused_naming_file_and_fix() {
    let root = tempfile::tempdir().expect("temp dir");
    let missing = root.path().join("elpv");
    let message = elpv_eval::run(&reduced(missing, 1), &mut |_| {})
        .expect_err("no folder")
        .to_string();
    assert!(message.contains("manifest.json"), "{message}");
    assert!(message.contains("run `just setup`"), "{message}");

    let damaged = root.path().join("damaged");
    fake_set(&damaged, 16);
    let cells = damaged.join("cells.bin");
    let mut bytes = std::fs::read(&cells).expect("reads");
    bytes.truncate(bytes.len() - 256);
    std::fs::write(&cells, &bytes).expect("writes");
    match elpv_eval::run(&reduced(damaged, 1), &mut |_| {}) {
        Err(err @ ElpvEvalError::Data { .. }) => {
            let message = err.to_string();
            assert!(message.contains("cells.bin"), "{message}");
            assert!(message.contains("3840 bytes"), "{message}");
            assert!(message.contains("run `just setup`"), "{message}");
        }
        other => panic!("expected a data error, got {other:?}"),
    }

    let mislabelled = root.path().join("mislabelled");
    fake_set(&mislabelled, 16);
    let labels = mislabelled.join("labels.tsv");
    let text = std::fs::read_to_string(&labels).expect("reads");
    std::fs::write(&labels, text.replace("\tpoly\n", "\tthin-film\n")).expect("writes");
    let message = elpv_eval::run(&reduced(mislabelled, 1), &mut |_| {})
        .expect_err("unknown type")
        .to_string();
    assert!(message.contains("labels.tsv:4:"), "{message}");
    assert!(message.contains("thin-film"), "{message}");
}

#[test]
fn a_small_valid_set_runs_the_whole_protocol() {
    let root = tempfile::tempdir().expect("temp dir");
    fake_set(root.path(), 32);
    let report = elpv_eval::run(&reduced(root.path().to_path_buf(), 1), &mut |_| {})
        .expect("the evaluation runs");
    // A quarter of each of the four strata of 8 cells is held out.
    assert_eq!((report.train_images, report.test_images), (24, 8));
    assert_eq!((report.mono.test_images, report.poly.test_images), (4, 4));
    assert_eq!(report.resolution, "16x16");
    let c = report.confusion;
    assert_eq!(
        c.true_positive + c.false_positive + c.true_negative + c.false_negative,
        8
    );
    assert_eq!(report.majority_accuracy, 0.5);
    assert_eq!(report.epochs_run, 1);
    let json = serde_json::to_value(&report).expect("serialises");
    assert_eq!(json["dataset"], "elpv");
    assert_eq!(json["published"]["accuracy"], 0.8842);
}
