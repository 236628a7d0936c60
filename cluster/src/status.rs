//! The one mapping from fogmesh errors to gRPC status codes (and to the `reason`
//! label of the rejection metrics).
//!
//! [`ServiceError`] is everything a request to the node can be refused for: the
//! limits of `[limits]`, malformed fields the services check themselves, and the
//! actors' [`IngestError`] and [`ScoreError`]. Its `Display` is the status message and
//! names the field, the value and the limit; MQTT acknowledgements carry the same text.
//!
//! | error | code |
//! |---|---|
//! | over a `[limits]` limit; weights over `MAX_MODEL_BYTES` | `RESOURCE_EXHAUSTED` |
//! | bad field, malformed payload, unknown sensor, wrong channel count, NaN/Inf, timestamp going back, no route, wrong window shape, gate error; an upload whose bytes, hash or manifest disagree with its header | `INVALID_ARGUMENT` |
//! | unknown router; unknown model version | `NOT_FOUND` |
//! | a stored version sent again with other weights | `ALREADY_EXISTS` |
//! | no model store on the node; an uploaded version whose parent the store lacks | `FAILED_PRECONDITION` |
//! | an upload to a mesh node without the mesh's cluster key | `PERMISSION_DENIED` |
//! | sensor stream, router or expert not answering; expert not calibrated | `UNAVAILABLE` |
//! | a stored blob or manifest that no longer reads back as written | `DATA_LOSS` |
//! | model failure; the model store's disk failing | `INTERNAL` |

use fogmesh_actors::{IngestError, ScoreError};
use fogmesh_models::store::StoreError;
use tonic::{Code, Status};

/// Why the node refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServiceError {
    #[error("message of {bytes} bytes, the limit is {limit} bytes (`limits.max_message_bytes`)")]
    MessageTooLarge { bytes: usize, limit: usize },
    #[error("field `samples`: {got} samples in one batch, the limit is {limit} (`limits.max_batch_samples`)")]
    TooManySamples { got: usize, limit: usize },
    #[error(
        "field `samples[{index}].values`: {got} values in one sample, the limit is {limit} (`limits.max_values_per_sample`)"
    )]
    TooManyValues {
        index: usize,
        got: usize,
        limit: usize,
    },
    #[error("field `{field}` = {value}: {reason}")]
    InvalidField {
        field: String,
        value: String,
        reason: String,
    },
    #[error("payload of {bytes} bytes is not a JSON sample batch: {reason}")]
    MalformedPayload { bytes: usize, reason: String },
    #[error("field `router`: no router `{router}` runs on this node")]
    UnknownRouter { router: String },
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error("node `{node}` has no model store: set `models` in [node]")]
    NoModelStore { node: String },
    #[error("node `{node}` refused the {call}: metadata `fogmesh-cluster-key` is missing or is not this mesh's key (the fingerprint of [cluster] secret)")]
    WrongClusterKey { node: String, call: &'static str },
    #[error("field `model` = {model:?}: no such model in the store of node `{node}`")]
    UnknownModel { node: String, model: String },
    #[error("field `header.total_bytes` = {bytes} for {model}: the limit is {limit} bytes (`MAX_MODEL_BYTES`)")]
    ModelTooLarge {
        model: String,
        bytes: u64,
        limit: u64,
    },
    #[error("upload of {model}: {received} bytes came where its header declares {declared} (`header.total_bytes`): {reason}; nothing was stored")]
    UploadLength {
        model: String,
        received: u64,
        declared: u64,
        reason: String,
    },
    #[error("{model} is already stored on node `{node}` with other weights; a stored version never changes (upload it as a new version)")]
    ModelVersionExists { node: String, model: String },
    #[error("{model} names parent {parent}, which is not in the store of node `{node}`: send the parent first")]
    UnknownParent {
        node: String,
        model: String,
        parent: String,
    },
    #[error("the model store of node `{node}` is damaged: {reason}")]
    ModelStoreDamaged { node: String, reason: String },
    #[error("the model store of node `{node}` failed: {reason}")]
    ModelStoreFailed { node: String, reason: String },
}

impl ServiceError {
    /// A refusal of node `node`'s model store, as the caller should read it: the
    /// store's field names become the upload's (`header.manifest.*`).
    pub fn from_store(node: &str, error: StoreError) -> ServiceError {
        let node = node.to_string();
        match error {
            StoreError::NotFound(model) => ServiceError::UnknownModel { node, model },
            StoreError::Invalid {
                field,
                value,
                reason,
            } => ServiceError::InvalidField {
                field: format!("header.manifest.{field}"),
                value: format!("{value:?}"),
                reason,
            },
            StoreError::HashMismatch {
                id,
                declared,
                actual,
            } => ServiceError::InvalidField {
                field: "header.manifest.weights_sha256".into(),
                value: declared,
                reason: format!("the weights of {id} hash to {actual}"),
            },
            StoreError::VersionExists { id } => {
                ServiceError::ModelVersionExists { node, model: id }
            }
            StoreError::UnknownParent { id, parent } => ServiceError::UnknownParent {
                node,
                model: id,
                parent,
            },
            error @ (StoreError::Tampered { .. } | StoreError::Manifest { .. }) => {
                ServiceError::ModelStoreDamaged {
                    node,
                    reason: error.to_string(),
                }
            }
            error @ StoreError::Io { .. } => ServiceError::ModelStoreFailed {
                node,
                reason: error.to_string(),
            },
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ServiceError::MessageTooLarge { .. }
            | ServiceError::TooManySamples { .. }
            | ServiceError::TooManyValues { .. }
            | ServiceError::ModelTooLarge { .. } => Code::ResourceExhausted,
            ServiceError::UploadLength { .. } => Code::InvalidArgument,
            ServiceError::UnknownModel { .. } => Code::NotFound,
            ServiceError::ModelVersionExists { .. } => Code::AlreadyExists,
            ServiceError::NoModelStore { .. } | ServiceError::UnknownParent { .. } => {
                Code::FailedPrecondition
            }
            ServiceError::WrongClusterKey { .. } => Code::PermissionDenied,
            ServiceError::ModelStoreDamaged { .. } => Code::DataLoss,
            ServiceError::ModelStoreFailed { .. } => Code::Internal,
            ServiceError::InvalidField { .. } | ServiceError::MalformedPayload { .. } => {
                Code::InvalidArgument
            }
            ServiceError::UnknownRouter { .. } => Code::NotFound,
            ServiceError::Ingest(e) => match e {
                IngestError::UnknownSensor { .. }
                | IngestError::WrongChannelCount { .. }
                | IngestError::NotFinite { .. }
                | IngestError::TimestampBackwards { .. } => Code::InvalidArgument,
                IngestError::StreamUnavailable { .. } => Code::Unavailable,
            },
            ServiceError::Score(e) => match e {
                ScoreError::NoRoute { .. }
                | ScoreError::WrongWindowShape { .. }
                | ScoreError::Gate { .. } => Code::InvalidArgument,
                // The router exists (the services check names first), so this is a
                // router that did not answer in time or stopped: retryable.
                ScoreError::RouterUnavailable { .. }
                | ScoreError::ExpertUnavailable { .. }
                | ScoreError::Uncalibrated { .. } => Code::Unavailable,
                ScoreError::UnknownRouter { .. } => Code::NotFound,
                ScoreError::TooLargeToSend { .. } => Code::ResourceExhausted,
                ScoreError::Model { .. } => Code::Internal,
            },
        }
    }

    /// The `reason` label of the rejection metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ServiceError::MessageTooLarge { .. } => "message_too_large",
            ServiceError::TooManySamples { .. } => "too_many_samples",
            ServiceError::TooManyValues { .. } => "too_many_values",
            ServiceError::InvalidField { .. } => "invalid_field",
            ServiceError::MalformedPayload { .. } => "malformed",
            ServiceError::UnknownRouter { .. } => "unknown_router",
            ServiceError::Ingest(e) => e.reason(),
            ServiceError::Score(e) => e.reason(),
            ServiceError::NoModelStore { .. } => "no_model_store",
            ServiceError::WrongClusterKey { .. } => "wrong_cluster_key",
            ServiceError::UnknownModel { .. } => "unknown_model",
            ServiceError::ModelTooLarge { .. } => "model_too_large",
            ServiceError::UploadLength { .. } => "upload_length",
            ServiceError::ModelVersionExists { .. } => "version_exists",
            ServiceError::UnknownParent { .. } => "unknown_parent",
            ServiceError::ModelStoreDamaged { .. } => "store_damaged",
            ServiceError::ModelStoreFailed { .. } => "store_failed",
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Status {
        Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_resource_exhausted_and_name_the_limit() {
        let status = Status::from(ServiceError::TooManySamples {
            got: 20_000,
            limit: 10_000,
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "field `samples`: 20000 samples in one batch, the limit is 10000 (`limits.max_batch_samples`)"
        );
    }

    #[test]
    fn ingest_errors_keep_the_actors_message() {
        let error = IngestError::NotFinite {
            sensor_id: "pump-1".into(),
            sequence: 7,
            channel: 1,
            value: f32::NAN,
        };
        let status = Status::from(ServiceError::from(error.clone()));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), error.to_string());
        let unavailable = ServiceError::from(IngestError::StreamUnavailable {
            sensor_id: "pump-1".into(),
            reason: "stopped".into(),
        });
        assert_eq!(unavailable.code(), Code::Unavailable);
    }

    #[test]
    fn store_errors_map_by_who_is_at_fault_and_keep_the_node() {
        let exists = ServiceError::from_store(
            "edge-1",
            StoreError::VersionExists {
                id: "pump-ae@1".into(),
            },
        );
        assert_eq!(exists.code(), Code::AlreadyExists);
        assert!(exists.to_string().contains("pump-ae@1") && exists.to_string().contains("edge-1"));
        let missing = ServiceError::from_store("edge-1", StoreError::NotFound("pump-ae@9".into()));
        assert_eq!(missing.code(), Code::NotFound);
        let tampered = ServiceError::from_store(
            "edge-1",
            StoreError::Tampered {
                path: "blobs/ab.safetensors".into(),
                expected: "ab".into(),
                actual: "cd".into(),
            },
        );
        assert_eq!(tampered.code(), Code::DataLoss);
        let orphan = ServiceError::from_store(
            "edge-1",
            StoreError::UnknownParent {
                id: "pump-ae@2".into(),
                parent: "pump-ae@1".into(),
            },
        );
        assert_eq!(orphan.code(), Code::FailedPrecondition);
    }

    #[test]
    fn score_errors_map_by_who_is_at_fault() {
        let no_route = ServiceError::from(ScoreError::NoRoute {
            router: "r".into(),
            sensor_id: "s".into(),
        });
        assert_eq!(no_route.code(), Code::InvalidArgument);
        assert_eq!(
            ServiceError::UnknownRouter { router: "r".into() }.code(),
            Code::NotFound
        );
        let model = ServiceError::from(ScoreError::Model {
            expert: "e".into(),
            reason: "oom".into(),
        });
        assert_eq!(model.code(), Code::Internal);
    }
}
