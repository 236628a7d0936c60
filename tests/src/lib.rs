//! Shared fixtures of fogmesh's end-to-end tests (`tests/e2e.rs`): a node config
//! written to a temporary folder and a node server started from it, gRPC clients,
//! sample generators for normal and spiked readings, the alarm threshold that separates
//! them, and a real mosquitto broker.
//!
//! The fixture node has two sensor streams (`pump-1`, `pump-2`: 2 channels, windows of
//! 16 samples every 8, frozen normalisation with mean 0 and std 1, so windows hold the
//! raw values) routed by a static router to one untrained, seeded autoencoder. Its
//! threshold is computed from that same model ([`threshold`]): the geometric mean of
//! the worst normal window's score and the mildest spiked window's score.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fogmesh_actors::Annunciator;
use fogmesh_cluster::dialer::Dialer;
use fogmesh_cluster::{NodeConfig, NodeServer, RunningNodeServer};
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder};
use fogmesh_proto::control_client::ControlClient;
use fogmesh_proto::inference_client::InferenceClient;
use fogmesh_proto::ingest_client::IngestClient;
use fogmesh_proto::telemetry_client::TelemetryClient;
use fogmesh_proto::{
    Alert, AlertFilter, MetricsRequest, NodeStatus, Sample, SensorStreamStatus, StatusRequest,
};
use tempfile::TempDir;
use tonic::transport::Channel;

mod pki;
mod tidy;

pub use pki::{BrokerCertificate, TestPki};

pub const NODE: &str = "edge-test";
pub const SENSOR: &str = "pump-1";
/// A second stream on the same router and expert, for batches spanning streams.
pub const OTHER_SENSOR: &str = "pump-2";
pub const ROUTER: &str = "by-asset";
pub const EXPERT: &str = "pump-ae";
pub const CHANNELS: usize = 2;
pub const WINDOW: usize = 16;
pub const STRIDE: usize = 8;
pub const SEED: i64 = 7;
/// Spiked readings sit this far from normal ones (normal amplitude is 0.5).
pub const SPIKE: f32 = 50.0;
pub const START_US: i64 = 1_700_000_000_000_000;
pub const SAMPLE_PERIOD_US: i64 = 1_000;
/// The fixture's `[limits]`: small, so oversized requests are cheap to build.
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;
pub const MAX_BATCH_SAMPLES: usize = 1_000;
pub const MAX_VALUES_PER_SAMPLE: usize = 64;
/// How long any single awaited event may take before the test fails.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Readings of normal operation: two slow, small sinusoids.
pub fn normal_values(sequence: u64) -> Vec<f32> {
    let t = sequence as f32;
    vec![0.5 * (t * 0.4).sin(), 0.5 * (t * 0.3).cos()]
}

/// Readings far outside normal operation.
pub fn spiked_values(sequence: u64) -> Vec<f32> {
    let normal = normal_values(sequence);
    vec![SPIKE + normal[0], -SPIKE + normal[1]]
}

pub fn timestamp_us(sequence: u64) -> i64 {
    START_US + sequence as i64 * SAMPLE_PERIOD_US
}

/// A generator of readings by sequence number: [`normal_values`] or [`spiked_values`].
pub type Readings = fn(u64) -> Vec<f32>;

/// Samples of `sensor` for `sequences`, with values from `values`.
pub fn samples(sensor: &str, sequences: Range<u64>, values: Readings) -> Vec<Sample> {
    sequences
        .map(|sequence| Sample {
            sensor_id: sensor.to_string(),
            sequence,
            timestamp_us: timestamp_us(sequence),
            values: values(sequence),
        })
        .collect()
}

/// The window the stream cuts from samples `first..first + WINDOW`, channel-major;
/// sequences at or after `spike_from` carry spiked values.
pub fn window(first: u64, spike_from: u64) -> Vec<f32> {
    let mut values = vec![0.0; CHANNELS * WINDOW];
    for s in 0..WINDOW {
        let sequence = first + s as u64;
        let row = if sequence >= spike_from {
            spiked_values(sequence)
        } else {
            normal_values(sequence)
        };
        for (c, value) in row.into_iter().enumerate() {
            values[c * WINDOW + s] = value;
        }
    }
    values
}

/// Raw scores of the fixture's expert (same config, same seed) on the given windows.
pub fn expert_scores(windows: &[Vec<f32>]) -> Vec<f32> {
    let model = ConvAutoencoder::new(
        AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64),
        fogmesh_models::default_device(),
        SEED,
    )
    .expect("the fixture's model builds");
    model
        .score(&windows.concat())
        .expect("the fixture's windows fit the model")
}

/// The alarm threshold of the fixture's expert: the geometric mean of the highest score
/// of a normal window and the lowest score of a window holding spiked samples (half or
/// all of it). Checks that the two are far apart, so the tests' verdicts have margin.
pub fn threshold() -> f32 {
    static THRESHOLD: OnceLock<f32> = OnceLock::new();
    *THRESHOLD.get_or_init(|| {
        let normal: Vec<Vec<f32>> = (0..8).map(|k| window(k * STRIDE as u64, u64::MAX)).collect();
        let spiked: Vec<Vec<f32>> = vec![window(0, WINDOW as u64 / 2), window(0, 0), window(24, 32)];
        let normal_max = expert_scores(&normal).into_iter().fold(0.0, f32::max);
        let spiked_min = expert_scores(&spiked).into_iter().fold(f32::INFINITY, f32::min);
        assert!(
            normal_max > 0.0 && spiked_min > 100.0 * normal_max,
            "spiked windows must score far above normal ones: normal max {normal_max}, spiked min {spiked_min}"
        );
        (normal_max * spiked_min).sqrt()
    })
}

/// The fixture's `node.toml`, with `extra` appended (more `[[...]]` tables).
pub fn node_toml(extra: &str) -> String {
    node_toml_with("", extra)
}

/// The fixture's `node.toml` with `node_extra` added to its `[node]` table and `extra`
/// appended.
pub fn node_toml_with(node_extra: &str, extra: &str) -> String {
    format!(
        r#"[node]
name = "{NODE}"
role = "edge"
listen = "127.0.0.1:0"
{node_extra}

[limits]
max_message_bytes = {MAX_MESSAGE_BYTES}
max_batch_samples = {MAX_BATCH_SAMPLES}
max_values_per_sample = {MAX_VALUES_PER_SAMPLE}

[[experts]]
name = "{EXPERT}"
model_version = "untrained-seed-{SEED}"
channels = {CHANNELS}
window = {WINDOW}
seed = {SEED}
threshold = {threshold}
max_batch = 8
max_wait_us = 1000

[[routers]]
name = "{ROUTER}"
policy = "static"
routes = {{ "{SENSOR}" = ["{EXPERT}"], "{OTHER_SENSOR}" = ["{EXPERT}"] }}

[[sensors]]
id = "{SENSOR}"
channels = {CHANNELS}
window = {WINDOW}
stride = {STRIDE}
router = "{ROUTER}"
normalisation = {{ mode = "frozen", mean = [0.0, 0.0], std = [1.0, 1.0] }}

[[sensors]]
id = "{OTHER_SENSOR}"
channels = {CHANNELS}
window = {WINDOW}
stride = {STRIDE}
router = "{ROUTER}"
normalisation = {{ mode = "frozen", mean = [0.0, 0.0], std = [1.0, 1.0] }}
{extra}"#,
        threshold = threshold(),
    )
}

/// Writes `text` as `node.toml` in `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("node.toml");
    std::fs::write(&path, text).expect("the temporary folder is writable");
    path
}

/// A node server started from the fixture config, with its folder and the test CA
/// that issued its certificate (and the clients' certificates).
pub struct TestNode {
    pub dir: TempDir,
    pub server: RunningNodeServer,
    pub pki: TestPki,
    /// Dials as an operator: control, inference, telemetry, model store.
    pub operator: Dialer,
    /// Dials as a sensor gateway: ingest.
    pub sensor: Dialer,
}

impl TestNode {
    /// Starts the fixture node with `extra` appended to its config.
    pub async fn start(extra: &str) -> TestNode {
        let dir = tempfile::tempdir().expect("a temporary folder");
        TestNode::start_config(dir, &node_toml(extra), Annunciator::new(1024)).await
    }

    /// Starts a node from config `text` written to `dir` (which may already hold the
    /// files the config names), publishing to `annunciator`. A config without `[tls]`
    /// gets a certificate of a fresh test CA for its node name and role.
    pub async fn start_config(dir: TempDir, text: &str, annunciator: Annunciator) -> TestNode {
        let path = write_config(dir.path(), text);
        let mut config = NodeConfig::load(&path).expect("the fixture config loads");
        let pki = TestPki::open(&dir.path().join("pki"));
        if config.tls.is_none() {
            let role = config.node.role.as_str().parse().expect("a node role");
            config.tls = Some(pki.node_tls(&config.node.name, role));
        }
        let insecure = config.tls.as_ref().is_some_and(|tls| tls.insecure);
        let server = NodeServer::start_with(config, annunciator)
            .await
            .expect("the fixture node starts");
        let (operator, sensor) = if insecure {
            (Dialer::new(None, None), Dialer::new(None, None))
        } else {
            (pki.operator(), pki.sensor())
        };
        TestNode {
            dir,
            server,
            pki,
            operator,
            sensor,
        }
    }

    pub fn endpoint(&self) -> String {
        self.server.grpc_addr().to_string()
    }

    /// A channel to this node as the holder of `dialer`.
    pub async fn channel(&self, dialer: &Dialer) -> Channel {
        dialer
            .channel(&self.endpoint())
            .await
            .expect("connects")
            .channel
    }

    pub async fn ingest(&self) -> IngestClient<Channel> {
        IngestClient::new(self.channel(&self.sensor).await)
    }

    pub async fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel(&self.operator).await)
    }

    /// Opens `WatchAlerts` for these sensors (all of them when empty), from now on.
    pub async fn watch_alerts(&self, sensor_ids: &[&str]) -> tonic::Streaming<Alert> {
        self.watch_alerts_from(sensor_ids, None).await
    }

    /// Opens `WatchAlerts` from the journal's cursor `from` (from now on when `None`).
    pub async fn watch_alerts_from(
        &self,
        sensor_ids: &[&str],
        from: Option<u64>,
    ) -> tonic::Streaming<Alert> {
        self.inference()
            .await
            .watch_alerts(AlertFilter {
                sensor_ids: sensor_ids.iter().map(|s| s.to_string()).collect(),
                include_normal: false,
                from_cursor: from,
            })
            .await
            .expect("watching starts")
            .into_inner()
    }

    pub async fn control(&self) -> ControlClient<Channel> {
        ControlClient::new(self.channel(&self.operator).await)
    }

    pub async fn telemetry(&self) -> TelemetryClient<Channel> {
        TelemetryClient::new(self.channel(&self.operator).await)
    }

    pub async fn status(&self) -> NodeStatus {
        self.control()
            .await
            .get_status(StatusRequest {})
            .await
            .expect("status answers")
            .into_inner()
    }

    pub async fn sensor_status(&self, sensor: &str) -> SensorStreamStatus {
        self.status()
            .await
            .sensors
            .into_iter()
            .find(|s| s.sensor_id == sensor)
            .expect("the sensor is in the status")
    }

    pub async fn metrics_text(&self) -> String {
        self.telemetry()
            .await
            .metrics(MetricsRequest {})
            .await
            .expect("metrics answer")
            .into_inner()
            .text
    }

    pub async fn stop(self) {
        tokio::time::timeout(EVENT_TIMEOUT, self.server.shutdown())
            .await
            .expect("the node stops in time")
            .expect("the node stops cleanly");
    }
}

/// Waits until `check` yields a value, asking every 50 ms, and fails the test naming
/// `what` once `timeout` has passed: a condition with a deadline, never a fixed sleep.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next alert on a `WatchAlerts` stream, failing the test after [`EVENT_TIMEOUT`].
pub async fn next_alert(alerts: &mut tonic::Streaming<Alert>) -> Alert {
    tokio::time::timeout(EVENT_TIMEOUT, alerts.message())
        .await
        .expect("an alert arrives in time")
        .expect("the alert stream is healthy")
        .expect("the alert stream stays open")
}

/// A value of a Prometheus counter in exposition text: the sample of `name` whose
/// label set contains every `labels` pair. `None` when there is no such sample.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse().ok()).flatten()
        })
}

/// A free TCP port on 127.0.0.1 (free when asked; a broker binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A mosquitto broker on 127.0.0.1, killed when dropped.
pub struct Broker {
    child: Child,
    pub port: u16,
    _dir: TempDir,
}

impl Broker {
    /// Starts mosquitto on `port` and returns once it accepts connections.
    ///
    /// # Panics
    /// When mosquitto is not installed: the MQTT tests need a real broker, and skipping
    /// them silently would hide that.
    pub fn start(port: u16) -> Broker {
        Broker::start_with(port, |_| "allow_anonymous true\n".to_string())
    }

    /// Starts mosquitto on `port` over mutual TLS: its certificate is `certificate`'s,
    /// clients need a certificate of the CA at `client_ca` (the mesh CA) and one of
    /// `users` (name, password).
    pub fn start_tls(
        port: u16,
        certificate: &BrokerCertificate,
        client_ca: &Path,
        users: &[(&str, &str)],
    ) -> Broker {
        Broker::start_with(port, |dir| {
            let passwords = dir.join("passwords");
            std::fs::write(&passwords, "").expect("the password file");
            for (user, password) in users {
                let status = Command::new(sibling_tool("mosquitto_passwd"))
                    .arg("-b")
                    .arg(&passwords)
                    .args([user, password])
                    .status()
                    .expect("mosquitto_passwd runs (it comes with mosquitto)");
                assert!(status.success(), "mosquitto_passwd failed: {status}");
            }
            format!(
                "allow_anonymous false\npassword_file {}\ncertfile {}\nkeyfile {}\ncafile {}\nrequire_certificate true\n",
                passwords.display(),
                certificate.cert.display(),
                certificate.key.display(),
                client_ca.display(),
            )
        })
    }

    fn start_with(port: u16, settings: impl FnOnce(&Path) -> String) -> Broker {
        let binary = mosquitto_binary().unwrap_or_else(|| {
            panic!("mosquitto is not installed (not on PATH, not /usr/sbin/mosquitto): run `just setup-broker`")
        });
        let dir = tempfile::tempdir().expect("a temporary folder");
        let conf = dir.path().join("mosquitto.conf");
        let settings = settings(dir.path());
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\n{settings}persistence false\nlog_dest stderr\n"),
        )
        .expect("the temporary folder is writable");
        let mut child = Command::new(&binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            // stderr, not stdout: mosquitto's stdout is block-buffered into a pipe.
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let log = child.stderr.take().expect("stderr is piped");
        // mosquitto logs "... running" once its listeners are open; the thread keeps
        // draining the log afterwards so the broker never blocks on a full pipe.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(log).lines().map_while(Result::ok) {
                if line.contains("running") {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let mut broker = Broker {
            child,
            port,
            _dir: dir,
        };
        if ready_rx.recv_timeout(EVENT_TIMEOUT).is_err() {
            let exit = broker.child.try_wait();
            panic!("mosquitto on port {port} did not report running (exit status: {exit:?})");
        }
        broker
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tool installed beside mosquitto (`mosquitto_passwd`).
fn sibling_tool(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/usr/bin").join(name))
}

fn mosquitto_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("mosquitto"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/mosquitto");
        sbin.is_file().then_some(sbin)
    })
}

/// The MQTT payload for `samples` (all of one stream; the topic names it).
pub fn json_batch(samples: &[Sample]) -> Vec<u8> {
    let samples: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| serde_json::json!({"sequence": s.sequence, "timestamp_us": s.timestamp_us, "values": s.values}))
        .collect();
    serde_json::to_vec(&serde_json::json!({ "samples": samples })).expect("JSON encodes")
}

/// A plant-side MQTT producer: publishes batches and reads the node's answers on an
/// ack topic. Its event loop runs on a task that reconnects (and re-subscribes) when
/// the broker goes away.
pub struct MqttProducer {
    client: rumqttc::AsyncClient,
    acks: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    task: tokio::task::JoinHandle<()>,
}

impl MqttProducer {
    /// Connects to the broker on `port` and subscribes to `ack_topic`; returns once the
    /// broker confirmed the subscription.
    pub async fn connect(port: u16, client_id: &str, ack_topic: &str) -> MqttProducer {
        MqttProducer::connect_with(
            rumqttc::MqttOptions::new(client_id, "127.0.0.1", port),
            ack_topic,
        )
        .await
    }

    /// [`MqttProducer::connect`] over TLS with `tls`'s certificate, the broker's
    /// checked against `broker_ca`, as `user`.
    pub async fn connect_tls(
        port: u16,
        client_id: &str,
        ack_topic: &str,
        tls: &fogmesh_trust::MeshTls,
        broker_ca: &Path,
        (user, password): (&str, &str),
    ) -> MqttProducer {
        let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        let client = tls
            .outside_client(Some(broker_ca))
            .expect("a TLS client for the broker");
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(client)),
        ));
        options.set_credentials(user, password);
        MqttProducer::connect_with(options, ack_topic).await
    }

    async fn connect_with(mut options: rumqttc::MqttOptions, ack_topic: &str) -> MqttProducer {
        use rumqttc::{Event, Packet, QoS};
        // Room for the oversized payloads the tests send on purpose (rumqttc's default
        // is 10 KiB).
        options.set_max_packet_size(4 * MAX_MESSAGE_BYTES, 4 * MAX_MESSAGE_BYTES);
        let (client, mut events) = rumqttc::AsyncClient::new(options, 64);
        let (acks_tx, acks) = tokio::sync::mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed) = tokio::sync::mpsc::unbounded_channel();
        let subscriber = client.clone();
        let ack_topic = ack_topic.to_string();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        subscriber
                            .try_subscribe(ack_topic.as_str(), QoS::AtLeastOnce)
                            .expect("the subscription is queued");
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(message))) => {
                        let ack = serde_json::from_slice(&message.payload)
                            .expect("the node's acks are JSON");
                        let _ = acks_tx.send(ack);
                    }
                    Ok(_) => {}
                    // The broker went away: back off, then the next poll reconnects.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(EVENT_TIMEOUT, subscribed.recv())
            .await
            .expect("the broker confirms the ack subscription in time")
            .expect("the producer's event loop runs");
        MqttProducer { client, acks, task }
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .expect("the publish is queued");
    }

    /// The next answer on the ack topic, if one arrives within `within`.
    pub async fn next_ack(&mut self, within: Duration) -> Option<serde_json::Value> {
        tokio::time::timeout(within, self.acks.recv())
            .await
            .ok()
            .flatten()
    }

    /// Publishes `payload` until an answer satisfying `done` arrives, the way a
    /// producer resends an unacknowledged batch (the node may not be subscribed yet,
    /// or may be reconnecting). Fails the test after [`EVENT_TIMEOUT`].
    pub async fn publish_until_acked(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            self.publish(topic, payload.clone()).await;
            while let Some(ack) = self.next_ack(Duration::from_secs(1)).await {
                if done(&ack) {
                    return ack;
                }
            }
        }
        panic!("no acknowledgement on the ack topic within {EVENT_TIMEOUT:?}");
    }
}

impl Drop for MqttProducer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
