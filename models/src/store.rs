//! The model store: weights addressed by their sha256, one manifest per model version.
//!
//! On disk, under the store's root:
//! - `blobs/<sha256>.safetensors`: weight files, named by the hash of their bytes, so a
//!   version that reuses weights stores them once and a file can be checked against
//!   its name alone;
//! - `manifests/<name>/<version>.json`: a [`Manifest`]: kind, architecture and its
//!   hyper-parameters, input spec, training data summary, metrics, parent versions
//!   (lineage) and the weights' hash and size.
//!
//! - `manifests/<name>/<version>.sig`: the version's signature, where it has one: an
//!   envelope over the manifest's canonical JSON ([`ModelStore::statement`]), which
//!   names the weights' hash, so one signature covers manifest and weights.
//!
//! A store opened for a node of a mesh carries the mesh's [`ManifestSeal`]
//! ([`ModelStore::sealed`]): then a version from elsewhere is stored only under a
//! signature the seal trusts ([`ModelStore::import_signed`]), a version made here is
//! signed as it is stored ([`ModelStore::import`]), and every read of weights checks
//! the signature again, so nothing unsigned or altered on disk is ever served. A store
//! without a seal (offline tools, an insecure mesh) keeps signatures it is given but
//! cannot check them.
//!
//! Every load verifies the hash ([`ModelStore::weights`]): a blob whose bytes no longer
//! hash to its name, or a manifest whose hash does not match the blob, is refused with
//! both hashes and the file. Writes go to a temporary file, which is synced to disk,
//! renamed into place, and its folder synced, so a crash or power cut leaves either the
//! old state or the new, never half a file. A manifest damaged anyway (a disk fault,
//! a copy cut short) is skipped by [`ModelStore::list`] with a warning naming it,
//! so it never hides the versions beside it. A version, once stored, is never
//! overwritten with different content: versions are what experts, rollbacks and
//! lineage refer to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::io::Write;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::weights::{digest_hex, sha256_hex};

/// The store's folder for weights still arriving ([`StagedWeights`]).
const STAGING: &str = "staging";

/// The four kinds of model fogmesh hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    TimeSeries,
    Vision,
    Language,
    Multimodal,
}

/// What a model takes: a shape (`-1` for the batch) and what the values are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub shape: Vec<i64>,
    #[serde(default)]
    pub description: String,
}

/// A model version as the store records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub kind: ModelKind,
    /// The network, e.g. `conv_autoencoder`; with `hyper` it rebuilds the model.
    pub architecture: String,
    #[serde(default)]
    pub hyper: serde_json::Value,
    pub input: InputSpec,
    /// Which data, how much, which seed: free-form, for people and audits.
    #[serde(default)]
    pub training: serde_json::Value,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// `name@version` of the versions this one was trained or merged from.
    #[serde(default)]
    pub parents: Vec<String>,
    pub weights_sha256: String,
    pub weights_bytes: u64,
    /// Microseconds since the Unix epoch.
    #[serde(default)]
    pub created_us: i64,
}

impl Manifest {
    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a manifest: {source}", path.display())]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("manifest field `{field}` = {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("no model `{0}` in the store")]
    NotFound(String),
    #[error("{} is tampered with or damaged: its bytes hash to {actual}, the store expects {expected}", path.display())]
    Tampered {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "manifest {id} says its weights hash to {declared}, but the weights given hash to {actual}"
    )]
    HashMismatch {
        id: String,
        declared: String,
        actual: String,
    },
    #[error("{id} is already stored with other content; a stored version never changes (use a new version)")]
    VersionExists { id: String },
    #[error("{id} names parent {parent}, which is not in the store")]
    UnknownParent { id: String, parent: String },
    #[error("{id}: its signature is not trusted: {source}")]
    Signature {
        id: String,
        #[source]
        source: SealError,
    },
    #[error("{id} cannot be signed on this node: {source}")]
    CannotSign {
        id: String,
        #[source]
        source: SealError,
    },
}

/// Why a seal refused to sign or to trust a signature; the seal's own error.
pub type SealError = Box<dyn std::error::Error + Send + Sync>;

/// Where the signature of a file a node's config names (a TorchScript module,
/// autoencoder weights) lives: beside it, `<file>.sig`.
pub fn file_signature_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// What a signature over such a file covers: its sha256, in a form no manifest's
/// canonical JSON takes, so a version's signature never passes for a file's.
pub fn file_statement(sha256: &str) -> Vec<u8> {
    format!("{{\"fogmesh_file_sha256\":\"{sha256}\"}}").into_bytes()
}

/// Checks `bytes`, read from `path`, against the signature beside the file
/// ([`file_signature_path`]) and returns who signed; a file without one is refused as
/// unsigned by the seal.
pub fn check_file(
    seal: &dyn ManifestSeal,
    path: &Path,
    bytes: &[u8],
) -> Result<String, StoreError> {
    let id = path.display().to_string();
    let signature = read_signature(&file_signature_path(path))?;
    seal.verify(
        &id,
        &file_statement(&sha256_hex(bytes)),
        signature.as_deref(),
    )
    .map_err(|source| StoreError::Signature { id, source })
}

/// The signature file at `path`; `None` where there is none.
fn read_signature(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Signs the file at `path` with `seal`'s identity, writing its signature beside it
/// ([`file_signature_path`]); returns the file's sha256.
pub fn sign_file(seal: &dyn ManifestSeal, path: &Path) -> Result<String, StoreError> {
    let bytes = std::fs::read(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let sha256 = sha256_hex(&bytes);
    let id = path.display().to_string();
    let signature = seal
        .sign(&id, &file_statement(&sha256))
        .map_err(|source| StoreError::CannotSign { id, source })?;
    write_atomically(&file_signature_path(path), &signature)?;
    Ok(sha256)
}

/// A mesh's signature policy, as a node's store applies it. The cluster implements it
/// over the mesh's certificates; the store only says when to sign and when to check.
pub trait ManifestSeal: std::fmt::Debug + Send + Sync {
    /// Signs `statement` (the canonical manifest of `id`) for a version made on this
    /// node, or says why this node may not sign.
    fn sign(&self, id: &str, statement: &[u8]) -> Result<Vec<u8>, SealError>;
    /// Checks `signature` over `statement` and returns who signed; `None` is a version
    /// that carries no signature. A refusal is the seal's to count and log.
    fn verify(
        &self,
        id: &str,
        statement: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<String, SealError>;
}

/// A model store rooted at a folder.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
    seal: Option<std::sync::Arc<dyn ManifestSeal>>,
}

/// The file name of an exported version's signature, beside `manifest.json`.
pub const SIGNATURE_FILE: &str = "manifest.sig";

/// Weights on their way into the store from elsewhere (an upload), written to a file in
/// the store's `staging/` folder as they arrive and hashed on the way, so a node never
/// holds an uploaded model in memory. Dropped before [`ModelStore::import_staged`] (a
/// refused or broken upload), the file is removed; a crash leaves it in `staging/`,
/// which [`ModelStore::clear_staging`] empties when the node starts.
pub struct StagedWeights {
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    bytes: u64,
}

impl StagedWeights {
    /// Appends `data` to the staged file.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.file
            .as_file_mut()
            .write_all(data)
            .map_err(|source| StoreError::Io {
                path: self.file.path().to_path_buf(),
                source,
            })?;
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The sha256 of the bytes written so far, in lowercase hex.
    pub fn sha256(&self) -> String {
        digest_hex(&self.hasher.clone().finalize())
    }
}

/// Weights to store: in memory, or staged on disk.
enum Weights<'a> {
    Bytes(&'a [u8]),
    Staged(StagedWeights),
}

impl Weights<'_> {
    fn sha256(&self) -> String {
        match self {
            Weights::Bytes(bytes) => sha256_hex(bytes),
            Weights::Staged(staged) => staged.sha256(),
        }
    }

    fn len(&self) -> u64 {
        match self {
            Weights::Bytes(bytes) => bytes.len() as u64,
            Weights::Staged(staged) => staged.len(),
        }
    }

    /// Puts the weights at `blob`, atomically, unless a blob of that hash is there.
    fn persist(self, blob: &Path) -> Result<(), StoreError> {
        if blob.exists() {
            return Ok(());
        }
        match self {
            Weights::Bytes(bytes) => write_atomically(blob, bytes),
            Weights::Staged(staged) => {
                let io = |source| StoreError::Io {
                    path: blob.to_path_buf(),
                    source,
                };
                if let Some(parent) = blob.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                staged.file.as_file().sync_all().map_err(io)?;
                staged.file.persist(blob).map_err(|e| io(e.error))?;
                sync_folder(blob)
            }
        }
    }
}

/// Where a version being stored comes from.
#[derive(Clone, Copy)]
enum Origin<'a> {
    /// Made on this node: a sealed store signs it.
    Here,
    /// Made elsewhere, with the signature it came with.
    Elsewhere(Option<&'a [u8]>),
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    sync_folder(path)
}

/// Makes a rename into `path`'s folder durable: without it a power cut may forget
/// the new name although the file's bytes reached the disk.
fn sync_folder(path: &Path) -> Result<(), StoreError> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    std::fs::File::open(parent)
        .and_then(|folder| folder.sync_all())
        .map_err(|source| StoreError::Io {
            path: parent.to_path_buf(),
            source,
        })
}

/// Names and versions become file names: keep them to a safe alphabet.
fn check_name(field: &'static str, value: &str) -> Result<(), StoreError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid {
            field,
            value: value.to_string(),
            reason: "use 1 to 128 of A-Z a-z 0-9 - _ . (not starting with a dot)".into(),
        })
    }
}

/// Splits `name@version`; a bare name means its newest version.
pub fn parse_id(id: &str) -> (&str, Option<&str>) {
    match id.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (id, None),
    }
}

impl ModelStore {
    /// A store at `root`; the folder is created on the first import.
    pub fn open(root: impl Into<PathBuf>) -> ModelStore {
        ModelStore {
            root: root.into(),
            seal: None,
        }
    }

    /// This store under a mesh's signature policy: see the module doc.
    pub fn sealed(mut self, seal: std::sync::Arc<dyn ManifestSeal>) -> ModelStore {
        self.seal = Some(seal);
        self
    }

    /// Whether this store checks signatures.
    pub fn is_sealed(&self) -> bool {
        self.seal.is_some()
    }

    /// The bytes a signature of `manifest` covers: its compact JSON, which every node
    /// derives alike from the same manifest (fields in declaration order, maps sorted,
    /// floats round-tripped).
    pub fn statement(manifest: &Manifest) -> Vec<u8> {
        serde_json::to_vec(manifest).expect("a manifest serialises")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root
            .join("blobs")
            .join(format!("{sha256}.safetensors"))
    }

    fn manifest_path(&self, name: &str, version: &str) -> PathBuf {
        self.root
            .join("manifests")
            .join(name)
            .join(format!("{version}.json"))
    }

    fn signature_path(&self, manifest: &Manifest) -> PathBuf {
        self.root
            .join("manifests")
            .join(&manifest.name)
            .join(format!("{}.sig", manifest.version))
    }

    /// The signature stored with `manifest`, if it has one.
    pub fn signature(&self, manifest: &Manifest) -> Result<Option<Vec<u8>>, StoreError> {
        read_signature(&self.signature_path(manifest))
    }

    /// On a sealed store: who signed `manifest`, or why its signature is not trusted.
    /// On a store without a seal: `None`.
    pub fn check_signature(&self, manifest: &Manifest) -> Result<Option<String>, StoreError> {
        if self.seal.is_none() {
            return Ok(None);
        }
        self.check_signed(manifest, self.signature(manifest)?.as_deref())
    }

    /// Signs the stored version `id` with `seal` (an operator's `fogmesh models sign`),
    /// replacing any signature it had. The store's own seal, if any, must trust it.
    pub fn sign(&self, id: &str, seal: &dyn ManifestSeal) -> Result<Manifest, StoreError> {
        let manifest = self.get(id)?;
        self.weights_unchecked(&manifest)?;
        let signature = seal
            .sign(&manifest.id(), &ModelStore::statement(&manifest))
            .map_err(|source| StoreError::CannotSign {
                id: manifest.id(),
                source,
            })?;
        self.check_signed(&manifest, Some(&signature))?;
        write_atomically(&self.signature_path(&manifest), &signature)?;
        Ok(manifest)
    }

    /// Checks `signature` for `manifest` against the seal, where there is one, and
    /// returns who signed: what [`ModelStore::import_signed`] checks first, for a
    /// receiver that wants to refuse before it reads the weights.
    pub fn check_signed(
        &self,
        manifest: &Manifest,
        signature: Option<&[u8]>,
    ) -> Result<Option<String>, StoreError> {
        let Some(seal) = &self.seal else {
            return Ok(None);
        };
        seal.verify(&manifest.id(), &ModelStore::statement(manifest), signature)
            .map(Some)
            .map_err(|source| StoreError::Signature {
                id: manifest.id(),
                source,
            })
    }

    /// Stores a version made on this node: `weights` under `manifest`, filling in the
    /// weights' hash and size (a hash already in the manifest must match). Refuses
    /// unknown parents and a version stored before with other content; storing the
    /// same thing twice is a no-op. A sealed store signs the version with the node's
    /// identity, or refuses it where the mesh does not let this node sign.
    pub fn import(&self, manifest: Manifest, weights: &[u8]) -> Result<Manifest, StoreError> {
        self.store_version(manifest, Weights::Bytes(weights), Origin::Here)
    }

    /// Stores a version made elsewhere (an upload, a copy from a peer, an operator's
    /// files) with the signature it came with. A sealed store checks the signature
    /// before anything is written; a store without a seal keeps it unchecked. The same
    /// version stored before without a signature gains this one.
    pub fn import_signed(
        &self,
        manifest: Manifest,
        weights: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<Manifest, StoreError> {
        self.store_version(
            manifest,
            Weights::Bytes(weights),
            Origin::Elsewhere(signature),
        )
    }

    /// A file in the store's `staging/` folder for weights about to arrive
    /// ([`StagedWeights`]).
    pub fn stage(&self) -> Result<StagedWeights, StoreError> {
        let folder = self.root.join(STAGING);
        std::fs::create_dir_all(&folder).map_err(|source| StoreError::Io {
            path: folder.clone(),
            source,
        })?;
        let file = tempfile::Builder::new()
            .suffix(".part")
            .tempfile_in(&folder)
            .map_err(|source| StoreError::Io {
                path: folder,
                source,
            })?;
        Ok(StagedWeights {
            file,
            hasher: Sha256::new(),
            bytes: 0,
        })
    }

    /// [`ModelStore::import_signed`] for weights staged on disk: the staged file
    /// becomes the blob by a rename, without being read again.
    pub fn import_staged(
        &self,
        manifest: Manifest,
        weights: StagedWeights,
        signature: Option<&[u8]>,
    ) -> Result<Manifest, StoreError> {
        self.store_version(
            manifest,
            Weights::Staged(weights),
            Origin::Elsewhere(signature),
        )
    }

    /// Removes what uploads cut short by a crash left in `staging/`; a node calls it
    /// at start, before it takes uploads.
    pub fn clear_staging(&self) -> Result<(), StoreError> {
        let folder = self.root.join(STAGING);
        match std::fs::remove_dir_all(&folder) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                path: folder,
                source,
            }),
        }
    }

    fn store_version(
        &self,
        mut manifest: Manifest,
        weights: Weights<'_>,
        origin: Origin<'_>,
    ) -> Result<Manifest, StoreError> {
        check_name("name", &manifest.name)?;
        check_name("version", &manifest.version)?;
        let actual = weights.sha256();
        if !manifest.weights_sha256.is_empty()
            && !manifest.weights_sha256.eq_ignore_ascii_case(&actual)
        {
            return Err(StoreError::HashMismatch {
                id: manifest.id(),
                declared: manifest.weights_sha256,
                actual,
            });
        }
        manifest.weights_sha256 = actual;
        manifest.weights_bytes = weights.len();
        for parent in &manifest.parents {
            let (name, version) = parse_id(parent);
            let known = match version {
                Some(version) => self.manifest_path(name, version).exists(),
                None => false,
            };
            if !known {
                return Err(StoreError::UnknownParent {
                    id: manifest.id(),
                    parent: parent.clone(),
                });
            }
        }
        let path = self.manifest_path(&manifest.name, &manifest.version);
        // A manifest that no longer reads is stored again: that is how a damaged one is
        // repaired, from a peer's copy or a new import of the same version.
        let readable = match self.read_manifest(&path) {
            Err(StoreError::Manifest { .. }) => false,
            _ => path.exists(),
        };
        if readable {
            let stored = self.read_manifest(&path)?;
            let same = Manifest {
                created_us: stored.created_us,
                ..manifest.clone()
            };
            if stored != same {
                return Err(StoreError::VersionExists { id: manifest.id() });
            }
            if let Origin::Elsewhere(Some(signature)) = origin {
                if self.signature(&stored)?.is_none() {
                    self.check_signed(&stored, Some(signature))?;
                    write_atomically(&self.signature_path(&stored), signature)?;
                }
            }
            return Ok(stored);
        }
        if manifest.created_us == 0 {
            manifest.created_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        }
        let signature = match origin {
            Origin::Here => match &self.seal {
                Some(seal) => Some(
                    seal.sign(&manifest.id(), &ModelStore::statement(&manifest))
                        .map_err(|source| StoreError::CannotSign {
                            id: manifest.id(),
                            source,
                        })?,
                ),
                None => None,
            },
            Origin::Elsewhere(signature) => {
                self.check_signed(&manifest, signature)?;
                signature.map(<[u8]>::to_vec)
            }
        };
        weights.persist(&self.blob_path(&manifest.weights_sha256))?;
        // The signature lands before the manifest: a version is stored once its
        // manifest is, and a crash between the two must not leave it unsigned.
        if let Some(signature) = &signature {
            write_atomically(&self.signature_path(&manifest), signature)?;
        }
        let text = serde_json::to_vec_pretty(&manifest).map_err(|source| StoreError::Manifest {
            path: path.clone(),
            source,
        })?;
        write_atomically(&path, &text)?;
        Ok(manifest)
    }

    fn read_manifest(&self, path: &Path) -> Result<Manifest, StoreError> {
        let bytes = std::fs::read(path).map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Manifest {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The version a new model of `name` gets when nobody names one; never one already
    /// stored, since a stored version never changes.
    ///
    /// With `incumbent`, the version of `name` a candidate was fine-tuned from (the
    /// continual learner's case), it counts on from the incumbent's trailing number and
    /// keeps its prefix: `v1` → `v2`, `9` → `10`, `stable` → `stable-2`, skipping stored
    /// ones (`v1` → `v3` when `v2` is stored). Without (`fogmesh train`, `fogmesh merge`),
    /// it is one more than the largest whole-number version of `name`, or `1`. Only the
    /// second case lists the store, so only it can fail.
    pub fn next_version(&self, name: &str, incumbent: Option<&str>) -> Result<String, StoreError> {
        let (prefix, mut number) = match incumbent {
            Some(version) => {
                let digits = version.len()
                    - version
                        .chars()
                        .rev()
                        .take_while(char::is_ascii_digit)
                        .count();
                match version[digits..].parse::<u64>() {
                    Ok(n) => (version[..digits].to_string(), n + 1),
                    Err(_) => (format!("{version}-"), 2),
                }
            }
            None => {
                let last = self
                    .list()?
                    .iter()
                    .filter(|m| m.name == name)
                    .filter_map(|m| m.version.parse::<u64>().ok())
                    .max()
                    .unwrap_or(0);
                (String::new(), last + 1)
            }
        };
        loop {
            let candidate = format!("{prefix}{number}");
            if self.get(&format!("{name}@{candidate}")).is_err() {
                return Ok(candidate);
            }
            number += 1;
        }
    }

    /// Every stored version, by name, oldest version first; a manifest that does not
    /// read is skipped with a warning.
    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let dir = self.root.join("manifests");
        let Ok(names) = std::fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut manifests = Vec::new();
        for name in names.filter_map(Result::ok) {
            let versions = std::fs::read_dir(name.path()).map_err(|source| StoreError::Io {
                path: name.path(),
                source,
            })?;
            for version in versions.filter_map(Result::ok) {
                let path = version.path();
                if path.extension().is_some_and(|e| e == "json") {
                    // One damaged manifest must not hide every other version; `get`
                    // of it still names the damage.
                    match self.read_manifest(&path) {
                        Ok(manifest) => manifests.push(manifest),
                        Err(error) => {
                            tracing::warn!(%error, "damaged manifest skipped");
                        }
                    }
                }
            }
        }
        manifests.sort_by(|a, b| {
            (&a.name, a.created_us, &a.version).cmp(&(&b.name, b.created_us, &b.version))
        });
        Ok(manifests)
    }

    /// `name@version`, or the newest version of `name`.
    pub fn get(&self, id: &str) -> Result<Manifest, StoreError> {
        let (name, version) = parse_id(id);
        match version {
            Some(version) => {
                let path = self.manifest_path(name, version);
                if !path.exists() {
                    return Err(StoreError::NotFound(id.to_string()));
                }
                self.read_manifest(&path)
            }
            None => self
                .list()?
                .into_iter()
                .rfind(|m| m.name == name)
                .ok_or_else(|| StoreError::NotFound(id.to_string())),
        }
    }

    /// The weights of `manifest`, after checking they still hash to what it says and,
    /// on a sealed store, that the version's signature is trusted.
    pub fn weights(&self, manifest: &Manifest) -> Result<Vec<u8>, StoreError> {
        self.check_signature(manifest)?;
        self.weights_unchecked(manifest)
    }

    fn weights_unchecked(&self, manifest: &Manifest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(&manifest.weights_sha256);
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let actual = sha256_hex(&bytes);
        if actual != manifest.weights_sha256 {
            return Err(StoreError::Tampered {
                path,
                expected: manifest.weights_sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Writes `manifest.json` and `weights.safetensors` of `id` into `dir`, checked.
    pub fn export(&self, id: &str, dir: &Path) -> Result<Manifest, StoreError> {
        let manifest = self.get(id)?;
        let weights = self.weights(&manifest)?;
        write_atomically(&dir.join("weights.safetensors"), &weights)?;
        let text = serde_json::to_vec_pretty(&manifest).map_err(|source| StoreError::Manifest {
            path: dir.join("manifest.json"),
            source,
        })?;
        if let Some(signature) = self.signature(&manifest)? {
            write_atomically(&dir.join(SIGNATURE_FILE), &signature)?;
        }
        write_atomically(&dir.join("manifest.json"), &text)?;
        Ok(manifest)
    }

    /// Reads a manifest file and its weights file, and the signature beside the
    /// manifest ([`SIGNATURE_FILE`]) where there is one, and imports them.
    pub fn import_files(&self, manifest: &Path, weights: &Path) -> Result<Manifest, StoreError> {
        let signature_path = manifest.with_file_name(SIGNATURE_FILE);
        let manifest = self.read_manifest(manifest)?;
        let bytes = std::fs::read(weights).map_err(|source| StoreError::Io {
            path: weights.to_path_buf(),
            source,
        })?;
        let signature = read_signature(&signature_path)?;
        self.import_signed(manifest, &bytes, signature.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(name: &str, version: &str) -> Manifest {
        Manifest {
            name: name.into(),
            version: version.into(),
            kind: ModelKind::TimeSeries,
            architecture: "conv_autoencoder".into(),
            hyper: serde_json::json!({"channels": 8, "window": 60}),
            input: InputSpec {
                shape: vec![-1, 8, 60],
                description: "standardised pump sensors".into(),
            },
            training: serde_json::json!({"data": "skab valve1/1", "rows": 300}),
            metrics: BTreeMap::from([("f1".to_string(), 0.79)]),
            parents: Vec::new(),
            weights_sha256: String::new(),
            weights_bytes: 0,
            created_us: 0,
        }
    }

    fn staged_files(store: &ModelStore) -> usize {
        std::fs::read_dir(store.root().join(STAGING)).map_or(0, |d| d.count())
    }

    #[test]
    fn staged_weights_become_the_blob_and_refused_or_dropped_ones_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path());
        let mut staged = store.stage().unwrap();
        staged.write(b"first half, ").unwrap();
        staged.write(b"second half").unwrap();
        assert_eq!(staged.len(), 23);
        assert_eq!(staged.sha256(), sha256_hex(b"first half, second half"));
        assert_eq!(staged_files(&store), 1);
        let stored = store
            .import_staged(manifest("pump", "1"), staged, None)
            .unwrap();
        assert_eq!(
            stored.weights_sha256,
            sha256_hex(b"first half, second half")
        );
        assert_eq!(
            store.weights(&store.get("pump@1").unwrap()).unwrap(),
            b"first half, second half"
        );
        assert_eq!(staged_files(&store), 0);

        // A declared hash that the staged bytes do not have: refused, nothing stored.
        let mut staged = store.stage().unwrap();
        staged.write(b"other bytes").unwrap();
        let declared = Manifest {
            weights_sha256: sha256_hex(b"what the header said"),
            ..manifest("pump", "2")
        };
        assert!(matches!(
            store.import_staged(declared, staged, None),
            Err(StoreError::HashMismatch { .. })
        ));
        assert!(store.get("pump@2").is_err());
        assert_eq!(staged_files(&store), 0);

        // An upload cut short drops its staged file; one cut by a crash is cleared at
        // the next start.
        let mut dropped = store.stage().unwrap();
        dropped.write(b"half an upload").unwrap();
        drop(dropped);
        assert_eq!(staged_files(&store), 0);
        std::fs::write(
            store.root().join(STAGING).join("left-by-a-crash.part"),
            b"x",
        )
        .unwrap();
        store.clear_staging().unwrap();
        assert_eq!(staged_files(&store), 0);
        store.clear_staging().unwrap();
    }

    #[test]
    fn a_manifest_cut_in_half_hides_nothing_else_and_a_new_import_repairs_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path());
        for (name, weights) in [("pump-ae", b"pump weights"), ("fan-ae", b"fan weights!")] {
            store.import(manifest(name, "v1"), weights).unwrap();
        }
        let torn = store.manifest_path("pump-ae", "v1");
        let text = std::fs::read(&torn).unwrap();
        std::fs::write(&torn, &text[..text.len() / 2]).unwrap();

        let listed: Vec<String> = store.list().unwrap().iter().map(Manifest::id).collect();
        assert_eq!(listed, vec!["fan-ae@v1"]);
        let fan = store.get("fan-ae@v1").unwrap();
        assert_eq!(store.weights(&fan).unwrap(), b"fan weights!");
        let error = store.get("pump-ae@v1").unwrap_err();
        assert!(
            matches!(&error, StoreError::Manifest { path, .. } if path == &torn),
            "{error}"
        );
        // The copy a peer sends (here: the same version imported again) replaces it.
        store
            .import(manifest("pump-ae", "v1"), b"pump weights")
            .unwrap();
        assert_eq!(store.list().unwrap().len(), 2);
        assert!(!torn.with_extension("tmp").exists());
    }

    #[test]
    fn a_version_round_trips_and_is_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path());
        let stored = store
            .import(manifest("pump-ae", "v1"), b"weights one")
            .unwrap();
        assert_eq!(stored.weights_sha256, sha256_hex(b"weights one"));
        assert_eq!(stored.weights_bytes, 11);
        let mut child = manifest("pump-ae", "v2");
        child.parents = vec!["pump-ae@v1".into()];
        store.import(child, b"weights two").unwrap();
        assert_eq!(
            store.get("pump-ae").unwrap().version,
            "v2",
            "newest by default"
        );
        let v1 = store.get("pump-ae@v1").unwrap();
        assert_eq!(store.weights(&v1).unwrap(), b"weights one");
        assert_eq!(store.list().unwrap().len(), 2);

        let out = dir.path().join("export");
        store.export("pump-ae@v1", &out).unwrap();
        let other = ModelStore::open(dir.path().join("other"));
        let again = other
            .import_files(&out.join("manifest.json"), &out.join("weights.safetensors"))
            .unwrap();
        assert_eq!(again, v1);
        // The same import twice is a no-op; other content under the same version is not.
        assert!(store
            .import(manifest("pump-ae", "v1"), b"weights one")
            .is_ok());
        assert!(matches!(
            store.import(manifest("pump-ae", "v1"), b"other weights"),
            Err(StoreError::VersionExists { .. })
        ));
    }

    #[test]
    fn tampered_weights_and_false_hashes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path());
        let stored = store.import(manifest("pump-ae", "v1"), b"weights").unwrap();
        let blob = store.blob_path(&stored.weights_sha256);
        std::fs::write(&blob, b"weightz").unwrap();
        let error = store.weights(&stored).unwrap_err().to_string();
        assert!(
            error.contains("tampered") && error.contains(&stored.weights_sha256),
            "{error}"
        );

        let mut lying = manifest("pump-ae", "v2");
        lying.weights_sha256 = sha256_hex(b"something else");
        let error = store.import(lying, b"weights").unwrap_err().to_string();
        assert!(
            error.contains("pump-ae@v2") && error.contains("hash"),
            "{error}"
        );
    }

    #[test]
    fn lineage_and_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path());
        let mut orphan = manifest("pump-ae", "v2");
        orphan.parents = vec!["pump-ae@v1".into()];
        assert!(matches!(
            store.import(orphan, b"w"),
            Err(StoreError::UnknownParent { .. })
        ));
        for bad in ["../etc", "", ".hidden", "a/b", "name with space"] {
            let error = store.import(manifest(bad, "v1"), b"w").unwrap_err();
            assert!(
                matches!(error, StoreError::Invalid { field: "name", .. }),
                "{bad}: {error}"
            );
        }
        assert!(matches!(store.get("nothing"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn the_next_version_counts_on_and_skips_stored_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path());
        let next = |incumbent| store.next_version("pump-ae", incumbent).unwrap();
        assert_eq!(next(Some("v1")), "v2");
        assert_eq!(next(Some("9")), "10");
        assert_eq!(next(Some("stable")), "stable-2");
        assert_eq!(next(None), "1");
        store
            .import(manifest("pump-ae", "v2"), b"other weights")
            .unwrap();
        assert_eq!(next(Some("v1")), "v3");
        assert_eq!(next(None), "1", "v2 is not a whole number");
        store.import(manifest("pump-ae", "7"), b"seven").unwrap();
        store.import(manifest("pump-ae", "3"), b"three").unwrap();
        store
            .import(manifest("pump-ea", "12"), b"another model")
            .unwrap();
        assert_eq!(next(None), "8");
        assert_eq!(next(Some("2")), "4");
    }

    /// A seal for tests: "signs" with the statement's hash, and may be barred from
    /// signing.
    #[derive(Debug)]
    struct Notary {
        may_sign: bool,
    }

    impl ManifestSeal for Notary {
        fn sign(&self, _id: &str, statement: &[u8]) -> Result<Vec<u8>, SealError> {
            if !self.may_sign {
                return Err("this node may not sign".into());
            }
            Ok(format!("notary:{}", sha256_hex(statement)).into_bytes())
        }

        fn verify(
            &self,
            _id: &str,
            statement: &[u8],
            signature: Option<&[u8]>,
        ) -> Result<String, SealError> {
            match signature {
                None => Err("unsigned".into()),
                Some(s) if s == format!("notary:{}", sha256_hex(statement)).as_bytes() => {
                    Ok("notary".into())
                }
                Some(_) => Err("bad signature".into()),
            }
        }
    }

    #[test]
    fn a_signed_file_verifies_and_an_unsigned_or_changed_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("press.pt");
        std::fs::write(&file, b"scripted module").unwrap();
        let notary = Notary { may_sign: true };
        assert!(matches!(
            check_file(&notary, &file, b"scripted module"),
            Err(StoreError::Signature { .. })
        ));
        let sha256 = sign_file(&notary, &file).unwrap();
        assert_eq!(sha256, sha256_hex(b"scripted module"));
        assert!(dir.path().join("press.pt.sig").is_file());
        assert_eq!(
            check_file(&notary, &file, b"scripted module").unwrap(),
            "notary"
        );
        assert!(matches!(
            check_file(&notary, &file, b"another module"),
            Err(StoreError::Signature { .. })
        ));
        // A version's statement is never a file's.
        assert_ne!(
            file_statement(&sha256),
            ModelStore::statement(&manifest("pump", "1"))
        );
        assert!(matches!(
            sign_file(&Notary { may_sign: false }, &file),
            Err(StoreError::CannotSign { .. })
        ));
    }

    fn sealed(root: &Path, may_sign: bool) -> ModelStore {
        ModelStore::open(root).sealed(std::sync::Arc::new(Notary { may_sign }))
    }

    #[test]
    fn a_sealed_store_signs_what_it_makes_and_serves_only_what_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let store = sealed(&dir.path().join("node"), true);
        let v1 = store.import(manifest("pump-ae", "v1"), b"weights").unwrap();
        assert_eq!(
            store.check_signature(&v1).unwrap().as_deref(),
            Some("notary")
        );
        assert_eq!(store.weights(&v1).unwrap(), b"weights");

        // A manifest edited on disk no longer matches its signature.
        let path = store.manifest_path("pump-ae", "v1");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("0.79", "1e30")).unwrap();
        let edited = store.get("pump-ae@v1").unwrap();
        assert!(matches!(
            store.weights(&edited),
            Err(StoreError::Signature { .. })
        ));

        // From elsewhere: unsigned is refused and nothing is written; signed is kept.
        let offline = ModelStore::open(dir.path().join("offline"));
        let v2 = offline.import(manifest("pump-ae", "v2"), b"two").unwrap();
        assert!(matches!(
            store.import_signed(v2.clone(), b"two", None),
            Err(StoreError::Signature { .. })
        ));
        assert!(matches!(
            store.get("pump-ae@v2"),
            Err(StoreError::NotFound(_))
        ));
        offline
            .sign("pump-ae@v2", &Notary { may_sign: true })
            .unwrap();
        let out = dir.path().join("export");
        offline.export("pump-ae@v2", &out).unwrap();
        assert!(out.join(SIGNATURE_FILE).is_file());
        let imported = store
            .import_files(&out.join("manifest.json"), &out.join("weights.safetensors"))
            .unwrap();
        assert_eq!(store.weights(&imported).unwrap(), b"two");

        // A node the mesh does not let sign cannot store what it makes.
        let verifier = sealed(&dir.path().join("verifier"), false);
        assert!(matches!(
            verifier.import(manifest("pump-ae", "v3"), b"three"),
            Err(StoreError::CannotSign { .. })
        ));
        assert!(verifier.list().unwrap().is_empty());
    }
}
