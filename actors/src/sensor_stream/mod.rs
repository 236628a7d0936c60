//! `SensorStream`: one per stream of readings (a plant unit's transmitters, a pump's
//! vibration channels).
//!
//! **Owns** the stream's acknowledged position (highest accepted sequence number and
//! timestamp), its quality tracker, normaliser and windower, and its forwarder (the
//! task that takes its windows to the router and their verdicts to the annunciator,
//! holding them in the edge log's outbox while no expert can score them: see
//! [`forwarder`]). **Takes** [`SensorStreamMsg::Push`]: a batch of samples from any
//! source (file replay, gRPC `Ingest`, MQTT), answered with the acknowledgement or the
//! reason the batch was refused. **Supervised by** the [`crate::NodeAgent`]. **On
//! failure**: with an edge log, a restarted stream (or a restarted node, after `kill
//! -9` or a power cut) takes its position and the samples of its unfinished window
//! back from the log, so it refuses a resend of an acknowledged sample as a duplicate
//! and cuts the same next window, and its new forwarder scores the windows the outbox
//! still holds (cut before the crash, never scored) before any new one. Without a
//! log, the position lives in [`SensorStreamShared`], which the supervisor keeps, and
//! the partial window is lost with the process.
//!
//! Accepting a batch, in order:
//! 1. Sort the batch by sequence number; drop samples whose sequence was already
//!    accepted (before or earlier in this batch) as duplicates: a producer that lost an
//!    acknowledgement may resend, and is acknowledged again.
//! 2. Check every remaining sample (channel count, finite values, a sequence number at
//!    most `max_sequence_gap` past the next expected one, a timestamp not before the
//!    previous one and at most `max_clock_skew_ms` ahead of this node's clock). The first bad sample refuses the whole batch: nothing of it is
//!    accepted, so the producer can fix and resend it as a unit.
//! 3. Accept: flag quality on raw values, normalise, window.
//! 4. With an edge log: if the windows the batch completed would take the stream's
//!    outbox past its capacity, refuse the batch ([`IngestError::OutboxFull`]) under
//!    `when_full = "refuse"`, or have the log drop the oldest parked windows under
//!    `"drop_oldest"`. Append the raw samples, the windows (to the log's outbox, until
//!    they have an outcome) and the position after them, and wait for the commit. A
//!    commit that fails (disk full, I/O error) refuses the batch
//!    ([`IngestError::NotStored`]). A refused batch puts quality tracker, normaliser
//!    and windower back as they were, so it changes nothing here either.
//! 5. Hand each completed window to the stream's forwarder; only then is the batch
//!    acknowledged.

pub(crate) mod forwarder;
pub(crate) mod interface;

pub use forwarder::{EdgeStorage, OutboxLimits, WhenFull, PIPELINE};
pub use interface::{
    PushOutcome, SensorStreamMsg, SensorStreamShared, SensorStreamSpec, DEFAULT_MAX_CLOCK_SKEW_MS,
    DEFAULT_MAX_RATE, DEFAULT_MAX_SEQUENCE_GAP, MAX_WINDOW_VALUES,
};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fogmesh_edge_log::{Batch, ParkedWindow, StreamPosition};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use crate::annunciator::Annunciator;
use crate::directory::NodeDirectory;
use crate::error::IngestError;
use crate::normalisation::Normaliser;
use crate::quality::QualityTracker;
use crate::sample::{Sample, Window};
use crate::telemetry;
use crate::windowing::Windower;

use forwarder::{wall_clock_us, Forwarder};

pub struct SensorStream;

pub struct SensorStreamArgs {
    pub spec: SensorStreamSpec,
    pub shared: Arc<SensorStreamShared>,
    pub directory: Arc<NodeDirectory>,
    pub annunciator: Annunciator,
    /// Where accepted batches are made durable; `None` keeps them in memory only.
    pub storage: Option<EdgeStorage>,
}

pub struct SensorStreamState {
    spec: SensorStreamSpec,
    shared: Arc<SensorStreamShared>,
    quality: QualityTracker,
    normaliser: Normaliser,
    windower: Windower,
    next_window: u64,
    storage: Option<EdgeStorage>,
    /// To the forwarder; dropping it (with the state) ends the forwarder.
    forward: mpsc::UnboundedSender<Window>,
    /// Started once the stream has resumed, from where it resumed.
    forwarder: Option<tokio::task::JoinHandle<()>>,
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
        let (forward, windows) = mpsc::unbounded_channel();
        let mut state = SensorStreamState {
            quality: QualityTracker::new(spec.quality.clone(), spec.channels),
            normaliser: Normaliser::new(&spec.normalisation, spec.channels),
            windower: Windower::new(spec.channels, spec.window, spec.stride),
            next_window: args.shared.windows.load(Ordering::Relaxed),
            storage: args.storage.clone(),
            forward,
            forwarder: None,
            accepted_counter: metrics::counter!(telemetry::SAMPLES_ACCEPTED, "sensor" => sensor.clone()),
            duplicate_counter: metrics::counter!(telemetry::SAMPLES_DUPLICATE, "sensor" => sensor.clone()),
            window_counter: metrics::counter!(telemetry::WINDOWS_CUT, "sensor" => sensor),
            spec,
            shared: args.shared,
        };
        state.resume()?;
        let forwarder = Forwarder::new(
            state.shared.clone(),
            args.directory,
            args.annunciator,
            args.storage,
        );
        state.forwarder = Some(tokio::spawn(forwarder.run(windows, state.next_window)));
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // With a log the outbox keeps what it had in flight; the next life sends it.
        // Waited for, so the log is let go by the time the stream has stopped.
        if let (Some(_), Some(forwarder)) = (&state.storage, state.forwarder.take()) {
            forwarder.abort();
            let _ = forwarder.await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SensorStreamMsg::Push { samples, reply } => {
                let outcome = state.push(samples).await;
                // A producer that hung up still had its batch accepted or refused.
                let _ = reply.send(outcome);
            }
        }
        Ok(())
    }
}

impl SensorStreamState {
    /// Takes the stream's position and unfinished window back from the edge log: what
    /// the last committed batch left, whatever happened to the process since.
    fn resume(&mut self) -> Result<(), IngestError> {
        let Some(log) = self.storage.as_ref().map(|s| s.log.clone()) else {
            return Ok(());
        };
        let Some(stored) = log
            .stream(&self.spec.id)
            .map_err(|source| IngestError::NotStored {
                sensor_id: self.spec.id.clone(),
                source,
            })?
        else {
            return Ok(());
        };
        let position = stored.position;
        self.shared
            .next_sequence
            .store(position.next_sequence, Ordering::Release);
        self.shared
            .last_timestamp_us
            .store(position.last_timestamp_us, Ordering::Release);
        self.shared
            .windows
            .store(position.windows, Ordering::Relaxed);
        self.next_window = position.windows;
        self.windower = Windower::new(self.spec.channels, self.spec.window, self.spec.stride)
            .skipping(usize::try_from(position.skip).unwrap_or(usize::MAX));
        let unfinished = stored.unfinished.len();
        for mut sample in stored.unfinished {
            // Fewer samples than a window: the window they start is still to be cut.
            if self.window(&mut sample).is_some() {
                tracing::warn!(sensor = %self.spec.id, "the edge log held a whole window as unfinished; it was cut before the restart");
                self.next_window -= 1;
            }
        }
        let parked = log.outbox(&self.spec.id).windows;
        tracing::info!(sensor = %self.spec.id, next_sequence = position.next_sequence, windows = position.windows, unfinished, parked, "stream resumed from the edge log");
        Ok(())
    }

    async fn push(&mut self, mut samples: Vec<Sample>) -> Result<PushOutcome, IngestError> {
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
            self.refused(total, &e);
            return Err(e);
        }
        // With a log, what the batch changes is kept to put back if it is refused.
        let durable = match &self.storage {
            Some(storage) => Batch::encode(&fresh).map(|batch| {
                let before = Before {
                    quality: self.quality.clone(),
                    normaliser: self.normaliser.clone(),
                    windower: self.windower.clone(),
                    next_window: self.next_window,
                };
                (storage.clone(), batch, before)
            }),
            None => None,
        };
        let mut windows = Vec::new();
        for sample in &mut fresh {
            windows.extend(self.window(sample));
        }
        let Some(last) = fresh.last() else {
            return Ok(self.acknowledge(0, duplicates));
        };
        if let Some((storage, batch, before)) = durable {
            let (window_start, skip) = self.windower.resume_point();
            let position = StreamPosition {
                next_sequence: last.sequence.saturating_add(1),
                last_timestamp_us: last.timestamp_us,
                windows: self.next_window,
                window_start,
                skip: skip as u64,
            };
            let cut_at_us = wall_clock_us();
            let parked: Vec<ParkedWindow> = windows.iter().map(|w| park(w, cut_at_us)).collect();
            let limits = storage.limits;
            let make_room = match limits.when_full {
                WhenFull::Refuse => {
                    let usage = storage.log.outbox(&self.spec.id);
                    let incoming: u64 = parked.iter().map(ParkedWindow::stored_bytes).sum();
                    // An empty outbox takes any batch, so a capacity below one batch's
                    // windows slows the producer down instead of stopping it for good.
                    if usage.windows > 0
                        && usage.bytes.saturating_add(incoming) > limits.max_bytes_per_sensor
                    {
                        let e = IngestError::OutboxFull {
                            sensor_id: self.spec.id.clone(),
                            windows: usage.windows,
                            bytes: usage.bytes,
                            limit: limits.max_bytes_per_sensor,
                        };
                        return Err(self.put_back(before, total, e));
                    }
                    None
                }
                WhenFull::DropOldest => Some(limits.max_bytes_per_sensor),
            };
            match storage
                .log
                .append(&self.shared.id, batch, &parked, position, make_room)
                .await
            {
                Ok(appended) if appended.dropped > 0 => {
                    tracing::warn!(sensor = %self.spec.id, dropped = appended.dropped, limit = limits.max_bytes_per_sensor, "outbox full: oldest windows dropped unscored to make room");
                }
                Ok(_) => {}
                Err(source) => {
                    let e = IngestError::NotStored {
                        sensor_id: self.spec.id.clone(),
                        source,
                    };
                    return Err(self.put_back(before, total, e));
                }
            }
        }
        self.shared
            .last_timestamp_us
            .store(last.timestamp_us, Ordering::Release);
        self.shared
            .next_sequence
            .store(last.sequence.saturating_add(1), Ordering::Release);
        for window in windows {
            self.route(window);
        }
        Ok(self.acknowledge(fresh.len() as u64, duplicates))
    }

    /// A batch refused after it was windowed: the stream as it was before it.
    fn put_back(&mut self, before: Before, total: u64, e: IngestError) -> IngestError {
        self.quality = before.quality;
        self.normaliser = before.normaliser;
        self.windower = before.windower;
        self.next_window = before.next_window;
        self.refused(total, &e);
        e
    }

    fn refused(&self, total: u64, e: &IngestError) {
        self.shared.rejected.fetch_add(total, Ordering::Relaxed);
        metrics::counter!(telemetry::SAMPLES_REJECTED, "sensor" => self.spec.id.clone(), "reason" => e.reason())
            .increment(total);
    }

    fn acknowledge(&self, accepted: u64, duplicates: u64) -> PushOutcome {
        self.shared.accepted.fetch_add(accepted, Ordering::Relaxed);
        self.shared
            .duplicates
            .fetch_add(duplicates, Ordering::Relaxed);
        self.accepted_counter.increment(accepted);
        self.duplicate_counter.increment(duplicates);
        PushOutcome {
            acked_through: self.shared.acked_through(),
            accepted: accepted as u32,
            duplicates: duplicates as u32,
        }
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

    /// Flags, normalises and windows one sample; the window it completes, if any.
    fn window(&mut self, sample: &mut Sample) -> Option<Window> {
        let flags = self.quality.observe(sample.timestamp_us, &sample.values);
        self.normaliser.apply(&mut sample.values);
        let cut =
            self.windower
                .push(sample.sequence, sample.timestamp_us, &sample.values, flags)?;
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
        Some(window)
    }

    /// Counts a window just cut and hands it to the stream's forwarder.
    fn route(&self, window: Window) {
        self.shared.windows.fetch_add(1, Ordering::Relaxed);
        self.window_counter.increment(1);
        // The forwarder ends only with this state, which holds its channel.
        let _ = self.forward.send(window);
    }
}

/// What a batch changes in a stream, kept to put back if the batch is refused.
struct Before {
    quality: QualityTracker,
    normaliser: Normaliser,
    windower: Windower,
    next_window: u64,
}

/// A window as the edge log's outbox keeps it.
fn park(window: &Window, cut_at_us: i64) -> ParkedWindow {
    ParkedWindow {
        sequence: window.sequence,
        start_us: window.start_us,
        end_us: window.end_us,
        channels: window.channels as u32,
        length: window.length as u32,
        quality: u32::from(window.quality.bits()),
        cut_at_us,
        values: window.values.to_vec(),
    }
}
