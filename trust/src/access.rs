//! Which role may call which gRPC method: the mesh's one authorization table.
//!
//! Deny by default: a method missing from [`RULES`] is refused for every role. Reading
//! (status, the mesh view, alerts, metrics) is open to every certificate of the mesh;
//! changing the mesh (apply, rollout, rollback) is the operator's; model uploads are
//! the operator's and the nodes' (a rollout copies the version to every replica's
//! node); a federated round's traffic is the nodes', running one on command the
//! operators' and the nodes'; the cluster link is the nodes'; ingest is for sensors and for nodes that
//! relay them. A sensor certificate that names sensor ids
//! is further limited to those by the ingest service, which sees the samples.

use crate::{PeerIdentity, Role};

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Every certificate the mesh CA issued.
    Anyone,
    /// Edge, fog and cloud nodes.
    Nodes,
    /// Operators only.
    Operators,
    /// Nodes and operators.
    NodesAndOperators,
    /// Sensors, and nodes that relay them.
    SensorsAndNodes,
}

impl Allowed {
    pub fn admits(self, role: Role) -> bool {
        match self {
            Allowed::Anyone => true,
            Allowed::Nodes => role.is_node(),
            Allowed::Operators => role == Role::Operator,
            Allowed::NodesAndOperators => role.is_node() || role == Role::Operator,
            Allowed::SensorsAndNodes => role.is_node() || role == Role::Sensor,
        }
    }
}

/// Whether a method changes the mesh: such calls leave an audit line whatever
/// their outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Reads,
    Changes,
}

/// A gRPC method's path (`/package.Service/Method`), who may call it, and what it does.
#[derive(Debug)]
pub struct Rule {
    pub path: &'static str,
    pub allowed: Allowed,
    pub effect: Effect,
}

const fn rule(path: &'static str, allowed: Allowed, effect: Effect) -> Rule {
    Rule {
        path,
        allowed,
        effect,
    }
}

/// Every method a node serves.
pub const RULES: &[Rule] = &[
    rule(
        "/fogmesh.v1.Ingest/Push",
        Allowed::SensorsAndNodes,
        Effect::Reads,
    ),
    rule(
        "/fogmesh.v1.Ingest/PushStream",
        Allowed::SensorsAndNodes,
        Effect::Reads,
    ),
    rule(
        "/fogmesh.v1.Inference/Score",
        Allowed::NodesAndOperators,
        Effect::Reads,
    ),
    rule(
        "/fogmesh.v1.Inference/WatchAlerts",
        Allowed::Anyone,
        Effect::Reads,
    ),
    rule(
        "/fogmesh.v1.Control/GetStatus",
        Allowed::Anyone,
        Effect::Reads,
    ),
    rule(
        "/fogmesh.v1.Control/GetMesh",
        Allowed::Anyone,
        Effect::Reads,
    ),
    rule(
        "/fogmesh.v1.Control/Apply",
        Allowed::Operators,
        Effect::Changes,
    ),
    rule(
        "/fogmesh.v1.Control/Rollout",
        Allowed::Operators,
        Effect::Changes,
    ),
    // Rollouts copy a version from the node that runs them to every replica's node.
    rule(
        "/fogmesh.v1.ModelStore/Upload",
        Allowed::NodesAndOperators,
        Effect::Changes,
    ),
    rule(
        "/fogmesh.v1.ModelStore/Download",
        Allowed::NodesAndOperators,
        Effect::Reads,
    ),
    rule(
        "/fogmesh.v1.ModelStore/List",
        Allowed::NodesAndOperators,
        Effect::Reads,
    ),
    // A coordinator sends its sites the global weights and takes back their updates.
    rule(
        "/fogmesh.v1.Federation/Train",
        Allowed::Nodes,
        Effect::Reads,
    ),
    rule(
        "/fogmesh.v1.Federation/Evaluate",
        Allowed::Nodes,
        Effect::Reads,
    ),
    // A round stores a version and rolls it out; a node passes it on to the
    // coordinator's node.
    rule(
        "/fogmesh.v1.Federation/Federate",
        Allowed::NodesAndOperators,
        Effect::Changes,
    ),
    rule(
        "/fogmesh.v1.Telemetry/Metrics",
        Allowed::Anyone,
        Effect::Reads,
    ),
    rule(
        "/fogmesh.v1.ClusterLink/Admit",
        Allowed::Nodes,
        Effect::Reads,
    ),
    rule(
        "/fogmesh.v1.ClusterLink/Open",
        Allowed::Nodes,
        Effect::Reads,
    ),
];

/// The rule for a method path, if the node serves it.
pub fn rule_for(path: &str) -> Option<&'static Rule> {
    RULES.iter().find(|rule| rule.path == path)
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role {role} may not call {method}{detail}")]
pub struct Denied {
    pub role: Role,
    pub method: String,
    detail: &'static str,
}

/// Decides whether `peer` may call the method at `path`.
pub fn authorize(path: &str, peer: &PeerIdentity) -> Result<&'static Rule, Denied> {
    match rule_for(path) {
        Some(rule) if rule.allowed.admits(peer.role) => Ok(rule),
        Some(_) => Err(Denied {
            role: peer.role,
            method: path.to_string(),
            detail: "",
        }),
        None => Err(Denied {
            role: peer.role,
            method: path.to_string(),
            detail: " (not a method this node serves)",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(role: Role) -> PeerIdentity {
        PeerIdentity {
            name: "x".into(),
            role,
            sensors: vec![],
        }
    }

    #[test]
    fn only_operators_apply_and_roll_out_and_sensors_change_nothing() {
        for path in ["/fogmesh.v1.Control/Apply", "/fogmesh.v1.Control/Rollout"] {
            for role in Role::ALL {
                assert_eq!(
                    authorize(path, &peer(role)).is_ok(),
                    role == Role::Operator,
                    "{role} on {path}"
                );
            }
        }
        for rule in RULES.iter().filter(|r| r.effect == Effect::Changes) {
            assert!(
                authorize(rule.path, &peer(Role::Sensor)).is_err(),
                "{}",
                rule.path
            );
        }
    }

    #[test]
    fn a_sensor_may_only_ingest_and_read() {
        let sensor = peer(Role::Sensor);
        let allowed: Vec<_> = RULES
            .iter()
            .filter(|r| authorize(r.path, &sensor).is_ok())
            .map(|r| r.path)
            .collect();
        assert_eq!(
            allowed,
            [
                "/fogmesh.v1.Ingest/Push",
                "/fogmesh.v1.Ingest/PushStream",
                "/fogmesh.v1.Inference/WatchAlerts",
                "/fogmesh.v1.Control/GetStatus",
                "/fogmesh.v1.Control/GetMesh",
                "/fogmesh.v1.Telemetry/Metrics",
            ]
        );
    }

    #[test]
    fn the_cluster_link_is_for_nodes_only() {
        for role in Role::ALL {
            assert_eq!(
                authorize("/fogmesh.v1.ClusterLink/Open", &peer(role)).is_ok(),
                role.is_node()
            );
        }
    }

    #[test]
    fn unknown_methods_are_denied_and_the_refusal_names_role_and_method() {
        let denied = authorize(
            "/grpc.reflection.v1.ServerReflection/Info",
            &peer(Role::Operator),
        )
        .unwrap_err();
        let text = denied.to_string();
        assert!(
            text.contains("operator") && text.contains("ServerReflection"),
            "{text}"
        );
        let denied = authorize("/fogmesh.v1.Control/Apply", &peer(Role::Sensor)).unwrap_err();
        assert_eq!(
            denied.to_string(),
            "role sensor may not call /fogmesh.v1.Control/Apply"
        );
    }
}
