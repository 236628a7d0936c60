//! Rolling a stored model version out across `fogmesh node` processes while windows
//! flow, with a node `kill -9`ed mid-rollout; rolling back with `fogmesh rollback`;
//! versions that do not fit refused before any replica swaps.
//!
//! A mesh expert that learns: its learner (on the sensor's node) sees the plant move to
//! a new regime, fine-tunes, validates and promotes by a mesh rollout, so every replica
//! serves the learned version.
//!
//! Only the node the test talks to holds the versions at first: the others copy them
//! through the `ModelStore` service, so this is also the test of shipping versions
//! between nodes.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::fixtures::{
    barrier_window, collect_scored, full_membership, poll, MeshNode, NodeSettings, LONG,
    ONE_MESH_AT_A_TIME,
};
use fogmesh_models::served::Architecture;
use fogmesh_models::store::{Manifest, ModelStore};
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, SplitMix64};
use fogmesh_proto::{ApplyRequest, MeshStatus, RolloutRequest, SampleBatch};
use fogmesh_tests::{metric_value, normal_values, samples, CHANNELS, WINDOW};
use tch::Device;

const SECRET: &str = "rollout-test-secret";

const WINDOWS: u64 = 500;

fn node<'a>(name: &'a str, role: &'a str, ip: &'a str, seeds: &[&MeshNode]) -> NodeSettings<'a> {
    NodeSettings::new(name, role, ip, SECRET, seeds)
}

/// Stores `model` as `ae@version` with the alarm limit `threshold`.
fn import_autoencoder(
    store: &ModelStore,
    version: &str,
    model: &ConvAutoencoder,
    threshold: f64,
    parents: &[&str],
) {
    let (weights, _) = model.to_safetensors().unwrap();
    let architecture = Architecture::ConvAutoencoder(model.config().clone());
    let manifest = Manifest {
        metrics: [("threshold".to_string(), threshold)].into(),
        parents: parents.iter().map(|p| p.to_string()).collect(),
        created_us: version.parse().unwrap(),
        ..architecture.manifest("ae", version)
    };
    store
        .import(manifest, &weights)
        .expect("the store takes it");
}

/// Stores `ae@version`: an untrained autoencoder over `window` samples, weights from
/// `seed`, whose limit no window reaches.
fn store_version(store: &ModelStore, version: &str, window: usize, seed: i64, parents: &[&str]) {
    let config = AutoencoderConfig::w1(CHANNELS as i64, window as i64);
    let model = ConvAutoencoder::new(config, Device::Cpu, seed).unwrap();
    import_autoencoder(store, version, &model, 1000.0, parents);
}

fn spec(model: &str) -> String {
    format!(
        r#"
[[experts]]
name = "ae"
model = "{model}"
replicas = 2

[[routers]]
name = "r1"
policy = "static"
routes = {{ s1 = ["ae"] }}

[[sensors]]
node = "edge-1"
id = "s1"
channels = {CHANNELS}
window = {WINDOW}
stride = {WINDOW}
router = "r1"
"#
    )
}

/// Hosts of `ae` and the version each gossips, once every host reports one.
fn replicas(mesh: &MeshStatus) -> Vec<(String, String)> {
    let hosts = mesh
        .placement
        .iter()
        .find(|p| p.expert == "ae")
        .map(|p| p.nodes.clone())
        .unwrap_or_default();
    hosts
        .into_iter()
        .filter_map(|host| {
            mesh.versions
                .iter()
                .find(|v| v.node == host && v.expert == "ae")
                .map(|v| (host, v.model_version.clone()))
        })
        .collect()
}

/// Waits until both replicas of `ae`, on live nodes other than `not_on`, serve `version`.
async fn all_serve(observer: &MeshNode, version: &str, not_on: Option<&str>) -> Vec<String> {
    poll(
        &format!("every replica of ae to serve {version}"),
        LONG,
        || async {
            let replicas = replicas(&observer.mesh().await?);
            (replicas.len() == 2
                && replicas
                    .iter()
                    .all(|(host, v)| v == version && Some(host.as_str()) != not_on))
            .then(|| replicas.into_iter().map(|(host, _)| host).collect())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_rolls_out_across_the_mesh_through_a_killed_node_and_rolls_back() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    // The versions live in edge-1's store only (its `[cluster] data` folder's `models`).
    // They are signed by the mesh's operator, except ae@5, stored unsigned.
    let pki = fogmesh_tests::TestPki::open(&dir.path().join("pki"));
    let store = pki.signing_store(&dir.path().join("data-edge-1/models"));
    store_version(&store, "1", WINDOW, 1, &[]);
    store_version(&store, "2", WINDOW, 2, &["ae@1"]);
    store_version(&store, "3", WINDOW * 2, 3, &[]);
    store_version(&store, "4", WINDOW, 4, &[]);
    store_version(
        &ModelStore::open(dir.path().join("data-edge-1/models")),
        "5",
        WINDOW,
        5,
        &[],
    );
    let tampered = store.get("ae@4").unwrap();
    let blob = dir.path().join(format!(
        "data-edge-1/models/blobs/{}.safetensors",
        tampered.weights_sha256
    ));
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&blob, bytes).unwrap();

    let edge = MeshNode::start(dir.path(), node("edge-1", "edge", "127.0.0.41", &[]));
    let fog_a = MeshNode::start(dir.path(), node("fog-a", "fog", "127.0.0.42", &[&edge]));
    let fog_b = MeshNode::start(dir.path(), node("fog-b", "fog", "127.0.0.43", &[&edge]));
    for n in [&edge, &fog_a, &fog_b] {
        full_membership(n, 3, LONG).await;
    }
    edge.control()
        .await
        .apply(ApplyRequest {
            spec_toml: spec("ae@1"),
            dry_run: false,
        })
        .await
        .expect("the spec naming ae@1 is applied");
    let hosts = all_serve(&edge, "ae@1", None).await;

    // Windows flow while the version changes; each scored window names its version.
    let (seen, collector) = collect_scored(&edge, "s1", |alert| {
        let version = alert
            .experts
            .first()
            .map(|e| e.model_version.clone())
            .unwrap_or_default();
        (alert.window_sequence, version)
    })
    .await;
    let producer = {
        let mut ingest = edge.ingest().await;
        tokio::spawn(async move {
            for w in 0..WINDOWS {
                let first = w * WINDOW as u64;
                let batch = SampleBatch {
                    samples: samples("s1", first..first + WINDOW as u64, normal_values),
                };
                ingest.push(batch).await.expect("every batch is accepted");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let scored = || seen.lock().unwrap().len();
    poll("windows scored on v1", LONG, || async {
        (scored() >= 50).then_some(())
    })
    .await;

    // Roll out ae@2 and kill -9 a fog node hosting a replica at the same moment.
    let (mut victim, survivor) = if hosts.iter().any(|h| h == "fog-a") {
        (fog_a, fog_b)
    } else {
        (fog_b, fog_a)
    };
    let mut control = edge.control().await;
    let rollout = control.rollout(RolloutRequest {
        expert: "ae".into(),
        model: "2".into(),
        rollback: false,
    });
    let kill = async {
        tokio::time::sleep(Duration::from_millis(2)).await;
        victim.kill();
    };
    let (reply, ()) = tokio::join!(rollout, kill);
    let reply = reply.expect("the rollout is accepted").into_inner();
    eprintln!("rollout with {} killed: {reply:?}", victim.name);
    // Killed before or after its upload, the rollout goes on without it.
    assert_eq!(reply.outcome, "committed", "{reply:?}");
    assert_eq!((reply.from.as_str(), reply.to.as_str()), ("ae@1", "ae@2"));
    let hosts = all_serve(&edge, "ae@2", Some(&victim.name)).await;
    assert!(hosts.contains(&survivor.name) || hosts.contains(&edge.name));

    producer.await.expect("the producer finished");
    poll("every window scored", LONG, || async {
        (scored() >= WINDOWS as usize).then_some(())
    })
    .await;
    barrier_window(&edge, "s1", WINDOWS, || {
        seen.lock().unwrap().iter().any(|(s, _)| *s == WINDOWS)
    })
    .await;
    collector.abort();
    let mut windows = seen.lock().unwrap().clone();
    windows.retain(|(s, _)| *s != WINDOWS);
    let sequences: BTreeSet<u64> = windows.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        windows.len(),
        WINDOWS as usize,
        "each window scored exactly once"
    );
    assert_eq!(sequences.len(), WINDOWS as usize, "none twice, none lost");
    let versions: BTreeSet<&str> = windows.iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!(
        versions,
        BTreeSet::from(["ae@1", "ae@2"]),
        "no other version scored"
    );
    assert!(
        windows[windows.len() - 50..]
            .iter()
            .all(|(_, v)| v == "ae@2"),
        "the last windows are scored by the new version"
    );
    let router = &edge.status().await.unwrap().routers[0];
    assert_eq!(
        (router.routed, router.failed),
        (WINDOWS + 1, 0),
        "no request failed (the windows and the barrier)"
    );

    // The killed node returns and copies the version it missed from a peer.
    victim.restart();
    let copied = dir
        .path()
        .join(format!("data-{}/models/manifests/ae/2.json", victim.name));
    poll("the returned node to hold ae@2", LONG, || async {
        copied.is_file().then_some(())
    })
    .await;

    // Versions that do not fit, or are not signed, are refused before any replica
    // swaps; so is a rollout back to an older version (that is a rollback).
    let spec_version = edge.mesh().await.unwrap().spec_version;
    for (version, code, problem) in [
        ("3", tonic::Code::InvalidArgument, "windows of 64 values"),
        ("4", tonic::Code::InvalidArgument, "tampered"),
        ("5", tonic::Code::InvalidArgument, "no signature"),
        ("1", tonic::Code::FailedPrecondition, "rollback"),
    ] {
        let refused = control
            .rollout(RolloutRequest {
                expert: "ae".into(),
                model: version.into(),
                rollback: false,
            })
            .await
            .expect_err("a version that does not fit");
        assert_eq!(refused.code(), code, "{version}: {refused:?}");
        assert!(refused.message().contains(problem), "{}", refused.message());
    }
    assert_eq!(edge.mesh().await.unwrap().spec_version, spec_version);
    all_serve(&edge, "ae@2", None).await;
    let log = edge.log();
    for reason in ["unsigned", "downgrade"] {
        assert!(
            log.lines().any(|l| l.contains("fogmesh::audit")
                && l.contains("outcome=\"refused\"")
                && l.contains(&format!("reason=\"{reason}\""))),
            "an audit line for the {reason} version"
        );
    }
    let metrics = edge.metrics_text().await;
    for reason in ["unsigned", "downgrade"] {
        assert!(
            metric_value(
                &metrics,
                "fogmesh_models_refused_total",
                &[("reason", reason)]
            )
            .is_some_and(|n| n >= 1.0),
            "the {reason} refusal is counted"
        );
    }

    // `fogmesh rollback`: back to the parent of ae@2 on every replica.
    let output = edge
        .cli()
        .args(["rollback", "--node", &edge.url(), "ae"])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .await
        .expect("the fogmesh binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("from ae@2 to ae@1: committed"), "{stdout}");
    all_serve(&edge, "ae@1", None).await;
    let mesh = edge.mesh().await.unwrap();
    let last = mesh.last_rollout.expect("the last rollout is kept");
    assert_eq!(
        (last.to.as_str(), last.outcome.as_str()),
        ("ae@1", "committed")
    );
    drop(survivor);
}

/// Regime A (what version 1 learned) or B (a new operating point), one row.
fn plant_row(t: u64, shifted: bool, rng: &mut SplitMix64) -> Vec<f32> {
    (0..CHANNELS)
        .map(|c| {
            let (t, c) = (t as f64, c as f64);
            let clean = if shifted {
                1.0 + 0.6 * (0.9 * t + 2.0 * c).sin()
            } else {
                (0.4 * t + c).sin()
            };
            (clean + 0.05 * rng.normal()) as f32
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_expert_learns_a_new_regime_and_every_replica_gets_the_version() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    // Version 1 learned regime A; its alarm limit is its q0.99 there.
    let pki = fogmesh_tests::TestPki::open(&dir.path().join("pki"));
    let store = pki.signing_store(&dir.path().join("data-edge-1/models"));
    let config = AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64);
    let mut rng = SplitMix64::new(11);
    let rows: Vec<Vec<f32>> = (0..600).map(|t| plant_row(t, false, &mut rng)).collect();
    let mut windows = Vec::new();
    for start in (0..=rows.len() - WINDOW).step_by(4) {
        for c in 0..CHANNELS {
            windows.extend(rows[start..start + WINDOW].iter().map(|r| r[c]));
        }
    }
    let mut model = ConvAutoencoder::new(config.clone(), Device::Cpu, 1).unwrap();
    let options = fogmesh_models::TrainOptions {
        epochs: 30,
        ..Default::default()
    };
    model.fit(&windows, &options, &mut |_| {}).unwrap();
    let threshold = fogmesh_models::quantile(&model.score(&windows).unwrap(), 0.99).unwrap();
    import_autoencoder(&store, "1", &model, f64::from(threshold), &[]);

    let edge = MeshNode::start(dir.path(), node("edge-1", "edge", "127.0.0.44", &[]));
    let fog = MeshNode::start(dir.path(), node("fog-a", "fog", "127.0.0.45", &[&edge]));
    for n in [&edge, &fog] {
        full_membership(n, 2, LONG).await;
    }
    let learning = "
[experts.learning]
reservoir = 256
min_new_windows = 64
max_new_windows = 512
seed = 3

[experts.learning.fine_tune]
epochs = 40

[experts.learning.gate]
min_gain = 0.1
max_forgetting = 1.0
";
    let text = spec("ae@1")
        .replace("replicas = 2", &format!("replicas = 2\n{learning}"))
        .replace(
            "router = \"r1\"",
            "router = \"r1\"\nnormalisation = { mode = \"none\" }",
        );
    edge.control()
        .await
        .apply(ApplyRequest {
            spec_toml: text,
            dry_run: false,
        })
        .await
        .expect("the spec with a learning expert is applied");
    all_serve(&edge, "ae@1", None).await;

    // The plant in regime A, then B; every batch acknowledged before the next.
    let mut ingest = edge.ingest().await;
    let mut rng = SplitMix64::new(5);
    let mut push = |first: u64, rows: u64, shifted: bool| {
        let batch: Vec<fogmesh_proto::Sample> = (first..first + rows)
            .map(|t| fogmesh_proto::Sample {
                sensor_id: "s1".into(),
                sequence: t,
                timestamp_us: fogmesh_tests::START_US + t as i64 * fogmesh_tests::SAMPLE_PERIOD_US,
                values: plant_row(t, shifted, &mut rng),
            })
            .collect();
        SampleBatch { samples: batch }
    };
    let mut t = 0;
    for _ in 0..40 {
        ingest
            .push(push(t, WINDOW as u64 * 5, false))
            .await
            .unwrap();
        t += WINDOW as u64 * 5;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let promoted = poll(
        "the learner's version on every replica",
        Duration::from_secs(240),
        || {
            let batch = push(t, WINDOW as u64 * 5, true);
            t += WINDOW as u64 * 5;
            let mut ingest = ingest.clone();
            let edge = &edge;
            async move {
                ingest.push(batch).await.ok()?;
                let replicas = replicas(&edge.mesh().await?);
                (replicas.len() == 2 && replicas.iter().all(|(_, v)| v == "ae@2"))
                    .then_some(replicas)
            }
        },
    )
    .await;
    eprintln!("every replica serves the learned version: {promoted:?}");
    let learned = ModelStore::open(dir.path().join("data-fog-a/models"))
        .get("ae@2")
        .expect("the learned version was shipped to the other node");
    assert_eq!(learned.parents, vec!["ae@1".to_string()]);
    assert!(
        learned.metrics.contains_key("gate_new_after"),
        "{:?}",
        learned.metrics
    );
    let status = edge.status().await.expect("status");
    let learner = status
        .learners
        .iter()
        .find(|l| l.expert == "ae")
        .expect("the learner shows in the edge node's status");
    assert!(learner.promotions >= 1, "{learner:?}");
    let last = edge
        .mesh()
        .await
        .unwrap()
        .last_rollout
        .expect("the promotion was a rollout");
    assert_eq!(
        (last.to.as_str(), last.outcome.as_str()),
        ("ae@2", "committed")
    );
    drop(fog);
}
