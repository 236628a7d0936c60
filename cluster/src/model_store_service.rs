//! The node's model store (`[node] models`) over gRPC: the `ModelStore` service
//! (`Upload`, `Download`, `List`) and the client the CLI and the mesh use to copy a
//! version between stores ([`download_version`], [`upload_version`],
//! [`list_versions`]).
//!
//! The contract (`WeightChunk` and `WeightHeader` in the proto), both directions:
//! 1. The first chunk carries the header: `model` ("name@version"), `sha256`,
//!    `total_bytes` and the version's manifest JSON, whose name@version, sha256 and size
//!    must say the same. Only the first chunk carries one. Data follows in chunks of
//!    [`CHUNK_BYTES`] (a receiver takes any size up to tonic's message limit).
//! 2. `Download` reads the blob through [`ModelStore::weights`], which re-hashes it: a
//!    damaged blob on the serving node is refused (`DATA_LOSS`) before a byte leaves.
//!    A bare name asks for the newest version.
//! 3. `Upload` checks, in order: the mesh's cluster key (only on a node with
//!    `[cluster]`, the rule of [`crate::link`]; `PERMISSION_DENIED`), the header
//!    (`total_bytes` at most [`MAX_MODEL_BYTES`]), then counts and hashes the bytes as
//!    they arrive. The first chunk that runs past `total_bytes` ends the upload, so a
//!    node never reads more than it agreed to; a stream that ends short, or whose bytes
//!    hash to something else, is refused too. Only then is the version imported, which
//!    is atomic ([`ModelStore::import`]): a refused upload stores nothing. The same
//!    version sent again with the same bytes is accepted; with other bytes it is
//!    `ALREADY_EXISTS`.
//! 4. The client checks the same on its side (the header against the id it asked for,
//!    the running count and hash), and the import re-hashes. A version's parents must
//!    be in the receiving store (lineage stays whole), so both transfers first copy
//!    the ancestors the other side lacks, oldest first.
//!
//! Failures: the service answers [`ServiceError`]s, mapped to gRPC codes in
//! [`crate::status`] and counted in `fogmesh_model_store_rejected_total`; the client
//! returns [`TransferError`]s naming the node, the model and the problem. Neither side
//! panics on what the other sends.

use std::collections::HashSet;
use std::pin::Pin;

use fogmesh_models::store::{parse_id, Manifest, ModelStore, StoreError};
use fogmesh_proto::model_store_client::ModelStoreClient;
use fogmesh_proto::model_store_server::ModelStore as ModelStoreRpc;
use fogmesh_proto::{ListModelsRequest, ModelList, ModelRef, WeightChunk, WeightHeader};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::link::{self, ClusterKey, LinkError, KEY_HEADER};
use crate::shutdown::Shutdown;
use crate::status::ServiceError;
use crate::telemetry;

/// Data bytes per chunk a sender puts in one `WeightChunk`: well inside tonic's 4 MiB
/// message limit, so neither side needs to raise it.
pub const CHUNK_BYTES: usize = 256 << 10;
/// Largest weights a node takes in one upload or a client in one download.
pub const MAX_MODEL_BYTES: u64 = 4 << 30;
/// Receivers reserve at most this much before the bytes arrive: a header declaring
/// gigabytes must not reserve them on a small gateway before sending any.
const PREALLOCATE_BYTES: u64 = 64 << 20;
/// Deepest chain of missing ancestors one download follows; a lineage that goes
/// deeper, or loops, is refused rather than followed forever.
const MAX_LINEAGE: usize = 256;

/// The `ModelStore` service of one node.
#[derive(Clone)]
pub(crate) struct ModelStoreService {
    node: String,
    store: Option<ModelStore>,
    /// The mesh's key on a node with `[cluster]`: uploads must carry it.
    key: Option<ClusterKey>,
    shutdown: Shutdown,
}

impl ModelStoreService {
    pub(crate) fn new(
        node: String,
        store: Option<ModelStore>,
        key: Option<ClusterKey>,
        shutdown: Shutdown,
    ) -> Self {
        ModelStoreService {
            node,
            store,
            key,
            shutdown,
        }
    }

    fn store(&self) -> Result<&ModelStore, ServiceError> {
        self.store
            .as_ref()
            .ok_or_else(|| ServiceError::NoModelStore {
                node: self.node.clone(),
            })
    }

    /// Runs `work` on the store off the async runtime: reads and imports hash whole
    /// blobs, seconds for a large model.
    async fn on_store<T: Send + 'static>(
        &self,
        work: impl FnOnce(ModelStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let store = self.store()?.clone();
        tokio::task::spawn_blocking(move || work(store))
            .await
            .map_err(|e| ServiceError::ModelStoreFailed {
                node: self.node.clone(),
                reason: format!("the store task failed: {e}"),
            })?
            .map_err(|e| ServiceError::from_store(&self.node, e))
    }

    fn refuse(&self, rpc: &'static str, error: ServiceError) -> Status {
        metrics::counter!(telemetry::MODEL_STORE_REJECTED, "rpc" => rpc, "reason" => error.reason())
            .increment(1);
        tracing::info!(node = %self.node, rpc, %error, "model store call refused");
        Status::from(error)
    }

    /// Step 3 of the module doc; the key and the store were checked by the caller.
    async fn receive(&self, mut chunks: Streaming<WeightChunk>) -> Result<ModelRef, ServiceError> {
        let no_header = |reason: String| ServiceError::InvalidField {
            field: "header".into(),
            value: "none".into(),
            reason,
        };
        let first = match chunks.message().await {
            Ok(Some(first)) => first,
            Ok(None) => {
                return Err(no_header(
                    "the upload stream was empty; its first chunk must carry the header".into(),
                ))
            }
            Err(status) => {
                return Err(no_header(format!(
                    "the stream broke before its first chunk: {}",
                    status.message()
                )))
            }
        };
        let header = first.header.ok_or_else(|| {
            no_header("the first chunk of an upload must carry the header".into())
        })?;
        let manifest = check_header(&header)?;
        let model = header.model;
        let declared = header.total_bytes;
        let length_error = |received: u64, reason: String| ServiceError::UploadLength {
            model: model.clone(),
            received,
            declared,
            reason,
        };
        let mut hasher = Sha256::new();
        let mut weights = Vec::with_capacity(declared.min(PREALLOCATE_BYTES) as usize);
        let mut data = first.data;
        loop {
            let received = weights.len() as u64 + data.len() as u64;
            if received > declared {
                return Err(length_error(received, "the stream ran past it".into()));
            }
            hasher.update(&data);
            weights.extend_from_slice(&data);
            match chunks.message().await {
                Ok(Some(chunk)) if chunk.header.is_some() => {
                    return Err(ServiceError::InvalidField {
                        field: "header".into(),
                        value: format!("a second header after {} bytes", weights.len()),
                        reason: "only the first chunk of an upload carries the header".into(),
                    })
                }
                Ok(Some(chunk)) => data = chunk.data,
                Ok(None) => break,
                Err(status) => {
                    return Err(length_error(
                        weights.len() as u64,
                        format!("the stream broke: {}", status.message()),
                    ))
                }
            }
        }
        let received = weights.len() as u64;
        if received < declared {
            return Err(length_error(received, "the stream ended early".into()));
        }
        let actual = hex(&hasher.finalize());
        if !actual.eq_ignore_ascii_case(&header.sha256) {
            return Err(ServiceError::InvalidField {
                field: "header.sha256".into(),
                value: header.sha256,
                reason: format!(
                    "the {received} bytes received hash to {actual}; nothing was stored"
                ),
            });
        }
        let stored = self
            .on_store(move |store| store.import(manifest, &weights))
            .await?;
        tracing::info!(node = %self.node, model = %stored.id(), bytes = stored.weights_bytes, "stored an uploaded model version");
        Ok(ModelRef {
            model: stored.id(),
            sha256: stored.weights_sha256,
            total_bytes: stored.weights_bytes,
        })
    }

    /// The header and the checked weights of `model` (step 2 of the module doc).
    async fn outgoing(&self, model: String) -> Result<(WeightHeader, Vec<u8>), ServiceError> {
        check_requested_id(&model)?;
        let (manifest, weights) = self
            .on_store(move |store| {
                let manifest = store.get(&model)?;
                let weights = store.weights(&manifest)?;
                Ok((manifest, weights))
            })
            .await?;
        let header = header_for(&manifest, weights.len() as u64).map_err(|e| {
            ServiceError::ModelStoreFailed {
                node: self.node.clone(),
                reason: format!("the manifest of {} does not serialise: {e}", manifest.id()),
            }
        })?;
        Ok((header, weights))
    }
}

/// Checks an upload's header and returns its manifest.
fn check_header(header: &WeightHeader) -> Result<Manifest, ServiceError> {
    let model = &header.model;
    let invalid = |field: &str, value: String, reason: String| ServiceError::InvalidField {
        field: field.into(),
        value,
        reason,
    };
    if !matches!(parse_id(model), (name, Some(version)) if !name.is_empty() && !version.is_empty())
    {
        return Err(invalid(
            "header.model",
            format!("{model:?}"),
            "must be name@version".into(),
        ));
    }
    if header.total_bytes > MAX_MODEL_BYTES {
        return Err(ServiceError::ModelTooLarge {
            model: model.clone(),
            bytes: header.total_bytes,
            limit: MAX_MODEL_BYTES,
        });
    }
    if header.sha256.len() != 64 || !header.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(
            "header.sha256",
            format!("{:?}", header.sha256),
            "must be 64 hex digits".into(),
        ));
    }
    let manifest: Manifest = serde_json::from_slice(&header.manifest).map_err(|e| {
        invalid(
            "header.manifest",
            format!("{} bytes", header.manifest.len()),
            format!("not a model store manifest: {e}"),
        )
    })?;
    if manifest.id() != *model {
        return Err(invalid(
            "header.manifest",
            format!("{:?}", manifest.id()),
            format!("names another version than `header.model` = {model:?}"),
        ));
    }
    if !manifest.weights_sha256.eq_ignore_ascii_case(&header.sha256) {
        return Err(invalid(
            "header.manifest.weights_sha256",
            format!("{:?}", manifest.weights_sha256),
            format!("`header.sha256` is {}", header.sha256),
        ));
    }
    if manifest.weights_bytes != header.total_bytes {
        return Err(invalid(
            "header.manifest.weights_bytes",
            manifest.weights_bytes.to_string(),
            format!("`header.total_bytes` is {}", header.total_bytes),
        ));
    }
    Ok(manifest)
}

/// A requested id becomes a path in the store, which checks names when it imports,
/// not when it reads: refuse anything that could leave the store's folder.
fn check_requested_id(model: &str) -> Result<(), ServiceError> {
    let (name, version) = parse_id(model);
    let safe = |part: &str| {
        !part.is_empty()
            && part.len() <= 128
            && !part.starts_with('.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if safe(name) && version.is_none_or(safe) {
        Ok(())
    } else {
        Err(ServiceError::InvalidField {
            field: "model".into(),
            value: format!("{model:?}"),
            reason: "must be name or name@version, each 1 to 128 of A-Z a-z 0-9 - _ . (not starting with a dot)".into(),
        })
    }
}

fn header_for(manifest: &Manifest, total_bytes: u64) -> Result<WeightHeader, serde_json::Error> {
    Ok(WeightHeader {
        model: manifest.id(),
        sha256: manifest.weights_sha256.clone(),
        total_bytes,
        manifest: serde_json::to_vec_pretty(manifest)?,
    })
}

/// The header alone, then the weights in [`CHUNK_BYTES`] pieces, made as the stream is
/// read, so a slow reader holds one chunk in flight, not a copy of the weights.
fn chunks(header: WeightHeader, weights: Vec<u8>) -> impl Stream<Item = WeightChunk> + Send {
    let head = WeightChunk {
        header: Some(header),
        data: Vec::new(),
    };
    let count = weights.len().div_ceil(CHUNK_BYTES);
    let data = (0..count).map(move |i| {
        let end = weights.len().min((i + 1) * CHUNK_BYTES);
        WeightChunk {
            header: None,
            data: weights[i * CHUNK_BYTES..end].to_vec(),
        }
    });
    futures::stream::iter(std::iter::once(head).chain(data))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl ModelStoreRpc for ModelStoreService {
    async fn upload(
        &self,
        request: Request<Streaming<WeightChunk>>,
    ) -> Result<Response<ModelRef>, Status> {
        if let Some(key) = &self.key {
            if !link::carries_key(&request, key) {
                return Err(self.refuse(
                    "upload",
                    ServiceError::WrongClusterKey {
                        node: self.node.clone(),
                        call: "upload",
                    },
                ));
            }
        }
        if let Err(e) = self.store() {
            return Err(self.refuse("upload", e));
        }
        match self.receive(request.into_inner()).await {
            Ok(stored) => Ok(Response::new(stored)),
            Err(e) => Err(self.refuse("upload", e)),
        }
    }

    type DownloadStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;

    async fn download(
        &self,
        request: Request<ModelRef>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let (header, weights) = self
            .outgoing(request.into_inner().model)
            .await
            .map_err(|e| self.refuse("download", e))?;
        let mut shutdown = self.shutdown.clone();
        // A download cut by shutdown ends short; the client sees the count fall short.
        let stream = chunks(header, weights)
            .map(Ok)
            .take_until(async move { shutdown.fired().await });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ModelList>, Status> {
        let manifests = self
            .on_store(|store| store.list())
            .await
            .map_err(|e| self.refuse("list", e))?;
        Ok(Response::new(ModelList {
            models: manifests
                .into_iter()
                .map(|m| ModelRef {
                    model: m.id(),
                    sha256: m.weights_sha256,
                    total_bytes: m.weights_bytes,
                })
                .collect(),
        }))
    }
}

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
    async fn connect(addr: &str, key: Option<&str>, model: &str) -> Result<Peer, TransferError> {
        let key = key
            .map(str::parse::<AsciiMetadataValue>)
            .transpose()
            .map_err(|_| TransferError::Invalid {
                addr: addr.into(),
                model: model.into(),
                problem: "the cluster key is not valid gRPC metadata (visible ASCII only)".into(),
            })?;
        let channel = link::connect(addr)
            .await
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

    /// Reads the rest of a download, counting and hashing as the chunks arrive.
    async fn read_weights(
        &self,
        model: &str,
        header: &WeightHeader,
        mut stream: Streaming<WeightChunk>,
    ) -> Result<Vec<u8>, TransferError> {
        let declared = header.total_bytes;
        let mut hasher = Sha256::new();
        let mut weights = Vec::with_capacity(declared.min(PREALLOCATE_BYTES) as usize);
        while let Some(chunk) = stream.message().await.map_err(|s| self.refused(model, s))? {
            if chunk.header.is_some() {
                return Err(self.invalid(
                    model,
                    format!("a second header after {} bytes", weights.len()),
                ));
            }
            if weights.len() as u64 + chunk.data.len() as u64 > declared {
                return Err(self.invalid(
                    model,
                    format!("the node sent more than the {declared} bytes its header declares"),
                ));
            }
            hasher.update(&chunk.data);
            weights.extend_from_slice(&chunk.data);
        }
        if (weights.len() as u64) < declared {
            return Err(TransferError::ShortStream {
                addr: self.addr.clone(),
                model: model.into(),
                received: weights.len() as u64,
                declared,
            });
        }
        let actual = hex(&hasher.finalize());
        if actual != header.sha256 {
            return Err(TransferError::HashMismatch {
                addr: self.addr.clone(),
                model: model.into(),
                expected: header.sha256.clone(),
                actual,
            });
        }
        Ok(weights)
    }

    /// Sends one stored version.
    async fn send(&mut self, store: &ModelStore, manifest: &Manifest) -> Result<(), TransferError> {
        let model = manifest.id();
        let weights = {
            let (store, manifest) = (store.clone(), manifest.clone());
            tokio::task::spawn_blocking(move || store.weights(&manifest))
                .await
                .map_err(|e| self.invalid(&model, format!("the read task failed: {e}")))?
                .map_err(|e| self.store_error(&model, e))?
        };
        let header = header_for(manifest, weights.len() as u64)
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

/// Imports off the async runtime: the store re-hashes the whole blob.
async fn import(
    peer: &Peer,
    store: &ModelStore,
    manifest: Manifest,
    weights: Vec<u8>,
) -> Result<Manifest, TransferError> {
    let model = manifest.id();
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.import(manifest, &weights))
        .await
        .map_err(|e| peer.invalid(&model, format!("the import task failed: {e}")))?
        .map_err(|e| peer.store_error(&model, e))
}

/// Copies `id` ("name@version") from the node at `addr` ("host:port") into `store`, checking the sha256 while the chunks arrive and again on import. Returns the stored manifest.
///
/// A bare name copies the node's newest version. Ancestors (`parents`) the store
/// lacks are copied first, oldest first. `cluster_key` is the value of the
/// `fogmesh-cluster-key` metadata ([`ClusterKey::as_str`] of
/// [`ClusterKey::from_secret`]); downloads need none, but it is sent when given.
///
/// Cancel safety: dropping the future stops the transfer; a version is either
/// imported whole or not at all (an import already started finishes on its blocking
/// thread).
pub async fn download_version(
    addr: &str,
    cluster_key: Option<&str>,
    id: &str,
    store: &ModelStore,
) -> Result<Manifest, TransferError> {
    let mut peer = Peer::connect(addr, cluster_key, id).await?;
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
        let weights = peer.read_weights(&model, &header, stream).await?;
        import(peer, store, manifest, weights).await
    })
}

/// Sends `id` from `store` to the node at `addr`.
///
/// `id` is "name@version" or a bare name for the newest version. Ancestors the node
/// lacks (by its `List`) are sent first, oldest first. A node in a mesh takes uploads
/// only with `cluster_key`, the value of the `fogmesh-cluster-key` metadata
/// ([`ClusterKey::as_str`] of [`ClusterKey::from_secret`] on the mesh's secret).
/// Returns the manifest as this store holds it, which the node now holds too.
///
/// Cancel safety: dropping the future cancels the upload in flight; the node stores
/// nothing of a version whose stream did not end whole.
pub async fn upload_version(
    addr: &str,
    cluster_key: Option<&str>,
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
    let mut peer = Peer::connect(addr, cluster_key, id).await?;
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
pub async fn list_versions(
    addr: &str,
    cluster_key: Option<&str>,
) -> Result<Vec<ModelRef>, TransferError> {
    const WHAT: &str = "the model list";
    let mut peer = Peer::connect(addr, cluster_key, WHAT).await?;
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
    use fogmesh_models::store::{InputSpec, ModelKind};

    fn manifest(name: &str, version: &str, parents: &[&str]) -> Manifest {
        Manifest {
            name: name.into(),
            version: version.into(),
            kind: ModelKind::TimeSeries,
            architecture: "conv_autoencoder".into(),
            hyper: serde_json::Value::Null,
            input: InputSpec {
                shape: vec![-1, 2, 16],
                description: String::new(),
            },
            training: serde_json::Value::Null,
            metrics: Default::default(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
            weights_sha256: String::new(),
            weights_bytes: 0,
            created_us: 0,
        }
    }

    #[test]
    fn chunks_carry_the_header_first_then_every_byte_in_order() {
        let weights: Vec<u8> = (0..2 * CHUNK_BYTES + 5).map(|i| i as u8).collect();
        let header = WeightHeader {
            model: "m@1".into(),
            ..Default::default()
        };
        let sent: Vec<WeightChunk> =
            futures::executor::block_on(chunks(header, weights.clone()).collect());
        assert_eq!(sent.len(), 4);
        assert!(sent[0].header.is_some() && sent[0].data.is_empty());
        assert!(sent[1..].iter().all(|c| c.header.is_none()));
        assert_eq!(sent[3].data.len(), 5);
        let data: Vec<u8> = sent.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(data, weights);
    }

    #[test]
    fn headers_that_disagree_with_their_manifest_are_refused_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path());
        let stored = store
            .import(manifest("pump", "1", &[]), b"weights")
            .unwrap();
        let good = header_for(&stored, 7).unwrap();
        assert_eq!(check_header(&good).unwrap(), stored);
        let cases = [
            (
                WeightHeader {
                    model: "pump".into(),
                    ..good.clone()
                },
                "header.model",
            ),
            (
                WeightHeader {
                    model: "pump@2".into(),
                    ..good.clone()
                },
                "header.manifest",
            ),
            (
                WeightHeader {
                    sha256: "ab".repeat(32),
                    ..good.clone()
                },
                "header.manifest.weights_sha256",
            ),
            (
                WeightHeader {
                    total_bytes: 8,
                    ..good.clone()
                },
                "header.manifest.weights_bytes",
            ),
            (
                WeightHeader {
                    manifest: b"{".to_vec(),
                    ..good.clone()
                },
                "header.manifest",
            ),
        ];
        for (header, field) in cases {
            match check_header(&header) {
                Err(ServiceError::InvalidField { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let huge = WeightHeader {
            total_bytes: MAX_MODEL_BYTES + 1,
            ..good
        };
        let error = check_header(&huge).unwrap_err();
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
        assert!(
            error.to_string().contains(&MAX_MODEL_BYTES.to_string()),
            "{error}"
        );
    }

    #[test]
    fn requested_ids_cannot_leave_the_store() {
        for good in ["pump", "pump@1", "pump-ae_2@v1.2"] {
            assert!(check_requested_id(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "pump@../../etc", "a/b@1", ".hidden", "pump@"] {
            assert!(check_requested_id(bad).is_err(), "{bad}");
        }
    }

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
