//! `fogmesh demo`: the embedded default, a local node watching a replayed Tennessee
//! Eastman plant (`fogmesh_simulations::demo`).

use std::path::PathBuf;

use anyhow::Context;
use fogmesh_simulations::demo;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Folder with the recordings `just setup` generates.
    #[arg(long, default_value = "data/tep")]
    data: PathBuf,
    /// Training budget per unit expert, in seconds.
    #[arg(long, default_value_t = 6.0)]
    train_seconds: f64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let options = demo::DemoOptions {
        data_dir: args.data,
        train_seconds: args.train_seconds,
        ..Default::default()
    };
    let mut stdout = std::io::stdout();
    let report = demo::run(&options, &mut stdout)
        .await
        .context("running the demo")?;
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
