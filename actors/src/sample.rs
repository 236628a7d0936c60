//! The unit of sensor data inside a node: one reading of one stream, and the window a
//! [`crate::SensorStream`] cuts from consecutive readings for the experts.

use std::sync::Arc;

use crate::quality::QualityFlags;

/// One reading of a sensor stream (defined beside the edge log, which stores it as
/// sent).
pub use fogmesh_edge_log::Sample;

/// A normalised window of one stream, ready for an expert.
///
/// `values` is channel-major: `channels` rows of `length` samples, the layout the
/// experts' `[batch, channels, length]` tensors take without a transpose.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub sensor_id: Arc<str>,
    /// Counts the windows of this stream from 0.
    pub sequence: u64,
    pub start_us: i64,
    pub end_us: i64,
    pub channels: usize,
    pub length: usize,
    pub values: Arc<[f32]>,
    /// Quality flags raised by any sample inside the window.
    pub quality: QualityFlags,
}
