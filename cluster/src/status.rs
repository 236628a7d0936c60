//! The one mapping from fogmesh errors to gRPC status codes (and to the `reason`
//! label of the rejection metrics).
//!
//! [`ServiceError`] is everything a request to the node can be refused for: the
//! limits of `[limits]`, malformed fields the services check themselves, the actors'
//! [`IngestError`] and [`ScoreError`], the model store's refusals, the mesh calls of
//! `Control` (`Apply`, `GetMesh`, `Rollout`) and the admission of cluster links. Its
//! `Display` is the status message and names the field, the value and the limit; MQTT
//! acknowledgements carry the same text. [`ServiceError::code`] decides every code in
//! one match, so no service builds a status of its own.
//!
//! | error | code |
//! |---|---|
//! | over a `[limits]` limit; weights over `MAX_MODEL_BYTES`; a window too large to send to a remote expert | `RESOURCE_EXHAUSTED` |
//! | bad field, malformed payload, unknown sensor, wrong channel count, NaN/Inf, timestamp going back, no route, wrong window shape, gate error; an upload whose bytes, hash or manifest disagree with its header; a mesh spec that is not TOML or does not check (`Apply`); a rollout to something that is not a version, to a version unfit for the expert, or whose spec does not check; a cluster link dialer that does not say its name | `INVALID_ARGUMENT` |
//! | unknown router; unknown model version; a rollout of an expert the spec lacks or of a version no store of the mesh holds | `NOT_FOUND` |
//! | a stored version sent again with other weights | `ALREADY_EXISTS` |
//! | no model store on the node; an uploaded version whose parent the store lacks; a mesh call to a node without `[cluster]`; an applied spec whose stored versions no node could give, or that cannot be placed on the live nodes; a rollout with no spec applied, of an expert not serving a stored model, with nothing to roll back to, or to the version already served | `FAILED_PRECONDITION` |
//! | the spec changed while a rollout ran | `ABORTED` |
//! | an upload to a mesh node without the mesh's cluster key; a cluster link from a node with another cluster secret | `PERMISSION_DENIED` |
//! | sensor stream, router or expert not answering; expert not calibrated; a cluster link to a node that is stopping | `UNAVAILABLE` |
//! | a stored blob or manifest that no longer reads back as written | `DATA_LOSS` |
//! | model failure; the model store's disk failing; the deployment state poisoned by a panic | `INTERNAL` |

use fogmesh_actors::{IngestError, ScoreError};
use fogmesh_models::store::StoreError;
use ractor::MessagingErr;
use tonic::{Code, Status};

use crate::cluster_key::NODE_HEADER;
use crate::config::ConfigError;
use crate::deployment::{ApplyError, NoQuorum};
use crate::rollout::RolloutError;

/// Why the node refused a request.
#[derive(Debug, thiserror::Error)]
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
    #[error("node `{node}` is receiving {limit} uploads already, its limit; send again once one has finished")]
    TooManyUploads { node: String, limit: usize },
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
    /// A version whose signature this node's policy does not trust.
    #[error("node `{node}` refuses the version: {source}")]
    ModelNotTrusted {
        node: String,
        #[source]
        source: StoreError,
    },
    /// A mesh call (`Apply`, `GetMesh`, `Rollout`) to a node that runs alone.
    #[error("node `{node}` is not in a mesh: its config has no [cluster] section")]
    NotInMesh { node: String },
    /// An applied mesh spec that is not TOML, found before its stored versions are
    /// fetched.
    #[error("mesh.toml: {0}")]
    SpecSyntax(#[source] toml::de::Error),
    /// An applied mesh spec naming stored versions that neither this node nor any peer
    /// could give.
    #[error(transparent)]
    SpecModelsMissing(RolloutError),
    /// An applied mesh spec that does not check.
    #[error(transparent)]
    Spec(ConfigError),
    /// An applied mesh spec that cannot be placed on the nodes usable now.
    #[error(transparent)]
    Placement(ApplyError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    /// A thread panicked while holding the deployment state, so what it holds cannot
    /// be trusted.
    #[error("deployment state poisoned")]
    DeploymentPoisoned,
    #[error("node `{node}` refused `{peer}`: its cluster secret differs from this mesh's ([cluster] secret)")]
    LinkRefused { node: String, peer: String },
    #[error("metadata `{}`: a node must say its name", NODE_HEADER)]
    UnnamedPeer,
    /// A spec version of `u64::MAX` is known: no later version can exist. Only a forged
    /// or corrupt spec gets there.
    #[error(transparent)]
    NoQuorum(NoQuorum),
    #[error("the mesh knows spec version {known}, the largest there is: no newer spec can be applied (a forged or corrupt spec is in the mesh)")]
    SpecVersionExhausted { known: u64 },
    #[error(
        "metadata `{}` = {claimed:?}: the caller's certificate names {certified:?}",
        NODE_HEADER
    )]
    NameNotCertified { claimed: String, certified: String },
    /// An upload whose sender went quiet: it gives its upload place back.
    #[error("no chunk arrived for {seconds} s")]
    UploadStalled { seconds: u64 },
    /// The node's alert journal could not be read (the edge log's file failed).
    #[error("the alert journal cannot be read: {0}")]
    Journal(#[source] fogmesh_edge_log::EdgeLogError),
    /// A TLS connection without a client certificate (the handshake asks for one).
    #[error("{method}: the connection carries no client certificate")]
    NoCertificate { method: String },
    /// A certificate of the mesh CA that names no fogmesh identity.
    #[error("{method}: {source}")]
    NoIdentity {
        method: String,
        #[source]
        source: Box<fogmesh_trust::TrustError>,
    },
    /// A role the access table does not admit for the method.
    #[error(transparent)]
    NotAllowed(fogmesh_trust::access::Denied),
    #[error("the certificate of {peer} does not allow feeding sensor `{sensor}`")]
    SensorNotCertified { peer: String, sensor: String },
    /// The local cluster node server no longer takes links. Only why is kept: the
    /// refused link itself ends with the call, and the dialer dials again.
    #[error("node `{node}` is stopping: {source}")]
    NodeStopping {
        node: String,
        #[source]
        source: MessagingErr<()>,
    },
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
            error @ (StoreError::Signature { .. } | StoreError::CannotSign { .. }) => {
                ServiceError::ModelNotTrusted {
                    node,
                    source: error,
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
            | ServiceError::ModelTooLarge { .. }
            | ServiceError::TooManyUploads { .. } => Code::ResourceExhausted,
            ServiceError::UploadLength { .. } => Code::InvalidArgument,
            ServiceError::UnknownModel { .. } => Code::NotFound,
            ServiceError::ModelVersionExists { .. } => Code::AlreadyExists,
            ServiceError::NoModelStore { .. } | ServiceError::UnknownParent { .. } => {
                Code::FailedPrecondition
            }
            ServiceError::WrongClusterKey { .. } | ServiceError::ModelNotTrusted { .. } => {
                Code::PermissionDenied
            }
            ServiceError::ModelStoreDamaged { .. } => Code::DataLoss,
            ServiceError::ModelStoreFailed { .. } => Code::Internal,
            ServiceError::InvalidField { .. } | ServiceError::MalformedPayload { .. } => {
                Code::InvalidArgument
            }
            ServiceError::UnknownRouter { .. } => Code::NotFound,
            ServiceError::NotInMesh { .. }
            | ServiceError::SpecModelsMissing(_)
            | ServiceError::Placement(_) => Code::FailedPrecondition,
            ServiceError::SpecSyntax(_) | ServiceError::Spec(_) => Code::InvalidArgument,
            ServiceError::Rollout(e) => match e {
                RolloutError::UnknownExpert(_) | RolloutError::Missing { .. } => Code::NotFound,
                RolloutError::BadVersion(_)
                | RolloutError::Unfit { .. }
                | RolloutError::Spec(_)
                | RolloutError::SpecSyntax(_) => Code::InvalidArgument,
                RolloutError::NotInMesh(_)
                | RolloutError::NoSpec
                | RolloutError::NotStored { .. }
                | RolloutError::NothingBefore { .. }
                | RolloutError::AlreadyServing { .. }
                | RolloutError::SpecVersionExhausted { .. }
                | RolloutError::Downgrade { .. } => Code::FailedPrecondition,
                // Nothing changed and a retry reads the new spec: the caller may run it
                // again as is.
                RolloutError::Raced { .. } => Code::Aborted,
                RolloutError::NoQuorum(_) => Code::Unavailable,
                RolloutError::Thread(_) => Code::Internal,
            },
            ServiceError::DeploymentPoisoned => Code::Internal,
            ServiceError::LinkRefused { .. } => Code::PermissionDenied,
            ServiceError::UnnamedPeer => Code::InvalidArgument,
            ServiceError::SpecVersionExhausted { .. } => Code::FailedPrecondition,
            // The same call succeeds once the partition heals, or on the other side.
            ServiceError::NoQuorum(_) => Code::Unavailable,
            ServiceError::UploadStalled { .. } => Code::DeadlineExceeded,
            ServiceError::Journal(_) => Code::Unavailable,
            ServiceError::NameNotCertified { .. }
            | ServiceError::SensorNotCertified { .. }
            | ServiceError::NoCertificate { .. }
            | ServiceError::NoIdentity { .. }
            | ServiceError::NotAllowed(_) => Code::PermissionDenied,
            ServiceError::NodeStopping { .. } => Code::Unavailable,
            ServiceError::Ingest(e) => match e {
                IngestError::UnknownSensor { .. }
                | IngestError::WrongChannelCount { .. }
                | IngestError::NotFinite { .. }
                | IngestError::TimestampBackwards { .. }
                | IngestError::SequenceJump { .. }
                | IngestError::TimestampAhead { .. } => Code::InvalidArgument,
                // The disk may have room again in a moment: the producer resends.
                IngestError::StreamUnavailable { .. } | IngestError::NotStored { .. } => {
                    Code::Unavailable
                }
                IngestError::RateExceeded { .. }
                | IngestError::RouterBusy { .. }
                | IngestError::OutboxFull { .. } => Code::ResourceExhausted,
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
                ScoreError::TooLargeToSend { .. }
                | ScoreError::RouterBusy { .. }
                | ScoreError::ExpertBusy { .. } => Code::ResourceExhausted,
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
            ServiceError::TooManyUploads { .. } => "too_many_uploads",
            ServiceError::ModelVersionExists { .. } => "version_exists",
            ServiceError::UnknownParent { .. } => "unknown_parent",
            ServiceError::ModelStoreDamaged { .. } => "store_damaged",
            ServiceError::ModelStoreFailed { .. } => "store_failed",
            ServiceError::ModelNotTrusted { .. } => "model_not_trusted",
            ServiceError::NotInMesh { .. } => "not_in_mesh",
            ServiceError::SpecSyntax(_) => "spec_syntax",
            ServiceError::SpecModelsMissing(_) => "spec_models_missing",
            ServiceError::Spec(_) => "invalid_spec",
            ServiceError::Placement(_) => "unplaceable",
            ServiceError::Rollout(e) => match e {
                RolloutError::NotInMesh(_) => "not_in_mesh",
                RolloutError::NoSpec => "no_spec",
                RolloutError::UnknownExpert(_) => "unknown_expert",
                RolloutError::NotStored { .. } => "not_stored",
                RolloutError::BadVersion(_) => "bad_version",
                RolloutError::NothingBefore { .. } => "nothing_before",
                RolloutError::AlreadyServing { .. } => "already_serving",
                RolloutError::Unfit { .. } => "unfit_version",
                RolloutError::Missing { .. } => "version_missing",
                RolloutError::Spec(_) | RolloutError::SpecSyntax(_) => "invalid_spec",
                RolloutError::Raced { .. } => "raced",
                RolloutError::NoQuorum(_) => "no_quorum",
                RolloutError::SpecVersionExhausted { .. } => "spec_version_exhausted",
                RolloutError::Downgrade { .. } => "downgrade",
                RolloutError::Thread(_) => "thread",
            },
            ServiceError::DeploymentPoisoned => "deployment_poisoned",
            ServiceError::LinkRefused { .. } => "wrong_cluster_secret",
            ServiceError::UnnamedPeer => "unnamed_peer",
            ServiceError::SpecVersionExhausted { .. } => "spec_version_exhausted",
            ServiceError::NoQuorum(_) => "no_quorum",
            ServiceError::NameNotCertified { .. } => "name_not_certified",
            ServiceError::NoCertificate { .. } => "no_certificate",
            ServiceError::UploadStalled { .. } => "upload_stalled",
            ServiceError::Journal(_) => "journal_unreadable",
            ServiceError::NoIdentity { .. } => "no_identity",
            ServiceError::NotAllowed(_) => "role_not_allowed",
            ServiceError::SensorNotCertified { .. } => "sensor_not_certified",
            ServiceError::NodeStopping { .. } => "node_stopping",
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
            source: fogmesh_actors::node_agent::Unanswered::Stopped { callee: "stream" },
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

    #[test]
    fn mesh_calls_map_by_who_is_at_fault_and_keep_their_message() {
        let alone = ServiceError::NotInMesh {
            node: "edge-1".into(),
        };
        assert_eq!(alone.code(), Code::FailedPrecondition);
        assert_eq!(
            alone.to_string(),
            "node `edge-1` is not in a mesh: its config has no [cluster] section"
        );
        let syntax = toml::from_str::<toml::Table>("experts = [").unwrap_err();
        let message = format!("mesh.toml: {syntax}");
        let syntax = Status::from(ServiceError::SpecSyntax(syntax));
        assert_eq!(syntax.code(), Code::InvalidArgument);
        assert_eq!(syntax.message(), message);
        let invalid = ServiceError::Spec(ConfigError::Invalid {
            file: "mesh.toml".into(),
            field: "experts[0].replicas".into(),
            value: "0".into(),
            reason: "must be at least 1".into(),
        });
        assert_eq!(invalid.code(), Code::InvalidArgument);
        let unplaceable = ServiceError::Placement(ApplyError::Placement(
            crate::placement::PlacementError::InvalidReplicas {
                expert: "ae1".into(),
            },
        ));
        assert_eq!(unplaceable.code(), Code::FailedPrecondition);
        assert_eq!(
            unplaceable.to_string(),
            "the spec cannot be placed on the live nodes: expert `ae1` asks for 0 replicas; it needs at least 1 to be served"
        );
        let unpinned = ServiceError::Placement(ApplyError::SensorNodesMissing {
            nodes: vec!["edge-3".into()],
        });
        assert_eq!(unpinned.code(), Code::FailedPrecondition);
        assert_eq!(
            unpinned.to_string(),
            "sensors are pinned to node(s) edge-3 which are not in the mesh"
        );
        let missing = RolloutError::Missing {
            id: "pump-ae@2".into(),
            reason: "this node has no peers to ask".into(),
        };
        let message = missing.to_string();
        let missing = ServiceError::SpecModelsMissing(missing);
        assert_eq!(missing.code(), Code::FailedPrecondition);
        assert_eq!(missing.to_string(), message);
        assert_eq!(ServiceError::DeploymentPoisoned.code(), Code::Internal);
        assert_eq!(
            Status::from(ServiceError::DeploymentPoisoned).message(),
            "deployment state poisoned"
        );
    }

    #[test]
    fn rollout_refusals_keep_their_codes() {
        let cases = [
            (
                RolloutError::UnknownExpert("pump-ae".into()),
                Code::NotFound,
            ),
            (
                RolloutError::Missing {
                    id: "pump-ae@2".into(),
                    reason: "gone".into(),
                },
                Code::NotFound,
            ),
            (RolloutError::BadVersion("@".into()), Code::InvalidArgument),
            (
                RolloutError::Unfit {
                    expert: "pump-ae".into(),
                    id: "pump-ae@2".into(),
                    reason: Box::new(crate::rollout::FitError::Window {
                        takes: 32,
                        sends: 16,
                    }),
                },
                Code::InvalidArgument,
            ),
            (
                RolloutError::SpecSyntax(Box::new(toml::from_str::<toml::Table>("=").unwrap_err())),
                Code::InvalidArgument,
            ),
            (
                RolloutError::NotInMesh("edge-1".into()),
                Code::FailedPrecondition,
            ),
            (RolloutError::NoSpec, Code::FailedPrecondition),
            (
                RolloutError::NotStored {
                    expert: "pump-ae".into(),
                    serving: "v1".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                RolloutError::NothingBefore {
                    expert: "pump-ae".into(),
                    current: "pump-ae@1".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                RolloutError::AlreadyServing {
                    expert: "pump-ae".into(),
                    id: "pump-ae@1".into(),
                },
                Code::FailedPrecondition,
            ),
            (RolloutError::Raced { from: 3, to: 4 }, Code::Aborted),
            (
                RolloutError::SpecVersionExhausted { known: u64::MAX },
                Code::FailedPrecondition,
            ),
        ];
        for (error, code) in cases {
            let message = error.to_string();
            let status = Status::from(ServiceError::from(error));
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn link_admission_refusals_keep_their_codes_and_messages() {
        let refused = Status::from(ServiceError::LinkRefused {
            node: "fog-1".into(),
            peer: "edge-9".into(),
        });
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert_eq!(
            refused.message(),
            "node `fog-1` refused `edge-9`: its cluster secret differs from this mesh's ([cluster] secret)"
        );
        let unnamed = Status::from(ServiceError::UnnamedPeer);
        assert_eq!(unnamed.code(), Code::InvalidArgument);
        assert_eq!(
            unnamed.message(),
            "metadata `fogmesh-node`: a node must say its name"
        );
        let stopping = ServiceError::NodeStopping {
            node: "fog-1".into(),
            source: MessagingErr::ChannelClosed,
        };
        assert_eq!(stopping.code(), Code::Unavailable);
        assert_eq!(
            stopping.to_string(),
            format!(
                "node `fog-1` is stopping: {}",
                MessagingErr::<()>::ChannelClosed
            )
        );
    }
}
