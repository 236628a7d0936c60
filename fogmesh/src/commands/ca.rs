//! `fogmesh ca init|issue`: the mesh's certificate authority and the certificates
//! it issues to nodes, operators and sensors (see `fogmesh_trust::MeshCa`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use fogmesh_trust::{IssueRequest, MeshCa, Role};

#[derive(Subcommand)]
pub enum CaAction {
    /// Create a mesh CA in a folder: ca.pem (give it to every node) and ca.key
    /// (keep it off the nodes).
    Init {
        /// The folder; refused if it already holds a CA.
        #[arg(long)]
        out: PathBuf,
        /// The mesh's name, in the CA's subject.
        #[arg(long, default_value = "fogmesh")]
        mesh: String,
    },
    /// Issue a certificate for NAME: NAME.pem and NAME.key (mode 0600) in --out,
    /// with the CA certificate beside them as ca.pem.
    Issue {
        /// A node's `[node] name`, or an operator's or a sensor gateway's name.
        name: String,
        /// edge, fog or cloud for a node; operator; or sensor.
        #[arg(long)]
        role: String,
        /// The CA folder (`fogmesh ca init --out`).
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// For a sensor certificate: a sensor id it may feed (repeat for more); none
        /// lets it feed any sensor.
        #[arg(long = "sensor")]
        sensors: Vec<String>,
        /// Days of validity.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub fn run(action: CaAction) -> anyhow::Result<()> {
    match action {
        CaAction::Init { out, mesh } => {
            let ca = MeshCa::init(&out, &mesh)
                .with_context(|| format!("creating a mesh CA in {}", out.display()))?;
            println!(
                "mesh CA {} (key beside it, mode 0600)",
                ca.cert_path().display()
            );
        }
        CaAction::Issue {
            name,
            role,
            ca,
            out,
            sensors,
            days,
        } => {
            let role: Role = role.parse().context("--role")?;
            if !sensors.is_empty() && role != Role::Sensor {
                anyhow::bail!("--sensor is for sensor certificates; {name} is {role}");
            }
            let authority = MeshCa::load(&ca)
                .with_context(|| format!("loading the mesh CA in {}", ca.display()))?;
            let files = authority
                .issue(
                    &IssueRequest {
                        name: name.clone(),
                        role,
                        sensors,
                        days,
                    },
                    &out,
                )
                .with_context(|| format!("issuing a certificate for {name}"))?;
            println!(
                "{name} ({role}): {} and {} (mode 0600); CA {}",
                files.cert.display(),
                files.key.display(),
                files.ca.display()
            );
        }
    }
    Ok(())
}
