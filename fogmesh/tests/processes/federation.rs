//! Federated rounds across `fogmesh node` processes: two edge nodes whose sensors feed
//! an autoencoder are its sites, a cloud node coordinates. A round asked of an edge
//! node (`fogmesh federate`) is passed to the coordinator, trains on both edges' own
//! windows, and its version is stored with its lineage and served by every replica;
//! with one edge `kill -9`ed mid-round the round completes with the other; with the
//! coordinator's node killed mid-round the round runs again on the next cloud node
//! and exactly one new version comes of it. Two levels, a buffered run and a
//! distillation round between sites whose networks differ run on a four-node mesh.

use std::time::Duration;

use crate::fixtures::{
    full_membership, poll, store_ae_1, MeshNode, NodeSettings, LONG, ONE_MESH_AT_A_TIME,
};
use fogmesh_models::served::Architecture;
use fogmesh_models::store::ModelStore;
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, SplitMix64};
use fogmesh_proto::federation_client::FederationClient;
use fogmesh_proto::{ApplyRequest, FederateRequest, MeshStatus, Sample, SampleBatch};
use fogmesh_tests::{CHANNELS, WINDOW};
use tch::Device;

const SECRET: &str = "federation-test-secret";

fn node<'a>(name: &'a str, role: &'a str, ip: &'a str, seeds: &[&MeshNode]) -> NodeSettings<'a> {
    NodeSettings::new(name, role, ip, SECRET, seeds)
}

/// The mesh spec: `ae` serving `model`, trained by the federation `federation`
/// (the lines of its table) with `epochs` of local work.
fn spec(model: &str, federation: &str, epochs: usize) -> String {
    format!(
        r#"
[[experts]]
name = "ae"
model = "{model}"
replicas = 2

[experts.federation]
min_sites = 1
deadline_s = 60
windows = 256
seed = 5
{federation}

[experts.federation.local]
epochs = {epochs}
batch_size = 16
learning_rate = 0.003

[[routers]]
name = "r1"
policy = "static"
routes = {{ s1 = ["ae"], s2 = ["ae"] }}

[[sensors]]
node = "edge-1"
id = "s1"
channels = {CHANNELS}
window = {WINDOW}
stride = {WINDOW}
router = "r1"
normalisation = {{ mode = "none" }}

[[sensors]]
node = "edge-2"
id = "s2"
channels = {CHANNELS}
window = {WINDOW}
stride = {WINDOW}
router = "r1"
normalisation = {{ mode = "none" }}
"#
    )
}

/// One row of the plant as `sensor` reads it: each site sees its own operating point.
fn row(sensor: &str, t: u64, rng: &mut SplitMix64) -> Vec<f32> {
    let offset = if sensor == "s1" { 0.0 } else { 1.5 };
    (0..CHANNELS)
        .map(|c| (offset + (0.3 * t as f64 + c as f64).sin() + 0.05 * rng.normal()) as f32)
        .collect()
}

async fn push(node: &MeshNode, sensor: &str, rows: std::ops::Range<u64>) {
    let mut rng = SplitMix64::new(rows.start ^ 0x5eed);
    let samples: Vec<Sample> = rows
        .map(|t| Sample {
            sensor_id: sensor.into(),
            sequence: t,
            timestamp_us: fogmesh_tests::START_US + t as i64 * fogmesh_tests::SAMPLE_PERIOD_US,
            values: row(sensor, t, &mut rng),
        })
        .collect();
    node.ingest()
        .await
        .push(SampleBatch { samples })
        .await
        .expect("the batch is accepted");
}

/// The version every live replica of `ae` serves, once all agree.
fn served(mesh: &MeshStatus) -> Option<String> {
    let hosts = mesh
        .placement
        .iter()
        .find(|p| p.expert == "ae")
        .map(|p| p.nodes.clone())
        .unwrap_or_default();
    let versions: Vec<&str> = hosts
        .iter()
        .filter_map(|h| {
            mesh.versions
                .iter()
                .find(|v| &v.node == h && v.expert == "ae")
                .map(|v| v.model_version.as_str())
        })
        .collect();
    (versions.len() == 2 && versions.iter().all(|v| *v == versions[0]))
        .then(|| versions[0].to_string())
}

async fn all_serve(observer: &MeshNode, version: &str) {
    poll(
        &format!("every replica of ae to serve {version}"),
        Duration::from_secs(90),
        || async { (served(&observer.mesh().await?)? == version).then_some(()) },
    )
    .await;
}

/// Waits until `coordinator` is in a round: its status says so while it trains.
async fn in_a_round(coordinator: &MeshNode) {
    poll("the coordinator to be in a round", LONG, || async {
        let status = coordinator.status().await?;
        status
            .federations
            .iter()
            .any(|f| f.last_error == "a round is running")
            .then_some(())
    })
    .await;
}

fn names(round: &serde_json::Value, field: &str) -> Vec<String> {
    round[field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_rounds_train_on_each_edge_and_survive_a_lost_site_and_a_lost_coordinator() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let pki = fogmesh_tests::TestPki::open(&dir.path().join("pki"));
    let store = pki.signing_store(&dir.path().join("data-cloud-1/models"));
    let config = AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64);
    let model = ConvAutoencoder::new(config.clone(), Device::Cpu, 3).unwrap();
    let (weights, _) = model.to_safetensors().unwrap();
    let manifest = fogmesh_models::store::Manifest {
        metrics: [("threshold".to_string(), 1000.0)].into(),
        created_us: 1,
        ..Architecture::ConvAutoencoder(config).manifest("ae", "1")
    };
    store
        .import(manifest, &weights)
        .expect("the store takes ae@1");

    let cloud1 = MeshNode::start(dir.path(), node("cloud-1", "cloud", "127.0.0.61", &[]));
    let mut cloud2 = MeshNode::start(
        dir.path(),
        node("cloud-2", "cloud", "127.0.0.62", &[&cloud1]),
    );
    let edge1 = MeshNode::start(dir.path(), node("edge-1", "edge", "127.0.0.63", &[&cloud1]));
    let mut edge2 = MeshNode::start(dir.path(), node("edge-2", "edge", "127.0.0.64", &[&cloud1]));
    let mut cloud1 = cloud1;
    for n in [&cloud1, &cloud2, &edge1, &edge2] {
        full_membership(n, 4, LONG).await;
    }
    cloud1
        .control()
        .await
        .apply(ApplyRequest {
            // Privacy noise small enough to leave training alone: the test reads the
            // accountant's count across coordinators, not ε's size.
            spec_toml: spec(
                "ae@1",
                "privacy = { clip_norm = 10.0, noise_multiplier = 0.001 }",
                300,
            ),
            dry_run: false,
        })
        .await
        .expect("the spec with a federation is applied");
    all_serve(&edge1, "ae@1").await;
    let rows = WINDOW as u64 * 200;
    push(&edge1, "s1", 0..rows).await;
    push(&edge2, "s2", 0..rows).await;

    // 1. A round asked of an edge node (`fogmesh federate`) runs on cloud-1 with both
    // edges' windows.
    let first = poll(
        "a round with both sites",
        Duration::from_secs(90),
        || async {
            let output = edge1
                .cli()
                .args(["federate", "--node", &edge1.addr, "ae"])
                .output()
                .await
                .expect("fogmesh federate runs");
            let round: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
            (names(&round, "sites") == ["edge-1", "edge-2"]).then_some(round)
        },
    )
    .await;
    eprintln!("first round: {first}");
    assert_eq!(first["version"], "ae@2", "{first}");
    assert!(first["loss"].as_f64().is_some(), "{first}");
    assert!(first["bytes_up"].as_u64() > Some(0), "{first}");
    all_serve(&edge1, "ae@2").await;
    let stored = ModelStore::open(dir.path().join("data-cloud-1/models"))
        .get("ae@2")
        .expect("the coordinator stored the round's version");
    assert_eq!(stored.parents, ["ae@1"]);
    let lineage = &stored.training["federated"];
    assert_eq!(lineage["sites"], serde_json::json!(["edge-1", "edge-2"]));
    assert_eq!(lineage["samples"], first["samples"]);
    let status = cloud1.status().await.expect("status");
    let federation = status
        .federations
        .iter()
        .find(|f| f.expert == "ae")
        .expect("cloud-1 shows the federation it coordinates");
    assert_eq!(federation.version, "ae@2");
    assert_eq!(federation.last_sites, ["edge-1", "edge-2"]);
    assert!(federation.last_bytes_up > 0 && federation.last_loss.is_some());
    assert!(edge1.status().await.unwrap().federations.is_empty());

    // 2. A site killed mid-round: the round completes with the other.
    let asked = tokio::spawn({
        let channel = edge1.channel(&edge1.operator).await.unwrap();
        async move {
            FederationClient::new(channel)
                .federate(FederateRequest {
                    expert: "ae".into(),
                })
                .await
        }
    });
    in_a_round(&cloud1).await;
    edge2.kill();
    let second = asked
        .await
        .unwrap()
        .expect("the round completes without the killed site")
        .into_inner();
    let second: serde_json::Value = serde_json::from_str(&second.round_json).unwrap();
    eprintln!("round with a site killed: {second}");
    assert_eq!(names(&second, "sites"), ["edge-1"], "{second}");
    assert_eq!(
        names(&second, "failed")
            .into_iter()
            .chain(names(&second, "stragglers"))
            .collect::<Vec<_>>(),
        ["edge-2"]
    );
    assert_eq!(second["version"], "ae@3", "{second}");
    all_serve(&edge1, "ae@3").await;
    // The site comes back: with two of the four nodes dead, the two left would be a
    // minority of the mesh and rightly refuse to roll out the next round's version.
    edge2.restart();
    for n in [&edge1, &edge2, &cloud2] {
        full_membership(n, 4, LONG).await;
    }

    // 3. The coordinator's node killed mid-round: the round runs again on cloud-2.
    let asked = tokio::spawn({
        let channel = edge1.channel(&edge1.operator).await.unwrap();
        async move {
            FederationClient::new(channel)
                .federate(FederateRequest {
                    expert: "ae".into(),
                })
                .await
        }
    });
    in_a_round(&cloud1).await;
    cloud1.kill();
    let third = asked
        .await
        .unwrap()
        .expect("the round runs again on the next coordinator")
        .into_inner();
    assert_eq!(third.coordinator, "cloud-2");
    let third: serde_json::Value = serde_json::from_str(&third.round_json).unwrap();
    eprintln!("round after the coordinator was killed: {third}");
    assert_eq!(third["version"], "ae@4", "{third}");
    all_serve(&edge1, "ae@4").await;
    // cloud-2's accountant went on from cloud-1's rounds: privacy spent is never
    // forgotten with the node that spent it.
    let store = ModelStore::open(dir.path().join("data-cloud-2/models"));
    let spent = |version: &str| {
        let lineage = store.get(version).expect("the version is stored").training;
        let spent = &lineage["federated"]["privacy_spent"];
        (
            spent["rounds"].as_u64().unwrap_or(0),
            lineage["federated"]["epsilon"].as_f64(),
        )
    };
    let (two, three, four) = (spent("ae@2"), spent("ae@3"), spent("ae@4"));
    assert_eq!((two.0, three.0), (1, 2));
    assert!(four.0 >= 3, "ae@4 counts {} private rounds", four.0);
    assert!(
        two.1 < three.1 && three.1 < four.1,
        "{two:?} {three:?} {four:?}"
    );
    for live in ["cloud-2", "edge-1", "edge-2"] {
        let store = ModelStore::open(dir.path().join(format!("data-{live}/models")));
        let versions: Vec<String> = store
            .list()
            .unwrap()
            .into_iter()
            .filter(|m| m.name == "ae")
            .map(|m| m.version)
            .collect();
        assert!(
            !versions.iter().any(|v| v == "5"),
            "exactly one version came of the round: {live} holds {versions:?}"
        );
    }
    cloud2.kill();
}

/// Asks `via` for a round; its report.
async fn federate(via: &MeshNode) -> Result<serde_json::Value, tonic::Status> {
    let channel = via.channel(&via.operator).await.expect("the node answers");
    let reply = FederationClient::new(channel)
        .federate(FederateRequest {
            expert: "ae".into(),
        })
        .await?
        .into_inner();
    Ok(serde_json::from_str(&reply.round_json).expect("the round is JSON"))
}

async fn apply(node: &MeshNode, text: String) {
    node.control()
        .await
        .apply(ApplyRequest {
            spec_toml: text,
            dry_run: false,
        })
        .await
        .expect("the spec is applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fog_aggregator_merges_its_edges_under_the_cloud_and_a_buffered_run_stores_one_version() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    store_ae_1(dir.path());
    let in_zone = |settings, zone| NodeSettings {
        zone: Some(zone),
        ..settings
    };
    let cloud = MeshNode::start(dir.path(), node("cloud-1", "cloud", "127.0.0.71", &[]));
    let fog = MeshNode::start(
        dir.path(),
        in_zone(node("fog-a", "fog", "127.0.0.72", &[&cloud]), "site-1"),
    );
    let edge1 = MeshNode::start(
        dir.path(),
        in_zone(
            node("edge-1", "edge", "127.0.0.73", &[&cloud]),
            "site-1/cell-1",
        ),
    );
    let edge2 = MeshNode::start(
        dir.path(),
        in_zone(
            node("edge-2", "edge", "127.0.0.74", &[&cloud]),
            "site-1/cell-2",
        ),
    );
    for n in [&cloud, &fog, &edge1, &edge2] {
        full_membership(n, 4, LONG).await;
    }
    // The group by place: the sites (the edges, whose sensors feed `ae`) inside site-1.
    let groups = "[[experts.federation.groups]]\naggregator = \"fog-a\"\nzone = \"site-1/*\"";
    apply(&cloud, spec("ae@1", groups, 60)).await;
    all_serve(&edge1, "ae@1").await;
    let rows = WINDOW as u64 * 200;
    push(&edge1, "s1", 0..rows).await;
    push(&edge2, "s2", 0..rows).await;

    // Two levels: the cloud asks the fog aggregator, which asks both edges.
    let round = poll(
        "a round through the fog aggregator",
        Duration::from_secs(90),
        || async {
            let round = federate(&edge2).await.ok()?;
            // Each edge holds at most 160 windows to train on: more came from both.
            (round["samples"].as_u64() > Some(160)).then_some(round)
        },
    )
    .await;
    eprintln!("two-level round: {round}");
    assert_eq!(names(&round, "sites"), ["fog-a"], "{round}");
    let version = round["version"].as_str().expect("a version").to_string();
    all_serve(&edge1, &version).await;
    let stored = ModelStore::open(dir.path().join("data-cloud-1/models"))
        .get(&version)
        .unwrap();
    assert_eq!(
        stored.training["federated"]["sites"],
        serde_json::json!(["fog-a"])
    );
    assert_eq!(stored.training["federated"]["samples"], round["samples"]);

    // Asynchronous: every answer is applied as it comes, four in all, one version.
    apply(
        &cloud,
        spec(&version, "buffered = { buffer = 1, updates = 4 }", 60),
    )
    .await;
    poll("the coordinator to run buffered rounds", LONG, || async {
        let status = cloud.status().await?;
        status
            .federations
            .iter()
            .any(|f| f.mode == "buffered")
            .then_some(())
    })
    .await;
    let run = poll("a buffered run", Duration::from_secs(90), || async {
        let run = federate(&edge1).await.ok()?;
        (run["mode"] == "buffered").then_some(run)
    })
    .await;
    eprintln!("buffered run: {run}");
    assert_eq!(run["applied"], 4, "{run}");
    let number: u64 = version["ae@".len()..].parse().unwrap();
    let next = format!("ae@{}", number + 1);
    assert_eq!(run["version"], next.as_str(), "{run}");
    all_serve(&edge1, &next).await;
    let store = ModelStore::open(dir.path().join("data-cloud-1/models"));
    assert_eq!(store.get(&next).unwrap().parents, [version]);
    assert!(
        store.get(&format!("ae@{}", number + 2)).is_err(),
        "a buffered run stores one version"
    );

    // Distillation: edge-1 trains a narrower autoencoder than the expert's; the sites
    // exchange only their outputs on windows the plant shares, and the cloud's network
    // learns from their consensus.
    let shared = dir.path().join("shared-windows.safetensors");
    write_shared(&shared);
    let distillation = format!(
        "[experts.federation.distillation]\nshared = \"{}\"\nhidden = {{ edge-1 = 8 }}",
        shared.display()
    );
    apply(&cloud, spec(&next, &distillation, 20)).await;
    poll(
        "the coordinator to run distillation rounds",
        LONG,
        || async {
            let status = cloud.status().await?;
            status
                .federations
                .iter()
                .any(|f| f.mode == "distillation")
                .then_some(())
        },
    )
    .await;
    // edge-1's site started again with its own network, and without windows.
    push(&edge1, "s1", rows..2 * rows).await;
    push(&edge2, "s2", rows..2 * rows).await;
    let round = poll("a distillation round", Duration::from_secs(90), || async {
        let round = federate(&edge1).await.ok()?;
        (names(&round, "sites").len() == 2).then_some(round)
    })
    .await;
    eprintln!("distillation round: {round}");
    assert_eq!(round["mode"], "distillation", "{round}");
    let distilled = round["version"].as_str().expect("a version").to_string();
    all_serve(&edge2, &distilled).await;
    let stored = store.get(&distilled).unwrap();
    assert_eq!(stored.training["federated"]["mode"], "distillation");
    assert_eq!(
        stored.training["federated"]["distillation"]["shared_windows"],
        SHARED_WINDOWS as u64
    );
    drop((fog, edge1, edge2));
}

const SHARED_WINDOWS: usize = 32;

/// Windows of both operating points, unlabelled, as a plant would export what it agreed
/// to share: `[n, channels, window]` in a safetensors file.
fn write_shared(path: &std::path::Path) {
    let mut rng = SplitMix64::new(77);
    let mut values = Vec::new();
    for w in 0..SHARED_WINDOWS as u64 {
        let sensor = if w % 2 == 0 { "s1" } else { "s2" };
        let rows: Vec<Vec<f32>> = (0..WINDOW as u64)
            .map(|t| row(sensor, 10_000 + w * WINDOW as u64 + t, &mut rng))
            .collect();
        values.extend((0..CHANNELS).flat_map(|c| rows.iter().map(move |r| r[c])));
    }
    let windows = tch::Tensor::from_slice(&values).view([
        SHARED_WINDOWS as i64,
        CHANNELS as i64,
        WINDOW as i64,
    ]);
    tch::Tensor::write_safetensors(&[("windows", &windows)], path)
        .expect("the shared windows are written");
}
