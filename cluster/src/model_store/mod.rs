//! The node's model store (`[node] models`) over gRPC: the `ModelStore` service
//! (`Upload`, `Download`, `List`) and the client the CLI and the mesh use to copy a
//! version between stores ([`download_version`], [`upload_version`],
//! [`list_versions`]).
//!
//! The contract (`WeightChunk` and `WeightHeader` in the proto), both directions:
//! 1. The first chunk carries the header: `model` ("name@version"), `sha256`,
//!    `total_bytes` and the version's manifest JSON, whose name@version, sha256 and size
//!    must say the same. Only the first chunk carries one. Data follows in chunks of
//!    [`CHUNK_BYTES`] (a receiver takes any size up to tonic's message limit).
//! 2. `Download` reads the blob through [`ModelStore::weights`], which re-hashes it: a
//!    damaged blob on the serving node is refused (`DATA_LOSS`) before a byte leaves.
//!    A bare name asks for the newest version.
//! 3. `Upload` checks, in order: the mesh's cluster key (only on a node with
//!    `[cluster]`, the rule of [`crate::link`]; `PERMISSION_DENIED`), the header
//!    (`total_bytes` at most [`MAX_MODEL_BYTES`]; at most [`MAX_CONCURRENT_UPLOADS`]
//!    at once, `RESOURCE_EXHAUSTED` beyond), then counts and hashes the bytes as they
//!    arrive, writing them to a file staged in the store ([`StagedWeights`]), so an
//!    upload holds one chunk in memory whatever the model's size. A sender that sends
//!    no chunk for [`UPLOAD_IDLE_TIMEOUT`] is refused as a broken stream. The first chunk that runs past `total_bytes` ends the upload, so a
//!    node never reads more than it agreed to; a stream that ends short, or whose bytes
//!    hash to something else, is refused too. Only then is the version imported, which
//!    is atomic ([`ModelStore::import`]): a refused upload stores nothing. The same
//!    version sent again with the same bytes is accepted; with other bytes it is
//!    `ALREADY_EXISTS`.
//! 4. The client checks the same on its side (the header against the id it asked for,
//!    the running count and hash), and the import re-hashes. A version's parents must
//!    be in the receiving store (lineage stays whole), so both transfers first copy
//!    the ancestors the other side lacks, oldest first.
//!
//! Failures: the service answers [`ServiceError`]s, mapped to gRPC codes in
//! [`crate::status`] and counted in `fogmesh_model_store_rejected_total`; the client
//! returns [`TransferError`]s naming the node, the model and the problem. Neither side panics on what the other sends.
//!
//! What both sides share lives here: the chunk size, the limits, the header built from
//! a manifest and the chunking of a version. The service is in `server`, the client in
//! `client`, so a change to one side's checks does not hide in the other's code.
//!
//! [`ModelStore::weights`]: fogmesh_models::store::ModelStore::weights
//! [`ModelStore::import`]: fogmesh_models::store::ModelStore::import
//! [`StagedWeights`]: fogmesh_models::store::StagedWeights
//! [`ServiceError`]: crate::status::ServiceError

mod client;
mod server;

use fogmesh_models::store::Manifest;
use fogmesh_proto::{WeightChunk, WeightHeader};
use futures::Stream;

pub use client::{download_version, list_versions, upload_version, TransferError};
pub(crate) use server::ModelStoreService;

/// Data bytes per chunk a sender puts in one `WeightChunk`: well inside tonic's 4 MiB
/// message limit, so neither side needs to raise it.
pub const CHUNK_BYTES: usize = 256 << 10;
/// Largest weights a node takes in one upload or a client in one download.
pub const MAX_MODEL_BYTES: u64 = 4 << 30;
/// Uploads a node receives at once; more are refused (`RESOURCE_EXHAUSTED`), so a burst
/// of uploads cannot take a gateway's disk bandwidth and blocking threads.
pub const MAX_CONCURRENT_UPLOADS: usize = 4;
/// Longest an upload may wait for its next chunk before it is refused as broken.
pub const UPLOAD_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn header_for(
    manifest: &Manifest,
    total_bytes: u64,
    signature: Option<Vec<u8>>,
) -> Result<WeightHeader, serde_json::Error> {
    Ok(WeightHeader {
        model: manifest.id(),
        sha256: manifest.weights_sha256.clone(),
        total_bytes,
        manifest: serde_json::to_vec_pretty(manifest)?,
        signature: signature.unwrap_or_default(),
    })
}

/// The signature a header carries; empty is none.
fn header_signature(header: &WeightHeader) -> Option<&[u8]> {
    (!header.signature.is_empty()).then_some(header.signature.as_slice())
}

/// The header alone, then the weights in [`CHUNK_BYTES`] pieces, made as the stream is
/// read, so a slow reader holds one chunk in flight, not a copy of the weights.
fn chunks(header: WeightHeader, weights: Vec<u8>) -> impl Stream<Item = WeightChunk> + Send {
    let head = WeightChunk {
        header: Some(header),
        data: Vec::new(),
    };
    let count = weights.len().div_ceil(CHUNK_BYTES);
    let data = (0..count).map(move |i| {
        let end = weights.len().min((i + 1) * CHUNK_BYTES);
        WeightChunk {
            header: None,
            data: weights[i * CHUNK_BYTES..end].to_vec(),
        }
    });
    futures::stream::iter(std::iter::once(head).chain(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fogmesh_models::served::Architecture;
    use fogmesh_models::AutoencoderConfig;
    use futures::StreamExt;

    /// A version with no weights yet, as both sides' tests store it.
    pub(super) fn manifest(name: &str, version: &str, parents: &[&str]) -> Manifest {
        Manifest {
            parents: parents.iter().map(|p| p.to_string()).collect(),
            ..Architecture::ConvAutoencoder(AutoencoderConfig::w1(2, 16)).manifest(name, version)
        }
    }

    #[test]
    fn chunks_carry_the_header_first_then_every_byte_in_order() {
        let weights: Vec<u8> = (0..2 * CHUNK_BYTES + 5).map(|i| i as u8).collect();
        let header = WeightHeader {
            model: "m@1".into(),
            ..Default::default()
        };
        let sent: Vec<WeightChunk> =
            futures::executor::block_on(chunks(header, weights.clone()).collect());
        assert_eq!(sent.len(), 4);
        assert!(sent[0].header.is_some() && sent[0].data.is_empty());
        assert!(sent[1..].iter().all(|c| c.header.is_none()));
        assert_eq!(sent[3].data.len(), 5);
        let data: Vec<u8> = sent.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(data, weights);
    }
}
