//! Fixtures of the multi-process tests (`mesh`, `rollout`): `fogmesh node`
//! processes on their own 127.0.0.x addresses, each with its log in a file; a TCP proxy
//! that can turn into a black hole (accepts and holds connections, forwards nothing),
//! for silent partitions without root; and polling with a deadline instead of sleeps.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fogmesh_cluster::dialer::Dialer;
use fogmesh_proto::control_client::ControlClient;
use fogmesh_proto::inference_client::InferenceClient;
use fogmesh_proto::ingest_client::IngestClient;
use fogmesh_proto::telemetry_client::TelemetryClient;
use fogmesh_proto::{Alert, AlertFilter, SampleBatch};
use fogmesh_proto::{MeshRequest, MeshStatus, MetricsRequest, NodeStatus, StatusRequest};
pub use fogmesh_tests::poll;
use fogmesh_tests::{normal_values, samples, TestPki, CHANNELS, WINDOW};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

/// The `fogmesh` binary cargo built for this test binary: cargo builds a package's
/// binaries before its integration tests and names them here, so `cargo test -p fogmesh`
/// works on a clean tree.
pub fn fogmesh_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_fogmesh"))
}

/// A port free for both TCP and UDP on `ip` (gRPC and gossip share the number).
pub fn free_port_on(ip: &str) -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind((ip, 0)).expect("a free TCP port");
        let port = tcp.local_addr().expect("a bound address").port();
        if std::net::UdpSocket::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

/// `fogmesh node --config CONFIG`, its log appended to `log`.
pub fn spawn_node(config: &Path, log: &Path, rust_log: &str) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("the log file opens");
    Command::new(fogmesh_binary())
        .args(["node", "--config"])
        .arg(config)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the fogmesh binary starts")
}

/// One `fogmesh node` process, killed when dropped. Every node of a test folder has
/// a certificate of the folder's test CA (`pki/`), as a node in a plant has.
pub struct MeshNode {
    pub name: String,
    pub addr: String,
    pub pki: TestPki,
    /// Dials as an operator (control, inference) and as a sensor gateway (ingest).
    pub operator: Dialer,
    pub sensor: Dialer,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// What a node's `node.toml` says.
pub struct NodeSettings<'a> {
    pub name: &'a str,
    pub role: &'a str,
    pub ip: &'a str,
    pub secret: &'a str,
    pub seeds: Vec<String>,
    /// The address peers dial instead of the node's own (a proxy).
    pub advertise: Option<String>,
    /// `[node] zone`.
    pub zone: Option<&'a str>,
    /// `[node] conduits`.
    pub conduits: &'a [&'a str],
    /// `[node] segmented`; such a node also dials from its own address, so that
    /// rules on addresses tell its connections from others'.
    pub segmented: bool,
}

impl MeshNode {
    pub fn start(dir: &Path, settings: NodeSettings<'_>) -> MeshNode {
        let port = free_port_on(settings.ip);
        MeshNode::start_on_port(dir, settings, port)
    }

    pub fn start_on_port(dir: &Path, settings: NodeSettings<'_>, port: u16) -> MeshNode {
        let addr = format!("{}:{port}", settings.ip);
        let seeds = settings
            .seeds
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let advertise = settings
            .advertise
            .map(|a| format!("advertise = {a:?}\n"))
            .unwrap_or_default();
        let mut zone = settings
            .zone
            .map(|z| format!("zone = {z:?}\n"))
            .unwrap_or_default();
        if !settings.conduits.is_empty() {
            zone.push_str(&format!("conduits = {:?}\n", settings.conduits));
        }
        let mut advertise = advertise;
        if settings.segmented {
            zone.push_str("segmented = true\n");
            advertise.push_str(&format!("dial_from = {:?}\n", settings.ip));
        }
        let pki = TestPki::open(&dir.join("pki"));
        let role = settings.role.parse().expect("a node role");
        let config = format!(
            "[node]\nname = {:?}\nrole = {:?}\n{zone}listen = {addr:?}\n\n[cluster]\nsecret = {:?}\nseeds = [{seeds}]\n{advertise}data = {:?}\n{}",
            settings.name,
            settings.role,
            settings.secret,
            format!("data-{}", settings.name),
            pki.node_tls_toml(settings.name, role),
        );
        let config_path = dir.join(format!("{}.toml", settings.name));
        std::fs::write(&config_path, config).expect("the config is written");
        let log = dir.join(format!("{}.log", settings.name));
        let (operator, sensor) = (pki.operator(), pki.sensor());
        let mut node = MeshNode {
            name: settings.name.to_string(),
            addr,
            pki,
            operator,
            sensor,
            config: config_path,
            log,
            child: None,
        };
        node.restart();
        node
    }

    /// Starts the node's process again from the same config (same address, same data
    /// folder); its log goes on in the same file.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn_node(&self.config, &self.log, "info,chitchat=error"));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel to this node as the holder of `dialer`, if it answers.
    pub async fn channel(&self, dialer: &Dialer) -> Option<Channel> {
        Some(dialer.channel(&self.addr).await.ok()?.channel)
    }

    pub async fn ingest(&self) -> IngestClient<Channel> {
        IngestClient::new(self.channel(&self.sensor).await.expect("the node answers"))
    }

    pub async fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::new(
            self.channel(&self.operator)
                .await
                .expect("the node answers"),
        )
    }

    /// `fogmesh` with an operator's certificate in its environment.
    pub fn cli(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(fogmesh_binary());
        command.envs(self.pki.operator_env());
        command
    }

    /// `kill -9`: no goodbye to anyone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn control(&self) -> ControlClient<Channel> {
        poll(
            "the node to serve gRPC",
            Duration::from_secs(30),
            || async { Some(ControlClient::new(self.channel(&self.operator).await?)) },
        )
        .await
    }

    /// The node's metrics in the Prometheus text format.
    pub async fn metrics_text(&self) -> String {
        let channel = self
            .channel(&self.operator)
            .await
            .expect("the node answers");
        TelemetryClient::new(channel)
            .metrics(MetricsRequest {})
            .await
            .expect("metrics answer")
            .into_inner()
            .text
    }

    pub async fn mesh(&self) -> Option<MeshStatus> {
        let mut control = ControlClient::new(self.channel(&self.operator).await?);
        Some(control.get_mesh(MeshRequest {}).await.ok()?.into_inner())
    }

    pub async fn status(&self) -> Option<NodeStatus> {
        let mut control = ControlClient::new(self.channel(&self.operator).await?);
        Some(
            control
                .get_status(StatusRequest {})
                .await
                .ok()?
                .into_inner(),
        )
    }
}

impl Drop for MeshNode {
    fn drop(&mut self) {
        self.kill();
    }
}

impl<'a> NodeSettings<'a> {
    /// A node of the mesh whose secret is `secret`, joining through `seeds`.
    pub fn new(
        name: &'a str,
        role: &'a str,
        ip: &'a str,
        secret: &'a str,
        seeds: &[&MeshNode],
    ) -> NodeSettings<'a> {
        NodeSettings {
            name,
            role,
            ip,
            secret,
            seeds: seeds.iter().map(|n| n.addr.clone()).collect(),
            advertise: None,
            zone: None,
            conduits: &[],
            segmented: false,
        }
    }
}

/// Waits (at most `timeout`) until `observer` sees `expected` members, each linked (or
/// itself).
pub async fn full_membership(observer: &MeshNode, expected: usize, timeout: Duration) {
    poll(
        &format!("{} to see {expected} linked members", observer.name),
        timeout,
        || async {
            let mesh = observer.mesh().await?;
            (mesh.members.len() == expected
                && mesh
                    .members
                    .iter()
                    .all(|m| m.link == "ready" || m.link == "self"))
            .then_some(())
        },
    )
    .await;
}

/// Calls `check` every 50 ms until it returns something, for at most `timeout`;
/// panics naming `what` after that.
/// Mesh tests start several node processes each and measure how fast the mesh heals; on
/// a two-core machine two of them at once would measure each other. Every test that
/// starts a mesh holds this for its whole run.
pub static ONE_MESH_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The longest any wait in a mesh test may take before it counts as a failure; the
/// waits themselves end on events, not on this.
pub const LONG: Duration = Duration::from_secs(40);

/// Waits until `sensor` runs on `node`, then keeps `keep(alert)` of every window the
/// node scores for it (`WatchAlerts`, normal windows included), in the order the node
/// published them, until the returned task is aborted.
pub async fn collect_scored<T: Send + 'static>(
    node: &MeshNode,
    sensor: &str,
    keep: impl Fn(Alert) -> T + Send + 'static,
) -> (Arc<std::sync::Mutex<Vec<T>>>, tokio::task::JoinHandle<()>) {
    poll(
        &format!("{sensor} to start on {}", node.name),
        LONG,
        || async {
            node.status()
                .await?
                .sensors
                .iter()
                .any(|s| s.sensor_id == sensor)
                .then_some(())
        },
    )
    .await;
    let mut alerts = node
        .inference()
        .await
        .watch_alerts(AlertFilter {
            sensor_ids: vec![sensor.into()],
            include_normal: true,
            from_cursor: None,
        })
        .await
        .expect("watching scored windows")
        .into_inner();
    let kept: Arc<std::sync::Mutex<Vec<T>>> = Arc::default();
    let collector = {
        let kept = kept.clone();
        tokio::spawn(async move {
            while let Ok(Some(alert)) = alerts.message().await {
                let value = keep(alert);
                kept.lock().unwrap().push(value);
            }
        })
    };
    (kept, collector)
}

/// Pushes window `window` of `sensor` (normal readings) to `node` and waits
/// until `arrived` says it was scored. A `WatchAlerts` subscriber receives verdicts in
/// the order the node published them, so once this barrier window has arrived, every
/// verdict published before it has too: counting duplicates needs no sleep.
pub async fn barrier_window(
    node: &MeshNode,
    sensor: &str,
    window: u64,
    arrived: impl Fn() -> bool,
) {
    let mut ingest = node.ingest().await;
    let first = window * WINDOW as u64;
    let batch = SampleBatch {
        samples: samples(sensor, first..first + WINDOW as u64, normal_values),
    };
    ingest
        .push(batch)
        .await
        .expect("the barrier window is accepted");
    poll("the barrier window to be scored", LONG, || async {
        arrived().then_some(())
    })
    .await;
}

/// A TCP proxy to `target`; [`BlackholeProxy::blackhole`] makes it hold every
/// connection open and drop every byte, like a cable cut behind a switch: no reset,
/// no FIN, just silence.
pub struct BlackholeProxy {
    pub addr: String,
    forwarding: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackholeProxy {
    pub async fn start(ip: &str, target: String) -> BlackholeProxy {
        let listener = TcpListener::bind((ip, 0)).await.expect("the proxy binds");
        let addr = listener.local_addr().expect("a bound address").to_string();
        let forwarding = Arc::new(AtomicBool::new(true));
        let open = forwarding.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let target = target.clone();
                let open = open.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, open.clone()),
                        pump(server_read, client_write, open),
                    );
                });
            }
        });
        BlackholeProxy {
            addr,
            forwarding,
            task,
        }
    }

    pub fn blackhole(&self) {
        self.forwarding.store(false, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.forwarding.store(true, Ordering::SeqCst);
    }
}

impl Drop for BlackholeProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes while the proxy forwards; swallows them while it is a black hole.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    open: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if open.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `ae@1` in cloud-1's store under `dir`, signed by the test PKI: an untrained
/// autoencoder no window alarms.
pub fn store_ae_1(dir: &Path) {
    let pki = TestPki::open(&dir.join("pki"));
    let store = pki.signing_store(&dir.join("data-cloud-1/models"));
    let config = fogmesh_models::AutoencoderConfig::w1(CHANNELS as i64, WINDOW as i64);
    let model = fogmesh_models::ConvAutoencoder::new(config.clone(), tch::Device::Cpu, 3).unwrap();
    let (weights, _) = model.to_safetensors().unwrap();
    let manifest = fogmesh_models::store::Manifest {
        metrics: [("threshold".to_string(), 1000.0)].into(),
        created_us: 1,
        ..fogmesh_models::served::Architecture::ConvAutoencoder(config).manifest("ae", "1")
    };
    store
        .import(manifest, &weights)
        .expect("the store takes ae@1");
}
