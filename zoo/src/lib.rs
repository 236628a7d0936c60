//! The model zoo's workbench: the data sets fogmesh learns from (the Tennessee Eastman
//! plant's units, SKAB, ELPV solar cells, the project's operator notes), one training
//! recipe per model (`fogmesh train`: train, evaluate with the data set's own metric,
//! store as a servable version) and the evaluations against published results
//! (`fogmesh eval skab|tep|continual|elpv|notes|multimodal`).
//!
//! The networks themselves live in `fogmesh-models`; this crate decides what they are
//! trained on and how they are judged, so nothing here runs on a serving node.

pub mod continual_eval;
pub mod datasets;
pub mod elpv_eval;
pub mod evaluation;
pub mod federated_eval;
pub mod fusion_eval;
pub mod notes_eval;
pub mod skab;
pub mod tep;
pub mod tep_eval;
pub mod train;
