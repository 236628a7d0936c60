//! The `Federation` gRPC service of a node: `Train` and `Evaluate` pass a coordinator's
//! weights to this node's `SiteTrainer` of the federation and stream back its answer;
//! `Federate` runs a round now on the federation's coordinator, here or on the node the
//! deployment loop placed it on.
//!
//! Checks, in order: the mesh key for `Train` and `Evaluate` (plaintext nodes in a
//! mesh; over TLS the authorization layer has admitted only nodes), the framing (`super::receive`), the
//! work's fields. A distillation round's shared windows are kept per federation, so
//! the rounds after carry only their digest (`FAILED_PRECONDITION` when this node does
//! not hold them, after a restart: the coordinator's side then sends them again). A
//! site that is not here is `NOT_FOUND`; a site whose training failed
//! is `ABORTED` with its error. `Federate` passed on to a coordinator that dies before
//! answering is passed again to the node placed after it, so a round lost with its
//! coordinator runs once more elsewhere (it was never stored: rounds store only at
//! their end).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use fogmesh_actors::{
    FederatedCoordinatorMsg, Node, Site, SiteEvaluation, SiteReport, SiteTrainerMsg,
};
use fogmesh_models::continual::ReplayItem;
use fogmesh_proto::federation_server::Federation as FederationRpc;
use fogmesh_proto::{
    FederateReply, FederateRequest, FederationChunk, FederationHeader, SiteEvaluationReply,
    SiteWork,
};
use futures::Stream;
use ractor::rpc::CallResult;
use tonic::{Request, Response, Status, Streaming};

use super::{
    chunks, client, distill_from, receive, shared_from, with_key, work_from, SiteCallError,
};
use crate::cluster_key::{self, ClusterKey};
use crate::deployment::view::lock;
use crate::services::MeshView;

/// Marks a `Federate` one node passed on: the node it reaches runs it or refuses, and
/// never passes it further, so two nodes whose views differ cannot pass it back and
/// forth.
const PASSED_ON: &str = "fogmesh-passed-on";

/// Longest a `Federate` passed on waits for a new coordinator after losing one.
const REPLACEMENT_WAIT: Duration = Duration::from_secs(90);

/// A federation's shared windows as last received: their digest and the windows.
type HeldShared = (String, Arc<Vec<ReplayItem>>);

#[derive(Clone)]
pub(crate) struct FederationService {
    node_name: String,
    node: Node,
    key: Option<ClusterKey>,
    mesh: Option<MeshView>,
    /// Each federation's shared windows, kept so later distillation rounds need not
    /// carry them again.
    pub(super) shared: Arc<DashMap<String, HeldShared>>,
}

impl FederationService {
    pub(crate) fn new(
        node_name: String,
        node: Node,
        key: Option<ClusterKey>,
        mesh: Option<MeshView>,
    ) -> Self {
        FederationService {
            node_name,
            node,
            key,
            mesh,
            shared: Arc::new(DashMap::new()),
        }
    }

    fn check_key<T>(&self, request: &Request<T>) -> Result<(), SiteCallError> {
        match &self.key {
            Some(key) if !cluster_key::carries_key(request, key) => Err(SiteCallError::WrongKey),
            _ => Ok(()),
        }
    }

    /// A distillation round's shared windows: those it carries, kept for the rounds
    /// after; or, when it carries none but names a digest, those received before.
    fn shared_windows(
        &self,
        federation: &str,
        work: &SiteWork,
        bytes: &[u8],
    ) -> Result<Arc<Vec<ReplayItem>>, SiteCallError> {
        if bytes.is_empty() && !work.shared_sha256.is_empty() {
            return self
                .shared
                .get(federation)
                .filter(|held| held.0 == work.shared_sha256)
                .map(|held| held.1.clone())
                .ok_or_else(|| SiteCallError::SharedUnknown {
                    federation: federation.into(),
                    sha256: work.shared_sha256.clone(),
                });
        }
        let windows = Arc::new(shared_from(work, bytes)?);
        let digest = fogmesh_models::weights::sha256_hex(bytes);
        self.shared
            .insert(federation.to_string(), (digest, windows.clone()));
        Ok(windows)
    }

    /// This node's site of `federation`, or with `aggregate` its fog aggregator.
    fn site(&self, federation: &str, aggregate: bool) -> Result<Site, SiteCallError> {
        let directory = &self.node.directory;
        let found = if aggregate {
            directory
                .aggregators
                .get(federation)
                .map(|a| Site::Aggregator(a.clone()))
        } else {
            directory
                .sites
                .get(federation)
                .map(|s| Site::Trainer(s.clone()))
        };
        found.ok_or_else(|| SiteCallError::NoSite {
            node: self.node_name.clone(),
            federation: federation.into(),
        })
    }

    /// Runs a round on the coordinator here, or passes it to the coordinator's node
    /// (unless it was passed here). A coordinator lost mid-round (its node died, or it
    /// was restarted) stored nothing: the round is passed again to whichever node is
    /// placed now, here included, once one answers.
    async fn federate(
        &self,
        expert: &str,
        passed_on: bool,
    ) -> Result<FederateReply, SiteCallError> {
        let started = Instant::now();
        let no_coordinator = |reason: String| SiteCallError::NoCoordinator {
            expert: expert.into(),
            reason,
        };
        loop {
            let waited_enough = started.elapsed() >= REPLACEMENT_WAIT;
            let local = self
                .node
                .directory
                .coordinators
                .get(expert)
                .map(|c| c.clone());
            if let Some(coordinator) = local {
                match coordinator
                    .call(|reply| FederatedCoordinatorMsg::Round { reply }, None)
                    .await
                {
                    Ok(CallResult::Success(round)) => {
                        let round = round.map_err(|e| SiteCallError::Round(Box::new(e)))?;
                        return Ok(FederateReply {
                            round_json: serde_json::to_string(&round).unwrap_or_default(),
                            coordinator: self.node_name.clone(),
                        });
                    }
                    _ if !passed_on && !waited_enough => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                    _ => {
                        return Err(SiteCallError::Unanswered {
                            callee: "coordinator",
                        })
                    }
                }
            }
            let Some(mesh) = self.mesh.as_ref() else {
                return Err(no_coordinator(format!(
                    "node `{}` is in no mesh",
                    self.node_name
                )));
            };
            if passed_on {
                return Err(no_coordinator(format!(
                    "node `{}` does not coordinate it (yet)",
                    self.node_name
                )));
            }
            let placed = lock(&mesh.deployment).federations.get(expert).cloned();
            let target = match placed {
                None => {
                    return Err(no_coordinator(
                        "the mesh spec has no [experts.federation] for it, or no node coordinates it yet".into(),
                    ))
                }
                // Placed here, and starting.
                Some(target) if target == self.node_name => {
                    if waited_enough {
                        return Err(no_coordinator(format!(
                            "node `{}` was placed to coordinate it but did not start within {REPLACEMENT_WAIT:?}",
                            self.node_name
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                Some(target) => target,
            };
            let addr = mesh
                .membership
                .members()
                .get(&target)
                .map(|m| m.card.grpc.clone());
            let outcome = match addr {
                Some(addr) => pass_on(&mesh.dialer, &addr, expert).await,
                None => Err(SiteCallError::Connect {
                    addr: target.clone(),
                    reason: "not a live member".into(),
                }),
            };
            match outcome {
                Err(e) if retried(&e) && !waited_enough => {
                    tracing::warn!(%expert, coordinator = %target, error = %e, "federated round not run; passing it again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }
}

/// Whether a round passed on was lost with its coordinator (or met none yet) rather
/// than answered.
fn retried(error: &SiteCallError) -> bool {
    let code = error.code();
    code == tonic::Code::NotFound
        || code == tonic::Code::Unavailable
        || matches!(error, SiteCallError::Status(s) if matches!(s.code(), tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal))
}

/// The answer of a call that was answered.
fn answered<T>(result: CallResult<T>) -> Option<T> {
    match result {
        CallResult::Success(answer) => Some(answer),
        _ => None,
    }
}

async fn pass_on(
    dialer: &crate::dialer::Dialer,
    addr: &str,
    expert: &str,
) -> Result<FederateReply, SiteCallError> {
    let mut client = client(dialer, addr).await?;
    let mut request = Request::new(FederateRequest {
        expert: expert.into(),
    });
    with_key(dialer, &mut request);
    request.metadata_mut().insert(
        PASSED_ON,
        tonic::metadata::AsciiMetadataValue::from_static("1"),
    );
    client
        .federate(request)
        .await
        .map(Response::into_inner)
        .map_err(|status| match status.code() {
            tonic::Code::Unavailable => SiteCallError::Connect {
                addr: addr.into(),
                reason: status.message().into(),
            },
            _ => SiteCallError::Status(status),
        })
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<FederationChunk, Status>> + Send>>;

#[tonic::async_trait]
impl FederationRpc for FederationService {
    type TrainStream = ChunkStream;

    async fn train(
        &self,
        request: Request<Streaming<FederationChunk>>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.check_key(&request)?;
        let (header, mut blobs) = receive(request.into_inner()).await?;
        let wire_work = header.work.clone().unwrap_or_default();
        let mut work = work_from(&wire_work)?;
        let expected = if wire_work.distill_weight.is_some() {
            3
        } else {
            1
        };
        if blobs.len() != expected {
            return Err(SiteCallError::Invalid {
                field: "header.blobs",
                value: blobs.len().to_string(),
                reason: format!(
                    "a Train carries the global weights (and, distilling, the shared windows and the consensus): {expected} blobs"
                ),
            }
            .into());
        }
        if expected == 3 {
            let shared = self.shared_windows(&header.federation, &wire_work, &blobs[1])?;
            work.distill = distill_from(&wire_work, shared, &blobs[2])?;
        }
        let global = Arc::new(blobs.remove(0));
        let (round, work) = (header.round, Arc::new(work));
        let answered = match self.site(&header.federation, header.aggregate)? {
            Site::Trainer(site) => site
                .call(
                    |reply| SiteTrainerMsg::Train {
                        round,
                        global,
                        work,
                        reply,
                    },
                    None,
                )
                .await
                .map_or(None, answered),
            Site::Aggregator(aggregator) => aggregator
                .call(
                    |reply| FederatedCoordinatorMsg::Aggregate {
                        round,
                        global,
                        work,
                        reply,
                    },
                    None,
                )
                .await
                .map_or(None, answered),
        };
        let report: SiteReport = answered
            .ok_or_else(|| SiteCallError::Unanswered { callee: "site" })?
            .map_err(|e| SiteCallError::Site(Box::new(e)))?;
        let answer = FederationHeader {
            federation: header.federation,
            round: report.round,
            site: self.node_name.clone(),
            samples: report.samples,
            loss: report.loss,
            compute_s: report.compute.as_secs_f64(),
            compression: report.update.compression.to_string(),
            values: report.update.len as u64,
            ..Default::default()
        };
        let stream = futures::StreamExt::map(
            chunks(answer, vec![Arc::new(report.update.bytes)]),
            Ok::<_, Status>,
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn evaluate(
        &self,
        request: Request<Streaming<FederationChunk>>,
    ) -> Result<Response<SiteEvaluationReply>, Status> {
        self.check_key(&request)?;
        let (header, blobs) = receive(request.into_inner()).await?;
        let weights = blobs.into_iter().map(Arc::new).collect();
        let answered = match self.site(&header.federation, header.aggregate)? {
            Site::Trainer(site) => site
                .call(|reply| SiteTrainerMsg::Evaluate { weights, reply }, None)
                .await
                .map_or(None, answered),
            Site::Aggregator(aggregator) => aggregator
                .call(
                    |reply| FederatedCoordinatorMsg::Evaluate { weights, reply },
                    None,
                )
                .await
                .map_or(None, answered),
        };
        let evaluation: SiteEvaluation = answered
            .ok_or_else(|| SiteCallError::Unanswered { callee: "site" })?
            .map_err(|e| SiteCallError::Site(Box::new(e)))?;
        Ok(Response::new(SiteEvaluationReply {
            site: self.node_name.clone(),
            losses: evaluation.losses,
            windows: evaluation.windows,
        }))
    }

    async fn federate(
        &self,
        request: Request<FederateRequest>,
    ) -> Result<Response<FederateReply>, Status> {
        // Like `Control`'s calls: an operator's CLI has no mesh key; over TLS the
        // authorization layer admits operators and nodes only.
        let passed_on = request.metadata().contains_key(PASSED_ON);
        let expert = request.into_inner().expert;
        Ok(Response::new(self.federate(&expert, passed_on).await?))
    }
}
