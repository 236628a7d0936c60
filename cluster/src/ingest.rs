//! Ingest as every transport does it: the `[limits]` checks, sensor ids checked before
//! anything is pushed, samples grouped per stream and pushed to the node, and the
//! rejection counted. `Ingest.Push`, `Ingest.PushStream` and MQTT differ only in how
//! bytes arrive and how the answer leaves.
//!
//! A batch may hold samples of several streams. Each stream's group is pushed (and
//! accepted or refused whole by its `SensorStream`) in the order the streams first
//! appear in the batch. Anything the node can tell from the batch alone (limits, unknown
//! sensor ids) refuses the batch before any group is pushed; a group the stream itself
//! refuses (NaN, wrong channel count, time going back) stops the batch there, *after*
//! the groups before it were accepted. The producer then gets the error, fixes the bad
//! samples and resends the whole batch: the already accepted groups are acknowledged
//! again as duplicates (sequence numbers de-duplicate them) and never windowed twice,
//! so resending is always safe.

use std::collections::HashMap;

use fogmesh_actors::{Node, PushOutcome, Sample};
use fogmesh_proto::{IngestAck, SampleBatch, StreamAck};
use fogmesh_trust::PeerIdentity;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::config::Limits;
use crate::status::ServiceError;
use crate::telemetry;

/// Ingest into one node through one transport (`transport` labels its metrics).
#[derive(Clone)]
pub(crate) struct Ingestor {
    node: Node,
    limits: Limits,
    transport: &'static str,
}

/// The MQTT payload: `{"samples":[{"sequence":1,"timestamp_us":..,"values":[..]}]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBatch {
    samples: Vec<JsonSample>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSample {
    sequence: u64,
    timestamp_us: i64,
    /// JSON has no NaN or infinity, and serde_json refuses numbers beyond f32's range,
    /// so every value that parses is finite.
    values: Vec<f32>,
}

/// Reads an MQTT payload ([`JsonBatch`]) into samples, or says why it is not one.
pub fn parse_json_samples(payload: &[u8]) -> Result<Vec<Sample>, ServiceError> {
    let batch: JsonBatch =
        serde_json::from_slice(payload).map_err(|e| ServiceError::MalformedPayload {
            bytes: payload.len(),
            reason: e.to_string(),
        })?;
    Ok(batch
        .samples
        .into_iter()
        .map(|s| Sample {
            sequence: s.sequence,
            timestamp_us: s.timestamp_us,
            values: s.values,
        })
        .collect())
}

/// The MQTT acknowledgement of an accepted batch.
#[derive(Debug, Serialize)]
pub(crate) struct JsonAck {
    /// `null` only before the stream's first sample.
    pub acked_through: Option<u64>,
    pub accepted: u32,
    pub duplicates: u32,
}

impl Ingestor {
    pub(crate) fn new(node: Node, limits: Limits, transport: &'static str) -> Self {
        Ingestor {
            node,
            limits,
            transport,
        }
    }

    /// Pushes a gRPC batch (see the module doc for partial acceptance).
    ///
    /// Cancel safety: not cancel-safe; dropping it may leave some groups accepted and
    /// unacknowledged, which a resend acknowledges.
    /// Pushes a batch whose samples `feeder` (the caller's certificate identity, over
    /// TLS) sent. A batch naming a sensor the feeder's certificate does not allow is
    /// refused whole, before any sample reaches a stream.
    pub(crate) async fn push_batch(
        &self,
        batch: SampleBatch,
        feeder: Option<&PeerIdentity>,
    ) -> Result<IngestAck, ServiceError> {
        let result = self.push_batch_inner(batch, feeder).await;
        self.count(&result);
        result
    }

    async fn push_batch_inner(
        &self,
        batch: SampleBatch,
        feeder: Option<&PeerIdentity>,
    ) -> Result<IngestAck, ServiceError> {
        self.check_message_size(batch.encoded_len())?;
        self.check_samples(batch.samples.iter().map(|s| s.values.len()))?;
        if let Some(feeder) = feeder {
            if let Some(sample) = batch
                .samples
                .iter()
                .find(|s| !feeder.may_feed(&s.sensor_id))
            {
                return Err(ServiceError::SensorNotCertified {
                    peer: feeder.to_string(),
                    sensor: sample.sensor_id.clone(),
                });
            }
        }
        let mut order: Vec<(String, Vec<Sample>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for sample in batch.samples {
            let group = match index.get(&sample.sensor_id) {
                Some(&i) => i,
                None => {
                    if self.node.directory.sensor(&sample.sensor_id).is_none() {
                        return Err(fogmesh_actors::IngestError::UnknownSensor {
                            sensor_id: sample.sensor_id,
                        }
                        .into());
                    }
                    index.insert(sample.sensor_id.clone(), order.len());
                    order.push((sample.sensor_id, Vec::new()));
                    order.len() - 1
                }
            };
            order[group].1.push(Sample {
                sequence: sample.sequence,
                timestamp_us: sample.timestamp_us,
                values: sample.values,
            });
        }
        let mut ack = IngestAck::default();
        for (sensor_id, samples) in order {
            let outcome = self.node.ingest(&sensor_id, samples).await?;
            ack.accepted = ack.accepted.saturating_add(outcome.accepted);
            ack.duplicates = ack.duplicates.saturating_add(outcome.duplicates);
            ack.streams.push(StreamAck {
                sensor_id,
                // A group is never empty, so an accepted one leaves the stream holding
                // at least one sequence number.
                acked_through: outcome.acked_through.unwrap_or_default(),
            });
        }
        Ok(ack)
    }

    /// Pushes an MQTT payload (JSON, see [`JsonBatch`]) into one stream.
    pub(crate) async fn push_json(
        &self,
        sensor_id: &str,
        payload: &[u8],
    ) -> Result<JsonAck, ServiceError> {
        let result = self.push_json_inner(sensor_id, payload).await;
        self.count(&result);
        result
    }

    async fn push_json_inner(
        &self,
        sensor_id: &str,
        payload: &[u8],
    ) -> Result<JsonAck, ServiceError> {
        self.check_message_size(payload.len())?;
        let samples = parse_json_samples(payload)?;
        self.check_samples(samples.iter().map(|s| s.values.len()))?;
        let PushOutcome {
            acked_through,
            accepted,
            duplicates,
        } = self.node.ingest(sensor_id, samples).await?;
        Ok(JsonAck {
            acked_through,
            accepted,
            duplicates,
        })
    }

    fn check_message_size(&self, bytes: usize) -> Result<(), ServiceError> {
        let limit = self.limits.max_message_bytes;
        if bytes > limit {
            return Err(ServiceError::MessageTooLarge { bytes, limit });
        }
        Ok(())
    }

    fn check_samples(
        &self,
        values_per_sample: impl ExactSizeIterator<Item = usize>,
    ) -> Result<(), ServiceError> {
        let limit = self.limits.max_batch_samples;
        if values_per_sample.len() > limit {
            return Err(ServiceError::TooManySamples {
                got: values_per_sample.len(),
                limit,
            });
        }
        let limit = self.limits.max_values_per_sample;
        for (index, got) in values_per_sample.enumerate() {
            if got > limit {
                return Err(ServiceError::TooManyValues { index, got, limit });
            }
        }
        Ok(())
    }

    fn count<T>(&self, result: &Result<T, ServiceError>) {
        if let Err(e) = result {
            metrics::counter!(telemetry::INGEST_REJECTED, "transport" => self.transport, "reason" => e.reason())
                .increment(1);
        }
    }
}
