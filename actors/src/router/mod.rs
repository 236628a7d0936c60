//! `Router`: mixture-of-experts gating as message dispatch.
//!
//! **Owns** its routing policy and counters. **Takes** [`RouterMsg::Score`]: a window
//! from a sensor stream's forwarder or another caller, answered with the verdict or
//! why there is none. **Supervised by** the [`crate::NodeAgent`]. **On failure**: a
//! window it cannot score is counted in `fogmesh_router_failures_total` with the reason
//! and answered with the error; the router itself keeps going. It holds no per-window
//! state: a restart drops the windows in flight to experts at that moment, and their
//! callers hear that it stopped (a stream's forwarder keeps such windows in the edge
//! log's outbox and sends them again).
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
//! short task; the router's mailbox never waits on a forward pass. Those tasks are
//! bounded: a router holds at most [`MAX_WINDOWS_IN_FLIGHT`] windows between taking
//! them and delivering their verdicts, and the node refuses producers outside it
//! (`RESOURCE_EXHAUSTED`) or holds replays while it is full, so experts that fall behind
//! push back to the sensors instead of growing memory.
//!
//! Replicas ([`Replicas`]): an expert may run on this node (found in the
//! [`NodeDirectory`]) or on others (found through the [`EXPERT_SCOPE`] process group,
//! reached through their [`crate::ExpertEndpoint`]). A window goes to the replica here
//! first, else to the remote one with the least outstanding work; a replica that fails
//! or stays silent past the [`RetryPolicy`]'s attempt timeout is skipped and the next
//! one tried, and with none left the window waits, with jittered backoff
//! ([`RETRY_WAIT`]), for a replica to appear (a lost node's expert re-placed elsewhere)
//! until the policy's deadline. Each window still yields exactly one verdict. Replicas
//! in other zones, which this node does not link to, are reached through a gateway's
//! [`crate::ExpertRelay`], tried after every replica this node links to.
//!
//! Optional experts ([`RouterSpec::optional`]) are asked once, without waiting for a
//! replica to appear: when none answers, the window is scored by the other experts,
//! their weights renormalised, and the skip is counted
//! (`fogmesh_router_optional_skipped_total`). A cell cut off from the cloud keeps
//! scoring on its own experts that way.

pub(crate) mod interface;

pub use interface::{RouterMsg, RouterShared, RouterSpec, RoutingPolicy, MAX_WINDOWS_IN_FLIGHT};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use dashmap::DashMap;

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::annunciator::{ExpertOpinion, ScoredWindow};
use crate::directory::{ExpertHandle, NodeDirectory};
use crate::error::{ScoreError, Unavailability};
use crate::expert::ExpertVerdict;
use crate::expert_endpoint::{decode_verdict, ExpertEndpointMsg, EXPERT_SCOPE};
use crate::expert_relay::message::{ExpertRelayMsg, MAX_RELAY_HOPS, RELAY_GROUP, RELAY_SCOPE};
use crate::node_agent::Undelivered;
use crate::sample::Window;
use crate::telemetry;

pub struct Router;

pub struct RouterArgs {
    pub spec: RouterSpec,
    pub shared: Arc<RouterShared>,
    pub replicas: Arc<Replicas>,
}

pub struct RouterState {
    policy: RoutingPolicy,
    /// Expert names as shared strings, so a verdict does not allocate per expert.
    names: HashMap<String, Arc<str>>,
    /// Experts a window is scored without when none of their replicas is reachable.
    optional: HashSet<Arc<str>>,
    shared: Arc<RouterShared>,
    replicas: Arc<Replicas>,
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
            optional: args
                .spec
                .optional
                .iter()
                .map(|n| n.as_str().into())
                .collect(),
            shared: args.shared,
            replicas: args.replicas,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let RouterMsg::Score { window, reply } = message;
        state.shared.enter();
        match state.dispatch(&window) {
            Ok(pending) => {
                let shared = state.shared.clone();
                let replicas = state.replicas.clone();
                tokio::spawn(async move {
                    let verdict = gather(&shared, &replicas, &window, pending).await;
                    deliver(&shared, verdict, reply);
                });
            }
            Err(e) => deliver(&state.shared, Err(e), reply),
        }
        Ok(())
    }
}

/// An expert's verdict on its way: already sent to the replica on this node, or to be
/// fetched from a replica elsewhere by the gathering task.
struct Pending {
    expert: Arc<str>,
    weight: f32,
    optional: bool,
    first: FirstAttempt,
}

enum FirstAttempt {
    Local(tokio::sync::oneshot::Receiver<Result<ExpertVerdict, ScoreError>>),
    Elsewhere,
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

    /// Sends the window to the replicas on this node at once; experts with no replica
    /// here are left to the gathering task, which finds one on another node. Fails
    /// before sending anything if a local replica takes another shape, so a window is
    /// scored whole or not at all.
    fn dispatch(&self, window: &Window) -> Result<Vec<Pending>, ScoreError> {
        let targets = self.targets(window)?;
        let mut local = Vec::with_capacity(targets.len());
        for (expert, weight) in targets {
            let handle = self.replicas.directory.expert(&expert);
            if let Some(handle) = &handle {
                check_shape(handle, &expert, window)?;
            }
            local.push((expert, weight, handle));
        }
        let enqueued = Instant::now();
        let pending = local
            .into_iter()
            .map(|(expert, weight, handle)| {
                let first = match handle {
                    Some(handle) => {
                        FirstAttempt::Local(handle.infer(window.values.clone(), enqueued))
                    }
                    None => FirstAttempt::Elsewhere,
                };
                Pending {
                    optional: self.optional.contains(&expert),
                    expert,
                    weight,
                    first,
                }
            })
            .collect();
        Ok(pending)
    }
}

fn check_shape(handle: &ExpertHandle, expert: &str, window: &Window) -> Result<(), ScoreError> {
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
    Ok(())
}

/// How a router finds an expert's replicas: the one on this node through the
/// directory, the others through the [`EXPERT_SCOPE`] process group; and how much it
/// has outstanding at each remote one, to pick the least busy.
pub struct Replicas {
    pub directory: Arc<NodeDirectory>,
    outstanding: DashMap<ActorId, usize>,
    pub retry: RetryPolicy,
}

/// Where a window goes when no replica is on this node.
enum Replica {
    /// A replica on a node this one links to.
    Endpoint(ActorRef<ExpertEndpointMsg>),
    /// A gateway's relay into the zones beyond.
    Relay(ActorRef<ExpertRelayMsg>),
}

impl Replica {
    fn id(&self) -> ActorId {
        match self {
            Replica::Endpoint(endpoint) => endpoint.get_id(),
            Replica::Relay(relay) => relay.get_id(),
        }
    }
}

/// How long a router keeps trying to get a window scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Longest wait for one replica's answer before trying another.
    pub attempt_timeout: Duration,
    /// Longest time a window waits for any replica (a lost node's experts being
    /// placed again elsewhere) before it counts as not scored.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempt_timeout: Duration::from_secs(3),
            deadline: Duration::from_secs(15),
        }
    }
}

/// Longest wait between two searches for a replica, before jitter.
const MAX_RETRY_WAIT: Duration = Duration::from_millis(200);

/// The waits between searches for a replica of an expert with none reachable, from
/// 10 ms up. Jitter (up to the wait itself) keeps the windows that lost their replica
/// together, on every router, from asking the mesh again in lockstep.
const RETRY_WAIT: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(10))
    .with_max_delay(MAX_RETRY_WAIT)
    .with_jitter()
    .without_max_times();

/// Most bytes of window values a router sends to a replica on another node. Well
/// under ractor_cluster's 16 MiB frame limit, which closes the whole link when crossed:
/// one oversized window must not cost every other window on that link.
pub const MAX_REMOTE_WINDOW_BYTES: usize = 4 << 20;

/// Refuses a window too large for one cluster message, before it is sent.
fn check_remote_size(expert: &str, window: &Window) -> Result<(), ScoreError> {
    let bytes = window.values.len() * std::mem::size_of::<f32>();
    if bytes > MAX_REMOTE_WINDOW_BYTES {
        return Err(ScoreError::TooLargeToSend {
            sensor_id: window.sensor_id.to_string(),
            expert: expert.to_string(),
            bytes,
            limit: MAX_REMOTE_WINDOW_BYTES,
        });
    }
    Ok(())
}

impl Replicas {
    pub fn new(directory: Arc<NodeDirectory>, retry: RetryPolicy) -> Arc<Self> {
        Arc::new(Replicas {
            directory,
            outstanding: DashMap::new(),
            retry,
        })
    }

    /// Remote replicas of `expert` not in `tried`, least outstanding work first; once
    /// none is left, with relay hops left, the gateways' relays on other nodes, least
    /// busy first.
    fn remote_candidates(&self, expert: &str, tried: &HashSet<ActorId>, hops: u8) -> Vec<Replica> {
        let by_load = |scope: &str, group: &str| {
            let mut members: Vec<(usize, ActorCell)> =
                ractor::pg::get_scoped_members(&scope.to_string(), &group.to_string())
                    .into_iter()
                    .filter(|cell| !cell.get_id().is_local() && !tried.contains(&cell.get_id()))
                    .map(|cell| {
                        let load = self.outstanding.get(&cell.get_id()).map_or(0, |n| *n);
                        (load, cell)
                    })
                    .collect();
            members.sort_by_key(|(load, cell)| (*load, cell.get_id().pid()));
            members.into_iter().map(|(_, cell)| cell)
        };
        let mut replicas: Vec<Replica> = by_load(EXPERT_SCOPE, expert)
            .map(|cell| Replica::Endpoint(cell.into()))
            .collect();
        // Relays come after every replica this node links to, so a window with one
        // left untried, the usual case, does not look them up.
        if replicas.is_empty() && hops > 0 {
            replicas
                .extend(by_load(RELAY_SCOPE, RELAY_GROUP).map(|cell| Replica::Relay(cell.into())));
        }
        replicas
    }

    async fn ask_remote(
        &self,
        replica: &Replica,
        expert: &str,
        window: &Window,
        hops: u8,
    ) -> Result<ExpertVerdict, ScoreError> {
        let id = replica.id();
        *self.outstanding.entry(id).or_insert(0) += 1;
        let timeout = Some(self.retry.attempt_timeout);
        let sensor = window.sensor_id.to_string();
        let values = window.values.to_vec();
        let answer = match replica {
            Replica::Endpoint(endpoint) => endpoint
                .call(
                    |reply| ExpertEndpointMsg::Score(sensor, window.sequence, values, reply),
                    timeout,
                )
                .await
                .map_err(|e| Undelivered::from(&e)),
            Replica::Relay(relay) => relay
                .call(
                    |reply| {
                        ExpertRelayMsg::Score(
                            expert.to_string(),
                            sensor,
                            window.sequence,
                            vec![window.channels as u32, window.length as u32],
                            values,
                            hops.saturating_sub(1),
                            reply,
                        )
                    },
                    timeout,
                )
                .await
                .map_err(|e| Undelivered::from(&e)),
        };
        if let Some(mut n) = self.outstanding.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
        let unavailable = |reason: Unavailability| ScoreError::ExpertUnavailable {
            expert: expert.to_string(),
            reason,
        };
        let replica = id.to_string();
        match answer {
            Ok(ractor::rpc::CallResult::Success(bytes)) => decode_verdict(expert, &bytes),
            Ok(ractor::rpc::CallResult::Timeout) => Err(unavailable(Unavailability::Silent {
                replica,
                after: self.retry.attempt_timeout,
            })),
            Ok(ractor::rpc::CallResult::SenderError) => {
                Err(unavailable(Unavailability::Gone { replica }))
            }
            Err(source) => Err(unavailable(Unavailability::NotDelivered {
                replica,
                source,
            })),
        }
    }

    /// Gets `expert`'s verdict on `window` from any replica: this node's first, then
    /// the least busy elsewhere; a replica that fails or goes silent is skipped, and
    /// when none is left the window waits (with backoff) for one to appear, up to the
    /// retry deadline. Only an unavailable replica is retried: a model error would
    /// repeat on every replica.
    async fn verdict(
        &self,
        router: &str,
        expert: &Arc<str>,
        window: &Window,
    ) -> Result<ExpertVerdict, ScoreError> {
        self.seek(router, expert, window, MAX_RELAY_HOPS, self.retry.deadline)
            .await
    }

    /// [`Replicas::verdict`] with `hops` relays left to pass through: the replicas
    /// this node links to come first, and gateways' relays only after them.
    pub async fn verdict_via(
        &self,
        router: &str,
        expert: &Arc<str>,
        window: &Window,
        hops: u8,
    ) -> Result<ExpertVerdict, ScoreError> {
        self.seek(router, expert, window, hops, self.retry.deadline)
            .await
    }

    /// One pass over the replicas and relays, with no wait for one to appear: for
    /// an optional expert, whose window goes on without it.
    async fn verdict_if_reachable(
        &self,
        router: &str,
        expert: &Arc<str>,
        window: &Window,
    ) -> Result<ExpertVerdict, ScoreError> {
        self.seek(router, expert, window, MAX_RELAY_HOPS, Duration::ZERO)
            .await
    }

    async fn seek(
        &self,
        router: &str,
        expert: &Arc<str>,
        window: &Window,
        hops: u8,
        patience: Duration,
    ) -> Result<ExpertVerdict, ScoreError> {
        // tokio's clock, not the OS's: the retry deadline and its backoff sleeps must
        // agree, and tests drive both on paused time.
        let deadline = tokio::time::Instant::now() + patience;
        let mut backoff = RETRY_WAIT.build();
        let mut last_error = None;
        let retries = metrics::counter!(telemetry::ROUTER_RETRIES, "router" => router.to_string(), "expert" => expert.to_string());
        loop {
            if let Some(handle) = self.directory.expert(expert) {
                check_shape(&handle, expert, window)?;
                let local = handle
                    .infer(window.values.clone(), Instant::now())
                    .await
                    .unwrap_or_else(|_| {
                        Err(ScoreError::ExpertUnavailable {
                            expert: expert.to_string(),
                            reason: Unavailability::Stopped,
                        })
                    });
                match local {
                    Err(e @ ScoreError::ExpertUnavailable { .. }) => last_error = Some(e),
                    done => return done,
                }
                retries.increment(1);
            }
            let mut tried = HashSet::new();
            loop {
                let Some(replica) = self
                    .remote_candidates(expert, &tried, hops)
                    .into_iter()
                    .next()
                else {
                    break;
                };
                check_remote_size(expert, window)?;
                tried.insert(replica.id());
                metrics::counter!(telemetry::ROUTER_REMOTE, "router" => router.to_string(), "expert" => expert.to_string()).increment(1);
                match self.ask_remote(&replica, expert, window, hops).await {
                    Err(e @ ScoreError::ExpertUnavailable { .. }) => {
                        tracing::debug!(%router, %expert, error = %e, "replica failed; trying another");
                        retries.increment(1);
                        last_error = Some(e);
                    }
                    done => return done,
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(last_error.unwrap_or_else(|| ScoreError::ExpertUnavailable {
                    expert: expert.to_string(),
                    reason: Unavailability::NoReplica(patience),
                }));
            }
            // Never exhausted (no max times); the cap stands in should that change.
            let wait = backoff.next().unwrap_or(MAX_RETRY_WAIT);
            tokio::time::sleep(wait.min(deadline - now)).await;
        }
    }
}

async fn gather(
    shared: &RouterShared,
    replicas: &Replicas,
    window: &Window,
    pending: Vec<Pending>,
) -> Result<ScoredWindow, ScoreError> {
    let mut experts = Vec::with_capacity(pending.len());
    let mut score = 0.0f32;
    let mut answered = 0.0f32;
    let mut skipped = None;
    for p in pending {
        let first = match p.first {
            FirstAttempt::Local(reply) => Some(reply.await.unwrap_or_else(|_| {
                Err(ScoreError::ExpertUnavailable {
                    expert: p.expert.to_string(),
                    reason: Unavailability::Stopped,
                })
            })),
            FirstAttempt::Elsewhere => None,
        };
        let verdict = match first {
            Some(Err(ScoreError::ExpertUnavailable { .. })) | None if p.optional => {
                match replicas
                    .verdict_if_reachable(&shared.name, &p.expert, window)
                    .await
                {
                    Err(e @ ScoreError::ExpertUnavailable { .. }) => {
                        metrics::counter!(telemetry::ROUTER_OPTIONAL_SKIPPED, "router" => shared.name.to_string(), "expert" => p.expert.to_string())
                            .increment(1);
                        skipped = Some(e);
                        continue;
                    }
                    other => other?,
                }
            }
            Some(Err(ScoreError::ExpertUnavailable { .. })) | None => {
                replicas.verdict(&shared.name, &p.expert, window).await?
            }
            Some(done) => done?,
        };
        let threshold = verdict.threshold.ok_or_else(|| ScoreError::Uncalibrated {
            expert: p.expert.to_string(),
        })?;
        score += p.weight * verdict.score / threshold;
        answered += p.weight;
        experts.push(ExpertOpinion {
            expert: p.expert,
            model_version: verdict.model_version,
            score: verdict.score,
            threshold,
            gate_weight: p.weight,
            class: verdict.class,
        });
    }
    if experts.is_empty() {
        if let Some(unreachable) = skipped {
            return Err(unreachable);
        }
    }
    // The experts that answered share the weight of those skipped.
    if skipped.is_some() && answered > 0.0 {
        score /= answered;
        for opinion in &mut experts {
            opinion.gate_weight /= answered;
        }
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
        values: window.values.clone(),
        late: None,
    })
}

fn deliver(
    shared: &RouterShared,
    verdict: Result<ScoredWindow, ScoreError>,
    reply: RpcReplyPort<Result<ScoredWindow, ScoreError>>,
) {
    shared.leave();
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
    // The caller may have given up (timeout, disconnect); nothing to do then.
    let _ = reply.send(verdict);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quality::QualityFlags;

    fn window_of(values: usize) -> Window {
        Window {
            sensor_id: "s".into(),
            sequence: 0,
            start_us: 0,
            end_us: 0,
            channels: 1,
            length: values,
            values: vec![0.0; values].into(),
            quality: QualityFlags::default(),
        }
    }

    /// With no replica anywhere, a window waits with backoff for one to be placed and
    /// fails at the retry deadline, not before and not never; on paused time the test
    /// takes no wall-clock time.
    #[tokio::test(start_paused = true)]
    async fn a_window_with_no_replica_fails_at_the_retry_deadline() {
        let retry = RetryPolicy {
            attempt_timeout: Duration::from_secs(3),
            deadline: Duration::from_secs(15),
        };
        let replicas = Replicas::new(Arc::new(NodeDirectory::default()), retry);
        let started = tokio::time::Instant::now();
        let error = replicas
            .verdict("r1", &Arc::from("nowhere-ae"), &window_of(8))
            .await
            .unwrap_err();
        let waited = started.elapsed();
        assert!(
            waited >= retry.deadline && waited < retry.deadline + Duration::from_millis(250),
            "waited {waited:?}"
        );
        match error {
            ScoreError::ExpertUnavailable { expert, reason } => {
                assert_eq!(expert, "nowhere-ae");
                assert_eq!(reason, Unavailability::NoReplica(Duration::from_secs(15)));
                assert_eq!(reason.to_string(), "no replica on any node within 15s");
            }
            other => panic!("expected ExpertUnavailable, got {other:?}"),
        }
    }

    #[test]
    fn windows_too_large_for_one_cluster_message_are_refused_before_sending() {
        let limit_values = MAX_REMOTE_WINDOW_BYTES / 4;
        assert!(check_remote_size("ae", &window_of(limit_values)).is_ok());
        let refused = check_remote_size("ae", &window_of(limit_values + 1)).unwrap_err();
        assert_eq!(refused.reason(), "too_large_to_send");
        assert!(refused.to_string().contains("at most 4194304"), "{refused}");
    }
}
