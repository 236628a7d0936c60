//! SKAB, the Skoltech Anomaly Benchmark: a water-pump test rig with 8 sensors sampled at
//! 1 Hz, 34 runs each holding one labelled anomaly (valve closures, leaks, rotor
//! imbalance, cavitation, …) plus one anomaly-free run.
//!
//! Files are `;`-separated CSV with a `datetime` column, the 8 sensor columns in
//! [`SENSORS`], and the `anomaly` and `changepoint` labels (0 or 1). The benchmark's
//! runs are `valve1/*.csv`, `valve2/*.csv` and `other/*.csv`, read in that order and by
//! number within a folder, so results never depend on directory listing order.
//!
//! fogmesh does not ship SKAB (GPL-3.0 data): tests and evaluations read it from where
//! the caller says. Every refusal names the file, the line and the column.

use std::path::{Path, PathBuf};

/// The sensor columns, in the order their values are kept.
pub const SENSORS: [&str; 8] = [
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
];

/// The folders of the benchmark's labelled runs.
pub const RUN_FOLDERS: [&str; 3] = ["valve1", "valve2", "other"];

/// Why a SKAB file or folder could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SkabError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: the header lacks column `{column}` (SKAB files have datetime;{};anomaly;changepoint)", path.display(), SENSORS.join(";"))]
    MissingColumn { path: PathBuf, column: String },
    #[error("{}:{line}: column `{column}` = {value:?}: {reason}", path.display())]
    Value {
        path: PathBuf,
        line: usize,
        column: String,
        value: String,
        reason: &'static str,
    },
    #[error("{}:{line}: {got} fields, the header has {expected}", path.display())]
    Fields {
        path: PathBuf,
        line: usize,
        expected: usize,
        got: usize,
    },
    #[error("{}: not readable as CSV: {source}", path.display())]
    Csv { path: PathBuf, source: csv::Error },
    #[error("{}: no data rows", path.display())]
    Empty { path: PathBuf },
    #[error("{}: no SKAB runs here (expected folders {})", path.display(), RUN_FOLDERS.join(", "))]
    NoRuns { path: PathBuf },
}

/// One SKAB run.
#[derive(Debug, Clone, PartialEq)]
pub struct SkabRun {
    /// `folder/number`, e.g. `valve1/3`.
    pub name: String,
    /// Row-major: `rows` rows of the 8 [`SENSORS`].
    pub values: Vec<f32>,
    pub anomaly: Vec<bool>,
    pub changepoint: Vec<bool>,
}

impl SkabRun {
    pub fn rows(&self) -> usize {
        self.anomaly.len()
    }

    /// Row `i`'s sensor values.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * SENSORS.len()..(i + 1) * SENSORS.len()]
    }

    /// Reads one SKAB CSV file.
    pub fn read(path: &Path, name: impl Into<String>) -> Result<SkabRun, SkabError> {
        let text = std::fs::read_to_string(path).map_err(|source| SkabError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        SkabRun::parse(&text, path, name.into())
    }

    /// Parses SKAB CSV text as if read from `path`.
    pub fn parse(text: &str, path: &Path, name: String) -> Result<SkabRun, SkabError> {
        let csv_error = |source| SkabError::Csv {
            path: path.to_path_buf(),
            source,
        };
        // Flexible: a row with the wrong number of fields is refused here, naming its
        // line and both counts, rather than by the reader with less to say.
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(b';')
            .trim(csv::Trim::All)
            .flexible(true)
            .from_reader(text.as_bytes());
        let header: Vec<String> = reader
            .headers()
            .map_err(csv_error)?
            .iter()
            .map(str::to_string)
            .collect();
        let column = |name: &str| {
            header
                .iter()
                .position(|h| h == name)
                .ok_or_else(|| SkabError::MissingColumn {
                    path: path.to_path_buf(),
                    column: name.to_string(),
                })
        };
        let sensors = SENSORS
            .iter()
            .map(|s| column(s))
            .collect::<Result<Vec<_>, _>>()?;
        let anomaly_at = column("anomaly")?;
        let changepoint_at = column("changepoint")?;
        let mut run = SkabRun {
            name,
            values: Vec::new(),
            anomaly: Vec::new(),
            changepoint: Vec::new(),
        };
        for record in reader.records() {
            let fields = record.map_err(csv_error)?;
            let line_number = fields.position().map_or(0, |p| p.line() as usize);
            if fields.len() != header.len() {
                return Err(SkabError::Fields {
                    path: path.to_path_buf(),
                    line: line_number,
                    expected: header.len(),
                    got: fields.len(),
                });
            }
            let bad = |at: usize, reason: &'static str| SkabError::Value {
                path: path.to_path_buf(),
                line: line_number,
                column: header[at].clone(),
                value: fields[at].to_string(),
                reason,
            };
            for &at in &sensors {
                let value: f32 = fields[at].parse().map_err(|_| bad(at, "not a number"))?;
                if !value.is_finite() {
                    return Err(bad(at, "not a finite number"));
                }
                run.values.push(value);
            }
            let label = |at: usize| match fields[at].parse::<f32>() {
                Ok(0.0) => Ok(false),
                Ok(1.0) => Ok(true),
                _ => Err(bad(at, "a label must be 0 or 1")),
            };
            run.anomaly.push(label(anomaly_at)?);
            run.changepoint.push(label(changepoint_at)?);
        }
        if run.anomaly.is_empty() {
            return Err(SkabError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(run)
    }
}

/// Reads the benchmark's labelled runs under `dir` (the SKAB `data` folder).
pub fn read_benchmark(dir: &Path) -> Result<Vec<SkabRun>, SkabError> {
    let mut runs = Vec::new();
    for folder in RUN_FOLDERS {
        let path = dir.join(folder);
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        let mut numbered: Vec<(u32, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter_map(|p| {
                let number = p.file_stem()?.to_str()?.parse().ok()?;
                (p.extension()? == "csv").then_some((number, p))
            })
            .collect();
        numbered.sort();
        for (number, file) in numbered {
            runs.push(SkabRun::read(&file, format!("{folder}/{number}"))?);
        }
    }
    if runs.is_empty() {
        return Err(SkabError::NoRuns {
            path: dir.to_path_buf(),
        });
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "datetime;Accelerometer1RMS;Accelerometer2RMS;Current;Pressure;Temperature;Thermocouple;Voltage;Volume Flow RateRMS;anomaly;changepoint";

    fn parse(text: &str) -> Result<SkabRun, String> {
        SkabRun::parse(text, Path::new("valve1/3.csv"), "valve1/3".into())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn rows_and_labels_are_read_in_sensor_order() {
        let text = format!(
            "{HEADER}\n2020-03-09 10:14:33;0.1;0.2;1.3;0.05;79.3;26.0;233.0;32.0;0.0;0.0\n2020-03-09 10:14:34;0.2;0.3;1.4;0.06;79.4;26.1;234.0;33.0;1.0;1.0\n"
        );
        let run = parse(&text).unwrap();
        assert_eq!(run.rows(), 2);
        assert_eq!(run.row(1), &[0.2, 0.3, 1.4, 0.06, 79.4, 26.1, 234.0, 33.0]);
        assert_eq!(run.anomaly, vec![false, true]);
        assert_eq!(run.changepoint, vec![false, true]);
    }

    #[test]
    fn bad_files_are_refused_naming_file_line_and_column() {
        let row = "2020-03-09 10:14:33;0.1;0.2;1.3;0.05;79.3;26.0;233.0;32.0;0.0;0.0";
        for (text, needles) in [
            (
                format!("{}\n{row}\n", HEADER.replace(";Current", "")),
                vec!["valve1/3.csv", "`Current`"],
            ),
            (
                format!("{HEADER}\n{}\n", row.replace("1.3", "NaN")),
                vec!["valve1/3.csv:2", "`Current`", "finite"],
            ),
            (
                format!("{HEADER}\n{}\n", row.replace("1.3", "x")),
                vec![":2", "`Current`", "not a number"],
            ),
            (
                format!("{HEADER}\n{row}\n{}\n", row.replace(";0.0;0.0", ";0.5;0.0")),
                vec![":3", "`anomaly`", "0 or 1"],
            ),
            (
                format!("{HEADER}\n{}\n", &row[..row.len() - 4]),
                vec![":2", "10 fields", "11"],
            ),
            (format!("{HEADER}\n"), vec!["no data rows"]),
            (
                format!("{HEADER}\n\n{row}\n{}\n", row.replace("1.3", "x")),
                vec!["valve1/3.csv:4", "`Current`"],
            ),
        ] {
            let error = parse(&text).expect_err("refused");
            for needle in needles {
                assert!(error.contains(needle), "`{needle}` not in: {error}");
            }
        }
    }
}
