//! The `ClusterLink` gRPC service: admits a dialing node (its key, its name, and over
//! TLS the name in its certificate) and hands each admitted stream to the local
//! ractor_cluster node server. The dialing side is [`crate::link`].
//!
//! A refusal is a [`ServiceError`], so it maps to a gRPC status in the one place
//! that does that ([`crate::status`]), and both sides log it.

use fogmesh_proto::cluster_link_server::ClusterLink;
use fogmesh_proto::{AdmitReply, AdmitRequest, LinkFrame};
use fogmesh_trust::PeerIdentity;
use ractor::ActorRef;
use ractor_cluster::NodeServerMessage;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster_key::{carries_key, ClusterKey, NODE_HEADER};
use crate::link::{inbound, FrameWriter, LinkStream};
use crate::status::ServiceError;
use crate::telemetry;

/// The `ClusterLink` service: hands every admitted stream to the local
/// ractor_cluster node server.
#[derive(Clone)]
pub struct ClusterLinkService {
    node_server: ActorRef<NodeServerMessage>,
    key: ClusterKey,
    node: String,
}

impl ClusterLinkService {
    pub fn new(node_server: ActorRef<NodeServerMessage>, key: ClusterKey, node: String) -> Self {
        ClusterLinkService {
            node_server,
            key,
            node,
        }
    }
}

/// Checks a caller's key; `what` names the call in the log line.
pub(crate) fn admit<T>(
    request: &Request<T>,
    key: &ClusterKey,
    node: &str,
    what: &str,
) -> Result<String, ServiceError> {
    let header = |name: &str| {
        request
            .metadata()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let peer = header(NODE_HEADER);
    let addr = request
        .remote_addr()
        .map_or_else(|| "an unknown address".to_string(), |a| a.to_string());
    if !carries_key(request, key) {
        tracing::warn!(peer = %peer, %addr, call = what, "refused a node whose cluster secret differs from this mesh's");
        metrics::counter!(telemetry::LINKS_REFUSED).increment(1);
        return Err(ServiceError::LinkRefused {
            node: node.to_string(),
            peer,
        });
    }
    if peer.is_empty() {
        return Err(ServiceError::UnnamedPeer);
    }
    // Over TLS the authorization layer put the caller's certificate identity here:
    // the name it dials as must be the name it was issued.
    if let Some(identity) = request.extensions().get::<PeerIdentity>() {
        if identity.name != peer {
            tracing::warn!(peer = %peer, certificate = %identity, %addr, call = what, "refused a node whose name differs from its certificate's");
            metrics::counter!(telemetry::LINKS_REFUSED).increment(1);
            return Err(ServiceError::NameNotCertified {
                claimed: peer,
                certified: identity.name.clone(),
            });
        }
    }
    Ok(peer)
}

type OutboundStream = ReceiverStream<Result<LinkFrame, Status>>;

#[tonic::async_trait]
impl ClusterLink for ClusterLinkService {
    type OpenStream = OutboundStream;

    async fn admit(&self, request: Request<AdmitRequest>) -> Result<Response<AdmitReply>, Status> {
        let peer = admit(&request, &self.key, &self.node, "admission")?;
        tracing::debug!(%peer, "admitted a node to the mesh");
        Ok(Response::new(AdmitReply {
            node: self.node.clone(),
        }))
    }

    async fn open(
        &self,
        request: Request<Streaming<LinkFrame>>,
    ) -> Result<Response<Self::OpenStream>, Status> {
        let peer = admit(&request, &self.key, &self.node, "cluster link")?;
        let (tx, rx) = mpsc::channel(64);
        let stream = LinkStream {
            reader: inbound(request.into_inner(), None),
            writer: Box::new(FrameWriter {
                tx: PollSender::new(tx),
                wrap: |data| Ok(LinkFrame { data }),
            }),
            peer,
        };
        self.node_server
            .cast(NodeServerMessage::ConnectionOpenedExternal {
                stream: Box::new(stream),
                is_server: true,
            })
            .map_err(|e| ServiceError::NodeStopping {
                node: self.node.clone(),
                source: e.map(drop),
            })?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
