//! A plant network in zones, with direct connections between them made impossible:
//! three `fogmesh node` processes in a cell, an area and the cloud, segmented
//! (`[node] segmented = true`), the area's node the gateway into both others. nftables
//! drops every packet between the cell's address and the cloud's, so a window from
//! the cell reaches the cloud's expert only through the gateway's relay. Cutting the
//! gateway from the cloud leaves the cell scoring on its own expert; healing brings
//! the cloud's opinion back. Every window is scored exactly once throughout.
//!
//! The rules must not touch the machine's own loopback, so the test runs itself again
//! inside a network namespace of its own (`unshare --net --map-root-user`: no root
//! needed where user namespaces are allowed), with `nft` there. `just test` installs
//! nftables (`just setup-network`).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::fixtures::{
    collect_scored, poll, store_ae_1, MeshNode, NodeSettings, LONG, ONE_MESH_AT_A_TIME,
};
use fogmesh_proto::federation_client::FederationClient;
use fogmesh_proto::{ApplyRequest, FederateRequest, SampleBatch};
use fogmesh_tests::{normal_values, samples, CHANNELS, WINDOW};

const SECRET: &str = "zone-test-secret";
const CELL_IP: &str = "127.0.1.1";
const GATEWAY_IP: &str = "127.0.1.2";
const CLOUD_IP: &str = "127.0.1.3";
/// Set in the copy of this test that runs inside its own network namespace.
const IN_NAMESPACE: &str = "FOGMESH_ZONE_TEST_NAMESPACE";

/// The expert of the cell on its node, the cloud's on the cloud; the cell's sensor is
/// scored by both, the cloud's opinion optional.
fn spec() -> String {
    format!(
        r#"
[[experts]]
name = "cell-ae"
model_version = "v1"
channels = {CHANNELS}
window = {WINDOW}
threshold = 1000.0
seed = 7
placement = {{ zone = "plant/area/cell" }}

[[experts]]
name = "cloud-ae"
model_version = "v1"
channels = {CHANNELS}
window = {WINDOW}
threshold = 1000.0
seed = 8
placement = {{ zone = "cloud" }}

[[routers]]
name = "r1"
policy = "static"
routes = {{ s1 = ["cell-ae", "cloud-ae"] }}
optional = ["cloud-ae"]

[[sensors]]
node = "cell-1"
id = "s1"
channels = {CHANNELS}
window = {WINDOW}
stride = {WINDOW}
router = "r1"
"#
    )
}

/// A scored window: its sequence and the experts that gave an opinion on it.
type Scored = (u64, Vec<String>);

/// Runs `nft -f -` with `rules`.
fn nft(rules: &str) {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft runs (just setup-network installs nftables)");
    child
        .stdin
        .take()
        .expect("nft's stdin")
        .write_all(rules.as_bytes())
        .expect("the rules reach nft");
    assert!(
        child.wait().expect("nft ends").success(),
        "nft took {rules}"
    );
}

/// Drops every packet between `a` and `b`, both ways, in chain `chain`.
fn drop_between(chain: &str, a: &str, b: &str) -> String {
    format!(
        "add rule inet zones {chain} ip saddr {a} ip daddr {b} drop\n\
         add rule inet zones {chain} ip saddr {b} ip daddr {a} drop\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_reaches_the_cloud_only_through_its_gateway_and_scores_alone_when_cut() {
    if std::env::var_os(IN_NAMESPACE).is_some() {
        return zones_in_this_namespace().await;
    }
    let _turn = ONE_MESH_AT_A_TIME.lock().await;
    let name = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, m)| m);
    let test = format!(
        "{name}::a_cell_reaches_the_cloud_only_through_its_gateway_and_scores_alone_when_cut"
    );
    let status = tokio::process::Command::new("unshare")
        .args(["--net", "--map-root-user"])
        .arg(std::env::current_exe().expect("this test binary"))
        .args(["--exact", &test, "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .status()
        .await
        .expect("unshare (util-linux) runs this test in a network namespace of its own");
    assert!(status.success(), "the zone test in its namespace: {status}");
}

async fn zones_in_this_namespace() {
    let lo = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip (iproute2) runs");
    assert!(lo.success(), "loopback comes up in the namespace");
    // `always` holds the impossibility, `cut` the gateway's cable to the cloud.
    nft(&format!(
        "add table inet zones\n\
         add chain inet zones always {{ type filter hook output priority 0; }}\n\
         add chain inet zones cut {{ type filter hook output priority 1; }}\n\
         {}",
        drop_between("always", CELL_IP, CLOUD_IP)
    ));

    let dir = tempfile::tempdir().expect("a temporary folder");
    let zoned = |name, role, ip, seeds: &[&MeshNode], zone, conduits| NodeSettings {
        zone: Some(zone),
        conduits,
        segmented: true,
        ..NodeSettings::new(name, role, ip, SECRET, seeds)
    };
    let cloud = MeshNode::start(
        dir.path(),
        zoned("cloud-1", "cloud", CLOUD_IP, &[], "cloud", &[]),
    );
    let gateway = MeshNode::start(
        dir.path(),
        zoned(
            "gw-1",
            "fog",
            GATEWAY_IP,
            &[&cloud],
            "plant/area",
            &["plant/area/cell", "cloud"],
        ),
    );
    let cell = MeshNode::start(
        dir.path(),
        zoned(
            "cell-1",
            "edge",
            CELL_IP,
            &[&gateway],
            "plant/area/cell",
            &[],
        ),
    );

    // The cell knows all three, links to the gateway alone and never to the cloud.
    poll(
        "the cell to see the mesh through its gateway",
        LONG,
        || async {
            let mesh = cell.mesh().await?;
            let link = |node: &str| {
                mesh.members
                    .iter()
                    .find(|m| m.node == node)
                    .map(|m| m.link.clone())
            };
            (mesh.members.len() == 3 && link("gw-1")? == "ready").then_some(())
        },
    )
    .await;
    // The rule holds: from the cell's address the cloud does not answer at all.
    let from_cell = tokio::net::TcpSocket::new_v4().expect("a socket");
    from_cell
        .bind(format!("{CELL_IP}:0").parse().expect("an address"))
        .expect("bound to the cell's address");
    let direct = tokio::time::timeout(
        Duration::from_millis(500),
        from_cell.connect(cloud.addr.parse().expect("an address")),
    )
    .await;
    assert!(
        !matches!(direct, Ok(Ok(_))),
        "a direct connection from the cell to the cloud must be impossible"
    );
    let cloud_link = cell
        .mesh()
        .await
        .expect("mesh")
        .members
        .into_iter()
        .find(|m| m.node == "cloud-1")
        .expect("the cloud is a member")
        .link;
    assert_ne!(
        cloud_link, "ready",
        "no direct link from the cell to the cloud"
    );

    let mut control = cell.control().await;
    let placed = control
        .apply(ApplyRequest {
            spec_toml: spec(),
            dry_run: false,
        })
        .await
        .expect("the cell reaches a majority through its gateway")
        .into_inner();
    let hosts = |expert: &str| {
        placed
            .placement
            .iter()
            .find(|p| p.expert == expert)
            .map(|p| p.nodes.clone())
    };
    assert_eq!(hosts("cell-ae"), Some(vec!["cell-1".to_string()]));
    assert_eq!(hosts("cloud-ae"), Some(vec!["cloud-1".to_string()]));

    let (scored, collector) = collect_scored(&cell, "s1", |alert| -> Scored {
        let experts = alert.experts.iter().map(|e| e.expert.clone()).collect();
        (alert.window_sequence, experts)
    })
    .await;
    // A window every 50 ms until told to stop; returns how many it pushed.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let mut ingest = cell.ingest().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut next = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let first = next * WINDOW as u64;
                let batch = SampleBatch {
                    samples: samples("s1", first..first + WINDOW as u64, normal_values),
                };
                ingest.push(batch).await.expect("every batch is accepted");
                next += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            next
        })
    };
    let both = |experts: &Vec<String>| experts.len() == 2;
    let alone = |experts: &Vec<String>| experts == &["cell-ae".to_string()];
    let scored_since = |from: usize, what: fn(&Vec<String>) -> bool| {
        scored.lock().unwrap()[from..]
            .iter()
            .filter(|(_, e)| what(e))
            .count()
    };
    let link = async |observer: &MeshNode, peer: &str| {
        let mesh = observer.mesh().await?;
        // A peer gossip has forgotten has no link either.
        Some(
            mesh.members
                .into_iter()
                .find(|m| m.node == peer)
                .map_or_else(|| "gone".to_string(), |m| m.link),
        )
    };
    poll(
        "ten windows scored by both zones' experts",
        LONG,
        || async { (scored_since(0, both) >= 10).then_some(()) },
    )
    .await;
    let relayed = gateway.metrics_text().await;
    assert!(
        relayed
            .lines()
            .any(|l| l.starts_with("fogmesh_relayed_windows_total")
                && l.contains("cloud-ae")
                && l.contains("scored")),
        "the cloud's verdicts came through the gateway's relay:\n{relayed}"
    );

    // Cut the gateway's cable to the cloud: once the gateway has declared the link
    // down, the cell goes on with its own expert.
    nft(&drop_between("cut", GATEWAY_IP, CLOUD_IP));
    poll(
        "the gateway to declare its link to the cloud down",
        LONG,
        || async { (link(&gateway, "cloud-1").await? != "ready").then_some(()) },
    )
    .await;
    let cut_at = scored.lock().unwrap().len();
    poll(
        "ten windows scored by the cell alone, cut off",
        LONG,
        || async { (scored_since(cut_at, alone) >= 10).then_some(()) },
    )
    .await;

    // Heal: the cloud's opinion comes back through the gateway.
    nft("flush chain inet zones cut\n");
    poll("the gateway to link to the cloud again", LONG, || async {
        (link(&gateway, "cloud-1").await? == "ready").then_some(())
    })
    .await;
    let healed_at = scored.lock().unwrap().len();
    poll(
        "ten windows scored by both again after healing",
        LONG,
        || async { (scored_since(healed_at, both) >= 10).then_some(()) },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let pushed = producer.await.expect("the producer finished");
    poll("every pushed window to be scored", LONG, || async {
        (scored.lock().unwrap().len() as u64 >= pushed).then_some(())
    })
    .await;
    collector.abort();
    let mut windows: Vec<u64> = scored.lock().unwrap().iter().map(|(w, _)| *w).collect();
    windows.sort_unstable();
    assert_eq!(
        windows,
        (0..pushed).collect::<Vec<_>>(),
        "each window scored exactly once: none lost, none twice"
    );
    let router = &cell.status().await.expect("cell status").routers[0];
    assert_eq!((router.routed, router.failed), (pushed, 0));
    let skipped = cell.metrics_text().await;
    assert!(
        skipped
            .lines()
            .any(|l| l.starts_with("fogmesh_router_optional_skipped_total")
                && l.contains("cloud-ae")),
        "the cell counted the windows scored without the cloud:\n{skipped}"
    );

    // A stored version only the cloud holds crosses the boundary: the cell copies it
    // from the gateway, which copied it from the cloud, and serves it.
    store_ae_1(dir.path());
    cloud
        .control()
        .await
        .apply(ApplyRequest {
            spec_toml: federated_spec(),
            dry_run: false,
        })
        .await
        .expect("the cloud holds ae@1 and applies the spec");
    let serves = |version: &'static str| {
        let cell = &cell;
        async move {
            let mesh = cell.mesh().await?;
            mesh.versions
                .iter()
                .any(|v| {
                    v.node == "cell-1" && v.expert == "cell-stored" && v.model_version == version
                })
                .then_some(())
        }
    };
    poll(
        "the cell to serve ae@1, copied through its gateway",
        LONG,
        || serves("ae@1"),
    )
    .await;
    let log = std::fs::read_to_string(dir.path().join("cell-1.log")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("copied a model version from a peer") && l.contains("gw-1")),
        "the cell's copy of ae@1 came from its gateway"
    );

    // A federated round crosses it too: the cloud's coordinator asks the gateway, the
    // fog aggregator of the cell's zone, which asks the cell; the round's version
    // comes back down to the cell's expert the same way.
    let mut ingest = cell.ingest().await;
    for n in pushed..pushed + 40 {
        let first = n * WINDOW as u64;
        ingest
            .push(SampleBatch {
                samples: samples("s1", first..first + WINDOW as u64, normal_values),
            })
            .await
            .expect("every batch is accepted");
    }
    let round = poll("a round through the gateway", LONG, || async {
        let channel = cloud.channel(&cloud.operator).await?;
        let reply = FederationClient::new(channel)
            .federate(FederateRequest {
                expert: "cell-stored".into(),
            })
            .await
            .ok()?
            .into_inner();
        let round: serde_json::Value = serde_json::from_str(&reply.round_json).ok()?;
        round["version"].as_str().is_some().then_some(round)
    })
    .await;
    eprintln!("round through the gateway: {round}");
    assert_eq!(round["sites"], serde_json::json!(["gw-1"]), "{round}");
    assert_eq!(round["version"], "ae@2", "{round}");
    poll("the cell to serve the round's ae@2", LONG, || {
        serves("ae@2")
    })
    .await;
}

/// [`spec`] and `cell-stored`: the cell's expert serving the stored `ae@1`, trained by
/// federated rounds whose site (the cell, where its sensor is) the gateway aggregates.
fn federated_spec() -> String {
    let routes = r#"routes = { s1 = ["cell-ae", "cloud-ae"] }"#;
    spec().replace(
        routes,
        r#"routes = { s1 = ["cell-ae", "cloud-ae", "cell-stored"] }"#,
    ) + r#"
[[experts]]
name = "cell-stored"
model = "ae@1"
placement = { zone = "plant/area/cell" }

[experts.federation]
windows = 64
deadline_s = 60

[experts.federation.local]
epochs = 1
batch_size = 16

[[experts.federation.groups]]
aggregator = "gw-1"
zone = "plant/area/cell"
"#
}
