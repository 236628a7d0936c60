//! Continual learning at its public boundary: the replay reservoir's sampling
//! guarantees (bounded, counts everything, uniform), fine-tuning a stored autoencoder
//! and classifier on a shifted regime without touching the incumbent, and the refusals
//! that name what is wrong. Seeds are fixed, so nothing here can flake.

use fogmesh_models::classifier::{ClassifierConfig, FaultClassifier};
use fogmesh_models::continual::{
    evaluate, fine_tune, FineTuneOptions, ReplayItem, Reservoir, ValidationGate,
};
use fogmesh_models::served::{Architecture, Classes};
use fogmesh_models::store::Manifest;
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, ModelError, SplitMix64, TrainOptions};
use proptest::prelude::*;
use tch::Device;

fn item(i: usize) -> ReplayItem {
    ReplayItem {
        window: vec![i as f32],
        label: None,
    }
}

fn offered(items: &[ReplayItem]) -> Vec<usize> {
    items.iter().map(|i| i.window[0] as usize).collect()
}

proptest! {
    #[test]
    fn reservoir_is_bounded_counts_everything_and_reports_what_it_kept(
        capacity in 1usize..40,
        stream in 0usize..300,
        seed in any::<u64>(),
    ) {
        let mut reservoir = Reservoir::new(capacity, seed).unwrap();
        for i in 0..stream {
            let kept = reservoir.offer(item(i));
            prop_assert!(reservoir.len() <= capacity);
            prop_assert_eq!(kept, offered(reservoir.items()).contains(&i));
        }
        prop_assert_eq!(reservoir.seen(), stream as u64);
        prop_assert_eq!(reservoir.len(), stream.min(capacity));
        prop_assert_eq!(reservoir.is_empty(), stream == 0);
        let mut distinct = offered(reservoir.items());
        distinct.sort_unstable();
        distinct.dedup();
        prop_assert_eq!(distinct.len(), reservoir.len(), "no window kept twice");
    }

    #[test]
    fn a_stream_no_longer_than_the_capacity_is_kept_whole_in_order(
        capacity in 1usize..60,
        extra in 0usize..20,
        seed in any::<u64>(),
    ) {
        let stream = capacity.saturating_sub(extra).max(1);
        let mut reservoir = Reservoir::new(capacity, seed).unwrap();
        for i in 0..stream {
            prop_assert!(reservoir.offer(item(i)));
        }
        prop_assert_eq!(offered(reservoir.items()), (0..stream).collect::<Vec<_>>());
        reservoir.clear();
        prop_assert!(reservoir.is_empty());
        prop_assert_eq!(reservoir.seen(), 0);
    }
}

#[test]
fn every_offered_window_is_kept_with_the_same_probability() {
    // 50 windows into 10 slots, 4000 seeds: each window should be kept 4000 × 10/50 =
    // 800 times. Pearson's statistic over the 50 counts stays far below the 0.1 %
    // critical value of chi-square with 49 degrees of freedom (85.35) for a uniform
    // sampler; keeping the first 10 (no replacement) or the last 10 (always replace)
    // would score in the tens of thousands.
    let (capacity, stream, seeds) = (10usize, 50usize, 4000u64);
    let mut counts = vec![0u64; stream];
    for seed in 0..seeds {
        let mut reservoir = Reservoir::new(capacity, seed).unwrap();
        for i in 0..stream {
            reservoir.offer(item(i));
        }
        for i in offered(reservoir.items()) {
            counts[i] += 1;
        }
    }
    let expected = (seeds * capacity as u64) as f64 / stream as f64;
    let chi_square: f64 = counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum();
    assert!(chi_square < 85.35, "chi-square {chi_square}: {counts:?}");
    // Early and late windows alike: the first and last fifth within 5 % of expected.
    let fifth = |range: std::ops::Range<usize>| counts[range].iter().sum::<u64>() as f64;
    for part in [fifth(0..10), fifth(40..50)] {
        assert!((part / (10.0 * expected) - 1.0).abs() < 0.05, "{part}");
    }
}

#[test]
fn a_reservoir_without_capacity_is_refused_naming_the_field() {
    match Reservoir::new(0, 1) {
        Err(ModelError::InvalidOption { field, .. }) => assert_eq!(field, "capacity"),
        other => panic!("{other:?}"),
    }
}

fn small() -> AutoencoderConfig {
    AutoencoderConfig {
        channels: 3,
        window: 16,
        hidden: 8,
        bottleneck: 4,
        kernel: 3,
    }
}

/// `n` windows of per-channel sines with random phase and a little noise; channel 0
/// raised by `offset` (the new operating point).
fn regime(n: usize, offset: f32, seed: u64) -> Vec<ReplayItem> {
    let config = small();
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let phase = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * std::f64::consts::TAU;
            let mut window = Vec::with_capacity(config.window_len());
            for c in 0..config.channels {
                let freq = 0.2 + 0.1 * c as f64;
                for t in 0..config.window {
                    let value = (freq * t as f64 + phase).sin() + 0.05 * rng.normal();
                    window.push(value as f32 + if c == 0 { offset } else { 0.0 });
                }
            }
            ReplayItem {
                window,
                label: None,
            }
        })
        .collect()
}

fn manifest(architecture: &Architecture, weights: &[u8]) -> Manifest {
    Manifest {
        weights_sha256: fogmesh_models::weights::sha256_hex(weights),
        weights_bytes: weights.len() as u64,
        ..architecture.manifest("incumbent", "1")
    }
}

/// An autoencoder trained on the old regime, stored as a manifest and its bytes.
fn incumbent_autoencoder() -> (Manifest, Vec<u8>) {
    let mut model = ConvAutoencoder::new(small(), Device::Cpu, 3).unwrap();
    let old: Vec<f32> = regime(300, 0.0, 1)
        .into_iter()
        .flat_map(|i| i.window)
        .collect();
    let options = TrainOptions {
        epochs: 40,
        batch_size: 32,
        learning_rate: 5e-3,
        ..Default::default()
    };
    model.fit(&old, &options, &mut |_| {}).unwrap();
    let (weights, _) = model.to_safetensors().unwrap();
    (
        manifest(&Architecture::ConvAutoencoder(small()), &weights),
        weights,
    )
}

#[test]
fn fine_tuning_adapts_to_the_new_regime_and_leaves_the_incumbent_alone() {
    tch::set_num_threads(1);
    let (manifest, weights) = incumbent_autoencoder();
    let untouched = weights.clone();
    let new = regime(200, 3.0, 2);
    let replay = regime(200, 0.0, 3);
    let (new_test, old_test) = (regime(100, 3.0, 4), regime(100, 0.0, 5));
    let options = FineTuneOptions {
        epochs: 30,
        learning_rate: 5e-3,
        max_seconds: None,
        ..Default::default()
    };
    let continual = fine_tune(&manifest, &weights, &new, &replay, &options, Device::Cpu).unwrap();
    let naive_options = FineTuneOptions {
        replay_fraction: 0.0,
        ewc_lambda: 0.0,
        ..options.clone()
    };
    let naive = fine_tune(&manifest, &weights, &new, &[], &naive_options, Device::Cpu).unwrap();
    assert_eq!(weights, untouched, "the incumbent's bytes never change");

    let loss = |bytes: &[u8], sha: &str, items: &[ReplayItem]| {
        let candidate = Manifest {
            weights_sha256: sha.to_string(),
            ..manifest.clone()
        };
        evaluate(&candidate, bytes, items, Device::Cpu).unwrap()
    };
    let incumbent_new = loss(&weights, &manifest.weights_sha256, &new_test);
    let incumbent_old = loss(&weights, &manifest.weights_sha256, &old_test);
    let continual_new = loss(&continual.weights, &continual.sha256, &new_test);
    let continual_old = loss(&continual.weights, &continual.sha256, &old_test);
    let naive_old = loss(&naive.weights, &naive.sha256, &old_test);
    eprintln!(
        "new regime: incumbent {incumbent_new:.4}, continual {continual_new:.4}; \
         old regime: incumbent {incumbent_old:.4}, continual {continual_old:.4}, naive {naive_old:.4}; \
         {} steps in {:.2} s, metrics {:?}",
        continual.steps, continual.elapsed_s, continual.metrics
    );
    assert!(continual_new < 0.5 * incumbent_new);
    assert!(
        continual_old < naive_old,
        "replay and EWC forget less than naive fine-tuning"
    );
    assert_ne!(continual.sha256, manifest.weights_sha256);
    assert_eq!(
        continual.sha256,
        fogmesh_models::weights::sha256_hex(&continual.weights)
    );
    assert!(continual.steps > 0);
    for key in [
        "threshold",
        "new_loss",
        "old_loss",
        "ewc_penalty",
        "train_objective",
    ] {
        assert!(
            continual.metrics[key].is_finite(),
            "{key}: {:?}",
            continual.metrics
        );
    }
    assert!(
        !naive.metrics.contains_key("old_loss"),
        "no replay, no old-regime loss"
    );
    // Equal inputs, equal seed: the same candidate, byte for byte.
    let again = fine_tune(&manifest, &weights, &new, &replay, &options, Device::Cpu).unwrap();
    assert_eq!(again.sha256, continual.sha256);

    let gate =
        ValidationGate::default().judge(incumbent_old, continual_old, incumbent_new, continual_new);
    assert!(gate.promote, "{}", gate.reason);
}

#[test]
fn the_classifier_learns_from_labelled_windows_only() {
    tch::set_num_threads(1);
    let config = ClassifierConfig {
        channels: 3,
        window: 16,
        hidden: 8,
        classes: 2,
    };
    let model = FaultClassifier::new(config, Device::Cpu, 1).unwrap();
    let (weights, _) = model.to_safetensors().unwrap();
    let architecture = Architecture::FaultClassifier {
        config,
        classes: Classes {
            names: vec!["normal".into(), "fault".into()],
            normal: 0,
        },
    };
    let manifest = manifest(&architecture, &weights);
    let labelled = |offset: f32, label: i64, seed: u64| {
        regime(60, offset, seed)
            .into_iter()
            .map(|i| ReplayItem {
                label: Some(label),
                ..i
            })
            .collect::<Vec<_>>()
    };
    let mut new = labelled(0.0, 0, 1);
    new.extend(labelled(3.0, 1, 2));
    // Unlabelled windows would teach nothing a loss could measure; they are skipped.
    new.extend(regime(30, -5.0, 3));
    let test: Vec<ReplayItem> = labelled(0.0, 0, 4)
        .into_iter()
        .chain(labelled(3.0, 1, 5))
        .collect();
    let options = FineTuneOptions {
        epochs: 20,
        learning_rate: 5e-3,
        replay_fraction: 0.0,
        ewc_lambda: 0.0,
        max_seconds: None,
        ..Default::default()
    };
    let tuned = fine_tune(&manifest, &weights, &new, &[], &options, Device::Cpu).unwrap();
    assert_eq!(
        tuned.metrics["train_windows"], 96.0,
        "120 labelled, the latest 24 held back"
    );
    assert!(!tuned.metrics.contains_key("threshold"));
    let before = evaluate(&manifest, &weights, &test, Device::Cpu).unwrap();
    let candidate = Manifest {
        weights_sha256: tuned.sha256.clone(),
        ..manifest.clone()
    };
    let after = evaluate(&candidate, &tuned.weights, &test, Device::Cpu).unwrap();
    assert!(after < 0.5 * before, "cross-entropy {before} -> {after}");

    let unlabelled = regime(10, 0.0, 6);
    match fine_tune(&manifest, &weights, &unlabelled, &[], &options, Device::Cpu) {
        Err(ModelError::Shape { what, expected, .. }) => {
            assert_eq!(what, "new windows");
            assert!(expected.contains("labelled"), "{expected}");
        }
        other => panic!("{other:?}"),
    }
    assert!(evaluate(&manifest, &weights, &unlabelled, Device::Cpu).is_err());
}

#[test]
fn refusals_name_the_architecture_field_or_window() {
    let (manifest, weights) = incumbent_autoencoder();
    let new = regime(20, 1.0, 1);
    let replay = regime(20, 0.0, 2);
    let field_of = |result: Result<_, ModelError>| match result {
        Err(ModelError::InvalidOption { field, .. }) => field,
        Err(other) => panic!("expected InvalidOption, got {other}"),
        Ok(_) => panic!("expected InvalidOption, got a candidate"),
    };
    let defaults = FineTuneOptions::default();
    for (options, field) in [
        (
            FineTuneOptions {
                epochs: 0,
                ..defaults.clone()
            },
            "epochs",
        ),
        (
            FineTuneOptions {
                batch_size: 0,
                ..defaults.clone()
            },
            "batch_size",
        ),
        (
            FineTuneOptions {
                learning_rate: 0.0,
                ..defaults.clone()
            },
            "learning_rate",
        ),
        (
            FineTuneOptions {
                ewc_lambda: -1.0,
                ..defaults.clone()
            },
            "ewc_lambda",
        ),
        (
            FineTuneOptions {
                ewc_lambda: f64::INFINITY,
                ..defaults.clone()
            },
            "ewc_lambda",
        ),
        (
            FineTuneOptions {
                replay_fraction: 1.0,
                ..defaults.clone()
            },
            "replay_fraction",
        ),
        (
            FineTuneOptions {
                max_seconds: Some(-1.0),
                ..defaults.clone()
            },
            "max_seconds",
        ),
        (
            FineTuneOptions {
                validation_fraction: 1.0,
                ..defaults.clone()
            },
            "validation_fraction",
        ),
        (
            FineTuneOptions {
                threshold_quantile: 0.0,
                ..defaults.clone()
            },
            "threshold_quantile",
        ),
        (
            FineTuneOptions {
                fisher_samples: 0,
                ..defaults.clone()
            },
            "fisher_samples",
        ),
    ] {
        let got = field_of(fine_tune(
            &manifest,
            &weights,
            &new,
            &replay,
            &options,
            Device::Cpu,
        ));
        assert_eq!(got, field, "{options:?}");
    }
    // Replay and EWC need old windows to draw from.
    assert_eq!(
        field_of(fine_tune(
            &manifest,
            &weights,
            &new,
            &[],
            &defaults,
            Device::Cpu
        )),
        "replay_fraction"
    );
    let ewc_only = FineTuneOptions {
        replay_fraction: 0.0,
        ..defaults.clone()
    };
    assert_eq!(
        field_of(fine_tune(
            &manifest,
            &weights,
            &new,
            &[],
            &ewc_only,
            Device::Cpu
        )),
        "ewc_lambda"
    );
    let json: Result<FineTuneOptions, _> = serde_json::from_str(r#"{"ewc_lamda": 1}"#);
    assert!(json.unwrap_err().to_string().contains("ewc_lamda"));

    // Architectures it cannot adapt, known or not.
    for architecture in ["tcn_forecaster", "no_such_network"] {
        let other = Manifest {
            architecture: architecture.into(),
            ..manifest.clone()
        };
        match fine_tune(&other, &weights, &new, &replay, &defaults, Device::Cpu) {
            Err(
                err @ ModelError::InvalidOption {
                    field: "architecture",
                    ..
                },
            ) => {
                assert!(err.to_string().contains(architecture), "{err}")
            }
            other => panic!("{architecture}: {other:?}"),
        }
        assert!(evaluate(&other, &weights, &new, Device::Cpu).is_err());
    }
    // Weights that are not the manifest's.
    let mut tampered = weights.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(matches!(
        fine_tune(&manifest, &tampered, &new, &replay, &defaults, Device::Cpu),
        Err(ModelError::HashMismatch { .. })
    ));
    // A window of the wrong length, or with a NaN, names the set and the window.
    let mut short = new.clone();
    short[3].window.pop();
    match fine_tune(&manifest, &weights, &short, &replay, &defaults, Device::Cpu) {
        Err(ModelError::Shape { what, got, .. }) => {
            assert_eq!(what, "new windows");
            assert!(got.contains("window 3"), "{got}");
        }
        other => panic!("{other:?}"),
    }
    let mut nan = replay.clone();
    nan[1].window[5] = f32::NAN;
    assert!(matches!(
        fine_tune(&manifest, &weights, &new, &nan, &defaults, Device::Cpu),
        Err(ModelError::NonFinite {
            what: "replay windows",
            index: 53
        })
    ));
}
