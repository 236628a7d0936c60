//! Cuts a stream of samples into overlapping (or hopping) windows of `size` samples
//! every `stride` samples, the unit an expert scores.
//!
//! Samples arrive row by row (one value per channel); windows leave channel-major, the
//! layout of the experts' `[batch, channels, length]` tensors, so the transpose happens
//! once here instead of per forward pass.
//!
//! A windower says where it stands ([`Windower::resume_point`]: the sequence of the
//! first sample of the unfinished window, or how many samples it will skip), so a
//! stream restarted from its edge log rebuilds it exactly: the same samples fed to a
//! windower [`Windower::skipping`] as many cut the same next window.

use std::collections::VecDeque;

use crate::quality::QualityFlags;

/// A window's contents before the stream stamps its identity on it.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowCut {
    pub start_us: i64,
    pub end_us: i64,
    /// `channels` rows of `size` values.
    pub values: Vec<f32>,
    pub quality: QualityFlags,
}

/// Window geometry and the samples not yet released.
#[derive(Debug, Clone)]
pub struct Windower {
    channels: usize,
    size: usize,
    stride: usize,
    /// Row-major, `channels` values per buffered sample.
    rows: VecDeque<f32>,
    /// Per buffered sample: its sequence, timestamp and quality.
    stamps: VecDeque<(u64, i64, QualityFlags)>,
    /// Samples still to drop when `stride` exceeds `size` (hopping windows).
    skip: usize,
}

impl Windower {
    /// `channels`, `size` and `stride` must be positive; the node spec checks that.
    pub fn new(channels: usize, size: usize, stride: usize) -> Self {
        assert!(
            channels > 0 && size > 0 && stride > 0,
            "window geometry is validated by the node spec"
        );
        Windower {
            channels,
            size,
            stride,
            rows: VecDeque::with_capacity(channels * size),
            stamps: VecDeque::with_capacity(size),
            skip: 0,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Adds one sample; returns the window it completes, if any.
    /// A windower that skips the next `skip` samples before it buffers any: one
    /// restored from a [`Windower::resume_point`] that held no sample.
    pub fn skipping(mut self, skip: usize) -> Self {
        self.skip = skip;
        self
    }

    /// Where the unfinished window starts: the sequence of its first sample, or `None`
    /// with the samples left to skip before it starts.
    pub fn resume_point(&self) -> (Option<u64>, usize) {
        (self.stamps.front().map(|s| s.0), self.skip)
    }

    pub fn push(
        &mut self,
        sequence: u64,
        timestamp_us: i64,
        values: &[f32],
        quality: QualityFlags,
    ) -> Option<WindowCut> {
        debug_assert_eq!(values.len(), self.channels);
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        self.rows.extend(values.iter().copied());
        self.stamps.push_back((sequence, timestamp_us, quality));
        if self.stamps.len() < self.size {
            return None;
        }
        let cut = self.cut();
        let dropped = self.stride.min(self.size);
        self.rows.drain(..dropped * self.channels);
        self.stamps.drain(..dropped);
        self.skip = self.stride - dropped;
        Some(cut)
    }

    fn cut(&self) -> WindowCut {
        let mut values = vec![0.0; self.channels * self.size];
        for (t, row) in self.rows.iter().enumerate() {
            let (sample, channel) = (t / self.channels, t % self.channels);
            values[channel * self.size + sample] = *row;
        }
        let quality = self
            .stamps
            .iter()
            .fold(QualityFlags::default(), |acc, (_, _, q)| acc.union(*q));
        WindowCut {
            start_us: self.stamps.front().map_or(0, |s| s.1),
            end_us: self.stamps.back().map_or(0, |s| s.1),
            values,
            quality,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(channels: usize, size: usize, stride: usize, n: usize) -> Vec<WindowCut> {
        let mut windower = Windower::new(channels, size, stride);
        (0..n)
            .filter_map(|t| {
                let row: Vec<f32> = (0..channels).map(|c| (t * 100 + c) as f32).collect();
                windower.push(t as u64, t as i64, &row, QualityFlags::default())
            })
            .collect()
    }

    proptest! {
        #[test]
        fn windows_are_the_right_slices(channels in 1usize..5, size in 1usize..12, stride in 1usize..15, n in 0usize..80) {
            let windows = run(channels, size, stride, n);
            let expected = if n >= size { (n - size) / stride + 1 } else { 0 };
            prop_assert_eq!(windows.len(), expected);
            for (k, w) in windows.iter().enumerate() {
                let first = k * stride;
                prop_assert_eq!(w.start_us, first as i64);
                prop_assert_eq!(w.end_us, (first + size - 1) as i64);
                for c in 0..channels {
                    for s in 0..size {
                        prop_assert_eq!(w.values[c * size + s], ((first + s) * 100 + c) as f32);
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn a_windower_rebuilt_from_its_resume_point_cuts_the_same_windows(
            size in 1usize..10, stride in 1usize..14, before in 0usize..40, after in 0usize..40,
        ) {
            let row = |t: usize| vec![t as f32];
            let mut whole = Windower::new(1, size, stride);
            for t in 0..before {
                whole.push(t as u64, t as i64, &row(t), QualityFlags::default());
            }
            let (start, skip) = whole.resume_point();
            let mut rebuilt = Windower::new(1, size, stride).skipping(skip);
            if let Some(start) = start {
                prop_assert_eq!(skip, 0);
                for t in start as usize..before {
                    prop_assert_eq!(rebuilt.push(t as u64, t as i64, &row(t), QualityFlags::default()), None);
                }
            }
            for t in before..before + after {
                let q = QualityFlags::default();
                prop_assert_eq!(
                    rebuilt.push(t as u64, t as i64, &row(t), q),
                    whole.push(t as u64, t as i64, &row(t), q)
                );
            }
        }
    }

    #[test]
    fn a_flag_marks_every_window_holding_its_sample() {
        let mut windower = Windower::new(1, 4, 2);
        let mut flagged = Vec::new();
        for t in 0..10 {
            let mut q = QualityFlags::default();
            if t == 5 {
                q.insert(crate::quality::QualityFlag::Gap);
            }
            if let Some(w) = windower.push(t as u64, t, &[t as f32], q) {
                flagged.push((w.start_us, !w.quality.is_empty()));
            }
        }
        assert_eq!(flagged, vec![(0, false), (2, true), (4, true), (6, false)]);
    }
}
