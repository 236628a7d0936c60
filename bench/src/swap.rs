//! `fogmesh bench swap`: what hot swaps cost the hot path. W1's closed loop (router →
//! batched experts, windows in flight) runs twice on one node: once steady, once while
//! every expert is swapped to a new version every `swap_every` seconds (weights as
//! safetensors bytes checked against their sha256 on load, as a version shipped from
//! the model store is). The report compares the two phases' p99 latency and counts
//! requests that failed, which must be none.

use std::time::{Duration, Instant};

use fogmesh_actors::{Annunciator, ModelSource, Node};
use fogmesh_models::ConvAutoencoder;
use serde::Serialize;

use crate::w1::{closed_loop, node_spec, synthetic_windows, W1Error, W1Options, ROUTER};

#[derive(Debug, Clone)]
pub struct BenchSwapOptions {
    /// The load: W1's defaults; `seconds` is the length of each phase.
    pub load: W1Options,
    pub swap_every: Duration,
    /// Distinct versions cycled through (each expert's next version differs from the
    /// one it serves).
    pub versions: usize,
}

impl Default for BenchSwapOptions {
    fn default() -> Self {
        BenchSwapOptions {
            load: W1Options {
                seconds: 12.0,
                warmup_seconds: 2.0,
                ..W1Options::default()
            },
            swap_every: Duration::from_secs(1),
            versions: 4,
        }
    }
}

/// The JSON object `fogmesh bench swap` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchSwapReport {
    pub workload: &'static str,
    pub steady_p99_ms: f64,
    pub swap_p99_ms: f64,
    pub p99_ratio: f64,
    pub steady_windows_per_s: f64,
    pub swap_windows_per_s: f64,
    /// Swaps that installed a version (one per expert per round).
    pub swaps: u64,
    pub failed_swaps: u64,
    pub failed_requests: u64,
    pub experts: usize,
    pub swap_every_s: f64,
    pub measured_seconds: f64,
}

pub async fn run(options: &BenchSwapOptions) -> Result<BenchSwapReport, W1Error> {
    let load = &options.load;
    load.validate()?;
    let spec = node_spec(load, None);
    // Each version's weights, serialised once, as the store would ship them.
    let mut versions = Vec::with_capacity(options.versions.max(2));
    for v in 0..options.versions.max(2) {
        let model = ConvAutoencoder::new(
            spec.experts[0].config.clone(),
            tch::Device::Cpu,
            1_000 + v as i64,
        )?;
        versions.push(model.to_safetensors()?);
    }
    let windows = synthetic_windows(load, 4, load.seed);
    let (node, join) = Node::start(spec.clone(), Annunciator::new(16)).await?;

    let steady = closed_loop(&node, ROUTER, windows.clone(), load).await;

    let swapping = async {
        let (mut swaps, mut failed) = (0u64, 0u64);
        let end = Instant::now() + Duration::from_secs_f64(load.seconds);
        let mut round = 1;
        while Instant::now() + options.swap_every < end {
            tokio::time::sleep(options.swap_every).await;
            for (e, expert) in spec.experts.iter().enumerate() {
                let (bytes, sha) = &versions[(round + e) % versions.len()];
                let mut next = expert.clone();
                next.model_version = format!("swap-{round}");
                next.source = ModelSource::Autoencoder {
                    weights: Some(bytes.clone().into()),
                    weights_sha256: Some(sha.clone()),
                    seed: 0,
                };
                match node.swap_expert(next).await {
                    Ok(_) => swaps += 1,
                    Err(error) => {
                        tracing::warn!(%error, "swap failed");
                        failed += 1;
                    }
                }
            }
            round += 1;
        }
        (swaps, failed)
    };
    let (during, (swaps, failed_swaps)) =
        tokio::join!(closed_loop(&node, ROUTER, windows, load), swapping);
    node.shutdown(join).await;

    let (steady_p99, swap_p99) = (steady.quantile_ms(0.99), during.quantile_ms(0.99));
    Ok(BenchSwapReport {
        workload: "swap",
        steady_p99_ms: steady_p99,
        swap_p99_ms: swap_p99,
        p99_ratio: swap_p99 / steady_p99,
        steady_windows_per_s: steady.windows_per_s(),
        swap_windows_per_s: during.windows_per_s(),
        swaps,
        failed_swaps,
        failed_requests: steady.errors + during.errors,
        experts: load.experts,
        swap_every_s: options.swap_every.as_secs_f64(),
        measured_seconds: during.measured_seconds,
    })
}
