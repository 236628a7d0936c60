//! Data-quality flags a [`crate::SensorStream`] raises on accepted samples: a value out
//! of its channel's engineering range, a channel stuck on one value, a gap in time.
//!
//! Flags do not reject data (a stuck transmitter is still a reading the operator wants
//! to see); they travel with the window and its alert so a score can be read in context.
//! Values that are not numbers at all (NaN, infinity) never get this far: the stream
//! refuses them at ingest.

use serde::{Deserialize, Serialize};

/// A set of quality flags, one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct QualityFlags(u8);

/// One kind of data-quality problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QualityFlag {
    OutOfRange,
    Stuck,
    Gap,
}

impl QualityFlag {
    pub const ALL: [QualityFlag; 3] = [
        QualityFlag::OutOfRange,
        QualityFlag::Stuck,
        QualityFlag::Gap,
    ];

    fn bit(self) -> u8 {
        match self {
            QualityFlag::OutOfRange => 1,
            QualityFlag::Stuck => 2,
            QualityFlag::Gap => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QualityFlag::OutOfRange => "out_of_range",
            QualityFlag::Stuck => "stuck",
            QualityFlag::Gap => "gap",
        }
    }
}

impl QualityFlags {
    /// The flags as bits, as the edge log stores them.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Flags from [`QualityFlags::bits`]; bits no flag has are dropped.
    pub fn from_bits(bits: u32) -> QualityFlags {
        let known = QualityFlag::ALL.iter().fold(0u8, |all, f| all | f.bit());
        QualityFlags((bits & u32::from(known)) as u8)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, flag: QualityFlag) -> bool {
        self.0 & flag.bit() != 0
    }

    pub fn insert(&mut self, flag: QualityFlag) {
        self.0 |= flag.bit();
    }

    pub fn union(self, other: QualityFlags) -> QualityFlags {
        QualityFlags(self.0 | other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = QualityFlag> {
        QualityFlag::ALL
            .into_iter()
            .filter(move |f| self.contains(*f))
    }
}

/// What counts as bad data for one stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityRules {
    /// Engineering range per channel, `[low, high]`; empty means no range check.
    #[serde(default)]
    pub ranges: Vec<[f32; 2]>,
    /// A channel is stuck after this many consecutive identical values; `None` disables
    /// the check (some channels, such as valve positions, legitimately hold still).
    #[serde(default)]
    pub stuck_after: Option<u32>,
    /// A gap is a step between samples longer than this; `None` disables the check.
    #[serde(default)]
    pub max_gap_us: Option<i64>,
}

/// Per-stream state that turns rules into flags, sample by sample.
#[derive(Debug, Clone)]
pub struct QualityTracker {
    rules: QualityRules,
    last_values: Vec<f32>,
    repeats: Vec<u32>,
    last_timestamp_us: Option<i64>,
}

impl QualityTracker {
    pub fn new(rules: QualityRules, channels: usize) -> Self {
        QualityTracker {
            rules,
            last_values: vec![f32::NAN; channels],
            repeats: vec![0; channels],
            last_timestamp_us: None,
        }
    }

    /// Flags for one accepted sample (raw, before normalisation). `values` has the
    /// stream's channel count; the stream checked that before.
    pub fn observe(&mut self, timestamp_us: i64, values: &[f32]) -> QualityFlags {
        let mut flags = QualityFlags::default();
        if let (Some(limit), Some(last)) = (self.rules.max_gap_us, self.last_timestamp_us) {
            if timestamp_us - last > limit {
                flags.insert(QualityFlag::Gap);
            }
        }
        self.last_timestamp_us = Some(timestamp_us);
        for (channel, &value) in values.iter().enumerate() {
            if let Some([low, high]) = self.rules.ranges.get(channel) {
                if value < *low || value > *high {
                    flags.insert(QualityFlag::OutOfRange);
                }
            }
            if value == self.last_values[channel] {
                self.repeats[channel] = self.repeats[channel].saturating_add(1);
            } else {
                self.repeats[channel] = 0;
                self.last_values[channel] = value;
            }
            if let Some(limit) = self.rules.stuck_after {
                if self.repeats[channel] >= limit {
                    flags.insert(QualityFlag::Stuck);
                }
            }
        }
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_range_stuck_and_gap() {
        let rules = QualityRules {
            ranges: vec![[0.0, 10.0], [-1.0, 1.0]],
            stuck_after: Some(2),
            max_gap_us: Some(1_000),
        };
        let mut tracker = QualityTracker::new(rules, 2);
        assert!(tracker.observe(0, &[5.0, 0.0]).is_empty());
        assert_eq!(
            tracker
                .observe(500, &[11.0, 0.5])
                .iter()
                .collect::<Vec<_>>(),
            vec![QualityFlag::OutOfRange]
        );
        assert!(tracker
            .observe(1_000, &[11.0, 0.2])
            .contains(QualityFlag::OutOfRange));
        let stuck = tracker.observe(1_500, &[11.0, 0.3]);
        assert!(
            stuck.contains(QualityFlag::Stuck),
            "third repeat of 11.0 is stuck"
        );
        let gap = tracker.observe(5_000, &[3.0, 0.1]);
        assert!(gap.contains(QualityFlag::Gap));
        assert!(!gap.contains(QualityFlag::Stuck));
    }

    #[test]
    fn no_rules_no_flags() {
        let mut tracker = QualityTracker::new(QualityRules::default(), 1);
        for t in 0..10 {
            assert!(tracker.observe(t * 1_000_000, &[1.0]).is_empty());
        }
    }
}
