//! The windows a learner keeps from what its expert scored: the recent buffer (the
//! newest regime, where the plant's labels attach) and the replay reservoir (a uniform
//! sample of the regime the serving version knows). Windows leaving the recent buffer
//! join the reservoir while the learner watches; while it collects a new regime the
//! reservoir is frozen, so the old regime a round replays never takes in the new one
//! the round must learn.

use std::collections::VecDeque;
use std::sync::Arc;

use fogmesh_models::continual::{ReplayItem, Reservoir};

use crate::annunciator::ScoredWindow;

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

/// One learner's recent buffer and reservoir.
pub(super) struct ObservedWindows {
    reservoir: Reservoir,
    recent: VecDeque<Held>,
}

impl ObservedWindows {
    pub(super) fn new(reservoir: Reservoir) -> Self {
        ObservedWindows {
            reservoir,
            recent: VecDeque::new(),
        }
    }

    /// Holds `window` as the newest recent one and keeps the newest `capacity`.
    pub(super) fn hold(&mut self, window: &ScoredWindow, capacity: usize, collecting: bool) {
        self.recent.push_back(Held {
            sensor: window.sensor_id.clone(),
            sequence: window.window_sequence,
            values: window.values.clone(),
            label: None,
        });
        while self.recent.len() > capacity {
            if let Some(old) = self.recent.pop_front() {
                // While collecting the reservoir is frozen: the oldest new windows are
                // dropped, not mistaken for the old regime.
                if !collecting {
                    self.reservoir.offer(old.item());
                }
            }
        }
    }

    /// Moves every recent window into the reservoir: they are the regime the serving
    /// version knows.
    pub(super) fn recent_into_reservoir(&mut self) {
        for held in self.recent.drain(..) {
            self.reservoir.offer(held.item());
        }
    }

    pub(super) fn drop_recent(&mut self) {
        self.recent.clear();
    }

    /// Attaches `label` to the held window `sensor#sequence`; false when it is no
    /// longer held (the reservoir is a sample and is not searched).
    pub(super) fn label(&mut self, sensor: &str, sequence: u64, label: i64) -> bool {
        match self
            .recent
            .iter_mut()
            .rev()
            .find(|h| h.sequence == sequence && *h.sensor == *sensor)
        {
            Some(held) => {
                held.label = Some(label);
                true
            }
            None => false,
        }
    }

    pub(super) fn recent_len(&self) -> usize {
        self.recent.len()
    }

    pub(super) fn reservoir_len(&self) -> usize {
        self.reservoir.len()
    }

    /// Copies of the recent windows, oldest first, for a round that trains apart from
    /// the learner.
    pub(super) fn recent_items(&self) -> Vec<ReplayItem> {
        self.recent.iter().map(Held::item).collect()
    }

    pub(super) fn reservoir_items(&self) -> Vec<ReplayItem> {
        self.reservoir.items().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quality::QualityFlags;

    fn window(sequence: u64) -> ScoredWindow {
        ScoredWindow {
            sensor_id: "pump-1".into(),
            router: "plant".into(),
            window_sequence: sequence,
            start_us: 0,
            end_us: 0,
            quality: QualityFlags::default(),
            score: 0.0,
            anomalous: false,
            experts: Vec::new(),
            values: vec![sequence as f32].into(),
            late: None,
        }
    }

    fn windows(sequences: std::ops::Range<u64>, collecting: bool) -> ObservedWindows {
        let mut observed = ObservedWindows::new(Reservoir::new(16, 0).unwrap());
        for sequence in sequences {
            observed.hold(&window(sequence), 3, collecting);
        }
        observed
    }

    #[test]
    fn windows_leaving_the_recent_buffer_join_the_reservoir_only_while_watching() {
        let watching = windows(0..5, false);
        let values = |items: Vec<ReplayItem>| -> Vec<f32> {
            items.into_iter().flat_map(|i| i.window).collect()
        };
        assert_eq!(values(watching.recent_items()), [2.0, 3.0, 4.0]);
        assert_eq!(values(watching.reservoir_items()), [0.0, 1.0]);
        let mut collecting = windows(0..5, true);
        assert_eq!(values(collecting.recent_items()), [2.0, 3.0, 4.0]);
        assert_eq!(collecting.reservoir_len(), 0);
        collecting.recent_into_reservoir();
        assert_eq!(
            (collecting.recent_len(), collecting.reservoir_len()),
            (0, 3)
        );
    }

    #[test]
    fn labels_attach_to_held_windows_only() {
        let mut observed = windows(0..5, false);
        assert!(observed.label("pump-1", 3, 1));
        assert!(
            !observed.label("pump-1", 0, 1),
            "in the reservoir, not held"
        );
        assert!(!observed.label("pump-2", 3, 1), "another sensor's window");
        let labels: Vec<_> = observed.recent_items().iter().map(|i| i.label).collect();
        assert_eq!(labels, [None, Some(1), None]);
    }
}
