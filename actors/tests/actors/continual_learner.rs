//! The continual learner on a running node: a stored autoencoder trained on regime A
//! serves while the plant moves to regime B; the learner sees the drift after the shift
//! and not before, fine-tunes, validates and promotes version 2 through a hot swap
//! without a failed window, and the store keeps the lineage. A gate that cannot be met
//! leaves version 1 serving and counts a refusal; a round asked for too early answers
//! why; and the `every_s` schedule runs on paused time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogmesh_actors::continual_learner::{
    BoxFuture, ContinualLearnerArgs, ContinualLearnerShared, Phase, Trigger,
};
use fogmesh_actors::{
    Annunciator, BatchingSpec, ContinualLearner, ExpertOpinion, ExpertSpec, LearnerError,
    LearnerSnapshot, LearningSpec, LocalPromoter, ModelSource, Node, NodeSpec, NormalisationSpec,
    PromoteError, Promoter, QualityRules, RestartPolicy, RouterSpec, RoutingPolicy, Sample,
    ScoredWindow, SensorStreamSpec, StoredModel, DEFAULT_MAX_CLOCK_SKEW_MS, DEFAULT_MAX_RATE,
    DEFAULT_MAX_SEQUENCE_GAP,
};
use fogmesh_models::continual::{FineTuneOptions, ValidationGate};
use fogmesh_models::served::{Architecture, Assets};
use fogmesh_models::store::{InputSpec, Manifest, ModelStore};
use fogmesh_models::{quantile, AutoencoderConfig, ConvAutoencoder, SplitMix64, TrainOptions};
use tokio::sync::broadcast;

use crate::plant::{row, CHANNELS};
const WINDOW: usize = 16;
const STRIDE: usize = 8;
const SENSOR: &str = "pump-1";
const EXPERT: &str = "pump-ae";
/// The longest any wait in these tests may take before it counts as a failure; the
/// waits themselves end on events, not on this.
const PATIENCE: Duration = Duration::from_secs(180);

/// Windows of rows (stride 1), flat and channel-major, as the sensor stream cuts them.
fn windows_of(rows: &[Vec<f32>]) -> Vec<f32> {
    let mut flat = Vec::new();
    for start in 0..=rows.len() - WINDOW {
        for c in 0..CHANNELS {
            flat.extend(rows[start..start + WINDOW].iter().map(|r| r[c]));
        }
    }
    flat
}

/// Version 1: the autoencoder trained on regime A for `epochs` (0: as initialised), its
/// threshold the q0.99 of its scores there, stored as `pump-ae@v1`.
fn store_version_1(store: &ModelStore, epochs: usize) -> (Manifest, Vec<u8>) {
    let config = AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64);
    let mut rng = SplitMix64::new(11);
    let rows: Vec<Vec<f32>> = (0..600).map(|t| row(t, false, &mut rng)).collect();
    let windows = windows_of(&rows);
    let mut model = ConvAutoencoder::new(config.clone(), tch::Device::Cpu, 1).unwrap();
    if epochs > 0 {
        let options = TrainOptions {
            epochs,
            ..TrainOptions::default()
        };
        model.fit(&windows, &options, &mut |_| {}).unwrap();
    }
    let threshold = quantile(&model.score(&windows).unwrap(), 0.99).unwrap();
    let (weights, _) = model.to_safetensors().unwrap();
    let manifest = Manifest {
        input: InputSpec {
            shape: vec![-1, CHANNELS as i64, WINDOW as i64],
            description: "pump sensors, regime A".into(),
        },
        training: serde_json::json!({ "data": "regime A", "windows": rows.len() - WINDOW + 1 }),
        metrics: BTreeMap::from([("threshold".to_string(), f64::from(threshold))]),
        ..Architecture::ConvAutoencoder(config).manifest(EXPERT, "v1")
    };
    let stored = store.import(manifest, &weights).unwrap();
    (stored, weights)
}

fn expert_spec(manifest: &Manifest, weights: &[u8]) -> ExpertSpec {
    ExpertSpec {
        name: EXPERT.into(),
        model_version: manifest.id(),
        // The node checks sensor windows against these sizes; the stored manifest has
        // the same.
        config: AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64),
        threshold: None,
        batching: BatchingSpec {
            max_batch: 8,
            max_wait_us: 500,
        },
        intra_op_threads: 1,
        source: ModelSource::Stored(Box::new(StoredModel {
            manifest: manifest.clone(),
            weights: weights.into(),
            assets: Assets::default(),
        })),
    }
}

fn node_spec(expert: ExpertSpec) -> NodeSpec {
    NodeSpec {
        node: "edge-1".into(),
        sensors: vec![SensorStreamSpec {
            id: SENSOR.into(),
            channels: CHANNELS,
            window: WINDOW,
            stride: STRIDE,
            normalisation: NormalisationSpec::None,
            quality: QualityRules::default(),
            router: "by-asset".into(),
            max_sequence_gap: DEFAULT_MAX_SEQUENCE_GAP,
            max_clock_skew_ms: DEFAULT_MAX_CLOCK_SKEW_MS,
            max_rate: DEFAULT_MAX_RATE,
        }],
        routers: vec![RouterSpec {
            name: "by-asset".into(),
            policy: RoutingPolicy::Static {
                routes: HashMap::from([(SENSOR.to_string(), vec![EXPERT.to_string()])]),
            },
            optional: Vec::new(),
        }],
        experts: vec![expert],
        remote_experts: Vec::new(),
        restart: RestartPolicy::default(),
    }
}

fn learning(gate: ValidationGate) -> LearningSpec {
    LearningSpec {
        reservoir: 256,
        min_new_windows: 64,
        max_new_windows: 512,
        gate,
        seed: 3,
        ..LearningSpec::default()
    }
}

/// The plant: rows pushed in order, each batch acknowledged before the next.
struct Plant {
    node: Node,
    next: u64,
    rng: SplitMix64,
}

impl Plant {
    fn new(node: &Node) -> Plant {
        Plant {
            node: node.clone(),
            next: 0,
            rng: SplitMix64::new(5),
        }
    }

    /// Pushes `rows` rows of one regime.
    async fn push(&mut self, rows: u64, shifted: bool) {
        let samples: Vec<Sample> = (self.next..self.next + rows)
            .map(|t| Sample {
                sequence: t,
                timestamp_us: t as i64 * 1_000,
                values: row(t, shifted, &mut self.rng),
            })
            .collect();
        self.next += rows;
        self.node.push(SENSOR, samples).await.expect("accepted");
    }

    /// Windows the sensor stream has cut so far.
    fn windows_cut(&self) -> u64 {
        self.node
            .directory
            .sensor(SENSOR)
            .expect("the stream runs")
            .shared
            .windows
            .load(Ordering::Relaxed)
    }
}

/// Waits until the learner's snapshot satisfies `condition`; the learner announces
/// every change, so this wakes on events.
async fn until(
    shared: &ContinualLearnerShared,
    what: &str,
    condition: impl Fn(&LearnerSnapshot) -> bool,
) -> LearnerSnapshot {
    let mut changes = shared.subscribe();
    tokio::time::timeout(
        PATIENCE,
        changes.wait_for(|_| condition(&shared.snapshot())),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: still {:?}", shared.snapshot()))
    .expect("the learner's state stays readable");
    shared.snapshot()
}

/// Receives scored windows until `count` have come.
async fn receive(
    scored: &mut broadcast::Receiver<Arc<ScoredWindow>>,
    count: usize,
) -> Vec<Arc<ScoredWindow>> {
    let mut windows = Vec::with_capacity(count);
    while windows.len() < count {
        let window = tokio::time::timeout(PATIENCE, scored.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} windows scored", windows.len()))
            .expect("no scored window missed");
        windows.push(window);
    }
    windows
}

fn version(window: &ScoredWindow) -> String {
    window.experts[0].model_version.to_string()
}

struct Started {
    node: Node,
    join: tokio::task::JoinHandle<()>,
    learner: fogmesh_actors::RunningLearner,
    store: ModelStore,
    scored: broadcast::Receiver<Arc<ScoredWindow>>,
    _dir: tempfile::TempDir,
}

async fn start(spec: LearningSpec) -> Started {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path().join("models"));
    let (v1, weights) = store_version_1(&store, 20);
    let expert = expert_spec(&v1, &weights);
    let annunciator = Annunciator::new(1 << 16);
    let scored = annunciator.subscribe();
    let (node, join) = Node::start(node_spec(expert.clone()), annunciator)
        .await
        .expect("the node starts");
    let learner = start_learner(&node, &expert, spec, &store).await;
    Started {
        node,
        join,
        learner,
        store,
        scored,
        _dir: dir,
    }
}

/// Regime A, then B until the learner has seen the drift; returns the sequence of the
/// first window that holds B rows.
async fn drift_to_b(plant: &mut Plant, shared: &ContinualLearnerShared) -> u64 {
    plant.push(1_608, false).await; // 200 windows of A
    let cut = plant.windows_cut();
    assert_eq!(cut, 200);
    let seen = until(shared, "regime A taken in", |s| s.windows_seen == cut).await;
    assert_eq!(seen.drifts, 0, "no drift within regime A: {seen:?}");
    assert_eq!(seen.phase, Phase::Watching);
    // The next window starts at row 200 * 8 = 1600; the first with B rows is the one
    // that reaches row 1608.
    let first_b = (plant.next - WINDOW as u64) / STRIDE as u64 + 1;
    plant.push(80, true).await;
    let drifted = until(shared, "drift seen", |s| s.drifts >= 1).await;
    let event = drifted.last_drift.expect("the drift is recorded");
    assert!(
        event.window_sequence >= first_b,
        "the drift fired at window {} before the shift at {first_b}: {event:?}",
        event.window_sequence
    );
    assert!(
        event.statistic > event.limit && event.after > event.before,
        "{event:?}"
    );
    first_b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drift_is_learned_validated_and_promoted_without_a_failed_window() {
    let Started {
        node,
        join,
        learner,
        store,
        mut scored,
        _dir,
    } = start(LearningSpec {
        fine_tune: FineTuneOptions {
            epochs: 40,
            ..FineTuneOptions::default()
        },
        ..learning(ValidationGate {
            min_gain: 0.1,
            max_forgetting: 1.0,
        })
    })
    .await;
    let shared = learner.handle.shared.clone();
    let mut plant = Plant::new(&node);
    drift_to_b(&mut plant, &shared).await;

    // Regime B keeps flowing while the round trains, validates and swaps.
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(5));
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                plant.push(STRIDE as u64, true).await;
            }
            plant
        })
    };
    let promoted = until(&shared, "a promotion", |s| {
        s.promotions + s.refusals + s.failures >= 1
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut plant = pusher.await.unwrap();
    assert_eq!(
        (promoted.promotions, promoted.refusals, promoted.failures),
        (1, 0, 0),
        "{promoted:?}"
    );
    let round = promoted.last_round.clone().expect("the round is reported");
    assert_eq!(round.trigger, Trigger::Drift);
    assert!(round.gate.promote, "{:?}", round.gate);
    assert!(
        round.gate.new_after < round.gate.new_before,
        "{:?}",
        round.gate
    );
    assert_eq!(promoted.serving_version, "pump-ae@v2");
    assert_eq!(round.promoted.as_deref(), Some("pump-ae@v2"));
    assert!(promoted.last_drift_to_promotion_s.is_some());

    // Every window cut so far was scored, none failed, and they name both versions.
    let cut = plant.windows_cut() as usize;
    let windows = receive(&mut scored, cut).await;
    let router = node.directory.router("by-asset").unwrap();
    assert_eq!(router.shared.failed.load(Ordering::Relaxed), 0);
    let versions: BTreeSet<String> = windows.iter().map(|w| version(w)).collect();
    assert!(versions.contains("pump-ae@v1"), "{versions:?}");

    // From now on the node serves version 2, and its verdicts say so.
    plant.push(8 * STRIDE as u64, true).await;
    let after = receive(&mut scored, plant.windows_cut() as usize - cut).await;
    assert!(after.iter().all(|w| version(w) == "pump-ae@v2"));
    let snapshot = node.snapshot();
    assert_eq!(snapshot.experts[0].version, "pump-ae@v2");
    assert_eq!(router.shared.failed.load(Ordering::Relaxed), 0);

    // The store keeps the lineage and the round's figures.
    let v2 = store.get("pump-ae@v2").expect("version 2 is stored");
    assert_eq!(v2.parents, vec!["pump-ae@v1".to_string()]);
    assert!(v2.metrics.contains_key("threshold"), "{:?}", v2.metrics);
    assert_eq!(v2.metrics["gate_new_after"], round.gate.new_after);
    assert_eq!(v2.training["continual"]["trigger"], "drift");
    assert_eq!(v2.training["continual"]["drift"]["signal"], "score");
    assert_eq!(v2.architecture, "conv_autoencoder");

    // The promotion itself is not taken for a new drift: the detectors follow v2 now.
    plant.push(64 * STRIDE as u64, true).await;
    let cut = plant.windows_cut();
    let settled = until(&shared, "regime B under v2 taken in", |s| {
        s.windows_seen + s.windows_skipped == cut
    })
    .await;
    assert_eq!(settled.drifts, 1, "{settled:?}");
    assert_eq!(settled.phase, Phase::Watching);

    learner.shutdown().await;
    node.shutdown(join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_the_gate_refuses_leaves_version_1_serving() {
    let Started {
        node,
        join,
        learner,
        store,
        mut scored,
        _dir,
    } = start(LearningSpec {
        // One short epoch cannot cut the new regime's loss by 99 %.
        fine_tune: FineTuneOptions {
            epochs: 1,
            ..FineTuneOptions::default()
        },
        ..learning(ValidationGate {
            min_gain: 0.99,
            max_forgetting: 0.1,
        })
    })
    .await;
    let shared = learner.handle.shared.clone();
    let mut plant = Plant::new(&node);
    drift_to_b(&mut plant, &shared).await;
    // The round starts once 64 windows of B have come after the drift.
    plant.push(64 * STRIDE as u64, true).await;
    let refused = until(&shared, "a verdict of the gate", |s| {
        s.promotions + s.refusals + s.failures >= 1
    })
    .await;
    assert_eq!(
        (refused.promotions, refused.refusals, refused.failures),
        (0, 1, 0),
        "{refused:?}"
    );
    let gate = refused.last_round.expect("the round is reported").gate;
    assert!(
        !gate.promote && gate.reason.starts_with("keep the incumbent"),
        "{gate:?}"
    );
    assert_eq!(refused.serving_version, "pump-ae@v1");
    assert_eq!(refused.phase, Phase::Collecting);
    assert!(
        store.get("pump-ae@v2").is_err(),
        "a refused candidate is not stored"
    );

    let cut = plant.windows_cut() as usize;
    let windows = receive(&mut scored, cut).await;
    assert!(windows.iter().all(|w| version(w) == "pump-ae@v1"));
    assert_eq!(node.snapshot().experts[0].version, "pump-ae@v1");

    learner.shutdown().await;
    node.shutdown(join).await;
}

#[tokio::test]
async fn a_round_asked_for_too_early_says_what_it_lacks() {
    let Started {
        node,
        join,
        learner,
        _dir,
        ..
    } = start(learning(ValidationGate::default())).await;
    let shared = learner.handle.shared.clone();
    let mut plant = Plant::new(&node);
    plant.push(16 + 8 * 9, false).await; // 10 windows
    until(&shared, "10 windows taken in", |s| s.windows_seen == 10).await;
    let error = learner.handle.learn().await.unwrap_err();
    assert!(
        matches!(
            error,
            LearnerError::TooFewWindows {
                new: 10,
                need_new: 64,
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("pump-ae") && message.contains("min_new_windows"),
        "{message}"
    );
    let snapshot = shared.snapshot();
    assert_eq!((snapshot.rounds, snapshot.failures), (0, 0));
    assert_eq!(snapshot.phase, Phase::Watching);

    learner.shutdown().await;
    node.shutdown(join).await;
}

/// Records what it was asked to promote and, like the mesh's deployment loop adopting
/// the spec a rollout just committed, whether the learner (when one is set) counted
/// the version as its own while the promotion ran. The federation tests use it too.
#[derive(Default)]
pub(crate) struct RecordingPromoter {
    pub(crate) promoted: Mutex<Vec<Manifest>>,
    learner: Mutex<Option<Arc<ContinualLearnerShared>>>,
    known_while_promoting: Mutex<Vec<bool>>,
}

impl Promoter for RecordingPromoter {
    fn promote(
        &self,
        _expert: &str,
        version: &Manifest,
    ) -> BoxFuture<'static, Result<(), PromoteError>> {
        self.promoted.lock().unwrap().push(version.clone());
        if let Some(learner) = self.learner.lock().unwrap().as_ref() {
            self.known_while_promoting
                .lock()
                .unwrap()
                .push(learner.knows_version(&version.id()));
        }
        Box::pin(async { Ok(()) })
    }
}

/// A window as a router would publish it, scored by `version` at a steady level.
fn scored_window(sequence: u64, version: &str, rng: &mut SplitMix64) -> ScoredWindow {
    let rows: Vec<Vec<f32>> = (0..WINDOW as u64)
        .map(|t| row(sequence * STRIDE as u64 + t, false, rng))
        .collect();
    ScoredWindow {
        sensor_id: SENSOR.into(),
        router: "by-asset".into(),
        window_sequence: sequence,
        start_us: 0,
        end_us: 0,
        quality: Default::default(),
        score: 0.5,
        anomalous: false,
        experts: vec![ExpertOpinion {
            expert: EXPERT.into(),
            model_version: version.into(),
            score: 0.5,
            threshold: 1.0,
            gate_weight: 1.0,
            class: None,
        }],
        values: windows_of(&rows).into(),
        late: None,
    }
}

#[tokio::test(start_paused = true)]
async fn scheduled_rounds_run_every_every_s_on_new_windows_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path().join("models"));
    // Untrained: any fine-tuning gains, so the first scheduled round promotes.
    let (v1, weights) = store_version_1(&store, 0);
    let annunciator = Annunciator::new(4096);
    let promoter = Arc::new(RecordingPromoter::default());
    let shared = ContinualLearnerShared::new(EXPERT, &v1.id());
    *promoter.learner.lock().unwrap() = Some(shared.clone());
    let spec = LearningSpec {
        every_s: Some(60.0),
        gate: ValidationGate {
            min_gain: 0.0,
            max_forgetting: 10.0,
        },
        ..learning(ValidationGate::default())
    };
    let (actor, join) = ractor::Actor::spawn(
        None,
        ContinualLearner,
        ContinualLearnerArgs {
            expert: expert_spec(&v1, &weights),
            spec,
            store: store.clone(),
            promoter: promoter.clone(),
            annunciator: annunciator.clone(),
            shared: shared.clone(),
            log: None,
        },
    )
    .await
    .expect("the learner starts");
    let started = tokio::time::Instant::now();
    let mut rng = SplitMix64::new(9);
    // 64 recent windows and 136 older ones for the reservoir; no drift (a steady score).
    for sequence in 0..200 {
        annunciator.publish(scored_window(sequence, &v1.id(), &mut rng));
    }
    // Paused time moves on only when every task is idle, so the round starts at the
    // first tick, once all 200 windows are taken in.
    let first = until(&shared, "the first scheduled round", |s| s.rounds >= 1).await;
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert_eq!(first.windows_seen, 200);
    assert_eq!(first.drifts, 0);
    let round = first.last_round.expect("reported");
    assert_eq!(round.trigger, Trigger::Schedule);
    assert_eq!(round.promoted.as_deref(), Some("pump-ae@v2"));
    assert_eq!(first.serving_version, "pump-ae@v2");
    assert_eq!(
        promoter.promoted.lock().unwrap()[0].parents,
        vec!["pump-ae@v1".to_string()]
    );
    // Regression: a mesh rollout commits the spec naming v2 before the round ends, and
    // the deployment loop restarted (and emptied) a learner that did not yet count v2 as
    // its own. It must count it from the start of the promotion, and only its own.
    assert_eq!(*promoter.known_while_promoting.lock().unwrap(), vec![true]);
    assert!(shared.knows_version("pump-ae@v2"));
    assert!(!shared.knows_version("pump-ae@v1"));
    assert!(!shared.knows_version("pump-ae@v7"));
    assert_eq!(first.promoting_version, None);

    // Ticks without new windows start nothing.
    tokio::time::advance(Duration::from_secs(3 * 60)).await;
    tokio::task::yield_now().await;
    assert_eq!(shared.snapshot().rounds, 1);

    // New windows (now scored by v2) make the next tick run another round.
    for sequence in 200..264 {
        annunciator.publish(scored_window(sequence, "pump-ae@v2", &mut rng));
    }
    let second = until(&shared, "the second scheduled round", |s| s.rounds >= 2).await;
    assert_eq!(
        second.last_round.as_ref().expect("reported").trigger,
        Trigger::Schedule
    );
    assert_eq!(second.promotions + second.refusals, 2, "{second:?}");

    actor.stop(None);
    join.await.unwrap();
    assert_eq!(shared.phase(), Phase::Stopped);
}

/// A learner of `expert` on `node`, promoting through the node itself.
async fn start_learner(
    node: &Node,
    expert: &ExpertSpec,
    spec: LearningSpec,
    store: &ModelStore,
) -> fogmesh_actors::RunningLearner {
    let promoter = Arc::new(LocalPromoter::new(
        node.clone(),
        store.clone(),
        [expert.clone()],
    ));
    ContinualLearner::start(node, expert.clone(), spec, store.clone(), promoter)
        .await
        .expect("the learner starts")
}

/// A node on an edge log with a learner of the stored version 1: its node, the
/// learner, and the learner's expert.
async fn start_durable(
    dir: &std::path::Path,
    store: &ModelStore,
    expert: &ExpertSpec,
) -> (
    Node,
    tokio::task::JoinHandle<()>,
    fogmesh_actors::RunningLearner,
) {
    let log = fogmesh_edge_log::EdgeLog::open(&dir.join("edge-log")).expect("the log opens");
    let (node, join) = Node::start_with_log(
        node_spec(expert.clone()),
        Annunciator::new(1 << 16),
        Some(crate::edge_log::storage(log)),
    )
    .await
    .expect("the node starts");
    let learner = start_learner(&node, expert, learning(ValidationGate::default()), store).await;
    (node, join, learner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_gives_its_learner_back_its_reservoir_and_the_new_regime() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path().join("models"));
    let (v1, weights) = store_version_1(&store, 20);
    let expert = expert_spec(&v1, &weights);

    let (node, join, learner) = start_durable(dir.path(), &store, &expert).await;
    let shared = learner.handle.shared.clone();
    let mut plant = Plant::new(&node);
    drift_to_b(&mut plant, &shared).await;
    let cut = plant.windows_cut();
    let before = until(&shared, "every window taken in", |s| s.windows_seen == cut).await;
    assert_eq!(before.phase, Phase::Collecting, "{before:?}");
    assert!(before.reservoir > 0 && before.new_windows > 0, "{before:?}");
    learner.shutdown().await;
    node.shutdown(join).await;
    drop((node, plant));

    let (node, join, learner) = start_durable(dir.path(), &store, &expert).await;
    let after = learner.handle.shared.snapshot();
    assert_eq!(
        (after.phase, after.reservoir, after.new_windows),
        (Phase::Collecting, before.reservoir, before.new_windows),
        "the learner took back what it held"
    );
    learner.shutdown().await;
    node.shutdown(join).await;
}
