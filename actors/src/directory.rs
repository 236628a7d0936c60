//! The node's directory: which sensor streams, routers and experts run on this node,
//! by name, with their current actor and observable state.
//!
//! Routers resolve experts and streams resolve routers through it at send time, so
//! when the [`crate::NodeAgent`] restarts an actor it only replaces one entry and every
//! sender reaches the new one from the next message on. The gRPC services look up
//! sensor streams and routers here too. Continual learners are listed here as well, so
//! `status` reads their state without a message. Federation sites and coordinators are
//! listed by the expert they train, so the node's federation service finds them.

use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use ractor::{ActorRef, RpcReplyPort};

use crate::continual_learner::{ContinualLearnerMsg, ContinualLearnerShared};
use crate::error::ScoreError;
use crate::expert::{ExpertMsg, ExpertShared, ExpertVerdict, InferRequest};
use crate::federated::{FederatedCoordinatorMsg, SiteTrainerMsg};
use crate::router::interface::{RouterMsg, RouterShared};
use crate::sensor_stream::interface::{SensorStreamMsg, SensorStreamShared};

#[derive(Clone)]
pub struct SensorHandle {
    pub actor: ActorRef<SensorStreamMsg>,
    pub shared: Arc<SensorStreamShared>,
}

#[derive(Clone)]
pub struct RouterHandle {
    pub actor: ActorRef<RouterMsg>,
    pub shared: Arc<RouterShared>,
}

#[derive(Clone)]
pub struct ExpertHandle {
    pub actor: ActorRef<ExpertMsg>,
    pub shared: Arc<ExpertShared>,
}

impl ExpertHandle {
    /// Casts one window to the expert; `enqueued` starts its batching deadline. A cast
    /// that fails shows up as a closed reply port, which callers treat like an expert
    /// that stopped before answering.
    pub fn infer(
        &self,
        values: Arc<[f32]>,
        enqueued: Instant,
    ) -> tokio::sync::oneshot::Receiver<Result<ExpertVerdict, ScoreError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let request = InferRequest {
            values,
            enqueued,
            reply: RpcReplyPort::from(tx),
        };
        let _ = self.actor.cast(ExpertMsg::Infer(request));
        rx
    }
}

#[derive(Clone)]
pub struct LearnerHandle {
    pub actor: ActorRef<ContinualLearnerMsg>,
    pub shared: Arc<ContinualLearnerShared>,
}

/// Name → running actor, for the kinds of actor a node hosts (learners by the name of
/// their expert).
#[derive(Default)]
pub struct NodeDirectory {
    pub sensors: DashMap<String, SensorHandle>,
    pub routers: DashMap<String, RouterHandle>,
    pub experts: DashMap<String, ExpertHandle>,
    pub learners: DashMap<String, LearnerHandle>,
    pub sites: DashMap<String, ActorRef<SiteTrainerMsg>>,
    pub coordinators: DashMap<String, ActorRef<FederatedCoordinatorMsg>>,
    /// Fog aggregators: coordinators of a group of sites under the top coordinator.
    pub aggregators: DashMap<String, ActorRef<FederatedCoordinatorMsg>>,
}

impl NodeDirectory {
    pub fn sensor(&self, id: &str) -> Option<SensorHandle> {
        self.sensors.get(id).map(|h| h.clone())
    }

    pub fn router(&self, name: &str) -> Option<RouterHandle> {
        self.routers.get(name).map(|h| h.clone())
    }

    pub fn expert(&self, name: &str) -> Option<ExpertHandle> {
        self.experts.get(name).map(|h| h.clone())
    }

    /// The learner of expert `expert`.
    pub fn learner(&self, expert: &str) -> Option<LearnerHandle> {
        self.learners.get(expert).map(|h| h.clone())
    }
}
