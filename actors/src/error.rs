//! Errors the actors return to whoever fed them: producers of samples, callers asking
//! for a score, operators starting a node. Each variant carries what a person needs to
//! fix the input (the stream, the sequence number, the field, the value and the limit);
//! `fogmesh-cluster` maps them to gRPC status codes in one place.

use std::sync::Arc;
use std::time::Duration;

use fogmesh_models::ModelError;

use fogmesh_models::torchscript::ScriptError;

use crate::node_agent::{Unanswered, Undelivered};

/// A batch of samples refused by a [`crate::SensorStream`]. A refused batch is refused
/// whole: none of its samples is accepted, and everything acknowledged before it stays.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("field `sensor_id`: unknown sensor stream `{sensor_id}`")]
    UnknownSensor { sensor_id: String },
    #[error(
        "sensor `{sensor_id}` sample {sequence}: field `values` has {got} channels, the stream has {expected}"
    )]
    WrongChannelCount {
        sensor_id: String,
        sequence: u64,
        expected: usize,
        got: usize,
    },
    #[error(
        "sensor `{sensor_id}` sample {sequence}: field `values[{channel}]` is {value}, only finite values are accepted"
    )]
    NotFinite {
        sensor_id: String,
        sequence: u64,
        channel: usize,
        value: f32,
    },
    #[error(
        "sensor `{sensor_id}` sample {sequence}: field `timestamp_us` {timestamp_us} goes back before {previous_us}, the stream's latest accepted timestamp"
    )]
    TimestampBackwards {
        sensor_id: String,
        sequence: u64,
        timestamp_us: i64,
        previous_us: i64,
    },
    #[error(
        "sensor `{sensor_id}` sample {sequence}: field `sequence` jumps {} past the next expected {expected}; the limit is max_sequence_gap = {limit}", sequence - expected
    )]
    SequenceJump {
        sensor_id: String,
        sequence: u64,
        expected: u64,
        limit: u64,
    },
    #[error(
        "sensor `{sensor_id}` sample {sequence}: field `timestamp_us` {timestamp_us} is more than max_clock_skew_ms = {limit_ms} ahead of this node's clock ({now_us})"
    )]
    TimestampAhead {
        sensor_id: String,
        sequence: u64,
        timestamp_us: i64,
        now_us: i64,
        limit_ms: u64,
    },
    /// The edge log could not store the batch (disk full, I/O error): it is refused,
    /// and the producer may send it again.
    #[error(
        "sensor `{sensor_id}`: the batch could not be stored, nothing of it was accepted: {source}"
    )]
    NotStored {
        sensor_id: String,
        #[source]
        source: fogmesh_edge_log::EdgeLogError,
    },
    #[error("sensor `{sensor_id}` is not running: {source}")]
    StreamUnavailable {
        sensor_id: String,
        #[source]
        source: Unanswered,
    },
    #[error("sensor `{sensor_id}`: {samples} samples exceed its rate, max_rate = {limit} samples/s (bursts of one second's worth); {available} may be sent now")]
    RateExceeded {
        sensor_id: String,
        samples: u64,
        available: u64,
        limit: f64,
    },
    #[error("sensor `{sensor_id}`: router `{router}` holds {in_flight} windows waiting for experts, its limit; send again once it has scored some")]
    RouterBusy {
        sensor_id: String,
        router: String,
        in_flight: usize,
    },
    /// The stream's outbox holds as many windows waiting for an expert as its capacity
    /// allows, and its policy is to refuse: the producer keeps the samples and sends
    /// them again once experts have drained the outbox.
    #[error("sensor `{sensor_id}`: its outbox holds {windows} windows ({bytes} bytes) waiting for an expert; the batch would take it past outbox.max_bytes_per_sensor = {limit}; send again once they are scored")]
    OutboxFull {
        sensor_id: String,
        windows: u64,
        bytes: u64,
        limit: u64,
    },
}

/// Why a window could not be scored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreError {
    #[error("router `{router}` has no route for sensor `{sensor_id}`")]
    NoRoute { router: String, sensor_id: String },
    #[error("window of sensor `{sensor_id}`: field `values` has {got} values, expert `{expert}` takes {expected} ({channels} channels x {length} samples)")]
    WrongWindowShape {
        sensor_id: String,
        expert: String,
        expected: usize,
        got: usize,
        channels: usize,
        length: usize,
    },
    #[error("expert `{expert}` is not calibrated: it has no alarm threshold yet")]
    Uncalibrated { expert: String },
    #[error("expert `{expert}` is unavailable: {reason}")]
    ExpertUnavailable {
        expert: String,
        reason: Unavailability,
    },
    #[error("expert `{expert}` failed to score: {reason}")]
    Model { expert: String, reason: String },
    #[error("field `router`: no router `{router}` runs on this node")]
    UnknownRouter { router: String },
    #[error("router `{router}` is unavailable: {source}")]
    RouterUnavailable {
        router: String,
        #[source]
        source: Unanswered,
    },
    #[error("router `{router}` gate: {reason}")]
    Gate { router: String, reason: String },
    #[error("window of sensor `{sensor_id}` has {bytes} bytes of values; one message to expert `{expert}` on another node may carry at most {limit}")]
    TooLargeToSend {
        sensor_id: String,
        expert: String,
        bytes: usize,
        limit: usize,
    },
    #[error("router `{router}` holds {in_flight} windows waiting for experts, its limit; send again once it has scored some")]
    RouterBusy { router: String, in_flight: usize },
    #[error("expert `{expert}` has {queued} windows queued, its limit of {limit}")]
    ExpertBusy {
        expert: String,
        queued: u64,
        limit: u64,
    },
}

/// Why no replica of an expert gave a verdict ([`ScoreError::ExpertUnavailable`]):
/// the one kind of failure a router retries on another replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailability {
    #[error("not running on this node")]
    NotHere,
    #[error("the expert stopped before answering")]
    Stopped,
    #[error("replica {replica} gave no answer within {after:?}")]
    Silent { replica: String, after: Duration },
    #[error("replica {replica} went away")]
    Gone { replica: String },
    /// ractor could not send to the replica.
    #[error("replica {replica}: {source}")]
    NotDelivered {
        replica: String,
        #[source]
        source: Undelivered,
    },
    #[error("no replica on any node within {0:?}")]
    NoReplica(Duration),
    #[error("malformed reply of {bytes} bytes")]
    MalformedReply { bytes: usize },
    /// The replica's node said so; the reason crossed the link as text.
    #[error("{0}")]
    Remote(String),
}

impl IngestError {
    /// A short, stable name for the rule that refused the batch: the `reason` label of
    /// the rejection metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::UnknownSensor { .. } => "unknown_sensor",
            IngestError::WrongChannelCount { .. } => "wrong_channel_count",
            IngestError::NotFinite { .. } => "not_finite",
            IngestError::TimestampBackwards { .. } => "timestamp_backwards",
            IngestError::SequenceJump { .. } => "sequence_jump",
            IngestError::TimestampAhead { .. } => "timestamp_ahead",
            IngestError::StreamUnavailable { .. } => "stream_unavailable",
            IngestError::NotStored { .. } => "not_stored",
            IngestError::RateExceeded { .. } => "rate_exceeded",
            IngestError::RouterBusy { .. } => "router_busy",
            IngestError::OutboxFull { .. } => "outbox_full",
        }
    }
}

impl ScoreError {
    /// A short, stable name for why the window was not scored: the `reason` label of
    /// the failure metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ScoreError::NoRoute { .. } => "no_route",
            ScoreError::WrongWindowShape { .. } => "wrong_shape",
            ScoreError::Uncalibrated { .. } => "uncalibrated",
            ScoreError::ExpertUnavailable { .. } => "expert_unavailable",
            ScoreError::Model { .. } => "model",
            ScoreError::UnknownRouter { .. } => "unknown_router",
            ScoreError::RouterUnavailable { .. } => "router_unavailable",
            ScoreError::Gate { .. } => "gate",
            ScoreError::TooLargeToSend { .. } => "too_large_to_send",
            ScoreError::RouterBusy { .. } => "router_busy",
            ScoreError::ExpertBusy { .. } => "expert_busy",
        }
    }

    /// Whether the same window may be scored later: the experts or the router were out
    /// of reach or full, not wrong about the window.
    pub fn worth_retrying(&self) -> bool {
        matches!(
            self,
            ScoreError::ExpertUnavailable { .. }
                | ScoreError::UnknownRouter { .. }
                | ScoreError::RouterUnavailable { .. }
                | ScoreError::RouterBusy { .. }
                | ScoreError::ExpertBusy { .. }
        )
    }
}

/// A node description that cannot be started.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("{what} `{name}`: field `{field}` = {value}: {reason}")]
    Invalid {
        what: &'static str,
        name: String,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{what} `{name}` is defined twice")]
    Duplicate { what: &'static str, name: String },
    #[error("{what} `{name}` refers to {target_kind} `{target}`, which the node does not define")]
    UnknownReference {
        what: &'static str,
        name: String,
        target_kind: &'static str,
        target: String,
    },
    #[error("expert `{name}`: {source}")]
    Model {
        name: String,
        #[source]
        source: ModelFault,
    },
    #[error("actor `{name}` did not start: {source}")]
    Spawn {
        name: String,
        #[source]
        source: SpawnFault,
    },
    #[error("no answer from `{name}` within {timeout:?}")]
    Timeout { name: String, timeout: Duration },
}

/// Why an actor of the node did not start ([`SpecError::Spawn`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpawnFault {
    /// The node agent gave no answer to the request that would have started it.
    #[error(transparent)]
    Unanswered(#[from] Unanswered),
    /// It was still starting when a newer spec dropped it.
    #[error("no longer in the node's spec")]
    Withdrawn,
    /// ractor's own refusal (a panic while starting, a name already taken). ractor
    /// hands it over as a boxed error of any type, so only its text can be kept.
    #[error("{0}")]
    Ractor(String),
}

/// What is wrong with an expert's model ([`SpecError::Model`]). Shared causes sit behind
/// `Arc` because a [`SpecError`] is cloned into reconcile reports.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelFault {
    /// The model's configuration or manifest does not describe a model fogmesh builds.
    #[error(transparent)]
    Invalid(Arc<ModelError>),
    /// The expert refused to hot-swap to the version; it keeps serving its own.
    #[error(transparent)]
    Refused(Arc<SwapError>),
    /// The expert or its node agent did not answer (a timeout, a stopped actor).
    #[error(transparent)]
    Unanswered(Unanswered),
}

/// By message: the causes are not comparable themselves, and two faults that read the
/// same tell the operator the same thing.
impl PartialEq for ModelFault {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

/// Why an expert's model did not load, at start or for a swap.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A stored version (named by its manifest id) that does not build or whose
    /// weights do not load.
    #[error("{id}: {source}")]
    Stored {
        id: String,
        #[source]
        source: ModelError,
    },
    #[error(transparent)]
    Script(#[from] ScriptError),
    #[error(transparent)]
    Autoencoder(#[from] ModelError),
}

/// Why an expert's model thread did not start: the actor's startup error, which the
/// node agent reports as the reason the expert did not start.
#[derive(Debug, thiserror::Error)]
#[error("expert `{expert}`: {source}")]
pub struct StartError {
    pub expert: String,
    #[source]
    pub source: LoadError,
}

/// Why an expert refused to serve a version; the old one keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("expert `{expert}`: version {version} refused: {source}")]
    Invalid {
        expert: Arc<str>,
        version: Arc<str>,
        #[source]
        source: SpecError,
    },
    #[error("expert `{expert}`: version {version} refused: it takes windows of {takes} values, this expert serves windows of {serves}")]
    WindowShape {
        expert: Arc<str>,
        version: Arc<str>,
        takes: usize,
        serves: usize,
    },
    #[error("expert `{expert}`: version {version} refused: the loading thread failed: {source}")]
    LoadingThread {
        expert: Arc<str>,
        version: Arc<str>,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("expert `{expert}`: version {version} refused: {source}")]
    Load {
        expert: Arc<str>,
        version: Arc<str>,
        #[source]
        source: LoadError,
    },
    #[error("expert `{expert}`: version {version} refused: the expert is stopping")]
    Stopping { expert: Arc<str>, version: Arc<str> },
    #[error(
        "expert `{expert}`: version {version} refused: the expert stopped before installing it"
    )]
    StoppedBeforeInstall { expert: Arc<str>, version: Arc<str> },
}
