//! The zoo's evaluations as a user runs them (`fogmesh eval ...`), with smaller budgets,
//! on the data `just setup` prepares. One test binary: each module is one evaluation.

mod continual;
mod elpv;
mod multimodal;
mod notes;
