//! `fogmesh eval multimodal` as a user runs it: TEP windows paired with operator notes
//! of the same episode. The fused expert must use both modalities: far better than the
//! notes alone, and at least as good as the sensors alone (the full run's margin over
//! the sensors is a few points, which a loaded CI machine's time caps may narrow, so
//! the test allows a small slack there rather than asserting a lucky score).

use std::path::Path;

use fogmesh_simulations::fusion_eval::{self, FusionEvalOptions};

#[test]
fn the_fused_expert_beats_the_notes_and_keeps_up_with_the_sensors() {
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
    let options = FusionEvalOptions {
        tep: root.join("data/tep"),
        notes: root.join("models/data/tep_operator_notes.tsv"),
        minilm: root.join("data/minilm"),
        ..Default::default()
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
        report.accuracy_fused >= report.accuracy_sensors - 0.02,
        "fused {} vs sensors {}",
        report.accuracy_fused,
        report.accuracy_sensors
    );
}
