//! The cluster link: ractor_cluster sessions carried over one gRPC bidirectional
//! stream (`ClusterLink.Open`), so a node's single gRPC port carries its services and
//! its actor traffic alike.
//!
//! ractor_cluster frames its protocol (u64 length + protobuf) inside a byte stream and
//! accepts any stream through `ClusterBidiStream`; this module makes one from a tonic
//! stream of `LinkFrame` chunks. Why gRPC and not ractor's own TCP: HTTP/2 keepalive
//! pings notice a peer that went silent (a cut cable, a partition that drops packets
//! without a reset) in [`KEEPALIVE_INTERVAL`](crate::dialer::KEEPALIVE_INTERVAL) +
//! [`KEEPALIVE_TIMEOUT`](crate::dialer::KEEPALIVE_TIMEOUT), where plain TCP
//! notices nothing for minutes; and one port is one firewall rule per node.
//!
//! This module is the dialing side and the stream both sides share. Admission: a
//! dialer sends its node name and [`ClusterKey`] (a digest of the cluster secret) as
//! request metadata; the service ([`crate::link_service`]) refuses a key that does
//! not match with `PERMISSION_DENIED` before a single ractor byte flows, and both
//! sides log it, so a node with the wrong secret never sees an actor. The key is a
//! fingerprint for a clear refusal, not the authentication: ractor_cluster's
//! challenge-response on the secret itself follows inside the stream.
//!
//! Outbound chunks are at most [`MAX_CHUNK`] bytes: ractor batches writes, and one
//! batch may exceed gRPC's message limit, which would otherwise kill the link.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use fogmesh_proto::cluster_link_client::ClusterLinkClient;
use fogmesh_proto::{AdmitRequest, LinkFrame};
use fogmesh_trust::PeerIdentity;
use futures::StreamExt;
use ractor::ActorRef;
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, NodeServerMessage};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::StreamReader;
use tokio_util::sync::PollSender;
use tonic::transport::Channel;
use tonic::{Request, Streaming};

use crate::cluster_key::{introduce, ClusterKey};
use crate::dialer::{Dialer, LinkError, CONNECT_TIMEOUT};

/// Largest chunk of ractor bytes in one `LinkFrame`.
pub const MAX_CHUNK: usize = 256 * 1024;

/// One end of a cluster link, as ractor_cluster takes it.
pub(crate) struct LinkStream {
    pub(crate) reader: BoxRead,
    pub(crate) writer: BoxWrite,
    pub(crate) peer: String,
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
pub(crate) struct FrameWriter<T: Send + 'static> {
    pub(crate) tx: PollSender<T>,
    pub(crate) wrap: fn(Vec<u8>) -> T,
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

pub(crate) fn inbound(frames: Streaming<LinkFrame>, channel: Option<Channel>) -> BoxRead {
    let bytes = frames.map(|frame| frame.map(|f| Bytes::from(f.data)).map_err(io::Error::other));
    Box::new(Inbound {
        reader: Box::new(StreamReader::new(bytes)),
        _channel: channel,
    })
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
