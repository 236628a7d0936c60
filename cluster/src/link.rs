//! The cluster link: ractor_cluster sessions carried over one gRPC bidirectional
//! stream (`ClusterLink.Open`), so a node's single gRPC port carries its services and
//! its actor traffic alike.
//!
//! ractor_cluster frames its protocol (u64 length + protobuf) inside a byte stream and
//! accepts any stream through `ClusterBidiStream`; this module makes one from a tonic
//! stream of `LinkFrame` chunks. Why gRPC and not ractor's own TCP: HTTP/2 keepalive
//! pings notice a peer that went silent (a cut cable, a partition that drops packets
//! without a reset) in [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`], where plain TCP
//! notices nothing for minutes; and one port is one firewall rule per node.
//!
//! Admission: a dialer sends its node name and [`ClusterKey`] (a digest of the
//! cluster secret) as request metadata. A key that does not match is refused with
//! `PERMISSION_DENIED` before a single ractor byte flows, and both sides log it, so a
//! node with the wrong secret never sees an actor. The key is a fingerprint for a clear
//! refusal, not the authentication: ractor_cluster's challenge-response on the secret
//! itself follows inside the stream.
//!
//! Outbound chunks are at most [`MAX_CHUNK`] bytes: ractor batches writes, and one
//! batch may exceed gRPC's message limit, which would otherwise kill the link.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fogmesh_proto::cluster_link_client::ClusterLinkClient;
use fogmesh_proto::cluster_link_server::ClusterLink;
use fogmesh_proto::{AdmitReply, AdmitRequest, LinkFrame};
use fogmesh_trust::PeerIdentity;
use futures::StreamExt;
use ractor::ActorRef;
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, NodeServerMessage};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::StreamReader;
use tokio_util::sync::PollSender;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::dialer::Dialer;
use crate::status::ServiceError;
use crate::telemetry;

/// Largest chunk of ractor bytes in one `LinkFrame`.
pub const MAX_CHUNK: usize = 256 * 1024;
/// HTTP/2 ping interval on cluster links (both directions).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the link is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 flow-control windows of cluster links (and the node's other gRPC streams):
/// hundreds of windows in flight on one link exceed the 64 KiB default, and a sender
/// waiting for a window update adds a round trip to every window behind it.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Longest a dial may take to get a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Metadata key carrying the dialer's node name.
pub const NODE_HEADER: &str = "fogmesh-node";
/// Metadata key carrying the dialer's [`ClusterKey`].
pub const KEY_HEADER: &str = "fogmesh-cluster-key";

/// A public fingerprint of the cluster secret: nodes compare it to refuse a node of
/// another mesh with a clear reason. Also the gossip cluster id. It is broadcast in
/// every gossip packet, so it grants nothing on a TLS mesh: there certificates and
/// roles decide, and it only guards against a node configured for another mesh.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(String);

impl ClusterKey {
    pub fn from_secret(secret: &str) -> ClusterKey {
        let digest = Sha256::digest(format!("fogmesh cluster key\0{secret}").as_bytes());
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        ClusterKey(format!("fogmesh-{hex}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a dial did not produce a link.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("{addr} refused the cluster link: {reason}")]
    Refused { addr: String, reason: String },
    #[error("the local cluster node server is gone: {0}")]
    Local(String),
}

/// One end of a cluster link, as ractor_cluster takes it.
struct LinkStream {
    reader: BoxRead,
    writer: BoxWrite,
    peer: String,
}

impl ClusterBidiStream for LinkStream {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        (self.reader, self.writer)
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.peer.clone())
    }
}

/// Writes ractor's bytes as chunks into a bounded channel: when the peer reads slowly
/// the channel fills and ractor's writer waits instead of piling frames up here.
struct FrameWriter<T: Send + 'static> {
    tx: PollSender<T>,
    wrap: fn(Vec<u8>) -> T,
}

impl<T: Send + 'static> AsyncWrite for FrameWriter<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if futures::ready!(self.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(MAX_CHUNK);
        let item = (self.wrap)(buf[..n].to_vec());
        self.tx
            .send_item(item)
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

/// The inbound half; on the dialing side it also holds the gRPC channel, so the
/// connection lives exactly as long as ractor reads from it.
struct Inbound {
    reader: BoxRead,
    _channel: Option<Channel>,
}

impl AsyncRead for Inbound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

fn inbound(frames: Streaming<LinkFrame>, channel: Option<Channel>) -> BoxRead {
    let bytes = frames.map(|frame| frame.map(|f| Bytes::from(f.data)).map_err(io::Error::other));
    Box::new(Inbound {
        reader: Box::new(StreamReader::new(bytes)),
        _channel: channel,
    })
}

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

/// Whether a call's metadata carries this mesh's key: the rule for every call that
/// changes a mesh node from outside (cluster links, model uploads).
pub(crate) fn carries_key<T>(request: &Request<T>, key: &ClusterKey) -> bool {
    request
        .metadata()
        .get(KEY_HEADER)
        .is_some_and(|v| fogmesh_trust::same_bytes(v.as_bytes(), key.as_str().as_bytes()))
}

/// Adds this node's name and key to a request.
pub(crate) fn introduce<T>(request: &mut Request<T>, key: &ClusterKey, node: &str) {
    if let Ok(value) = key.as_str().parse() {
        request.metadata_mut().insert(KEY_HEADER, value);
    }
    if let Ok(value) = node.parse() {
        request.metadata_mut().insert(NODE_HEADER, value);
    }
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

/// Asks a seed to admit this node; returns the seed's name. Called once per seed at
/// start, so a node with the wrong secret is told so at once, not left gossiping with
/// nobody.
pub async fn ask_admission(
    addr: &str,
    dialer: &Dialer,
    key: &ClusterKey,
    node: &str,
) -> Result<String, LinkError> {
    let connected = dialer.channel(addr).await?;
    let mut client = ClusterLinkClient::new(connected.channel);
    let mut request = Request::new(AdmitRequest {});
    introduce(&mut request, key, node);
    match client.admit(request).await {
        Ok(reply) => {
            let name = reply.into_inner().node;
            check_answered(addr, connected.peer.as_ref(), &name)?;
            Ok(name)
        }
        Err(status) if status.code() == tonic::Code::PermissionDenied => Err(LinkError::Refused {
            addr: addr.to_string(),
            reason: status.message().to_string(),
        }),
        Err(status) => Err(LinkError::Unreachable {
            addr: addr.to_string(),
            reason: status.message().to_string(),
        }),
    }
}

/// Dials `peer` at `addr` and hands the stream to the local node server. Returns once
/// the peer admitted the stream; ractor's handshake follows on its own (watch the node
/// server's session events for the result).
pub async fn dial(
    node_server: &ActorRef<NodeServerMessage>,
    addr: &str,
    peer: &str,
    dialer: &Dialer,
    key: &ClusterKey,
    node: &str,
) -> Result<(), LinkError> {
    let connected = dialer.channel(addr).await?;
    check_answered(addr, connected.peer.as_ref(), peer)?;
    let channel = connected.channel;
    let mut client = ClusterLinkClient::new(channel.clone());
    let (tx, rx) = mpsc::channel(64);
    let mut request = Request::new(ReceiverStream::new(rx));
    introduce(&mut request, key, node);
    let response = tokio::time::timeout(CONNECT_TIMEOUT, client.open(request))
        .await
        .map_err(|_| LinkError::Unreachable {
            addr: addr.to_string(),
            reason: format!("no answer to the link request within {CONNECT_TIMEOUT:?}"),
        })?
        .map_err(|status| {
            if status.code() == tonic::Code::PermissionDenied {
                LinkError::Refused {
                    addr: addr.to_string(),
                    reason: status.message().to_string(),
                }
            } else {
                LinkError::Unreachable {
                    addr: addr.to_string(),
                    reason: status.message().to_string(),
                }
            }
        })?;
    let stream = LinkStream {
        reader: inbound(response.into_inner(), Some(channel)),
        writer: Box::new(FrameWriter {
            tx: PollSender::new(tx),
            wrap: |data| LinkFrame { data },
        }),
        peer: peer.to_string(),
    };
    ractor_cluster::client_connect_external(node_server, Box::new(stream))
        .await
        .map_err(|e| LinkError::Local(format!("{e:?}")))
}

/// Over TLS, the node that answered at `addr` must hold the certificate of the node
/// it claims to be (`claimed`), so a member card with another node's address, or a
/// node answering for another, cannot take over that node's link.
fn check_answered(
    addr: &str,
    answered: Option<&PeerIdentity>,
    claimed: &str,
) -> Result<(), LinkError> {
    match answered {
        Some(identity) if identity.name != claimed => Err(LinkError::Refused {
            addr: addr.to_string(),
            reason: format!(
                "the node there holds the certificate of {identity}, not of {claimed:?}"
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_with_the_secret_and_not_otherwise() {
        assert_eq!(
            ClusterKey::from_secret("plant-7"),
            ClusterKey::from_secret("plant-7")
        );
        assert_ne!(
            ClusterKey::from_secret("plant-7"),
            ClusterKey::from_secret("plant-8")
        );
        assert!(!ClusterKey::from_secret("plant-7")
            .as_str()
            .contains("plant"));
    }
}
