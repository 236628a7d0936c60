//! The gRPC services of one node: `Ingest`, `Inference`, `Control` and `Telemetry`,
//! all over the same running [`Node`]. (`ClusterLink` is in [`crate::link`],
//! `ModelStore` in [`crate::model_store`].)
//!
//! - `Ingest.Push`: one batch, one [`IngestAck`]; the rules (limits, unknown sensors,
//!   partial acceptance and why resending is safe) are in [`crate::ingest`].
//! - `Ingest.PushStream`: the same per batch, one ack per batch in order. The first
//!   refused batch ends the stream with its status; acks sent before it stand. A batch
//!   is pushed whole or not at all: server shutdown only ends the stream between
//!   batches.
//! - `Inference.Score`: checks the window's shape and values, then asks the router.
//! - `Inference.WatchAlerts`: the node's alerts (every scored window with
//!   `include_normal`), filtered by sensor, read from the alert journal from the
//!   subscriber's cursor on (see [`crate::alert_journal`]): a subscriber that was away
//!   or slow reads on where it left, and one that fell behind the journal's retention
//!   gets a gap marker. With `include_normal` on a node that journals alerts only, the
//!   annunciator's live windows instead, without cursors: a subscriber that falls
//!   behind then skips what it missed (logged and counted in
//!   `fogmesh_alert_watch_skipped_total`). Either way the annunciator never waits for a
//!   subscriber, so a slow client cannot slow the routers down.
//! - `Control.GetStatus`: the node's snapshot, read without messaging any actor, with
//!   its capabilities (probed at start), current load and continual learners.
//! - `Control.Apply`: a mesh spec, parsed, checked and placed on the usable nodes before
//!   it is stored (the deployment loop then spreads it); `Control.GetMesh`: the members,
//!   links, placement, each replica's model version and the last rollout as this node
//!   sees them; `Control.Rollout`: a stored version checked, shipped to every node
//!   and committed to the spec, or refused (see [`crate::rollout`]).
//! - `Telemetry.Metrics`: the process's Prometheus text.
//!
//! Every refused call is counted (`fogmesh_ingest_rejected_total`,
//! `fogmesh_inference_rejected_total`) and answered through the one error mapping in
//! [`crate::status`].

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use fogmesh_actors::{ExpertOpinion, Node, Window};
use fogmesh_proto::control_server::Control;
use fogmesh_proto::inference_server::Inference;
use fogmesh_proto::ingest_server::Ingest;
use fogmesh_proto::telemetry_server::Telemetry;
use fogmesh_proto::{
    Alert, AlertFilter, ApplyReply, ApplyRequest, ExpertPlacement, ExpertScore, ExpertStatus,
    GpuInfo, IngestAck, LearnerGate, LearnerStatus, MemberStatus, MeshRequest, MeshStatus,
    MetricsRequest, MetricsText, NodeCapabilities, NodeLoad, NodeStatus, ReplicaVersion,
    RolloutReply, RolloutRequest, RouterStatus, SampleBatch, ScoreReply, ScoreRequest,
    SensorStreamStatus, StatusRequest,
};
use fogmesh_trust::PeerIdentity;
use futures::{Stream, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use prost::Message;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::alert_journal::{self, live_alert, JournalFilter};
use crate::capabilities::Capabilities;
use crate::config::{Limits, Role};
use crate::deployment::{candidates, place_new, DeploymentState, Quorum};
use crate::ingest::Ingestor;
use crate::membership::Membership;
use crate::mesh_spec::{MeshSpec, StoredSpec};
use crate::peer_links::LinkView;
use crate::rollout::FitCheck;
use crate::status::ServiceError;
use crate::telemetry;

/// Acks a `PushStream` may run ahead of its client before the stream waits.
const PUSH_STREAM_ACK_BUFFER: usize = 16;

/// One node's services; every gRPC service of the node is a clone of it.
#[derive(Clone)]
pub(crate) struct NodeServices {
    inner: Arc<Inner>,
}

struct Inner {
    node: Node,
    role: Role,
    capabilities: Capabilities,
    limits: Limits,
    ingest: Ingestor,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    mesh: Option<MeshView>,
    /// Serves plaintext (`[tls] insecure = true`).
    insecure: bool,
}

/// What the services read of the node's mesh membership.
#[derive(Clone)]
pub(crate) struct MeshView {
    pub membership: Arc<Membership>,
    pub links: tokio::sync::watch::Receiver<LinkView>,
    pub deployment: Arc<std::sync::Mutex<DeploymentState>>,
    /// Where this node keeps stored models.
    pub places: crate::mesh_spec::ModelPlaces,
    /// How this node reaches the others for model transfers.
    pub dialer: crate::dialer::Dialer,
}

impl NodeServices {
    pub(crate) fn new(
        node: Node,
        role: Role,
        limits: Limits,
        metrics: PrometheusHandle,
        shutdown: CancellationToken,
        mesh: Option<MeshView>,
        insecure: bool,
    ) -> Self {
        let ingest = Ingestor::new(node.clone(), limits, telemetry::TRANSPORT_GRPC);
        NodeServices {
            inner: Arc::new(Inner {
                node,
                role,
                capabilities: Capabilities::probe(),
                limits,
                ingest,
                metrics,
                shutdown,
                mesh,
                insecure,
            }),
        }
    }

    async fn score_window(&self, request: ScoreRequest) -> Result<ScoreReply, ServiceError> {
        let limit = self.inner.limits.max_message_bytes;
        let bytes = request.encoded_len();
        if bytes > limit {
            return Err(ServiceError::MessageTooLarge { bytes, limit });
        }
        let router = request.router.clone();
        let window = window_from_request(request)?;
        if self.inner.node.directory.router(&router).is_none() {
            return Err(ServiceError::UnknownRouter { router });
        }
        let scored = self.inner.node.score(&router, window).await?;
        Ok(ScoreReply {
            score: scored.score,
            anomalous: scored.anomalous,
            experts: scored.experts.iter().map(expert_score).collect(),
        })
    }

    fn alert_filter(&self, filter: AlertFilter) -> Result<HashSet<String>, ServiceError> {
        for (i, id) in filter.sensor_ids.iter().enumerate() {
            if self.inner.node.directory.sensor(id).is_none() {
                return Err(ServiceError::InvalidField {
                    field: format!("sensor_ids[{i}]"),
                    value: format!("{id:?}"),
                    reason: "no sensor stream of this node has this id".into(),
                });
            }
        }
        Ok(filter.sensor_ids.into_iter().collect())
    }
}

fn count_inference_rejection(rpc: &'static str, error: &ServiceError) {
    metrics::counter!(telemetry::INFERENCE_REJECTED, "rpc" => rpc, "reason" => error.reason())
        .increment(1);
}

/// Checks a `ScoreRequest`'s shape and values and turns it into a window.
fn window_from_request(request: ScoreRequest) -> Result<Window, ServiceError> {
    let invalid = |field: String, value: String, reason: String| ServiceError::InvalidField {
        field,
        value,
        reason,
    };
    for (field, value) in [("channels", request.channels), ("length", request.length)] {
        if value == 0 {
            return Err(invalid(
                field.into(),
                "0".into(),
                "must be at least 1".into(),
            ));
        }
    }
    let expected = u64::from(request.channels) * u64::from(request.length);
    if expected != request.values.len() as u64 {
        return Err(invalid(
            "values".into(),
            format!("{} values", request.values.len()),
            format!(
                "`channels` x `length` is {} x {} = {expected}",
                request.channels, request.length
            ),
        ));
    }
    if let Some((i, value)) = request
        .values
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
    {
        return Err(invalid(
            format!("values[{i}]"),
            value.to_string(),
            "only finite values are accepted".into(),
        ));
    }
    Ok(Window {
        sensor_id: request.sensor_id.into(),
        sequence: 0,
        start_us: 0,
        end_us: 0,
        channels: request.channels as usize,
        length: request.length as usize,
        values: request.values.into(),
        quality: Default::default(),
    })
}

fn expert_score(opinion: &ExpertOpinion) -> ExpertScore {
    ExpertScore {
        expert: opinion.expert.to_string(),
        model_version: opinion.model_version.to_string(),
        score: opinion.score,
        threshold: opinion.threshold,
        gate_weight: opinion.gate_weight,
        class: opinion.class.as_deref().unwrap_or_default().to_string(),
    }
}

#[tonic::async_trait]
impl Ingest for NodeServices {
    async fn push(&self, request: Request<SampleBatch>) -> Result<Response<IngestAck>, Status> {
        let feeder = request.extensions().get::<PeerIdentity>().cloned();
        Ok(Response::new(
            self.inner
                .ingest
                .push_batch(request.into_inner(), feeder.as_ref())
                .await?,
        ))
    }

    type PushStreamStream = ReceiverStream<Result<IngestAck, Status>>;

    async fn push_stream(
        &self,
        request: Request<Streaming<SampleBatch>>,
    ) -> Result<Response<Self::PushStreamStream>, Status> {
        let feeder = request.extensions().get::<PeerIdentity>().cloned();
        let mut batches = request.into_inner();
        let (acks, acks_rx) = tokio::sync::mpsc::channel(PUSH_STREAM_ACK_BUFFER);
        let ingest = self.inner.ingest.clone();
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    next = batches.message() => next,
                };
                let ack = match next {
                    Ok(Some(batch)) => ingest
                        .push_batch(batch, feeder.as_ref())
                        .await
                        .map_err(Status::from),
                    // The producer closed its side: every batch it sent is answered.
                    Ok(None) => break,
                    // A transport or decoding error (tonic's own size backstop, a reset
                    // stream): pass it on; the client may already be gone.
                    Err(status) => Err(status),
                };
                let refused = ack.is_err();
                if acks.send(ack).await.is_err() || refused {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(acks_rx)))
    }
}

#[tonic::async_trait]
impl Inference for NodeServices {
    async fn score(&self, request: Request<ScoreRequest>) -> Result<Response<ScoreReply>, Status> {
        match self.score_window(request.into_inner()).await {
            Ok(reply) => Ok(Response::new(reply)),
            Err(e) => {
                count_inference_rejection("score", &e);
                Err(e.into())
            }
        }
    }

    type WatchAlertsStream = Pin<Box<dyn Stream<Item = Result<Alert, Status>> + Send>>;

    async fn watch_alerts(
        &self,
        request: Request<AlertFilter>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let filter = request.into_inner();
        let include_normal = filter.include_normal;
        let from_cursor = filter.from_cursor;
        let sensors = self.alert_filter(filter).map_err(|e| {
            count_inference_rejection("watch_alerts", &e);
            Status::from(e)
        })?;
        let shutdown = self.inner.shutdown.clone();
        if let Some((log, verdicts)) = self.inner.node.annunciator.journal() {
            if verdicts || !include_normal {
                let filter = JournalFilter {
                    sensors,
                    include_normal,
                };
                let alerts = alert_journal::tail(log.clone(), from_cursor, filter)
                    .map(|item| item.map_err(Status::from))
                    .take_until(shutdown.cancelled_owned());
                return Ok(Response::new(Box::pin(alerts)));
            }
        }
        let alerts = BroadcastStream::new(self.inner.node.annunciator.subscribe())
            .filter_map(move |window| {
                let alert = match window {
                    Ok(window) => ((include_normal || window.anomalous)
                        && (sensors.is_empty() || sensors.contains(&*window.sensor_id)))
                    .then(|| Ok(live_alert(&window))),
                    Err(BroadcastStreamRecvError::Lagged(skipped)) => {
                        tracing::warn!(
                            skipped,
                            "alert subscriber fell behind; skipping the windows it missed"
                        );
                        metrics::counter!(telemetry::ALERT_WATCH_SKIPPED).increment(skipped);
                        None
                    }
                };
                futures::future::ready(alert)
            })
            .take_until(shutdown.cancelled_owned());
        Ok(Response::new(Box::pin(alerts)))
    }
}

impl NodeServices {
    fn mesh(&self) -> Result<&MeshView, ServiceError> {
        self.inner
            .mesh
            .as_ref()
            .ok_or_else(|| ServiceError::NotInMesh {
                node: self.inner.node.name.clone(),
            })
    }
}

fn rollout_reply(record: &crate::deployment::RolloutRecord) -> RolloutReply {
    RolloutReply {
        expert: record.expert.clone(),
        from: record.from.clone(),
        to: record.to.clone(),
        spec_version: record.spec_version,
        outcome: record.outcome.as_str().into(),
        prepared: record.prepared.clone(),
        lost: record.lost.clone(),
        detail: record.detail.clone(),
    }
}

fn placement_list(assignment: &crate::placement::Assignment) -> Vec<ExpertPlacement> {
    assignment
        .iter()
        .map(|(expert, nodes)| ExpertPlacement {
            expert: expert.clone(),
            nodes: nodes.clone(),
        })
        .collect()
}

#[tonic::async_trait]
impl Control for NodeServices {
    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyReply>, Status> {
        let mesh = self.mesh()?;
        let request = request.into_inner();
        let members = mesh.membership.members();
        // Stored versions the spec names must be on this node before it can check them.
        if let Some(store) = &mesh.places.models {
            let ids =
                MeshSpec::stored_models(&request.spec_toml).map_err(ServiceError::SpecSyntax)?;
            let peers = crate::rollout::peer_addresses(
                &members,
                &self.inner.node.name,
                &mesh.links.borrow(),
            );
            crate::rollout::ensure_local(&ids, store, &peers, &mesh.dialer)
                .await
                .map_err(ServiceError::SpecModelsMissing)?;
        }
        let spec = MeshSpec::parse_with(
            &request.spec_toml,
            std::path::Path::new("mesh.toml"),
            &mesh.places,
        )
        .map_err(ServiceError::Spec)?;
        let links = mesh.links.borrow().clone();
        let quorum = Quorum::of(
            &self.inner.node.name,
            &mesh.membership.known().await,
            &members,
            &links,
        );
        if !request.dry_run {
            quorum
                .require("applying a spec")
                .map_err(ServiceError::NoQuorum)?;
        }
        let nodes = candidates(&members, &links, &self.inner.node.name, &spec);
        let assignment =
            place_new(&spec, &nodes, &Default::default()).map_err(ServiceError::Placement)?;
        let mut state = mesh
            .deployment
            .lock()
            .map_err(|_| ServiceError::DeploymentPoisoned)?;
        let known = state
            .usable_specs(&members)
            .map(|s| s.version)
            .chain(state.spec.as_ref().map(|s| s.version))
            .max()
            .unwrap_or(0);
        let version = known
            .checked_add(1)
            .ok_or(ServiceError::SpecVersionExhausted { known })?;
        if !request.dry_run {
            let applied_at_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64);
            state.spec = Some(StoredSpec {
                version,
                applied_at_us,
                text: request.spec_toml,
            });
            tracing::info!(version, placement = ?assignment, "mesh spec applied");
        }
        Ok(Response::new(ApplyReply {
            version,
            placement: placement_list(&assignment),
        }))
    }

    async fn get_mesh(
        &self,
        _request: Request<MeshRequest>,
    ) -> Result<Response<MeshStatus>, Status> {
        let mesh = self.mesh()?;
        let me = &self.inner.node.name;
        let links = mesh.links.borrow().clone();
        let members = mesh
            .membership
            .members()
            .into_values()
            .map(|m| {
                let link = links.get(&m.name);
                MemberStatus {
                    link: if &m.name == me {
                        "self".into()
                    } else {
                        link.map_or("down", |l| l.state.as_str()).into()
                    },
                    link_rtt_ms: link.and_then(|l| l.rtt).map(|d| d.as_secs_f64() * 1e3),
                    node: m.name,
                    role: m.card.role,
                    zone: m.card.zone,
                    conduits: m.card.conduits,
                    address: m.card.grpc,
                    capabilities: Some(NodeCapabilities {
                        cores: m.card.cores,
                        memory_bytes: m.card.memory_bytes,
                        gpus: m
                            .card
                            .gpus
                            .iter()
                            .map(|g| GpuInfo {
                                index: g.index,
                                name: g.name.clone(),
                                memory_bytes: g.memory_bytes,
                            })
                            .collect(),
                    }),
                    load: Some(NodeLoad {
                        cpu: m.load.cpu,
                        memory_available_bytes: m.load.memory_available_bytes,
                    }),
                    up_since_us: m.card.up_since_us,
                }
            })
            .collect();
        let versions = mesh
            .membership
            .members()
            .into_values()
            .flat_map(|m| {
                m.versions
                    .into_iter()
                    .map(move |(expert, model_version)| ReplicaVersion {
                        node: m.name.clone(),
                        expert,
                        model_version,
                    })
            })
            .collect();
        let state = mesh
            .deployment
            .lock()
            .map_err(|_| ServiceError::DeploymentPoisoned)?;
        Ok(Response::new(MeshStatus {
            node: me.clone(),
            members,
            spec_version: state.spec.as_ref().map_or(0, |s| s.version),
            placement_epoch: state.placement.as_ref().map_or(0, |p| p.epoch),
            leader: state.leader.clone().unwrap_or_default(),
            placement: state
                .placement
                .as_ref()
                .map(|p| placement_list(&p.experts))
                .unwrap_or_default(),
            last_error: state.last_error.clone().unwrap_or_default(),
            versions,
            last_rollout: state.rollout.as_ref().map(rollout_reply),
        }))
    }

    async fn rollout(
        &self,
        request: Request<RolloutRequest>,
    ) -> Result<Response<RolloutReply>, Status> {
        let mesh = self.mesh()?;
        let request = request.into_inner();
        let context = crate::rollout::RolloutContext {
            me: &self.inner.node.name,
            places: &mesh.places,
            dialer: &mesh.dialer,
            membership: &mesh.membership,
            links: &mesh.links,
            state: &mesh.deployment,
        };
        let record = crate::rollout::run(
            &context,
            &request.expert,
            &request.model,
            request.rollback,
            FitCheck::Load,
        )
        .await
        .map_err(ServiceError::Rollout)?;
        Ok(Response::new(rollout_reply(&record)))
    }

    async fn get_status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        let snapshot = self.inner.node.snapshot();
        let capabilities = &self.inner.capabilities;
        let load = capabilities.load();
        Ok(Response::new(NodeStatus {
            capabilities: Some(NodeCapabilities {
                cores: capabilities.cores,
                memory_bytes: capabilities.memory_bytes,
                gpus: capabilities
                    .gpus
                    .iter()
                    .map(|g| GpuInfo {
                        index: g.index,
                        name: g.name.clone(),
                        memory_bytes: g.memory_bytes,
                    })
                    .collect(),
            }),
            load: Some(NodeLoad {
                cpu: load.cpu,
                memory_available_bytes: load.memory_available_bytes,
            }),
            node: snapshot.node,
            role: self.inner.role.as_str().to_string(),
            insecure: self.inner.insecure,
            up_since_us: snapshot.up_since_us,
            sensors: snapshot
                .sensors
                .into_iter()
                .map(|s| SensorStreamStatus {
                    sensor_id: s.id,
                    channels: s.channels.try_into().unwrap_or(u32::MAX),
                    accepted: s.accepted,
                    rejected: s.rejected,
                    duplicates: s.duplicates,
                    windows: s.windows,
                    // 0 before the first sample; `accepted` tells the two apart.
                    last_sequence: s.acked_through.unwrap_or_default(),
                    parked: s.parked,
                    dropped: s.dropped,
                })
                .collect(),
            routers: snapshot
                .routers
                .into_iter()
                .map(|r| RouterStatus {
                    name: r.name,
                    policy: r.policy.to_string(),
                    routed: r.routed,
                    failed: r.failed,
                    in_flight: r.in_flight as u64,
                })
                .collect(),
            experts: snapshot
                .experts
                .into_iter()
                .map(|x| ExpertStatus {
                    name: x.name,
                    model: x.model.to_string(),
                    version: x.version,
                    device: x.device,
                    queue: x.queue.try_into().unwrap_or(u32::MAX),
                    windows_scored: x.windows_scored,
                    batches: x.batches,
                    mean_batch_size: x.mean_batch_size,
                })
                .collect(),
            learners: learner_statuses(&self.inner.node),
            federations: federation_statuses(&self.inner.node).await,
        }))
    }
}

/// How long status waits for a coordinator: one in a round answers after it, so
/// status shows it as busy instead.
const COORDINATOR_STATUS_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

/// Every federation this node coordinates, by expert.
async fn federation_statuses(node: &Node) -> Vec<fogmesh_proto::FederationStatus> {
    let coordinators: Vec<_> = node
        .directory
        .coordinators
        .iter()
        .map(|e| (e.key().clone(), e.value().clone()))
        .collect();
    let mut statuses = Vec::new();
    for (expert, coordinator) in coordinators {
        let asked = coordinator
            .call(
                |reply| fogmesh_actors::FederatedCoordinatorMsg::Status { reply },
                Some(COORDINATOR_STATUS_WAIT),
            )
            .await;
        let status = match asked {
            Ok(ractor::rpc::CallResult::Success(s)) => {
                let last = s.last.as_ref();
                fogmesh_proto::FederationStatus {
                    expert,
                    rounds: s.rounds,
                    version: s.version,
                    sites: s.site_names,
                    last_sites: last.map(|r| r.sites.clone()).unwrap_or_default(),
                    last_left_out: last
                        .map(|r| r.stragglers.iter().chain(&r.failed).cloned().collect())
                        .unwrap_or_default(),
                    last_bytes_up: last.map_or(0, |r| r.bytes_up),
                    last_bytes_down: last.map_or(0, |r| r.bytes_down),
                    last_loss: last.and_then(|r| r.loss),
                    epsilon: s.epsilon,
                    last_version: last.and_then(|r| r.version.clone()).unwrap_or_default(),
                    last_error: s.last_error.unwrap_or_default(),
                    mode: s.mode.into(),
                }
            }
            _ => fogmesh_proto::FederationStatus {
                expert,
                last_error: "a round is running".into(),
                ..Default::default()
            },
        };
        statuses.push(status);
    }
    statuses.sort_by(|a, b| a.expert.cmp(&b.expert));
    statuses
}

/// Every continual learner of the node, by expert, read from their shared state.
fn learner_statuses(node: &Node) -> Vec<LearnerStatus> {
    let mut learners: Vec<LearnerStatus> = node
        .directory
        .learners
        .iter()
        .map(|entry| {
            let l = entry.value().shared.snapshot();
            LearnerStatus {
                expert: l.expert,
                phase: l.phase.as_str().to_string(),
                serving_version: l.serving_version,
                windows_seen: l.windows_seen,
                windows_skipped: l.windows_skipped,
                reservoir_windows: l.reservoir,
                new_windows: l.new_windows,
                drifts: l.drifts,
                rounds: l.rounds,
                promotions: l.promotions,
                refusals: l.refusals,
                failures: l.failures,
                last_drift: l.last_drift.map(|d| d.summary()).unwrap_or_default(),
                last_gate: l.last_round.map(|r| LearnerGate {
                    old_before: r.gate.old_before,
                    old_after: r.gate.old_after,
                    new_before: r.gate.new_before,
                    new_after: r.gate.new_after,
                    promote: r.gate.promote,
                    reason: r.gate.reason,
                }),
                drift_to_promotion_s: l.last_drift_to_promotion_s,
                last_error: l.last_error.unwrap_or_default(),
            }
        })
        .collect();
    learners.sort_by(|a, b| a.expert.cmp(&b.expert));
    learners
}

#[tonic::async_trait]
impl Telemetry for NodeServices {
    async fn metrics(
        &self,
        _request: Request<MetricsRequest>,
    ) -> Result<Response<MetricsText>, Status> {
        Ok(Response::new(MetricsText {
            text: self.inner.metrics.render(),
        }))
    }
}
