//! `fogmesh node --config node.toml`: one fog node until Ctrl-C or SIGTERM.

use std::path::Path;

use anyhow::Context;

pub async fn run(config: &Path) -> anyhow::Result<()> {
    let config = fogmesh_cluster::NodeConfig::load(config)?;
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
