//! The client that copies a version between this process's store and a node's:
//! [`download_version`], [`upload_version`] and [`list_versions`], for the CLI and for
//! the mesh's rollouts. Step 4 of the contract in [`super`].
//!
//! The client trusts nothing the node sends: the header is checked against the id it
//! asked for and against its manifest, the bytes are counted and hashed as they
//! arrive into a file staged in the receiving store, and the import checks the hash again. Ancestors go first so lineage stays whole in the
//! receiving store.

use std::collections::HashSet;

use fogmesh_models::store::{parse_id, Manifest, ModelStore, StagedWeights, StoreError};
use fogmesh_proto::model_store_client::ModelStoreClient;
use fogmesh_proto::{ListModelsRequest, ModelRef, WeightChunk, WeightHeader};
use futures::future::BoxFuture;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use super::{chunks, header_for, header_signature, MAX_MODEL_BYTES};
use crate::cluster_key::KEY_HEADER;
use crate::dialer::{Dialer, LinkError};

/// Deepest chain of missing ancestors one download follows; a lineage that goes
/// deeper, or loops, is refused rather than followed forever.
const MAX_LINEAGE: usize = 256;

/// Why a copy between this process's store and a node's did not happen. Nothing is
/// stored on the receiving side unless the transfer returned `Ok` (ancestors copied
/// before a failure stay: they are whole versions).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// `model` is the model id, or "the model list" for [`list_versions`].
    #[error("cannot reach node {addr} for {model}: {reason}")]
    Connect {
        addr: String,
        model: String,
        reason: String,
    },
    #[error("node {addr} refused {model} ({code:?}): {message}")]
    Refused {
        addr: String,
        model: String,
        code: tonic::Code,
        message: String,
    },
    #[error("{model} from node {addr}: the weights hash to {actual}, the header says {expected}")]
    HashMismatch {
        addr: String,
        model: String,
        expected: String,
        actual: String,
    },
    #[error("{model} from node {addr}: the stream ended after {received} of the {declared} bytes its header declares")]
    ShortStream {
        addr: String,
        model: String,
        received: u64,
        declared: u64,
    },
    #[error("{model} with node {addr}: {problem}")]
    Invalid {
        addr: String,
        model: String,
        problem: String,
    },
    #[error("{model} with node {addr}: the local model store: {source}")]
    Store {
        addr: String,
        model: String,
        #[source]
        source: StoreError,
    },
}

/// A connection to one node's `ModelStore`, with the key its calls carry.
struct Peer {
    addr: String,
    client: ModelStoreClient<Channel>,
    key: Option<AsciiMetadataValue>,
}

impl Peer {
    async fn connect(addr: &str, dialer: &Dialer, model: &str) -> Result<Peer, TransferError> {
        let key = dialer
            .key()
            .map(|k| k.as_str().parse::<AsciiMetadataValue>())
            .transpose()
            .map_err(|_| TransferError::Invalid {
                addr: addr.into(),
                model: model.into(),
                problem: "the cluster key is not valid gRPC metadata (visible ASCII only)".into(),
            })?;
        let channel = dialer
            .channel(addr)
            .await
            .map(|connected| connected.channel)
            .map_err(|e| TransferError::Connect {
                addr: addr.into(),
                model: model.into(),
                reason: match e {
                    LinkError::Unreachable { reason, .. } => reason,
                    other => other.to_string(),
                },
            })?;
        Ok(Peer {
            addr: addr.into(),
            client: ModelStoreClient::new(channel),
            key,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(key) = &self.key {
            request.metadata_mut().insert(KEY_HEADER, key.clone());
        }
        request
    }

    fn refused(&self, model: &str, status: Status) -> TransferError {
        TransferError::Refused {
            addr: self.addr.clone(),
            model: model.into(),
            code: status.code(),
            message: status.message().into(),
        }
    }

    fn invalid(&self, model: &str, problem: String) -> TransferError {
        TransferError::Invalid {
            addr: self.addr.clone(),
            model: model.into(),
            problem,
        }
    }

    fn store_error(&self, model: &str, source: StoreError) -> TransferError {
        TransferError::Store {
            addr: self.addr.clone(),
            model: model.into(),
            source,
        }
    }

    /// Opens a download of `requested` and reads its header: the manifest, checked
    /// against the header and against what was asked for.
    async fn open_download(
        &mut self,
        requested: &str,
    ) -> Result<(Streaming<WeightChunk>, WeightHeader, Manifest), TransferError> {
        let request = self.request(ModelRef {
            model: requested.into(),
            ..Default::default()
        });
        let mut stream = self
            .client
            .download(request)
            .await
            .map_err(|s| self.refused(requested, s))?
            .into_inner();
        let header = stream
            .message()
            .await
            .map_err(|s| self.refused(requested, s))?
            .and_then(|chunk| chunk.header)
            .ok_or_else(|| self.invalid(requested, "the first chunk carries no header".into()))?;
        let manifest: Manifest = serde_json::from_slice(&header.manifest).map_err(|e| {
            self.invalid(
                requested,
                format!("the header's manifest does not parse: {e}"),
            )
        })?;
        let asked = match parse_id(requested) {
            (_, Some(_)) => header.model == requested,
            (name, None) => parse_id(&header.model).0 == name,
        };
        let agrees = asked
            && manifest.id() == header.model
            && manifest.weights_sha256 == header.sha256
            && manifest.weights_bytes == header.total_bytes;
        if !agrees {
            return Err(self.invalid(
                requested,
                format!(
                    "the header (model {}, sha256 {}, {} bytes) disagrees with the request or with its manifest ({}, sha256 {}, {} bytes)",
                    header.model, header.sha256, header.total_bytes,
                    manifest.id(), manifest.weights_sha256, manifest.weights_bytes
                ),
            ));
        }
        if header.total_bytes > MAX_MODEL_BYTES {
            return Err(self.invalid(
                requested,
                format!(
                    "{} bytes of weights, the limit is {MAX_MODEL_BYTES} (`MAX_MODEL_BYTES`)",
                    header.total_bytes
                ),
            ));
        }
        Ok((stream, header, manifest))
    }

    /// Reads the rest of a download into a file staged in `store`, counting and hashing
    /// as the chunks arrive, so a copy holds one chunk in memory whatever its size.
    async fn read_weights(
        &self,
        model: &str,
        header: &WeightHeader,
        mut stream: Streaming<WeightChunk>,
        store: &ModelStore,
    ) -> Result<StagedWeights, TransferError> {
        let declared = header.total_bytes;
        let mut staged = self.on_disk(model, store, |store| store.stage()).await?;
        while let Some(chunk) = stream.message().await.map_err(|s| self.refused(model, s))? {
            if chunk.header.is_some() {
                return Err(self.invalid(
                    model,
                    format!("a second header after {} bytes", staged.len()),
                ));
            }
            if staged.len() + chunk.data.len() as u64 > declared {
                return Err(self.invalid(
                    model,
                    format!("the node sent more than the {declared} bytes its header declares"),
                ));
            }
            staged = self
                .on_disk(model, store, move |_| {
                    staged.write(&chunk.data)?;
                    Ok(staged)
                })
                .await?;
        }
        if staged.len() < declared {
            return Err(TransferError::ShortStream {
                addr: self.addr.clone(),
                model: model.into(),
                received: staged.len(),
                declared,
            });
        }
        let actual = staged.sha256();
        if actual != header.sha256 {
            return Err(TransferError::HashMismatch {
                addr: self.addr.clone(),
                model: model.into(),
                expected: header.sha256.clone(),
                actual,
            });
        }
        Ok(staged)
    }

    /// Runs `work` on `store` off the async runtime: reads, file writes and imports
    /// block.
    async fn on_disk<T: Send + 'static>(
        &self,
        model: &str,
        store: &ModelStore,
        work: impl FnOnce(&ModelStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, TransferError> {
        let store = store.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|e| self.invalid(model, format!("the store task failed: {e}")))?
            .map_err(|e| self.store_error(model, e))
    }

    /// Sends one stored version.
    async fn send(&mut self, store: &ModelStore, manifest: &Manifest) -> Result<(), TransferError> {
        let model = manifest.id();
        let (weights, signature) = {
            let manifest = manifest.clone();
            self.on_disk(&model, store, move |store| {
                Ok((store.weights(&manifest)?, store.signature(&manifest)?))
            })
            .await?
        };
        let header = header_for(manifest, weights.len() as u64, signature)
            .map_err(|e| self.invalid(&model, format!("the manifest does not serialise: {e}")))?;
        let request = self.request(chunks(header, weights));
        let stored = self
            .client
            .upload(request)
            .await
            .map_err(|s| self.refused(&model, s))?
            .into_inner();
        if stored.sha256 != manifest.weights_sha256 {
            return Err(TransferError::HashMismatch {
                addr: self.addr.clone(),
                model,
                expected: manifest.weights_sha256.clone(),
                actual: stored.sha256,
            });
        }
        Ok(())
    }
}

/// Copies `id` ("name@version") from the node at `addr` ("host:port") into `store`, checking the sha256 while the chunks arrive and again on import. Returns the stored manifest.
///
/// A bare name copies the node's newest version. Ancestors (`parents`) the store
/// lacks are copied first, oldest first. `dialer` says how to reach the node
/// (mutual TLS or plaintext) and carries the mesh key where it has one.
///
/// Cancel safety: dropping the future stops the transfer; a version is either
/// imported whole or not at all (an import already started finishes on its blocking
/// thread).
pub async fn download_version(
    addr: &str,
    dialer: &Dialer,
    id: &str,
    store: &ModelStore,
) -> Result<Manifest, TransferError> {
    let mut peer = Peer::connect(addr, dialer, id).await?;
    copy_down(&mut peer, store, id.to_string(), 0).await
}

/// Copies `requested` after the parents `store` lacks; `depth` counts the versions
/// waiting below it for their parents.
fn copy_down<'a>(
    peer: &'a mut Peer,
    store: &'a ModelStore,
    requested: String,
    depth: usize,
) -> BoxFuture<'a, Result<Manifest, TransferError>> {
    Box::pin(async move {
        let (stream, header, manifest) = peer.open_download(&requested).await?;
        let parents: Vec<String> = manifest
            .parents
            .iter()
            .filter(|parent| store.get(parent).is_err())
            .cloned()
            .collect();
        let (stream, header, manifest) = if parents.is_empty() {
            (stream, header, manifest)
        } else {
            // Only the header was read; the download is asked again, by its exact
            // version, once the parents are in.
            drop(stream);
            if depth >= MAX_LINEAGE {
                return Err(peer.invalid(
                    &requested,
                    format!("its lineage loops or runs deeper than {MAX_LINEAGE} versions"),
                ));
            }
            for parent in parents {
                // A parent shared with a sibling may have arrived meanwhile.
                if store.get(&parent).is_err() {
                    copy_down(peer, store, parent, depth + 1).await?;
                }
            }
            peer.open_download(&manifest.id()).await?
        };
        let model = manifest.id();
        // Refused before the weights cross the network where the signature is not
        // trusted here; the import checks it again.
        let signature = header_signature(&header).map(<[u8]>::to_vec);
        store
            .check_signed(&manifest, signature.as_deref())
            .map_err(|e| peer.store_error(&model, e))?;
        let staged = peer.read_weights(&model, &header, stream, store).await?;
        peer.on_disk(&model, store, move |store| {
            store.import_staged(manifest, staged, signature.as_deref())
        })
        .await
    })
}

/// Sends `id` from `store` to the node at `addr`.
///
/// `id` is "name@version" or a bare name for the newest version. Ancestors the node
/// lacks (by its `List`) are sent first, oldest first. A TLS node takes uploads from
/// operators and nodes; a plaintext node in a mesh only with the mesh key in `dialer`.
/// Returns the manifest as this store holds it, which the node now holds too.
///
/// Cancel safety: dropping the future cancels the upload in flight; the node stores
/// nothing of a version whose stream did not end whole.
pub async fn upload_version(
    addr: &str,
    dialer: &Dialer,
    id: &str,
    store: &ModelStore,
) -> Result<Manifest, TransferError> {
    let local = |source| TransferError::Store {
        addr: addr.into(),
        model: id.into(),
        source,
    };
    let manifest = store.get(id).map_err(local)?;
    let lineage = lineage(store, &manifest).map_err(local)?;
    let mut peer = Peer::connect(addr, dialer, id).await?;
    let present: HashSet<String> = if lineage.len() > 1 {
        peer.client
            .list(peer.request(ListModelsRequest {}))
            .await
            .map_err(|s| peer.refused(id, s))?
            .into_inner()
            .models
            .into_iter()
            .map(|m| m.model)
            .collect()
    } else {
        HashSet::new()
    };
    for version in &lineage {
        // The requested version always goes: the node says whether it agrees.
        if version.id() == manifest.id() || !present.contains(&version.id()) {
            peer.send(store, version).await?;
        }
    }
    Ok(manifest)
}

/// Every version stored on the node at `addr`.
pub async fn list_versions(addr: &str, dialer: &Dialer) -> Result<Vec<ModelRef>, TransferError> {
    const WHAT: &str = "the model list";
    let mut peer = Peer::connect(addr, dialer, WHAT).await?;
    let request = peer.request(ListModelsRequest {});
    Ok(peer
        .client
        .list(request)
        .await
        .map_err(|s| peer.refused(WHAT, s))?
        .into_inner()
        .models)
}

/// `top` and its ancestors in `store`, every version after its parents. Each version
/// is visited once, so hand-edited manifests that loop still end.
fn lineage(store: &ModelStore, top: &Manifest) -> Result<Vec<Manifest>, StoreError> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![(top.clone(), false)];
    while let Some((manifest, parents_done)) = stack.pop() {
        if parents_done {
            order.push(manifest);
            continue;
        }
        if !seen.insert(manifest.id()) {
            continue;
        }
        let parents = manifest.parents.clone();
        stack.push((manifest, true));
        for parent in parents.iter().rev() {
            if !seen.contains(parent) {
                stack.push((store.get(parent)?, false));
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_store::tests::manifest;

    #[test]
    fn lineage_puts_every_version_after_its_parents() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path());
        store.import(manifest("m", "1", &[]), b"1").unwrap();
        store.import(manifest("m", "2", &["m@1"]), b"2").unwrap();
        let top = store
            .import(manifest("m", "3", &["m@1", "m@2"]), b"3")
            .unwrap();
        let order: Vec<String> = lineage(&store, &top)
            .unwrap()
            .iter()
            .map(Manifest::id)
            .collect();
        assert_eq!(order, ["m@1", "m@2", "m@3"]);
    }
}
