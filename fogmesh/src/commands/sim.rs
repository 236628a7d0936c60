//! `fogmesh sim SCENARIO`: a plant's mesh on one machine (`fogmesh_simulations::sim`),
//! every node this same binary as `fogmesh node`. Prints the report as one JSON object;
//! exits non-zero when an expectation failed.

use std::path::PathBuf;

use anyhow::Context;
use fogmesh_simulations::sim::{self, scenario::Scenario, SimOptions};

use crate::task::{print_json, stop_signal};

#[derive(clap::Args)]
pub struct SimArgs {
    /// The scenario (see `simulations/scenarios/`).
    scenario: PathBuf,
    /// Replaces the scenario's `[simulation] seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// Replaces the scenario's `duration_s` (seconds; a short run of a long soak).
    #[arg(long)]
    duration: Option<f64>,
    /// Where the nodes' folders and `report.json` / `report.html` go; by default
    /// `sim-out/<scenario name>`.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let mut scenario = Scenario::load(&args.scenario)?;
    if let Some(seed) = args.seed {
        scenario.seed = seed;
    }
    if let Some(duration) = args.duration {
        scenario = scenario.with_duration(duration)?;
    }
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("sim-out").join(&scenario.name));
    if out.join("nodes").exists() {
        std::fs::remove_dir_all(out.join("nodes"))
            .with_context(|| format!("clearing the last run's nodes in {}", out.display()))?;
    }
    let options = SimOptions {
        binary: std::env::current_exe().context("finding the fogmesh binary to run nodes")?,
        out: out.clone(),
    };
    eprintln!(
        "fogmesh sim: {} ({} nodes, {} zones, {} s, seed {}); nodes' logs in {}",
        scenario.name,
        scenario.nodes.len(),
        scenario.zones.len(),
        scenario.duration_s,
        scenario.seed,
        out.join("nodes").display()
    );
    // Stopping the run drops it, and with it every node process it started.
    let stop = stop_signal()?;
    let report = tokio::select! {
        report = sim::run(&scenario, &options) => report,
        () = stop => Err(sim::SimError::Stopped),
    }
    .with_context(|| format!("simulating {}", args.scenario.display()))?;
    for check in &report.expectations {
        eprintln!(
            "  {} {}: {}",
            if check.passed { "passed" } else { "FAILED" },
            serde_json::to_string(&check.expectation).unwrap_or_default(),
            check.detail
        );
    }
    eprintln!("report: {}", out.join("report.html").display());
    print_json(&report)?;
    if !report.passed {
        anyhow::bail!("{}: an expectation failed", scenario.name);
    }
    Ok(())
}
