//! The node agent and everything around it: what a node runs ([`NodeSpec`],
//! [`RestartPolicy`]), the supervisor that runs it ([`NodeAgent`], which starts, restarts
//! and reconciles the node's actors), and [`Node`], the handle a process holds on a
//! running node to push readings, score windows, swap experts, reconcile and read its
//! state.

mod agent;
mod call;
mod node;
mod spec;

pub use agent::{NodeAgent, NodeAgentArgs, NodeAgentMsg, NodeAgentState, ReconcileReport};
pub(crate) use call::call_within;
pub use call::{Unanswered, Undelivered, CALL_TIMEOUT};
pub use node::{ExpertSnapshot, Node, NodeSnapshot, RouterSnapshot, SensorSnapshot};
pub use spec::{NodeSpec, RestartPolicy};
