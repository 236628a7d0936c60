//! The operator's commands against a running mesh, each through one node's gRPC
//! `Control` service: `apply` a mesh spec, `rollout`/`rollback` an expert's version, and
//! `status` (every node's tables, with throughput measured over one second).

use std::path::Path;

use anyhow::Context;
use fogmesh_cluster::dialer::Dialer;
use fogmesh_proto::control_client::ControlClient;
use tonic::transport::Channel;

/// A `Control` client for the node at `node`, or an error naming the address.
async fn control(dialer: &Dialer, node: &str) -> anyhow::Result<ControlClient<Channel>> {
    let connected = dialer
        .channel(node)
        .await
        .with_context(|| format!("connecting to the node at {node}"))?;
    Ok(ControlClient::new(connected.channel))
}

pub async fn apply(dialer: &Dialer, node: &str, spec: &Path, dry_run: bool) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(spec).with_context(|| format!("reading {}", spec.display()))?;
    let folder = std::fs::canonicalize(spec)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let text = fogmesh_cluster::mesh_spec::MeshSpec::absolute_text(&text, &folder)
        .with_context(|| format!("{} is not TOML", spec.display()))?;
    let mut control = control(dialer, node).await?;
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

pub async fn rollout(
    dialer: &Dialer,
    node: &str,
    expert: &str,
    version: &str,
    rollback: bool,
) -> anyhow::Result<()> {
    let what = if rollback { "rollback" } else { "rollout" };
    let mut control = control(dialer, node).await?;
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

pub async fn federate(dialer: &Dialer, node: &str, expert: &str) -> anyhow::Result<()> {
    let connected = dialer
        .channel(node)
        .await
        .with_context(|| format!("connecting to the node at {node}"))?;
    let reply = fogmesh_proto::federation_client::FederationClient::new(connected.channel)
        .federate(fogmesh_proto::FederateRequest {
            expert: expert.to_string(),
        })
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))
        .with_context(|| format!("the federated round of expert {expert} applied nothing"))?
        .into_inner();
    println!("{}", reply.round_json);
    Ok(())
}

/// How long `fogmesh status` watches the experts' counters to show their throughput.
const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

pub async fn status(dialer: &Dialer, node: &str) -> anyhow::Result<()> {
    let mut control = control(dialer, node).await?;
    let (nodes, mesh) = match control.get_mesh(fogmesh_proto::MeshRequest {}).await {
        Ok(mesh) => {
            let mesh = mesh.into_inner();
            let nodes = mesh.members.iter().map(|m| m.address.clone()).collect();
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
    let earlier = node_statuses(dialer, &nodes).await;
    let started = std::time::Instant::now();
    tokio::time::sleep(RATE_WINDOW).await;
    let now = node_statuses(dialer, &nodes).await;
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

async fn node_statuses(
    dialer: &Dialer,
    nodes: &[String],
) -> Vec<anyhow::Result<fogmesh_proto::NodeStatus>> {
    futures::future::join_all(nodes.iter().map(|node| node_status(dialer, node))).await
}

async fn node_status(dialer: &Dialer, node: &str) -> anyhow::Result<fogmesh_proto::NodeStatus> {
    let mut control = control(dialer, node).await?;
    Ok(control
        .get_status(fogmesh_proto::StatusRequest {})
        .await
        .with_context(|| format!("asking {node} for its status"))?
        .into_inner())
}
