//! The benchmark workloads in small, as `fogmesh bench` runs them. They assert what the
//! reports must hold (every request answered, the timed merge is the right merge), never
//! speed. One test binary: each module is one workload.

mod merge;
mod swap;
