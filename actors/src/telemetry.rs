//! The metric names the actors record, declared once so the Prometheus endpoint, the
//! tests and the dashboards agree on them.
//!
//! Counters carry a `sensor`, `router` or `expert` label; rejection counters also a
//! `reason` label naming the rule that refused the input.

/// Samples accepted by a sensor stream (label `sensor`).
pub const SAMPLES_ACCEPTED: &str = "fogmesh_samples_accepted_total";
/// Samples refused, with the batch they came in (labels `sensor`, `reason`).
pub const SAMPLES_REJECTED: &str = "fogmesh_samples_rejected_total";
/// Samples dropped because their sequence number was already accepted (label `sensor`).
pub const SAMPLES_DUPLICATE: &str = "fogmesh_samples_duplicate_total";
/// Windows cut by a sensor stream (label `sensor`).
pub const WINDOWS_CUT: &str = "fogmesh_windows_total";
/// Windows a router scored (label `router`).
pub const WINDOWS_ROUTED: &str = "fogmesh_router_windows_total";
/// Windows a router could not score (labels `router`, `reason`).
pub const ROUTING_FAILURES: &str = "fogmesh_router_failures_total";
/// Windows an expert scored (label `expert`).
pub const EXPERT_WINDOWS: &str = "fogmesh_expert_windows_total";
/// Size of each batch an expert ran (label `expert`).
pub const EXPERT_BATCH_SIZE: &str = "fogmesh_expert_batch_size";
/// Seconds from the first window of a batch arriving to the batch starting (label `expert`).
pub const EXPERT_BATCH_WAIT: &str = "fogmesh_expert_batch_wait_seconds";
/// Alerts raised (label `sensor`).
pub const ALERTS: &str = "fogmesh_alerts_total";
/// Actor restarts by the node agent (label `actor`).
pub const ACTOR_RESTARTS: &str = "fogmesh_actor_restarts_total";
/// Attempts a router made again on another replica after one failed (labels `router`, `expert`).
pub const ROUTER_RETRIES: &str = "fogmesh_router_retries_total";
/// Windows a router sent to a replica on another node (labels `router`, `expert`).
pub const ROUTER_REMOTE: &str = "fogmesh_router_remote_windows_total";
/// Repeated requests an expert endpoint answered from its cache (label `expert`).
pub const ENDPOINT_DUPLICATES: &str = "fogmesh_endpoint_duplicates_total";
