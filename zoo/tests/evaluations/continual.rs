//! `fogmesh eval continual` as a user runs it, on the TEP recordings `just setup`
//! generates, with a smaller budget: the regime change is found in the data, drift is
//! detected on it, and fogmesh's continual learning (replay + EWC, gated) must beat
//! never updating on the new regime without forgetting the old one as naive
//! fine-tuning does. Training runs fixed epochs with no wall-clock cap, so the result
//! does not depend on how busy the machine is.

use std::path::Path;

use fogmesh_models::continual::FineTuneOptions;
use fogmesh_models::TrainOptions;
use fogmesh_zoo::continual_eval::{self, ContinualEvalOptions, PolicyOutcome};

#[test]
fn continual_learning_adapts_to_the_new_regime_and_keeps_the_old_one() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tep");
    assert!(
        data.join("manifest.json").is_file(),
        "{} has no TEP recordings: run `just setup` first",
        data.display()
    );
    let defaults = ContinualEvalOptions::default();
    let options = ContinualEvalOptions {
        data,
        incumbent_train: TrainOptions {
            epochs: 6,
            patience: 6,
            max_seconds: None,
            ..defaults.incumbent_train.clone()
        },
        fine_tune: FineTuneOptions {
            epochs: 40,
            max_seconds: None,
            ..defaults.fine_tune.clone()
        },
        ..defaults
    };
    let report = continual_eval::evaluate(&options).expect("the evaluation runs");
    eprintln!("{}", report.table());
    eprintln!("{}", serde_json::to_string(&report).unwrap());

    let change = &report.regime_change;
    assert!(change.settling.settled_after_h.is_some(), "{}", change.why);
    assert!(
        change.settling.shift_std.abs() > change.normal_shift_std,
        "{}",
        change.why
    );
    assert!(change.held_out_rows[1] > change.held_out_rows[0]);
    assert_eq!(report.false_drift_detections, 0);
    assert!(
        report.drift_delay_windows <= 20,
        "a step this size is seen within minutes: {} windows",
        report.drift_delay_windows
    );

    let policy = |name: &str| -> &PolicyOutcome {
        report
            .policies
            .iter()
            .find(|p| p.policy == name)
            .unwrap_or_else(|| panic!("no policy {name}"))
    };
    let (never, naive, continual) = (
        policy("never update"),
        policy("naive fine-tuning"),
        policy("continual (fogmesh)"),
    );
    assert!(
        never.far_new > 0.9,
        "the incumbent alarms on the new normal: {}",
        never.far_new
    );
    let gate = continual
        .gate
        .as_ref()
        .expect("the continual candidate is gated");
    assert!(continual.promoted, "{}", gate.reason);
    assert!(
        continual.far_new < never.far_new,
        "continual {} vs never {}",
        continual.far_new,
        never.far_new
    );
    assert!(
        continual.far_old <= naive.far_old,
        "continual {} vs naive {}",
        continual.far_old,
        naive.far_old
    );
    assert!(
        continual.detection_rate > 0.5,
        "it still sees the other faults: {}",
        continual.detection_rate
    );
    assert!(report.drift_to_promotion_s.is_some());
}

#[test]
fn a_missing_data_folder_says_to_run_setup() {
    let empty = tempfile::tempdir().unwrap();
    let options = ContinualEvalOptions {
        data: empty.path().to_path_buf(),
        ..Default::default()
    };
    let err = continual_eval::evaluate(&options).expect_err("no recordings");
    assert!(err.to_string().contains("run `just setup`"), "{err}");
}
