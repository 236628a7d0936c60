//! W2, a federated round (`fogmesh bench federated`, `../shared/bench/W2-federated-round.md`):
//! `--clients` sites, each a [`SiteTrainer`] actor holding 512 windows of its own (8
//! channels × 64 samples, standard normal plus 0.1 · site on every channel: non-IID),
//! train the W1 autoencoder (hidden channels × `--width`) for one epoch from the global
//! weights, or echo them (`--local-work none`); a [`FederatedCoordinator`] decodes
//! their updates, merges them by FedAvg weighted by windows and sends the new global
//! weights to every site, for `--rounds` rounds (the first 2 not counted).
//!
//! What crosses between coordinator and sites is what would cross the mesh: the global
//! weights as safetensors bytes, each site's update as encoded bytes; the windows never
//! leave their site's actor. Reported per round: the round's time, the slowest site's
//! local work, the rest (what the framework adds) and the bytes both ways; at the end
//! the merged model's mean loss over every site's windows and the resident set.

use std::time::{Duration, Instant};

use fogmesh_actors::node_agent::{Unanswered, Undelivered};
use fogmesh_actors::{
    FederatedCoordinator, FederatedCoordinatorArgs, FederatedCoordinatorMsg, FederationPlan,
    FederationSite, RoundWork, Site, SiteTrainer, SiteTrainerArgs,
};
use fogmesh_models::continual::ReplayItem;
use fogmesh_models::federated::{Aggregation, Compression, LocalWork};
use fogmesh_models::merge::Weights;
use fogmesh_models::served::Architecture;
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, SplitMix64};
use ractor::{Actor, ActorRef};
use serde::Serialize;

use crate::w1::{peak_rss_mib, rss_mib};

const CHANNELS: i64 = 8;
const WINDOW: i64 = 64;
const WINDOWS_PER_SITE: usize = 512;
/// Rounds that warm caches and threads, not counted.
const WARM_UP_ROUNDS: usize = 2;

#[derive(Debug, Clone)]
pub struct BenchFederatedOptions {
    pub clients: usize,
    pub rounds: usize,
    /// `false`: sites echo the global weights (`--local-work none`).
    pub local_epoch: bool,
    pub width: i64,
    pub compression: Compression,
    pub seed: u64,
}

impl Default for BenchFederatedOptions {
    fn default() -> Self {
        BenchFederatedOptions {
            clients: 10,
            rounds: 20,
            local_epoch: true,
            width: 1,
            compression: Compression::None,
            seed: 7,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct W2Report {
    pub workload: &'static str,
    pub clients: usize,
    pub rounds: usize,
    pub params: usize,
    pub local_work: &'static str,
    pub compression: String,
    pub round_s_p50: f64,
    pub round_s_p99: f64,
    pub rounds_per_s: f64,
    pub client_compute_s_p50: f64,
    pub overhead_s_p50: f64,
    pub bytes_per_round: usize,
    pub final_loss: f64,
    pub max_rss_mib: Option<f64>,
    /// Resident set after the first counted round and at the end: flat means no growth.
    pub rss_after_warm_up_mib: Option<f64>,
    pub rss_end_mib: Option<f64>,
    /// sha256 of the final merged weights: the same seed gives the same hash.
    pub weights_sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchFederatedError {
    #[error("--{what} {value}: must be at least {least}")]
    Option {
        what: &'static str,
        value: String,
        least: usize,
    },
    #[error(transparent)]
    Model(#[from] fogmesh_models::ModelError),
    #[error(transparent)]
    Weights(#[from] fogmesh_models::merge::MergeError),
    #[error(transparent)]
    Round(#[from] fogmesh_actors::FederationError),
    #[error("the coordinator could not start: {0}")]
    CoordinatorSpawn(#[source] ractor::SpawnErr),
    #[error("the coordinator gave no answer: {0}")]
    Coordinator(#[source] Unanswered),
    #[error("site {site} could not start: {source}")]
    Spawn {
        site: usize,
        #[source]
        source: ractor::SpawnErr,
    },
}

/// Site `i`'s windows: standard normal plus `0.1 · i` on every value.
fn site_windows(site: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed.wrapping_mul(1_000_003).wrapping_add(site as u64));
    let offset = 0.1 * site as f64;
    (0..WINDOWS_PER_SITE * (CHANNELS * WINDOW) as usize)
        .map(|_| (rng.normal() + offset) as f32)
        .collect()
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub async fn run(options: &BenchFederatedOptions) -> Result<W2Report, BenchFederatedError> {
    for (what, value, least) in [
        ("clients", options.clients, 1),
        ("rounds", options.rounds, WARM_UP_ROUNDS + 1),
        ("width", options.width.max(0) as usize, 1),
    ] {
        if value < least {
            return Err(BenchFederatedError::Option {
                what,
                value: value.to_string(),
                least,
            });
        }
    }
    let config = AutoencoderConfig {
        hidden: 32 * options.width,
        bottleneck: 16 * options.width,
        ..AutoencoderConfig::w1(CHANNELS, WINDOW)
    };
    let architecture = Architecture::ConvAutoencoder(config.clone());
    let initial = ConvAutoencoder::new(config.clone(), tch::Device::Cpu, options.seed as i64)?;
    let (bytes, _) = initial.to_safetensors()?;
    let params = Weights::from_safetensors(&bytes, "the initial model")?.parameters();
    let mut sites = Vec::with_capacity(options.clients);
    for i in 0..options.clients {
        let args = SiteTrainerArgs {
            site: format!("site-{i}"),
            architecture: architecture.clone(),
            windows: site_windows(i, options.seed)
                .chunks(config.window_len())
                .map(|w| ReplayItem {
                    window: w.to_vec(),
                    label: None,
                })
                .collect(),
            held_out: Vec::new(),
            feed: None,
            network: None,
        };
        let (actor, _) = Actor::spawn(None, SiteTrainer, args)
            .await
            .map_err(|source| BenchFederatedError::Spawn { site: i, source })?;
        sites.push(FederationSite {
            name: format!("site-{i}"),
            site: Site::Trainer(actor),
        });
    }
    let trainers: Vec<Site> = sites.iter().map(|s| s.site.clone()).collect();
    let plan = FederationPlan {
        work: RoundWork {
            local: LocalWork {
                seed: options.seed as i64,
                ..LocalWork::default()
            },
            compression: options.compression,
            echo: !options.local_epoch,
            distill: None,
        },
        aggregation: Aggregation::FedAvg,
        privacy: None,
        min_sites: options.clients,
        // Every site answers in every round of the benchmark.
        deadline: Duration::from_secs(3600),
        seed: options.seed,
        gate: None,
        buffered: None,
        distillation: None,
    };
    let args = FederatedCoordinatorArgs {
        federation: "w2".into(),
        base: architecture.manifest("w2", "1"),
        weights: bytes,
        sites,
        plan,
        publication: None,
        spent: Default::default(),
    };
    let (coordinator, _) = Actor::spawn(None, FederatedCoordinator, args)
        .await
        .map_err(BenchFederatedError::CoordinatorSpawn)?;

    let (mut round_s, mut compute_s, mut overhead_s) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes_per_round = 0;
    let mut rss_after_warm_up = None;
    let mut measured_start = Instant::now();
    for round in 0..options.rounds {
        if round == WARM_UP_ROUNDS {
            measured_start = Instant::now();
        }
        let started = Instant::now();
        let report = call(&coordinator, |reply| FederatedCoordinatorMsg::Round {
            reply,
        })
        .await??;
        let elapsed = started.elapsed().as_secs_f64();
        if round >= WARM_UP_ROUNDS {
            round_s.push(elapsed);
            compute_s.push(report.compute_s);
            overhead_s.push((elapsed - report.compute_s).max(0.0));
            bytes_per_round = (report.bytes_up + report.bytes_down) as usize;
            if round == WARM_UP_ROUNDS {
                rss_after_warm_up = rss_mib();
            }
        }
    }
    let measured = measured_start.elapsed().as_secs_f64();
    let global = call(&coordinator, |reply| FederatedCoordinatorMsg::Global {
        reply,
    })
    .await?;
    coordinator.stop(None);
    for site in trainers {
        if let Site::Trainer(actor) = site {
            actor.stop(None);
        }
    }
    let final_model = ConvAutoencoder::from_safetensors(config, &global, None, tch::Device::Cpu)?;
    let mut loss_sum = 0.0;
    for i in 0..options.clients {
        let scores = final_model.score(&site_windows(i, options.seed))?;
        loss_sum += scores.iter().map(|s| f64::from(*s)).sum::<f64>() / scores.len() as f64;
    }
    let counted = round_s.len();
    for series in [&mut round_s, &mut compute_s, &mut overhead_s] {
        series.sort_by(f64::total_cmp);
    }
    Ok(W2Report {
        workload: "w2",
        clients: options.clients,
        rounds: options.rounds,
        params,
        local_work: if options.local_epoch { "epoch" } else { "none" },
        compression: options.compression.to_string(),
        round_s_p50: quantile(&round_s, 0.5),
        round_s_p99: quantile(&round_s, 0.99),
        rounds_per_s: counted as f64 / measured,
        client_compute_s_p50: quantile(&compute_s, 0.5),
        overhead_s_p50: quantile(&overhead_s, 0.5),
        bytes_per_round,
        final_loss: loss_sum / options.clients as f64,
        max_rss_mib: peak_rss_mib(),
        rss_after_warm_up_mib: rss_after_warm_up,
        rss_end_mib: rss_mib(),
        weights_sha256: fogmesh_models::weights::sha256_hex(&global),
    })
}

/// Asks the coordinator; it runs as long as the benchmark does, so no timeout.
async fn call<T: Send + 'static>(
    coordinator: &ActorRef<FederatedCoordinatorMsg>,
    message: impl FnOnce(ractor::RpcReplyPort<T>) -> FederatedCoordinatorMsg,
) -> Result<T, BenchFederatedError> {
    match coordinator.call(message, None).await {
        Ok(ractor::rpc::CallResult::Success(answer)) => Ok(answer),
        Ok(_) => Err(BenchFederatedError::Coordinator(Unanswered::Stopped {
            callee: "federated coordinator",
        })),
        Err(e) => Err(BenchFederatedError::Coordinator(Unanswered::NotDelivered {
            callee: "federated coordinator",
            source: Undelivered::from(&e),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three sites, a few rounds: the merged model's loss falls below the initial one,
    /// and the same seed gives bit-identical merged weights.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rounds_lower_the_loss_and_repeat_bit_for_bit() {
        let options = BenchFederatedOptions {
            clients: 3,
            rounds: 4,
            ..BenchFederatedOptions::default()
        };
        let first = run(&options).await.unwrap();
        let second = run(&options).await.unwrap();
        assert_eq!(first.weights_sha256, second.weights_sha256);
        let echo = run(&BenchFederatedOptions {
            local_epoch: false,
            ..options.clone()
        })
        .await
        .unwrap();
        assert!(
            first.final_loss < echo.final_loss,
            "trained {} against untrained {}",
            first.final_loss,
            echo.final_loss
        );
        assert_eq!(first.params, echo.params);
        assert!(first.bytes_per_round >= 2 * 3 * 4 * first.params);
    }
}
