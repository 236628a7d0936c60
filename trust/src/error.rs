//! The one error type of the trust crate: every variant names the file or value at
//! fault, so an operator can fix a certificate setup from the message alone.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a key or certificate")]
    Exists { path: PathBuf },
    #[error("{path} holds no {what} in PEM form")]
    NoPem { path: PathBuf, what: &'static str },
    #[error("generating the {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{what}: {source}")]
    Tls {
        what: String,
        #[source]
        source: rustls::Error,
    },
    #[error("name {name:?} is not a valid peer name: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("the certificate {what} is not a fogmesh certificate: {reason}")]
    NotMeshCertificate { what: String, reason: String },
    #[error("unknown role {value:?}: expected one of edge, fog, cloud, operator, sensor")]
    UnknownRole { value: String },
    #[error("{path} was not issued by the mesh CA {ca}: {source}")]
    NotIssuedByCa {
        path: PathBuf,
        ca: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the mesh CA {ca} cannot verify certificates: {source}")]
    Roots {
        ca: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}
