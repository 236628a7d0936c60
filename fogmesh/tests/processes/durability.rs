//! A node with an edge log killed with `kill -9` at arbitrary moments while a
//! producer streams numbered samples and, after each restart, resends everything it
//! did not see acknowledged. Every acknowledged sample must be windowed exactly once:
//! the stream's window count after the last life is exactly the count its distinct
//! samples make, none missing and none cut twice from a resend.
//!
//! CI runs [`KILLS_IN_CI`] kills; `just soak` runs the 100 of the issue.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use fogmesh_proto::control_client::ControlClient;
use fogmesh_proto::ingest_client::IngestClient;
use fogmesh_proto::{SampleBatch, StatusRequest};
use fogmesh_tests::{
    node_toml_with, normal_values, samples, TestPki, NODE, SENSOR, STRIDE, WINDOW,
};
use fogmesh_trust::Role;

use crate::fixtures::{free_port_on, poll, spawn_node};

const KILLS_IN_CI: u64 = 10;

/// Windows of `WINDOW` every `STRIDE` cut from `samples` consecutive samples.
fn windows_of(samples: u64) -> u64 {
    let (window, stride) = (WINDOW as u64, STRIDE as u64);
    if samples < window {
        0
    } else {
        (samples - window) / stride + 1
    }
}

/// SplitMix64: the kill moments and batch sizes, the same on every run.
struct Moments(u64);

impl Moments {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % below
    }
}

struct DurableNode {
    config: PathBuf,
    log: PathBuf,
    addr: String,
    child: Option<Child>,
}

impl DurableNode {
    fn start(&mut self) {
        self.child = Some(spawn_node(&self.config, &self.log, "info"));
    }

    /// `kill -9`: no goodbye, no flush, no chance to finish a commit.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for DurableNode {
    fn drop(&mut self) {
        self.kill();
    }
}

fn durable_node(dir: &Path, pki: &TestPki) -> DurableNode {
    let port = free_port_on("127.0.0.1");
    let config = node_toml_with(
        "edge_log = \"edge-log\"",
        &pki.node_tls_toml(NODE, Role::Edge),
    )
    .replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, config).expect("the config is written");
    DurableNode {
        config: path,
        log: dir.join("node.log"),
        addr: format!("127.0.0.1:{port}"),
        child: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_arbitrary_moments_loses_no_acknowledged_sample_and_windows_none_twice() {
    kill_and_resend(KILLS_IN_CI).await;
}

/// The 100 kills (`just soak`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak: 100 kills take minutes; `just soak` runs it"]
async fn soak_a_hundred_kills_lose_no_acknowledged_sample() {
    kill_and_resend(100).await;
}

async fn kill_and_resend(kills: u64) {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::open(&dir.path().join("pki"));
    let (sensor, operator) = (pki.sensor(), pki.operator());
    let mut node = durable_node(dir.path(), &pki);
    let mut moments = Moments(kills);
    // The next sequence the producer has not seen acknowledged.
    let mut next = 0u64;
    let (mut acked_batches, mut accepted_in_acks) = (0u64, 0u64);
    for life in 0..=kills {
        node.start();
        let mut ingest = poll(
            "the node to serve gRPC",
            Duration::from_secs(60),
            || async {
                Some(IngestClient::new(
                    sensor.channel(&node.addr).await.ok()?.channel,
                ))
            },
        )
        .await;
        let last_life = life == kills;
        let lifetime = Duration::from_millis(100 + moments.next(400));
        let producing = async {
            loop {
                let size = 1 + moments.next(120);
                let batch = SampleBatch {
                    samples: samples(SENSOR, next..next + size, normal_values),
                };
                // A push cut by the kill is resent after the restart.
                let Ok(ack) = ingest.push(batch).await else {
                    return;
                };
                let ack = ack.into_inner();
                assert_eq!(
                    u64::from(ack.accepted + ack.duplicates),
                    size,
                    "every sample of a batch is accepted or a duplicate"
                );
                accepted_in_acks += u64::from(ack.accepted);
                acked_batches += 1;
                next = ack.streams[0].acked_through + 1;
                if last_life && next >= 2_000 {
                    return;
                }
            }
        };
        if last_life {
            producing.await;
        } else {
            let _ = tokio::time::timeout(lifetime, producing).await;
            node.kill();
        }
    }
    let mut control = ControlClient::new(
        operator
            .channel(&node.addr)
            .await
            .expect("the node answers")
            .channel,
    );
    let status = control
        .get_status(StatusRequest {})
        .await
        .expect("status answers")
        .into_inner();
    let stream = status
        .sensors
        .iter()
        .find(|s| s.sensor_id == SENSOR)
        .expect("the stream");
    assert!(
        acked_batches > kills,
        "the producer was acknowledged in every life"
    );
    assert_eq!(
        stream.last_sequence + 1,
        next,
        "nothing acknowledged was lost"
    );
    assert!(
        accepted_in_acks <= next,
        "{accepted_in_acks} samples acknowledged as new, but only {next} exist: some were accepted twice"
    );
    assert_eq!(
        stream.windows,
        windows_of(next),
        "{next} samples make {} windows; the stream cut {}",
        windows_of(next),
        stream.windows
    );
    let log = std::fs::read_to_string(&node.log).unwrap_or_default();
    assert_eq!(
        log.matches("stream resumed from the edge log").count() as u64,
        kills,
        "every restart resumed the stream from its log"
    );
}

/// Connects a sensor producer to the node, waiting for it to serve.
async fn ingest_client(
    node: &DurableNode,
    sensor: &fogmesh_cluster::dialer::Dialer,
) -> IngestClient<tonic::transport::Channel> {
    poll(
        "the node to serve gRPC",
        Duration::from_secs(60),
        || async {
            Some(IngestClient::new(
                sensor.channel(&node.addr).await.ok()?.channel,
            ))
        },
    )
    .await
}

/// `fogmesh alerts --follow` across a `kill -9` and restart of its node: it reconnects
/// and resumes after the last cursor it printed, so it prints every alert once, in
/// order, those of both lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fogmesh_alerts_follow_resumes_after_its_node_restarts() {
    use tokio::io::AsyncBufReadExt;

    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::open(&dir.path().join("pki"));
    let sensor = pki.sensor();
    let mut node = durable_node(dir.path(), &pki);
    node.start();
    // 48 spiked samples: windows of 16 every 8 from 0 to 32, five alerts.
    let spikes = |range: std::ops::Range<u64>| SampleBatch {
        samples: samples(SENSOR, range, fogmesh_tests::spiked_values),
    };
    ingest_client(&node, &sensor)
        .await
        .push(spikes(0..48))
        .await
        .expect("the spikes are accepted");

    let mut follow = tokio::process::Command::new(crate::fixtures::fogmesh_binary())
        .args(["alerts", "--node", &node.addr, "--follow", "--from", "1"])
        .envs(pki.operator_env())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("fogmesh alerts starts");
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().expect("piped")).lines();
    let mut cursors = Vec::new();
    let mut read_until = async |last: u64, cursors: &mut Vec<u64>| {
        while cursors.last().is_none_or(|c| *c < last) {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .expect("an alert line in time")
                .expect("stdout reads")
                .expect("fogmesh alerts keeps running");
            let cursor = line
                .strip_prefix('#')
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|c| c.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("a line with its cursor: {line}"));
            assert!(line.contains(SENSOR), "{line}");
            cursors.push(cursor);
        }
    };
    read_until(5, &mut cursors).await;

    node.kill();
    node.start();
    // Six more windows (5 to 10) in the second life.
    ingest_client(&node, &sensor)
        .await
        .push(spikes(48..96))
        .await
        .expect("the spikes are accepted after the restart");
    read_until(11, &mut cursors).await;
    assert_eq!(
        cursors,
        (1..=11).collect::<Vec<_>>(),
        "every alert once, in order"
    );
}
