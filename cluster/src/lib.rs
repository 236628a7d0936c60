//! A fogmesh node on the network: its TOML configuration, the gRPC services (`Ingest`,
//! `Inference`, `Control`, `Telemetry`, `ClusterLink`) over the actors of
//! `fogmesh-actors`, `ModelStore` over the node's model store with the client that
//! copies versions between nodes ([`model_store`]), MQTT ingest, file replay,
//! the Prometheus endpoint, and the mesh: cluster links ([`cluster_key`],
//! [`dialer`], [`link`], [`link_service`], [`peer_links`]), gossip membership
//! ([`membership`]), mesh specs ([`mesh_spec`]), placement ([`placement`]), the
//! deployment loop ([`deployment`]) and federated rounds between nodes
//! ([`federation`]), started together by [`mesh`].
//!
//! The entry points: [`NodeConfig::load`] reads a `node.toml` (format in `README.md`
//! beside this crate), [`NodeServer::start`] runs it and returns a
//! [`RunningNodeServer`] ([`NodeServer::start_with`] takes the annunciator, for callers
//! that watch every scored window), [`run_until`] runs it until a signal. Errors
//! become gRPC statuses in one place, [`status`].
//!
//! Architecture invariant: this crate owns no actor logic; it validates what arrives
//! from the network, hands it to a [`fogmesh_actors::Node`] and maps the answer back.

pub mod alert_journal;
pub mod authorization;
pub mod capabilities;
pub mod cluster_key;
pub mod config;
pub mod deployment;
pub mod dialer;
pub mod federation;
mod gossip_seal;
mod ingest;
pub mod link;
pub mod link_service;
pub mod membership;
pub mod mesh;
pub mod mesh_spec;
pub mod metrics_endpoint;
pub mod model_seal;
pub mod model_store;
mod mqtt;
mod mqtt_alerts;
pub mod peer_links;
pub mod placement;
pub mod rollout;
pub mod server;
mod services;
pub mod status;
pub mod status_table;
pub mod telemetry;
pub mod zone;

pub use config::{
    ClusterSection, ConfigError, ExpertConfig, Limits, MqttConfig, NodeConfig, NodeSection,
    ReplayConfig, ReplayJob, ReplayStreamConfig, Role, RouterConfig, TlsSection,
};
pub use ingest::parse_json_samples;
pub use metrics_endpoint::{prometheus_handle, MetricsError};
pub use model_store::{
    download_version, list_versions, upload_version, TransferError, CHUNK_BYTES,
    MAX_CONCURRENT_UPLOADS, MAX_MODEL_BYTES,
};
pub use server::{run_until, NodeServer, RunningNodeServer, ServeError};
pub use status::ServiceError;
