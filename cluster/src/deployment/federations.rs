//! The adopted spec's federations (`[experts.federation]`) on this node: a
//! `SiteTrainer` for each federation this node is a site of, fed by the windows its
//! own routers had the expert score, and the `FederatedCoordinator` of each federation
//! placed on this node, with a `RemoteSite` for every site on another node.
//!
//! Placement: the coordinator runs on the first usable node (by name) of the
//! federation's `coordinator_role`, or on the first usable node when none has that
//! role, so it moves when its node dies (a round in flight there is lost before it
//! stored anything, and `Federate` passes it on to the new coordinator). The sites are
//! the nodes the spec names by role or name, or, with neither, the nodes whose sensors
//! are routed to the expert.
//!
//! A coordinator is started again when its sites or settings change, and when the
//! expert's version moved by other means than its own rounds (a rollout or rollback):
//! never while a round runs (it answers no status then), so a change cannot cut a
//! round short on a live coordinator.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use fogmesh_actors::{
    ExpertSpec, FederatedCoordinator, FederatedCoordinatorArgs, FederatedCoordinatorMsg,
    FederationSite, FederationSpec, Publication, Site, SiteTrainer, SiteTrainerArgs,
    SiteTrainerMsg, WindowFeed,
};
use fogmesh_models::served::Architecture;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use tokio::task::JoinHandle;

use super::view::lock;
use super::Deployment;
use crate::federation::{RemoteSite, RemoteSiteArgs};
use crate::membership::Member;
use crate::mesh_spec::MeshSpec;
use crate::placement::Candidate;
use crate::rollout;

/// How long the loop waits for a coordinator's status before taking it as busy.
const IDLE_PROBE: Duration = Duration::from_millis(100);

/// What this node runs of the spec's federations.
#[derive(Default)]
pub(super) struct Federations {
    sites: BTreeMap<String, RunningSite>,
    coordinators: BTreeMap<String, RunningCoordinator>,
}

struct RunningSite {
    spec: FederationSpec,
    architecture: Architecture,
    actor: ActorRef<SiteTrainerMsg>,
}

#[derive(PartialEq)]
struct CoordinatorKey {
    spec: FederationSpec,
    sites: BTreeSet<String>,
}

struct RunningCoordinator {
    key: CoordinatorKey,
    actor: ActorRef<FederatedCoordinatorMsg>,
    remote: Vec<ActorRef<SiteTrainerMsg>>,
    schedule: Option<JoinHandle<()>>,
}

impl RunningCoordinator {
    fn stop(self) {
        if let Some(schedule) = self.schedule {
            schedule.abort();
        }
        self.actor.stop(None);
        for site in self.remote {
            site.stop(None);
        }
    }
}

impl Federations {
    pub(super) fn stop(&mut self, deployment: &Deployment) {
        for (expert, site) in std::mem::take(&mut self.sites) {
            deployment.node.directory.sites.remove(&expert);
            site.actor.stop(None);
        }
        for (expert, coordinator) in std::mem::take(&mut self.coordinators) {
            deployment.node.directory.coordinators.remove(&expert);
            coordinator.stop();
        }
    }
}

/// The sites of a federation, by node name.
fn sites_of(
    spec: &MeshSpec,
    expert: &str,
    federation: &FederationSpec,
    members: &BTreeMap<String, Member>,
    me: &str,
    my_role: &str,
) -> BTreeSet<String> {
    if federation.roles.is_empty() && federation.nodes.is_empty() {
        return spec.sensor_nodes(expert);
    }
    let mut sites: BTreeSet<String> = federation.nodes.iter().cloned().collect();
    sites.extend(
        members
            .values()
            .filter(|m| federation.roles.contains(&m.card.role))
            .map(|m| m.name.clone()),
    );
    if federation.roles.iter().any(|r| r == my_role) {
        sites.insert(me.to_string());
    }
    sites
}

/// The node that coordinates a federation among the usable ones.
pub(super) fn coordinator_of(federation: &FederationSpec, nodes: &[Candidate]) -> Option<String> {
    nodes
        .iter()
        .filter(|c| c.role.as_str() == federation.coordinator_role)
        .map(|c| c.name.clone())
        .min()
        .or_else(|| nodes.iter().map(|c| c.name.clone()).min())
}

impl Deployment {
    /// Brings this node's sites and coordinators in line with `spec` and the usable
    /// `nodes` (see the module doc).
    pub(super) async fn run_federations(
        &self,
        spec: &MeshSpec,
        nodes: &[Candidate],
        members: &BTreeMap<String, Member>,
        running: &mut Federations,
    ) {
        let my_role = nodes
            .iter()
            .find(|c| c.name == self.node_name)
            .map_or("", |c| c.role.as_str());
        let wanted: Vec<(&ExpertSpec, &FederationSpec)> = spec.federations();
        let mut placed = BTreeMap::new();
        let mut sites_wanted = BTreeMap::new();
        let mut coordinators_wanted = BTreeMap::new();
        for (expert, federation) in wanted {
            let sites = sites_of(
                spec,
                &expert.name,
                federation,
                members,
                &self.node_name,
                my_role,
            );
            if sites.contains(&self.node_name) {
                sites_wanted.insert(expert.name.clone(), (expert, federation));
            }
            if let Some(coordinator) = coordinator_of(federation, nodes) {
                if coordinator == self.node_name {
                    coordinators_wanted.insert(expert.name.clone(), (expert, federation, sites));
                }
                placed.insert(expert.name.clone(), coordinator);
            }
        }
        lock(&self.state).federations = placed;

        // Sites first, so a coordinator here finds this node's own site.
        let stale: Vec<String> = running
            .sites
            .iter()
            .filter(|(name, site)| {
                sites_wanted.get(*name).is_none_or(|(expert, federation)| {
                    &site.spec != *federation
                        || architecture(expert).as_ref() != Some(&site.architecture)
                })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(site) = running.sites.remove(&name) {
                self.node.directory.sites.remove(&name);
                site.actor.stop(None);
            }
        }
        for (name, (expert, federation)) in &sites_wanted {
            if running.sites.contains_key(name) {
                continue;
            }
            match self.start_site(expert, federation).await {
                Ok(site) => {
                    tracing::info!(expert = %name, "federation site started");
                    self.node
                        .directory
                        .sites
                        .insert(name.clone(), site.actor.clone());
                    running.sites.insert(name.clone(), site);
                }
                Err(e) => {
                    self.record_error(format!("the federation site of {name} did not start: {e}"))
                }
            }
        }

        let names: Vec<String> = running.coordinators.keys().cloned().collect();
        for name in names {
            let restart = match coordinators_wanted.get(&name) {
                None => true,
                Some((expert, federation, sites)) => {
                    let key = CoordinatorKey {
                        spec: (*federation).clone(),
                        sites: sites.clone(),
                    };
                    let coordinator = &running.coordinators[&name];
                    coordinator.key != key || self.moved_elsewhere(expert, &coordinator.actor).await
                }
            };
            if restart && self.idle(&running.coordinators[&name].actor).await {
                if let Some(coordinator) = running.coordinators.remove(&name) {
                    self.node.directory.coordinators.remove(&name);
                    coordinator.stop();
                    tracing::info!(expert = %name, "federation coordinator stopped here");
                }
            }
        }
        for (name, (expert, federation, sites)) in coordinators_wanted {
            if running.coordinators.contains_key(&name) {
                continue;
            }
            match self
                .start_coordinator(expert, federation, sites, members, running)
                .await
            {
                Ok(coordinator) => {
                    tracing::info!(expert = %name, sites = ?coordinator.key.sites, "federation coordinator started");
                    self.node
                        .directory
                        .coordinators
                        .insert(name.clone(), coordinator.actor.clone());
                    running.coordinators.insert(name, coordinator);
                }
                Err(e) => self.record_error(format!(
                    "the federation coordinator of {name} did not start: {e}"
                )),
            }
        }
    }

    /// Whether a coordinator answers at once (it is between rounds).
    async fn idle(&self, actor: &ActorRef<FederatedCoordinatorMsg>) -> bool {
        matches!(
            actor
                .call(
                    |reply| FederatedCoordinatorMsg::Status { reply },
                    Some(IDLE_PROBE)
                )
                .await,
            Ok(CallResult::Success(_))
        )
    }

    /// Whether the expert serves a version that neither is the coordinator's nor
    /// came before it (a rollout or rollback by someone else).
    async fn moved_elsewhere(
        &self,
        expert: &ExpertSpec,
        actor: &ActorRef<FederatedCoordinatorMsg>,
    ) -> bool {
        let Some(serving) = expert.source.stored().map(|s| s.manifest.id()) else {
            return false;
        };
        let Ok(CallResult::Success(status)) = actor
            .call(
                |reply| FederatedCoordinatorMsg::Status { reply },
                Some(IDLE_PROBE),
            )
            .await
        else {
            return false;
        };
        if status.version == serving {
            return false;
        }
        // Stored by the coordinator's last round and not adopted by the mesh yet.
        let parents = self
            .places
            .models
            .as_ref()
            .and_then(|store| store.get(&status.version).ok())
            .map(|m| m.parents)
            .unwrap_or_default();
        !parents.contains(&serving)
    }

    async fn start_site(
        &self,
        expert: &ExpertSpec,
        federation: &FederationSpec,
    ) -> Result<RunningSite, StartError> {
        let architecture = architecture(expert).ok_or(StartError::NotStored)?;
        let args = SiteTrainerArgs {
            site: self.node_name.clone(),
            architecture: architecture.clone(),
            windows: Vec::new(),
            held_out: Vec::new(),
            feed: Some(WindowFeed {
                windows: self.node.annunciator.subscribe(),
                expert: expert.name.as_str().into(),
                capacity: federation.windows,
                holdout_every: federation.holdout_every(),
                seed: federation.seed,
            }),
        };
        let (actor, _) = Actor::spawn(None, SiteTrainer, args).await?;
        Ok(RunningSite {
            spec: federation.clone(),
            architecture,
            actor,
        })
    }

    async fn start_coordinator(
        &self,
        expert: &ExpertSpec,
        federation: &FederationSpec,
        site_names: BTreeSet<String>,
        members: &BTreeMap<String, Member>,
        running: &Federations,
    ) -> Result<RunningCoordinator, StartError> {
        let stored = expert.source.stored().ok_or(StartError::NotStored)?;
        let store = self.places.models.clone().ok_or(StartError::NoStore)?;
        let mut sites = Vec::new();
        let mut remote = Vec::new();
        for name in &site_names {
            let actor = match running
                .sites
                .get(&expert.name)
                .filter(|_| name == &self.node_name)
            {
                Some(local) => local.actor.clone(),
                None => {
                    let args = RemoteSiteArgs {
                        site: name.clone(),
                        addr: members
                            .get(name)
                            .map(|m| m.card.grpc.clone())
                            .unwrap_or_default(),
                        membership: Some(self.membership.clone()),
                        federation: expert.name.clone(),
                        dialer: self.dialer.clone(),
                    };
                    let (actor, _) = Actor::spawn(None, RemoteSite, args).await?;
                    remote.push(actor.clone());
                    actor
                }
            };
            sites.push(FederationSite {
                name: name.clone(),
                site: Site::Trainer(actor),
            });
        }
        let promoter = Arc::new(rollout::MeshPromoter {
            me: self.node_name.clone(),
            places: self.places.clone(),
            dialer: self.dialer.clone(),
            membership: self.membership.clone(),
            links: self.links.clone(),
            state: self.state.clone(),
        });
        let args = FederatedCoordinatorArgs {
            federation: expert.name.clone(),
            base: stored.manifest.clone(),
            weights: stored.weights.to_vec(),
            sites,
            plan: federation.plan(),
            publication: Some(Publication {
                store,
                promoter: Some(promoter),
            }),
        };
        let spawned = Actor::spawn(None, FederatedCoordinator, args).await;
        let actor = match spawned {
            Ok((actor, _)) => actor,
            Err(e) => {
                for site in remote {
                    site.stop(None);
                }
                return Err(StartError::Spawn(e));
            }
        };
        let schedule = federation.every_s.map(|every| {
            let actor = actor.clone();
            let expert = expert.name.clone();
            tokio::spawn(scheduled_rounds(
                actor,
                expert,
                Duration::from_secs_f64(every),
            ))
        });
        Ok(RunningCoordinator {
            key: CoordinatorKey {
                spec: federation.clone(),
                sites: site_names,
            },
            actor,
            remote,
            schedule,
        })
    }
}

/// A round every `every`, for as long as the coordinator runs.
async fn scheduled_rounds(
    actor: ActorRef<FederatedCoordinatorMsg>,
    expert: String,
    every: Duration,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match actor
            .call(|reply| FederatedCoordinatorMsg::Round { reply }, None)
            .await
        {
            Ok(CallResult::Success(Ok(round))) => {
                tracing::info!(%expert, round = round.round, version = ?round.version, sites = ?round.sites, "scheduled federated round")
            }
            Ok(CallResult::Success(Err(e))) => {
                tracing::warn!(%expert, error = %e, "scheduled federated round applied nothing")
            }
            _ => return,
        }
    }
}

fn architecture(expert: &ExpertSpec) -> Option<Architecture> {
    Architecture::from_manifest(&expert.source.stored()?.manifest).ok()
}

/// Why this node's part of a federation did not start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("the expert does not serve a stored model of a network sites can train")]
    NotStored,
    #[error("this node has no model store (`[node] models`) to keep the federation's versions")]
    NoStore,
    #[error("the actor did not start: {0}")]
    Spawn(#[from] ractor::SpawnErr),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;

    fn node(name: &str, role: Role) -> Candidate {
        Candidate {
            name: name.into(),
            role,
            gpus: 0,
            cpu_load: 0.0,
            sensors: Vec::new(),
        }
    }

    #[test]
    fn the_coordinator_goes_to_the_first_node_of_its_role_or_else_the_first_node() {
        let federation = FederationSpec::default();
        let nodes = [
            node("edge-1", Role::Edge),
            node("cloud-2", Role::Cloud),
            node("cloud-1", Role::Cloud),
        ];
        assert_eq!(
            coordinator_of(&federation, &nodes).as_deref(),
            Some("cloud-1")
        );
        // Its node gone: the next of the role.
        assert_eq!(
            coordinator_of(&federation, &nodes[..2]).as_deref(),
            Some("cloud-2")
        );
        // No node of the role: the first by name.
        let edges = [node("edge-2", Role::Edge), node("edge-1", Role::Edge)];
        assert_eq!(
            coordinator_of(&federation, &edges).as_deref(),
            Some("edge-1")
        );
        assert_eq!(coordinator_of(&federation, &[]), None);
    }
}
