//! The actors observed from outside, in one test binary (each links libtorch once):
//! an expert's batching and hot swap, a whole node in one process (also restarted on
//! its edge log), the continual learner on a running node, the merger on a real model
//! store, federated rounds and federated distillation. `plant` is the synthetic plant the learner, merger and
//! federation tests share.

mod batching;
mod continual_learner;
mod distillation;
mod edge_log;
mod federated;
mod hot_swap;
mod merger;
mod node;
mod plant;
mod store_and_forward;
