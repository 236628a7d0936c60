//! What a node's deployment loop sees of the mesh and shares with the services: the
//! specs and placements members gossip, the nodes usable as placement candidates,
//! and [`DeploymentState`] (the adopted spec, the placement followed, the leader, the
//! last error, the last rollout).
//!
//! It sits below both the loop ([`super`]) and mesh rollouts ([`crate::rollout`]),
//! which read and write the same state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::Role;
use crate::membership::Member;
use crate::mesh_spec::{MeshSpec, StoredSpec};
use crate::peer_links::{LinkState, LinkView};
use crate::placement::{Assignment, Candidate};

/// A leader's placement, as gossiped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPlacement {
    pub spec_version: u64,
    pub epoch: u64,
    pub leader: String,
    pub experts: Assignment,
}

/// What the deployment loop shares with the services (`Control.Apply`, status).
#[derive(Debug, Default)]
pub struct DeploymentState {
    pub spec: Option<StoredSpec>,
    pub placement: Option<PublishedPlacement>,
    pub leader: Option<String>,
    pub last_error: Option<String>,
    /// The last rollout this node ran (`Control.Rollout`).
    pub rollout: Option<RolloutRecord>,
    /// Gossiped specs that did not parse here, newest last: never adopted, persisted,
    /// passed on, or counted when a new spec is numbered, so a member that gossips an
    /// unreadable spec at version `u64::MAX` cannot freeze the mesh's configuration.
    /// At most [`MAX_UNUSABLE_SPECS`].
    pub unusable: Vec<StoredSpec>,
    /// Expert → the node that coordinates its federation, as this node placed it.
    pub federations: std::collections::BTreeMap<String, String>,
}

/// The deployment state, also after a panic while it was held: every writer leaves it
/// whole between statements.
pub(crate) fn lock(state: &Mutex<DeploymentState>) -> std::sync::MutexGuard<'_, DeploymentState> {
    match state.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Most unusable specs a node remembers; older ones are forgotten first.
pub const MAX_UNUSABLE_SPECS: usize = 16;

impl DeploymentState {
    /// The specs `members` gossip that this node has not found unusable.
    pub fn usable_specs<'a>(
        &'a self,
        members: &'a BTreeMap<String, Member>,
    ) -> impl Iterator<Item = StoredSpec> + 'a {
        gossiped_specs(members).filter(|s| !self.unusable.contains(s))
    }

    pub(crate) fn refuse(&mut self, spec: StoredSpec) {
        if self.unusable.len() >= MAX_UNUSABLE_SPECS {
            self.unusable.remove(0);
        }
        self.unusable.push(spec);
    }
}

fn role_of(text: &str) -> Role {
    match text {
        "edge" => Role::Edge,
        "cloud" => Role::Cloud,
        _ => Role::Fog,
    }
}

/// The specs the members gossip (unreadable values skipped: a peer of a newer version
/// may write what this one cannot read).
pub fn gossiped_specs(members: &BTreeMap<String, Member>) -> impl Iterator<Item = StoredSpec> + '_ {
    members
        .values()
        .filter_map(|m| m.spec.as_deref())
        .filter_map(|text| serde_json::from_str(text).ok())
}

/// The placements the members gossip.
pub fn gossiped_placements(
    members: &BTreeMap<String, Member>,
) -> impl Iterator<Item = PublishedPlacement> + '_ {
    members
        .values()
        .filter_map(|m| m.placement.as_deref())
        .filter_map(|text| serde_json::from_str(text).ok())
}

/// The usable nodes as placement candidates.
pub fn candidates(
    members: &BTreeMap<String, Member>,
    links: &LinkView,
    me: &str,
    spec: &MeshSpec,
) -> Vec<Candidate> {
    let sensors = spec.sensors_by_node();
    let reach = reach(me, members, links);
    members
        .values()
        .filter(|m| reach.contains(m.name.as_str()))
        .map(|m| Candidate {
            name: m.name.clone(),
            role: role_of(&m.card.role),
            gpus: m.card.gpus.len() as u32,
            cpu_load: load_step(m.load.cpu),
            sensors: sensors.get(&m.name).cloned().unwrap_or_default(),
            zone: m.card.zone.clone(),
        })
        .collect()
}

/// How many of the nodes the mesh knows this node reaches: the condition for changing
/// what the whole mesh runs (`Control.Apply`, `Control.Rollout`). Two sides of a
/// partition cannot both reach a majority, so they cannot apply two different specs,
/// or roll out two versions, under one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quorum {
    /// This node and the members it has a ready link to.
    pub reachable: usize,
    /// Every node gossip knows, live or declared dead and not yet forgotten, less the
    /// live ones this node has never had a ready link to (a name in gossip that never
    /// passed admission cannot hold a mesh's changes hostage).
    pub known: usize,
}

impl Quorum {
    pub fn of(
        me: &str,
        known: &BTreeSet<String>,
        members: &BTreeMap<String, Member>,
        links: &LinkView,
    ) -> Quorum {
        let reachable = reach(me, members, links)
            .into_iter()
            .filter(|name| members.contains_key(*name))
            .count();
        // Another zone's node never has a link to this one; a ready link it reports,
        // or a gateway reports to it, is its proof of admission.
        let counts = |name: &str| {
            name == me
                || links.get(name).is_some_and(|l| l.ever_ready)
                || members.get(name).is_none_or(|m| !m.links.is_empty())
                || members.values().any(|m| m.links.contains(name))
        };
        let mut all: BTreeSet<&str> = known
            .iter()
            .map(String::as_str)
            .chain(members.keys().map(String::as_str))
            .filter(|name| counts(name))
            .collect();
        all.insert(me);
        Quorum {
            reachable: reachable.max(1),
            known: all.len(),
        }
    }

    /// A strict majority.
    pub fn holds(&self) -> bool {
        self.reachable * 2 > self.known
    }

    /// The fewest nodes that make a majority.
    pub fn majority(&self) -> usize {
        self.known / 2 + 1
    }

    /// `Ok` with a majority; else the refusal of `change` ("applying a spec").
    pub fn require(&self, change: &'static str) -> Result<(), NoQuorum> {
        if self.holds() {
            return Ok(());
        }
        Err(NoQuorum {
            change,
            reachable: self.reachable,
            known: self.known,
            majority: self.majority(),
        })
    }
}

/// A change to what the whole mesh runs, refused on a node without a majority.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this node reaches {reachable} of the {known} nodes the mesh knows, and {change} needs a majority ({majority}): on one side of a partition it could make a change the other side never sees; retry on a node that reaches a majority")]
pub struct NoQuorum {
    pub change: &'static str,
    pub reachable: usize,
    pub known: usize,
    pub majority: usize,
}

/// The live nodes this node reaches: itself, the peers it has a ready link to, and,
/// through each gateway it reaches (a node with conduits, which relays between its
/// zones), the peers that gateway reports ready links to. Only gateways extend the
/// reach: a window crosses from one zone to another through a gateway's relay, never
/// through an ordinary node, so in a flat mesh this is this node and its ready links.
pub fn reach<'a>(
    me: &'a str,
    members: &'a BTreeMap<String, Member>,
    links: &'a LinkView,
) -> BTreeSet<&'a str> {
    let mut reached: BTreeSet<&str> = BTreeSet::from([me]);
    let mut gateways: Vec<&Member> = Vec::new();
    for (name, link) in links {
        if link.state == LinkState::Ready {
            if let Some(member) = members.get(name) {
                reached.insert(member.name.as_str());
                gateways.push(member);
            }
        }
    }
    while let Some(gateway) = gateways.pop() {
        if gateway.card.conduits.is_empty() {
            continue;
        }
        for peer in &gateway.links {
            if let Some(member) = members.get(peer) {
                if reached.insert(member.name.as_str()) {
                    gateways.push(member);
                }
            }
        }
    }
    reached
}

/// Load in quarter-core steps: placement should follow real differences in load, not
/// the noise between two samples of the same one-minute average.
fn load_step(cpu: f64) -> f64 {
    (cpu * 4.0).round() / 4.0
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutOutcome {
    /// The spec names the new version; replicas swap as the mesh adopts it.
    Committed,
    /// A node refused the version: the spec is unchanged, no replica swapped.
    RolledBack,
}

impl RolloutOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutOutcome::Committed => "committed",
            RolloutOutcome::RolledBack => "rolled_back",
        }
    }
}

/// The last rollout a node ran, for the reply and `fogmesh status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub expert: String,
    pub from: String,
    pub to: String,
    /// The spec version that names `to` (committed), or the one left in place.
    pub spec_version: u64,
    pub outcome: RolloutOutcome,
    /// Nodes that hold the version.
    pub prepared: Vec<String>,
    /// Nodes lost during the prepare phase.
    pub lost: Vec<String>,
    pub detail: String,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::membership::{LoadCard, MemberCard};
    use crate::peer_links::LinkInfo;

    pub(crate) fn member(name: &str, serving: &[&str]) -> (String, Member) {
        let card = MemberCard {
            role: "fog".into(),
            grpc: format!("{name}:7700"),
            cores: 2,
            memory_bytes: 1 << 30,
            gpus: Vec::new(),
            up_since_us: 0,
            zone: String::new(),
            conduits: Vec::new(),
            segmented: false,
        };
        (
            name.to_string(),
            Member {
                name: name.into(),
                card,
                load: LoadCard::default(),
                spec: None,
                placement: None,
                serving: serving.iter().map(|s| s.to_string()).collect(),
                versions: BTreeMap::new(),
                drifts: BTreeMap::new(),
                links: BTreeSet::new(),
                privacy: BTreeMap::new(),
            },
        )
    }

    #[test]
    fn a_quorum_is_a_strict_majority_of_every_node_gossip_knows() {
        let ready = |state| LinkInfo {
            state,
            since: std::time::Instant::now(),
            rtt: None,
            last_error: None,
            ever_ready: true,
        };
        let members: BTreeMap<String, Member> =
            ["a", "b", "c"].iter().map(|n| member(n, &[])).collect();
        let known: BTreeSet<String> = ["a", "b", "c"].iter().map(|n| n.to_string()).collect();
        let mut links: LinkView = BTreeMap::new();
        links.insert("b".into(), ready(LinkState::Ready));
        links.insert("c".into(), ready(LinkState::Ready));
        let all = Quorum::of("a", &known, &members, &links);
        assert_eq!((all.reachable, all.known, all.holds()), (3, 3, true));
        // Cut off from c: two of three still make a majority.
        links.insert("c".into(), ready(LinkState::Dialing));
        let two = Quorum::of("a", &known, &members, &links);
        assert_eq!((two.reachable, two.holds(), two.majority()), (2, true, 2));
        // The minority side: gossip has declared both others dead, but knows them.
        let alone: BTreeMap<String, Member> = [member("c", &[])].into_iter().collect();
        let minority = Quorum::of("c", &known, &alone, &BTreeMap::new());
        assert_eq!(
            (minority.reachable, minority.known, minority.holds()),
            (1, 3, false)
        );
        // Two of four is not a majority: a 2|2 split applies nothing anywhere.
        let mut four = known.clone();
        four.insert("d".into());
        assert!(!Quorum::of("a", &four, &members, &links).holds());
        // A live name in gossip this node never linked to does not count: a member
        // holding the secret but never admitted cannot make the others a minority.
        let mut rogue = members.clone();
        rogue.extend([member("r", &[])]);
        let mut with_rogue = known.clone();
        with_rogue.insert("r".into());
        let mut rogue_links = links.clone();
        rogue_links.insert(
            "r".into(),
            LinkInfo {
                ever_ready: false,
                ..ready(LinkState::Dialing)
            },
        );
        let q = Quorum::of("a", &with_rogue, &rogue, &rogue_links);
        assert_eq!((q.known, q.holds()), (3, true));
        // A lone node that has only ever known itself decides alone.
        let solo = Quorum::of("a", &BTreeSet::new(), &BTreeMap::new(), &BTreeMap::new());
        assert!(solo.holds());
    }

    #[test]
    fn other_zones_are_reached_through_gateways_only() {
        let ready = LinkInfo {
            state: LinkState::Ready,
            since: std::time::Instant::now(),
            rtt: None,
            last_error: None,
            ever_ready: true,
        };
        // cell - gw - cloud, and cloud - cloud-2 behind it.
        let mut members: BTreeMap<String, Member> = ["cell", "gw", "cloud", "cloud-2"]
            .iter()
            .map(|n| member(n, &[]))
            .collect();
        let report = |members: &mut BTreeMap<String, Member>, node: &str, peers: &[&str]| {
            let m = members.get_mut(node).unwrap();
            m.links = peers.iter().map(|p| p.to_string()).collect();
        };
        report(&mut members, "gw", &["cell", "cloud"]);
        report(&mut members, "cloud", &["gw", "cloud-2"]);
        let links: LinkView = [("gw".to_string(), ready.clone())].into();
        fn names(set: BTreeSet<&str>) -> Vec<String> {
            set.into_iter().map(String::from).collect()
        }
        assert_eq!(
            names(reach("cell", &members, &links)),
            ["cell", "gw"],
            "a node without conduits relays nothing"
        );
        members.get_mut("gw").unwrap().card.conduits = vec!["cloud".into()];
        assert_eq!(
            names(reach("cell", &members, &links)),
            ["cell", "cloud", "gw"],
            "a gateway's links, not those of the nodes beyond it"
        );
        let known: BTreeSet<String> = members.keys().cloned().collect();
        let q = Quorum::of("cell", &known, &members, &links);
        assert_eq!((q.reachable, q.known, q.holds()), (3, 4, true));
        // The gateway loses the cloud: the cell and the gateway are half of four.
        report(&mut members, "gw", &["cell"]);
        let cut = Quorum::of("cell", &known, &members, &links);
        assert_eq!((cut.reachable, cut.holds()), (2, false));
    }
}
