//! fogmesh's model zoo: the networks fog nodes run on plant data, their training loops,
//! their weights as safetensors, and the recordings they learn from.
//!
//! - [`autoencoder`]: the convolutional autoencoder expert (the W1 benchmark model).
//! - [`classifier`]: the fault classifier (diagnosis: which fault, not only whether).
//! - [`continual`]: continual learning: a stored version fine-tuned on a new operating
//!   regime with replay and EWC, and the gate that decides whether it may serve.
//! - [`drift`]: drift detectors (Page–Hinkley, ADWIN, Kolmogorov–Smirnov) for an
//!   expert's inputs and scores.
//! - [`forecaster`]: the temporal convolution network that forecasts every channel and
//!   scores a window by its forecast error.
//! - [`fusion`]: the multimodal expert: sensor window and operator-note embedding,
//!   one decision.
//! - [`gate`]: the mixture-of-experts gate, trained with tch, served in plain Rust.
//! - [`minilm`]: the language expert's sentence encoder, all-MiniLM-L6-v2 in tch.
//! - [`notes`]: labelled TEP operator notes and the classifier over their embeddings.
//! - [`training`]: options and reports shared by every training run.
//! - [`recording`]: the fogrec file format for plant recordings.
//! - [`calibration`]: score quantiles for alarm thresholds.
//! - [`pca`]: PCA T²/Q monitoring, the classic process-monitoring baseline.
//! - [`vision`]: the vision expert, a small CNN telling defective solar cells from
//!   functional ones, whose pooled features a fusion expert can take.
//! - [`torchscript`]: bring your own model: TorchScript files exported from PyTorch,
//!   checked against their declared signature and served as experts.
//! - [`served`]: any stored model version loaded for serving behind an expert.
//! - [`network`]: the template every tch network follows ([`Network`]): config,
//!   constructor, `VarStore`, and checked safetensors I/O written once.
//! - [`weights`]: every network's weights as safetensors bytes, and back, checked.
//! - [`merge`]: model merging (weighted average, task arithmetic, TIES, DARE, SLERP)
//!   on safetensors weights, near memory bandwidth, and stored versions merged into a
//!   new version (checked to be one network, read hash-checked, loaded once to prove it
//!   serves) for the `Merger` actor and `fogmesh merge`; errors: [`merge::MergeError`],
//!   and [`merge::MergingError`] for stored versions.
//! - [`store`]: the content-addressed model store (weights by sha256, manifests with
//!   lineage).
//!
//! Everything fallible returns [`ModelError`] (TorchScript models: [`ScriptError`]).
//! The data sets the zoo learns from (SKAB, ELPV) are read by `fogmesh-zoo`, not here:
//! nothing that serves needs them.

pub mod autoencoder;
pub mod calibration;
pub mod classifier;
pub mod continual;
pub mod drift;
pub mod error;
pub mod federated;
pub mod forecaster;
pub mod fusion;
pub mod gate;
mod layout;
pub mod merge;
pub mod minilm;
pub mod network;
pub mod notes;
pub mod pca;
pub mod recording;
pub mod rng;
pub mod served;
pub mod store;
pub mod torchscript;
pub mod training;
pub mod vision;
pub mod weights;

pub use autoencoder::{AutoencoderConfig, ConvAutoencoder};
pub use calibration::{column_stats, quantile};
pub use error::ModelError;
pub use forecaster::{ForecasterConfig, TcnForecaster};
pub use gate::SoftmaxGate;
pub use network::Network;
pub use recording::{Recording, RecordingHeader};
pub use rng::SplitMix64;
pub use torchscript::{ScriptError, ScriptedModel, Signature, TensorSpec};
pub use training::{EpochReport, TrainOptions, TrainReport};
pub use vision::{DefectCnn, VisionConfig};

/// Where models go unless the caller says otherwise: the first CUDA device when libtorch
/// sees one, else the CPU.
pub fn default_device() -> tch::Device {
    tch::Device::cuda_if_available()
}
