//! Plants and topologies simulated on the real fogmesh code: the Tennessee Eastman demo
//! behind `fogmesh demo` (one sensor stream and one anomaly expert per plant unit,
//! faulty runs replayed through a real node faster than real time), and the plant
//! network simulator behind `fogmesh sim` (zones, links and faults around real
//! `fogmesh node` processes).
//!
//! Nothing here is a mock: the demo starts a real [`fogmesh_actors::Node`], the
//! simulator real node processes, and both measure them from outside, the way an
//! operator would.

pub mod demo;
pub mod sim;
