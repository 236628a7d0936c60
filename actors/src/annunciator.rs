//! The annunciator: where scored windows and alerts leave the actors.
//!
//! In a control room the annunciator is the panel that lights up when a limit is
//! crossed. Here it is a broadcast channel every router publishes to, plus the alert
//! counters. Subscribers (the gRPC `WatchAlerts` stream, the demo's live report, an
//! evaluation) each get every scored window from the moment they subscribe; a
//! subscriber that falls more than the channel's capacity behind learns how many it
//! missed (`RecvError::Lagged`) instead of slowing the routers down.
//!
//! It is not an actor: publishing is a non-blocking send, and an actor hop would only
//! add latency to every window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
}

/// Fan-out of scored windows to subscribers. Cheap to clone.
#[derive(Clone)]
pub struct Annunciator {
    sender: broadcast::Sender<Arc<ScoredWindow>>,
    published: Arc<AtomicU64>,
    alerts: Arc<AtomicU64>,
}

impl Annunciator {
    /// `capacity`: how many windows a subscriber may fall behind before it lags.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Annunciator {
            sender,
            published: Arc::new(AtomicU64::new(0)),
            alerts: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn publish(&self, window: ScoredWindow) {
        if window.anomalous {
            self.alerts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::ALERTS, "sensor" => window.sensor_id.to_string())
                .increment(1);
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
