//! `fogmesh status`: a node's `Control.GetStatus` answer as the tables an operator
//! reads: the node (role, address, cores, GPUs, load, up since), then its experts
//! (model, version, device, queue, windows scored, mean batch), their continual
//! learners (phase, serving version, rounds, promotions and refusals, the last gate and
//! drift), routers and sensor streams.
//!
//! Rendering is a pure function of the answer so it can be tested without a node.

use std::fmt::Write;

use fogmesh_proto::{MeshStatus, NodeStatus};

/// The mesh as one node sees it: every live node (role, address, cores, GPUs, load,
/// up since, link from the answering node) and where each expert's replicas run.
pub fn render_mesh(mesh: &MeshStatus, now_us: i64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<6} {:<22} {:>5} {:>9} {:>6} {:>10}  {:<12} GPUS",
        "NODE", "ROLE", "ADDRESS", "CORES", "MEMORY", "LOAD", "UP", "LINK"
    );
    for m in &mesh.members {
        let capabilities = m.capabilities.clone().unwrap_or_default();
        let load = m.load.unwrap_or_default();
        let link = match m.link_rtt_ms {
            Some(rtt) if m.link == "ready" => format!("ready {rtt:.1}ms"),
            _ => m.link.clone(),
        };
        let gpus = if capabilities.gpus.is_empty() {
            "-".to_string()
        } else {
            capabilities
                .gpus
                .iter()
                .map(|g| gpu_name(&g.name, g.index))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "{:<16} {:<6} {:<22} {:>5} {:>5.1} GiB {:>6.2} {:>10}  {:<12} {}",
            m.node,
            m.role,
            m.address,
            capabilities.cores,
            gib(capabilities.memory_bytes),
            load.cpu,
            uptime(now_us - m.up_since_us),
            link,
            gpus
        );
    }
    let _ = writeln!(
        out,
        "\nspec v{}, placement epoch {} by {}",
        mesh.spec_version,
        mesh.placement_epoch,
        if mesh.leader.is_empty() {
            "-"
        } else {
            &mesh.leader
        }
    );
    for p in &mesh.placement {
        // Each host with the version it gossips, so a rollout's progress shows here.
        let hosts: Vec<String> = p
            .nodes
            .iter()
            .map(|node| {
                match mesh
                    .versions
                    .iter()
                    .find(|v| &v.node == node && v.expert == p.expert)
                {
                    Some(v) => format!("{node} ({})", v.model_version),
                    None => node.clone(),
                }
            })
            .collect();
        let _ = writeln!(out, "  {:<20} on {}", p.expert, hosts.join(", "));
    }
    if let Some(r) = &mesh.last_rollout {
        let _ = writeln!(
            out,
            "last rollout: {} {} -> {}: {} (spec v{}); {}",
            r.expert, r.from, r.to, r.outcome, r.spec_version, r.detail
        );
    }
    if !mesh.last_error.is_empty() {
        let _ = writeln!(out, "last problem: {}", mesh.last_error);
    }
    out
}

/// The status tables, ending with a newline. `address` is where the node was reached;
/// `earlier` is the same node's status `seconds` before, from which each expert's
/// current throughput is computed (`-` without it).
pub fn render(
    status: &NodeStatus,
    address: &str,
    now_us: i64,
    earlier: Option<(&NodeStatus, f64)>,
) -> String {
    let mut out = String::new();
    let capabilities = status.capabilities.clone().unwrap_or_default();
    let load = status.load.unwrap_or_default();
    let gpus = if capabilities.gpus.is_empty() {
        "-".to_string()
    } else {
        capabilities
            .gpus
            .iter()
            .map(|g| match g.memory_bytes {
                Some(bytes) => format!("{} ({:.0} GiB)", gpu_name(&g.name, g.index), gib(bytes)),
                None => gpu_name(&g.name, g.index),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "{:<16} {:<6} {:<22} {:>5} {:>9} {:>6} {:>10}  GPUS",
        "NODE", "ROLE", "ADDRESS", "CORES", "MEMORY", "LOAD", "UP"
    );
    let _ = writeln!(
        out,
        "{:<16} {:<6} {:<22} {:>5} {:>5.1} GiB {:>6.2} {:>10}  {}",
        status.node,
        status.role,
        address,
        capabilities.cores,
        gib(capabilities.memory_bytes),
        load.cpu,
        uptime(now_us - status.up_since_us),
        gpus
    );
    if !status.experts.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<20} {:<18} {:<18} {:<8} {:>6} {:>14} {:>10} {:>10}",
            "EXPERT", "MODEL", "VERSION", "DEVICE", "QUEUE", "WINDOWS", "WINDOWS/S", "MEAN BATCH"
        );
        for e in &status.experts {
            let rate = earlier
                .and_then(|(before, seconds)| {
                    let then = before.experts.iter().find(|b| b.name == e.name)?;
                    (seconds > 0.0).then(|| {
                        e.windows_scored.saturating_sub(then.windows_scored) as f64 / seconds
                    })
                })
                .map_or_else(|| "-".to_string(), |r| format!("{r:.1}"));
            let _ = writeln!(
                out,
                "{:<20} {:<18} {:<18} {:<8} {:>6} {:>14} {:>10} {:>10.1}",
                e.name,
                e.model,
                e.version,
                e.device,
                e.queue,
                e.windows_scored,
                rate,
                e.mean_batch_size
            );
        }
    }
    if !status.learners.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<20} {:<12} {:<20} {:>7} {:>9} {:>8} {:>7} {:>7} {:>10} {:>8}",
            "LEARNER",
            "PHASE",
            "SERVING",
            "ROUNDS",
            "PROMOTED",
            "REFUSED",
            "FAILED",
            "DRIFTS",
            "RESERVOIR",
            "NEW"
        );
        for l in &status.learners {
            let _ = writeln!(
                out,
                "{:<20} {:<12} {:<20} {:>7} {:>9} {:>8} {:>7} {:>7} {:>10} {:>8}",
                l.expert,
                l.phase,
                l.serving_version,
                l.rounds,
                l.promotions,
                l.refusals,
                l.failures,
                l.drifts,
                l.reservoir_windows,
                l.new_windows
            );
            if !l.last_drift.is_empty() {
                let _ = writeln!(out, "  last drift: {}", l.last_drift);
            }
            if let Some(gate) = &l.last_gate {
                let _ = writeln!(out, "  last gate:  {}", gate.reason);
            }
            if let Some(seconds) = l.drift_to_promotion_s {
                let _ = writeln!(out, "  drift to promotion: {seconds:.1} s");
            }
            if !l.last_error.is_empty() {
                let _ = writeln!(out, "  last error: {}", l.last_error);
            }
        }
    }
    if !status.routers.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<20} {:<14} {:>14} {:>10}",
            "ROUTER", "POLICY", "ROUTED", "FAILED"
        );
        for r in &status.routers {
            let _ = writeln!(
                out,
                "{:<20} {:<14} {:>14} {:>10}",
                r.name, r.policy, r.routed, r.failed
            );
        }
    }
    if !status.sensors.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<20} {:>8} {:>14} {:>10} {:>10} {:>12}",
            "SENSOR", "CHANNELS", "ACCEPTED", "REJECTED", "DUPLICATES", "WINDOWS"
        );
        for s in &status.sensors {
            let _ = writeln!(
                out,
                "{:<20} {:>8} {:>14} {:>10} {:>10} {:>12}",
                s.sensor_id, s.channels, s.accepted, s.rejected, s.duplicates, s.windows
            );
        }
    }
    out
}

fn gpu_name(name: &str, index: u32) -> String {
    if name.is_empty() {
        format!("cuda:{index}")
    } else {
        format!("cuda:{index} {name}")
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// `3d 4h`, `4h 12m`, `12m 5s`, `5s`.
fn uptime(micros: i64) -> String {
    let s = (micros / 1_000_000).max(0);
    let (d, h, m, sec) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fogmesh_proto::{
        ExpertPlacement, ExpertStatus, GpuInfo, LearnerGate, LearnerStatus, MemberStatus,
        NodeCapabilities, NodeLoad, ReplicaVersion,
    };

    #[test]
    fn renders_the_node_and_its_experts() {
        let status = NodeStatus {
            node: "fog-1".into(),
            role: "fog".into(),
            up_since_us: 0,
            capabilities: Some(NodeCapabilities {
                cores: 16,
                memory_bytes: 128 << 30,
                gpus: vec![GpuInfo {
                    index: 0,
                    name: "NVIDIA H200".into(),
                    memory_bytes: Some(141 << 30),
                }],
            }),
            load: Some(NodeLoad {
                cpu: 0.25,
                memory_available_bytes: 100 << 30,
            }),
            experts: vec![ExpertStatus {
                name: "reactor-ae".into(),
                model: "conv_autoencoder".into(),
                version: "v3".into(),
                device: "Cuda(0)".into(),
                queue: 2,
                windows_scored: 1234,
                batches: 100,
                mean_batch_size: 12.34,
            }],
            ..Default::default()
        };
        let mut before = status.clone();
        before.experts[0].windows_scored = 234;
        let text = render(
            &status,
            "10.0.0.7:7700",
            3 * 3_600_000_000 + 60_000_000,
            Some((&before, 2.0)),
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("fog-1"), "{text}");
        for part in [
            "fog ",
            "10.0.0.7:7700",
            "16",
            "128.0 GiB",
            "0.25",
            "3h 1m",
            "cuda:0 NVIDIA H200 (141 GiB)",
        ] {
            assert!(lines[1].contains(part), "node line lacks {part:?}: {text}");
        }
        let expert = lines
            .iter()
            .find(|l| l.starts_with("reactor-ae"))
            .expect("an expert line");
        for part in ["conv_autoencoder", "v3", "Cuda(0)", "1234", "500.0", "12.3"] {
            assert!(expert.contains(part), "expert line lacks {part:?}: {text}");
        }
        assert!(!text.contains("ROUTER"), "no empty tables: {text}");
        assert!(!text.contains("LEARNER"), "no empty tables: {text}");
    }

    #[test]
    fn a_learner_shows_its_phase_outcomes_and_last_gate() {
        let status = NodeStatus {
            node: "fog-1".into(),
            learners: vec![LearnerStatus {
                expert: "pump-ae".into(),
                phase: "collecting".into(),
                serving_version: "pump-ae@v2".into(),
                windows_seen: 5000,
                windows_skipped: 0,
                reservoir_windows: 512,
                new_windows: 130,
                drifts: 2,
                rounds: 3,
                promotions: 1,
                refusals: 1,
                failures: 1,
                last_drift: "score (page_hinkley) -0.7000 -> 3.2000, statistic 21.0000 > 20.0000 at pump-1#412".into(),
                last_gate: Some(LearnerGate {
                    old_before: 0.0099,
                    old_after: 0.0300,
                    new_before: 0.49,
                    new_after: 0.01,
                    promote: false,
                    reason: "keep the incumbent: too much forgetting of the old regime: ...".into(),
                }),
                drift_to_promotion_s: Some(42.0),
                last_error: "expert `pump-ae`: fine-tuning pump-ae@v2 failed: out of memory".into(),
            }],
            ..Default::default()
        };
        let text = render(&status, "10.0.0.7:7700", 0, None);
        let line = text
            .lines()
            .find(|l| l.starts_with("pump-ae"))
            .expect("a learner line");
        for part in ["collecting", "pump-ae@v2", " 3 ", " 1 ", " 512 ", " 130"] {
            assert!(line.contains(part), "learner line lacks {part:?}: {text}");
        }
        for part in [
            "last drift: score (page_hinkley)",
            "last gate:  keep the incumbent: too much forgetting",
            "drift to promotion: 42.0 s",
            "last error: expert `pump-ae`: fine-tuning",
        ] {
            assert!(text.contains(part), "status lacks {part:?}: {text}");
        }
    }

    #[test]
    fn the_mesh_table_has_a_line_per_node_and_the_placement() {
        let member = |node: &str, link: &str, rtt: Option<f64>| MemberStatus {
            node: node.into(),
            role: "fog".into(),
            address: format!("{node}.plant:7700"),
            capabilities: Some(NodeCapabilities {
                cores: 8,
                memory_bytes: 32 << 30,
                gpus: Vec::new(),
            }),
            load: Some(NodeLoad {
                cpu: 0.5,
                memory_available_bytes: 1 << 30,
            }),
            up_since_us: 0,
            link: link.into(),
            link_rtt_ms: rtt,
        };
        let mesh = MeshStatus {
            node: "fog-1".into(),
            members: vec![
                member("fog-1", "self", None),
                member("fog-2", "ready", Some(0.8)),
                member("fog-3", "down", None),
            ],
            spec_version: 4,
            placement_epoch: 9,
            leader: "fog-1".into(),
            placement: vec![ExpertPlacement {
                expert: "reactor-ae".into(),
                nodes: vec!["fog-1".into(), "fog-2".into()],
            }],
            last_error: String::new(),
            versions: vec![ReplicaVersion {
                node: "fog-2".into(),
                expert: "reactor-ae".into(),
                model_version: "ae@2".into(),
            }],
            last_rollout: None,
        };
        let text = render_mesh(&mesh, 65_000_000);
        assert!(
            text.contains("reactor-ae           on fog-1, fog-2 (ae@2)"),
            "{text}"
        );
        let line = |node: &str| {
            text.lines()
                .find(|l| l.starts_with(node))
                .unwrap_or_else(|| panic!("no line for {node}: {text}"))
                .to_string()
        };
        assert!(line("fog-1").contains("self"), "{text}");
        assert!(line("fog-2").contains("ready 0.8ms"), "{text}");
        assert!(line("fog-3").contains("down"), "{text}");
        assert!(line("fog-2").contains("fog-2.plant:7700") && line("fog-2").contains("1m 5s"));
        assert!(
            text.contains("spec v4, placement epoch 9 by fog-1"),
            "{text}"
        );
        assert!(
            text.contains("reactor-ae") && text.contains("on fog-1, fog-2"),
            "{text}"
        );
        assert!(!text.contains("last problem"), "{text}");
    }

    #[test]
    fn uptime_reads_like_an_operator_writes_it() {
        assert_eq!(uptime(5_000_000), "5s");
        assert_eq!(uptime(125_000_000), "2m 5s");
        assert_eq!(uptime(7_260_000_000), "2h 1m");
        assert_eq!(uptime(90_000_000_000), "1d 1h");
    }
}
