//! What the rest of the node sees of a router: its spec ([`RouterSpec`], the
//! [`RoutingPolicy`]), its observable state and bound on windows in flight
//! ([`RouterShared`]) and its messages ([`RouterMsg`]). Apart from the actor so that the
//! [`crate::directory::NodeDirectory`], which holds routers' handles, depends on this
//! and not on the actor, which itself looks experts up in the directory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use fogmesh_models::SoftmaxGate;
use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};

use crate::annunciator::ScoredWindow;
use crate::error::{ScoreError, SpecError};
use crate::sample::Window;

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
    /// Experts a window is scored without when no replica of theirs answers (none on
    /// this node, none linked, no relay through a gateway gets through): a zone cut
    /// off from the cloud keeps scoring on its own experts, their weights
    /// renormalised. A window none of whose experts answers still fails.
    pub optional: Vec<String>,
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
        let experts = self.policy.experts();
        if let Some(unknown) = self
            .optional
            .iter()
            .find(|e| !experts.contains(&e.as_str()))
        {
            return Err(invalid(
                "optional",
                unknown.clone(),
                "names an expert this router never sends to".into(),
            ));
        }
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

/// Windows one router may hold between taking them and delivering their verdicts.
/// Beyond it, producers outside the node are refused (`RESOURCE_EXHAUSTED`) and
/// producers inside it (replays) wait, so a router whose experts fall behind holds a
/// bounded set of windows and gathering tasks instead of a growing one. W1 keeps 256 in
/// flight; the limit leaves room for bursts of a whole plant's sensors.
pub const MAX_WINDOWS_IN_FLIGHT: usize = 4096;

/// The router's observable state.
#[derive(Debug)]
pub struct RouterShared {
    pub name: Arc<str>,
    pub policy: &'static str,
    pub routed: AtomicU64,
    pub failed: AtomicU64,
    /// Windows taken and not yet delivered (see [`MAX_WINDOWS_IN_FLIGHT`]).
    in_flight: AtomicUsize,
    /// Woken whenever a verdict leaves, for producers waiting for room.
    room: tokio::sync::Notify,
}

impl RouterShared {
    pub fn for_spec(spec: &RouterSpec) -> Arc<Self> {
        Arc::new(RouterShared {
            name: spec.name.as_str().into(),
            policy: spec.policy.name(),
            routed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            room: tokio::sync::Notify::new(),
        })
    }

    /// Windows taken and not yet delivered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether the router holds [`MAX_WINDOWS_IN_FLIGHT`] windows already.
    pub fn is_full(&self) -> bool {
        self.in_flight() >= MAX_WINDOWS_IN_FLIGHT
    }

    /// Resolves once the router has room for more windows.
    pub async fn room(&self) {
        loop {
            let notified = self.room.notified();
            if !self.is_full() {
                return;
            }
            notified.await;
        }
    }

    pub(super) fn enter(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    pub(super) fn leave(&self) {
        // Saturating: a window counted before a restart may be delivered after it.
        let before = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        // Only a full router has producers waiting.
        if before.is_ok_and(|n| n >= MAX_WINDOWS_IN_FLIGHT) {
            self.room.notify_waiters();
        }
    }
}

pub enum RouterMsg {
    /// A window whose verdict goes back to the caller.
    Score {
        window: Window,
        reply: RpcReplyPort<Result<ScoredWindow, ScoreError>>,
    },
}

// Local only: it carries reply ports and shared buffers that cannot cross a node.
impl ractor::Message for RouterMsg {}
