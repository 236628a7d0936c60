//! The leader's part of a deployment round: whether this node places experts, the
//! placement of a spec (new or adopted), and rebalancing one replica at a time onto a
//! node that joined, make before break.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::membership::Member;
use crate::mesh_spec::MeshSpec;
use crate::placement::{self, Assignment, Candidate, PlacementError};

/// How long a node that sees only part of the mesh waits before it may lead: a
/// joining node's links come up one by one, and a node leading on that partial view
/// would move experts off nodes it simply has not linked to yet.
pub const SETTLE_TIME: Duration = Duration::from_secs(3);

/// Why a spec cannot be placed on the nodes usable now.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("sensors are pinned to node(s) {} which are not in the mesh", nodes.join(", "))]
    SensorNodesMissing { nodes: Vec<String> },
    #[error("the spec cannot be placed on the live nodes: {0}")]
    Placement(#[source] PlacementError),
}

/// Whether `me` places experts this round: it sorts first among the usable `nodes`,
/// and either links to all `members` gossip knows or has been up [`SETTLE_TIME`].
pub fn may_lead(me: &str, nodes: &[Candidate], members: usize, up: Duration) -> bool {
    let first = nodes.iter().map(|c| c.name.as_str()).min() == Some(me);
    first && (nodes.len() == members || up >= SETTLE_TIME)
}

/// Places a spec being applied on `nodes`, refusing it whole when a sensor's node is
/// missing or an expert cannot get its replicas.
pub fn place_new(
    spec: &MeshSpec,
    nodes: &[Candidate],
    previous: &Assignment,
) -> Result<Assignment, ApplyError> {
    let missing = spec.missing_sensor_nodes(nodes);
    if !missing.is_empty() {
        return Err(ApplyError::SensorNodesMissing { nodes: missing });
    }
    place(spec, nodes, previous)
}

/// Places an adopted spec on the nodes usable now. A sensor whose node is gone is not
/// a reason to stop placing experts: its node gets its share back when it returns, and
/// the experts of other lost nodes still need new hosts meanwhile.
pub fn place(
    spec: &MeshSpec,
    nodes: &[Candidate],
    previous: &Assignment,
) -> Result<Assignment, ApplyError> {
    placement::place(&spec.demands(), nodes, previous).map_err(ApplyError::Placement)
}

/// A replica on its way from a busy node to an idle one: placed on both until the new
/// host says it serves (make before break), so no window waits for a cold replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub expert: String,
    pub from: String,
    pub to: String,
}

/// Carries a move one step on: keeps both hosts while the new one is not serving yet,
/// drops the old one once it is, and gives the move up when either host left or
/// placement no longer puts the expert on the old host.
pub fn advance_move(
    moving: Option<Move>,
    experts: &mut Assignment,
    nodes: &[Candidate],
    members: &BTreeMap<String, Member>,
) -> Option<Move> {
    let m = moving?;
    let hosts = experts.get_mut(&m.expert)?;
    if !hosts.contains(&m.from) || !nodes.iter().any(|c| c.name == m.to) {
        return None;
    }
    let serving = members
        .get(&m.to)
        .is_some_and(|member| member.serving.contains(&m.expert));
    if serving {
        hosts.retain(|n| n != &m.from);
    }
    if !hosts.contains(&m.to) {
        hosts.push(m.to.clone());
        hosts.sort();
    }
    if serving {
        tracing::info!(expert = %m.expert, from = %m.from, to = %m.to, "replica moved");
        None
    } else {
        Some(m)
    }
}

/// Rebalancing: when the busiest usable node hosts at least two experts more than the
/// idlest, starts moving one replica (the first by name that placement would put on a
/// less busy node) and adds its new host to `experts`. One move at a time.
pub fn start_move(spec: &MeshSpec, nodes: &[Candidate], experts: &mut Assignment) -> Option<Move> {
    let mut counts: BTreeMap<&str, usize> = nodes.iter().map(|c| (c.name.as_str(), 0)).collect();
    for host in experts.values().flatten() {
        if let Some(n) = counts.get_mut(host.as_str()) {
            *n += 1;
        }
    }
    let (busiest, most) = counts
        .iter()
        .max_by_key(|(name, n)| (**n, std::cmp::Reverse(**name)))
        .map(|(name, n)| (name.to_string(), *n))?;
    let fewest = counts.values().min().copied()?;
    if most < fewest + 2 {
        return None;
    }
    let before = experts.clone();
    for (expert, hosts) in &before {
        if !hosts.contains(&busiest) {
            continue;
        }
        let mut trial = experts.clone();
        if let Some(h) = trial.get_mut(expert) {
            h.retain(|n| n != &busiest);
        }
        let Ok(placed) = placement::place(&spec.demands(), nodes, &trial) else {
            continue;
        };
        let Some(to) = placed
            .get(expert)
            .and_then(|h| h.iter().find(|n| !hosts.contains(n)))
            .cloned()
        else {
            continue;
        };
        if counts.get(to.as_str()).is_some_and(|n| n + 1 < most) {
            let m = Move {
                expert: expert.clone(),
                from: busiest.clone(),
                to: to.clone(),
            };
            tracing::info!(expert = %m.expert, from = %m.from, to = %m.to, "rebalancing: moving a replica");
            if let Some(h) = experts.get_mut(expert) {
                h.push(to);
                h.sort();
            }
            return Some(m);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use crate::deployment::view::tests::member;

    const TWO_EXPERTS: &str = r#"
[[experts]]
name = "ae1"
model_version = "v1"
channels = 2
window = 16
placement = { roles = ["fog"] }

[[experts]]
name = "ae2"
model_version = "v1"
channels = 2
window = 16
placement = { roles = ["fog"] }
"#;

    fn fog(name: &str) -> Candidate {
        Candidate {
            name: name.into(),
            role: Role::Fog,
            gpus: 0,
            cpu_load: 0.0,
            sensors: Vec::new(),
            zone: String::new(),
        }
    }

    fn assignment(pairs: &[(&str, &[&str])]) -> Assignment {
        pairs
            .iter()
            .map(|(e, nodes)| (e.to_string(), nodes.iter().map(|n| n.to_string()).collect()))
            .collect()
    }

    #[test]
    fn a_joining_node_gets_a_replica_made_before_the_old_one_breaks() {
        let spec = MeshSpec::parse(TWO_EXPERTS, std::path::Path::new("mesh.toml")).unwrap();
        let nodes = vec![fog("fog-a"), fog("fog-b")];
        let mut experts = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-a"])]);
        let m = start_move(&spec, &nodes, &mut experts).expect("a move to the idle node");
        assert_eq!(
            (m.expert.as_str(), m.from.as_str(), m.to.as_str()),
            ("ae1", "fog-a", "fog-b")
        );
        assert_eq!(
            experts,
            assignment(&[("ae1", &["fog-a", "fog-b"]), ("ae2", &["fog-a"])])
        );

        // Not serving yet: both hosts stay.
        let waiting: BTreeMap<_, _> =
            [member("fog-a", &["ae1", "ae2"]), member("fog-b", &[])].into();
        let mut step = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-a"])]);
        let still = advance_move(Some(m.clone()), &mut step, &nodes, &waiting);
        assert_eq!(still, Some(m.clone()));
        assert_eq!(step["ae1"], vec!["fog-a", "fog-b"]);

        // Serving: the old host lets go.
        let serving: BTreeMap<_, _> =
            [member("fog-a", &["ae1", "ae2"]), member("fog-b", &["ae1"])].into();
        let mut step = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-a"])]);
        assert_eq!(
            advance_move(Some(m.clone()), &mut step, &nodes, &serving),
            None
        );
        assert_eq!(
            step,
            assignment(&[("ae1", &["fog-b"]), ("ae2", &["fog-a"])])
        );

        // The new host left: the move is given up, placement as it was.
        let mut step = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-a"])]);
        assert_eq!(
            advance_move(Some(m), &mut step, &nodes[..1], &serving),
            None
        );
        assert_eq!(step["ae1"], vec!["fog-a"]);
    }

    /// Regression: a node that had just joined, linked to nobody yet, saw itself as the
    /// only usable node, led, and placed every expert on itself; the real leader then
    /// took that placement as the one to keep stable and moves went back and forth.
    #[test]
    fn a_node_with_a_partial_view_leads_only_once_settled() {
        let alone = vec![fog("fog-a")];
        assert!(!may_lead("fog-a", &alone, 3, Duration::from_millis(100)));
        assert!(may_lead("fog-a", &alone, 3, SETTLE_TIME));
        assert!(
            may_lead("fog-a", &alone, 1, Duration::ZERO),
            "a mesh of one"
        );
        let all = vec![fog("fog-a"), fog("fog-b")];
        assert!(may_lead("fog-a", &all, 2, Duration::ZERO));
        assert!(
            !may_lead("fog-b", &all, 2, SETTLE_TIME),
            "fog-a sorts first"
        );
    }

    #[test]
    fn a_balanced_mesh_moves_nothing() {
        let spec = MeshSpec::parse(TWO_EXPERTS, std::path::Path::new("mesh.toml")).unwrap();
        let nodes = vec![fog("fog-a"), fog("fog-b"), fog("fog-c")];
        let mut experts = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-b"])]);
        assert_eq!(start_move(&spec, &nodes, &mut experts), None);
        let mut one_node = assignment(&[("ae1", &["fog-a"]), ("ae2", &["fog-a"])]);
        assert_eq!(start_move(&spec, &nodes[..1], &mut one_node), None);
    }
}
