//! A simulation's scenario (`scenario.toml`): the plant as a tree of zones, the nodes
//! in each, the links inside a zone and the conduit up to its parent, a `mesh.toml` to
//! apply, a schedule of faults and the expectations checked at the end.
//!
//! Every value is checked when the file is read, and an error names the field, the
//! value and the limit, so a researcher never waits for a run that was wrong from the
//! start. [`Scenario::links`] resolves the link between any two nodes: inside a zone
//! the zone's `link`; across zones every `uplink` on the path through the zone tree,
//! latencies and jitters added, losses compounded, the slowest bandwidth kept.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fogmesh_cluster::config::GOSSIP_INTERVAL_MS;
use fogmesh_cluster::zone::{check_zone, MAX_ZONE_DEPTH, MAX_ZONE_SEGMENT};
use serde::{Deserialize, Serialize};

/// The most nodes one scenario may start (each is a `fogmesh node` process).
pub const MAX_NODES: usize = 2_000;
/// The longest simulated run, in seconds (a day).
pub const MAX_DURATION_S: f64 = 86_400.0;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Syntax {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: invalid {field} = {value}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        value: String,
        reason: String,
    },
}

/// How a link carries bytes one way. Every field has a default, so `{}` is a LAN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkSpec {
    pub latency_ms: f64,
    /// Each chunk's latency is drawn uniformly from `latency ± jitter` (never below 0).
    pub jitter_ms: f64,
    /// `None`: no limit.
    pub bandwidth_mbps: Option<f64>,
    /// Chance that a datagram is dropped, or that a TCP chunk waits one
    /// retransmission timeout ([`crate::sim::network::RETRANSMISSION_TIMEOUT`]).
    pub loss: f64,
}

impl Default for LinkSpec {
    fn default() -> Self {
        LinkSpec {
            latency_ms: 0.1,
            jitter_ms: 0.0,
            bandwidth_mbps: None,
            loss: 0.0,
        }
    }
}

impl LinkSpec {
    /// This link followed by `next`.
    fn then(self, next: LinkSpec) -> LinkSpec {
        LinkSpec {
            latency_ms: self.latency_ms + next.latency_ms,
            jitter_ms: self.jitter_ms + next.jitter_ms,
            bandwidth_mbps: match (self.bandwidth_mbps, next.bandwidth_mbps) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            loss: 1.0 - (1.0 - self.loss) * (1.0 - next.loss),
        }
    }

    fn check(&self, field: &str, invalid: &mut dyn FnMut(String, String, String)) {
        if !(self.latency_ms.is_finite() && (0.0..=60_000.0).contains(&self.latency_ms)) {
            invalid(
                format!("{field}.latency_ms"),
                self.latency_ms.to_string(),
                "from 0 to 60000".into(),
            );
        }
        if !(self.jitter_ms.is_finite() && (0.0..=60_000.0).contains(&self.jitter_ms)) {
            invalid(
                format!("{field}.jitter_ms"),
                self.jitter_ms.to_string(),
                "from 0 to 60000".into(),
            );
        }
        if let Some(b) = self.bandwidth_mbps {
            if !(b.is_finite() && b >= 0.001) {
                invalid(
                    format!("{field}.bandwidth_mbps"),
                    b.to_string(),
                    "at least 0.001 (1 kbit/s); leave it out for no limit".into(),
                );
            }
        }
        if !(self.loss.is_finite() && (0.0..=1.0).contains(&self.loss)) {
            invalid(
                format!("{field}.loss"),
                self.loss.to_string(),
                "a share from 0 to 1".into(),
            );
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    simulation: SimulationSection,
    #[serde(default)]
    zones: Vec<ZoneSpec>,
    nodes: Vec<NodeGroup>,
    #[serde(default)]
    sensors: Vec<SensorPlan>,
    #[serde(default)]
    faults: Vec<FaultSpec>,
    #[serde(default)]
    expect: Vec<Expectation>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulationSection {
    name: String,
    #[serde(default = "default_seed")]
    seed: u64,
    /// Simulated seconds from the moment the mesh formed.
    duration_s: f64,
    /// Longest wait for every node to see every other before the clock starts.
    #[serde(default = "default_formation_s")]
    formation_s: f64,
    /// How often every node's view of the mesh is read, in milliseconds.
    #[serde(default = "default_observe_ms")]
    observe_ms: u64,
    /// Every node's `[cluster] gossip_interval_ms`.
    #[serde(default = "default_gossip_interval_ms")]
    gossip_interval_ms: u64,
    /// A `mesh.toml` applied when the clock starts (relative to the scenario).
    #[serde(default)]
    mesh: Option<PathBuf>,
    /// Zones are closed segments (`[node] segmented` on every node): nodes link only
    /// within their zones, and between zones through the nodes with `conduits`.
    #[serde(default)]
    segmented: bool,
    /// Nodes prove who they are with certificates of a mesh CA the run makes (as a
    /// plant's nodes do), instead of plaintext links that carry the mesh secret.
    #[serde(default)]
    tls: bool,
}

fn default_seed() -> u64 {
    1
}
fn default_formation_s() -> f64 {
    60.0
}
fn default_observe_ms() -> u64 {
    250
}
fn default_gossip_interval_ms() -> u64 {
    200
}

/// A zone of the plant network: an ISA-95 level's cell, area, site or the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSpec {
    pub name: String,
    /// The zone one level up; the root zone has none.
    #[serde(default)]
    pub parent: Option<String>,
    /// Between two nodes of this zone.
    #[serde(default)]
    pub link: LinkSpec,
    /// The conduit to `parent`.
    #[serde(default)]
    pub uplink: LinkSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeGroup {
    /// With `count`, the nodes are `name-1` … `name-<count>`.
    name: String,
    #[serde(default)]
    count: Option<usize>,
    role: String,
    #[serde(default)]
    zone: Option<String>,
    /// Other zones these nodes are gateways into (`[node] conduits`).
    #[serde(default)]
    conduits: Vec<String>,
    /// Started this many seconds after the clock starts (a node joining); by default
    /// before it, as part of the mesh that forms.
    #[serde(default)]
    join_at_s: Option<f64>,
}

/// One simulated node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodePlan {
    pub name: String,
    pub role: String,
    pub zone: String,
    /// The zones it is a gateway into, by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conduits: Vec<String>,
    pub join_at_s: Option<f64>,
}

/// `[[sensors]]`: a field device replaying a recording into one node's sensor stream
/// (see `crate::sim::sensors`). The stream itself, its router and the experts are
/// declared by the scenario's `mesh.toml`, as on a plant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorPlan {
    /// The sensor stream's id.
    pub id: String,
    /// The node the device is wired to.
    pub node: String,
    /// A fogrec recording, relative to the scenario (`just setup` makes TEP's under
    /// `data/tep`).
    pub recording: PathBuf,
    /// The recording's columns, in the stream's channel order.
    pub columns: Vec<String>,
    /// Recording seconds per simulated second.
    #[serde(default = "default_speed")]
    pub speed: f64,
    /// Rows per `Ingest` batch.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
}

fn default_speed() -> f64 {
    1.0
}
fn default_batch_rows() -> usize {
    10
}

/// Most rows one device sends per batch.
pub const MAX_BATCH_ROWS: usize = 10_000;

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// `kill -9`: the process is gone, its sockets close.
    Kill,
    /// SIGSTOP: the process holds its sockets and answers nothing.
    Freeze,
    /// SIGCONT after a freeze.
    Thaw,
    /// Started again from its data folder after a kill.
    Restart,
    /// Links from `from` to `to` carry nothing (both ways unless `one_way`).
    Cut,
    /// Links from `from` to `to` carry again (both ways unless `one_way`).
    Heal,
    /// Links from `from` to `to` take `link` instead of their scenario value.
    Degrade,
    /// `fogmesh apply` of the scenario's mesh (or `mesh`) through `node`.
    Apply,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub at_s: f64,
    pub action: FaultAction,
    /// Kill, freeze, thaw, restart: the nodes. Apply: the one node asked.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Cut, heal, degrade: node or zone names on each side.
    #[serde(default)]
    pub from: Vec<String>,
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub one_way: bool,
    #[serde(default)]
    pub link: Option<LinkSpec>,
    /// Apply: another `mesh.toml` (relative to the scenario).
    #[serde(default)]
    pub mesh: Option<PathBuf>,
}

/// A figure the run must show, checked on the observed trace at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "check", rename_all = "snake_case", deny_unknown_fields)]
pub enum Expectation {
    /// Every node of `by` (nodes or zones; by default every other node) that is
    /// running sees `node` down (no member, or its link not ready) within `within_s`
    /// of fault number `fault` (0-based, in file order).
    DeclaredDown {
        node: String,
        fault: usize,
        within_s: f64,
        #[serde(default)]
        by: Vec<String>,
    },
    /// No node sees a peer down unless a fault touched one of the two (killed,
    /// frozen, or a link between them cut). `nodes`: only events where one of the two
    /// is among these nodes (or in these zones) are watched.
    NoSpuriousDown {
        #[serde(default)]
        nodes: Vec<String>,
    },
    /// Within `within_s` of fault number `fault`, every running node sees every other
    /// running node up over a ready link, and all hold the same spec version.
    Converged { fault: usize, within_s: f64 },
    /// The apply of fault number `fault` was refused (`accepted = false`) or taken.
    Applied { fault: usize, accepted: bool },
    /// In no observation after the clock started did the answering nodes' replicas
    /// of `expert` serve more than `at_most` model versions between them.
    ActiveVersions { expert: String, at_most: usize },
    /// Every `[[sensors]]` device's node, at the end, had accepted every row it
    /// acknowledged to the device (devices on a node killed or restarted are not
    /// checked: its counters start afresh with its process).
    NoAckedSampleLost {},
}

/// A checked scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    pub seed: u64,
    pub duration_s: f64,
    pub formation_s: f64,
    pub observe_ms: u64,
    pub gossip_interval_ms: u64,
    /// Nodes link only within their zones (see [`Scenario::may_link`]).
    pub segmented: bool,
    /// Nodes run with `[tls]` certificates of a mesh CA made for the run.
    pub tls: bool,
    pub zones: Vec<ZoneSpec>,
    pub nodes: Vec<NodePlan>,
    /// The field devices, their recordings' paths resolved against the scenario's folder.
    pub sensors: Vec<SensorPlan>,
    pub faults: Vec<FaultSpec>,
    pub expect: Vec<Expectation>,
    /// The text of the `mesh.toml` applied at the start, if any.
    pub mesh: Option<String>,
    /// The folder the scenario's relative paths start from.
    #[serde(skip)]
    pub folder: PathBuf,
    /// The scenario file, for errors.
    #[serde(skip)]
    pub file: PathBuf,
}

/// The root zone every zone-less node lands in when the scenario names no zones.
pub const DEFAULT_ZONE: &str = "plant";

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Scenario::parse(&text, path)
    }

    /// Parses and checks `text`; `path` names the file in errors and anchors its
    /// relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Scenario, ScenarioError> {
        let file: ScenarioFile = toml::from_str(text).map_err(|e| ScenarioError::Syntax {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        let folder = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut problems = Vec::new();
        let mut invalid = |field: String, value: String, reason: String| {
            problems.push((field, value, reason));
        };
        let sim = &file.simulation;
        if sim.name.trim().is_empty() {
            invalid("simulation.name".into(), "\"\"".into(), "a name".into());
        }
        if !(sim.duration_s.is_finite() && sim.duration_s > 0.0 && sim.duration_s <= MAX_DURATION_S)
        {
            invalid(
                "simulation.duration_s".into(),
                sim.duration_s.to_string(),
                format!("above 0, at most {MAX_DURATION_S}"),
            );
        }
        if !(sim.formation_s.is_finite() && (1.0..=3_600.0).contains(&sim.formation_s)) {
            invalid(
                "simulation.formation_s".into(),
                sim.formation_s.to_string(),
                "from 1 to 3600".into(),
            );
        }
        if !(50..=60_000).contains(&sim.observe_ms) {
            invalid(
                "simulation.observe_ms".into(),
                sim.observe_ms.to_string(),
                "from 50 to 60000".into(),
            );
        }
        if !GOSSIP_INTERVAL_MS.contains(&sim.gossip_interval_ms) {
            invalid(
                "simulation.gossip_interval_ms".into(),
                sim.gossip_interval_ms.to_string(),
                format!(
                    "from {} to {}",
                    GOSSIP_INTERVAL_MS.start(),
                    GOSSIP_INTERVAL_MS.end()
                ),
            );
        }

        let mut zones = file.zones.clone();
        if zones.is_empty() {
            zones.push(ZoneSpec {
                name: DEFAULT_ZONE.into(),
                parent: None,
                link: LinkSpec::default(),
                uplink: LinkSpec::default(),
            });
        }
        let names: BTreeSet<&str> = zones.iter().map(|z| z.name.as_str()).collect();
        if names.len() != zones.len() {
            invalid(
                "zones.name".into(),
                format!("{:?}", zones.iter().map(|z| &z.name).collect::<Vec<_>>()),
                "every zone needs its own name".into(),
            );
        }
        let roots = zones.iter().filter(|z| z.parent.is_none()).count();
        if roots != 1 {
            invalid(
                "zones.parent".into(),
                format!("{roots} zones without a parent"),
                "exactly one root zone (the top level)".into(),
            );
        }
        for (i, zone) in zones.iter().enumerate() {
            // A zone's name is one level of the path its nodes get as `[node] zone`.
            if zone.name.contains('/') || check_zone(&zone.name).is_err() {
                invalid(
                    format!("zones[{i}].name"),
                    format!("{:?}", zone.name),
                    format!("1 to {MAX_ZONE_SEGMENT} letters, digits, `-` or `_`"),
                );
            }
            zone.link.check(&format!("zones[{i}].link"), &mut invalid);
            zone.uplink
                .check(&format!("zones[{i}].uplink"), &mut invalid);
            if let Some(parent) = &zone.parent {
                if !names.contains(parent.as_str()) {
                    invalid(
                        format!("zones[{i}].parent"),
                        format!("{parent:?}"),
                        format!("one of the zones {names:?}"),
                    );
                }
            }
        }
        let parents: BTreeMap<&str, &str> = zones
            .iter()
            .filter_map(|z| z.parent.as_deref().map(|p| (z.name.as_str(), p)))
            .collect();
        for zone in &zones {
            let mut seen = BTreeSet::new();
            let mut at = zone.name.as_str();
            while let Some(up) = parents.get(at) {
                if !seen.insert(at) {
                    invalid(
                        "zones.parent".into(),
                        format!("{:?}", zone.name),
                        "zones form a tree: this one is its own ancestor".into(),
                    );
                    break;
                }
                at = up;
            }
            if seen.len() >= MAX_ZONE_DEPTH {
                invalid(
                    "zones.parent".into(),
                    format!("{:?}", zone.name),
                    format!("{} levels deep, at most {MAX_ZONE_DEPTH}", seen.len() + 1),
                );
            }
        }

        let default_zone = zones
            .iter()
            .find(|z| z.parent.is_none())
            .map_or(DEFAULT_ZONE.to_string(), |z| z.name.clone());
        let mut nodes = Vec::new();
        for (i, group) in file.nodes.iter().enumerate() {
            if !valid_name(&group.name) {
                invalid(
                    format!("nodes[{i}].name"),
                    format!("{:?}", group.name),
                    "letters, digits, '-' and '_'".into(),
                );
            }
            if !["edge", "fog", "cloud"].contains(&group.role.as_str()) {
                invalid(
                    format!("nodes[{i}].role"),
                    format!("{:?}", group.role),
                    "edge, fog or cloud".into(),
                );
            }
            let zone = group.zone.clone().unwrap_or_else(|| default_zone.clone());
            if !names.contains(zone.as_str()) {
                invalid(
                    format!("nodes[{i}].zone"),
                    format!("{zone:?}"),
                    format!("one of the zones {names:?}"),
                );
            }
            for (c, conduit) in group.conduits.iter().enumerate() {
                if !names.contains(conduit.as_str()) || *conduit == zone {
                    invalid(
                        format!("nodes[{i}].conduits[{c}]"),
                        format!("{conduit:?}"),
                        format!("one of the zones {names:?} other than the node's own"),
                    );
                }
            }
            if let Some(at) = group.join_at_s {
                if !(at.is_finite() && at >= 0.0 && at <= sim.duration_s) {
                    invalid(
                        format!("nodes[{i}].join_at_s"),
                        at.to_string(),
                        "within the run (0 to duration_s)".into(),
                    );
                }
            }
            let count = group.count.unwrap_or(1);
            if count == 0 || count > MAX_NODES {
                invalid(
                    format!("nodes[{i}].count"),
                    count.to_string(),
                    format!("from 1 to {MAX_NODES}"),
                );
                continue;
            }
            for n in 1..=count {
                nodes.push(NodePlan {
                    name: match group.count {
                        Some(_) => format!("{}-{n}", group.name),
                        None => group.name.clone(),
                    },
                    role: group.role.clone(),
                    zone: zone.clone(),
                    conduits: group.conduits.clone(),
                    join_at_s: group.join_at_s,
                });
            }
        }
        if nodes.is_empty() || nodes.len() > MAX_NODES {
            invalid(
                "nodes".into(),
                format!("{} nodes", nodes.len()),
                format!("from 1 to {MAX_NODES}"),
            );
        }
        let node_names: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        if node_names.len() != nodes.len() {
            invalid(
                "nodes.name".into(),
                "a name used twice".into(),
                "every node needs its own name (a group of `count` takes name-1 … name-N)".into(),
            );
        }
        if nodes.iter().all(|n| n.join_at_s.is_some()) {
            invalid(
                "nodes.join_at_s".into(),
                "every node joins later".into(),
                "at least one node forms the mesh at the start".into(),
            );
        }

        let mut sensor_ids = BTreeSet::new();
        for (i, sensor) in file.sensors.iter().enumerate() {
            if !valid_name(&sensor.id) {
                invalid(
                    format!("sensors[{i}].id"),
                    format!("{:?}", sensor.id),
                    "1 to 64 letters, digits, '-' or '_'".into(),
                );
            } else if !sensor_ids.insert(sensor.id.as_str()) {
                invalid(
                    format!("sensors[{i}].id"),
                    format!("{:?}", sensor.id),
                    "a sensor id not used by another device".into(),
                );
            }
            if !node_names.contains(sensor.node.as_str()) {
                invalid(
                    format!("sensors[{i}].node"),
                    format!("{:?}", sensor.node),
                    "a node of the scenario".into(),
                );
            }
            if sensor.columns.is_empty() {
                invalid(
                    format!("sensors[{i}].columns"),
                    "[]".into(),
                    "at least one column of the recording".into(),
                );
            }
            if !(sensor.speed.is_finite() && sensor.speed > 0.0 && sensor.speed <= 10_000.0) {
                invalid(
                    format!("sensors[{i}].speed"),
                    sensor.speed.to_string(),
                    "above 0, at most 10000".into(),
                );
            }
            if !(1..=MAX_BATCH_ROWS).contains(&sensor.batch_rows) {
                invalid(
                    format!("sensors[{i}].batch_rows"),
                    sensor.batch_rows.to_string(),
                    format!("from 1 to {MAX_BATCH_ROWS}"),
                );
            }
        }

        let place = |name: &str| node_names.contains(name) || names.contains(name);
        for (i, fault) in file.faults.iter().enumerate() {
            if !(fault.at_s.is_finite() && fault.at_s >= 0.0 && fault.at_s <= sim.duration_s) {
                invalid(
                    format!("faults[{i}].at_s"),
                    fault.at_s.to_string(),
                    "within the run (0 to duration_s)".into(),
                );
            }
            match fault.action {
                FaultAction::Kill
                | FaultAction::Freeze
                | FaultAction::Thaw
                | FaultAction::Restart
                | FaultAction::Apply => {
                    let wanted = if fault.action == FaultAction::Apply {
                        fault.nodes.len() == 1
                    } else {
                        !fault.nodes.is_empty()
                    };
                    if !wanted {
                        invalid(
                            format!("faults[{i}].nodes"),
                            format!("{:?}", fault.nodes),
                            if fault.action == FaultAction::Apply {
                                "exactly one node, the one asked to apply".into()
                            } else {
                                "at least one node".into()
                            },
                        );
                    }
                    for node in &fault.nodes {
                        if !node_names.contains(node.as_str()) {
                            invalid(
                                format!("faults[{i}].nodes"),
                                format!("{node:?}"),
                                "a node of the scenario".into(),
                            );
                        }
                    }
                }
                FaultAction::Cut | FaultAction::Heal | FaultAction::Degrade => {
                    for (side, names) in [("from", &fault.from), ("to", &fault.to)] {
                        if names.is_empty() {
                            invalid(
                                format!("faults[{i}].{side}"),
                                "[]".into(),
                                "at least one node or zone".into(),
                            );
                        }
                        for name in names {
                            if !place(name) {
                                invalid(
                                    format!("faults[{i}].{side}"),
                                    format!("{name:?}"),
                                    "a node or a zone of the scenario".into(),
                                );
                            }
                        }
                    }
                    match (&fault.link, fault.action) {
                        (Some(link), FaultAction::Degrade) => {
                            link.check(&format!("faults[{i}].link"), &mut invalid)
                        }
                        (None, FaultAction::Degrade) => invalid(
                            format!("faults[{i}].link"),
                            "none".into(),
                            "degrade needs the link it degrades to".into(),
                        ),
                        _ => {}
                    }
                }
            }
            if fault.action == FaultAction::Apply && fault.mesh.is_none() && sim.mesh.is_none() {
                invalid(
                    format!("faults[{i}].mesh"),
                    "none".into(),
                    "apply needs a mesh.toml (here or in [simulation] mesh)".into(),
                );
            }
        }
        for (i, expect) in file.expect.iter().enumerate() {
            let fault = match expect {
                Expectation::DeclaredDown { fault, .. }
                | Expectation::Converged { fault, .. }
                | Expectation::Applied { fault, .. } => Some(*fault),
                Expectation::NoSpuriousDown { .. }
                | Expectation::ActiveVersions { .. }
                | Expectation::NoAckedSampleLost {} => None,
            };
            if let Some(fault) = fault {
                if fault >= file.faults.len() {
                    invalid(
                        format!("expect[{i}].fault"),
                        fault.to_string(),
                        format!("the number of a fault, below {}", file.faults.len()),
                    );
                } else if matches!(expect, Expectation::Applied { .. })
                    && file.faults[fault].action != FaultAction::Apply
                {
                    invalid(
                        format!("expect[{i}].fault"),
                        fault.to_string(),
                        "an apply fault".into(),
                    );
                }
            }
            match expect {
                Expectation::DeclaredDown {
                    node, within_s, by, ..
                } => {
                    for name in by {
                        if !place(name) {
                            invalid(
                                format!("expect[{i}].by"),
                                format!("{name:?}"),
                                "a node or a zone of the scenario".into(),
                            );
                        }
                    }
                    if !node_names.contains(node.as_str()) {
                        invalid(
                            format!("expect[{i}].node"),
                            format!("{node:?}"),
                            "a node of the scenario".into(),
                        );
                    }
                    check_within(i, *within_s, &mut invalid);
                }
                Expectation::Converged { within_s, .. } => check_within(i, *within_s, &mut invalid),
                Expectation::NoSpuriousDown { nodes } => {
                    for node in nodes {
                        if !place(node) {
                            invalid(
                                format!("expect[{i}].nodes"),
                                format!("{node:?}"),
                                "a node or a zone of the scenario".into(),
                            );
                        }
                    }
                }
                Expectation::Applied { .. } => {}
                Expectation::NoAckedSampleLost {} => {
                    if file.sensors.is_empty() {
                        invalid(
                            format!("expect[{i}].check"),
                            "\"no_acked_sample_lost\"".into(),
                            "a scenario with [[sensors]]".into(),
                        );
                    }
                }
                Expectation::ActiveVersions { expert, at_most } => {
                    if expert.trim().is_empty() {
                        invalid(
                            format!("expect[{i}].expert"),
                            "\"\"".into(),
                            "an expert's name".into(),
                        );
                    }
                    if *at_most == 0 {
                        invalid(
                            format!("expect[{i}].at_most"),
                            "0".into(),
                            "at least 1".into(),
                        );
                    }
                }
            }
        }

        if let Some((field, value, reason)) = problems.into_iter().next() {
            return Err(ScenarioError::Invalid {
                path: path.to_path_buf(),
                field,
                value,
                reason,
            });
        }
        let read_mesh = |relative: &Path, field: &str| {
            let at = folder.join(relative);
            std::fs::read_to_string(&at).map_err(|e| ScenarioError::Invalid {
                path: path.to_path_buf(),
                field: field.into(),
                value: at.display().to_string(),
                reason: format!("cannot be read: {e}"),
            })
        };
        let mesh = sim
            .mesh
            .as_deref()
            .map(|m| read_mesh(m, "simulation.mesh"))
            .transpose()?;
        for (i, fault) in file.faults.iter().enumerate() {
            if let Some(m) = &fault.mesh {
                read_mesh(m, &format!("faults[{i}].mesh"))?;
            }
        }
        Ok(Scenario {
            name: sim.name.clone(),
            seed: sim.seed,
            duration_s: sim.duration_s,
            formation_s: sim.formation_s,
            observe_ms: sim.observe_ms,
            gossip_interval_ms: sim.gossip_interval_ms,
            segmented: sim.segmented,
            tls: sim.tls,
            zones,
            nodes,
            sensors: file
                .sensors
                .iter()
                .map(|sensor| SensorPlan {
                    recording: folder.join(&sensor.recording),
                    ..sensor.clone()
                })
                .collect(),
            faults: file.faults,
            expect: file.expect,
            mesh,
            folder,
            file: path.to_path_buf(),
        })
    }

    /// The same scenario run for `duration_s` instead (a short version of a long
    /// soak); refused when a fault or a join would fall after the end.
    pub fn with_duration(mut self, duration_s: f64) -> Result<Scenario, ScenarioError> {
        let latest = self
            .faults
            .iter()
            .map(|f| f.at_s)
            .chain(self.nodes.iter().filter_map(|n| n.join_at_s))
            .fold(0.0, f64::max);
        if !(duration_s.is_finite() && duration_s > 0.0 && duration_s <= MAX_DURATION_S)
            || duration_s < latest
        {
            return Err(ScenarioError::Invalid {
                path: self.file.clone(),
                field: "simulation.duration_s (--duration)".into(),
                value: duration_s.to_string(),
                reason: format!(
                    "above 0, at most {MAX_DURATION_S}, and not before the last fault or join ({latest} s)"
                ),
            });
        }
        self.duration_s = duration_s;
        Ok(self)
    }

    /// The link from node `from` to node `to` as the scenario lays it out.
    pub fn link(&self, from: usize, to: usize) -> LinkSpec {
        let (a, b) = (&self.nodes[from].zone, &self.nodes[to].zone);
        if a == b {
            return self.zone(a).map(|z| z.link).unwrap_or_default();
        }
        let up_a = self.ancestors(a);
        let up_b = self.ancestors(b);
        let common = up_a.iter().find(|z| up_b.contains(z)).cloned();
        let climb = |path: &[String]| {
            path.iter()
                .take_while(|z| Some(*z) != common.as_ref())
                .filter_map(|z| self.zone(z).map(|z| z.uplink))
                .collect::<Vec<_>>()
        };
        let mut hops = climb(&up_a);
        hops.extend(climb(&up_b).into_iter().rev());
        let first = hops.first().copied().unwrap_or_default();
        hops.into_iter().skip(1).fold(first, LinkSpec::then)
    }

    /// The nodes a fault's `from` or `to` names (nodes by name, zones with every node
    /// in them or below them).
    pub fn resolve(&self, names: &[String]) -> BTreeSet<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| {
                names.iter().any(|name| {
                    &node.name == name || self.ancestors(&node.zone).iter().any(|z| z == name)
                })
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// The zone and every zone above it, nearest first.
    fn ancestors(&self, zone: &str) -> Vec<String> {
        let mut out = vec![zone.to_string()];
        while let Some(parent) = self
            .zone(out.last().map_or("", |z| z.as_str()))
            .and_then(|z| z.parent.clone())
        {
            if out.contains(&parent) || out.len() > self.zones.len() {
                break;
            }
            out.push(parent);
        }
        out
    }

    fn zone(&self, name: &str) -> Option<&ZoneSpec> {
        self.zones.iter().find(|z| z.name == name)
    }

    pub fn index_of(&self, node: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == node)
    }

    /// The zone's path from the root (`plant/site-1/cell-a`): the node's `[node] zone`.
    pub fn zone_path(&self, zone: &str) -> String {
        let mut path = self.ancestors(zone);
        path.reverse();
        path.join("/")
    }

    /// Node `i`'s `[node]` lines that place it: its zone path and, on a gateway, its
    /// conduits; `segmented` on every node of a segmented scenario.
    pub fn zone_settings(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let mut lines = format!("zone = {:?}\n", self.zone_path(&node.zone));
        if !node.conduits.is_empty() {
            let paths: Vec<String> = node.conduits.iter().map(|z| self.zone_path(z)).collect();
            lines.push_str(&format!("conduits = {paths:?}\n"));
        }
        if self.segmented {
            lines.push_str("segmented = true\n");
        }
        lines
    }

    /// Whether nodes `a` and `b` link directly: always in a flat mesh; in a segmented
    /// one when they share a zone, a gateway's conduits counted (the rule the nodes
    /// themselves follow, `[node] segmented`).
    pub fn may_link(&self, a: usize, b: usize) -> bool {
        let zones = |i: usize| {
            let node = &self.nodes[i];
            std::iter::once(node.zone.as_str()).chain(node.conduits.iter().map(String::as_str))
        };
        !self.segmented || zones(a).any(|z| zones(b).any(|other| other == z))
    }

    /// The zone's depth in the tree (the root is level 0).
    pub fn level(&self, zone: &str) -> usize {
        self.ancestors(zone).len() - 1
    }
}

/// How a generated plant's network is laid out.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlantLayout {
    /// Zones are closed segments, the site servers the gateways into the cloud and
    /// their site's cells.
    pub segmented: bool,
    /// Nodes prove who they are with certificates of a mesh CA made for the run.
    pub tls: bool,
    /// Every node's `[cluster] gossip_interval_ms`; `None`: the default up to
    /// [`LARGE_PLANT`] nodes, [`LARGE_PLANT_GOSSIP_MS`] above.
    pub gossip_interval_ms: Option<u64>,
}

/// Above this many nodes a generated plant gossips every [`LARGE_PLANT_GOSSIP_MS`]:
/// at the default 200 ms, two cores cannot carry a hundred nodes' gossip.
pub const LARGE_PLANT: usize = 50;
pub const LARGE_PLANT_GOSSIP_MS: u64 = 500;

/// A plant of `nodes` nodes on three levels, for `fogmesh bench sim`: a cloud zone, one
/// site per 24 nodes with two servers each, and cells of at most
/// [`GENERATED_CELL`] edge gateways under each site; LAN links inside zones, slower
/// conduits between them, no faults, laid out as `layout` says.
pub fn generated_plant(nodes: usize, duration_s: f64, seed: u64, layout: PlantLayout) -> String {
    let PlantLayout {
        segmented,
        tls,
        gossip_interval_ms,
    } = layout;
    let gossip_interval_ms = gossip_interval_ms.unwrap_or(if nodes > LARGE_PLANT {
        LARGE_PLANT_GOSSIP_MS
    } else {
        default_gossip_interval_ms()
    });
    let nodes = nodes.max(1);
    let cloud = (nodes / 50).max(1).min(nodes);
    let rest = nodes - cloud;
    let sites = (rest / 24).max(1);
    let mut text = format!(
        "[simulation]\nname = \"plant-{nodes}\"\nseed = {seed}\nduration_s = {duration_s}\n\
         formation_s = 600\nobserve_ms = 1000\ngossip_interval_ms = {gossip_interval_ms}\n\
         segmented = {segmented}\ntls = {tls}\n\n\
         [[zones]]\nname = \"cloud\"\nlink = {{ latency_ms = 0.5 }}\n\n\
         [[nodes]]\nname = \"cloud\"\ncount = {cloud}\nrole = \"cloud\"\nzone = \"cloud\"\n\n"
    );
    for site in 1..=sites {
        // Share the rest out evenly; the first sites take the remainder.
        let here = rest / sites + usize::from(site <= rest % sites);
        if here == 0 {
            continue;
        }
        let servers = here.min(2);
        let gateways = here - servers;
        let cells = gateways.div_ceil(GENERATED_CELL);
        let mut conduits = vec!["\"cloud\"".to_string()];
        conduits.extend((1..=cells).map(|c| format!("\"cell-{site}-{c}\"")));
        text.push_str(&format!(
            "[[zones]]\nname = \"site-{site}\"\nparent = \"cloud\"\n\
             link = {{ latency_ms = 0.3 }}\n\
             uplink = {{ latency_ms = 15, jitter_ms = 3, bandwidth_mbps = 100 }}\n\n\
             [[nodes]]\nname = \"site{site}-server\"\ncount = {servers}\nrole = \"fog\"\n\
             zone = \"site-{site}\"\nconduits = [{}]\n\n",
            conduits.join(", ")
        ));
        for cell in 1..=cells {
            let here = gateways / cells + usize::from(cell <= gateways % cells);
            text.push_str(&format!(
                "[[zones]]\nname = \"cell-{site}-{cell}\"\nparent = \"site-{site}\"\n\
                 link = {{ latency_ms = 0.2 }}\n\
                 uplink = {{ latency_ms = 2, jitter_ms = 0.5, bandwidth_mbps = 100 }}\n\n\
                 [[nodes]]\nname = \"gw-{site}-{cell}\"\ncount = {here}\nrole = \"edge\"\n\
                 zone = \"cell-{site}-{cell}\"\n\n"
            ));
        }
    }
    text
}

/// Most edge gateways in one cell of a generated plant.
pub const GENERATED_CELL: usize = 11;

fn check_within(i: usize, within_s: f64, invalid: &mut dyn FnMut(String, String, String)) {
    if !(within_s.is_finite() && within_s > 0.0) {
        invalid(
            format!("expect[{i}].within_s"),
            within_s.to_string(),
            "above 0".into(),
        );
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(text, Path::new("scenario.toml"))
    }

    const PLANT: &str = r#"
[simulation]
name = "t"
duration_s = 30

[[zones]]
name = "cloud"
link = { latency_ms = 1 }

[[zones]]
name = "site"
parent = "cloud"
uplink = { latency_ms = 10, jitter_ms = 2, bandwidth_mbps = 50, loss = 0.1 }

[[zones]]
name = "cell"
parent = "site"
link = { latency_ms = 0.2 }
uplink = { latency_ms = 2, bandwidth_mbps = 100, loss = 0.1 }

[[nodes]]
name = "c"
role = "cloud"
zone = "cloud"

[[nodes]]
name = "gw"
count = 2
role = "edge"
zone = "cell"

[[faults]]
at_s = 5
action = "cut"
from = ["cell"]
to = ["cloud"]
"#;

    #[test]
    fn links_across_zones_add_up_along_the_zone_tree() {
        let s = parse(PLANT).expect("a valid scenario");
        assert_eq!(
            s.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["c", "gw-1", "gw-2"]
        );
        let inside = s.link(1, 2);
        assert_eq!(inside.latency_ms, 0.2);
        let up = s.link(1, 0);
        assert!((up.latency_ms - 12.0).abs() < 1e-9, "{up:?}");
        assert_eq!(up.jitter_ms, 2.0);
        assert_eq!(up.bandwidth_mbps, Some(50.0));
        assert!((up.loss - 0.19).abs() < 1e-9, "{up:?}");
        assert_eq!(s.link(0, 1), up, "the path down is the path up");
        assert_eq!(s.level("cell"), 2);
        assert_eq!(s.resolve(&["site".into()]), [1, 2].into());
        assert_eq!(s.resolve(&["cloud".into()]), [0, 1, 2].into());
    }

    #[test]
    fn every_bad_value_is_named_with_its_field_and_limit() {
        for (from, to, field) in [
            (
                "duration_s = 30",
                "duration_s = -1",
                "simulation.duration_s",
            ),
            (
                "latency_ms = 10,",
                "latency_ms = -3,",
                "zones[1].uplink.latency_ms",
            ),
            (
                "loss = 0.1 }\n\n[[zones]]\nname = \"cell\"",
                "loss = 1.5 }\n\n[[zones]]\nname = \"cell\"",
                "zones[1].uplink.loss",
            ),
            (
                "parent = \"site\"",
                "parent = \"nowhere\"",
                "zones[2].parent",
            ),
            ("role = \"edge\"", "role = \"robot\"", "nodes[1].role"),
            ("count = 2", "count = 0", "nodes[1].count"),
            ("at_s = 5", "at_s = 31", "faults[0].at_s"),
            ("to = [\"cloud\"]", "to = [\"moon\"]", "faults[0].to"),
        ] {
            assert!(PLANT.contains(from), "{from}");
            let text = PLANT.replacen(from, to, 1);
            match parse(&text) {
                Err(ScenarioError::Invalid { field: named, .. }) => {
                    assert_eq!(named, field, "{to}")
                }
                other => panic!("{to}: {other:?}"),
            }
        }
        let cycle = PLANT.replace(
            "name = \"cloud\"\nlink",
            "name = \"cloud\"\nparent = \"cell\"\nlink",
        );
        assert!(matches!(parse(&cycle), Err(ScenarioError::Invalid { .. })));
        let unknown_check = format!("{PLANT}\n[[expect]]\ncheck = \"declared_down\"\nnode = \"gw-9\"\nfault = 0\nwithin_s = 5\n");
        match parse(&unknown_check) {
            Err(ScenarioError::Invalid { field, value, .. }) => {
                assert_eq!(
                    (field.as_str(), value.as_str()),
                    ("expect[0].node", "\"gw-9\"")
                )
            }
            other => panic!("{other:?}"),
        }
        for (expectation, field) in [
            ("expert = \"ae\"\nat_most = 0", "expect[0].at_most"),
            ("expert = \" \"\nat_most = 1", "expect[0].expert"),
        ] {
            let text = format!("{PLANT}\n[[expect]]\ncheck = \"active_versions\"\n{expectation}\n");
            match parse(&text) {
                Err(ScenarioError::Invalid { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{expectation}: {other:?}"),
            }
        }
        match parse(&format!(
            "{PLANT}\n[[expect]]\ncheck = \"no_acked_sample_lost\"\n"
        )) {
            Err(ScenarioError::Invalid { field, reason, .. }) => {
                assert_eq!(field, "expect[0].check");
                assert!(reason.contains("[[sensors]]"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        for (from, to, field) in [
            ("node = \"gw-1\"", "node = \"gw-9\"", "sensors[0].node"),
            ("speed = 60", "speed = 0", "sensors[0].speed"),
            ("batch_rows = 5", "batch_rows = 0", "sensors[0].batch_rows"),
            ("columns = [\"a\"]", "columns = []", "sensors[0].columns"),
        ] {
            let device = "\n[[sensors]]\nid = \"r\"\nnode = \"gw-1\"\nrecording = \"r.fogrec\"\n\
                          columns = [\"a\"]\nspeed = 60\nbatch_rows = 5\n";
            match parse(&format!("{PLANT}{}", device.replacen(from, to, 1))) {
                Err(ScenarioError::Invalid { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{to}: {other:?}"),
            }
        }
        let slow_gossip = PLANT.replacen(
            "duration_s = 30",
            "duration_s = 30\ngossip_interval_ms = 20",
            1,
        );
        match parse(&slow_gossip) {
            Err(ScenarioError::Invalid { field, value, .. }) => assert_eq!(
                (field.as_str(), value.as_str()),
                ("simulation.gossip_interval_ms", "20")
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse("[simulation]\nname = 1"),
            Err(ScenarioError::Syntax { .. })
        ));
    }

    #[test]
    fn a_shorter_run_may_not_drop_a_scheduled_fault() {
        let s = parse(PLANT).expect("a valid scenario");
        assert!(s.clone().with_duration(10.0).is_ok());
        assert!(matches!(
            s.with_duration(4.0),
            Err(ScenarioError::Invalid { .. })
        ));
    }

    #[test]
    fn generated_plants_have_the_nodes_asked_for_on_three_levels() {
        for nodes in [1, 3, 20, 100, 1_000] {
            let s = parse(&generated_plant(nodes, 10.0, 1, PlantLayout::default()))
                .expect("a valid generated plant");
            assert_eq!(s.nodes.len(), nodes);
            if nodes >= 20 {
                let deepest = s.zones.iter().map(|z| s.level(&z.name)).max();
                assert_eq!(deepest, Some(2), "{nodes}");
            }
        }
        // Segmented: a cell's gateway links to its cell and its site's servers, never
        // to the cloud or another cell; the servers reach all three levels.
        let layout = PlantLayout {
            segmented: true,
            tls: true,
            gossip_interval_ms: Some(1000),
        };
        let s = parse(&generated_plant(100, 10.0, 1, layout)).expect("a valid segmented plant");
        assert!(s.tls);
        assert_eq!(s.gossip_interval_ms, 1000);
        let at = |name: &str| s.index_of(name).unwrap_or_else(|| panic!("no node {name}"));
        let links = |i: usize| {
            (0..s.nodes.len())
                .filter(|&j| j != i && s.may_link(i, j))
                .count()
        };
        assert!(s.may_link(at("gw-1-1-1"), at("gw-1-1-2")));
        assert!(s.may_link(at("gw-1-1-1"), at("site1-server-1")));
        assert!(!s.may_link(at("gw-1-1-1"), at("cloud-1")));
        assert!(!s.may_link(at("gw-1-1-1"), at("gw-1-2-1")));
        assert!(s.may_link(at("site1-server-1"), at("cloud-1")));
        assert!(
            links(at("gw-1-1-1")) < GENERATED_CELL + 2,
            "{}",
            links(at("gw-1-1-1"))
        );
        let flat = parse(&generated_plant(100, 10.0, 1, PlantLayout::default())).unwrap();
        assert!(!flat.segmented);
        assert_eq!(flat.gossip_interval_ms, LARGE_PLANT_GOSSIP_MS);
        let small = parse(&generated_plant(
            LARGE_PLANT,
            10.0,
            1,
            PlantLayout::default(),
        ));
        assert_eq!(small.unwrap().gossip_interval_ms, 200);
    }

    #[test]
    fn the_bundled_scenarios_are_valid() {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&folder).expect("simulations/scenarios") {
            let path = entry.expect("an entry").path();
            let is_scenario = path.extension().is_some_and(|e| e == "toml")
                && !path.to_string_lossy().ends_with(".mesh.toml");
            if is_scenario {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 3, "{seen} scenarios");
    }
}
