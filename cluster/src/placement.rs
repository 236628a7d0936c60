//! Placement decides which live fog nodes host the replicas of each expert (a model
//! actor), from what every expert demands — how many replicas, which node roles, a GPU,
//! a sensor to sit near, how many experts may share its hosts — and from what each node
//! offers and how busy it is.
//!
//! The rules, and why:
//! - A replica goes only to a node whose role the expert accepts (any role when it
//!   names none), that has a GPU when the expert needs one, and that sits in a zone the
//!   expert's zone pattern matches when it names one. Replicas of one expert
//!   go to distinct nodes, so losing one node never takes out two of them.
//! - Co-tenancy: a node hosts no more experts than the smallest `max_per_node` among
//!   the experts it hosts, so an expert that asked for room gets it.
//! - Stability first: a replica already on a node that is still live, still eligible
//!   and still within the co-tenancy limits stays there. A moved replica has to be
//!   started again elsewhere and serves nothing meanwhile, so a membership change
//!   should move as little as possible: a node joining moves nothing, a node leaving
//!   moves only the replicas it hosted. Every expert keeps its previous hosts before
//!   any missing replica is placed, so placing one expert can never crowd another out
//!   of the node it already serves from.
//! - Missing replicas then go, one at a time, to the best remaining node: the one
//!   hosting the expert's `near` sensor (data need not cross the network), then the
//!   one with the fewest experts in this placement (spreads the work), then the lowest
//!   CPU load, then the name.
//! - The most constrained experts are placed first (GPU, then roles, then a
//!   co-tenancy limit, then by name), so the greedy pass does not hand a scarce node
//!   to an expert that could have run anywhere.
//! - Nodes and demands are sorted and every tie is broken by name, so the same inputs
//!   always give the same assignment whatever order they arrive in, and every node
//!   computing it from the same membership view agrees.
//! - An expert that cannot be placed refuses the whole placement: a partial one would
//!   leave some expert unserved with nobody told. The error names the expert and the
//!   numbers behind the refusal.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::Role;
use crate::zone::ZonePattern;

/// A live node that may host experts.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub role: Role,
    pub gpus: u32,
    /// CPU busy fraction 0.0..=1.0 (from the node's last load report).
    pub cpu_load: f64,
    /// Sensor stream ids pinned to this node.
    pub sensors: Vec<String>,
    /// `[node] zone` (empty: none).
    pub zone: String,
}

/// What one expert asks of its hosts.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    pub expert: String,
    /// At least 1; 0 is refused with [`PlacementError::InvalidReplicas`].
    pub replicas: usize,
    /// Empty = any role.
    pub roles: Vec<Role>,
    pub needs_gpu: bool,
    /// Prefer the node that hosts this sensor id (a preference, not a rule).
    pub near: Option<String>,
    /// A node hosting this expert hosts at most this many experts in total (this one included). None = no limit.
    pub max_per_node: Option<usize>,
    /// Only nodes in a zone this pattern matches.
    pub zone: Option<ZonePattern>,
}

/// Expert name -> names of the nodes hosting its replicas (sorted by node name).
pub type Assignment = BTreeMap<String, Vec<String>>;

/// Why no placement could be made; each message is meant for a plant operator.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// An expert asks for no replicas, which would silently stop serving it.
    #[error("expert `{expert}` asks for 0 replicas; it needs at least 1 to be served")]
    InvalidReplicas { expert: String },
    /// Two demands name the same expert, so neither can be trusted.
    #[error("expert `{expert}` is demanded more than once; give each expert a single demand")]
    DuplicateExpert { expert: String },
    /// Two live nodes share a name, so replicas could not be told apart.
    #[error("node `{node}` is listed more than once among the live nodes")]
    DuplicateNode { node: String },
    /// No live node meets the expert's role and GPU constraints.
    #[error("expert `{expert}` cannot be placed: {reason}")]
    NoEligibleNode { expert: String, reason: String },
    /// Some live nodes meet the constraints, but fewer than the replicas asked for.
    #[error(
        "expert `{expert}` wants {} on distinct nodes but only {} its constraints",
        count(*.replicas, "replica", "replicas"),
        count(*.eligible, "live node meets", "live nodes meet")
    )]
    TooFewNodes {
        expert: String,
        replicas: usize,
        eligible: usize,
    },
    /// Enough nodes meet the constraints, but `max_per_node` limits leave too few with room.
    #[error(
        "expert `{expert}` wants {} but max_per_node limits leave room on only {fits} of the \
         {} its constraints ({}); add nodes or raise the limit",
        count(*.replicas, "replica", "replicas"),
        count(*.eligible, "live node that meets", "live nodes that meet"),
        limit_source(.limit)
    )]
    CoTenancy {
        expert: String,
        replicas: usize,
        /// Nodes that host the expert or still had room for it when placement gave up.
        fits: usize,
        eligible: usize,
        /// The expert's own `max_per_node`.
        limit: Option<usize>,
    },
}

/// Places every demanded expert on the live `nodes`, keeping the replicas of
/// `previous` that may stay (see the module documentation for the rules).
///
/// Experts in `previous` that are no longer demanded are dropped. Either every expert
/// is placed or an error names the first one that cannot be.
pub fn place(
    demands: &[Demand],
    nodes: &[Candidate],
    previous: &Assignment,
) -> Result<Assignment, PlacementError> {
    let nodes = sorted_nodes(nodes)?;
    let demands = ordered_demands(demands)?;

    // Constraint errors come before any co-tenancy error: they say what to fix
    // whatever the other experts do.
    let mut eligible = Vec::with_capacity(demands.len());
    for &demand in &demands {
        let fit: Vec<usize> = (0..nodes.len())
            .filter(|&i| is_eligible(demand, nodes[i]))
            .collect();
        if fit.is_empty() {
            return Err(PlacementError::NoEligibleNode {
                expert: demand.expert.clone(),
                reason: ineligibility_reason(demand, &nodes),
            });
        }
        if fit.len() < demand.replicas {
            return Err(PlacementError::TooFewNodes {
                expert: demand.expert.clone(),
                replicas: demand.replicas,
                eligible: fit.len(),
            });
        }
        eligible.push(fit);
    }

    let mut tenancy = vec![Tenancy::default(); nodes.len()];
    let mut hosts: Vec<Vec<usize>> = Vec::with_capacity(demands.len());
    for &demand in &demands {
        let before: BTreeSet<&str> = previous
            .get(&demand.expert)
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        let mut kept = Vec::new();
        for name in before {
            if kept.len() == demand.replicas {
                break;
            }
            let Ok(i) = nodes.binary_search_by(|node| node.name.as_str().cmp(name)) else {
                continue;
            };
            if is_eligible(demand, nodes[i]) && tenancy[i].admits(demand.max_per_node) {
                tenancy[i].add(demand.max_per_node);
                kept.push(i);
            }
        }
        hosts.push(kept);
    }

    for ((&demand, fit), chosen) in demands.iter().zip(&eligible).zip(&mut hosts) {
        let hosts_near = |i: usize| {
            demand
                .near
                .as_ref()
                .is_some_and(|sensor| nodes[i].sensors.contains(sensor))
        };
        while chosen.len() < demand.replicas {
            let best = fit
                .iter()
                .copied()
                .filter(|i| !chosen.contains(i) && tenancy[*i].admits(demand.max_per_node))
                .min_by(|&a, &b| {
                    hosts_near(b)
                        .cmp(&hosts_near(a))
                        .then(tenancy[a].hosted.cmp(&tenancy[b].hosted))
                        .then(busy(nodes[a]).total_cmp(&busy(nodes[b])))
                        // Nodes are sorted by name, so the index orders by name.
                        .then(a.cmp(&b))
                });
            let Some(i) = best else {
                return Err(PlacementError::CoTenancy {
                    expert: demand.expert.clone(),
                    replicas: demand.replicas,
                    fits: chosen.len(),
                    eligible: fit.len(),
                    limit: demand.max_per_node,
                });
            };
            tenancy[i].add(demand.max_per_node);
            chosen.push(i);
        }
    }

    Ok(demands
        .iter()
        .zip(hosts)
        .map(|(demand, mut chosen)| {
            chosen.sort_unstable();
            let names = chosen.into_iter().map(|i| nodes[i].name.clone()).collect();
            (demand.expert.clone(), names)
        })
        .collect())
}

/// How full a node is in the placement being built.
#[derive(Debug, Clone, Copy, Default)]
struct Tenancy {
    hosted: usize,
    /// The smallest `max_per_node` among the experts it hosts.
    cap: Option<usize>,
}

impl Tenancy {
    /// Whether one more expert with `limit` keeps every expert on the node within its limit.
    fn admits(self, limit: Option<usize>) -> bool {
        tighter(self.cap, limit).is_none_or(|cap| self.hosted < cap)
    }

    fn add(&mut self, limit: Option<usize>) {
        self.hosted += 1;
        self.cap = tighter(self.cap, limit);
    }
}

fn tighter(a: Option<usize>, b: Option<usize>) -> Option<usize> {
    a.into_iter().chain(b).min()
}

/// A garbled load report (NaN) must not make a node look idle and attract work.
fn busy(node: &Candidate) -> f64 {
    if node.cpu_load.is_nan() {
        f64::INFINITY
    } else {
        node.cpu_load
    }
}

fn is_eligible(demand: &Demand, node: &Candidate) -> bool {
    (demand.roles.is_empty() || demand.roles.contains(&node.role))
        && (!demand.needs_gpu || node.gpus > 0)
        && demand.zone.as_ref().is_none_or(|z| z.matches(&node.zone))
}

fn sorted_nodes(nodes: &[Candidate]) -> Result<Vec<&Candidate>, PlacementError> {
    let mut sorted: Vec<&Candidate> = nodes.iter().collect();
    sorted.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].name == pair[1].name) {
        return Err(PlacementError::DuplicateNode {
            node: pair[0].name.clone(),
        });
    }
    Ok(sorted)
}

fn ordered_demands(demands: &[Demand]) -> Result<Vec<&Demand>, PlacementError> {
    let mut ordered: Vec<&Demand> = demands.iter().collect();
    ordered.sort_by_key(|&demand| {
        (
            !demand.needs_gpu,
            demand.roles.is_empty(),
            demand.max_per_node.is_none(),
            &demand.expert,
        )
    });
    let mut seen = BTreeSet::new();
    for demand in &ordered {
        if demand.replicas == 0 {
            return Err(PlacementError::InvalidReplicas {
                expert: demand.expert.clone(),
            });
        }
        if !seen.insert(demand.expert.as_str()) {
            return Err(PlacementError::DuplicateExpert {
                expert: demand.expert.clone(),
            });
        }
    }
    Ok(ordered)
}

/// Says which constraint no live node meets, for a demand with no eligible node.
fn ineligibility_reason(demand: &Demand, nodes: &[&Candidate]) -> String {
    if let Some(zone) = &demand.zone {
        let inside: Vec<&Candidate> = nodes
            .iter()
            .copied()
            .filter(|n| zone.matches(&n.zone))
            .collect();
        if inside.is_empty() {
            return format!("zone {zone}: no live node is in it");
        }
        let unzoned = Demand {
            zone: None,
            ..demand.clone()
        };
        return format!(
            "in zone {zone}: {}",
            ineligibility_reason(&unzoned, &inside)
        );
    }
    let has_gpu = nodes.iter().any(|node| node.gpus > 0);
    let has_role = nodes.iter().any(|node| demand.roles.contains(&node.role));
    let roles = (!demand.roles.is_empty()).then(|| {
        demand
            .roles
            .iter()
            .map(|role| role.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    });
    match roles {
        _ if demand.needs_gpu && !has_gpu => "needs a GPU and no live node has one".to_owned(),
        Some(roles) if !has_role => format!("roles [{roles}]: no live node has one of them"),
        Some(roles) if demand.needs_gpu => format!(
            "needs a GPU and roles [{roles}]: no live node with one of those roles has a GPU"
        ),
        _ => "no live node is available".to_owned(),
    }
}

/// `1 node` / `2 nodes`: messages read by operators should not say "1 nodes".
fn count(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn limit_source(limit: &Option<usize>) -> String {
    match limit {
        Some(n) => format!(
            "its own limit is {}",
            count(*n, "expert per node", "experts per node")
        ),
        None => "it sets no limit itself; experts already on those nodes do".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &str, role: Role, gpus: u32, cpu_load: f64) -> Candidate {
        Candidate {
            name: name.to_owned(),
            role,
            gpus,
            cpu_load,
            sensors: Vec::new(),
            zone: String::new(),
        }
    }

    fn fog(name: &str, cpu_load: f64) -> Candidate {
        node(name, Role::Fog, 0, cpu_load)
    }

    fn demand(expert: &str, replicas: usize) -> Demand {
        Demand {
            expert: expert.to_owned(),
            replicas,
            roles: Vec::new(),
            needs_gpu: false,
            near: None,
            max_per_node: None,
            zone: None,
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| (*name).to_owned()).collect()
    }

    fn assignment(entries: &[(&str, &[&str])]) -> Assignment {
        entries
            .iter()
            .map(|(expert, nodes)| ((*expert).to_owned(), names(nodes)))
            .collect()
    }

    fn zoned(name: &str, zone: &str) -> Candidate {
        Candidate {
            zone: zone.to_owned(),
            ..fog(name, 0.0)
        }
    }

    #[test]
    fn a_zone_pattern_keeps_replicas_inside_its_zones() {
        let nodes = [
            zoned("cloud-1", "cloud"),
            zoned("gw-1", "site-1/area-1/cell-1"),
            zoned("gw-2", "site-1/area-2/cell-1"),
            zoned("gw-3", "site-2/area-1/cell-1"),
            fog("loose", 0.0),
        ];
        let site = Demand {
            zone: Some(ZonePattern::parse("site-1/*").unwrap()),
            ..demand("cell-ae", 2)
        };
        let placed = place(std::slice::from_ref(&site), &nodes, &Assignment::new());
        assert_eq!(placed, Ok(assignment(&[("cell-ae", &["gw-1", "gw-2"])])));
        // Three replicas do not fit in site-1: the error says so by zone.
        let err = place(
            &[Demand {
                replicas: 3,
                ..site
            }],
            &nodes,
            &Assignment::new(),
        )
        .unwrap_err();
        assert!(
            matches!(err, PlacementError::TooFewNodes { eligible: 2, .. }),
            "{err}"
        );
        let nowhere = Demand {
            zone: Some(ZonePattern::parse("site-9").unwrap()),
            ..demand("lost", 1)
        };
        assert_eq!(
            place(&[nowhere], &nodes, &Assignment::new())
                .unwrap_err()
                .to_string(),
            "expert `lost` cannot be placed: zone site-9: no live node is in it"
        );
        let gpu_in_cloud = Demand {
            zone: Some(ZonePattern::parse("cloud").unwrap()),
            needs_gpu: true,
            ..demand("vision", 1)
        };
        assert_eq!(
            place(&[gpu_in_cloud], &nodes, &Assignment::new())
                .unwrap_err()
                .to_string(),
            "expert `vision` cannot be placed: in zone cloud: needs a GPU and no live node has one"
        );
    }

    #[test]
    fn gpu_demand_lands_only_on_gpu_nodes() {
        let nodes = [fog("a", 0.0), node("b", Role::Cloud, 2, 0.9), fog("c", 0.1)];
        let vision = Demand {
            needs_gpu: true,
            ..demand("vision", 1)
        };
        let placed = place(&[vision], &nodes, &Assignment::new());
        assert_eq!(placed, Ok(assignment(&[("vision", &["b"])])));
    }

    #[test]
    fn gpu_demand_without_gpu_node_names_the_reason() {
        let vision = Demand {
            needs_gpu: true,
            ..demand("vision", 1)
        };
        let err = place(&[vision], &[fog("a", 0.0)], &Assignment::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expert `vision` cannot be placed: needs a GPU and no live node has one"
        );
    }

    #[test]
    fn roles_restrict_the_hosts() {
        let nodes = [
            node("a", Role::Edge, 0, 0.5),
            fog("b", 0.0),
            node("c", Role::Cloud, 0, 0.0),
        ];
        let gateway = Demand {
            roles: vec![Role::Edge],
            ..demand("gateway", 1)
        };
        let placed = place(&[gateway], &nodes, &Assignment::new());
        assert_eq!(placed, Ok(assignment(&[("gateway", &["a"])])));
    }

    #[test]
    fn missing_role_names_the_roles() {
        let archive = Demand {
            roles: vec![Role::Cloud],
            ..demand("archive", 1)
        };
        let err = place(&[archive], &[fog("a", 0.0)], &Assignment::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expert `archive` cannot be placed: roles [cloud]: no live node has one of them"
        );
    }

    #[test]
    fn gpu_on_the_wrong_role_names_both_constraints() {
        let trainer = Demand {
            needs_gpu: true,
            roles: vec![Role::Edge, Role::Fog],
            ..demand("trainer", 1)
        };
        let nodes = [fog("a", 0.0), node("b", Role::Cloud, 4, 0.0)];
        let err = place(&[trainer], &nodes, &Assignment::new()).unwrap_err();
        assert_eq!(
            err,
            PlacementError::NoEligibleNode {
                expert: "trainer".to_owned(),
                reason: "needs a GPU and roles [edge, fog]: no live node with one of those \
                         roles has a GPU"
                    .to_owned(),
            }
        );
    }

    #[test]
    fn no_live_node_at_all() {
        let err = place(&[demand("pump-ae", 1)], &[], &Assignment::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expert `pump-ae` cannot be placed: no live node is available"
        );
    }

    #[test]
    fn near_sensor_beats_load() {
        let mut busy_node = fog("b", 0.9);
        busy_node.sensors = names(&["vib-7"]);
        let nodes = [fog("a", 0.0), busy_node, fog("c", 0.0)];
        let pump = Demand {
            near: Some("vib-7".to_owned()),
            ..demand("pump-ae", 2)
        };
        let placed = place(&[pump], &nodes, &Assignment::new());
        assert_eq!(placed, Ok(assignment(&[("pump-ae", &["a", "b"])])));
    }

    #[test]
    fn near_sensor_nowhere_is_only_a_preference() {
        let pump = Demand {
            near: Some("missing".to_owned()),
            ..demand("pump-ae", 1)
        };
        let placed = place(&[pump], &[fog("a", 0.3), fog("b", 0.2)], &Assignment::new());
        assert_eq!(placed, Ok(assignment(&[("pump-ae", &["b"])])));
    }

    #[test]
    fn least_loaded_node_is_chosen() {
        let nodes = [fog("a", 0.7), fog("b", 0.2), fog("c", 0.5)];
        let placed = place(&[demand("pump-ae", 2)], &nodes, &Assignment::new());
        assert_eq!(placed, Ok(assignment(&[("pump-ae", &["b", "c"])])));
    }

    #[test]
    fn fewer_experts_beats_lower_cpu_load() {
        let nodes = [fog("a", 0.0), fog("b", 0.8)];
        let placed = place(
            &[demand("fan-ae", 1), demand("pump-ae", 1)],
            &nodes,
            &Assignment::new(),
        );
        assert_eq!(
            placed,
            Ok(assignment(&[("fan-ae", &["a"]), ("pump-ae", &["b"])]))
        );
    }

    #[test]
    fn ties_break_by_name() {
        let nodes = [fog("c", 0.1), fog("a", 0.1), fog("b", 0.1)];
        let placed = place(&[demand("pump-ae", 2)], &nodes, &Assignment::new());
        assert_eq!(placed, Ok(assignment(&[("pump-ae", &["a", "b"])])));
    }

    #[test]
    fn garbled_load_report_does_not_attract_work() {
        let nodes = [fog("a", f64::NAN), fog("b", 0.9)];
        let placed = place(&[demand("pump-ae", 1)], &nodes, &Assignment::new());
        assert_eq!(placed, Ok(assignment(&[("pump-ae", &["b"])])));
    }

    #[test]
    fn joining_node_moves_nothing() {
        let demands = [demand("pump-ae", 2), demand("fan-ae", 1)];
        let mut nodes = vec![fog("b", 0.5), fog("c", 0.5), fog("d", 0.5)];
        let first = place(&demands, &nodes, &Assignment::new()).unwrap();
        nodes.push(fog("a", 0.0));
        assert_eq!(place(&demands, &nodes, &first), Ok(first));
    }

    #[test]
    fn leaving_node_moves_only_its_replicas() {
        let demands = [demand("pump-ae", 2), demand("fan-ae", 1)];
        let nodes = [fog("a", 0.1), fog("b", 0.2), fog("c", 0.3), fog("d", 0.4)];
        let first = place(&demands, &nodes, &Assignment::new()).unwrap();
        assert_eq!(
            first,
            assignment(&[("fan-ae", &["a"]), ("pump-ae", &["b", "c"])])
        );
        let without_b = [fog("a", 0.1), fog("c", 0.3), fog("d", 0.4)];
        let second = place(&demands, &without_b, &first);
        assert_eq!(
            second,
            Ok(assignment(&[("fan-ae", &["a"]), ("pump-ae", &["c", "d"])]))
        );
    }

    #[test]
    fn previous_host_that_lost_its_gpu_is_replaced() {
        let vision = Demand {
            needs_gpu: true,
            ..demand("vision", 1)
        };
        let nodes = [fog("a", 0.0), node("b", Role::Fog, 1, 0.9)];
        let previous = assignment(&[("vision", &["a"])]);
        let placed = place(&[vision], &nodes, &previous);
        assert_eq!(placed, Ok(assignment(&[("vision", &["b"])])));
    }

    #[test]
    fn fewer_replicas_keeps_the_first_by_name_and_drops_retired_experts() {
        let nodes = [fog("a", 0.9), fog("b", 0.0), fog("c", 0.0)];
        let previous = assignment(&[("pump-ae", &["c", "a", "b"]), ("retired", &["a"])]);
        let placed = place(&[demand("pump-ae", 2)], &nodes, &previous);
        assert_eq!(placed, Ok(assignment(&[("pump-ae", &["a", "b"])])));
    }

    #[test]
    fn too_few_nodes_is_refused_with_numbers() {
        let nodes = [fog("a", 0.0), fog("b", 0.0)];
        let err = place(&[demand("pump-ae", 3)], &nodes, &Assignment::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expert `pump-ae` wants 3 replicas on distinct nodes but only 2 live nodes meet \
             its constraints"
        );
        let err = place(&[demand("pump-ae", 2)], &nodes[..1], &Assignment::new()).unwrap_err();
        assert_eq!(
            err,
            PlacementError::TooFewNodes {
                expert: "pump-ae".to_owned(),
                replicas: 2,
                eligible: 1,
            }
        );
        assert!(err
            .to_string()
            .ends_with("only 1 live node meets its constraints"));
    }

    #[test]
    fn one_failing_expert_refuses_the_whole_placement() {
        let nodes = [fog("a", 0.0)];
        let placed = place(
            &[demand("fan-ae", 1), demand("pump-ae", 2)],
            &nodes,
            &Assignment::new(),
        );
        assert!(matches!(placed, Err(PlacementError::TooFewNodes { .. })));
    }

    #[test]
    fn co_tenancy_limit_spreads_experts() {
        let alone = |expert: &str| Demand {
            max_per_node: Some(1),
            ..demand(expert, 1)
        };
        let nodes = [fog("a", 0.0), fog("b", 0.9)];
        let placed = place(
            &[alone("fan-ae"), alone("pump-ae")],
            &nodes,
            &assignment(&[("fan-ae", &["a"]), ("pump-ae", &["a"])]),
        );
        assert_eq!(
            placed,
            Ok(assignment(&[("fan-ae", &["a"]), ("pump-ae", &["b"])]))
        );

        let err = place(
            &[alone("fan-ae"), alone("pump-ae"), alone("valve-ae")],
            &nodes,
            &Assignment::new(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "expert `valve-ae` wants 1 replica but max_per_node limits leave room on only 0 \
             of the 2 live nodes that meet its constraints (its own limit is 1 expert per \
             node); add nodes or raise the limit"
        );
    }

    #[test]
    fn another_experts_limit_blocks_a_node() {
        let hermit = Demand {
            max_per_node: Some(1),
            ..demand("hermit", 1)
        };
        let err = place(
            &[hermit, demand("pump-ae", 1)],
            &[fog("a", 0.0)],
            &Assignment::new(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            PlacementError::CoTenancy {
                expert: "pump-ae".to_owned(),
                replicas: 1,
                fits: 0,
                eligible: 1,
                limit: None,
            }
        );
        assert!(err
            .to_string()
            .contains("it sets no limit itself; experts already on those nodes do"));
    }

    #[test]
    fn constrained_experts_go_first() {
        let solo = |expert: &str, needs_gpu: bool| Demand {
            needs_gpu,
            max_per_node: Some(1),
            ..demand(expert, 1)
        };
        // By name alone `a-any` would take the idle GPU node and starve `z-vision`.
        let nodes = [node("gpu", Role::Fog, 1, 0.0), fog("plain", 0.5)];
        let placed = place(
            &[solo("a-any", false), solo("z-vision", true)],
            &nodes,
            &Assignment::new(),
        );
        assert_eq!(
            placed,
            Ok(assignment(&[("a-any", &["plain"]), ("z-vision", &["gpu"])]))
        );
    }

    #[test]
    fn invalid_inputs_are_refused() {
        let nodes = [fog("a", 0.0)];
        assert_eq!(
            place(&[demand("pump-ae", 0)], &nodes, &Assignment::new()),
            Err(PlacementError::InvalidReplicas {
                expert: "pump-ae".to_owned()
            })
        );
        assert_eq!(
            place(
                &[demand("pump-ae", 1), demand("pump-ae", 1)],
                &nodes,
                &Assignment::new()
            ),
            Err(PlacementError::DuplicateExpert {
                expert: "pump-ae".to_owned()
            })
        );
        assert_eq!(
            place(
                &[demand("pump-ae", 1)],
                &[fog("a", 0.0), fog("a", 0.5)],
                &Assignment::new()
            ),
            Err(PlacementError::DuplicateNode {
                node: "a".to_owned()
            })
        );
        assert_eq!(place(&[], &[], &Assignment::new()), Ok(Assignment::new()));
    }

    #[test]
    fn input_order_does_not_matter() {
        let mut with_sensor = node("c", Role::Cloud, 1, 0.2);
        with_sensor.sensors = names(&["cam-1"]);
        let nodes = vec![
            fog("a", 0.2),
            node("b", Role::Edge, 0, 0.1),
            with_sensor,
            fog("d", 0.2),
        ];
        let demands = vec![
            demand("fan-ae", 2),
            Demand {
                needs_gpu: true,
                near: Some("cam-1".to_owned()),
                ..demand("vision", 1)
            },
            Demand {
                roles: vec![Role::Fog, Role::Edge],
                max_per_node: Some(2),
                ..demand("pump-ae", 2)
            },
        ];
        let forward = place(&demands, &nodes, &Assignment::new()).unwrap();
        let mut nodes_back = nodes.clone();
        nodes_back.reverse();
        let mut demands_back = demands.clone();
        demands_back.rotate_left(1);
        assert_eq!(
            place(&demands_back, &nodes_back, &Assignment::new()),
            Ok(forward.clone())
        );
        assert_eq!(
            place(&demands, &nodes, &Assignment::new()),
            Ok(forward.clone())
        );
        assert_eq!(forward["vision"], names(&["c"]));
    }

    const SENSORS: [&str; 3] = ["s0", "s1", "s2"];
    const ROLES: [Role; 3] = [Role::Edge, Role::Fog, Role::Cloud];
    const ZONES: [&str; 4] = ["site-1/cell-1", "site-1/cell-2", "site-2/cell-1", ""];
    const PATTERNS: [&str; 3] = ["site-1", "site-1/*", "*/cell-1"];

    fn arb_nodes() -> impl Strategy<Value = Vec<Candidate>> {
        let spec = (
            prop::sample::select(ROLES.to_vec()),
            0u32..3,
            // Few distinct loads, so ties and the name tie-break are exercised.
            (0u8..=4).prop_map(|quarters| f64::from(quarters) / 4.0),
            prop::sample::subsequence(SENSORS.to_vec(), 0..=2),
            prop::sample::select(ZONES.to_vec()),
        );
        prop::collection::vec(spec, 0..7).prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (role, gpus, cpu_load, sensors, zone))| Candidate {
                    name: format!("node-{i}"),
                    role,
                    gpus,
                    cpu_load,
                    sensors: names(&sensors),
                    zone: zone.to_owned(),
                })
                .collect()
        })
    }

    fn arb_demands() -> impl Strategy<Value = Vec<Demand>> {
        let spec = (
            1usize..4,
            prop::sample::subsequence(ROLES.to_vec(), 0..=2),
            prop::bool::weighted(0.3),
            prop::option::of(prop::sample::select(SENSORS.to_vec())),
            prop::option::weighted(0.4, 1usize..4),
            prop::option::weighted(0.3, prop::sample::select(PATTERNS.to_vec())),
        );
        prop::collection::vec(spec, 0..5).prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(
                    |(i, (replicas, roles, needs_gpu, near, max_per_node, zone))| Demand {
                        expert: format!("expert-{i}"),
                        replicas,
                        roles,
                        needs_gpu,
                        near: near.map(str::to_owned),
                        max_per_node,
                        zone: zone.map(|z| ZonePattern::parse(z).unwrap()),
                    },
                )
                .collect()
        })
    }

    /// Previous assignments that may name retired experts and nodes that never existed.
    fn arb_previous() -> impl Strategy<Value = Assignment> {
        let node_names: Vec<String> = (0..9).map(|i| format!("node-{i}")).collect();
        prop::collection::vec(prop::sample::subsequence(node_names, 0..=4), 6).prop_map(|lists| {
            lists
                .into_iter()
                .enumerate()
                .filter(|(_, list)| !list.is_empty())
                .map(|(i, list)| (format!("expert-{i}"), list))
                .collect()
        })
    }

    fn assert_valid(demands: &[Demand], nodes: &[Candidate], placed: &Assignment) {
        assert_eq!(placed.len(), demands.len());
        let mut per_node: BTreeMap<&str, Vec<&Demand>> = BTreeMap::new();
        for demand in demands {
            let chosen = &placed[&demand.expert];
            assert_eq!(chosen.len(), demand.replicas, "{}", demand.expert);
            assert!(
                chosen.windows(2).all(|pair| pair[0] < pair[1]),
                "not sorted and distinct: {chosen:?}"
            );
            for name in chosen {
                let host = nodes.iter().find(|node| &node.name == name);
                let host = host.unwrap_or_else(|| panic!("{name} is not live"));
                assert!(is_eligible(demand, host), "{name} for {}", demand.expert);
                per_node.entry(name).or_default().push(demand);
            }
        }
        for (name, experts) in per_node {
            if let Some(cap) = experts.iter().filter_map(|d| d.max_per_node).min() {
                assert!(experts.len() <= cap, "{name} hosts {}", experts.len());
            }
        }
    }

    proptest! {
        #[test]
        fn ok_placements_meet_every_constraint(
            demands in arb_demands(),
            nodes in arb_nodes(),
            previous in arb_previous(),
        ) {
            if let Ok(placed) = place(&demands, &nodes, &previous) {
                assert_valid(&demands, &nodes, &placed);
            }
        }

        #[test]
        fn placing_again_changes_nothing(
            demands in arb_demands(),
            nodes in arb_nodes(),
            previous in arb_previous(),
        ) {
            if let Ok(placed) = place(&demands, &nodes, &previous) {
                prop_assert_eq!(place(&demands, &nodes, &placed), Ok(placed));
            }
        }

        #[test]
        fn losing_a_node_keeps_every_other_replica(
            demands in arb_demands(),
            nodes in arb_nodes(),
            gone in any::<prop::sample::Index>(),
        ) {
            prop_assume!(!nodes.is_empty());
            if let Ok(placed) = place(&demands, &nodes, &Assignment::new()) {
                let mut remaining = nodes.clone();
                let gone = remaining.remove(gone.index(nodes.len())).name;
                if let Ok(again) = place(&demands, &remaining, &placed) {
                    assert_valid(&demands, &remaining, &again);
                    for (expert, before) in &placed {
                        for name in before.iter().filter(|name| **name != gone) {
                            prop_assert!(again[expert].contains(name), "{} left {}", expert, name);
                        }
                    }
                }
            }
        }

        #[test]
        fn input_order_never_matters(
            demands in arb_demands(),
            nodes in arb_nodes(),
            previous in arb_previous(),
        ) {
            let mut demands_back = demands.clone();
            demands_back.reverse();
            let mut nodes_back = nodes.clone();
            nodes_back.reverse();
            prop_assert_eq!(
                place(&demands, &nodes, &previous),
                place(&demands_back, &nodes_back, &previous)
            );
        }
    }
}
