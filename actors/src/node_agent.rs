//! `NodeAgent`: the per-node supervisor, and [`Node`], the handle a process holds on
//! a running node.
//!
//! **Owns** the node's spec (what to restart an actor from), the restart history, and
//! the [`NodeDirectory`]. **Takes** [`NodeAgentMsg::Reconcile`] (run a new spec: the
//! mesh's deployment loop sends it when this node's share changes) and
//! [`NodeAgentMsg::Swap`] (hot-swap one expert's version without a restart); otherwise it starts
//! the experts (each with its remotable [`crate::ExpertEndpoint`]), then the routers,
//! then the sensor streams (so no window is cut before something can score it), and
//! reacts to supervision events. **Supervised by** nobody on this node: when
//! it gives up, the process that started it sees the node stop and exits with the
//! reason.
//!
//! Restart strategy (ractor has none built in): one-for-one. A child that fails or
//! stops unexpectedly is started again from its spec and replaces its directory entry.
//! More than `max_restarts` restarts of one child within `restart_window` means the
//! fault is not transient: the agent stops, taking the node down, instead of spinning.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};

use crate::annunciator::Annunciator;
use crate::annunciator::ScoredWindow;
use crate::directory::{ExpertHandle, NodeDirectory, RouterHandle, SensorHandle};
use crate::error::{IngestError, ScoreError, SpecError};
use crate::expert::{Expert, ExpertArgs, ExpertMsg, ExpertShared, ExpertSpec};
use crate::expert_endpoint::{ExpertEndpoint, ExpertEndpointArgs};
use crate::router::{
    Replicas, RetryPolicy, Router, RouterArgs, RouterMsg, RouterShared, RouterSpec, RoutingPolicy,
};
use crate::sample::{Sample, Window};
use crate::sensor_stream::{
    PushOutcome, SensorStream, SensorStreamArgs, SensorStreamMsg, SensorStreamShared,
    SensorStreamSpec,
};
use crate::telemetry;

/// When the agent stops restarting a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub max_restarts: usize,
    pub restart_window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
        }
    }
}

/// Everything one node runs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    pub node: String,
    pub sensors: Vec<SensorStreamSpec>,
    pub routers: Vec<RouterSpec>,
    pub experts: Vec<ExpertSpec>,
    /// Experts this node's routers may use that run on other nodes: known here for
    /// their shape, never started here.
    pub remote_experts: Vec<ExpertSpec>,
    pub restart: RestartPolicy,
}

impl NodeSpec {
    /// Checks each part, then that the parts fit: unique names, references that
    /// resolve, and windows the shape of every expert they can be routed to.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut experts = HashMap::new();
        for expert in self.experts.iter().chain(&self.remote_experts) {
            expert.validate()?;
            if experts.insert(expert.name.as_str(), expert).is_some() {
                return Err(SpecError::Duplicate {
                    what: "expert",
                    name: expert.name.clone(),
                });
            }
        }
        let mut routers = HashMap::new();
        for router in &self.routers {
            router.validate()?;
            if routers.insert(router.name.as_str(), router).is_some() {
                return Err(SpecError::Duplicate {
                    what: "router",
                    name: router.name.clone(),
                });
            }
            for name in router.policy.experts() {
                if !experts.contains_key(name) {
                    return Err(SpecError::UnknownReference {
                        what: "router",
                        name: router.name.clone(),
                        target_kind: "expert",
                        target: name.to_string(),
                    });
                }
            }
        }
        let mut sensors = HashSet::new();
        for sensor in &self.sensors {
            sensor.validate()?;
            if !sensors.insert(sensor.id.as_str()) {
                return Err(SpecError::Duplicate {
                    what: "sensor stream",
                    name: sensor.id.clone(),
                });
            }
            let router =
                routers
                    .get(sensor.router.as_str())
                    .ok_or_else(|| SpecError::UnknownReference {
                        what: "sensor stream",
                        name: sensor.id.clone(),
                        target_kind: "router",
                        target: sensor.router.clone(),
                    })?;
            let reachable: Vec<&str> = match &router.policy {
                RoutingPolicy::Static { routes } => routes
                    .get(&sensor.id)
                    .ok_or_else(|| SpecError::UnknownReference {
                        what: "sensor stream",
                        name: sensor.id.clone(),
                        target_kind: "route in router",
                        target: router.name.clone(),
                    })?
                    .iter()
                    .map(String::as_str)
                    .collect(),
                RoutingPolicy::LearnedGate { experts, .. } => {
                    experts.iter().map(String::as_str).collect()
                }
            };
            for name in reachable {
                let expert = experts[name];
                let (channels, window) = expert.window_shape();
                if (channels, window) != (sensor.channels, sensor.window) {
                    return Err(SpecError::Invalid {
                        what: "sensor stream",
                        name: sensor.id.clone(),
                        field: "window",
                        value: format!("{} channels x {} samples", sensor.channels, sensor.window),
                        reason: format!(
                            "expert `{name}` takes {channels} channels x {window} samples"
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

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
    restarts: Arc<AtomicU64>,
}

/// What a reconcile changed, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    pub restarted: Vec<String>,
}

impl ReconcileReport {
    pub fn is_empty(&self) -> bool {
        self.started.is_empty() && self.stopped.is_empty() && self.restarted.is_empty()
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
    /// [`crate::Expert`]); once it serves, the agent restarts the expert from this spec
    /// if it ever fails. Answered with the version now serving.
    Swap {
        spec: Box<ExpertSpec>,
        reply: RpcReplyPort<Result<Arc<str>, SpecError>>,
    },
    /// The expert serves `spec`'s version now: restart it from this spec.
    Swapped { spec: Box<ExpertSpec> },
}

impl ractor::Message for NodeAgentMsg {}

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
            restarts: args.restarts,
        };
        state.reconcile(args.spec, &myself.get_cell()).await?;
        Ok(state)
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
                let name = spec.name.clone();
                let running = state.spec.experts.iter().any(|e| e.name == name);
                let Some(expert) = state.directory.expert(&name).filter(|_| running) else {
                    let _ = reply.send(Err(SpecError::UnknownReference {
                        what: "swap",
                        name: spec.model_version.clone(),
                        target_kind: "expert",
                        target: name,
                    }));
                    return Ok(());
                };
                // The agent's mailbox does not wait for the load: supervision goes on.
                tokio::spawn(async move {
                    let outcome = ask(
                        &expert.actor,
                        |reply| ExpertMsg::Swap {
                            spec: spec.clone(),
                            reply,
                        },
                        ("swap", "expert"),
                        |reason| reason,
                    )
                    .await;
                    let outcome = match outcome {
                        Ok(version) => {
                            let _ = myself.cast(NodeAgentMsg::Swapped { spec });
                            Ok(version)
                        }
                        Err(reason) => Err(SpecError::Model { name, reason }),
                    };
                    let _ = reply.send(outcome);
                });
            }
            NodeAgentMsg::Swapped { spec } => {
                if let Some(slot) = state.spec.experts.iter_mut().find(|e| e.name == spec.name) {
                    *slot = *spec;
                }
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
        let changed_experts = diff(&old.experts, &self.spec.experts, |e| &e.name);

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
            tracing::info!(started = ?report.started, stopped = ?report.stopped, restarted = ?report.restarted, "node spec reconciled");
        }
        Ok(report)
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
                    annunciator: self.annunciator.clone(),
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
        reason: "no longer in the node's spec".into(),
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

/// Asks an actor and waits at most [`CALL_TIMEOUT`], folding ractor's ways of not
/// answering (timeout, callee stopped, message not delivered) into the callee's own
/// error; `(answer, callee)` name them in the reason, e.g. ("verdict", "router").
async fn ask<M, T, E>(
    actor: &ActorRef<M>,
    message: impl FnOnce(RpcReplyPort<Result<T, E>>) -> M,
    (answer, callee): (&str, &str),
    unavailable: impl Fn(String) -> E,
) -> Result<T, E>
where
    M: ractor::Message,
    T: Send + 'static,
    E: Send + 'static,
{
    match actor.call(message, Some(CALL_TIMEOUT)).await {
        Ok(ractor::rpc::CallResult::Success(result)) => result,
        Ok(ractor::rpc::CallResult::Timeout) => {
            Err(unavailable(format!("no {answer} within {CALL_TIMEOUT:?}")))
        }
        Ok(ractor::rpc::CallResult::SenderError) => Err(unavailable(format!(
            "the {callee} stopped before answering"
        ))),
        Err(e) => Err(unavailable(e.to_string())),
    }
}

/// Why an actor did not start, without ractor's "panicked during startup" wrapping:
/// a child's own [`SpecError`] passes through the agent unchanged, so the operator reads
/// the expert's reason (say, a weight tensor of the wrong shape) and nothing else.
fn spawn_failure(name: &str, error: ractor::SpawnErr) -> SpecError {
    let reason = match error {
        ractor::SpawnErr::StartupFailed(inner) => match inner.downcast::<SpecError>() {
            Ok(spec_error) => return *spec_error,
            Err(inner) => inner.to_string(),
        },
        other => other.to_string(),
    };
    SpecError::Spawn {
        name: name.to_string(),
        reason,
    }
}

/// A point-in-time view of a node for `status` and the `Control` service.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSnapshot {
    pub node: String,
    pub up_since_us: i64,
    pub restarts: u64,
    pub sensors: Vec<SensorSnapshot>,
    pub routers: Vec<RouterSnapshot>,
    pub experts: Vec<ExpertSnapshot>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SensorSnapshot {
    pub id: String,
    pub channels: usize,
    pub accepted: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub windows: u64,
    pub acked_through: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouterSnapshot {
    pub name: String,
    pub policy: &'static str,
    pub routed: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExpertSnapshot {
    pub name: String,
    pub model: String,
    pub version: String,
    pub device: String,
    pub queue: u64,
    pub windows_scored: u64,
    pub batches: u64,
    pub mean_batch_size: f64,
}

/// A running node: its agent, directory and annunciator. Dropping it does not stop
/// the node; call [`Node::shutdown`].
#[derive(Clone)]
pub struct Node {
    pub name: String,
    pub agent: ActorRef<NodeAgentMsg>,
    pub directory: Arc<NodeDirectory>,
    pub annunciator: Annunciator,
    restarts: Arc<AtomicU64>,
    up_since_us: i64,
}

/// How long a caller waits for a sensor stream or router to answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl Node {
    /// Validates the spec and starts the node; returns once every actor is running.
    pub async fn start(
        spec: NodeSpec,
        annunciator: Annunciator,
    ) -> Result<(Node, tokio::task::JoinHandle<()>), SpecError> {
        spec.validate()?;
        let directory = Arc::new(NodeDirectory::default());
        let replicas = Replicas::new(directory.clone(), RetryPolicy::default());
        let restarts = Arc::new(AtomicU64::new(0));
        let name = spec.node.clone();
        let args = NodeAgentArgs {
            spec,
            directory: directory.clone(),
            replicas,
            annunciator: annunciator.clone(),
            restarts: restarts.clone(),
        };
        let (agent, join) = Actor::spawn(None, NodeAgent, args)
            .await
            .map_err(|e| spawn_failure(&name, e))?;
        let up_since_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        Ok((
            Node {
                name,
                agent,
                directory,
                annunciator,
                restarts,
                up_since_us,
            },
            join,
        ))
    }

    /// Hands a batch to its sensor stream and waits for the acknowledgement.
    pub async fn push(
        &self,
        sensor_id: &str,
        samples: Vec<Sample>,
    ) -> Result<PushOutcome, IngestError> {
        let handle =
            self.directory
                .sensor(sensor_id)
                .ok_or_else(|| IngestError::UnknownSensor {
                    sensor_id: sensor_id.to_string(),
                })?;
        ask(
            &handle.actor,
            |reply| SensorStreamMsg::Push { samples, reply },
            ("acknowledgement", "stream"),
            |reason| IngestError::StreamUnavailable {
                sensor_id: sensor_id.to_string(),
                reason,
            },
        )
        .await
    }

    /// Scores a window through a router and returns the verdict.
    pub async fn score(&self, router: &str, window: Window) -> Result<ScoredWindow, ScoreError> {
        let handle = self
            .directory
            .router(router)
            .ok_or_else(|| ScoreError::UnknownRouter {
                router: router.to_string(),
            })?;
        ask(
            &handle.actor,
            |reply| RouterMsg::Score { window, reply },
            ("verdict", "router"),
            |reason| ScoreError::RouterUnavailable {
                router: router.to_string(),
                reason,
            },
        )
        .await
    }

    /// Hot-swaps a running expert to another version (see [`NodeAgentMsg::Swap`]).
    pub async fn swap_expert(&self, spec: ExpertSpec) -> Result<Arc<str>, SpecError> {
        let name = spec.name.clone();
        ask(
            &self.agent,
            |reply| NodeAgentMsg::Swap {
                spec: Box::new(spec),
                reply,
            },
            ("swap", "node agent"),
            |reason| SpecError::Model {
                name: name.clone(),
                reason,
            },
        )
        .await
    }

    /// Makes the node run `spec` (see [`NodeAgentMsg::Reconcile`]).
    pub async fn reconcile(&self, spec: NodeSpec) -> Result<ReconcileReport, SpecError> {
        let name = self.name.clone();
        ask(
            &self.agent,
            |reply| NodeAgentMsg::Reconcile {
                spec: Box::new(spec),
                reply,
            },
            ("report", "node agent"),
            |reason| SpecError::Spawn {
                name: name.clone(),
                reason,
            },
        )
        .await
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> NodeSnapshot {
        let mut sensors: Vec<SensorSnapshot> = self
            .directory
            .sensors
            .iter()
            .map(|e| {
                let s = &e.value().shared;
                SensorSnapshot {
                    id: s.id.to_string(),
                    channels: s.channels,
                    accepted: s.accepted.load(Ordering::Relaxed),
                    rejected: s.rejected.load(Ordering::Relaxed),
                    duplicates: s.duplicates.load(Ordering::Relaxed),
                    windows: s.windows.load(Ordering::Relaxed),
                    acked_through: s.acked_through(),
                }
            })
            .collect();
        sensors.sort_by(|a, b| a.id.cmp(&b.id));
        let mut routers: Vec<RouterSnapshot> = self
            .directory
            .routers
            .iter()
            .map(|e| {
                let r = &e.value().shared;
                RouterSnapshot {
                    name: r.name.to_string(),
                    policy: r.policy,
                    routed: r.routed.load(Ordering::Relaxed),
                    failed: r.failed.load(Ordering::Relaxed),
                }
            })
            .collect();
        routers.sort_by(|a, b| a.name.cmp(&b.name));
        let mut experts: Vec<ExpertSnapshot> = self
            .directory
            .experts
            .iter()
            .map(|e| {
                let x = &e.value().shared;
                ExpertSnapshot {
                    name: x.name.to_string(),
                    model: x.model.to_string(),
                    version: x.model_version().to_string(),
                    device: x.device.clone(),
                    queue: x.queued.load(Ordering::Relaxed),
                    windows_scored: x.windows_scored.load(Ordering::Relaxed),
                    batches: x.batches.load(Ordering::Relaxed),
                    mean_batch_size: x.mean_batch_size(),
                }
            })
            .collect();
        experts.sort_by(|a, b| a.name.cmp(&b.name));
        NodeSnapshot {
            node: self.name.clone(),
            up_since_us: self.up_since_us,
            restarts: self.restarts(),
            sensors,
            routers,
            experts,
        }
    }

    /// Stops the agent and with it every actor of the node, and waits for them.
    pub async fn shutdown(&self, join: tokio::task::JoinHandle<()>) {
        self.agent.stop(Some("node shutting down".into()));
        let _ = join.await;
    }
}
