//! The benchmark workloads behind `fogmesh bench`, each printing one JSON object:
//! W1 (routing + inference) in one process (`w1`) and with its experts on a second node
//! process to price the cluster link (`w1_remote`), W1 while every expert is hot-swapped
//! (`swap`), training and inference speed against the same networks in PyTorch eager
//! (`training_speed`), merge bandwidth against memcpy (`merge`), and one sensor
//! flooding a node while another keeps its pace (`flood`).
//!
//! Nothing here is a mock: every workload starts real [`fogmesh_actors::Node`]s (or real
//! `fogmesh node` processes) and measures them from outside, the way a load generator
//! would. Targets are checked by reading these reports, never by timed tests.

pub mod flood;
pub mod merge;
pub mod swap;
pub mod training_speed;
pub mod w1;
pub mod w1_remote;
