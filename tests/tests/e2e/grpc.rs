//! The path of a reading over gRPC: windows scored on demand, pushed samples raising
//! alerts (through `Push` and `PushStream`), acknowledgements, the alert filter, the
//! Prometheus endpoint, and a shutdown that ends open streams.

use std::collections::BTreeMap;
use std::sync::Arc;

use fogmesh_actors::{Annunciator, ScoredWindow};
use fogmesh_proto::{Alert, SampleBatch, ScoreRequest, StreamAck};
use fogmesh_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;
use tokio_stream::wrappers::ReceiverStream;

fn score_request(values: Vec<f32>) -> ScoreRequest {
    ScoreRequest {
        router: ROUTER.into(),
        sensor_id: SENSOR.into(),
        channels: CHANNELS as u32,
        length: WINDOW as u32,
        values,
    }
}

/// Collects verdicts until windows `0..count` of `sensor` were all scored.
async fn verdicts(
    windows: &mut broadcast::Receiver<Arc<ScoredWindow>>,
    sensor: &str,
    count: u64,
) -> BTreeMap<u64, bool> {
    let mut verdicts = BTreeMap::new();
    while (verdicts.len() as u64) < count {
        let window = tokio::time::timeout(EVENT_TIMEOUT, windows.recv())
            .await
            .expect("a scored window arrives in time")
            .expect("the test keeps up with the annunciator");
        if &*window.sensor_id == sensor {
            verdicts.insert(window.window_sequence, window.anomalous);
        }
    }
    verdicts
}

/// Alerts until both spiked windows (3: half spiked, 4: all spiked) arrived, by window.
async fn spiked_alerts(alerts: &mut tonic::Streaming<Alert>) -> BTreeMap<u64, Alert> {
    let mut got = BTreeMap::new();
    while got.len() < 2 {
        let alert = next_alert(alerts).await;
        got.insert(alert.window_sequence, alert);
    }
    got
}

/// 32 normal samples cut windows 0-2; 16 spiked ones cut windows 3 (samples 24-39)
/// and 4 (32-47).
fn expected_verdicts() -> BTreeMap<u64, bool> {
    BTreeMap::from([(0, false), (1, false), (2, false), (3, true), (4, true)])
}

fn check_spiked_alert(alert: &Alert, sensor: &str) {
    assert_eq!(alert.sensor_id, sensor);
    assert_eq!(alert.window_sequence, 3);
    assert_eq!(alert.window_start_us, timestamp_us(24));
    assert_eq!(alert.window_end_us, timestamp_us(39));
    assert!(
        alert.score >= 1.0,
        "an alert's score reaches 1: {}",
        alert.score
    );
    assert_eq!(alert.experts.len(), 1);
    assert_eq!(alert.experts[0].expert, EXPERT);
    assert_eq!(alert.experts[0].threshold, threshold());
}

#[tokio::test]
async fn score_separates_normal_from_spiked_windows() {
    let node = TestNode::start("").await;
    let mut inference = node.inference().await;
    let normal_window = window(0, u64::MAX);
    let normal = inference
        .score(score_request(normal_window.clone()))
        .await
        .expect("a normal window scores")
        .into_inner();
    assert!(!normal.anomalous, "normal window: {normal:?}");
    assert_eq!(normal.experts.len(), 1);
    let opinion = &normal.experts[0];
    assert_eq!(opinion.expert, EXPERT);
    assert_eq!(opinion.model_version, format!("untrained-seed-{SEED}"));
    assert_eq!(opinion.threshold, threshold());
    assert_eq!(opinion.gate_weight, 1.0);
    let offline = expert_scores(&[normal_window])[0];
    assert!(
        (opinion.score - offline).abs() <= 1e-4 * offline.max(1.0),
        "the node's expert is the fixture's model: {} vs {offline}",
        opinion.score
    );
    assert!((normal.score - opinion.score / threshold()).abs() <= 1e-4);

    let spiked = inference
        .score(score_request(window(0, WINDOW as u64 / 2)))
        .await
        .expect("a spiked window scores")
        .into_inner();
    assert!(
        spiked.anomalous && spiked.score >= 1.0,
        "spiked window: {spiked:?}"
    );
    node.stop().await;
}

#[tokio::test]
async fn pushed_spikes_raise_an_alert() {
    let annunciator = Annunciator::new(1024);
    let mut windows = annunciator.subscribe();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let node = TestNode::start_config(dir, &node_toml(""), annunciator).await;
    let mut all_alerts = node.watch_alerts(&[]).await;
    let mut other_alerts = node.watch_alerts(&[OTHER_SENSOR]).await;
    let mut ingest = node.ingest().await;

    let ack = ingest
        .push(SampleBatch {
            samples: samples(SENSOR, 0..32, normal_values),
        })
        .await
        .expect("normal samples are accepted")
        .into_inner();
    assert_eq!((ack.accepted, ack.duplicates), (32, 0));
    assert_eq!(
        ack.streams,
        vec![StreamAck {
            sensor_id: SENSOR.into(),
            acked_through: 31
        }]
    );
    let ack = ingest
        .push(SampleBatch {
            samples: samples(SENSOR, 32..48, spiked_values),
        })
        .await
        .expect("spiked samples are accepted")
        .into_inner();
    assert_eq!(ack.accepted, 16);
    assert_eq!(ack.streams[0].acked_through, 47);

    assert_eq!(verdicts(&mut windows, SENSOR, 5).await, expected_verdicts());
    let alerts = spiked_alerts(&mut all_alerts).await;
    check_spiked_alert(&alerts[&3], SENSOR);
    assert_eq!(alerts[&4].window_start_us, timestamp_us(32));

    // The filtered watcher skipped pump-1's alerts: its first alert is pump-2's.
    ingest
        .push(SampleBatch {
            samples: samples(OTHER_SENSOR, 0..16, spiked_values),
        })
        .await
        .expect("spiked samples are accepted");
    let alert = next_alert(&mut other_alerts).await;
    assert_eq!(
        (alert.sensor_id.as_str(), alert.window_sequence),
        (OTHER_SENSOR, 0)
    );

    let status = node.sensor_status(SENSOR).await;
    assert_eq!(
        (status.accepted, status.windows, status.last_sequence),
        (48, 5, 47)
    );
    node.stop().await;
}

#[tokio::test]
async fn push_stream_acknowledges_each_batch_in_order_and_raises_the_alert() {
    let node = TestNode::start("").await;
    let mut alerts = node.watch_alerts(&[SENSOR]).await;
    let (batches, batches_rx) = tokio::sync::mpsc::channel(4);
    let mut acks = node
        .ingest()
        .await
        .push_stream(ReceiverStream::new(batches_rx))
        .await
        .expect("the stream opens")
        .into_inner();
    let plan: [(std::ops::Range<u64>, Readings); 3] = [
        (0..16, normal_values),
        (16..32, normal_values),
        (32..48, spiked_values),
    ];
    for (sequences, values) in plan {
        let last = sequences.end - 1;
        batches
            .send(SampleBatch {
                samples: samples(SENSOR, sequences, values),
            })
            .await
            .expect("the request stream is open");
        let ack = tokio::time::timeout(EVENT_TIMEOUT, acks.message())
            .await
            .expect("an ack arrives in time")
            .expect("the batch is accepted")
            .expect("the stream stays open");
        assert_eq!((ack.accepted, ack.streams[0].acked_through), (16, last));
    }
    let alerts = spiked_alerts(&mut alerts).await;
    check_spiked_alert(&alerts[&3], SENSOR);

    drop(batches);
    let end = tokio::time::timeout(EVENT_TIMEOUT, acks.message())
        .await
        .expect("the stream ends in time");
    assert!(
        matches!(end, Ok(None)),
        "the stream ends cleanly when the producer does: {end:?}"
    );
    node.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let node = TestNode::start("").await;
    let mut alerts = node.watch_alerts(&[]).await;
    let (_batches, batches_rx) = tokio::sync::mpsc::channel::<SampleBatch>(1);
    let mut acks = node
        .ingest()
        .await
        .push_stream(ReceiverStream::new(batches_rx))
        .await
        .expect("the stream opens")
        .into_inner();
    node.stop().await;
    let alerts_end = tokio::time::timeout(EVENT_TIMEOUT, alerts.message())
        .await
        .expect("the alert stream ends in time");
    assert!(
        matches!(alerts_end, Ok(None)),
        "alerts end cleanly: {alerts_end:?}"
    );
    let acks_end = tokio::time::timeout(EVENT_TIMEOUT, acks.message())
        .await
        .expect("the ack stream ends in time");
    assert!(
        matches!(acks_end, Ok(None)),
        "acks end cleanly: {acks_end:?}"
    );
}

#[tokio::test]
async fn prometheus_endpoint_serves_the_node_metrics() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let text = node_toml_with("metrics_listen = \"127.0.0.1:0\"", "");
    let node = TestNode::start_config(dir, &text, Annunciator::new(1024)).await;
    node.ingest()
        .await
        .push(SampleBatch {
            samples: samples(SENSOR, 0..4, normal_values),
        })
        .await
        .expect("samples are accepted");

    let addr = node.server.metrics_addr().expect("the endpoint is bound");
    let mut http = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the endpoint accepts");
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: fogmesh\r\n\r\n")
        .await
        .expect("the request is sent");
    let mut response = String::new();
    tokio::time::timeout(EVENT_TIMEOUT, http.read_to_string(&mut response))
        .await
        .expect("the endpoint answers in time")
        .expect("the answer is text");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    let accepted = |text: &str| {
        metric_value(
            text,
            "fogmesh_samples_accepted_total",
            &[("sensor", SENSOR)],
        )
    };
    assert!(accepted(&response).is_some_and(|n| n >= 4.0), "{response}");
    assert!(accepted(&node.metrics_text().await).is_some_and(|n| n >= 4.0));
    node.stop().await;
}

#[tokio::test]
async fn status_reports_the_nodes_capabilities_and_load() {
    let node = TestNode::start("").await;
    let status = node.status().await;
    assert_eq!(status.role, "edge");
    let capabilities = status.capabilities.expect("capabilities are reported");
    assert!(capabilities.cores >= 1);
    assert!(capabilities.memory_bytes > 0);
    assert_eq!(
        capabilities.gpus.len() as i64,
        tch::Cuda::device_count(),
        "the GPUs libtorch sees"
    );
    let load = status.load.expect("load is reported");
    assert!(load.cpu >= 0.0 && load.memory_available_bytes > 0);
    node.stop().await;
}
