//! Signatures over what a mesh must not take on trust: model versions.
//!
//! A signature is an envelope in the spirit of DSSE (the format OpenSSF model signing
//! builds on): a payload type, a payload, and signatures over the pre-authentication
//! encoding `DSSEv1 <len(type)> <type> <len(payload)> <payload>`, so a signature made
//! for one kind of payload can never be replayed as another, nor as a TLS handshake
//! signature. The payload is a [`Statement`]: the subject's bytes (for a model, its
//! manifest, which carries the weights' sha256), the signer's name and when it
//! signed.
//!
//! Signers are the mesh's own identities: every key `fogmesh ca issue` writes is
//! Ed25519, so an operator, or a node whose role the mesh's policy lets sign, signs
//! with the key it already speaks TLS with and puts its certificate in the envelope.
//! A verifier ([`SignatureCheck`]) trusts a signature when the certificate chains to
//! the mesh CA as of the signing time, its role is one the policy names, the name
//! matches the statement's, and the signature verifies strictly (`verify_strict`:
//! no small-order keys, no malleable encodings). Expired signer certificates thus
//! keep their old signatures valid; revocation is not built yet.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{MeshTls, PeerIdentity, Role};

/// The payload type of a signed model manifest.
pub const MANIFEST_PAYLOAD_TYPE: &str = "application/vnd.fogmesh.model-manifest+json";

/// Most signatures one envelope may carry: more is an attempt to make a verifier work.
const MAX_SIGNATURES: usize = 8;

/// Why a signature is not trusted. [`SignatureError::reason`] is the short label
/// metrics and audit lines use.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature envelope is malformed: {reason}")]
    Malformed { reason: String },
    #[error("the signature covers other content than this version (tampered with or a signature of another version)")]
    SubjectMismatch,
    #[error("the signer's certificate ({signer}) was not issued by the mesh CA or was not valid when it signed: {source}")]
    UnknownSigner {
        signer: String,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "{signer} signed as role {role}, and this mesh trusts model signatures only from {allowed}"
    )]
    SignerRole {
        signer: String,
        role: Role,
        allowed: String,
    },
    #[error("the signature of {signer} does not verify: {source}")]
    BadSignature {
        signer: String,
        #[source]
        source: ed25519_dalek::SignatureError,
    },
    #[error("{what} is not an Ed25519 identity ({reason}); issue it again with `fogmesh ca issue` to sign models")]
    NotEd25519 { what: String, reason: String },
}

impl SignatureError {
    /// A short label for counters and audit lines.
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::Malformed { .. } => "malformed",
            SignatureError::SubjectMismatch => "tampered",
            SignatureError::UnknownSigner { .. } => "unknown_signer",
            SignatureError::SignerRole { .. } => "signer_role",
            SignatureError::BadSignature { .. } => "bad_signature",
            SignatureError::NotEd25519 { .. } => "not_ed25519",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Envelope {
    payload_type: String,
    /// Base64 of the JSON [`Statement`].
    payload: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeSignature {
    /// The signer's name, as its certificate gives it.
    keyid: String,
    /// Base64 of the 64-byte Ed25519 signature over the pre-authentication encoding.
    sig: String,
    /// The signer's certificate, PEM.
    cert: String,
}

/// What is signed: the subject and who signed it when.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Statement {
    /// Base64 of the subject's bytes.
    subject: String,
    signer: String,
    /// Microseconds since the Unix epoch.
    signed_at_us: u64,
}

/// DSSE's pre-authentication encoding.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut message = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    message.extend_from_slice(payload);
    message
}

/// Parses a certificate once for both its key and its identity.
fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, SignatureError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| SignatureError::Malformed {
            reason: format!("{what}: unreadable X.509: {e}"),
        })
}

/// The Ed25519 key in a certificate, or why there is none.
fn certificate_key(cert: &X509Certificate<'_>, what: &str) -> Result<VerifyingKey, SignatureError> {
    let not_ed25519 = |reason: String| SignatureError::NotEd25519 {
        what: what.to_string(),
        reason,
    };
    let spki = cert.public_key();
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
        return Err(not_ed25519(format!(
            "its key algorithm is {}",
            spki.algorithm.algorithm
        )));
    }
    let bytes: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| not_ed25519("its key is not 32 bytes".into()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| not_ed25519(e.to_string()))
}

/// An identity that signs: its certificate and Ed25519 key.
pub struct ModelSigner {
    identity: PeerIdentity,
    cert_pem: String,
    key: SigningKey,
}

impl std::fmt::Debug for ModelSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is never printed.
        f.debug_struct("ModelSigner")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl ModelSigner {
    /// The signer of a loaded TLS identity; its key must be Ed25519 and belong to
    /// its certificate.
    pub fn from_tls(tls: &MeshTls) -> Result<ModelSigner, SignatureError> {
        let (cert_pem, key_pem) = tls.pem();
        let what = format!("the identity of {}", tls.identity().name);
        let not_ed25519 = |reason: String| SignatureError::NotEd25519 {
            what: what.clone(),
            reason,
        };
        let key = match PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) {
            Ok(PrivateKeyDer::Pkcs8(der)) => SigningKey::from_pkcs8_der(der.secret_pkcs8_der())
                .map_err(|e| not_ed25519(format!("its key: {e}")))?,
            _ => return Err(not_ed25519("its key is not PKCS#8".into())),
        };
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| not_ed25519(format!("its certificate: {e}")))?;
        if certificate_key(&parse(&der, &what)?, &what)? != key.verifying_key() {
            return Err(not_ed25519(
                "its key does not belong to its certificate".into(),
            ));
        }
        Ok(ModelSigner {
            identity: tls.identity().clone(),
            cert_pem: cert_pem.to_string(),
            key,
        })
    }

    /// Who signs.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// An envelope signing `subject` as `payload_type`, now.
    pub fn sign(&self, payload_type: &str, subject: &[u8]) -> Vec<u8> {
        let signed_at_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let statement = Statement {
            subject: BASE64.encode(subject),
            signer: self.identity.name.clone(),
            signed_at_us,
        };
        let payload = serde_json::to_vec(&statement).expect("a statement serialises");
        let signature = self.key.sign(&pae(payload_type, &payload));
        let envelope = Envelope {
            payload_type: payload_type.to_string(),
            payload: BASE64.encode(&payload),
            signatures: vec![EnvelopeSignature {
                keyid: self.identity.name.clone(),
                sig: BASE64.encode(signature.to_bytes()),
                cert: self.cert_pem.clone(),
            }],
        };
        serde_json::to_vec_pretty(&envelope).expect("an envelope serialises")
    }
}

/// A mesh's policy for signatures: which CA, and which roles may sign.
#[derive(Clone)]
pub struct SignatureCheck {
    verifier: Arc<dyn ClientCertVerifier>,
    signers: Vec<Role>,
}

impl std::fmt::Debug for SignatureCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignatureCheck")
            .field("signers", &self.signers)
            .finish_non_exhaustive()
    }
}

impl SignatureCheck {
    /// Trusts signatures of `signers` roles whose certificates chain to the CA `tls`
    /// trusts.
    pub fn new(tls: &MeshTls, signers: &[Role]) -> SignatureCheck {
        SignatureCheck {
            verifier: tls.verifier(),
            signers: signers.to_vec(),
        }
    }

    /// The roles whose signatures this check trusts, as a list for messages.
    pub fn allowed(&self) -> String {
        self.signers
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks that `envelope` signs exactly `subject` as `payload_type`, and returns
    /// the signer. With several signatures, the first trusted one wins.
    pub fn verify(
        &self,
        payload_type: &str,
        subject: &[u8],
        envelope: &[u8],
    ) -> Result<PeerIdentity, SignatureError> {
        let malformed = |reason: String| SignatureError::Malformed { reason };
        let envelope: Envelope =
            serde_json::from_slice(envelope).map_err(|e| malformed(e.to_string()))?;
        if envelope.payload_type != payload_type {
            return Err(malformed(format!(
                "payloadType is {:?}, expected {payload_type:?}",
                envelope.payload_type
            )));
        }
        if envelope.signatures.is_empty() || envelope.signatures.len() > MAX_SIGNATURES {
            return Err(malformed(format!(
                "it carries {} signatures; 1 to {MAX_SIGNATURES} are allowed",
                envelope.signatures.len()
            )));
        }
        let payload = BASE64
            .decode(&envelope.payload)
            .map_err(|e| malformed(format!("payload: {e}")))?;
        let statement: Statement =
            serde_json::from_slice(&payload).map_err(|e| malformed(format!("statement: {e}")))?;
        let signed = BASE64
            .decode(&statement.subject)
            .map_err(|e| malformed(format!("subject: {e}")))?;
        if signed != subject {
            return Err(SignatureError::SubjectMismatch);
        }
        let signed_at = UnixTime::since_unix_epoch(Duration::from_micros(statement.signed_at_us));
        let message = pae(payload_type, &payload);
        let mut first_error = None;
        for signature in &envelope.signatures {
            match self.check_one(signature, &statement.signer, signed_at, &message) {
                Ok(identity) => return Ok(identity),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        Err(first_error.expect("an envelope has at least one signature"))
    }

    fn check_one(
        &self,
        signature: &EnvelopeSignature,
        claimed: &str,
        signed_at: UnixTime,
        message: &[u8],
    ) -> Result<PeerIdentity, SignatureError> {
        let signer = signature.keyid.clone();
        let cert = CertificateDer::from_pem_slice(signature.cert.as_bytes()).map_err(|e| {
            SignatureError::Malformed {
                reason: format!("the certificate of {signer}: {e}"),
            }
        })?;
        self.verifier
            .verify_client_cert(&cert, &[], signed_at)
            .map_err(|source| SignatureError::UnknownSigner {
                signer: signer.clone(),
                source,
            })?;
        let what = format!("the certificate of {signer}");
        let parsed = parse(&cert, &what)?;
        let identity = PeerIdentity::from_certificate(&parsed, &what).map_err(|e| {
            SignatureError::Malformed {
                reason: e.to_string(),
            }
        })?;
        if identity.name != claimed || identity.name != signer {
            return Err(SignatureError::Malformed {
                reason: format!(
                    "the certificate names {}, the signature {signer}, the statement {claimed}",
                    identity.name
                ),
            });
        }
        if !self.signers.contains(&identity.role) {
            return Err(SignatureError::SignerRole {
                signer,
                role: identity.role,
                allowed: self.allowed(),
            });
        }
        let key = certificate_key(&parsed, &what)?;
        let bytes = BASE64
            .decode(&signature.sig)
            .map_err(|e| SignatureError::Malformed {
                reason: format!("the signature of {signer}: {e}"),
            })?;
        let bytes: [u8; 64] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| SignatureError::Malformed {
                    reason: format!(
                        "the signature of {signer} has {} bytes, an Ed25519 signature 64",
                        bytes.len()
                    ),
                })?;
        key.verify_strict(message, &Signature::from_bytes(&bytes))
            .map_err(|source| SignatureError::BadSignature { signer, source })?;
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IssueRequest, MeshCa};

    fn identity(ca: &MeshCa, dir: &std::path::Path, name: &str, role: Role) -> MeshTls {
        let files = ca
            .issue(
                &IssueRequest {
                    name: name.into(),
                    role,
                    sensors: Vec::new(),
                    days: 30,
                },
                dir,
            )
            .unwrap();
        MeshTls::load(&files).unwrap()
    }

    #[test]
    fn a_signature_holds_for_its_subject_and_signer_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::init(&dir.path().join("ca"), "plant").unwrap();
        let operator = identity(&ca, &dir.path().join("op"), "alice", Role::Operator);
        let node = identity(&ca, &dir.path().join("node"), "press-1", Role::Edge);
        let check = SignatureCheck::new(&node, &[Role::Operator]);
        let signer = ModelSigner::from_tls(&operator).unwrap();
        let envelope = signer.sign(MANIFEST_PAYLOAD_TYPE, b"manifest v1");

        let who = check
            .verify(MANIFEST_PAYLOAD_TYPE, b"manifest v1", &envelope)
            .unwrap();
        assert_eq!((who.name.as_str(), who.role), ("alice", Role::Operator));
        let other = check.verify(MANIFEST_PAYLOAD_TYPE, b"manifest v2", &envelope);
        assert!(matches!(other, Err(SignatureError::SubjectMismatch)));
        let as_other_type = check.verify("application/other", b"manifest v1", &envelope);
        assert!(matches!(
            as_other_type,
            Err(SignatureError::Malformed { .. })
        ));

        // A node's signature is refused where the policy names operators only.
        let by_node = ModelSigner::from_tls(&node)
            .unwrap()
            .sign(MANIFEST_PAYLOAD_TYPE, b"manifest v1");
        let refused = check
            .verify(MANIFEST_PAYLOAD_TYPE, b"manifest v1", &by_node)
            .unwrap_err();
        assert_eq!(refused.reason(), "signer_role", "{refused}");
        assert!(refused.to_string().contains("operator"), "{refused}");

        // An identity of another mesh CA is unknown.
        let foreign_ca = MeshCa::init(&dir.path().join("ca2"), "other").unwrap();
        let mallory = identity(&foreign_ca, &dir.path().join("m"), "alice", Role::Operator);
        let forged = ModelSigner::from_tls(&mallory)
            .unwrap()
            .sign(MANIFEST_PAYLOAD_TYPE, b"manifest v1");
        let refused = check
            .verify(MANIFEST_PAYLOAD_TYPE, b"manifest v1", &forged)
            .unwrap_err();
        assert_eq!(refused.reason(), "unknown_signer", "{refused}");
    }

    #[test]
    fn a_flipped_bit_anywhere_in_the_envelope_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::init(&dir.path().join("ca"), "plant").unwrap();
        let operator = identity(&ca, &dir.path().join("op"), "alice", Role::Operator);
        let check = SignatureCheck::new(&operator, &[Role::Operator]);
        let envelope = ModelSigner::from_tls(&operator)
            .unwrap()
            .sign(MANIFEST_PAYLOAD_TYPE, b"subject");
        let mut envelope: Envelope = serde_json::from_slice(&envelope).unwrap();
        let mut sig = BASE64.decode(&envelope.signatures[0].sig).unwrap();
        sig[10] ^= 1;
        envelope.signatures[0].sig = BASE64.encode(&sig);
        let bytes = serde_json::to_vec(&envelope).unwrap();
        let refused = check
            .verify(MANIFEST_PAYLOAD_TYPE, b"subject", &bytes)
            .unwrap_err();
        assert_eq!(refused.reason(), "bad_signature", "{refused}");

        for garbage in [&b""[..], b"{}", b"null", b"{\"payloadType\":1}"] {
            assert_eq!(
                check
                    .verify(MANIFEST_PAYLOAD_TYPE, b"subject", garbage)
                    .unwrap_err()
                    .reason(),
                "malformed"
            );
        }
    }
}
