//! `RemoteSite`: a site on another node, as the coordinator sees it.
//!
//! **Owns** nothing but the site's name and address. **Takes** the messages of a
//! local `SiteTrainer` ([`SiteTrainerMsg`]), so a coordinator calls sites here and
//! elsewhere alike: `Train` streams the global weights to the site's node
//! (`Federation/Train`, in chunks; a distillation round adds the consensus, and the
//! shared windows until the site has answered a round with them) and reads back its report and encoded update (or outputs);
//! `Evaluate` streams the weights judged and reads back the losses. With `aggregate`
//! the calls go to the node's fog aggregator of the federation, which runs them over
//! its group's sites. Each call runs in
//! its own task, so a site that is slow to answer one round does not hold back the
//! next message. **Supervised by** the deployment loop, which starts one per remote
//! site when it starts a coordinator and stops them with it. **On failure**: a node
//! that cannot be reached or refuses is answered as [`TrainingError::Remote`]; the
//! coordinator counts the site failed for that round.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogmesh_actors::{SiteEvaluation, SiteReport, SiteTrainerMsg, TrainingError};
use fogmesh_models::federated::EncodedUpdate;
use fogmesh_proto::FederationHeader;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tonic::Request;

use super::{chunks, client, f32_bytes, receive, with_key, work_to, SiteCallError};
use crate::dialer::Dialer;
use crate::membership::Membership;

pub struct RemoteSite;

pub struct RemoteSiteArgs {
    /// The site's node.
    pub site: String,
    /// Its gRPC address when the coordinator started.
    pub addr: String,
    /// Where a newer address is gossiped (the node restarted elsewhere), read at each
    /// call.
    pub membership: Option<Arc<Membership>>,
    pub federation: String,
    /// The node's fog aggregator of the federation rather than its own site.
    pub aggregate: bool,
    pub dialer: Dialer,
}

pub struct RemoteSiteState {
    site: Arc<str>,
    addr: Arc<str>,
    membership: Option<Arc<Membership>>,
    federation: Arc<str>,
    aggregate: bool,
    dialer: Dialer,
    /// The digest of the shared windows the site answered a round with: it holds them.
    shared_held: Arc<Mutex<Option<String>>>,
}

impl RemoteSiteState {
    fn addr(&self) -> String {
        self.membership
            .as_ref()
            .and_then(|m| m.members().get(&*self.site).map(|m| m.card.grpc.clone()))
            .unwrap_or_else(|| self.addr.to_string())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.shared_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn failed(&self, error: SiteCallError) -> TrainingError {
        TrainingError::Remote {
            site: self.site.to_string(),
            source: Box::new(error),
        }
    }

    /// One `Train`. A distillation round's shared windows go down only while the site is
    /// not known to hold them; when it no longer does (its node restarted), they go
    /// again at once.
    async fn train(
        &self,
        round: u64,
        global: Arc<Vec<u8>>,
        work: &fogmesh_actors::RoundWork,
    ) -> Result<SiteReport, SiteCallError> {
        let shared = work.distill.as_ref().map(|distill| {
            let bytes = f32_bytes(distill.shared.iter().flat_map(|w| w.window.iter().copied()));
            let digest = fogmesh_models::weights::sha256_hex(&bytes);
            (Arc::new(bytes), digest)
        });
        let held = shared
            .as_ref()
            .is_some_and(|(_, digest)| self.held().as_ref() == Some(digest));
        let answer = match self
            .send_train(round, &global, work, shared.as_ref(), held)
            .await
        {
            Err(SiteCallError::Status(status))
                if held && status.code() == tonic::Code::FailedPrecondition =>
            {
                self.send_train(round, &global, work, shared.as_ref(), false)
                    .await
            }
            answer => answer,
        };
        if let (Ok(_), Some((_, digest))) = (&answer, &shared) {
            *self.held() = Some(digest.clone());
        }
        answer
    }

    async fn send_train(
        &self,
        round: u64,
        global: &Arc<Vec<u8>>,
        work: &fogmesh_actors::RoundWork,
        shared: Option<&(Arc<Vec<u8>>, String)>,
        held: bool,
    ) -> Result<SiteReport, SiteCallError> {
        let mut client = client(&self.dialer, &self.addr()).await?;
        let mut site_work = work_to(work);
        let blobs = match (&work.distill, shared) {
            (Some(distill), Some((bytes, digest))) => {
                site_work.shared_sha256 = digest.clone();
                vec![
                    global.clone(),
                    if held {
                        Arc::new(Vec::new())
                    } else {
                        bytes.clone()
                    },
                    Arc::new(f32_bytes(distill.consensus.iter().copied())),
                ]
            }
            _ => vec![global.clone()],
        };
        let header = FederationHeader {
            federation: self.federation.to_string(),
            round,
            work: Some(site_work),
            aggregate: self.aggregate,
            ..Default::default()
        };
        let mut request = Request::new(chunks(header, blobs));
        with_key(&self.dialer, &mut request);
        let answer = client
            .train(request)
            .await
            .map_err(SiteCallError::Status)?
            .into_inner();
        let (header, mut blobs) = receive(answer).await?;
        if blobs.len() != 1 {
            return Err(SiteCallError::Invalid {
                field: "header.blobs",
                value: blobs.len().to_string(),
                reason: "a site answers with its update alone: one blob".into(),
            });
        }
        let compression = header.compression.parse().map_err(
            |e: fogmesh_models::federated::FederatedError| SiteCallError::Invalid {
                field: "header.compression",
                value: header.compression.clone(),
                reason: e.to_string(),
            },
        )?;
        Ok(SiteReport {
            site: self.site.clone(),
            round: header.round,
            update: EncodedUpdate {
                compression,
                len: header.values as usize,
                bytes: blobs.remove(0),
            },
            samples: header.samples,
            loss: header.loss,
            compute: Duration::try_from_secs_f64(header.compute_s).unwrap_or_default(),
        })
    }

    async fn evaluate(&self, weights: Vec<Arc<Vec<u8>>>) -> Result<SiteEvaluation, SiteCallError> {
        let mut client = client(&self.dialer, &self.addr()).await?;
        let header = FederationHeader {
            federation: self.federation.to_string(),
            aggregate: self.aggregate,
            ..Default::default()
        };
        let mut request = Request::new(chunks(header, weights));
        with_key(&self.dialer, &mut request);
        let reply = client
            .evaluate(request)
            .await
            .map_err(SiteCallError::Status)?
            .into_inner();
        Ok(SiteEvaluation {
            losses: reply.losses,
            windows: reply.windows,
        })
    }

    fn copy(&self) -> RemoteSiteState {
        RemoteSiteState {
            site: self.site.clone(),
            addr: self.addr.clone(),
            membership: self.membership.clone(),
            federation: self.federation.clone(),
            aggregate: self.aggregate,
            dialer: self.dialer.clone(),
            shared_held: self.shared_held.clone(),
        }
    }
}

impl Actor for RemoteSite {
    type Msg = SiteTrainerMsg;
    type State = RemoteSiteState;
    type Arguments = RemoteSiteArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: RemoteSiteArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(RemoteSiteState {
            site: args.site.as_str().into(),
            addr: args.addr.as_str().into(),
            membership: args.membership,
            federation: args.federation.as_str().into(),
            aggregate: args.aggregate,
            dialer: args.dialer,
            shared_held: Arc::default(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let state = state.copy();
        match message {
            SiteTrainerMsg::Train {
                round,
                global,
                work,
                reply,
            } => {
                tokio::spawn(async move {
                    let answer = state
                        .train(round, global, &work)
                        .await
                        .map_err(|e| state.failed(e));
                    let _ = reply.send(answer);
                });
            }
            SiteTrainerMsg::Evaluate { weights, reply } => {
                tokio::spawn(async move {
                    let answer = state.evaluate(weights).await.map_err(|e| state.failed(e));
                    let _ = reply.send(answer);
                });
            }
            // Windows stay on the site's own node: nothing to observe here.
            SiteTrainerMsg::Observed(_) => {}
        }
        Ok(())
    }
}
