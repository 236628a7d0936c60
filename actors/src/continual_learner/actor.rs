//! `ContinualLearner`: the actor that keeps one expert's stored model fitted to the plant
//! as the plant drifts (see the module above for the life of a regime).
//!
//! **Owns**, for one expert that serves a stored model version: a replay reservoir of
//! the regime the serving version knows ([`Reservoir`]: a uniform sample of the windows
//! seen while watching), the buffer of recent windows (the newest regime), its drift
//! detectors (Page–Hinkley on the log of the expert's score over its threshold, a
//! two-sample Kolmogorov–Smirnov test on each window's mean value), its phase and
//! counters, and the serving version's manifest and weights. **Takes**
//! [`ContinualLearnerMsg::Scored`] (a window its expert scored, forwarded from the
//! [`Annunciator`] by a task the learner owns), [`ContinualLearnerMsg::Label`] (the
//! plant's label for a recent window),
//! [`ContinualLearnerMsg::Learn`] (run a round now, answered with its report),
//! [`ContinualLearnerMsg::Windows`] (the windows it holds, for its node's federation
//! site),
//! [`ContinualLearnerMsg::Tick`] (the `every_s` schedule). **Supervised by** whoever
//! started it through [`ContinualLearner::start`] (on a node: the node server): it is
//! not restarted in the same process; an unexpected stop is logged, counted in
//! `fogmesh_learner_stopped_total` and shows as phase `stopped`, and the expert keeps
//! serving the version it had. On a node with an edge log the learner snapshots its
//! reservoir, recent windows and collecting state there (every
//! [`SNAPSHOT_EVERY`] windows, at each drift and promotion, and when it stops), and a
//! learner started after a restart takes them back, so a restart of the node does not
//! cost it the regime it had learned or the new one it was collecting; its drift
//! detectors start afresh. **On failure**: a fine-tune that
//! fails, a candidate the [`ValidationGate`] refuses, a store or promotion error, each
//! leaves the serving version untouched and is counted (`failures`, `refusals`) and
//! reported (`last_error`, `last_round`, the `Learn` answer). Nothing from outside makes
//! it panic: labels for windows it no longer holds, windows that are not its expert's,
//! and commands at the wrong time are answered or counted.
//!
//! The mailbox never waits for a round: the round runs as its own task and reports
//! back with a message, so windows keep arriving (and are counted) while it trains.
//! The forwarding task never slows the routers: it reads the annunciator's broadcast,
//! and when it lags (or the learner has more than [`MAX_PENDING_WINDOWS`] windows
//! queued) it skips windows and counts them in `windows_skipped`.
//!
//! [`ValidationGate`]: fogmesh_models::continual::ValidationGate

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fogmesh_edge_log::EdgeLog;
use fogmesh_models::continual::{ReplayItem, Reservoir};
use fogmesh_models::drift::{Drift, KsDrift, PageHinkley};
use fogmesh_models::store::ModelStore;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::observed::ObservedWindows;
use super::promoter::Promoter;
use super::round::{run_round, Completed, RoundDone, RoundInput, Serving, MIN_OLD_WINDOWS};
use super::shared::{
    ContinualLearnerShared, DriftEvent, LearnerError, Phase, RoundReport, Trigger,
};
use super::spec::{InvalidLearning, LearningSpec};
use crate::annunciator::{Annunciator, ScoredWindow};
use crate::directory::LearnerHandle;
use crate::error::SpawnFault;
use crate::expert::{ExpertSpec, ModelSource};
use crate::node_agent::{Node, Unanswered, Undelivered};
use crate::telemetry;

/// Windows the forwarding task may have queued in the learner's mailbox; beyond it,
/// windows are skipped (and counted) so a busy learner cannot grow its mailbox without
/// bound.
pub const MAX_PENDING_WINDOWS: u64 = 4096;

pub enum ContinualLearnerMsg {
    /// A window the learner's expert scored (from the forwarding task).
    Scored(Arc<ScoredWindow>),
    /// The plant's label for a recent window; attached if the learner still holds the
    /// window (recent windows only: the reservoir is a sample and is not searched).
    Label {
        sensor: String,
        window_sequence: u64,
        label: i64,
    },
    /// Runs a round now; answered with its report once it ends.
    Learn {
        reply: RpcReplyPort<Result<RoundReport, LearnerError>>,
    },
    /// The windows the learner holds, for its node's federation site to train on:
    /// the reservoir and the recent windows, with the labels the plant gave them.
    Windows {
        reply: RpcReplyPort<Vec<ReplayItem>>,
    },
    /// The `every_s` schedule.
    Tick,
    /// A round ended (sent by the round's own task).
    RoundDone(Box<RoundDone>),
}

// Local only: it carries reply ports and shared buffers that cannot cross a node.
impl ractor::Message for ContinualLearnerMsg {}

pub struct ContinualLearner;

/// Windows a learner takes between two snapshots in the edge log.
pub const SNAPSHOT_EVERY: usize = 256;

pub struct ContinualLearnerArgs {
    /// The expert as it serves now; it must serve a stored model.
    pub expert: ExpertSpec,
    pub spec: LearningSpec,
    /// Where candidates are stored: the store the serving version came from.
    pub store: ModelStore,
    pub promoter: Arc<dyn Promoter>,
    pub annunciator: Annunciator,
    pub shared: Arc<ContinualLearnerShared>,
    /// Where its windows survive a restart; `None` keeps them in memory only.
    pub log: Option<EdgeLog>,
}

pub struct ContinualLearnerState {
    expert: Arc<str>,
    spec: LearningSpec,
    store: ModelStore,
    promoter: Arc<dyn Promoter>,
    shared: Arc<ContinualLearnerShared>,
    serving: Arc<Serving>,
    observed: ObservedWindows,
    /// A drift was seen and no round has answered it yet.
    collecting: bool,
    /// Windows added to `recent` since the last drift or round started.
    since_round: usize,
    score_drift: PageHinkley,
    shape_drift: KsDrift,
    /// The latest drift not yet answered by a promotion, and when it was seen.
    drift: Option<(DriftEvent, tokio::time::Instant)>,
    /// The number of the round running now, and its task.
    running: Option<u64>,
    round_task: Option<JoinHandle<()>>,
    /// When the drift the running round answers was seen.
    round_answers: Option<tokio::time::Instant>,
    /// The plant drifted again while the running round trained.
    drifted_during_round: bool,
    rounds_started: u64,
    forwarder: Option<JoinHandle<()>>,
    metrics: LearnerMetrics,
    log: Option<EdgeLog>,
    /// Windows taken since the last snapshot.
    unsaved: usize,
}

struct LearnerMetrics {
    windows: metrics::Counter,
    reservoir: metrics::Gauge,
    new_windows: metrics::Gauge,
}

impl Actor for ContinualLearner {
    type Msg = ContinualLearnerMsg;
    type State = ContinualLearnerState;
    type Arguments = ContinualLearnerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ContinualLearnerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let expert: Arc<str> = args.expert.name.as_str().into();
        let invalid = |source| LearnerError::Invalid {
            expert: expert.to_string(),
            source,
        };
        args.spec.validate().map_err(invalid)?;
        let ModelSource::Stored(stored) = args.expert.source else {
            return Err(LearnerError::NotStored {
                expert: expert.to_string(),
            }
            .into());
        };
        let (score_drift, shape_drift) = args.spec.detectors().map_err(invalid)?;
        let reservoir = Reservoir::new(args.spec.reservoir, args.spec.seed).map_err(|e| {
            invalid(InvalidLearning {
                field: "reservoir".into(),
                value: args.spec.reservoir.to_string(),
                reason: e.to_string(),
            })
        })?;
        args.shared.details().serving_version = stored.manifest.id();
        args.shared.set_phase(Phase::Watching);
        let metrics = LearnerMetrics {
            windows: metrics::counter!(telemetry::LEARNER_WINDOWS, "expert" => expert.to_string()),
            reservoir: metrics::gauge!(telemetry::LEARNER_RESERVOIR, "expert" => expert.to_string()),
            new_windows: metrics::gauge!(telemetry::LEARNER_NEW_WINDOWS, "expert" => expert.to_string()),
        };
        if let Some(every) = args.spec.every_s {
            // Ends by itself once the learner has stopped.
            myself.send_interval(Duration::from_secs_f64(every), || ContinualLearnerMsg::Tick);
        }
        let forwarder = tokio::spawn(forward(
            args.annunciator.subscribe(),
            expert.clone(),
            args.shared.clone(),
            myself,
        ));
        let mut observed = ObservedWindows::new(reservoir);
        let (collecting, since_round) = match &args.log {
            Some(log) => resume(log, &expert, &mut observed),
            None => (false, 0),
        };
        if collecting {
            args.shared.set_phase(Phase::Collecting);
        }
        let state = ContinualLearnerState {
            expert,
            spec: args.spec,
            store: args.store,
            promoter: args.promoter,
            shared: args.shared,
            serving: Serving::new(stored.manifest, stored.weights),
            observed,
            collecting,
            since_round,
            score_drift,
            shape_drift,
            drift: None,
            running: None,
            round_task: None,
            round_answers: None,
            drifted_during_round: false,
            rounds_started: 0,
            forwarder: Some(forwarder),
            metrics,
            log: args.log,
            unsaved: 0,
        };
        state.publish_sizes();
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ContinualLearnerMsg::Scored(window) => {
                state.shared.window_handled();
                state.take(&window);
                if state.collecting
                    && state.running.is_none()
                    && state.since_round >= state.spec.min_new_windows
                {
                    // Too few old windows: logged inside, tried again after as many new
                    // windows again.
                    let _ = state.start_round(Trigger::Drift, None, &myself);
                }
            }
            ContinualLearnerMsg::Label {
                sensor,
                window_sequence,
                label,
            } => state.label(&sensor, window_sequence, label),
            ContinualLearnerMsg::Windows { reply } => {
                let mut windows = state.observed.reservoir_items();
                windows.extend(state.observed.recent_items());
                let _ = reply.send(windows);
            }
            ContinualLearnerMsg::Learn { reply } => {
                if let Err(e) = state.start_round(Trigger::Command, Some(reply), &myself) {
                    tracing::info!(expert = %state.expert, error = %e, "learning round not started");
                }
            }
            ContinualLearnerMsg::Tick => {
                if state.running.is_none() && state.since_round >= state.spec.min_new_windows {
                    let _ = state.start_round(Trigger::Schedule, None, &myself);
                } else {
                    tracing::debug!(expert = %state.expert, new = state.since_round, "scheduled round skipped: busy or too few new windows");
                }
            }
            ContinualLearnerMsg::RoundDone(done) => state.finish_round(*done),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(forwarder) = state.forwarder.take() {
            forwarder.abort();
        }
        // A round in flight is abandoned at its next step: nothing of it is stored or
        // promoted once the learner is gone (a swap already asked for completes).
        if let Some(round) = state.round_task.take() {
            round.abort();
        }
        state.save();
        state.shared.set_phase(Phase::Stopped);
        Ok(())
    }
}

/// Forwards the annunciator's windows on which `expert` gave an opinion to the learner;
/// skips (and counts) what it cannot keep up with, so the routers never wait for it.
async fn forward(
    mut windows: broadcast::Receiver<Arc<ScoredWindow>>,
    expert: Arc<str>,
    shared: Arc<ContinualLearnerShared>,
    learner: ActorRef<ContinualLearnerMsg>,
) {
    let skipped = metrics::counter!(telemetry::LEARNER_SKIPPED, "expert" => expert.to_string());
    loop {
        match windows.recv().await {
            Ok(window) => {
                if !window.experts.iter().any(|o| o.expert == expert) {
                    continue;
                }
                if shared.pending.load(Ordering::Relaxed) >= MAX_PENDING_WINDOWS {
                    shared.windows_skipped.fetch_add(1, Ordering::Relaxed);
                    skipped.increment(1);
                    continue;
                }
                shared.pending.fetch_add(1, Ordering::Relaxed);
                if learner.cast(ContinualLearnerMsg::Scored(window)).is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                shared.windows_skipped.fetch_add(missed, Ordering::Relaxed);
                skipped.increment(missed);
                tracing::debug!(%expert, missed, "learner fell behind the annunciator");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl ContinualLearnerState {
    /// Takes in one window its expert scored: buffers it and feeds the detectors.
    fn take(&mut self, window: &ScoredWindow) {
        let Some(opinion) = window.experts.iter().find(|o| o.expert == self.expert) else {
            return;
        };
        let seen = self.shared.windows_seen.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.windows.increment(1);
        let capacity = if self.collecting {
            self.spec.max_new_windows
        } else {
            self.spec.min_new_windows
        };
        self.observed.hold(window, capacity, self.collecting);
        self.since_round += 1;
        self.unsaved += 1;
        if self.unsaved >= SNAPSHOT_EVERY {
            self.save();
        }
        // The detectors follow the serving version's scores only: windows still in
        // flight under the previous version would look like a change.
        let event = if *opinion.model_version == *self.serving.id {
            // Floored so a perfect score (a classifier's 0) stays a finite value.
            let relative = (f64::from(opinion.score) / f64::from(opinion.threshold)).max(1e-9);
            let score = self
                .score_drift
                .update(relative.ln())
                .map(|d| (d, "page_hinkley", "score"));
            let mean = if window.values.is_empty() {
                f64::NAN
            } else {
                window.values.iter().map(|v| f64::from(*v)).sum::<f64>()
                    / window.values.len() as f64
            };
            let shape = self
                .shape_drift
                .update(mean)
                .map(|d| (d, "ks", "window_mean"));
            score.or(shape)
        } else {
            None
        };
        if let Some((drift, detector, signal)) = event {
            self.drifted(window, seen, drift, detector, signal);
        }
        self.publish_sizes();
        self.shared.changed();
    }

    fn drifted(
        &mut self,
        window: &ScoredWindow,
        seen: u64,
        drift: Drift,
        detector: &'static str,
        signal: &'static str,
    ) {
        let event = DriftEvent {
            detector,
            signal,
            sensor: window.sensor_id.to_string(),
            window_sequence: window.window_sequence,
            window_end_us: window.end_us,
            detected_us: now_us(),
            windows_seen: seen,
            before: drift.before,
            after: drift.after,
            statistic: drift.statistic,
            limit: drift.limit,
        };
        tracing::info!(expert = %self.expert, drift = %event.summary(), "drift detected");
        metrics::counter!(telemetry::LEARNER_DRIFTS, "expert" => self.expert.to_string(), "detector" => detector)
            .increment(1);
        self.shared.drifts.fetch_add(1, Ordering::Relaxed);
        self.shared.details().last_drift = Some(event.clone());
        self.drift = Some((event, tokio::time::Instant::now()));
        // Both detectors learn the new regime as their reference, so the other one does
        // not report the same change again. The settings were validated at start.
        if let Ok((score, shape)) = self.spec.detectors() {
            self.score_drift = score;
            self.shape_drift = shape;
        }
        // A round in flight works on its own copy of the windows, so the buffers move
        // on as they would without it; the round's promotion must then not end the
        // collecting of this newer regime (see `promoted`).
        self.drifted_during_round = self.running.is_some();
        if !self.collecting {
            // The windows before the drift are the regime the serving version knows.
            self.observed.recent_into_reservoir();
        } else {
            // A second change while collecting: what was collected is neither regime.
            self.observed.drop_recent();
        }
        self.collecting = true;
        self.since_round = 0;
        self.save();
        if self.running.is_none() {
            self.shared.set_phase(Phase::Collecting);
        } else {
            self.shared.changed();
        }
    }

    /// Snapshots the windows held into the edge log, if the node has one.
    fn save(&mut self) {
        if let Some(log) = &self.log {
            log.save_learner(
                &self.expert,
                self.observed.snapshot(self.collecting, self.since_round),
            );
        }
        self.unsaved = 0;
    }

    fn label(&mut self, sensor: &str, sequence: u64, label: i64) {
        if self.observed.label(sensor, sequence, label) {
            self.shared.labels_attached.fetch_add(1, Ordering::Relaxed);
        } else {
            self.shared.labels_missed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(expert = %self.expert, %sensor, sequence, "label for a window no longer held");
        }
    }

    fn publish_sizes(&self) {
        let reservoir = self.observed.reservoir_len() as u64;
        let recent = self.observed.recent_len() as u64;
        self.shared.reservoir.store(reservoir, Ordering::Relaxed);
        self.shared.new_windows.store(recent, Ordering::Relaxed);
        self.metrics.reservoir.set(reservoir as f64);
        self.metrics.new_windows.set(recent as f64);
    }

    /// Starts a round on what the learner holds now, or says why not (answering
    /// `reply` with the same error).
    fn start_round(
        &mut self,
        trigger: Trigger,
        reply: Option<RpcReplyPort<Result<RoundReport, LearnerError>>>,
        myself: &ActorRef<ContinualLearnerMsg>,
    ) -> Result<(), LearnerError> {
        let refuse = |reply: Option<RpcReplyPort<_>>, error: LearnerError| {
            if let Some(reply) = reply {
                let _ = reply.send(Err(error.clone()));
            }
            Err(error)
        };
        if let Some(round) = self.running {
            let error = LearnerError::Busy {
                expert: self.expert.to_string(),
                round,
                phase: self.shared.phase().as_str(),
            };
            return refuse(reply, error);
        }
        let (new, old) = (self.observed.recent_len(), self.observed.reservoir_len());
        if new < self.spec.min_new_windows || old < MIN_OLD_WINDOWS {
            let error = LearnerError::TooFewWindows {
                expert: self.expert.to_string(),
                new,
                need_new: self.spec.min_new_windows,
                old,
                need_old: MIN_OLD_WINDOWS,
            };
            if trigger != Trigger::Command {
                // Try again once as many new windows have come again, not on every one.
                self.since_round = 0;
                tracing::warn!(expert = %self.expert, error = %error, "learning round not started");
            }
            return refuse(reply, error);
        }
        self.rounds_started += 1;
        let round = self.rounds_started;
        self.running = Some(round);
        self.round_answers = self.drift.as_ref().map(|(_, seen)| *seen);
        self.drifted_during_round = false;
        self.since_round = 0;
        let input = RoundInput {
            round,
            trigger,
            expert: self.expert.clone(),
            serving: self.serving.clone(),
            new: self.observed.recent_items(),
            old: self.observed.reservoir_items(),
            spec: self.spec.clone(),
            store: self.store.clone(),
            promoter: self.promoter.clone(),
            shared: self.shared.clone(),
            drift: self.drift.as_ref().map(|(event, _)| event.clone()),
        };
        tracing::info!(expert = %self.expert, round, trigger = trigger.as_str(), new = input.new.len(), old = input.old.len(), "learning round started");
        self.shared.set_phase(Phase::FineTuning);
        let myself = myself.clone();
        self.round_task = Some(tokio::spawn(async move {
            let outcome = run_round(input).await;
            // The learner may have stopped meanwhile; then nobody waits for this.
            let _ = myself.cast(ContinualLearnerMsg::RoundDone(Box::new(RoundDone {
                outcome,
                reply,
            })));
        }));
        Ok(())
    }

    fn finish_round(&mut self, done: RoundDone) {
        self.running = None;
        self.round_task = None;
        let answers = self.round_answers.take();
        self.shared.rounds.fetch_add(1, Ordering::Relaxed);
        let outcome_label = match &done.outcome {
            Ok(Completed {
                promoted: Some(_), ..
            }) => "promoted",
            Ok(_) => "refused",
            Err(_) => "failed",
        };
        metrics::counter!(telemetry::LEARNER_ROUNDS, "expert" => self.expert.to_string(), "outcome" => outcome_label)
            .increment(1);
        let answer = match done.outcome {
            Ok(completed) => {
                metrics::histogram!(telemetry::LEARNER_FINE_TUNE_SECONDS, "expert" => self.expert.to_string())
                    .record(completed.report.fine_tune_s);
                self.shared.details().last_round = Some(completed.report.clone());
                match completed.promoted {
                    Some(serving) => self.promoted(serving, answers),
                    None => {
                        self.shared.refusals.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(expert = %self.expert, round = completed.report.round, reason = %completed.report.gate.reason, "candidate refused; the serving version stays");
                    }
                }
                Ok(completed.report)
            }
            Err(error) => {
                self.shared.failures.fetch_add(1, Ordering::Relaxed);
                self.shared.details().last_error = Some(error.to_string());
                tracing::warn!(expert = %self.expert, error = %error, "learning round failed; the serving version stays");
                Err(error)
            }
        };
        self.shared.set_phase(if self.collecting {
            Phase::Collecting
        } else {
            Phase::Watching
        });
        self.publish_sizes();
        if let Some(reply) = done.reply {
            let _ = reply.send(answer);
        }
    }

    /// A promoted version serves now: the recent windows are part of what it knows
    /// (unless the plant drifted again meanwhile: then they are the next regime to
    /// learn), and the detectors restart on its scores.
    /// `answers`: when the drift this promotion answers was seen.
    fn promoted(&mut self, serving: Arc<Serving>, answers: Option<tokio::time::Instant>) {
        let version = serving.id.clone();
        self.serving = serving;
        self.shared.promotions.fetch_add(1, Ordering::Relaxed);
        let mut details = self.shared.details();
        details.serving_version = version.clone();
        if let Some(seen) = answers {
            let seconds = seen.elapsed().as_secs_f64();
            details.last_drift_to_promotion_s = Some(seconds);
            metrics::histogram!(telemetry::LEARNER_DRIFT_TO_PROMOTION, "expert" => self.expert.to_string())
                .record(seconds);
        }
        drop(details);
        if !self.drifted_during_round {
            self.drift = None;
            self.observed.recent_into_reservoir();
            self.collecting = false;
            self.since_round = 0;
        }
        if let Ok((score, shape)) = self.spec.detectors() {
            self.score_drift = score;
            self.shape_drift = shape;
        }
        self.save();
        tracing::info!(expert = %self.expert, %version, "promoted version serves");
    }
}

/// The windows a learner of `expert` left in `log`: `(collecting, since_round)`, and
/// `observed` filled; a fresh start when there is none or it does not read back.
fn resume(log: &EdgeLog, expert: &str, observed: &mut ObservedWindows) -> (bool, usize) {
    match log.learner(expert) {
        Ok(Some(bytes)) => match observed.restore(&bytes) {
            Some((collecting, since_round)) => {
                tracing::info!(%expert, reservoir = observed.reservoir_len(), recent = observed.recent_len(), collecting, "learner resumed its windows from the edge log");
                (collecting, since_round)
            }
            None => {
                tracing::warn!(%expert, bytes = bytes.len(), "the learner's snapshot in the edge log does not read back; starting with no windows");
                (false, 0)
            }
        },
        Ok(None) => (false, 0),
        Err(e) => {
            tracing::warn!(%expert, error = %e, "cannot read the learner's snapshot; starting with no windows");
            (false, 0)
        }
    }
}

/// A learner started on a node: its handle (also in the node's directory) and the task
/// that reports an unexpected stop.
pub struct RunningLearner {
    pub handle: LearnerHandle,
    join: JoinHandle<()>,
}

impl RunningLearner {
    /// Asks the learner to stop, without waiting; the stop is not reported as a
    /// failure.
    pub fn stop(&self) {
        self.handle.shared.stopping.store(true, Ordering::Relaxed);
        self.handle
            .actor
            .stop(Some("node shutting down".to_string()));
    }

    /// Stops the learner and waits for it. A round in flight is abandoned, not awaited:
    /// nothing of it is stored or promoted afterwards (a swap already asked for
    /// completes).
    pub async fn shutdown(self) {
        self.stop();
        let _ = self.join.await;
    }
}

impl ContinualLearner {
    /// Starts a learner for `expert` (which must serve a stored model) on `node`,
    /// registers it in the node's directory, and watches it: an unexpected stop is
    /// logged, counted and shown as phase `stopped` (see the module doc).
    pub async fn start(
        node: &Node,
        expert: ExpertSpec,
        spec: LearningSpec,
        store: ModelStore,
        promoter: Arc<dyn Promoter>,
    ) -> Result<RunningLearner, LearnerError> {
        let name = expert.name.clone();
        let serving = expert
            .source
            .stored()
            .map(|s| s.manifest.id())
            .ok_or_else(|| LearnerError::NotStored {
                expert: name.clone(),
            })?;
        let shared = ContinualLearnerShared::new(&name, &serving);
        let args = ContinualLearnerArgs {
            expert,
            spec,
            store,
            promoter,
            annunciator: node.annunciator.clone(),
            shared: shared.clone(),
            log: node.storage.as_ref().map(|s| s.log.clone()),
        };
        let (actor, join) =
            Actor::spawn(None, ContinualLearner, args)
                .await
                .map_err(|e| match e {
                    ractor::SpawnErr::StartupFailed(inner) => {
                        match inner.downcast::<LearnerError>() {
                            Ok(error) => *error,
                            Err(inner) => LearnerError::NotStarted {
                                expert: name.clone(),
                                source: SpawnFault::Ractor(inner.to_string()),
                            },
                        }
                    }
                    other => LearnerError::NotStarted {
                        expert: name.clone(),
                        source: SpawnFault::Ractor(other.to_string()),
                    },
                })?;
        let handle = LearnerHandle {
            actor,
            shared: shared.clone(),
        };
        node.directory.learners.insert(name.clone(), handle.clone());
        let join = tokio::spawn(async move {
            let _ = join.await;
            shared.set_phase(Phase::Stopped);
            if !shared.stopping.load(Ordering::Relaxed) {
                metrics::counter!(telemetry::LEARNER_STOPPED, "expert" => name.clone())
                    .increment(1);
                tracing::error!(expert = %name, "continual learner stopped unexpectedly; the expert keeps serving its version, learning is off until the node restarts");
            }
        });
        Ok(RunningLearner { handle, join })
    }
}

impl LearnerHandle {
    /// Runs a round now and waits for its report (rounds take as long as fine-tuning
    /// takes, so there is no timeout). Cancel safety: dropping the future leaves the
    /// round running; its outcome still lands in the learner's counters.
    pub async fn learn(&self) -> Result<RoundReport, LearnerError> {
        match self
            .actor
            .call(|reply| ContinualLearnerMsg::Learn { reply }, None)
            .await
        {
            Ok(ractor::rpc::CallResult::Success(answer)) => answer,
            Ok(_) => Err(LearnerError::Unavailable {
                expert: self.shared.expert.to_string(),
                source: Unanswered::Stopped { callee: "learner" },
            }),
            Err(e) => Err(LearnerError::Unavailable {
                expert: self.shared.expert.to_string(),
                source: Unanswered::NotDelivered {
                    callee: "learner",
                    source: Undelivered::from(&e),
                },
            }),
        }
    }

    /// Attaches the plant's label to a recent window (see [`ContinualLearnerMsg::Label`]).
    pub fn label(&self, sensor: &str, window_sequence: u64, label: i64) {
        let _ = self.actor.cast(ContinualLearnerMsg::Label {
            sensor: sensor.to_string(),
            window_sequence,
            label,
        });
    }
}
