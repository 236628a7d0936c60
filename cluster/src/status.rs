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
//! | over a `[limits]` limit | `RESOURCE_EXHAUSTED` |
//! | bad field, malformed payload, unknown sensor, wrong channel count, NaN/Inf, timestamp going back, no route, wrong window shape, gate error | `INVALID_ARGUMENT` |
//! | unknown router | `NOT_FOUND` |
//! | sensor stream, router or expert not answering; expert not calibrated | `UNAVAILABLE` |
//! | model failure | `INTERNAL` |

use fogmesh_actors::{IngestError, ScoreError};
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
}

impl ServiceError {
    pub fn code(&self) -> Code {
        match self {
            ServiceError::MessageTooLarge { .. }
            | ServiceError::TooManySamples { .. }
            | ServiceError::TooManyValues { .. } => Code::ResourceExhausted,
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
