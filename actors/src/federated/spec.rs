//! `[experts.federation]`: how a mesh expert trains across sites ([`FederationSpec`]):
//! which nodes are sites, where the coordinator runs, when rounds run, each site's
//! local work and windows, and how updates are encoded, protected and combined. The
//! checks name the field by its path inside `federation` ([`InvalidFederation`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use fogmesh_models::federated::{Aggregation, Compression, LocalWork, Privacy, RoundAggregator};
use serde::{Deserialize, Serialize};

use super::interface::{BufferedRounds, EvaluationGate, FederationPlan};
use super::site_trainer::RoundWork;

/// `[experts.federation]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationSpec {
    /// Nodes of these roles are sites; with `nodes` and `zones` empty too, the sites
    /// are the nodes whose sensors are routed to the expert (they hold its windows).
    pub roles: Vec<String>,
    /// These nodes are sites (besides any of `roles`).
    pub nodes: Vec<String>,
    /// Nodes whose `[node] zone` one of these patterns matches are sites too
    /// (`site-1/*`: every zone inside `site-1`).
    pub zones: Vec<String>,
    /// The coordinator runs on the first live node of this role by name, or on the
    /// first live node by name when none has it.
    pub coordinator_role: String,
    /// Seconds between rounds; none: rounds run on `fogmesh federate EXPERT` only.
    pub every_s: Option<f64>,
    /// Also a round whenever the expert's continual learner (`[experts.learning]`, on
    /// whichever node) detects a drift.
    pub on_drift: bool,
    /// The fewest site answers a round applies.
    pub min_sites: usize,
    /// Seconds a round waits for its sites; later answers are dropped (stragglers).
    pub deadline_s: f64,
    pub aggregation: Aggregation,
    /// How sites encode their updates: `none`, `int8`, `topk:<fraction>` or
    /// `topk:<fraction>+int8`, with error feedback.
    pub compression: Compression,
    pub privacy: Option<Privacy>,
    /// Judge each round's weights on the sites' held-out windows before storing them.
    pub gate: Option<EvaluationGate>,
    pub local: LocalWork,
    /// Windows each site keeps to train on (a uniform sample of what its sensors sent).
    pub windows: usize,
    /// Share of a site's windows kept out of training, to judge candidates on.
    pub holdout: f64,
    /// Seeds the sites' samples and the privacy noise.
    pub seed: u64,
    /// Fog aggregators: each runs the round over its group's sites and passes one
    /// combined update up; sites in no group answer the coordinator directly.
    pub groups: Vec<FederationGroup>,
    /// Rounds as an asynchronous run (FedBuff) instead of synchronous rounds.
    pub buffered: Option<BufferedRounds>,
    /// Rounds of federated distillation instead of averaged weights: sites whose
    /// networks differ learn from each other's outputs on shared windows.
    pub distillation: Option<DistillationSpec>,
}

/// `[experts.federation.distillation]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillationSpec {
    /// A safetensors file on the coordinator's node holding the unlabelled windows
    /// every site may see: one f32 tensor `windows`, `[n, channels, length]` or
    /// `[n, channels × length]`. Only windows the plant agreed to share belong here:
    /// they go to every site (once; its node keeps them for the rounds after).
    pub shared: PathBuf,
    /// The weight of the distance to the consensus in a site's objective.
    #[serde(default = "DistillationSpec::default_weight")]
    pub weight: f64,
    /// Sites whose network is narrower or wider than the expert's: node name →
    /// hidden channels (the others train the expert's network).
    #[serde(default)]
    pub hidden: BTreeMap<String, i64>,
}

impl DistillationSpec {
    fn default_weight() -> f64 {
        1.0
    }
}

/// `[[experts.federation.groups]]`: one fog aggregator and the sites it merges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationGroup {
    /// The node that aggregates the group.
    pub aggregator: String,
    /// Sites by name; each is a site of the federation.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Also the federation's other sites in a zone this pattern matches (a site that
    /// several groups' zones match is the deepest pattern's, the first of equals; one a
    /// group names, that group's).
    #[serde(default)]
    pub zone: Option<String>,
    /// The aggregator of the group this one answers to (three levels or more: a cell's
    /// gateway under its area's); none: the federation's coordinator.
    #[serde(default)]
    pub within: Option<String>,
}

impl Default for FederationSpec {
    fn default() -> Self {
        FederationSpec {
            roles: Vec::new(),
            nodes: Vec::new(),
            zones: Vec::new(),
            coordinator_role: "cloud".into(),
            every_s: None,
            on_drift: false,
            min_sites: 1,
            deadline_s: 60.0,
            aggregation: Aggregation::FedAvg,
            compression: Compression::None,
            privacy: None,
            gate: None,
            local: LocalWork::default(),
            windows: 512,
            holdout: 0.2,
            seed: 0,
            groups: Vec::new(),
            buffered: None,
            distillation: None,
        }
    }
}

/// A federation setting out of its range: the field (its path inside `federation`),
/// the value and the limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{field}` = {value}: {reason}")]
pub struct InvalidFederation {
    pub field: String,
    pub value: String,
    pub reason: String,
}

/// Most windows a site holds for one federation.
pub const MAX_SITE_WINDOWS: usize = 1 << 16;

impl FederationSpec {
    /// Checks every field, naming the first that is out of range.
    pub fn validate(&self) -> Result<(), InvalidFederation> {
        let invalid = |field: &str, value: String, reason: String| InvalidFederation {
            field: field.to_string(),
            value,
            reason,
        };
        if self.min_sites == 0 {
            return Err(invalid(
                "min_sites",
                "0".into(),
                "must be at least 1".into(),
            ));
        }
        if !(self.deadline_s.is_finite() && self.deadline_s >= 0.1) {
            return Err(invalid(
                "deadline_s",
                self.deadline_s.to_string(),
                "must be at least 0.1 seconds".into(),
            ));
        }
        if let Some(every) = self.every_s {
            if !(every.is_finite() && every >= 1.0) {
                return Err(invalid(
                    "every_s",
                    every.to_string(),
                    "must be at least 1 second".into(),
                ));
            }
        }
        if !(2..=MAX_SITE_WINDOWS).contains(&self.windows) {
            return Err(invalid(
                "windows",
                self.windows.to_string(),
                format!("must be between 2 and {MAX_SITE_WINDOWS}"),
            ));
        }
        if !(self.holdout >= 0.0 && self.holdout < 1.0) {
            return Err(invalid(
                "holdout",
                self.holdout.to_string(),
                "must lie in [0, 1)".into(),
            ));
        }
        if self.gate.is_some() && self.holdout == 0.0 {
            return Err(invalid(
                "holdout",
                "0".into(),
                "a gate judges on held-out windows: give a share above 0".into(),
            ));
        }
        if let Some(gate) = self.gate {
            if !(gate.max_regression.is_finite() && gate.max_regression > -1.0) {
                return Err(invalid(
                    "gate.max_regression",
                    gate.max_regression.to_string(),
                    "must be a finite number above -1".into(),
                ));
            }
        }
        let mut grouped = std::collections::BTreeSet::new();
        let mut aggregators = std::collections::BTreeSet::new();
        for (i, group) in self.groups.iter().enumerate() {
            if group.aggregator.is_empty() {
                return Err(invalid(
                    &format!("groups[{i}].aggregator"),
                    "\"\"".into(),
                    "must name the node that aggregates the group".into(),
                ));
            }
            if !aggregators.insert(group.aggregator.as_str()) {
                return Err(invalid(
                    &format!("groups[{i}].aggregator"),
                    format!("{:?}", group.aggregator),
                    "a node aggregates one group at most".into(),
                ));
            }
            if group.sites.is_empty() && group.zone.is_none() {
                return Err(invalid(
                    &format!("groups[{i}].sites"),
                    "[]".into(),
                    "a group needs at least one site or a zone".into(),
                ));
            }
            for site in &group.sites {
                if !grouped.insert(site.as_str()) {
                    return Err(invalid(
                        &format!("groups[{i}].sites"),
                        format!("{site:?}"),
                        "a site belongs to one group at most".into(),
                    ));
                }
            }
        }
        for (i, group) in self.groups.iter().enumerate() {
            let Some(parent) = &group.within else {
                continue;
            };
            if !aggregators.contains(parent.as_str()) || parent == &group.aggregator {
                return Err(invalid(
                    &format!("groups[{i}].within"),
                    format!("{parent:?}"),
                    "must name the aggregator of another group".into(),
                ));
            }
            // Up the chain of parents: more steps than groups is a circle.
            let mut above = Some(parent);
            for _ in 0..=self.groups.len() {
                above = self
                    .groups
                    .iter()
                    .find(|g| Some(&g.aggregator) == above)
                    .and_then(|g| g.within.as_ref());
            }
            if above.is_some() {
                return Err(invalid(
                    &format!("groups[{i}].within"),
                    format!("{parent:?}"),
                    "groups answer to each other in a circle".into(),
                ));
            }
        }
        if let Some(buffered) = self.buffered {
            for (field, value) in [
                ("buffered.buffer", buffered.buffer),
                ("buffered.updates", buffered.updates),
            ] {
                if value == 0 {
                    return Err(invalid(field, "0".into(), "must be at least 1".into()));
                }
            }
        }
        if let Some(distillation) = &self.distillation {
            self.validate_distillation(distillation)?;
        }
        self.plan().work.local.validate().map_err(|e| match e {
            fogmesh_models::ModelError::InvalidOption {
                field,
                value,
                reason,
            } => invalid(&format!("local.{field}"), value, reason),
            other => invalid("local", "(a table)".into(), other.to_string()),
        })?;
        RoundAggregator::new(self.aggregation, self.privacy, self.seed).map_err(|e| match e {
            fogmesh_models::federated::FederatedError::Invalid {
                field,
                value,
                reason,
            } if matches!(field, "clip_norm" | "noise_multiplier" | "delta") => {
                invalid(&format!("privacy.{field}"), value, reason.to_string())
            }
            fogmesh_models::federated::FederatedError::Invalid {
                field,
                value,
                reason,
            } => invalid(field, value, reason.to_string()),
            other => invalid(
                "aggregation",
                self.aggregation.name().into(),
                other.to_string(),
            ),
        })?;
        Ok(())
    }

    /// Distillation exchanges outputs, not updates: the settings that shape updates
    /// have nothing to work on and are refused rather than ignored.
    fn validate_distillation(
        &self,
        distillation: &DistillationSpec,
    ) -> Result<(), InvalidFederation> {
        let invalid = |field: &str, value: String, reason: &str| InvalidFederation {
            field: field.to_string(),
            value,
            reason: reason.to_string(),
        };
        if distillation.shared.as_os_str().is_empty() {
            return Err(invalid(
                "distillation.shared",
                "\"\"".into(),
                "must name the safetensors file of shared windows",
            ));
        }
        if !(distillation.weight.is_finite() && distillation.weight > 0.0) {
            return Err(invalid(
                "distillation.weight",
                distillation.weight.to_string(),
                "must be a finite number above 0",
            ));
        }
        if let Some((node, hidden)) = distillation
            .hidden
            .iter()
            .find(|(_, h)| !(1..=4096).contains(*h))
        {
            return Err(invalid(
                &format!("distillation.hidden.{node}"),
                hidden.to_string(),
                "must be between 1 and 4096",
            ));
        }
        if self.buffered.is_some() {
            return Err(invalid(
                "buffered",
                "(a table)".into(),
                "distillation rounds run synchronously: leave it out",
            ));
        }
        if self.compression != Compression::None {
            return Err(invalid(
                "compression",
                self.compression.to_string(),
                "distillation sends outputs, not updates: use none",
            ));
        }
        if self.aggregation != Aggregation::FedAvg {
            return Err(invalid(
                "aggregation",
                self.aggregation.name().into(),
                "distillation averages outputs by windows: use fedavg",
            ));
        }
        Ok(())
    }

    /// Every round's plan; FedProx's `mu` becomes the sites' proximal weight. A
    /// distillation's shared windows are read where the coordinator runs.
    pub fn plan(&self) -> FederationPlan {
        FederationPlan {
            work: RoundWork {
                local: LocalWork {
                    proximal_mu: self.aggregation.proximal_mu(),
                    ..self.local.clone()
                },
                compression: self.compression,
                echo: false,
                distill: None,
            },
            aggregation: self.aggregation,
            privacy: self.privacy,
            min_sites: self.min_sites,
            deadline: Duration::from_secs_f64(self.deadline_s),
            seed: self.seed,
            gate: self.gate,
            buffered: self.buffered,
            distillation: None,
        }
    }

    /// Every how many windows one is held out (0: none).
    pub fn holdout_every(&self) -> usize {
        if self.holdout <= 0.0 {
            0
        } else {
            (1.0 / self.holdout).round().max(2.0) as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> FederationSpec {
        toml::from_str(text).expect("parses")
    }

    #[test]
    fn a_table_takes_its_defaults_and_mu_from_fedprox() {
        let spec = parse(
            "aggregation = { rule = \"fedprox\", mu = 0.05 }\ncompression = \"topk:0.1+int8\"\n[local]\nepochs = 3\n",
        );
        spec.validate().unwrap();
        let plan = spec.plan();
        assert_eq!(plan.work.local.epochs, 3);
        assert_eq!(plan.work.local.proximal_mu, 0.05);
        assert_eq!(
            plan.work.compression,
            Compression::TopKInt8 { fraction: 0.1 }
        );
        assert_eq!(plan.min_sites, 1);
        assert_eq!(spec.holdout_every(), 5);
    }

    #[test]
    fn settings_out_of_range_are_refused_by_field_value_and_limit() {
        for (text, words) in [
            ("min_sites = 0", ["min_sites", "0", "at least 1"]),
            ("deadline_s = 0.01", ["deadline_s", "0.01", "0.1 seconds"]),
            ("every_s = 0.5", ["every_s", "0.5", "at least 1 second"]),
            ("windows = 1", ["windows", "1", "between 2"]),
            ("holdout = 1.0", ["holdout", "1", "[0, 1)"]),
            ("[local]\nepochs = 0", ["local.epochs", "0", "at least one"]),
            (
                "[[groups]]\naggregator = \"fog-a\"\nsites = [\"e1\"]\n[[groups]]\naggregator = \"fog-b\"\nsites = [\"e1\"]",
                ["groups[1].sites", "e1", "one group at most"],
            ),
            (
                "[[groups]]\naggregator = \"fog-a\"\nsites = [\"e1\"]\n[[groups]]\naggregator = \"fog-a\"\nzone = \"site-2\"",
                ["groups[1].aggregator", "fog-a", "one group at most"],
            ),
            (
                "[[groups]]\naggregator = \"fog-a\"",
                ["groups[0].sites", "[]", "at least one site or a zone"],
            ),
            (
                "[[groups]]\naggregator = \"fog-a\"\nsites = [\"e1\"]\nwithin = \"fog-z\"",
                ["groups[0].within", "fog-z", "another group"],
            ),
            (
                "[[groups]]\naggregator = \"fog-a\"\nsites = [\"e1\"]\nwithin = \"fog-b\"\n[[groups]]\naggregator = \"fog-b\"\nsites = [\"e2\"]\nwithin = \"fog-a\"",
                ["groups[0].within", "fog-b", "circle"],
            ),
            (
                "buffered = { buffer = 0, updates = 4 }",
                ["buffered.buffer", "0", "at least 1"],
            ),
            (
                "privacy = { clip_norm = 0.0, noise_multiplier = 1.0 }",
                ["privacy.clip_norm", "0", "above 0"],
            ),
            (
                "aggregation = { rule = \"median\" }\nprivacy = { clip_norm = 1.0, noise_multiplier = 1.0 }",
                ["aggregation", "median", "differential privacy"],
            ),
            (
                "[distillation]\nshared = \"s.safetensors\"\nweight = 0.0",
                ["distillation.weight", "0", "above 0"],
            ),
            (
                "[distillation]\nshared = \"s.safetensors\"\nhidden = { edge-1 = 0 }",
                ["distillation.hidden.edge-1", "0", "between 1 and 4096"],
            ),
            (
                "compression = \"int8\"\n[distillation]\nshared = \"s.safetensors\"",
                ["compression", "int8", "outputs, not updates"],
            ),
            (
                "aggregation = { rule = \"median\" }\n[distillation]\nshared = \"s.safetensors\"",
                ["aggregation", "median", "fedavg"],
            ),
            (
                "buffered = { buffer = 1, updates = 2 }\n[distillation]\nshared = \"s.safetensors\"",
                ["buffered", "(a table)", "synchronously"],
            ),
        ] {
            let error = parse(text).validate().unwrap_err().to_string();
            for word in words {
                assert!(error.contains(word), "{text}: {error} lacks {word}");
            }
        }
        assert!(toml::from_str::<FederationSpec>("sites = 3").is_err());
        parse("[distillation]\nshared = \"s.safetensors\"\nhidden = { edge-1 = 8 }")
            .validate()
            .unwrap();
        parse("[distillation]\nshared = \"s.safetensors\"\n[[groups]]\naggregator = \"fog-a\"\nzone = \"site-1\"")
            .validate()
            .expect("a fog aggregator relays a distillation round");
    }
}
