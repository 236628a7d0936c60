//! `fogmesh eval notes` as a user runs it: the project's operator notes, embedded by
//! the Rust MiniLM from `data/minilm` (which `just setup` exports), classified into the
//! 13 TEP classes. The text is ambiguous by design, so the test asserts that it is
//! clearly informative (well above the 1/13 chance) and clearly imperfect, not a score.

use std::path::{Path, PathBuf};

use fogmesh_zoo::notes_eval::{self, NotesEvalError, NotesEvalOptions};

fn options() -> NotesEvalOptions {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let minilm = root.join("data/minilm");
    assert!(
        minilm.join("model.safetensors").is_file(),
        "{} has no MiniLM model: run `just setup` first",
        minilm.display()
    );
    NotesEvalOptions {
        data: root.join("models/data/tep_operator_notes.tsv"),
        minilm,
        ..Default::default()
    }
}

#[test]
fn notes_are_classified_well_above_chance_but_not_perfectly() {
    let report = notes_eval::evaluate(&options()).expect("the evaluation runs");
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    assert_eq!(report.classes, 13);
    assert_eq!(report.train_notes + report.test_notes, 364);
    assert!(
        (100..=112).contains(&report.test_notes),
        "{}",
        report.test_notes
    );
    assert_eq!(report.per_class.len(), 13);
    assert!(report.per_class.iter().all(|c| c.test_notes >= 7));
    // Chance is 1/13 = 0.077; four times that is a clear signal from text alone.
    assert!(report.accuracy > 0.3, "accuracy {}", report.accuracy);
    assert!(report.macro_f1 > 0.3, "macro F1 {}", report.macro_f1);
    assert!(report.baseline.accuracy > 0.3, "{:?}", report.baseline);
    // A third of the notes are symptoms shared between faults: text alone stays imperfect.
    assert!(report.accuracy < 0.9, "accuracy {}", report.accuracy);

    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["dataset"], "tep-operator-notes (fogmesh-made)");
    assert!(json["published"].is_null());
    assert!(json["note"]
        .as_str()
        .unwrap()
        .contains("no published score"));
}

#[test]
fn a_bad_line_is_refused_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data: PathBuf = dir.path().join("notes.tsv");
    std::fs::write(
        &data,
        "# test\nlabel\tnote\tsource\nnormal\tall quiet\tlog\nidv03\tIDV 3 is not simulated\tlog\n",
    )
    .unwrap();
    let err = notes_eval::evaluate(&NotesEvalOptions {
        data: data.clone(),
        ..options()
    })
    .unwrap_err();
    assert!(matches!(err, NotesEvalError::Notes(_)), "{err}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}:4: unknown label \"idv03\"", data.display())),
        "{message}"
    );

    let err = notes_eval::evaluate(&NotesEvalOptions {
        minilm: dir.path().join("no-minilm"),
        ..options()
    })
    .unwrap_err();
    assert!(err.to_string().contains("just setup"), "{err}");
}
