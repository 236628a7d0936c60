//! `fogmesh bench ...`: the benchmark workloads (`fogmesh_bench`), each printing one JSON
//! object on stdout. Targets are read off these reports, never asserted by timed tests.

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use fogmesh_bench::{federated, flood, ingest, merge, swap, training_speed, w1, w1_remote};

use crate::task::{blocking, print_json, stop_signal};

#[derive(Subcommand)]
pub enum Workload {
    /// One sensor floods a node at 100x its `max_rate` while another keeps its pace,
    /// over mutual TLS: the quiet sensor's p99 alone and flooded, the flood accepted
    /// and refused, and resident memory.
    Flood {
        /// Length of each phase in seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// The quiet sensor's samples per second.
        #[arg(long, default_value_t = 1_000)]
        quiet_rate: u64,
        /// The flooding sensor's `max_rate` (it sends 100,000 samples per second).
        #[arg(long, default_value_t = 1_000)]
        flood_limit: u64,
    },
    /// `fogmesh sim` at scale: a generated plant of NODES `fogmesh node` processes on
    /// three levels, run for SECONDS after the mesh forms: nodes, simulated and wall
    /// seconds, their ratio, and memory per node (resident, and proportional: libtorch's
    /// pages are shared by all the processes).
    Sim {
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Zones as closed segments: nodes link only within their zones, the site
        /// servers are the gateways between them (`[node] segmented`).
        #[arg(long)]
        segmented: bool,
        /// Nodes prove who they are with certificates of a mesh CA made for the run
        /// (mutual TLS on every link) instead of running plaintext.
        #[arg(long)]
        tls: bool,
        /// Every node's `[cluster] gossip_interval_ms` (default: 200 up to 50 nodes,
        /// 500 above): each node's gossip work grows with the mesh, so a large plant on
        /// two cores gossips less often.
        #[arg(long)]
        gossip_interval_ms: Option<u64>,
        /// Keep the nodes' folders and the report (`report.json`, `report.html`) here
        /// instead of removing them.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// W2: federated rounds of CLIENTS site actors training the W1 autoencoder on
    /// their own non-IID windows (or echoing, `--local-work none`), merged by FedAvg:
    /// round time, the slowest site's work, the framework's overhead, bytes per round,
    /// the final loss and resident memory.
    Federated {
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// Rounds; the first 2 are not counted.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        #[arg(long, value_enum, default_value_t = LocalWorkKind::Epoch)]
        local_work: LocalWorkKind,
        /// Multiplies the autoencoder's hidden channels (8 gives about 0.35 M parameters).
        #[arg(long, default_value_t = 1)]
        width: i64,
        /// How sites encode updates: none, int8, topk:<fraction> or topk:<fraction>+int8.
        #[arg(long, default_value = "none")]
        compression: fogmesh_models::federated::Compression,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Samples acknowledged per second with the edge log on disk (every ack after its
    /// fsync) and in memory, from SENSORS producers: ack p50/p99 and fsyncs per second.
    Ingest {
        /// Length of each phase in seconds (after a one-second warm-up).
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        sensors: usize,
        /// Samples per pushed batch.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Folder for the durable phase's log (default: a temporary folder); put it on
        /// the disk a node would use.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// W1 steady, then W1 while every expert is hot-swapped to a new version every
    /// `--every` seconds: p99 of both phases, swaps, failed requests.
    Swap {
        /// Length of each phase in seconds (the first 2 are warm-up).
        #[arg(long, default_value_t = 12.0)]
        seconds: f64,
        /// Seconds between swap rounds.
        #[arg(long, default_value_t = 1.0)]
        every: f64,
    },
    /// Training and inference speed of the time-series models and the vision expert
    /// against PyTorch eager: rounds taken in turns, medians compared.
    Train {
        /// Random windows per model.
        #[arg(long, default_value_t = training_speed::SAMPLES)]
        samples: usize,
        /// Training passes per round.
        #[arg(long, default_value_t = training_speed::EPOCHS)]
        epochs: usize,
        /// libtorch intra-op threads, for both fogmesh and PyTorch.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Rounds per side and model, each a fresh model trained and scored.
        #[arg(long, default_value_t = training_speed::ROUNDS)]
        rounds: usize,
    },
    /// Model merging against a memcpy of the same run: random replicas of ~PARAMS f32
    /// parameters in ten tensors, merged on every core.
    Merge {
        /// Parameters per model.
        #[arg(long, default_value_t = 25_000_000)]
        params: usize,
        /// Models merged, the base not counted (default 4; 2 for slerp).
        #[arg(long)]
        models: Option<usize>,
        /// weighted_average, task_arithmetic, ties, dare or slerp.
        #[arg(long, default_value = "weighted_average")]
        method: merge::BenchMethod,
    },
    /// W1: routing + batched expert inference under a closed loop.
    W1 {
        /// Windows kept in flight.
        #[arg(long, default_value_t = 256)]
        inflight: usize,
        /// Run length in seconds; the first 3 are warm-up.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        #[arg(long, value_enum, default_value_t = Gate::Static)]
        gate: Gate,
        /// libtorch intra-op threads per expert.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Experts on a second node process, reached over the cluster link (static
        /// gate only); also reports the link's round trip against bare loopback TCP.
        #[arg(long)]
        remote: bool,
        /// With --remote: both nodes speak mutual TLS with certificates of a mesh CA
        /// made for the run (without it, both are insecure = true).
        #[arg(long, requires = "remote")]
        tls: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LocalWorkKind {
    /// One epoch of Adam over the site's windows.
    Epoch,
    /// Echo: the site sends its weights back unchanged.
    None,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Gate {
    Static,
    Learned,
}

pub async fn run(workload: Workload) -> anyhow::Result<()> {
    match workload {
        Workload::Flood {
            seconds,
            quiet_rate,
            flood_limit,
        } => {
            let options = flood::BenchFloodOptions {
                seconds,
                quiet_rate,
                flood_limit,
            };
            let report = flood::run(&options)
                .await
                .context("running the flood benchmark")?;
            print_json(&report)
        }
        Workload::Sim {
            nodes,
            seconds,
            seed,
            segmented,
            tls,
            gossip_interval_ms,
            out: keep,
        } => {
            use fogmesh_simulations::sim;
            let layout = sim::scenario::PlantLayout {
                segmented,
                tls,
                gossip_interval_ms,
            };
            let text = sim::scenario::generated_plant(nodes, seconds, seed, layout);
            let scenario = sim::scenario::Scenario::parse(
                &text,
                std::path::Path::new("generated-plant.toml"),
            )?;
            let out = keep.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("fogmesh-bench-sim-{}", std::process::id()))
            });
            let options = sim::SimOptions {
                binary: std::env::current_exe().context("finding the fogmesh binary")?,
                out: out.clone(),
            };
            let stop = stop_signal()?;
            let report = tokio::select! {
                report = sim::run(&scenario, &options) => report,
                () = stop => Err(sim::SimError::Stopped),
            };
            if keep.is_none() {
                let _ = std::fs::remove_dir_all(&out);
            }
            let report = report.with_context(|| format!("simulating {nodes} nodes"))?;
            print_json(&serde_json::json!({
                "nodes": report.nodes,
                "segmented": segmented,
                "tls": tls,
                "gossip_interval_ms": scenario.gossip_interval_ms,
                "zones": report.zones,
                "levels": report.levels,
                "formed_after_s": report.formed_after_s,
                "simulated_s": report.simulated_s,
                "wall_s": report.wall_s,
                "sim_to_wall": report.sim_to_wall,
                "rss_mib_per_node": report.rss_mib_per_node,
                "pss_mib_per_node": report.pss_mib_per_node,
                "trace_events": report.trace_events,
            }))
        }
        Workload::Federated {
            clients,
            rounds,
            local_work,
            width,
            compression,
            seed,
        } => {
            let options = federated::BenchFederatedOptions {
                clients,
                rounds,
                local_epoch: matches!(local_work, LocalWorkKind::Epoch),
                width,
                compression,
                seed,
            };
            let report = federated::run(&options)
                .await
                .context("running W2, the federated round")?;
            print_json(&report)
        }
        Workload::Ingest {
            seconds,
            sensors,
            batch,
            dir,
        } => {
            let options = ingest::BenchIngestOptions {
                seconds,
                sensors,
                batch,
                dir,
            };
            let report = ingest::run(&options)
                .await
                .context("running the ingest benchmark")?;
            print_json(&report)
        }
        Workload::Swap { seconds, every } => {
            anyhow::ensure!(
                every.is_finite() && every > 0.0 && every < seconds,
                "--every {every}: must be positive and shorter than --seconds {seconds}"
            );
            let defaults = swap::BenchSwapOptions::default();
            let options = swap::BenchSwapOptions {
                load: w1::W1Options {
                    seconds,
                    ..defaults.load.clone()
                },
                swap_every: std::time::Duration::from_secs_f64(every),
                ..defaults
            };
            let report = swap::run(&options)
                .await
                .context("running the swap benchmark")?;
            print_json(&report)
        }
        Workload::Train {
            samples,
            epochs,
            threads,
            rounds,
        } => {
            let options = training_speed::BenchTrainOptions {
                samples,
                epochs,
                threads,
                rounds,
                ..Default::default()
            };
            let report = blocking("benchmarking training", move || {
                training_speed::run(&options)
            })
            .await?;
            print_json(&report)
        }
        Workload::Merge {
            params,
            models,
            method,
        } => {
            let options = merge::BenchMergeOptions {
                params,
                models,
                method,
                ..Default::default()
            };
            let outcome =
                blocking("benchmarking model merging", move || merge::run(&options)).await?;
            print_json(&outcome.report)
        }
        Workload::W1 {
            inflight,
            seconds,
            gate,
            threads,
            remote,
            tls,
        } => {
            let options = w1::W1Options {
                inflight,
                seconds,
                intra_op_threads: threads,
                gate: match gate {
                    Gate::Static => w1::GateKind::Static,
                    Gate::Learned => w1::GateKind::Learned,
                },
                ..Default::default()
            };
            if remote {
                let report = w1_remote::run(&options, tls)
                    .await
                    .context("running W1 with remote experts")?;
                print_json(&report)
            } else {
                print_json(&w1::run(&options).await.context("running W1")?)
            }
        }
    }
}
