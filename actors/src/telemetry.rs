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
/// Windows a router scored without an optional expert none of whose replicas it
/// reached (labels `router`, `expert`).
pub const ROUTER_OPTIONAL_SKIPPED: &str = "fogmesh_router_optional_skipped_total";
/// Windows a router sent to a replica on another node (labels `router`, `expert`).
pub const ROUTER_REMOTE: &str = "fogmesh_router_remote_windows_total";
/// Windows a gateway's relay carried between zones (labels `expert`, `outcome`:
/// `scored` or `unavailable`).
pub const RELAYED_WINDOWS: &str = "fogmesh_relayed_windows_total";
/// Repeated requests an expert endpoint answered from its cache (label `expert`).
pub const ENDPOINT_DUPLICATES: &str = "fogmesh_endpoint_duplicates_total";
/// Windows a continual learner took in (label `expert`).
pub const LEARNER_WINDOWS: &str = "fogmesh_learner_windows_total";
/// Windows a continual learner missed because it fell behind (label `expert`).
pub const LEARNER_SKIPPED: &str = "fogmesh_learner_skipped_windows_total";
/// Drifts a continual learner detected (labels `expert`, `detector`).
pub const LEARNER_DRIFTS: &str = "fogmesh_learner_drifts_total";
/// Learning rounds that ended (labels `expert`, `outcome` = `promoted` | `refused` | `failed`).
pub const LEARNER_ROUNDS: &str = "fogmesh_learner_rounds_total";
/// Old-regime windows in a learner's replay reservoir (label `expert`).
pub const LEARNER_RESERVOIR: &str = "fogmesh_learner_reservoir_windows";
/// Recent (new-regime) windows a learner holds (label `expert`).
pub const LEARNER_NEW_WINDOWS: &str = "fogmesh_learner_new_windows";
/// Seconds of fine-tuning per round (label `expert`).
pub const LEARNER_FINE_TUNE_SECONDS: &str = "fogmesh_learner_fine_tune_seconds";
/// Seconds from a drift to the promotion that answered it (label `expert`).
pub const LEARNER_DRIFT_TO_PROMOTION: &str = "fogmesh_learner_drift_to_promotion_seconds";
/// Learners that stopped on their own (label `expert`).
pub const LEARNER_STOPPED: &str = "fogmesh_learner_stopped_total";
/// Federated rounds that ended (labels `federation`, `outcome` = `stored` | `applied` |
/// `refused` | `failed`: stored as a version, applied without storing (a fog
/// aggregator's, or a coordinator that stores nothing), applied but judged worse by
/// the sites, nothing applied).
pub const FEDERATED_ROUNDS: &str = "fogmesh_federated_rounds_total";
/// Seconds per federated round (label `federation`).
pub const FEDERATED_ROUND_SECONDS: &str = "fogmesh_federated_round_seconds";
/// Bytes of a federation's rounds (labels `federation`, `direction` = `up` | `down`).
pub const FEDERATED_BYTES: &str = "fogmesh_federated_bytes_total";
/// Sites a round left out (labels `federation`, `reason` = `late` | `failed`).
pub const FEDERATED_SITES_LEFT_OUT: &str = "fogmesh_federated_sites_left_out_total";
/// ε spent by a private federation so far (label `federation`).
pub const FEDERATED_EPSILON: &str = "fogmesh_federated_epsilon";
