//! Who a peer of a fogmesh mesh is and what it may do.
//!
//! A mesh has one certificate authority ([`MeshCa`], `fogmesh ca init`). It issues
//! every node, operator and sensor a certificate ([`MeshCa::issue`], `fogmesh ca
//! issue`) whose subject names the peer and its [`Role`], and, for a sensor, the
//! sensor ids it may feed. Every port speaks mutual TLS with those certificates
//! ([`MeshTls`]): a caller without one, or with one from another authority, is
//! refused during the handshake, before any handler runs. Once connected, a caller's
//! [`PeerIdentity`] is read from its certificate and [`access::authorize`] decides,
//! from one table, whether its role may call the method.
//!
//! What this crate trusts: the CA certificate a node is configured with, and nothing
//! else. Model versions are signed by those identities too
//! ([`signing`]): a node serves a version only under a signature its policy trusts.
//! What it does not do yet: revocation lists, and certificate renewal without a
//! restart.

pub mod access;
mod authority;
mod error;
mod identity;
mod secret;
pub mod signing;
mod tls;

pub use authority::{IssueRequest, MeshCa};
pub use error::TrustError;
pub use identity::{PeerIdentity, Role};
pub use secret::{same_bytes, Secret};
pub use tls::{client_identity, MeshTls, TlsFiles};
