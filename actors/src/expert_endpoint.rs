//! `ExpertEndpoint`: the face an expert replica shows to routers on other nodes.
//!
//! **Owns** nothing but its expert's name and a small cache of recent verdicts. **Takes**
//! [`ExpertEndpointMsg::Score`] (one window from a remote router, answered with an encoded
//! verdict) and [`ExpertEndpointMsg::Echo`] (a round-trip probe for benchmarks and
//! health checks). **Supervised by** the [`crate::NodeAgent`], which starts one beside
//! every expert it hosts and restarts it like any child. **On failure**: a remote
//! router sees its call fail and retries the window on another replica.
//!
//! Why a separate actor: the [`crate::Expert`] takes local-only messages (shared
//! buffers, local reply ports) so the path inside a node costs no copy; only this actor's
//! messages are serialisable, which is what makes ractor_cluster advertise it to peer
//! nodes. It joins the process group [`EXPERT_SCOPE`]/`<expert name>`, so a router finds
//! every replica of an expert, on every node, by name.
//!
//! De-duplication: a router that retries a window (its first call timed out, the reply
//! was lost) may send it to the same replica again. The endpoint keeps the last
//! [`VERDICT_CACHE`] verdicts keyed by sensor, window sequence and a digest of the
//! values, and answers a repeat from the cache instead of scoring the window twice.
//! The digest keeps a stream that restarted its sequence numbers from being answered
//! with an old window's verdict.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;

use crate::directory::NodeDirectory;
use crate::error::{ScoreError, Unavailability};
use crate::expert::ExpertVerdict;
use crate::telemetry;

/// The process-group scope expert endpoints join; the group is the expert's name.
pub const EXPERT_SCOPE: &str = "fogmesh.experts";

/// How many recent verdicts an endpoint remembers for repeated requests.
pub const VERDICT_CACHE: usize = 4096;

/// Messages a router on any node may send. Adding variants is wire-compatible;
/// renaming or reordering fields is not (ractor_cluster encodes variants by name and
/// fields by position).
#[derive(RactorClusterMessage)]
pub enum ExpertEndpointMsg {
    /// `(sensor id, window sequence, channel-major values)` → [`encode_verdict`] bytes.
    #[rpc]
    Score(String, u64, Vec<f32>, RpcReplyPort<Vec<u8>>),
    /// Returns its payload unchanged.
    #[rpc]
    Echo(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

pub struct ExpertEndpoint;

pub struct ExpertEndpointArgs {
    pub expert: String,
    pub directory: Arc<NodeDirectory>,
}

pub struct ExpertEndpointState {
    expert: Arc<str>,
    directory: Arc<NodeDirectory>,
    cache: Arc<Mutex<VerdictCache>>,
}

impl Actor for ExpertEndpoint {
    type Msg = ExpertEndpointMsg;
    type State = ExpertEndpointState;
    type Arguments = ExpertEndpointArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ExpertEndpointArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join_scoped(
            EXPERT_SCOPE.to_string(),
            args.expert.clone(),
            vec![myself.get_cell()],
        );
        Ok(ExpertEndpointState {
            expert: args.expert.into(),
            directory: args.directory,
            cache: Arc::new(Mutex::new(VerdictCache::default())),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ExpertEndpointMsg::Echo(payload, reply) => {
                let _ = reply.send(payload);
            }
            ExpertEndpointMsg::Score(sensor, sequence, values, reply) => {
                let key = (sensor.clone(), sequence, digest(&values));
                if let Some(cached) = state.cache.lock().ok().and_then(|c| c.get(&key)) {
                    metrics::counter!(telemetry::ENDPOINT_DUPLICATES, "expert" => state.expert.to_string())
                        .increment(1);
                    let _ = reply.send(cached);
                    return Ok(());
                }
                let verdict = score_locally(&state.directory, &state.expert, values);
                let cache = state.cache.clone();
                // The forward pass runs on the expert's thread; waiting here would hold
                // every other window of this endpoint behind it.
                tokio::spawn(async move {
                    let verdict = verdict.await;
                    let bytes = encode_verdict(&verdict);
                    if verdict.is_ok() {
                        if let Ok(mut cache) = cache.lock() {
                            cache.insert(key, bytes.clone());
                        }
                    }
                    let _ = reply.send(bytes);
                });
            }
        }
        Ok(())
    }
}

/// Hands a window to the expert running on this node and returns its verdict.
fn score_locally(
    directory: &NodeDirectory,
    expert: &str,
    values: Vec<f32>,
) -> impl std::future::Future<Output = Result<ExpertVerdict, ScoreError>> + Send + 'static {
    let unavailable = |reason: Unavailability| ScoreError::ExpertUnavailable {
        expert: expert.to_string(),
        reason,
    };
    let sent = match directory.expert(expert) {
        None => Err(unavailable(Unavailability::NotHere)),
        Some(handle) if handle.shared.window_len != values.len() => Err(ScoreError::Model {
            expert: expert.to_string(),
            reason: format!(
                "window has {} values, the model takes {}",
                values.len(),
                handle.shared.window_len
            ),
        }),
        Some(handle) => Ok(handle.infer(values.into(), Instant::now())),
    };
    let stopped = unavailable(Unavailability::Stopped);
    async move {
        match sent {
            Ok(rx) => rx.await.unwrap_or(Err(stopped)),
            Err(e) => Err(e),
        }
    }
}

type CacheKey = (String, u64, u64);

/// A bounded map from request to verdict bytes; the oldest entry goes first.
#[derive(Default)]
struct VerdictCache {
    entries: HashMap<CacheKey, Vec<u8>>,
    order: VecDeque<CacheKey>,
}

impl VerdictCache {
    fn get(&self, key: &CacheKey) -> Option<Vec<u8>> {
        self.entries.get(key).cloned()
    }

    fn insert(&mut self, key: CacheKey, bytes: Vec<u8>) {
        if self.entries.insert(key.clone(), bytes).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > VERDICT_CACHE {
            if let Some(oldest) = self.order.pop_front() {
                self.entries.remove(&oldest);
            }
        }
    }
}

/// FNV-1a over the values' bits: cheap, and only ever compared for equality.
fn digest(values: &[f32]) -> u64 {
    values.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ u64::from(v.to_bits())).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

const VERDICT_OK: u8 = 0;
const VERDICT_MODEL_ERROR: u8 = 1;
const VERDICT_UNAVAILABLE: u8 = 2;

/// The wire form of an expert's answer:
/// `0, score f32, threshold f32 (NaN: none), batch size u32, batch wait µs u64, version`
/// or `1 | 2, reason` (model error | expert unavailable); numbers little-endian,
/// strings UTF-8 to the end.
pub fn encode_verdict(verdict: &Result<ExpertVerdict, ScoreError>) -> Vec<u8> {
    match verdict {
        Ok(v) => {
            let class = v.class.as_deref().unwrap_or_default();
            let mut out = Vec::with_capacity(23 + v.model_version.len() + class.len());
            out.push(VERDICT_OK);
            out.extend_from_slice(&v.score.to_le_bytes());
            out.extend_from_slice(&v.threshold.unwrap_or(f32::NAN).to_le_bytes());
            out.extend_from_slice(&(v.batch_size as u32).to_le_bytes());
            out.extend_from_slice(&(v.batch_wait.as_micros() as u64).to_le_bytes());
            // Versions are short names; one longer than u16 is cut rather than
            // corrupting the class that follows it.
            let version =
                &v.model_version.as_bytes()[..v.model_version.len().min(u16::MAX as usize)];
            out.extend_from_slice(&(version.len() as u16).to_le_bytes());
            out.extend_from_slice(version);
            out.extend_from_slice(class.as_bytes());
            out
        }
        Err(e) => {
            let (tag, reason) = match e {
                ScoreError::ExpertUnavailable { reason, .. } => {
                    (VERDICT_UNAVAILABLE, reason.to_string())
                }
                ScoreError::Model { reason, .. } => (VERDICT_MODEL_ERROR, reason.clone()),
                other => (VERDICT_MODEL_ERROR, other.to_string()),
            };
            let mut out = vec![tag];
            out.extend_from_slice(reason.as_bytes());
            out
        }
    }
}

/// Reads [`encode_verdict`]'s bytes; `expert` names the replica in errors.
pub fn decode_verdict(expert: &str, bytes: &[u8]) -> Result<ExpertVerdict, ScoreError> {
    let malformed = || ScoreError::ExpertUnavailable {
        expert: expert.to_string(),
        reason: Unavailability::MalformedReply { bytes: bytes.len() },
    };
    let text = |rest: &[u8]| String::from_utf8_lossy(rest).into_owned();
    match bytes.split_first() {
        Some((&VERDICT_OK, rest)) if rest.len() >= 22 => {
            let f32_at = |i: usize| f32::from_le_bytes(rest[i..i + 4].try_into().unwrap_or([0; 4]));
            let threshold = f32_at(4);
            let batch_size = u32::from_le_bytes(rest[8..12].try_into().map_err(|_| malformed())?);
            let wait_us = u64::from_le_bytes(rest[12..20].try_into().map_err(|_| malformed())?);
            let version_len =
                u16::from_le_bytes(rest[20..22].try_into().map_err(|_| malformed())?) as usize;
            let version = rest.get(22..22 + version_len).ok_or_else(malformed)?;
            let class = &rest[22 + version_len..];
            Ok(ExpertVerdict {
                score: f32_at(0),
                threshold: (!threshold.is_nan()).then_some(threshold),
                model_version: text(version).into(),
                class: (!class.is_empty()).then(|| text(class).into()),
                batch_size: batch_size as usize,
                batch_wait: Duration::from_micros(wait_us),
            })
        }
        Some((&VERDICT_MODEL_ERROR, rest)) => Err(ScoreError::Model {
            expert: expert.to_string(),
            reason: text(rest),
        }),
        Some((&VERDICT_UNAVAILABLE, rest)) => Err(ScoreError::ExpertUnavailable {
            expert: expert.to_string(),
            reason: Unavailability::Remote(text(rest)),
        }),
        _ => Err(malformed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn verdicts_survive_the_wire(
            score in any::<f32>().prop_filter("NaN has no equality", |s| !s.is_nan()),
            threshold in proptest::option::of(0.001f32..1e6),
            batch_size in 1usize..4096,
            wait_us in 0u64..10_000_000,
            version in "[a-z0-9.@-]{0,24}",
            class in proptest::option::of("[a-z0-9 _é-]{1,16}"),
        ) {
            let verdict = ExpertVerdict {
                score,
                threshold,
                model_version: version.as_str().into(),
                class: class.map(|c| c.as_str().into()),
                batch_size,
                batch_wait: Duration::from_micros(wait_us),
            };
            let decoded = decode_verdict("ae", &encode_verdict(&Ok(verdict.clone())));
            prop_assert_eq!(decoded, Ok(verdict));
        }

        #[test]
        fn errors_survive_the_wire(reason in ".{0,64}") {
            let model = Err(ScoreError::Model { expert: "ae".into(), reason: reason.clone() });
            prop_assert_eq!(decode_verdict("ae", &encode_verdict(&model)), model);
            let gone = Err(ScoreError::ExpertUnavailable {
                expert: "ae".into(),
                reason: Unavailability::Remote(reason),
            });
            prop_assert_eq!(decode_verdict("ae", &encode_verdict(&gone)), gone);
            let silent = Err(ScoreError::ExpertUnavailable {
                expert: "ae".into(),
                reason: Unavailability::Silent { replica: "<0.7>".into(), after: Duration::from_millis(250) },
            });
            let relayed = Err(ScoreError::ExpertUnavailable {
                expert: "ae".into(),
                reason: Unavailability::Remote("replica <0.7> gave no answer within 250ms".into()),
            });
            prop_assert_eq!(decode_verdict("ae", &encode_verdict(&silent)), relayed);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode_verdict("ae", &bytes);
        }
    }

    #[test]
    fn the_cache_forgets_the_oldest_first() {
        let mut cache = VerdictCache::default();
        for i in 0..(VERDICT_CACHE as u64 + 10) {
            cache.insert(("s".into(), i, 0), vec![i as u8]);
        }
        assert_eq!(cache.entries.len(), VERDICT_CACHE);
        assert!(cache.get(&("s".into(), 9, 0)).is_none());
        assert_eq!(cache.get(&("s".into(), 10, 0)), Some(vec![10]));
    }

    #[test]
    fn digests_tell_different_windows_apart() {
        assert_ne!(digest(&[1.0, 2.0]), digest(&[2.0, 1.0]));
        assert_eq!(digest(&[1.0, 2.0]), digest(&[1.0, 2.0]));
    }
}
