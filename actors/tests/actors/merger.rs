//! The `Merger` actor on a real model store: two stored autoencoders averaged into a
//! third version whose every tensor is the hand-computed average, with its lineage, and
//! which loads as a served model; bad requests (TIES without a base, validation without
//! an incumbent, versions of different networks) refused with what is wrong and nothing
//! stored; and replicas fine-tuned on two nodes merged through the validation gate:
//! a gate that cannot be met stores nothing, one that is met stores the merge with the
//! gate's figures.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fogmesh_actors::{
    MergeOutcome, MergeRefused, MergeRequest, Merger, MergerArgs, MergerMsg, MergerShared,
    Validation,
};
use fogmesh_models::continual::{ReplayItem, ValidationGate};
use fogmesh_models::merge::{MergeMethod, MergingError, Weights};
use fogmesh_models::served::{Architecture, Assets, ServedModel};
use fogmesh_models::store::{Manifest, ModelStore};
use fogmesh_models::{
    AutoencoderConfig, ConvAutoencoder, ForecasterConfig, SplitMix64, TcnForecaster, TrainOptions,
};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};

use crate::plant::{row, CHANNELS};
const WINDOW: usize = 16;

/// Stores `weights` of `architecture` as `name@version`.
fn store_version(
    store: &ModelStore,
    name: &str,
    version: &str,
    architecture: Architecture,
    weights: &[u8],
) -> Manifest {
    let mut manifest = architecture.manifest(name, version);
    manifest.input.description = "pump sensors".into();
    manifest.training = serde_json::json!({ "data": "test" });
    store.import(manifest, weights).expect("stored")
}

fn config() -> AutoencoderConfig {
    AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64)
}

/// An autoencoder as initialised from `seed`, stored as `pump-ae@<version>`.
fn store_autoencoder(store: &ModelStore, version: &str, seed: i64) -> Manifest {
    let model = ConvAutoencoder::new(config(), tch::Device::Cpu, seed).unwrap();
    let (weights, _) = model.to_safetensors().unwrap();
    store_version(
        store,
        "pump-ae",
        version,
        Architecture::ConvAutoencoder(config()),
        &weights,
    )
}

async fn start(store: &ModelStore) -> (ActorRef<MergerMsg>, Arc<MergerShared>) {
    let shared = Arc::new(MergerShared::default());
    let (actor, _) = Actor::spawn(
        None,
        Merger,
        MergerArgs {
            store: store.clone(),
            assets: Assets::default(),
            merge_threads: 2,
            shared: shared.clone(),
        },
    )
    .await
    .expect("the merger starts");
    (actor, shared)
}

async fn ask(
    actor: &ActorRef<MergerMsg>,
    request: MergeRequest,
) -> Result<MergeOutcome, MergeRefused> {
    match actor
        .call(|reply| MergerMsg::Merge { request, reply }, None)
        .await
        .expect("the merger takes requests")
    {
        CallResult::Success(outcome) => outcome,
        CallResult::Timeout | CallResult::SenderError => panic!("the merger did not answer"),
    }
}

fn request(inputs: &[&str], method: MergeMethod) -> MergeRequest {
    MergeRequest {
        inputs: inputs.iter().map(|id| id.to_string()).collect(),
        base: None,
        method,
        name: "pump-ae".into(),
        version: None,
        incumbent: None,
        validation: None,
    }
}

fn read_weights(store: &ModelStore, manifest: &Manifest) -> Weights {
    Weights::from_safetensors(&store.weights(manifest).unwrap(), &manifest.id()).unwrap()
}

fn ids(store: &ModelStore) -> Vec<String> {
    store.list().unwrap().iter().map(Manifest::id).collect()
}

#[tokio::test]
async fn an_average_of_two_versions_is_stored_with_its_parents_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path());
    let v1 = store_autoencoder(&store, "1", 1);
    let v2 = store_autoencoder(&store, "2", 2);
    let (actor, shared) = start(&store).await;

    let outcome = ask(
        &actor,
        request(
            &["pump-ae@1", "pump-ae"],
            MergeMethod::WeightedAverage {
                weights: vec![1.0, 3.0],
            },
        ),
    )
    .await
    .expect("two versions of one network average");
    let merged = &outcome.manifest;
    assert_eq!(merged.id(), "pump-ae@3", "the next whole-number version");
    assert_eq!(
        merged.parents,
        ["pump-ae@1", "pump-ae@2"],
        "a bare name is its newest"
    );
    assert_eq!(merged.training["merge"]["method"], "weighted_average");
    assert_eq!(
        merged.training["merge"]["weights"],
        serde_json::json!([1.0, 3.0])
    );
    assert!(merged.metrics.is_empty());
    assert!(!outcome.validated() && outcome.gate.is_none());
    assert_eq!(
        store.get("pump-ae@3").unwrap(),
        *merged,
        "stored as answered"
    );

    let (a, b, m) = (
        read_weights(&store, &v1),
        read_weights(&store, &v2),
        read_weights(&store, merged),
    );
    let mut checked = 0;
    for ((name, shape, x), (_, _, y)) in a.tensors().zip(b.tensors()) {
        let (merged_shape, z) = m.tensor(name).expect("the merge keeps every tensor");
        assert_eq!(merged_shape, shape);
        for ((x, y), z) in x.iter().zip(y).zip(z) {
            let expected = 0.25 * x + 0.75 * y;
            assert!(
                (z - expected).abs() <= 1e-6 * expected.abs().max(1.0),
                "{name}: {z} != 0.25 × {x} + 0.75 × {y}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, m.tensors().count());
    assert!(checked >= 4, "{checked} tensors");

    let bytes = store.weights(merged).unwrap();
    let served = ServedModel::load(merged, &bytes, &Assets::default(), tch::Device::Cpu)
        .expect("the merged version loads");
    let window = vec![0.1f32; CHANNELS * WINDOW];
    let scored = served.infer(&window).unwrap();
    assert!(scored[0].score.is_finite());

    assert_eq!(shared.merges_done.load(Ordering::Relaxed), 1);
    assert_eq!(shared.merges_refused.load(Ordering::Relaxed), 0);
    let line = shared.last_outcome();
    assert!(
        line.contains("pump-ae@3") && line.contains("unvalidated"),
        "{line}"
    );
    actor.stop(None);
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path());
    store_autoencoder(&store, "1", 1);
    store_autoencoder(&store, "2", 2);
    let (actor, shared) = start(&store).await;

    let ties = MergeMethod::Ties {
        density: 0.5,
        scale: 1.0,
    };
    let refused = ask(&actor, request(&["pump-ae@1", "pump-ae@2"], ties))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, MergeRefused::Merging(MergingError::Merge { .. })),
        "{refused:?}"
    );
    let text = refused.to_string();
    assert!(
        text.contains("invalid base = none") && text.contains("ties"),
        "{text}"
    );

    let mut unknown = request(
        &["pump-ae@1", "pump-ae@9"],
        MergeMethod::WeightedAverage {
            weights: vec![1.0, 1.0],
        },
    );
    let text = ask(&actor, unknown.clone()).await.unwrap_err().to_string();
    assert!(text.contains("pump-ae@9"), "{text}");

    unknown.inputs[1] = "pump-ae@2".into();
    unknown.validation = Some(Validation {
        old: Vec::new(),
        new: Vec::new(),
        gate: ValidationGate::default(),
    });
    let text = ask(&actor, unknown).await.unwrap_err().to_string();
    assert!(text.contains("invalid incumbent = none"), "{text}");

    assert_eq!(ids(&store), ["pump-ae@1", "pump-ae@2"]);
    assert_eq!(shared.merges_refused.load(Ordering::Relaxed), 3);
    assert_eq!(shared.merges_done.load(Ordering::Relaxed), 0);
    assert!(shared
        .last_outcome()
        .starts_with("refused weighted_average"));
    actor.stop(None);
}

#[tokio::test]
async fn versions_of_different_networks_are_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path());
    store_autoencoder(&store, "1", 1);
    let wide = AutoencoderConfig::w1(CHANNELS as i64, 2 * WINDOW as i64);
    let model = ConvAutoencoder::new(wide.clone(), tch::Device::Cpu, 2).unwrap();
    store_version(
        &store,
        "pump-ae-wide",
        "1",
        Architecture::ConvAutoencoder(wide),
        &model.to_safetensors().unwrap().0,
    );
    let forecaster_config = ForecasterConfig {
        channels: CHANNELS as i64,
        context: 12,
        horizon: 4,
        hidden: 8,
        levels: 2,
        kernel: 3,
    };
    let forecaster = TcnForecaster::new(forecaster_config.clone(), tch::Device::Cpu, 3).unwrap();
    store_version(
        &store,
        "pump-tcn",
        "1",
        Architecture::TcnForecaster(forecaster_config),
        &forecaster.to_safetensors().unwrap().0,
    );
    let (actor, _shared) = start(&store).await;
    let average = MergeMethod::WeightedAverage {
        weights: vec![1.0, 1.0],
    };

    let text = ask(
        &actor,
        request(&["pump-ae@1", "pump-ae-wide@1"], average.clone()),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        text.starts_with("pump-ae@1 and pump-ae-wide@1 differ in hyper.window: 16 vs 32"),
        "{text}"
    );
    let text = ask(&actor, request(&["pump-ae@1", "pump-tcn@1"], average))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.starts_with(
            "pump-ae@1 and pump-tcn@1 differ in architecture: conv_autoencoder vs tcn_forecaster"
        ),
        "{text}"
    );
    assert_eq!(ids(&store).len(), 3, "nothing stored");
    actor.stop(None);
}

/// `count` windows (flat, channel-major, stride 1) of one regime.
fn windows(count: usize, shifted: bool, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = SplitMix64::new(seed);
    let rows: Vec<Vec<f32>> = (0..count + WINDOW)
        .map(|t| row(t as u64, shifted, &mut rng))
        .collect();
    (0..count)
        .map(|start| {
            (0..CHANNELS)
                .flat_map(|c| rows[start..start + WINDOW].iter().map(move |r| r[c]))
                .collect()
        })
        .collect()
}

fn items(windows: Vec<Vec<f32>>) -> Vec<ReplayItem> {
    windows
        .into_iter()
        .map(|window| ReplayItem {
            window,
            label: None,
        })
        .collect()
}

#[tokio::test]
async fn a_merge_passes_the_validation_gate_before_it_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path());
    // Version 1 serves as initialised; two nodes fine-tuned it, each on its own windows
    // of both regimes, into replicas that share its starting point.
    let incumbent = store_autoencoder(&store, "1", 1);
    let incumbent_bytes = store.weights(&incumbent).unwrap();
    for (version, seed) in [("2", 20), ("3", 30)] {
        let mut model = ConvAutoencoder::from_safetensors(
            config(),
            &incumbent_bytes,
            Some(&incumbent.weights_sha256),
            tch::Device::Cpu,
        )
        .unwrap();
        let seen: Vec<f32> = windows(150, false, seed)
            .into_iter()
            .chain(windows(150, true, seed + 1))
            .flatten()
            .collect();
        let options = TrainOptions {
            epochs: 8,
            seed: seed as i64,
            ..TrainOptions::default()
        };
        model.fit(&seen, &options, &mut |_| {}).unwrap();
        let (weights, _) = model.to_safetensors().unwrap();
        store_version(
            &store,
            "pump-ae",
            version,
            Architecture::ConvAutoencoder(config()),
            &weights,
        );
    }
    let (actor, shared) = start(&store).await;
    let merge = |gate: ValidationGate| MergeRequest {
        inputs: vec!["pump-ae@2".into(), "pump-ae@3".into()],
        base: Some("pump-ae@1".into()),
        // The mean of the two nodes' deltas.
        method: MergeMethod::TaskArithmetic { scale: 0.5 },
        name: "pump-ae".into(),
        version: None,
        incumbent: Some("pump-ae@1".into()),
        validation: Some(Validation {
            old: items(windows(60, false, 99)),
            new: items(windows(60, true, 98)),
            gate,
        }),
    };

    // No merge cuts the new-regime loss by 99.9 %.
    let refused = ask(
        &actor,
        merge(ValidationGate {
            min_gain: 0.999,
            max_forgetting: 0.1,
        }),
    )
    .await
    .unwrap_err();
    let MergeRefused::Gate {
        merged,
        incumbent: against,
        report,
    } = &refused
    else {
        panic!("refused by the gate, not {refused:?}");
    };
    assert_eq!(
        (merged.as_str(), against.as_str()),
        ("pump-ae@4", "pump-ae@1")
    );
    assert!(!report.promote);
    let text = refused.to_string();
    assert!(
        text.contains("merged versions pass the same validation gate before they serve")
            && text.contains("too little gain on the new regime"),
        "{text}"
    );
    assert_eq!(ids(&store).len(), 3, "a refused merge stores nothing");
    assert!(store.get("pump-ae@4").is_err());

    let outcome = ask(&actor, merge(ValidationGate::default()))
        .await
        .expect("the merged replicas beat the incumbent on both regimes");
    let report = outcome.gate.as_ref().expect("validated");
    assert!(report.promote && outcome.validated(), "{report:?}");
    assert!(
        report.new_after < report.new_before && report.old_after < report.old_before,
        "{report:?}"
    );
    let stored = store.get("pump-ae@4").unwrap();
    assert_eq!(stored.parents, ["pump-ae@2", "pump-ae@3", "pump-ae@1"]);
    assert_eq!(stored.metrics["gate_new_after"], report.new_after);
    assert_eq!(stored.metrics["gate_old_before"], report.old_before);
    assert_eq!(stored.training["validation"]["incumbent"], "pump-ae@1");
    assert_eq!(stored.training["base"], "pump-ae@1");
    assert_eq!(shared.merges_refused.load(Ordering::Relaxed), 1);
    assert_eq!(shared.merges_done.load(Ordering::Relaxed), 1);
    assert!(shared.last_outcome().contains(", validated"));
    actor.stop(None);
}
