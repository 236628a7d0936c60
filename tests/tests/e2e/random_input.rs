//! Random and mutated input for every decoder of bytes from outside: gRPC requests,
//! MQTT JSON, `node.toml` and `mesh.toml`, manifests, model signature envelopes,
//! safetensors weights, `fogrec` recordings and the cross-node verdict codec. Each decoder gets [`CASES`] inputs per
//! run, half random bytes and half valid examples with bytes replaced, cut and
//! inserted, built with overflow checks on (the release profile keeps them on for
//! fogmesh's own crates). Decoded samples go on into a running node's sensor streams,
//! whose actors must neither panic nor restart. Zero panics is the pass mark; each
//! test prints how many inputs it ran (`-- --nocapture`, as CI's random-input phase
//! runs them).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use fogmesh_actors::expert::ExpertVerdict;
use fogmesh_actors::expert_endpoint::{decode_verdict, encode_verdict};
use fogmesh_actors::sample::Sample as StreamSample;
use fogmesh_actors::ScoreError;
use fogmesh_cluster::mesh_spec::MeshSpec;
use fogmesh_cluster::{parse_json_samples, NodeConfig};
use fogmesh_models::served::Architecture;
use fogmesh_models::store::Manifest;
use fogmesh_models::weights::load_into;
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, Recording, RecordingHeader};
use fogmesh_proto::{
    AlertFilter, ApplyRequest, RolloutRequest, SampleBatch, ScoreRequest, WeightChunk,
};
use fogmesh_tests::{node_toml, samples, spiked_values, TestNode, OTHER_SENSOR, SENSOR};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;

/// Inputs per decoder per run.
const CASES: u32 = 100_000;

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Valid `seeds`, each mutated: a few bytes replaced, maybe cut short, maybe a run of
/// random bytes inserted.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        0..seeds.len(),
        vec((any::<Index>(), any::<u8>()), 0..6),
        proptest::option::of(any::<Index>()),
        vec(any::<u8>(), 0..12),
        any::<Index>(),
    )
        .prop_map(move |(seed, flips, cut, insert, at)| {
            let mut bytes = seeds[seed].clone();
            for (index, byte) in flips {
                if !bytes.is_empty() {
                    let i = index.index(bytes.len());
                    bytes[i] = byte;
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            let at = at.index(bytes.len() + 1);
            bytes.splice(at..at, insert);
            bytes
        })
}

/// Half random bytes, half mutated seeds.
fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..512), mutated(seeds)]
}

fn report(decoder: &str, count: &AtomicU64) {
    let n = count.load(Ordering::Relaxed);
    println!("random inputs: {decoder}: {n} cases, 0 panics");
    assert!(n >= u64::from(CASES), "{decoder}: only {n} cases ran");
}

/// Runs `check` on every input and fails, with the smallest failing input, on a panic.
fn run(decoder: &str, strategy: impl Strategy<Value = Vec<u8>>, check: impl Fn(&[u8])) {
    let count = AtomicU64::new(0);
    runner()
        .run(&strategy, |bytes| {
            check(&bytes);
            count.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{decoder}: {e}"));
    report(decoder, &count);
}

/// A node whose sensor streams take what the ingest decoders let through; after the
/// run its actors must not have restarted, and a good batch is still accepted.
struct StreamSink {
    runtime: tokio::runtime::Runtime,
    node: TestNode,
}

impl StreamSink {
    fn start() -> StreamSink {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let node = runtime.block_on(TestNode::start(""));
        StreamSink { runtime, node }
    }

    fn push(&self, sensor: &str, samples: Vec<StreamSample>) {
        let node = self.node.server.node();
        // Refusals are the expected outcome of most inputs; a panic is not.
        let _ = self.runtime.block_on(node.push(sensor, samples));
    }

    fn finish(self) {
        let node = self.node.server.node().clone();
        let snapshot = node.snapshot();
        assert_eq!(snapshot.restarts, 0, "an actor restarted: {snapshot:?}");
        let next = snapshot
            .sensors
            .iter()
            .find(|s| s.id == SENSOR)
            .and_then(|s| s.acked_through)
            .map_or(0, |a| a.saturating_add(1));
        let good: Vec<StreamSample> = samples(SENSOR, next..next + 4, spiked_values)
            .into_iter()
            .map(stream_sample)
            .collect();
        self.runtime
            .block_on(node.push(SENSOR, good))
            .map(drop)
            .or_else(|e| match e {
                // The random run may have moved the stream's clock far ahead.
                fogmesh_actors::IngestError::TimestampBackwards { .. } => Ok(()),
                other => Err(other),
            })
            .expect("the stream still takes readings");
        self.runtime.block_on(self.node.stop());
    }
}

fn stream_sample(s: fogmesh_proto::Sample) -> StreamSample {
    StreamSample {
        sequence: s.sequence,
        timestamp_us: s.timestamp_us,
        values: s.values,
    }
}

#[test]
fn grpc_requests() {
    let batch = SampleBatch {
        samples: samples(SENSOR, 0..3, spiked_values),
    };
    let seeds = vec![
        batch.encode_to_vec(),
        ScoreRequest {
            router: "by-asset".into(),
            sensor_id: SENSOR.into(),
            channels: 2,
            values: vec![0.5; 32],
            ..Default::default()
        }
        .encode_to_vec(),
        ApplyRequest {
            spec_toml: "[[experts]]\nname = \"a\"\n".into(),
            dry_run: true,
        }
        .encode_to_vec(),
        RolloutRequest {
            expert: "pump-ae".into(),
            model: "pump-ae@2".into(),
            rollback: false,
        }
        .encode_to_vec(),
        WeightChunk::default().encode_to_vec(),
        AlertFilter {
            sensor_ids: vec![SENSOR.into()],
            include_normal: true,
            from_cursor: None,
        }
        .encode_to_vec(),
    ];
    let sink = StreamSink::start();
    run("gRPC requests", input(seeds), |bytes| {
        if let Ok(batch) = SampleBatch::decode(bytes) {
            for sensor in [SENSOR, OTHER_SENSOR] {
                let ours: Vec<StreamSample> = batch
                    .samples
                    .iter()
                    .filter(|s| s.sensor_id == sensor)
                    .cloned()
                    .map(stream_sample)
                    .collect();
                if !ours.is_empty() {
                    sink.push(sensor, ours);
                }
            }
        }
        let _ = ScoreRequest::decode(bytes);
        let _ = ApplyRequest::decode(bytes);
        let _ = RolloutRequest::decode(bytes);
        let _ = WeightChunk::decode(bytes);
        let _ = AlertFilter::decode(bytes);
    });
    sink.finish();
}

#[test]
fn mqtt_json_payloads() {
    let seeds = vec![
        br#"{"samples":[{"sequence":1,"timestamp_us":1700000000000000,"values":[0.1,0.2]}]}"#
            .to_vec(),
        br#"{"samples":[{"sequence":18446744073709551615,"timestamp_us":-9223372036854775808,"values":[3.4e38,-3.4e38]},{"sequence":0,"timestamp_us":0,"values":[]}]}"#
            .to_vec(),
    ];
    let sink = StreamSink::start();
    run("MQTT JSON payloads", input(seeds), |bytes| {
        if let Ok(samples) = parse_json_samples(bytes) {
            sink.push(SENSOR, samples);
        }
    });
    sink.finish();
}

#[test]
fn node_and_mesh_toml() {
    let mesh = "[[experts]]\nname = \"ae\"\nmodel_version = \"v1\"\nchannels = 2\nwindow = 16\nthreshold = 1.0\nreplicas = 2\nplacement = { roles = [\"fog\"], max_per_node = 1 }\n\n[[routers]]\nname = \"r1\"\npolicy = \"static\"\nroutes = { s1 = [\"ae\"] }\n\n[[sensors]]\nnode = \"edge-1\"\nid = \"s1\"\nchannels = 2\nwindow = 16\nstride = 8\nrouter = \"r1\"\n";
    let seeds = vec![node_toml("").into_bytes(), mesh.as_bytes().to_vec()];
    let file = Path::new("random.toml");
    run("node.toml and mesh.toml", input(seeds), |bytes| {
        let text = String::from_utf8_lossy(bytes);
        let _ = NodeConfig::parse(&text, file);
        let _ = MeshSpec::parse(&text, file);
    });
}

#[test]
fn manifests() {
    let config = AutoencoderConfig::w1(2, 16);
    let manifest = Architecture::ConvAutoencoder(config).manifest("pump-ae", "v1");
    let seeds = vec![serde_json::to_vec(&manifest).expect("a manifest serialises")];
    run("model manifests", input(seeds), |bytes| {
        if let Ok(manifest) = serde_json::from_slice::<Manifest>(bytes) {
            let _ = manifest.id();
            if let Ok(architecture) = Architecture::from_manifest(&manifest) {
                if architecture.validate().is_ok() {
                    let _ = architecture.input_shape();
                    let _ = architecture.window_len();
                }
            }
        }
    });
}

#[test]
fn model_signatures() {
    use fogmesh_trust::signing::{ModelSigner, SignatureCheck, MANIFEST_PAYLOAD_TYPE};
    let dir = tempfile::tempdir().expect("a temporary folder");
    let pki = fogmesh_tests::TestPki::open(dir.path());
    let operator = pki.tls("operator", fogmesh_trust::Role::Operator, &[]);
    let check = SignatureCheck::new(&operator, &[fogmesh_trust::Role::Operator]);
    let subject = b"the canonical manifest".to_vec();
    let signed = ModelSigner::from_tls(&operator)
        .expect("the operator signs")
        .sign(MANIFEST_PAYLOAD_TYPE, &subject);
    run("model signature envelopes", input(vec![signed]), |bytes| {
        let _ = check.verify(MANIFEST_PAYLOAD_TYPE, &subject, bytes);
    });
}

#[test]
fn safetensors_weights() {
    let config = AutoencoderConfig {
        hidden: 4,
        bottleneck: 2,
        ..AutoencoderConfig::w1(2, 8)
    };
    let model = ConvAutoencoder::new(config.clone(), tch::Device::Cpu, 1).expect("a model");
    let (weights, _) = model.to_safetensors().expect("weights");
    let mut target = ConvAutoencoder::new(config, tch::Device::Cpu, 2).expect("a model");
    let target = std::sync::Mutex::new(fogmesh_models::Network::var_store_mut(&mut target));
    run("safetensors weights", input(vec![weights]), |bytes| {
        let mut vs = target.lock().unwrap_or_else(|p| p.into_inner());
        let _ = load_into(&mut vs, bytes, None, "random input");
    });
}

#[test]
fn fogrec_recordings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random.fogrec");
    let header = RecordingHeader {
        source: "random-input test".into(),
        columns: vec!["a".into(), "b".into()],
        sample_period_s: 0.5,
        start_timestamp_us: 1_700_000_000_000_000,
        rows: 3,
        fault: Some(1),
        fault_onset_row: Some(1),
        seed: Some(7.0),
        description: String::new(),
    };
    Recording::new(header, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
        .expect("a recording")
        .write(&path)
        .expect("written");
    let seed = std::fs::read(&path).unwrap();
    run("fogrec recordings", input(vec![seed]), |bytes| {
        std::fs::write(&path, bytes).expect("the temporary file is writable");
        if let Ok(recording) = Recording::read(&path) {
            for row in 0..recording.rows().min(4) {
                let _ = recording.row(row);
                let _ = recording.timestamp_us(row);
                let _ = recording.is_faulty(row);
            }
        }
    });
}

#[test]
fn cross_node_verdicts() {
    let verdict = ExpertVerdict {
        score: 0.25,
        threshold: Some(1.0),
        model_version: "pump-ae@3".into(),
        class: Some("idv1".into()),
        batch_size: 7,
        batch_wait: std::time::Duration::from_micros(150),
    };
    let seeds = vec![
        encode_verdict(&Ok(verdict)),
        encode_verdict(&Err(ScoreError::Uncalibrated {
            expert: "pump-ae".into(),
        })),
    ];
    run("cross-node verdicts", input(seeds), |bytes| {
        let _ = decode_verdict("pump-ae", bytes);
    });
}
