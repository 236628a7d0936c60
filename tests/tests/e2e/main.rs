//! fogmesh end to end: a node server started in the test from a `node.toml`, driven
//! through real gRPC clients, a real MQTT broker and file replay. Shared fixtures live
//! in the crate's library (`fogmesh_tests`).
//!
//! One test binary (this folder), so libtorch is loaded once; tests run in parallel,
//! each on its own node and port.

mod alerts;
mod bad_input;
mod config;
mod grpc;
mod model_store;
mod mqtt;
mod random_input;
mod replay;
mod torchscript;
mod trust;
mod zoo;
