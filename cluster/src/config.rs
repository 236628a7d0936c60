//! `node.toml`: what one fog node runs and where it listens, and its translation into
//! the actors' [`NodeSpec`].
//!
//! The file mirrors the actors' spec types (sensor streams are the actors'
//! [`SensorStreamSpec`] verbatim) plus what only a networked node has: listen
//! addresses, request limits, MQTT brokers and file replays. Every table denies unknown
//! fields, so a typo is an error instead of a silently ignored setting.
//!
//! Checking happens in two steps, each naming the file, the field path
//! (`experts[1].max_batch`) and the value in its error:
//! 1. [`NodeConfig::load`] parses the TOML (syntax errors keep toml's line and column)
//!    and checks what the file alone decides: limits, MQTT topics, replay settings and
//!    the streams they feed.
//! 2. [`NodeConfig::to_node_spec`] reads the files the config points at (weights,
//!    gates) and runs the actors' own validation ([`NodeSpec::validate`]): references
//!    between experts, routers and streams, window shapes, model sizes.
//!    [`NodeConfig::replay_jobs`] reads the recordings and resolves column names.
//!
//! Relative paths inside the file resolve against the file's folder, so a config and
//! its weights can move together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fogmesh_actors::replay::{ReplayPlan, ReplayStream};
use fogmesh_actors::{
    BatchingSpec, ExpertSpec, LearningSpec, NodeSpec, RestartPolicy, RouterSpec, RoutingPolicy,
    SensorStreamSpec, SpecError, StoredModel,
};
use fogmesh_models::store::ModelStore;
use fogmesh_models::{AutoencoderConfig, ModelError, Recording, SoftmaxGate};
use serde::Deserialize;
use sha2::{Digest, Sha256};

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
    /// gRPC address; port 0 picks a free port (see `RunningNodeServer::grpc_addr`).
    pub listen: SocketAddr,
    /// Prometheus HTTP endpoint (`GET /metrics`); none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The node's model store (see `fogmesh models`); experts with `model` load from it.
    #[serde(default)]
    pub models: Option<PathBuf>,
    /// The MiniLM encoder folder (`just setup` exports it to `data/minilm`), for
    /// stored language and multimodal models.
    #[serde(default)]
    pub minilm: Option<PathBuf>,
}

/// `[cluster]`: how a node joins a mesh.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Shared by every node of one mesh; a node with another is refused.
    pub secret: String,
    /// gRPC addresses of nodes already in the mesh; only needed to join.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// The gRPC address other nodes dial; defaults to the bound `node.listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Where the node keeps the mesh's deployment spec across restarts.
    pub data: PathBuf,
}

/// Shortest accepted cluster secret.
pub const MIN_SECRET_LEN: usize = 12;

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

/// Largest accepted `max_message_bytes`: gRPC frames carry a 32-bit length, and the
/// transports keep a decoding backstop of twice the limit, which must fit as well.
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 1 << 30;

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
    #[serde(default = "default_max_wait_us")]
    pub max_wait_us: u64,
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
    },
    /// `gate`: a JSON file holding a trained `SoftmaxGate`; its output `i` is
    /// `experts[i]`.
    LearnedGate {
        name: String,
        experts: Vec<String>,
        top_k: usize,
        gate: PathBuf,
    },
}

impl RouterConfig {
    pub fn name(&self) -> &str {
        match self {
            RouterConfig::Static { name, .. } | RouterConfig::LearnedGate { name, .. } => name,
        }
    }
}

/// `[[mqtt]]`: a broker whose `<topic_prefix>/ingest/<sensor id>` topics feed the
/// node's sensor streams.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Defaults to `fogmesh/<node name>`.
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// Defaults to `fogmesh-<node name>-<index of this broker>`.
    #[serde(default)]
    pub client_id: Option<String>,
}

fn default_mqtt_port() -> u16 {
    1883
}

impl MqttConfig {
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

/// A replay ready to run: the recording in memory and the plan over it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayJob {
    pub file: PathBuf,
    pub recording: Arc<Recording>,
    pub plan: ReplayPlan,
}

/// A config that cannot be used. Every variant names the config file; `field` is the
/// path of the offending setting inside it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or TOML that does not fit the schema; toml's message carries the line,
    /// the column and the offending key or value.
    #[error("{}: {source}", file.display())]
    Syntax {
        file: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{}: field `{field}` = {value}: {reason}", file.display())]
    Invalid {
        file: PathBuf,
        field: String,
        value: String,
        reason: String,
    },
    /// The actors refused the node this config describes.
    #[error("{}: field `{field}`: {source}", file.display())]
    Spec {
        file: PathBuf,
        field: String,
        #[source]
        source: Box<SpecError>,
    },
    #[error("{}: field `{field}` = \"{}\": cannot read the {what} file: {source}", file.display(), path.display())]
    UnreadableFile {
        file: PathBuf,
        field: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: field `{field}` = \"{expected}\": {} has sha256 {actual}", file.display(), path.display())]
    WeightsHash {
        file: PathBuf,
        field: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{}: field `{field}` = \"{}\": not a softmax gate in JSON: {source}", file.display(), path.display())]
    Gate {
        file: PathBuf,
        field: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: field `{field}`: {source}", file.display())]
    Recording {
        file: PathBuf,
        field: String,
        #[source]
        source: Box<ModelError>,
    },
    #[error("{}: field `{field}` = \"{column}\": recording {} has no such column", file.display(), recording.display())]
    UnknownColumn {
        file: PathBuf,
        field: String,
        recording: PathBuf,
        column: String,
    },
}

impl NodeConfig {
    /// Reads and checks a config file (step 1 of the module doc).
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        NodeConfig::parse(&text, path)
    }

    /// Parses and checks config text as if read from `file`.
    pub fn parse(text: &str, file: &Path) -> Result<NodeConfig, ConfigError> {
        let mut config: NodeConfig =
            toml::from_str(text).map_err(|source| ConfigError::Syntax {
                file: file.to_path_buf(),
                source: Box::new(source),
            })?;
        config.file = file.to_path_buf();
        config.check()?;
        Ok(config)
    }

    fn invalid(
        &self,
        field: String,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// What the file alone decides; the rest is the actors' validation.
    fn check(&self) -> Result<(), ConfigError> {
        if self.node.name.is_empty() {
            return Err(self.invalid("node.name".into(), "\"\"", "must not be empty"));
        }
        let limits = &self.limits;
        if !(1..=MAX_MESSAGE_BYTES_LIMIT).contains(&limits.max_message_bytes) {
            return Err(self.invalid(
                "limits.max_message_bytes".into(),
                limits.max_message_bytes,
                format!("must be between 1 and {MAX_MESSAGE_BYTES_LIMIT}"),
            ));
        }
        for (field, value) in [
            ("limits.max_batch_samples", limits.max_batch_samples),
            ("limits.max_values_per_sample", limits.max_values_per_sample),
        ] {
            if value == 0 {
                return Err(self.invalid(field.into(), value, "must be at least 1"));
            }
        }
        for (i, expert) in self.experts.iter().enumerate() {
            if let Some(model) = &expert.model {
                if expert.torchscript.is_some() || expert.weights.is_some() {
                    return Err(self.invalid(
                        format!("experts[{i}].model"),
                        format!("{model:?}"),
                        "an expert serves a stored model, a TorchScript file or autoencoder `weights`: one of them",
                    ));
                }
                if self.model_store_root().is_none() {
                    return Err(self.invalid(
                        format!("experts[{i}].model"),
                        format!("{model:?}"),
                        "a stored model needs the node's model store: set `models` in [node]",
                    ));
                }
                if !matches!(fogmesh_models::store::parse_id(model), (name, Some(version)) if !name.is_empty() && !version.is_empty())
                {
                    return Err(self.invalid(
                        format!("experts[{i}].model"),
                        format!("{model:?}"),
                        "must be name@version",
                    ));
                }
            } else if expert.model_version.is_empty() {
                return Err(self.invalid(
                    format!("experts[{i}].model_version"),
                    "(absent)",
                    "an expert that is not a stored model needs a model_version",
                ));
            }
            if expert.torchscript.is_some() && expert.weights.is_some() {
                return Err(self.invalid(
                    format!("experts[{i}].torchscript"),
                    format!("{:?}", expert.torchscript),
                    "an expert serves either a TorchScript file or autoencoder `weights`, not both",
                ));
            }
            if let (Some(sha256), None, None) =
                (&expert.sha256, &expert.weights, &expert.torchscript)
            {
                return Err(self.invalid(
                    format!("experts[{i}].sha256"),
                    format!("{sha256:?}"),
                    "pins the hash of `weights`, which is not set",
                ));
            }
            if let Some(learning) = &expert.learning {
                if expert.model.is_none() {
                    return Err(self.invalid(
                        format!("experts[{i}].learning"),
                        "(a table)",
                        format!(
                            "expert `{}` does not serve a stored model: only experts with `model = \"name@version\"` can learn",
                            expert.name
                        ),
                    ));
                }
                learning.validate().map_err(|e| {
                    self.invalid(
                        format!("experts[{i}].learning.{}", e.field),
                        e.value,
                        format!("expert `{}`: {}", expert.name, e.reason),
                    )
                })?;
            }
        }
        if let Some(cluster) = &self.cluster {
            if cluster.secret.chars().count() < MIN_SECRET_LEN {
                return Err(self.invalid(
                    "cluster.secret".into(),
                    format!("<{} characters>", cluster.secret.chars().count()),
                    format!("must have at least {MIN_SECRET_LEN} characters"),
                ));
            }
            for (i, seed) in cluster.seeds.iter().enumerate() {
                if seed.parse::<SocketAddr>().is_err() {
                    return Err(self.invalid(
                        format!("cluster.seeds[{i}]"),
                        format!("{seed:?}"),
                        "must be a node's gRPC address, host:port",
                    ));
                }
            }
            if let Some(advertise) = &cluster.advertise {
                if advertise.parse::<SocketAddr>().is_err() {
                    return Err(self.invalid(
                        "cluster.advertise".into(),
                        format!("{advertise:?}"),
                        "must be host:port",
                    ));
                }
            } else if self.node.listen.ip().is_unspecified() {
                return Err(self.invalid(
                    "cluster.advertise".into(),
                    "(absent)",
                    format!(
                        "node.listen = {} listens everywhere; say which address other nodes dial",
                        self.node.listen
                    ),
                ));
            }
        }
        for (i, mqtt) in self.mqtt.iter().enumerate() {
            if mqtt.host.is_empty() {
                return Err(self.invalid(format!("mqtt[{i}].host"), "\"\"", "must not be empty"));
            }
            if mqtt.port == 0 {
                return Err(self.invalid(
                    format!("mqtt[{i}].port"),
                    0,
                    "must be a broker's port, not 0",
                ));
            }
            let prefix = mqtt.topic_prefix(&self.node.name);
            if prefix.is_empty() || prefix.ends_with('/') || prefix.contains(['+', '#']) {
                return Err(self.invalid(
                    format!("mqtt[{i}].topic_prefix"),
                    format!("{prefix:?}"),
                    "must be a non-empty topic without wildcards (+, #) or a trailing /",
                ));
            }
        }
        for (i, replay) in self.replay.iter().enumerate() {
            if let Some(speedup) = replay.speedup {
                if !(speedup.is_finite() && speedup > 0.0) {
                    return Err(self.invalid(
                        format!("replay[{i}].speedup"),
                        speedup,
                        "must be a positive number",
                    ));
                }
            }
            if replay.batch_rows == 0 {
                return Err(self.invalid(
                    format!("replay[{i}].batch_rows"),
                    0,
                    "must be at least 1",
                ));
            }
            if replay.streams.is_empty() {
                return Err(self.invalid(
                    format!("replay[{i}].streams"),
                    "[]",
                    "needs at least one stream",
                ));
            }
            for (j, stream) in replay.streams.iter().enumerate() {
                let field = format!("replay[{i}].streams[{j}]");
                let sensor = self
                    .sensors
                    .iter()
                    .find(|s| s.id == stream.sensor)
                    .ok_or_else(|| {
                        self.invalid(
                            format!("{field}.sensor"),
                            format!("{:?}", stream.sensor),
                            "no sensor stream of this node has this id",
                        )
                    })?;
                if stream.columns.len() != sensor.channels {
                    return Err(self.invalid(
                        format!("{field}.columns"),
                        format!("{} columns", stream.columns.len()),
                        format!(
                            "sensor stream `{}` has {} channels",
                            sensor.id, sensor.channels
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The node's model store (`[node] models`), when it has one.
    pub fn model_store(&self) -> Option<ModelStore> {
        self.node
            .models
            .as_deref()
            .map(|p| ModelStore::open(self.resolve(p)))
    }

    /// The experts that learn, by name, with their `[experts.learning]`.
    pub fn learners(&self) -> impl Iterator<Item = (&str, &LearningSpec)> {
        self.experts
            .iter()
            .filter_map(|e| Some((e.name.as_str(), e.learning.as_ref()?)))
    }

    /// The node's model store folder: `[node] models`, or for a node in a mesh
    /// `models` inside `[cluster] data` (versions rolled out across the mesh land there).
    pub fn model_store_root(&self) -> Option<PathBuf> {
        match (&self.node.models, &self.cluster) {
            (Some(models), _) => Some(self.resolve(models)),
            (None, Some(cluster)) => Some(self.resolve(&cluster.data).join("models")),
            (None, None) => None,
        }
    }

    /// Where this node keeps what stored models need, as absolute paths.
    pub fn model_places(&self) -> crate::mesh_spec::ModelPlaces {
        crate::mesh_spec::ModelPlaces {
            models: self.model_store_root(),
            minilm: self.node.minilm.as_deref().map(|p| self.resolve(p)),
        }
    }

    /// `path` as written in the config, resolved against the config file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        match self.file.parent() {
            Some(folder) if path.is_relative() => folder.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// The actors' description of this node (step 2 of the module doc): reads weights
    /// and gate files, then validates the whole spec.
    pub fn to_node_spec(&self) -> Result<NodeSpec, ConfigError> {
        let experts = self
            .experts
            .iter()
            .enumerate()
            .map(|(i, expert)| self.expert_spec(i, expert))
            .collect::<Result<Vec<_>, _>>()?;
        let routers = self
            .routers
            .iter()
            .enumerate()
            .map(|(i, router)| self.router_spec(i, router))
            .collect::<Result<Vec<_>, _>>()?;
        let spec = NodeSpec {
            node: self.node.name.clone(),
            sensors: self.sensors.clone(),
            routers,
            experts,
            remote_experts: Vec::new(),
            restart: RestartPolicy::default(),
        };
        spec.validate().map_err(|source| self.spec_error(source))?;
        Ok(spec)
    }

    /// Reads the file an expert's `key` names and checks it against the expert's
    /// `sha256`. The expert checks too, but its error cannot name this config file.
    fn read_pinned(
        &self,
        i: usize,
        expert: &ExpertConfig,
        key: &str,
        what: &'static str,
        path: &Path,
    ) -> Result<(PathBuf, Vec<u8>), ConfigError> {
        let path = self.resolve(path);
        let bytes = std::fs::read(&path).map_err(|source| ConfigError::UnreadableFile {
            file: self.file.clone(),
            field: format!("experts[{i}].{key}"),
            what,
            path: path.clone(),
            source,
        })?;
        if let Some(expected) = &expert.sha256 {
            let actual = sha256_hex(&bytes);
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(ConfigError::WeightsHash {
                    file: self.file.clone(),
                    field: format!("experts[{i}].sha256"),
                    path,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok((path, bytes))
    }

    /// Reads the stored model an expert names, checking the weights against the
    /// manifest (and against the expert's `sha256` when set).
    fn stored_model(
        &self,
        i: usize,
        expert: &ExpertConfig,
        id: &str,
    ) -> Result<StoredModel, ConfigError> {
        let field = format!("experts[{i}].model");
        let store = ModelStore::open(self.model_store_root().unwrap_or_default());
        let store_error = |e: fogmesh_models::store::StoreError| ConfigError::Invalid {
            file: self.file.clone(),
            field: field.clone(),
            value: format!("{id:?}"),
            reason: format!("model store {}: {e}", store.root().display()),
        };
        let manifest = store.get(id).map_err(store_error)?;
        if let Some(expected) = &expert.sha256 {
            if !manifest.weights_sha256.eq_ignore_ascii_case(expected) {
                return Err(ConfigError::Invalid {
                    file: self.file.clone(),
                    field: format!("experts[{i}].sha256"),
                    value: format!("{expected:?}"),
                    reason: format!("{id} has weights with sha256 {}", manifest.weights_sha256),
                });
            }
        }
        let weights = store.weights(&manifest).map_err(store_error)?;
        Ok(StoredModel {
            manifest,
            weights: weights.into(),
            assets: fogmesh_models::served::Assets {
                minilm: self.node.minilm.as_deref().map(|p| self.resolve(p)),
            },
        })
    }

    fn expert_spec(&self, i: usize, expert: &ExpertConfig) -> Result<ExpertSpec, ConfigError> {
        let stored = match &expert.model {
            Some(id) => Some(self.stored_model(i, expert, id)?),
            None => None,
        };
        let model_version = match (&stored, expert.model_version.is_empty()) {
            (Some(stored), true) => stored.manifest.id(),
            _ => expert.model_version.clone(),
        };
        let weights = match &expert.weights {
            Some(path) => {
                let (_, bytes) = self.read_pinned(i, expert, "weights", "weights", path)?;
                Some(Arc::<[u8]>::from(bytes))
            }
            None => None,
        };
        let torchscript = match &expert.torchscript {
            Some(path) => {
                let (path, _) = self.read_pinned(i, expert, "torchscript", "TorchScript", path)?;
                Some(path)
            }
            None => None,
        };
        Ok(ExpertSpec {
            name: expert.name.clone(),
            model_version,
            config: AutoencoderConfig {
                channels: expert.channels,
                window: expert.window,
                hidden: expert.hidden,
                bottleneck: expert.bottleneck,
                kernel: expert.kernel,
            },
            weights,
            weights_sha256: expert.sha256.clone(),
            seed: expert.seed,
            threshold: expert.threshold,
            batching: BatchingSpec {
                max_batch: expert.max_batch,
                max_wait_us: expert.max_wait_us,
            },
            intra_op_threads: expert.intra_op_threads,
            torchscript,
            stored,
        })
    }

    fn router_spec(&self, i: usize, router: &RouterConfig) -> Result<RouterSpec, ConfigError> {
        let policy = match router {
            RouterConfig::Static { routes, .. } => RoutingPolicy::Static {
                routes: routes.clone(),
            },
            RouterConfig::LearnedGate {
                experts,
                top_k,
                gate,
                ..
            } => {
                let field = format!("routers[{i}].gate");
                let path = self.resolve(gate);
                let text = std::fs::read_to_string(&path).map_err(|source| {
                    ConfigError::UnreadableFile {
                        file: self.file.clone(),
                        field: field.clone(),
                        what: "gate",
                        path: path.clone(),
                        source,
                    }
                })?;
                let gate: SoftmaxGate =
                    serde_json::from_str(&text).map_err(|source| ConfigError::Gate {
                        file: self.file.clone(),
                        field,
                        path,
                        source,
                    })?;
                RoutingPolicy::LearnedGate {
                    experts: experts.clone(),
                    top_k: *top_k,
                    gate,
                }
            }
        };
        Ok(RouterSpec {
            name: router.name().to_string(),
            policy,
        })
    }

    /// Attaches the file and the field path to an error from the actors' validation,
    /// which names parts by kind and name.
    fn spec_error(&self, source: SpecError) -> ConfigError {
        let field = self.spec_error_field(&source);
        ConfigError::Spec {
            file: self.file.clone(),
            field,
            source: Box::new(source),
        }
    }

    fn spec_error_field(&self, error: &SpecError) -> String {
        let expert = |name: &str| self.experts.iter().rposition(|e| e.name == name);
        let router = |name: &str| self.routers.iter().rposition(|r| r.name() == name);
        let sensor = |name: &str| self.sensors.iter().rposition(|s| s.id == name);
        let path = |what: &str, name: &str| -> Option<String> {
            match what {
                "expert" => expert(name).map(|i| format!("experts[{i}]")),
                "router" => router(name).map(|i| format!("routers[{i}]")),
                "sensor stream" => sensor(name).map(|i| format!("sensors[{i}]")),
                _ => None,
            }
        };
        let located = match error {
            SpecError::Invalid {
                what, name, field, ..
            } => path(what, name).map(|p| format!("{p}.{field}")),
            SpecError::Duplicate { what, name } => {
                let key = if *what == "sensor stream" {
                    "id"
                } else {
                    "name"
                };
                path(what, name).map(|p| format!("{p}.{key}"))
            }
            SpecError::UnknownReference { what, name, .. } => match (*what, path(what, name)) {
                ("sensor stream", Some(p)) => Some(format!("{p}.router")),
                ("router", Some(p)) => {
                    let key = match router(name).map(|i| &self.routers[i]) {
                        Some(RouterConfig::LearnedGate { .. }) => "experts",
                        _ => "routes",
                    };
                    Some(format!("{p}.{key}"))
                }
                (_, p) => p,
            },
            SpecError::Model { name, .. } => path("expert", name),
            SpecError::Spawn { name, .. } | SpecError::Timeout { name, .. } => path("expert", name)
                .or_else(|| path("router", name))
                .or_else(|| path("sensor stream", name)),
        };
        located.unwrap_or_else(|| "node".to_string())
    }

    /// Reads every `[[replay]]` recording and resolves its column names.
    pub fn replay_jobs(&self) -> Result<Vec<ReplayJob>, ConfigError> {
        self.replay
            .iter()
            .enumerate()
            .map(|(i, replay)| {
                let path = self.resolve(&replay.file);
                let recording =
                    Recording::read(&path).map_err(|source| ConfigError::Recording {
                        file: self.file.clone(),
                        field: format!("replay[{i}].file"),
                        source: Box::new(source),
                    })?;
                let streams = replay
                    .streams
                    .iter()
                    .enumerate()
                    .map(|(j, stream)| {
                        let columns = stream
                            .columns
                            .iter()
                            .enumerate()
                            .map(|(k, column)| {
                                recording.column_index(column).ok_or_else(|| {
                                    ConfigError::UnknownColumn {
                                        file: self.file.clone(),
                                        field: format!("replay[{i}].streams[{j}].columns[{k}]"),
                                        recording: path.clone(),
                                        column: column.clone(),
                                    }
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok(ReplayStream {
                            sensor_id: stream.sensor.clone(),
                            columns,
                        })
                    })
                    .collect::<Result<Vec<_>, ConfigError>>()?;
                Ok(ReplayJob {
                    file: path.clone(),
                    recording: Arc::new(recording),
                    plan: ReplayPlan {
                        streams,
                        batch_rows: replay.batch_rows,
                        speedup: replay.speedup,
                        sequence_offset: 0,
                        time_offset_us: 0,
                    },
                })
            })
            .collect()
    }
}

/// Lowercase hex, the form `fogmesh-models` reports hashes in.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "[node]\nname = \"edge-1\"\nrole = \"edge\"\nlisten = \"127.0.0.1:0\"\nmodels = \"models\"\n";

    fn parse(experts: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(&format!("{NODE}\n{experts}"), Path::new("node.toml"))
    }

    #[test]
    fn learning_takes_its_defaults_and_the_readme_example() {
        let config = parse(
            "[[experts]]\nname = \"pump-ae\"\nmodel = \"pump-ae@v1\"\n\n[experts.learning]\nmin_new_windows = 64\n\n[experts.learning.gate]\nmin_gain = 0.2\n",
        )
        .unwrap();
        let (name, learning) = config.learners().next().expect("one learner");
        assert_eq!(name, "pump-ae");
        assert_eq!(learning.min_new_windows, 64);
        assert_eq!(learning.gate.min_gain, 0.2);
        let defaults = LearningSpec::default();
        assert_eq!(learning.reservoir, defaults.reservoir);
        assert_eq!(learning.gate.max_forgetting, defaults.gate.max_forgetting);
        assert_eq!(learning.fine_tune.epochs, defaults.fine_tune.epochs);

        let readme = include_str!("../README.md");
        let example = readme
            .split("### Continual learning")
            .nth(1)
            .and_then(|section| section.split("```toml\n").nth(1))
            .and_then(|rest| rest.split("```").next())
            .expect("the README documents [experts.learning]");
        let documented = parse(example).expect("the README's learning example parses");
        let (_, documented) = documented.learners().next().expect("one learner");
        assert_eq!(
            documented,
            &LearningSpec::default(),
            "the README shows the defaults"
        );
    }

    #[test]
    fn learning_is_refused_naming_the_expert_the_field_the_value_and_the_limit() {
        let cases = [
            (
                "[[experts]]\nname = \"press-ae\"\nmodel_version = \"v1\"\n\n[experts.learning]\n",
                vec!["experts[0].learning", "press-ae", "model = \"name@version\""],
            ),
            (
                "[[experts]]\nname = \"pump-ae\"\nmodel = \"pump-ae@v1\"\n\n[experts.learning]\nholdout = 1.5\n",
                vec!["experts[0].learning.holdout", "1.5", "(0, 1)", "pump-ae"],
            ),
            (
                "[[experts]]\nname = \"pump-ae\"\nmodel = \"pump-ae@v1\"\n\n[experts.learning]\nmin_new_windows = 100\nmax_new_windows = 50\n",
                vec!["experts[0].learning.max_new_windows", "50", "min_new_windows (100)"],
            ),
            (
                "[[experts]]\nname = \"pump-ae\"\nmodel = \"pump-ae@v1\"\n\n[experts.learning.fine_tune]\nepochs = 0\n",
                vec!["experts[0].learning.fine_tune.epochs", "= 0", "at least 1"],
            ),
            (
                "[[experts]]\nname = \"pump-ae\"\nmodel = \"pump-ae@v1\"\n\n[experts.learning.gate]\nmin_gain = 1.0\n",
                vec!["experts[0].learning.gate.min_gain", "= 1", "[0, 1)"],
            ),
            (
                "[[experts]]\nname = \"pump-ae\"\nmodel = \"pump-ae@v1\"\n\n[experts.learning.drift]\nks_size = 5\n",
                vec!["experts[0].learning.drift.ks_size", "= 5", "at least 20"],
            ),
            (
                "[[experts]]\nname = \"pump-ae\"\nmodel = \"pump-ae@v1\"\n\n[experts.learning]\nevery_s = 0.5\n",
                vec!["experts[0].learning.every_s", "0.5", "at least 1 second"],
            ),
            (
                "[[experts]]\nname = \"pump-ae\"\nmodel = \"pump-ae@v1\"\n\n[experts.learning]\nreservior = 10\n",
                vec!["unknown field `reservior`"],
            ),
        ];
        for (text, needles) in cases {
            let error = parse(text).expect_err(text).to_string();
            assert!(error.starts_with("node.toml"), "{error}");
            for needle in needles {
                assert!(error.contains(needle), "{text}: lacks {needle:?}: {error}");
            }
        }
    }
}
