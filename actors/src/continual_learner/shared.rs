//! The learner's observable state and its vocabulary, shared by the actor and its
//! rounds: [`ContinualLearnerShared`] (counters, phase and details that status reads
//! without asking the actor), the [`Phase`] it is in, the [`DriftEvent`] it detected, what
//! started a round and what the round did ([`Trigger`], [`RoundReport`]), and why it
//! failed ([`LearnerError`]). Kept apart so that the actor and a round each depend on it
//! and not on each other.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use fogmesh_models::continual::GateReport;
use fogmesh_models::store::StoreError;
use fogmesh_models::ModelError;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinError;

use super::promoter::PromoteError;
use super::spec::InvalidLearning;
use crate::error::SpawnFault;
use crate::node_agent::Unanswered;

/// What started a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `min_new_windows` came after a drift.
    Drift,
    /// The `every_s` schedule.
    Schedule,
    /// [`ContinualLearnerMsg::Learn`](super::ContinualLearnerMsg::Learn).
    Command,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Drift => "drift",
            Trigger::Schedule => "schedule",
            Trigger::Command => "command",
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundReport {
    /// Counts the learner's rounds from 1.
    pub round: u64,
    pub trigger: Trigger,
    /// The version that served during the round (`name@version`).
    pub incumbent: String,
    /// The stored candidate, when the gate promoted it and it now serves; refused
    /// candidates are not stored.
    pub promoted: Option<String>,
    pub gate: GateReport,
    /// New windows trained on and held out; old windows replayed and held out.
    pub new_windows: usize,
    pub new_holdout: usize,
    pub replay_windows: usize,
    pub old_holdout: usize,
    /// Optimiser steps and seconds of fine-tuning.
    pub steps: usize,
    pub fine_tune_s: f64,
}

/// Why a learner did not start, or a round did not end in a promotion or a refusal.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LearnerError {
    #[error("expert `{expert}`: learning {source}")]
    Invalid {
        expert: String,
        #[source]
        source: InvalidLearning,
    },
    #[error("expert `{expert}` does not serve a stored model (`model = \"name@version\"`); only stored models can learn")]
    NotStored { expert: String },
    #[error("expert `{expert}`: a round needs at least {need_new} new windows (`learning.min_new_windows`) and {need_old} old ones; the learner holds {new} new and {old} old")]
    TooFewWindows {
        expert: String,
        new: usize,
        need_new: usize,
        old: usize,
        need_old: usize,
    },
    #[error("expert `{expert}`: round {round} is still running ({phase}); ask again when it ends")]
    Busy {
        expert: String,
        round: u64,
        phase: &'static str,
    },
    #[error("expert `{expert}`: fine-tuning {incumbent} failed: {source}")]
    FineTune {
        expert: String,
        incumbent: String,
        #[source]
        source: FineTuneFailure,
    },
    #[error("expert `{expert}`: storing candidate {candidate} failed: {source}")]
    Store {
        expert: String,
        candidate: String,
        #[source]
        source: StoreFailure,
    },
    #[error(
        "expert `{expert}`: promoting {candidate} failed; {incumbent} keeps serving: {source}"
    )]
    Promote {
        expert: String,
        candidate: String,
        incumbent: String,
        #[source]
        source: PromoteError,
    },
    #[error("expert `{expert}`: the learner did not start: {source}")]
    NotStarted {
        expert: String,
        #[source]
        source: SpawnFault,
    },
    #[error("expert `{expert}`: the learner gave no report: {source}")]
    Unavailable {
        expert: String,
        #[source]
        source: Unanswered,
    },
}

/// Why fine-tuning or validating a candidate failed ([`LearnerError::FineTune`]).
/// Causes sit behind `Arc` because a learner's error is cloned to every caller waiting
/// on the round.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FineTuneFailure {
    #[error("the training thread failed: {0}")]
    Thread(#[source] Arc<JoinError>),
    #[error(transparent)]
    Model(Arc<ModelError>),
}

/// Why storing a candidate failed ([`LearnerError::Store`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreFailure {
    #[error("the storing thread failed: {0}")]
    Thread(#[source] Arc<JoinError>),
    #[error(transparent)]
    Store(Arc<StoreError>),
}

/// Where a learner is in the life of a regime (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Watching,
    Collecting,
    FineTuning,
    Validating,
    Promoting,
    /// The learner is not running: stopped with the node, or failed (then logged).
    Stopped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Watching => "watching",
            Phase::Collecting => "collecting",
            Phase::FineTuning => "fine_tuning",
            Phase::Validating => "validating",
            Phase::Promoting => "promoting",
            Phase::Stopped => "stopped",
        }
    }

    fn from_u8(value: u8) -> Phase {
        [
            Phase::Watching,
            Phase::Collecting,
            Phase::FineTuning,
            Phase::Validating,
            Phase::Promoting,
            Phase::Stopped,
        ]
        .get(value as usize)
        .copied()
        .unwrap_or(Phase::Stopped)
    }
}

/// One detected drift, as the learner records it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftEvent {
    /// `page_hinkley` or `ks`.
    pub detector: &'static str,
    /// What drifted: `score` (ln of the expert's score over its threshold) or
    /// `window_mean`.
    pub signal: &'static str,
    /// The window that tipped the detector.
    pub sensor: String,
    pub window_sequence: u64,
    /// The window's end, plant time, µs since the Unix epoch.
    pub window_end_us: i64,
    /// When the learner saw it, wall time, µs since the Unix epoch.
    pub detected_us: i64,
    /// Windows the learner had seen by then.
    pub windows_seen: u64,
    /// The old and new level of the signal, as the detector estimated them.
    pub before: f64,
    pub after: f64,
    /// The test statistic and the limit it crossed.
    pub statistic: f64,
    pub limit: f64,
}

impl DriftEvent {
    /// One line for `status`: `score (page_hinkley) 0.412 -> 3.018, 10.8 > 10 at pump-1#412`.
    pub fn summary(&self) -> String {
        format!(
            "{} ({}) {:.4} -> {:.4}, statistic {:.4} > {:.4} at {}#{}",
            self.signal,
            self.detector,
            self.before,
            self.after,
            self.statistic,
            self.limit,
            self.sensor,
            self.window_sequence
        )
    }
}

/// A point-in-time view of a learner for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnerSnapshot {
    pub expert: String,
    pub phase: Phase,
    pub serving_version: String,
    /// The version a round of this learner is promoting right now, if any.
    pub promoting_version: Option<String>,
    /// Windows of its expert the learner took in.
    pub windows_seen: u64,
    /// Windows it missed because it fell behind (when the annunciator's buffer
    /// overran, every window missed counts, whichever experts scored it).
    pub windows_skipped: u64,
    pub reservoir: u64,
    pub new_windows: u64,
    pub drifts: u64,
    pub rounds: u64,
    pub promotions: u64,
    pub refusals: u64,
    pub failures: u64,
    pub labels_attached: u64,
    pub labels_missed: u64,
    pub last_drift: Option<DriftEvent>,
    /// The latest round that reached the gate (promoted or refused), with the gate's
    /// figures.
    pub last_round: Option<RoundReport>,
    /// Why the latest failed round failed.
    pub last_error: Option<String>,
    /// Seconds from the latest drift to the promotion that answered it.
    pub last_drift_to_promotion_s: Option<f64>,
}

/// What a learner records besides its counters.
#[derive(Debug, Default)]
pub(super) struct Details {
    pub(super) serving_version: String,
    pub(super) promoting_version: Option<String>,
    pub(super) last_drift: Option<DriftEvent>,
    pub(super) last_round: Option<RoundReport>,
    pub(super) last_error: Option<String>,
    pub(super) last_drift_to_promotion_s: Option<f64>,
}

/// A learner's observable state, read by `status` without a message.
#[derive(Debug)]
pub struct ContinualLearnerShared {
    pub expert: Arc<str>,
    phase: AtomicU8,
    pub windows_seen: AtomicU64,
    pub windows_skipped: AtomicU64,
    pub reservoir: AtomicU64,
    pub new_windows: AtomicU64,
    pub drifts: AtomicU64,
    pub rounds: AtomicU64,
    pub promotions: AtomicU64,
    pub refusals: AtomicU64,
    pub failures: AtomicU64,
    pub labels_attached: AtomicU64,
    pub labels_missed: AtomicU64,
    /// Windows forwarded to the mailbox and not handled yet.
    pub(super) pending: AtomicU64,
    /// Set before an orderly stop, so the stop is not reported as a failure.
    pub(super) stopping: AtomicBool,
    details: Mutex<Details>,
    /// Bumped whenever the learner's state changes (a window taken, a drift, a phase,
    /// a round's outcome).
    changes: watch::Sender<u64>,
}

impl ContinualLearnerShared {
    pub fn new(expert: &str, serving_version: &str) -> Arc<Self> {
        Arc::new(ContinualLearnerShared {
            expert: expert.into(),
            phase: AtomicU8::new(Phase::Watching as u8),
            windows_seen: AtomicU64::new(0),
            windows_skipped: AtomicU64::new(0),
            reservoir: AtomicU64::new(0),
            new_windows: AtomicU64::new(0),
            drifts: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            promotions: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            labels_attached: AtomicU64::new(0),
            labels_missed: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            details: Mutex::new(Details {
                serving_version: serving_version.to_string(),
                ..Details::default()
            }),
            changes: watch::channel(0).0,
        })
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.changed();
    }

    /// Wakes [`ContinualLearnerShared::subscribe`]rs.
    pub(super) fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees a new value whenever the learner's state changes: wait on
    /// it (`wait_for(|_| condition on snapshot())`) instead of polling.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// One forwarded window left the mailbox. Saturating: a window cast by someone
    /// other than the forwarder was never counted.
    pub(super) fn window_handled(&self) {
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    pub(super) fn details(&self) -> std::sync::MutexGuard<'_, Details> {
        // A poisoned lock only means a panic elsewhere mid-update of plain data.
        self.details
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the version a round is promoting (`None` once the promotion ended,
    /// whichever way).
    pub(super) fn set_promoting(&self, version: Option<&str>) {
        self.details().promoting_version = version.map(str::to_string);
        self.changed();
    }

    /// Whether `version` is this learner's: the one its expert serves as far as the
    /// learner knows, or the one it is promoting. A spec naming any other version was
    /// changed by someone else (a rollout or rollback), and the learner must start
    /// again from it.
    pub fn knows_version(&self, version: &str) -> bool {
        let details = self.details();
        details.serving_version == version || details.promoting_version.as_deref() == Some(version)
    }

    pub fn snapshot(&self) -> LearnerSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let details = self.details();
        LearnerSnapshot {
            expert: self.expert.to_string(),
            phase: self.phase(),
            serving_version: details.serving_version.clone(),
            promoting_version: details.promoting_version.clone(),
            windows_seen: load(&self.windows_seen),
            windows_skipped: load(&self.windows_skipped),
            reservoir: load(&self.reservoir),
            new_windows: load(&self.new_windows),
            drifts: load(&self.drifts),
            rounds: load(&self.rounds),
            promotions: load(&self.promotions),
            refusals: load(&self.refusals),
            failures: load(&self.failures),
            labels_attached: load(&self.labels_attached),
            labels_missed: load(&self.labels_missed),
            last_drift: details.last_drift.clone(),
            last_round: details.last_round.clone(),
            last_error: details.last_error.clone(),
            last_drift_to_promotion_s: details.last_drift_to_promotion_s,
        }
    }
}
