//! Federated distillation through the actors: two sites whose classifiers differ in
//! width, each seeing normal operation and one fault of its own, answer with their
//! outputs on shared unlabelled windows; the coordinator's classifier, which never sees
//! a label, learns every class from their consensus, and each round is stored as an
//! ordinary version with its lineage; with privacy, the consensus is noised and ε
//! spent.

use std::sync::Arc;
use std::time::Duration;

use fogmesh_actors::{
    Distillation, FederationPlan, FederationSite, Publication, RoundWork, Site, SiteTrainer,
    SiteTrainerArgs,
};
use fogmesh_models::classifier::{ClassifierConfig, FaultClassifier};
use fogmesh_models::continual::ReplayItem;
use fogmesh_models::federated::{Aggregation, LocalWork, Privacy};
use fogmesh_models::served::{Architecture, Classes};
use fogmesh_models::store::ModelStore;
use fogmesh_models::SplitMix64;
use ractor::Actor;

use crate::federated::{ask, coordinator, largest_difference, round};

const CLASSES: usize = 3;

fn classifier(hidden: i64) -> Architecture {
    Architecture::FaultClassifier {
        config: ClassifierConfig {
            channels: 2,
            window: 8,
            hidden,
            classes: CLASSES as i64,
        },
        classes: Classes {
            names: vec!["normal".into(), "leak".into(), "clog".into()],
            normal: 0,
        },
    }
}

/// Class c's windows sit at level c − 1, with noise; unlabelled when `labelled` is
/// false.
fn items(classes: &[i64], n: usize, seed: u64, labelled: bool) -> Vec<ReplayItem> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|i| {
            let class = classes[i % classes.len()];
            ReplayItem {
                window: (0..16)
                    .map(|_| (class as f64 - 1.0 + 0.2 * rng.normal()) as f32)
                    .collect(),
                label: labelled.then_some(class),
            }
        })
        .collect()
}

async fn site(
    name: &str,
    network: Option<Architecture>,
    classes: &[i64],
    seed: u64,
) -> FederationSite {
    let (actor, _) = Actor::spawn(
        None,
        SiteTrainer,
        SiteTrainerArgs {
            site: name.into(),
            architecture: classifier(16),
            windows: items(classes, 60, seed, true),
            held_out: items(classes, 12, seed + 100, true),
            feed: None,
            network,
        },
    )
    .await
    .unwrap();
    FederationSite {
        name: name.into(),
        site: Site::Trainer(actor),
    }
}

fn accuracy(weights: &[u8], test: &[ReplayItem]) -> f64 {
    let Architecture::FaultClassifier { config, .. } = classifier(16) else {
        unreachable!()
    };
    let model = FaultClassifier::from_safetensors(config, weights, None, tch::Device::Cpu).unwrap();
    let windows: Vec<f32> = test.iter().flat_map(|i| i.window.clone()).collect();
    let predicted = model.predict(&windows).unwrap();
    let right = predicted
        .iter()
        .zip(test)
        .filter(|(p, i)| Some(**p) == i.label)
        .count();
    right as f64 / test.len() as f64
}

/// The coordinator's classifier stored as `valve-clf@1`: its manifest and weights.
fn stored_base(store: &ModelStore) -> (fogmesh_models::store::Manifest, Vec<u8>) {
    let Architecture::FaultClassifier { config, .. } = classifier(16) else {
        unreachable!()
    };
    let (weights, _) = FaultClassifier::new(config, tch::Device::Cpu, 5)
        .unwrap()
        .to_safetensors()
        .unwrap();
    let base = store
        .import(classifier(16).manifest("valve-clf", "1"), &weights)
        .unwrap();
    (base, weights)
}

/// Distillation rounds on `shared` among at least `min_sites`, with `privacy`.
fn distillation_plan(
    shared: Arc<Vec<ReplayItem>>,
    privacy: Option<Privacy>,
    min_sites: usize,
) -> FederationPlan {
    FederationPlan {
        work: RoundWork {
            local: LocalWork {
                epochs: 3,
                batch_size: 16,
                learning_rate: 1e-2,
                ..LocalWork::default()
            },
            ..RoundWork::default()
        },
        aggregation: Aggregation::FedAvg,
        privacy,
        min_sites,
        deadline: Duration::from_secs(60),
        seed: 1,
        gate: None,
        buffered: None,
        distillation: Some(Distillation {
            shared,
            weight: 1.0,
        }),
    }
}

/// Six distillation rounds between two sites of other widths, each knowing normal
/// operation and one fault of its own, with `privacy` on their outputs: the store and
/// the coordinator's classifier's accuracy on all three classes before and after (and
/// the folder the store lives in).
async fn six_rounds(privacy: Option<Privacy>) -> (tempfile::TempDir, ModelStore, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path());
    let (base, weights) = stored_base(&store);
    let sites = vec![
        site("gateway-1", Some(classifier(8)), &[0, 1], 1).await,
        site("server-1", Some(classifier(24)), &[0, 2], 2).await,
    ];
    let shared = Arc::new(items(&[0, 1, 2], 30, 3, false));
    let plan = distillation_plan(shared.clone(), privacy, 2);
    let actor = coordinator(
        "valve-clf",
        (base, weights.clone()),
        sites,
        plan,
        Some(Publication {
            store: store.clone(),
            promoter: None,
        }),
    )
    .await;
    let test = items(&[0, 1, 2], 90, 4, true);
    let before = accuracy(&weights, &test);
    let mut epsilon = 0.0;
    for r in 1..=6 {
        let report = round(&actor).await.expect("a distillation round");
        assert_eq!(report.mode, "distillation");
        assert_eq!(report.sites, ["gateway-1", "server-1"]);
        assert_eq!(report.samples, 120);
        // Each site's class probabilities on every shared window, as f32.
        assert_eq!(report.bytes_up, (2 * shared.len() * CLASSES * 4) as u64);
        assert_eq!(
            report.version.as_deref(),
            Some(format!("valve-clf@{}", r + 1).as_str())
        );
        match privacy {
            None => assert_eq!(report.epsilon, None),
            Some(_) => {
                let spent = report.epsilon.expect("a private round spends ε");
                assert!(spent > epsilon, "round {r}: ε {spent} after {epsilon}");
                epsilon = spent;
            }
        }
    }
    let stored = store.get("valve-clf@7").unwrap();
    assert_eq!(stored.training["federated"]["mode"], "distillation");
    assert_eq!(
        stored.training["federated"]["distillation"]["shared_windows"],
        30
    );
    let global = ask(&actor, |reply| {
        fogmesh_actors::FederatedCoordinatorMsg::Global { reply }
    })
    .await;
    let after = accuracy(&global, &test);
    (dir, store, before, after)
}

/// Without privacy, then with it: each site's outputs clipped and the consensus
/// noised (then put back among probabilities), ε growing round by round and kept in
/// the lineage, and with light noise the classes still learned. One test, the two in
/// turn: the networks start from libtorch's process-wide generator, seeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_of_other_widths_teach_the_coordinators_network_every_class_in_private_too() {
    let (_dir, _, before, after) = six_rounds(None).await;
    assert!(before < 0.5, "the untrained classifier: {before}");
    assert!(after > 0.9, "after distillation: {after}");

    // 30 windows of 3 probabilities: a site's outputs have an L2 norm of at most √30.
    let privacy = Privacy {
        clip_norm: 30f64.sqrt(),
        noise_multiplier: 0.05,
        delta: 1e-5,
    };
    let (_dir, store, _, after) = six_rounds(Some(privacy)).await;
    let lineage = &store.get("valve-clf@7").unwrap().training["federated"];
    assert_eq!(lineage["privacy_spent"]["rounds"], 6);
    assert!(lineage["epsilon"].as_f64() > Some(0.0), "{lineage}");
    assert!(after > 0.8, "after private distillation: {after}");
}

/// A fog aggregator in a distillation round combines its sites' outputs by windows
/// and passes them up as one site's: the cloud reaches the flat federation's
/// consensus, so its network learns the same. The sites train the federation's own
/// network (from the global weights), so both federations' sites work alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fog_aggregator_relays_distillation_and_two_levels_give_the_flat_network() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path());
    let stored = stored_base(&store);
    let shared = Arc::new(items(&[0, 1, 2], 30, 3, false));
    let plan = distillation_plan(shared, None, 2);
    let flat = coordinator(
        "valve-clf",
        stored.clone(),
        vec![
            site("gateway-1", None, &[0, 1], 1).await,
            site("gateway-2", None, &[0, 2], 2).await,
            site("server-1", None, &[0], 3).await,
        ],
        plan.clone(),
        None,
    )
    .await;
    let fog = coordinator(
        "fog-a",
        stored.clone(),
        vec![
            site("gateway-1", None, &[0, 1], 1).await,
            site("gateway-2", None, &[0, 2], 2).await,
        ],
        plan.clone(),
        None,
    )
    .await;
    let cloud = coordinator(
        "valve-clf",
        stored,
        vec![
            FederationSite {
                name: "fog-a".into(),
                site: Site::Aggregator(fog.clone()),
            },
            site("server-1", None, &[0], 3).await,
        ],
        plan,
        None,
    )
    .await;
    for _ in 0..2 {
        let levels = round(&cloud).await.expect("a round through the aggregator");
        assert_eq!(levels.mode, "distillation");
        assert_eq!(levels.sites, ["fog-a", "server-1"]);
        assert_eq!(
            levels.samples, 180,
            "the aggregator speaks for its sites' windows"
        );
        round(&flat).await.expect("a flat round");
    }
    let zone = ask(&fog, |reply| {
        fogmesh_actors::FederatedCoordinatorMsg::Status { reply }
    })
    .await;
    assert_eq!(zone.last.unwrap().sites, ["gateway-1", "gateway-2"]);
    let largest = largest_difference(&cloud, &flat).await;
    // A weighted mean of weighted means is the weighted mean; only rounding differs.
    assert!(largest < 1e-4, "two levels differ from flat by {largest}");
}
