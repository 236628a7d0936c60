//! What the rest of the node sees of a sensor stream: its spec ([`SensorStreamSpec`]
//! and its limits), the acknowledgement of a batch ([`PushOutcome`]), its observable
//! state and rate budget ([`SensorStreamShared`]) and its message
//! ([`SensorStreamMsg`]). Apart from the actor so that the
//! [`crate::directory::NodeDirectory`], which holds streams' handles, depends on this
//! and not on the actor, which itself looks its router up in the directory.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};

use crate::error::{IngestError, SpecError};
use crate::normalisation::NormalisationSpec;
use crate::quality::QualityRules;
use crate::rate::SampleBudget;
use crate::sample::Sample;

/// A sensor stream as an operator describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorStreamSpec {
    pub id: String,
    pub channels: usize,
    /// Samples per window.
    pub window: usize,
    /// Samples between the starts of consecutive windows.
    pub stride: usize,
    #[serde(default = "default_normalisation")]
    pub normalisation: NormalisationSpec,
    #[serde(default)]
    pub quality: QualityRules,
    /// The router that receives this stream's windows.
    pub router: String,
    /// Largest jump of `sequence` past the next expected one (from 0 for a new
    /// stream). A bigger jump is refused: one sample numbered 2^63 would otherwise
    /// make every later real reading a "duplicate".
    #[serde(default = "default_max_sequence_gap")]
    pub max_sequence_gap: u64,
    /// How far a sample's `timestamp_us` may run ahead of this node's clock, in
    /// milliseconds. A later one is refused: a far-future timestamp accepted once
    /// would make every later real reading "go back in time".
    #[serde(default = "default_max_clock_skew_ms")]
    pub max_clock_skew_ms: u64,
    /// Most samples per second producers outside the node (gRPC, MQTT) may send this
    /// stream, with bursts of one second's worth; more is refused until the budget
    /// refills. Replays of files on the node are not limited. Set it at the rate a
    /// reconnecting gateway may catch up at, a multiple of the sensor's own.
    #[serde(default = "default_max_rate")]
    pub max_rate: f64,
}

fn default_normalisation() -> NormalisationSpec {
    NormalisationSpec::Online
}

/// About a quarter of an hour of samples at 1 kHz.
pub const DEFAULT_MAX_SEQUENCE_GAP: u64 = 1_000_000;
/// Five minutes: field devices without time synchronisation drift by that much.
pub const DEFAULT_MAX_CLOCK_SKEW_MS: u64 = 300_000;

/// 100,000 samples a second: a 1 kHz sensor catching up a hundred times faster.
pub const DEFAULT_MAX_RATE: f64 = 100_000.0;

fn default_max_rate() -> f64 {
    DEFAULT_MAX_RATE
}

fn default_max_sequence_gap() -> u64 {
    DEFAULT_MAX_SEQUENCE_GAP
}

fn default_max_clock_skew_ms() -> u64 {
    DEFAULT_MAX_CLOCK_SKEW_MS
}

/// Largest window a stream may cut, in values (channels × samples): 16 MiB of f32.
pub const MAX_WINDOW_VALUES: usize = 4 << 20;

impl SensorStreamSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let invalid = |field: &'static str, value: String, reason: String| SpecError::Invalid {
            what: "sensor stream",
            name: self.id.clone(),
            field,
            value,
            reason,
        };
        if self.id.is_empty() {
            return Err(invalid("id", "\"\"".into(), "must not be empty".into()));
        }
        if self.channels == 0 {
            return Err(invalid("channels", "0".into(), "must be at least 1".into()));
        }
        if self.window == 0 {
            return Err(invalid("window", "0".into(), "must be at least 1".into()));
        }
        if self.stride == 0 {
            return Err(invalid("stride", "0".into(), "must be at least 1".into()));
        }
        if !(self.max_rate.is_finite() && self.max_rate >= 1.0) {
            return Err(invalid(
                "max_rate",
                self.max_rate.to_string(),
                "must be a finite number of samples per second, at least 1".into(),
            ));
        }
        if self.channels.saturating_mul(self.window) > MAX_WINDOW_VALUES {
            return Err(invalid(
                "window",
                self.window.to_string(),
                format!("channels x window must not exceed {MAX_WINDOW_VALUES} values"),
            ));
        }
        if let NormalisationSpec::Frozen { mean, std } = &self.normalisation {
            for (field, v) in [("normalisation.mean", mean), ("normalisation.std", std)] {
                if v.len() != self.channels {
                    return Err(invalid(
                        field,
                        format!("{} values", v.len()),
                        format!("needs one per channel ({})", self.channels),
                    ));
                }
                if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                    return Err(invalid(field, bad.to_string(), "must be finite".into()));
                }
            }
            if let Some(bad) = std.iter().find(|s| **s < 0.0) {
                return Err(invalid(
                    "normalisation.std",
                    bad.to_string(),
                    "must not be negative".into(),
                ));
            }
        }
        let ranges = &self.quality.ranges;
        if !ranges.is_empty() && ranges.len() != self.channels {
            return Err(invalid(
                "quality.ranges",
                format!("{} ranges", ranges.len()),
                format!("needs none or one per channel ({})", self.channels),
            ));
        }
        if let Some([low, high]) = ranges
            .iter()
            .find(|[low, high]| low.is_nan() || high.is_nan() || low > high)
        {
            return Err(invalid(
                "quality.ranges",
                format!("[{low}, {high}]"),
                "low must not exceed high".into(),
            ));
        }
        Ok(())
    }
}

/// Acknowledgement of one accepted batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushOutcome {
    /// Highest sequence number the stream holds; `None` before the first sample.
    pub acked_through: Option<u64>,
    pub accepted: u32,
    pub duplicates: u32,
}

/// The stream's observable state and its acknowledged position, kept by the node
/// agent across restarts of the actor.
#[derive(Debug)]
pub struct SensorStreamShared {
    pub id: Arc<str>,
    pub channels: usize,
    /// The router that takes this stream's windows.
    pub router: Arc<str>,
    /// Highest accepted sequence plus one; 0 when nothing was accepted yet.
    pub(super) next_sequence: AtomicU64,
    pub(super) last_timestamp_us: AtomicI64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub duplicates: AtomicU64,
    pub windows: AtomicU64,
    /// Set once the stream first took its state back from the edge log in this process.
    /// What producers outside the node may still send ([`SensorStreamShared::admit`]).
    budget: std::sync::Mutex<SampleBudget>,
    max_rate: f64,
}

impl SensorStreamShared {
    pub fn for_spec(spec: &SensorStreamSpec) -> Arc<Self> {
        Arc::new(SensorStreamShared {
            id: spec.id.as_str().into(),
            channels: spec.channels,
            router: spec.router.as_str().into(),
            next_sequence: AtomicU64::new(0),
            last_timestamp_us: AtomicI64::new(i64::MIN),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            windows: AtomicU64::new(0),
            budget: std::sync::Mutex::new(SampleBudget::new(
                spec.max_rate,
                tokio::time::Instant::now(),
            )),
            max_rate: spec.max_rate,
        })
    }

    /// Takes `samples` from the stream's rate budget for a producer outside the node,
    /// or says it is spent. Checked before the samples reach the actor, so a flooding
    /// producer costs the stream no mailbox slot and no work.
    pub fn admit(&self, samples: u64) -> Result<(), IngestError> {
        let mut budget = self
            .budget
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        budget
            .take(samples, tokio::time::Instant::now())
            .map_err(|available| IngestError::RateExceeded {
                sensor_id: self.id.to_string(),
                samples,
                available,
                limit: self.max_rate,
            })
    }

    pub fn acked_through(&self) -> Option<u64> {
        self.next_sequence.load(Ordering::Acquire).checked_sub(1)
    }
}

pub enum SensorStreamMsg {
    Push {
        samples: Vec<Sample>,
        reply: RpcReplyPort<Result<PushOutcome, IngestError>>,
    },
}

// Local only: it carries reply ports and shared buffers that cannot cross a node.
impl ractor::Message for SensorStreamMsg {}
