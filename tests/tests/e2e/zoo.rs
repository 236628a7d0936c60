//! The model zoo through a node: one model of each kind (time series: anomaly,
//! forecast, diagnosis; vision: cell defects; language: operator notes; multimodal:
//! sensors + note) is put in
//! a model store, a node
//! config names each by `name@version` (`model = ...`), and windows scored over gRPC
//! come back with the same score and class the stored model gives offline, from the
//! expert that serves it, with the stored version in every verdict. A store whose blob
//! was tampered with stops the node from starting, naming the blob.

use std::path::{Path, PathBuf};

use fogmesh_actors::Annunciator;
use fogmesh_cluster::{NodeConfig, NodeServer};
use fogmesh_models::classifier::{ClassifierConfig, FaultClassifier};
use fogmesh_models::forecaster::{ForecasterConfig, TcnForecaster};
use fogmesh_models::fusion::{FusionClassifier, FusionConfig};
use fogmesh_models::minilm::MiniLm;
use fogmesh_models::notes::{NoteClassifier, NoteClassifierConfig};
use fogmesh_models::served::{
    encoder_sha256, token_window, Architecture, Assets, Classes, ServedModel,
};
use fogmesh_models::store::{Manifest, ModelStore};
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, DefectCnn, SplitMix64, VisionConfig};
use fogmesh_proto::ScoreRequest;
use fogmesh_tests::{TestNode, TestPki};
use tch::Device;

/// One stored model and the windows the test scores with it.
struct Stored {
    expert: &'static str,
    manifest: Manifest,
    weights: Vec<u8>,
    windows: Vec<Vec<f32>>,
}

const TOKENS: i64 = 24;

fn minilm_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/minilm");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} has no MiniLM: run `just setup` first",
        dir.display()
    );
    dir
}

fn assets() -> Assets {
    Assets {
        minilm: Some(minilm_dir()),
    }
}

fn random_windows(len: i64, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = SplitMix64::new(seed);
    (0..3)
        .map(|_| (0..len).map(|_| rng.normal() as f32).collect())
        .collect()
}

const NOTES: [&str; 3] = [
    "HI ALM reactor pressure, cooling water valve hunting",
    "routine round, all loops in auto, nothing to report",
    "A feed flow dropped to zero, feed valve wide open",
];

fn store(store: &ModelStore, name: &str, architecture: Architecture, weights: Vec<u8>) -> Manifest {
    let manifest = Manifest {
        metrics: [("threshold".to_string(), 0.75)].into(),
        ..architecture.manifest(name, "1")
    };
    store
        .import(manifest, &weights)
        .expect("the store takes the model")
}

/// Stores the models under `root`, signed by the operator of the mesh CA beside it
/// (`pki/`, where the fixture node finds it).
fn time_series_models(root: &Path) -> Vec<Stored> {
    let pki = TestPki::open(&root.parent().expect("a folder").join("pki"));
    let models = pki.signing_store(root);
    let mut out = Vec::new();

    let config = AutoencoderConfig::w1(3, 16);
    let (weights, _) = ConvAutoencoder::new(config.clone(), Device::Cpu, 1)
        .unwrap()
        .to_safetensors()
        .unwrap();
    let manifest = store(
        &models,
        "pump-ae",
        Architecture::ConvAutoencoder(config),
        weights.clone(),
    );
    out.push(Stored {
        expert: "anomaly",
        manifest,
        weights,
        windows: random_windows(48, 1),
    });

    let config = ForecasterConfig {
        channels: 3,
        context: 12,
        horizon: 4,
        hidden: 8,
        levels: 2,
        kernel: 3,
    };
    let (weights, _) = TcnForecaster::new(config.clone(), Device::Cpu, 2)
        .unwrap()
        .to_safetensors()
        .unwrap();
    let manifest = store(
        &models,
        "pump-forecast",
        Architecture::TcnForecaster(config),
        weights.clone(),
    );
    out.push(Stored {
        expert: "forecast",
        manifest,
        weights,
        windows: random_windows(48, 2),
    });

    let config = ClassifierConfig {
        channels: 3,
        window: 16,
        hidden: 8,
        classes: 3,
    };
    let (weights, _) = FaultClassifier::new(config, Device::Cpu, 3)
        .unwrap()
        .to_safetensors()
        .unwrap();
    let classes = Classes {
        names: vec!["normal".into(), "cavitation".into(), "bearing".into()],
        normal: 0,
    };
    let manifest = store(
        &models,
        "pump-diagnosis",
        Architecture::FaultClassifier {
            config,
            classes: classes.clone(),
        },
        weights.clone(),
    );
    out.push(Stored {
        expert: "diagnosis",
        manifest,
        weights,
        windows: random_windows(48, 3),
    });

    let config = VisionConfig {
        height: 16,
        width: 16,
        channels_base: 4,
        classes: 2,
    };
    let (weights, _) = DefectCnn::new(config, Device::Cpu, 7)
        .unwrap()
        .to_safetensors()
        .unwrap();
    let manifest = store(
        &models,
        "cell-defects",
        Architecture::DefectCnn {
            config,
            classes: Classes {
                names: vec!["functional".into(), "defective".into()],
                normal: 0,
            },
        },
        weights.clone(),
    );
    out.push(Stored {
        expert: "vision",
        manifest,
        weights,
        windows: random_windows(256, 7)
            .into_iter()
            .map(|w| w.into_iter().map(|v| v.abs().min(1.0)).collect())
            .collect(),
    });

    let encoder = MiniLm::load(&minilm_dir(), Device::Cpu).unwrap();
    let note_windows: Vec<Vec<f32>> = NOTES
        .iter()
        .map(|n| token_window(&encoder, n, TOKENS as usize).unwrap())
        .collect();
    let encoder_sha256 = encoder_sha256(&minilm_dir()).unwrap();
    let config = NoteClassifierConfig {
        input: MiniLm::dim(),
        hidden: 0,
        classes: 3,
    };
    let (weights, _) = NoteClassifier::new(config, Device::Cpu, 4)
        .unwrap()
        .to_safetensors()
        .unwrap();
    let manifest = store(
        &models,
        "shift-notes",
        Architecture::NoteClassifier {
            config,
            tokens: TOKENS,
            classes: classes.clone(),
            encoder_sha256: encoder_sha256.clone(),
        },
        weights.clone(),
    );
    out.push(Stored {
        expert: "notes",
        manifest,
        weights,
        windows: note_windows.clone(),
    });

    let config = FusionConfig {
        channels: 3,
        window: 16,
        text: MiniLm::dim(),
        hidden: 8,
        classes: 3,
        modality_dropout: 0.0,
    };
    let (weights, _) = FusionClassifier::new(config, Device::Cpu, 5)
        .unwrap()
        .to_safetensors()
        .unwrap();
    let manifest = store(
        &models,
        "pump-fused",
        Architecture::Fusion {
            config,
            tokens: TOKENS,
            classes,
            encoder_sha256,
        },
        weights.clone(),
    );
    let windows = random_windows(48, 6)
        .into_iter()
        .zip(&note_windows)
        .map(|(mut sensor, note)| {
            sensor.extend_from_slice(note);
            sensor
        })
        .collect();
    out.push(Stored {
        expert: "fused",
        manifest,
        weights,
        windows,
    });
    out
}

/// A node config serving every stored model behind one static router; each model's
/// input arrives on its own sensor id.
fn config(models: &[Stored]) -> String {
    let mut text = format!(
        "[node]\nname = \"zoo\"\nrole = \"fog\"\nlisten = \"127.0.0.1:0\"\nmodels = \"models\"\nminilm = {:?}\n",
        minilm_dir()
    );
    let mut routes = Vec::new();
    for m in models {
        text.push_str(&format!(
            "\n[[experts]]\nname = \"{}\"\nmodel = \"{}\"\nmax_wait_us = 500\n",
            m.expert,
            m.manifest.id()
        ));
        routes.push(format!("\"{0}-in\" = [\"{0}\"]", m.expert));
    }
    text.push_str(&format!(
        "\n[[routers]]\nname = \"zoo\"\npolicy = \"static\"\nroutes = {{ {} }}\n",
        routes.join(", ")
    ));
    text
}

#[tokio::test]
async fn every_kind_of_model_serves_from_the_store_like_it_does_offline() {
    let dir = tempfile::tempdir().unwrap();
    let models = time_series_models(&dir.path().join("models"));
    let node = TestNode::start_config(dir, &config(&models), Annunciator::new(64)).await;
    let status = node.status().await;
    let mut inference = node.inference().await;
    for m in &models {
        let expert = status
            .experts
            .iter()
            .find(|e| e.name == m.expert)
            .expect("the expert runs");
        assert_eq!(expert.model, m.manifest.architecture);
        assert_eq!(expert.version, m.manifest.id());
        let served = ServedModel::load(&m.manifest, &m.weights, &assets(), Device::Cpu).unwrap();
        let [channels, length] = served.architecture().input_shape();
        for values in &m.windows {
            assert_eq!(values.len() as i64, channels * length);
            let values = values.clone();
            let offline = served.infer(&values).unwrap()[0];
            let reply = inference
                .score(ScoreRequest {
                    router: "zoo".into(),
                    sensor_id: format!("{}-in", m.expert),
                    channels: channels as u32,
                    length: length as u32,
                    values,
                })
                .await
                .unwrap_or_else(|e| panic!("{} scores the window: {e}", m.expert))
                .into_inner();
            let opinion = &reply.experts[0];
            assert_eq!(opinion.expert, m.expert);
            assert_eq!(opinion.model_version, m.manifest.id());
            assert!(
                (opinion.score - offline.score).abs() <= 1e-6 * offline.score.abs().max(1.0),
                "{}: served {} offline {}",
                m.expert,
                opinion.score,
                offline.score
            );
            assert_eq!(opinion.threshold, 0.75, "the manifest's calibrated limit");
            let class = offline.class.map(|c| served.labels()[c as usize].clone());
            assert_eq!(opinion.class, class.unwrap_or_default(), "{}", m.expert);
        }
    }
    node.stop().await;
}

#[tokio::test]
async fn a_tampered_blob_in_the_store_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let models = time_series_models(&dir.path().join("models"));
    let blob = dir
        .path()
        .join("models/blobs")
        .join(format!("{}.safetensors", models[2].manifest.weights_sha256));
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&blob, bytes).unwrap();
    let pki = TestPki::open(&dir.path().join("pki"));
    let text = config(&models) + &pki.node_tls_toml("zoo", fogmesh_trust::Role::Fog);
    let path = fogmesh_tests::write_config(dir.path(), &text);
    let error = match NodeConfig::load(&path) {
        Err(e) => e.to_string(),
        Ok(config) => match NodeServer::start_with(config, Annunciator::new(8)).await {
            Ok(_) => panic!("a tampered blob must not serve"),
            Err(e) => format!("{e:#}"),
        },
    };
    assert!(
        error.contains(&models[2].manifest.weights_sha256) && error.contains("tampered"),
        "names the blob and the problem: {error}"
    );
}
