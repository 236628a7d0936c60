//! What one node runs: its sensor streams, routers and experts (and the remote experts
//! its routers may reach), and when its agent stops restarting a child. A spec is
//! checked as a whole before anything starts, so a node never runs half of a spec
//! whose parts do not fit.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::error::SpecError;
use crate::expert::ExpertSpec;
use crate::router::{RouterSpec, RoutingPolicy};
use crate::sensor_stream::SensorStreamSpec;

/// When the agent stops restarting a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub max_restarts: usize,
    pub restart_window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
        }
    }
}

/// Everything one node runs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    pub node: String,
    pub sensors: Vec<SensorStreamSpec>,
    pub routers: Vec<RouterSpec>,
    pub experts: Vec<ExpertSpec>,
    /// Experts this node's routers may use that run on other nodes: known here for
    /// their shape, never started here.
    pub remote_experts: Vec<ExpertSpec>,
    pub restart: RestartPolicy,
}

impl NodeSpec {
    /// Checks each part, then that the parts fit: unique names, references that
    /// resolve, and windows the shape of every expert they can be routed to.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut experts = HashMap::new();
        for expert in self.experts.iter().chain(&self.remote_experts) {
            expert.validate()?;
            if experts.insert(expert.name.as_str(), expert).is_some() {
                return Err(SpecError::Duplicate {
                    what: "expert",
                    name: expert.name.clone(),
                });
            }
        }
        let mut routers = HashMap::new();
        for router in &self.routers {
            router.validate()?;
            if routers.insert(router.name.as_str(), router).is_some() {
                return Err(SpecError::Duplicate {
                    what: "router",
                    name: router.name.clone(),
                });
            }
            for name in router.policy.experts() {
                if !experts.contains_key(name) {
                    return Err(SpecError::UnknownReference {
                        what: "router",
                        name: router.name.clone(),
                        target_kind: "expert",
                        target: name.to_string(),
                    });
                }
            }
        }
        let mut sensors = HashSet::new();
        for sensor in &self.sensors {
            sensor.validate()?;
            if !sensors.insert(sensor.id.as_str()) {
                return Err(SpecError::Duplicate {
                    what: "sensor stream",
                    name: sensor.id.clone(),
                });
            }
            let router =
                routers
                    .get(sensor.router.as_str())
                    .ok_or_else(|| SpecError::UnknownReference {
                        what: "sensor stream",
                        name: sensor.id.clone(),
                        target_kind: "router",
                        target: sensor.router.clone(),
                    })?;
            let reachable: Vec<&str> = match &router.policy {
                RoutingPolicy::Static { routes } => routes
                    .get(&sensor.id)
                    .ok_or_else(|| SpecError::UnknownReference {
                        what: "sensor stream",
                        name: sensor.id.clone(),
                        target_kind: "route in router",
                        target: router.name.clone(),
                    })?
                    .iter()
                    .map(String::as_str)
                    .collect(),
                RoutingPolicy::LearnedGate { experts, .. } => {
                    experts.iter().map(String::as_str).collect()
                }
            };
            for name in reachable {
                let expert = experts[name];
                let (channels, window) = expert.window_shape();
                if (channels, window) != (sensor.channels, sensor.window) {
                    return Err(SpecError::Invalid {
                        what: "sensor stream",
                        name: sensor.id.clone(),
                        field: "window",
                        value: format!("{} channels x {} samples", sensor.channels, sensor.window),
                        reason: format!(
                            "expert `{name}` takes {channels} channels x {window} samples"
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}
