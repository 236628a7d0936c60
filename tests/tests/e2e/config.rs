//! `node.toml` as an operator meets it: defaults, paths relative to the file, weights
//! pinned by their hash, and malformed files refused with an error that names the
//! file, the field and the value.

use std::path::Path;

use fogmesh_actors::Annunciator;
use fogmesh_cluster::{ConfigError, Limits, NodeConfig, NodeServer, Role};
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, Recording, RecordingHeader};
use fogmesh_proto::ScoreRequest;
use fogmesh_tests::*;

/// Everything a node start checks before starting anything.
fn load_fully(path: &Path) -> Result<(), ConfigError> {
    let config = NodeConfig::load(path)?;
    config.to_node_spec()?;
    config.replay_jobs()?;
    config.mqtt_brokers(config.configured_tls()?.as_ref())?;
    Ok(())
}

fn write_recording(path: &Path, columns: &[&str], rows: usize) {
    let header = RecordingHeader {
        source: "fogmesh tests".into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        sample_period_s: 0.001,
        start_timestamp_us: START_US,
        rows: rows as u64,
        fault: None,
        fault_onset_row: None,
        seed: None,
        description: String::new(),
    };
    Recording::new(header, vec![0.0; rows * columns.len()])
        .and_then(|r| r.write(path))
        .expect("the recording is written");
}

#[test]
fn malformed_configs_name_the_file_the_field_and_the_value() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    write_recording(&dir.path().join("plant.fogrec"), &["flow", "pressure"], 4);
    let base = node_toml("");
    let replace_first = |from: &str, to: &str| base.replacen(from, to, 1);
    let append = |extra: &str| format!("{base}\n{extra}");
    let replay = |file: &str, sensor: &str, columns: &str| {
        append(&format!("[[replay]]\nfile = \"{file}\"\nstreams = [{{ sensor = \"{sensor}\", columns = {columns} }}]\n"))
    };
    // (case, config text, what the error must name besides the file)
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("toml syntax", replace_first("[node]", "[node"), vec!["line 1", "column"]),
        (
            "unknown field",
            replace_first("max_batch = 8", "max_bacth = 8"),
            vec!["unknown field `max_bacth`", "line"],
        ),
        ("unknown role", replace_first("role = \"edge\"", "role = \"moon\""), vec!["moon", "line"]),
        ("wrong type", replace_first("max_batch = 8", "max_batch = \"eight\""), vec!["eight", "line"]),
        ("max_batch 0", replace_first("max_batch = 8", "max_batch = 0"), vec!["experts[0].max_batch", "= 0"]),
        (
            "even kernel",
            replace_first("max_batch = 8", "max_batch = 8\nkernel = 4"),
            vec!["experts[0]", "kernel", "4"],
        ),
        ("stride 0", replace_first("stride = 8", "stride = 0"), vec!["sensors[0].stride", "= 0"]),
        (
            "zone with a blank level",
            replace_first("role = \"edge\"", "role = \"edge\"\nzone = \"site-1//cell-3\""),
            vec!["node.zone", "site-1//cell-3", "level 2"],
        ),
        (
            "conduits without a zone",
            replace_first("role = \"edge\"", "role = \"edge\"\nconduits = [\"cloud\"]"),
            vec!["node.conduits", "cloud", "set node.zone too"],
        ),
        (
            "a conduit into its own zone",
            replace_first("role = \"edge\"", "role = \"edge\"\nzone = \"plant/area\"\nconduits = [\"cloud\", \"plant/area\"]"),
            vec!["node.conduits[1]", "plant/area", "already in"],
        ),
        (
            "segmented without a zone",
            replace_first("role = \"edge\"", "role = \"edge\"\nsegmented = true"),
            vec!["node.segmented", "set node.zone too"],
        ),
        (
            "plaintext metrics on the network",
            replace_first("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:0\"\nmetrics_listen = \"0.0.0.0:9100\""),
            vec!["node.metrics_listen", "0.0.0.0:9100", "metrics_public = true"],
        ),
        (
            "a sensor without a usable rate",
            replace_first("stride = 8", "stride = 8\nmax_rate = 0"),
            vec!["max_rate", "at least 1"],
        ),
        (
            "unknown router",
            replace_first("router = \"by-asset\"", "router = \"no-such-router\""),
            vec!["sensors[0].router", "no-such-router"],
        ),
        (
            "unknown expert",
            replace_first("[\"pump-ae\"]", "[\"no-such-expert\"]"),
            vec!["routers[0].routes", "no-such-expert"],
        ),
        (
            "optional expert the router never sends to",
            replace_first("policy = \"static\"", "policy = \"static\"\noptional = [\"ghost-ae\"]"),
            vec!["routers[0].optional", "ghost-ae", "never sends to"],
        ),
        (
            "window the expert does not take",
            replace_first("window = 16", "window = 32"),
            vec!["sensors[0].window", "16 samples", EXPERT, "32 samples"],
        ),
        (
            "duplicate sensor",
            replace_first("id = \"pump-2\"", "id = \"pump-1\""),
            vec!["sensors[1].id", SENSOR, "twice"],
        ),
        (
            "max_batch_samples 0",
            replace_first("max_batch_samples = 1000", "max_batch_samples = 0"),
            vec!["limits.max_batch_samples", "= 0"],
        ),
        (
            "missing weights",
            replace_first("max_batch = 8", "max_batch = 8\nweights = \"missing.safetensors\""),
            vec!["experts[0].weights", "missing.safetensors", "weights file"],
        ),
        (
            "sha256 without weights",
            replace_first("max_batch = 8", "max_batch = 8\nsha256 = \"abc\""),
            vec!["experts[0].sha256", "abc"],
        ),
        (
            "missing gate",
            append(
                "[[routers]]\nname = \"gated\"\npolicy = \"learned_gate\"\nexperts = [\"pump-ae\"]\ntop_k = 1\ngate = \"missing-gate.json\"\n",
            ),
            vec!["routers[1].gate", "missing-gate.json", "gate file"],
        ),
        (
            "missing recording",
            replay("missing.fogrec", SENSOR, "[\"flow\", \"pressure\"]"),
            vec!["replay[0].file", "missing.fogrec"],
        ),
        (
            "unknown column",
            replay("plant.fogrec", SENSOR, "[\"flow\", \"XMEAS(99)\"]"),
            vec!["replay[0].streams[0].columns[1]", "XMEAS(99)", "plant.fogrec"],
        ),
        (
            "replay into an unknown stream",
            replay("plant.fogrec", "no-such-sensor", "[\"flow\", \"pressure\"]"),
            vec!["replay[0].streams[0].sensor", "no-such-sensor"],
        ),
        (
            "replay with too few columns",
            replay("plant.fogrec", SENSOR, "[\"flow\"]"),
            vec!["replay[0].streams[0].columns", "1 columns", "2 channels"],
        ),
        (
            "mqtt topic with a wildcard",
            append("[[mqtt]]\nhost = \"127.0.0.1\"\ntopic_prefix = \"plant/#\"\n"),
            vec!["mqtt[0].topic_prefix", "plant/#"],
        ),
        (
            "mqtt password without a username",
            append("[[mqtt]]\nhost = \"127.0.0.1\"\npassword_file = \"mqtt-password\"\n"),
            vec!["mqtt[0].username", "needs the username"],
        ),
        (
            "mqtt password in plaintext",
            append("[[mqtt]]\nhost = \"127.0.0.1\"\ninsecure = true\nusername = \"edge\"\npassword_file = \"mqtt-password\"\n"),
            vec!["mqtt[0].password_file", "only over TLS"],
        ),
        (
            "mqtt over TLS from a node without a certificate",
            append("[tls]\ninsecure = true\n\n[[mqtt]]\nhost = \"127.0.0.1\"\n"),
            vec!["mqtt[0].insecure", "[tls] ca/cert/key"],
        ),
    ];
    for (case, text, needles) in cases {
        let path = write_config(dir.path(), &text);
        let error = load_fully(&path).expect_err(case).to_string();
        let file = path.display().to_string();
        assert!(
            error.starts_with(&file),
            "{case}: the error should start with the file: {error}"
        );
        for needle in needles {
            assert!(
                error.contains(needle),
                "{case}: the error should name `{needle}`: {error}"
            );
        }
    }
}

#[test]
fn a_minimal_config_takes_the_documented_defaults() {
    let text = r#"
[node]
name = "fog-1"
role = "fog"
listen = "0.0.0.0:7700"

[[experts]]
name = "ae"
model_version = "v1"
channels = 3
window = 32

[[mqtt]]
host = "broker.plant"
"#;
    let config =
        NodeConfig::parse(text, Path::new("/etc/fogmesh/node.toml")).expect("the config parses");
    assert_eq!(config.node.role, Role::Fog);
    assert_eq!(config.node.metrics_listen, None);
    assert_eq!(
        config.limits,
        Limits {
            max_message_bytes: 4 << 20,
            max_batch_samples: 10_000,
            max_values_per_sample: 4096,
        }
    );
    let expert = &config.experts[0];
    assert_eq!(
        (expert.hidden, expert.bottleneck, expert.kernel),
        (32, 16, 5)
    );
    assert_eq!(
        (
            expert.max_batch,
            expert.max_wait_us,
            expert.intra_op_threads,
            expert.seed
        ),
        (32, 2000, 1, 0)
    );
    assert_eq!((expert.weights.as_ref(), expert.threshold), (None, None));
    let mqtt = &config.mqtt[0];
    // TLS unless said otherwise, on MQTT's TLS port.
    assert!(!mqtt.insecure);
    assert_eq!(mqtt.port(), 8883);
    assert_eq!(mqtt.topic_prefix("fog-1"), "fogmesh/fog-1");
    assert_eq!(
        config.resolve(Path::new("weights/ae.safetensors")),
        Path::new("/etc/fogmesh/weights/ae.safetensors")
    );
}

#[tokio::test]
async fn weights_resolve_against_the_config_folder_and_are_pinned_by_sha256() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    std::fs::create_dir(dir.path().join("weights")).expect("the folder is writable");
    let model = ConvAutoencoder::new(
        AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64),
        fogmesh_models::default_device(),
        SEED,
    )
    .expect("the model builds");
    let sha256 = model
        .save(&dir.path().join("weights/pump-ae.safetensors"))
        .expect("the weights are saved");
    let with_weights = |sha256: &str| {
        node_toml("").replacen(
            "max_batch = 8",
            &format!(
                "max_batch = 8\nweights = \"weights/pump-ae.safetensors\"\nsha256 = \"{sha256}\""
            ),
            1,
        )
    };

    // Pinned to other bytes: the node refuses to start, naming both hashes.
    let wrong = "0".repeat(64);
    let path = write_config(dir.path(), &with_weights(&wrong));
    let config = NodeConfig::load(&path).expect("the config loads");
    let error = NodeServer::start(config)
        .await
        .err()
        .expect("the node refuses the weights")
        .to_string();
    for needle in [
        path.display().to_string(),
        "experts[0].sha256".into(),
        wrong,
        sha256.clone(),
    ] {
        assert!(
            error.contains(&needle),
            "the error should name `{needle}`: {error}"
        );
    }

    // The right hash, signed as a node with certificates needs it: the expert scores
    // like the model the weights came from.
    let seal = TestPki::open(&dir.path().join("pki")).operator_seal();
    fogmesh_models::store::sign_file(&seal, &dir.path().join("weights/pump-ae.safetensors"))
        .expect("the operator signs the weights");
    let node = TestNode::start_config(dir, &with_weights(&sha256), Annunciator::new(16)).await;
    let normal_window = window(0, u64::MAX);
    let reply = node
        .inference()
        .await
        .score(ScoreRequest {
            router: ROUTER.into(),
            sensor_id: SENSOR.into(),
            channels: CHANNELS as u32,
            length: WINDOW as u32,
            values: normal_window.clone(),
        })
        .await
        .expect("the window scores")
        .into_inner();
    let offline = expert_scores(&[normal_window])[0];
    assert!((reply.experts[0].score - offline).abs() <= 1e-4 * offline.max(1.0));
    node.stop().await;
}

#[test]
fn the_readme_example_parses() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster/README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("cluster/README.md is readable");
    let example = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README has a toml example");
    let config = NodeConfig::parse(example, &readme_path).expect("the README example parses");
    assert_eq!(config.node.name, "fog-1");
    assert_eq!(
        (
            config.experts.len(),
            config.routers.len(),
            config.sensors.len()
        ),
        (1, 2, 1)
    );
    assert_eq!((config.mqtt.len(), config.replay.len()), (1, 1));
}
