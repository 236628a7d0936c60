//! `fogmesh node --config node.toml`: one fog node until Ctrl-C or SIGTERM.

use std::path::Path;

use anyhow::Context;

use crate::task::stop_signal;

pub async fn run(config: &Path) -> anyhow::Result<()> {
    let config = fogmesh_cluster::NodeConfig::load(config)?;
    // Both stop the node in order.
    fogmesh_cluster::run_until(config, stop_signal()?)
        .await
        .context("running the node")
}
