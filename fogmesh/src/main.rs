//! The `fogmesh` command line: thin over the library crates. `main` parses the command
//! and hands it to its file under `commands/`, which calls one library entry point and
//! turns library errors into a message with context and a non-zero exit; `task` holds
//! the one pattern they share (a blocking run with context, one JSON object on stdout).

mod commands;
mod task;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
        #[arg(long, default_value = "127.0.0.1:7700")]
        node: String,
        #[command(flatten)]
        identity: commands::identity::IdentityArgs,
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
        #[arg(long, default_value = "127.0.0.1:7700")]
        node: String,
        #[command(flatten)]
        identity: commands::identity::IdentityArgs,
        /// The expert, as named in the mesh spec.
        expert: String,
        /// `name@version`, or the version alone for the serving model's name.
        version: String,
    },
    /// Move every replica of an expert back to an earlier stored version: VERSION, or
    /// by default the one the serving version came from.
    Rollback {
        /// A node of the mesh (its gRPC address).
        #[arg(long, default_value = "127.0.0.1:7700")]
        node: String,
        #[command(flatten)]
        identity: commands::identity::IdentityArgs,
        expert: String,
        version: Option<String>,
    },
    /// Run a federated round of an expert now (its `[experts.federation]`): the sites
    /// train on their own windows, the coordinator combines, and a version that passes
    /// is stored and rolled out. Prints the round as JSON; exits non-zero when the
    /// round applied nothing.
    Federate {
        /// A node of the mesh (its gRPC address); it passes the round to the
        /// coordinator's node.
        #[arg(long, default_value = "127.0.0.1:7700")]
        node: String,
        #[command(flatten)]
        identity: commands::identity::IdentityArgs,
        expert: String,
    },
    /// The mesh's nodes (role, address, cores, GPUs, load, link) and placement, then
    /// each node's experts, routers and sensor streams; a node outside a mesh shows
    /// only its own tables.
    Status {
        /// The node's gRPC address.
        #[arg(long, default_value = "127.0.0.1:7700")]
        node: String,
        #[command(flatten)]
        identity: commands::identity::IdentityArgs,
    },
    /// A node's alerts, one line each with its journal cursor; `--follow` keeps
    /// watching and resumes after the last cursor shown when the connection drops.
    Alerts(commands::alerts::AlertsArgs),
    /// The mesh's certificate authority: `ca init` once per mesh, `ca issue` per
    /// node, operator and sensor. Every port of a node speaks mutual TLS with these.
    Ca {
        #[command(subcommand)]
        action: commands::ca::CaAction,
    },
    /// The embedded default: a local node watching a replayed Tennessee Eastman plant.
    Demo(commands::demo::DemoArgs),
    /// Run a plant's mesh on this machine from a scenario: zones, nodes (each a real
    /// `fogmesh node` process), simulated links, a schedule of faults and the
    /// expectations checked at the end. Prints the report as one JSON object and writes
    /// it with an HTML page; exits non-zero when an expectation failed.
    Sim(commands::sim::SimArgs),
    /// The model store: weights addressed by sha256, a manifest per version.
    Models {
        /// The store's folder.
        #[arg(long, default_value = "data/models", global = true)]
        store: PathBuf,
        #[command(subcommand)]
        action: commands::models::ModelsAction,
    },
    /// Train one model of the zoo on a plant data set, evaluate it with the set's
    /// standard metric, and store it as a new version in the model store. Progress on
    /// stderr; the report as one JSON object on stdout.
    Train(commands::train::TrainArgs),
    /// Merge stored versions of one network (weighted average, task arithmetic, TIES,
    /// DARE, SLERP) into a new stored version, through the `Merger` actor; the result is
    /// loaded once to prove it serves, and stored unvalidated. One JSON object on stdout.
    Merge(commands::merge::MergeFlags),
    /// Evaluations on public benchmarks; each prints one JSON object on stdout.
    Eval {
        #[command(subcommand)]
        dataset: commands::eval::Dataset,
    },
    /// Benchmark workloads; each prints one JSON object on stdout.
    Bench {
        #[command(subcommand)]
        workload: commands::bench::Workload,
    },
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
        use commands::{alerts, bench, ca, demo, eval, merge, mesh, models, node, sim, train};
        match cli.command {
            Command::Node { config } => node::run(&config).await,
            Command::Status { node, identity } => mesh::status(&identity.dialer()?, &node).await,
            Command::Alerts(args) => alerts::run(args).await,
            Command::Ca { action } => ca::run(action),
            Command::Apply {
                node,
                identity,
                dry_run,
                spec,
            } => mesh::apply(&identity.dialer()?, &node, &spec, dry_run).await,
            Command::Rollout {
                node,
                identity,
                expert,
                version,
            } => mesh::rollout(&identity.dialer()?, &node, &expert, &version, false).await,
            Command::Rollback {
                node,
                identity,
                expert,
                version,
            } => {
                let version = version.as_deref().unwrap_or("");
                mesh::rollout(&identity.dialer()?, &node, &expert, version, true).await
            }
            Command::Federate {
                node,
                identity,
                expert,
            } => mesh::federate(&identity.dialer()?, &node, &expert).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Sim(args) => sim::run(args).await,
            Command::Models { store, action } => models::run(&store, action).await,
            Command::Train(args) => train::run(args).await,
            Command::Merge(flags) => merge::run(flags).await,
            Command::Eval { dataset } => eval::run(dataset).await,
            Command::Bench { workload } => bench::run(workload).await,
        }
    })
}
