//! `SensorStream`: one per stream of readings (a plant unit's transmitters, a pump's
//! vibration channels).
//!
//! **Owns** the stream's acknowledged position (highest accepted sequence number and
//! timestamp), its quality tracker, normaliser and windower. **Takes**
//! [`SensorStreamMsg::Push`]: a batch of samples from any source (file replay, gRPC
//! `Ingest`, MQTT), answered with the acknowledgement or the reason the batch was
//! refused. **Supervised by** the [`crate::NodeAgent`]. **On failure**: the acknowledged
//! position lives in [`SensorStreamShared`], which the supervisor keeps, so a restarted
//! stream still refuses duplicates and out-of-order timestamps; the partial window in
//! memory is lost (store-and-forward to disk is not built yet).
//!
//! Accepting a batch, in order:
//! 1. Sort the batch by sequence number; drop samples whose sequence was already
//!    accepted (before or earlier in this batch) as duplicates: a producer that lost an
//!    acknowledgement may resend, and is acknowledged again.
//! 2. Check every remaining sample (channel count, finite values, a sequence number at
//!    most `max_sequence_gap` past the next expected one, a timestamp not before the
//!    previous one and at most `max_clock_skew_ms` ahead of this node's clock). The first bad sample refuses the whole batch: nothing of it is
//!    accepted, so the producer can fix and resend it as a unit.
//! 3. Accept: flag quality on raw values, normalise, window; each completed window goes
//!    to the stream's router. Only then is the batch acknowledged.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::directory::NodeDirectory;
use crate::error::{IngestError, SpecError};
use crate::normalisation::{NormalisationSpec, Normaliser};
use crate::quality::{QualityRules, QualityTracker};
use crate::rate::SampleBudget;
use crate::router::RouterMsg;
use crate::sample::{Sample, Window};
use crate::telemetry;
use crate::windowing::Windower;

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
    next_sequence: AtomicU64,
    last_timestamp_us: AtomicI64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub duplicates: AtomicU64,
    pub windows: AtomicU64,
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

pub struct SensorStream;

pub struct SensorStreamArgs {
    pub spec: SensorStreamSpec,
    pub shared: Arc<SensorStreamShared>,
    pub directory: Arc<NodeDirectory>,
}

pub struct SensorStreamState {
    spec: SensorStreamSpec,
    shared: Arc<SensorStreamShared>,
    directory: Arc<NodeDirectory>,
    quality: QualityTracker,
    normaliser: Normaliser,
    windower: Windower,
    next_window: u64,
    accepted_counter: metrics::Counter,
    duplicate_counter: metrics::Counter,
    window_counter: metrics::Counter,
}

impl Actor for SensorStream {
    type Msg = SensorStreamMsg;
    type State = SensorStreamState;
    type Arguments = SensorStreamArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SensorStreamArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let spec = args.spec;
        let sensor = spec.id.clone();
        Ok(SensorStreamState {
            quality: QualityTracker::new(spec.quality.clone(), spec.channels),
            normaliser: Normaliser::new(&spec.normalisation, spec.channels),
            windower: Windower::new(spec.channels, spec.window, spec.stride),
            next_window: args.shared.windows.load(Ordering::Relaxed),
            accepted_counter: metrics::counter!(telemetry::SAMPLES_ACCEPTED, "sensor" => sensor.clone()),
            duplicate_counter: metrics::counter!(telemetry::SAMPLES_DUPLICATE, "sensor" => sensor.clone()),
            window_counter: metrics::counter!(telemetry::WINDOWS_CUT, "sensor" => sensor),
            spec,
            shared: args.shared,
            directory: args.directory,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SensorStreamMsg::Push { samples, reply } => {
                let outcome = state.push(samples);
                // A producer that hung up still had its batch accepted or refused.
                let _ = reply.send(outcome);
            }
        }
        Ok(())
    }
}

/// This node's clock in microseconds since the Unix epoch.
fn wall_clock_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

impl SensorStreamState {
    fn push(&mut self, mut samples: Vec<Sample>) -> Result<PushOutcome, IngestError> {
        let total = samples.len() as u64;
        samples.sort_by_key(|s| s.sequence);
        let next = self.shared.next_sequence.load(Ordering::Acquire);
        let mut fresh = Vec::with_capacity(samples.len());
        let mut expected = next;
        for sample in samples {
            if sample.sequence >= expected {
                expected = sample.sequence.saturating_add(1);
                fresh.push(sample);
            }
        }
        let duplicates = total - fresh.len() as u64;
        if let Err(e) = self.check(&fresh, next, wall_clock_us()) {
            self.shared.rejected.fetch_add(total, Ordering::Relaxed);
            metrics::counter!(telemetry::SAMPLES_REJECTED, "sensor" => self.spec.id.clone(), "reason" => e.reason())
                .increment(total);
            return Err(e);
        }
        for sample in &mut fresh {
            self.accept(sample);
        }
        if let Some(last) = fresh.last() {
            self.shared
                .last_timestamp_us
                .store(last.timestamp_us, Ordering::Release);
            self.shared
                .next_sequence
                .store(last.sequence.saturating_add(1), Ordering::Release);
        }
        self.shared
            .accepted
            .fetch_add(fresh.len() as u64, Ordering::Relaxed);
        self.shared
            .duplicates
            .fetch_add(duplicates, Ordering::Relaxed);
        self.accepted_counter.increment(fresh.len() as u64);
        self.duplicate_counter.increment(duplicates);
        Ok(PushOutcome {
            acked_through: self.shared.acked_through(),
            accepted: fresh.len() as u32,
            duplicates: duplicates as u32,
        })
    }

    /// Checks the samples not yet accepted (in sequence order), given the next
    /// expected sequence number and the node's clock.
    fn check(&self, samples: &[Sample], next: u64, now_us: i64) -> Result<(), IngestError> {
        let mut previous_us = self.shared.last_timestamp_us.load(Ordering::Acquire);
        let mut expected = next;
        let skew_us =
            i64::try_from(self.spec.max_clock_skew_ms.saturating_mul(1000)).unwrap_or(i64::MAX);
        let latest_us = now_us.saturating_add(skew_us);
        for sample in samples {
            let sensor_id = || self.spec.id.clone();
            // Deduplication left only samples at or past `expected`.
            let jump = sample.sequence.saturating_sub(expected);
            if jump > self.spec.max_sequence_gap {
                return Err(IngestError::SequenceJump {
                    sensor_id: sensor_id(),
                    sequence: sample.sequence,
                    expected,
                    limit: self.spec.max_sequence_gap,
                });
            }
            expected = sample.sequence.saturating_add(1);
            if sample.timestamp_us > latest_us {
                return Err(IngestError::TimestampAhead {
                    sensor_id: sensor_id(),
                    sequence: sample.sequence,
                    timestamp_us: sample.timestamp_us,
                    now_us,
                    limit_ms: self.spec.max_clock_skew_ms,
                });
            }
            if sample.values.len() != self.spec.channels {
                return Err(IngestError::WrongChannelCount {
                    sensor_id: sensor_id(),
                    sequence: sample.sequence,
                    expected: self.spec.channels,
                    got: sample.values.len(),
                });
            }
            if let Some((channel, value)) = sample
                .values
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite())
            {
                return Err(IngestError::NotFinite {
                    sensor_id: sensor_id(),
                    sequence: sample.sequence,
                    channel,
                    value: *value,
                });
            }
            if sample.timestamp_us < previous_us {
                return Err(IngestError::TimestampBackwards {
                    sensor_id: sensor_id(),
                    sequence: sample.sequence,
                    timestamp_us: sample.timestamp_us,
                    previous_us,
                });
            }
            previous_us = sample.timestamp_us;
        }
        Ok(())
    }

    fn accept(&mut self, sample: &mut Sample) {
        let flags = self.quality.observe(sample.timestamp_us, &sample.values);
        self.normaliser.apply(&mut sample.values);
        let Some(cut) = self
            .windower
            .push(sample.timestamp_us, &sample.values, flags)
        else {
            return;
        };
        let window = Window {
            sensor_id: self.shared.id.clone(),
            sequence: self.next_window,
            start_us: cut.start_us,
            end_us: cut.end_us,
            channels: self.spec.channels,
            length: self.windower.size(),
            values: cut.values.into(),
            quality: cut.quality,
        };
        self.next_window += 1;
        self.shared.windows.fetch_add(1, Ordering::Relaxed);
        self.window_counter.increment(1);
        match self.directory.router(&self.spec.router) {
            Some(router) => {
                if let Err(e) = router.actor.cast(RouterMsg::Route(window)) {
                    tracing::warn!(sensor = %self.spec.id, router = %self.spec.router, error = %e, "router unreachable; window dropped");
                }
            }
            None => {
                tracing::warn!(sensor = %self.spec.id, router = %self.spec.router, "router not running; window dropped");
            }
        }
    }
}
