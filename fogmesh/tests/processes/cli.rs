//! The `fogmesh` binary as an operator runs it: its own process, started from a
//! config file without `LD_LIBRARY_PATH` (libtorch is found through the rpath the
//! build embeds), reached over gRPC and by `fogmesh status`, stopped by a signal; and
//! refused with the file, field and value when its config is wrong.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::fixtures::fogmesh_binary;
use fogmesh_cluster::dialer::Dialer;
use fogmesh_proto::inference_client::InferenceClient;
use fogmesh_proto::ingest_client::IngestClient;
use fogmesh_proto::{SampleBatch, ScoreRequest};
use fogmesh_tests::{
    node_toml, normal_values, samples, write_config, TestPki, EXPERT, NODE, SENSOR,
};
use fogmesh_trust::{MeshTls, Role, TlsFiles};

/// The node process, killed if the test ends without stopping it.
struct NodeProcess(Option<Child>);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_node(config: &std::path::Path) -> NodeProcess {
    let child = Command::new(fogmesh_binary())
        .args(["node", "--config"])
        .arg(config)
        .env_remove("LD_LIBRARY_PATH")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("the fogmesh binary starts");
    NodeProcess(Some(child))
}

/// Reads the node's log until it says where it serves gRPC; the log then goes on
/// draining in the background so the node never blocks on a full pipe.
fn grpc_address(child: &mut Child) -> String {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("serving gRPC") {
                let addr = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("grpc_addr="))
                    .map(str::to_string);
                let _ = tx.send(addr);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the node logs its gRPC address within a minute")
        .expect("the log line carries grpc_addr")
}

/// Runs `fogmesh ARGS` and fails the test, with its output, unless it succeeds.
fn fogmesh_ok(args: &[&str]) -> String {
    let output = Command::new(fogmesh_binary())
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("the fogmesh binary runs");
    assert!(output.status.success(), "fogmesh {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn fogmesh_node_serves_ingest_and_status_and_stops_cleanly_on_sigint() {
    // The mesh's certificates, made the way the README says.
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    let (ca, certs) = (path("ca"), path("certs"));
    fogmesh_ok(&["ca", "init", "--out", &ca]);
    fogmesh_ok(&[
        "ca", "issue", NODE, "--role", "edge", "--ca", &ca, "--out", &certs,
    ]);
    fogmesh_ok(&[
        "ca", "issue", "op", "--role", "operator", "--ca", &ca, "--out", &certs,
    ]);
    fogmesh_ok(&[
        "ca", "issue", "line-1", "--role", "sensor", "--sensor", SENSOR, "--ca", &ca, "--out",
        &certs,
    ]);
    let tls = format!(
        "\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{NODE}.pem\"\nkey = \"certs/{NODE}.key\"\n"
    );
    let config = write_config(dir.path(), &format!("{}{tls}", node_toml("")));
    let mut node = start_node(&config);
    let addr = grpc_address(node.0.as_mut().expect("started"));
    let sensor = MeshTls::load(&TlsFiles {
        ca: dir.path().join("certs/ca.pem"),
        cert: dir.path().join("certs/line-1.pem"),
        key: dir.path().join("certs/line-1.key"),
    })
    .expect("the sensor certificate loads");
    let channel = Dialer::new(Some(sensor), None)
        .channel(&addr)
        .await
        .expect("connects")
        .channel;
    let mut ingest = IngestClient::new(channel);
    let ack = ingest
        .push(SampleBatch {
            samples: samples(SENSOR, 0..20, normal_values),
        })
        .await
        .expect("the batch is accepted")
        .into_inner();
    assert_eq!(ack.accepted, 20);
    assert_eq!(ack.streams[0].acked_through, 19);

    let child = node.0.take().expect("still running");
    let refused = Command::new(fogmesh_binary())
        .args(["status", "--node", &addr])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("fogmesh status runs");
    assert!(
        !refused.status.success(),
        "a plaintext status call is refused"
    );
    let tables = Command::new(fogmesh_binary())
        .args(["status", "--node", &addr])
        .env("FOGMESH_CA", dir.path().join("certs/ca.pem"))
        .env("FOGMESH_CERT", dir.path().join("certs/op.pem"))
        .env("FOGMESH_KEY", dir.path().join("certs/op.key"))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("fogmesh status runs");
    assert!(tables.status.success(), "{tables:?}");
    let tables = String::from_utf8_lossy(&tables.stdout);
    let sensor_line = tables
        .lines()
        .find(|l| l.starts_with(SENSOR))
        .unwrap_or_else(|| panic!("a line for {SENSOR}: {tables}"));
    assert!(
        sensor_line.split_whitespace().any(|w| w == "20"),
        "20 accepted: {tables}"
    );
    assert!(tables.lines().any(|l| l.starts_with(EXPERT)), "{tables}");

    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(interrupted.success());
    let mut child = child;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .expect("the node exits");
    assert!(status.success(), "a signalled node stops cleanly: {status}");
}

#[test]
fn a_malformed_config_is_refused_with_file_field_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &node_toml("").replace("max_batch = 8", "max_batch = 0"),
    );
    let output = Command::new(fogmesh_binary())
        .args(["node", "--config"])
        .arg(&config)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("the fogmesh binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("node.toml"), "names the file: {stderr}");
    assert!(stderr.contains("max_batch"), "names the field: {stderr}");
    assert!(stderr.contains('0'), "names the value: {stderr}");
}

#[test]
fn bench_w1_remote_scores_every_window_on_a_second_node_process_and_cleans_up() {
    let output = Command::new(fogmesh_binary())
        .args([
            "bench",
            "w1",
            "--remote",
            "--tls",
            "--seconds",
            "4",
            "--inflight",
            "32",
        ])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("the fogmesh binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object on stdout");
    assert_eq!(report["remote"], true, "{report}");
    assert_eq!(report["tls"], true, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    for field in [
        "windows_per_s",
        "p99_ms",
        "remote_rtt_us",
        "tcp_rtt_us",
        "rtt_ratio",
        "connect_ms",
    ] {
        assert!(
            report[field].as_f64().is_some_and(|v| v > 0.0),
            "{field} in {report}"
        );
    }
    // The expert node was this binary started again; it must not outlive the run.
    let leftover = Command::new("pgrep")
        .args(["-f", "expert-node.toml"])
        .output()
        .expect("pgrep runs");
    assert!(
        leftover.stdout.is_empty(),
        "expert node still running: {leftover:?}"
    );
}

#[test]
fn the_model_store_imports_lists_exports_and_refuses_tampered_weights() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let manifest = dir.path().join("manifest.json");
    let weights = dir.path().join("w.safetensors");
    std::fs::write(&weights, b"not really safetensors, just bytes to address").unwrap();
    std::fs::write(
        &manifest,
        r#"{"name":"pump-ae","version":"v1","kind":"time_series","architecture":"conv_autoencoder",
            "hyper":{"channels":8,"window":60},"input":{"shape":[-1,8,60]},
            "metrics":{"f1":0.788},"weights_sha256":"","weights_bytes":0}"#,
    )
    .unwrap();
    let fogmesh = |args: &[&str]| {
        let output = Command::new(fogmesh_binary())
            .args(["models", "--store"])
            .arg(&store)
            .args(args)
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .expect("the fogmesh binary runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, out, err) = fogmesh(&[
        "import",
        "--manifest",
        manifest.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("stored pump-ae@v1"), "{out}");
    let (ok, out, _) = fogmesh(&["ls"]);
    assert!(
        ok && out
            .lines()
            .any(|l| l.starts_with("pump-ae") && l.contains("f1=0.7880")),
        "{out}"
    );
    let (ok, out, _) = fogmesh(&["show", "pump-ae"]);
    assert!(ok && out.contains("\"weights_sha256\""), "{out}");
    let export = dir.path().join("export");
    let (ok, _, err) = fogmesh(&["export", "pump-ae@v1", "--out", export.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(export.join("weights.safetensors")).unwrap(),
        std::fs::read(&weights).unwrap()
    );

    // Damage the stored blob: every load refuses it, naming the file and both hashes.
    let blob = std::fs::read_dir(store.join("blobs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&blob, b"tampered").unwrap();
    let (ok, _, err) = fogmesh(&["show", "pump-ae@v1"]);
    assert!(!ok);
    assert!(
        err.contains("tampered") && err.contains(blob.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn bench_train_compares_the_time_series_models_with_pytorch() {
    let output = Command::new(fogmesh_binary())
        .args([
            "bench",
            "train",
            "--samples",
            "512",
            "--epochs",
            "1",
            "--rounds",
            "2",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("the fogmesh binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object on stdout");
    let models = report["models"].as_array().expect("a models list");
    let names: Vec<&str> = models.iter().filter_map(|m| m["model"].as_str()).collect();
    assert_eq!(
        names,
        [
            "conv_autoencoder",
            "fault_classifier",
            "tcn_forecaster",
            "defect_cnn"
        ]
    );
    for m in models {
        for field in [
            "fogmesh_samples_per_s",
            "pytorch_samples_per_s",
            "speedup_vs_pytorch",
            "inference_speedup_vs_pytorch",
        ] {
            assert!(m[field].as_f64().is_some_and(|v| v > 0.0), "{field} in {m}");
        }
        for side in ["fogmesh_rounds", "pytorch_rounds"] {
            let rounds = m[side].as_array().expect("the rounds of each side");
            assert_eq!(rounds.len(), 2, "{side} in {m}");
        }
    }
    assert_eq!(report["rounds"], 2);
}

#[tokio::test]
async fn train_stores_a_new_version_each_run_and_a_node_serves_it_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let train = |data: &str| {
        let output = Command::new(fogmesh_binary())
            .args(["train", "--model", "classifier", "--data", data, "--store"])
            .arg(&store)
            .args(["--epochs", "1", "--max-seconds", "5"])
            .current_dir(repo)
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .expect("the fogmesh binary runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, out, err) = train("data/tep");
    assert!(ok, "`just setup` makes data/tep: {err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(report["model"], "tep-diagnosis@1");
    assert_eq!(report["metric"], "accuracy");
    assert_eq!(report["architecture"], "fault_classifier");
    let accuracy = report["score"].as_f64().unwrap();
    // One short epoch over 13 classes is far from the full run, but far above chance.
    assert!(accuracy > 2.0 / 13.0 && accuracy <= 1.0, "{report}");
    assert_eq!(report["training"]["epochs_run"], 1);
    assert!(
        err.contains("<- standard metric"),
        "a readable table: {err}"
    );
    let manifest = store.join("manifests/tep-diagnosis/1.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(manifest["metrics"]["accuracy"], report["score"]);
    assert_eq!(manifest["hyper"]["classes"]["names"][0], "normal");
    assert_eq!(manifest["training"]["options"]["epochs"], 1);

    let (ok, out, _) = train("data/tep");
    assert!(ok);
    assert!(out.contains("\"model\":\"tep-diagnosis@2\""), "{out}");

    // Signed by an operator, the stored version serves behind a router of a node
    // process, by name alone.
    let pki = TestPki::open(&dir.path().join("pki"));
    let signed = Command::new(fogmesh_binary())
        .args(["models", "--store"])
        .arg(&store)
        .args(["sign", "tep-diagnosis@2"])
        .envs(pki.operator_env())
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("the fogmesh binary runs");
    let said = String::from_utf8_lossy(&signed.stdout);
    assert!(
        signed.status.success()
            && said.contains("signed tep-diagnosis@2")
            && said.contains("operator"),
        "{said}{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        pki.node_tls_toml("dx", Role::Fog)
            + r#"[node]
name = "dx"
role = "fog"
listen = "127.0.0.1:0"
models = "store"

[[experts]]
name = "diagnosis"
model = "tep-diagnosis@2"

[[routers]]
name = "plant"
policy = "static"
routes = { tep = ["diagnosis"] }
"#,
    )
    .unwrap();
    let mut node = start_node(&config);
    let addr = grpc_address(node.0.as_mut().expect("started"));
    let channel = pki
        .operator()
        .channel(&addr)
        .await
        .expect("connects")
        .channel;
    let mut inference = InferenceClient::new(channel);
    let names: Vec<String> = manifest["hyper"]["classes"]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let window = manifest["hyper"]["config"]["window"].as_u64().unwrap() as usize;
    let reply = inference
        .score(ScoreRequest {
            router: "plant".into(),
            sensor_id: "tep".into(),
            channels: 53,
            length: window as u32,
            // The training mean, standardised: the plant at its normal operating point.
            values: vec![0.0; 53 * window],
        })
        .await
        .expect("the window is scored")
        .into_inner();
    let opinion = &reply.experts[0];
    assert_eq!(opinion.model_version, "tep-diagnosis@2");
    assert!(names.contains(&opinion.class), "{opinion:?} in {names:?}");
    assert!((0.0..=1.0).contains(&opinion.score), "{opinion:?}");
    assert_eq!(opinion.threshold, 0.5, "a classifier alarms past even odds");
    drop(node);

    let (ok, _, err) = train("no/such/folder");
    assert!(!ok);
    assert!(
        err.contains("no/such/folder") && err.contains("just setup"),
        "{err}"
    );
}

#[test]
fn train_vision_stores_a_defect_cnn_scored_on_held_out_elpv_cells() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let output = Command::new(fogmesh_binary())
        .args([
            "train",
            "--model",
            "vision",
            "--data",
            "data/elpv",
            "--store",
        ])
        .arg(&store)
        .args(["--epochs", "1", "--max-seconds", "20"])
        .current_dir(repo)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("the fogmesh binary runs");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "`just setup` makes data/elpv: {err}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert_eq!(report["model"], "elpv-defects@1");
    assert_eq!(report["kind"], "vision");
    assert_eq!(report["architecture"], "defect_cnn");
    assert_eq!(report["metric"], "accuracy");
    assert_eq!(report["published"]["score"], 0.8842);
    let accuracy = report["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "{report}");
    let manifest = store.join("manifests/elpv-defects/1.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(manifest["metrics"]["accuracy"], report["score"]);
    assert_eq!(manifest["hyper"]["classes"]["names"][1], "defective");
    assert_eq!(manifest["input"]["shape"], serde_json::json!([-1, 64, 64]));
    assert_eq!(manifest["training"]["data"]["test_images"], 656);
}

#[test]
fn models_push_ls_and_pull_move_a_version_through_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::open(&dir.path().join("pki"));
    let config = write_config(
        dir.path(),
        &(fogmesh_tests::node_toml_with("models = \"node-store\"", "")
            + &pki.node_tls_toml(NODE, Role::Edge)),
    );
    let mut node = start_node(&config);
    let addr = grpc_address(node.0.as_mut().expect("the node runs"));
    let weights = b"bytes standing in for safetensors".to_vec();
    let local = fogmesh_models::store::ModelStore::open(dir.path().join("local"));
    let manifest: fogmesh_models::store::Manifest = serde_json::from_str(
        r#"{"name":"pump-ae","version":"v1","kind":"time_series","architecture":"conv_autoencoder",
            "input":{"shape":[-1,8,60]},"weights_sha256":"","weights_bytes":0}"#,
    )
    .unwrap();
    local.import(manifest, &weights).unwrap();
    let fogmesh = |store: &str, args: &[&str]| {
        let output = Command::new(fogmesh_binary())
            .args(["models", "--store"])
            .arg(dir.path().join(store))
            .args(args)
            .envs(pki.operator_env())
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .expect("the fogmesh binary runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // Unsigned, the version is refused before its weights are sent; signed by the
    // operator, it is taken.
    let (ok, out, err) = fogmesh("local", &["push", "pump-ae", "--node", &addr]);
    assert!(
        !ok && err.contains("PermissionDenied") && err.contains("no signature"),
        "{out}{err}"
    );
    let (ok, out, err) = fogmesh("local", &["sign", "pump-ae"]);
    assert!(ok && out.contains("signed pump-ae@v1"), "{out}{err}");
    let (ok, out, err) = fogmesh("local", &["push", "pump-ae", "--node", &addr]);
    assert!(ok && out.contains("sent pump-ae@v1"), "{out}{err}");
    let (ok, out, err) = fogmesh("local", &["ls", "--node", &addr]);
    assert!(
        ok && out.lines().any(|l| l.starts_with("pump-ae@v1")),
        "{out}{err}"
    );
    let (ok, out, err) = fogmesh("pulled", &["pull", "pump-ae@v1", "--node", &addr]);
    assert!(ok && out.contains("stored pump-ae@v1"), "{out}{err}");
    let pulled = fogmesh_models::store::ModelStore::open(dir.path().join("pulled"));
    assert_eq!(
        pulled.weights(&pulled.get("pump-ae@v1").unwrap()).unwrap(),
        weights
    );
    let (ok, _, err) = fogmesh("pulled", &["pull", "pump-ae@v9", "--node", &addr]);
    assert!(
        !ok && err.contains("pump-ae@v9") && err.contains("NotFound"),
        "{err}"
    );

    // A file a config names gets its signature beside it, which the mesh trusts.
    let file = dir.path().join("press.pt");
    std::fs::write(&file, b"bytes standing in for a TorchScript module").unwrap();
    let file_arg = file.display().to_string();
    let (ok, out, err) = fogmesh("local", &["sign-file", &file_arg]);
    assert!(ok && out.contains("press.pt.sig"), "{out}{err}");
    let seal = pki.operator_seal();
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(
        fogmesh_models::store::check_file(&seal, &file, &bytes).unwrap(),
        "operator"
    );
}

#[test]
fn merge_averages_two_trained_versions_into_a_third_that_names_both_parents() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let fogmesh = |args: &[&str]| {
        let output = Command::new(fogmesh_binary())
            .args(args)
            .arg("--store")
            .arg(&store)
            .current_dir(repo)
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .expect("the fogmesh binary runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // Two replicas of one network: same data and sizes, other seeds.
    for seed in ["1", "2"] {
        let (ok, _, err) = fogmesh(&[
            "train",
            "--model",
            "classifier",
            "--data",
            "data/tep",
            "--epochs",
            "1",
            "--max-seconds",
            "5",
            "--seed",
            seed,
        ]);
        assert!(ok, "`just setup` makes data/tep: {err}");
    }
    let both = ["tep-diagnosis@1", "tep-diagnosis@2"];

    let merge = |flags: &[&str]| {
        let mut args = vec!["merge"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&both);
        fogmesh(&args)
    };
    for (flags, expected) in [
        (
            &["--method", "ties"][..],
            "--base: invalid base = none: ties adds deltas to the base model",
        ),
        (
            &["--method", "weighted_average", "--weights", "1,2,3"][..],
            "--weights: invalid weights = [1.0, 2.0, 3.0]: 3 weights for 2 models",
        ),
        (
            &[
                "--method",
                "ties",
                "--base",
                "tep-diagnosis@1",
                "--density",
                "1.5",
            ][..],
            "--density: invalid density = 1.5: must be in (0, 1]",
        ),
        (
            &["--method", "slerp", "--density", "0.3"][..],
            "--density: slerp does not take it",
        ),
    ] {
        let (ok, _, err) = merge(flags);
        assert!(!ok && err.contains(expected), "{flags:?}: {err}");
    }

    let (ok, out, err) = merge(&["--method", "weighted_average"]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(report["model"], "tep-diagnosis@3");
    assert_eq!(report["method"], "weighted_average");
    assert_eq!(report["parents"], serde_json::json!(both));
    assert_eq!(report["validated"], false);
    assert_eq!(report["weights_sha256"].as_str().unwrap().len(), 64);
    assert!(
        err.contains("stored tep-diagnosis@3") && err.contains("unvalidated"),
        "{err}"
    );

    let (ok, out, err) = fogmesh(&["models", "show", "tep-diagnosis@3"]);
    assert!(ok, "{err}");
    let manifest: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(manifest["parents"], serde_json::json!(both));
    assert_eq!(manifest["architecture"], "fault_classifier");
    assert_eq!(manifest["weights_sha256"], report["weights_sha256"]);
    assert_eq!(
        manifest["training"]["merge"]["weights"],
        serde_json::json!([1.0, 1.0])
    );
}
