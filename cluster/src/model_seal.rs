//! The mesh's signature policy over model versions, as a node applies it to its store.
//!
//! [`MeshSeal`] implements the store's [`ManifestSeal`] with the node's certificates:
//! a signature is trusted when the trust crate's [`SignatureCheck`] accepts it (the
//! signer's certificate chains to the mesh CA and its role is one of `[tls]
//! model_signers`), and the node signs what it makes itself (a learner's candidate, a
//! merge) with its own identity when its role is one of them. Every refusal, an
//! unsigned version included, is counted in `fogmesh_models_refused_total{reason}`
//! and leaves an audit line (target `fogmesh::audit`), so an operator sees a planted
//! or damaged version the moment a node meets it.

use std::fmt;

use fogmesh_models::store::{ManifestSeal, SealError};
use fogmesh_trust::signing::{ModelSigner, SignatureCheck, SignatureError, MANIFEST_PAYLOAD_TYPE};
use fogmesh_trust::{MeshTls, Role};

use crate::telemetry;

/// Why a version is refused or cannot be signed here.
#[derive(Debug, thiserror::Error)]
pub enum ModelSealError {
    #[error("it carries no signature, and this mesh serves signed versions only (sign it with `fogmesh models sign`)")]
    Unsigned,
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("node {node} has role {role}, and this mesh lets only {allowed} sign models")]
    NotASigner {
        node: String,
        role: Role,
        allowed: String,
    },
}

impl ModelSealError {
    /// A short label for counters and audit lines.
    pub fn reason(&self) -> &'static str {
        match self {
            ModelSealError::Unsigned => "unsigned",
            ModelSealError::Signature(e) => e.reason(),
            ModelSealError::NotASigner { .. } => "not_a_signer",
        }
    }
}

/// Counts a model version node `who` refused for `reason` and leaves its audit line:
/// every refusal of a version, by a seal or by a rollout, is recorded alike.
pub(crate) fn record_refusal(
    who: &str,
    model: &str,
    reason: &'static str,
    error: &dyn std::fmt::Display,
) {
    metrics::counter!(telemetry::MODELS_REFUSED, "reason" => reason).increment(1);
    tracing::warn!(target: "fogmesh::audit", %who, %model, outcome = "refused", reason, %error, "model version refused");
}

/// The roles that sign models in a mesh that does not say: operators, and every node
/// role, so that a learner's candidate or a merge made on a node serves without an
/// operator at hand. A stricter mesh names `["operator"]`.
pub const DEFAULT_MODEL_SIGNERS: [Role; 4] = [Role::Operator, Role::Edge, Role::Fog, Role::Cloud];

/// A node's signature policy; see the module doc.
pub struct MeshSeal {
    node: String,
    role: Role,
    check: SignatureCheck,
    signer: Option<ModelSigner>,
}

impl fmt::Debug for MeshSeal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshSeal")
            .field("node", &self.node)
            .field("signers", &self.check.allowed())
            .field("signs", &self.signer.is_some())
            .finish()
    }
}

impl MeshSeal {
    /// The policy of the node whose identity is `tls`, trusting `signers`. The node
    /// signs when its own role is among them, which needs an Ed25519 identity.
    pub fn new(tls: &MeshTls, signers: &[Role]) -> Result<MeshSeal, SignatureError> {
        let identity = tls.identity();
        let signer = if signers.contains(&identity.role) {
            Some(ModelSigner::from_tls(tls)?)
        } else {
            None
        };
        Ok(MeshSeal {
            node: identity.name.clone(),
            role: identity.role,
            check: SignatureCheck::new(tls, signers),
            signer,
        })
    }
}

impl ManifestSeal for MeshSeal {
    fn sign(&self, id: &str, statement: &[u8]) -> Result<Vec<u8>, SealError> {
        match &self.signer {
            Some(signer) => {
                tracing::info!(target: "fogmesh::audit", who = %signer.identity(), model = %id, outcome = "signed", "model signed");
                Ok(signer.sign(MANIFEST_PAYLOAD_TYPE, statement))
            }
            None => Err(Box::new(ModelSealError::NotASigner {
                node: self.node.clone(),
                role: self.role,
                allowed: self.check.allowed(),
            })),
        }
    }

    fn verify(
        &self,
        id: &str,
        statement: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<String, SealError> {
        let checked = match signature {
            None => Err(ModelSealError::Unsigned),
            Some(signature) => self
                .check
                .verify(MANIFEST_PAYLOAD_TYPE, statement, signature)
                .map_err(ModelSealError::from),
        };
        match checked {
            Ok(signer) => Ok(signer.name),
            Err(error) => {
                record_refusal(&self.node, id, error.reason(), &error);
                Err(Box::new(error))
            }
        }
    }
}
