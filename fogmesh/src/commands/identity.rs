//! How a `fogmesh` command that calls a node proves who it is: the mesh CA, a
//! certificate and its key, from `--ca/--cert/--key` or `FOGMESH_CA/FOGMESH_CERT/
//! FOGMESH_KEY`; none of the three dials in plaintext (only an `insecure` node
//! answers). A plaintext mesh's secret comes only from `FOGMESH_CLUSTER_SECRET`,
//! never from the command line, where every user of the machine could read it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fogmesh_cluster::cluster_key::ClusterKey;
use fogmesh_cluster::dialer::Dialer;
use fogmesh_trust::{MeshTls, TlsFiles};

#[derive(Args, Debug, Clone)]
pub struct IdentityArgs {
    /// The mesh CA certificate (`ca.pem`).
    #[arg(long, env = "FOGMESH_CA")]
    ca: Option<PathBuf>,
    /// This caller's certificate (`fogmesh ca issue NAME --role operator`).
    #[arg(long, env = "FOGMESH_CERT")]
    cert: Option<PathBuf>,
    /// This caller's private key.
    #[arg(long, env = "FOGMESH_KEY")]
    key: Option<PathBuf>,
}

impl IdentityArgs {
    /// The dialer these settings describe.
    pub fn dialer(&self) -> anyhow::Result<Dialer> {
        let key = std::env::var("FOGMESH_CLUSTER_SECRET")
            .ok()
            .map(|secret| ClusterKey::from_secret(&secret));
        Ok(Dialer::new(self.tls()?, key))
    }

    /// The caller's certificate and key, checked against the mesh CA; `None` when
    /// none of the three is given.
    pub fn tls(&self) -> anyhow::Result<Option<MeshTls>> {
        Ok(match (&self.ca, &self.cert, &self.key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => {
                let files = TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                };
                Some(MeshTls::load(&files).with_context(|| {
                    format!("loading this caller's certificate {}", cert.display())
                })?)
            }
            _ => anyhow::bail!(
                "give all of --ca, --cert and --key (or FOGMESH_CA, FOGMESH_CERT, FOGMESH_KEY), or none for a plaintext node"
            ),
        })
    }
}
