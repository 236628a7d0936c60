//! A whole node in one process: samples in, scored windows out, bad input refused
//! without losing what was accepted, a killed expert restarted, the learned gate
//! combining experts, and specs that cannot run refused with the reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fogmesh_actors::{
    Annunciator, BatchingSpec, ExpertSpec, IngestError, ModelSource, Node, NodeSpec,
    NormalisationSpec, QualityRules, RestartPolicy, RouterSpec, RoutingPolicy, Sample, ScoreError,
    ScoredWindow, SensorStreamSpec, SpecError, Window, DEFAULT_MAX_CLOCK_SKEW_MS, DEFAULT_MAX_RATE,
    DEFAULT_MAX_SEQUENCE_GAP, MAX_WINDOWS_IN_FLIGHT,
};
use fogmesh_models::{AutoencoderConfig, SoftmaxGate};

const CHANNELS: usize = 2;
pub const WINDOW: usize = 8;
const STRIDE: usize = 4;

fn expert(name: &str, seed: i64) -> ExpertSpec {
    ExpertSpec {
        name: name.into(),
        model_version: "v1".into(),
        config: AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64),
        threshold: Some(0.5),
        batching: BatchingSpec {
            max_batch: 8,
            max_wait_us: 1_000,
        },
        intra_op_threads: 1,
        source: ModelSource::seeded(seed),
    }
}

fn sensor(id: &str, router: &str) -> SensorStreamSpec {
    SensorStreamSpec {
        id: id.into(),
        channels: CHANNELS,
        window: WINDOW,
        stride: STRIDE,
        normalisation: NormalisationSpec::Frozen {
            mean: vec![0.0; CHANNELS],
            std: vec![1.0; CHANNELS],
        },
        quality: QualityRules::default(),
        router: router.into(),
        max_sequence_gap: DEFAULT_MAX_SEQUENCE_GAP,
        max_clock_skew_ms: DEFAULT_MAX_CLOCK_SKEW_MS,
        max_rate: DEFAULT_MAX_RATE,
    }
}

pub fn static_node() -> NodeSpec {
    NodeSpec {
        node: "edge-1".into(),
        sensors: vec![sensor("pump-1", "by-asset")],
        routers: vec![RouterSpec {
            name: "by-asset".into(),
            policy: RoutingPolicy::Static {
                routes: HashMap::from([("pump-1".to_string(), vec!["pump-ae".to_string()])]),
            },
            optional: Vec::new(),
        }],
        experts: vec![expert("pump-ae", 1)],
        remote_experts: Vec::new(),
        restart: RestartPolicy::default(),
    }
}

pub fn samples(sequences: std::ops::Range<u64>) -> Vec<Sample> {
    sequences
        .map(|s| Sample {
            sequence: s,
            timestamp_us: s as i64 * 1_000,
            values: vec![(s as f32 * 0.3).sin(), (s as f32 * 0.2).cos()],
        })
        .collect()
}

async fn next_window(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<ScoredWindow>>,
) -> Arc<ScoredWindow> {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a scored window arrives")
        .expect("no window missed")
}

#[tokio::test]
async fn samples_become_scored_windows_in_order() {
    let annunciator = Annunciator::new(1024);
    let mut scored = annunciator.subscribe();
    let (node, join) = Node::start(static_node(), annunciator).await.unwrap();
    let ack = node.push("pump-1", samples(0..20)).await.unwrap();
    assert_eq!(
        (ack.acked_through, ack.accepted, ack.duplicates),
        (Some(19), 20, 0)
    );
    // 20 samples, windows of 8 every 4: starts at 0, 4, 8, 12.
    let mut sequences = Vec::new();
    for _ in 0..4 {
        let w = next_window(&mut scored).await;
        assert_eq!(&*w.sensor_id, "pump-1");
        assert_eq!(w.experts.len(), 1);
        assert_eq!(w.end_us - w.start_us, (WINDOW as i64 - 1) * 1_000);
        sequences.push((w.window_sequence, w.start_us));
    }
    sequences.sort();
    assert_eq!(sequences, vec![(0, 0), (1, 4_000), (2, 8_000), (3, 12_000)]);
    node.shutdown(join).await;
}

#[tokio::test]
async fn duplicates_are_acknowledged_again_and_dropped() {
    let (node, join) = Node::start(static_node(), Annunciator::new(64))
        .await
        .unwrap();
    node.push("pump-1", samples(0..10)).await.unwrap();
    let mut batch = samples(5..15);
    batch.reverse();
    let ack = node.push("pump-1", batch).await.unwrap();
    assert_eq!(
        (ack.acked_through, ack.accepted, ack.duplicates),
        (Some(14), 5, 5)
    );
    let status = node.snapshot();
    assert_eq!(status.sensors[0].accepted, 15);
    assert_eq!(status.sensors[0].duplicates, 5);
    node.shutdown(join).await;
}

#[tokio::test]
async fn a_bad_batch_is_refused_whole_and_accepted_data_stays() {
    let (node, join) = Node::start(static_node(), Annunciator::new(64))
        .await
        .unwrap();
    node.push("pump-1", samples(0..6)).await.unwrap();

    let mut nan = samples(6..10);
    nan[2].values[1] = f32::NAN;
    match node.push("pump-1", nan).await {
        Err(IngestError::NotFinite {
            sequence: 8,
            channel: 1,
            ..
        }) => {}
        other => panic!("expected NotFinite for sample 8 channel 1, got {other:?}"),
    }
    let mut wide = samples(6..10);
    wide[0].values.push(1.0);
    match node.push("pump-1", wide).await {
        Err(IngestError::WrongChannelCount {
            expected: 2,
            got: 3,
            ..
        }) => {}
        other => panic!("expected WrongChannelCount, got {other:?}"),
    }
    let mut backwards = samples(6..10);
    backwards[1].timestamp_us = 0;
    match node.push("pump-1", backwards).await {
        Err(e @ IngestError::TimestampBackwards { sequence: 7, .. }) => {
            assert!(
                e.to_string().contains("timestamp_us"),
                "the error names the field: {e}"
            );
        }
        other => panic!("expected TimestampBackwards, got {other:?}"),
    }
    match node.push("no-such-pump", samples(0..1)).await {
        Err(IngestError::UnknownSensor { sensor_id }) => assert_eq!(sensor_id, "no-such-pump"),
        other => panic!("expected UnknownSensor, got {other:?}"),
    }
    // Nothing of the refused batches was taken: the same sequences are fresh now.
    let ack = node.push("pump-1", samples(6..10)).await.unwrap();
    assert_eq!((ack.acked_through, ack.accepted), (Some(9), 4));
    let status = &node.snapshot().sensors[0];
    assert_eq!((status.accepted, status.rejected), (10, 12));
    node.shutdown(join).await;
}

/// Polls `done` every few milliseconds until it holds, failing after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_router_at_its_limit_refuses_outside_producers_and_holds_replays_until_room() {
    // pump-1's expert runs on no node, so each window waits in the router for a
    // replica until the retry deadline: the router fills as experts that fell behind
    // would fill it.
    let mut spec = static_node();
    spec.remote_experts = std::mem::take(&mut spec.experts);
    let (node, join) = Node::start(spec, Annunciator::new(64)).await.unwrap();
    let limit = MAX_WINDOWS_IN_FLIGHT as u64;
    let filling = WINDOW as u64 + (limit - 1) * STRIDE as u64;
    let ack = node.ingest("pump-1", samples(0..filling)).await.unwrap();
    assert_eq!(ack.acked_through, Some(filling - 1));
    let in_flight = || node.snapshot().routers[0].in_flight;
    eventually(
        Duration::from_secs(30),
        "the router takes every window",
        || in_flight() == MAX_WINDOWS_IN_FLIGHT,
    )
    .await;

    match node.ingest("pump-1", samples(filling..filling + 4)).await {
        Err(e @ IngestError::RouterBusy { .. }) => {
            assert!(
                e.to_string()
                    .contains(&format!("router `by-asset` holds {limit} windows")),
                "{e}"
            );
            assert_eq!(e.reason(), "router_busy");
        }
        other => panic!("expected RouterBusy, got {other:?}"),
    }
    let window = Window {
        sensor_id: "pump-1".into(),
        sequence: 0,
        start_us: 0,
        end_us: 7_000,
        channels: CHANNELS,
        length: WINDOW,
        values: vec![0.0; CHANNELS * WINDOW].into(),
        quality: Default::default(),
    };
    match node.score("by-asset", window).await {
        Err(ScoreError::RouterBusy { in_flight, .. }) => {
            assert_eq!(in_flight, MAX_WINDOWS_IN_FLIGHT)
        }
        other => panic!("expected RouterBusy, got {other:?}"),
    }
    // Refused means not taken: the stream still acknowledges only what it accepted.
    assert_eq!(node.snapshot().sensors[0].accepted, filling);

    // A replay is not refused: its batch waits until the router has room, which the
    // windows leaving at their retry deadline make.
    let replay = node.push("pump-1", samples(filling..filling + 4));
    tokio::pin!(replay);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut replay)
            .await
            .is_err(),
        "a replay batch waits while the router is full"
    );
    let ack = tokio::time::timeout(Duration::from_secs(60), replay)
        .await
        .expect("the replay goes on once windows leave")
        .unwrap();
    assert_eq!(ack.acked_through, Some(filling + 3));
    node.shutdown(join).await;
}

#[tokio::test]
async fn a_killed_expert_is_restarted_and_scoring_resumes() {
    let annunciator = Annunciator::new(1024);
    let mut scored = annunciator.subscribe();
    let (node, join) = Node::start(static_node(), annunciator).await.unwrap();
    node.push("pump-1", samples(0..8)).await.unwrap();
    next_window(&mut scored).await;

    let first = node.directory.expert("pump-ae").unwrap().actor;
    first.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while node.directory.expert("pump-ae").unwrap().actor.get_id() == first.get_id() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "expert was not restarted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(node.restarts(), 1);
    node.push("pump-1", samples(8..12)).await.unwrap();
    let w = next_window(&mut scored).await;
    assert_eq!(w.window_sequence, 1);
    node.shutdown(join).await;
}

#[tokio::test]
async fn the_learned_gate_combines_its_top_k_experts() {
    let gate = SoftmaxGate::seeded(CHANNELS, WINDOW, 3, 5);
    let spec = NodeSpec {
        node: "edge-1".into(),
        sensors: vec![sensor("press-1", "gate")],
        routers: vec![RouterSpec {
            name: "gate".into(),
            policy: RoutingPolicy::LearnedGate {
                experts: vec!["a".into(), "b".into(), "c".into()],
                top_k: 2,
                gate: gate.clone(),
            },
            optional: Vec::new(),
        }],
        experts: vec![expert("a", 1), expert("b", 2), expert("c", 3)],
        remote_experts: Vec::new(),
        restart: RestartPolicy::default(),
    };
    let (node, join) = Node::start(spec, Annunciator::new(64)).await.unwrap();
    let values: Vec<f32> = (0..CHANNELS * WINDOW)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let window = Window {
        sensor_id: "press-1".into(),
        sequence: 0,
        start_us: 0,
        end_us: 7_000,
        channels: CHANNELS,
        length: WINDOW,
        values: values.clone().into(),
        quality: Default::default(),
    };
    let verdict = node.score("gate", window).await.unwrap();
    let expected = gate.top_k(&values, 2).unwrap();
    let names = ["a", "b", "c"];
    let got: Vec<(&str, f32)> = verdict
        .experts
        .iter()
        .map(|o| (&*o.expert, o.gate_weight))
        .collect();
    let want: Vec<(&str, f32)> = expected.iter().map(|(i, w)| (names[*i], *w)).collect();
    assert_eq!(got, want);
    let combined: f32 = verdict
        .experts
        .iter()
        .map(|o| o.gate_weight * o.score / o.threshold)
        .sum();
    assert!((verdict.score - combined).abs() < 1e-6);
    assert_eq!(verdict.anomalous, verdict.score >= 1.0);
    node.shutdown(join).await;
}

#[tokio::test]
async fn specs_that_cannot_run_are_refused_with_the_reason() {
    let mut unknown_router = static_node();
    unknown_router.sensors[0].router = "nowhere".into();
    let err = Node::start(unknown_router, Annunciator::new(1))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, SpecError::UnknownReference { ref target, .. } if target == "nowhere"),
        "{err}"
    );

    let mut wrong_shape = static_node();
    wrong_shape.sensors[0].window = 16;
    let err = Node::start(wrong_shape, Annunciator::new(1))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("expert `pump-ae` takes 2 channels x 8 samples"),
        "{err}"
    );

    let mut zero_stride = static_node();
    zero_stride.sensors[0].stride = 0;
    let err = Node::start(zero_stride, Annunciator::new(1))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("field `stride` = 0"), "{err}");
}

fn pump_window(sequence: u64) -> Window {
    Window {
        sensor_id: "pump-1".into(),
        sequence,
        start_us: 0,
        end_us: 7_000,
        channels: CHANNELS,
        length: WINDOW,
        values: (0..CHANNELS * WINDOW)
            .map(|i| (i as f32 * 0.37).sin())
            .collect::<Vec<_>>()
            .into(),
        quality: Default::default(),
    }
}

#[tokio::test]
async fn a_window_is_scored_without_an_optional_expert_no_replica_of_which_answers() {
    // `cloud-ae` runs elsewhere (another zone, cut off): no replica or relay answers.
    let mut spec = static_node();
    spec.routers[0].policy = RoutingPolicy::Static {
        routes: HashMap::from([(
            "pump-1".to_string(),
            vec!["pump-ae".to_string(), "cloud-ae".to_string()],
        )]),
    };
    spec.routers[0].optional = vec!["cloud-ae".into()];
    spec.remote_experts = vec![expert("cloud-ae", 2)];
    let alone = {
        let (node, join) = Node::start(static_node(), Annunciator::new(64))
            .await
            .unwrap();
        let window = node.score("by-asset", pump_window(3)).await.unwrap();
        node.shutdown(join).await;
        window
    };
    let (node, join) = Node::start(spec.clone(), Annunciator::new(64))
        .await
        .unwrap();
    let without = node.score("by-asset", pump_window(3)).await.unwrap();
    assert_eq!(without.experts.len(), 1);
    assert_eq!(&*without.experts[0].expert, "pump-ae");
    assert_eq!(
        without.experts[0].gate_weight, 1.0,
        "the weight left to the one that answered"
    );
    assert_eq!(without.score, alone.score);
    assert_eq!(node.snapshot().routers[0].failed, 0);
    node.shutdown(join).await;

    // An optional expert the router never sends to is refused.
    spec.routers[0].optional = vec!["ghost-ae".into()];
    let err = Node::start(spec, Annunciator::new(1)).await.err().unwrap();
    assert!(
        err.to_string().contains("optional") && err.to_string().contains("ghost-ae"),
        "{err}"
    );
}

#[tokio::test]
async fn an_expert_that_cannot_load_its_weights_stops_the_start_with_its_own_reason() {
    let other_shape = AutoencoderConfig {
        hidden: 12,
        ..AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64)
    };
    let (weights, sha256) = fogmesh_models::ConvAutoencoder::new(other_shape, tch::Device::Cpu, 3)
        .unwrap()
        .to_safetensors()
        .unwrap();
    let mut spec = static_node();
    spec.experts[0].source = ModelSource::Autoencoder {
        weights: Some(weights.into()),
        weights_sha256: Some(sha256),
        seed: 1,
    };
    let err = Node::start(spec, Annunciator::new(1))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("pump-ae") && err.contains("enc1.weight"),
        "{err}"
    );
    assert!(
        !err.contains("panicked"),
        "no actor-framework wrapping: {err}"
    );
}

#[tokio::test]
async fn reconcile_starts_stops_and_restarts_only_what_changed() {
    let annunciator = Annunciator::new(1024);
    let mut scored = annunciator.subscribe();
    let (node, join) = Node::start(static_node(), annunciator).await.unwrap();
    node.push("pump-1", samples(0..8)).await.unwrap();
    next_window(&mut scored).await;
    let expert_before = node.directory.expert("pump-ae").unwrap().actor.get_id();

    // Unchanged: nothing moves.
    let report = node.reconcile(static_node()).await.unwrap();
    assert!(report.is_empty(), "{report:?}");
    assert_eq!(
        node.directory.expert("pump-ae").unwrap().actor.get_id(),
        expert_before
    );

    // A second stream and expert join; the first stream keeps its position.
    let mut grown = static_node();
    grown.experts.push(expert("fan-ae", 2));
    grown.sensors.push(sensor("fan-1", "by-asset"));
    if let RoutingPolicy::Static { routes } = &mut grown.routers[0].policy {
        routes.insert("fan-1".into(), vec!["fan-ae".into()]);
    }
    let report = node.reconcile(grown.clone()).await.unwrap();
    assert_eq!(report.started, vec!["fan-ae", "fan-1"]);
    assert_eq!(report.restarted, vec!["by-asset"]);
    assert!(report.stopped.is_empty());
    assert_eq!(
        node.directory.expert("pump-ae").unwrap().actor.get_id(),
        expert_before,
        "an expert whose spec did not change keeps running"
    );
    let ack = node.push("pump-1", samples(0..12)).await.unwrap();
    assert_eq!((ack.accepted, ack.duplicates), (4, 8));
    node.push("fan-1", samples(0..8)).await.unwrap();
    let mut sensors = Vec::new();
    for _ in 0..2 {
        sensors.push(next_window(&mut scored).await.sensor_id.to_string());
    }
    sensors.sort();
    assert_eq!(sensors, vec!["fan-1", "pump-1"]);

    // Back to one stream: the other's actors stop and leave the directory.
    let report = node.reconcile(static_node()).await.unwrap();
    assert_eq!(report.stopped, vec!["fan-ae", "fan-1"]);
    assert!(node.directory.sensor("fan-1").is_none());
    assert!(node.directory.expert("fan-ae").is_none());
    assert_eq!(node.restarts(), 0, "stopping is not failing");

    // A spec that does not validate changes nothing.
    let mut broken = static_node();
    broken.sensors[0].router = "nowhere".into();
    assert!(matches!(
        node.reconcile(broken).await,
        Err(SpecError::UnknownReference { .. })
    ));
    assert!(node.directory.sensor("pump-1").is_some());
    node.shutdown(join).await;
}

#[tokio::test]
async fn a_swapped_version_serves_through_the_router_and_survives_a_restart() {
    let annunciator = Annunciator::new(1024);
    let mut scored = annunciator.subscribe();
    let (node, join) = Node::start(static_node(), annunciator).await.unwrap();
    let mut v2 = expert("pump-ae", 2);
    v2.model_version = "v2".into();
    let version = node
        .swap_expert(v2)
        .await
        .expect("the new version swaps in");
    assert_eq!(&*version, "v2");
    node.push("pump-1", samples(0..8)).await.unwrap();
    assert_eq!(
        &*next_window(&mut scored).await.experts[0].model_version,
        "v2"
    );

    let mut ghost = expert("no-such-expert", 3);
    ghost.model_version = "v9".into();
    let refused = node.swap_expert(ghost).await.unwrap_err();
    assert!(refused.to_string().contains("no-such-expert"), "{refused}");

    // A restarted expert comes back with the version it served, not the one it started with.
    let first = node.directory.expert("pump-ae").unwrap().actor;
    first.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while node.directory.expert("pump-ae").unwrap().actor.get_id() == first.get_id() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "expert was not restarted"
        );
        tokio::task::yield_now().await;
    }
    node.push("pump-1", samples(8..12)).await.unwrap();
    let w = next_window(&mut scored).await;
    assert_eq!(w.window_sequence, 1);
    assert_eq!(&*w.experts[0].model_version, "v2");
    node.shutdown(join).await;
}
