//! The `fogmesh` command line: thin over the library crates. Each subcommand parses
//! its flags, calls one library entry point, and turns library errors into a message
//! with context and a non-zero exit.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fogmesh_simulations::{demo, w1, w1_remote};

#[derive(Parser)]
#[command(
    name = "fogmesh",
    version,
    about = "A supervised actor mesh that hosts industrial models on fog nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a fog node from a TOML config: sensor streams, routers, experts, gRPC, MQTT.
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Deploy a mesh spec (sensors, experts with replicas and placement rules, routers)
    /// across the mesh through any of its nodes; refused whole if it cannot be placed.
    Apply {
        /// A node of the mesh (its gRPC address).
        #[arg(long, default_value = "http://127.0.0.1:7700")]
        node: String,
        /// Check and place, but store nothing.
        #[arg(long)]
        dry_run: bool,
        /// The mesh.toml.
        spec: PathBuf,
    },
    /// Move every replica of an expert to a stored version: checked on the node,
    /// shipped to every node's model store, then hot-swapped as the mesh adopts it.
    /// Prints the outcome (committed or rolled back) and exits non-zero when a node
    /// refused the version.
    Rollout {
        /// A node of the mesh (its gRPC address).
        #[arg(long, default_value = "http://127.0.0.1:7700")]
        node: String,
        /// The expert, as named in the mesh spec.
        expert: String,
        /// `name@version`, or the version alone for the serving model's name.
        version: String,
    },
    /// Move every replica of an expert back to an earlier stored version: VERSION, or
    /// by default the one the serving version came from.
    Rollback {
        /// A node of the mesh (its gRPC address).
        #[arg(long, default_value = "http://127.0.0.1:7700")]
        node: String,
        expert: String,
        version: Option<String>,
    },
    /// The mesh's nodes (role, address, cores, GPUs, load, link) and placement, then
    /// each node's experts, routers and sensor streams; a node outside a mesh shows
    /// only its own tables.
    Status {
        /// The node's gRPC address.
        #[arg(long, default_value = "http://127.0.0.1:7700")]
        node: String,
    },
    /// The embedded default: a local node watching a replayed Tennessee Eastman plant.
    Demo {
        /// Folder with the recordings `just setup` generates.
        #[arg(long, default_value = "data/tep")]
        data: PathBuf,
        /// Training budget per unit expert, in seconds.
        #[arg(long, default_value_t = 6.0)]
        train_seconds: f64,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The model store: weights addressed by sha256, a manifest per version.
    Models {
        /// The store's folder.
        #[arg(long, default_value = "data/models", global = true)]
        store: PathBuf,
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// Train one model of the zoo on a plant data set, evaluate it with the set's
    /// standard metric, and store it as a new version in the model store. Progress on
    /// stderr; the report as one JSON object on stdout.
    Train {
        #[arg(long, value_enum)]
        model: TrainModel,
        /// The data: `data/tep` for the time-series and multimodal models, the notes
        /// file for the language model, `data/elpv` for the vision model.
        #[arg(long)]
        data: PathBuf,
        /// The model store that receives the trained version.
        #[arg(long, default_value = "data/models")]
        store: PathBuf,
        /// Store name (default: one per model, e.g. `tep-diagnosis`).
        #[arg(long)]
        name: Option<String>,
        /// Store version (default: one more than the newest whole-number version).
        #[arg(long)]
        version: Option<String>,
        /// Upper bound on epochs.
        #[arg(long)]
        epochs: Option<usize>,
        /// Epochs without a better validation loss before stopping.
        #[arg(long)]
        patience: Option<usize>,
        /// Fixes initialisation, split and batch order.
        #[arg(long)]
        seed: Option<i64>,
        /// Wall-clock budget for training, in seconds.
        #[arg(long)]
        max_seconds: Option<f64>,
        /// The MiniLM folder `just setup` exports (models that read text).
        #[arg(long, default_value = "data/minilm")]
        minilm: PathBuf,
        /// The labelled operator notes (models that read them).
        #[arg(long, default_value = "models/data/tep_operator_notes.tsv")]
        notes: PathBuf,
        /// libtorch intra-op threads. One by default: on a fog node the serving experts
        /// share the cores, and on two busy cores more threads only wait on each other.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Merge stored versions of one network (weighted average, task arithmetic, TIES,
    /// DARE, SLERP) into a new stored version, through the `Merger` actor; the result is
    /// loaded once to prove it serves, and stored unvalidated. One JSON object on stdout.
    Merge(MergeFlags),
    /// Evaluations on public benchmarks; each prints one JSON object on stdout.
    Eval {
        #[command(subcommand)]
        dataset: Dataset,
    },
    /// Benchmark workloads; each prints one JSON object on stdout.
    Bench {
        #[command(subcommand)]
        workload: Workload,
    },
}

#[derive(Subcommand)]
enum Workload {
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
        #[arg(long, default_value_t = fogmesh_simulations::bench_train::SAMPLES)]
        samples: usize,
        /// Training passes per round.
        #[arg(long, default_value_t = fogmesh_simulations::bench_train::EPOCHS)]
        epochs: usize,
        /// libtorch intra-op threads, for both fogmesh and PyTorch.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Rounds per side and model, each a fresh model trained and scored.
        #[arg(long, default_value_t = fogmesh_simulations::bench_train::ROUNDS)]
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
        method: fogmesh_simulations::bench_merge::BenchMethod,
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
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TrainModel {
    /// Convolutional autoencoder: anomaly detection (time series).
    Autoencoder,
    /// Temporal convolution network: forecasting, its error an anomaly score.
    Forecaster,
    /// Convolutional fault classifier: diagnosis (which fault).
    Classifier,
    /// Operator notes and alarm texts to fault classes (`--data` the notes file).
    Language,
    /// Sensor window + operator note fused into one diagnosis (needs `--notes`, `--minilm`).
    Multimodal,
    /// Defect CNN on solar-cell electroluminescence images (`--data data/elpv`).
    Vision,
}

/// `fogmesh merge`'s flags. Each method takes only its own parameters: a flag another
/// method takes is refused rather than silently ignored.
#[derive(clap::Args)]
struct MergeFlags {
    /// The model store the versions are read from and the merge is stored in.
    #[arg(long, default_value = "data/models")]
    store: PathBuf,
    #[arg(long, value_enum)]
    method: MergeMethodName,
    /// The versions merged, NAME@VERSION (NAME alone: its newest), in the order
    /// `--weights` and slerp's `--t` refer to.
    #[arg(required = true, value_name = "MODEL")]
    models: Vec<String>,
    /// The version the deltas are taken from (task_arithmetic, ties, dare).
    #[arg(long, value_name = "ID")]
    base: Option<String>,
    /// weighted_average: one weight per model, comma-separated (default: equal).
    #[arg(long, value_delimiter = ',')]
    weights: Option<Vec<f64>>,
    /// task_arithmetic, ties, dare: the factor on the merged delta (default 1).
    #[arg(long)]
    scale: Option<f64>,
    /// ties: the share of each delta's largest magnitudes kept, in (0, 1] (default 0.5).
    #[arg(long)]
    density: Option<f64>,
    /// dare: the probability of dropping each delta element, in [0, 1) (default 0.5).
    #[arg(long)]
    drop_rate: Option<f64>,
    /// dare: fixes which elements are dropped (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// slerp: 0 gives the first model, 1 the second (default 0.5).
    #[arg(long)]
    t: Option<f64>,
    /// The merged version's name (default: the first model's).
    #[arg(long)]
    name: Option<String>,
    /// Its version (default: one more than the newest whole-number version of the name).
    #[arg(long)]
    version: Option<String>,
    /// The MiniLM folder `just setup` exports: merged language and multimodal models
    /// are loaded with it to prove they serve.
    #[arg(long, default_value = "data/minilm")]
    minilm: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum MergeMethodName {
    #[value(name = "weighted_average")]
    WeightedAverage,
    #[value(name = "task_arithmetic")]
    TaskArithmetic,
    Ties,
    Dare,
    Slerp,
}

#[derive(Subcommand)]
enum ModelsAction {
    /// Every stored version.
    Ls {
        /// List the store of the node at this gRPC address (HOST:PORT) instead.
        #[arg(long)]
        node: Option<String>,
    },
    /// One version's manifest (NAME for the newest, NAME@VERSION for one).
    Show { id: String },
    /// Store a manifest (JSON) and its safetensors weights; the hash is checked.
    Import {
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long)]
        weights: PathBuf,
    },
    /// Write manifest.json and weights.safetensors of a version into a folder.
    Export {
        id: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Send a version (NAME for the newest) to a node's store, with the ancestors it
    /// lacks; checked by sha256 on the node.
    Push {
        id: String,
        /// The node's gRPC address (HOST:PORT).
        #[arg(long)]
        node: String,
        /// The mesh's `[cluster] secret`, for a node in a mesh: only its fingerprint
        /// is sent.
        #[arg(long)]
        secret: Option<String>,
    },
    /// Copy a version (NAME for the newest) from a node's store into this one, with
    /// the ancestors this one lacks; checked by sha256 as it arrives.
    Pull {
        id: String,
        /// The node's gRPC address (HOST:PORT).
        #[arg(long)]
        node: String,
    },
}

#[derive(Subcommand)]
enum Dataset {
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

#[derive(Clone, Copy, ValueEnum)]
enum Gate {
    Static,
    Learned,
}

/// jemalloc serves every allocation in the process, libtorch's tensors included: the
/// crate replaces `malloc` itself, not only Rust's allocator. glibc hands freed blocks of
/// tensor size back to the kernel and faults fresh zeroed pages in for the next batch of
/// the same size (265k page faults against 22k for the same 16 batches of classifier
/// inference, a fifth of the time); jemalloc keeps them for reuse and returns idle
/// memory after a few seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,fogmesh=info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Node { config } => run_node(config).await,
            Command::Status { node } => print_status(&node).await,
            Command::Apply {
                node,
                dry_run,
                spec,
            } => apply(&node, &spec, dry_run).await,
            Command::Rollout {
                node,
                expert,
                version,
            } => rollout(&node, &expert, &version, false).await,
            Command::Rollback {
                node,
                expert,
                version,
            } => rollout(&node, &expert, version.as_deref().unwrap_or(""), true).await,
            Command::Demo {
                data,
                train_seconds,
                json,
            } => {
                let options = demo::DemoOptions {
                    data_dir: data,
                    train_seconds,
                    ..Default::default()
                };
                let mut stdout = std::io::stdout();
                let report = demo::run(&options, &mut stdout)
                    .await
                    .context("running the demo")?;
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                Ok(())
            }
            Command::Models { store, action } => models(&store, action).await,
            Command::Merge(flags) => merge_versions(flags).await,
            Command::Bench {
                workload: Workload::Swap { seconds, every },
            } => {
                anyhow::ensure!(
                    every.is_finite() && every > 0.0 && every < seconds,
                    "--every {every}: must be positive and shorter than --seconds {seconds}"
                );
                let defaults = fogmesh_simulations::bench_swap::BenchSwapOptions::default();
                let options = fogmesh_simulations::bench_swap::BenchSwapOptions {
                    load: w1::W1Options {
                        seconds,
                        ..defaults.load.clone()
                    },
                    swap_every: std::time::Duration::from_secs_f64(every),
                    ..defaults
                };
                let report = fogmesh_simulations::bench_swap::run(&options)
                    .await
                    .context("running the swap benchmark")?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Eval {
                dataset: Dataset::Multimodal { tep, notes, minilm },
            } => {
                let options = fogmesh_simulations::fusion_eval::FusionEvalOptions {
                    tep,
                    notes,
                    minilm,
                    ..Default::default()
                };
                let report = tokio::task::spawn_blocking(move || {
                    fogmesh_simulations::fusion_eval::evaluate(&options)
                })
                .await
                .context("the evaluation task")?
                .context("evaluating the multimodal expert on TEP windows and operator notes")?;
                eprintln!("{:<14} {:>8} {:>8} {:>8}", "class", "sensors", "text", "fused");
                for (class, s, t, f) in &report.per_class {
                    eprintln!("{class:<14} {:>8.3} {:>8.3} {:>8.3}", s, t, f);
                }
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Train {
                model,
                data,
                store,
                name,
                version,
                epochs,
                patience,
                seed,
                max_seconds,
                minilm,
                notes,
                threads,
            } => {
                use fogmesh_simulations::train::{ModelChoice, TrainRequest};
                let model = match model {
                    TrainModel::Autoencoder => ModelChoice::Autoencoder,
                    TrainModel::Forecaster => ModelChoice::Forecaster,
                    TrainModel::Classifier => ModelChoice::Classifier,
                    TrainModel::Language => ModelChoice::Language,
                    TrainModel::Multimodal => ModelChoice::Multimodal,
                    TrainModel::Vision => ModelChoice::Vision,
                };
                let mut options = model.default_options();
                options.epochs = epochs.unwrap_or(options.epochs);
                options.patience = patience.unwrap_or(options.patience);
                options.seed = seed.unwrap_or(options.seed);
                options.max_seconds = max_seconds.or(options.max_seconds);
                let request = TrainRequest {
                    model,
                    data,
                    store,
                    name,
                    version,
                    options,
                    minilm,
                    notes,
                    threads,
                };
                let outcome = tokio::task::spawn_blocking(move || train(&request))
                    .await
                    .context("the training task")??;
                println!("{}", serde_json::to_string(&outcome)?);
                Ok(())
            }
            Command::Eval {
                dataset: Dataset::Tep { data },
            } => {
                let options = fogmesh_simulations::tep_eval::TepEvalOptions {
                    data,
                    ..Default::default()
                };
                let report = tokio::task::spawn_blocking(move || {
                    fogmesh_simulations::tep_eval::evaluate(&options, &mut |run| {
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
                .await
                .context("the evaluation task")?
                .context("evaluating on the Tennessee Eastman recordings")?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Eval {
                dataset:
                    Dataset::Continual {
                        data,
                        regime_change,
                        collect,
                        threads,
                    },
            } => {
                let options = fogmesh_simulations::continual_eval::ContinualEvalOptions {
                    data,
                    regime_change,
                    collect,
                    threads,
                    ..Default::default()
                };
                let report = tokio::task::spawn_blocking(move || {
                    fogmesh_simulations::continual_eval::evaluate(&options)
                })
                .await
                .context("the evaluation task")?
                .context("evaluating continual learning on a TEP regime change")?;
                eprintln!("{}", report.table());
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Eval {
                dataset: Dataset::Elpv { data },
            } => {
                let options = fogmesh_simulations::elpv_eval::ElpvEvalOptions {
                    data,
                    ..Default::default()
                };
                let report = tokio::task::spawn_blocking(move || {
                    fogmesh_simulations::elpv_eval::run(&options, &mut |epoch| {
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
                .await
                .context("the evaluation task")?
                .context("evaluating on the ELPV solar cells")?;
                eprintln!("{}", report.table());
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Eval {
                dataset: Dataset::Notes { data, minilm },
            } => {
                let options = fogmesh_simulations::notes_eval::NotesEvalOptions {
                    data,
                    minilm,
                    ..Default::default()
                };
                let report = tokio::task::spawn_blocking(move || {
                    fogmesh_simulations::notes_eval::evaluate(&options)
                })
                .await
                .context("the evaluation task")?
                .context("evaluating on the operator notes")?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Eval {
                dataset:
                    Dataset::Skab {
                        data,
                        window,
                        bottleneck,
                        ucl_quantile,
                        ucl_factor,
                    },
            } => {
                let options = fogmesh_simulations::skab::SkabOptions {
                    data,
                    window,
                    bottleneck,
                    ucl_quantile,
                    ucl_factor,
                    ..Default::default()
                };
                let report = tokio::task::spawn_blocking(move || {
                    fogmesh_simulations::skab::evaluate(&options, &mut |run| {
                        eprintln!(
                            "{:<10} rows {:>5}  F1 {:>5}  trained in {:.1} s",
                            run.run,
                            run.rows,
                            run.f1.map_or("-".into(), |f| format!("{f:.3}")),
                            run.train_seconds
                        );
                    })
                })
                .await
                .context("the evaluation task")?
                .context("evaluating on SKAB")?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Bench {
                workload:
                    Workload::Train {
                        samples,
                        epochs,
                        threads,
                        rounds,
                    },
            } => {
                let options = fogmesh_simulations::bench_train::BenchTrainOptions {
                    samples,
                    epochs,
                    threads,
                    rounds,
                    ..Default::default()
                };
                let report = tokio::task::spawn_blocking(move || {
                    fogmesh_simulations::bench_train::run(&options)
                })
                .await
                .context("the benchmark task")?
                .context("benchmarking training")?;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Command::Bench {
                workload:
                    Workload::Merge {
                        params,
                        models,
                        method,
                    },
            } => {
                let options = fogmesh_simulations::bench_merge::BenchMergeOptions {
                    params,
                    models,
                    method,
                    ..Default::default()
                };
                let outcome = tokio::task::spawn_blocking(move || {
                    fogmesh_simulations::bench_merge::run(&options)
                })
                .await
                .context("the benchmark task")?
                .context("benchmarking model merging")?;
                println!("{}", serde_json::to_string(&outcome.report)?);
                Ok(())
            }
            Command::Bench {
                workload:
                    Workload::W1 {
                        inflight,
                        seconds,
                        gate,
                        threads,
                        remote,
                    },
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
                let json = if remote {
                    let report = w1_remote::run(&options)
                        .await
                        .context("running W1 with remote experts")?;
                    serde_json::to_string(&report)?
                } else {
                    serde_json::to_string(&w1::run(&options).await.context("running W1")?)?
                };
                println!("{json}");
                Ok(())
            }
        }
    })
}

async fn apply(node: &str, spec: &std::path::Path, dry_run: bool) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(spec).with_context(|| format!("reading {}", spec.display()))?;
    let folder = std::fs::canonicalize(spec)
        .ok()
        .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
        .unwrap_or_default();
    let text = fogmesh_cluster::mesh_spec::MeshSpec::absolute_text(&text, &folder)
        .with_context(|| format!("{} is not TOML", spec.display()))?;
    let mut control = fogmesh_proto::control_client::ControlClient::connect(node.to_string())
        .await
        .with_context(|| format!("connecting to the node at {node}"))?;
    let reply = control
        .apply(fogmesh_proto::ApplyRequest {
            spec_toml: text,
            dry_run,
        })
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))
        .with_context(|| format!("{} refused {}", node, spec.display()))?
        .into_inner();
    println!(
        "{} spec v{}",
        if dry_run { "would apply" } else { "applied" },
        reply.version
    );
    for p in reply.placement {
        println!("  {:<20} on {}", p.expert, p.nodes.join(", "));
    }
    Ok(())
}

async fn rollout(node: &str, expert: &str, version: &str, rollback: bool) -> anyhow::Result<()> {
    let what = if rollback { "rollback" } else { "rollout" };
    let mut control = fogmesh_proto::control_client::ControlClient::connect(node.to_string())
        .await
        .with_context(|| format!("connecting to the node at {node}"))?;
    let reply = control
        .rollout(fogmesh_proto::RolloutRequest {
            expert: expert.to_string(),
            model: version.to_string(),
            rollback,
        })
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))
        .with_context(|| format!("{node} refused the {what} of expert {expert}"))?
        .into_inner();
    println!(
        "{what} of {} from {} to {}: {} (spec v{})",
        reply.expert, reply.from, reply.to, reply.outcome, reply.spec_version
    );
    println!("  holding {}: {}", reply.to, reply.prepared.join(", "));
    if !reply.lost.is_empty() {
        println!("  lost meanwhile: {}", reply.lost.join(", "));
    }
    println!("  {}", reply.detail);
    anyhow::ensure!(
        reply.outcome == "committed",
        "the {what} rolled back: every replica stays on {}",
        reply.from
    );
    Ok(())
}

async fn models(store: &std::path::Path, action: ModelsAction) -> anyhow::Result<()> {
    let store = fogmesh_models::store::ModelStore::open(store);
    match action {
        ModelsAction::Ls { node: Some(node) } => {
            let versions = fogmesh_cluster::list_versions(&node, None).await?;
            println!("{:<32} {:>10}  SHA256", "MODEL", "BYTES");
            for v in versions {
                println!("{:<32} {:>10}  {}", v.model, v.total_bytes, v.sha256);
            }
        }
        ModelsAction::Ls { node: None } => {
            let manifests = store.list()?;
            println!(
                "{:<20} {:<12} {:<12} {:<18} {:>10}  {:<12} {:<24} METRICS",
                "NAME", "VERSION", "KIND", "ARCHITECTURE", "BYTES", "SHA256", "PARENTS"
            );
            for m in manifests {
                let metrics: Vec<String> = m
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k}={v:.4}"))
                    .collect();
                println!(
                    "{:<20} {:<12} {:<12} {:<18} {:>10}  {:<12} {:<24} {}",
                    m.name,
                    m.version,
                    serde_json::to_value(m.kind)?.as_str().unwrap_or_default(),
                    m.architecture,
                    m.weights_bytes,
                    &m.weights_sha256[..12.min(m.weights_sha256.len())],
                    if m.parents.is_empty() {
                        "-".to_string()
                    } else {
                        m.parents.join(",")
                    },
                    metrics.join(" ")
                );
            }
        }
        ModelsAction::Show { id } => {
            let manifest = store.get(&id)?;
            store
                .weights(&manifest)
                .with_context(|| format!("checking the weights of {}", manifest.id()))?;
            println!("{}", serde_json::to_string_pretty(&manifest)?);
        }
        ModelsAction::Import { manifest, weights } => {
            let stored = store
                .import_files(&manifest, &weights)
                .with_context(|| format!("importing {}", manifest.display()))?;
            println!("stored {} ({})", stored.id(), stored.weights_sha256);
        }
        ModelsAction::Export { id, out } => {
            let manifest = store.export(&id, &out)?;
            println!("exported {} to {}", manifest.id(), out.display());
        }
        ModelsAction::Push { id, node, secret } => {
            let key = secret.map(|s| fogmesh_cluster::link::ClusterKey::from_secret(&s));
            let sent = fogmesh_cluster::upload_version(
                &node,
                key.as_ref().map(|k| k.as_str()),
                &id,
                &store,
            )
            .await?;
            println!("sent {} ({}) to {node}", sent.id(), sent.weights_sha256);
        }
        ModelsAction::Pull { id, node } => {
            let stored = fogmesh_cluster::download_version(&node, None, &id, &store).await?;
            println!(
                "stored {} ({}) from {node}",
                stored.id(),
                stored.weights_sha256
            );
        }
    }
    Ok(())
}

/// The method `flags` ask for, with each parameter's default; a parameter flag the
/// method does not take, or a value the method refuses, is an error naming the flag.
fn merge_method(flags: &MergeFlags) -> anyhow::Result<fogmesh_models::merge::MergeMethod> {
    use fogmesh_models::merge::{MergeError, MergeMethod};
    let scale = flags.scale.unwrap_or(1.0);
    let (method, takes): (MergeMethod, &[&str]) = match flags.method {
        MergeMethodName::WeightedAverage => (
            MergeMethod::WeightedAverage {
                weights: flags
                    .weights
                    .clone()
                    .unwrap_or_else(|| vec![1.0; flags.models.len()]),
            },
            &["--weights"],
        ),
        MergeMethodName::TaskArithmetic => (MergeMethod::TaskArithmetic { scale }, &["--scale"]),
        MergeMethodName::Ties => (
            MergeMethod::Ties {
                density: flags.density.unwrap_or(0.5),
                scale,
            },
            &["--density", "--scale"],
        ),
        MergeMethodName::Dare => (
            MergeMethod::Dare {
                drop_rate: flags.drop_rate.unwrap_or(0.5),
                seed: flags.seed.unwrap_or(0),
                scale,
            },
            &["--drop-rate", "--seed", "--scale"],
        ),
        MergeMethodName::Slerp => (
            MergeMethod::Slerp {
                t: flags.t.unwrap_or(0.5),
            },
            &["--t"],
        ),
    };
    let given = [
        ("--weights", flags.weights.is_some()),
        ("--scale", flags.scale.is_some()),
        ("--density", flags.density.is_some()),
        ("--drop-rate", flags.drop_rate.is_some()),
        ("--seed", flags.seed.is_some()),
        ("--t", flags.t.is_some()),
    ];
    if let Some((flag, _)) = given
        .iter()
        .find(|(flag, given)| *given && !takes.contains(flag))
    {
        anyhow::bail!(
            "{flag}: {} does not take it (it takes {})",
            method.name(),
            takes.join(", ")
        );
    }
    // The library names its fields (`drop_rate`, `weights[1]`); the user typed flags.
    method
        .validate(flags.base.is_some(), flags.models.len())
        .map_err(|err| match &err {
            MergeError::InvalidParameter { field, .. } if field == "models" => {
                anyhow::anyhow!("MODEL: {err}")
            }
            MergeError::InvalidParameter { field, .. } => {
                let flag = field.split('[').next().unwrap_or(field).replace('_', "-");
                anyhow::anyhow!("--{flag}: {err}")
            }
            _ => anyhow::Error::new(err),
        })?;
    Ok(method)
}

/// `fogmesh merge`: one request to a `Merger` actor spawned for it.
async fn merge_versions(flags: MergeFlags) -> anyhow::Result<()> {
    use fogmesh_actors::{MergeRequest, Merger, MergerArgs, MergerMsg, MergerShared};
    use ractor::rpc::CallResult;
    let method = merge_method(&flags)?;
    let name = match (&flags.name, flags.models.first()) {
        (Some(name), _) => name.clone(),
        (None, Some(first)) => fogmesh_models::store::parse_id(first).0.to_string(),
        (None, None) => anyhow::bail!("MODEL: name at least one stored version to merge"),
    };
    let store = flags.store;
    let (merger, stopped) = ractor::Actor::spawn(
        None,
        Merger,
        MergerArgs {
            store: fogmesh_models::store::ModelStore::open(&store),
            assets: fogmesh_models::served::Assets {
                minilm: Some(flags.minilm),
            },
            // Nothing else runs in this process: the merge may use every core.
            merge_threads: fogmesh_models::merge::default_threads(),
            shared: std::sync::Arc::new(MergerShared::default()),
        },
    )
    .await
    .context("starting the merger")?;
    let method_name = method.name();
    let request = MergeRequest {
        inputs: flags.models,
        base: flags.base,
        method,
        name,
        version: flags.version,
        incumbent: None,
        validation: None,
    };
    let answer = merger
        .call(|reply| MergerMsg::Merge { request, reply }, None)
        .await
        .context("asking the merger")?;
    merger.stop(None);
    stopped.await.context("stopping the merger")?;
    let outcome = match answer {
        CallResult::Success(outcome) => {
            outcome.with_context(|| format!("merging in the store {}", store.display()))?
        }
        CallResult::Timeout | CallResult::SenderError => {
            anyhow::bail!("the merger stopped before it answered")
        }
    };
    let merged = &outcome.manifest;
    eprintln!(
        "stored {} ({}) by {method_name} of {}, unvalidated",
        merged.id(),
        store.display(),
        merged.parents.join(", ")
    );
    println!(
        "{}",
        serde_json::json!({
            "model": merged.id(),
            "method": method_name,
            "parents": merged.parents,
            "weights_sha256": merged.weights_sha256,
            "validated": outcome.validated(),
        })
    );
    Ok(())
}

/// How long `fogmesh status` watches the experts' counters to show their throughput.
const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

async fn print_status(node: &str) -> anyhow::Result<()> {
    let mut control = fogmesh_proto::control_client::ControlClient::connect(node.to_string())
        .await
        .with_context(|| format!("connecting to the node at {node}"))?;
    let (nodes, mesh) = match control.get_mesh(fogmesh_proto::MeshRequest {}).await {
        Ok(mesh) => {
            let mesh = mesh.into_inner();
            let nodes = mesh
                .members
                .iter()
                .map(|m| format!("http://{}", m.address))
                .collect();
            (nodes, Some(mesh))
        }
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            (vec![node.to_string()], None)
        }
        Err(status) => {
            return Err(anyhow::anyhow!("{}", status.message()))
                .with_context(|| format!("asking {node} for the mesh"))
        }
    };
    let earlier = node_statuses(&nodes).await;
    let started = std::time::Instant::now();
    tokio::time::sleep(RATE_WINDOW).await;
    let now = node_statuses(&nodes).await;
    let seconds = started.elapsed().as_secs_f64();
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    if let Some(mesh) = &mesh {
        print!(
            "{}",
            fogmesh_cluster::status_table::render_mesh(mesh, now_us)
        );
    }
    for ((url, before), status) in nodes.iter().zip(earlier).zip(now) {
        if mesh.is_some() {
            println!();
        }
        let address = url
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        match status {
            Ok(status) => print!(
                "{}",
                fogmesh_cluster::status_table::render(
                    &status,
                    address,
                    now_us,
                    before.as_ref().ok().map(|b| (b, seconds))
                )
            ),
            // One unreachable node must not hide the others.
            Err(e) if mesh.is_some() => println!("{address}: {e:#}"),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn node_statuses(nodes: &[String]) -> Vec<anyhow::Result<fogmesh_proto::NodeStatus>> {
    futures::future::join_all(nodes.iter().map(|node| node_status(node))).await
}

async fn node_status(node: &str) -> anyhow::Result<fogmesh_proto::NodeStatus> {
    let mut control = fogmesh_proto::control_client::ControlClient::connect(node.to_string())
        .await
        .with_context(|| format!("connecting to the node at {node}"))?;
    Ok(control
        .get_status(fogmesh_proto::StatusRequest {})
        .await
        .with_context(|| format!("asking {node} for its status"))?
        .into_inner())
}

async fn run_node(config: PathBuf) -> anyhow::Result<()> {
    let config = fogmesh_cluster::NodeConfig::load(&config)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    // Ctrl-C from a terminal, SIGTERM from systemd or a container runtime: both stop the
    // node in order.
    fogmesh_cluster::run_until(config, async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    })
    .await
    .context("running the node")
}

/// Runs `fogmesh train` with a progress bar (epoch, losses, samples/s, ETA) on stderr and
/// a table of the evaluation after it.
fn train(
    request: &fogmesh_simulations::train::TrainRequest,
) -> anyhow::Result<fogmesh_simulations::train::TrainingOutcome> {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = ProgressBar::new(request.options.epochs as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:28}] epoch {pos}/{len} {msg} ETA {eta}")
            .context("the progress bar template")?
            .progress_chars("=> "),
    );
    bar.set_prefix(request.model.default_name());
    let outcome = fogmesh_simulations::train::run(request, &mut |epoch| {
        bar.set_length(epoch.epochs as u64);
        bar.set_position(epoch.epoch as u64);
        bar.set_message(format!(
            "loss {:.4} val {:.4} {:.0} samples/s",
            epoch.train_loss, epoch.validation_loss, epoch.samples_per_s
        ));
    });
    bar.finish_and_clear();
    let outcome = outcome.with_context(|| {
        format!(
            "training {} on {}",
            request.model.default_name(),
            request.data.display()
        )
    })?;
    let t = &outcome.training;
    eprintln!(
        "stored        {} ({})",
        outcome.model,
        outcome.store.display()
    );
    eprintln!(
        "trained       {} epochs (best {}), {:.0} samples/s, {:.1} s{}",
        t.epochs_run,
        t.best_epoch,
        t.samples_per_s,
        t.elapsed_s,
        if t.stopped_early {
            ", stopped early"
        } else {
            ""
        }
    );
    for (metric, value) in &outcome.metrics {
        let mark = if metric == outcome.metric {
            " <- standard metric"
        } else {
            ""
        };
        eprintln!("{metric:<28} {value:>10.4}{mark}");
    }
    if let Some(published) = &outcome.published {
        eprintln!(
            "published     {} {:.4} ({})",
            published.model, published.score, published.source
        );
    }
    Ok(outcome)
}
