//! `fogmesh demo`: the embedded default. A local fog node watches a simulated
//! Tennessee Eastman plant: one sensor stream per plant unit, one anomaly expert per
//! unit trained on normal operation, and a replay of faulty runs through the real
//! actors, faster than real time.
//!
//! Steps:
//! 1. Read the recordings `just setup` made (`normal-train-N`, `normal-calibration`,
//!    `normal-test`, `idvNN`).
//! 2. Per unit: fit normalisation on the normal training runs, train the expert on
//!    their windows (seconds, with a progress bar), and set the alarm limit at a high
//!    quantile of scores on the calibration run, which the expert never saw: normal
//!    operation wanders from run to run, and a limit set on the training runs would
//!    mistake that wandering for faults.
//! 3. Start a node (sensor streams → router → experts) with those weights and limits.
//! 4. Replay the normal test run and every fault run into the streams, one after
//!    another with a gap between them; print a line whenever a unit goes into alarm.
//! 5. Score the plant-level verdict (any unit in alarm) per window: fault detection
//!    rate and false alarm rate per run, F1 overall, and throughput.
//!
//! Windows that straddle two runs are left out of the scores: they belong to neither.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_actors::replay::{replay, ReplayPlan, ReplayStream};
use fogmesh_actors::{
    Annunciator, BatchingSpec, ExpertSpec, ModelSource, Node, NodeSpec, NormalisationSpec,
    QualityRules, RestartPolicy, RouterSpec, RoutingPolicy, RunningStats, ScoredWindow,
    SensorStreamSpec, Windower, DEFAULT_MAX_CLOCK_SKEW_MS, DEFAULT_MAX_RATE,
    DEFAULT_MAX_SEQUENCE_GAP,
};
use fogmesh_models::{quantile, AutoencoderConfig, ConvAutoencoder, Recording, TrainOptions};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use fogmesh_zoo::evaluation::Confusion;
use fogmesh_zoo::tep::{PlantUnit, UNITS};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Folder with the `.fogrec` recordings.
    pub data_dir: PathBuf,
    /// Wall-clock training budget per expert.
    pub train_seconds: f64,
    pub window: usize,
    pub stride: usize,
    /// Quantile of the calibration run's scores that becomes each expert's alarm limit.
    pub threshold_quantile: f64,
    /// Print a line per alert.
    pub live: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            data_dir: PathBuf::from("data/tep"),
            train_seconds: 6.0,
            window: 20,
            stride: 4,
            threshold_quantile: 0.999,
            live: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("no plant recordings in {dir}: run `just setup` to generate them ({reason})")]
    MissingData { dir: PathBuf, reason: String },
    #[error("{file}: column `{column}` of unit `{unit}` is missing")]
    MissingColumn {
        file: PathBuf,
        unit: &'static str,
        column: &'static str,
    },
    #[error("{file}: {reason}")]
    BadRecording { file: PathBuf, reason: String },
    #[error("expert for unit `{unit}`: {source}")]
    Model {
        unit: &'static str,
        source: fogmesh_models::ModelError,
    },
    #[error(transparent)]
    Spec(#[from] fogmesh_actors::SpecError),
    #[error("replaying {run}: {source}")]
    Replay {
        run: String,
        source: fogmesh_actors::IngestError,
    },
    #[error("{missing} of {expected} windows were not scored within {waited:?}")]
    Incomplete {
        missing: u64,
        expected: u64,
        waited: Duration,
    },
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
}

/// How one unit's expert was trained.
#[derive(Debug, Clone, Serialize)]
pub struct UnitTraining {
    pub unit: &'static str,
    pub channels: usize,
    pub training_windows: usize,
    pub epochs: usize,
    pub best_validation_loss: f64,
    pub threshold: f32,
    pub seconds: f64,
}

/// Scores of one replayed run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub run: String,
    pub fault: Option<u32>,
    pub windows: u64,
    pub detection_rate: Option<f64>,
    pub false_alarm_rate: Option<f64>,
    /// Hours from the fault's onset to the end of the first alarmed window after it.
    pub detection_delay_h: Option<f64>,
    pub confusion: Confusion,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub units: Vec<UnitTraining>,
    pub runs: Vec<RunResult>,
    pub f1: Option<f64>,
    pub detection_rate: Option<f64>,
    pub false_alarm_rate: Option<f64>,
    /// Windows whose verdict was anomalous (each an `Alert` on `WatchAlerts`).
    pub alerts: u64,
    /// Times a unit went into alarm (rising edges after the off-delay).
    pub alarms_raised: u64,
    pub samples_replayed: u64,
    pub windows_scored: u64,
    pub replay_seconds: f64,
    pub windows_per_s: f64,
    pub samples_per_s: f64,
    pub plant_hours_replayed: f64,
    pub total_seconds: f64,
}

/// One replayed recording placed on the node's timeline.
#[derive(Debug, Clone)]
struct Run {
    name: String,
    recording: Arc<Recording>,
    time_offset_us: i64,
    sequence_offset: u64,
    start_us: i64,
    end_us: i64,
    onset_us: Option<i64>,
}

impl Run {
    fn contains(&self, window: &ScoredWindow) -> bool {
        window.start_us >= self.start_us && window.end_us <= self.end_us
    }
}

/// Runs the demo, printing progress and alerts to `out`, and returns the report.
pub async fn run(
    options: &DemoOptions,
    out: &mut (dyn Write + Send),
) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    let data = load_recordings(&options.data_dir)?;
    let (train, calibration, runs) = (&data.train, &data.calibration, data.runs);
    let reference = &train[0];
    writeln!(
        out,
        "fogmesh demo: Tennessee Eastman plant, {} units, {} recorded runs ({})",
        UNITS.len(),
        runs.len(),
        reference.header.source
    )?;
    let mut columns = Vec::with_capacity(UNITS.len());
    for unit in &UNITS {
        let indices =
            unit.column_indices(reference)
                .map_err(|column| DemoError::MissingColumn {
                    file: options.data_dir.join("normal-train-1.fogrec"),
                    unit: unit.name,
                    column,
                })?;
        columns.push(indices);
    }
    let others = train
        .iter()
        .chain([calibration])
        .chain(runs.iter().map(|r| &*r.recording));
    for (k, recording) in others.enumerate() {
        if recording.header.columns != reference.header.columns {
            return Err(DemoError::BadRecording {
                file: options.data_dir.clone(),
                reason: format!("recording {k} has other columns than normal-train-1.fogrec"),
            });
        }
    }

    writeln!(
        out,
        "training one anomaly expert per unit on normal operation ({} runs, {:.0} h)",
        train.len(),
        train.iter().map(hours).sum::<f64>()
    )?;
    let mut experts = Vec::new();
    let mut sensors = Vec::new();
    let mut training = Vec::new();
    for (unit, indices) in UNITS.iter().zip(&columns) {
        let (expert, sensor, report) = train_unit(unit, indices, train, calibration, options)?;
        writeln!(
            out,
            "  {:<11} {:>2} channels  {:>5} windows  {:>3} epochs  validation loss {:.4}  limit {:.4}  {:.1} s",
            report.unit,
            report.channels,
            report.training_windows,
            report.epochs,
            report.best_validation_loss,
            report.threshold,
            report.seconds
        )?;
        experts.push(expert);
        sensors.push(sensor);
        training.push(report);
    }
    let routes = UNITS
        .iter()
        .map(|u| (u.name.to_string(), vec![expert_name(u)]))
        .collect();
    let spec = NodeSpec {
        node: "demo-edge".into(),
        sensors,
        routers: vec![RouterSpec {
            name: "plant".into(),
            policy: RoutingPolicy::Static { routes },
            optional: Vec::new(),
        }],
        experts,
        remote_experts: Vec::new(),
        restart: RestartPolicy::default(),
    };

    let annunciator = Annunciator::new(1 << 16);
    let scored_rx = annunciator.subscribe();
    let (node, join) = Node::start(spec, annunciator).await?;
    writeln!(
        out,
        "node `{}` up: {} sensor streams → router `plant` → {} experts",
        node.name,
        UNITS.len(),
        UNITS.len()
    )?;
    writeln!(
        out,
        "replaying {} runs as fast as the node acknowledges:",
        runs.len()
    )?;
    let timeline = Arc::new(runs);
    let collector = tokio::spawn(collect(scored_rx, timeline.clone(), options.live));

    let replay_started = Instant::now();
    let mut samples_replayed = 0;
    for run in timeline.iter() {
        let plan = ReplayPlan {
            streams: UNITS
                .iter()
                .zip(&columns)
                .map(|(u, c)| ReplayStream {
                    sensor_id: u.name.to_string(),
                    columns: c.clone(),
                })
                .collect(),
            batch_rows: 40,
            speedup: None,
            sequence_offset: run.sequence_offset,
            time_offset_us: run.time_offset_us,
        };
        let report = replay(&node, &run.recording, &plan)
            .await
            .map_err(|source| DemoError::Replay {
                run: run.name.clone(),
                source,
            })?;
        samples_replayed += report.samples;
    }
    let expected: u64 = node.snapshot().sensors.iter().map(|s| s.windows).sum();
    let waited = Instant::now();
    let limit = Duration::from_secs(60);
    loop {
        let snapshot = node.snapshot();
        let settled: u64 = snapshot.routers.iter().map(|r| r.routed + r.failed).sum();
        if settled >= expected {
            break;
        }
        if waited.elapsed() > limit {
            return Err(DemoError::Incomplete {
                missing: expected - settled,
                expected,
                waited: limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let replay_seconds = replay_started.elapsed().as_secs_f64();
    let alerts = node.annunciator.alerts();
    node.shutdown(join).await;
    // The collector ends when the last annunciator handle is gone; the node holds one.
    drop(node);
    let collected = collector.await.expect("the collector does not panic");
    for line in &collected.lines {
        writeln!(out, "{line}")?;
    }
    if collected.missed > 0 {
        writeln!(
            out,
            "warning: the report missed {} scored windows (subscriber lagged)",
            collected.missed
        )?;
    }

    let (runs, overall) = score_runs(&timeline, &collected.windows);
    let plant_hours: f64 = timeline.iter().map(|r| hours(&r.recording)).sum();
    let windows_scored = collected.windows.len() as u64;
    let report = DemoReport {
        units: training,
        runs,
        f1: overall.f1(),
        detection_rate: overall.detection_rate(),
        false_alarm_rate: overall.false_alarm_rate(),
        alerts,
        alarms_raised: collected.alarms_raised,
        samples_replayed,
        windows_scored,
        replay_seconds,
        windows_per_s: windows_scored as f64 / replay_seconds,
        samples_per_s: samples_replayed as f64 / replay_seconds,
        plant_hours_replayed: plant_hours,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    print_report(out, &report)?;
    Ok(report)
}

fn expert_name(unit: &PlantUnit) -> String {
    format!("{}-ae", unit.name)
}

fn hours(recording: &Recording) -> f64 {
    recording.rows() as f64 * recording.header.sample_period_s / 3600.0
}

/// The recordings the demo uses, by role.
struct PlantData {
    train: Vec<Recording>,
    calibration: Recording,
    runs: Vec<Run>,
}

fn load_recordings(dir: &Path) -> Result<PlantData, DemoError> {
    let read = |name: &str| {
        let path = dir.join(format!("{name}.fogrec"));
        if !path.exists() {
            return Err(DemoError::MissingData {
                dir: dir.to_path_buf(),
                reason: format!("{} not found", path.display()),
            });
        }
        Recording::read(&path).map_err(|e| DemoError::BadRecording {
            file: path.clone(),
            reason: e.to_string(),
        })
    };
    let stems: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| DemoError::MissingData {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        })?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".fogrec").map(str::to_string)
        })
        .collect();
    let with_prefix = |prefix: &str| {
        let mut names: Vec<&String> = stems.iter().filter(|s| s.starts_with(prefix)).collect();
        names.sort();
        names
    };
    let train = with_prefix("normal-train-")
        .into_iter()
        .map(|name| read(name))
        .collect::<Result<Vec<_>, _>>()?;
    if train.is_empty() {
        return Err(DemoError::MissingData {
            dir: dir.to_path_buf(),
            reason: "no normal-train-N.fogrec".into(),
        });
    }
    let calibration = read("normal-calibration")?;
    let mut names = vec!["normal-test".to_string()];
    names.extend(with_prefix("idv").into_iter().cloned());
    // Runs follow each other on the node's timeline with an hour of silence between
    // them, so no window mixes two runs without being recognisable as such.
    let gap_us = 3_600_000_000;
    let mut runs = Vec::with_capacity(names.len());
    let mut next_start_us = 0i64;
    let mut next_sequence = 0u64;
    for name in names {
        let recording = Arc::new(read(&name)?);
        if recording.rows() == 0 {
            return Err(DemoError::BadRecording {
                file: dir.join(format!("{name}.fogrec")),
                reason: "it has no rows".into(),
            });
        }
        let time_offset_us = next_start_us - recording.timestamp_us(0);
        let start_us = next_start_us;
        let end_us = recording.timestamp_us(recording.rows() - 1) + time_offset_us;
        let onset_us = recording
            .header
            .fault_onset_row
            .filter(|_| recording.header.fault.is_some())
            .map(|row| recording.timestamp_us(row as usize) + time_offset_us);
        next_start_us = end_us + gap_us;
        let sequence_offset = next_sequence;
        next_sequence += recording.rows() as u64;
        runs.push(Run {
            name,
            recording,
            time_offset_us,
            sequence_offset,
            start_us,
            end_us,
            onset_us,
        });
    }
    Ok(PlantData {
        train,
        calibration,
        runs,
    })
}

/// Rows of `recording` restricted to `columns`, row-major.
fn unit_rows(recording: &Recording, columns: &[usize], rows: std::ops::Range<usize>) -> Vec<f32> {
    rows.flat_map(|r| {
        let row = recording.row(r);
        columns.iter().map(move |&c| row[c])
    })
    .collect()
}

fn train_unit(
    unit: &'static PlantUnit,
    columns: &[usize],
    train: &[Recording],
    calibration: &Recording,
    options: &DemoOptions,
) -> Result<(ExpertSpec, SensorStreamSpec, UnitTraining), DemoError> {
    let started = Instant::now();
    let channels = columns.len();
    let train_rows: Vec<Vec<f32>> = train
        .iter()
        .map(|r| unit_rows(r, columns, 0..r.rows()))
        .collect();
    let calibration_rows = unit_rows(calibration, columns, 0..calibration.rows());
    let mut stats = RunningStats::new(channels);
    for row in train_rows.iter().flat_map(|rows| rows.chunks(channels)) {
        stats.update(row);
    }
    let (mean, std) = (stats.mean(), stats.std());
    let normalisation = NormalisationSpec::Frozen {
        mean: mean.clone(),
        std: std.clone(),
    };
    // Dense windows (stride 1) for training and calibration; the live stream uses the
    // configured stride.
    let model_err = |source| DemoError::Model {
        unit: unit.name,
        source,
    };
    // Windows never span two runs.
    let fit_windows: Vec<f32> = train_rows
        .iter()
        .flat_map(|rows| windows_of(rows, channels, options.window, &normalisation))
        .collect();
    let calibration_windows =
        windows_of(&calibration_rows, channels, options.window, &normalisation);
    let config = AutoencoderConfig {
        channels: channels as i64,
        window: options.window as i64,
        hidden: 32,
        bottleneck: 3,
        kernel: 5,
    };
    let mut model = ConvAutoencoder::new(config.clone(), fogmesh_models::default_device(), 7)
        .map_err(model_err)?;
    let train_options = TrainOptions {
        epochs: 200,
        batch_size: 64,
        learning_rate: 2e-3,
        validation_fraction: 0.15,
        patience: 8,
        seed: 7,
        max_seconds: Some(options.train_seconds),
    };
    let bar = ProgressBar::new(train_options.epochs as u64);
    bar.set_style(
        ProgressStyle::with_template("  {prefix:<11} {bar:30.cyan/blue} epoch {pos:>3} {msg}")
            .expect("the progress template is valid"),
    );
    bar.set_prefix(unit.name);
    let report = model
        .fit(&fit_windows, &train_options, &mut |epoch| {
            bar.set_position(epoch.epoch as u64);
            bar.set_message(format!(
                "loss {:.4} val {:.4} {:>6.0} windows/s",
                epoch.train_loss, epoch.validation_loss, epoch.samples_per_s
            ));
        })
        .map_err(model_err)?;
    bar.finish_and_clear();
    let calibration_scores = model.score(&calibration_windows).map_err(model_err)?;
    let threshold = quantile(&calibration_scores, options.threshold_quantile).map_err(model_err)?;
    let (weights, sha256) = model.to_safetensors().map_err(model_err)?;
    let expert = ExpertSpec {
        name: expert_name(unit),
        model_version: format!("tep-{}", &sha256[..12]),
        config,
        threshold: Some(threshold),
        batching: BatchingSpec::default(),
        intra_op_threads: 1,
        source: ModelSource::Autoencoder {
            weights: Some(weights.into()),
            weights_sha256: Some(sha256),
            seed: 7,
        },
    };
    let sensor = SensorStreamSpec {
        id: unit.name.to_string(),
        channels,
        window: options.window,
        stride: options.stride,
        normalisation,
        quality: quality_rules(
            &train_rows.concat(),
            channels,
            calibration.header.sample_period_s,
        ),
        router: "plant".into(),
        max_sequence_gap: DEFAULT_MAX_SEQUENCE_GAP,
        max_clock_skew_ms: DEFAULT_MAX_CLOCK_SKEW_MS,
        max_rate: DEFAULT_MAX_RATE,
    };
    let training = UnitTraining {
        unit: unit.name,
        channels,
        training_windows: fit_windows.len() / (channels * options.window),
        epochs: report.epochs_run,
        best_validation_loss: report.best_validation_loss,
        threshold,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((expert, sensor, training))
}

/// Normalised windows of `rows` (row-major), stride 1, flat and channel-major.
fn windows_of(
    rows: &[f32],
    channels: usize,
    window: usize,
    normalisation: &NormalisationSpec,
) -> Vec<f32> {
    let mut normaliser = fogmesh_actors::Normaliser::new(normalisation, channels);
    let mut windower = Windower::new(channels, window, 1);
    let mut flat = Vec::new();
    for (t, row) in rows.chunks(channels).enumerate() {
        let mut row = row.to_vec();
        normaliser.apply(&mut row);
        if let Some(cut) = windower.push(t as u64, t as i64, &row, Default::default()) {
            flat.extend_from_slice(&cut.values);
        }
    }
    flat
}

/// Engineering ranges from normal operation, widened by half their span on each side;
/// a gap is a missing sample or more.
fn quality_rules(rows: &[f32], channels: usize, period_s: f64) -> QualityRules {
    let mut ranges = vec![[f32::INFINITY, f32::NEG_INFINITY]; channels];
    for row in rows.chunks(channels) {
        for (range, &v) in ranges.iter_mut().zip(row) {
            range[0] = range[0].min(v);
            range[1] = range[1].max(v);
        }
    }
    for range in &mut ranges {
        let span = (range[1] - range[0]).max(1e-3);
        *range = [range[0] - 0.5 * span, range[1] + 0.5 * span];
    }
    QualityRules {
        ranges,
        stuck_after: None,
        max_gap_us: Some((period_s * 1.5e6) as i64),
    }
}

struct Collected {
    windows: Vec<Arc<ScoredWindow>>,
    /// Rising edges: a unit going into alarm.
    alarms_raised: u64,
    lines: Vec<String>,
    missed: u64,
}

/// A unit's alarm clears after this many consecutive normal windows (an off-delay, as
/// alarm management practice has it), so a fault whose score hovers at the limit raises
/// one alarm, not one per crossing.
const ALARM_CLEARS_AFTER: u32 = 5;

/// Gathers every scored window; prints an alert line when a unit goes into alarm
/// (a rising edge, as an annunciator panel lights up), not for every window in alarm.
async fn collect(
    mut scored: tokio::sync::broadcast::Receiver<Arc<ScoredWindow>>,
    timeline: Arc<Vec<Run>>,
    live: bool,
) -> Collected {
    let mut windows = Vec::new();
    let mut missed = 0;
    // Per unit: consecutive normal windows since its last anomalous one.
    let mut quiet: HashMap<Arc<str>, u32> = HashMap::new();
    let mut alarms_raised = 0;
    let mut lines = Vec::new();
    loop {
        match scored.recv().await {
            Ok(window) => {
                let since = quiet
                    .entry(window.sensor_id.clone())
                    .or_insert(ALARM_CLEARS_AFTER);
                let was_in_alarm = *since < ALARM_CLEARS_AFTER;
                *since = if window.anomalous {
                    0
                } else {
                    since.saturating_add(1)
                };
                if window.anomalous && !was_in_alarm {
                    alarms_raised += 1;
                    if let Some(run) = timeline.iter().find(|r| r.contains(&window)) {
                        let t_h = (window.end_us - run.start_us) as f64 / 3.6e9;
                        let limit = window
                            .experts
                            .first()
                            .map_or(0.0, |e| e.score / e.threshold);
                        let flags: Vec<&str> = window.quality.iter().map(|f| f.as_str()).collect();
                        let line = format!(
                            "  ALERT {:<12} t={:>6.2} h  {:<11} score {:>6.2}x limit{}",
                            run.name,
                            t_h,
                            window.sensor_id,
                            limit,
                            if flags.is_empty() {
                                String::new()
                            } else {
                                format!("  [{}]", flags.join(","))
                            }
                        );
                        if live {
                            println!("{line}");
                        } else {
                            lines.push(line);
                        }
                    }
                }
                windows.push(window);
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => missed += n,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    Collected {
        windows,
        alarms_raised,
        lines,
        missed,
    }
}

fn score_runs(timeline: &[Run], windows: &[Arc<ScoredWindow>]) -> (Vec<RunResult>, Confusion) {
    // Plant-level verdict per window position: in alarm if any unit is.
    let mut plant: BTreeMap<i64, (i64, bool)> = BTreeMap::new();
    for w in windows {
        let entry = plant.entry(w.start_us).or_insert((w.end_us, false));
        entry.1 |= w.anomalous;
    }
    let mut overall = Confusion::default();
    let mut results = Vec::with_capacity(timeline.len());
    for run in timeline {
        let mut confusion = Confusion::default();
        let mut first_alarm_after_onset: Option<i64> = None;
        for (&start_us, &(end_us, alarmed)) in plant.range(run.start_us..=run.end_us) {
            if end_us > run.end_us {
                continue;
            }
            // A window is faulty once it starts at or after the onset; windows that
            // straddle the onset are neither, like windows that straddle two runs.
            let faulty = match run.onset_us {
                Some(onset) if start_us >= onset => true,
                Some(onset) if end_us >= onset => continue,
                _ => false,
            };
            confusion.record(faulty, alarmed);
            if faulty && alarmed && first_alarm_after_onset.is_none() {
                first_alarm_after_onset = Some(end_us);
            }
        }
        overall.merge(&confusion);
        results.push(RunResult {
            run: run.name.clone(),
            fault: run.recording.header.fault,
            windows: confusion.true_positive
                + confusion.false_positive
                + confusion.true_negative
                + confusion.false_negative,
            detection_rate: confusion.detection_rate(),
            false_alarm_rate: confusion.false_alarm_rate(),
            detection_delay_h: run
                .onset_us
                .zip(first_alarm_after_onset)
                .map(|(onset, alarm)| (alarm - onset) as f64 / 3.6e9),
            confusion,
        });
    }
    (results, overall)
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "    -".to_string(), |v| format!("{:>5.1}", v * 100.0))
}

fn print_report(out: &mut (dyn Write + Send), report: &DemoReport) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "  run          fault  windows   FDR %   FAR %   first alarm after onset"
    )?;
    for run in &report.runs {
        writeln!(
            out,
            "  {:<12} {:>5} {:>8}   {}   {}   {}",
            run.run,
            run.fault.map_or_else(|| "-".to_string(), |f| f.to_string()),
            run.windows,
            percent(run.detection_rate),
            percent(run.false_alarm_rate),
            run.detection_delay_h
                .map_or_else(|| "-".to_string(), |h| format!("{:.2} h", h)),
        )?;
    }
    writeln!(
        out,
        "\n  overall: F1 {}  FDR {} %  FAR {} %  ({} windows in alarm, {} alarms raised)",
        report
            .f1
            .map_or_else(|| "-".to_string(), |f| format!("{f:.3}")),
        percent(report.detection_rate).trim(),
        percent(report.false_alarm_rate).trim(),
        report.alerts,
        report.alarms_raised
    )?;
    writeln!(
        out,
        "  throughput: {} samples and {} windows in {:.2} s = {:.0} samples/s, {:.0} windows/s ({:.0} plant hours, {:.0}x real time)",
        report.samples_replayed,
        report.windows_scored,
        report.replay_seconds,
        report.samples_per_s,
        report.windows_per_s,
        report.plant_hours_replayed,
        report.plant_hours_replayed * 3600.0 / report.replay_seconds
    )?;
    writeln!(out, "  total {:.1} s", report.total_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fogmesh_models::RecordingHeader;

    fn run_with_onset(rows: usize, onset_row: Option<u64>) -> Run {
        let header = RecordingHeader {
            source: "test".into(),
            columns: vec!["x".into()],
            sample_period_s: 1.0,
            start_timestamp_us: 0,
            rows: rows as u64,
            fault: onset_row.map(|_| 1),
            fault_onset_row: onset_row,
            seed: None,
            description: String::new(),
        };
        let recording = Recording::new(header, vec![0.0; rows]).unwrap();
        Run {
            name: "idv01".into(),
            end_us: recording.timestamp_us(rows - 1),
            onset_us: onset_row.map(|r| recording.timestamp_us(r as usize)),
            recording: Arc::new(recording),
            time_offset_us: 0,
            sequence_offset: 0,
            start_us: 0,
        }
    }

    fn window(sensor: &str, start_s: i64, end_s: i64, anomalous: bool) -> Arc<ScoredWindow> {
        Arc::new(ScoredWindow {
            sensor_id: sensor.into(),
            router: "plant".into(),
            window_sequence: 0,
            start_us: start_s * 1_000_000,
            end_us: end_s * 1_000_000,
            quality: Default::default(),
            score: if anomalous { 2.0 } else { 0.1 },
            anomalous,
            experts: Vec::new(),
            values: Arc::from([]),
            late: None,
        })
    }

    #[test]
    fn plant_verdict_is_any_unit_and_onset_straddlers_are_left_out() {
        let timeline = vec![run_with_onset(20, Some(10))];
        let windows = vec![
            // Before the onset: one false alarm (from one unit of two).
            window("a", 0, 4, false),
            window("b", 0, 4, true),
            window("a", 4, 8, false),
            window("b", 4, 8, false),
            // Straddles the onset at 10 s: neither normal nor faulty.
            window("a", 8, 12, true),
            // After the onset: one detected, one missed.
            window("a", 12, 16, true),
            window("a", 15, 19, false),
            // Runs past the end of the run: left out.
            window("a", 18, 22, true),
        ];
        let (results, overall) = score_runs(&timeline, &windows);
        let c = results[0].confusion;
        assert_eq!(
            (
                c.true_positive,
                c.false_negative,
                c.false_positive,
                c.true_negative
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(results[0].detection_delay_h, Some(6.0 / 3600.0));
        assert_eq!(overall, c);
    }
}

/// The demo as a user runs it, shortened, on the recordings `just setup` generates: it asserts behaviour (faults are detected, normal operation mostly is not, every window comes back), not speed.
#[cfg(test)]
mod scenario_tests {
    use std::path::PathBuf;

    use super::{run, DemoOptions};

    fn tep_data() -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/tep");
        assert!(
            dir.join("manifest.json").exists(),
            "{} has no TEP recordings: run `just setup` first",
            dir.display()
        );
        dir
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demo_detects_plant_faults_on_real_recordings() {
        let options = DemoOptions {
            data_dir: tep_data(),
            train_seconds: 2.0,
            live: false,
            ..Default::default()
        };
        let mut out = Vec::new();
        let report = run(&options, &mut out).await.expect("the demo runs");
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("overall: F1"), "{text}");
        let run = |name: &str| {
            report
                .runs
                .iter()
                .find(|r| r.run == name)
                .unwrap_or_else(|| panic!("{name} replayed"))
        };
        // IDV 1 (A/C feed ratio step) is detected by every method in the literature.
        assert!(
            run("idv01").detection_rate.unwrap() > 0.9,
            "{:?}",
            run("idv01")
        );
        assert!(
            run("normal-test").false_alarm_rate.unwrap() < 0.2,
            "{:?}",
            run("normal-test")
        );
        assert!(report.f1.unwrap() > 0.8, "F1 {:?}", report.f1);
        let expected: u64 = report.runs.iter().map(|r| r.windows).sum();
        assert!(
            report.windows_scored >= expected,
            "every evaluated window was scored"
        );
    }
}
