//! How a node, or the `fogmesh` CLI, calls a node: over mutual TLS with its own
//! certificate, or in plaintext where the mesh is set `insecure = true`; either way
//! with the gRPC settings of cluster links (keepalive, windows, connect timeout).
//!
//! Every outbound gRPC connection of fogmesh goes through [`Dialer::channel`], so
//! there is one place that decides how the mesh's traffic is protected.

use std::net::IpAddr;
use std::time::Duration;

use fogmesh_trust::{MeshTls, PeerIdentity};
use tonic::transport::{Channel, Endpoint};

use crate::cluster_key::ClusterKey;

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

/// A caller's way onto other nodes' gRPC ports. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Dialer {
    tls: Option<MeshTls>,
    /// Sent as `fogmesh-cluster-key` metadata on model-store calls, for nodes that
    /// still check it (plaintext meshes); TLS nodes go by the certificate's role.
    key: Option<ClusterKey>,
    /// The local address outgoing connections leave from (`[cluster] dial_from`);
    /// the operating system's choice when `None`.
    source: Option<IpAddr>,
}

/// A connected channel and, over TLS, the node that answered.
pub struct Connected {
    pub channel: Channel,
    /// The identity in the server's certificate; `None` in plaintext.
    pub peer: Option<PeerIdentity>,
}

impl Dialer {
    /// Mutual TLS when `tls` is given, plaintext otherwise; `key` is the mesh's
    /// key where the caller knows it.
    pub fn new(tls: Option<MeshTls>, key: Option<ClusterKey>) -> Dialer {
        Dialer {
            tls,
            key,
            source: None,
        }
    }

    /// The same dialer, its connections leaving from `source` (or from the address
    /// the operating system picks, with `None`).
    pub fn dialing_from(self, source: Option<IpAddr>) -> Dialer {
        Dialer { source, ..self }
    }

    /// The mesh key this dialer presents, if any.
    pub fn key(&self) -> Option<&ClusterKey> {
        self.key.as_ref()
    }

    /// Connects to the node at `addr` ("host:port").
    /// A scheme in front (`http://`, `https://`) is ignored: TLS is this dialer's choice.
    pub async fn channel(&self, addr: &str) -> Result<Connected, LinkError> {
        let addr = addr
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        let unreachable = |reason: String| LinkError::Unreachable {
            addr: addr.to_string(),
            reason,
        };
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .tcp_nodelay(true)
            .local_address(self.source);
        let connected = match &self.tls {
            Some(tls) => tls
                .connect(&endpoint, self.source)
                .await
                .map(|(channel, peer)| Connected {
                    channel,
                    peer: Some(peer),
                }),
            None => endpoint.connect().await.map(|channel| Connected {
                channel,
                peer: None,
            }),
        };
        connected.map_err(|e| {
            let mut reason = format!("{e}: {}", source_chain(&e));
            if self.tls.is_none() {
                reason.push_str(
                    " (dialled in plaintext: a node with [tls] needs a certificate, \
                     --ca/--cert/--key or FOGMESH_CA/FOGMESH_CERT/FOGMESH_KEY)",
                );
            }
            unreachable(reason)
        })
    }
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut source = error.source();
    while let Some(e) = source {
        out.push(e.to_string());
        source = e.source();
    }
    out.join(": ")
}
