//! Plants and topologies simulated on the real fogmesh actors in one process. Today:
//! the Tennessee Eastman demo behind `fogmesh demo` (one sensor stream and one anomaly
//! expert per plant unit, faulty runs replayed through a real node faster than real
//! time). The topology simulator behind `fogmesh sim` belongs here next.
//!
//! Nothing here is a mock: the demo starts a real [`fogmesh_actors::Node`] and measures
//! it from outside, the way an operator would.

pub mod demo;
