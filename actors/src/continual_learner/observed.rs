//! The windows a learner keeps from what its expert scored: the recent buffer (the
//! newest regime, where the plant's labels attach) and the replay reservoir (a uniform
//! sample of the regime the serving version knows). Windows leaving the recent buffer
//! join the reservoir while the learner watches; while it collects a new regime the
//! reservoir is frozen, so the old regime a round replays never takes in the new one
//! the round must learn.
//!
//! Both survive a restart through a snapshot ([`ObservedWindows::snapshot`]) the
//! learner keeps in the node's edge log: little-endian, versioned, read back whole or
//! not at all.

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

    /// The windows held, whether the learner is collecting a new regime and how many
    /// windows it took since its last drift or round, as bytes.
    pub(super) fn snapshot(&self, collecting: bool, since_round: usize) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.push(u8::from(collecting));
        out.extend_from_slice(&(since_round as u64).to_le_bytes());
        out.extend_from_slice(&self.reservoir.seen().to_le_bytes());
        out.extend_from_slice(&(self.reservoir.len() as u32).to_le_bytes());
        for item in self.reservoir.items() {
            put_window(&mut out, item.label, &item.window);
        }
        out.extend_from_slice(&(self.recent.len() as u32).to_le_bytes());
        for held in &self.recent {
            out.extend_from_slice(&(held.sensor.len() as u32).to_le_bytes());
            out.extend_from_slice(held.sensor.as_bytes());
            out.extend_from_slice(&held.sequence.to_le_bytes());
            put_window(&mut out, held.label, &held.values);
        }
        out
    }

    /// Takes back a [`ObservedWindows::snapshot`]: `(collecting, since_round)`, or
    /// `None` (and nothing changed) for bytes that are not a whole snapshot.
    pub(super) fn restore(&mut self, bytes: &[u8]) -> Option<(bool, usize)> {
        let mut r = Reader(bytes);
        if r.take(SNAPSHOT_MAGIC.len())? != SNAPSHOT_MAGIC {
            return None;
        }
        let collecting = match r.take(1)?[0] {
            0 => false,
            1 => true,
            _ => return None,
        };
        let since_round = usize::try_from(r.u64()?).ok()?;
        let seen = r.u64()?;
        let mut reservoir = Vec::new();
        for _ in 0..r.u32()? {
            let (label, window) = r.window()?;
            reservoir.push(ReplayItem { window, label });
        }
        let mut recent = VecDeque::new();
        for _ in 0..r.u32()? {
            let length = r.u32()? as usize;
            let sensor = std::str::from_utf8(r.take(length)?).ok()?;
            let sequence = r.u64()?;
            let (label, values) = r.window()?;
            recent.push_back(Held {
                sensor: sensor.into(),
                sequence,
                values: values.into(),
                label,
            });
        }
        if !r.0.is_empty() {
            return None;
        }
        self.reservoir.restore(seen, reservoir);
        self.recent = recent;
        Some((collecting, since_round))
    }
}

/// Opens every snapshot, version 1.
const SNAPSHOT_MAGIC: &[u8] = b"fogmesh-learner-1";

/// `label i64` (`i64::MIN` for none), `count u32`, the values.
fn put_window(out: &mut Vec<u8>, label: Option<i64>, values: &[f32]) {
    out.extend_from_slice(&label.unwrap_or(i64::MIN).to_le_bytes());
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn window(&mut self) -> Option<(Option<i64>, Vec<f32>)> {
        let label = i64::from_le_bytes(self.take(8)?.try_into().ok()?);
        let count = self.u32()? as usize;
        let values = self
            .take(count.checked_mul(4)?)?
            .chunks_exact(4)
            .map(|v| f32::from_le_bytes(v.try_into().unwrap_or([0; 4])))
            .collect();
        Some(((label != i64::MIN).then_some(label), values))
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
        windows_of(sequences, 3, collecting)
    }

    fn windows_of(
        sequences: std::ops::Range<u64>,
        capacity: usize,
        collecting: bool,
    ) -> ObservedWindows {
        let mut observed = ObservedWindows::new(Reservoir::new(16, 0).unwrap());
        for sequence in sequences {
            observed.hold(&window(sequence), capacity, collecting);
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

    proptest::proptest! {
        #[test]
        fn snapshots_survive_the_round_trip_and_cut_ones_are_refused(
            windows in 0u64..40,
            capacity in 1usize..8,
            collecting: bool,
            since_round in 0usize..1000,
            labelled in proptest::collection::vec(0u64..40, 0..5),
            cut in 1usize..64,
        ) {
            let mut observed = windows_of(0..windows, capacity, collecting);
            for sequence in labelled {
                observed.label("pump-1", sequence, sequence as i64 - 3);
            }
            let bytes = observed.snapshot(collecting, since_round);
            let mut back = ObservedWindows::new(Reservoir::new(16, 9).unwrap());
            proptest::prop_assert_eq!(back.restore(&bytes), Some((collecting, since_round)));
            proptest::prop_assert_eq!(back.recent_items(), observed.recent_items());
            proptest::prop_assert_eq!(back.reservoir_items(), observed.reservoir_items());
            proptest::prop_assert_eq!(back.reservoir.seen(), observed.reservoir.seen());
            let mut refused = ObservedWindows::new(Reservoir::new(16, 9).unwrap());
            let cut = cut.min(bytes.len());
            proptest::prop_assert_eq!(refused.restore(&bytes[..bytes.len() - cut]), None);
            proptest::prop_assert_eq!(refused.recent_len() + refused.reservoir_len(), 0);
        }
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
