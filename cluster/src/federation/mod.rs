//! Federated rounds across the mesh's nodes: the `Federation` gRPC service a site's
//! node serves (`service`), the [`RemoteSite`] actor through which a coordinator on
//! another node reaches a site as if it were local (`remote_site`), and the framing
//! both use (here: the chunk framing, the wire form of a round's work, dialing).
//!
//! The contract (`FederationChunk` in the proto): weights and updates cross in chunks
//! of [`CHUNK_BYTES`], never as one message, like the `ModelStore`'s versions. The
//! first chunk carries the header, which lists the blobs that follow (their sizes and
//! sha256); the receiver counts every blob against its size, refuses more than
//! [`MAX_MODEL_BYTES`] in all before reading it, and checks each hash. Only weights,
//! encoded updates, counts and losses cross: a site's windows stay in its
//! `SiteTrainer`.
//!
//! [`CHUNK_BYTES`]: crate::model_store::CHUNK_BYTES
//! [`MAX_MODEL_BYTES`]: crate::model_store::MAX_MODEL_BYTES

mod remote_site;
mod service;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use fogmesh_actors::{DistillRound, RoundWork};
use fogmesh_models::continual::ReplayItem;
use fogmesh_models::federated::{Compression, LocalWork};
use fogmesh_models::weights::sha256_hex;
use fogmesh_proto::federation_client::FederationClient;
use fogmesh_proto::{BlobRef, FederationChunk, FederationHeader, SiteWork};
use futures::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::cluster_key::KEY_HEADER;
use crate::dialer::{Dialer, LinkError};
use crate::model_store::{CHUNK_BYTES, MAX_MODEL_BYTES};

pub use remote_site::{RemoteSite, RemoteSiteArgs};
pub(crate) use service::FederationService;

/// Why a federation call between two nodes failed.
#[derive(Debug, thiserror::Error)]
pub enum SiteCallError {
    #[error("the first chunk carries no header")]
    NoHeader,
    #[error("a second header after {received} bytes")]
    SecondHeader { received: u64 },
    #[error(
        "the header lists {bytes} bytes of blobs, the limit is {limit} bytes (`MAX_MODEL_BYTES`)"
    )]
    TooLarge { bytes: u64, limit: u64 },
    #[error("blob {blob}: the stream ended after {received} of its {declared} bytes")]
    Short {
        blob: usize,
        received: u64,
        declared: u64,
    },
    #[error("more data than the {declared} bytes the header lists")]
    Long { declared: u64 },
    #[error("blob {blob}: its bytes hash to {actual}, the header says {expected}")]
    Hash {
        blob: usize,
        expected: String,
        actual: String,
    },
    #[error("field `{field}` = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("node `{node}` is no site of federation `{federation}`")]
    NoSite { node: String, federation: String },
    #[error(
        "federation `{federation}`: no shared windows of sha256 {sha256} are held here; send them"
    )]
    SharedUnknown { federation: String, sha256: String },
    #[error("no federation of expert `{expert}` runs in this mesh: {reason}")]
    NoCoordinator { expert: String, reason: String },
    #[error("the call carries no key of this mesh")]
    WrongKey,
    #[error("{0}")]
    Site(#[source] Box<fogmesh_actors::TrainingError>),
    #[error("{0}")]
    Round(#[source] Box<fogmesh_actors::FederationError>),
    #[error("the {callee} stopped before it answered")]
    Unanswered { callee: &'static str },
    #[error("cannot reach {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{}: {}", .0.code(), .0.message())]
    Status(Status),
}

impl SiteCallError {
    fn code(&self) -> Code {
        match self {
            SiteCallError::NoHeader
            | SiteCallError::SecondHeader { .. }
            | SiteCallError::Short { .. }
            | SiteCallError::Long { .. }
            | SiteCallError::Hash { .. }
            | SiteCallError::Invalid { .. } => Code::InvalidArgument,
            SiteCallError::TooLarge { .. } => Code::ResourceExhausted,
            SiteCallError::NoSite { .. } | SiteCallError::NoCoordinator { .. } => Code::NotFound,
            // A `Train` never runs a round, so there FAILED_PRECONDITION can only mean
            // the shared windows are missing: the coordinator's side resends them.
            SiteCallError::Round(_) | SiteCallError::SharedUnknown { .. } => {
                Code::FailedPrecondition
            }
            SiteCallError::WrongKey => Code::PermissionDenied,
            SiteCallError::Site(_) => Code::Aborted,
            SiteCallError::Unanswered { .. } | SiteCallError::Connect { .. } => Code::Unavailable,
            SiteCallError::Status(status) => status.code(),
        }
    }
}

impl From<SiteCallError> for Status {
    fn from(error: SiteCallError) -> Status {
        Status::new(error.code(), error.to_string())
    }
}

/// A `Federation` client for the node at `addr`.
pub(crate) async fn client(
    dialer: &Dialer,
    addr: &str,
) -> Result<FederationClient<Channel>, SiteCallError> {
    let channel = dialer
        .channel(addr)
        .await
        .map_err(|e| SiteCallError::Connect {
            addr: addr.into(),
            reason: match e {
                LinkError::Unreachable { reason, .. } => reason,
                other => other.to_string(),
            },
        })?
        .channel;
    // tonic's default message limit holds: every chunk is far below it.
    Ok(FederationClient::new(channel))
}

/// Adds the mesh key, where the dialer has one, to a call.
pub(crate) fn with_key<T>(dialer: &Dialer, request: &mut Request<T>) {
    if let Some(value) = dialer.key().and_then(|k| k.as_str().parse().ok()) {
        request.metadata_mut().insert(KEY_HEADER, value);
    }
}

/// The round's work as the wire says it, checked.
pub(crate) fn work_from(work: &SiteWork) -> Result<RoundWork, SiteCallError> {
    let compression: Compression =
        work.compression
            .parse()
            .map_err(
                |e: fogmesh_models::federated::FederatedError| SiteCallError::Invalid {
                    field: "work.compression",
                    value: work.compression.clone(),
                    reason: e.to_string(),
                },
            )?;
    let local = LocalWork {
        epochs: work.epochs as usize,
        batch_size: work.batch_size as usize,
        learning_rate: work.learning_rate,
        proximal_mu: work.proximal_mu,
        seed: work.seed,
        max_seconds: work.max_seconds,
    };
    local.validate().map_err(|e| SiteCallError::Invalid {
        field: "work",
        value: format!("{local:?}"),
        reason: e.to_string(),
    })?;
    Ok(RoundWork {
        local,
        compression,
        echo: work.echo,
        distill: None,
    })
}

/// Little-endian f32 `bytes` as whole windows of `per` values each.
fn f32_windows(field: &'static str, bytes: &[u8], per: usize) -> Result<Vec<f32>, SiteCallError> {
    if per == 0 || !bytes.len().is_multiple_of(4 * per) {
        return Err(SiteCallError::Invalid {
            field,
            value: format!("{} bytes", bytes.len()),
            reason: format!("must be whole windows of {per} f32 values"),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The shared windows as the wire carries them: little-endian f32, cut into windows of
/// `work.shared_window_values`.
pub(crate) fn shared_from(work: &SiteWork, bytes: &[u8]) -> Result<Vec<ReplayItem>, SiteCallError> {
    let per_window = work.shared_window_values as usize;
    Ok(f32_windows("shared windows", bytes, per_window)?
        .chunks(per_window)
        .map(|w| ReplayItem {
            window: w.to_vec(),
            label: None,
        })
        .collect())
}

/// A distillation round's part: the shared windows (received now or before) and the
/// consensus as the wire carries it (little-endian f32, one run of values per shared
/// window).
pub(crate) fn distill_from(
    work: &SiteWork,
    shared: Arc<Vec<ReplayItem>>,
    consensus: &[u8],
) -> Result<Option<DistillRound>, SiteCallError> {
    let Some(weight) = work.distill_weight else {
        return Ok(None);
    };
    if !(weight.is_finite() && weight > 0.0) {
        return Err(SiteCallError::Invalid {
            field: "work.distill_weight",
            value: weight.to_string(),
            reason: "must be a finite number above 0".into(),
        });
    }
    let consensus = if consensus.is_empty() {
        Vec::new()
    } else {
        f32_windows("consensus", consensus, shared.len().max(1))?
    };
    Ok(Some(DistillRound {
        shared,
        consensus: Arc::new(consensus),
        weight,
    }))
}

/// `values` as little-endian f32 bytes.
pub(crate) fn f32_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(f32::to_le_bytes).collect()
}

pub(crate) fn work_to(work: &RoundWork) -> SiteWork {
    SiteWork {
        epochs: work.local.epochs as u32,
        batch_size: work.local.batch_size as u32,
        learning_rate: work.local.learning_rate,
        proximal_mu: work.local.proximal_mu,
        seed: work.local.seed,
        max_seconds: work.local.max_seconds,
        compression: work.compression.to_string(),
        echo: work.echo,
        distill_weight: work.distill.as_ref().map(|d| d.weight),
        shared_window_values: work
            .distill
            .as_ref()
            .and_then(|d| d.shared.first())
            .map_or(0, |w| w.window.len() as u64),
        shared_sha256: String::new(),
    }
}

/// The most a receiver reserves for a blob before its bytes arrive.
const PREALLOCATE_BYTES: u64 = 16 << 20;

/// `header` listing `blobs`, then each blob in [`CHUNK_BYTES`] pieces, made as the
/// stream is read.
pub(crate) fn chunks(
    mut header: FederationHeader,
    blobs: Vec<Arc<Vec<u8>>>,
) -> impl Stream<Item = FederationChunk> + Send + 'static {
    header.blobs = blobs
        .iter()
        .map(|b| BlobRef {
            bytes: b.len() as u64,
            sha256: sha256_hex(b),
        })
        .collect();
    let head = FederationChunk {
        header: Some(header),
        data: Vec::new(),
    };
    let data = blobs.into_iter().flat_map(|blob| {
        let count = blob.len().div_ceil(CHUNK_BYTES);
        (0..count).map(move |i| FederationChunk {
            header: None,
            data: blob[i * CHUNK_BYTES..blob.len().min((i + 1) * CHUNK_BYTES)].to_vec(),
        })
    });
    futures::stream::iter(std::iter::once(head).chain(data))
}

/// Reads a header and the blobs it lists, checking sizes and hashes.
pub(crate) async fn receive<S>(
    mut stream: S,
) -> Result<(FederationHeader, Vec<Vec<u8>>), SiteCallError>
where
    S: Stream<Item = Result<FederationChunk, Status>> + Unpin,
{
    let header = stream
        .next()
        .await
        .transpose()
        .map_err(SiteCallError::Status)?
        .and_then(|c| c.header)
        .ok_or(SiteCallError::NoHeader)?;
    let declared = header
        .blobs
        .iter()
        .try_fold(0u64, |sum, b| sum.checked_add(b.bytes))
        .unwrap_or(u64::MAX);
    if declared > MAX_MODEL_BYTES {
        return Err(SiteCallError::TooLarge {
            bytes: declared,
            limit: MAX_MODEL_BYTES,
        });
    }
    let mut blobs: Vec<Vec<u8>> = header
        .blobs
        .iter()
        // Room for what arrives, not for what a header claims: a header alone must not
        // make a node reserve gigabytes.
        .map(|b| Vec::with_capacity(b.bytes.min(PREALLOCATE_BYTES) as usize))
        .collect();
    let mut current = 0;
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(SiteCallError::Status)?;
        if chunk.header.is_some() {
            return Err(SiteCallError::SecondHeader { received });
        }
        let mut data = chunk.data.as_slice();
        while !data.is_empty() {
            let Some(blob) = blobs.get_mut(current) else {
                return Err(SiteCallError::Long { declared });
            };
            let room = header.blobs[current].bytes as usize - blob.len();
            let take = room.min(data.len());
            blob.extend_from_slice(&data[..take]);
            data = &data[take..];
            received += take as u64;
            if blob.len() as u64 == header.blobs[current].bytes {
                current += 1;
            }
        }
    }
    for (index, (blob, listed)) in blobs.iter().zip(&header.blobs).enumerate() {
        if (blob.len() as u64) < listed.bytes {
            return Err(SiteCallError::Short {
                blob: index,
                received: blob.len() as u64,
                declared: listed.bytes,
            });
        }
        let actual = sha256_hex(blob);
        if actual != listed.sha256 {
            return Err(SiteCallError::Hash {
                blob: index,
                expected: listed.sha256.clone(),
                actual,
            });
        }
    }
    Ok((header, blobs))
}

#[cfg(test)]
mod framing_tests {
    use super::*;

    fn roundtrip(blobs: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, SiteCallError> {
        let sent: Vec<FederationChunk> = futures::executor::block_on(
            chunks(
                FederationHeader::default(),
                blobs.into_iter().map(Arc::new).collect(),
            )
            .collect(),
        );
        futures::executor::block_on(receive(futures::stream::iter(sent.into_iter().map(Ok))))
            .map(|(_, blobs)| blobs)
    }

    #[test]
    fn blobs_cross_whole_and_in_order_across_chunk_boundaries() {
        let a: Vec<u8> = (0..CHUNK_BYTES + 3).map(|i| i as u8).collect();
        let b = vec![7u8; 5];
        let empty = Vec::new();
        let got = roundtrip(vec![a.clone(), empty.clone(), b.clone()]).unwrap();
        assert_eq!(got, vec![a, empty, b]);
    }

    #[test]
    fn a_short_long_or_altered_stream_is_refused_naming_the_blob() {
        let blob = Arc::new(vec![1u8; 10]);
        let sent: Vec<FederationChunk> =
            futures::executor::block_on(chunks(FederationHeader::default(), vec![blob]).collect());
        let run = |chunks: Vec<FederationChunk>| {
            futures::executor::block_on(receive(futures::stream::iter(chunks.into_iter().map(Ok))))
                .unwrap_err()
                .to_string()
        };
        let mut short = sent.clone();
        short[1].data.truncate(4);
        assert!(run(short).contains("blob 0: the stream ended after 4 of its 10 bytes"));
        let mut long = sent.clone();
        long[1].data.push(1);
        assert!(run(long).contains("more data than the 10 bytes"));
        let mut altered = sent.clone();
        altered[1].data[0] = 2;
        assert!(run(altered).contains("blob 0: its bytes hash to"));
        let mut huge = sent;
        huge[0].header.as_mut().unwrap().blobs[0].bytes = MAX_MODEL_BYTES + 1;
        assert!(run(huge).contains("the limit is"));
    }
}
