//! `fogmesh eval multimodal` as a user runs it: TEP windows paired with operator notes
//! of the same episode. The fused expert must beat each modality alone on the same test
//! pairs. Training runs a fixed number of epochs with no wall-clock cap, so the result
//! does not depend on how busy the machine is.

use std::path::Path;

use fogmesh_models::TrainOptions;
use fogmesh_zoo::fusion_eval::{self, FusionEvalOptions};
use fogmesh_zoo::tep_eval::TepEvalOptions;

#[test]
fn the_fused_expert_beats_each_modality_alone_on_the_same_pairs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for needed in [
        "data/minilm/model.safetensors",
        "data/tep/normal-test.fogrec",
    ] {
        assert!(
            root.join(needed).is_file(),
            "{needed} is missing: run `just setup` first"
        );
    }
    let defaults = FusionEvalOptions::default();
    let fixed = |options: &TrainOptions, epochs| TrainOptions {
        epochs,
        patience: epochs,
        max_seconds: None,
        ..options.clone()
    };
    let options = FusionEvalOptions {
        tep: root.join("data/tep"),
        notes: root.join("models/data/tep_operator_notes.tsv"),
        minilm: root.join("data/minilm"),
        diagnosis: TepEvalOptions {
            classifier_train: fixed(&defaults.diagnosis.classifier_train, 6),
            ..defaults.diagnosis.clone()
        },
        text_train: fixed(&defaults.text_train, 100),
        fusion_train: fixed(&defaults.fusion_train, 6),
        ..defaults
    };
    let report = fusion_eval::evaluate(&options).expect("the evaluation runs");
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    assert_eq!(report.classes, 13);
    assert_eq!(report.per_class.len(), 13);
    assert!(report.test_pairs > 5_000, "{}", report.test_pairs);
    assert!(
        report.accuracy_fused > report.accuracy_text + 0.15,
        "fused {} vs text {}",
        report.accuracy_fused,
        report.accuracy_text
    );
    assert!(
        report.accuracy_fused > report.accuracy_sensors,
        "fused {} vs sensors {}",
        report.accuracy_fused,
        report.accuracy_sensors
    );
    assert!(report.fused_beats_each);
}
