//! Turning a parsed `node.toml` into what the node runs: the checks of the file alone
//! (step 1 of the [`super`] doc), the actors' [`NodeSpec`] with the weights and gates
//! it points at (step 2), the replays and the model store's places.
//!
//! Every error names the config file, the field path (`experts[1].max_batch`) and the
//! value, so the operator can find the line to change without reading the source.
//! Relative paths resolve against the file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fogmesh_actors::replay::{ReplayPlan, ReplayStream};
use fogmesh_actors::{
    BatchingSpec, ExpertSpec, LearningSpec, ModelSource, NodeSpec, RestartPolicy, RouterSpec,
    RoutingPolicy, SpecError, StoredModel,
};
use fogmesh_models::store::{check_file, ManifestSeal, ModelStore};
use fogmesh_models::weights::sha256_hex;
use fogmesh_models::{AutoencoderConfig, Recording, SoftmaxGate};
use fogmesh_trust::{MeshTls, Secret, TlsFiles};

use crate::mesh_spec::ModelPlaces;
use crate::model_seal::{MeshSeal, DEFAULT_MODEL_SIGNERS};

use super::{ConfigError, ExpertConfig, MqttConfig, NodeConfig, RouterConfig};

/// The gossip intervals `[cluster] gossip_interval_ms` takes.
pub const GOSSIP_INTERVAL_MS: std::ops::RangeInclusive<u64> = 50..=10_000;
/// Shortest accepted cluster secret.
pub const MIN_SECRET_LEN: usize = 12;

/// Largest accepted `max_message_bytes`: gRPC frames carry a 32-bit length, and the
/// transports keep a decoding backstop of twice the limit, which must fit as well.
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 1 << 30;

/// Smallest accepted `node.outbox.max_bytes_per_sensor`: below it an outbox holds
/// too few windows to ride out anything.
pub const MIN_OUTBOX_BYTES: u64 = 4096;

/// Folds expert `i`'s `max_wait` (humantime, `"2ms"`) into its `max_wait_us`, the field
/// the rest of fogmesh reads. `us_written` says whether the file set `max_wait_us` as
/// well, which is refused: the two would disagree sooner or later.
pub(crate) fn fold_max_wait(
    file: &Path,
    i: usize,
    expert: &mut ExpertConfig,
    us_written: bool,
) -> Result<(), ConfigError> {
    let Some(text) = &expert.max_wait else {
        return Ok(());
    };
    let invalid = |reason: String| ConfigError::Invalid {
        file: file.to_path_buf(),
        field: format!("experts[{i}].max_wait"),
        value: format!("{text:?}"),
        reason,
    };
    if us_written {
        return Err(invalid(format!(
            "`experts[{i}].max_wait_us` = {} sets the same wait: keep one of `max_wait` and `max_wait_us`",
            expert.max_wait_us
        )));
    }
    let wait = humantime::parse_duration(text).map_err(|source| ConfigError::Duration {
        file: file.to_path_buf(),
        field: format!("experts[{i}].max_wait"),
        value: text.clone(),
        source: Box::new(source),
    })?;
    expert.max_wait_us = u64::try_from(wait.as_micros())
        .map_err(|_| invalid(format!("must be at most {} µs", u64::MAX)))?;
    Ok(())
}

/// A replay ready to run: the recording in memory and the plan over it.
/// One `[[mqtt]]` broker resolved for connecting: its settings, the TLS client (none
/// with `insecure = true`) and the password.
#[derive(Clone)]
pub struct MqttBroker {
    pub config: MqttConfig,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub password: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReplayJob {
    pub file: PathBuf,
    pub recording: Arc<Recording>,
    pub plan: ReplayPlan,
}

impl NodeConfig {
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

    /// `[node] conduits`: zones, each once, other than the node's own, which it needs
    /// (as does `segmented`).
    fn check_conduits(&self) -> Result<(), ConfigError> {
        if self.node.segmented && self.node.zone.is_none() {
            return Err(self.invalid(
                "node.segmented".into(),
                "true",
                "a segmented node links only within its zone: set node.zone too",
            ));
        }
        let conduits = &self.node.conduits;
        if conduits.is_empty() {
            return Ok(());
        }
        let Some(own) = &self.node.zone else {
            return Err(self.invalid(
                "node.conduits".into(),
                format!("{conduits:?}"),
                "a gateway joins its own zone to others: set node.zone too",
            ));
        };
        if conduits.len() > crate::zone::MAX_CONDUITS {
            return Err(self.invalid(
                "node.conduits".into(),
                format!("{} zones", conduits.len()),
                format!("at most {}", crate::zone::MAX_CONDUITS),
            ));
        }
        for (i, zone) in conduits.iter().enumerate() {
            let field = format!("node.conduits[{i}]");
            crate::zone::check_zone(zone)
                .map_err(|e| self.invalid(field.clone(), format!("{zone:?}"), e.to_string()))?;
            if zone == own || conduits[..i].contains(zone) {
                return Err(self.invalid(
                    field,
                    format!("{zone:?}"),
                    "names a zone this node is already in",
                ));
            }
        }
        Ok(())
    }

    /// What the file alone decides; the rest is the actors' validation.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.node.name.is_empty() {
            return Err(self.invalid("node.name".into(), "\"\"", "must not be empty"));
        }
        if let Some(zone) = &self.node.zone {
            crate::zone::check_zone(zone).map_err(|e| {
                self.invalid("node.zone".into(), format!("{zone:?}"), e.to_string())
            })?;
        }
        self.check_conduits()?;
        if let Some(addr) = self.node.metrics_listen {
            if !addr.ip().is_loopback() && !self.node.metrics_public {
                return Err(self.invalid(
                    "node.metrics_listen".into(),
                    format!("{:?}", addr.to_string()),
                    "/metrics is plaintext HTTP with no identities: bind it to a loopback address (127.0.0.1), read metrics through the authenticated Telemetry.Metrics, or set `metrics_public = true` to serve them to the network knowingly",
                ));
            }
        }
        let outbox = &self.node.outbox;
        if outbox.max_bytes_per_sensor < MIN_OUTBOX_BYTES {
            return Err(self.invalid(
                "node.outbox.max_bytes_per_sensor".into(),
                outbox.max_bytes_per_sensor,
                format!("must be at least {MIN_OUTBOX_BYTES} (a few windows)"),
            ));
        }
        if outbox.max_age_s == 0 {
            return Err(self.invalid("node.outbox.max_age_s".into(), 0, "must be at least 1"));
        }
        if self.node.alerts.retention == 0 {
            return Err(self.invalid("node.alerts.retention".into(), 0, "must be at least 1"));
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
            if expert.federation.is_some() {
                return Err(self.invalid(
                    format!("experts[{i}].federation"),
                    "(a table)",
                    format!(
                        "expert `{}`: federated training runs across a mesh; put it in the mesh spec (`fogmesh apply mesh.toml`)",
                        expert.name
                    ),
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
            if cluster.secret.expose().chars().count() < MIN_SECRET_LEN {
                return Err(self.invalid(
                    "cluster.secret".into(),
                    format!("<{} characters>", cluster.secret.expose().chars().count()),
                    format!("must have at least {MIN_SECRET_LEN} characters"),
                ));
            }
            if !GOSSIP_INTERVAL_MS.contains(&cluster.gossip_interval_ms) {
                return Err(self.invalid(
                    "cluster.gossip_interval_ms".into(),
                    cluster.gossip_interval_ms.to_string(),
                    format!(
                        "must be {} to {} milliseconds",
                        GOSSIP_INTERVAL_MS.start(),
                        GOSSIP_INTERVAL_MS.end()
                    ),
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
            if mqtt.port == Some(0) {
                return Err(self.invalid(
                    format!("mqtt[{i}].port"),
                    0,
                    "must be a broker's port, not 0",
                ));
            }
            if mqtt.insecure {
                if let Some(path) = &mqtt.ca {
                    return Err(self.invalid(
                        format!("mqtt[{i}].ca"),
                        format!("{:?}", path.display().to_string()),
                        "`insecure = true` speaks plaintext to the broker: drop `ca` or `insecure`",
                    ));
                }
                if mqtt.password_file.is_some() {
                    return Err(self.invalid(
                        format!("mqtt[{i}].password_file"),
                        "<set>",
                        "a password goes to a broker only over TLS: drop `insecure = true`",
                    ));
                }
            }
            if mqtt.password_file.is_some() && mqtt.username.is_none() {
                return Err(self.invalid(
                    format!("mqtt[{i}].username"),
                    "<missing>",
                    "a broker password needs the username it belongs to",
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

    /// The node's TLS identity, or `None` for a node set `insecure = true`: loads
    /// `[tls]` and checks that its certificate chains to its CA and names this node
    /// (`[node] name`) in this node's role (`[node] role`).
    pub fn tls(&self) -> Result<Option<MeshTls>, ConfigError> {
        let missing = || {
            self.invalid(
                "tls".into(),
                "<missing>",
                "give `ca`, `cert` and `key` (`fogmesh ca init` then `fogmesh ca issue NAME --role ROLE`), \
                 or `insecure = true` for a plaintext node with no identities",
            )
        };
        let tls = self.tls.as_ref().ok_or_else(missing)?;
        let files = [
            ("tls.ca", &tls.ca),
            ("tls.cert", &tls.cert),
            ("tls.key", &tls.key),
        ];
        if tls.insecure {
            if let Some((field, Some(path))) = files.iter().find(|(_, p)| p.is_some()) {
                return Err(self.invalid(
                    (*field).into(),
                    format!("{:?}", path.display().to_string()),
                    "`insecure = true` serves plaintext: drop the certificate settings or `insecure`",
                ));
            }
            return Ok(None);
        }
        let mut paths = Vec::new();
        for (field, path) in files {
            match path {
                Some(path) => paths.push(self.resolve(path)),
                None => {
                    return Err(self.invalid(
                        field.into(),
                        "<missing>",
                        "`[tls]` needs `ca`, `cert` and `key` unless `insecure = true`",
                    ))
                }
            }
        }
        let [ca, cert, key] = <[PathBuf; 3]>::try_from(paths).expect("three paths");
        let cert_path = cert.clone();
        let loaded =
            MeshTls::load(&TlsFiles { ca, cert, key }).map_err(|source| ConfigError::Tls {
                file: self.file.clone(),
                source: Box::new(source),
            })?;
        let identity = loaded.identity();
        if identity.name != self.node.name {
            return Err(self.invalid(
                "tls.cert".into(),
                format!("{:?}", cert_path.display().to_string()),
                format!(
                    "the certificate names {:?}, but `[node] name` is {:?}",
                    identity.name, self.node.name
                ),
            ));
        }
        if identity.role.as_str() != self.node.role.as_str() {
            return Err(self.invalid(
                "tls.cert".into(),
                format!("{:?}", cert_path.display().to_string()),
                format!(
                    "the certificate's role is {}, but `[node] role` is {}",
                    identity.role,
                    self.node.role.as_str()
                ),
            ));
        }
        Ok(Some(loaded))
    }

    /// The node's model store ([`NodeConfig::model_store_root`]), when it has one. On a
    /// node with certificates it is sealed with the mesh's signature policy
    /// ([`crate::model_seal`]); on an insecure node, or a config without `[tls]` (which
    /// never serves), it takes versions unsigned.
    pub fn model_store(&self) -> Result<Option<ModelStore>, ConfigError> {
        Ok(self.model_places(self.configured_tls()?.as_ref())?.models)
    }

    /// [`NodeConfig::tls`] where `[tls]` is there, `None` where it is not (the config
    /// never serves then, but its other settings can still be read and checked).
    pub fn configured_tls(&self) -> Result<Option<MeshTls>, ConfigError> {
        match self.tls {
            Some(_) => self.tls(),
            None => Ok(None),
        }
    }

    /// How to reach each `[[mqtt]]` broker, in order: over TLS with this node's
    /// certificate (`tls`), the broker's checked against `ca` or the mesh CA, unless
    /// `insecure = true`; with the password read from `password_file`.
    pub fn mqtt_brokers(&self, tls: Option<&MeshTls>) -> Result<Vec<MqttBroker>, ConfigError> {
        let mut brokers = Vec::with_capacity(self.mqtt.len());
        for (i, mqtt) in self.mqtt.iter().enumerate() {
            let client = if mqtt.insecure {
                tracing::warn!(node = %self.node.name, broker = %mqtt.host, "INSECURE: [[mqtt]] insecure = true: samples from this broker travel in plaintext, and anyone on the network may publish them");
                None
            } else {
                let tls = tls.ok_or_else(|| {
                    self.invalid(
                        format!("mqtt[{i}].insecure"),
                        false,
                        "TLS to the broker presents this node's certificate, and `[tls]` gives none: \
                         give `[tls] ca/cert/key`, or `insecure = true` for a plaintext broker",
                    )
                })?;
                let ca = mqtt.ca.as_ref().map(|path| self.resolve(path));
                let client =
                    tls.outside_client(ca.as_deref())
                        .map_err(|source| ConfigError::BrokerTls {
                            file: self.file.clone(),
                            field: format!("mqtt[{i}].ca"),
                            source: Box::new(source),
                        })?;
                Some(Arc::new(client))
            };
            let password = match &mqtt.password_file {
                Some(path) => {
                    let path = self.resolve(path);
                    let text = std::fs::read_to_string(&path).map_err(|source| {
                        ConfigError::UnreadableFile {
                            file: self.file.clone(),
                            field: format!("mqtt[{i}].password_file"),
                            what: "MQTT password",
                            path: path.clone(),
                            source,
                        }
                    })?;
                    let first = text.lines().next().unwrap_or_default().to_string();
                    Some(Secret::from(first))
                }
                None => None,
            };
            brokers.push(MqttBroker {
                config: mqtt.clone(),
                tls: client,
                password,
            });
        }
        Ok(brokers)
    }

    /// The mesh's signature policy for models, as `[tls] model_signers` sets it.
    fn model_seal(&self, tls: &MeshTls) -> Result<Arc<dyn ManifestSeal>, ConfigError> {
        let signers = match self.tls.as_ref().and_then(|t| t.model_signers.as_ref()) {
            None => DEFAULT_MODEL_SIGNERS.to_vec(),
            Some(names) => {
                let mut roles = Vec::new();
                for (i, name) in names.iter().enumerate() {
                    let field = format!("tls.model_signers[{i}]");
                    let role = name.parse::<fogmesh_trust::Role>().map_err(|e| {
                        self.invalid(field.clone(), format!("{name:?}"), e.to_string())
                    })?;
                    if role == fogmesh_trust::Role::Sensor {
                        return Err(self.invalid(
                            field,
                            format!("{name:?}"),
                            "sensors never sign models: name operator, edge, fog or cloud",
                        ));
                    }
                    roles.push(role);
                }
                if roles.is_empty() {
                    return Err(self.invalid(
                        "tls.model_signers".into(),
                        "[]",
                        "nobody could sign a model, so no stored model would ever serve: name at least `operator`",
                    ));
                }
                roles
            }
        };
        let seal = MeshSeal::new(tls, &signers).map_err(|e| {
            self.invalid(
                "tls.key".into(),
                format!(
                    "{:?}",
                    self.tls
                        .as_ref()
                        .and_then(|t| t.key.as_ref())
                        .map(|k| k.display().to_string())
                        .unwrap_or_default()
                ),
                format!("this node signs the models it makes, and cannot: {e}"),
            )
        })?;
        Ok(Arc::new(seal))
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

    /// Where this node, whose identity if any is `tls` ([`NodeConfig::configured_tls`]),
    /// keeps what stored models need, as absolute paths.
    pub fn model_places(
        &self,
        tls: Option<&MeshTls>,
    ) -> Result<crate::mesh_spec::ModelPlaces, ConfigError> {
        let seal = match tls {
            Some(tls) => Some(self.model_seal(tls)?),
            None => None,
        };
        let models = self.model_store_root().map(|root| {
            let store = ModelStore::open(root);
            match &seal {
                Some(seal) => store.sealed(seal.clone()),
                None => store,
            }
        });
        Ok(crate::mesh_spec::ModelPlaces {
            models,
            minilm: self.node.minilm.as_deref().map(|p| self.resolve(p)),
            seal,
        })
    }

    /// `[node.outbox]` as the sensor streams take it.
    pub fn outbox_limits(&self) -> fogmesh_actors::OutboxLimits {
        let outbox = &self.node.outbox;
        fogmesh_actors::OutboxLimits {
            max_bytes_per_sensor: outbox.max_bytes_per_sensor,
            max_age: std::time::Duration::from_secs(outbox.max_age_s),
            when_full: outbox.when_full,
        }
    }

    /// `path` as written in the config, resolved against the config file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        match self.file.parent() {
            Some(folder) if path.is_relative() => folder.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// The actors' description of this node (step 2 of the [`super`] doc): reads weights
    /// and gate files, then validates the whole spec.
    pub fn to_node_spec(&self) -> Result<NodeSpec, ConfigError> {
        self.to_node_spec_with(&self.model_places(self.configured_tls()?.as_ref())?)
    }

    /// [`NodeConfig::to_node_spec`] reading stored models from `places` and checking
    /// files against its seal (a mesh spec, checked on a node, reads the node's store
    /// under the node's seal).
    pub fn to_node_spec_with(&self, places: &ModelPlaces) -> Result<NodeSpec, ConfigError> {
        let experts = self
            .experts
            .iter()
            .enumerate()
            .map(|(i, expert)| self.expert_spec(i, expert, places))
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
    /// `sha256` and, on a node with certificates, against its signature (`seal`). The
    /// expert checks the hash too, but its error cannot name this config file.
    fn read_pinned(
        &self,
        i: usize,
        expert: &ExpertConfig,
        (key, what): (&str, &'static str),
        path: &Path,
        seal: Option<&dyn ManifestSeal>,
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
        if let Some(seal) = seal {
            check_file(seal, &path, &bytes).map_err(|source| ConfigError::UnsignedFile {
                file: self.file.clone(),
                field: format!("experts[{i}].{key}"),
                path: path.clone(),
                source: Box::new(source),
            })?;
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
        store: Option<&ModelStore>,
    ) -> Result<StoredModel, ConfigError> {
        let field = format!("experts[{i}].model");
        let Some(store) = store else {
            return Err(self.invalid(
                field,
                format!("{id:?}"),
                "a stored model needs the node's model store: set `models` in [node]",
            ));
        };
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

    fn expert_spec(
        &self,
        i: usize,
        expert: &ExpertConfig,
        places: &ModelPlaces,
    ) -> Result<ExpertSpec, ConfigError> {
        let seal = places.seal.as_deref();
        // `check` has refused a config naming more than one source, so the first one
        // named is the only one.
        let source = match (&expert.model, &expert.torchscript, &expert.weights) {
            (Some(id), _, _) => ModelSource::Stored(Box::new(self.stored_model(
                i,
                expert,
                id,
                places.models.as_ref(),
            )?)),
            (None, Some(path), _) => {
                let (path, _) =
                    self.read_pinned(i, expert, ("torchscript", "TorchScript"), path, seal)?;
                ModelSource::TorchScript(path)
            }
            (None, None, weights) => ModelSource::Autoencoder {
                weights: match weights {
                    Some(path) => {
                        let (_, bytes) =
                            self.read_pinned(i, expert, ("weights", "weights"), path, seal)?;
                        Some(Arc::<[u8]>::from(bytes))
                    }
                    None => None,
                },
                weights_sha256: expert.sha256.clone(),
                seed: expert.seed,
            },
        };
        let model_version = match (source.stored(), expert.model_version.is_empty()) {
            (Some(stored), true) => stored.manifest.id(),
            _ => expert.model_version.clone(),
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
            threshold: expert.threshold,
            batching: BatchingSpec {
                max_batch: expert.max_batch,
                max_wait_us: expert.max_wait_us,
            },
            intra_op_threads: expert.intra_op_threads,
            source,
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
            optional: router.optional().to_vec(),
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

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "[node]\nname = \"edge-1\"\nrole = \"edge\"\nlisten = \"127.0.0.1:0\"\nmodels = \"models\"\n";

    fn parse(experts: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(&format!("{NODE}\n{experts}"), Path::new("node.toml"))
    }

    #[test]
    fn the_cluster_secret_never_shows_in_debug_output() {
        let config =
            parse("[cluster]\nsecret = \"plant-7-very-secret\"\ndata = \"mesh\"\n").unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("plant-7-very-secret"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
    }

    #[test]
    fn the_gossip_interval_defaults_to_200_ms_and_is_refused_outside_its_range() {
        let cluster = |extra: &str| {
            parse(&format!(
                "[cluster]\nsecret = \"plant-7-very-secret\"\ndata = \"mesh\"\n{extra}"
            ))
        };
        let default = cluster("").unwrap();
        assert_eq!(default.cluster.unwrap().gossip_interval_ms, 200);
        assert_eq!(
            cluster("gossip_interval_ms = 1000\n")
                .unwrap()
                .cluster
                .unwrap()
                .gossip_interval_ms,
            1000
        );
        for bad in [10, 60_000] {
            match cluster(&format!("gossip_interval_ms = {bad}\n")) {
                Err(ConfigError::Invalid {
                    field,
                    value,
                    reason,
                    ..
                }) => {
                    assert_eq!(field, "cluster.gossip_interval_ms");
                    assert_eq!(value, bad.to_string());
                    assert!(reason.contains("50 to 10000"), "{reason}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn tls_is_required_unless_insecure_is_said_and_never_both() {
        let dir = std::env::temp_dir();
        let missing = parse("").unwrap().tls().unwrap_err().to_string();
        assert!(
            missing.contains("field `tls`") && missing.contains("insecure = true"),
            "{missing}"
        );
        let insecure = parse("[tls]\ninsecure = true\n").unwrap();
        assert!(insecure.tls().unwrap().is_none());
        let both = parse(&format!(
            "[tls]\ninsecure = true\nca = {:?}\n",
            dir.join("ca.pem")
        ))
        .unwrap()
        .tls()
        .unwrap_err()
        .to_string();
        assert!(both.contains("field `tls.ca`"), "{both}");
        let partial = parse("[tls]\nca = \"ca.pem\"\n")
            .unwrap()
            .tls()
            .unwrap_err()
            .to_string();
        assert!(partial.contains("field `tls.cert`"), "{partial}");
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

        let readme = include_str!("../../README.md");
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
    fn max_wait_reads_in_words_or_in_microseconds() {
        let expert = |wait: &str| {
            format!("[[experts]]\nname = \"ae\"\nmodel_version = \"v1\"\nchannels = 2\nwindow = 16\n{wait}\n")
        };
        for (wait, micros) in [
            ("max_wait = \"2ms\"", 2_000),
            ("max_wait = \"1500us\"", 1_500),
            ("max_wait = \"1s 5ms\"", 1_005_000),
            ("max_wait_us = 700", 700),
            ("", BatchingSpec::default().max_wait_us),
        ] {
            let config = parse(&expert(wait)).expect(wait);
            assert_eq!(config.experts[0].max_wait_us, micros, "{wait}");
            let spec = config.to_node_spec().expect(wait);
            assert_eq!(spec.experts[0].batching.max_wait_us, micros, "{wait}");
        }

        let both = parse(&expert("max_wait = \"2ms\"\nmax_wait_us = 2000"))
            .expect_err("both forms")
            .to_string();
        for needle in [
            "node.toml",
            "experts[0].max_wait`",
            "\"2ms\"",
            "experts[0].max_wait_us` = 2000",
        ] {
            assert!(both.contains(needle), "lacks {needle:?}: {both}");
        }

        let bad = parse(&expert("max_wait = \"2 parsecs\"")).expect_err("a bad duration");
        assert!(matches!(bad, ConfigError::Duration { .. }), "{bad:?}");
        assert!(
            std::error::Error::source(&bad).is_some(),
            "keeps humantime's error"
        );
        let bad = bad.to_string();
        for needle in [
            "node.toml",
            "experts[0].max_wait",
            "\"2 parsecs\"",
            "parsecs",
        ] {
            assert!(bad.contains(needle), "lacks {needle:?}: {bad}");
        }
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
