//! The mesh's key and the metadata a node introduces itself with on every call that
//! changes another node (cluster links, model copies): its name in
//! [`NODE_HEADER`] and the [`ClusterKey`] in [`KEY_HEADER`].
//!
//! The key is a fingerprint for a clear refusal, not the authentication: on a TLS mesh
//! certificates and roles decide, and ractor_cluster's challenge-response on the secret
//! itself follows inside a cluster link. It sits below every other module of the
//! mesh, so the dialer, gossip and the services can all name it without importing
//! each other.

use sha2::{Digest, Sha256};
use tonic::Request;

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
