//! The flood benchmark (`fogmesh bench flood`): one sensor floods a node at a hundred
//! times its `max_rate` while another sends at its usual pace, both over mutual-TLS
//! gRPC to a node in this process, as two gateways on a plant network would.
//!
//! Two phases of equal length: the quiet sensor alone, then the quiet sensor while the
//! flooder sends. The report gives the quiet sensor's acknowledgement latency (p50,
//! p99) in each phase and their ratio, how much of the flood was accepted and refused
//! (`RESOURCE_EXHAUSTED`), and this process's resident memory after each phase and at
//! its peak, so "a flood costs the others little and memory stays bounded" is read off
//! one JSON object.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fogmesh_actors::Annunciator;
use fogmesh_cluster::dialer::Dialer;
use fogmesh_cluster::{NodeConfig, NodeServer};
use fogmesh_proto::ingest_client::IngestClient;
use fogmesh_proto::{Sample, SampleBatch};
use fogmesh_trust::{IssueRequest, MeshCa, MeshTls, Role};
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::Code;

use crate::{latency_histogram, not_positive};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchFloodOptions {
    /// Length of each phase.
    pub seconds: f64,
    /// The quiet sensor's pace: samples per second, sent in batches every 10 ms.
    pub quiet_rate: u64,
    /// The flooding sensor's `max_rate`; it sends a hundred times this.
    pub flood_limit: u64,
}

impl Default for BenchFloodOptions {
    fn default() -> Self {
        BenchFloodOptions {
            seconds: 10.0,
            quiet_rate: 1_000,
            flood_limit: 1_000,
        }
    }
}

/// One JSON object on stdout.
#[derive(Debug, Serialize)]
pub struct BenchFloodReport {
    pub workload: &'static str,
    pub seconds_per_phase: f64,
    pub quiet_rate: u64,
    pub flood_limit: u64,
    pub flood_sent_rate: u64,
    pub quiet_p50_us_alone: u64,
    pub quiet_p99_us_alone: u64,
    pub quiet_p50_us_flooded: u64,
    pub quiet_p99_us_flooded: u64,
    /// `quiet_p99_us_flooded / quiet_p99_us_alone`; the target is below 1.2.
    pub quiet_p99_ratio: f64,
    pub quiet_failed: u64,
    pub flood_samples_sent: u64,
    pub flood_samples_accepted: u64,
    pub flood_batches_refused: u64,
    /// Any other answer to the flooder than accepted or `RESOURCE_EXHAUSTED`.
    pub flood_other_errors: u64,
    pub rss_mb_after_alone: f64,
    pub rss_mb_after_flood: f64,
    pub rss_mb_peak: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchFloodError {
    #[error("setting up the benchmark's certificates: {0}")]
    Pki(#[from] fogmesh_trust::TrustError),
    #[error("writing the benchmark's node config: {0}")]
    Io(#[from] std::io::Error),
    #[error("the benchmark's node config: {0}")]
    Config(#[from] fogmesh_cluster::ConfigError),
    #[error("the benchmark's node: {0}")]
    Node(#[from] fogmesh_cluster::ServeError),
    #[error("connecting to the benchmark's node: {0}")]
    Connect(#[from] fogmesh_cluster::dialer::LinkError),
    #[error("{what} must be positive, not {value}")]
    Option { what: &'static str, value: f64 },
}

const QUIET: &str = "quiet";
const FLOOD: &str = "flood";

fn node_toml(flood_limit: u64, tls: &fogmesh_trust::TlsFiles) -> String {
    let sensor = |id: &str, extra: &str| {
        format!(
            "[[sensors]]\nid = \"{id}\"\nchannels = 2\nwindow = 16\nstride = 16\nrouter = \"plant\"\n{extra}normalisation = {{ mode = \"frozen\", mean = [0.0, 0.0], std = [1.0, 1.0] }}\n\n"
        )
    };
    format!(
        "[node]\nname = \"flood-bench\"\nrole = \"edge\"\nlisten = \"127.0.0.1:0\"\n\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n\
         [[experts]]\nname = \"ae\"\nmodel_version = \"untrained-seed-7\"\nchannels = 2\nwindow = 16\nseed = 7\nthreshold = 1000.0\n\n\
         [[routers]]\nname = \"plant\"\npolicy = \"static\"\nroutes = {{ {QUIET} = [\"ae\"], {FLOOD} = [\"ae\"] }}\n\n{}{}",
        tls.ca,
        tls.cert,
        tls.key,
        sensor(QUIET, ""),
        sensor(FLOOD, &format!("max_rate = {flood_limit}\n")),
    )
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn batch(sensor: &str, first: u64, count: u64) -> SampleBatch {
    let at = now_us();
    SampleBatch {
        samples: (first..first + count)
            .map(|sequence| Sample {
                sensor_id: sensor.to_string(),
                sequence,
                timestamp_us: at,
                values: vec![(sequence as f32 * 0.1).sin(), (sequence as f32 * 0.1).cos()],
            })
            .collect(),
    }
}

/// This process's resident memory now and at its peak, in MiB (Linux).
fn memory_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The quiet sensor for `length`, from sequence `*next`: each batch's round trip.
async fn quiet_phase(
    mut ingest: IngestClient<Channel>,
    rate: u64,
    length: Duration,
    next: &mut u64,
) -> (Histogram<u64>, u64) {
    let per_batch = (rate / 100).max(1);
    let mut latencies = latency_histogram();
    let mut failed = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + length;
    while Instant::now() < end {
        tick.tick().await;
        let request = batch(QUIET, *next, per_batch);
        *next += per_batch;
        let started = Instant::now();
        match ingest.push(request).await {
            Ok(_) => {
                latencies.saturating_record(started.elapsed().as_micros() as u64);
            }
            Err(_) => failed += 1,
        }
    }
    (latencies, failed)
}

#[derive(Default)]
struct FloodCounts {
    sent: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
}

/// The flooder: a batch of `per_batch` samples every millisecond until `end`.
async fn flood(
    mut ingest: IngestClient<Channel>,
    per_batch: u64,
    end: Instant,
    counts: Arc<FloodCounts>,
) {
    let mut next = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while Instant::now() < end {
        tick.tick().await;
        counts.sent.fetch_add(per_batch, Ordering::Relaxed);
        match ingest.push(batch(FLOOD, next, per_batch)).await {
            Ok(ack) => {
                next += per_batch;
                counts
                    .accepted
                    .fetch_add(u64::from(ack.into_inner().accepted), Ordering::Relaxed);
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                counts.other.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn issue(
    ca: &MeshCa,
    dir: &Path,
    name: &str,
    role: Role,
) -> Result<fogmesh_trust::TlsFiles, BenchFloodError> {
    let request = IssueRequest {
        name: name.to_string(),
        role,
        sensors: Vec::new(),
        days: 1,
    };
    Ok(ca.issue(&request, &dir.join(name))?)
}

/// Runs both phases and reports.
pub async fn run(options: &BenchFloodOptions) -> Result<BenchFloodReport, BenchFloodError> {
    if let Some((what, value)) = not_positive(&[
        ("--seconds", options.seconds),
        ("--quiet-rate", options.quiet_rate as f64),
        ("--flood-limit", options.flood_limit as f64),
    ]) {
        return Err(BenchFloodError::Option { what, value });
    }
    let dir = tempfile::tempdir()?;
    let ca = MeshCa::init(&dir.path().join("ca"), "flood-bench")?;
    let node_files = issue(&ca, dir.path(), "flood-bench", Role::Edge)?;
    let path = dir.path().join("node.toml");
    std::fs::write(&path, node_toml(options.flood_limit, &node_files))?;
    let config = NodeConfig::load(&path)?;
    let server = NodeServer::start_with(config, Annunciator::new(1024)).await?;
    let addr = server.grpc_addr().to_string();
    let gateway = |name: &str| -> Result<Dialer, BenchFloodError> {
        let files = issue(&ca, dir.path(), name, Role::Sensor)?;
        Ok(Dialer::new(Some(MeshTls::load(&files)?), None))
    };
    // Two gateways, two connections: the flood does not share the quiet one's.
    let quiet = IngestClient::new(gateway("gateway-quiet")?.channel(&addr).await?.channel);
    let flooder = IngestClient::new(gateway("gateway-flood")?.channel(&addr).await?.channel);

    let length = Duration::from_secs_f64(options.seconds);
    let mut next = 0u64;
    // Warm-up: connections, the first windows, allocator pools.
    quiet_phase(
        quiet.clone(),
        options.quiet_rate,
        Duration::from_secs(1),
        &mut next,
    )
    .await;
    let (alone, failed_alone) =
        quiet_phase(quiet.clone(), options.quiet_rate, length, &mut next).await;
    let (rss_alone, _) = memory_mb();

    let counts = Arc::new(FloodCounts::default());
    let end = Instant::now() + length;
    // A hundred times the limit, in a batch every millisecond.
    let per_batch = (options.flood_limit / 10).max(1);
    let flooding = tokio::spawn(flood(flooder, per_batch, end, counts.clone()));
    let (flooded, failed_flooded) = quiet_phase(quiet, options.quiet_rate, length, &mut next).await;
    let _ = flooding.await;
    let (rss_flood, rss_peak) = memory_mb();
    let _ = server.shutdown().await;

    let p99_alone = alone.value_at_quantile(0.99);
    let p99_flooded = flooded.value_at_quantile(0.99);
    Ok(BenchFloodReport {
        workload: "flood",
        seconds_per_phase: options.seconds,
        quiet_rate: options.quiet_rate,
        flood_limit: options.flood_limit,
        flood_sent_rate: per_batch * 1000,
        quiet_p50_us_alone: alone.value_at_quantile(0.5),
        quiet_p99_us_alone: p99_alone,
        quiet_p50_us_flooded: flooded.value_at_quantile(0.5),
        quiet_p99_us_flooded: p99_flooded,
        quiet_p99_ratio: p99_flooded as f64 / p99_alone.max(1) as f64,
        quiet_failed: failed_alone + failed_flooded,
        flood_samples_sent: counts.sent.load(Ordering::Relaxed),
        flood_samples_accepted: counts.accepted.load(Ordering::Relaxed),
        flood_batches_refused: counts.refused.load(Ordering::Relaxed),
        flood_other_errors: counts.other.load(Ordering::Relaxed),
        rss_mb_after_alone: rss_alone,
        rss_mb_after_flood: rss_flood,
        rss_mb_peak: rss_peak,
    })
}
