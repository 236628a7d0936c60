//! `Router`: mixture-of-experts gating as message dispatch.
//!
//! **Owns** its routing policy and counters. **Takes** [`RouterMsg::Route`] (a window
//! cut by a sensor stream; the verdict goes to the [`Annunciator`]) and
//! [`RouterMsg::Score`] (a window from a caller who wants the verdict back).
//! **Supervised by** the [`crate::NodeAgent`]. **On failure**: a window it cannot
//! score is counted in `fogmesh_router_failures_total` with the reason and logged;
//! the router itself keeps going. It holds no per-window state, so a restart loses
//! only the windows in flight to experts at that moment.
//!
//! Policies:
//! - **static**: a fixed table from sensor stream to experts (by asset or modality);
//!   every listed expert is asked, with equal weight.
//! - **learned gate**: a small softmax gate over window features picks the top-k
//!   experts; their verdicts are combined with the gate's renormalised weights.
//!
//! The verdict of a window: `score = Σ weight_i × score_i / threshold_i`; the window is
//! anomalous when `score >= 1`, i.e. when the weighted experts, each measured against
//! its own calibrated limit, agree it is beyond normal.
//!
//! Experts answer on their own time, so each window's replies are gathered by a
//! short task; the router's mailbox never waits on a forward pass.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fogmesh_models::SoftmaxGate;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::annunciator::{Annunciator, ExpertOpinion, ScoredWindow};
use crate::directory::NodeDirectory;
use crate::error::{ScoreError, SpecError};
use crate::expert::{ExpertMsg, ExpertVerdict, InferRequest};
use crate::sample::Window;
use crate::telemetry;

/// How a router picks experts for a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum RoutingPolicy {
    Static {
        /// Sensor stream id → experts to consult.
        routes: HashMap<String, Vec<String>>,
    },
    LearnedGate {
        /// The gate's output `i` is `experts[i]`.
        experts: Vec<String>,
        top_k: usize,
        gate: SoftmaxGate,
    },
}

impl RoutingPolicy {
    pub fn name(&self) -> &'static str {
        match self {
            RoutingPolicy::Static { .. } => "static",
            RoutingPolicy::LearnedGate { .. } => "learned_gate",
        }
    }

    /// Every expert this policy may send to.
    pub fn experts(&self) -> Vec<&str> {
        match self {
            RoutingPolicy::Static { routes } => {
                routes.values().flatten().map(String::as_str).collect()
            }
            RoutingPolicy::LearnedGate { experts, .. } => {
                experts.iter().map(String::as_str).collect()
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouterSpec {
    pub name: String,
    pub policy: RoutingPolicy,
}

impl RouterSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let invalid = |field: &'static str, value: String, reason: String| SpecError::Invalid {
            what: "router",
            name: self.name.clone(),
            field,
            value,
            reason,
        };
        match &self.policy {
            RoutingPolicy::Static { routes } => {
                if let Some((sensor, _)) = routes.iter().find(|(_, experts)| experts.is_empty()) {
                    return Err(invalid(
                        "routes",
                        sensor.clone(),
                        "a route needs at least one expert".into(),
                    ));
                }
            }
            RoutingPolicy::LearnedGate {
                experts,
                top_k,
                gate,
            } => {
                if gate.experts != experts.len() {
                    return Err(invalid(
                        "experts",
                        experts.len().to_string(),
                        format!("the gate has {} outputs", gate.experts),
                    ));
                }
                if *top_k == 0 || *top_k > experts.len() {
                    return Err(invalid(
                        "top_k",
                        top_k.to_string(),
                        format!("must be between 1 and {}", experts.len()),
                    ));
                }
                gate.validate()
                    .map_err(|e| invalid("gate", String::from("<weights>"), e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// The router's observable state.
#[derive(Debug)]
pub struct RouterShared {
    pub name: Arc<str>,
    pub policy: &'static str,
    pub routed: AtomicU64,
    pub failed: AtomicU64,
}

impl RouterShared {
    pub fn for_spec(spec: &RouterSpec) -> Arc<Self> {
        Arc::new(RouterShared {
            name: spec.name.as_str().into(),
            policy: spec.policy.name(),
            routed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }
}

pub enum RouterMsg {
    /// A window from a sensor stream; its verdict goes to the annunciator.
    Route(Window),
    /// A window whose verdict goes back to the caller (and not to the annunciator).
    Score {
        window: Window,
        reply: RpcReplyPort<Result<ScoredWindow, ScoreError>>,
    },
}

pub struct Router;

pub struct RouterArgs {
    pub spec: RouterSpec,
    pub shared: Arc<RouterShared>,
    pub directory: Arc<NodeDirectory>,
    pub annunciator: Annunciator,
}

pub struct RouterState {
    policy: RoutingPolicy,
    /// Expert names as shared strings, so a verdict does not allocate per expert.
    names: HashMap<String, Arc<str>>,
    shared: Arc<RouterShared>,
    directory: Arc<NodeDirectory>,
    annunciator: Annunciator,
}

/// Where a verdict goes.
enum Destination {
    Annunciator(Annunciator),
    Caller(RpcReplyPort<Result<ScoredWindow, ScoreError>>),
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: RouterArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let names = args
            .spec
            .policy
            .experts()
            .into_iter()
            .map(|n| (n.to_string(), Arc::<str>::from(n)))
            .collect();
        Ok(RouterState {
            policy: args.spec.policy,
            names,
            shared: args.shared,
            directory: args.directory,
            annunciator: args.annunciator,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (window, destination) = match message {
            RouterMsg::Route(window) => {
                (window, Destination::Annunciator(state.annunciator.clone()))
            }
            RouterMsg::Score { window, reply } => (window, Destination::Caller(reply)),
        };
        match state.dispatch(&window) {
            Ok(pending) => {
                let shared = state.shared.clone();
                tokio::spawn(async move {
                    let verdict = gather(&shared, &window, pending).await;
                    deliver(&shared, verdict, destination);
                });
            }
            Err(e) => deliver(&state.shared, Err(e), destination),
        }
        Ok(())
    }
}

/// An expert's reply still on its way.
struct Pending {
    expert: Arc<str>,
    weight: f32,
    reply: tokio::sync::oneshot::Receiver<Result<ExpertVerdict, ScoreError>>,
}

impl RouterState {
    fn targets(&self, window: &Window) -> Result<Vec<(Arc<str>, f32)>, ScoreError> {
        let name = |expert: &String| {
            self.names
                .get(expert)
                .cloned()
                .unwrap_or_else(|| Arc::from(expert.as_str()))
        };
        match &self.policy {
            RoutingPolicy::Static { routes } => {
                let experts =
                    routes
                        .get(&*window.sensor_id)
                        .ok_or_else(|| ScoreError::NoRoute {
                            router: self.shared.name.to_string(),
                            sensor_id: window.sensor_id.to_string(),
                        })?;
                let weight = 1.0 / experts.len() as f32;
                Ok(experts.iter().map(|e| (name(e), weight)).collect())
            }
            RoutingPolicy::LearnedGate {
                experts,
                top_k,
                gate,
            } => {
                let chosen = gate
                    .top_k(&window.values, *top_k)
                    .map_err(|e| ScoreError::Gate {
                        router: self.shared.name.to_string(),
                        reason: e.to_string(),
                    })?;
                Ok(chosen
                    .into_iter()
                    .map(|(i, w)| (name(&experts[i]), w))
                    .collect())
            }
        }
    }

    /// Sends the window to its experts; fails before sending anything if one of them
    /// is missing or takes another shape, so a window is scored whole or not at all.
    fn dispatch(&self, window: &Window) -> Result<Vec<Pending>, ScoreError> {
        let targets = self.targets(window)?;
        let mut handles = Vec::with_capacity(targets.len());
        for (expert, weight) in targets {
            let handle =
                self.directory
                    .expert(&expert)
                    .ok_or_else(|| ScoreError::ExpertUnavailable {
                        expert: expert.to_string(),
                        reason: "not running on this node".into(),
                    })?;
            if handle.shared.window_len != window.values.len() {
                return Err(ScoreError::WrongWindowShape {
                    sensor_id: window.sensor_id.to_string(),
                    expert: expert.to_string(),
                    expected: handle.shared.window_len,
                    got: window.values.len(),
                    channels: window.channels,
                    length: window.length,
                });
            }
            handles.push((expert, weight, handle));
        }
        let enqueued = Instant::now();
        let mut pending = Vec::with_capacity(handles.len());
        for (expert, weight, handle) in handles {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let request = InferRequest {
                values: window.values.clone(),
                enqueued,
                reply: RpcReplyPort::from(tx),
            };
            handle.actor.cast(ExpertMsg::Infer(request)).map_err(|e| {
                ScoreError::ExpertUnavailable {
                    expert: expert.to_string(),
                    reason: e.to_string(),
                }
            })?;
            pending.push(Pending {
                expert,
                weight,
                reply: rx,
            });
        }
        Ok(pending)
    }
}

async fn gather(
    shared: &RouterShared,
    window: &Window,
    pending: Vec<Pending>,
) -> Result<ScoredWindow, ScoreError> {
    let mut experts = Vec::with_capacity(pending.len());
    let mut score = 0.0f32;
    for p in pending {
        let verdict = p.reply.await.map_err(|_| ScoreError::ExpertUnavailable {
            expert: p.expert.to_string(),
            reason: "the expert stopped before answering".into(),
        })??;
        let threshold = verdict.threshold.ok_or_else(|| ScoreError::Uncalibrated {
            expert: p.expert.to_string(),
        })?;
        score += p.weight * verdict.score / threshold;
        experts.push(ExpertOpinion {
            expert: p.expert,
            model_version: verdict.model_version,
            score: verdict.score,
            threshold,
            gate_weight: p.weight,
        });
    }
    Ok(ScoredWindow {
        sensor_id: window.sensor_id.clone(),
        router: shared.name.clone(),
        window_sequence: window.sequence,
        start_us: window.start_us,
        end_us: window.end_us,
        quality: window.quality,
        score,
        anomalous: score >= 1.0,
        experts,
    })
}

fn deliver(
    shared: &RouterShared,
    verdict: Result<ScoredWindow, ScoreError>,
    destination: Destination,
) {
    match &verdict {
        Ok(_) => {
            shared.routed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::WINDOWS_ROUTED, "router" => shared.name.to_string())
                .increment(1);
        }
        Err(e) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::ROUTING_FAILURES, "router" => shared.name.to_string(), "reason" => e.reason())
                .increment(1);
        }
    }
    match (destination, verdict) {
        (Destination::Caller(reply), verdict) => {
            // The caller may have given up (timeout, disconnect); nothing to do then.
            let _ = reply.send(verdict);
        }
        (Destination::Annunciator(annunciator), Ok(scored)) => annunciator.publish(scored),
        (Destination::Annunciator(_), Err(e)) => {
            tracing::warn!(router = %shared.name, error = %e, "window not scored");
        }
    }
}
