//! `WatchAlerts` from the node's alert journal: a subscriber reads on from a cursor,
//! at least once and in cursor order, and learns of entries the node no longer keeps
//! from a gap marker instead of missing them silently. Also the one conversion of a
//! journaled verdict to the wire [`Alert`], which the live stream and the MQTT
//! publisher use too.
//!
//! The stream tails the journal: it reads a page from its cursor, sends it, and when it
//! has caught up waits for the journal's next commit (the log's watch of its extent),
//! so it never holds more than a page and never slows the annunciator down.

use std::collections::{HashSet, VecDeque};

use fogmesh_actors::{JournaledVerdict, QualityFlag, ScoredWindow};
use fogmesh_edge_log::{EdgeLog, JournalMark};
use fogmesh_proto::{Alert, AlertGap, ExpertScore};
use futures::Stream;
use tokio::sync::watch;

use crate::status::ServiceError;
use crate::telemetry;

/// Journal entries read per page.
const PAGE: usize = 256;

/// What a subscriber wants from the journal.
#[derive(Debug, Clone)]
pub struct JournalFilter {
    /// Empty: every sensor.
    pub sensors: HashSet<String>,
    pub include_normal: bool,
}

impl JournalFilter {
    fn wants(&self, verdict: &JournaledVerdict) -> bool {
        (self.include_normal || verdict.anomalous)
            && (self.sensors.is_empty() || self.sensors.contains(&verdict.sensor_id))
    }
}

/// A journaled verdict as the wire carries it.
pub fn alert_of(cursor: u64, verdict: &JournaledVerdict) -> Alert {
    use fogmesh_proto::QualityFlag as WireFlag;
    Alert {
        sensor_id: verdict.sensor_id.clone(),
        window_sequence: verdict.window_sequence,
        window_start_us: verdict.start_us,
        window_end_us: verdict.end_us,
        score: verdict.score,
        experts: verdict
            .experts
            .iter()
            .map(|e| ExpertScore {
                expert: e.expert.clone(),
                model_version: e.model_version.clone(),
                score: e.score,
                threshold: e.threshold,
                gate_weight: e.gate_weight,
                class: e.class.clone().unwrap_or_default(),
            })
            .collect(),
        quality: verdict
            .quality()
            .iter()
            .map(|flag| match flag {
                QualityFlag::OutOfRange => WireFlag::OutOfRange,
                QualityFlag::Stuck => WireFlag::Stuck,
                QualityFlag::Gap => WireFlag::Gap,
            } as i32)
            .collect(),
        cursor,
        late_ms: verdict.late_ms.unwrap_or(0),
        gap: None,
    }
}

/// A window streamed live, without a cursor.
pub fn live_alert(window: &ScoredWindow) -> Alert {
    alert_of(0, &JournaledVerdict::of(window))
}

/// The marker for cursors `first..=last`, no longer kept.
fn gap(first: u64, last: u64) -> Alert {
    metrics::counter!(telemetry::ALERT_WATCH_SKIPPED).increment(last - first + 1);
    Alert {
        cursor: last,
        gap: Some(AlertGap {
            first_missed: first,
            last_missed: last,
        }),
        ..Alert::default()
    }
}

struct Tail {
    log: EdgeLog,
    marks: watch::Receiver<JournalMark>,
    cursor: u64,
    filter: JournalFilter,
    ready: VecDeque<Result<Alert, ServiceError>>,
}

/// Alerts from cursor `from` on (from the journal's end when `None`), then each new
/// one as it is committed. Ends when the log does.
pub fn tail(
    log: EdgeLog,
    from: Option<u64>,
    filter: JournalFilter,
) -> impl Stream<Item = Result<Alert, ServiceError>> + Send {
    let marks = log.journal_marks();
    let cursor = from.unwrap_or_else(|| marks.borrow().next).max(1);
    let tail = Tail {
        log,
        marks,
        cursor,
        filter,
        ready: VecDeque::new(),
    };
    futures::stream::unfold(tail, |mut tail| async move {
        loop {
            if let Some(item) = tail.ready.pop_front() {
                return Some((item, tail));
            }
            // Marked seen before reading, so a commit after the read wakes the wait.
            let end = tail.marks.borrow_and_update().next;
            if end <= tail.cursor {
                tail.marks.changed().await.ok()?;
                continue;
            }
            tail.read_page();
        }
    })
}

impl Tail {
    fn read_page(&mut self) {
        let page = match self.log.journal_page(self.cursor, PAGE) {
            Ok(page) => page,
            Err(source) => {
                self.ready.push_back(Err(ServiceError::Journal(source)));
                return;
            }
        };
        if self.cursor < page.mark.oldest {
            self.ready
                .push_back(Ok(gap(self.cursor, page.mark.oldest - 1)));
            self.cursor = page.mark.oldest;
        }
        for (cursor, bytes) in page.entries {
            self.cursor = cursor + 1;
            match JournaledVerdict::decode(&bytes) {
                Ok(verdict) if self.filter.wants(&verdict) => {
                    self.ready.push_back(Ok(alert_of(cursor, &verdict)));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(cursor, error = %e, "a journal entry that does not decode; skipped");
                    self.ready.push_back(Ok(gap(cursor, cursor)));
                }
            }
        }
    }
}
