//! Membership: which nodes are in the mesh, with their role, address, hardware and
//! load, kept by gossip (chitchat, the scuttlebutt gossip with a phi-accrual failure
//! detector that Quickwit runs in production).
//!
//! Each node publishes a few keys about itself: [`CARD_KEY`] (role, gRPC address,
//! cores, memory, GPUs, up since; set once), [`LOAD_KEY`] (read every
//! [`LOAD_INTERVAL`], republished when it moved by a step), and the deployment's
//! [`SPEC_KEY`] and [`PLACEMENT_KEY`] (see
//! `crate::deployment`). Every node learns every other node's keys from any node it
//! gossips with, so seeds are only needed to join.
//!
//! The gossip runs over UDP on the same address and port number as the node's gRPC
//! listener (UDP and TCP ports are separate), so one `host:port` names a node for
//! both; seeds are other nodes' gRPC addresses. Every datagram is sealed with a key
//! derived from the mesh's secret (`crate::gossip_seal`), so only members are heard; the
//! gossip cluster id is the [`ClusterKey`].
//!
//! The failure detector alone takes seconds to call a silent node dead; a node whose
//! process died is noticed much sooner by its cluster link closing, and the mesh view
//! (`crate::mesh`) combines the two.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState};
use fogmesh_models::federated::PrivacySpent;
use fogmesh_trust::Secret;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::capabilities::{Capabilities, Load};
use crate::cluster_key::ClusterKey;
use crate::gossip_seal::SealedUdpTransport;
use crate::zone::share_a_zone;

pub const CARD_KEY: &str = "card";
pub const LOAD_KEY: &str = "load";
pub const SPEC_KEY: &str = "spec";
pub const PLACEMENT_KEY: &str = "placement";
/// The experts a node has running (JSON list of names), set after each reconcile: the
/// leader moves a replica only once its new host says it serves.
pub const SERVING_KEY: &str = "serving";
/// Which model version each expert this node serves runs, so a rollout's progress can
/// be read from any node.
pub const VERSIONS_KEY: &str = "versions";
/// The drifts each continual learner on this node has detected, by expert: a
/// federation that runs on drift hears of them wherever its coordinator is.
pub const DRIFTS_KEY: &str = "drifts";

/// The most each federation's private rounds are known to have spent (JSON map: expert
/// → rounds and ρ): every node repeats the most it heard, so a coordinator started
/// after its predecessor's node died goes on counting.
pub const PRIVACY_KEY: &str = "privacy";

/// The peers a node has a ready cluster link to (JSON list of names): a node reaches
/// the nodes of other zones through the links its gateways report.
pub const LINKS_KEY: &str = "links";

/// How often a node gossips with a few others unless `[cluster] gossip_interval_ms`
/// says otherwise.
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(200);
/// How often a node reads its load (and republishes it if it moved by a step).
pub const LOAD_INTERVAL: Duration = Duration::from_secs(2);

/// What a node says about itself when it joins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberCard {
    pub role: String,
    /// The address peers dial for gRPC and the cluster link.
    pub grpc: String,
    pub cores: u32,
    pub memory_bytes: u64,
    pub gpus: Vec<GpuCard>,
    pub up_since_us: i64,
    /// `[node] zone`; empty when the node names none.
    #[serde(default)]
    pub zone: String,
    /// `[node] conduits`: the other zones this node is a gateway into.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conduits: Vec<String>,
    /// `[node] segmented`: the node links only within its zones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub segmented: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuCard {
    pub index: u32,
    pub name: String,
    pub memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LoadCard {
    pub cpu: f64,
    pub memory_available_bytes: u64,
}

/// The steps a gossiped load moves in. Every key a node sets wakes every member's
/// deployment loop and is copied into every member's gossip state, so a reading that
/// changed by less than a step is not republished: placement compares loads far
/// coarser than this, and a quiet plant's gossip stays quiet.
pub const CPU_STEP: f64 = 0.05;
pub const MEMORY_STEP_BYTES: u64 = 256 << 20;

impl From<Load> for LoadCard {
    /// The reading rounded to [`CPU_STEP`] and down to [`MEMORY_STEP_BYTES`].
    fn from(load: Load) -> Self {
        LoadCard {
            cpu: (load.cpu / CPU_STEP).round() * CPU_STEP,
            memory_available_bytes: load.memory_available_bytes / MEMORY_STEP_BYTES
                * MEMORY_STEP_BYTES,
        }
    }
}

impl MemberCard {
    pub fn new(role: &str, grpc: String, capabilities: &Capabilities, up_since_us: i64) -> Self {
        MemberCard {
            role: role.to_string(),
            grpc,
            cores: capabilities.cores,
            memory_bytes: capabilities.memory_bytes,
            gpus: capabilities
                .gpus
                .iter()
                .map(|g| GpuCard {
                    index: g.index,
                    name: g.name.clone(),
                    memory_bytes: g.memory_bytes,
                })
                .collect(),
            up_since_us,
            zone: String::new(),
            conduits: Vec::new(),
            segmented: false,
        }
    }

    /// The card of a node in `zone`, a gateway into `conduits`, linking only within
    /// them when `segmented`.
    pub fn in_zone(self, zone: Option<&str>, conduits: &[String], segmented: bool) -> Self {
        MemberCard {
            zone: zone.unwrap_or_default().to_string(),
            conduits: conduits.to_vec(),
            segmented,
            ..self
        }
    }

    /// Whether this node and `other` may hold a cluster link: always, unless one of
    /// them is segmented; then only when they share a zone.
    pub fn may_link(&self, other: &MemberCard) -> bool {
        !(self.segmented || other.segmented) || share_a_zone(self.zones(), other.zones())
    }

    /// Every zone the node is in: its own, then those its conduits reach into.
    pub fn zones(&self) -> impl Iterator<Item = &str> + Clone {
        std::iter::once(self.zone.as_str())
            .filter(|z| !z.is_empty())
            .chain(self.conduits.iter().map(String::as_str))
    }
}

/// One live node as gossip knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub card: MemberCard,
    pub load: LoadCard,
    /// Raw values of the deployment keys, parsed by `crate::deployment`.
    pub spec: Option<String>,
    pub placement: Option<String>,
    pub serving: Vec<String>,
    /// Expert → the model version its replica here serves.
    pub versions: BTreeMap<String, String>,
    /// Expert → drifts its learner here has detected since the learner started.
    pub drifts: BTreeMap<String, u64>,
    /// The peers it has a ready link to ([`LINKS_KEY`]).
    pub links: BTreeSet<String>,
    /// Expert → the most its federation's private rounds are known to have spent
    /// ([`PRIVACY_KEY`]).
    pub privacy: BTreeMap<String, PrivacySpent>,
}

/// Why gossip did not start.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cannot gossip on UDP {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
}

/// Where and how often a node gossips: the UDP address it binds, the one peers send
/// to (the same unless a relay or a NAT stands in between), and its interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GossipSettings {
    pub bind: SocketAddr,
    pub advertised: SocketAddr,
    pub interval: Duration,
}

impl GossipSettings {
    /// Bound and advertised alike, every [`GOSSIP_INTERVAL`].
    pub fn direct(addr: SocketAddr) -> GossipSettings {
        GossipSettings {
            bind: addr,
            advertised: addr,
            interval: GOSSIP_INTERVAL,
        }
    }
}

/// This node's membership: its gossip task and what it knows of the others.
pub struct Membership {
    handle: ChitchatHandle,
    live: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    parsed: std::sync::Mutex<ParsedMembers>,
}

impl Membership {
    /// Starts gossiping on `gossip.bind`, introducing this node with `card`.
    /// `generation` tells a restarted node from its former self (the start time).
    pub async fn start(
        name: &str,
        generation: u64,
        gossip: GossipSettings,
        seeds: &[String],
        key: &ClusterKey,
        secret: &Secret,
        card: &MemberCard,
    ) -> Result<Membership, MembershipError> {
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(name.to_string(), generation, gossip.advertised),
            cluster_id: key.as_str().to_string(),
            gossip_interval: gossip.interval,
            listen_addr: gossip.bind,
            seed_nodes: seeds.to_vec(),
            failure_detector_config: FailureDetectorConfig {
                initial_interval: gossip.interval,
                max_interval: (gossip.interval * 10).max(Duration::from_secs(2)),
                dead_node_grace_period: Duration::from_secs(600),
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: Some(Box::new(|state: &NodeState| {
                state.get(CARD_KEY).is_some()
            })),
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let card = serde_json::to_string(card).unwrap_or_default();
        let transport = SealedUdpTransport::new(secret.expose());
        let handle =
            chitchat::spawn_chitchat(config, vec![(CARD_KEY.to_string(), card)], &transport)
                .await
                .map_err(|e| MembershipError::Bind {
                    addr: gossip.bind,
                    reason: format!("{e:#}"),
                })?;
        let live = handle.chitchat().lock().await.live_nodes_watcher();
        Ok(Membership {
            handle,
            live,
            parsed: std::sync::Mutex::default(),
        })
    }

    /// Wakes whenever a node joins, leaves or changes a key.
    pub fn changes(&self) -> watch::Receiver<BTreeMap<ChitchatId, NodeState>> {
        self.live.clone()
    }

    /// The live nodes, this one included, by name (a restarted node's newest
    /// generation wins over its former self until gossip declares that one dead).
    pub fn members(&self) -> BTreeMap<String, Member> {
        let live = self.live.borrow();
        let mut parsed = self
            .parsed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        parsed.members(&live)
    }

    /// Every node gossip knows by name: the live ones, this one included, and those it
    /// has declared dead and not yet forgotten (after `dead_node_grace_period`).
    pub async fn known(&self) -> BTreeSet<String> {
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        chitchat
            .live_nodes()
            .chain(chitchat.dead_nodes())
            .map(|id| id.node_id.to_string())
            .collect()
    }

    /// Publishes (or replaces) one of this node's keys.
    pub async fn set(&self, key: &str, value: String) {
        self.handle
            .chitchat()
            .lock()
            .await
            .self_node_state()
            .set(key, value);
    }

    /// Leaves: stops gossiping. Peers notice through the failure detector.
    pub async fn shutdown(self) {
        let _ = self.handle.shutdown().await;
    }
}

/// One live node's keys parsed, or `None` for a node that has not published its card.
fn parse_member(id: &ChitchatId, state: &NodeState) -> Option<Member> {
    let card = state
        .get(CARD_KEY)
        .and_then(|c| serde_json::from_str::<MemberCard>(c).ok())?;
    Some(Member {
        name: id.node_id.to_string(),
        card,
        load: state
            .get(LOAD_KEY)
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default(),
        spec: state.get(SPEC_KEY).map(str::to_string),
        placement: state.get(PLACEMENT_KEY).map(str::to_string),
        serving: state
            .get(SERVING_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default(),
        versions: state
            .get(VERSIONS_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default(),
        drifts: state
            .get(DRIFTS_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default(),
        links: state
            .get(LINKS_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default(),
        privacy: state
            .get(PRIVACY_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default(),
    })
}

/// Parsed members by gossip identity, each with the state version it was parsed at:
/// a node's keys are parsed again only after they change. Without it every member was
/// parsed on every read, and reads follow every key any node sets, so a mesh's parsing
/// grew with the cube of its size.
#[derive(Default)]
struct ParsedMembers {
    by_id: HashMap<ChitchatId, (u64, Option<Member>)>,
}

impl ParsedMembers {
    fn members(&mut self, live: &BTreeMap<ChitchatId, NodeState>) -> BTreeMap<String, Member> {
        self.by_id.retain(|id, _| live.contains_key(id));
        let mut newest: BTreeMap<String, (u64, Member)> = BTreeMap::new();
        for (id, state) in live {
            let parsed = match self.by_id.get(id) {
                Some((version, parsed)) if *version == state.max_version() => parsed,
                _ => {
                    let entry = (state.max_version(), parse_member(id, state));
                    &self
                        .by_id
                        .entry(id.clone())
                        .insert_entry(entry)
                        .into_mut()
                        .1
                }
            };
            let Some(member) = parsed else { continue };
            match newest.get(&member.name) {
                Some((generation, _)) if *generation >= id.generation_id => {}
                _ => {
                    newest.insert(member.name.clone(), (id.generation_id, member.clone()));
                }
            }
        }
        newest.into_iter().map(|(name, (_, m))| (name, m)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, generation: u64, cpu: f64) -> (ChitchatId, NodeState) {
        let id = ChitchatId::new(name, generation, "127.0.0.1:7000".parse().unwrap());
        let mut state = NodeState::for_test();
        let card = MemberCard {
            role: "edge".into(),
            grpc: "127.0.0.1:7000".into(),
            cores: 2,
            memory_bytes: 1 << 30,
            gpus: Vec::new(),
            up_since_us: 0,
            zone: String::new(),
            conduits: Vec::new(),
            segmented: false,
        };
        state.set(CARD_KEY, serde_json::to_string(&card).unwrap());
        state.set(
            LOAD_KEY,
            serde_json::to_string(&LoadCard {
                cpu,
                memory_available_bytes: 0,
            })
            .unwrap(),
        );
        (id, state)
    }

    #[test]
    fn load_is_gossiped_in_steps() {
        let card = |cpu, memory_available_bytes| {
            LoadCard::from(Load {
                cpu,
                memory_available_bytes,
            })
        };
        assert_eq!(card(0.512, 1_000 << 20), card(0.49, 800 << 20));
        assert_eq!(card(0.512, 1_000 << 20).memory_available_bytes, 768 << 20);
        assert_ne!(card(0.52, 1 << 30), card(0.58, 1 << 30));
        assert_ne!(card(0.5, 1 << 30), card(0.5, 2 << 30));
    }

    #[test]
    fn a_changed_key_is_read_again_and_a_gone_node_forgotten() {
        let mut parsed = ParsedMembers::default();
        let mut live: BTreeMap<_, _> = [node("a", 1, 0.1), node("b", 1, 0.2)].into();
        assert_eq!(parsed.members(&live)["a"].load.cpu, 0.1);
        let (id_a, _) = node("a", 1, 0.0);
        live.get_mut(&id_a)
            .unwrap()
            .set(LOAD_KEY, r#"{"cpu":0.7,"memory_available_bytes":0}"#);
        let members = parsed.members(&live);
        assert_eq!(members["a"].load.cpu, 0.7);
        assert_eq!(members["b"].load.cpu, 0.2);
        live.remove(&id_a);
        assert_eq!(parsed.members(&live).keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(parsed.by_id.len(), 1);
    }

    #[test]
    fn a_restarted_node_is_its_newest_generation_and_a_cardless_one_is_not_a_member() {
        let mut parsed = ParsedMembers::default();
        let (cardless_id, _) = node("c", 1, 0.0);
        let live: BTreeMap<_, _> = [
            node("a", 2, 0.9),
            node("a", 1, 0.1),
            (cardless_id, NodeState::for_test()),
        ]
        .into();
        let members = parsed.members(&live);
        assert_eq!(members.len(), 1);
        assert_eq!(members["a"].load.cpu, 0.9);
    }
}
