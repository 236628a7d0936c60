//! The records of the edge log and their byte layout: a batch of samples, as one
//! stream accepted it, and a stream's position. Little-endian, fixed widths, so a
//! record reads back the same on every build.

/// One reading of a sensor stream: one value per channel, stamped by the producer.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Producer-assigned, strictly increasing per stream; the key for de-duplication
    /// and acknowledgement.
    pub sequence: u64,
    /// Microseconds since the Unix epoch.
    pub timestamp_us: i64,
    pub values: Vec<f32>,
}

/// Where a stream stands after a committed batch: enough to refuse duplicates and to
/// rebuild its unfinished window after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamPosition {
    /// Highest accepted sequence plus one; 0 before the first sample.
    pub next_sequence: u64,
    /// The last accepted timestamp; `i64::MIN` before the first sample.
    pub last_timestamp_us: i64,
    /// Windows cut so far (the next window's sequence number).
    pub windows: u64,
    /// The sequence of the first sample of the unfinished window; `None` when the
    /// windower holds no sample.
    pub window_start: Option<u64>,
    /// Samples the windower will skip before it starts the next window (a stride
    /// longer than the window).
    pub skip: u64,
}

impl StreamPosition {
    /// The first sequence a restart needs: every sample before it is windowed.
    pub fn keep_from(&self) -> u64 {
        self.window_start.unwrap_or(self.next_sequence)
    }
}

/// A window a stream cut and handed on, kept until its router has an outcome for it
/// (scored, or failed for good), so a crash in between does not lose it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedWindow {
    /// The stream's window sequence number.
    pub sequence: u64,
    pub start_us: i64,
    pub end_us: i64,
    pub channels: u32,
    pub length: u32,
    /// The window's quality flags, as bits.
    pub quality: u32,
    /// When the stream cut it, on this node's clock (microseconds since the Unix
    /// epoch): how late a verdict from the outbox is, and how old a parked window.
    pub cut_at_us: i64,
    /// Normalised, channel-major.
    pub values: Vec<f32>,
}

impl ParkedWindow {
    /// Bytes the window takes in the outbox: what a sensor's outbox capacity counts.
    pub fn stored_bytes(&self) -> u64 {
        (WINDOW_HEADER + 4 * self.values.len()) as u64
    }
}

const WINDOW_HEADER: usize = 36;

/// `start i64, end i64, channels u32, length u32, quality u32, cut at i64`, then the
/// values.
pub(crate) fn encode_window(w: &ParkedWindow) -> Vec<u8> {
    let mut out = Vec::with_capacity(WINDOW_HEADER + 4 * w.values.len());
    out.extend_from_slice(&w.start_us.to_le_bytes());
    out.extend_from_slice(&w.end_us.to_le_bytes());
    out.extend_from_slice(&w.channels.to_le_bytes());
    out.extend_from_slice(&w.length.to_le_bytes());
    out.extend_from_slice(&w.quality.to_le_bytes());
    out.extend_from_slice(&w.cut_at_us.to_le_bytes());
    for v in &w.values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads [`encode_window`]'s bytes; `None` unless they hold exactly
/// `channels × length` values.
pub(crate) fn decode_window(sequence: u64, bytes: &[u8]) -> Option<ParkedWindow> {
    let head = bytes.get(..WINDOW_HEADER)?;
    let i64_at = |i: usize| i64::from_le_bytes(head[i..i + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap_or([0; 4]));
    let (channels, length) = (u32_at(16), u32_at(20));
    let count = (channels as usize).checked_mul(length as usize)?;
    if bytes.len() - WINDOW_HEADER != count.checked_mul(4)? {
        return None;
    }
    Some(ParkedWindow {
        sequence,
        start_us: i64_at(0),
        end_us: i64_at(8),
        channels,
        length,
        quality: u32_at(24),
        cut_at_us: i64_at(28),
        values: bytes[WINDOW_HEADER..]
            .chunks_exact(4)
            .map(|v| f32::from_le_bytes(v.try_into().unwrap_or([0; 4])))
            .collect(),
    })
}

const POSITION_BYTES: usize = 41;
const BATCH_HEADER: usize = 8;
const SAMPLE_HEADER: usize = 16;

pub(crate) fn encode_position(p: &StreamPosition) -> [u8; POSITION_BYTES] {
    let mut out = [0u8; POSITION_BYTES];
    out[0..8].copy_from_slice(&p.next_sequence.to_le_bytes());
    out[8..16].copy_from_slice(&p.last_timestamp_us.to_le_bytes());
    out[16..24].copy_from_slice(&p.windows.to_le_bytes());
    out[24] = u8::from(p.window_start.is_some());
    out[25..33].copy_from_slice(&p.window_start.unwrap_or(0).to_le_bytes());
    out[33..41].copy_from_slice(&p.skip.to_le_bytes());
    out
}

pub(crate) fn decode_position(bytes: &[u8]) -> Option<StreamPosition> {
    if bytes.len() != POSITION_BYTES || bytes[24] > 1 {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
    Some(StreamPosition {
        next_sequence: u64_at(0),
        last_timestamp_us: u64_at(8) as i64,
        windows: u64_at(16),
        window_start: (bytes[24] == 1).then(|| u64_at(25)),
        skip: u64_at(33),
    })
}

/// A batch as stored: `count u32, channels u32`, then per sample `sequence u64,
/// timestamp i64, channels × f32`. Every sample of a stream's batch has the stream's
/// channel count (the stream checked it before appending).
pub(crate) fn encode_batch(samples: &[Sample]) -> Vec<u8> {
    let channels = samples.first().map_or(0, |s| s.values.len());
    let mut out = Vec::with_capacity(BATCH_HEADER + samples.len() * (SAMPLE_HEADER + 4 * channels));
    out.extend_from_slice(&(samples.len() as u32).to_le_bytes());
    out.extend_from_slice(&(channels as u32).to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.sequence.to_le_bytes());
        out.extend_from_slice(&s.timestamp_us.to_le_bytes());
        for v in &s.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Reads [`encode_batch`]'s bytes; `None` when they are not a whole batch.
pub(crate) fn decode_batch(bytes: &[u8]) -> Option<Vec<Sample>> {
    let header: [u8; BATCH_HEADER] = bytes.get(..BATCH_HEADER)?.try_into().ok()?;
    let count = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let channels = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let stride = channels.checked_mul(4)?.checked_add(SAMPLE_HEADER)?;
    if bytes.len() - BATCH_HEADER != count.checked_mul(stride)? {
        return None;
    }
    let samples = bytes[BATCH_HEADER..]
        .chunks_exact(stride)
        .map(|chunk| {
            let (head, values) = chunk.split_at(SAMPLE_HEADER);
            Sample {
                sequence: u64::from_le_bytes(head[0..8].try_into().unwrap_or([0; 8])),
                timestamp_us: i64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8])),
                values: values
                    .chunks_exact(4)
                    .map(|v| f32::from_le_bytes(v.try_into().unwrap_or([0; 4])))
                    .collect(),
            }
        })
        .collect();
    Some(samples)
}

/// The last sequence of an encoded batch, read without decoding it.
pub(crate) fn last_sequence(bytes: &[u8]) -> Option<u64> {
    let channels = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
    let stride = channels.checked_mul(4)?.checked_add(SAMPLE_HEADER)?;
    let start = bytes.len().checked_sub(stride)?;
    if start < BATCH_HEADER {
        return None;
    }
    Some(u64::from_le_bytes(bytes[start..start + 8].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples(channels: usize) -> impl Strategy<Value = Vec<Sample>> {
        proptest::collection::vec(
            (
                any::<u64>(),
                any::<i64>(),
                proptest::collection::vec(-1e6f32..1e6, channels),
            ),
            1..20,
        )
        .prop_map(|rows| {
            rows.into_iter()
                .map(|(sequence, timestamp_us, values)| Sample {
                    sequence,
                    timestamp_us,
                    values,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn batches_survive_the_round_trip(batch in (1usize..6).prop_flat_map(samples)) {
            let bytes = encode_batch(&batch);
            prop_assert_eq!(last_sequence(&bytes), batch.last().map(|s| s.sequence));
            prop_assert_eq!(decode_batch(&bytes), Some(batch));
        }

        #[test]
        fn windows_survive_the_round_trip(
            sequence in any::<u64>(),
            start_us in any::<i64>(),
            end_us in any::<i64>(),
            quality in any::<u32>(),
            cut_at_us in any::<i64>(),
            (channels, length, values) in (1u32..4, 1u32..9).prop_flat_map(|(c, l)| {
                (Just(c), Just(l), proptest::collection::vec(-1e6f32..1e6, (c * l) as usize))
            }),
            cut in 1usize..8,
        ) {
            let window = ParkedWindow { sequence, start_us, end_us, channels, length, quality, cut_at_us, values };
            let bytes = encode_window(&window);
            prop_assert_eq!(decode_window(sequence, &bytes[..bytes.len() - cut.min(bytes.len())]), None);
            prop_assert_eq!(decode_window(sequence, &bytes), Some(window));
        }

        #[test]
        fn positions_survive_the_round_trip(
            next_sequence in any::<u64>(),
            last_timestamp_us in any::<i64>(),
            windows in any::<u64>(),
            window_start in proptest::option::of(any::<u64>()),
            skip in any::<u64>(),
        ) {
            let position = StreamPosition { next_sequence, last_timestamp_us, windows, window_start, skip };
            prop_assert_eq!(decode_position(&encode_position(&position)), Some(position));
        }

        #[test]
        fn cut_or_random_bytes_are_refused_not_panicked_on(
            batch in (1usize..4).prop_flat_map(samples),
            cut in 1usize..64,
            noise in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let bytes = encode_batch(&batch);
            let cut = cut.min(bytes.len());
            prop_assert_eq!(decode_batch(&bytes[..bytes.len() - cut]), None);
            let _ = decode_batch(&noise);
            let _ = last_sequence(&noise);
            let _ = decode_position(&noise);
        }
    }
}
