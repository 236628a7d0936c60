//! Scenarios run on the real fogmesh actors in one process: the plant demo
//! (`fogmesh demo`), the benchmark workloads (`fogmesh bench`; W1's remote run puts its
//! experts on a second node process to price the cluster link) and evaluations on
//! public benchmarks (`fogmesh eval skab`, `fogmesh eval tep`, `fogmesh eval elpv`,
//! `fogmesh eval continual`).
//!
//! Nothing here is a mock: the demo and W1 start a real [`fogmesh_actors::Node`] and
//! measure it from outside, the way an operator or a load generator would.

pub mod bench_merge;
pub mod bench_swap;
pub mod bench_train;
pub mod continual_eval;
pub mod demo;
pub mod elpv_eval;
pub mod evaluation;
pub mod fusion_eval;
pub mod notes_eval;
pub mod skab;
pub mod tep;
pub mod tep_eval;
pub mod train;
pub mod w1;
pub mod w1_remote;
