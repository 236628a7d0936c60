//! `fogmesh status`: a node's `Control.GetStatus` answer as the tables an operator
//! reads: the node (role, address, cores, GPUs, load, up since), then its experts
//! (model, version, device, queue, windows scored, mean batch), their continual
//! learners (phase, serving version, rounds, promotions and refusals, the last gate and
//! drift), the federations it coordinates (rounds, sites, bytes, loss), routers and
//! sensor streams.
//!
//! Rendering is a pure function of the answer so it can be tested without a node.
//! Every table goes through [`plain`], which `fogmesh models ls` uses too, so that all
//! of fogmesh's tables look alike.

use std::fmt::Write;

use comfy_table::{presets, CellAlignment, Table};
use fogmesh_proto::{MeshStatus, NodeStatus};

/// `table`'s text as fogmesh prints tables: no borders, rules or colours (it reads the
/// same in a terminal, a pipe and a log), columns two spaces apart, the columns in
/// `right_aligned` (numbers) aligned right, no trailing spaces and no final newline.
/// Cells are never wrapped: a long cell widens its column.
pub fn plain(table: &mut Table, right_aligned: &[usize]) -> String {
    table.load_style(presets::NOTHING);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if right_aligned.contains(&i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table.trim_fmt()
}

/// The mesh as one node sees it: every live node (role, address, cores, GPUs, load,
/// up since, link from the answering node) and where each expert's replicas run.
pub fn render_mesh(mesh: &MeshStatus, now_us: i64) -> String {
    let mut members = Table::new();
    members.set_header([
        "NODE", "ROLE", "ZONE", "ADDRESS", "CORES", "MEMORY", "LOAD", "UP", "LINK", "GPUS",
    ]);
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
        members.add_row([
            m.node.clone(),
            m.role.clone(),
            zone_cell(&m.zone, &m.conduits),
            m.address.clone(),
            capabilities.cores.to_string(),
            format!("{:.1} GiB", gib(capabilities.memory_bytes)),
            format!("{:.2}", load.cpu),
            uptime(now_us - m.up_since_us),
            link,
            gpus,
        ]);
    }
    let mut out = plain(&mut members, &[4, 5, 6, 7]);
    let _ = writeln!(
        out,
        "\n\nspec v{}, placement epoch {} by {}",
        mesh.spec_version,
        mesh.placement_epoch,
        if mesh.leader.is_empty() {
            "-"
        } else {
            &mesh.leader
        }
    );
    if !mesh.placement.is_empty() {
        let mut placement = Table::new();
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
            placement.add_row([p.expert.clone(), format!("on {}", hosts.join(", "))]);
        }
        for line in plain(&mut placement, &[]).lines() {
            let _ = writeln!(out, "  {line}");
        }
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
    let mut node = Table::new();
    node.set_header([
        "NODE", "ROLE", "ADDRESS", "CORES", "MEMORY", "LOAD", "UP", "GPUS",
    ]);
    node.add_row([
        status.node.clone(),
        status.role.clone(),
        address.to_string(),
        capabilities.cores.to_string(),
        format!("{:.1} GiB", gib(capabilities.memory_bytes)),
        format!("{:.2}", load.cpu),
        uptime(now_us - status.up_since_us),
        gpus,
    ]);
    let mut out = plain(&mut node, &[3, 4, 5, 6]);
    out.push('\n');
    if status.insecure {
        out.push_str(
            "INSECURE: plaintext, no identities, no roles ([tls] insecure = true): anyone who reaches this node may change the mesh\n",
        );
    }
    if !status.experts.is_empty() {
        let mut experts = Table::new();
        experts.set_header([
            "EXPERT",
            "MODEL",
            "VERSION",
            "DEVICE",
            "QUEUE",
            "WINDOWS",
            "WINDOWS/S",
            "MEAN BATCH",
        ]);
        for e in &status.experts {
            let rate = earlier
                .and_then(|(before, seconds)| {
                    let then = before.experts.iter().find(|b| b.name == e.name)?;
                    (seconds > 0.0).then(|| {
                        e.windows_scored.saturating_sub(then.windows_scored) as f64 / seconds
                    })
                })
                .map_or_else(|| "-".to_string(), |r| format!("{r:.1}"));
            experts.add_row([
                e.name.clone(),
                e.model.clone(),
                e.version.clone(),
                e.device.clone(),
                e.queue.to_string(),
                e.windows_scored.to_string(),
                rate,
                format!("{:.1}", e.mean_batch_size),
            ]);
        }
        let _ = writeln!(out, "\n{}", plain(&mut experts, &[4, 5, 6, 7]));
    }
    if !status.learners.is_empty() {
        let mut learners = Table::new();
        learners.set_header([
            "LEARNER",
            "PHASE",
            "SERVING",
            "ROUNDS",
            "PROMOTED",
            "REFUSED",
            "FAILED",
            "DRIFTS",
            "RESERVOIR",
            "NEW",
        ]);
        for l in &status.learners {
            learners.add_row([
                l.expert.clone(),
                l.phase.clone(),
                l.serving_version.clone(),
                l.rounds.to_string(),
                l.promotions.to_string(),
                l.refusals.to_string(),
                l.failures.to_string(),
                l.drifts.to_string(),
                l.reservoir_windows.to_string(),
                l.new_windows.to_string(),
            ]);
        }
        let text = plain(&mut learners, &[3, 4, 5, 6, 7, 8, 9]);
        // Each learner's details go under its row: the header is the first line and
        // every row one line after it (names, phases and versions hold no newline).
        let mut lines = text.lines();
        let _ = writeln!(out, "\n{}", lines.next().unwrap_or_default());
        for (line, l) in lines.zip(&status.learners) {
            let _ = writeln!(out, "{line}");
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
    if !status.federations.is_empty() {
        let mut federations = Table::new();
        federations.set_header([
            "FEDERATION",
            "VERSION",
            "ROUNDS",
            "SITES",
            "LAST ROUND SITES",
            "BYTES UP",
            "BYTES DOWN",
            "LOSS",
        ]);
        for f in &status.federations {
            federations.add_row([
                f.expert.clone(),
                f.version.clone(),
                f.rounds.to_string(),
                f.sites.join(","),
                f.last_sites.join(","),
                f.last_bytes_up.to_string(),
                f.last_bytes_down.to_string(),
                f.last_loss
                    .map_or_else(|| "-".into(), |l| format!("{l:.4}")),
            ]);
        }
        let text = plain(&mut federations, &[2, 5, 6, 7]);
        let mut lines = text.lines();
        let _ = writeln!(out, "\n{}", lines.next().unwrap_or_default());
        for (line, f) in lines.zip(&status.federations) {
            let _ = writeln!(out, "{line}");
            if !f.last_left_out.is_empty() {
                let _ = writeln!(
                    out,
                    "  left out of the last round: {}",
                    f.last_left_out.join(", ")
                );
            }
            if !f.last_version.is_empty() {
                let _ = writeln!(out, "  last round stored: {}", f.last_version);
            }
            if let Some(epsilon) = f.epsilon {
                let _ = writeln!(out, "  privacy spent: ε = {epsilon:.2}");
            }
            if !f.last_error.is_empty() {
                let _ = writeln!(out, "  last error: {}", f.last_error);
            }
        }
    }
    if !status.routers.is_empty() {
        let mut routers = Table::new();
        routers.set_header(["ROUTER", "POLICY", "ROUTED", "FAILED", "IN FLIGHT"]);
        for r in &status.routers {
            routers.add_row([
                r.name.clone(),
                r.policy.clone(),
                r.routed.to_string(),
                r.failed.to_string(),
                r.in_flight.to_string(),
            ]);
        }
        let _ = writeln!(out, "\n{}", plain(&mut routers, &[2, 3, 4]));
    }
    if !status.sensors.is_empty() {
        let mut sensors = Table::new();
        sensors.set_header([
            "SENSOR",
            "CHANNELS",
            "ACCEPTED",
            "REJECTED",
            "DUPLICATES",
            "WINDOWS",
            "PARKED",
            "DROPPED",
        ]);
        for s in &status.sensors {
            sensors.add_row([
                s.sensor_id.clone(),
                s.channels.to_string(),
                s.accepted.to_string(),
                s.rejected.to_string(),
                s.duplicates.to_string(),
                s.windows.to_string(),
                s.parked.to_string(),
                s.dropped.to_string(),
            ]);
        }
        let _ = writeln!(out, "\n{}", plain(&mut sensors, &[1, 2, 3, 4, 5, 6, 7]));
    }
    out
}

/// A node's zone, and the zones a gateway joins it to: `plant/area (gateway: cloud)`.
fn zone_cell(zone: &str, conduits: &[String]) -> String {
    match (zone.is_empty(), conduits.is_empty()) {
        (true, _) => "-".to_string(),
        (false, true) => zone.to_string(),
        (false, false) => format!("{zone} (gateway: {})", conduits.join(", ")),
    }
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

    /// The cells of one table line: columns are at least two spaces apart and no cell
    /// here holds two spaces in a row.
    fn cells(line: &str) -> Vec<&str> {
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    }

    /// Where `text` ends in `line`, so columns can be compared.
    fn end_of(line: &str, text: &str) -> usize {
        line.find(text)
            .unwrap_or_else(|| panic!("{text:?} not in {line:?}"))
            + text.len()
    }

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
        assert_eq!(
            cells(lines[0]),
            ["NODE", "ROLE", "ADDRESS", "CORES", "MEMORY", "LOAD", "UP", "GPUS"],
            "{text}"
        );
        assert_eq!(
            cells(lines[1]),
            [
                "fog-1",
                "fog",
                "10.0.0.7:7700",
                "16",
                "128.0 GiB",
                "0.25",
                "3h 1m",
                "cuda:0 NVIDIA H200 (141 GiB)",
            ],
            "{text}"
        );
        assert_eq!(
            end_of(lines[0], "CORES"),
            end_of(lines[1], "16"),
            "numbers align right: {text}"
        );
        let header = lines
            .iter()
            .find(|l| l.starts_with("EXPERT"))
            .expect("an expert header");
        assert_eq!(
            cells(header),
            [
                "EXPERT",
                "MODEL",
                "VERSION",
                "DEVICE",
                "QUEUE",
                "WINDOWS",
                "WINDOWS/S",
                "MEAN BATCH",
            ],
            "{text}"
        );
        let expert = lines
            .iter()
            .find(|l| l.starts_with("reactor-ae"))
            .expect("an expert line");
        assert_eq!(
            cells(expert),
            [
                "reactor-ae",
                "conv_autoencoder",
                "v3",
                "Cuda(0)",
                "2",
                "1234",
                "500.0",
                "12.3",
            ],
            "{text}"
        );
        assert_eq!(
            end_of(header, "WINDOWS/S"),
            end_of(expert, "500.0"),
            "numbers align right: {text}"
        );
        assert!(!text.contains('\x1b'), "no ANSI codes: {text:?}");
        assert!(
            text.lines().all(|l| l == l.trim_end()),
            "no trailing spaces: {text:?}"
        );
        assert!(!text.contains("ROUTER"), "no empty tables: {text}");
        assert!(!text.contains("LEARNER"), "no empty tables: {text}");
    }

    #[test]
    fn a_federation_shows_its_rounds_sites_bytes_and_loss() {
        let status = NodeStatus {
            node: "cloud-1".into(),
            federations: vec![fogmesh_proto::FederationStatus {
                expert: "pump-ae".into(),
                rounds: 7,
                version: "pump-ae@8".into(),
                sites: vec!["edge-1".into(), "edge-2".into()],
                last_sites: vec!["edge-1".into()],
                last_left_out: vec!["edge-2".into()],
                last_bytes_up: 23368,
                last_bytes_down: 47920,
                last_loss: Some(0.01234),
                epsilon: None,
                last_version: "pump-ae@8".into(),
                last_error: String::new(),
                mode: "synchronous".into(),
            }],
            ..Default::default()
        };
        let text = render(&status, "10.0.0.9:7700", 0, None);
        let lines: Vec<&str> = text.lines().collect();
        let row = lines
            .iter()
            .position(|l| l.starts_with("pump-ae"))
            .expect("a federation line");
        assert_eq!(cells(lines[row - 1])[0], "FEDERATION", "{text}");
        assert_eq!(
            cells(lines[row]),
            [
                "pump-ae",
                "pump-ae@8",
                "7",
                "edge-1,edge-2",
                "edge-1",
                "23368",
                "47920",
                "0.0123"
            ],
            "{text}"
        );
        assert_eq!(lines[row + 1], "  left out of the last round: edge-2");
        assert_eq!(lines[row + 2], "  last round stored: pump-ae@8");
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
        let lines: Vec<&str> = text.lines().collect();
        let row = lines
            .iter()
            .position(|l| l.starts_with("pump-ae"))
            .expect("a learner line");
        assert_eq!(
            cells(lines[row - 1]),
            [
                "LEARNER",
                "PHASE",
                "SERVING",
                "ROUNDS",
                "PROMOTED",
                "REFUSED",
                "FAILED",
                "DRIFTS",
                "RESERVOIR",
                "NEW",
            ],
            "{text}"
        );
        assert_eq!(
            cells(lines[row]),
            [
                "pump-ae",
                "collecting",
                "pump-ae@v2",
                "3",
                "1",
                "1",
                "1",
                "2",
                "512",
                "130"
            ],
            "{text}"
        );
        assert!(
            lines[row + 1].starts_with("  last drift: "),
            "the details follow the learner's row: {text}"
        );
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
            zone: if node == "fog-3" {
                String::new()
            } else {
                "site-1/area-2".into()
            },
            conduits: if node == "fog-2" {
                vec!["cloud".into()]
            } else {
                Vec::new()
            },
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
            text.lines().any(
                |l| l.starts_with("  ") && cells(l) == ["reactor-ae", "on fog-1, fog-2 (ae@2)"]
            ),
            "{text}"
        );
        let line = |node: &str| {
            text.lines()
                .find(|l| l.starts_with(node))
                .unwrap_or_else(|| panic!("no line for {node}: {text}"))
                .to_string()
        };
        assert_eq!(
            cells(&line("NODE")),
            ["NODE", "ROLE", "ZONE", "ADDRESS", "CORES", "MEMORY", "LOAD", "UP", "LINK", "GPUS"],
            "{text}"
        );
        for (node, link) in [
            ("fog-1", "self"),
            ("fog-2", "ready 0.8ms"),
            ("fog-3", "down"),
        ] {
            let address = format!("{node}.plant:7700");
            let zone = match node {
                "fog-3" => "-",
                "fog-2" => "site-1/area-2 (gateway: cloud)",
                _ => "site-1/area-2",
            };
            assert_eq!(
                cells(&line(node)),
                [node, "fog", zone, &address, "8", "32.0 GiB", "0.50", "1m 5s", link, "-"],
                "{text}"
            );
        }
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
