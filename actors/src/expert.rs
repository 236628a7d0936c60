//! `Expert`: one model on one device, serving windows in dynamic batches.
//!
//! **Owns** a dedicated OS thread that owns the model (a [`ConvAutoencoder`] from its
//! config; any model version from the model store, of any kind, checked against its
//! manifest's hash on load; or a TorchScript file a plant engineer exported from
//! PyTorch, checked against its declared signature; placed with
//! `Device::cuda_if_available()`), the batching queue, and the expert's counters.
//! **Takes** [`ExpertMsg::Infer`]: one window, answered with its score on the request's
//! reply port, or refused at once with [`ScoreError::ExpertBusy`] while
//! [`MAX_QUEUED_WINDOWS`] wait for the model thread; [`ExpertMsg::Swap`]: serve another
//! version from the next batch on.
//! **Supervised by** the [`crate::NodeAgent`], which restarts it from the spec of the
//! version it serves. **On failure**: if the model thread dies the actor fails with it;
//! requests queued at that moment get a closed reply port, which their router reports
//! as `ExpertUnavailable` for those windows.
//!
//! Why a thread and not the async runtime: a forward pass is milliseconds of CPU; on
//! the runtime it would stall every other actor. Why one libtorch intra-op thread by
//! default: batching already fills the cores, and waking idle libtorch threads per small
//! batch costs more than it gives on a 2-core fog node (`intra_op_threads` overrides).
//!
//! Hot swap: a new version is loaded on a blocking thread while the old one keeps
//! serving, then handed to the model thread, which installs it between two batches. So
//! no request waits for a load, none fails, every batch runs wholly on one version, and
//! every verdict names the version that computed it. A version whose window shape
//! differs, or that does not load (wrong hash, missing tensor, wrong architecture), is
//! refused and the old one keeps serving.
//!
//! Batching contract: the thread blocks for the first request, then collects more
//! until `max_batch` are held, or `max_wait` has passed since the first one *arrived at
//! the actor*, or no request has arrived for `max_wait / 16` (the idle gap); the batch
//! then runs at once. So no request waits for company longer than `max_wait`, a full
//! batch never waits at all, and when the senders have nothing more to send (a closed
//! loop with few requests in flight) the batch does not sit out the whole `max_wait`
//! for company that cannot come. Under load requests arrive far closer together than
//! the idle gap, so batches still fill.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::path::PathBuf;

use fogmesh_models::served::{Assets, ServedModel};
use fogmesh_models::store::Manifest;
use fogmesh_models::torchscript::Dtype;
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, ScriptedModel, Signature, TensorSpec};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::error::{LoadError, ModelFault, ScoreError, SpecError, StartError, SwapError};
use crate::telemetry;

/// How an expert groups windows into forward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingSpec {
    pub max_batch: usize,
    pub max_wait_us: u64,
}

impl Default for BatchingSpec {
    /// The W1 setting: up to 32 windows, at most 2 ms of waiting.
    fn default() -> Self {
        BatchingSpec {
            max_batch: 32,
            max_wait_us: 2_000,
        }
    }
}

/// Everything needed to (re)start an expert.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertSpec {
    pub name: String,
    pub model_version: String,
    /// The built-in autoencoder's configuration, whose `channels` and `window` are also
    /// the window a TorchScript file declares; a stored version brings its own.
    pub config: AutoencoderConfig,
    /// Alarm limit on this model's score, from calibration on normal operation.
    pub threshold: Option<f32>,
    pub batching: BatchingSpec,
    pub intra_op_threads: usize,
    pub source: ModelSource,
}

/// Where an expert's model comes from: exactly one of three sources.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// fogmesh's convolutional autoencoder as [`ExpertSpec::config`] describes it:
    /// trained safetensors weights (checked against `weights_sha256` when the config
    /// pins one) or, with none, initialised from `seed`.
    Autoencoder {
        weights: Option<Arc<[u8]>>,
        weights_sha256: Option<String>,
        seed: i64,
    },
    /// A TorchScript file brought by the user. Its declared signature is one input
    /// `[batch, config.channels, config.window]` and one score per window, `[batch]`;
    /// the file is checked against it on load.
    TorchScript(PathBuf),
    /// A model version from the store, of any architecture the zoo serves (boxed: its
    /// manifest is many times the size of the other sources).
    Stored(Box<StoredModel>),
}

impl ModelSource {
    /// An untrained autoencoder initialised from `seed`.
    pub fn seeded(seed: i64) -> ModelSource {
        ModelSource::Autoencoder {
            weights: None,
            weights_sha256: None,
            seed,
        }
    }

    /// The stored version, when the model comes from the store.
    pub fn stored(&self) -> Option<&StoredModel> {
        match self {
            ModelSource::Stored(stored) => Some(stored),
            _ => None,
        }
    }
}

/// A stored model version, read from a node's model store, ready to load.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredModel {
    pub manifest: Manifest,
    /// The blob the manifest names; hashed again when the expert loads it.
    pub weights: Arc<[u8]>,
    /// The encoder language and multimodal models embed their text with.
    pub assets: Assets,
}

impl ExpertSpec {
    /// Values in one window this expert takes.
    pub fn window_len(&self) -> usize {
        match self.source.stored() {
            Some(stored) => fogmesh_models::served::Architecture::from_manifest(&stored.manifest)
                .map_or(0, |a| a.window_len()),
            None => self.config.window_len(),
        }
    }

    /// `(channels, samples)` of the windows this expert takes: the stored model's
    /// input, else the autoencoder's (and a TorchScript file's declared) shape.
    pub fn window_shape(&self) -> (usize, usize) {
        match self.source.stored() {
            Some(stored) => fogmesh_models::served::Architecture::from_manifest(&stored.manifest)
                .map_or((0, 0), |a| {
                    let [channels, length] = a.input_shape();
                    (channels as usize, length as usize)
                }),
            None => (self.config.channels as usize, self.config.window as usize),
        }
    }

    /// Whether a running expert can move from this spec to `new` by a hot swap rather
    /// than a restart: only the model differs (version, weights, threshold), and it
    /// takes the same window, so its routers and batching stay as they are. A
    /// TorchScript file is loaded once at start and never swapped.
    pub fn swaps_to(&self, new: &ExpertSpec) -> bool {
        self != new
            && self.name == new.name
            && self.batching == new.batching
            && self.intra_op_threads == new.intra_op_threads
            && !matches!(self.source, ModelSource::TorchScript(_))
            && !matches!(new.source, ModelSource::TorchScript(_))
            && self.window_len() == new.window_len()
    }

    /// `conv_autoencoder`, `torchscript`, or the stored model's architecture.
    pub fn model_name(&self) -> String {
        match &self.source {
            ModelSource::Stored(stored) => stored.manifest.architecture.clone(),
            ModelSource::TorchScript(_) => "torchscript".into(),
            ModelSource::Autoencoder { .. } => "conv_autoencoder".into(),
        }
    }

    /// The alarm limit: the spec's, else the stored model's calibrated `threshold`
    /// metric, else 0.5 for a stored classifier (its score is the probability that the
    /// window is not normal).
    pub fn effective_threshold(&self) -> Option<f32> {
        if let Some(t) = self.threshold {
            return Some(t);
        }
        let stored = self.source.stored()?;
        if let Some(t) = stored.manifest.metrics.get("threshold") {
            return Some(*t as f32);
        }
        let architecture =
            fogmesh_models::served::Architecture::from_manifest(&stored.manifest).ok()?;
        architecture.is_classifier().then_some(0.5)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let invalid = |field: &'static str, value: String, reason: &str| SpecError::Invalid {
            what: "expert",
            name: self.name.clone(),
            field,
            value,
            reason: reason.to_string(),
        };
        if self.batching.max_batch == 0 || self.batching.max_batch > 4096 {
            return Err(invalid(
                "max_batch",
                self.batching.max_batch.to_string(),
                "must be between 1 and 4096",
            ));
        }
        if self.intra_op_threads == 0 || self.intra_op_threads > 256 {
            return Err(invalid(
                "intra_op_threads",
                self.intra_op_threads.to_string(),
                "must be between 1 and 256",
            ));
        }
        if let Some(t) = self.threshold {
            if !(t.is_finite() && t > 0.0) {
                return Err(invalid(
                    "threshold",
                    t.to_string(),
                    "must be a positive number",
                ));
            }
        }
        if let Some(stored) = self.source.stored() {
            return fogmesh_models::served::Architecture::from_manifest(&stored.manifest)
                .map(|_| ())
                .map_err(|e| SpecError::Model {
                    name: self.name.clone(),
                    source: ModelFault::Invalid(Arc::new(e)),
                });
        }
        self.config.validate().map_err(|e| SpecError::Model {
            name: self.name.clone(),
            source: ModelFault::Invalid(Arc::new(e)),
        })
    }
}

/// One expert's verdict on one window.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertVerdict {
    pub score: f32,
    pub threshold: Option<f32>,
    pub model_version: Arc<str>,
    /// For classifiers: the class the window most likely belongs to (which fault).
    pub class: Option<Arc<str>>,
    /// Size of the batch the window ran in, and how long that batch waited to fill.
    pub batch_size: usize,
    pub batch_wait: Duration,
}

/// Windows an expert holds in its queue before it refuses more
/// ([`ScoreError::ExpertBusy`]): routers on this node hold at most
/// [`crate::MAX_WINDOWS_IN_FLIGHT`] each, but an expert also serves routers elsewhere.
pub const MAX_QUEUED_WINDOWS: u64 = 8192;

/// A window for an expert. `enqueued` is when the expert actor took it in; the
/// batching deadline counts from it.
pub struct InferRequest {
    pub values: Arc<[f32]>,
    pub enqueued: Instant,
    pub reply: RpcReplyPort<Result<ExpertVerdict, ScoreError>>,
}

pub enum ExpertMsg {
    Infer(InferRequest),
    /// Serve `spec`'s model from the next batch on; answered with the version once it
    /// serves, or why it was refused.
    Swap {
        spec: Box<ExpertSpec>,
        reply: RpcReplyPort<Result<Arc<str>, SwapError>>,
    },
}

/// Work for the model thread, in arrival order.
enum Job {
    Infer(InferRequest),
    Install(Box<Install>),
}

/// A loaded version, ready to serve.
struct Install {
    model: ExpertModel,
    version: Arc<str>,
    threshold: Option<f32>,
    done: tokio::sync::oneshot::Sender<()>,
}

// Local only: it carries reply ports and shared buffers that cannot cross a node.
impl ractor::Message for ExpertMsg {}

/// The expert's observable state, shared with status readers without a message.
#[derive(Debug)]
pub struct ExpertShared {
    pub name: Arc<str>,
    /// `conv_autoencoder`, `torchscript`, or a stored model's architecture.
    pub model: Arc<str>,
    model_version: std::sync::Mutex<Arc<str>>,
    pub device: String,
    pub window_len: usize,
    /// Alarm limit on the model's score, from the spec.
    pub threshold: Option<f32>,
    /// Versions installed by hot swaps since the expert started.
    pub swaps: AtomicU64,
    pub windows_scored: AtomicU64,
    pub batches: AtomicU64,
    pub queued: AtomicU64,
}

impl ExpertShared {
    /// Shared state for a spec; the device is where the model will be placed.
    pub fn for_spec(spec: &ExpertSpec) -> Arc<Self> {
        Arc::new(ExpertShared {
            name: spec.name.as_str().into(),
            model: spec.model_name().into(),
            model_version: std::sync::Mutex::new(spec.model_version.as_str().into()),
            device: format!("{:?}", fogmesh_models::default_device()),
            window_len: spec.window_len(),
            threshold: spec.effective_threshold(),
            swaps: AtomicU64::new(0),
            windows_scored: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        })
    }

    /// The version serving now.
    pub fn model_version(&self) -> Arc<str> {
        self.model_version
            .lock()
            .map_or_else(|poisoned| poisoned.into_inner().clone(), |v| v.clone())
    }

    fn set_model_version(&self, version: Arc<str>) {
        match self.model_version.lock() {
            Ok(mut v) => *v = version,
            Err(poisoned) => *poisoned.into_inner() = version,
        }
    }

    pub fn mean_batch_size(&self) -> f64 {
        let batches = self.batches.load(Ordering::Relaxed);
        if batches == 0 {
            0.0
        } else {
            self.windows_scored.load(Ordering::Relaxed) as f64 / batches as f64
        }
    }
}

/// The actor. Its arguments are the spec and the shared state its supervisor reads.
pub struct Expert;

pub struct ExpertArgs {
    pub spec: ExpertSpec,
    pub shared: Arc<ExpertShared>,
}

pub struct ExpertState {
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    shared: Arc<ExpertShared>,
}

impl Actor for Expert {
    type Msg = ExpertMsg;
    type State = ExpertState;
    type Arguments = ExpertArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ExpertArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (jobs, queue) = mpsc::channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let shared = args.shared.clone();
        let spec = args.spec;
        let worker = std::thread::Builder::new()
            .name(format!("expert-{}", spec.name))
            .spawn(move || model_thread(spec, shared, queue, ready_tx))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(ExpertState {
                jobs: Some(jobs),
                worker: Some(worker),
                shared: args.shared,
            }),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err("expert model thread exited before it was ready".into()),
        }
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ExpertMsg::Infer(request) => {
                let jobs = state.jobs.as_ref().ok_or("expert is stopping")?;
                let queued = state.shared.queued.load(Ordering::Relaxed);
                if queued >= MAX_QUEUED_WINDOWS {
                    // The router tries another replica or reports the window unscored;
                    // the expert's memory stays bounded whoever sends.
                    let _ = request.reply.send(Err(ScoreError::ExpertBusy {
                        expert: state.shared.name.to_string(),
                        queued,
                        limit: MAX_QUEUED_WINDOWS,
                    }));
                    return Ok(());
                }
                state.shared.queued.fetch_add(1, Ordering::Relaxed);
                jobs.send(Job::Infer(request))
                    .map_err(|_| "expert model thread is gone; restarting the expert")?;
            }
            ExpertMsg::Swap { spec, reply } => {
                let jobs = state.jobs.clone().ok_or("expert is stopping")?;
                let shared = state.shared.clone();
                // Loading takes as long as it takes; the mailbox keeps taking windows.
                tokio::spawn(async move {
                    let _ = reply.send(swap(*spec, shared, jobs).await);
                });
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Closing the queue ends the model thread after its current batch; joining on a
        // blocking thread keeps the runtime free while it finishes.
        state.jobs.take();
        if let Some(worker) = state.worker.take() {
            tokio::task::spawn_blocking(move || worker.join())
                .await
                .ok();
        }
        Ok(())
    }
}

/// Loads `spec`'s model off the runtime and hands it to the model thread; resolves
/// once it serves.
async fn swap(
    spec: ExpertSpec,
    shared: Arc<ExpertShared>,
    jobs: mpsc::Sender<Job>,
) -> Result<Arc<str>, SwapError> {
    let version: Arc<str> = spec.model_version.as_str().into();
    let expert = || shared.name.clone();
    spec.validate().map_err(|source| SwapError::Invalid {
        expert: expert(),
        version: version.clone(),
        source,
    })?;
    if spec.window_len() != shared.window_len {
        return Err(SwapError::WindowShape {
            expert: expert(),
            version,
            takes: spec.window_len(),
            serves: shared.window_len,
        });
    }
    let threshold = spec.effective_threshold();
    let loaded = tokio::task::spawn_blocking(move || {
        tch::set_num_threads(spec.intra_op_threads as i32);
        ExpertModel::load(&spec, fogmesh_models::default_device())
    })
    .await
    .map_err(|source| SwapError::LoadingThread {
        expert: expert(),
        version: version.clone(),
        source,
    })?
    .map_err(|source| SwapError::Load {
        expert: expert(),
        version: version.clone(),
        source,
    })?;
    let (done, installed) = tokio::sync::oneshot::channel();
    jobs.send(Job::Install(Box::new(Install {
        model: loaded,
        version: version.clone(),
        threshold,
        done,
    })))
    .map_err(|_| SwapError::Stopping {
        expert: expert(),
        version: version.clone(),
    })?;
    installed
        .await
        .map_err(|_| SwapError::StoppedBeforeInstall {
            expert: expert(),
            version: version.clone(),
        })?;
    Ok(version)
}

fn model_thread(
    spec: ExpertSpec,
    shared: Arc<ExpertShared>,
    queue: mpsc::Receiver<Job>,
    ready: tokio::sync::oneshot::Sender<Result<(), StartError>>,
) {
    // libtorch's intra-op thread count is per calling thread: set it here, on the
    // thread that runs every forward pass of this expert.
    tch::set_num_threads(spec.intra_op_threads as i32);
    let device = fogmesh_models::default_device();
    let mut model = match ExpertModel::load(&spec, device) {
        Ok(model) => model,
        Err(source) => {
            let _ = ready.send(Err(StartError {
                expert: spec.name.clone(),
                source,
            }));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    let batching = spec.batching;
    let max_wait = Duration::from_micros(batching.max_wait_us);
    let batch_size_histogram =
        metrics::histogram!(telemetry::EXPERT_BATCH_SIZE, "expert" => spec.name.clone());
    let batch_wait_histogram =
        metrics::histogram!(telemetry::EXPERT_BATCH_WAIT, "expert" => spec.name.clone());
    let windows_counter =
        metrics::counter!(telemetry::EXPERT_WINDOWS, "expert" => spec.name.clone());
    let window_len = shared.window_len;
    let mut batch: Vec<InferRequest> = Vec::with_capacity(batching.max_batch);
    let mut input: Vec<f32> = Vec::with_capacity(batching.max_batch * window_len);
    // The version is the one this thread loaded, even when a restart reuses shared
    // state that a swap changed.
    let mut version: Arc<str> = spec.model_version.as_str().into();
    shared.set_model_version(version.clone());
    let mut threshold = spec.effective_threshold();
    let mut install: Option<Box<Install>> = None;
    loop {
        if let Some(next) = install.take() {
            let Install {
                model: loaded,
                version: new_version,
                threshold: new_threshold,
                done,
            } = *next;
            model = loaded;
            version = new_version;
            threshold = new_threshold;
            shared.set_model_version(version.clone());
            shared.swaps.fetch_add(1, Ordering::Relaxed);
            tracing::info!(expert = %spec.name, version = %version, "serving a new version");
            let _ = done.send(());
        }
        let Some(first) = next_batch(
            &queue,
            &mut batch,
            &mut install,
            batching.max_batch,
            max_wait,
        ) else {
            break;
        };
        if batch.is_empty() {
            continue;
        }
        let wait = first.elapsed();
        shared
            .queued
            .fetch_sub(batch.len() as u64, Ordering::Relaxed);
        input.clear();
        let mut admitted = Vec::with_capacity(batch.len());
        for request in batch.drain(..) {
            if request.values.len() == window_len {
                input.extend_from_slice(&request.values);
                admitted.push(request);
            } else {
                // Routers check shapes before sending; this guards direct callers.
                let reason = format!(
                    "window has {} values, the model takes {window_len}",
                    request.values.len()
                );
                request
                    .reply
                    .send(Err(ScoreError::Model {
                        expert: spec.name.clone(),
                        reason,
                    }))
                    .ok();
            }
        }
        if admitted.is_empty() {
            continue;
        }
        let size = admitted.len();
        batch_size_histogram.record(size as f64);
        batch_wait_histogram.record(wait.as_secs_f64());
        match model.score(&input, size) {
            Ok(scores) => {
                for (request, (score, class)) in admitted.into_iter().zip(scores) {
                    request
                        .reply
                        .send(Ok(ExpertVerdict {
                            score,
                            threshold,
                            model_version: version.clone(),
                            class,
                            batch_size: size,
                            batch_wait: wait,
                        }))
                        .ok();
                }
            }
            Err(e) => {
                for request in admitted {
                    request
                        .reply
                        .send(Err(ScoreError::Model {
                            expert: spec.name.clone(),
                            reason: e.clone(),
                        }))
                        .ok();
                }
            }
        }
        shared
            .windows_scored
            .fetch_add(size as u64, Ordering::Relaxed);
        shared.batches.fetch_add(1, Ordering::Relaxed);
        windows_counter.increment(size as u64);
    }
}

/// A window's score and, from classifiers, its class.
type Scored = (f32, Option<Arc<str>>);

/// What an expert runs: fogmesh's autoencoder, a stored model version of any kind, or a
/// model brought as TorchScript.
enum ExpertModel {
    Autoencoder(ConvAutoencoder),
    Stored(ServedModel, Vec<Arc<str>>),
    Scripted(ScriptedModel),
}

impl ExpertModel {
    fn load(spec: &ExpertSpec, device: tch::Device) -> Result<ExpertModel, LoadError> {
        match &spec.source {
            ModelSource::Stored(stored) => {
                let model =
                    ServedModel::load(&stored.manifest, &stored.weights, &stored.assets, device)
                        .map_err(|source| LoadError::Stored {
                            id: stored.manifest.id(),
                            source,
                        })?;
                let labels = model.labels().iter().map(|l| l.as_str().into()).collect();
                Ok(ExpertModel::Stored(model, labels))
            }
            ModelSource::TorchScript(path) => {
                let signature = Signature {
                    inputs: vec![TensorSpec {
                        shape: vec![-1, spec.config.channels, spec.config.window],
                        dtype: Dtype::F32,
                    }],
                    output: TensorSpec {
                        shape: vec![-1],
                        dtype: Dtype::F32,
                    },
                };
                Ok(ExpertModel::Scripted(ScriptedModel::load(
                    path, signature, device,
                )?))
            }
            ModelSource::Autoencoder {
                weights,
                weights_sha256,
                seed,
            } => match weights {
                Some(bytes) => ConvAutoencoder::from_safetensors(
                    spec.config.clone(),
                    bytes,
                    weights_sha256.as_deref(),
                    device,
                ),
                None => ConvAutoencoder::new(spec.config.clone(), device, *seed),
            }
            .map(ExpertModel::Autoencoder)
            .map_err(LoadError::from),
        }
    }

    /// One score (and, for classifiers, class) per window of `input` (windows back to
    /// back, channel-major).
    fn score(&self, input: &[f32], windows: usize) -> Result<Vec<Scored>, String> {
        let unclassified = |scores: Vec<f32>| scores.into_iter().map(|s| (s, None)).collect();
        match self {
            ExpertModel::Autoencoder(model) => model
                .score(input)
                .map(unclassified)
                .map_err(|e| e.to_string()),
            ExpertModel::Stored(model, labels) => Ok(model
                .infer(input)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|i| {
                    let class = i.class.and_then(|c| labels.get(c as usize).cloned());
                    (i.score, class)
                })
                .collect()),
            ExpertModel::Scripted(model) => model
                .forward(&[input], windows)
                .map(unclassified)
                .map_err(|e| e.to_string()),
        }
    }
}

/// The idle gap is `max_wait` divided by this (see the module docs).
pub const IDLE_GAP_DIVISOR: u32 = 16;

/// Fills `batch` following the batching contract (see the module docs) and returns
/// the arrival time of its first request, or `None` once the queue is closed and empty.
/// A version to install ends the batch early and is left in `install`: the batch runs
/// on the old version, the next on the new one (the batch may then be empty).
fn next_batch(
    queue: &mpsc::Receiver<Job>,
    batch: &mut Vec<InferRequest>,
    install: &mut Option<Box<Install>>,
    max_batch: usize,
    max_wait: Duration,
) -> Option<Instant> {
    let first = match queue.recv().ok()? {
        Job::Infer(request) => request,
        Job::Install(next) => {
            *install = Some(next);
            return Some(Instant::now());
        }
    };
    let deadline = first.enqueued + max_wait;
    let idle_gap = max_wait / IDLE_GAP_DIVISOR;
    let started = first.enqueued;
    batch.push(first);
    while batch.len() < max_batch {
        // Whatever is already queued joins without waiting.
        let job = match queue.try_recv() {
            Ok(job) => Some(job),
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                queue.recv_timeout((deadline - now).min(idle_gap)).ok()
            }
        };
        match job {
            Some(Job::Infer(request)) => batch.push(request),
            Some(Job::Install(next)) => {
                *install = Some(next);
                break;
            }
            None => break,
        }
    }
    Some(started)
}
