//! The metric names this crate records, declared once so the services, the tests and
//! the dashboards agree on them. The actors' own metrics are in
//! `fogmesh_actors::telemetry`.
//!
//! Rejection counters count refused requests (batches, calls), not samples; the
//! actors' `fogmesh_samples_rejected_total` counts the samples inside refused batches.

/// Ingest requests refused (labels `transport` = `grpc` | `mqtt`, `reason`).
pub const INGEST_REJECTED: &str = "fogmesh_ingest_rejected_total";
/// `Inference` calls refused (labels `rpc` = `score` | `watch_alerts`, `reason`).
pub const INFERENCE_REJECTED: &str = "fogmesh_inference_rejected_total";
/// `ModelStore` calls refused (labels `rpc` = `upload` | `download` | `list`, `reason`).
pub const MODEL_STORE_REJECTED: &str = "fogmesh_model_store_rejected_total";
/// Scored windows a `WatchAlerts` subscriber skipped because it fell behind.
pub const ALERT_WATCH_SKIPPED: &str = "fogmesh_alert_watch_skipped_total";
/// Failed connections to, or connections lost with, an MQTT broker (label `broker`).
pub const MQTT_CONNECTION_ERRORS: &str = "fogmesh_mqtt_connection_errors_total";
/// MQTT acknowledgements not sent because the client's outgoing queue was full
/// (label `broker`); the producer resends and is acknowledged then.
pub const MQTT_ACKS_DROPPED: &str = "fogmesh_mqtt_acks_dropped_total";
/// File replays that ended on a refused batch (label `file`).
pub const REPLAY_FAILURES: &str = "fogmesh_replay_failures_total";

/// `transport` label values of [`INGEST_REJECTED`].
pub const TRANSPORT_GRPC: &str = "grpc";
pub const TRANSPORT_MQTT: &str = "mqtt";

/// Cluster links refused for a wrong cluster secret.
pub const LINKS_REFUSED: &str = "fogmesh_cluster_links_refused_total";
/// Calls refused because the caller's role may not call the method, by role and method.
pub const CALLS_DENIED: &str = "fogmesh_calls_denied_total";
/// Model versions a node refused to store, serve or roll out, by reason (unsigned,
/// tampered, unknown_signer, signer_role, bad_signature, downgrade, ...).
pub const MODELS_REFUSED: &str = "fogmesh_models_refused_total";
/// Gossip datagrams dropped for lacking this mesh's seal (forged, or another mesh's).
pub const GOSSIP_REFUSED: &str = "fogmesh_gossip_refused_total";
/// Cluster link state changes (labels `peer`, `state`).
pub const LINK_TRANSITIONS: &str = "fogmesh_cluster_link_transitions_total";
/// Nodes gossip started to hear.
pub const MEMBERS_JOINED: &str = "fogmesh_mesh_members_joined_total";
/// Nodes gossip stopped hearing (failure detector or graceful leave).
pub const MEMBERS_LEFT: &str = "fogmesh_mesh_members_left_total";
