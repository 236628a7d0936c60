//! A round between a coordinator and a site on the other side of a real TCP link
//! (gRPC over loopback through a proxy that records every byte both ways): the
//! round and its federated evaluation complete, and no two consecutive values of any
//! window the site holds cross the link in either direction; the same for a
//! distillation round with a site whose network is narrower than the federation's.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogmesh_actors::{
    Annunciator, Distillation, EvaluationGate, FederatedCoordinator, FederatedCoordinatorArgs,
    FederatedCoordinatorMsg, FederationPlan, FederationSite, Node, NodeSpec, Publication,
    RoundWork, Site, SiteTrainer, SiteTrainerArgs, SiteTrainerMsg,
};
use fogmesh_models::continual::ReplayItem;
use fogmesh_models::federated::{Aggregation, LocalWork};
use fogmesh_models::served::Architecture;
use fogmesh_models::store::ModelStore;
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, SplitMix64};
use fogmesh_proto::federation_server::FederationServer;
use ractor::{Actor, ActorRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{FederationService, RemoteSite, RemoteSiteArgs};
use crate::dialer::Dialer;

const CHANNELS: i64 = 2;
const WINDOW: i64 = 16;

fn windows(seed: u64, n: usize) -> Vec<ReplayItem> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| ReplayItem {
            window: (0..CHANNELS * WINDOW)
                .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
                .collect(),
            label: None,
        })
        .collect()
}

/// Copies `from` to `to`, appending what crosses to `seen`.
async fn record<R, W>(mut from: R, mut to: W, seen: Arc<Mutex<Vec<u8>>>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buffer).await {
        if n == 0 || to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
        seen.lock().unwrap().extend_from_slice(&buffer[..n]);
    }
}

/// Forwards `127.0.0.1:<returned port>` to `target`, appending every byte that
/// crosses, either way, to `seen`.
async fn recording_proxy(target: std::net::SocketAddr, seen: Arc<Mutex<Vec<u8>>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(target).await else {
                continue;
            };
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::spawn(record(in_read, out_write, seen.clone()));
            tokio::spawn(record(out_read, in_write, seen.clone()));
        }
    });
    addr
}

/// A `SiteTrainer` of federation `ae` on node `edge-1`, served over gRPC behind a
/// recording proxy; the `RemoteSite` a coordinator reaches it through, what crossed,
/// and the service (what the node holds between rounds).
async fn remote_site(
    args: SiteTrainerArgs,
) -> (
    ActorRef<SiteTrainerMsg>,
    Arc<Mutex<Vec<u8>>>,
    FederationService,
) {
    let empty = NodeSpec {
        node: "edge-1".into(),
        sensors: Vec::new(),
        routers: Vec::new(),
        experts: Vec::new(),
        remote_experts: Vec::new(),
        restart: Default::default(),
    };
    let (node, _) = Node::start(empty, Annunciator::new(16)).await.unwrap();
    let (site, _) = Actor::spawn(None, SiteTrainer, args).await.unwrap();
    node.directory.sites.insert("ae".into(), site);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let service = FederationService::new("edge-1".into(), node, None, None);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FederationServer::new(service.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let proxy = recording_proxy(server_addr, seen.clone()).await;

    let (remote, _) = Actor::spawn(
        None,
        RemoteSite,
        RemoteSiteArgs {
            site: "edge-1".into(),
            addr: proxy,
            membership: None,
            federation: "ae".into(),
            aggregate: false,
            dialer: Dialer::new(None, None),
        },
    )
    .await
    .unwrap();
    (remote, seen, service)
}

/// Whether two consecutive values of any of `items`' windows are in `seen`.
fn assert_no_window_values(seen: &[u8], items: &[ReplayItem]) {
    for item in items {
        for pair in item.window.windows(2) {
            let bytes: Vec<u8> = pair.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert!(
                !seen.windows(bytes.len()).any(|w| w == bytes.as_slice()),
                "two consecutive window values crossed the link: {pair:?}"
            );
        }
    }
}

/// A coordinator of `ae` (an untrained autoencoder, stored as `ae@1` in `dir`) over
/// `sites`, every one of which must answer; its rounds are judged (any loss up to 11×
/// the incumbent's passes) and stored. The base weights beside it.
async fn coordinator(
    dir: &std::path::Path,
    sites: Vec<FederationSite>,
    distillation: Option<Distillation>,
) -> (ActorRef<FederatedCoordinatorMsg>, Vec<u8>) {
    let config = AutoencoderConfig::w1(CHANNELS, WINDOW);
    let architecture = Architecture::ConvAutoencoder(config.clone());
    let store = ModelStore::open(dir);
    let (weights, _) = ConvAutoencoder::new(config, tch::Device::Cpu, 3)
        .unwrap()
        .to_safetensors()
        .unwrap();
    let base = store
        .import(architecture.manifest("ae", "1"), &weights)
        .unwrap();
    let min_sites = sites.len();
    let (actor, _) = Actor::spawn(
        None,
        FederatedCoordinator,
        FederatedCoordinatorArgs {
            federation: "ae".into(),
            base,
            weights: weights.clone(),
            sites,
            plan: FederationPlan {
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
                privacy: None,
                min_sites,
                deadline: Duration::from_secs(60),
                seed: 1,
                gate: Some(EvaluationGate {
                    max_regression: 10.0,
                }),
                buffered: None,
                distillation,
            },
            publication: Some(Publication {
                store,
                promoter: None,
            }),
            spent: Default::default(),
        },
    )
    .await
    .unwrap();
    (actor, weights)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_across_a_link_carries_weights_and_updates_but_no_window_values() {
    let own = windows(1, 48);
    let held_out = windows(2, 12);
    let architecture = Architecture::ConvAutoencoder(AutoencoderConfig::w1(CHANNELS, WINDOW));
    let (remote, seen, _) = remote_site(SiteTrainerArgs {
        site: "edge-1".into(),
        architecture: architecture.clone(),
        windows: own.clone(),
        held_out: held_out.clone(),
        feed: None,
        network: None,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, weights) = coordinator(
        dir.path(),
        vec![FederationSite {
            name: "edge-1".into(),
            site: Site::Trainer(remote),
        }],
        None,
    )
    .await;
    let round = coordinator
        .call(|reply| FederatedCoordinatorMsg::Round { reply }, None)
        .await
        .unwrap()
        .unwrap()
        .expect("the round completes across the link");
    assert_eq!(round.sites, ["edge-1"]);
    assert_eq!(round.samples, own.len() as u64);
    let evaluation = round
        .evaluation
        .expect("the site judged the round's weights");
    assert_eq!(evaluation.windows, held_out.len() as u64);
    assert_eq!(round.version.as_deref(), Some("ae@2"));

    let seen = seen.lock().unwrap().clone();
    // The global weights went down twice (training, evaluation) and the update came
    // up: the recording saw the round.
    assert!(seen.len() > 2 * weights.len(), "{} bytes", seen.len());
    assert_no_window_values(&seen, &own);
    assert_no_window_values(&seen, &held_out);
}

/// Distillation rounds with a site on the other side of the link whose autoencoder is
/// narrower than the federation's: the shared windows and the consensus go down, its
/// outputs on them come up, both sites judge the federation's network on their
/// held-out windows, and each round is stored. The site's own windows never cross.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distillation_round_across_a_link_moves_outputs_on_shared_windows_only() {
    let own = windows(1, 48);
    let held_out = windows(2, 12);
    let architecture = Architecture::ConvAutoencoder(AutoencoderConfig::w1(CHANNELS, WINDOW));
    let narrow = architecture.with_hidden(8).unwrap();
    let (remote, seen, service) = remote_site(SiteTrainerArgs {
        site: "edge-1".into(),
        architecture: architecture.clone(),
        windows: own.clone(),
        held_out: held_out.clone(),
        feed: None,
        network: Some(narrow),
    })
    .await;
    let (local, _) = Actor::spawn(
        None,
        SiteTrainer,
        SiteTrainerArgs {
            site: "server-1".into(),
            architecture: architecture.clone(),
            windows: windows(3, 48),
            held_out: windows(4, 12),
            feed: None,
            network: None,
        },
    )
    .await
    .unwrap();
    let shared = Arc::new(windows(5, 24));
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, weights) = coordinator(
        dir.path(),
        vec![
            FederationSite {
                name: "edge-1".into(),
                site: Site::Trainer(remote),
            },
            FederationSite {
                name: "server-1".into(),
                site: Site::Trainer(local),
            },
        ],
        Some(Distillation {
            shared: shared.clone(),
            weight: 1.0,
        }),
    )
    .await;
    // How often the first shared window's bytes crossed the link.
    let first: Vec<u8> = shared[0]
        .window
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let crossings = || {
        let seen = seen.lock().unwrap();
        seen.windows(first.len())
            .filter(|w| *w == first.as_slice())
            .count()
    };
    let mut bytes_down = Vec::new();
    for version in ["ae@2", "ae@3", "ae@4"] {
        if version == "ae@4" {
            // The site's node restarted and holds the shared windows no more.
            service.shared.clear();
        }
        let round = coordinator
            .call(|reply| FederatedCoordinatorMsg::Round { reply }, None)
            .await
            .unwrap()
            .unwrap()
            .expect("the distillation round completes across the link");
        assert_eq!(round.mode, "distillation");
        assert_eq!(round.sites, ["edge-1", "server-1"]);
        // Each site's reconstructions of the shared windows, as f32.
        let outputs = shared.len() * (CHANNELS * WINDOW) as usize * 4;
        assert_eq!(round.bytes_up, 2 * outputs as u64);
        let evaluation = round.evaluation.expect("the sites judged the weights");
        assert_eq!(evaluation.windows, 24, "{}", evaluation.reason);
        assert_eq!(round.version.as_deref(), Some(version));
        bytes_down.push(round.bytes_down);
        // The shared windows went down with the first round only, and again once the
        // site no longer held them.
        let expected = if version == "ae@4" { 2 } else { 1 };
        assert_eq!(crossings(), expected, "after the round of {version}");
    }
    // Down to each of the two sites: the weights and the shared windows in the first
    // round; the weights and the consensus (one output per shared value) after.
    let per_site = (weights.len() + shared.len() * (CHANNELS * WINDOW) as usize * 4) as u64;
    assert_eq!(bytes_down, [2 * per_site; 3]);
    let seen = seen.lock().unwrap().clone();
    assert_no_window_values(&seen, &own);
    assert_no_window_values(&seen, &held_out);
}
