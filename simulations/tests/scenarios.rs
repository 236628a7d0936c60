//! The demo and W1 as a user runs them, shortened: the demo on the recordings
//! `just setup` generates, W1 for a few seconds. They assert behaviour (faults are
//! detected, normal operation mostly is not, every window comes back), not speed:
//! speed is what `just bench` reports.

use std::path::PathBuf;

use fogmesh_simulations::demo::{self, DemoOptions};
use fogmesh_simulations::w1::{self, GateKind, W1Options};

fn tep_data() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/tep");
    assert!(
        dir.join("manifest.json").exists(),
        "{} has no TEP recordings: run `just setup` first",
        dir.display()
    );
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_detects_plant_faults_on_real_recordings() {
    let options = DemoOptions {
        data_dir: tep_data(),
        train_seconds: 2.0,
        live: false,
        ..Default::default()
    };
    let mut out = Vec::new();
    let report = demo::run(&options, &mut out).await.expect("the demo runs");
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("overall: F1"), "{text}");
    let run = |name: &str| {
        report
            .runs
            .iter()
            .find(|r| r.run == name)
            .unwrap_or_else(|| panic!("{name} replayed"))
    };
    // IDV 1 (A/C feed ratio step) is detected by every method in the literature.
    assert!(
        run("idv01").detection_rate.unwrap() > 0.9,
        "{:?}",
        run("idv01")
    );
    assert!(
        run("normal-test").false_alarm_rate.unwrap() < 0.2,
        "{:?}",
        run("normal-test")
    );
    assert!(report.f1.unwrap() > 0.8, "F1 {:?}", report.f1);
    let expected: u64 = report.runs.iter().map(|r| r.windows).sum();
    assert!(
        report.windows_scored >= expected,
        "every evaluated window was scored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w1_runs_both_policies_without_losing_a_window() {
    for gate in [GateKind::Static, GateKind::Learned] {
        let options = W1Options {
            streams: 8,
            inflight: 16,
            seconds: 2.0,
            warmup_seconds: 0.5,
            gate,
            ..Default::default()
        };
        let report = w1::run(&options).await.expect("W1 runs");
        assert_eq!(report.errors, 0, "{report:?}");
        assert!(report.windows_per_s > 0.0 && report.bare_forward_windows_per_s > 0.0);
        assert!(report.p50_ms <= report.p99_ms);
        if gate == GateKind::Learned {
            assert!(
                report.gate_accuracy.unwrap() > 0.9,
                "the gate learns the assets' signatures: {report:?}"
            );
        }
    }
}

/// SKAB lives beside the repository (`../shared/data/skab`) on development machines
/// and in CI; fogmesh does not ship it.
fn skab_data() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/skab");
    assert!(
        dir.join("valve1").is_dir(),
        "{} has no SKAB data: these tests need the SKAB `data` folder beside the repository (shared/data/skab)",
        dir.display()
    );
    dir
}

#[test]
fn skab_is_scored_like_its_leaderboard_and_meets_the_target() {
    let options = fogmesh_simulations::skab::SkabOptions {
        data: skab_data(),
        ..Default::default()
    };
    let mut runs = 0;
    let report = fogmesh_simulations::skab::evaluate(&options, &mut |_| runs += 1)
        .expect("the evaluation runs");
    assert_eq!((report.runs, runs), (34, 34));
    assert!(report.rows > 30_000, "{} rows", report.rows);
    // The target, and within 10 % of the published Conv-AE.
    assert!(report.f1 >= 0.70, "F1 {}", report.f1);
    assert!(report.f1_vs_published >= 0.9, "{}", report.f1_vs_published);
    assert!(
        report.far < 0.3 && report.mar < 0.3,
        "FAR {} MAR {}",
        report.far,
        report.mar
    );
}

#[test]
fn skab_missing_is_said_plainly() {
    let options = fogmesh_simulations::skab::SkabOptions {
        data: PathBuf::from("/nonexistent/skab"),
        ..Default::default()
    };
    let error = fogmesh_simulations::skab::evaluate(&options, &mut |_| {})
        .expect_err("no data")
        .to_string();
    assert!(error.contains("/nonexistent/skab"), "{error}");
    assert!(error.contains("not shipped"), "{error}");
}

#[test]
fn tep_detection_is_reported_against_the_pca_baseline_on_the_same_rows() {
    let defaults = fogmesh_simulations::tep_eval::TepEvalOptions::default();
    let options = fogmesh_simulations::tep_eval::TepEvalOptions {
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
        fogmesh_simulations::tep_eval::evaluate(&options, &mut |r| seen.push(r.run.clone()))
            .expect("the evaluation runs");
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
