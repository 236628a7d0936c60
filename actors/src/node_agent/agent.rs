//! `NodeAgent`: the per-node supervisor.
//!
//! **Owns** the node's spec (what to restart an actor from), the restart history, and
//! the [`NodeDirectory`]. **Takes** [`NodeAgentMsg::Reconcile`] (run a new spec: the
//! mesh's deployment loop sends it when this node's share changes) and
//! [`NodeAgentMsg::Swap`] (hot-swap one expert's version without a restart); a reconcile
//! whose only change to an expert is its model hot-swaps it too. Otherwise it starts
//! the experts (each with its remotable [`crate::ExpertEndpoint`]), then the routers,
//! then the sensor streams (so no window is cut before something can score it), and
//! reacts to supervision events. **Supervised by** nobody on this node: when
//! it gives up, the process that started it sees the node stop and exits with the
//! reason. **On failure**: a spec that does not validate changes nothing; a child that
//! does not start ends the reconcile with the child's own [`SpecError`]; a swap the
//! expert refuses leaves it serving its version and answers why.
//!
//! Restart strategy (ractor has none built in): one-for-one. A child that fails or
//! stops unexpectedly is started again from its spec and replaces its directory entry.
//! More than `max_restarts` restarts of one child within `restart_window` means the
//! fault is not transient: the agent stops, taking the node down, instead of spinning.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};

use super::call::call;
use super::spec::NodeSpec;

use crate::annunciator::Annunciator;
use crate::directory::{ExpertHandle, NodeDirectory, RouterHandle, SensorHandle};
use crate::error::{ModelFault, SpawnFault, SpecError};
use crate::expert::{Expert, ExpertArgs, ExpertMsg, ExpertShared, ExpertSpec};
use crate::expert_endpoint::{ExpertEndpoint, ExpertEndpointArgs};
use crate::router::{Replicas, Router, RouterArgs, RouterShared, RouterSpec};
use crate::sensor_stream::{
    EdgeStorage, SensorStream, SensorStreamArgs, SensorStreamShared, SensorStreamSpec,
};
use crate::telemetry;

/// A running child, by what it is and the name it has in the spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Child {
    Expert(String),
    Endpoint(String),
    Router(String),
    Sensor(String),
}

impl Child {
    fn name(&self) -> String {
        match self {
            Child::Expert(n) | Child::Router(n) | Child::Sensor(n) => n.clone(),
            Child::Endpoint(n) => format!("{n} (endpoint)"),
        }
    }
}

pub struct NodeAgent;

pub struct NodeAgentArgs {
    pub spec: NodeSpec,
    pub directory: Arc<NodeDirectory>,
    pub replicas: Arc<Replicas>,
    pub annunciator: Annunciator,
    pub restarts: Arc<AtomicU64>,
    /// The node's edge log and outbox limits, handed to every sensor stream; `None`
    /// keeps them in memory.
    pub storage: Option<EdgeStorage>,
}

pub struct NodeAgentState {
    spec: NodeSpec,
    directory: Arc<NodeDirectory>,
    replicas: Arc<Replicas>,
    annunciator: Annunciator,
    children: HashMap<ActorId, Child>,
    /// The other way round, to stop a child the spec no longer has.
    cells: HashMap<Child, ActorCell>,
    history: HashMap<Child, VecDeque<Instant>>,
    expert_shared: HashMap<String, Arc<ExpertShared>>,
    router_shared: HashMap<String, Arc<RouterShared>>,
    sensor_shared: HashMap<String, Arc<SensorStreamShared>>,
    storage: Option<EdgeStorage>,
    restarts: Arc<AtomicU64>,
}

/// What a reconcile changed, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReconcileReport {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    pub restarted: Vec<String>,
    /// Experts whose spec changed only in its model, hot-swapped without a restart.
    pub swapped: Vec<String>,
    /// Model-only changes the expert refused (the candidate did not load or does not
    /// fit): each keeps serving, and the agent keeps, its previous spec.
    pub refused: Vec<(String, SpecError)>,
}

impl ReconcileReport {
    pub fn is_empty(&self) -> bool {
        self.started.is_empty()
            && self.stopped.is_empty()
            && self.restarted.is_empty()
            && self.swapped.is_empty()
            && self.refused.is_empty()
    }
}

pub enum NodeAgentMsg {
    /// Makes the node run `spec`: starts what is new, stops what is gone, restarts
    /// what changed, and leaves the rest running untouched. A spec that does not
    /// validate changes nothing.
    Reconcile {
        spec: Box<NodeSpec>,
        reply: RpcReplyPort<Result<ReconcileReport, SpecError>>,
    },
    /// Hot-swaps the running expert `spec.name` to `spec`'s model (see
    /// [`crate::Expert`]) and, once it serves, records `spec` as the one to restart the
    /// expert from. Answered with the version now serving.
    Swap {
        spec: Box<ExpertSpec>,
        reply: RpcReplyPort<Result<Arc<str>, SpecError>>,
    },
}

impl ractor::Message for NodeAgentMsg {}

/// Longest a stopping node waits for its actors (an expert finishing its batch).
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Actor for NodeAgent {
    type Msg = NodeAgentMsg;
    type State = NodeAgentState;
    type Arguments = NodeAgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: NodeAgentArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = NodeAgentState {
            spec: NodeSpec {
                node: args.spec.node.clone(),
                sensors: Vec::new(),
                routers: Vec::new(),
                experts: Vec::new(),
                remote_experts: Vec::new(),
                restart: args.spec.restart,
            },
            directory: args.directory,
            replicas: args.replicas,
            annunciator: args.annunciator,
            children: HashMap::new(),
            cells: HashMap::new(),
            history: HashMap::new(),
            expert_shared: HashMap::new(),
            router_shared: HashMap::new(),
            sensor_shared: HashMap::new(),
            storage: args.storage,
            restarts: args.restarts,
        };
        state.reconcile(args.spec, &myself.get_cell()).await?;
        Ok(state)
    }

    /// Stopping the agent stops the node: every actor it supervises is stopped and
    /// waited for (at most [`STOP_WAIT`]), so what they hold (the edge log among it) is
    /// let go by the time [`crate::Node::shutdown`] returns.
    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        myself
            .stop_children_and_wait(Some("node shutting down".into()), Some(STOP_WAIT))
            .await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            NodeAgentMsg::Reconcile { spec, reply } => {
                let outcome = match spec.validate() {
                    Ok(()) => state.reconcile(*spec, &myself.get_cell()).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = &outcome {
                    tracing::warn!(error = %e, "spec not applied");
                }
                let _ = reply.send(outcome);
            }
            NodeAgentMsg::Swap { spec, reply } => {
                let running = state.expert(&spec.name).is_some();
                let outcome = if running {
                    state.swap(*spec).await
                } else {
                    Err(SpecError::UnknownReference {
                        what: "swap",
                        name: spec.model_version.clone(),
                        target_kind: "expert",
                        target: spec.name.clone(),
                    })
                };
                let _ = reply.send(outcome);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, error.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".to_string()))
            }
            _ => return Ok(()),
        };
        let Some(child) = state.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        state.cells.remove(&child);
        let name = child.name();
        let history = state.history.entry(child.clone()).or_default();
        let now = Instant::now();
        history.retain(|t| now.duration_since(*t) < state.spec.restart.restart_window);
        if history.len() >= state.spec.restart.max_restarts {
            tracing::error!(actor = %name, %reason, restarts = history.len(), "restart limit reached; stopping the node");
            return Err(format!(
                "`{name}` failed {} times within {:?} (last: {reason})",
                history.len() + 1,
                state.spec.restart.restart_window
            )
            .into());
        }
        history.push_back(now);
        tracing::warn!(actor = %name, %reason, "actor stopped; restarting it");
        state.restarts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::ACTOR_RESTARTS, "actor" => name).increment(1);
        state.start(child, &myself.get_cell()).await?;
        Ok(())
    }
}

impl NodeAgentState {
    /// Moves from the running spec to `target`. Order matters both ways: experts
    /// start before the routers that use them and routers before the streams that
    /// feed them, so no window is cut before something can score it; streams stop
    /// before their routers for the same reason.
    async fn reconcile(
        &mut self,
        target: NodeSpec,
        supervisor: &ActorCell,
    ) -> Result<ReconcileReport, SpecError> {
        let mut report = ReconcileReport::default();
        let old = std::mem::replace(&mut self.spec, target);
        let changed_sensors = diff(&old.sensors, &self.spec.sensors, |s| &s.id);
        let changed_routers = diff(&old.routers, &self.spec.routers, |r| &r.name);
        let mut changed_experts = diff(&old.experts, &self.spec.experts, |e| &e.name);

        // A change of model only is a hot swap, not a restart: the expert keeps serving
        // and its routers never see it go away. Swaps go first, so a later start that
        // fails cannot leave one half done.
        let swaps: Vec<ExpertSpec> = changed_experts
            .iter()
            .filter(|(_, change)| *change == Change::Changed)
            .filter_map(|(name, _)| {
                let before = old.experts.iter().find(|e| &e.name == name)?;
                let after = self.expert(name)?;
                before.swaps_to(after).then(|| after.clone())
            })
            .collect();
        changed_experts.retain(|(name, _)| swaps.iter().all(|s| &s.name != name));
        for candidate in swaps {
            let name = candidate.name.clone();
            let previous = old
                .experts
                .iter()
                .find(|e| e.name == name)
                .cloned()
                .expect("a swap is a change of an expert the old spec has");
            self.set_expert(previous);
            match self.swap(candidate).await {
                Ok(_) => report.swapped.push(name),
                Err(e) => {
                    tracing::warn!(expert = %name, error = %e, "model change refused; the expert keeps its version");
                    report.refused.push((name, e));
                }
            }
        }

        for (name, change) in &changed_sensors {
            if *change != Change::Added {
                self.stop(Child::Sensor(name.clone()));
                self.directory.sensors.remove(name);
            }
        }
        for (name, change) in &changed_routers {
            if *change != Change::Added {
                self.stop(Child::Router(name.clone()));
                self.directory.routers.remove(name);
            }
        }
        for (name, change) in &changed_experts {
            if *change != Change::Added {
                self.stop(Child::Endpoint(name.clone()));
                self.stop(Child::Expert(name.clone()));
                self.directory.experts.remove(name);
            }
        }

        for (name, change) in changed_experts {
            if change == Change::Removed {
                self.expert_shared.remove(&name);
            } else {
                let spec = self.expert(&name).cloned().expect("diffed from the spec");
                self.expert_shared
                    .insert(name.clone(), ExpertShared::for_spec(&spec));
                self.start(Child::Expert(name.clone()), supervisor).await?;
                self.start(Child::Endpoint(name.clone()), supervisor)
                    .await?;
            }
            report.record(name, change);
        }
        for (name, change) in changed_routers {
            if change == Change::Removed {
                self.router_shared.remove(&name);
            } else {
                let spec = self.router(&name).cloned().expect("diffed from the spec");
                self.router_shared
                    .insert(name.clone(), RouterShared::for_spec(&spec));
                self.start(Child::Router(name.clone()), supervisor).await?;
            }
            report.record(name, change);
        }
        for (name, change) in changed_sensors {
            if change == Change::Removed {
                self.sensor_shared.remove(&name);
            } else {
                let spec = self.sensor(&name).cloned().expect("diffed from the spec");
                self.sensor_shared
                    .insert(name.clone(), SensorStreamShared::for_spec(&spec));
                self.start(Child::Sensor(name.clone()), supervisor).await?;
            }
            report.record(name, change);
        }
        if !report.is_empty() {
            tracing::info!(started = ?report.started, stopped = ?report.stopped, restarted = ?report.restarted, swapped = ?report.swapped, "node spec reconciled");
        }
        Ok(report)
    }

    /// Hot-swaps the running expert `candidate.name` to `candidate`'s model and, once
    /// the expert serves it, records `candidate` as the expert's spec.
    ///
    /// The wait is inside the agent's message on purpose. The spec the agent records is
    /// then always the one the expert serves, with no second message whose place in the
    /// mailbox would decide which version a restart brings back. Supervision events
    /// queue behind the load (seconds at most) and are handled after it; none is lost.
    /// A candidate the expert refuses leaves both the expert and the recorded spec as
    /// they were.
    async fn swap(&mut self, candidate: ExpertSpec) -> Result<Arc<str>, SpecError> {
        let name = candidate.name.clone();
        let expert = self
            .directory
            .expert(&name)
            .ok_or_else(|| SpecError::UnknownReference {
                what: "swap",
                name: candidate.model_version.clone(),
                target_kind: "expert",
                target: name.clone(),
            })?;
        let version = call(
            &expert.actor,
            |reply| ExpertMsg::Swap {
                spec: Box::new(candidate.clone()),
                reply,
            },
            ("swap", "expert"),
        )
        .await
        .map_err(ModelFault::Unanswered)
        .and_then(|answer| answer.map_err(|refused| ModelFault::Refused(Arc::new(refused))))
        .map_err(|source| SpecError::Model { name, source })?;
        self.set_expert(candidate);
        Ok(version)
    }

    /// Replaces the recorded spec of the expert `spec.name`.
    fn set_expert(&mut self, spec: ExpertSpec) {
        if let Some(slot) = self.spec.experts.iter_mut().find(|e| e.name == spec.name) {
            *slot = spec;
        }
    }

    fn expert(&self, name: &str) -> Option<&ExpertSpec> {
        self.spec.experts.iter().find(|e| e.name == name)
    }

    fn router(&self, name: &str) -> Option<&RouterSpec> {
        self.spec.routers.iter().find(|r| r.name == name)
    }

    fn sensor(&self, id: &str) -> Option<&SensorStreamSpec> {
        self.spec.sensors.iter().find(|s| s.id == id)
    }

    /// Stops a child for good: it leaves the books first, so its termination is not
    /// taken for a failure to restart.
    fn stop(&mut self, child: Child) {
        if let Some(cell) = self.cells.remove(&child) {
            self.children.remove(&cell.get_id());
            self.history.remove(&child);
            cell.stop(Some("no longer in the node's spec".into()));
        }
    }

    async fn start(&mut self, child: Child, supervisor: &ActorCell) -> Result<(), SpecError> {
        let name = child.name();
        let cell = match &child {
            Child::Expert(expert) => {
                let spec = self.expert(expert).cloned().ok_or_else(|| gone(&name))?;
                let shared = self.expert_shared[expert].clone();
                let args = ExpertArgs {
                    spec,
                    shared: shared.clone(),
                };
                let (actor, _) = Actor::spawn_linked(None, Expert, args, supervisor.clone())
                    .await
                    .map_err(|e| spawn_failure(&name, e))?;
                let cell = actor.get_cell();
                self.directory
                    .experts
                    .insert(expert.clone(), ExpertHandle { actor, shared });
                cell
            }
            Child::Endpoint(expert) => {
                let args = ExpertEndpointArgs {
                    expert: expert.clone(),
                    directory: self.directory.clone(),
                };
                let (actor, _) =
                    Actor::spawn_linked(None, ExpertEndpoint, args, supervisor.clone())
                        .await
                        .map_err(|e| spawn_failure(&name, e))?;
                actor.get_cell()
            }
            Child::Router(router) => {
                let spec = self.router(router).cloned().ok_or_else(|| gone(&name))?;
                let shared = self.router_shared[router].clone();
                let args = RouterArgs {
                    spec,
                    shared: shared.clone(),
                    replicas: self.replicas.clone(),
                };
                let (actor, _) = Actor::spawn_linked(None, Router, args, supervisor.clone())
                    .await
                    .map_err(|e| spawn_failure(&name, e))?;
                let cell = actor.get_cell();
                self.directory
                    .routers
                    .insert(router.clone(), RouterHandle { actor, shared });
                cell
            }
            Child::Sensor(sensor) => {
                let spec = self.sensor(sensor).cloned().ok_or_else(|| gone(&name))?;
                let shared = self.sensor_shared[sensor].clone();
                let args = SensorStreamArgs {
                    spec,
                    shared: shared.clone(),
                    directory: self.directory.clone(),
                    annunciator: self.annunciator.clone(),
                    storage: self.storage.clone(),
                };
                let (actor, _) = Actor::spawn_linked(None, SensorStream, args, supervisor.clone())
                    .await
                    .map_err(|e| spawn_failure(&name, e))?;
                let cell = actor.get_cell();
                self.directory
                    .sensors
                    .insert(sensor.clone(), SensorHandle { actor, shared });
                cell
            }
        };
        self.children.insert(cell.get_id(), child.clone());
        self.cells.insert(child, cell);
        Ok(())
    }
}

fn gone(name: &str) -> SpecError {
    SpecError::Spawn {
        name: name.to_string(),
        source: SpawnFault::Withdrawn,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Added,
    Removed,
    Changed,
}

impl ReconcileReport {
    fn record(&mut self, name: String, change: Change) {
        match change {
            Change::Added => self.started.push(name),
            Change::Removed => self.stopped.push(name),
            Change::Changed => self.restarted.push(name),
        }
    }
}

/// Names whose spec was added, removed or changed from `old` to `new`, in `new`'s
/// order (removed ones last).
fn diff<T: PartialEq>(old: &[T], new: &[T], name: impl Fn(&T) -> &String) -> Vec<(String, Change)> {
    let before: HashMap<&String, &T> = old.iter().map(|t| (name(t), t)).collect();
    let after: HashSet<&String> = new.iter().map(&name).collect();
    let mut changes: Vec<(String, Change)> = new
        .iter()
        .filter_map(|t| match before.get(name(t)) {
            None => Some((name(t).clone(), Change::Added)),
            Some(previous) if *previous != t => Some((name(t).clone(), Change::Changed)),
            Some(_) => None,
        })
        .collect();
    changes.extend(
        old.iter()
            .filter(|t| !after.contains(name(t)))
            .map(|t| (name(t).clone(), Change::Removed)),
    );
    changes
}

/// Why an actor did not start, without ractor's "panicked during startup" wrapping:
/// a child's own [`SpecError`] passes through the agent unchanged, so the operator reads
/// the expert's reason (say, a weight tensor of the wrong shape) and nothing else.
pub(super) fn spawn_failure(name: &str, error: ractor::SpawnErr) -> SpecError {
    let reason = match error {
        ractor::SpawnErr::StartupFailed(inner) => match inner.downcast::<SpecError>() {
            Ok(spec_error) => return *spec_error,
            Err(inner) => inner.to_string(),
        },
        other => other.to_string(),
    };
    SpecError::Spawn {
        name: name.to_string(),
        source: SpawnFault::Ractor(reason),
    }
}
