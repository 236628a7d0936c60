//! The ingest benchmark (`fogmesh bench ingest`): how many samples a node acknowledges
//! per second when every acknowledgement means "on disk", and what that costs against
//! the same run with the edge log in memory.
//!
//! Two phases of equal length, each on a fresh node in this process: the edge log in a
//! folder on disk (`--dir`, a temporary one by default: put it on the disk a node
//! would use), then in memory. In each, one producer per sensor pushes batches of
//! `--batch` samples in a closed loop (the next batch once the last is acknowledged),
//! so the streams' appends meet in the log's group commits as a plant's gateways'
//! would. Windows are long (one per `WINDOW` samples of a stream) so scoring stays a
//! small share of the work and the figure is ingest's. The report gives acknowledged
//! samples per second, the time from push to acknowledgement (p50, p99), and commits
//! (fsyncs on disk) per second.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_actors::{
    Annunciator, BatchingSpec, EdgeStorage, ExpertSpec, ModelSource, Node, NodeSpec,
    NormalisationSpec, OutboxLimits, QualityRules, RestartPolicy, RouterSpec, RoutingPolicy,
    Sample, SensorStreamSpec, DEFAULT_MAX_CLOCK_SKEW_MS, DEFAULT_MAX_SEQUENCE_GAP,
};
use fogmesh_edge_log::{EdgeLog, EdgeLogError};
use fogmesh_models::AutoencoderConfig;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{latency_histogram, not_positive};

/// Samples per window (and per stride): one window per this many samples of a stream.
const WINDOW: usize = 256;
const CHANNELS: usize = 2;
/// The first second of each phase warms connections, pools and the file.
const WARM_UP: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchIngestOptions {
    pub seconds: f64,
    pub sensors: usize,
    /// Samples per pushed batch.
    pub batch: usize,
    /// Where the durable phase keeps its log; `None`: a temporary folder.
    pub dir: Option<PathBuf>,
}

impl Default for BenchIngestOptions {
    fn default() -> Self {
        BenchIngestOptions {
            seconds: 10.0,
            sensors: 64,
            batch: 100,
            dir: None,
        }
    }
}

/// One JSON object on stdout.
#[derive(Debug, Serialize)]
pub struct BenchIngestReport {
    pub workload: &'static str,
    pub sensors: usize,
    pub batch: usize,
    pub seconds_per_phase: f64,
    pub log_dir: String,
    pub durable_samples_per_s: f64,
    pub memory_samples_per_s: f64,
    /// `durable_samples_per_s / memory_samples_per_s`; the target is at least 0.5.
    pub durable_over_memory: f64,
    pub p50_ack_ms: f64,
    pub p99_ack_ms: f64,
    pub mean_ack_ms: f64,
    pub acks: u64,
    pub memory_p50_ack_ms: f64,
    pub memory_p99_ack_ms: f64,
    /// Commits of the durable phase per second: one fsync each.
    pub fsyncs_per_s: f64,
    pub samples_per_fsync: f64,
    /// Pushes that were refused (none expected).
    pub refused: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchIngestError {
    #[error("{what} must be positive, not {value}")]
    Option { what: &'static str, value: f64 },
    #[error("the benchmark's log folder")]
    Io(#[from] std::io::Error),
    #[error("the benchmark's edge log")]
    Log(#[from] EdgeLogError),
    #[error("the benchmark's node")]
    Node(#[from] fogmesh_actors::SpecError),
}

struct Phase {
    samples_per_s: f64,
    latency: Histogram<u64>,
    commits_per_s: f64,
    samples_per_commit: f64,
    refused: u64,
}

fn sensor_id(s: usize) -> String {
    format!("sensor-{s:03}")
}

fn node_spec(sensors: usize) -> NodeSpec {
    let routes: HashMap<String, Vec<String>> = (0..sensors)
        .map(|s| (sensor_id(s), vec!["ae".to_string()]))
        .collect();
    NodeSpec {
        node: "ingest-bench".into(),
        sensors: (0..sensors)
            .map(|s| SensorStreamSpec {
                id: sensor_id(s),
                channels: CHANNELS,
                window: WINDOW,
                stride: WINDOW,
                normalisation: NormalisationSpec::Online,
                quality: QualityRules::default(),
                router: "plant".into(),
                max_sequence_gap: DEFAULT_MAX_SEQUENCE_GAP,
                max_clock_skew_ms: DEFAULT_MAX_CLOCK_SKEW_MS,
                max_rate: 1e9,
            })
            .collect(),
        routers: vec![RouterSpec {
            name: "plant".into(),
            policy: RoutingPolicy::Static { routes },
            optional: Vec::new(),
        }],
        experts: vec![ExpertSpec {
            name: "ae".into(),
            model_version: "ingest-bench".into(),
            config: AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64),
            threshold: Some(1_000.0),
            batching: BatchingSpec {
                max_batch: 64,
                max_wait_us: 2_000,
            },
            intra_op_threads: 1,
            source: ModelSource::seeded(7),
        }],
        remote_experts: Vec::new(),
        restart: RestartPolicy::default(),
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// One producer: batches of `batch` samples of `sensor` until `stop`; records each
/// acknowledgement's round trip once `measuring` is set.
async fn produce(
    node: Node,
    sensor: String,
    batch: usize,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> (Histogram<u64>, u64, u64) {
    let mut latency = latency_histogram();
    let (mut acked, mut refused, mut next) = (0u64, 0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let at = now_us();
        let samples: Vec<Sample> = (next..next + batch as u64)
            .map(|sequence| Sample {
                sequence,
                timestamp_us: at,
                values: vec![
                    (sequence as f32 * 0.1).sin(),
                    (sequence as f32 * 0.07).cos(),
                ],
            })
            .collect();
        let started = Instant::now();
        let outcome = node.push(&sensor, samples).await;
        let measured = measuring.load(Ordering::Relaxed);
        match outcome {
            Ok(ack) => {
                next += batch as u64;
                if measured {
                    acked += u64::from(ack.accepted);
                    latency.saturating_record(started.elapsed().as_micros() as u64);
                }
            }
            Err(_) => refused += 1,
        }
    }
    (latency, acked, refused)
}

async fn phase(log: EdgeLog, options: &BenchIngestOptions) -> Result<Phase, BenchIngestError> {
    let (node, join) = Node::start_with_log(
        node_spec(options.sensors),
        Annunciator::new(1024),
        Some(EdgeStorage {
            log: log.clone(),
            limits: OutboxLimits::default(),
        }),
    )
    .await?;
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..options.sensors)
        .map(|s| {
            tokio::spawn(produce(
                node.clone(),
                sensor_id(s),
                options.batch,
                measuring.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(WARM_UP).await;
    let commits_before = log.stats().commits.load(Ordering::Relaxed);
    let samples_before = log.stats().samples.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(options.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let commits = log.stats().commits.load(Ordering::Relaxed) - commits_before;
    let logged = log.stats().samples.load(Ordering::Relaxed) - samples_before;
    stop.store(true, Ordering::Relaxed);
    let mut latency = latency_histogram();
    let (mut acked, mut refused) = (0u64, 0u64);
    for producer in producers {
        if let Ok((h, a, r)) = producer.await {
            latency.add(h).expect("histograms share bounds");
            acked += a;
            refused += r;
        }
    }
    node.shutdown(join).await;
    Ok(Phase {
        samples_per_s: acked as f64 / elapsed,
        latency,
        commits_per_s: commits as f64 / elapsed,
        samples_per_commit: logged as f64 / commits.max(1) as f64,
        refused,
    })
}

fn ms(latency: &Histogram<u64>, quantile: f64) -> f64 {
    latency.value_at_quantile(quantile) as f64 / 1000.0
}

/// Runs the durable phase, then the in-memory one, and reports both.
pub async fn run(options: &BenchIngestOptions) -> Result<BenchIngestReport, BenchIngestError> {
    if let Some((what, value)) = not_positive(&[
        ("--seconds", options.seconds),
        ("--sensors", options.sensors as f64),
        ("--batch", options.batch as f64),
    ]) {
        return Err(BenchIngestError::Option { what, value });
    }
    let temporary = tempfile::tempdir()?;
    let dir: &Path = options.dir.as_deref().unwrap_or(temporary.path());
    let durable = phase(EdgeLog::open(&dir.join("bench-edge-log"))?, options).await?;
    let memory = phase(EdgeLog::in_memory()?, options).await?;
    Ok(BenchIngestReport {
        workload: "ingest",
        sensors: options.sensors,
        batch: options.batch,
        seconds_per_phase: options.seconds,
        log_dir: dir.display().to_string(),
        durable_samples_per_s: durable.samples_per_s,
        memory_samples_per_s: memory.samples_per_s,
        durable_over_memory: durable.samples_per_s / memory.samples_per_s.max(1.0),
        p50_ack_ms: ms(&durable.latency, 0.5),
        p99_ack_ms: ms(&durable.latency, 0.99),
        mean_ack_ms: durable.latency.mean() / 1000.0,
        acks: durable.latency.len(),
        memory_p50_ack_ms: ms(&memory.latency, 0.5),
        memory_p99_ack_ms: ms(&memory.latency, 0.99),
        fsyncs_per_s: durable.commits_per_s,
        samples_per_fsync: durable.samples_per_commit,
        refused: durable.refused + memory.refused,
    })
}
