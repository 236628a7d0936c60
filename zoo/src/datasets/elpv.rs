//! ELPV, the electroluminescence images of solar cells (Buerhop-Lutz et al. 2018,
//! Deitsch et al. 2019): 2,624 cells from mono- and polycrystalline modules, each rated
//! by experts with a defect probability of 0, 1/3, 2/3 or 1. The standard task calls a
//! cell defective when that probability is at least 0.5.
//!
//! The images are CC BY-NC-SA, so fogmesh ships none: `scripts/make_elpv.py` (run by
//! `just setup`) shrinks the installed PyPI package's images into a folder of three
//! files, read here:
//!
//! - `manifest.json`: `format` ("fogmesh-elpv"), `format_version` (1), `source_package`,
//!   `source_version`, `width`, `height`, `count`, `cells_file`, `cells_sha256`,
//!   `labels_file` (other keys, such as `licence`, are ignored);
//! - `cells.bin`: `count × height × width` bytes, one 8-bit grey image after another,
//!   each row-major;
//! - `labels.tsv`: tab-separated, a header naming the columns `index`, `source`,
//!   `probability` and `type`, then one line per cell in `cells.bin` order.
//!
//! Every field is checked and every refusal names the file (and the line of
//! `labels.tsv`): a half-written or hand-edited folder must not train a model on
//! shifted pixels or labels. [`ElpvSet::write`] writes the same format, for tests that
//! need a small set of their own.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use fogmesh_models::weights::sha256_hex;
use fogmesh_models::SplitMix64;

/// The `format` every manifest carries.
pub const FORMAT: &str = "fogmesh-elpv";
/// The layout version this reader understands; `scripts/make_elpv.py` writes the same.
pub const FORMAT_VERSION: u32 = 1;
/// The header line of `labels.tsv`.
const LABELS_HEADER: &str = "index\tsource\tprobability\ttype";
/// Sides above this are a corrupted manifest, not a cell image (the source is 300 px).
const MAX_SIDE: usize = 4096;

/// Why an ELPV folder could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ElpvError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Manifest { path: PathBuf, reason: String },
    #[error("{}:{line}: {reason}", path.display())]
    Labels {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: {reason}", path.display())]
    Cells { path: PathBuf, reason: String },
    #[error("invalid {field} = {value}: {reason}")]
    InvalidOption {
        field: &'static str,
        value: String,
        reason: String,
    },
}

/// Crystalline silicon of the cell's module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CellType {
    Mono,
    Poly,
}

impl CellType {
    pub fn as_str(self) -> &'static str {
        match self {
            CellType::Mono => "mono",
            CellType::Poly => "poly",
        }
    }
}

impl fmt::Display for CellType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One labelled cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// The image's path inside the source package, e.g. `images/cell0001.png`.
    pub source: String,
    /// The experts' defect probability, in [0, 1].
    pub probability: f64,
    pub kind: CellType,
}

impl Cell {
    /// The standard binary label: a defect probability of at least 0.5.
    pub fn defective(&self) -> bool {
        self.probability >= 0.5
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    format_version: u32,
    source_package: String,
    source_version: String,
    width: usize,
    height: usize,
    count: usize,
    cells_file: String,
    cells_sha256: String,
    labels_file: String,
}

/// Indices into an [`ElpvSet`], ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// A checked ELPV folder, held in memory (about 10 MiB at 64 × 64).
#[derive(Debug, Clone)]
pub struct ElpvSet {
    source_version: String,
    width: usize,
    height: usize,
    cells: Vec<Cell>,
    pixels: Vec<u8>,
}

impl ElpvSet {
    /// Reads and checks `dir/manifest.json`, its labels and its pixels (length and
    /// sha256).
    pub fn open(dir: &Path) -> Result<Self, ElpvError> {
        let manifest_path = dir.join("manifest.json");
        let manifest = read_manifest(&manifest_path)?;
        let labels_path = dir.join(&manifest.labels_file);
        let text = std::fs::read_to_string(&labels_path).map_err(|source| ElpvError::Read {
            path: labels_path.clone(),
            source,
        })?;
        let cells = parse_labels(&labels_path, &text, manifest.count)?;

        let cells_path = dir.join(&manifest.cells_file);
        let pixels = std::fs::read(&cells_path).map_err(|source| ElpvError::Read {
            path: cells_path.clone(),
            source,
        })?;
        // The manifest check bounds the sides and the count, so this cannot overflow.
        let expected = manifest.count * manifest.width * manifest.height;
        if pixels.len() != expected {
            return Err(ElpvError::Cells {
                path: cells_path,
                reason: format!(
                    "{} bytes, the manifest's {} cells of {} x {} need {expected}",
                    pixels.len(),
                    manifest.count,
                    manifest.width,
                    manifest.height
                ),
            });
        }
        let actual = sha256_hex(&pixels);
        if !actual.eq_ignore_ascii_case(&manifest.cells_sha256) {
            return Err(ElpvError::Cells {
                path: cells_path,
                reason: format!(
                    "sha256 {actual}, the manifest says {}",
                    manifest.cells_sha256
                ),
            });
        }
        Ok(ElpvSet {
            source_version: manifest.source_version,
            width: manifest.width,
            height: manifest.height,
            cells,
            pixels,
        })
    }

    /// Writes `cells` and their `pixels` (`cells.len() × height × width` bytes) into
    /// `dir` in the format [`ElpvSet::open`] reads, the manifest last.
    pub fn write(
        dir: &Path,
        source_version: &str,
        width: usize,
        height: usize,
        cells: &[Cell],
        pixels: &[u8],
    ) -> Result<(), ElpvError> {
        let invalid = |field, value: String, reason: String| ElpvError::InvalidOption {
            field,
            value,
            reason,
        };
        for (field, side) in [("width", width), ("height", height)] {
            if !(1..=MAX_SIDE).contains(&side) {
                return Err(invalid(
                    field,
                    side.to_string(),
                    format!("must lie in 1..={MAX_SIDE}"),
                ));
            }
        }
        if cells.is_empty() {
            return Err(invalid(
                "cells",
                "[]".into(),
                "a set needs at least one cell".into(),
            ));
        }
        let expected = cells.len() * width * height;
        if pixels.len() != expected {
            return Err(invalid(
                "pixels",
                format!("{} bytes", pixels.len()),
                format!(
                    "{} cells of {width} x {height} need {expected}",
                    cells.len()
                ),
            ));
        }
        let mut labels = String::from(LABELS_HEADER);
        labels.push('\n');
        for (index, cell) in cells.iter().enumerate() {
            if !(cell.probability.is_finite() && (0.0..=1.0).contains(&cell.probability)) {
                return Err(invalid(
                    "probability",
                    cell.probability.to_string(),
                    format!("cell {index}: must lie in [0, 1]"),
                ));
            }
            if cell.source.is_empty() || cell.source.contains(['\t', '\n', '\r']) {
                return Err(invalid(
                    "source",
                    format!("{:?}", cell.source),
                    format!("cell {index}: must be non-empty, without tabs or line breaks"),
                ));
            }
            labels.push_str(&format!(
                "{index}\t{}\t{}\t{}\n",
                cell.source, cell.probability, cell.kind
            ));
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            source_package: "elpv-dataset".into(),
            source_version: source_version.into(),
            width,
            height,
            count: cells.len(),
            cells_file: "cells.bin".into(),
            cells_sha256: sha256_hex(pixels),
            labels_file: "labels.tsv".into(),
        };
        let json = serde_json::to_string_pretty(&manifest)
            .expect("a manifest of strings and integers serialises");
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(|source| ElpvError::Write { path, source })
        };
        std::fs::create_dir_all(dir).map_err(|source| ElpvError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        write("cells.bin", pixels)?;
        write("labels.tsv", labels.as_bytes())?;
        write("manifest.json", json.as_bytes())
    }

    /// The `elpv-dataset` package version the images came from.
    pub fn source_version(&self) -> &str {
        &self.source_version
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    pub fn cells(&self) -> &[Cell] {
        &self.cells
    }

    /// Cell `index`'s pixels, row-major; panics when `index >= len()`, like slicing.
    pub fn pixels(&self, index: usize) -> &[u8] {
        let per_image = self.width * self.height;
        &self.pixels[index * per_image..(index + 1) * per_image]
    }

    /// The cells at `indices` as `N × height × width` floats in [0, 1] (0 is black),
    /// what [`fogmesh_models::DefectCnn`] takes. Panics on an index past the end.
    pub fn images(&self, indices: &[usize]) -> Vec<f32> {
        indices
            .iter()
            .flat_map(|&i| self.pixels(i).iter().map(|&p| f32::from(p) / 255.0))
            .collect()
    }

    /// 1 for a defective cell, 0 for a functional one, at each of `indices`.
    pub fn labels(&self, indices: &[usize]) -> Vec<i64> {
        indices
            .iter()
            .map(|&i| i64::from(self.cells[i].defective()))
            .collect()
    }

    /// A seeded split holding out `test_fraction` of every stratum (defective or not ×
    /// mono or poly), rounded, so both parts keep the set's class and type mix. The
    /// same seed gives the same split.
    pub fn stratified_split(&self, test_fraction: f64, seed: u64) -> Result<Split, ElpvError> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(ElpvError::InvalidOption {
                field: "test_fraction",
                value: test_fraction.to_string(),
                reason: "must lie in (0, 1): both parts need cells".into(),
            });
        }
        let mut rng = SplitMix64::new(seed);
        let mut split = Split {
            train: Vec::new(),
            test: Vec::new(),
        };
        for defective in [false, true] {
            for kind in [CellType::Mono, CellType::Poly] {
                let mut stratum: Vec<usize> = (0..self.len())
                    .filter(|&i| {
                        self.cells[i].defective() == defective && self.cells[i].kind == kind
                    })
                    .collect();
                rng.shuffle(&mut stratum);
                let held_out = (stratum.len() as f64 * test_fraction).round() as usize;
                split.test.extend_from_slice(&stratum[..held_out]);
                split.train.extend_from_slice(&stratum[held_out..]);
            }
        }
        split.train.sort_unstable();
        split.test.sort_unstable();
        Ok(split)
    }
}

fn read_manifest(path: &Path) -> Result<Manifest, ElpvError> {
    let text = std::fs::read_to_string(path).map_err(|source| ElpvError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| ElpvError::Manifest {
        path: path.to_path_buf(),
        reason,
    };
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| bad(format!("not an ELPV manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(bad(format!(
            "format {:?}, expected {FORMAT:?}",
            manifest.format
        )));
    }
    if manifest.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format_version {}, this reader understands {FORMAT_VERSION}",
            manifest.format_version
        )));
    }
    for (field, side) in [("width", manifest.width), ("height", manifest.height)] {
        if !(1..=MAX_SIDE).contains(&side) {
            return Err(bad(format!("{field} {side} is outside 1..={MAX_SIDE}")));
        }
    }
    // Over this many cells, cells.bin would not fit in memory anyway.
    let max_count = (u32::MAX as usize) / (manifest.width * manifest.height);
    if !(1..=max_count).contains(&manifest.count) {
        return Err(bad(format!(
            "count {} is outside 1..={max_count}",
            manifest.count
        )));
    }
    for (field, name) in [
        ("cells_file", &manifest.cells_file),
        ("labels_file", &manifest.labels_file),
    ] {
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(bad(format!(
                "{field} {name:?} must be a file name inside the folder"
            )));
        }
    }
    let hash = &manifest.cells_sha256;
    if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad(format!("cells_sha256 {hash:?} is not 64 hex digits")));
    }
    Ok(manifest)
}

/// The cells of `labels.tsv`, which must hold exactly `count` of them in index order.
fn parse_labels(path: &Path, text: &str, count: usize) -> Result<Vec<Cell>, ElpvError> {
    let bad = |line: usize, reason: String| ElpvError::Labels {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    match lines.next() {
        Some((_, header)) if header == LABELS_HEADER => {}
        Some((_, header)) => {
            return Err(bad(
                1,
                format!("header {header:?}, expected {LABELS_HEADER:?}"),
            ))
        }
        None => return Err(bad(1, "empty file, expected a header".into())),
    }
    let mut cells = Vec::with_capacity(count);
    for (line, text) in lines {
        if text.is_empty() {
            continue;
        }
        let index = cells.len();
        if index == count {
            return Err(bad(
                line,
                format!("more cells than the manifest's count {count}"),
            ));
        }
        let fields: Vec<&str> = text.split('\t').collect();
        let [number, source, probability, kind] = fields[..] else {
            return Err(bad(
                line,
                format!(
                    "{} tab-separated fields, expected 4 (index, source, probability, type)",
                    fields.len()
                ),
            ));
        };
        if number.parse::<usize>().ok() != Some(index) {
            return Err(bad(line, format!("index {number:?}, expected {index}")));
        }
        if source.is_empty() {
            return Err(bad(line, "empty source".into()));
        }
        let probability = match probability.parse::<f64>() {
            Ok(p) if p.is_finite() && (0.0..=1.0).contains(&p) => p,
            _ => {
                return Err(bad(
                    line,
                    format!("probability {probability:?} is not a number in [0, 1]"),
                ))
            }
        };
        let kind = match kind {
            "mono" => CellType::Mono,
            "poly" => CellType::Poly,
            other => {
                return Err(bad(
                    line,
                    format!("type {other:?}, expected \"mono\" or \"poly\""),
                ))
            }
        };
        cells.push(Cell {
            source: source.to_string(),
            probability,
            kind,
        });
    }
    if cells.len() != count {
        return Err(bad(
            text.lines().count(),
            format!("{} cells, the manifest's count is {count}", cells.len()),
        ));
    }
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` cells of 4 × 3 pixels, every fourth poly, probabilities cycling 0, 1/3, 2/3, 1.
    fn small_set(n: usize) -> (Vec<Cell>, Vec<u8>) {
        let cells = (0..n)
            .map(|i| Cell {
                source: format!("images/cell{i:04}.png"),
                probability: (i % 4) as f64 / 3.0,
                kind: if i % 4 == 3 {
                    CellType::Poly
                } else {
                    CellType::Mono
                },
            })
            .collect();
        let pixels = (0..n * 12).map(|i| (i % 251) as u8).collect();
        (cells, pixels)
    }

    fn written(n: usize) -> (tempfile::TempDir, Vec<Cell>, Vec<u8>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cells, pixels) = small_set(n);
        ElpvSet::write(dir.path(), "test", 4, 3, &cells, &pixels).expect("writes");
        (dir, cells, pixels)
    }

    fn error_of(dir: &Path) -> String {
        ElpvSet::open(dir).expect_err("must be refused").to_string()
    }

    #[test]
    fn write_then_open_gives_the_same_cells_pixels_and_labels() {
        let (dir, cells, pixels) = written(10);
        let set = ElpvSet::open(dir.path()).expect("reads");
        assert_eq!((set.width(), set.height(), set.len()), (4, 3, 10));
        assert_eq!(set.source_version(), "test");
        assert_eq!(set.cells(), cells.as_slice());
        assert_eq!(set.pixels(2), &pixels[24..36]);
        let images = set.images(&[1]);
        assert_eq!(images.len(), 12);
        assert_eq!(images[0], f32::from(pixels[12]) / 255.0);
        // 0 and 1/3 are functional, 2/3 and 1 defective.
        assert_eq!(set.labels(&[0, 1, 2, 3]), vec![0, 0, 1, 1]);
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(error_of(dir.path()).contains("manifest.json"));
        let (dir, _, _) = written(4);
        std::fs::remove_file(dir.path().join("cells.bin")).expect("removes");
        assert!(error_of(dir.path()).contains("cells.bin: cannot read"));
        let (dir, _, _) = written(4);
        std::fs::remove_file(dir.path().join("labels.tsv")).expect("removes");
        assert!(error_of(dir.path()).contains("labels.tsv: cannot read"));
    }

    #[test]
    fn short_or_altered_pixels_are_refused() {
        let (dir, _, pixels) = written(4);
        let path = dir.path().join("cells.bin");
        std::fs::write(&path, &pixels[..pixels.len() - 1]).expect("writes");
        let message = error_of(dir.path());
        assert!(
            message.contains("cells.bin") && message.contains("47 bytes"),
            "{message}"
        );
        let mut altered = pixels.clone();
        altered[5] ^= 1;
        std::fs::write(&path, &altered).expect("writes");
        assert!(error_of(dir.path()).contains("sha256"));
    }

    #[test]
    fn bad_label_lines_are_named_by_line() {
        let cases = [
            ("1\timages/x.png\t1.5\tmono", "probability \"1.5\""),
            ("1\timages/x.png\tNaN\tmono", "probability \"NaN\""),
            ("1\timages/x.png\t0\tthin-film", "type \"thin-film\""),
            ("7\timages/x.png\t0\tmono", "index \"7\", expected 1"),
            ("1\timages/x.png\t0", "3 tab-separated fields"),
        ];
        for (replacement, expected) in cases {
            let (dir, _, _) = written(3);
            let path = dir.path().join("labels.tsv");
            let text = std::fs::read_to_string(&path).expect("reads");
            let mut lines: Vec<&str> = text.lines().collect();
            lines[2] = replacement;
            std::fs::write(&path, lines.join("\n")).expect("writes");
            let message = error_of(dir.path());
            assert!(message.contains("labels.tsv:3: "), "{message}");
            assert!(message.contains(expected), "{expected}: {message}");
        }
    }

    #[test]
    fn label_count_and_manifest_fields_must_agree() {
        let (dir, _, _) = written(3);
        let path = dir.path().join("labels.tsv");
        let text = std::fs::read_to_string(&path).expect("reads");
        std::fs::write(&path, format!("{text}3\timages/extra.png\t0\tmono\n")).expect("writes");
        assert!(error_of(dir.path()).contains("more cells than the manifest's count 3"));
        let lines: Vec<&str> = text.lines().take(3).collect();
        std::fs::write(&path, lines.join("\n")).expect("writes");
        assert!(error_of(dir.path()).contains("2 cells, the manifest's count is 3"));

        for (from, to, expected) in [
            ("\"width\": 4", "\"width\": 0", "width 0"),
            ("\"count\": 3", "\"count\": 0", "count 0"),
            ("\"cells.bin\"", "\"../cells.bin\"", "cells_file"),
            ("fogmesh-elpv", "other", "format \"other\""),
        ] {
            let (dir, _, _) = written(3);
            let path = dir.path().join("manifest.json");
            let text = std::fs::read_to_string(&path).expect("reads");
            assert!(text.contains(from), "{text}");
            std::fs::write(&path, text.replace(from, to)).expect("writes");
            let message = error_of(dir.path());
            assert!(
                message.contains("manifest.json") && message.contains(expected),
                "{expected}: {message}"
            );
        }
    }

    #[test]
    fn split_is_stratified_seeded_and_disjoint() {
        let (dir, _, _) = written(400);
        let set = ElpvSet::open(dir.path()).expect("reads");
        let split = set.stratified_split(0.25, 7).expect("valid fraction");
        assert_eq!(split, set.stratified_split(0.25, 7).expect("valid"));
        assert_ne!(split, set.stratified_split(0.25, 8).expect("valid"));
        assert_eq!((split.train.len(), split.test.len()), (300, 100));
        let mut all: Vec<usize> = split.train.iter().chain(&split.test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..400).collect::<Vec<_>>());
        // Strata: functional mono (probability 0 or 1/3), defective mono (2/3), poly (1).
        let held =
            |stratum: &dyn Fn(usize) -> bool| split.test.iter().filter(|&&i| stratum(i)).count();
        assert_eq!(held(&|i| i % 4 < 2), 50);
        assert_eq!(held(&|i| i % 4 == 2), 25);
        assert_eq!(held(&|i| i % 4 == 3), 25);
        for fraction in [0.0, 1.0, f64::NAN] {
            assert!(set.stratified_split(fraction, 7).is_err());
        }
    }
}
