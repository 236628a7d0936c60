//! The serde structs of `node.toml`, exactly as the file is written: one struct per
//! table, one field per key, with the defaults the format documents.
//!
//! Nothing here checks a value or reads a file; [`super::resolve`] does, so the format
//! can be read off these types alone. Every table denies unknown fields, so a typo is
//! an error instead of a silently ignored setting.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use fogmesh_actors::{BatchingSpec, FederationSpec, LearningSpec, SensorStreamSpec, WhenFull};
use fogmesh_models::AutoencoderConfig;
use fogmesh_trust::Secret;
use serde::Deserialize;

/// A whole `node.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub experts: Vec<ExpertConfig>,
    #[serde(default)]
    pub routers: Vec<RouterConfig>,
    #[serde(default)]
    pub sensors: Vec<SensorStreamSpec>,
    #[serde(default)]
    pub mqtt: Vec<MqttConfig>,
    #[serde(default)]
    pub replay: Vec<ReplayConfig>,
    /// Joins a mesh when present; a node without it runs alone.
    #[serde(default)]
    pub cluster: Option<ClusterSection>,
    /// The node's certificate and the mesh CA; required unless `insecure = true`.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// The file this config came from: errors name it, relative paths resolve against
    /// its folder. Not part of the TOML.
    #[serde(skip)]
    pub file: PathBuf,
}

/// `[node]`: the node's identity and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub name: String,
    pub role: Role,
    /// Where the node sits in the plant's network, from the top down
    /// (`site-1/area-2/cell-3`); placement rules may name zones.
    #[serde(default)]
    pub zone: Option<String>,
    /// The other zones this node joins as their gateway (the conduits it carries):
    /// nodes link only within a zone, so traffic between zones goes through nodes
    /// that are in both. At most [`crate::zone::MAX_CONDUITS`].
    #[serde(default)]
    pub conduits: Vec<String>,
    /// The node's zones are closed network segments, as on a plant network built to
    /// IEC 62443: it links only to nodes that share one of its zones (its own and its
    /// conduits'), and reaches the rest through gateways. Needs `zone`.
    #[serde(default)]
    pub segmented: bool,
    /// gRPC address; port 0 picks a free port (see `RunningNodeServer::grpc_addr`).
    pub listen: SocketAddr,
    /// Prometheus HTTP endpoint (`GET /metrics`); none when absent. It is plaintext
    /// with no identities, so only a loopback address is taken unless
    /// `metrics_public = true`; elsewhere read metrics through `Telemetry.Metrics`.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Let `metrics_listen` bind an address other hosts reach (a Prometheus server
    /// elsewhere scrapes it; anyone on that network can read every metric).
    #[serde(default)]
    pub metrics_public: bool,
    /// The node's model store (see `fogmesh models`); experts with `model` load from it.
    #[serde(default)]
    pub models: Option<PathBuf>,
    /// The MiniLM encoder folder (`just setup` exports it to `data/minilm`), for
    /// stored language and multimodal models.
    #[serde(default)]
    pub minilm: Option<PathBuf>,
    /// The folder of the node's durable edge log: a batch is acknowledged only once it
    /// is on disk, and a node restarted after a crash resumes every stream where its
    /// last acknowledgement left it. Without it an acknowledgement means "accepted into
    /// memory".
    #[serde(default)]
    pub edge_log: Option<PathBuf>,
    /// `[node.outbox]`: how much each sensor's outbox (in the edge log) may hold while
    /// its experts are out of reach, and what happens when it is full.
    #[serde(default)]
    pub outbox: OutboxSection,
    /// `[node.alerts]`: what the node keeps for `WatchAlerts` subscribers and MQTT.
    #[serde(default)]
    pub alerts: AlertsSection,
}

/// `[node.outbox]`. See README, "What an acknowledgement means".
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSection {
    /// Bytes of parked windows one sensor may hold (64 MiB by default).
    #[serde(default = "default_outbox_bytes")]
    pub max_bytes_per_sensor: u64,
    /// Windows parked longer are dropped unscored, counted (a day by default).
    #[serde(default = "default_outbox_age_s")]
    pub max_age_s: u64,
    /// `"refuse"` (back-pressure: new samples refused with RESOURCE_EXHAUSTED until
    /// the outbox drains) or `"drop_oldest"` (accepted; the oldest windows dropped).
    #[serde(default)]
    pub when_full: WhenFull,
}

fn default_outbox_bytes() -> u64 {
    fogmesh_actors::OutboxLimits::default().max_bytes_per_sensor
}

fn default_outbox_age_s() -> u64 {
    fogmesh_actors::OutboxLimits::default().max_age.as_secs()
}

impl Default for OutboxSection {
    fn default() -> Self {
        OutboxSection {
            max_bytes_per_sensor: default_outbox_bytes(),
            max_age_s: default_outbox_age_s(),
            when_full: WhenFull::default(),
        }
    }
}

/// `[node.alerts]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsSection {
    /// Journal entries kept for subscribers that were away (in the edge log, or in
    /// memory without one).
    #[serde(default = "default_alert_retention")]
    pub retention: u64,
    /// Journal every verdict, not only alerts, so `WatchAlerts` with `include_normal`
    /// resumes from a cursor too.
    #[serde(default)]
    pub journal_verdicts: bool,
}

fn default_alert_retention() -> u64 {
    fogmesh_edge_log::DEFAULT_JOURNAL_RETENTION
}

impl Default for AlertsSection {
    fn default() -> Self {
        AlertsSection {
            retention: default_alert_retention(),
            journal_verdicts: false,
        }
    }
}

/// `[cluster]`: how a node joins a mesh.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Shared by every node of one mesh; a node with another is refused. Never
    /// printed (see [`Secret`]).
    pub secret: Secret,
    /// gRPC addresses of nodes already in the mesh; only needed to join.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// The gRPC address other nodes dial; defaults to the bound `node.listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// The UDP address other nodes gossip to (`ip:port`); defaults to the bound
    /// `node.listen`. Set where gossip reaches the node through a relay or a NAT,
    /// as `advertise` does for gRPC.
    #[serde(default)]
    pub advertise_gossip: Option<SocketAddr>,
    /// The local IP address this node's outgoing connections leave from; by default
    /// the operating system picks one. For a host with one address per network
    /// (a gateway between zones), and for `fogmesh sim`, whose simulated links tell
    /// nodes apart by the address they connect from.
    #[serde(default)]
    pub dial_from: Option<IpAddr>,
    /// Where the node keeps the mesh's deployment spec across restarts.
    pub data: PathBuf,
    /// How often the node gossips with a few others, in milliseconds (50 to 10,000).
    /// Every node's gossip work grows with the number of members, so a large mesh
    /// on small machines gossips less often; the failure detector follows it, so a
    /// silent node is declared dead later (its cluster links still notice in a few
    /// seconds).
    #[serde(default = "default_gossip_interval_ms")]
    pub gossip_interval_ms: u64,
}

fn default_gossip_interval_ms() -> u64 {
    200
}

/// `[tls]`: the node's identity on the network. Either `ca`, `cert` and `key`
/// (`fogmesh ca issue NAME --role ROLE`), or `insecure = true` for plaintext.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The mesh CA certificate (`ca.pem`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// This node's certificate; its name must be `[node] name`, its role `[node] role`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// This node's private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Serve and dial in plaintext, with no identities and no roles: for a lab only.
    #[serde(default)]
    pub insecure: bool,
    /// The roles whose signatures make a model version servable here (default:
    /// operator, edge, fog, cloud; `["operator"]` for a mesh where only people sign).
    #[serde(default)]
    pub model_signers: Option<Vec<String>>,
}

/// Where in the plant's hierarchy a node sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A gateway beside the machines.
    Edge,
    /// An on-site server aggregating edge nodes.
    Fog,
    /// A data-centre node, usually with GPUs.
    Cloud,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Fog => "fog",
            Role::Cloud => "cloud",
        }
    }
}

/// `[limits]`: the most one request may ask of the node, so a single producer cannot
/// exhaust its memory. Requests over a limit are refused whole with
/// `RESOURCE_EXHAUSTED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest gRPC message or MQTT payload, in bytes.
    pub max_message_bytes: usize,
    /// Most samples in one batch.
    pub max_batch_samples: usize,
    /// Most values (channels) in one sample.
    pub max_values_per_sample: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 4 << 20,
            max_batch_samples: 10_000,
            max_values_per_sample: 4096,
        }
    }
}

/// `[[experts]]`: one expert: an autoencoder built from the sizes here (they default to
/// the W1 model), a stored model version (`model`), or a TorchScript file. Batching
/// defaults to the actors' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertConfig {
    pub name: String,
    /// Shown in every verdict; defaults to the stored model's `name@version`.
    #[serde(default)]
    pub model_version: String,
    /// A model version in the node's store (`[node] models`), as `name@version`: any
    /// kind the zoo trains. Its manifest gives the network and the window shape, so
    /// the autoencoder sizes, `weights` and `seed` do not apply; `sha256` pins the
    /// weights' hash.
    #[serde(default)]
    pub model: Option<String>,
    /// Autoencoder and TorchScript experts: channels and samples per window.
    #[serde(default)]
    pub channels: i64,
    #[serde(default)]
    pub window: i64,
    #[serde(default = "default_hidden")]
    pub hidden: i64,
    #[serde(default = "default_bottleneck")]
    pub bottleneck: i64,
    #[serde(default = "default_kernel")]
    pub kernel: i64,
    /// safetensors file of trained weights; without it the expert starts from `seed`.
    #[serde(default)]
    pub weights: Option<PathBuf>,
    /// Expected sha256 of `weights` (hex); the expert refuses other bytes.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Alarm limit on the model's score; an expert without one cannot score windows.
    #[serde(default)]
    pub threshold: Option<f32>,
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Longest wait for a fuller batch, in microseconds. Once loaded, it holds the wait
    /// however the file gave it (see `max_wait`).
    #[serde(default = "default_max_wait_us")]
    pub max_wait_us: u64,
    /// `max_wait_us` in words, `"2ms"` or `"1500us"` (humantime's units); a file sets
    /// one or the other.
    #[serde(default)]
    pub max_wait: Option<String>,
    #[serde(default = "default_intra_op_threads")]
    pub intra_op_threads: usize,
    #[serde(default)]
    pub seed: i64,
    /// Serve this TorchScript file instead of the autoencoder: it must take one input
    /// `[batch, channels, window]` and return one score per window, `[batch]`; `sha256`
    /// then pins this file. `hidden`, `bottleneck`, `kernel`, `weights` and `seed` do
    /// not apply.
    #[serde(default)]
    pub torchscript: Option<PathBuf>,
    /// `[experts.learning]`: a continual learner that fine-tunes this expert's stored
    /// model when the plant drifts and promotes versions its gate accepts (stored
    /// models only, `model = "name@version"`). Absent: the version never changes.
    #[serde(default)]
    pub learning: Option<LearningSpec>,
    /// `[experts.federation]` (mesh specs only): the expert's stored model is trained
    /// by federated rounds across the mesh's nodes, each on its own windows.
    #[serde(default)]
    pub federation: Option<FederationSpec>,
}

fn default_hidden() -> i64 {
    AutoencoderConfig::w1(1, 1).hidden
}

fn default_bottleneck() -> i64 {
    AutoencoderConfig::w1(1, 1).bottleneck
}

fn default_kernel() -> i64 {
    AutoencoderConfig::w1(1, 1).kernel
}

fn default_max_batch() -> usize {
    BatchingSpec::default().max_batch
}

fn default_max_wait_us() -> u64 {
    BatchingSpec::default().max_wait_us
}

fn default_intra_op_threads() -> usize {
    1
}

/// `[[routers]]`: a router and its policy, tagged by `policy`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum RouterConfig {
    /// `routes`: sensor stream id → experts consulted with equal weight.
    Static {
        name: String,
        routes: HashMap<String, Vec<String>>,
        /// Experts a window is scored without when none of their replicas answers.
        #[serde(default)]
        optional: Vec<String>,
    },
    /// `gate`: a JSON file holding a trained `SoftmaxGate`; its output `i` is
    /// `experts[i]`.
    LearnedGate {
        name: String,
        experts: Vec<String>,
        top_k: usize,
        gate: PathBuf,
        #[serde(default)]
        optional: Vec<String>,
    },
}

impl RouterConfig {
    pub fn name(&self) -> &str {
        match self {
            RouterConfig::Static { name, .. } | RouterConfig::LearnedGate { name, .. } => name,
        }
    }

    pub fn optional(&self) -> &[String] {
        match self {
            RouterConfig::Static { optional, .. } | RouterConfig::LearnedGate { optional, .. } => {
                optional
            }
        }
    }
}

/// `[[mqtt]]`: a broker whose `<topic_prefix>/ingest/<sensor id>` topics feed the
/// node's sensor streams.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    /// Defaults to 8883 (MQTT over TLS), or 1883 with `insecure = true`.
    #[serde(default)]
    pub port: Option<u16>,
    /// Defaults to `fogmesh/<node name>`.
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// Defaults to `fogmesh-<node name>-<index of this broker>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Plaintext to this broker, with no TLS and no password: only where said.
    #[serde(default)]
    pub insecure: bool,
    /// PEM file of the CA that issued the broker's certificate; defaults to the mesh CA
    /// of `[tls]`. The broker's certificate must name `host`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    /// A file whose first line is the broker password (kept out of this file, which
    /// operators share and check in).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Publish the node's alerts to `<topic_prefix>/alerts/<sensor id>` (QoS 1,
    /// retained: the last alert per sensor), from the alert journal's durable cursor.
    #[serde(default = "publish_alerts_by_default")]
    pub alerts: bool,
}

fn publish_alerts_by_default() -> bool {
    true
}

impl MqttConfig {
    /// The broker's port: `port`, or the MQTT default for the transport.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.insecure { 1883 } else { 8883 })
    }

    pub fn topic_prefix(&self, node_name: &str) -> String {
        self.topic_prefix
            .clone()
            .unwrap_or_else(|| format!("fogmesh/{node_name}"))
    }

    pub fn client_id(&self, node_name: &str, index: usize) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("fogmesh-{node_name}-{index}"))
    }
}

/// `[[replay]]`: a fogrec recording fed into sensor streams when the node starts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    pub file: PathBuf,
    /// Recording time divided by this is replay time; absent: as fast as acknowledged.
    #[serde(default)]
    pub speedup: Option<f64>,
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    pub streams: Vec<ReplayStreamConfig>,
}

fn default_batch_rows() -> usize {
    64
}

/// One stream of a replay: the recording's columns, by header name, in the stream's
/// channel order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayStreamConfig {
    pub sensor: String,
    pub columns: Vec<String>,
}
