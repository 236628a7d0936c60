//! `fogmesh models ls|show|import|export|sign|sign-file|push|pull`: the model store on
//! this machine, and on a node through its gRPC `ModelStore`; `sign-file` signs a file
//! a node's config names.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use comfy_table::Table;
use fogmesh_cluster::status_table::plain;

use fogmesh_cluster::model_seal::{MeshSeal, DEFAULT_MODEL_SIGNERS};
use fogmesh_models::store::{file_signature_path, sign_file};
use fogmesh_trust::MeshTls;

use crate::commands::identity::IdentityArgs;

/// This caller's identity and the seal it signs with.
fn signer(identity: &IdentityArgs) -> anyhow::Result<(MeshTls, MeshSeal)> {
    let tls = identity.tls()?.context(
        "signing needs this caller's certificate: give --ca, --cert and --key (or FOGMESH_CA, FOGMESH_CERT, FOGMESH_KEY)",
    )?;
    let seal = MeshSeal::new(&tls, &DEFAULT_MODEL_SIGNERS)
        .with_context(|| format!("signing as {}", tls.identity()))?;
    Ok((tls, seal))
}

#[derive(Subcommand)]
pub enum ModelsAction {
    /// Every stored version.
    Ls {
        /// List the store of the node at this gRPC address (HOST:PORT) instead.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// One version's manifest (NAME for the newest, NAME@VERSION for one).
    Show { id: String },
    /// Store a manifest (JSON) and its safetensors weights; the hash is checked.
    Import {
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long)]
        weights: PathBuf,
    },
    /// Write manifest.json and weights.safetensors of a version into a folder.
    Export {
        id: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a version (NAME for the newest) with this caller's certificate, so that
    /// nodes with certificates store and serve it; the signature travels with the
    /// version (push, pull, export). Needs an Ed25519 identity of a role the mesh
    /// lets sign (`fogmesh ca issue NAME --role operator`).
    Sign {
        id: String,
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// Sign a file a node's config names (`torchscript`, `weights`) with this caller's
    /// certificate, writing FILE.sig beside it: a node with certificates loads only
    /// files whose signature it trusts.
    SignFile {
        file: PathBuf,
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// Send a version (NAME for the newest) to a node's store, with the ancestors it
    /// lacks; checked by sha256 on the node.
    Push {
        id: String,
        /// The node's gRPC address (HOST:PORT). A TLS node takes the version from an
        /// operator's certificate; a plaintext node in a mesh wants the mesh's secret
        /// in FOGMESH_CLUSTER_SECRET.
        #[arg(long)]
        node: String,
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// Copy a version (NAME for the newest) from a node's store into this one, with
    /// the ancestors this one lacks; checked by sha256 as it arrives.
    Pull {
        id: String,
        /// The node's gRPC address (HOST:PORT).
        #[arg(long)]
        node: String,
        #[command(flatten)]
        identity: IdentityArgs,
    },
}

pub async fn run(store: &Path, action: ModelsAction) -> anyhow::Result<()> {
    let store = fogmesh_models::store::ModelStore::open(store);
    match action {
        ModelsAction::Ls {
            node: Some(node),
            identity,
        } => {
            let versions = fogmesh_cluster::list_versions(&node, &identity.dialer()?).await?;
            let mut table = Table::new();
            table.set_header(["MODEL", "BYTES", "SHA256"]);
            for v in versions {
                table.add_row([v.model, v.total_bytes.to_string(), v.sha256]);
            }
            println!("{}", plain(&mut table, &[1]));
        }
        ModelsAction::Ls { node: None, .. } => {
            let manifests = store.list()?;
            let mut table = Table::new();
            table.set_header([
                "NAME",
                "VERSION",
                "KIND",
                "ARCHITECTURE",
                "BYTES",
                "SHA256",
                "PARENTS",
                "METRICS",
            ]);
            for m in manifests {
                let metrics: Vec<String> = m
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k}={v:.4}"))
                    .collect();
                table.add_row([
                    m.name,
                    m.version,
                    serde_json::to_value(m.kind)?
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    m.architecture,
                    m.weights_bytes.to_string(),
                    m.weights_sha256[..12.min(m.weights_sha256.len())].to_string(),
                    if m.parents.is_empty() {
                        "-".to_string()
                    } else {
                        m.parents.join(",")
                    },
                    metrics.join(" "),
                ]);
            }
            println!("{}", plain(&mut table, &[4]));
        }
        ModelsAction::Show { id } => {
            let manifest = store.get(&id)?;
            store
                .weights(&manifest)
                .with_context(|| format!("checking the weights of {}", manifest.id()))?;
            println!("{}", serde_json::to_string_pretty(&manifest)?);
        }
        ModelsAction::Import { manifest, weights } => {
            let stored = store
                .import_files(&manifest, &weights)
                .with_context(|| format!("importing {}", manifest.display()))?;
            println!("stored {} ({})", stored.id(), stored.weights_sha256);
        }
        ModelsAction::Export { id, out } => {
            let manifest = store.export(&id, &out)?;
            println!("exported {} to {}", manifest.id(), out.display());
        }
        ModelsAction::Sign { id, identity } => {
            let (tls, seal) = signer(&identity)?;
            let signed = store
                .sign(&id, &seal)
                .with_context(|| format!("signing {id} as {}", tls.identity()))?;
            println!(
                "signed {} ({}) as {}",
                signed.id(),
                signed.weights_sha256,
                tls.identity()
            );
        }
        ModelsAction::SignFile { file, identity } => {
            let (tls, seal) = signer(&identity)?;
            let sha256 = sign_file(&seal, &file)
                .with_context(|| format!("signing {} as {}", file.display(), tls.identity()))?;
            println!(
                "signed {} ({sha256}) as {}; its signature is {}",
                file.display(),
                tls.identity(),
                file_signature_path(&file).display()
            );
        }
        ModelsAction::Push { id, node, identity } => {
            let sent =
                fogmesh_cluster::upload_version(&node, &identity.dialer()?, &id, &store).await?;
            println!("sent {} ({}) to {node}", sent.id(), sent.weights_sha256);
        }
        ModelsAction::Pull { id, node, identity } => {
            let stored =
                fogmesh_cluster::download_version(&node, &identity.dialer()?, &id, &store).await?;
            println!(
                "stored {} ({}) from {node}",
                stored.id(),
                stored.weights_sha256
            );
        }
    }
    Ok(())
}
