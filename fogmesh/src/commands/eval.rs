//! `fogmesh eval ...`: the zoo's evaluations on public benchmarks (`fogmesh_zoo`). Each
//! prints its progress and tables on stderr and one JSON object on stdout.

use std::path::PathBuf;

use clap::Subcommand;
use fogmesh_models::federated::Compression;
use fogmesh_zoo::federated_eval::{self, Policy};
use fogmesh_zoo::{continual_eval, elpv_eval, fusion_eval, notes_eval, skab, tep_eval};

use crate::task::{blocking, print_json};

#[derive(Subcommand)]
pub enum Dataset {
    /// Tennessee Eastman windows paired with operator notes of the same episode:
    /// sensors only, text only and the fused expert on the same test pairs.
    Multimodal {
        #[arg(long, default_value = "data/tep")]
        tep: PathBuf,
        #[arg(long, default_value = "models/data/tep_operator_notes.tsv")]
        notes: PathBuf,
        #[arg(long, default_value = "data/minilm")]
        minilm: PathBuf,
    },
    /// Tennessee Eastman: fault detection and false alarm rates per fault, fogmesh's
    /// autoencoder against the PCA T²/Q baseline on the same rows.
    Tep {
        /// The recordings `just setup` generates.
        #[arg(long, default_value = "data/tep")]
        data: PathBuf,
    },
    /// Federated training of the TEP fault classifier: six sites whose windows never
    /// meet (split by fault and by Dirichlet proportions), each alone, all data in one
    /// place, FedAvg, FedProx, compressed and private updates, and a poisoned site.
    Federated {
        /// The recordings `just setup` generates.
        #[arg(long, default_value = "data/tep")]
        data: PathBuf,
        #[arg(long, default_value_t = 6)]
        sites: usize,
        #[arg(long, default_value_t = 40)]
        rounds: usize,
        /// Every N-th labelled training window is used.
        #[arg(long, default_value_t = 3)]
        stride: usize,
        /// Dirichlet concentrations to split by (besides the split by fault).
        #[arg(long, value_delimiter = ',', default_value = "0.5,0.1")]
        alpha: Vec<f64>,
        /// The encoding of `fedavg_compressed`'s updates.
        #[arg(long, default_value = "topk:0.25+int8")]
        compression: Compression,
        /// The coordinator's server momentum (FedAvgM); 0 for plain FedAvg steps.
        #[arg(long, default_value_t = 0.0)]
        server_momentum: f64,
        /// Local epochs per round.
        #[arg(long, default_value_t = 2)]
        local_epochs: usize,
        /// Which policies to run (comma-separated); all by default.
        #[arg(long, value_delimiter = ',')]
        policies: Vec<Policy>,
        #[arg(long, default_value_t = 17)]
        seed: u64,
        /// Runs of each policy on the same split, each with the next seeds for local
        /// work and aggregation; the table shows their mean.
        #[arg(long, default_value_t = 1)]
        repeats: usize,
        /// libtorch intra-op threads (1 gives the same figures run after run).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Continual learning on a real TEP regime change: never update, naive fine-tuning
    /// and replay + EWC through the validation gate, scored on held-out rows of both
    /// regimes and on the other faults.
    Continual {
        /// The recordings `just setup` generates.
        #[arg(long, default_value = "data/tep")]
        data: PathBuf,
        /// The IDV run to adapt to (e.g. idv04); by default the first to settle at a
        /// new steady state.
        #[arg(long)]
        regime_change: Option<String>,
        /// New-regime windows collected after the drift is detected (one per row: 800
        /// is 8 plant hours).
        #[arg(long, default_value_t = 800)]
        collect: usize,
        /// libtorch intra-op threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// ELPV solar-cell images: defective or functional, the vision expert's accuracy
    /// on a stratified 25 % test split against the published VGG19.
    Elpv {
        /// The cells `just setup` converts.
        #[arg(long, default_value = "data/elpv")]
        data: PathBuf,
    },
    /// SKAB pump benchmark, scored like its leaderboard (F1, FAR, MAR).
    Skab {
        /// The SKAB `data` folder (valve1/, valve2/, other/); SKAB is not shipped.
        #[arg(long, default_value = "../shared/data/skab")]
        data: PathBuf,
        /// Rows per window.
        #[arg(long, default_value_t = 60)]
        window: usize,
        /// Channels at the autoencoder's narrowest layer.
        #[arg(long, default_value_t = 4)]
        bottleneck: i64,
        /// The alarm limit: this quantile of the training errors ...
        #[arg(long, default_value_t = 0.99)]
        ucl_quantile: f64,
        /// ... times this factor.
        #[arg(long, default_value_t = 1.5)]
        ucl_factor: f32,
    },
    /// Operator notes: which TEP class a note was written for, from MiniLM embeddings
    /// of its text alone (the project's own labelled set, 70/30 stratified split).
    Notes {
        /// The labelled notes (label, note, source; tab-separated).
        #[arg(long, default_value = "models/data/tep_operator_notes.tsv")]
        data: PathBuf,
        /// The MiniLM folder `just setup` exports.
        #[arg(long, default_value = "data/minilm")]
        minilm: PathBuf,
    },
}

pub async fn run(dataset: Dataset) -> anyhow::Result<()> {
    match dataset {
        Dataset::Multimodal { tep, notes, minilm } => {
            let options = fusion_eval::FusionEvalOptions {
                tep,
                notes,
                minilm,
                ..Default::default()
            };
            let report = blocking(
                "evaluating the multimodal expert on TEP windows and operator notes",
                move || fusion_eval::evaluate(&options),
            )
            .await?;
            eprintln!(
                "{:<14} {:>8} {:>8} {:>8}",
                "class", "sensors", "text", "fused"
            );
            for (class, s, t, f) in &report.per_class {
                eprintln!("{class:<14} {:>8.3} {:>8.3} {:>8.3}", s, t, f);
            }
            print_json(&report)
        }
        Dataset::Tep { data } => {
            let options = tep_eval::TepEvalOptions {
                data,
                ..Default::default()
            };
            let report = blocking("evaluating on the Tennessee Eastman recordings", move || {
                tep_eval::evaluate(&options, &mut |run| {
                    let pct =
                        |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}", 100.0 * v));
                    eprintln!(
                        "{:<12} PCA FDR {:>5} FAR {:>5}   fogmesh FDR {:>5} FAR {:>5}   diagnosed {:>5}",
                        run.run,
                        pct(run.pca.fdr),
                        pct(run.pca.far),
                        pct(run.fogmesh.fdr),
                        pct(run.fogmesh.far),
                        pct(run.diagnosed)
                    );
                })
            })
            .await?;
            print_json(&report)
        }
        Dataset::Federated {
            data,
            sites,
            rounds,
            stride,
            alpha,
            compression,
            server_momentum,
            local_epochs,
            policies,
            seed,
            repeats,
            threads,
        } => {
            let defaults = federated_eval::FederatedEvalOptions::default();
            let options = federated_eval::FederatedEvalOptions {
                tep: tep_eval::TepEvalOptions {
                    data,
                    ..defaults.tep.clone()
                },
                sites,
                rounds,
                stride,
                alphas: alpha,
                compression,
                server_momentum,
                work: fogmesh_models::federated::LocalWork {
                    epochs: local_epochs,
                    ..defaults.work.clone()
                },
                policies: if policies.is_empty() {
                    defaults.policies.clone()
                } else {
                    policies
                },
                seed,
                repeats,
                threads,
                ..defaults
            };
            let report = blocking("evaluating federated training on TEP", move || {
                federated_eval::evaluate(&options, &mut |split, policy| {
                    eprintln!(
                        "{:<9} {:>5} {:<22} accuracy {:>5.1}  rounds to converge {:>3}  bytes up {:>11}{}{}",
                        split.split,
                        split.alpha.map_or("-".into(), |a| a.to_string()),
                        policy.policy,
                        100.0 * policy.accuracy,
                        policy
                            .rounds_to_converge
                            .map_or("-".into(), |r| r.to_string()),
                        policy.bytes,
                        policy
                            .epsilon
                            .map_or(String::new(), |e| format!("  epsilon {e:.1}")),
                        if policy.accuracy_runs.len() > 1 {
                            let runs: Vec<String> = policy
                                .accuracy_runs
                                .iter()
                                .map(|a| format!("{:.1}", 100.0 * a))
                                .collect();
                            format!("  runs {}", runs.join(" "))
                        } else {
                            String::new()
                        },
                    );
                })
            })
            .await?;
            print_json(&report)
        }
        Dataset::Continual {
            data,
            regime_change,
            collect,
            threads,
        } => {
            let options = continual_eval::ContinualEvalOptions {
                data,
                regime_change,
                collect,
                threads,
                ..Default::default()
            };
            let report = blocking(
                "evaluating continual learning on a TEP regime change",
                move || continual_eval::evaluate(&options),
            )
            .await?;
            eprintln!("{}", report.table());
            print_json(&report)
        }
        Dataset::Elpv { data } => {
            let options = elpv_eval::ElpvEvalOptions {
                data,
                ..Default::default()
            };
            let report = blocking("evaluating on the ELPV solar cells", move || {
                elpv_eval::run(&options, &mut |epoch| {
                    eprintln!(
                        "epoch {:>2}/{}  train loss {:.4}  validation loss {:.4}  {:.0} images/s  {:.0} s",
                        epoch.epoch,
                        epoch.epochs,
                        epoch.train_loss,
                        epoch.validation_loss,
                        epoch.samples_per_s,
                        epoch.elapsed_s
                    );
                })
            })
            .await?;
            eprintln!("{}", report.table());
            print_json(&report)
        }
        Dataset::Notes { data, minilm } => {
            let options = notes_eval::NotesEvalOptions {
                data,
                minilm,
                ..Default::default()
            };
            let report = blocking("evaluating on the operator notes", move || {
                notes_eval::evaluate(&options)
            })
            .await?;
            print_json(&report)
        }
        Dataset::Skab {
            data,
            window,
            bottleneck,
            ucl_quantile,
            ucl_factor,
        } => {
            let options = skab::SkabOptions {
                data,
                window,
                bottleneck,
                ucl_quantile,
                ucl_factor,
                ..Default::default()
            };
            let report = blocking("evaluating on SKAB", move || {
                skab::evaluate(&options, &mut |run| {
                    eprintln!(
                        "{:<10} rows {:>5}  F1 {:>5}  trained in {:.1} s",
                        run.run,
                        run.rows,
                        run.f1.map_or("-".into(), |f| format!("{f:.3}")),
                        run.train_seconds
                    );
                })
            })
            .await?;
            print_json(&report)
        }
    }
}
