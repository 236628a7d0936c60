//! The fog mesh as it runs in a plant: separate `fogmesh node` processes on their own
//! loopback addresses, joined by gossip and gRPC cluster links. Shown here: full
//! membership, a spec refused whole when it cannot be placed, a spec placed by its
//! constraints (roles, zones), windows scored on another node, a `kill -9` of the node holding the
//! expert while windows flow (every window scored exactly once, none lost), a silent
//! partition detected and healed, and a node with the wrong secret refused.
//!
//! Timings (detection, re-placement) are printed for the record, not asserted: the
//! deadlines here only bound a hung test. `just bench` is where speed is judged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fixtures::{
    barrier_window, collect_scored, poll, BlackholeProxy, MeshNode, NodeSettings, LONG,
    ONE_MESH_AT_A_TIME,
};
use fogmesh_proto::{ApplyRequest, SampleBatch};
use fogmesh_tests::{normal_values, samples, CHANNELS, WINDOW};

const SECRET: &str = "mesh-test-secret";

fn node<'a>(name: &'a str, role: &'a str, ip: &'a str, seeds: &[&MeshNode]) -> NodeSettings<'a> {
    NodeSettings::new(name, role, ip, SECRET, seeds)
}

/// Waits until `observer` sees `expected` members, each linked (or itself).
async fn full_membership(observer: &MeshNode, expected: usize) {
    crate::fixtures::full_membership(observer, expected, LONG).await;
}

/// One expert `ae`, one router, one sensor `s1` read on `sensor_node`; `expert_extra`
/// adds to the expert's table (replicas, placement).
fn spec(sensor_node: &str, expert_extra: &str) -> String {
    format!(
        r#"
[[experts]]
name = "ae"
model_version = "v1"
channels = {CHANNELS}
window = {WINDOW}
threshold = 1000.0
seed = 7
{expert_extra}

[[routers]]
name = "r1"
policy = "static"
routes = {{ s1 = ["ae"] }}

[[sensors]]
node = "{sensor_node}"
id = "s1"
channels = {CHANNELS}
window = {WINDOW}
stride = {WINDOW}
router = "r1"
"#
    )
}

async fn apply(
    node: &MeshNode,
    text: String,
) -> Result<BTreeMap<String, Vec<String>>, tonic::Status> {
    let mut control = node.control().await;
    let reply = control
        .apply(ApplyRequest {
            spec_toml: text,
            dry_run: false,
        })
        .await?
        .into_inner();
    Ok(reply
        .placement
        .into_iter()
        .map(|p| (p.expert, p.nodes))
        .collect())
}

/// Windows of sensor `s1` pushed to `edge` (one per batch, every 20 ms) and every
/// scored window's sequence number as the edge node's `WatchAlerts` reports it.
struct WindowFlow {
    seen: Arc<Mutex<Vec<u64>>>,
    producer: Option<tokio::task::JoinHandle<()>>,
    collector: tokio::task::JoinHandle<()>,
    windows: u64,
}

impl WindowFlow {
    async fn start(edge: &MeshNode, windows: u64) -> WindowFlow {
        let (seen, collector) = collect_scored(edge, "s1", |w| w.window_sequence).await;
        let producer = {
            let mut ingest = edge.ingest().await;
            tokio::spawn(async move {
                for w in 0..windows {
                    let first = w * WINDOW as u64;
                    let batch = SampleBatch {
                        samples: samples("s1", first..first + WINDOW as u64, normal_values),
                    };
                    ingest.push(batch).await.expect("every batch is accepted");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        WindowFlow {
            seen,
            producer: Some(producer),
            collector,
            windows,
        }
    }

    fn scored(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    async fn until_scored(&self, what: &str, count: usize) {
        poll(what, LONG, || async {
            (self.scored() >= count).then_some(())
        })
        .await;
    }

    /// Waits for the producer and for every window to be scored, then checks each
    /// window was scored exactly once and the router saw no failure.
    async fn finish(mut self, edge: &MeshNode) {
        if let Some(producer) = self.producer.take() {
            producer.await.expect("the producer finished");
        }
        self.until_scored("every window scored", self.windows as usize)
            .await;
        let barrier = self.windows;
        barrier_window(edge, "s1", barrier, || {
            self.seen.lock().unwrap().contains(&barrier)
        })
        .await;
        self.collector.abort();
        let mut windows = self.seen.lock().unwrap().clone();
        windows.retain(|w| *w != barrier);
        windows.sort_unstable();
        assert_eq!(
            windows,
            (0..self.windows).collect::<Vec<_>>(),
            "each window scored exactly once: none lost, none twice"
        );
        let router = &edge.status().await.expect("edge status").routers[0];
        assert_eq!((router.routed, router.failed), (self.windows + 1, 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_places_scores_across_nodes_and_survives_a_killed_expert_node() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let in_zone = |settings, zone| NodeSettings {
        zone: Some(zone),
        ..settings
    };
    let edge = MeshNode::start(
        dir.path(),
        in_zone(
            node("edge-1", "edge", "127.0.0.21", &[]),
            "site-1/area-1/cell-1",
        ),
    );
    let fog_a = MeshNode::start(
        dir.path(),
        in_zone(
            node("fog-a", "fog", "127.0.0.22", &[&edge]),
            "site-1/area-1",
        ),
    );
    let fog_b = MeshNode::start(
        dir.path(),
        in_zone(
            node("fog-b", "fog", "127.0.0.23", &[&edge]),
            "site-1/area-2",
        ),
    );
    let joined = Instant::now();
    for n in [&edge, &fog_a, &fog_b] {
        full_membership(n, 3).await;
    }
    eprintln!("full membership of 3 nodes after {:?}", joined.elapsed());

    // Specs that cannot be placed are refused whole, naming why; nothing is stored.
    let no_gpu = apply(&edge, spec("edge-1", "placement = { gpu = true }"))
        .await
        .expect_err("no node has a GPU");
    assert_eq!(no_gpu.code(), tonic::Code::FailedPrecondition);
    assert!(no_gpu.message().contains("GPU"), "{}", no_gpu.message());
    let too_many = apply(
        &edge,
        spec("edge-1", "replicas = 3\nplacement = { roles = [\"fog\"] }"),
    )
    .await
    .expect_err("only two fog nodes");
    assert_eq!(too_many.code(), tonic::Code::FailedPrecondition);
    assert!(
        too_many.message().contains("3 replicas"),
        "{}",
        too_many.message()
    );
    let unknown_node = apply(&edge, spec("edge-9", ""))
        .await
        .expect_err("no such node");
    assert!(
        unknown_node.message().contains("edge-9"),
        "{}",
        unknown_node.message()
    );
    let no_zone = apply(&edge, spec("edge-1", "placement = { zone = \"site-9/*\" }"))
        .await
        .expect_err("no node in site-9");
    assert_eq!(no_zone.code(), tonic::Code::FailedPrecondition);
    assert!(
        no_zone
            .message()
            .contains("zone site-9/*: no live node is in it"),
        "{}",
        no_zone.message()
    );
    assert_eq!(edge.mesh().await.expect("mesh status").spec_version, 0);
    // A zone pattern picks its node: area-2 holds fog-b alone, and `site-1/*` rules
    // out nothing but zone-less nodes (a dry run stores nothing).
    let zoned = edge
        .control()
        .await
        .apply(ApplyRequest {
            spec_toml: spec("edge-1", "placement = { zone = \"site-1/area-2\" }"),
            dry_run: true,
        })
        .await
        .expect("a zone with a node is placed")
        .into_inner();
    assert_eq!(zoned.placement[0].nodes, ["fog-b"]);
    assert_eq!(edge.mesh().await.expect("mesh status").spec_version, 0);

    // Placed by its constraints: a fog node, never the edge node holding the sensor.
    let placement = apply(&edge, spec("edge-1", "placement = { roles = [\"fog\"] }"))
        .await
        .expect("the spec is placed");
    let host_name = placement["ae"][0].clone();
    assert_eq!(placement["ae"].len(), 1);
    assert!(host_name.starts_with("fog-"), "placed on {host_name}");
    let (mut host, survivor) = if host_name == fog_a.name {
        (fog_a, fog_b)
    } else {
        (fog_b, fog_a)
    };
    // Windows flow: one window per batch, every 20 ms.
    let flow = WindowFlow::start(&edge, 200).await;
    flow.until_scored("windows scored on the fog node", 30)
        .await;
    assert!(
        host.status().await.expect("host status").experts[0].windows_scored > 0,
        "the expert on {} scored the windows",
        host.name
    );

    // The operator's view: every node, where the expert runs, its throughput.
    let status = edge
        .cli()
        .args(["status", "--node", &edge.url()])
        .output()
        .await
        .expect("fogmesh status runs");
    let tables = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{tables}");
    for name in ["edge-1", "fog-a", "fog-b"] {
        assert!(
            tables.lines().filter(|l| l.starts_with(name)).count() >= 2,
            "{name}: {tables}"
        );
    }
    assert!(tables.contains(&format!("on {host_name}")), "{tables}");
    let expert_line = tables
        .lines()
        .find(|l| l.starts_with("ae "))
        .unwrap_or_else(|| panic!("an expert line: {tables}"));
    assert!(expert_line.contains("conv_autoencoder"), "{tables}");

    // kill -9 the node holding the expert while windows flow.
    host.kill();
    let killed = Instant::now();
    poll("the edge node to notice the kill", LONG, || async {
        let mesh = edge.mesh().await?;
        mesh.members
            .iter()
            .all(|m| m.node != host_name || m.link != "ready")
            .then_some(())
    })
    .await;
    let detected = killed.elapsed();
    poll("the expert re-placed and serving", LONG, || async {
        let status = survivor.status().await?;
        status
            .experts
            .iter()
            .any(|e| e.name == "ae" && e.windows_scored > 0)
            .then_some(())
    })
    .await;
    let serving = killed.elapsed();
    eprintln!(
        "killed node detected after {detected:?}; re-placed expert serving after {serving:?}"
    );

    flow.finish(&edge).await;
    let mesh = edge.mesh().await.expect("mesh status");
    assert!(mesh
        .placement
        .iter()
        .any(|p| p.expert == "ae" && p.nodes == vec![survivor.name.clone()]));

    // The killed node comes back: it rejoins and holds the spec again; the expert
    // stays where it serves now (placement keeps replicas in place).
    host.restart();
    for n in [&edge, &survivor, &host] {
        full_membership(n, 3).await;
    }
    poll(
        "the restarted node to hold the spec again",
        LONG,
        || async { (host.mesh().await?.spec_version == 1).then_some(()) },
    )
    .await;
    assert!(host
        .log()
        .contains("mesh spec restored from the data folder"));
    let mesh = edge.mesh().await.expect("mesh status");
    assert!(mesh
        .placement
        .iter()
        .any(|p| p.expert == "ae" && p.nodes == vec![survivor.name.clone()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_is_detected_and_healed() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let a = MeshNode::start(dir.path(), node("part-a", "fog", "127.0.0.31", &[]));
    // part-b is reached through a proxy that can go silent; part-a dials it (names sort).
    let b_port = crate::fixtures::free_port_on("127.0.0.32");
    let proxy = BlackholeProxy::start("127.0.0.33", format!("127.0.0.32:{b_port}")).await;
    let mut settings = node("part-b", "fog", "127.0.0.32", &[&a]);
    settings.advertise = Some(proxy.addr.clone());
    let b = MeshNode::start_on_port(dir.path(), settings, b_port);
    full_membership(&a, 2).await;
    full_membership(&b, 2).await;

    proxy.blackhole();
    let cut = Instant::now();
    let link_of = |mesh: fogmesh_proto::MeshStatus, peer: &str| {
        mesh.members
            .into_iter()
            .find(|m| m.node == peer)
            .map_or("gone".to_string(), |m| m.link)
    };
    poll("part-a to notice the partition", LONG, || async {
        (link_of(a.mesh().await?, "part-b") != "ready").then_some(())
    })
    .await;
    let a_detected = cut.elapsed();
    poll("part-b to notice the partition", LONG, || async {
        (link_of(b.mesh().await?, "part-a") != "ready").then_some(())
    })
    .await;
    let b_detected = cut.elapsed();
    eprintln!(
        "partition detected by the dialer after {a_detected:?}, by the dialed after {b_detected:?}"
    );

    proxy.heal();
    let healed = Instant::now();
    full_membership(&a, 2).await;
    full_membership(&b, 2).await;
    eprintln!(
        "link re-formed {:?} after the partition healed",
        healed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_secret_is_refused() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let a = MeshNode::start(dir.path(), node("good-a", "fog", "127.0.0.41", &[]));
    let mut settings = node("bad-b", "fog", "127.0.0.42", &[&a]);
    settings.secret = "some-other-plant-secret";
    let b = MeshNode::start(dir.path(), settings);
    poll("the intruder to log its refusal", LONG, || async {
        b.log().contains("seed refused this node").then_some(())
    })
    .await;
    poll("the seed to log the refusal", LONG, || async {
        a.log()
            .contains("refused a node whose cluster secret differs")
            .then_some(())
    })
    .await;
    // A node with the right secret joining through the same seed is the barrier: once
    // the seed sees it, gossip has run rounds in which the intruder could have spread.
    let c = MeshNode::start(dir.path(), node("good-c", "fog", "127.0.0.43", &[&a]));
    full_membership(&a, 2).await;
    let seen_by_a = a.mesh().await.expect("mesh status");
    let names: Vec<&str> = seen_by_a.members.iter().map(|m| m.node.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!names.contains(&"bad-b"), "{names:?}");
    assert!(names.contains(&c.name.as_str()), "{names:?}");
    let seen_by_b = b.mesh().await.expect("mesh status");
    assert_eq!(seen_by_b.members.len(), 1, "{:?}", seen_by_b.members);
    let mut control = b.control().await;
    assert_eq!(
        control
            .get_status(fogmesh_proto::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .experts
            .len(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_takes_over_a_replica_without_dropping_a_window() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let edge = MeshNode::start(dir.path(), node("edge-r", "edge", "127.0.0.51", &[]));
    let fog_a = MeshNode::start(dir.path(), node("fog-ra", "fog", "127.0.0.52", &[&edge]));
    full_membership(&edge, 2).await;
    let expert = |name: &str| {
        format!(
            "[[experts]]\nname = \"{name}\"\nmodel_version = \"v1\"\nchannels = {CHANNELS}\nwindow = {WINDOW}\nthreshold = 1000.0\nseed = 7\nplacement = {{ roles = [\"fog\"] }}\n\n"
        )
    };
    let text = format!(
        "{}{}[[routers]]\nname = \"r1\"\npolicy = \"static\"\nroutes = {{ s1 = [\"ae1\", \"ae2\"] }}\n\n[[sensors]]\nnode = \"edge-r\"\nid = \"s1\"\nchannels = {CHANNELS}\nwindow = {WINDOW}\nstride = {WINDOW}\nrouter = \"r1\"\n",
        expert("ae1"),
        expert("ae2")
    );
    let placement = apply(&edge, text).await.expect("the spec is placed");
    assert_eq!(placement["ae1"], vec!["fog-ra"]);
    assert_eq!(placement["ae2"], vec!["fog-ra"]);
    let flow = WindowFlow::start(&edge, 250).await;
    flow.until_scored("windows scored", 20).await;

    let fog_b = MeshNode::start(dir.path(), node("fog-rb", "fog", "127.0.0.53", &[&edge]));
    let joined = Instant::now();
    poll("one replica moved to the new node", LONG, || async {
        let mesh = edge.mesh().await?;
        let on = |expert: &str| {
            mesh.placement
                .iter()
                .find(|p| p.expert == expert)
                .map(|p| p.nodes.clone())
                .unwrap_or_default()
        };
        (on("ae1") == vec!["fog-rb".to_string()] && on("ae2") == vec!["fog-ra".to_string()])
            .then_some(())
    })
    .await;
    eprintln!(
        "replica moved to the joining node {:?} after it started",
        joined.elapsed()
    );

    flow.finish(&edge).await;
    let moved = fog_b.status().await.expect("fog-rb status");
    assert!(moved
        .experts
        .iter()
        .any(|e| e.name == "ae1" && e.windows_scored > 0));
    let stayed = fog_a.status().await.expect("fog-ra status");
    assert!(
        stayed.experts.iter().all(|e| e.name != "ae1"),
        "the old replica stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_placement_leader_with_its_expert_loses_no_window() {
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let edge = MeshNode::start(dir.path(), node("zz-edge", "edge", "127.0.0.61", &[]));
    let mut fog_1 = MeshNode::start(dir.path(), node("fog-1", "fog", "127.0.0.62", &[&edge]));
    let fog_2 = MeshNode::start(dir.path(), node("fog-2", "fog", "127.0.0.63", &[&edge]));
    for n in [&edge, &fog_1, &fog_2] {
        full_membership(n, 3).await;
    }
    // Names sort so that fog-1 leads placement; the sensor's node sorts last.
    let placement = apply(&edge, spec("zz-edge", "placement = { roles = [\"fog\"] }"))
        .await
        .expect("the spec is placed");
    let first = placement["ae"][0].clone();
    poll("fog-1 to lead the placement", LONG, || async {
        (edge.mesh().await?.leader == "fog-1").then_some(())
    })
    .await;
    let flow = WindowFlow::start(&edge, 200).await;
    flow.until_scored("windows scored", 30).await;

    // Kill the leader; if it did not host ae, the test still shows a leader change
    // under load, and the host check below tells which case ran.
    fog_1.kill();
    let killed = Instant::now();
    poll("fog-2 to take over the placement", LONG, || async {
        let mesh = edge.mesh().await?;
        let on_fog_2 = mesh
            .placement
            .iter()
            .any(|p| p.expert == "ae" && p.nodes == vec!["fog-2".to_string()]);
        (mesh.leader == "fog-2" && on_fog_2).then_some(())
    })
    .await;
    eprintln!(
        "leader (which held ae: {}) killed; fog-2 leads and hosts ae after {:?}",
        first == "fog-1",
        killed.elapsed()
    );
    flow.finish(&edge).await;
    let status = fog_2.status().await.expect("fog-2 status");
    assert!(status
        .experts
        .iter()
        .any(|e| e.name == "ae" && e.windows_scored > 0));
}

#[tokio::test]
async fn only_an_operator_may_apply_and_both_attempts_leave_an_audit_line() {
    let _one = ONE_MESH_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = MeshNode::start(dir.path(), node("edge-1", "edge", "127.0.0.1", &[]));
    full_membership(&edge, 1).await;
    let before = edge.mesh().await.expect("mesh status").spec_version;

    let sensor = edge.channel(&edge.sensor).await.expect("the node answers");
    let denied = fogmesh_proto::control_client::ControlClient::new(sensor)
        .apply(ApplyRequest {
            spec_toml: spec("edge-1", ""),
            dry_run: false,
        })
        .await
        .expect_err("a sensor may not apply");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(edge.mesh().await.expect("mesh status").spec_version, before);

    apply(&edge, spec("edge-1", ""))
        .await
        .expect("an operator may apply");
    assert!(edge.mesh().await.expect("mesh status").spec_version > before);

    let log = poll("both audit lines", LONG, || async {
        let log = edge.log();
        (log.contains("outcome=permission_denied") && log.contains("outcome=ok")).then_some(log)
    })
    .await;
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("fogmesh::audit") && l.contains("Control/Apply"))
        .collect();
    assert!(
        audit
            .iter()
            .any(|l| l.contains("sensor-gateway (sensor)") && l.contains("permission_denied")),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("operator (operator)") && l.contains("outcome=ok")),
        "{audit:?}"
    );
}
