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
//!    and checks what the file alone decides: limits, durations written in words
//!    (`max_wait = "2ms"`, folded into `max_wait_us`), MQTT topics, replay settings and
//!    the streams they feed.
//! 2. [`NodeConfig::to_node_spec`] reads the files the config points at (weights,
//!    gates) and runs the actors' own validation ([`NodeSpec::validate`]): references
//!    between experts, routers and streams, window shapes, model sizes.
//!    [`NodeConfig::replay_jobs`] reads the recordings and resolves column names.
//!
//! Relative paths inside the file resolve against the file's folder, so a config and
//! its weights can move together.
//!
//! The schema (`schema`) is the file's format and nothing else, so the TOML a reader
//! sees in `README.md` maps one to one onto its structs; what the values mean, and
//! whether they are acceptable, is `resolve`. Loading and the errors of both live here.
//!
//! [`NodeSpec`]: fogmesh_actors::NodeSpec
//! [`NodeSpec::validate`]: fogmesh_actors::NodeSpec::validate
//! [`SensorStreamSpec`]: fogmesh_actors::SensorStreamSpec

mod resolve;
mod schema;

use std::path::{Path, PathBuf};

use fogmesh_actors::SpecError;
use fogmesh_models::ModelError;

pub(crate) use resolve::fold_max_wait;
pub use resolve::{
    MqttBroker, ReplayJob, GOSSIP_INTERVAL_MS, MAX_MESSAGE_BYTES_LIMIT, MIN_SECRET_LEN,
};
pub use schema::{
    ClusterSection, ExpertConfig, Limits, MqttConfig, NodeConfig, NodeSection, ReplayConfig,
    ReplayStreamConfig, Role, RouterConfig, TlsSection,
};

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
    #[error("{}: field `{field}` = {value:?}: not a duration such as \"2ms\" or \"1500us\": {source}", file.display())]
    Duration {
        file: PathBuf,
        field: String,
        value: String,
        #[source]
        source: Box<humantime::DurationError>,
    },
    /// The actors refused the node this config describes.
    #[error("{}: [tls]: {source}", file.display())]
    Tls {
        file: PathBuf,
        #[source]
        source: Box<fogmesh_trust::TrustError>,
    },
    /// The TLS client for an `[[mqtt]]` broker cannot be built (its CA file, the
    /// node's certificate).
    #[error("{}: field `{field}`: {source}", file.display())]
    BrokerTls {
        file: PathBuf,
        field: String,
        #[source]
        source: Box<fogmesh_trust::TrustError>,
    },
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
    #[error("{}: field `{field}` = \"{}\": {source}; a node with certificates loads only signed files: `fogmesh models sign-file {}` writes its signature beside it", file.display(), path.display(), path.display())]
    UnsignedFile {
        file: PathBuf,
        field: String,
        path: PathBuf,
        #[source]
        source: Box<fogmesh_models::store::StoreError>,
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
        let syntax = |source| ConfigError::Syntax {
            file: file.to_path_buf(),
            source: Box::new(source),
        };
        let mut config: NodeConfig = toml::from_str(text).map_err(syntax)?;
        config.file = file.to_path_buf();
        if config.experts.iter().any(|e| e.max_wait.is_some()) {
            // serde fills in `max_wait_us` when absent, so only the table as written
            // tells whether an expert sets both.
            let written: toml::Table = toml::from_str(text).map_err(syntax)?;
            let experts = written.get("experts").and_then(toml::Value::as_array);
            for (i, expert) in config.experts.iter_mut().enumerate() {
                let us_written = experts
                    .and_then(|experts| experts.get(i))
                    .and_then(toml::Value::as_table)
                    .is_some_and(|table| table.contains_key("max_wait_us"));
                fold_max_wait(file, i, expert, us_written)?;
            }
        }
        config.check()?;
        Ok(config)
    }
}
