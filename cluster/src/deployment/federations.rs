//! The adopted spec's federations (`[experts.federation]`) on this node: a
//! `SiteTrainer` for each federation this node is a site of, fed by the windows its
//! own routers had the expert score; the `FederatedCoordinator` of each federation
//! placed on this node; and a fog aggregator (a coordinator that publishes nothing)
//! for each group this node aggregates. A coordinator reaches a site or aggregator on
//! another node through a `RemoteSite`.
//!
//! Placement: the coordinator runs on the first usable node (by name) of the
//! federation's `coordinator_role`, or on the first usable node when none has that
//! role, so it moves when its node dies (a round in flight there is lost before it
//! stored anything, and `Federate` passes it on to the new coordinator). The sites are
//! the nodes the spec names by role, name or zone pattern, or, with none of these, the
//! nodes whose sensors are routed to the expert, and every site a group names. A group
//! takes the sites it names and the federation's other sites in its zone (the deepest
//! pattern's); groups may sit `within` others. The coordinator asks the sites in no
//! group and the aggregator of each group within none that has a site below it; each
//! aggregator asks its group's sites and the aggregators of the groups within it.
//!
//! Privacy spent outlives the coordinator that spent it: each node gossips the most it
//! has heard each federation's private rounds spent (`PRIVACY_KEY`), from its own
//! coordinators and the mesh, and a coordinator starts its accountant from the larger
//! of that and its base version's lineage.
//!
//! A coordinator is started again when its sites or settings change, and when the
//! expert's version moved by other means than its own rounds (a rollout or rollback):
//! never while a round runs (it answers no status then), so a change cannot cut a
//! round short on a live coordinator.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use fogmesh_actors::{
    Distillation, DistillationSpec, ExpertSpec, FederatedCoordinator, FederatedCoordinatorArgs,
    FederatedCoordinatorMsg, FederationGroup, FederationSite, FederationSpec, FederationStatus,
    Publication, Site, SiteTrainer, SiteTrainerArgs, SiteTrainerMsg, WindowFeed,
};
use fogmesh_models::federated::distill::read_shared;
use fogmesh_models::federated::PrivacySpent;
use fogmesh_models::served::Architecture;
use fogmesh_models::store::Manifest;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use tokio::task::JoinHandle;

use super::view::lock;
use super::Deployment;
use crate::federation::{RemoteSite, RemoteSiteArgs};
use crate::membership::{Member, DRIFTS_KEY, PRIVACY_KEY};
use crate::mesh_spec::MeshSpec;
use crate::placement::Candidate;
use crate::rollout;
use crate::zone::ZonePattern;

/// How long the loop waits for a coordinator's status before taking it as busy.
const IDLE_PROBE: Duration = Duration::from_millis(100);

/// What this node runs of the spec's federations.
#[derive(Default)]
pub(super) struct Federations {
    sites: BTreeMap<String, RunningSite>,
    coordinators: BTreeMap<String, RunningCoordinator>,
    aggregators: BTreeMap<String, RunningCoordinator>,
    /// The most each federation's private rounds are known to have spent: heard from
    /// the mesh and this node's own coordinators, gossiped as [`PRIVACY_KEY`].
    spent: BTreeMap<String, PrivacySpent>,
}

struct RunningSite {
    sample: SiteSample,
    architecture: Architecture,
    /// This node's own network in distillation rounds, where it differs.
    network: Option<Architecture>,
    actor: ActorRef<SiteTrainerMsg>,
}

/// What a site's windows depend on: a change to anything else (the round's work, the
/// rule, the groups) leaves the site and the windows it gathered alone.
#[derive(PartialEq)]
struct SiteSample {
    windows: usize,
    holdout_every: usize,
    seed: u64,
}

impl SiteSample {
    fn of(federation: &FederationSpec) -> SiteSample {
        SiteSample {
            windows: federation.windows,
            holdout_every: federation.holdout_every(),
            seed: federation.seed,
        }
    }
}

/// A site as a coordinator asks it: a node, and whether its fog aggregator answers.
type SiteRef = (String, bool);

#[derive(PartialEq)]
struct CoordinatorKey {
    spec: FederationSpec,
    sites: BTreeSet<SiteRef>,
}

struct RunningCoordinator {
    key: CoordinatorKey,
    actor: ActorRef<FederatedCoordinatorMsg>,
    remote: Vec<ActorRef<SiteTrainerMsg>>,
    schedule: Option<JoinHandle<()>>,
    /// The mesh's drift count of the expert when last looked at (`on_drift`).
    drifts: u64,
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

/// The top of a federation, or a fog aggregator under it.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Level {
    Top,
    Group,
}

impl Federations {
    pub(super) fn stop(&mut self, deployment: &Deployment) {
        for (expert, site) in std::mem::take(&mut self.sites) {
            deployment.node.directory.sites.remove(&expert);
            site.actor.stop(None);
        }
        for level in [Level::Top, Level::Group] {
            for (expert, coordinator) in std::mem::take(self.level(level)) {
                deployment.directory_of(level).remove(&expert);
                coordinator.stop();
            }
        }
    }

    fn level(&mut self, level: Level) -> &mut BTreeMap<String, RunningCoordinator> {
        match level {
            Level::Top => &mut self.coordinators,
            Level::Group => &mut self.aggregators,
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
    zones: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    let mut sites: BTreeSet<String> = federation
        .groups
        .iter()
        .flat_map(|g| g.sites.iter().cloned())
        .collect();
    if federation.roles.is_empty() && federation.nodes.is_empty() && federation.zones.is_empty() {
        sites.extend(spec.sensor_nodes(expert));
        return sites;
    }
    sites.extend(federation.nodes.iter().cloned());
    sites.extend(
        members
            .values()
            .filter(|m| federation.roles.contains(&m.card.role))
            .map(|m| m.name.clone()),
    );
    if federation.roles.iter().any(|r| r == my_role) {
        sites.insert(me.to_string());
    }
    let patterns: Vec<ZonePattern> = federation
        .zones
        .iter()
        .filter_map(|z| ZonePattern::parse(z).ok())
        .collect();
    sites.extend(
        zones
            .iter()
            .filter(|(_, zone)| patterns.iter().any(|p| p.matches(zone)))
            .map(|(node, _)| node.clone()),
    );
    sites
}

/// Each group's sites: those it names, then the federation's other `sites` whose zone
/// (by node name in `zones`) its pattern matches. A site a group names stays in that
/// group; one several groups' zones match goes to the deepest pattern (a cell's group
/// before its area's), the first of equals.
fn group_sites(
    federation: &FederationSpec,
    sites: &BTreeSet<String>,
    zones: &BTreeMap<String, String>,
) -> Vec<BTreeSet<String>> {
    let mut grouped: Vec<BTreeSet<String>> = federation
        .groups
        .iter()
        .map(|g| g.sites.iter().cloned().collect())
        .collect();
    let named: BTreeSet<&String> = federation.groups.iter().flat_map(|g| &g.sites).collect();
    let patterns: Vec<Option<ZonePattern>> = federation
        .groups
        .iter()
        .map(|g| g.zone.as_deref().and_then(|z| ZonePattern::parse(z).ok()))
        .collect();
    for site in sites.iter().filter(|s| !named.contains(s)) {
        let Some(zone) = zones.get(site) else {
            continue;
        };
        let deepest = patterns
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, p.as_ref().filter(|p| p.matches(zone))?.depth())))
            .min_by_key(|(i, depth)| (usize::MAX - depth, *i));
        if let Some((i, _)) = deepest {
            grouped[i].insert(site.clone());
        }
    }
    grouped
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

/// Drifts the learners of `expert` have gossiped, summed over the mesh.
fn drifts_of(members: &BTreeMap<String, Member>, expert: &str) -> u64 {
    members.values().filter_map(|m| m.drifts.get(expert)).sum()
}

/// Whether the mesh's drift count rose since `seen`, which becomes `now` (a learner that
/// restarted counts from zero again: a fall is no drift).
fn drifted(seen: &mut u64, now: u64) -> bool {
    let rose = now > *seen;
    *seen = now;
    rose
}

/// Records `spent` for `expert` unless more is known already.
fn hear_spent(known: &mut BTreeMap<String, PrivacySpent>, expert: &str, spent: PrivacySpent) {
    let entry = known.entry(expert.to_string()).or_default();
    if spent.rho > entry.rho {
        *entry = spent;
    }
}

/// What a federation's private rounds had spent when `version` was stored, by its
/// lineage (nothing for a version no private round made).
fn spent_by_lineage(version: &Manifest) -> PrivacySpent {
    version
        .training
        .get("federated")
        .and_then(|f| f.get("privacy_spent"))
        .and_then(|spent| serde_json::from_value(spent.clone()).ok())
        .unwrap_or_default()
}

/// What each group's aggregator asks: its sites (`grouped`, from [`group_sites`]) and
/// the aggregator of each group that answers to it (`within`) with a site below it.
/// `None` for a group with no site at or below it: it is left out of the round.
fn group_asks(
    federation: &FederationSpec,
    grouped: &[BTreeSet<String>],
) -> Vec<Option<BTreeSet<SiteRef>>> {
    let groups = &federation.groups;
    let parent = |g: &FederationGroup| {
        groups
            .iter()
            .position(|h| g.within.as_ref() == Some(&h.aggregator))
    };
    // A site below a group makes every group above it live; the spec's check keeps
    // `within` free of circles, so no chain is longer than the groups.
    let mut live: Vec<bool> = grouped.iter().map(|sites| !sites.is_empty()).collect();
    for _ in 0..groups.len() {
        for (i, group) in groups.iter().enumerate() {
            if let (true, Some(up)) = (live[i], parent(group)) {
                live[up] = true;
            }
        }
    }
    groups
        .iter()
        .enumerate()
        .map(|(i, _)| {
            live[i].then(|| {
                let children = groups
                    .iter()
                    .enumerate()
                    .filter(|(j, child)| live[*j] && parent(child) == Some(i))
                    .map(|(_, child)| (child.aggregator.clone(), true));
                grouped[i]
                    .iter()
                    .map(|s| (s.clone(), false))
                    .chain(children)
                    .collect()
            })
        })
        .collect()
}

/// What the top coordinator asks: the sites in no group, and the aggregator of each
/// group that answers to no other and has a site below it (`asks`, from
/// [`group_asks`]).
fn top_sites(
    federation: &FederationSpec,
    sites: &BTreeSet<String>,
    grouped: &[BTreeSet<String>],
    asks: &[Option<BTreeSet<SiteRef>>],
) -> BTreeSet<SiteRef> {
    let in_a_group: BTreeSet<&String> = grouped.iter().flatten().collect();
    sites
        .iter()
        .filter(|s| !in_a_group.contains(s))
        .map(|s| (s.clone(), false))
        .chain(
            federation
                .groups
                .iter()
                .zip(asks)
                .filter(|(g, asks)| g.within.is_none() && asks.is_some())
                .map(|(g, _)| (g.aggregator.clone(), true)),
        )
        .collect()
}

/// One coordinator this node should run.
struct Wanted<'a> {
    expert: &'a ExpertSpec,
    federation: &'a FederationSpec,
    sites: BTreeSet<SiteRef>,
}

impl Deployment {
    fn directory_of(&self, level: Level) -> &DashMap<String, ActorRef<FederatedCoordinatorMsg>> {
        match level {
            Level::Top => &self.node.directory.coordinators,
            Level::Group => &self.node.directory.aggregators,
        }
    }

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
        let zones: BTreeMap<String, String> = members
            .values()
            .map(|m| (m.name.clone(), m.card.zone.clone()))
            .chain(nodes.iter().map(|c| (c.name.clone(), c.zone.clone())))
            .filter(|(_, zone)| !zone.is_empty())
            .collect();
        let mut placed = BTreeMap::new();
        let mut sites_wanted = BTreeMap::new();
        let mut tops = BTreeMap::new();
        let mut groups = BTreeMap::new();
        for (expert, federation) in spec.federations() {
            let sites = sites_of(
                spec,
                &expert.name,
                federation,
                members,
                &self.node_name,
                my_role,
                &zones,
            );
            let grouped = group_sites(federation, &sites, &zones);
            let asks = group_asks(federation, &grouped);
            if sites.contains(&self.node_name) {
                sites_wanted.insert(expert.name.clone(), (expert, federation));
            }
            if let Some(sites) = federation
                .groups
                .iter()
                .zip(&asks)
                .find(|(g, _)| g.aggregator == self.node_name)
                .and_then(|(_, asks)| asks.clone())
            {
                groups.insert(
                    expert.name.clone(),
                    Wanted {
                        expert,
                        federation,
                        sites,
                    },
                );
            }
            if let Some(coordinator) = coordinator_of(federation, nodes) {
                if coordinator == self.node_name {
                    let sites = top_sites(federation, &sites, &grouped, &asks);
                    tops.insert(
                        expert.name.clone(),
                        Wanted {
                            expert,
                            federation,
                            sites,
                        },
                    );
                }
                placed.insert(expert.name.clone(), coordinator);
            }
        }
        lock(&self.state).federations = placed;

        // Sites first, then aggregators, then the top: each finds the level below it
        // on this node.
        let stale: Vec<String> = running
            .sites
            .iter()
            .filter(|(name, site)| {
                sites_wanted.get(*name).is_none_or(|(expert, federation)| {
                    site.sample != SiteSample::of(federation)
                        || architecture(expert).as_ref() != Some(&site.architecture)
                        || self.site_network(expert, federation).ok().flatten() != site.network
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
        self.run_level(Level::Group, groups, members, running).await;
        self.run_level(Level::Top, tops, members, running).await;
        for (expert, federation) in spec.federations() {
            let Some(coordinator) = running.coordinators.get_mut(&expert.name) else {
                continue;
            };
            if drifted(&mut coordinator.drifts, drifts_of(members, &expert.name))
                && federation.on_drift
            {
                tracing::info!(expert = %expert.name, "a learner reported a drift: federated round");
                tokio::spawn(one_round(coordinator.actor.clone(), expert.name.clone()));
            }
        }
    }

    /// Gossips the drifts this node's learners detected, when they changed.
    pub(super) async fn publish_drifts(&self, published: &mut BTreeMap<String, u64>) {
        let drifts: BTreeMap<String, u64> = self
            .node
            .directory
            .learners
            .iter()
            .map(|l| (l.key().clone(), l.value().shared.snapshot().drifts))
            .collect();
        if &drifts != published {
            self.membership
                .set(
                    DRIFTS_KEY,
                    serde_json::to_string(&drifts).unwrap_or_default(),
                )
                .await;
            *published = drifts;
        }
    }

    /// Takes in what the mesh and this node's coordinators say the federations' private
    /// rounds spent, and gossips the most known when it grew. A coordinator busy in a
    /// round is heard from at the next pass, or when it is stopped.
    pub(super) async fn publish_privacy(
        &self,
        members: &BTreeMap<String, Member>,
        running: &mut Federations,
    ) {
        let mut known = running.spent.clone();
        for member in members.values() {
            for (expert, spent) in &member.privacy {
                hear_spent(&mut known, expert, *spent);
            }
        }
        for (expert, coordinator) in &running.coordinators {
            if let Some(spent) = status(&coordinator.actor)
                .await
                .and_then(|s| s.privacy_spent)
            {
                hear_spent(&mut known, expert, spent);
            }
        }
        if known != running.spent {
            self.membership
                .set(
                    PRIVACY_KEY,
                    serde_json::to_string(&known).unwrap_or_default(),
                )
                .await;
            running.spent = known;
        }
    }

    /// Starts, restarts and stops this node's coordinators of one level.
    async fn run_level(
        &self,
        level: Level,
        wanted: BTreeMap<String, Wanted<'_>>,
        members: &BTreeMap<String, Member>,
        running: &mut Federations,
    ) {
        let names: Vec<String> = running.level(level).keys().cloned().collect();
        for name in names {
            let actor = running.level(level)[&name].actor.clone();
            let restart = match wanted.get(&name) {
                None => true,
                Some(w) => {
                    let key = CoordinatorKey {
                        spec: w.federation.clone(),
                        sites: w.sites.clone(),
                    };
                    running.level(level)[&name].key != key
                        || (level == Level::Top && self.moved_elsewhere(w.expert, &actor).await)
                }
            };
            // Between rounds only; what its last rounds spent is kept for its successor.
            let idle = match restart {
                true => status(&actor).await,
                false => None,
            };
            if let Some(idle) = idle {
                if let Some(spent) = idle.privacy_spent.filter(|_| level == Level::Top) {
                    hear_spent(&mut running.spent, &name, spent);
                }
                if let Some(coordinator) = running.level(level).remove(&name) {
                    self.directory_of(level).remove(&name);
                    coordinator.stop();
                    tracing::info!(expert = %name, ?level, "federation coordinator stopped here");
                }
            }
        }
        for (name, w) in wanted {
            if running.level(level).contains_key(&name) {
                continue;
            }
            match self.start_coordinator(level, &w, members, running).await {
                Ok(coordinator) => {
                    tracing::info!(expert = %name, ?level, sites = ?coordinator.key.sites, "federation coordinator started");
                    self.directory_of(level)
                        .insert(name.clone(), coordinator.actor.clone());
                    running.level(level).insert(name, coordinator);
                }
                Err(e) => self.record_error(format!(
                    "the federation coordinator of {name} did not start: {e}"
                )),
            }
        }
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
        let Some(status) = status(actor).await else {
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
        let network = self.site_network(expert, federation)?;
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
                learners: Some(self.node.directory.clone()),
            }),
            network: network.clone(),
        };
        let (actor, _) = Actor::spawn(None, SiteTrainer, args).await?;
        Ok(RunningSite {
            sample: SiteSample::of(federation),
            architecture,
            network,
            actor,
        })
    }

    /// The network this node trains in distillation rounds when the spec gives it
    /// another width than the expert's.
    fn site_network(
        &self,
        expert: &ExpertSpec,
        federation: &FederationSpec,
    ) -> Result<Option<Architecture>, StartError> {
        let Some(hidden) = federation
            .distillation
            .as_ref()
            .and_then(|d| d.hidden.get(&self.node_name))
        else {
            return Ok(None);
        };
        let architecture = architecture(expert).ok_or(StartError::NotStored)?;
        Ok(Some(architecture.with_hidden(*hidden)?))
    }

    async fn start_coordinator(
        &self,
        level: Level,
        wanted: &Wanted<'_>,
        members: &BTreeMap<String, Member>,
        running: &Federations,
    ) -> Result<RunningCoordinator, StartError> {
        let (expert, federation) = (wanted.expert, wanted.federation);
        let stored = expert.source.stored().ok_or(StartError::NotStored)?;
        let store = self.places.models.clone().ok_or(StartError::NoStore)?;
        let mut sites = Vec::new();
        let mut remote = Vec::new();
        for (name, aggregate) in &wanted.sites {
            let here = name == &self.node_name;
            let local = match (here, aggregate) {
                (true, false) => running
                    .sites
                    .get(&expert.name)
                    .map(|s| Site::Trainer(s.actor.clone())),
                (true, true) => running
                    .aggregators
                    .get(&expert.name)
                    .map(|a| Site::Aggregator(a.actor.clone())),
                (false, _) => None,
            };
            let site = match local {
                Some(site) => site,
                None => {
                    let args = RemoteSiteArgs {
                        site: name.clone(),
                        addr: members
                            .get(name)
                            .map(|m| m.card.grpc.clone())
                            .unwrap_or_default(),
                        membership: Some(self.membership.clone()),
                        federation: expert.name.clone(),
                        aggregate: *aggregate,
                        dialer: self.dialer.clone(),
                    };
                    let spawned = Actor::spawn(None, RemoteSite, args).await;
                    let actor = match spawned {
                        Ok((actor, _)) => actor,
                        Err(e) => {
                            remote
                                .iter()
                                .for_each(|r: &ActorRef<SiteTrainerMsg>| r.stop(None));
                            return Err(e.into());
                        }
                    };
                    remote.push(actor.clone());
                    Site::Trainer(actor)
                }
            };
            sites.push(FederationSite {
                name: name.clone(),
                site,
            });
        }
        let publication = (level == Level::Top).then(|| Publication {
            store,
            promoter: Some(Arc::new(rollout::MeshPromoter {
                me: self.node_name.clone(),
                places: self.places.clone(),
                dialer: self.dialer.clone(),
                membership: self.membership.clone(),
                links: self.links.clone(),
                state: self.state.clone(),
            }) as Arc<dyn fogmesh_actors::Promoter>),
        });
        let mut plan = federation.plan();
        if let Some(distillation) = &federation.distillation {
            match shared_windows(expert, distillation).await {
                Ok(shared) => plan.distillation = Some(shared),
                Err(e) => {
                    for site in remote {
                        site.stop(None);
                    }
                    return Err(e);
                }
            }
        }
        // A fog aggregator's noise is its own; the federation's figure is the top's.
        let spent = match level {
            Level::Top => {
                let lineage = spent_by_lineage(&stored.manifest);
                match running.spent.get(&expert.name) {
                    Some(known) if known.rho > lineage.rho => *known,
                    _ => lineage,
                }
            }
            Level::Group => PrivacySpent::default(),
        };
        let args = FederatedCoordinatorArgs {
            federation: expert.name.clone(),
            base: stored.manifest.clone(),
            weights: stored.weights.to_vec(),
            sites,
            plan,
            publication,
            spent,
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
        let schedule = federation
            .every_s
            .filter(|_| level == Level::Top)
            .map(|every| {
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
                sites: wanted.sites.clone(),
            },
            actor,
            remote,
            schedule,
            // Drifts before the coordinator started were answered, or not, by its
            // predecessor.
            drifts: drifts_of(members, &expert.name),
        })
    }
}

/// A coordinator's status if it answers at once (it is between rounds).
async fn status(actor: &ActorRef<FederatedCoordinatorMsg>) -> Option<FederationStatus> {
    match actor
        .call(
            |reply| FederatedCoordinatorMsg::Status { reply },
            Some(IDLE_PROBE),
        )
        .await
    {
        Ok(CallResult::Success(status)) => Some(status),
        _ => None,
    }
}

/// One round, logged.
async fn one_round(actor: ActorRef<FederatedCoordinatorMsg>, expert: String) -> bool {
    match actor
        .call(|reply| FederatedCoordinatorMsg::Round { reply }, None)
        .await
    {
        Ok(CallResult::Success(Ok(round))) => {
            tracing::info!(%expert, round = round.round, version = ?round.version, sites = ?round.sites, "federated round");
            true
        }
        Ok(CallResult::Success(Err(e))) => {
            tracing::warn!(%expert, error = %e, "federated round applied nothing");
            true
        }
        _ => false,
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
        if !one_round(actor.clone(), expert.clone()).await {
            return;
        }
    }
}

/// A distillation's shared windows, read from this node's disk (the coordinator's).
async fn shared_windows(
    expert: &ExpertSpec,
    distillation: &DistillationSpec,
) -> Result<Distillation, StartError> {
    let input = architecture(expert)
        .ok_or(StartError::NotStored)?
        .input_shape();
    let path = distillation.shared.clone();
    let shared = tokio::task::spawn_blocking(move || read_shared(&path, input))
        .await
        .map_err(StartError::Thread)??;
    Ok(Distillation {
        shared: Arc::new(shared),
        weight: distillation.weight,
    })
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
    #[error("distillation: {0}")]
    Distillation(#[from] fogmesh_models::ModelError),
    #[error("the thread reading the shared windows stopped: {0}")]
    Thread(#[source] tokio::task::JoinError),
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
            zone: String::new(),
        }
    }

    #[test]
    fn a_round_follows_a_rise_in_the_mesh_drift_count_only() {
        let member = |name: &str, drifts: u64| {
            let card = crate::membership::MemberCard {
                role: "edge".into(),
                grpc: String::new(),
                cores: 1,
                memory_bytes: 0,
                gpus: Vec::new(),
                up_since_us: 0,
                zone: String::new(),
                conduits: Vec::new(),
                segmented: false,
            };
            let member = Member {
                name: name.into(),
                card,
                load: Default::default(),
                spec: None,
                placement: None,
                serving: Vec::new(),
                versions: BTreeMap::new(),
                drifts: [("ae".to_string(), drifts), ("other".to_string(), 9)].into(),
                links: Default::default(),
                privacy: Default::default(),
            };
            (name.to_string(), member)
        };
        let members: BTreeMap<_, _> = [member("edge-1", 2), member("edge-2", 1)].into();
        assert_eq!(drifts_of(&members, "ae"), 3);
        let mut seen = 3;
        assert!(!drifted(&mut seen, 3), "nothing new");
        assert!(drifted(&mut seen, 4), "a learner drifted");
        assert!(!drifted(&mut seen, 1), "a learner restarted: no drift");
        assert!(drifted(&mut seen, 2));
        assert_eq!(seen, 2);
    }

    #[test]
    fn zones_name_sites_and_fog_groups_by_place() {
        let federation: FederationSpec = toml::from_str(
            "zones = [\"site-1/*\", \"site-2/area-1\"]\n\n[[groups]]\naggregator = \"server-1\"\nsites = [\"gw-3\"]\n\n[[groups]]\naggregator = \"server-3\"\nzone = \"site-1/area-1\"\n\n[[groups]]\naggregator = \"server-2\"\nzone = \"site-1\"\n\n[[groups]]\naggregator = \"server-9\"\nzone = \"site-9\"\n",
        )
        .unwrap();
        federation.validate().unwrap();
        let spec = MeshSpec::parse("", std::path::Path::new("mesh.toml")).unwrap();
        let zones: BTreeMap<String, String> = [
            ("gw-1", "site-1/area-1/cell-1"),
            ("gw-2", "site-1/area-2"),
            ("gw-3", "site-1/area-1"),
            ("gw-4", "site-2/area-1"),
            ("gw-5", "site-2/area-2"),
            ("server-1", "site-1"),
        ]
        .into_iter()
        .map(|(n, z)| (n.to_string(), z.to_string()))
        .collect();
        let members: BTreeMap<String, Member> = zones
            .keys()
            .filter(|n| *n != "gw-1")
            .map(|n| crate::deployment::view::tests::member(n, &[]))
            .collect();
        // This node (gw-1) is no member of its own view; its zone still counts.
        let sites = sites_of(&spec, "ae", &federation, &members, "gw-1", "edge", &zones);
        let names =
            |list: &[&str]| -> BTreeSet<String> { list.iter().map(|s| s.to_string()).collect() };
        // `site-1/*` is inside site-1 (not server-1 at site-1 itself); gw-5 in no pattern.
        assert_eq!(sites, names(&["gw-1", "gw-2", "gw-3", "gw-4"]));
        let groups = group_sites(&federation, &sites, &zones);
        let asks = group_asks(&federation, &groups);
        assert_eq!(
            groups,
            vec![
                names(&["gw-3"]),
                names(&["gw-1"]),
                names(&["gw-2"]),
                names(&[]),
            ],
            "named first, then the deepest zone that matches; an empty zone, no sites"
        );
        assert_eq!(
            top_sites(&federation, &sites, &groups, &asks),
            [
                ("gw-4".to_string(), false),
                ("server-1".to_string(), true),
                ("server-2".to_string(), true),
                ("server-3".to_string(), true),
            ]
            .into(),
            "the ungrouped site and the aggregators of groups with sites"
        );
    }

    #[test]
    fn groups_within_groups_follow_the_plant_down_and_empty_branches_are_left_out() {
        let federation: FederationSpec = toml::from_str(
            "[[groups]]\naggregator = \"area-gw\"\nsites = [\"server-1\"]\n\n[[groups]]\naggregator = \"cell-gw-1\"\nzone = \"a/cell-1\"\nwithin = \"area-gw\"\n\n[[groups]]\naggregator = \"cell-gw-2\"\nzone = \"a/cell-2\"\nwithin = \"area-gw\"\n\n[[groups]]\naggregator = \"site-gw\"\nzone = \"b\"\n\n[[groups]]\naggregator = \"b-cell-gw\"\nzone = \"b/cell-9\"\nwithin = \"site-gw\"\n",
        )
        .unwrap();
        federation.validate().unwrap();
        let zones: BTreeMap<String, String> = [
            ("gw-1", "a/cell-1"),
            ("gw-2", "a/cell-1"),
            ("gw-3", "a/cell-2"),
            ("gw-9", "b/cell-9"),
        ]
        .into_iter()
        .map(|(n, z)| (n.to_string(), z.to_string()))
        .collect();
        let names =
            |list: &[&str]| -> BTreeSet<String> { list.iter().map(|s| s.to_string()).collect() };
        let refs = |list: &[(&str, bool)]| -> BTreeSet<SiteRef> {
            list.iter().map(|(s, a)| (s.to_string(), *a)).collect()
        };
        let sites = names(&["server-1", "gw-1", "gw-2", "gw-3", "edge-0"]);
        let grouped = group_sites(&federation, &sites, &zones);
        let asks = group_asks(&federation, &grouped);
        assert_eq!(
            asks,
            vec![
                Some(refs(&[
                    ("server-1", false),
                    ("cell-gw-1", true),
                    ("cell-gw-2", true)
                ])),
                Some(refs(&[("gw-1", false), ("gw-2", false)])),
                Some(refs(&[("gw-3", false)])),
                None,
                None,
            ],
            "three levels under area-gw; nothing at or below site-gw (gw-9 is no site)"
        );
        assert_eq!(
            top_sites(&federation, &sites, &grouped, &asks),
            refs(&[("edge-0", false), ("area-gw", true)])
        );
        // A site at the bottom makes the branch above it live (server-1, which a group
        // names, is a site whatever else is).
        let sites = names(&["server-1", "gw-9"]);
        let grouped = group_sites(&federation, &sites, &zones);
        let asks = group_asks(&federation, &grouped);
        assert_eq!(asks[3], Some(refs(&[("b-cell-gw", true)])));
        assert_eq!(asks[4], Some(refs(&[("gw-9", false)])));
        assert_eq!(
            top_sites(&federation, &sites, &grouped, &asks),
            refs(&[("area-gw", true), ("site-gw", true)])
        );
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

    #[test]
    fn the_most_spent_record_wins_and_a_lineage_carries_its_own() {
        let spent = |rounds, rho| PrivacySpent { rounds, rho };
        let mut known = BTreeMap::new();
        hear_spent(&mut known, "ae", spent(3, 1.5));
        hear_spent(&mut known, "ae", spent(2, 1.0));
        hear_spent(&mut known, "pump", spent(1, 0.5));
        assert_eq!(known["ae"], spent(3, 1.5));
        hear_spent(&mut known, "ae", spent(4, 2.0));
        assert_eq!(known["ae"], spent(4, 2.0));
        assert_eq!(known["pump"], spent(1, 0.5));

        let mut version =
            Architecture::ConvAutoencoder(fogmesh_models::autoencoder::AutoencoderConfig::w1(2, 8))
                .manifest("ae", "3");
        assert_eq!(spent_by_lineage(&version), PrivacySpent::default());
        version.training = serde_json::json!({
            "federated": {"round": 2, "epsilon": 40.1, "privacy_spent": {"rounds": 2, "rho": 1.0}}
        });
        assert_eq!(spent_by_lineage(&version), spent(2, 1.0));
    }
}
