//! The annunciator: where scored windows and alerts leave the actors.
//!
//! In a control room the annunciator is the panel that lights up when a limit is
//! crossed. Here it is a broadcast channel every router publishes to, plus the alert
//! counters. Subscribers (the gRPC `WatchAlerts` stream, the demo's live report, an
//! evaluation) each get every scored window from the moment they subscribe; a
//! subscriber that falls more than the channel's capacity behind learns how many it
//! missed (`RecvError::Lagged`) instead of slowing the routers down.
//!
//! With a journal (the node's [`EdgeLog`]), every alert, and every verdict when asked
//! for, is also written to the log's journal under an increasing cursor, so a
//! subscriber that was away, or fell behind, reads on from its cursor
//! ([`JournaledVerdict`]) instead of missing what happened meanwhile.
//!
//! It is not an actor: publishing is a non-blocking send, and an actor hop would only
//! add latency to every window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fogmesh_edge_log::EdgeLog;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::quality::QualityFlags;
use crate::telemetry;

/// One expert's part in a window's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertOpinion {
    pub expert: Arc<str>,
    pub model_version: Arc<str>,
    pub score: f32,
    pub threshold: f32,
    pub gate_weight: f32,
    /// For classifiers: which class (fault, defect) the expert saw.
    pub class: Option<Arc<str>>,
}

/// A window after its router combined the experts' verdicts.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredWindow {
    pub sensor_id: Arc<str>,
    pub router: Arc<str>,
    pub window_sequence: u64,
    pub start_us: i64,
    pub end_us: i64,
    pub quality: QualityFlags,
    /// Σ gate_weight × score / threshold over the experts consulted.
    pub score: f32,
    /// `score >= 1`: the window raises an alert.
    pub anomalous: bool,
    pub experts: Vec<ExpertOpinion>,
    /// The window the experts scored (normalised, channel-major), shared with the
    /// router's copy: learners downstream need the values, not only the verdict.
    pub values: Arc<[f32]>,
    /// For a window scored from its stream's outbox (its experts were out of reach
    /// when it was cut, or the node restarted): how long after the cut the verdict came.
    pub late: Option<Duration>,
}

/// A verdict as the journal keeps it: everything but the window's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournaledVerdict {
    pub sensor_id: String,
    pub router: String,
    pub window_sequence: u64,
    pub start_us: i64,
    pub end_us: i64,
    pub quality: u8,
    pub score: f32,
    pub anomalous: bool,
    pub experts: Vec<JournaledOpinion>,
    #[serde(default)]
    pub late_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournaledOpinion {
    pub expert: String,
    pub model_version: String,
    pub score: f32,
    pub threshold: f32,
    pub gate_weight: f32,
    pub class: Option<String>,
}

impl JournaledVerdict {
    pub fn of(window: &ScoredWindow) -> Self {
        JournaledVerdict {
            sensor_id: window.sensor_id.to_string(),
            router: window.router.to_string(),
            window_sequence: window.window_sequence,
            start_us: window.start_us,
            end_us: window.end_us,
            quality: window.quality.bits(),
            score: window.score,
            anomalous: window.anomalous,
            experts: window
                .experts
                .iter()
                .map(|e| JournaledOpinion {
                    expert: e.expert.to_string(),
                    model_version: e.model_version.to_string(),
                    score: e.score,
                    threshold: e.threshold,
                    gate_weight: e.gate_weight,
                    class: e.class.as_ref().map(|c| c.to_string()),
                })
                .collect(),
            late_ms: window
                .late
                .map(|late| u64::try_from(late.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// Reads a journal entry; an error for bytes that are not one (a damaged file).
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    fn encode(&self) -> Vec<u8> {
        // Plain data with string keys: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn quality(&self) -> QualityFlags {
        QualityFlags::from_bits(u32::from(self.quality))
    }
}

/// Where the annunciator journals, and what.
#[derive(Clone)]
struct Journal {
    log: EdgeLog,
    /// Every verdict, not only alerts.
    verdicts: bool,
}

/// Fan-out of scored windows to subscribers. Cheap to clone.
#[derive(Clone)]
pub struct Annunciator {
    sender: broadcast::Sender<Arc<ScoredWindow>>,
    published: Arc<AtomicU64>,
    alerts: Arc<AtomicU64>,
    journal: Option<Journal>,
}

impl Annunciator {
    /// `capacity`: how many windows a subscriber may fall behind before it lags.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Annunciator {
            sender,
            published: Arc::new(AtomicU64::new(0)),
            alerts: Arc::new(AtomicU64::new(0)),
            journal: None,
        }
    }

    /// The same annunciator (its subscribers keep receiving) that also writes every
    /// alert, and every verdict with `verdicts`, to `log`'s journal.
    pub fn with_journal(self, log: EdgeLog, verdicts: bool) -> Self {
        Annunciator {
            journal: Some(Journal { log, verdicts }),
            ..self
        }
    }

    /// The journal's log and whether it keeps every verdict; `None` without one.
    pub fn journal(&self) -> Option<(&EdgeLog, bool)> {
        self.journal.as_ref().map(|j| (&j.log, j.verdicts))
    }

    pub fn publish(&self, window: ScoredWindow) {
        if window.anomalous {
            self.alerts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::ALERTS, "sensor" => window.sensor_id.to_string())
                .increment(1);
        }
        if let Some(journal) = &self.journal {
            if window.anomalous || journal.verdicts {
                journal.log.journal(JournaledVerdict::of(&window).encode());
            }
        }
        self.published.fetch_add(1, Ordering::Relaxed);
        // No subscriber is not an error: the counters above still tell the story.
        let _ = self.sender.send(Arc::new(window));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ScoredWindow>> {
        self.sender.subscribe()
    }

    /// Windows published since the node started.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    pub fn alerts(&self) -> u64 {
        self.alerts.load(Ordering::Relaxed)
    }
}
