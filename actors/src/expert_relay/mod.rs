//! `ExpertRelay`: a gateway's relay that carries windows between the zones it joins.
//!
//! Nodes link only within their zone (`[node] zone`), and a gateway is a node in
//! several (`[node] conduits`), so a router in a cell sees the replicas of its own zone
//! and the gateway's relay, never a replica in the cloud. The relay sees both sides:
//! asked to score a window for an expert, it gets the verdict as a router would (the
//! replica on the gateway first, then the least busy one it links to, then, with hops
//! left, another gateway's relay) and answers with the same encoded verdict an
//! [`crate::ExpertEndpoint`] gives. The replica that scores keeps its cache of recent
//! verdicts, so a router's retry through the relay is not scored twice there, and the
//! router still emits exactly one verdict per window.
//!
//! **Owns** nothing but a [`Replicas`] over its node's directory. **Takes**
//! [`ExpertRelayMsg::Score`] (from routers on other nodes, or another relay).
//! **Supervised by** nobody: the mesh of a gateway node starts it and stops it with the
//! node. **On failure**: callers see their call fail and try another replica or relay;
//! a window the relay cannot get scored within [`RELAY_BUDGET`] is answered as
//! unavailable, so the caller's own attempt timeout is never what ends it.
//!
//! Loops: a relay's hop count goes down by one at each relay, and a relay with none
//! left asks replicas only; routers start at [`MAX_RELAY_HOPS`].

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::directory::NodeDirectory;
use crate::error::{ScoreError, Unavailability};
use crate::expert_endpoint::encode_verdict;
use crate::quality::QualityFlags;
use crate::router::{Replicas, RetryPolicy};
use crate::sample::Window;
use crate::telemetry;

pub mod message;

pub use message::{ExpertRelayMsg, MAX_RELAY_HOPS, RELAY_GROUP, RELAY_SCOPE};

/// Longest a relay works on one window: under a router's attempt timeout
/// ([`RetryPolicy::default`]), so the router hears "unavailable" and moves on rather
/// than timing out on the relay.
pub const RELAY_BUDGET: Duration = Duration::from_millis(2500);
/// A relay asks each replica once, briefly: the router behind it does the waiting.
const RELAY_RETRY: RetryPolicy = RetryPolicy {
    attempt_timeout: Duration::from_secs(1),
    deadline: Duration::ZERO,
};

pub struct ExpertRelay;

pub struct ExpertRelayState {
    node: Arc<str>,
    replicas: Arc<Replicas>,
}

impl Actor for ExpertRelay {
    type Msg = ExpertRelayMsg;
    type State = ExpertRelayState;
    /// The gateway node's name and directory.
    type Arguments = (String, Arc<NodeDirectory>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (node, directory): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join_scoped(
            RELAY_SCOPE.to_string(),
            RELAY_GROUP.to_string(),
            vec![myself.get_cell()],
        );
        Ok(ExpertRelayState {
            node: node.into(),
            replicas: Replicas::new(directory, RELAY_RETRY),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let ExpertRelayMsg::Score(expert, sensor, sequence, shape, values, hops, reply) = message;
        let replicas = state.replicas.clone();
        let node = state.node.clone();
        // Waiting here would hold every other window behind this one's replica.
        tokio::spawn(async move {
            let expert: Arc<str> = expert.into();
            // Only what scoring reads: the times and flags stay with the router.
            let window = Window {
                sensor_id: sensor.into(),
                sequence,
                start_us: 0,
                end_us: 0,
                channels: shape.first().copied().unwrap_or(1) as usize,
                length: shape.get(1).copied().unwrap_or(values.len() as u32) as usize,
                values: values.into(),
                quality: QualityFlags::default(),
            };
            let relayed = replicas.verdict_via(&node, &expert, &window, hops);
            let verdict = match tokio::time::timeout(RELAY_BUDGET, relayed).await {
                Ok(verdict) => verdict,
                Err(_) => Err(ScoreError::ExpertUnavailable {
                    expert: expert.to_string(),
                    reason: Unavailability::NoReplica(RELAY_BUDGET),
                }),
            };
            let outcome = if verdict.is_ok() {
                "scored"
            } else {
                "unavailable"
            };
            metrics::counter!(telemetry::RELAYED_WINDOWS, "expert" => expert.to_string(), "outcome" => outcome)
                .increment(1);
            let _ = reply.send(encode_verdict(&verdict));
        });
        Ok(())
    }
}
