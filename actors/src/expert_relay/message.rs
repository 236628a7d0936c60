//! What crosses nodes to and from an [`super::ExpertRelay`]: its message and the
//! process group it joins. Apart from the actor, which scores through the router's
//! [`crate::Replicas`], so that routers can ask relays without depending on it.

use ractor::RpcReplyPort;
use ractor_cluster::RactorClusterMessage;

/// The process-group scope relays join.
pub const RELAY_SCOPE: &str = "fogmesh.relays";
/// The one group of [`RELAY_SCOPE`]: every gateway's relay, whatever its zones.
pub const RELAY_GROUP: &str = "gateways";
/// Relays a window may pass through on its way to a replica: a cell, its area, the
/// site and the cloud are three conduits apart, with one to spare.
pub const MAX_RELAY_HOPS: u8 = 4;

/// Messages routers and relays on other nodes send. Adding variants is
/// wire-compatible; renaming or reordering fields is not.
#[derive(RactorClusterMessage)]
pub enum ExpertRelayMsg {
    /// `(expert, sensor id, window sequence, [channels, length], channel-major values,
    /// relay hops left)` → [`crate::expert_endpoint::encode_verdict`] bytes.
    #[rpc]
    Score(
        String,
        String,
        u64,
        Vec<u32>,
        Vec<f32>,
        u8,
        RpcReplyPort<Vec<u8>>,
    ),
}
