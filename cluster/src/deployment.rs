//! The deployment loop: every node adopts the newest mesh spec, one node (the leader)
//! places experts, and every node runs its share.
//!
//! Runs as one task per node, woken by membership and link changes and by a tick.
//! Each round:
//! 1. **Adopt**: the newest [`StoredSpec`] among this node's and the members' wins; it
//!    is written to the data folder (so a restarted node gets it back before anyone
//!    gossips it) and republished, so the spec survives any one node.
//! 2. **Usable nodes**: members gossip calls live *and* whose cluster link is ready
//!    (this node always). A killed node drops out as soon as its link closes, long
//!    before gossip's failure detector would call it dead.
//! 3. **Lead**: the usable node whose name sorts first (once it is linked to every
//!    node gossip knows, or after [`SETTLE_TIME`]) places the experts
//!    (`crate::placement`), starting from the newest placement any member published for
//!    this spec so replicas stay where they serve, and publishes the result with a
//!    higher epoch. A spec that cannot be placed keeps the last placement, logged.
//!    When a node joins and the load is uneven by two experts or more, the leader
//!    moves one replica at a time to it ([`start_move`], [`advance_move`]): make
//!    before break, the old host let go only once the new one says it serves.
//! 4. **Follow**: every node takes the leader's placement for the adopted spec and
//!    reconciles its node agent to its share: sensors pinned to it, the routers those
//!    use, the experts placed on it, next to what its own `node.toml` runs.
//!
//! A mesh expert with a `learning` table gets one continual learner, on the first node
//! (by name) whose sensors are routed to it; the learner promotes a validated version
//! by a mesh rollout (`crate::rollout::MeshPromoter`), so every replica gets it.
//!
//! Before a node parses an adopted spec it copies the stored model versions the spec
//! names and its store lacks from a peer (`crate::rollout::ensure_local`), then hands
//! its share to the node agent in one reconcile. The agent hot-swaps an expert whose
//! spec changed only in its model (a rollout or rollback) rather than restarting it, so
//! it never stops serving; a version an expert refuses is recorded as this node's error
//! and the replica keeps its version. Then the node gossips which version each of its
//! replicas runs.
//!
//! Views differ for a moment after a change (two nodes may each think they lead);
//! the placement with the highest epoch wins once gossip settles, and routers retry
//! windows meanwhile, so a transient double or missing replica costs time, not windows.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogmesh_actors::{ContinualLearner, ExpertSpec, LearningSpec, Node, NodeSpec, RunningLearner};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Role;
use crate::dialer::Dialer;
use crate::membership::{Member, Membership, PLACEMENT_KEY, SERVING_KEY, SPEC_KEY, VERSIONS_KEY};
use crate::mesh_spec::{MeshSpec, ModelPlaces, StoredSpec};
use crate::peer_links::{LinkState, LinkView};
use crate::placement::{self, Assignment, Candidate};
use crate::rollout::{self, RolloutRecord};

/// How often the loop runs without being woken (load changes, missed wake-ups).
pub const ROUND_INTERVAL: Duration = Duration::from_millis(500);
/// How long a node that sees only part of the mesh waits before it may lead: a
/// joining node's links come up one by one, and a node leading on that partial view
/// would move experts off nodes it simply has not linked to yet.
pub const SETTLE_TIME: Duration = Duration::from_secs(3);

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

    fn refuse(&mut self, spec: StoredSpec) {
        if self.unusable.len() >= MAX_UNUSABLE_SPECS {
            self.unusable.remove(0);
        }
        self.unusable.push(spec);
    }
}

/// Why a spec was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("the spec cannot be placed on the live nodes: {0}")]
    Placement(String),
}

/// The node's own deployment loop and what it needs.
pub struct Deployment {
    pub node_name: String,
    pub local: NodeSpec,
    pub data: PathBuf,
    pub node: Node,
    pub membership: Arc<Membership>,
    pub links: watch::Receiver<LinkView>,
    pub state: Arc<Mutex<DeploymentState>>,
    /// Where stored models live on this node.
    pub places: ModelPlaces,
    /// How this node copies versions from peers.
    pub dialer: Dialer,
}

fn spec_file(data: &std::path::Path) -> PathBuf {
    data.join("mesh-spec.json")
}

/// The spec this node stored before it last stopped.
pub fn load_stored(data: &std::path::Path) -> Option<StoredSpec> {
    let text = std::fs::read_to_string(spec_file(data)).ok()?;
    serde_json::from_str(&text).ok()
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
    members
        .values()
        .filter(|m| {
            m.name == me
                || links
                    .get(&m.name)
                    .is_some_and(|l| l.state == LinkState::Ready)
        })
        .map(|m| Candidate {
            name: m.name.clone(),
            role: role_of(&m.card.role),
            gpus: m.card.gpus.len() as u32,
            cpu_load: load_step(m.load.cpu),
            sensors: sensors.get(&m.name).cloned().unwrap_or_default(),
        })
        .collect()
}

/// Load in quarter-core steps: placement should follow real differences in load, not
/// the noise between two samples of the same one-minute average.
fn load_step(cpu: f64) -> f64 {
    (cpu * 4.0).round() / 4.0
}

/// Whether `me` places experts this round: it sorts first among the usable `nodes`,
/// and either links to all `members` gossip knows or has been up [`SETTLE_TIME`].
pub fn may_lead(me: &str, nodes: &[Candidate], members: usize, up: Duration) -> bool {
    let first = nodes.iter().map(|c| c.name.as_str()).min() == Some(me);
    first && (nodes.len() == members || up >= SETTLE_TIME)
}

/// Places a spec being applied on `nodes`, refusing it whole when a sensor's node is
/// missing or an expert cannot get its replicas.
pub fn place_new(
    spec: &MeshSpec,
    nodes: &[Candidate],
    previous: &Assignment,
) -> Result<Assignment, ApplyError> {
    let missing = spec.missing_sensor_nodes(nodes);
    if !missing.is_empty() {
        return Err(ApplyError::Placement(format!(
            "sensors are pinned to node(s) {} which are not in the mesh",
            missing.join(", ")
        )));
    }
    place(spec, nodes, previous)
}

/// Places an adopted spec on the nodes usable now. A sensor whose node is gone is not
/// a reason to stop placing experts: its node gets its share back when it returns, and
/// the experts of other lost nodes still need new hosts meanwhile.
pub fn place(
    spec: &MeshSpec,
    nodes: &[Candidate],
    previous: &Assignment,
) -> Result<Assignment, ApplyError> {
    placement::place(&spec.demands(), nodes, previous)
        .map_err(|e| ApplyError::Placement(e.to_string()))
}

impl Deployment {
    /// Runs rounds until `shutdown` is cancelled.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut changes = self.membership.changes();
        let mut links = self.links.clone();
        let mut own_spec = load_stored(&self.data);
        let mut own_placement: Option<PublishedPlacement> = None;
        let mut applied: Option<NodeSpec> = None;
        let mut parsed: Option<(StoredSpec, MeshSpec)> = None;
        let mut moving: Option<Move> = None;
        // Learners of mesh experts that run here, by expert.
        let mut learners: BTreeMap<String, RunningLearner> = BTreeMap::new();
        if let Some(spec) = &own_spec {
            tracing::info!(
                version = spec.version,
                "mesh spec restored from the data folder"
            );
            self.publish_spec(spec).await;
        }
        let mut tick = tokio::time::interval(ROUND_INTERVAL);
        let started = std::time::Instant::now();
        loop {
            // A watch whose sender is gone (gossip or the link keeper stopped) would
            // answer at once forever; its branch then sits out and the tick drives.
            tokio::select! {
                () = shutdown.cancelled() => {
                    for (_, learner) in std::mem::take(&mut learners) {
                        learner.shutdown().await;
                    }
                    return;
                }
                Ok(()) = changes.changed() => {}
                Ok(()) = links.changed() => {}
                _ = tick.tick() => {}
            }
            let members = self.membership.members();
            let link_view = links.borrow().clone();

            // 1. Adopt: the newest spec that parses here, and only once it does, so a
            // spec this node cannot read is never persisted or passed on.
            let newest = {
                let state = lock(&self.state);
                gossiped_specs(&members)
                    .chain(state.spec.clone())
                    .chain(own_spec.clone())
                    .filter(|s| !state.unusable.contains(s))
                    .reduce(|best, s| if s.newer_than(&best) { s } else { best })
            };
            let Some(newest) = newest else { continue };
            if parsed.as_ref().map(|(s, _)| s) != Some(&newest) {
                if let Err(e) = self.fetch_models(&newest, &members).await {
                    self.record_error(format!(
                        "mesh spec {} waits for its models: {e}",
                        newest.version
                    ));
                    continue;
                }
                match MeshSpec::parse_with(&newest.text, &self.data.join("mesh.toml"), &self.places)
                {
                    Ok(spec) => parsed = Some((newest.clone(), spec)),
                    Err(e) => {
                        self.record_error(format!(
                            "mesh spec {} unusable here, ignored: {e}",
                            newest.version
                        ));
                        lock(&self.state).refuse(newest);
                        continue;
                    }
                }
            }
            if own_spec.as_ref() != Some(&newest) {
                tracing::info!(version = newest.version, "adopting mesh spec");
                self.persist(&newest);
                self.publish_spec(&newest).await;
                own_spec = Some(newest.clone());
            }
            let Some((stored, spec)) = &parsed else {
                continue;
            };
            if let Ok(mut state) = self.state.lock() {
                state.spec = Some(stored.clone());
            }

            // 2. Usable nodes; 3. lead.
            let nodes = candidates(&members, &link_view, &self.node_name, spec);
            let leader = nodes.iter().map(|c| c.name.clone()).min();
            let published: Vec<PublishedPlacement> = gossiped_placements(&members)
                .chain(own_placement.clone())
                .filter(|p| p.spec_version == stored.version)
                .collect();
            let latest = published
                .iter()
                .max_by_key(|p| (p.epoch, p.leader.clone()))
                .cloned();
            if may_lead(&self.node_name, &nodes, members.len(), started.elapsed()) {
                let mut previous = latest
                    .as_ref()
                    .map(|p| p.experts.clone())
                    .unwrap_or_default();
                // A replica being moved is an extra on top of the placement proper.
                if let Some(m) = &moving {
                    if let Some(hosts) = previous.get_mut(&m.expert) {
                        hosts.retain(|n| n != &m.to);
                    }
                }
                match place(spec, &nodes, &previous) {
                    Ok(mut experts) => {
                        moving = advance_move(moving.take(), &mut experts, &nodes, &members);
                        if moving.is_none() {
                            moving = start_move(spec, &nodes, &mut experts);
                        }
                        let unchanged = latest
                            .as_ref()
                            .is_some_and(|p| p.experts == experts && p.leader == self.node_name);
                        // An epoch of u64::MAX has no successor (only a forged or
                        // corrupt placement gets there): place nothing rather than wrap.
                        let epoch = latest.as_ref().map_or(Some(1), |p| p.epoch.checked_add(1));
                        if epoch.is_none() {
                            self.record_error(format!(
                                "a placement with epoch {} is in the mesh, the largest there is: no newer placement can be made",
                                u64::MAX
                            ));
                        }
                        if let (false, Some(epoch)) = (unchanged, epoch) {
                            let placement = PublishedPlacement {
                                spec_version: stored.version,
                                epoch,
                                leader: self.node_name.clone(),
                                experts,
                            };
                            tracing::info!(epoch = placement.epoch, experts = ?placement.experts, "placed experts");
                            self.membership
                                .set(
                                    PLACEMENT_KEY,
                                    serde_json::to_string(&placement).unwrap_or_default(),
                                )
                                .await;
                            own_placement = Some(placement);
                        }
                    }
                    Err(e) => self.record_error(e.to_string()),
                }
            } else {
                moving = None;
            }

            // 4. Follow the leader's placement (the newest, once views agree).
            let follow = published
                .iter()
                .filter(|p| Some(&p.leader) == leader.as_ref())
                .max_by_key(|p| p.epoch)
                .cloned()
                .or(own_placement
                    .clone()
                    .filter(|p| p.spec_version == stored.version));
            if let Ok(mut state) = self.state.lock() {
                state.leader = leader.clone();
                state.placement = follow.clone();
            }
            let Some(follow) = follow else { continue };
            let mut target = spec.share(&self.node_name, &follow.experts);
            merge(&mut target, &self.local);
            if applied.as_ref() != Some(&target) {
                match self.node.reconcile(target.clone()).await {
                    Ok(report) => {
                        if !report.is_empty() {
                            tracing::info!(epoch = follow.epoch, started = ?report.started, stopped = ?report.stopped, restarted = ?report.restarted, swapped = ?report.swapped, "running this node's share of the mesh");
                        }
                        for (expert, error) in &report.refused {
                            self.record_error(format!(
                                "expert {expert} did not swap to the spec's version: {error}"
                            ));
                        }
                        let serving: Vec<&str> =
                            target.experts.iter().map(|e| e.name.as_str()).collect();
                        self.membership
                            .set(
                                SERVING_KEY,
                                serde_json::to_string(&serving).unwrap_or_default(),
                            )
                            .await;
                        self.publish_versions().await;
                        applied = Some(target);
                        self.run_learners(spec, &mut learners).await;
                    }
                    Err(e) => self.record_error(format!("this node's share did not start: {e}")),
                }
            }
        }
    }

    /// Copies the stored versions `spec` names that this node's store lacks.
    async fn fetch_models(
        &self,
        spec: &StoredSpec,
        members: &BTreeMap<String, Member>,
    ) -> Result<(), rollout::RolloutError> {
        let ids = MeshSpec::stored_models(&spec.text)
            .map_err(|e| rollout::RolloutError::Spec(e.to_string()))?;
        let Some(store) = &self.places.models else {
            return Ok(());
        };
        if ids.is_empty() {
            return Ok(());
        }
        let peers = rollout::peer_addresses(members, &self.node_name);
        rollout::ensure_local(&ids, store, &peers, &self.dialer).await?;
        Ok(())
    }

    /// Keeps one learner per mesh expert that learns and whose learner node this is
    /// ([`MeshSpec::learners`]), promoting through a mesh rollout. A learner whose
    /// expert the spec moved to a version it neither serves nor is promoting (a rollout
    /// or rollback by someone else) is started again from that version; the spec its own
    /// promotion commits, which this loop may adopt before the learner's round ends,
    /// never restarts it.
    async fn run_learners(&self, spec: &MeshSpec, learners: &mut BTreeMap<String, RunningLearner>) {
        let wanted: BTreeMap<String, (ExpertSpec, LearningSpec)> = spec
            .learners()
            .into_iter()
            .filter(|(_, _, node)| node == &self.node_name)
            .map(|(expert, learning, _)| (expert.name.clone(), (expert.clone(), learning.clone())))
            .collect();
        let stale: Vec<String> = learners
            .iter()
            .filter(|(name, learner)| {
                wanted.get(*name).is_none_or(|(expert, _)| {
                    let stored = expert.source.stored().map(|s| s.manifest.id());
                    !stored.is_some_and(|id| learner.handle.shared.knows_version(&id))
                })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(learner) = learners.remove(&name) {
                learner.shutdown().await;
            }
        }
        let Some(store) = &self.places.models else {
            return;
        };
        for (name, (expert, learning)) in wanted {
            if learners.contains_key(&name) {
                continue;
            }
            let promoter = Arc::new(rollout::MeshPromoter {
                me: self.node_name.clone(),
                places: self.places.clone(),
                dialer: self.dialer.clone(),
                membership: self.membership.clone(),
                links: self.links.clone(),
                state: self.state.clone(),
            });
            let store = store.clone();
            match ContinualLearner::start(&self.node, expert, learning, store, promoter).await {
                Ok(learner) => {
                    tracing::info!(expert = %name, "continual learner of a mesh expert started");
                    learners.insert(name, learner);
                }
                Err(e) => self.record_error(format!("the learner of {name} did not start: {e}")),
            }
        }
    }

    /// Gossips the version each local replica serves now.
    async fn publish_versions(&self) {
        let versions: BTreeMap<String, String> = self
            .node
            .snapshot()
            .experts
            .into_iter()
            .map(|e| (e.name, e.version))
            .collect();
        self.membership
            .set(
                VERSIONS_KEY,
                serde_json::to_string(&versions).unwrap_or_default(),
            )
            .await;
    }

    async fn publish_spec(&self, spec: &StoredSpec) {
        self.membership
            .set(SPEC_KEY, serde_json::to_string(spec).unwrap_or_default())
            .await;
    }

    fn persist(&self, spec: &StoredSpec) {
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.data)?;
            let file = spec_file(&self.data);
            let tmp = file.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(spec).unwrap_or_default())?;
            std::fs::rename(&tmp, &file)
        };
        if let Err(e) = write() {
            self.record_error(format!(
                "cannot store the mesh spec in {}: {e}",
                self.data.display()
            ));
        }
    }

    fn record_error(&self, error: String) {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        if state.last_error.as_ref() != Some(&error) {
            tracing::error!(%error, "deployment");
            state.last_error = Some(error);
        }
    }
}

/// A replica on its way from a busy node to an idle one: placed on both until the new
/// host says it serves (make before break), so no window waits for a cold replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub expert: String,
    pub from: String,
    pub to: String,
}

/// Carries a move one step on: keeps both hosts while the new one is not serving yet,
/// drops the old one once it is, and gives the move up when either host left or
/// placement no longer puts the expert on the old host.
pub fn advance_move(
    moving: Option<Move>,
    experts: &mut Assignment,
    nodes: &[Candidate],
    members: &BTreeMap<String, Member>,
) -> Option<Move> {
    let m = moving?;
    let hosts = experts.get_mut(&m.expert)?;
    if !hosts.contains(&m.from) || !nodes.iter().any(|c| c.name == m.to) {
        return None;
    }
    let serving = members
        .get(&m.to)
        .is_some_and(|member| member.serving.contains(&m.expert));
    if serving {
        hosts.retain(|n| n != &m.from);
    }
    if !hosts.contains(&m.to) {
        hosts.push(m.to.clone());
        hosts.sort();
    }
    if serving {
        tracing::info!(expert = %m.expert, from = %m.from, to = %m.to, "replica moved");
        None
    } else {
        Some(m)
    }
}

/// Rebalancing: when the busiest usable node hosts at least two experts more than the
/// idlest, starts moving one replica (the first by name that placement would put on a
/// less busy node) and adds its new host to `experts`. One move at a time.
pub fn start_move(spec: &MeshSpec, nodes: &[Candidate], experts: &mut Assignment) -> Option<Move> {
    let mut counts: BTreeMap<&str, usize> = nodes.iter().map(|c| (c.name.as_str(), 0)).collect();
    for host in experts.values().flatten() {
        if let Some(n) = counts.get_mut(host.as_str()) {
            *n += 1;
        }
    }
    let (busiest, most) = counts
        .iter()
        .max_by_key(|(name, n)| (**n, std::cmp::Reverse(**name)))
        .map(|(name, n)| (name.to_string(), *n))?;
    let fewest = counts.values().min().copied()?;
    if most < fewest + 2 {
        return None;
    }
    let before = experts.clone();
    for (expert, hosts) in &before {
        if !hosts.contains(&busiest) {
            continue;
        }
        let mut trial = experts.clone();
        if let Some(h) = trial.get_mut(expert) {
            h.retain(|n| n != &busiest);
        }
        let Ok(placed) = placement::place(&spec.demands(), nodes, &trial) else {
            continue;
        };
        let Some(to) = placed
            .get(expert)
            .and_then(|h| h.iter().find(|n| !hosts.contains(n)))
            .cloned()
        else {
            continue;
        };
        if counts.get(to.as_str()).is_some_and(|n| n + 1 < most) {
            let m = Move {
                expert: expert.clone(),
                from: busiest.clone(),
                to: to.clone(),
            };
            tracing::info!(expert = %m.expert, from = %m.from, to = %m.to, "rebalancing: moving a replica");
            if let Some(h) = experts.get_mut(expert) {
                h.push(to);
                h.sort();
            }
            return Some(m);
        }
    }
    None
}

/// Adds what the node's own config runs to its share of the mesh.
fn merge(target: &mut NodeSpec, local: &NodeSpec) {
    target.sensors.extend(local.sensors.iter().cloned());
    target.routers.extend(local.routers.iter().cloned());
    target.experts.extend(local.experts.iter().cloned());
    target
        .remote_experts
        .retain(|e| !local.experts.iter().any(|l| l.name == e.name));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{LoadCard, MemberCard};

    const TWO_EXPERTS: &str = r#"
[[experts]]
name = "ae1"
model_version = "v1"
channels = 2
window = 16
placement = { roles = ["fog"] }

[[experts]]
name = "ae2"
model_version = "v1"
channels = 2
window = 16
placement = { roles = ["fog"] }
"#;

    fn fog(name: &str) -> Candidate {
        Candidate {
            name: name.into(),
            role: Role::Fog,
            gpus: 0,
            cpu_load: 0.0,
            sensors: Vec::new(),
        }
    }

    fn member(name: &str, serving: &[&str]) -> (String, Member) {
        let card = MemberCard {
            role: "fog".into(),
            grpc: format!("{name}:7700"),
            cores: 2,
            memory_bytes: 1 << 30,
            gpus: Vec::new(),
            up_since_us: 0,
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
            },
        )
    }

    fn assignment(pairs: &[(&str, &[&str])]) -> Assignment {
        pairs
            .iter()
            .map(|(e, nodes)| (e.to_string(), nodes.iter().map(|n| n.to_string()).collect()))
            .collect()
    }

    #[test]
    fn a_joining_node_gets_a_replica_made_before_the_old_one_breaks() {
        let spec = MeshSpec::parse(TWO_EXPERTS, std::path::Path::new("mesh.toml")).unwrap();
        let nodes = vec![fog("fog-a"), fog("fog-b")];
        let mut experts = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-a"])]);
        let m = start_move(&spec, &nodes, &mut experts).expect("a move to the idle node");
        assert_eq!(
            (m.expert.as_str(), m.from.as_str(), m.to.as_str()),
            ("ae1", "fog-a", "fog-b")
        );
        assert_eq!(
            experts,
            assignment(&[("ae1", &["fog-a", "fog-b"]), ("ae2", &["fog-a"])])
        );

        // Not serving yet: both hosts stay.
        let waiting: BTreeMap<_, _> =
            [member("fog-a", &["ae1", "ae2"]), member("fog-b", &[])].into();
        let mut step = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-a"])]);
        let still = advance_move(Some(m.clone()), &mut step, &nodes, &waiting);
        assert_eq!(still, Some(m.clone()));
        assert_eq!(step["ae1"], vec!["fog-a", "fog-b"]);

        // Serving: the old host lets go.
        let serving: BTreeMap<_, _> =
            [member("fog-a", &["ae1", "ae2"]), member("fog-b", &["ae1"])].into();
        let mut step = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-a"])]);
        assert_eq!(
            advance_move(Some(m.clone()), &mut step, &nodes, &serving),
            None
        );
        assert_eq!(
            step,
            assignment(&[("ae1", &["fog-b"]), ("ae2", &["fog-a"])])
        );

        // The new host left: the move is given up, placement as it was.
        let mut step = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-a"])]);
        assert_eq!(
            advance_move(Some(m), &mut step, &nodes[..1], &serving),
            None
        );
        assert_eq!(step["ae1"], vec!["fog-a"]);
    }

    /// Regression: a node that had just joined, linked to nobody yet, saw itself as the
    /// only usable node, led, and placed every expert on itself; the real leader then
    /// took that placement as the one to keep stable and moves went back and forth.
    #[test]
    fn a_node_with_a_partial_view_leads_only_once_settled() {
        let alone = vec![fog("fog-a")];
        assert!(!may_lead("fog-a", &alone, 3, Duration::from_millis(100)));
        assert!(may_lead("fog-a", &alone, 3, SETTLE_TIME));
        assert!(
            may_lead("fog-a", &alone, 1, Duration::ZERO),
            "a mesh of one"
        );
        let all = vec![fog("fog-a"), fog("fog-b")];
        assert!(may_lead("fog-a", &all, 2, Duration::ZERO));
        assert!(
            !may_lead("fog-b", &all, 2, SETTLE_TIME),
            "fog-a sorts first"
        );
    }

    #[test]
    fn a_balanced_mesh_moves_nothing() {
        let spec = MeshSpec::parse(TWO_EXPERTS, std::path::Path::new("mesh.toml")).unwrap();
        let nodes = vec![fog("fog-a"), fog("fog-b"), fog("fog-c")];
        let mut experts = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-b"])]);
        assert_eq!(start_move(&spec, &nodes, &mut experts), None);
        let mut one_node = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-a"])]);
        assert_eq!(start_move(&spec, &nodes[..1], &mut one_node), None);
    }
}
