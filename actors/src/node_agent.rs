//! `NodeAgent`: the per-node supervisor, and [`Node`], the handle a process holds on
//! a running node.
//!
//! **Owns** the node's spec (what to restart an actor from), the restart history, and
//! the [`NodeDirectory`]. **Takes** no work of its own: it starts the experts, then the
//! routers, then the sensor streams (so no window is cut before something can score
//! it), and reacts to supervision events. **Supervised by** nobody on this node: when
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
use crate::expert::{Expert, ExpertArgs, ExpertShared, ExpertSpec};
use crate::router::{Router, RouterArgs, RouterMsg, RouterShared, RouterSpec, RoutingPolicy};
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
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub node: String,
    pub sensors: Vec<SensorStreamSpec>,
    pub routers: Vec<RouterSpec>,
    pub experts: Vec<ExpertSpec>,
    pub restart: RestartPolicy,
}

impl NodeSpec {
    /// Checks each part, then that the parts fit: unique names, references that
    /// resolve, and windows the shape of every expert they can be routed to.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut experts = HashMap::new();
        for expert in &self.experts {
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
                let (channels, window) = (
                    expert.config.channels as usize,
                    expert.config.window as usize,
                );
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

/// Which spec a running child was started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Child {
    Expert(usize),
    Router(usize),
    Sensor(usize),
}

pub struct NodeAgent;

pub struct NodeAgentArgs {
    pub spec: NodeSpec,
    pub directory: Arc<NodeDirectory>,
    pub annunciator: Annunciator,
    pub restarts: Arc<AtomicU64>,
}

pub struct NodeAgentState {
    spec: NodeSpec,
    directory: Arc<NodeDirectory>,
    annunciator: Annunciator,
    children: HashMap<ActorId, Child>,
    history: HashMap<Child, VecDeque<Instant>>,
    expert_shared: Vec<Arc<ExpertShared>>,
    router_shared: Vec<Arc<RouterShared>>,
    sensor_shared: Vec<Arc<SensorStreamShared>>,
    restarts: Arc<AtomicU64>,
}

/// The agent takes no messages; it acts on supervision events only.
pub enum NodeAgentMsg {}

impl Actor for NodeAgent {
    type Msg = NodeAgentMsg;
    type State = NodeAgentState;
    type Arguments = NodeAgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: NodeAgentArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let spec = args.spec;
        let mut state = NodeAgentState {
            expert_shared: spec.experts.iter().map(ExpertShared::for_spec).collect(),
            router_shared: spec.routers.iter().map(RouterShared::for_spec).collect(),
            sensor_shared: spec
                .sensors
                .iter()
                .map(SensorStreamShared::for_spec)
                .collect(),
            spec,
            directory: args.directory,
            annunciator: args.annunciator,
            children: HashMap::new(),
            history: HashMap::new(),
            restarts: args.restarts,
        };
        let supervisor = myself.get_cell();
        for i in 0..state.spec.experts.len() {
            state.start(Child::Expert(i), &supervisor).await?;
        }
        for i in 0..state.spec.routers.len() {
            state.start(Child::Router(i), &supervisor).await?;
        }
        for i in 0..state.spec.sensors.len() {
            state.start(Child::Sensor(i), &supervisor).await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {}
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
        let name = state.name(child);
        let history = state.history.entry(child).or_default();
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
        state.start(child, &myself.get_cell()).await
    }
}

impl NodeAgentState {
    fn name(&self, child: Child) -> String {
        match child {
            Child::Expert(i) => self.spec.experts[i].name.clone(),
            Child::Router(i) => self.spec.routers[i].name.clone(),
            Child::Sensor(i) => self.spec.sensors[i].id.clone(),
        }
    }

    async fn start(
        &mut self,
        child: Child,
        supervisor: &ActorCell,
    ) -> Result<(), ActorProcessingErr> {
        let id = match child {
            Child::Expert(i) => {
                let spec = self.spec.experts[i].clone();
                let shared = self.expert_shared[i].clone();
                let name = spec.name.clone();
                let (actor, _) = Actor::spawn_linked(
                    None,
                    Expert,
                    ExpertArgs {
                        spec,
                        shared: shared.clone(),
                    },
                    supervisor.clone(),
                )
                .await
                .map_err(|e| spawn_failure(&name, e))?;
                let id = actor.get_id();
                self.directory
                    .experts
                    .insert(name, ExpertHandle { actor, shared });
                id
            }
            Child::Router(i) => {
                let spec = self.spec.routers[i].clone();
                let shared = self.router_shared[i].clone();
                let name = spec.name.clone();
                let args = RouterArgs {
                    spec,
                    shared: shared.clone(),
                    directory: self.directory.clone(),
                    annunciator: self.annunciator.clone(),
                };
                let (actor, _) = Actor::spawn_linked(None, Router, args, supervisor.clone())
                    .await
                    .map_err(|e| spawn_failure(&name, e))?;
                let id = actor.get_id();
                self.directory
                    .routers
                    .insert(name, RouterHandle { actor, shared });
                id
            }
            Child::Sensor(i) => {
                let spec = self.spec.sensors[i].clone();
                let shared = self.sensor_shared[i].clone();
                let name = spec.id.clone();
                let args = SensorStreamArgs {
                    spec,
                    shared: shared.clone(),
                    directory: self.directory.clone(),
                };
                let (actor, _) = Actor::spawn_linked(None, SensorStream, args, supervisor.clone())
                    .await
                    .map_err(|e| spawn_failure(&name, e))?;
                let id = actor.get_id();
                self.directory
                    .sensors
                    .insert(name, SensorHandle { actor, shared });
                id
            }
        };
        self.children.insert(id, child);
        Ok(())
    }
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
    pub model: &'static str,
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
        let restarts = Arc::new(AtomicU64::new(0));
        let name = spec.node.clone();
        let args = NodeAgentArgs {
            spec,
            directory: directory.clone(),
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
                    model: "conv_autoencoder",
                    version: x.model_version.to_string(),
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
