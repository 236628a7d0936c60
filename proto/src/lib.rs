//! The `fogmesh.v1` wire contract: protobuf messages and the tonic clients and servers
//! of the Ingest, Inference, Control, ModelStore, Telemetry and ClusterLink services.
//!
//! Generated from `proto/fogmesh/v1/fogmesh.proto`; that file is the reference for
//! field meanings. This crate holds no logic: validation lives with the actors that own
//! the data, and the service implementations live in `fogmesh-cluster`.

/// Messages and services of `fogmesh.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("fogmesh.v1");
}

pub use v1::*;
