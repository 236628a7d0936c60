//! A node's place in the mesh: the ractor_cluster node server, the cluster links,
//! gossip membership, the deployment loop and, on a gateway (a node with
//! `[node] conduits`), the relay between its zones, started together for a node whose
//! config has a `[cluster]` section and stopped together with it.
//!
//! ractor_cluster always opens a TCP listener of its own; it is bound to loopback
//! on a free port and never dialed: every link comes through the gRPC port
//! (`crate::link`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fogmesh_actors::{ExpertRelay, ExpertRelayMsg, Node, NodeSpec};
use ractor::{Actor, ActorRef};
use ractor_cluster::NodeServerMessage;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::capabilities::Capabilities;
use crate::cluster_key::ClusterKey;
use crate::config::{ClusterSection, Role};
use crate::deployment::{Deployment, DeploymentState};
use crate::dialer::{Dialer, LinkError};
use crate::link;
use crate::link_service::ClusterLinkService;
use crate::membership::{
    GossipSettings, LoadCard, MemberCard, Membership, MembershipError, LINKS_KEY, LOAD_INTERVAL,
    LOAD_KEY,
};
use crate::peer_links::{
    LinkState, LinkView, NodeProbe, NodeProbeMsg, PeerLinks, PeerLinksArgs, PeerLinksMsg,
};
use crate::telemetry;

/// The host part ractor_cluster appends to node names (`edge-1@fogmesh`).
const CLUSTER_HOST: &str = "fogmesh";

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("the cluster node server did not start: {0}")]
    NodeServer(String),
    #[error(transparent)]
    Membership(#[from] MembershipError),
}

/// What a node needs to join.
pub struct MeshSettings {
    pub name: String,
    pub role: Role,
    /// `[node] zone`.
    pub zone: Option<String>,
    /// `[node] conduits`.
    pub conduits: Vec<String>,
    /// `[node] segmented`.
    pub segmented: bool,
    pub cluster: ClusterSection,
    /// `[cluster] data`, resolved against the config file.
    pub data: PathBuf,
    pub grpc_addr: SocketAddr,
    pub capabilities: Capabilities,
    pub up_since_us: i64,
    /// What the node's own `node.toml` runs, kept beside its share of the mesh.
    pub local: NodeSpec,
    /// Where the node keeps stored models.
    pub places: crate::mesh_spec::ModelPlaces,
    /// How this node dials the others.
    pub dialer: Dialer,
}

/// A node's running membership in the mesh.
pub struct Mesh {
    pub name: String,
    pub key: ClusterKey,
    pub dialer: Dialer,
    pub node_server: ActorRef<NodeServerMessage>,
    pub links: ActorRef<PeerLinksMsg>,
    pub link_view: watch::Receiver<LinkView>,
    pub membership: Arc<Membership>,
    pub deployment: Arc<Mutex<DeploymentState>>,
    probe: ActorRef<NodeProbeMsg>,
    relay: Option<ActorRef<ExpertRelayMsg>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Mesh {
    pub(crate) async fn start(
        settings: MeshSettings,
        node: Node,
        shutdown: CancellationToken,
    ) -> Result<Mesh, MeshError> {
        let key = ClusterKey::from_secret(settings.cluster.secret.expose());
        let server = ractor_cluster::NodeServer::new(
            0,
            settings.cluster.secret.expose().to_string(),
            settings.name.clone(),
            CLUSTER_HOST.to_string(),
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let (node_server, _) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| MeshError::NodeServer(e.to_string()))?;
        let (probe, _) = Actor::spawn(None, NodeProbe, settings.name.clone())
            .await
            .map_err(|e| MeshError::NodeServer(e.to_string()))?;
        // A gateway carries windows between its zones; others have nothing to relay.
        let relay = match settings.conduits.is_empty() {
            true => None,
            false => Some(
                Actor::spawn(
                    None,
                    ExpertRelay,
                    (settings.name.clone(), node.directory.clone()),
                )
                .await
                .map_err(|e| MeshError::NodeServer(e.to_string()))?
                .0,
            ),
        };
        let (view_tx, link_view) = watch::channel(LinkView::new());
        let (links, _) = Actor::spawn(
            None,
            PeerLinks,
            PeerLinksArgs {
                node: settings.name.clone(),
                key: key.clone(),
                dialer: settings.dialer.clone(),
                node_server: node_server.clone(),
                view: view_tx,
            },
        )
        .await
        .map_err(|e| MeshError::NodeServer(e.to_string()))?;

        let advertise = settings
            .cluster
            .advertise
            .clone()
            .unwrap_or_else(|| settings.grpc_addr.to_string());
        let card = MemberCard::new(
            settings.role.as_str(),
            advertise,
            &settings.capabilities,
            settings.up_since_us,
        )
        .in_zone(
            settings.zone.as_deref(),
            &settings.conduits,
            settings.segmented,
        );
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let membership = Arc::new(
            Membership::start(
                &settings.name,
                generation,
                GossipSettings {
                    bind: settings.grpc_addr,
                    advertised: settings
                        .cluster
                        .advertise_gossip
                        .unwrap_or(settings.grpc_addr),
                    interval: Duration::from_millis(settings.cluster.gossip_interval_ms),
                },
                &settings.cluster.seeds,
                &key,
                &settings.cluster.secret,
                &card,
            )
            .await?,
        );
        tracing::info!(node = %settings.name, gossip = %settings.grpc_addr, seeds = ?settings.cluster.seeds, "joining the mesh");

        let mut tasks = vec![
            tokio::spawn(ask_seeds(
                settings.cluster.seeds.clone(),
                settings.dialer.clone(),
                key.clone(),
                settings.name.clone(),
            )),
            tokio::spawn(feed_peers(
                settings.name.clone(),
                card.clone(),
                membership.clone(),
                links.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(publish_links(
                membership.clone(),
                link_view.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(publish_load(
                membership.clone(),
                settings.capabilities.clone(),
                shutdown.clone(),
            )),
        ];
        let deployment = Arc::new(Mutex::new(DeploymentState::default()));
        tasks.push(tokio::spawn(
            Deployment {
                node_name: settings.name.clone(),
                local: settings.local,
                data: settings.data,
                node,
                membership: membership.clone(),
                links: link_view.clone(),
                state: deployment.clone(),
                places: settings.places,
                dialer: settings.dialer.clone(),
            }
            .run(shutdown),
        ));
        Ok(Mesh {
            name: settings.name,
            key,
            dialer: settings.dialer,
            node_server,
            links,
            link_view,
            membership,
            deployment,
            probe,
            relay,
            tasks,
        })
    }

    /// The `ClusterLink` gRPC service of this node.
    pub fn link_service(&self) -> ClusterLinkService {
        ClusterLinkService::new(
            self.node_server.clone(),
            self.key.clone(),
            self.name.clone(),
        )
    }

    /// Leaves the mesh: stops gossip, the links and the cluster node server.
    pub async fn shutdown(self) {
        for task in self.tasks {
            task.abort();
        }
        self.links.stop(None);
        self.probe.stop(None);
        if let Some(relay) = self.relay {
            relay.stop(None);
        }
        self.node_server.stop(None);
        if let Ok(membership) = Arc::try_unwrap(self.membership) {
            membership.shutdown().await;
        }
    }
}

/// Asks every seed to admit this node, retrying those not yet reachable, and says
/// loudly when one refuses (the secret differs: this node will never join).
async fn ask_seeds(seeds: Vec<String>, dialer: Dialer, key: ClusterKey, me: String) {
    let mut pending = seeds;
    let mut delay = Duration::from_millis(200);
    while !pending.is_empty() {
        let mut unreachable = Vec::new();
        for seed in pending {
            match link::ask_admission(&seed, &dialer, &key, &me).await {
                Ok(name) => tracing::info!(%seed, node = %name, "admitted by seed"),
                Err(error @ LinkError::Refused { .. }) => {
                    tracing::error!(%seed, %error, "seed refused this node: its [cluster] secret differs from the mesh's; this node will not join");
                }
                Err(error) => {
                    tracing::debug!(%seed, %error, "seed not reachable yet");
                    unreachable.push(seed);
                }
            }
        }
        pending = unreachable;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Tells the link keeper which peers gossip knows and this node may link to (its
/// zones' when either is segmented, see [`MemberCard::may_link`]), whenever that
/// changes.
async fn feed_peers(
    me: String,
    card: MemberCard,
    membership: Arc<Membership>,
    links: ActorRef<PeerLinksMsg>,
    shutdown: CancellationToken,
) {
    let mut changes = membership.changes();
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let members = membership.members();
        for (name, m) in &members {
            if name != &me && !known.contains_key(name) {
                tracing::info!(node = %name, role = %m.card.role, address = %m.card.grpc, cores = m.card.cores, gpus = m.card.gpus.len(), "node joined the mesh");
                metrics::counter!(telemetry::MEMBERS_JOINED).increment(1);
            }
        }
        for name in known.keys() {
            if !members.contains_key(name) {
                tracing::warn!(node = %name, "node left the mesh (gossip no longer hears it)");
                metrics::counter!(telemetry::MEMBERS_LEFT).increment(1);
            }
        }
        let peers: BTreeMap<String, String> = members
            .into_values()
            .filter(|m| m.name != me && card.may_link(&m.card))
            .map(|m| (m.name, m.card.grpc))
            .collect();
        known = peers.clone();
        if links.cast(PeerLinksMsg::Peers(peers)).is_err() {
            return;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        tokio::time::sleep(crate::deployment::PASS_GAP).await;
    }
}

/// Gossips which peers this node has a ready link to, whenever that changes: nodes
/// in other zones reach this one through the links gateways report
/// (`crate::deployment::view::Reach`).
async fn publish_links(
    membership: Arc<Membership>,
    mut view: watch::Receiver<LinkView>,
    shutdown: CancellationToken,
) {
    let mut published = None;
    loop {
        let ready: Vec<String> = view
            .borrow_and_update()
            .iter()
            .filter(|(_, link)| link.state == LinkState::Ready)
            .map(|(name, _)| name.clone())
            .collect();
        if published.as_ref() != Some(&ready) {
            membership
                .set(LINKS_KEY, serde_json::to_string(&ready).unwrap_or_default())
                .await;
            published = Some(ready);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
        }
        // Links come up in bursts (a node joining links to its whole zone): one key
        // change for the burst, not one per link, for every member to copy.
        tokio::time::sleep(crate::deployment::PASS_GAP).await;
    }
}

async fn publish_load(
    membership: Arc<Membership>,
    capabilities: Capabilities,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(LOAD_INTERVAL);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let load = LoadCard::from(capabilities.load());
        membership
            .set(LOAD_KEY, serde_json::to_string(&load).unwrap_or_default())
            .await;
    }
}
