//! `fogmesh bench merge`: how close model merging ([`fogmesh_models::merge`]) comes to
//! the machine's memory bandwidth, measured against a memcpy in the same run.
//!
//! A merge of a few models of tens of millions of parameters does a handful of
//! floating-point operations per byte it reads, so memory bandwidth bounds it; the
//! honest yardstick is therefore a memcpy on the same machine, at the same moment, on
//! the same threads. Both count bytes read plus bytes written: a memcpy of n bytes
//! moves 2n, and a merge of N models of n bytes (plus the base, for the methods that
//! take one) moves (N + 1)n, or (N + 2)n with a base, counting every input read once
//! and the output written once. Methods that read more than that (TIES reads each
//! model and the base twice more to find its trimming thresholds) show it as a lower
//! fraction. Each side is timed as the best of three runs after a warm-up, the runs
//! alternating, and each writes into a buffer it has written before
//! ([`merge::merge_into`]; a fresh buffer's page faults would time the kernel, not
//! the merge).
//!
//! The models are replicas of one random base (values in ±0.1, each replica off by up
//! to ±0.01, as fine-tuned copies are), split over ten tensors.

use std::fmt;
use std::str::FromStr;
use std::thread;
use std::time::Instant;

use fogmesh_models::merge::{self, MergeError, MergeMethod, Weights};
use fogmesh_models::SplitMix64;
use serde::Serialize;

const TENSORS: usize = 10;
const RUNS: usize = 3;

/// The methods the benchmark can time, each with fixed, typical parameters
/// ([`BenchMethod::merge_method`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMethod {
    WeightedAverage,
    TaskArithmetic,
    Ties,
    Dare,
    Slerp,
}

const METHODS: [(BenchMethod, &str); 5] = [
    (BenchMethod::WeightedAverage, "weighted_average"),
    (BenchMethod::TaskArithmetic, "task_arithmetic"),
    (BenchMethod::Ties, "ties"),
    (BenchMethod::Dare, "dare"),
    (BenchMethod::Slerp, "slerp"),
];

impl BenchMethod {
    /// The merge timed for `models` models: equal weights; task arithmetic and DARE
    /// scaled by 1/N so the result stays an average; TIES at density 0.2 and DARE at
    /// drop rate 0.9 (the papers' usual settings); SLERP halfway.
    pub fn merge_method(self, models: usize) -> MergeMethod {
        let mean = 1.0 / models.max(1) as f64;
        match self {
            BenchMethod::WeightedAverage => MergeMethod::WeightedAverage {
                weights: vec![1.0; models],
            },
            BenchMethod::TaskArithmetic => MergeMethod::TaskArithmetic { scale: mean },
            BenchMethod::Ties => MergeMethod::Ties {
                density: 0.2,
                scale: 1.0,
            },
            BenchMethod::Dare => MergeMethod::Dare {
                drop_rate: 0.9,
                seed: 0,
                scale: mean,
            },
            BenchMethod::Slerp => MergeMethod::Slerp { t: 0.5 },
        }
    }

    fn name(self) -> &'static str {
        METHODS
            .iter()
            .find(|(method, _)| *method == self)
            .map_or("", |(_, name)| name)
    }
}

impl fmt::Display for BenchMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BenchMethod {
    type Err = BenchMergeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        METHODS
            .iter()
            .find(|(_, name)| *name == s)
            .map(|(method, _)| *method)
            .ok_or_else(|| BenchMergeError::InvalidOption {
                field: "method",
                value: s.to_string(),
                reason: format!(
                    "expected one of {}",
                    METHODS.map(|(_, name)| name).join(", ")
                ),
            })
    }
}

#[derive(Debug, Clone)]
pub struct BenchMergeOptions {
    /// Parameters per model, over all its tensors.
    pub params: usize,
    /// Models merged (the base not counted); `None`: 2 for SLERP, else 4.
    pub models: Option<usize>,
    pub method: BenchMethod,
    /// Threads for the merge and the memcpy alike.
    pub threads: usize,
}

impl Default for BenchMergeOptions {
    fn default() -> Self {
        BenchMergeOptions {
            params: 25_000_000,
            models: None,
            method: BenchMethod::WeightedAverage,
            threads: merge::default_threads(),
        }
    }
}

impl BenchMergeOptions {
    /// The number of models merged.
    pub fn model_count(&self) -> usize {
        self.models.unwrap_or(match self.method {
            BenchMethod::Slerp => 2,
            _ => 4,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchMergeError {
    #[error(transparent)]
    Merge(#[from] MergeError),
    #[error("invalid {field} = {value}: {reason}")]
    InvalidOption {
        field: &'static str,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchMergeReport {
    pub method: String,
    pub params: usize,
    pub models: usize,
    /// The best of three merges.
    pub merge_seconds: f64,
    /// Bytes read plus bytes written by the merge, per second, in 10⁹.
    pub merge_gb_per_s: f64,
    /// The same for a memcpy of one model's bytes, on as many threads.
    pub memcpy_gb_per_s: f64,
    pub fraction_of_memcpy: f64,
    pub threads: usize,
}

/// The report, and the merged weights so that a caller can check them.
#[derive(Debug)]
pub struct BenchMerge {
    pub report: BenchMergeReport,
    pub merged: Weights,
}

/// The benchmark's inputs: the base (for the methods that take one) and the models,
/// the same for the same options on every run.
pub fn inputs(
    options: &BenchMergeOptions,
) -> Result<(Option<Weights>, Vec<Weights>), BenchMergeError> {
    if options.params < TENSORS {
        return Err(BenchMergeError::InvalidOption {
            field: "params",
            value: options.params.to_string(),
            reason: format!("at least {TENSORS}, one per tensor"),
        });
    }
    let sizes: Vec<usize> = (0..TENSORS)
        .map(|k| options.params / TENSORS + usize::from(k < options.params % TENSORS))
        .collect();
    let mut rng = SplitMix64::new(1);
    // Uniform in [-1, 1) from the top 24 bits: exact in f32, and cheap for 10⁸ values.
    let mut uniform = move || (rng.next_u64() >> 40) as f32 / (1u32 << 23) as f32 - 1.0;
    let base: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| (0..n).map(|_| 0.1 * uniform()).collect())
        .collect();
    let mut replica = |offset: f32| {
        let tensors: Vec<_> = base
            .iter()
            .enumerate()
            .map(|(k, values)| {
                let values: Vec<f32> = values.iter().map(|&b| b + offset * uniform()).collect();
                (format!("layer{k:02}.weight"), vec![values.len()], values)
            })
            .collect();
        Weights::from_tensors(tensors, "bench_merge")
    };
    let models = (0..options.model_count())
        .map(|_| replica(0.01))
        .collect::<Result<Vec<_>, _>>()?;
    let base = options
        .method
        .merge_method(options.model_count())
        .needs_base()
        .then(|| replica(0.0))
        .transpose()?;
    Ok((base, models))
}

/// Runs the benchmark: builds the inputs, times the merge and a memcpy.
pub fn run(options: &BenchMergeOptions) -> Result<BenchMerge, BenchMergeError> {
    let threads = options.threads.max(1);
    let (base, models) = inputs(options)?;
    let refs: Vec<&Weights> = models.iter().collect();
    let method = options.method.merge_method(refs.len());
    // The warm-up allocates the output; the timed runs merge into it again, as the
    // memcpy copies into a target it has already written.
    let mut merged = merge::merge_with_threads(&method, base.as_ref(), &refs, threads)?;
    let source = models[0].values();
    let mut target = vec![0.0f32; source.len()];
    parallel_copy(source, &mut target, threads);
    // Alternating the two spreads any load from other processes over both.
    let (mut merge_seconds, mut memcpy_seconds) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..RUNS {
        let started = Instant::now();
        merge::merge_into(&method, base.as_ref(), &refs, threads, &mut merged)?;
        merge_seconds = merge_seconds.min(started.elapsed().as_secs_f64());
        let started = Instant::now();
        parallel_copy(source, &mut target, threads);
        memcpy_seconds = memcpy_seconds.min(started.elapsed().as_secs_f64());
    }

    let bytes = std::mem::size_of_val(source) as f64;
    let inputs = refs.len() + usize::from(base.is_some());
    let merge_gb_per_s = (inputs + 1) as f64 * bytes / merge_seconds / 1e9;
    let memcpy_gb_per_s = 2.0 * bytes / memcpy_seconds / 1e9;
    Ok(BenchMerge {
        report: BenchMergeReport {
            method: options.method.to_string(),
            params: source.len(),
            models: refs.len(),
            merge_seconds,
            merge_gb_per_s,
            memcpy_gb_per_s,
            fraction_of_memcpy: merge_gb_per_s / memcpy_gb_per_s,
            threads,
        },
        merged,
    })
}

/// `target.copy_from_slice(source)`, split evenly over `threads` scoped threads.
fn parallel_copy(source: &[f32], target: &mut [f32], threads: usize) {
    let chunk = source.len().div_ceil(threads).max(1);
    thread::scope(|scope| {
        for (from, to) in source.chunks(chunk).zip(target.chunks_mut(chunk)) {
            scope.spawn(move || to.copy_from_slice(from));
        }
    });
}
