//! Workload W1 (`../shared/bench/W1-routing-inference.md`): the hot path of a fog node,
//! routing plus batched expert inference, under a closed loop of windows in flight.
//!
//! One run measures two things on the same machine at the same time, so their ratio
//! means something: the node (router → experts with dynamic batching, all actors) and
//! the bare forward pass of the same model in a plain loop on one thread. The ratio is
//! the efficiency: how much of the model's own speed survives the actors around it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_actors::{
    Annunciator, BatchingSpec, ExpertSpec, ModelSource, Node, NodeSpec, RestartPolicy, RouterSpec,
    RoutingPolicy, Window,
};
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, SoftmaxGate, SplitMix64, TrainOptions};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::latency_histogram;

/// Which policy the router runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateKind {
    /// expert = sensor % experts.
    Static,
    /// A softmax gate over window features, top-1, trained in the same run.
    Learned,
}

#[derive(Debug, Clone)]
pub struct W1Options {
    pub streams: usize,
    pub experts: usize,
    pub channels: usize,
    pub length: usize,
    pub inflight: usize,
    pub seconds: f64,
    pub warmup_seconds: f64,
    pub max_batch: usize,
    pub max_wait_us: u64,
    pub intra_op_threads: usize,
    pub gate: GateKind,
    pub seed: u64,
}

impl Default for W1Options {
    fn default() -> Self {
        W1Options {
            streams: 64,
            experts: 4,
            channels: 8,
            length: 64,
            inflight: 256,
            seconds: 20.0,
            warmup_seconds: 3.0,
            max_batch: 32,
            max_wait_us: 2_000,
            intra_op_threads: 1,
            gate: GateKind::Static,
            seed: 42,
        }
    }
}

/// The JSON object `fogmesh bench w1` prints.
#[derive(Debug, Clone, Serialize)]
pub struct W1Report {
    pub workload: &'static str,
    pub gate: GateKind,
    /// Share of the measured windows the learned gate sends to their stream's expert.
    pub gate_accuracy: Option<f64>,
    pub windows_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub inflight: usize,
    pub experts: usize,
    pub streams: usize,
    pub max_batch: usize,
    pub mean_batch_size: f64,
    pub bare_forward_windows_per_s: f64,
    pub efficiency: f64,
    pub measured_seconds: f64,
    pub errors: u64,
    pub max_rss_mib: Option<f64>,
    pub device: String,
}

#[derive(Debug, thiserror::Error)]
pub enum W1Error {
    #[error("option `{field}` = {value}: {reason}")]
    Option {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(transparent)]
    Spec(#[from] fogmesh_actors::SpecError),
    #[error(transparent)]
    Model(#[from] fogmesh_models::ModelError),
}

impl W1Options {
    pub(crate) fn validate(&self) -> Result<(), W1Error> {
        let positive = [
            ("streams", self.streams),
            ("experts", self.experts),
            ("inflight", self.inflight),
            ("channels", self.channels),
            ("length", self.length),
            ("max_batch", self.max_batch),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(W1Error::Option {
                    field,
                    value: "0".into(),
                    reason: "must be at least 1",
                });
            }
        }
        if self.seconds.is_nan() || self.seconds <= self.warmup_seconds {
            return Err(W1Error::Option {
                field: "seconds",
                value: self.seconds.to_string(),
                reason: "must exceed the 3 s warm-up",
            });
        }
        Ok(())
    }

    fn config(&self) -> AutoencoderConfig {
        AutoencoderConfig::w1(self.channels as i64, self.length as i64)
    }

    fn window_values(&self) -> usize {
        self.channels * self.length
    }
}

/// Runs W1 and returns its report. Blocks the calling async task for `seconds` plus
/// the bare-forward measurement.
pub async fn run(options: &W1Options) -> Result<W1Report, W1Error> {
    options.validate()?;
    let bare = {
        let options = options.clone();
        tokio::task::spawn_blocking(move || bare_forward(&options))
            .await
            .expect("the bare-forward thread does not panic")?
    };

    let windows = synthetic_windows(options, 4, options.seed);
    let (gate, gate_accuracy) = match options.gate {
        GateKind::Static => (None, None),
        GateKind::Learned => {
            let (gate, accuracy) = train_gate(options, &windows)?;
            (Some(gate), Some(accuracy))
        }
    };
    let (node, join) = Node::start(node_spec(options, gate), Annunciator::new(16)).await?;
    let load = closed_loop(&node, ROUTER, windows, options).await;
    let snapshot = node.snapshot();
    let (scored, batches) = snapshot
        .experts
        .iter()
        .fold((0, 0), |(w, b), e| (w + e.windows_scored, b + e.batches));
    node.shutdown(join).await;

    let windows_per_s = load.windows_per_s();
    Ok(W1Report {
        workload: "w1",
        gate: options.gate,
        gate_accuracy,
        windows_per_s,
        p50_ms: load.quantile_ms(0.50),
        p99_ms: load.quantile_ms(0.99),
        inflight: options.inflight,
        experts: options.experts,
        streams: options.streams,
        max_batch: options.max_batch,
        mean_batch_size: if batches == 0 {
            0.0
        } else {
            scored as f64 / batches as f64
        },
        bare_forward_windows_per_s: bare,
        efficiency: windows_per_s / bare,
        measured_seconds: load.measured_seconds,
        errors: load.errors,
        max_rss_mib: peak_rss_mib(),
        device: format!("{:?}", fogmesh_models::default_device()),
    })
}

/// What the closed loop saw after its warm-up.
pub(crate) struct LoadOutcome {
    latencies: Histogram<u64>,
    done: u64,
    pub(crate) errors: u64,
    pub(crate) measured_seconds: f64,
}

impl LoadOutcome {
    pub(crate) fn windows_per_s(&self) -> f64 {
        self.done as f64 / self.measured_seconds
    }

    pub(crate) fn quantile_ms(&self, quantile: f64) -> f64 {
        self.latencies.value_at_quantile(quantile) as f64 / 1e3
    }
}

/// Keeps `options.inflight` windows, drawn from `windows`, in flight through `router`
/// for `options.seconds`; counts only what was sent after the warm-up.
pub(crate) async fn closed_loop(
    node: &Node,
    router: &str,
    windows: Vec<Window>,
    options: &W1Options,
) -> LoadOutcome {
    let router: Arc<str> = router.into();
    let windows = Arc::new(windows);
    let stop = Arc::new(AtomicBool::new(false));
    let stop_lanes = StopOnDrop(stop.clone());
    let started = Instant::now();
    let measure_from = started + Duration::from_secs_f64(options.warmup_seconds);
    let mut loops = Vec::with_capacity(options.inflight);
    for lane in 0..options.inflight {
        let node = node.clone();
        let router = router.clone();
        let windows = windows.clone();
        let stop = stop.clone();
        // Each lane draws its windows independently: lanes that picked windows in a
        // fixed pattern would move in convoys from expert to expert.
        let mut rng = SplitMix64::new(options.seed ^ (lane as u64).wrapping_mul(0x9E37_79B9));
        loops.push(tokio::spawn(async move {
            let mut latencies = latency_histogram();
            let (mut done, mut errors) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let window = windows[(rng.next_u64() % windows.len() as u64) as usize].clone();
                let sent = Instant::now();
                let verdict = node.score(&router, window).await;
                let now = Instant::now();
                if sent >= measure_from {
                    match verdict {
                        Ok(_) => {
                            done += 1;
                            latencies
                                .saturating_record(now.duration_since(sent).as_micros() as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (latencies, done, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(options.seconds)).await;
    drop(stop_lanes);
    let measured_seconds = started.elapsed().as_secs_f64() - options.warmup_seconds;
    let mut latencies = latency_histogram();
    let (mut done, mut errors) = (0u64, 0u64);
    for lane in loops {
        let (h, d, e) = lane.await.expect("a load lane does not panic");
        latencies.add(h).expect("histograms share bounds");
        done += d;
        errors += e;
    }
    LoadOutcome {
        latencies,
        done,
        errors,
        measured_seconds,
    }
}

/// Raises the lanes' stop flag when dropped, so they stop also when the loop's future
/// is dropped mid-run (an interrupted remote run): a lane whose node is gone fails
/// each window at once, never yields, and would spin until the process ends.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The router W1's windows go through.
pub(crate) const ROUTER: &str = "w1";

pub(crate) fn node_spec(options: &W1Options, gate: Option<SoftmaxGate>) -> NodeSpec {
    let experts: Vec<String> = (0..options.experts)
        .map(|e| format!("expert-{e}"))
        .collect();
    let policy = match gate {
        None => RoutingPolicy::Static {
            routes: (0..options.streams)
                .map(|s| (sensor_id(s), vec![experts[s % options.experts].clone()]))
                .collect(),
        },
        Some(gate) => RoutingPolicy::LearnedGate {
            experts: experts.clone(),
            top_k: 1,
            gate,
        },
    };
    NodeSpec {
        node: "w1".into(),
        sensors: Vec::new(),
        routers: vec![RouterSpec {
            name: ROUTER.into(),
            policy,
            optional: Vec::new(),
        }],
        experts: experts
            .iter()
            .enumerate()
            .map(|(e, name)| ExpertSpec {
                name: name.clone(),
                model_version: "w1-seeded".into(),
                config: options.config(),
                // W1 measures speed, not verdicts; any positive limit does.
                threshold: Some(1.0),
                batching: BatchingSpec {
                    max_batch: options.max_batch,
                    max_wait_us: options.max_wait_us,
                },
                intra_op_threads: options.intra_op_threads,
                source: ModelSource::seeded(options.seed as i64 + e as i64),
            })
            .collect(),
        remote_experts: Vec::new(),
        restart: RestartPolicy::default(),
    }
}

pub(crate) fn sensor_id(s: usize) -> String {
    format!("sensor-{s:03}")
}

/// How far each stream's signature channel sits from the others, in standard deviations.
const SIGNATURE: f32 = 1.5;

/// `per_stream` windows per stream, fixed by the seed: standard-normal values, with
/// channel `stream % experts` shifted by [`SIGNATURE`] so that a window carries the mark
/// of its asset, as real sensor data does, and a gate has something to learn.
pub(crate) fn synthetic_windows(options: &W1Options, per_stream: u64, seed: u64) -> Vec<Window> {
    let mut rng = SplitMix64::new(seed);
    let mut windows = Vec::with_capacity(options.streams * per_stream as usize);
    for round in 0..per_stream {
        for s in 0..options.streams {
            let marked = s % options.experts % options.channels;
            let values: Vec<f32> = (0..options.window_values())
                .map(|i| {
                    rng.normal() as f32
                        + if i / options.length == marked {
                            SIGNATURE
                        } else {
                            0.0
                        }
                })
                .collect();
            windows.push(Window {
                sensor_id: sensor_id(s).into(),
                sequence: round,
                start_us: 0,
                end_us: 0,
                channels: options.channels,
                length: options.length,
                values: values.into(),
                quality: Default::default(),
            });
        }
    }
    windows
}

/// Trains the top-1 gate, in this run, to send each stream's windows to the expert the
/// static policy would pick, on windows other than the measured ones; returns it with
/// its accuracy on the measured windows.
fn train_gate(options: &W1Options, measured: &[Window]) -> Result<(SoftmaxGate, f64), W1Error> {
    let expert_of = |w: &Window| -> usize {
        let stream: usize = w.sensor_id["sensor-".len()..]
            .parse()
            .expect("bench sensor ids end in their number");
        stream % options.experts
    };
    let training = synthetic_windows(options, 16, options.seed ^ 0x6A7E);
    let values: Vec<f32> = training
        .iter()
        .flat_map(|w| w.values.iter().copied())
        .collect();
    let targets: Vec<usize> = training.iter().map(expert_of).collect();
    let train_options = TrainOptions {
        epochs: 200,
        batch_size: 128,
        learning_rate: 0.05,
        seed: options.seed as i64,
        max_seconds: Some(10.0),
        ..Default::default()
    };
    let (gate, _) = SoftmaxGate::fit(
        options.channels,
        options.length,
        options.experts,
        &values,
        &targets,
        &train_options,
    )?;
    let mut hits = 0;
    for w in measured {
        if gate.top_k(&w.values, 1)?[0].0 == expert_of(w) {
            hits += 1;
        }
    }
    Ok((gate, hits as f64 / measured.len() as f64))
}

/// The same model's batch forward pass in a plain loop on this thread, no actors:
/// windows per second over about three seconds.
fn bare_forward(options: &W1Options) -> Result<f64, W1Error> {
    tch::set_num_threads(options.intra_op_threads as i32);
    let model = ConvAutoencoder::new(
        options.config(),
        fogmesh_models::default_device(),
        options.seed as i64,
    )?;
    let mut rng = SplitMix64::new(options.seed ^ 0xB0A2);
    let batch: Vec<f32> = (0..options.max_batch * options.window_values())
        .map(|_| rng.normal() as f32)
        .collect();
    for _ in 0..20 {
        model.score(&batch)?;
    }
    let started = Instant::now();
    let mut iterations = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        model.score(&batch)?;
        iterations += 1;
    }
    Ok((iterations * options.max_batch as u64) as f64 / started.elapsed().as_secs_f64())
}

/// Peak resident set of this process (VmHWM), where the OS reports it.
pub fn peak_rss_mib() -> Option<f64> {
    peak_rss_mib_of("self")
}

/// Peak resident set of process `pid` (a number, or `self`), where the OS reports it.
pub(crate) fn peak_rss_mib_of(pid: &str) -> Option<f64> {
    status_mib(pid, "VmHWM:")
}

/// Resident set of this process now (VmRSS), where the OS reports it.
pub fn rss_mib() -> Option<f64> {
    status_mib("self", "VmRSS:")
}

fn status_mib(pid: &str, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// W1 as a user runs it, for a few seconds: every window comes back under both routing policies. Speed is what `fogmesh bench w1` reports, never asserted here.
#[cfg(test)]
mod scenario_tests {
    use super::{run, GateKind, W1Options};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn w1_runs_both_policies_without_losing_a_window() {
        for gate in [GateKind::Static, GateKind::Learned] {
            let options = W1Options {
                streams: 8,
                inflight: 16,
                seconds: 2.0,
                warmup_seconds: 0.5,
                gate,
                ..Default::default()
            };
            let report = run(&options).await.expect("W1 runs");
            assert_eq!(report.errors, 0, "{report:?}");
            assert!(report.windows_per_s > 0.0 && report.bare_forward_windows_per_s > 0.0);
            assert!(report.p50_ms <= report.p99_ms);
            if gate == GateKind::Learned {
                assert!(
                    report.gate_accuracy.unwrap() > 0.9,
                    "the gate learns the assets' signatures: {report:?}"
                );
            }
        }
    }
}
