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
//! A mesh expert with a `federation` table is trained by federated rounds: every site
//! node runs a site fed by its own windows, and the usable node the federation's
//! coordinator is placed on runs the coordinator (`federations`), which also promotes
//! by a mesh rollout.
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

mod federations;
mod leader;
pub(crate) mod view;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogmesh_actors::{ContinualLearner, ExpertSpec, LearningSpec, Node, NodeSpec, RunningLearner};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::dialer::Dialer;
use crate::membership::{Member, Membership, PLACEMENT_KEY, SERVING_KEY, SPEC_KEY, VERSIONS_KEY};
use crate::mesh_spec::{MeshSpec, ModelPlaces, StoredSpec};
use crate::peer_links::LinkView;
use crate::rollout;

pub use leader::{
    advance_move, may_lead, place, place_new, start_move, ApplyError, Move, SETTLE_TIME,
};
use view::lock;
pub use view::{
    candidates, gossiped_placements, gossiped_specs, DeploymentState, NoQuorum, PublishedPlacement,
    Quorum, RolloutOutcome, RolloutRecord, MAX_UNUSABLE_SPECS,
};

/// How often the loop runs without being woken (load changes, missed wake-ups).
pub const ROUND_INTERVAL: Duration = Duration::from_millis(500);
/// The least time between two passes: the wake-ups of a burst of gossip (a hundred
/// members each setting a key) are taken as one pass, not one pass each.
pub const PASS_GAP: Duration = Duration::from_millis(100);
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
        // Federation sites and coordinators that run here.
        let mut federations = federations::Federations::default();
        let mut drifts_published = BTreeMap::new();
        if let Some(spec) = &own_spec {
            tracing::info!(
                version = spec.version,
                "mesh spec restored from the data folder"
            );
            self.publish_spec(spec).await;
        }
        let mut tick = tokio::time::interval(ROUND_INTERVAL);
        let started = std::time::Instant::now();
        let mut last_pass = tokio::time::Instant::now();
        loop {
            // A watch whose sender is gone (gossip or the link keeper stopped) would
            // answer at once forever; its branch then sits out and the tick drives.
            tokio::select! {
                () = shutdown.cancelled() => {
                    for (_, learner) in std::mem::take(&mut learners) {
                        learner.shutdown().await;
                    }
                    federations.stop(&self);
                    return;
                }
                Ok(()) = changes.changed() => {}
                Ok(()) = links.changed() => {}
                _ = tick.tick() => {}
            }
            tokio::time::sleep_until(last_pass + PASS_GAP).await;
            last_pass = tokio::time::Instant::now();
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
            if applied.is_some() {
                self.publish_drifts(&mut drifts_published).await;
                self.publish_privacy(&members, &mut federations).await;
                self.run_federations(spec, &nodes, &members, &mut federations)
                    .await;
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
            .map_err(|e| rollout::RolloutError::SpecSyntax(Box::new(e)))?;
        let Some(store) = &self.places.models else {
            return Ok(());
        };
        if ids.is_empty() {
            return Ok(());
        }
        let peers = rollout::peer_addresses(members, &self.node_name, &self.links.borrow());
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

/// Adds what the node's own config runs to its share of the mesh.
fn merge(target: &mut NodeSpec, local: &NodeSpec) {
    target.sensors.extend(local.sensors.iter().cloned());
    target.routers.extend(local.routers.iter().cloned());
    target.experts.extend(local.experts.iter().cloned());
    target
        .remote_experts
        .retain(|e| !local.experts.iter().any(|l| l.name == e.name));
}
