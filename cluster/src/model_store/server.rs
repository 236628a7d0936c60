//! The `ModelStore` service of one node: `Upload`, `Download` and `List` over the
//! node's store, steps 2 and 3 of the contract in [`super`].
//!
//! Everything a caller sends is checked before the store sees it (the key, the
//! header, the requested id, the running count and hash), because the store checks
//! names on import only and a refused upload must store nothing. Store work runs on
//! blocking threads: reads and imports hash whole blobs.

use std::pin::Pin;
use std::sync::Arc;

use fogmesh_models::store::{parse_id, Manifest, ModelStore, StoreError};
use fogmesh_proto::model_store_server::ModelStore as ModelStoreRpc;
use fogmesh_proto::{ListModelsRequest, ModelList, ModelRef, WeightChunk, WeightHeader};
use futures::{Stream, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{
    chunks, header_for, header_signature, MAX_CONCURRENT_UPLOADS, MAX_MODEL_BYTES,
    UPLOAD_IDLE_TIMEOUT,
};
use crate::cluster_key::{self, ClusterKey};
use crate::status::ServiceError;
use crate::telemetry;

/// The `ModelStore` service of one node.
#[derive(Clone)]
pub(crate) struct ModelStoreService {
    node: String,
    store: Option<ModelStore>,
    /// The mesh's key on a node with `[cluster]`: uploads must carry it.
    key: Option<ClusterKey>,
    shutdown: CancellationToken,
    /// One permit per upload being received ([`MAX_CONCURRENT_UPLOADS`]).
    uploads: Arc<Semaphore>,
}

impl ModelStoreService {
    pub(crate) fn new(
        node: String,
        store: Option<ModelStore>,
        key: Option<ClusterKey>,
        shutdown: CancellationToken,
    ) -> Self {
        ModelStoreService {
            node,
            store,
            key,
            shutdown,
            uploads: Arc::new(Semaphore::new(MAX_CONCURRENT_UPLOADS)),
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
        let first = match next_chunk(&mut chunks).await {
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
        // An untrusted signature is refused before a byte of weights is read; the
        // import checks it again with the weights.
        let signature = header_signature(&header).map(<[u8]>::to_vec);
        self.store()?
            .check_signed(&manifest, signature.as_deref())
            .map_err(|e| ServiceError::from_store(&self.node, e))?;
        let model = header.model;
        let declared = header.total_bytes;
        let length_error = |received: u64, reason: String| ServiceError::UploadLength {
            model: model.clone(),
            received,
            declared,
            reason,
        };
        // Bytes go to a staged file as they come: an upload costs the node one chunk of
        // memory whatever the model's size, and a refused one leaves no file.
        let mut staged = self.on_store(|store| store.stage()).await?;
        let mut data = first.data;
        loop {
            let received = staged.len() + data.len() as u64;
            if received > declared {
                return Err(length_error(received, "the stream ran past it".into()));
            }
            if !data.is_empty() {
                staged = self
                    .on_store(move |_| {
                        staged.write(&data)?;
                        Ok(staged)
                    })
                    .await?;
            }
            match next_chunk(&mut chunks).await {
                Ok(Some(chunk)) if chunk.header.is_some() => {
                    return Err(ServiceError::InvalidField {
                        field: "header".into(),
                        value: format!("a second header after {} bytes", staged.len()),
                        reason: "only the first chunk of an upload carries the header".into(),
                    })
                }
                Ok(Some(chunk)) => data = chunk.data,
                Ok(None) => break,
                Err(status) => {
                    return Err(length_error(
                        staged.len(),
                        format!("the stream broke: {}", status.message()),
                    ))
                }
            }
        }
        let received = staged.len();
        if received < declared {
            return Err(length_error(received, "the stream ended early".into()));
        }
        let actual = staged.sha256();
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
            .on_store(move |store| store.import_staged(manifest, staged, signature.as_deref()))
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
        let (manifest, weights, signature) = self
            .on_store(move |store| {
                let manifest = store.get(&model)?;
                let weights = store.weights(&manifest)?;
                let signature = store.signature(&manifest)?;
                Ok((manifest, weights, signature))
            })
            .await?;
        let header = header_for(&manifest, weights.len() as u64, signature).map_err(|e| {
            ServiceError::ModelStoreFailed {
                node: self.node.clone(),
                reason: format!("the manifest of {} does not serialise: {e}", manifest.id()),
            }
        })?;
        Ok((header, weights))
    }
}

/// The next chunk of an upload, or a broken stream when none comes within
/// [`UPLOAD_IDLE_TIMEOUT`]: an upload holds one of the node's few upload places, so a
/// sender that stalls gives it back instead of holding it for good.
async fn next_chunk(chunks: &mut Streaming<WeightChunk>) -> Result<Option<WeightChunk>, Status> {
    tokio::time::timeout(UPLOAD_IDLE_TIMEOUT, chunks.message())
        .await
        .unwrap_or_else(|_| {
            Err(Status::from(ServiceError::UploadStalled {
                seconds: UPLOAD_IDLE_TIMEOUT.as_secs(),
            }))
        })
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

#[tonic::async_trait]
impl ModelStoreRpc for ModelStoreService {
    async fn upload(
        &self,
        request: Request<Streaming<WeightChunk>>,
    ) -> Result<Response<ModelRef>, Status> {
        if let Some(key) = &self.key {
            if !cluster_key::carries_key(&request, key) {
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
        let Ok(_receiving) = self.uploads.clone().try_acquire_owned() else {
            return Err(self.refuse(
                "upload",
                ServiceError::TooManyUploads {
                    node: self.node.clone(),
                    limit: MAX_CONCURRENT_UPLOADS,
                },
            ));
        };
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
        // A download cut by shutdown ends short; the client sees the count fall short.
        let stream = chunks(header, weights)
            .map(Ok)
            .take_until(self.shutdown.clone().cancelled_owned());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_store::tests::manifest;

    #[test]
    fn headers_that_disagree_with_their_manifest_are_refused_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path());
        let stored = store
            .import(manifest("pump", "1", &[]), b"weights")
            .unwrap();
        let good = header_for(&stored, 7, None).unwrap();
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
}
