//! `mesh.toml`: what the whole mesh runs, as `fogmesh apply` sends it.
//!
//! The same tables as a `node.toml` (`[[experts]]`, `[[routers]]`, `[[sensors]]`, see
//! `README.md` beside this crate) plus where things go:
//! - a sensor names its `node` (a stream is read where its source is);
//! - an expert says how many `replicas` it wants (on distinct nodes) and its
//!   `placement` rules: `roles` it may run on, whether it needs a `gpu`, a sensor it
//!   should run `near`, `max_per_node` (a node hosting it hosts at most that many
//!   experts in all) and a `zone` pattern its hosts must sit in;
//! - a router runs on every node that hosts a sensor routed through it.
//!
//! Relative paths (weights, gates) resolve against the spec file's folder when it is
//! read; `fogmesh apply` sends the text with those paths made absolute, and every node
//! reads them from its own disk (a shared or provisioned folder). An expert may instead
//! name a stored version (`model = "name@version"`): every node reads it from its own
//! model store, and the deployment loop first copies versions a node lacks from a
//! peer's `ModelStore` service (`crate::rollout`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fogmesh_actors::{
    ExpertSpec, FederationSpec, LearningSpec, NodeSpec, RestartPolicy, RouterSpec, RoutingPolicy,
    SensorStreamSpec,
};
use fogmesh_models::store::{ManifestSeal, ModelStore};
use serde::{Deserialize, Serialize};

use crate::config::{
    fold_max_wait, ClusterSection, ConfigError, ExpertConfig, Limits, NodeConfig, NodeSection,
    Role, RouterConfig,
};
use crate::placement::{Assignment, Candidate, Demand};
use crate::zone::ZonePattern;

/// Largest spec text the mesh gossips (every node carries a copy in each gossip digest).
pub const MAX_SPEC_BYTES: usize = 32 * 1024;

/// An expert's placement rules.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementRules {
    pub roles: Vec<Role>,
    pub gpu: bool,
    pub near: Option<String>,
    pub max_per_node: Option<usize>,
    /// Only nodes whose `[node] zone` this pattern matches (`site-1/*`).
    pub zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MeshExpert {
    pub config: ExpertConfig,
    pub replicas: usize,
    pub placement: PlacementRules,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MeshSensor {
    pub node: String,
    pub spec: SensorStreamSpec,
}

/// Where a node keeps what stored models need: its model store and the MiniLM folder
/// (absolute paths; see `NodeConfig::model_store_root`).
#[derive(Debug, Clone, Default)]
pub struct ModelPlaces {
    /// The node's store, sealed with the mesh's signature policy where it has one.
    pub models: Option<ModelStore>,
    pub minilm: Option<PathBuf>,
    /// The mesh's signature policy on a node with certificates: files its config
    /// names (`torchscript`, `weights`) must carry a signature it trusts.
    pub seal: Option<Arc<dyn ManifestSeal>>,
}

/// A parsed and validated `mesh.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshSpec {
    pub experts: Vec<MeshExpert>,
    pub routers: Vec<RouterConfig>,
    pub sensors: Vec<MeshSensor>,
    /// The actors' view of every expert and router, files read and checked.
    expert_specs: Vec<ExpertSpec>,
    router_specs: Vec<RouterSpec>,
}

/// The spec as the mesh stores and gossips it: the newest `version` wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSpec {
    pub version: u64,
    pub applied_at_us: i64,
    /// `mesh.toml` text with absolute paths.
    pub text: String,
}

impl StoredSpec {
    /// Which of two specs the mesh keeps.
    pub fn newer_than(&self, other: &StoredSpec) -> bool {
        (self.version, self.applied_at_us, &self.text)
            > (other.version, other.applied_at_us, &other.text)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMesh {
    #[serde(default)]
    experts: Vec<toml::Table>,
    #[serde(default)]
    routers: Vec<RouterConfig>,
    #[serde(default)]
    sensors: Vec<toml::Table>,
}

impl MeshSpec {
    /// Parses and checks spec text as if read from `file` (which relative paths
    /// resolve against): every file it names is read and every reference resolved.
    /// A spec naming stored models needs [`MeshSpec::parse_with`].
    pub fn parse(text: &str, file: &Path) -> Result<MeshSpec, ConfigError> {
        MeshSpec::parse_with(text, file, &ModelPlaces::default())
    }

    /// [`MeshSpec::parse`], reading stored models from `places`.
    pub fn parse_with(
        text: &str,
        file: &Path,
        places: &ModelPlaces,
    ) -> Result<MeshSpec, ConfigError> {
        let syntax = |source| ConfigError::Syntax {
            file: file.to_path_buf(),
            source: Box::new(source),
        };
        let invalid = |field: String, value: String, reason: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            field,
            value,
            reason,
        };
        if text.len() > MAX_SPEC_BYTES {
            return Err(invalid(
                "(file)".into(),
                format!("{} bytes", text.len()),
                format!("a mesh spec may have at most {MAX_SPEC_BYTES} bytes"),
            ));
        }
        let raw: RawMesh = toml::from_str(text).map_err(syntax)?;
        let mut experts = Vec::new();
        for (i, mut table) in raw.experts.into_iter().enumerate() {
            let replicas = match table.remove("replicas") {
                None => 1,
                Some(toml::Value::Integer(n)) if n >= 1 => n as usize,
                Some(other) => {
                    return Err(invalid(
                        format!("experts[{i}].replicas"),
                        other.to_string(),
                        "must be a whole number of at least 1".into(),
                    ))
                }
            };
            let placement: PlacementRules = match table.remove("placement") {
                None => PlacementRules::default(),
                Some(value) => value.try_into().map_err(syntax)?,
            };
            if placement.max_per_node == Some(0) {
                return Err(invalid(
                    format!("experts[{i}].placement.max_per_node"),
                    "0".into(),
                    "must be at least 1".into(),
                ));
            }
            if let Some(zone) = &placement.zone {
                ZonePattern::parse(zone).map_err(|e| {
                    invalid(
                        format!("experts[{i}].placement.zone"),
                        format!("{zone:?}"),
                        e.to_string(),
                    )
                })?;
            }
            // serde fills in `max_wait_us` when absent; the table says if it was written.
            let us_written = table.contains_key("max_wait_us");
            let mut config: ExpertConfig = toml::Value::Table(table).try_into().map_err(syntax)?;
            fold_max_wait(file, i, &mut config, us_written)?;
            if let Some(learning) = &config.learning {
                if config.model.is_none() {
                    return Err(invalid(
                        format!("experts[{i}].learning"),
                        "(a table)".into(),
                        format!("expert `{}` does not serve a stored model: only experts with `model = \"name@version\"` can learn", config.name),
                    ));
                }
                learning.validate().map_err(|e| {
                    invalid(
                        format!("experts[{i}].learning.{}", e.field),
                        e.value,
                        format!("expert `{}`: {}", config.name, e.reason),
                    )
                })?;
            }
            if let Some(federation) = &config.federation {
                if config.model.is_none() {
                    return Err(invalid(
                        format!("experts[{i}].federation"),
                        "(a table)".into(),
                        format!("expert `{}` does not serve a stored model: only experts with `model = \"name@version\"` federate", config.name),
                    ));
                }
                if federation.on_drift && config.learning.is_none() {
                    return Err(invalid(
                        format!("experts[{i}].federation.on_drift"),
                        "true".into(),
                        format!("expert `{}` has no [experts.learning] whose learner would report a drift", config.name),
                    ));
                }
                federation.validate().map_err(|e| {
                    invalid(
                        format!("experts[{i}].federation.{}", e.field),
                        e.value,
                        format!("expert `{}`: {}", config.name, e.reason),
                    )
                })?;
                let patterns = federation
                    .zones
                    .iter()
                    .enumerate()
                    .map(|(z, zone)| (format!("zones[{z}]"), zone))
                    .chain(
                        federation
                            .groups
                            .iter()
                            .enumerate()
                            .filter_map(|(g, group)| {
                                Some((format!("groups[{g}].zone"), group.zone.as_ref()?))
                            }),
                    );
                for (field, zone) in patterns {
                    ZonePattern::parse(zone).map_err(|e| {
                        invalid(
                            format!("experts[{i}].federation.{field}"),
                            format!("{zone:?}"),
                            e.to_string(),
                        )
                    })?;
                }
            }
            experts.push(MeshExpert {
                config,
                replicas,
                placement,
            });
        }
        let mut sensors = Vec::new();
        for (i, mut table) in raw.sensors.into_iter().enumerate() {
            let node = match table.remove("node") {
                Some(toml::Value::String(node)) if !node.is_empty() => node,
                other => {
                    return Err(invalid(
                        format!("sensors[{i}].node"),
                        other.map_or("(absent)".into(), |v| v.to_string()),
                        "must name the node that reads this sensor".into(),
                    ))
                }
            };
            let spec: SensorStreamSpec = toml::Value::Table(table).try_into().map_err(syntax)?;
            sensors.push(MeshSensor { node, spec });
        }
        // The node config machinery reads the files and checks the whole as one node.
        let whole = NodeConfig {
            node: NodeSection {
                name: "mesh".into(),
                role: Role::Cloud,
                zone: None,
                conduits: Vec::new(),
                segmented: false,
                listen: ([127, 0, 0, 1], 0).into(),
                metrics_listen: None,
                metrics_public: false,
                models: places.models.as_ref().map(|s| s.root().to_path_buf()),
                minilm: places.minilm.clone(),
                edge_log: None,
                outbox: Default::default(),
                alerts: Default::default(),
            },
            limits: Limits::default(),
            // Checked above; the node checks refuse it, since a lone node cannot federate.
            experts: experts
                .iter()
                .map(|e| ExpertConfig {
                    federation: None,
                    ..e.config.clone()
                })
                .collect(),
            routers: raw.routers.clone(),
            sensors: sensors.iter().map(|s| s.spec.clone()).collect(),
            mqtt: Vec::new(),
            replay: Vec::new(),
            cluster: None::<ClusterSection>,
            // Only checked, never served.
            tls: None,
            file: file.to_path_buf(),
        };
        let spec = whole.to_node_spec_with(places)?;
        for (i, expert) in experts.iter().enumerate() {
            if let Some(near) = &expert.placement.near {
                if !sensors.iter().any(|s| &s.spec.id == near) {
                    return Err(invalid(
                        format!("experts[{i}].placement.near"),
                        format!("{near:?}"),
                        "no sensor of this spec has this id".into(),
                    ));
                }
            }
        }
        Ok(MeshSpec {
            experts,
            routers: raw.routers,
            sensors,
            expert_specs: spec.experts,
            router_specs: spec.routers,
        })
    }

    /// The spec text with every relative file path made absolute against `folder`, so
    /// that it reads the same on any node.
    pub fn absolute_text(text: &str, folder: &Path) -> Result<String, toml::de::Error> {
        let mut doc: toml::Table = toml::from_str(text)?;
        let absolute = |value: &mut toml::Value| {
            if let toml::Value::String(path) = value {
                let p = PathBuf::from(&*path);
                if p.is_relative() {
                    *path = folder.join(p).display().to_string();
                }
            }
        };
        for (list, key) in [
            ("experts", "weights"),
            ("experts", "torchscript"),
            ("routers", "gate"),
        ] {
            if let Some(toml::Value::Array(items)) = doc.get_mut(list) {
                for item in items {
                    if let Some(value) = item.get_mut(key) {
                        absolute(value);
                    }
                }
            }
        }
        Ok(toml::to_string(&doc).unwrap_or_else(|_| text.to_string()))
    }

    /// The stored versions (`model = "name@version"`) the spec's experts name, in
    /// order, without parsing anything else.
    pub fn stored_models(text: &str) -> Result<Vec<String>, toml::de::Error> {
        let doc: toml::Table = toml::from_str(text)?;
        let experts = match doc.get("experts") {
            Some(toml::Value::Array(items)) => items.as_slice(),
            _ => &[],
        };
        Ok(experts
            .iter()
            .filter_map(|e| e.get("model").and_then(|m| m.as_str()))
            .map(str::to_string)
            .collect())
    }

    /// The spec text with expert `expert` serving the stored version `id` (weights
    /// pinned to `sha256`), everything else as it was. `None` when the spec has no
    /// such expert.
    pub fn with_model(
        text: &str,
        expert: &str,
        id: &str,
        sha256: &str,
    ) -> Result<Option<String>, toml::de::Error> {
        let mut doc: toml::Table = toml::from_str(text)?;
        let Some(toml::Value::Array(items)) = doc.get_mut("experts") else {
            return Ok(None);
        };
        let Some(table) = items
            .iter_mut()
            .filter_map(|e| e.as_table_mut())
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some(expert))
        else {
            return Ok(None);
        };
        // The verdicts then name the stored version itself.
        table.remove("model_version");
        table.insert("model".into(), toml::Value::String(id.into()));
        table.insert("sha256".into(), toml::Value::String(sha256.into()));
        Ok(Some(
            toml::to_string(&doc).unwrap_or_else(|_| text.to_string()),
        ))
    }

    /// The actors' view of expert `name`, files read.
    pub fn expert_spec(&self, name: &str) -> Option<&ExpertSpec> {
        self.expert_specs.iter().find(|e| e.name == name)
    }

    /// The experts that learn, with the node that runs each one's learner: the first,
    /// by name, of the nodes whose sensors are routed to it, because a learner reads the
    /// scored windows of its own node's routers.
    pub fn learners(&self) -> Vec<(&ExpertSpec, &LearningSpec, String)> {
        self.experts
            .iter()
            .filter_map(|e| {
                let learning = e.config.learning.as_ref()?;
                let spec = self.expert_spec(&e.config.name)?;
                let node = self.sensor_nodes(&spec.name).into_iter().next()?;
                Some((spec, learning, node))
            })
            .collect()
    }

    /// The experts trained by federated rounds, with their settings.
    pub fn federations(&self) -> Vec<(&ExpertSpec, &FederationSpec)> {
        self.experts
            .iter()
            .filter_map(|e| {
                let federation = e.config.federation.as_ref()?;
                Some((self.expert_spec(&e.config.name)?, federation))
            })
            .collect()
    }

    /// The nodes, by name, whose sensors are routed to `expert`: where its windows are
    /// scored.
    pub fn sensor_nodes(&self, expert: &str) -> BTreeSet<String> {
        self.sensors
            .iter()
            .filter(|s| {
                self.router_specs
                    .iter()
                    .find(|r| r.name == s.spec.router)
                    .is_some_and(|r| match &r.policy {
                        RoutingPolicy::Static { routes } => routes
                            .get(&s.spec.id)
                            .is_some_and(|experts| experts.iter().any(|e| e == expert)),
                        RoutingPolicy::LearnedGate { experts, .. } => {
                            experts.iter().any(|e| e == expert)
                        }
                    })
            })
            .map(|s| s.node.clone())
            .collect()
    }

    /// What placement needs to know about each expert.
    pub fn demands(&self) -> Vec<Demand> {
        self.experts
            .iter()
            .map(|e| Demand {
                expert: e.config.name.clone(),
                replicas: e.replicas,
                roles: e.placement.roles.clone(),
                needs_gpu: e.placement.gpu,
                near: e.placement.near.clone(),
                max_per_node: e.placement.max_per_node,
                zone: e
                    .placement
                    .zone
                    .as_deref()
                    .and_then(|z| ZonePattern::parse(z).ok()),
            })
            .collect()
    }

    /// Sensors pinned to each node.
    pub fn sensors_by_node(&self) -> BTreeMap<String, Vec<String>> {
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for sensor in &self.sensors {
            by_node
                .entry(sensor.node.clone())
                .or_default()
                .push(sensor.spec.id.clone());
        }
        by_node
    }

    /// Nodes the spec pins sensors to that `live` lacks.
    pub fn missing_sensor_nodes(&self, live: &[Candidate]) -> Vec<String> {
        let live: BTreeSet<&str> = live.iter().map(|c| c.name.as_str()).collect();
        let wanted: BTreeSet<&str> = self.sensors.iter().map(|s| s.node.as_str()).collect();
        wanted.difference(&live).map(|n| n.to_string()).collect()
    }

    /// `node`'s share of the mesh under `assignment`: its sensors, the routers they
    /// use, the experts placed on it; every other expert is known for its shape.
    pub fn share(&self, node: &str, assignment: &Assignment) -> NodeSpec {
        let sensors: Vec<SensorStreamSpec> = self
            .sensors
            .iter()
            .filter(|s| s.node == node)
            .map(|s| s.spec.clone())
            .collect();
        let used: BTreeSet<&str> = sensors.iter().map(|s| s.router.as_str()).collect();
        let routers = self
            .router_specs
            .iter()
            .filter(|r| used.contains(r.name.as_str()))
            .cloned()
            .collect();
        let hosts = |expert: &str| {
            assignment
                .get(expert)
                .is_some_and(|nodes| nodes.iter().any(|n| n == node))
        };
        let (experts, remote_experts) = self
            .expert_specs
            .iter()
            .cloned()
            .partition(|e| hosts(&e.name));
        NodeSpec {
            node: node.to_string(),
            sensors,
            routers,
            experts,
            remote_experts,
            restart: RestartPolicy::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[experts]]
name = "ae"
model_version = "v1"
channels = 2
window = 16
threshold = 1.0
replicas = 2
placement = { roles = ["fog"], near = "s1", max_per_node = 3 }

[[routers]]
name = "r1"
policy = "static"
routes = { s1 = ["ae"] }

[[sensors]]
node = "edge-1"
id = "s1"
channels = 2
window = 16
stride = 8
router = "r1"
"#;

    fn parse(text: &str) -> Result<MeshSpec, String> {
        MeshSpec::parse(text, Path::new("mesh.toml")).map_err(|e| e.to_string())
    }

    fn candidate(name: &str, role: Role) -> Candidate {
        Candidate {
            name: name.into(),
            role,
            gpus: 0,
            cpu_load: 0.0,
            sensors: Vec::new(),
            zone: String::new(),
        }
    }

    #[test]
    fn a_spec_reads_with_its_placement_rules() {
        let spec = parse(GOOD).unwrap();
        assert_eq!(spec.experts[0].replicas, 2);
        assert_eq!(spec.experts[0].placement.roles, vec![Role::Fog]);
        assert_eq!(spec.demands()[0].near.as_deref(), Some("s1"));
        assert_eq!(spec.sensors[0].node, "edge-1");
    }

    #[test]
    fn a_share_holds_the_nodes_sensors_their_routers_and_its_experts() {
        let spec = parse(GOOD).unwrap();
        let assignment = Assignment::from([("ae".to_string(), vec!["fog-1".to_string()])]);
        let edge = spec.share("edge-1", &assignment);
        assert_eq!((edge.sensors.len(), edge.routers.len()), (1, 1));
        assert!(edge.experts.is_empty());
        assert_eq!(edge.remote_experts[0].name, "ae");
        edge.validate().unwrap();
        let fog = spec.share("fog-1", &assignment);
        assert_eq!(
            (fog.sensors.len(), fog.routers.len(), fog.experts.len()),
            (0, 0, 1)
        );
    }

    #[test]
    fn bad_specs_name_the_field() {
        for (broken, needle) in [
            (
                GOOD.replace("replicas = 2", "replicas = 0"),
                "experts[0].replicas",
            ),
            (GOOD.replace("node = \"edge-1\"\n", ""), "sensors[0].node"),
            (
                GOOD.replace("near = \"s1\"", "near = \"s9\""),
                "experts[0].placement.near",
            ),
            (
                GOOD.replace("max_per_node = 3", "max_per_node = 0"),
                "max_per_node",
            ),
            (
                GOOD.replace("roles = [\"fog\"]", "roles = [\"moon\"]"),
                "moon",
            ),
            (GOOD.replace("near = \"s1\"", "nearby = \"s1\""), "nearby"),
            (
                GOOD.replace("routes = { s1 = [\"ae\"] }", "routes = { s1 = [\"zz\"] }"),
                "zz",
            ),
            ("x".repeat(MAX_SPEC_BYTES + 1), "at most"),
        ] {
            let error = parse(&broken).expect_err(needle);
            assert!(error.contains(needle), "`{needle}` not in: {error}");
        }
    }

    #[test]
    fn max_wait_reads_in_words_and_not_beside_max_wait_us() {
        let spec =
            parse(&GOOD.replace("replicas = 2", "replicas = 2\nmax_wait = \"5ms\"")).unwrap();
        assert_eq!(spec.experts[0].config.max_wait_us, 5_000);
        let both = parse(&GOOD.replace(
            "replicas = 2",
            "replicas = 2\nmax_wait = \"5ms\"\nmax_wait_us = 10",
        ))
        .unwrap_err();
        for needle in [
            "mesh.toml",
            "experts[0].max_wait`",
            "experts[0].max_wait_us`",
        ] {
            assert!(both.contains(needle), "lacks {needle:?}: {both}");
        }
        let bad =
            parse(&GOOD.replace("replicas = 2", "replicas = 2\nmax_wait = \"soon\"")).unwrap_err();
        assert!(
            bad.contains("experts[0].max_wait") && bad.contains("\"soon\""),
            "{bad}"
        );
    }

    #[test]
    fn a_learning_table_needs_a_stored_model_and_valid_values() {
        let text = GOOD.replace(
            "replicas = 2",
            "replicas = 2\nlearning = { reservoir = 64 }",
        );
        let error = parse(&text).unwrap_err();
        assert!(error.contains("experts[0].learning"), "{error}");
        assert!(error.contains("stored model"), "{error}");
    }

    #[test]
    fn the_readme_federation_example_is_the_defaults_plus_one_group() {
        let readme = include_str!("../README.md");
        let example = readme
            .split("### Federated training")
            .nth(1)
            .and_then(|s| s.split("```toml").nth(1))
            .and_then(|s| s.split("```").next())
            .expect("the README documents [experts.federation]");
        let table: toml::Table = toml::from_str(example).expect("the example parses");
        let spec: FederationSpec = table["experts"]["federation"]
            .clone()
            .try_into()
            .expect("the example is a federation table");
        spec.validate().expect("the example is valid");
        let defaults = FederationSpec::default();
        assert_eq!(
            FederationSpec {
                groups: Vec::new(),
                ..spec.clone()
            },
            defaults
        );
        assert_eq!(spec.groups[0].aggregator, "fog-a");
    }

    #[test]
    fn rounds_on_drift_need_a_learner_to_report_it() {
        let text = "[[experts]]\nname = \"ae\"\nmodel = \"ae@1\"\n\n[experts.federation]\non_drift = true\n";
        let error = parse(text).unwrap_err();
        assert!(error.contains("experts[0].federation.on_drift"), "{error}");
        assert!(error.contains("[experts.learning]"), "{error}");
    }

    #[test]
    fn federation_zones_are_checked_as_zone_patterns() {
        for (table, field) in [
            ("zones = [\"site-1/*\", \"site 2\"]", "federation.zones[1]"),
            (
                "[[experts.federation.groups]]\naggregator = \"fog-a\"\nzone = \"a//b\"",
                "federation.groups[0].zone",
            ),
        ] {
            let text = format!(
                "[[experts]]\nname = \"ae\"\nmodel = \"ae@1\"\n\n[experts.federation]\n{table}\n"
            );
            let error = parse(&text).unwrap_err();
            assert!(error.contains(field), "{error}");
        }
    }

    #[test]
    fn a_federation_table_needs_a_stored_model() {
        let text = GOOD.replace(
            "replicas = 2",
            "replicas = 2\nfederation = { min_sites = 2 }",
        );
        let error = parse(&text).unwrap_err();
        assert!(error.contains("experts[0].federation"), "{error}");
        assert!(error.contains("stored model"), "{error}");
    }

    #[test]
    fn placement_refuses_a_sensor_on_a_node_not_in_the_mesh() {
        let spec = parse(GOOD).unwrap();
        let nodes = vec![candidate("fog-1", Role::Fog), candidate("fog-2", Role::Fog)];
        assert_eq!(
            spec.missing_sensor_nodes(&nodes),
            vec!["edge-1".to_string()]
        );
        let mut with_edge = nodes.clone();
        with_edge.push(candidate("edge-1", Role::Edge));
        assert!(spec.missing_sensor_nodes(&with_edge).is_empty());
    }

    #[test]
    fn relative_paths_become_absolute() {
        let text = "[[experts]]\nname = \"ae\"\nweights = \"w/ae.safetensors\"\n\n[[routers]]\nname = \"g\"\ngate = \"/abs/gate.json\"\n";
        let out = MeshSpec::absolute_text(text, Path::new("/plant/specs")).unwrap();
        assert!(out.contains("/plant/specs/w/ae.safetensors"), "{out}");
        assert!(out.contains("\"/abs/gate.json\""), "{out}");
    }
}
