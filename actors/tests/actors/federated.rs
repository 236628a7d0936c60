//! The `FederatedCoordinator` over real `SiteTrainer`s on a real model store: a round
//! stores a version with its lineage and promotes it; a site that does not answer in
//! time is left out of the round, and a round with too few answers applies nothing; a
//! stopped site counts as failed; two and three levels (fog aggregators under a cloud
//! coordinator) give the flat federation's weights; a buffered (FedBuff) run applies
//! exactly the versions asked and stores one version; a site on a node trains on its
//! continual learner's windows, and on its own sample when there is no learner.

use std::sync::Arc;
use std::time::Duration;

use fogmesh_actors::{
    EvaluationGate, FederatedCoordinator, FederatedCoordinatorArgs, FederatedCoordinatorMsg,
    FederatedRound, FederationError, FederationPlan, FederationSite, FederationStatus, Publication,
    RoundWork, Site, SiteTrainer, SiteTrainerArgs, SiteTrainerMsg,
};
use fogmesh_models::continual::ReplayItem;
use fogmesh_models::federated::{Aggregation, LocalWork};
use fogmesh_models::merge::Weights;
use fogmesh_models::served::Architecture;
use fogmesh_models::store::{Manifest, ModelStore};
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, SplitMix64};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::continual_learner::RecordingPromoter;
use crate::plant::{row, CHANNELS};

const WINDOW: usize = 16;

fn config() -> AutoencoderConfig {
    AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64)
}

fn architecture() -> Architecture {
    Architecture::ConvAutoencoder(config())
}

/// The autoencoder as initialised from a seed: every federation's starting point.
fn base_weights() -> Vec<u8> {
    ConvAutoencoder::new(config(), tch::Device::Cpu, 3)
        .unwrap()
        .to_safetensors()
        .unwrap()
        .0
}

/// `pump-ae@1` in `store`.
fn base(store: &ModelStore) -> (Manifest, Vec<u8>) {
    let weights = base_weights();
    let manifest = store
        .import(architecture().manifest("pump-ae", "1"), &weights)
        .unwrap();
    (manifest, weights)
}

/// `n` channel-major windows of the synthetic plant, shifted (regime B) at odd sites.
fn windows(site: u64, n: usize) -> Vec<ReplayItem> {
    let mut rng = SplitMix64::new(site);
    (0..n as u64)
        .map(|w| {
            let rows: Vec<Vec<f32>> = (0..WINDOW as u64)
                .map(|t| row(w * 4 + t, site % 2 == 1, &mut rng))
                .collect();
            let window = (0..CHANNELS)
                .flat_map(|c| rows.iter().map(move |r| r[c]))
                .collect();
            ReplayItem {
                window,
                label: None,
            }
        })
        .collect()
}

async fn trainer(site: u64, n: usize) -> FederationSite {
    let (actor, _) = Actor::spawn(
        None,
        SiteTrainer,
        SiteTrainerArgs {
            site: format!("site-{site}"),
            architecture: architecture(),
            windows: windows(site, n),
            // Another stretch of the same regime (the seed's parity picks it).
            held_out: windows(site + 1000, 8),
            feed: None,
            network: None,
        },
    )
    .await
    .unwrap();
    FederationSite {
        name: format!("site-{site}"),
        site: Site::Trainer(actor),
    }
}

/// A site that takes the round and never answers (its reply port kept alive).
struct SilentSite;

impl Actor for SilentSite {
    type Msg = SiteTrainerMsg;
    type State =
        Vec<RpcReplyPort<Result<fogmesh_actors::SiteReport, fogmesh_actors::TrainingError>>>;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        _: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Vec::new())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        held: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Evaluations are not asked of it: the coordinators here have no gate.
        if let SiteTrainerMsg::Train { reply, .. } = message {
            held.push(reply);
        }
        Ok(())
    }
}

fn gated(max_regression: f64) -> FederationPlan {
    FederationPlan {
        gate: Some(EvaluationGate { max_regression }),
        ..plan(2, Duration::from_secs(60))
    }
}

fn plan(min_sites: usize, deadline: Duration) -> FederationPlan {
    FederationPlan {
        work: RoundWork {
            local: LocalWork {
                epochs: 2,
                batch_size: 16,
                learning_rate: 1e-2,
                ..LocalWork::default()
            },
            ..RoundWork::default()
        },
        aggregation: Aggregation::FedAvg,
        privacy: None,
        min_sites,
        deadline,
        seed: 1,
        gate: None,
        buffered: None,
        distillation: None,
    }
}

pub(crate) async fn coordinator(
    name: &str,
    (base, weights): (Manifest, Vec<u8>),
    sites: Vec<FederationSite>,
    plan: FederationPlan,
    publication: Option<Publication>,
) -> ActorRef<FederatedCoordinatorMsg> {
    let (actor, _) = Actor::spawn(
        None,
        FederatedCoordinator,
        FederatedCoordinatorArgs {
            federation: name.into(),
            base,
            weights,
            sites,
            plan,
            publication,
            spent: Default::default(),
        },
    )
    .await
    .unwrap();
    actor
}

pub(crate) async fn ask<T: Send + 'static>(
    actor: &ActorRef<FederatedCoordinatorMsg>,
    message: impl FnOnce(RpcReplyPort<T>) -> FederatedCoordinatorMsg,
) -> T {
    match actor.call(message, Some(Duration::from_secs(120))).await {
        Ok(CallResult::Success(answer)) => answer,
        other => panic!("the coordinator gave no answer: {:?}", other.is_ok()),
    }
}

pub(crate) async fn round(
    actor: &ActorRef<FederatedCoordinatorMsg>,
) -> Result<FederatedRound, FederationError> {
    ask(actor, |reply| FederatedCoordinatorMsg::Round { reply }).await
}

async fn status(actor: &ActorRef<FederatedCoordinatorMsg>) -> FederationStatus {
    ask(actor, |reply| FederatedCoordinatorMsg::Status { reply }).await
}

pub(crate) async fn global(actor: &ActorRef<FederatedCoordinatorMsg>) -> Weights {
    let bytes = ask(actor, |reply| FederatedCoordinatorMsg::Global { reply }).await;
    Weights::from_safetensors(&bytes, "the global weights").unwrap()
}

/// The largest difference between two coordinators' global weights, value by value.
pub(crate) async fn largest_difference(
    a: &ActorRef<FederatedCoordinatorMsg>,
    b: &ActorRef<FederatedCoordinatorMsg>,
) -> f32 {
    let (a, b) = (global(a).await, global(b).await);
    a.values()
        .iter()
        .zip(b.values())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_stores_a_version_with_its_lineage_and_promotes_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path());
    let stored = base(&store);
    let promoter = Arc::new(RecordingPromoter::default());
    let sites = vec![trainer(0, 40).await, trainer(1, 24).await];
    let actor = coordinator(
        "pump-ae",
        stored,
        sites,
        plan(2, Duration::from_secs(60)),
        Some(Publication {
            store: store.clone(),
            promoter: Some(promoter.clone()),
        }),
    )
    .await;

    let report = round(&actor).await.unwrap();
    assert_eq!(report.sites, ["site-0", "site-1"]);
    assert_eq!(report.samples, 64);
    assert_eq!(report.version.as_deref(), Some("pump-ae@2"));
    assert!(report.promoted && report.bytes_up > 0 && report.loss.is_some());
    let manifest = store.get("pump-ae@2").unwrap();
    assert_eq!(manifest.parents, ["pump-ae@1"]);
    let lineage = &manifest.training["federated"];
    assert_eq!(lineage["round"], 1);
    assert_eq!(lineage["sites"], serde_json::json!(["site-0", "site-1"]));
    assert_eq!(lineage["samples"], 64);
    assert_eq!(lineage["aggregation"]["rule"], "fedavg");
    // The stored weights are the coordinator's global weights, and they moved.
    let weights = store.weights(&manifest).unwrap();
    let now = global(&actor).await;
    assert_eq!(Weights::from_safetensors(&weights, "stored").unwrap(), now);
    assert_eq!(promoter.promoted.lock().unwrap()[0].id(), "pump-ae@2");

    // The next round descends from the version just stored.
    let second = round(&actor).await.unwrap();
    assert_eq!(second.version.as_deref(), Some("pump-ae@3"));
    assert_eq!(store.get("pump-ae@3").unwrap().parents, ["pump-ae@2"]);
    let state = status(&actor).await;
    assert_eq!((state.rounds, state.version.as_str()), (2, "pump-ae@3"));
    actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_site_judges_a_rounds_weights_and_the_gate_decides_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path());
    let stored = base(&store);
    let sites = vec![trainer(0, 40).await, trainer(1, 24).await];
    let publication = || Publication {
        store: store.clone(),
        promoter: None,
    };
    let demanding = coordinator(
        "pump-ae",
        stored.clone(),
        sites.clone(),
        gated(-0.99),
        Some(publication()),
    )
    .await;
    let refused = round(&demanding).await.unwrap();
    let evaluation = refused.evaluation.unwrap();
    assert!(
        !evaluation.passed && refused.version.is_none(),
        "{evaluation:?}"
    );
    assert_eq!(evaluation.windows, 16);
    assert_eq!(evaluation.sites.len(), 2);
    assert!(
        evaluation.candidate < evaluation.incumbent,
        "{evaluation:?}"
    );
    assert!(
        evaluation.reason.starts_with("not stored"),
        "{}",
        evaluation.reason
    );
    assert!(store.get("pump-ae@2").is_err());
    demanding.stop(None);

    let fair = coordinator("pump-ae", stored, sites, gated(0.0), Some(publication())).await;
    let accepted = round(&fair).await.unwrap();
    let evaluation = accepted.evaluation.unwrap();
    assert!(evaluation.passed, "{evaluation:?}");
    assert_eq!(accepted.version.as_deref(), Some("pump-ae@2"));
    let lineage = store.get("pump-ae@2").unwrap().training;
    assert_eq!(
        lineage["federated"]["evaluation"]["sites"][0]["site"],
        "site-0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stragglers_and_stopped_sites_are_left_out_and_too_few_answers_apply_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path());
    let stored = base(&store);
    let (silent, _) = Actor::spawn(None, SilentSite, ()).await.unwrap();
    let stopped = trainer(2, 16).await;
    if let Site::Trainer(actor) = &stopped.site {
        actor.stop(None);
    }
    let sites = vec![
        trainer(0, 16).await,
        trainer(1, 16).await,
        FederationSite {
            name: "silent".into(),
            site: Site::Trainer(silent),
        },
        stopped,
    ];
    let deadline = Duration::from_secs(3);
    let lenient = coordinator(
        "pump-ae",
        stored.clone(),
        sites.clone(),
        plan(2, deadline),
        None,
    )
    .await;
    let report = round(&lenient).await.unwrap();
    assert_eq!(report.sites, ["site-0", "site-1"]);
    assert_eq!(report.stragglers, ["silent"]);
    assert_eq!(report.failed, ["site-2"]);
    assert!(report.seconds < 2.0 * deadline.as_secs_f64(), "{report:?}");

    let strict = coordinator("pump-ae", stored, sites, plan(3, deadline), None).await;
    let before = global(&strict).await;
    let error = round(&strict).await.unwrap_err();
    assert!(
        matches!(
            &error,
            FederationError::TooFewSites {
                answered: 2,
                needed: 3,
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("silent") && message.contains("site-2"),
        "{message}"
    );
    assert_eq!(global(&strict).await, before);
    assert!(status(&strict).await.last.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_levels_give_the_flat_federations_weights() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path());
    let stored = base(&store);
    let deadline = Duration::from_secs(60);
    let flat = coordinator(
        "pump-ae",
        stored.clone(),
        vec![
            trainer(0, 24).await,
            trainer(1, 16).await,
            trainer(2, 32).await,
            trainer(3, 8).await,
        ],
        plan(4, deadline),
        None,
    )
    .await;
    let fog_a = coordinator(
        "fog-a",
        stored.clone(),
        vec![trainer(0, 24).await, trainer(1, 16).await],
        plan(2, deadline),
        None,
    )
    .await;
    let fog_b = coordinator(
        "fog-b",
        stored.clone(),
        vec![trainer(2, 32).await, trainer(3, 8).await],
        plan(2, deadline),
        None,
    )
    .await;
    let cloud = coordinator(
        "pump-ae",
        stored.clone(),
        vec![
            FederationSite {
                name: "fog-a".into(),
                site: Site::Aggregator(fog_a.clone()),
            },
            FederationSite {
                name: "fog-b".into(),
                site: Site::Aggregator(fog_b.clone()),
            },
        ],
        plan(2, deadline),
        None,
    )
    .await;
    // Three levels: a cell's aggregator under an area's, which also has sites of its own.
    let cell = coordinator(
        "cell",
        stored.clone(),
        vec![trainer(0, 24).await, trainer(1, 16).await],
        plan(2, deadline),
        None,
    )
    .await;
    let area = coordinator(
        "area",
        stored.clone(),
        vec![
            FederationSite {
                name: "cell".into(),
                site: Site::Aggregator(cell.clone()),
            },
            trainer(2, 32).await,
            trainer(3, 8).await,
        ],
        plan(3, deadline),
        None,
    )
    .await;
    let top = coordinator(
        "pump-ae",
        stored,
        vec![FederationSite {
            name: "area".into(),
            site: Site::Aggregator(area.clone()),
        }],
        plan(1, deadline),
        None,
    )
    .await;
    for _ in 0..2 {
        let levels = round(&cloud).await.unwrap();
        assert_eq!(levels.sites, ["fog-a", "fog-b"]);
        assert_eq!(levels.samples, 80);
        let three = round(&top).await.unwrap();
        assert_eq!(
            (three.sites.as_slice(), three.samples),
            (&["area".to_string()][..], 80)
        );
        round(&flat).await.unwrap();
    }
    assert_eq!(
        status(&area).await.last.unwrap().sites,
        ["cell", "site-2", "site-3"]
    );
    let from_flat = largest_difference(&top, &flat).await;
    assert!(
        from_flat < 1e-5,
        "three levels differ from flat by {from_flat}"
    );
    // Each fog aggregator ran its zone's rounds.
    let zone = status(&fog_a).await;
    assert_eq!(zone.rounds, 2);
    assert_eq!(zone.last.unwrap().sites, ["site-0", "site-1"]);
    let largest = largest_difference(&cloud, &flat).await;
    // A weighted mean of weighted means is the weighted mean; only rounding differs.
    assert!(largest < 1e-5, "two levels differ from flat by {largest}");
    let initial = Weights::from_safetensors(&base_weights(), "initial").unwrap();
    assert_ne!(global(&cloud).await, initial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_run_applies_the_versions_asked_and_stores_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path());
    let stored = base(&store);
    // Sites of very different sizes: the small ones answer several times while the
    // large one trains, so updates arrive stale.
    let sites = vec![
        trainer(0, 8).await,
        trainer(1, 8).await,
        trainer(2, 160).await,
    ];
    let actor = coordinator(
        "pump-ae",
        stored,
        sites,
        plan(1, Duration::from_secs(60)),
        Some(Publication {
            store: store.clone(),
            promoter: None,
        }),
    )
    .await;
    let report = ask(&actor, |reply| FederatedCoordinatorMsg::Buffered {
        versions: 4,
        buffer: 2,
        reply,
    })
    .await
    .unwrap();
    assert_eq!(report.mode, "buffered");
    assert_eq!(report.applied, 4);
    assert!(report.max_staleness >= 1, "{report:?}");
    assert_eq!(report.version.as_deref(), Some("pump-ae@2"));
    let lineage = store.get("pump-ae@2").unwrap().training;
    assert_eq!(lineage["federated"]["applied"], 4);
    // Answers still in flight from the finished run are not applied: a synchronous
    // round afterwards starts from the stored version and adds exactly one version.
    let next = round(&actor).await.unwrap();
    assert_eq!(next.version.as_deref(), Some("pump-ae@3"));
    let error = ask(&actor, |reply| FederatedCoordinatorMsg::Buffered {
        versions: 0,
        buffer: 2,
        reply,
    })
    .await
    .unwrap_err();
    assert!(error.to_string().contains("versions = 0"), "{error}");
}

/// Everything a site sends out in a round and an evaluation (its encoded update, its
/// counts, losses and times) is searched for the bytes of every value of its windows:
/// none is there. Window values are made distinctive (no weight or loss will equal
/// them by chance): each is a plant reading plus a unique offset of 1e-4 · i.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_a_site_sends_holds_a_value_of_its_windows() {
    let mut own = windows(0, 24);
    let mut counter = 0f32;
    for item in &mut own {
        for v in &mut item.window {
            counter += 1.0;
            *v += 1e-4 * counter;
        }
    }
    let held_out = windows(1000, 4);
    let values: Vec<[u8; 4]> = own
        .iter()
        .chain(&held_out)
        .flat_map(|i| i.window.iter().map(|v| v.to_le_bytes()))
        .collect();
    let (site, _) = Actor::spawn(
        None,
        SiteTrainer,
        SiteTrainerArgs {
            site: "site-0".into(),
            architecture: architecture(),
            windows: own,
            held_out,
            feed: None,
            network: None,
        },
    )
    .await
    .unwrap();
    let global = Arc::new(base_weights());
    let report = match site
        .call(
            |reply| SiteTrainerMsg::Train {
                round: 1,
                global: global.clone(),
                work: Arc::new(plan(1, Duration::from_secs(60)).work),
                reply,
            },
            None,
        )
        .await
        .unwrap()
    {
        CallResult::Success(report) => report.unwrap(),
        _ => panic!("the site gave no report"),
    };
    let judged = match site
        .call(
            |reply| SiteTrainerMsg::Evaluate {
                weights: vec![global.clone()],
                reply,
            },
            None,
        )
        .await
        .unwrap()
    {
        CallResult::Success(evaluation) => evaluation.unwrap(),
        _ => panic!("the site gave no evaluation"),
    };
    let mut sent = report.update.bytes.clone();
    for number in [report.loss.unwrap_or_default(), judged.losses[0]] {
        sent.extend_from_slice(&(number as f32).to_le_bytes());
        sent.extend_from_slice(&number.to_le_bytes());
    }
    sent.extend_from_slice(&report.samples.to_le_bytes());
    assert!(sent.len() > 1000, "the update is {} bytes", sent.len());
    let leaked = values
        .iter()
        .filter(|value| sent.windows(4).any(|w| w == value.as_slice()))
        .count();
    assert_eq!(
        leaked, 0,
        "{leaked} window values found in what the site sent"
    );
    site.stop(None);
}

/// A continual learner that holds `windows`, as far as its node's site can tell.
struct HoldingLearner;

impl Actor for HoldingLearner {
    type Msg = fogmesh_actors::ContinualLearnerMsg;
    type State = Vec<ReplayItem>;
    type Arguments = Vec<ReplayItem>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        windows: Vec<ReplayItem>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(windows)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        windows: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let fogmesh_actors::ContinualLearnerMsg::Windows { reply } = message {
            let _ = reply.send(windows.clone());
        }
        Ok(())
    }
}

/// Trains a round of `site` and judges the base weights on what it holds out: the
/// windows trained on and the windows judged on.
async fn train_and_judge(site: &ActorRef<SiteTrainerMsg>) -> (u64, u64) {
    let global = Arc::new(base_weights());
    let work = Arc::new(RoundWork::default());
    let report = site
        .call(
            |reply| SiteTrainerMsg::Train {
                round: 1,
                global: global.clone(),
                work,
                reply,
            },
            None,
        )
        .await
        .unwrap();
    let CallResult::Success(report) = report else {
        panic!("the site answered no report")
    };
    let report = report.expect("the site trains");
    let judged = site
        .call(
            |reply| SiteTrainerMsg::Evaluate {
                weights: vec![global],
                reply,
            },
            None,
        )
        .await
        .unwrap();
    let CallResult::Success(judged) = judged else {
        panic!("the site answered no evaluation")
    };
    (report.samples, judged.expect("the site judges").windows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_on_a_node_trains_on_its_learners_windows_and_on_its_own_sample_without_one() {
    let directory = Arc::new(fogmesh_actors::NodeDirectory::default());
    let (_scored, feed) = tokio::sync::broadcast::channel(16);
    let (site, _) = Actor::spawn(
        None,
        SiteTrainer,
        SiteTrainerArgs {
            site: "edge-1".into(),
            architecture: architecture(),
            windows: Vec::new(),
            held_out: Vec::new(),
            feed: Some(fogmesh_actors::WindowFeed {
                windows: feed,
                expert: "pump-ae".into(),
                capacity: 64,
                holdout_every: 4,
                seed: 1,
                learners: Some(directory.clone()),
            }),
            network: None,
        },
    )
    .await
    .unwrap();
    // The site's own sample: 12 windows its node's routers had the expert score.
    for (sequence, item) in windows(2, 12).into_iter().enumerate() {
        let scored = fogmesh_actors::ScoredWindow {
            sensor_id: "s1".into(),
            router: "r1".into(),
            window_sequence: sequence as u64,
            start_us: 0,
            end_us: 0,
            quality: Default::default(),
            score: 0.5,
            anomalous: false,
            experts: Vec::new(),
            values: item.window.into(),
            late: None,
        };
        site.cast(SiteTrainerMsg::Observed(Arc::new(scored)))
            .unwrap();
    }
    // The learner holds 40 other windows (its reservoir and recent ones).
    let (learner, _) = Actor::spawn(None, HoldingLearner, windows(1, 40))
        .await
        .unwrap();
    directory.learners.insert(
        "pump-ae".into(),
        fogmesh_actors::directory::LearnerHandle {
            actor: learner.clone(),
            shared: fogmesh_actors::continual_learner::ContinualLearnerShared::new(
                "pump-ae",
                "pump-ae@1",
            ),
        },
    );
    let (trained, judged) = train_and_judge(&site).await;
    assert_eq!(trained + judged, 40, "{trained} trained, {judged} judged");
    assert!(
        judged > 0 && trained > judged,
        "{trained} trained, {judged} judged"
    );
    // Asked again, the learner's windows split the same way.
    assert_eq!(train_and_judge(&site).await, (trained, judged));

    // Without a learner, the site's own sample: every fourth window held out.
    directory.learners.remove("pump-ae");
    learner.stop(None);
    assert_eq!(train_and_judge(&site).await, (9, 3));
}
