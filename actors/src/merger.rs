//! `Merger`: merges stored model versions into a new stored version, and keeps an
//! unproven merge from ever reaching the store when asked to validate it.
//!
//! **Owns** a [`ModelStore`] handle, the [`Assets`] a merged version needs to load (the
//! MiniLM folder for language and multimodal models), the number of threads merging may
//! use, and its counters ([`MergerShared`]: merges done, merges refused, the last
//! outcome in one line), which anyone holding the `Arc` reads without a message.
//! **Takes** [`MergerMsg::Merge`]: a [`MergeRequest`] answered on its reply port with
//! the stored version ([`MergeOutcome`]) or the reason it was refused
//! ([`MergeRefused`]). **Supervised by** whoever spawned it (`fogmesh merge` spawns one
//! in-process for one request); it holds nothing that a fresh merger would miss, since
//! the store is on disk and the counters live in the caller's [`MergerShared`]. **On
//! failure**: every bad request (unknown version, wrong method parameters, versions of
//! different networks, a merged version that would not serve, windows of the wrong
//! shape, a gate not met) is answered with a [`MergeRefused`] naming what is wrong,
//! counted in `merges_refused`, and stores nothing; nothing from outside makes it panic.
//! A panic inside libtorch on the merging thread comes back as
//! [`MergeRefused::Thread`].
//!
//! One merge at a time: the handler waits for the merging thread, so two requests that
//! both default to the next whole-number version of a name cannot pick the same one.
//! The work runs on a blocking thread (reading weights, the merge, loading and
//! evaluating with one libtorch thread, storing), never on the async runtime.
//!
//! With [`Validation`], merged versions pass the same validation gate before they serve
//! as fine-tuned ones do (`ContinualLearner`): the incumbent (the version the merged one
//! would replace) and the merged version are evaluated on windows of the old regime and
//! of the new one, and [`ValidationGate::judge`] decides. Only a promoted merge is
//! stored, its metrics carrying the gate figures; without validation the merge is
//! stored and its outcome says it is unvalidated.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fogmesh_models::continual::{evaluate, GateReport, ReplayItem, ValidationGate};
use fogmesh_models::merge::{
    check_same_network, merge_stored, MergeMethod, MergeSpec, MergingError,
};
use fogmesh_models::served::Assets;
use fogmesh_models::store::{Manifest, ModelStore, StoreError};
use fogmesh_models::ModelError;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

/// Held-out windows of both regimes and the gate they must pass.
#[derive(Debug, Clone)]
pub struct Validation {
    /// Windows of the regime the incumbent serves: the merge may not forget it.
    pub old: Vec<ReplayItem>,
    /// Windows of the regime the merge is for: the merge must gain on it.
    pub new: Vec<ReplayItem>,
    pub gate: ValidationGate,
}

/// One merge, as [`MergeSpec`] plus what validation needs.
#[derive(Debug, Clone)]
pub struct MergeRequest {
    /// `name@version`, or a bare name for its newest version.
    pub inputs: Vec<String>,
    /// Required by task arithmetic, TIES and DARE; refused by the others.
    pub base: Option<String>,
    pub method: MergeMethod,
    /// The merged version's name.
    pub name: String,
    /// Its version; by default one more than the largest whole-number version of
    /// `name`.
    pub version: Option<String>,
    /// The version the merged one would replace; validation compares the two, so it is
    /// required with `validation` and refused without it.
    pub incumbent: Option<String>,
    pub validation: Option<Validation>,
}

/// A stored merged version.
#[derive(Debug, Clone)]
pub struct MergeOutcome {
    /// As stored (hash, size and creation time filled in).
    pub manifest: Manifest,
    /// The gate's decision (always a promotion here: a refusal stores nothing); `None`
    /// when the merge was stored unvalidated.
    pub gate: Option<GateReport>,
}

impl MergeOutcome {
    /// Whether the merged version passed the validation gate before it was stored.
    pub fn validated(&self) -> bool {
        self.gate.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MergeRefused {
    /// A field of the request that cannot be honoured, whatever the store holds.
    #[error("invalid {field} = {value}: {reason}")]
    Request {
        field: &'static str,
        value: String,
        reason: String,
    },

    #[error("invalid validation gate: {0}")]
    InvalidGate(#[source] ModelError),

    /// Reading, checking or merging the versions, or loading the result.
    #[error(transparent)]
    Merging(#[from] MergingError),

    #[error("reading the incumbent {id} from the store: {source}")]
    Incumbent {
        id: String,
        #[source]
        source: StoreError,
    },

    /// `model` could not be evaluated on the windows of `regime` (`old` or `new`).
    #[error("evaluating {model} on the {regime}-regime windows: {source}")]
    Evaluation {
        model: String,
        regime: &'static str,
        // Boxed: a model error is the largest thing a refusal carries.
        #[source]
        source: Box<ModelError>,
    },

    #[error("merged versions pass the same validation gate before they serve: {merged} against {incumbent}: {}", report.reason)]
    Gate {
        merged: String,
        incumbent: String,
        report: GateReport,
    },

    #[error("storing {id}: {source}")]
    Store {
        id: String,
        #[source]
        source: StoreError,
    },

    #[error("the merging thread failed: {0}")]
    Thread(#[source] tokio::task::JoinError),
}

pub enum MergerMsg {
    /// Merge, validate if asked, store; answered once the version is stored or refused.
    Merge {
        request: MergeRequest,
        reply: RpcReplyPort<Result<MergeOutcome, MergeRefused>>,
    },
}

// Local only: a reply port and replay windows have no business crossing nodes.
impl ractor::Message for MergerMsg {}

/// The merger's counters, read without a message.
#[derive(Debug, Default)]
pub struct MergerShared {
    /// Merged versions stored.
    pub merges_done: AtomicU64,
    /// Requests refused (nothing stored).
    pub merges_refused: AtomicU64,
    last_outcome: Mutex<String>,
}

impl MergerShared {
    /// The last request's outcome in one line (empty before the first).
    pub fn last_outcome(&self) -> String {
        self.last_outcome
            .lock()
            .map(|line| line.clone())
            .unwrap_or_default()
    }

    fn record(&self, line: String, stored: bool) {
        let counter = if stored {
            &self.merges_done
        } else {
            &self.merges_refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_outcome.lock() {
            *last = line;
        }
    }
}

pub struct Merger;

pub struct MergerArgs {
    pub store: ModelStore,
    pub assets: Assets,
    /// Threads the merge arithmetic may use (libtorch, for loading and evaluating,
    /// always gets one): all cores for a one-off command, fewer on a serving node.
    pub merge_threads: usize,
    pub shared: Arc<MergerShared>,
}

impl Actor for Merger {
    type Msg = MergerMsg;
    type State = MergerArgs;
    type Arguments = MergerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: MergerArgs,
    ) -> Result<MergerArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: MergerMsg,
        state: &mut MergerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let MergerMsg::Merge { request, reply } = message;
        let method = request.method.name();
        let inputs = request.inputs.join(", ");
        let outcome = run(state, request).await;
        match &outcome {
            Ok(stored) => {
                let line = format!(
                    "merged {} from {inputs} by {method}, {}",
                    stored.manifest.id(),
                    if stored.validated() {
                        "validated"
                    } else {
                        "unvalidated"
                    }
                );
                tracing::info!(merged = %stored.manifest.id(), %method, validated = stored.validated(), "merged version stored");
                state.shared.record(line, true);
            }
            Err(refused) => {
                tracing::warn!(%inputs, %method, %refused, "merge refused");
                state
                    .shared
                    .record(format!("refused {method} of {inputs}: {refused}"), false);
            }
        }
        // A caller that stopped waiting closed its port; the outcome is still recorded.
        if reply.send(outcome).is_err() {
            tracing::debug!("the merge's caller left before the answer");
        }
        Ok(())
    }
}

/// Checks the request, then does the work on a blocking thread.
async fn run(state: &MergerArgs, request: MergeRequest) -> Result<MergeOutcome, MergeRefused> {
    let MergeRequest {
        inputs,
        base,
        method,
        name,
        version,
        incumbent,
        validation,
    } = request;
    let validation = match (validation, incumbent) {
        (Some(validation), Some(incumbent)) => {
            validation
                .gate
                .validate()
                .map_err(MergeRefused::InvalidGate)?;
            Some((validation, incumbent))
        }
        (Some(_), None) => {
            return Err(MergeRefused::Request {
                field: "incumbent",
                value: "none".into(),
                reason: "validation compares the merged version with the version it would replace; name it".into(),
            })
        }
        (None, Some(incumbent)) => {
            return Err(MergeRefused::Request {
                field: "incumbent",
                value: incumbent,
                reason: "an incumbent is only used to validate the merge against; give validation windows or leave it out".into(),
            })
        }
        (None, None) => None,
    };
    let spec = MergeSpec {
        inputs,
        base,
        method,
        name,
        version,
    };
    let store = state.store.clone();
    let assets = state.assets.clone();
    let threads = state.merge_threads.max(1);
    tokio::task::spawn_blocking(move || {
        // libtorch's intra-op thread count is per calling thread: one here, as on the
        // expert threads, so loading and evaluating do not take the cores serving needs.
        tch::set_num_threads(1);
        merge_validate_store(&store, &spec, &assets, threads, validation)
    })
    .await
    .map_err(MergeRefused::Thread)?
}

/// The blocking part: merge, judge against the incumbent when asked, store.
fn merge_validate_store(
    store: &ModelStore,
    spec: &MergeSpec,
    assets: &Assets,
    threads: usize,
    validation: Option<(Validation, String)>,
) -> Result<MergeOutcome, MergeRefused> {
    let (mut manifest, weights) = merge_stored(store, spec, assets, threads)?;
    let gate = match validation {
        None => {
            manifest.training["validation"] = serde_json::Value::Null;
            None
        }
        Some((validation, incumbent_id)) => {
            let incumbent = store
                .get(&incumbent_id)
                .map_err(|source| MergeRefused::Incumbent {
                    id: incumbent_id.clone(),
                    source,
                })?;
            check_same_network(&incumbent, &manifest)?;
            let incumbent_weights =
                store
                    .weights(&incumbent)
                    .map_err(|source| MergeRefused::Incumbent {
                        id: incumbent.id(),
                        source,
                    })?;
            let device = fogmesh_models::default_device();
            let loss = |model: &Manifest, bytes: &[u8], regime, items: &[ReplayItem]| {
                evaluate(model, bytes, items, device).map_err(|source| MergeRefused::Evaluation {
                    model: model.id(),
                    regime,
                    source: Box::new(source),
                })
            };
            let report = validation.gate.judge(
                loss(&incumbent, &incumbent_weights, "old", &validation.old)?,
                loss(&manifest, &weights, "old", &validation.old)?,
                loss(&incumbent, &incumbent_weights, "new", &validation.new)?,
                loss(&manifest, &weights, "new", &validation.new)?,
            );
            if !report.promote {
                return Err(MergeRefused::Gate {
                    merged: manifest.id(),
                    incumbent: incumbent.id(),
                    report,
                });
            }
            // The same metric names as a continual learner's promoted versions.
            for (metric, value) in [
                ("gate_old_before", report.old_before),
                ("gate_old_after", report.old_after),
                ("gate_new_before", report.new_before),
                ("gate_new_after", report.new_after),
            ] {
                manifest.metrics.insert(metric.to_string(), value);
            }
            manifest.training["validation"] = serde_json::json!({
                "incumbent": incumbent.id(),
                "gate": validation.gate,
                "old_windows": validation.old.len(),
                "new_windows": validation.new.len(),
                "report": report,
            });
            Some(report)
        }
    };
    let id = manifest.id();
    let manifest = store
        .import(manifest, &weights)
        .map_err(|source| MergeRefused::Store { id, source })?;
    Ok(MergeOutcome { manifest, gate })
}
