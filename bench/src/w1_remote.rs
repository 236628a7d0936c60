//! W1 across two processes (`fogmesh bench w1 --remote`): the same closed loop of
//! windows through the same router as [`crate::w1`], with the experts on a second
//! `fogmesh node` process reached over the cluster link, so the price of the link
//! shows against the in-process run.
//!
//! The run starts an expert node (a child process of this binary, role `cloud`) and a
//! node of its own (role `edge`, seeded with the child), applies a mesh spec through
//! its own `Control.Apply` that places W1's experts on the cloud node and its router
//! beside W1's sensors here, and drives the router as W1 does. Beside the workload it
//! measures two round trips in the same run, so their ratio means something: a small
//! echo to the other node's probe actor (gRPC link, ractor_cluster framing, actors on
//! both ends) and the same payload over bare loopback TCP, the floor any link sits on.
//!
//! With `tls` (`--tls`) both nodes hold certificates of an ephemeral mesh CA made for
//! the run, as a plant's nodes do, and every byte between them goes over mutual TLS;
//! without it both are `insecure = true`. The report gives the time to open a
//! connection (TCP plus, with TLS, the handshake) to the expert node, so the price of
//! TLS shows in both the workload and the set-up.
//!
//! The expert node is the running executable started again, so [`run`] belongs to the
//! `fogmesh` binary (its `node` subcommand); the child is killed when the run ends,
//! fails or is interrupted with Ctrl-C.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fogmesh_actors::{ModelSource, RoutingPolicy, EXPERT_SCOPE};
use fogmesh_cluster::dialer::Dialer;
use fogmesh_cluster::dialer::LinkError;
use fogmesh_cluster::peer_links::{probe_of, NodeProbeMsg};
use fogmesh_cluster::{ConfigError, NodeConfig, NodeServer, ServeError};
use fogmesh_proto::control_client::ControlClient;
use fogmesh_proto::{ApplyRequest, StatusRequest};
use fogmesh_trust::{IssueRequest, MeshCa, MeshTls, Role, TlsFiles};
use ractor::rpc::CallResult;
use serde::Serialize;

use crate::w1::{self, GateKind, W1Error, W1Options};

/// The node this process runs: W1's sensors and router.
const BENCH_NODE: &str = "w1-bench";
/// The child process: W1's experts.
const EXPERT_NODE: &str = "w1-experts";
/// Longest wait for each step of the set-up (the child joining, the spec deployed).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
const RTT_PAYLOAD: usize = 64;
const RTT_WARMUP: usize = 200;
const RTT_ROUNDS: usize = 2000;
/// Longest one echo may take before the measurement counts as failed.
const RTT_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of the expert node's log quoted in an error.
const LOG_TAIL_LINES: usize = 20;

/// The JSON object `fogmesh bench w1 --remote` prints: W1's fields where they mean the
/// same, and the round trips.
#[derive(Debug, Clone, Serialize)]
pub struct W1RemoteReport {
    pub workload: &'static str,
    pub remote: bool,
    /// Mutual TLS between the nodes (`--tls`), or plaintext.
    pub tls: bool,
    pub gate: GateKind,
    pub windows_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub inflight: usize,
    pub experts: usize,
    pub streams: usize,
    pub max_batch: usize,
    /// Over the whole run, warm-up included, as the expert node reports it; absent when
    /// it did not answer.
    pub mean_batch_size: Option<f64>,
    pub measured_seconds: f64,
    pub errors: u64,
    /// This process: the bench node, its router and the load.
    pub max_rss_mib: Option<f64>,
    /// The expert node's process.
    pub expert_node_max_rss_mib: Option<f64>,
    /// Where the experts run.
    pub device: String,
    /// Median round trip of a 64-byte echo to the expert node's probe actor.
    pub remote_rtt_us: f64,
    /// Median round trip of the same payload over loopback TCP.
    pub tcp_rtt_us: f64,
    pub rtt_ratio: f64,
    /// Median time to open a gRPC connection to the expert node and get an answer
    /// (TCP, the TLS handshake where there is one, HTTP/2 set-up, one status call).
    pub connect_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum W1RemoteError {
    #[error(transparent)]
    W1(#[from] W1Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the {what} as TOML: {source}")]
    Toml {
        what: &'static str,
        #[source]
        source: toml::ser::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot reach a node of the run: {source}")]
    Connect {
        #[source]
        source: LinkError,
    },
    #[error("the run's mesh CA: {source}")]
    Pki {
        #[source]
        source: fogmesh_trust::TrustError,
    },
    #[error("the bench node refused W1's mesh spec: {0}")]
    Apply(String),
    #[error("the expert node exited ({status}); its log ends:\n{log}")]
    ExpertNodeExited { status: ExitStatus, log: String },
    #[error("timed out after {after:?} waiting for {what}; the expert node's log ends:\n{log}")]
    Timeout {
        what: &'static str,
        after: Duration,
        log: String,
    },
    #[error("echo {round} to the expert node's probe: {reason}")]
    Probe { round: usize, reason: String },
    #[error("interrupted (Ctrl-C); the expert node was stopped")]
    Interrupted,
}

fn io_error(what: &'static str) -> impl Fn(std::io::Error) -> W1RemoteError + Copy {
    move |source| W1RemoteError::Io { what, source }
}

/// Runs W1 with its experts on a second node process and returns the report. Blocks
/// the calling async task for the set-up, `seconds`, and the two round-trip
/// measurements.
pub async fn run(options: &W1Options, tls: bool) -> Result<W1RemoteReport, W1RemoteError> {
    // Returning drops the half-done run, whose guard kills the expert node; a Ctrl-C
    // that ended the process instead would leave it running.
    tokio::select! {
        report = measure(options, tls) => report,
        _ = tokio::signal::ctrl_c() => Err(W1RemoteError::Interrupted),
    }
}

async fn measure(options: &W1Options, tls: bool) -> Result<W1RemoteReport, W1RemoteError> {
    options.validate()?;
    let spec_toml = mesh_spec_toml(options)?;
    let folder = tempfile::tempdir().map_err(io_error("creating the temporary folder"))?;
    let pki = RunPki::new(folder.path(), tls)?;
    let [bench_addr, expert_addr] = free_ports()?;
    let secret = format!(
        "w1-remote-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );

    let mut expert_node = ExpertNode::start(
        folder.path(),
        expert_addr,
        &secret,
        pki.node(EXPERT_NODE, Role::Cloud)?,
    )?;
    let bench_file = folder.path().join("bench-node.toml");
    let bench_toml = node_toml(
        BENCH_NODE,
        "edge",
        bench_addr,
        &secret,
        &[expert_addr],
        &folder.path().join("bench-data"),
        pki.node(BENCH_NODE, Role::Edge)?,
    )?;
    let server = NodeServer::start(NodeConfig::parse(&bench_toml, &bench_file)?).await?;
    expert_node
        .wait_until("the link to the expert node", || probe_of(EXPERT_NODE))
        .await?;
    let operator = pki.operator()?;
    apply(&operator, server.grpc_addr(), spec_toml).await?;
    let experts: Vec<String> = w1::node_spec(options, None)
        .experts
        .into_iter()
        .map(|e| e.name)
        .collect();
    let node = server.node().clone();
    expert_node
        .wait_until(
            "W1's router here and its experts on the expert node",
            || {
                let remote = experts.iter().all(|expert| {
                    ractor::pg::get_scoped_members(&EXPERT_SCOPE.to_string(), expert)
                        .iter()
                        .any(|cell| !cell.get_id().is_local())
                });
                (remote && node.directory.router(w1::ROUTER).is_some()).then_some(())
            },
        )
        .await?;

    let windows = w1::synthetic_windows(options, 4, options.seed);
    let load = w1::closed_loop(&node, w1::ROUTER, windows, options).await;
    expert_node.check_alive()?;
    let remote_rtt_us = remote_rtt_us().await?;
    let tcp_rtt_us = tcp_rtt_us().await?;
    let (mean_batch_size, device) = expert_status(&operator, expert_addr).await;
    let connect_ms = connect_ms(&operator, expert_addr).await?;
    let expert_node_max_rss_mib = w1::peak_rss_mib_of(&expert_node.child.id().to_string());
    server.shutdown().await?;
    drop(expert_node);

    Ok(W1RemoteReport {
        workload: "w1",
        remote: true,
        tls,
        gate: GateKind::Static,
        windows_per_s: load.windows_per_s(),
        p50_ms: load.quantile_ms(0.50),
        p99_ms: load.quantile_ms(0.99),
        inflight: options.inflight,
        experts: options.experts,
        streams: options.streams,
        max_batch: options.max_batch,
        mean_batch_size,
        measured_seconds: load.measured_seconds,
        errors: load.errors,
        max_rss_mib: w1::peak_rss_mib(),
        expert_node_max_rss_mib,
        device,
        remote_rtt_us,
        tcp_rtt_us,
        rtt_ratio: remote_rtt_us / tcp_rtt_us,
        connect_ms,
    })
}

/// The run's identities: an ephemeral mesh CA in the run's folder with `tls`, none
/// (`insecure = true` nodes, a plaintext operator) without.
struct RunPki {
    folder: PathBuf,
    ca: Option<MeshCa>,
}

impl RunPki {
    fn new(folder: &Path, tls: bool) -> Result<RunPki, W1RemoteError> {
        let ca = tls
            .then(|| MeshCa::init(&folder.join("ca"), "w1-bench"))
            .transpose()
            .map_err(|source| W1RemoteError::Pki { source })?;
        Ok(RunPki {
            folder: folder.join("certs"),
            ca,
        })
    }

    fn issue(&self, name: &str, role: Role) -> Result<Option<TlsFiles>, W1RemoteError> {
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let request = IssueRequest {
            name: name.to_string(),
            role,
            sensors: Vec::new(),
            days: 1,
        };
        ca.issue(&request, &self.folder)
            .map(Some)
            .map_err(|source| W1RemoteError::Pki { source })
    }

    /// A node's `[tls]` table.
    fn node(&self, name: &str, role: Role) -> Result<TlsTable, W1RemoteError> {
        Ok(match self.issue(name, role)? {
            Some(files) => TlsTable {
                ca: Some(files.ca),
                cert: Some(files.cert),
                key: Some(files.key),
                insecure: false,
            },
            None => TlsTable {
                ca: None,
                cert: None,
                key: None,
                insecure: true,
            },
        })
    }

    /// How the run calls its nodes' `Control` service.
    fn operator(&self) -> Result<Dialer, W1RemoteError> {
        let tls = match self.issue("w1-operator", Role::Operator)? {
            Some(files) => {
                Some(MeshTls::load(&files).map_err(|source| W1RemoteError::Pki { source })?)
            }
            None => None,
        };
        Ok(Dialer::new(tls, None))
    }
}

/// Connections to the expert node opened and answered for [`connect_ms`].
const CONNECT_ROUNDS: usize = 20;

/// Median time to open a fresh connection to the node at `addr` and get its status.
async fn connect_ms(operator: &Dialer, addr: SocketAddr) -> Result<f64, W1RemoteError> {
    let mut times = Vec::with_capacity(CONNECT_ROUNDS);
    for _ in 0..CONNECT_ROUNDS {
        let started = Instant::now();
        let connected = operator
            .channel(&addr.to_string())
            .await
            .map_err(|source| W1RemoteError::Connect { source })?;
        ControlClient::new(connected.channel)
            .get_status(StatusRequest {})
            .await
            .map_err(|status| W1RemoteError::Apply(status.message().to_string()))?;
        times.push(started.elapsed());
    }
    Ok(median_us(times) / 1e3)
}

/// Two loopback addresses whose ports are free for TCP and UDP alike (a node gossips on
/// its gRPC port number). Every socket is held until both are picked, so the two
/// differ; a third process may still take one before the nodes bind it.
fn free_ports() -> Result<[SocketAddr; 2], W1RemoteError> {
    let io = io_error("finding free loopback ports");
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < 2 {
        let tcp = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io)?;
        let addr = tcp.local_addr().map_err(io)?;
        if let Ok(udp) = UdpSocket::bind(addr) {
            ports.push(addr);
            held.push((tcp, udp));
        }
    }
    Ok([ports[0], ports[1]])
}

#[derive(Serialize)]
struct NodeToml<'a> {
    node: NodeTable<'a>,
    cluster: ClusterTable<'a>,
    tls: TlsTable,
}

#[derive(Serialize)]
struct TlsTable {
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
    insecure: bool,
}

#[derive(Serialize)]
struct NodeTable<'a> {
    name: &'a str,
    role: &'a str,
    listen: String,
}

#[derive(Serialize)]
struct ClusterTable<'a> {
    secret: &'a str,
    seeds: Vec<String>,
    data: &'a Path,
}

/// A `node.toml` with no actors of its own: what it runs comes from the mesh spec.
fn node_toml(
    name: &str,
    role: &str,
    listen: SocketAddr,
    secret: &str,
    seeds: &[SocketAddr],
    data: &Path,
    tls: TlsTable,
) -> Result<String, W1RemoteError> {
    let config = NodeToml {
        node: NodeTable {
            name,
            role,
            listen: listen.to_string(),
        },
        cluster: ClusterTable {
            secret,
            seeds: seeds.iter().map(SocketAddr::to_string).collect(),
            data,
        },
        tls,
    };
    toml::to_string(&config).map_err(|source| W1RemoteError::Toml {
        what: "node config",
        source,
    })
}

#[derive(Serialize)]
struct MeshToml {
    experts: Vec<ExpertToml>,
    routers: Vec<RouterToml>,
    sensors: Vec<SensorToml>,
}

#[derive(Serialize)]
struct ExpertToml {
    name: String,
    model_version: String,
    channels: i64,
    window: i64,
    hidden: i64,
    bottleneck: i64,
    kernel: i64,
    seed: i64,
    threshold: Option<f32>,
    max_batch: usize,
    max_wait_us: u64,
    intra_op_threads: usize,
    replicas: usize,
    placement: PlacementToml,
}

#[derive(Serialize)]
struct PlacementToml {
    roles: Vec<&'static str>,
}

#[derive(Serialize)]
struct RouterToml {
    name: String,
    policy: &'static str,
    routes: BTreeMap<String, Vec<String>>,
}

#[derive(Serialize)]
struct SensorToml {
    node: &'static str,
    id: String,
    channels: usize,
    window: usize,
    stride: usize,
    router: &'static str,
}

/// W1's node, as a mesh spec: its experts (one replica each, on a cloud node), its
/// static router, and one sensor per stream pinned here, since a router runs only
/// where a sensor routed through it is read.
fn mesh_spec_toml(options: &W1Options) -> Result<String, W1RemoteError> {
    let learned_gate = || W1Error::Option {
        field: "gate",
        value: "learned".into(),
        reason: "the remote run has the static gate only",
    };
    if options.gate == GateKind::Learned {
        return Err(learned_gate().into());
    }
    let spec = w1::node_spec(options, None);
    let experts = spec
        .experts
        .into_iter()
        .map(|e| ExpertToml {
            name: e.name,
            model_version: e.model_version,
            channels: e.config.channels,
            window: e.config.window,
            hidden: e.config.hidden,
            bottleneck: e.config.bottleneck,
            kernel: e.config.kernel,
            seed: match e.source {
                ModelSource::Autoencoder { seed, .. } => seed,
                ModelSource::TorchScript(_) | ModelSource::Stored(_) => {
                    unreachable!("W1's experts are seeded autoencoders (w1::node_spec)")
                }
            },
            threshold: e.threshold,
            max_batch: e.batching.max_batch,
            max_wait_us: e.batching.max_wait_us,
            intra_op_threads: e.intra_op_threads,
            replicas: 1,
            placement: PlacementToml {
                roles: vec!["cloud"],
            },
        })
        .collect();
    let routers = spec
        .routers
        .into_iter()
        .map(|r| match r.policy {
            RoutingPolicy::Static { routes } => Ok(RouterToml {
                name: r.name,
                policy: "static",
                routes: routes.into_iter().collect(),
            }),
            RoutingPolicy::LearnedGate { .. } => Err(learned_gate()),
        })
        .collect::<Result<_, _>>()?;
    let sensors = (0..options.streams)
        .map(|s| SensorToml {
            node: BENCH_NODE,
            id: w1::sensor_id(s),
            channels: options.channels,
            window: options.length,
            stride: options.length,
            router: w1::ROUTER,
        })
        .collect();
    let mesh = MeshToml {
        experts,
        routers,
        sensors,
    };
    toml::to_string(&mesh).map_err(|source| W1RemoteError::Toml {
        what: "mesh spec",
        source,
    })
}

/// The expert node's process, killed when dropped.
struct ExpertNode {
    child: Child,
    log: PathBuf,
}

impl ExpertNode {
    fn start(
        folder: &Path,
        listen: SocketAddr,
        secret: &str,
        tls: TlsTable,
    ) -> Result<ExpertNode, W1RemoteError> {
        let config = folder.join("expert-node.toml");
        let text = node_toml(
            EXPERT_NODE,
            "cloud",
            listen,
            secret,
            &[],
            &folder.join("expert-data"),
            tls,
        )?;
        std::fs::write(&config, text).map_err(io_error("writing the expert node's config"))?;
        let log = folder.join("expert-node.log");
        let stderr =
            std::fs::File::create(&log).map_err(io_error("creating the expert node's log file"))?;
        let exe = std::env::current_exe().map_err(io_error("finding this executable"))?;
        let child = Command::new(exe)
            .arg("node")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(io_error("starting the expert node"))?;
        Ok(ExpertNode { child, log })
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    fn check_alive(&mut self) -> Result<(), W1RemoteError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(W1RemoteError::ExpertNodeExited {
                status,
                log: self.log_tail(),
            }),
            Err(source) => Err(io_error("asking whether the expert node runs")(source)),
        }
    }

    /// Polls `check` until it yields, the expert node exits, or [`READY_TIMEOUT`].
    async fn wait_until<T>(
        &mut self,
        what: &'static str,
        mut check: impl FnMut() -> Option<T>,
    ) -> Result<T, W1RemoteError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(value) = check() {
                return Ok(value);
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                return Err(W1RemoteError::Timeout {
                    what,
                    after: READY_TIMEOUT,
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for ExpertNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Applies the spec through the bench node, retrying while placement cannot see the
/// expert node yet (the link is up a moment before the node's view of it is).
async fn apply(
    operator: &Dialer,
    addr: SocketAddr,
    spec_toml: String,
) -> Result<(), W1RemoteError> {
    let connected = operator
        .channel(&addr.to_string())
        .await
        .map_err(|source| W1RemoteError::Connect { source })?;
    let mut control = ControlClient::new(connected.channel);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let request = ApplyRequest {
            spec_toml: spec_toml.clone(),
            dry_run: false,
        };
        match control.apply(request).await {
            Ok(_) => return Ok(()),
            Err(status)
                if status.code() == tonic::Code::FailedPrecondition
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            Err(status) => return Err(W1RemoteError::Apply(status.message().to_string())),
        }
    }
}

/// Mean batch size over the expert node's experts and the device they run on. The run
/// is measured by now; a node that does not answer costs these two fields, not the
/// report.
async fn expert_status(operator: &Dialer, addr: SocketAddr) -> (Option<f64>, String) {
    let local_device = format!("{:?}", fogmesh_models::default_device());
    let status = match operator.channel(&addr.to_string()).await {
        Ok(connected) => ControlClient::new(connected.channel)
            .get_status(StatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| status.message().to_string()),
        Err(error) => Err(error.to_string()),
    };
    match status {
        Ok(status) => {
            let (scored, batches) = status
                .experts
                .iter()
                .fold((0, 0), |(w, b), e| (w + e.windows_scored, b + e.batches));
            let mean = (batches > 0).then(|| scored as f64 / batches as f64);
            let device = status
                .experts
                .first()
                .map_or(local_device, |e| e.device.clone());
            (mean, device)
        }
        Err(error) => {
            tracing::warn!(%error, "the expert node did not report its experts");
            (None, local_device)
        }
    }
}

/// Median of round trips, in microseconds.
fn median_us(mut rtts: Vec<Duration>) -> f64 {
    rtts.sort_unstable();
    rtts[rtts.len() / 2].as_secs_f64() * 1e6
}

/// Echoes [`RTT_PAYLOAD`] bytes off the expert node's probe actor, one at a time.
async fn remote_rtt_us() -> Result<f64, W1RemoteError> {
    let probe = probe_of(EXPERT_NODE).ok_or_else(|| W1RemoteError::Probe {
        round: 0,
        reason: "the link to the expert node is down".into(),
    })?;
    let mut rtts = Vec::with_capacity(RTT_ROUNDS);
    for round in 0..RTT_WARMUP + RTT_ROUNDS {
        let payload = vec![0u8; RTT_PAYLOAD];
        let sent = Instant::now();
        let answer = probe
            .call(
                move |reply| NodeProbeMsg::Echo(payload, reply),
                Some(RTT_TIMEOUT),
            )
            .await;
        let elapsed = sent.elapsed();
        let reason = match answer {
            Ok(CallResult::Success(echo)) if echo.len() == RTT_PAYLOAD => None,
            Ok(CallResult::Success(echo)) => {
                Some(format!("{} bytes came back for {RTT_PAYLOAD}", echo.len()))
            }
            Ok(CallResult::Timeout) => Some(format!("no answer within {RTT_TIMEOUT:?}")),
            Ok(CallResult::SenderError) => Some("the probe went away".into()),
            Err(error) => Some(error.to_string()),
        };
        if let Some(reason) = reason {
            return Err(W1RemoteError::Probe { round, reason });
        }
        if round >= RTT_WARMUP {
            rtts.push(elapsed);
        }
    }
    Ok(median_us(rtts))
}

/// The bare floor: a request/response round trip of the same payload over loopback
/// TCP between two threads blocked in the kernel, as netperf's TCP_RR measures it.
/// Blocking threads on both ends, like the two node processes of the remote path;
/// two async tasks that happen to share one runtime thread would measure a task
/// switch instead, and which one a run gets is chance.
async fn tcp_rtt_us() -> Result<f64, W1RemoteError> {
    tokio::task::spawn_blocking(blocking_tcp_rtt_us)
        .await
        .map_err(|e| io_error("the loopback TCP echo")(std::io::Error::other(e)))?
}

fn blocking_tcp_rtt_us() -> Result<f64, W1RemoteError> {
    use std::io::{Read, Write};
    let io = io_error("the loopback TCP echo");
    let listener = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut buffer = [0u8; RTT_PAYLOAD];
        loop {
            match stream.read_exact(&mut buffer) {
                Ok(()) => stream.write_all(&buffer)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut stream = std::net::TcpStream::connect(addr).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let payload = [0u8; RTT_PAYLOAD];
    let mut back = [0u8; RTT_PAYLOAD];
    let mut rtts = Vec::with_capacity(RTT_ROUNDS);
    for round in 0..RTT_WARMUP + RTT_ROUNDS {
        let sent = Instant::now();
        stream.write_all(&payload).map_err(io)?;
        stream.read_exact(&mut back).map_err(io)?;
        if round >= RTT_WARMUP {
            rtts.push(sent.elapsed());
        }
    }
    drop(stream);
    echo.join()
        .map_err(|_| io(std::io::Error::other("the echo thread panicked")))?
        .map_err(io)?;
    Ok(median_us(rtts))
}
