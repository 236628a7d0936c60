//! [`Node`]: the handle a process holds on a running node, and the API callers use on
//! it. It starts the node's agent ([`Node::start`]), pushes readings to sensor streams,
//! scores windows through routers, asks the agent to swap an expert or reconcile to a
//! new spec, and reads the node's state for `status` without a message ([`NodeSnapshot`]).
//! Every call waits at most [`CALL_TIMEOUT`]: a stopped or stuck actor comes back as the
//! caller's own error, never as a hang.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorRef};

use super::agent::{spawn_failure, NodeAgent, NodeAgentArgs, NodeAgentMsg, ReconcileReport};
use super::call::ask;
use super::spec::NodeSpec;

use crate::annunciator::{Annunciator, ScoredWindow};
use crate::directory::NodeDirectory;
use crate::error::{IngestError, ModelFault, ScoreError, SpawnFault, SpecError};
use crate::expert::ExpertSpec;
use crate::router::{Replicas, RetryPolicy, RouterMsg};
use crate::sample::{Sample, Window};
use crate::sensor_stream::{EdgeStorage, PushOutcome, SensorStreamMsg};

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
    /// Windows in the edge log's outbox: cut and not scored yet (0 without a log).
    pub parked: u64,
    /// Windows dropped unscored since the log opened: the outbox full under
    /// `drop_oldest`, or older than its `max_age`.
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouterSnapshot {
    pub name: String,
    pub policy: &'static str,
    pub routed: u64,
    pub failed: u64,
    pub in_flight: usize,
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
    /// The edge log its streams keep their samples and outboxes in, if any.
    pub storage: Option<EdgeStorage>,
}

impl Node {
    /// Validates the spec and starts the node, its streams in memory only; returns once
    /// every actor is running.
    pub async fn start(
        spec: NodeSpec,
        annunciator: Annunciator,
    ) -> Result<(Node, tokio::task::JoinHandle<()>), SpecError> {
        Node::start_with_log(spec, annunciator, None).await
    }

    /// [`Node::start`] with an edge log: every stream resumes from it, acknowledges a
    /// batch only once the log has committed it, and keeps the windows no expert can
    /// score yet in the log's outbox, within `storage.limits`.
    pub async fn start_with_log(
        spec: NodeSpec,
        annunciator: Annunciator,
        storage: Option<EdgeStorage>,
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
            storage: storage.clone(),
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
                storage,
            },
            join,
        ))
    }

    /// Hands a batch from a source on the node (a replay) to its sensor stream and
    /// waits for the acknowledgement; no rate budget applies, and while the stream's
    /// router holds [`MAX_WINDOWS_IN_FLIGHT`](crate::MAX_WINDOWS_IN_FLIGHT) windows the batch waits for room.
    pub async fn push(
        &self,
        sensor_id: &str,
        samples: Vec<Sample>,
    ) -> Result<PushOutcome, IngestError> {
        self.push_checked(sensor_id, samples, false).await
    }

    /// [`Node::push`] for samples from a producer outside the node (gRPC, MQTT): they
    /// are charged to the stream's rate budget first (`max_rate`), and refused whole,
    /// before the stream sees them, once it is spent or while the stream's router holds
    /// [`MAX_WINDOWS_IN_FLIGHT`](crate::MAX_WINDOWS_IN_FLIGHT) windows ([`IngestError::RouterBusy`]): the producer
    /// keeps what it sent and sends it again.
    pub async fn ingest(
        &self,
        sensor_id: &str,
        samples: Vec<Sample>,
    ) -> Result<PushOutcome, IngestError> {
        self.push_checked(sensor_id, samples, true).await
    }

    async fn push_checked(
        &self,
        sensor_id: &str,
        samples: Vec<Sample>,
        limited: bool,
    ) -> Result<PushOutcome, IngestError> {
        let handle =
            self.directory
                .sensor(sensor_id)
                .ok_or_else(|| IngestError::UnknownSensor {
                    sensor_id: sensor_id.to_string(),
                })?;
        if limited {
            handle.shared.admit(samples.len() as u64)?;
        }
        // With a log a full router holds no producer up: the windows wait in the outbox.
        let router = match &self.storage {
            Some(_) => None,
            None => self.directory.router(&handle.shared.router),
        };
        if let Some(router) = router {
            if !limited {
                router.shared.room().await;
            } else if router.shared.is_full() {
                return Err(IngestError::RouterBusy {
                    sensor_id: sensor_id.to_string(),
                    router: router.shared.name.to_string(),
                    in_flight: router.shared.in_flight(),
                });
            }
        }
        ask(
            &handle.actor,
            |reply| SensorStreamMsg::Push { samples, reply },
            ("acknowledgement", "stream"),
            |source| IngestError::StreamUnavailable {
                sensor_id: sensor_id.to_string(),
                source,
            },
        )
        .await
    }

    /// Scores a window through a router and returns the verdict; refused with
    /// [`ScoreError::RouterBusy`] while the router holds [`MAX_WINDOWS_IN_FLIGHT`](crate::MAX_WINDOWS_IN_FLIGHT).
    pub async fn score(&self, router: &str, window: Window) -> Result<ScoredWindow, ScoreError> {
        let handle = self
            .directory
            .router(router)
            .ok_or_else(|| ScoreError::UnknownRouter {
                router: router.to_string(),
            })?;
        if handle.shared.is_full() {
            return Err(ScoreError::RouterBusy {
                router: router.to_string(),
                in_flight: handle.shared.in_flight(),
            });
        }
        ask(
            &handle.actor,
            |reply| RouterMsg::Score { window, reply },
            ("verdict", "router"),
            |source| ScoreError::RouterUnavailable {
                router: router.to_string(),
                source,
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
            |unanswered| SpecError::Model {
                name: name.clone(),
                source: ModelFault::Unanswered(unanswered),
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
            |unanswered| SpecError::Spawn {
                name: name.clone(),
                source: SpawnFault::Unanswered(unanswered),
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
                let outbox = self
                    .storage
                    .as_ref()
                    .map(|storage| storage.log.outbox(&s.id))
                    .unwrap_or_default();
                SensorSnapshot {
                    id: s.id.to_string(),
                    channels: s.channels,
                    accepted: s.accepted.load(Ordering::Relaxed),
                    rejected: s.rejected.load(Ordering::Relaxed),
                    duplicates: s.duplicates.load(Ordering::Relaxed),
                    windows: s.windows.load(Ordering::Relaxed),
                    acked_through: s.acked_through(),
                    parked: outbox.windows,
                    dropped: outbox.dropped,
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
                    in_flight: r.in_flight(),
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
