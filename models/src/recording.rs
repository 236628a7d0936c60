//! fogrec, fogmesh's compact recording format for plant data, and its in-memory form.
//!
//! A Python script writes the recordings at setup (from the TEP simulator) and Rust
//! writes them too, so the layout is deliberately trivial to produce with `struct` and
//! `json`: 8 bytes of magic `b"FOGREC1\n"`, a little-endian u32 header length N, N
//! bytes of UTF-8 JSON ([`RecordingHeader`]), then `rows * columns` little-endian f32,
//! row-major. Reading checks every size against the file length before allocating, so
//! a corrupt header cannot make the reader allocate gigabytes, and every error names the
//! file and what is wrong with it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The first 8 bytes of every fogrec file.
pub const MAGIC: &[u8; 8] = b"FOGREC1\n";

/// Headers longer than this are rejected: a real header is a few KiB, so a larger length
/// means a corrupt or foreign file.
pub const MAX_HEADER_BYTES: u32 = 1 << 20;

const PREAMBLE_BYTES: u64 = MAGIC.len() as u64 + 4;

/// Data is converted in chunks of this many bytes, so reading needs no second copy of
/// the file in memory. A multiple of 4, so no sample straddles two chunks.
const CHUNK_BYTES: usize = 1 << 16;

/// The JSON header of a fogrec file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordingHeader {
    /// What produced the data, e.g. "tep-studio 0.2.0".
    pub source: String,
    /// One name per column (sensor or actuator).
    pub columns: Vec<String>,
    /// Seconds between rows; positive and finite.
    pub sample_period_s: f64,
    /// Unix time of row 0 in microseconds.
    pub start_timestamp_us: i64,
    pub rows: u64,
    /// The TEP disturbance (IDV number) active in this recording; None for normal
    /// operation.
    pub fault: Option<u32>,
    /// First row with the fault active; None with a fault means from row 0.
    pub fault_onset_row: Option<u64>,
    /// Simulator seed, when the source had one (a JSON number, so f64).
    pub seed: Option<f64>,
    #[serde(default)]
    pub description: String,
}

/// A whole recording in memory: the header and `rows * columns` values, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Recording {
    pub header: RecordingHeader,
    pub values: Vec<f32>,
}

/// The field, its value and why the header cannot describe a recording, independent of
/// where the header came from.
fn header_problem(header: &RecordingHeader) -> Option<(&'static str, String, String)> {
    if header.columns.is_empty() {
        return Some((
            "columns",
            "[]".into(),
            "a recording needs at least one column".into(),
        ));
    }
    if !(header.sample_period_s.is_finite() && header.sample_period_s > 0.0) {
        return Some((
            "sample_period_s",
            header.sample_period_s.to_string(),
            "must be positive and finite".into(),
        ));
    }
    if let Some(seed) = header.seed.filter(|s| !s.is_finite()) {
        return Some((
            "seed",
            seed.to_string(),
            "must be finite: JSON has no NaN or infinity".into(),
        ));
    }
    None
}

/// `header_problem` as one sentence for a `ModelError::Recording`.
fn header_reason(header: &RecordingHeader) -> Option<String> {
    header_problem(header)
        .map(|(field, value, reason)| format!("header {field} = {value}: {reason}"))
}

/// `rows * columns` as a value count, if it fits in memory.
fn value_count(header: &RecordingHeader) -> Option<usize> {
    usize::try_from(header.rows)
        .ok()?
        .checked_mul(header.columns.len())
}

impl Recording {
    /// Checks that the header is usable (at least one column, a positive finite sample
    /// period, a finite seed) and that `values` holds exactly `rows * columns` values.
    pub fn new(header: RecordingHeader, values: Vec<f32>) -> Result<Self, ModelError> {
        if let Some((field, value, reason)) = header_problem(&header) {
            return Err(ModelError::InvalidOption {
                field,
                value,
                reason,
            });
        }
        if value_count(&header) != Some(values.len()) {
            return Err(ModelError::Shape {
                what: "recording values",
                expected: format!("{} rows x {} columns", header.rows, header.columns.len()),
                got: format!("{} values", values.len()),
            });
        }
        Ok(Self { header, values })
    }

    /// Reads and checks a fogrec file: magic, header length (at most
    /// [`MAX_HEADER_BYTES`]), JSON, the header's own consistency, and a data section of
    /// exactly `rows * columns * 4` bytes.
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |reason: String| ModelError::Recording {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(io)?;
        let file_bytes = file.metadata().map_err(io)?.len();
        if file_bytes < PREAMBLE_BYTES {
            return Err(bad(format!(
                "{file_bytes} bytes is too short for the {PREAMBLE_BYTES}-byte magic and header length"
            )));
        }
        let mut reader = BufReader::new(file);
        let mut preamble = [0u8; PREAMBLE_BYTES as usize];
        reader.read_exact(&mut preamble).map_err(io)?;
        let (magic, length) = preamble.split_at(MAGIC.len());
        if magic != MAGIC {
            return Err(bad(format!(
                "bad magic \"{}\", expected \"{}\": not a fogrec file",
                magic.escape_ascii(),
                MAGIC.escape_ascii()
            )));
        }
        let header_bytes = u32::from_le_bytes([length[0], length[1], length[2], length[3]]);
        if header_bytes > MAX_HEADER_BYTES {
            return Err(bad(format!(
                "header length {header_bytes} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes"
            )));
        }
        let after_preamble = file_bytes - PREAMBLE_BYTES;
        if u64::from(header_bytes) > after_preamble {
            return Err(bad(format!(
                "header length {header_bytes} bytes runs past the end of the file ({after_preamble} bytes follow the preamble)"
            )));
        }
        let mut json = vec![0u8; header_bytes as usize];
        reader.read_exact(&mut json).map_err(io)?;
        let header: RecordingHeader =
            serde_json::from_slice(&json).map_err(|err| bad(format!("bad JSON header: {err}")))?;
        if let Some(reason) = header_reason(&header) {
            return Err(bad(reason));
        }

        let columns = header.columns.len();
        let expected = header
            .rows
            .checked_mul(columns as u64)
            .and_then(|n| n.checked_mul(4));
        let Some(expected) = expected else {
            return Err(bad(format!(
                "{} rows x {columns} columns of f32 overflows",
                header.rows
            )));
        };
        let got = after_preamble - u64::from(header_bytes);
        if got < expected {
            return Err(bad(format!(
                "truncated data: {} rows x {columns} columns need {expected} bytes, the file holds {got}",
                header.rows
            )));
        }
        if got > expected {
            return Err(bad(format!(
                "{} trailing bytes after the {expected} bytes of {} rows x {columns} columns",
                got - expected,
                header.rows
            )));
        }
        // `expected` bytes exist in the file, so this many values fit in memory's address space.
        let mut remaining = expected as usize;
        let mut values = Vec::with_capacity(remaining / 4);
        let mut chunk = vec![0u8; CHUNK_BYTES.min(remaining)];
        while remaining > 0 {
            let take = remaining.min(CHUNK_BYTES);
            reader.read_exact(&mut chunk[..take]).map_err(io)?;
            values.extend(
                chunk[..take]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            remaining -= take;
        }
        Ok(Self { header, values })
    }

    /// Writes the recording as a fogrec file, refusing a recording that `read` would
    /// reject (inconsistent sizes, a header over the limit).
    pub fn write(&self, path: &Path) -> Result<(), ModelError> {
        let bad = |reason: String| ModelError::Recording {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(reason) = header_reason(&self.header) {
            return Err(bad(reason));
        }
        if value_count(&self.header) != Some(self.values.len()) {
            return Err(bad(format!(
                "{} values do not fill {} rows x {} columns",
                self.values.len(),
                self.header.rows,
                self.columns()
            )));
        }
        let json = serde_json::to_vec(&self.header)
            .map_err(|err| bad(format!("header does not serialise: {err}")))?;
        let header_bytes = u32::try_from(json.len())
            .ok()
            .filter(|&n| n <= MAX_HEADER_BYTES)
            .ok_or_else(|| {
                bad(format!(
                    "header of {} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes",
                    json.len()
                ))
            })?;
        self.write_unchecked(path, header_bytes, &json)
            .map_err(|source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            })
    }

    fn write_unchecked(&self, path: &Path, header_bytes: u32, json: &[u8]) -> std::io::Result<()> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(MAGIC)?;
        out.write_all(&header_bytes.to_le_bytes())?;
        out.write_all(json)?;
        let mut chunk = Vec::with_capacity(CHUNK_BYTES);
        for values in self.values.chunks(CHUNK_BYTES / 4) {
            chunk.clear();
            chunk.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            out.write_all(&chunk)?;
        }
        out.flush()
    }

    pub fn rows(&self) -> usize {
        self.values.len() / self.columns().max(1)
    }

    pub fn columns(&self) -> usize {
        self.header.columns.len()
    }

    /// The values of row `i`, one per column.
    ///
    /// # Panics
    /// When `i >= self.rows()`, like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        let columns = self.columns();
        &self.values[i * columns..(i + 1) * columns]
    }

    /// Index of the first column named `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.header.columns.iter().position(|c| c == name)
    }

    /// Unix time of `row` in microseconds: start + row * period, rounded.
    pub fn timestamp_us(&self, row: usize) -> i64 {
        let offset = (row as f64 * self.header.sample_period_s * 1e6).round() as i64;
        self.header.start_timestamp_us.saturating_add(offset)
    }

    /// Whether the recorded fault is active at `row`.
    pub fn is_faulty(&self, row: usize) -> bool {
        self.header.fault.is_some() && row as u64 >= self.header.fault_onset_row.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Recording {
        let header = RecordingHeader {
            source: "tep-studio 0.2.0".into(),
            columns: vec!["XMEAS(1)".into(), "XMEAS(2)".into(), "XMV(3)".into()],
            sample_period_s: 0.5,
            start_timestamp_us: 1_700_000_000_000_000,
            rows: 4,
            fault: Some(6),
            fault_onset_row: Some(2),
            seed: Some(42.0),
            description: "IDV(6) from row 2".into(),
        };
        Recording::new(header, (0..12).map(|v| v as f32).collect()).expect("consistent")
    }

    /// A file with the given preamble parts, header and data bytes, for corruption tests.
    fn raw(path: &Path, magic: &[u8], header_len: u32, json: &[u8], data: &[u8]) {
        let mut bytes = magic.to_vec();
        bytes.extend(header_len.to_le_bytes());
        bytes.extend(json);
        bytes.extend(data);
        std::fs::write(path, bytes).expect("temp file is writable");
    }

    fn expect_recording_error(path: &Path, needle: &str) {
        match Recording::read(path) {
            Err(err @ ModelError::Recording { .. }) => {
                let ModelError::Recording {
                    path: named,
                    reason,
                } = &err
                else {
                    unreachable!("matched above")
                };
                assert_eq!(named, path);
                assert!(reason.contains(needle), "{needle:?} not in {err}");
                assert!(err.to_string().contains(&path.display().to_string()));
            }
            other => panic!("expected a Recording error containing {needle:?}, got {other:?}"),
        }
    }

    fn recording_strategy() -> impl Strategy<Value = Recording> {
        (1usize..6, 0u64..20).prop_flat_map(|(columns, rows)| {
            (
                "[a-z0-9 .-]{0,20}",
                prop::collection::vec("[A-Za-z0-9_()]{1,12}", columns),
                1e-4f64..1e3,
                -1_000_000_000_000_000i64..4_000_000_000_000_000,
                prop::option::of(1u32..30),
                prop::option::of(0u64..40),
                prop::option::of(-1e12f64..1e12),
                "\\PC{0,30}",
                prop::collection::vec(any::<f32>(), columns * rows as usize),
            )
                .prop_map(
                    move |(
                        source,
                        columns,
                        period,
                        start,
                        fault,
                        onset,
                        seed,
                        description,
                        values,
                    )| {
                        let header = RecordingHeader {
                            source,
                            columns,
                            sample_period_s: period,
                            start_timestamp_us: start,
                            rows,
                            fault,
                            fault_onset_row: onset,
                            seed,
                            description,
                        };
                        Recording::new(header, values).expect("sizes agree by construction")
                    },
                )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn write_then_read_is_lossless(recording in recording_strategy()) {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("r.fogrec");
            recording.write(&path).expect("writes");
            let back = Recording::read(&path).expect("reads");
            prop_assert_eq!(&back.header, &recording.header);
            let bits = |r: &Recording| r.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&back), bits(&recording));
        }
    }

    #[test]
    fn accessors_follow_the_header() {
        let r = sample();
        assert_eq!((r.rows(), r.columns()), (4, 3));
        assert_eq!(r.row(1), [3.0, 4.0, 5.0]);
        assert_eq!(r.column_index("XMV(3)"), Some(2));
        assert_eq!(r.column_index("XMV(4)"), None);
        assert_eq!(r.timestamp_us(3), 1_700_000_000_000_000 + 1_500_000);
        assert_eq!(
            (0..4).map(|i| r.is_faulty(i)).collect::<Vec<_>>(),
            [false, false, true, true]
        );

        let normal = Recording {
            header: RecordingHeader {
                fault: None,
                ..r.header.clone()
            },
            ..r.clone()
        };
        assert!(!normal.is_faulty(3));
        let from_start = Recording {
            header: RecordingHeader {
                fault_onset_row: None,
                ..r.header.clone()
            },
            ..r
        };
        assert!(from_start.is_faulty(0));
    }

    #[test]
    fn missing_description_defaults_to_empty() {
        let json = br#"{"source":"py","columns":["a"],"sample_period_s":1.0,"start_timestamp_us":0,"rows":1,"fault":null,"fault_onset_row":null,"seed":null}"#;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("py.fogrec");
        raw(&path, MAGIC, json.len() as u32, json, &1.5f32.to_le_bytes());
        let r = Recording::read(&path).expect("reads");
        assert_eq!(r.header.description, "");
        assert_eq!(r.values, [1.5]);
    }

    #[test]
    fn corrupt_files_name_the_path_and_the_problem() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bad.fogrec");
        let r = sample();
        let json = serde_json::to_vec(&r.header).expect("serialises");
        let len = json.len() as u32;
        let data: Vec<u8> = r.values.iter().flat_map(|v| v.to_le_bytes()).collect();

        raw(&path, b"FOGREC2\n", len, &json, &data);
        expect_recording_error(&path, "bad magic");

        raw(&path, MAGIC, len, &json, &data[..data.len() - 3]);
        expect_recording_error(&path, "truncated data");

        raw(
            &path,
            MAGIC,
            len,
            &json,
            &[data.as_slice(), &[0; 4]].concat(),
        );
        expect_recording_error(&path, "4 trailing bytes");

        raw(&path, MAGIC, MAX_HEADER_BYTES + 1, &json, &data);
        expect_recording_error(&path, "exceeds the limit of 1048576 bytes");

        raw(&path, MAGIC, len + data.len() as u32 + 1, &json, &data);
        expect_recording_error(&path, "runs past the end");

        raw(
            &path,
            MAGIC,
            len,
            &json[..json.len() - 1],
            &[data.as_slice(), b" "].concat(),
        );
        expect_recording_error(&path, "bad JSON header");

        // Three columns declared, two columns of data written.
        raw(&path, MAGIC, len, &json, &data[..4 * 2 * 4]);
        expect_recording_error(&path, "4 rows x 3 columns need 48 bytes, the file holds 32");

        let empty = RecordingHeader {
            columns: vec![],
            rows: 0,
            ..r.header.clone()
        };
        let empty_json = serde_json::to_vec(&empty).expect("serialises");
        raw(&path, MAGIC, empty_json.len() as u32, &empty_json, &[]);
        expect_recording_error(&path, "at least one column");

        std::fs::write(&path, b"FOGREC1").expect("writable");
        expect_recording_error(&path, "too short");
    }

    #[test]
    fn inconsistent_recordings_are_refused() {
        let r = sample();
        assert!(matches!(
            Recording::new(r.header.clone(), vec![0.0; 11]),
            Err(ModelError::Shape {
                what: "recording values",
                ..
            })
        ));
        let zero_period = RecordingHeader {
            sample_period_s: 0.0,
            ..r.header.clone()
        };
        assert!(matches!(
            Recording::new(zero_period, r.values.clone()),
            Err(ModelError::InvalidOption {
                field: "sample_period_s",
                ..
            })
        ));

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("out.fogrec");
        let ragged = Recording {
            values: vec![0.0; 5],
            ..r
        };
        match ragged.write(&path) {
            Err(ModelError::Recording {
                path: named,
                reason,
            }) => {
                assert_eq!(named, path);
                assert!(reason.contains("5 values"), "{reason}");
            }
            other => panic!("expected a Recording error, got {other:?}"),
        }
        assert!(matches!(
            Recording::read(&dir.path().join("absent.fogrec")),
            Err(ModelError::Io { .. })
        ));
    }
}
