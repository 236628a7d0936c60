//! File replay: feeds a recorded plant run into a node's sensor streams, as if the
//! plant were producing it now (at a chosen speed-up) or as fast as the node
//! acknowledges.
//!
//! Each stream is a set of the recording's columns. Rows go in batches, every stream's
//! batch is acknowledged before the next rows are read, so replay never runs ahead of
//! what the node has accepted (the same back-pressure a gRPC producer gets). Sequence
//! numbers and timestamps can be offset, so several recordings can be replayed into
//! the same streams one after another.

use std::time::Duration;

use fogmesh_models::Recording;

use crate::error::IngestError;
use crate::node_agent::Node;
use crate::sample::Sample;

/// One sensor stream fed from a recording.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayStream {
    pub sensor_id: String,
    /// Column indices of the recording, in the stream's channel order.
    pub columns: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReplayPlan {
    pub streams: Vec<ReplayStream>,
    /// Rows per pushed batch.
    pub batch_rows: usize,
    /// Recording time divided by this is replay time; `None`: as fast as acknowledged.
    pub speedup: Option<f64>,
    /// Added to the row index to make each sample's sequence number.
    pub sequence_offset: u64,
    /// Added to the recording's timestamps.
    pub time_offset_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    pub rows: usize,
    pub samples: u64,
    /// The sequence number of the last row, for the next replay's offset.
    pub last_sequence: u64,
    pub last_timestamp_us: i64,
}

/// Replays `recording` into `node` following `plan`; stops at the first refused batch.
///
/// Cancel safety: not cancel-safe in the sense of resuming. Dropping the future stops
/// the replay after the last acknowledged batch; everything acknowledged stays accepted.
pub async fn replay(
    node: &Node,
    recording: &Recording,
    plan: &ReplayPlan,
) -> Result<ReplayReport, IngestError> {
    let rows = recording.rows();
    let batch_rows = plan.batch_rows.max(1);
    let start = tokio::time::Instant::now();
    let first_us = recording.timestamp_us(0);
    let mut samples = 0u64;
    let mut row = 0;
    while row < rows {
        let end = (row + batch_rows).min(rows);
        if let Some(speedup) = plan.speedup {
            let due = (recording.timestamp_us(row) - first_us) as f64 / speedup;
            tokio::time::sleep_until(start + Duration::from_micros(due.max(0.0) as u64)).await;
        }
        for stream in &plan.streams {
            let batch: Vec<Sample> = (row..end)
                .map(|r| {
                    let values = recording.row(r);
                    Sample {
                        sequence: plan.sequence_offset + r as u64,
                        timestamp_us: recording.timestamp_us(r) + plan.time_offset_us,
                        values: stream.columns.iter().map(|&c| values[c]).collect(),
                    }
                })
                .collect();
            samples += batch.len() as u64;
            node.push(&stream.sensor_id, batch).await?;
        }
        row = end;
    }
    Ok(ReplayReport {
        rows,
        samples,
        last_sequence: plan.sequence_offset + rows.saturating_sub(1) as u64,
        last_timestamp_us: rows.checked_sub(1).map_or(plan.time_offset_us, |r| {
            recording.timestamp_us(r) + plan.time_offset_us
        }),
    })
}
