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
//! Every load verifies the hash ([`ModelStore::weights`]): a blob whose bytes no longer
//! hash to its name, or a manifest whose hash does not match the blob, is refused with
//! both hashes and the file. Writes go to a temporary file first and are renamed into
//! place, so a crash leaves either the old state or the new, never half a file. A
//! version, once stored, is never overwritten with different content: versions are
//! what experts, rollbacks and lineage refer to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::weights::sha256_hex;

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
}

/// A model store rooted at a folder.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
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
        ModelStore { root: root.into() }
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

    /// Stores `weights` under `manifest`, filling in the weights' hash and size (a hash
    /// already in the manifest must match). Refuses unknown parents and a version
    /// stored before with other content; storing the same thing twice is a no-op.
    pub fn import(&self, mut manifest: Manifest, weights: &[u8]) -> Result<Manifest, StoreError> {
        check_name("name", &manifest.name)?;
        check_name("version", &manifest.version)?;
        let actual = sha256_hex(weights);
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
        manifest.weights_bytes = weights.len() as u64;
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
        if path.exists() {
            let stored = self.read_manifest(&path)?;
            let same = Manifest {
                created_us: stored.created_us,
                ..manifest.clone()
            };
            if stored == same {
                return Ok(stored);
            }
            return Err(StoreError::VersionExists { id: manifest.id() });
        }
        if manifest.created_us == 0 {
            manifest.created_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64);
        }
        let blob = self.blob_path(&manifest.weights_sha256);
        if !blob.exists() {
            write_atomically(&blob, weights)?;
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

    /// Every stored version, by name, oldest version first.
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
                    manifests.push(self.read_manifest(&path)?);
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

    /// The weights of `manifest`, after checking they still hash to what it says.
    pub fn weights(&self, manifest: &Manifest) -> Result<Vec<u8>, StoreError> {
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
        write_atomically(&dir.join("manifest.json"), &text)?;
        Ok(manifest)
    }

    /// Reads a manifest file and its weights file and imports them.
    pub fn import_files(&self, manifest: &Path, weights: &Path) -> Result<Manifest, StoreError> {
        let manifest = self.read_manifest(manifest)?;
        let bytes = std::fs::read(weights).map_err(|source| StoreError::Io {
            path: weights.to_path_buf(),
            source,
        })?;
        self.import(manifest, &bytes)
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
}
