//! A sensor stream's forwarder: store-and-forward between the stream and its router.
//!
//! **Owns** the stream's windows from the moment they are cut (and, with an edge log,
//! committed) until each has an outcome. **Takes** windows from its stream through a
//! channel, in window order. **Belongs to** its [`super::SensorStream`], which spawns it
//! in `pre_start` and whose state holds the channel: when the stream stops (or is
//! restarted by the [`crate::NodeAgent`]) the channel closes and the forwarder ends;
//! with a log it ends at once, and the stream's next life reads whatever had no outcome
//! from the log's outbox, so a window is never lost to a restart (at worst scored
//! twice, published by one life only). **On failure** of a window, see below; the
//! forwarder itself has no failure of its own: every error is a window's outcome.
//!
//! Each window goes to the router as a [`RouterMsg::Score`]; the verdicts are taken in
//! the order the windows were cut, whatever order the experts answer in, and published
//! to the [`Annunciator`] in that order: a sensor's verdicts never overtake each other.
//!
//! With an edge log (store-and-forward), a window whose experts cannot be reached (no
//! replica within the router's retry deadline, no router, a router at its limit) is not
//! a failure: it stays in the log's outbox, and the forwarder switches to its backlog.
//! It then probes with the oldest window (backoff between probes) and, once one is
//! scored, drains the outbox oldest first, [`PIPELINE`] windows in flight, new windows
//! queuing behind the old in the outbox, until it has caught up and takes windows from
//! the channel again. A verdict from the backlog carries how long after the cut it came
//! ([`ScoredWindow::late`]). Windows older than the outbox's `max_age` are dropped
//! unscored when the backlog reaches them, and windows the log dropped to make room
//! (`when_full = "drop_oldest"`) are not published even if a probe had them in flight;
//! both are counted in the log's [`fogmesh_edge_log::OutboxUsage`]. A window no retry
//! would help (no route, wrong shape, a model error) leaves the outbox with its
//! failure counted by the router.
//!
//! Without a log, a window that cannot be scored is logged and lost, as the router
//! counted it; nothing bounds the forwarder's windows in flight but the router's own
//! limit, which the node enforces on producers.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use fogmesh_edge_log::{EdgeLog, ParkedWindow};
use futures::stream::{FuturesOrdered, StreamExt};
use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::annunciator::{Annunciator, ScoredWindow};
use crate::directory::NodeDirectory;
use crate::error::ScoreError;
use crate::quality::QualityFlags;
use crate::router::interface::RouterMsg;
use crate::sample::Window;

use super::interface::SensorStreamShared;

/// Windows a durable stream's forwarder keeps in flight to its router. Enough to keep
/// an expert's batches full while draining, small enough that a plant's sensors
/// probing a dead expert together stay far below the router's own limit.
pub const PIPELINE: usize = 64;

/// The waits between probes of an expert that could not be reached, from 50 ms up to
/// 2 s, jittered so the streams that lost it together do not probe in lockstep. A probe
/// itself waits up to the router's retry deadline for a replica to appear.
const PROBE_WAIT: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(50))
    .with_max_delay(Duration::from_secs(2))
    .with_jitter()
    .without_max_times();

/// What a full outbox does with the next window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Refuse the batch that would overflow it (`RESOURCE_EXHAUSTED`): back-pressure
    /// to the producer, which keeps the samples and sends them again. Nothing
    /// acknowledged is lost.
    #[default]
    Refuse,
    /// Accept the batch and drop the sensor's oldest parked windows to make room, each
    /// counted.
    DropOldest,
}

/// How much a sensor's outbox may hold while its experts are unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    pub max_bytes_per_sensor: u64,
    /// Windows parked longer are dropped unscored when the backlog reaches them.
    pub max_age: Duration,
    pub when_full: WhenFull,
}

/// 64 MiB per sensor: an hour of a 50-channel stream cut every second, in windows of
/// 100 samples, with room to spare; a day before the oldest window is stale.
impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            max_bytes_per_sensor: 64 << 20,
            max_age: Duration::from_secs(24 * 3600),
            when_full: WhenFull::Refuse,
        }
    }
}

/// A node's durable storage for its streams: the edge log and the outbox's limits.
#[derive(Debug, Clone)]
pub struct EdgeStorage {
    pub log: EdgeLog,
    pub limits: OutboxLimits,
}

/// A window back from the router; `cut_at_us` for one taken from the outbox.
type Verdict = (Window, Option<i64>, Result<ScoredWindow, ScoreError>);

/// A window's verdict on its way.
type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Verdict> + Send>>;

pub(crate) struct Forwarder {
    shared: Arc<SensorStreamShared>,
    directory: Arc<NodeDirectory>,
    annunciator: Annunciator,
    storage: Option<EdgeStorage>,
}

/// Where the forwarder takes its next window from.
enum Source {
    /// The channel: every window before `next` has been handed on.
    Channel,
    /// The log's outbox, from window `next` on, once `after` has passed; `probing`
    /// until one window has been scored since the last failure.
    Outbox { after: Instant, probing: bool },
}

impl Forwarder {
    pub(crate) fn new(
        shared: Arc<SensorStreamShared>,
        directory: Arc<NodeDirectory>,
        annunciator: Annunciator,
        storage: Option<EdgeStorage>,
    ) -> Self {
        Forwarder {
            shared,
            directory,
            annunciator,
            storage,
        }
    }

    /// Runs until the stream's channel closes. `next_window`: the sequence of the next
    /// window the stream will cut; with windows parked in the log, the forwarder starts
    /// from them.
    pub(crate) async fn run(self, mut windows: mpsc::UnboundedReceiver<Window>, next_window: u64) {
        let sensor = self.shared.id.clone();
        let mut in_flight: FuturesOrdered<Pending> = FuturesOrdered::new();
        let mut backoff = PROBE_WAIT.build();
        let parked_at_start = self
            .storage
            .as_ref()
            .is_some_and(|s| s.log.outbox(&sensor).windows > 0);
        let (mut next, mut source) = if parked_at_start {
            (
                0,
                Source::Outbox {
                    after: Instant::now(),
                    probing: false,
                },
            )
        } else {
            (next_window, Source::Channel)
        };
        loop {
            if let (Some(storage), Source::Outbox { after, probing }) = (&self.storage, &source) {
                let room = if *probing { 1 } else { PIPELINE };
                if Instant::now() >= *after && in_flight.len() < room.div_ceil(2) {
                    match self.refill(storage, next, room - in_flight.len()) {
                        Ok(Some(parked)) => {
                            for window in parked {
                                next = window.0.sequence + 1;
                                match self.send(window.0, Some(window.1)) {
                                    Ok(verdict) => in_flight.push_back(verdict),
                                    Err(window) => {
                                        next = window.sequence;
                                        source = self.wait(&mut backoff);
                                        break;
                                    }
                                }
                            }
                        }
                        Ok(None) => source = Source::Channel,
                        Err(e) => {
                            tracing::error!(sensor = %sensor, error = %e, "cannot read the outbox; trying again");
                            source = self.wait(&mut backoff);
                        }
                    }
                }
            }
            let wake = match &source {
                Source::Outbox { after, .. } if in_flight.is_empty() => Some(*after),
                _ => None,
            };
            tokio::select! {
                biased;
                Some((window, cut_at_us, verdict)) = in_flight.next(), if !in_flight.is_empty() => {
                    match self.outcome(window, cut_at_us, verdict) {
                        Outcome::Done => {
                            if let Source::Outbox { probing, .. } = &mut source {
                                *probing = false;
                            }
                            backoff = PROBE_WAIT.build();
                        }
                        Outcome::Held(sequence) => {
                            // Everything from here on is scored again from the outbox.
                            in_flight = FuturesOrdered::new();
                            next = sequence;
                            source = self.wait(&mut backoff);
                        }
                    }
                }
                received = windows.recv() => {
                    let Some(window) = received else {
                        break;
                    };
                    // In the outbox already: the backlog reads it in its turn.
                    if window.sequence < next || !matches!(source, Source::Channel) {
                        continue;
                    }
                    // Only a log can hand on what the channel skipped or what does not
                    // fit now; without one, every window goes straight on.
                    let durable = self.storage.is_some();
                    if durable && (window.sequence > next || in_flight.len() >= PIPELINE) {
                        source = Source::Outbox { after: Instant::now(), probing: false };
                        continue;
                    }
                    next = window.sequence + 1;
                    match self.send(window, None) {
                        Ok(verdict) => in_flight.push_back(verdict),
                        Err(window) => {
                            next = window.sequence;
                            source = self.wait(&mut backoff);
                        }
                    }
                }
                () = sleep_until(wake), if wake.is_some() => {}
            }
        }
        // Without a log nothing else will ever score the windows in flight.
        if self.storage.is_none() {
            while let Some((window, cut_at_us, verdict)) = in_flight.next().await {
                self.outcome(window, cut_at_us, verdict);
            }
        }
    }

    /// After a window could not be scored: the outbox, probed after the next wait.
    fn wait(&self, backoff: &mut impl Iterator<Item = Duration>) -> Source {
        let wait = backoff.next().unwrap_or(Duration::from_secs(2));
        Source::Outbox {
            after: Instant::now() + wait,
            probing: true,
        }
    }

    /// Up to `room` parked windows from `next` on, with when each was cut, less those
    /// too old to keep (dropped here); `None` once the outbox holds nothing from `next`
    /// on.
    fn refill(
        &self,
        storage: &EdgeStorage,
        mut next: u64,
        room: usize,
    ) -> Result<Option<Vec<(Window, i64)>>, fogmesh_edge_log::EdgeLogError> {
        let max_age = i64::try_from(storage.limits.max_age.as_micros()).unwrap_or(i64::MAX);
        let mut expired = 0u64;
        loop {
            let parked = storage.log.parked(&self.shared.id, next, room)?;
            let Some(last) = parked.last().map(|w| w.sequence) else {
                return Ok(None);
            };
            let now = wall_clock_us();
            let mut windows = Vec::with_capacity(parked.len());
            for window in parked {
                if now.saturating_sub(window.cut_at_us) > max_age {
                    storage.log.expired(&self.shared.id, window.sequence);
                    expired += 1;
                    continue;
                }
                let cut_at = window.cut_at_us;
                windows.push((self.unpark(window), cut_at));
            }
            if expired > 0 {
                tracing::warn!(sensor = %self.shared.id, expired, "windows older than outbox.max_age_s dropped unscored");
            }
            if !windows.is_empty() {
                return Ok(Some(windows));
            }
            // All too old: read on past them.
            next = last + 1;
        }
    }

    fn unpark(&self, window: ParkedWindow) -> Window {
        Window {
            sensor_id: self.shared.id.clone(),
            sequence: window.sequence,
            start_us: window.start_us,
            end_us: window.end_us,
            channels: window.channels as usize,
            length: window.length as usize,
            values: window.values.into(),
            quality: QualityFlags::from_bits(window.quality),
        }
    }

    /// Hands `window` to the router; the window back when the router cannot take it
    /// now (not running, at its limit) and a log will keep it.
    fn send(&self, window: Window, cut_at_us: Option<i64>) -> Result<Pending, Window> {
        let router_name = &self.shared.router;
        let refused = |error: ScoreError, window: Window| {
            Box::pin(async move { (window, cut_at_us, Err(error)) }) as Pending
        };
        let Some(router) = self.directory.router(router_name) else {
            if self.storage.is_some() {
                return Err(window);
            }
            let error = ScoreError::UnknownRouter {
                router: router_name.to_string(),
            };
            return Ok(refused(error, window));
        };
        if self.storage.is_some() && router.shared.is_full() {
            return Err(window);
        }
        let (reply, answer) = oneshot::channel();
        let message = RouterMsg::Score {
            window: window.clone(),
            reply: RpcReplyPort::from(reply),
        };
        if router.actor.cast(message).is_err() {
            if self.storage.is_some() {
                return Err(window);
            }
            let error = ScoreError::UnknownRouter {
                router: router_name.to_string(),
            };
            return Ok(refused(error, window));
        }
        let router = router_name.to_string();
        Ok(Box::pin(async move {
            let verdict = answer.await.unwrap_or(Err(ScoreError::RouterUnavailable {
                router,
                source: crate::node_agent::Unanswered::Stopped { callee: "router" },
            }));
            (window, cut_at_us, verdict)
        }))
    }

    /// Publishes a verdict, or decides that its window waits in the outbox.
    fn outcome(
        &self,
        window: Window,
        cut_at_us: Option<i64>,
        verdict: Result<ScoredWindow, ScoreError>,
    ) -> Outcome {
        let log = self.storage.as_ref().map(|s| &s.log);
        match verdict {
            Ok(mut scored) => {
                if let Some(log) = log {
                    if window.sequence < log.outbox(&self.shared.id).dropped_before {
                        // Dropped to make room while it was being scored: counted as
                        // dropped, so not published.
                        return Outcome::Done;
                    }
                }
                scored.late = cut_at_us.map(|cut| {
                    Duration::from_micros(u64::try_from(wall_clock_us() - cut).unwrap_or(0))
                });
                self.annunciator.publish(scored);
                if let Some(log) = log {
                    log.scored(&self.shared.id, window.sequence);
                }
                Outcome::Done
            }
            Err(e) if log.is_some() && e.worth_retrying() => {
                tracing::debug!(sensor = %self.shared.id, window = window.sequence, error = %e, "window held in the outbox until an expert can score it");
                Outcome::Held(window.sequence)
            }
            Err(e) => {
                tracing::warn!(sensor = %self.shared.id, router = %self.shared.router, window = window.sequence, error = %e, "window not scored");
                if let Some(log) = log {
                    log.scored(&self.shared.id, window.sequence);
                }
                Outcome::Done
            }
        }
    }
}

enum Outcome {
    /// Published, or failed for good.
    Done,
    /// Not scorable now: this window and every later one wait in the outbox.
    Held(u64),
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// This node's clock in microseconds since the Unix epoch.
pub(crate) fn wall_clock_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
