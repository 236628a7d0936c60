//! Bring your own model through a node: a TorchScript scorer exported from PyTorch
//! (`scripts/export_torchscript.py`, run with the `python3` that supplies libtorch)
//! serves as an expert behind a router, and gives PyTorch's scores over gRPC; a file
//! whose signature does not match its declaration stops the node from starting.

use std::path::Path;
use std::process::Command;

use fogmesh_actors::Annunciator;
use fogmesh_cluster::{NodeConfig, NodeServer};
use fogmesh_models::store::sign_file;
use fogmesh_proto::ScoreRequest;
use fogmesh_tests::{TestNode, TestPki};
use fogmesh_trust::Role;

const CHANNELS: usize = 8;
const WINDOW: usize = 60;

/// Exports the scorer into `dir` and returns its reference windows and scores.
fn export(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/export_torchscript.py");
    let status = Command::new("python3")
        .arg(&script)
        .arg(dir)
        .status()
        .expect("python3 runs (install torch with `just setup`)");
    assert!(
        status.success(),
        "the export script failed: run `just setup` for torch"
    );
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let floats = |key: &str| -> Vec<f32> {
        reference[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    (floats("input"), floats("output"))
}

fn config(window: usize) -> String {
    format!(
        r#"
[node]
name = "byo-test"
role = "edge"
listen = "127.0.0.1:0"

[[experts]]
name = "byo"
model_version = "from-pytorch"
torchscript = "model.pt"
channels = {CHANNELS}
window = {window}
threshold = 1.0

[[routers]]
name = "line"
policy = "static"
routes = {{ press-1 = ["byo"] }}

[[sensors]]
id = "press-1"
channels = {CHANNELS}
window = {window}
stride = {window}
router = "line"
"#
    )
}

#[tokio::test]
async fn a_torchscript_expert_scores_like_pytorch_behind_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let (inputs, outputs) = export(dir.path());
    // The fixture node has certificates, so it loads only a signed file.
    let seal = TestPki::open(&dir.path().join("pki")).operator_seal();
    sign_file(&seal, &dir.path().join("model.pt")).unwrap();
    let node = TestNode::start_config(dir, &config(WINDOW), Annunciator::new(64)).await;
    let status = node.status().await;
    assert_eq!(status.experts[0].model, "torchscript");
    let mut inference = node.inference().await;
    let per_window = CHANNELS * WINDOW;
    for (i, expected) in outputs.iter().enumerate() {
        let reply = inference
            .score(ScoreRequest {
                router: "line".into(),
                sensor_id: "press-1".into(),
                channels: CHANNELS as u32,
                length: WINDOW as u32,
                values: inputs[i * per_window..(i + 1) * per_window].to_vec(),
            })
            .await
            .expect("the window is scored")
            .into_inner();
        let score = reply.experts[0].score;
        assert!(
            (score - expected).abs() <= 1e-5,
            "window {i}: fogmesh {score}, PyTorch {expected}"
        );
        assert_eq!(reply.experts[0].model_version, "from-pytorch");
    }
    node.stop().await;
}

#[tokio::test]
async fn a_torchscript_file_that_does_not_fit_its_declaration_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    export(dir.path());
    let path = fogmesh_tests::write_config(
        dir.path(),
        &format!("{}\n[tls]\ninsecure = true\n", config(50)),
    );
    let config = NodeConfig::load(&path).expect("the file itself is fine");
    let error = match NodeServer::start_with(config, Annunciator::new(8)).await {
        Ok(_) => panic!("a model taking 60 samples cannot serve windows of 50"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("model.pt"), "names the file: {error}");
    assert!(error.contains("50"), "names the declaration: {error}");
}

#[tokio::test]
async fn a_node_with_certificates_refuses_an_unsigned_or_changed_torchscript_file() {
    let dir = tempfile::tempdir().unwrap();
    export(dir.path());
    let pki = TestPki::open(&dir.path().join("pki"));
    let path = fogmesh_tests::write_config(
        dir.path(),
        &format!(
            "{}\n{}",
            config(WINDOW),
            pki.node_tls_toml("byo-test", Role::Edge)
        ),
    );
    let start = || async {
        let config = NodeConfig::load(&path).expect("the file itself is fine");
        match NodeServer::start_with(config, Annunciator::new(8)).await {
            Ok(_) => panic!("a node with certificates started on a file it cannot trust"),
            Err(e) => e.to_string(),
        }
    };
    let unsigned = start().await;
    for needle in [
        "experts[0].torchscript",
        "model.pt",
        "no signature",
        "fogmesh models sign-file",
    ] {
        assert!(unsigned.contains(needle), "names `{needle}`: {unsigned}");
    }

    let model = dir.path().join("model.pt");
    sign_file(&pki.operator_seal(), &model).unwrap();
    let mut bytes = std::fs::read(&model).unwrap();
    bytes.push(0);
    std::fs::write(&model, bytes).unwrap();
    let changed = start().await;
    assert!(
        changed.contains("experts[0].torchscript") && changed.contains("signature"),
        "{changed}"
    );
    assert!(!changed.contains("no signature"), "{changed}");
}
