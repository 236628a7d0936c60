//! `ContinualLearner`: keeps one expert's stored model fitted to the plant as the plant
//! drifts, and changes the version it serves only when a candidate proves better.
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
//! [`ContinualLearnerMsg::Tick`] (the `every_s` schedule). **Supervised by** whoever
//! started it through [`ContinualLearner::start`] (on a node: the node server): it is
//! not restarted, because its buffers and detectors live only in memory and a fresh
//! learner would have to watch the regime from scratch anyway; an unexpected stop is
//! logged, counted in `fogmesh_learner_stopped_total` and shows as phase `stopped`,
//! and the expert keeps serving the version it had. **On failure**: a fine-tune that
//! fails, a candidate the [`ValidationGate`] refuses, a store or promotion error, each
//! leaves the serving version untouched and is counted (`failures`, `refusals`) and
//! reported (`last_error`, `last_round`, the `Learn` answer). Nothing from outside makes
//! it panic: labels for windows it no longer holds, windows that are not its expert's,
//! and commands at the wrong time are answered or counted.
//!
//! The life of a regime:
//! 1. **watching**: every window the expert gave an opinion on goes into the recent
//!    buffer (the newest `min_new_windows`); windows leaving it are offered to the
//!    reservoir. The detectors see the opinions of the serving version only.
//! 2. **drift**: either detector fires. The event is recorded (what drifted, when, old
//!    and new level, the statistic against its limit), the recent buffer is offered to
//!    the reservoir, which is then frozen as the old regime, and both detectors restart
//!    on the new regime (so one change raises one event, not one per detector).
//! 3. **collecting**: windows go to the recent buffer only (the newest
//!    `max_new_windows` kept). Once `min_new_windows` have come, a round starts.
//! 4. **a round** (also on the `every_s` schedule when `min_new_windows` came since the
//!    last one, or on command): a share (`holdout`) of the new windows (the newest:
//!    consecutive windows overlap) and of the reservoir (at random) is held out; a
//!    shadow copy of the serving version is fine-tuned on the rest with replay and EWC
//!    ([`fine_tune`]) on a blocking thread with one libtorch thread
//!    (**fine_tuning**); incumbent and candidate are evaluated on both held-out sets and
//!    the gate judges (**validating**). Refused: counted, nothing stored. Promoted: the
//!    candidate is stored as the next version (parent: the incumbent; metrics: its
//!    recalibrated threshold and the gate figures; training: the round), then handed to
//!    the [`Promoter`] (**promoting**). Once it serves, the recent windows join the
//!    reservoir, the detectors restart on the new version's scores, and the learner
//!    watches again. A refused or failed round keeps collecting; the next drift-driven
//!    round waits for another `min_new_windows`. A drift during a round leaves the
//!    round to finish on its copy of the windows and starts collecting the newer
//!    regime, which a promotion then does not end.
//!
//! The mailbox never waits for a round: the round runs as its own task and reports
//! back with a message, so windows keep arriving (and are counted) while it trains.
//! The forwarding task never slows the routers: it reads the annunciator's broadcast,
//! and when it lags (or the learner has more than [`MAX_PENDING_WINDOWS`] windows
//! queued) it skips windows and counts them in `windows_skipped`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fogmesh_models::continual::{
    evaluate, fine_tune, FineTuneOptions, GateReport, ReplayItem, Reservoir, ValidationGate,
};
use fogmesh_models::drift::{Drift, KsDrift, PageHinkley};
use fogmesh_models::store::{Manifest, ModelStore};
use fogmesh_models::SplitMix64;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::annunciator::{Annunciator, ScoredWindow};
use crate::directory::LearnerHandle;
use crate::expert::{ExpertSpec, StoredModel};
use crate::node_agent::Node;
use crate::telemetry;

/// A boxed future that can cross threads (the shape of `futures::future::BoxFuture`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Windows the forwarding task may have queued in the learner's mailbox; beyond it,
/// windows are skipped (and counted) so a busy learner cannot grow its mailbox without
/// bound.
pub const MAX_PENDING_WINDOWS: u64 = 4096;

/// The fewest old-regime windows a round needs: one to hold out, one to replay.
pub const MIN_OLD_WINDOWS: usize = 2;

/// The drift detectors' settings (see `fogmesh_models::drift`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftSpec {
    /// Page–Hinkley on ln(score / threshold) (0 is the alarm limit, 1 a score e times
    /// the limit): shifts of the mean smaller than this are tolerated.
    pub score_delta: f64,
    /// Page–Hinkley: the cumulative deviation that fires.
    pub score_lambda: f64,
    /// Windows Page–Hinkley sees before it tests, so its mean settles first.
    pub min_windows: u64,
    /// Kolmogorov–Smirnov on each window's mean value: windows in the reference and in
    /// the recent sample (at least 20).
    pub ks_size: usize,
    /// Kolmogorov–Smirnov: fire when the p-value is below this.
    pub ks_alpha: f64,
}

impl Default for DriftSpec {
    /// Scores are measured against the alarm limit on a log scale, so these suit any
    /// expert, and a model far off its regime (scores many limits high, and as many
    /// times noisier) does not look like it keeps drifting: a level change by a factor
    /// under 1.2 is tolerated, one by a factor e fires within about 25 windows, one by
    /// 20 within 7. KS at 0.001 because consecutive windows overlap and so are
    /// correlated, which makes the test more eager than its nominal level.
    fn default() -> Self {
        DriftSpec {
            score_delta: 0.2,
            score_lambda: 20.0,
            min_windows: 30,
            ks_size: 200,
            ks_alpha: 0.001,
        }
    }
}

/// `[experts.learning]`: how an expert's learner watches, learns and decides.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearningSpec {
    /// Old-regime windows kept for replay and validation.
    pub reservoir: usize,
    /// Share of the old and of the new windows held out to validate a candidate.
    pub holdout: f64,
    /// New windows after a drift (or since the last scheduled round) that start a
    /// round; also the fewest new windows any round needs.
    pub min_new_windows: usize,
    /// Most new-regime windows held while collecting (the newest are kept).
    pub max_new_windows: usize,
    /// Seconds between scheduled rounds; none: rounds follow drift and commands only.
    pub every_s: Option<f64>,
    pub drift: DriftSpec,
    pub fine_tune: FineTuneOptions,
    pub gate: ValidationGate,
    /// Seeds the reservoir and the holdout split.
    pub seed: u64,
}

impl Default for LearningSpec {
    fn default() -> Self {
        LearningSpec {
            reservoir: 512,
            holdout: 0.25,
            min_new_windows: 256,
            max_new_windows: 2048,
            every_s: None,
            drift: DriftSpec::default(),
            fine_tune: FineTuneOptions::default(),
            gate: ValidationGate::default(),
            seed: 0,
        }
    }
}

impl PartialEq for LearningSpec {
    /// Field by field; the models crate's option types have no `PartialEq`, so they
    /// compare by their serialised form, which covers every field they have.
    fn eq(&self, other: &Self) -> bool {
        let same = |a: serde_json::Result<serde_json::Value>, b| match (a, b) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        self.reservoir == other.reservoir
            && self.holdout == other.holdout
            && self.min_new_windows == other.min_new_windows
            && self.max_new_windows == other.max_new_windows
            && self.every_s == other.every_s
            && self.drift == other.drift
            && self.seed == other.seed
            && same(
                serde_json::to_value(&self.fine_tune),
                serde_json::to_value(&other.fine_tune),
            )
            && same(
                serde_json::to_value(&self.gate),
                serde_json::to_value(&other.gate),
            )
    }
}

/// A learning setting out of its range: the field (its path inside `learning`), the
/// value and the limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{field}` = {value}: {reason}")]
pub struct InvalidLearning {
    pub field: String,
    pub value: String,
    pub reason: String,
}

/// Largest accepted `reservoir` and `max_new_windows`: both are held in memory.
pub const MAX_HELD_WINDOWS: usize = 1 << 20;

impl LearningSpec {
    /// Checks every field, naming the first that is out of range.
    pub fn validate(&self) -> Result<(), InvalidLearning> {
        let invalid = |field: &str, value: String, reason: String| InvalidLearning {
            field: field.to_string(),
            value,
            reason,
        };
        if !(1..=MAX_HELD_WINDOWS).contains(&self.reservoir) {
            return Err(invalid(
                "reservoir",
                self.reservoir.to_string(),
                format!("must be between 1 and {MAX_HELD_WINDOWS}"),
            ));
        }
        if !(self.holdout > 0.0 && self.holdout < 1.0) {
            return Err(invalid(
                "holdout",
                self.holdout.to_string(),
                "must lie in (0, 1)".into(),
            ));
        }
        if self.min_new_windows < 2 {
            return Err(invalid(
                "min_new_windows",
                self.min_new_windows.to_string(),
                "must be at least 2 (one to train on, one to hold out)".into(),
            ));
        }
        if !(self.min_new_windows..=MAX_HELD_WINDOWS).contains(&self.max_new_windows) {
            return Err(invalid(
                "max_new_windows",
                self.max_new_windows.to_string(),
                format!(
                    "must be between min_new_windows ({}) and {MAX_HELD_WINDOWS}",
                    self.min_new_windows
                ),
            ));
        }
        if let Some(every) = self.every_s {
            if !(every.is_finite() && every >= 1.0) {
                return Err(invalid(
                    "every_s",
                    every.to_string(),
                    "must be at least 1 second".into(),
                ));
            }
        }
        self.detectors()?;
        self.fine_tune
            .validate()
            .map_err(|e| nested_error("fine_tune", &e))?;
        self.gate.validate().map_err(|e| nested_error("gate", &e))?;
        Ok(())
    }

    /// Fresh detectors from the settings; errors name the setting in `drift`.
    fn detectors(&self) -> Result<(PageHinkley, KsDrift), InvalidLearning> {
        // The detectors name their own parameters; the config names them per signal.
        let renamed = |e: fogmesh_models::ModelError, names: [(&str, &str); 2]| {
            let mut error = nested_error("drift", &e);
            for (theirs, ours) in names {
                if error.field == format!("drift.{theirs}") {
                    error.field = format!("drift.{ours}");
                }
            }
            error
        };
        let d = &self.drift;
        let score = PageHinkley::new(d.score_delta, d.score_lambda, d.min_windows)
            .map_err(|e| renamed(e, [("delta", "score_delta"), ("lambda", "score_lambda")]))?;
        let shape = KsDrift::new(d.ks_size, d.ks_alpha)
            .map_err(|e| renamed(e, [("size", "ks_size"), ("alpha", "ks_alpha")]))?;
        Ok((score, shape))
    }
}

/// (inner field, value, reason) of a models-crate error, for field paths.
fn model_error_parts(e: &fogmesh_models::ModelError) -> (Option<&'static str>, String, String) {
    match e {
        fogmesh_models::ModelError::InvalidOption {
            field,
            value,
            reason,
        } => (Some(field), value.clone(), reason.clone()),
        other => (None, "-".into(), other.to_string()),
    }
}

/// A models-crate option error under `prefix` (`fine_tune.epochs`).
fn nested_error(prefix: &str, e: &fogmesh_models::ModelError) -> InvalidLearning {
    let (inner, value, reason) = model_error_parts(e);
    InvalidLearning {
        field: match inner {
            Some(inner) => format!("{prefix}.{inner}"),
            None => prefix.to_string(),
        },
        value,
        reason,
    }
}

/// Why a learner did not start, or a round did not end in a promotion or a refusal.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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
    #[error("expert `{expert}`: fine-tuning {incumbent} failed: {reason}")]
    FineTune {
        expert: String,
        incumbent: String,
        reason: String,
    },
    #[error("expert `{expert}`: storing candidate {candidate} failed: {reason}")]
    Store {
        expert: String,
        candidate: String,
        reason: String,
    },
    #[error(
        "expert `{expert}`: promoting {candidate} failed; {incumbent} keeps serving: {reason}"
    )]
    Promote {
        expert: String,
        candidate: String,
        incumbent: String,
        reason: String,
    },
    #[error("expert `{expert}`: the learner {reason}")]
    Unavailable { expert: String, reason: String },
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

/// What started a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `min_new_windows` came after a drift.
    Drift,
    /// The `every_s` schedule.
    Schedule,
    /// [`ContinualLearnerMsg::Learn`].
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

/// A point-in-time view of a learner for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnerSnapshot {
    pub expert: String,
    pub phase: Phase,
    pub serving_version: String,
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
struct Details {
    serving_version: String,
    last_drift: Option<DriftEvent>,
    last_round: Option<RoundReport>,
    last_error: Option<String>,
    last_drift_to_promotion_s: Option<f64>,
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
    pending: AtomicU64,
    /// Set before an orderly stop, so the stop is not reported as a failure.
    stopping: AtomicBool,
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

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.changed();
    }

    /// Wakes [`ContinualLearnerShared::subscribe`]rs.
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees a new value whenever the learner's state changes: wait on
    /// it (`wait_for(|_| condition on snapshot())`) instead of polling.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// One forwarded window left the mailbox. Saturating: a window cast by someone
    /// other than the forwarder was never counted.
    fn window_handled(&self) {
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    fn details(&self) -> std::sync::MutexGuard<'_, Details> {
        // A poisoned lock only means a panic elsewhere mid-update of plain data.
        self.details
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn snapshot(&self) -> LearnerSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let details = self.details();
        LearnerSnapshot {
            expert: self.expert.to_string(),
            phase: self.phase(),
            serving_version: details.serving_version.clone(),
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

/// Makes the replicas of an expert serve a new stored version. The node's own
/// [`LocalPromoter`] swaps the expert on this node; a mesh can roll a version out to
/// every replica behind the same trait.
pub trait Promoter: Send + Sync + 'static {
    /// Makes every replica of `expert` serve `version` (a stored manifest id
    /// "name@version"); answers when done.
    fn promote(&self, expert: &str, version: &Manifest) -> BoxFuture<'static, Result<(), String>>;
}

/// Promotes on this node only: reads the version's weights from the node's store
/// (checked against the manifest's hash), builds the expert's spec from the one serving
/// with `stored` replaced, and hot-swaps it ([`Node::swap_expert`]).
#[derive(Clone)]
pub struct LocalPromoter {
    node: Node,
    store: ModelStore,
    /// The spec each expert serves, as this promoter last set it.
    serving: Arc<Mutex<HashMap<String, ExpertSpec>>>,
}

impl LocalPromoter {
    /// `experts`: the specs the node started these experts from.
    pub fn new(
        node: Node,
        store: ModelStore,
        experts: impl IntoIterator<Item = ExpertSpec>,
    ) -> Self {
        let serving = experts.into_iter().map(|e| (e.name.clone(), e)).collect();
        LocalPromoter {
            node,
            store,
            serving: Arc::new(Mutex::new(serving)),
        }
    }
}

impl Promoter for LocalPromoter {
    fn promote(&self, expert: &str, version: &Manifest) -> BoxFuture<'static, Result<(), String>> {
        let promoter = self.clone();
        let expert = expert.to_string();
        let manifest = version.clone();
        Box::pin(async move {
            let serving = promoter
                .serving
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&expert)
                .cloned()
                .ok_or_else(|| format!("expert `{expert}` is not served on this node"))?;
            let assets = serving
                .stored
                .as_ref()
                .map(|s| s.assets.clone())
                .ok_or_else(|| format!("expert `{expert}` does not serve a stored model"))?;
            let store = promoter.store.clone();
            let read = manifest.clone();
            let weights = tokio::task::spawn_blocking(move || store.weights(&read))
                .await
                .map_err(|e| format!("reading the weights failed: {e}"))?
                .map_err(|e| e.to_string())?;
            let spec = ExpertSpec {
                model_version: manifest.id(),
                // A calibrated candidate brings its own limit; otherwise keep the one
                // the expert had.
                threshold: if manifest.metrics.contains_key("threshold") {
                    None
                } else {
                    serving.threshold
                },
                stored: Some(StoredModel {
                    manifest,
                    weights: weights.into(),
                    assets,
                }),
                ..serving
            };
            promoter
                .node
                .swap_expert(spec.clone())
                .await
                .map_err(|e| e.to_string())?;
            promoter
                .serving
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(expert, spec);
            Ok(())
        })
    }
}

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
    /// The `every_s` schedule.
    Tick,
    /// A round ended (sent by the round's own task).
    RoundDone(Box<RoundDone>),
}

// Local only: it carries reply ports and shared buffers that cannot cross a node.
impl ractor::Message for ContinualLearnerMsg {}

/// How a round ended, on its way back to the learner.
pub struct RoundDone {
    outcome: Result<Completed, LearnerError>,
    reply: Option<RpcReplyPort<Result<RoundReport, LearnerError>>>,
}

struct Completed {
    report: RoundReport,
    /// The promoted version, now serving.
    promoted: Option<Arc<Serving>>,
}

/// The version the expert serves, as the learner fine-tunes it.
struct Serving {
    /// `name@version`, as verdicts name it.
    id: String,
    manifest: Manifest,
    weights: Arc<[u8]>,
}

impl Serving {
    fn new(manifest: Manifest, weights: Arc<[u8]>) -> Arc<Serving> {
        Arc::new(Serving {
            id: manifest.id(),
            manifest,
            weights,
        })
    }
}

pub struct ContinualLearner;

pub struct ContinualLearnerArgs {
    /// The expert as it serves now; it must serve a stored model.
    pub expert: ExpertSpec,
    pub spec: LearningSpec,
    /// Where candidates are stored: the store the serving version came from.
    pub store: ModelStore,
    pub promoter: Arc<dyn Promoter>,
    pub annunciator: Annunciator,
    pub shared: Arc<ContinualLearnerShared>,
}

/// A window the learner holds, keyed for labels.
struct Held {
    sensor: Arc<str>,
    sequence: u64,
    values: Arc<[f32]>,
    label: Option<i64>,
}

impl Held {
    fn item(&self) -> ReplayItem {
        ReplayItem {
            window: self.values.to_vec(),
            label: self.label,
        }
    }
}

pub struct ContinualLearnerState {
    expert: Arc<str>,
    spec: LearningSpec,
    store: ModelStore,
    promoter: Arc<dyn Promoter>,
    shared: Arc<ContinualLearnerShared>,
    serving: Arc<Serving>,
    reservoir: Reservoir,
    recent: VecDeque<Held>,
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
        let stored = args.expert.stored.ok_or_else(|| LearnerError::NotStored {
            expert: expert.to_string(),
        })?;
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
        Ok(ContinualLearnerState {
            expert,
            spec: args.spec,
            store: args.store,
            promoter: args.promoter,
            shared: args.shared,
            serving: Serving::new(stored.manifest, stored.weights),
            reservoir,
            recent: VecDeque::new(),
            collecting: false,
            since_round: 0,
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
        })
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
        self.recent.push_back(Held {
            sensor: window.sensor_id.clone(),
            sequence: window.window_sequence,
            values: window.values.clone(),
            label: None,
        });
        self.since_round += 1;
        let capacity = if self.collecting {
            self.spec.max_new_windows
        } else {
            self.spec.min_new_windows
        };
        while self.recent.len() > capacity {
            if let Some(old) = self.recent.pop_front() {
                // While collecting the reservoir is frozen: the oldest new windows are
                // dropped, not mistaken for the old regime.
                if !self.collecting {
                    self.reservoir.offer(old.item());
                }
            }
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
            for held in self.recent.drain(..) {
                self.reservoir.offer(held.item());
            }
        } else {
            // A second change while collecting: what was collected is neither regime.
            self.recent.clear();
        }
        self.collecting = true;
        self.since_round = 0;
        if self.running.is_none() {
            self.shared.set_phase(Phase::Collecting);
        } else {
            self.shared.changed();
        }
    }

    fn label(&mut self, sensor: &str, sequence: u64, label: i64) {
        match self
            .recent
            .iter_mut()
            .rev()
            .find(|h| h.sequence == sequence && *h.sensor == *sensor)
        {
            Some(held) => {
                held.label = Some(label);
                self.shared.labels_attached.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.shared.labels_missed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(expert = %self.expert, %sensor, sequence, "label for a window no longer held");
            }
        }
    }

    fn publish_sizes(&self) {
        let reservoir = self.reservoir.len() as u64;
        let recent = self.recent.len() as u64;
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
        if self.recent.len() < self.spec.min_new_windows || self.reservoir.len() < MIN_OLD_WINDOWS {
            let error = LearnerError::TooFewWindows {
                expert: self.expert.to_string(),
                new: self.recent.len(),
                need_new: self.spec.min_new_windows,
                old: self.reservoir.len(),
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
            new: self.recent.iter().map(Held::item).collect(),
            old: self.reservoir.items().to_vec(),
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
            for held in self.recent.drain(..) {
                self.reservoir.offer(held.item());
            }
            self.collecting = false;
            self.since_round = 0;
        }
        if let Ok((score, shape)) = self.spec.detectors() {
            self.score_drift = score;
            self.shape_drift = shape;
        }
        tracing::info!(expert = %self.expert, %version, "promoted version serves");
    }
}

/// Everything a round needs, owned, so it runs apart from the learner.
struct RoundInput {
    round: u64,
    trigger: Trigger,
    expert: Arc<str>,
    serving: Arc<Serving>,
    new: Vec<ReplayItem>,
    old: Vec<ReplayItem>,
    spec: LearningSpec,
    store: ModelStore,
    promoter: Arc<dyn Promoter>,
    shared: Arc<ContinualLearnerShared>,
    drift: Option<DriftEvent>,
}

/// Splits `items` into (train, holdout): `share` of them (at least one, leaving at
/// least one) held out from the end. New windows come in arrival order and are split
/// as they are: consecutive windows overlap, so a random pick would validate on
/// near-copies of training windows. The reservoir, already a random sample, is shuffled
/// first (`shuffle_seed`).
fn split(
    mut items: Vec<ReplayItem>,
    share: f64,
    shuffle_seed: Option<u64>,
) -> (Vec<ReplayItem>, Vec<ReplayItem>) {
    if let Some(seed) = shuffle_seed {
        let mut rng = SplitMix64::new(seed);
        for i in (1..items.len()).rev() {
            // Lemire's multiply-shift: uniform in 0..=i.
            let j = ((u128::from(rng.next_u64()) * (i as u128 + 1)) >> 64) as usize;
            items.swap(i, j);
        }
    }
    let held = ((items.len() as f64 * share).round() as usize).clamp(1, items.len().max(2) - 1);
    let holdout = items.split_off(items.len() - held);
    (items, holdout)
}

/// The next version name: the incumbent's trailing number plus one (`v1` → `v2`,
/// `3` → `4`, `stable` → `stable-2`), skipping versions already stored.
fn next_version(store: &ModelStore, incumbent: &Manifest) -> String {
    let version = &incumbent.version;
    let digits = version.len()
        - version
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .count();
    let (prefix, mut number) = match version[digits..].parse::<u64>() {
        Ok(n) => (version[..digits].to_string(), n + 1),
        Err(_) => (format!("{version}-"), 2),
    };
    loop {
        let candidate = format!("{prefix}{number}");
        if store
            .get(&format!("{}@{candidate}", incumbent.name))
            .is_err()
        {
            return candidate;
        }
        number += 1;
    }
}

/// What the blocking part of a round hands back.
struct Tuned {
    weights: Vec<u8>,
    sha256: String,
    metrics: BTreeMap<String, f64>,
    steps: usize,
    elapsed_s: f64,
    gate: GateReport,
}

async fn run_round(input: RoundInput) -> Result<Completed, LearnerError> {
    let incumbent = input.serving.id.clone();
    let seed = input.spec.seed ^ input.round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (new_train, new_holdout) = split(input.new, input.spec.holdout, None);
    let (replay, old_holdout) = split(input.old, input.spec.holdout, Some(seed));
    let labelled = new_train.iter().filter(|i| i.label.is_some()).count();
    let sizes = (
        new_train.len(),
        new_holdout.len(),
        replay.len(),
        old_holdout.len(),
    );
    let failed = |reason: String| LearnerError::FineTune {
        expert: input.expert.to_string(),
        incumbent: incumbent.clone(),
        reason,
    };
    let serving = input.serving.clone();
    let options = input.spec.fine_tune.clone();
    let gate = input.spec.gate.clone();
    let shared = input.shared.clone();
    let tuned = tokio::task::spawn_blocking(move || -> Result<Tuned, String> {
        // libtorch's intra-op thread count is per calling thread: one here, as on the
        // expert threads, so training does not take the cores serving needs.
        tch::set_num_threads(1);
        let device = fogmesh_models::default_device();
        let manifest = &serving.manifest;
        let tuned = fine_tune(
            manifest,
            &serving.weights,
            &new_train,
            &replay,
            &options,
            device,
        )
        .map_err(|e| e.to_string())?;
        shared.set_phase(Phase::Validating);
        // Loading checks the weights against the manifest's hash: the candidate's
        // manifest differs from the incumbent's in exactly that.
        let candidate = Manifest {
            weights_sha256: tuned.sha256.clone(),
            weights_bytes: tuned.weights.len() as u64,
            ..manifest.clone()
        };
        let loss = |manifest: &Manifest, weights: &[u8], items: &[ReplayItem]| {
            evaluate(manifest, weights, items, device).map_err(|e| e.to_string())
        };
        let old_before = loss(manifest, &serving.weights, &old_holdout)?;
        let old_after = loss(&candidate, &tuned.weights, &old_holdout)?;
        let new_before = loss(manifest, &serving.weights, &new_holdout)?;
        let new_after = loss(&candidate, &tuned.weights, &new_holdout)?;
        let report = gate.judge(old_before, old_after, new_before, new_after);
        Ok(Tuned {
            weights: tuned.weights,
            sha256: tuned.sha256,
            metrics: tuned.metrics,
            steps: tuned.steps,
            elapsed_s: tuned.elapsed_s,
            gate: report,
        })
    })
    .await
    .map_err(|e| failed(format!("the training thread failed: {e}")))?
    .map_err(failed)?;

    let mut report = RoundReport {
        round: input.round,
        trigger: input.trigger,
        incumbent: incumbent.clone(),
        promoted: None,
        gate: tuned.gate.clone(),
        new_windows: sizes.0,
        new_holdout: sizes.1,
        replay_windows: sizes.2,
        old_holdout: sizes.3,
        steps: tuned.steps,
        fine_tune_s: tuned.elapsed_s,
    };
    if !tuned.gate.promote {
        return Ok(Completed {
            report,
            promoted: None,
        });
    }

    input.shared.set_phase(Phase::Promoting);
    let parent = &input.serving.manifest;
    let mut metrics = tuned.metrics;
    for (name, value) in [
        ("gate_old_before", tuned.gate.old_before),
        ("gate_old_after", tuned.gate.old_after),
        ("gate_new_before", tuned.gate.new_before),
        ("gate_new_after", tuned.gate.new_after),
    ] {
        metrics.insert(name.to_string(), value);
    }
    let training = serde_json::json!({
        "continual": {
            "expert": &*input.expert,
            "round": input.round,
            "trigger": input.trigger,
            "incumbent": &incumbent,
            "new_windows": { "train": sizes.0, "holdout": sizes.1, "labelled": labelled },
            "old_windows": { "replay": sizes.2, "holdout": sizes.3 },
            "drift": input.drift,
            "options": input.spec.fine_tune,
            "gate": input.spec.gate,
            "gate_report": tuned.gate,
            "steps": tuned.steps,
            "elapsed_s": tuned.elapsed_s,
        }
    });
    let candidate = Manifest {
        name: parent.name.clone(),
        version: String::new(),
        kind: parent.kind,
        architecture: parent.architecture.clone(),
        hyper: parent.hyper.clone(),
        input: parent.input.clone(),
        training,
        metrics,
        parents: vec![incumbent.clone()],
        weights_sha256: tuned.sha256,
        weights_bytes: tuned.weights.len() as u64,
        created_us: 0,
    };
    let store = input.store.clone();
    let weights: Arc<[u8]> = tuned.weights.into();
    let bytes = weights.clone();
    let serving = input.serving.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let mut candidate = candidate;
        candidate.version = next_version(&store, &serving.manifest);
        let id = candidate.id();
        store
            .import(candidate, &bytes)
            .map_err(|e| (id, e.to_string()))
    })
    .await
    .map_err(|e| LearnerError::Store {
        expert: input.expert.to_string(),
        candidate: format!("{}@?", parent.name),
        reason: format!("the storing thread failed: {e}"),
    })?
    .map_err(|(candidate, reason)| LearnerError::Store {
        expert: input.expert.to_string(),
        candidate,
        reason,
    })?;
    let candidate = stored.id();
    tracing::info!(expert = %input.expert, %candidate, parent = %incumbent, "candidate stored; promoting it");
    input
        .promoter
        .promote(&input.expert, &stored)
        .await
        .map_err(|reason| LearnerError::Promote {
            expert: input.expert.to_string(),
            candidate: candidate.clone(),
            incumbent: incumbent.clone(),
            reason,
        })?;
    report.promoted = Some(candidate);
    Ok(Completed {
        report,
        promoted: Some(Serving::new(stored, weights)),
    })
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
            .stored
            .as_ref()
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
        };
        let (actor, join) =
            Actor::spawn(None, ContinualLearner, args)
                .await
                .map_err(|e| match e {
                    ractor::SpawnErr::StartupFailed(inner) => {
                        match inner.downcast::<LearnerError>() {
                            Ok(error) => *error,
                            Err(inner) => LearnerError::Unavailable {
                                expert: name.clone(),
                                reason: format!("did not start: {inner}"),
                            },
                        }
                    }
                    other => LearnerError::Unavailable {
                        expert: name.clone(),
                        reason: format!("did not start: {other}"),
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
                reason: "stopped before answering".into(),
            }),
            Err(e) => Err(LearnerError::Unavailable {
                expert: self.shared.expert.to_string(),
                reason: format!("is not running: {e}"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use fogmesh_models::store::{InputSpec, ModelKind};

    fn item(i: usize) -> ReplayItem {
        ReplayItem {
            window: vec![i as f32],
            label: None,
        }
    }

    #[test]
    fn new_windows_are_held_out_from_the_end_and_every_split_keeps_both_sides() {
        let (train, holdout) = split((0..8).map(item).collect(), 0.25, None);
        assert_eq!(train, (0..6).map(item).collect::<Vec<_>>());
        assert_eq!(holdout, (6..8).map(item).collect::<Vec<_>>());
        for n in 2..10 {
            for share in [0.01, 0.5, 0.99] {
                let (train, holdout) = split((0..n).map(item).collect(), share, Some(3));
                assert!(!train.is_empty() && !holdout.is_empty(), "{n} at {share}");
                assert_eq!(train.len() + holdout.len(), n);
            }
        }
        let (mut train, holdout) = split((0..50).map(item).collect(), 0.2, Some(3));
        train.extend(holdout);
        assert_ne!(train, (0..50).map(item).collect::<Vec<_>>(), "shuffled");
    }

    #[test]
    fn the_next_version_counts_on_and_skips_stored_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path());
        let manifest = |version: &str| Manifest {
            name: "pump-ae".into(),
            version: version.into(),
            kind: ModelKind::TimeSeries,
            architecture: "conv_autoencoder".into(),
            hyper: serde_json::Value::Null,
            input: InputSpec {
                shape: vec![-1, 1, 1],
                description: String::new(),
            },
            training: serde_json::Value::Null,
            metrics: BTreeMap::new(),
            parents: Vec::new(),
            weights_sha256: String::new(),
            weights_bytes: 0,
            created_us: 0,
        };
        assert_eq!(next_version(&store, &manifest("v1")), "v2");
        assert_eq!(next_version(&store, &manifest("9")), "10");
        assert_eq!(next_version(&store, &manifest("stable")), "stable-2");
        store.import(manifest("v2"), b"other weights").unwrap();
        assert_eq!(next_version(&store, &manifest("v1")), "v3");
    }

    #[test]
    fn bad_settings_name_their_field_under_learning() {
        let field = |spec: LearningSpec| spec.validate().unwrap_err().field;
        let spec = LearningSpec::default;
        assert_eq!(
            field(LearningSpec {
                reservoir: 0,
                ..spec()
            }),
            "reservoir"
        );
        assert_eq!(
            field(LearningSpec {
                min_new_windows: 1,
                ..spec()
            }),
            "min_new_windows"
        );
        let mut drift = spec();
        drift.drift.score_lambda = 0.0;
        assert_eq!(field(drift), "drift.score_lambda");
        let mut drift = spec();
        drift.drift.ks_alpha = 1.5;
        assert_eq!(field(drift), "drift.ks_alpha");
        let mut tune = spec();
        tune.fine_tune.batch_size = 0;
        assert_eq!(field(tune), "fine_tune.batch_size");
        let mut gate = spec();
        gate.gate.max_forgetting = -0.5;
        assert_eq!(field(gate), "gate.max_forgetting");
        assert!(spec().validate().is_ok());
    }
}
