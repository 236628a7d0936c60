//! The one error type of the models crate.
//!
//! Callers (the actors, the CLI) mostly log these errors and move on, so each variant
//! carries enough context for the message alone to say what failed: the field and the
//! offending value, the file, the tensor, the limit. Messages are lowercase and have no
//! trailing period so they compose inside `anyhow` chains.

use std::path::PathBuf;

/// Everything that can go wrong while building, running, training, saving or loading a
/// model, or reading a recording.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Caller data has the wrong size, e.g. a flat window buffer that is not a whole
    /// number of windows.
    #[error("{what} has the wrong shape: expected {expected}, got {got}")]
    Shape {
        what: &'static str,
        expected: String,
        got: String,
    },

    /// A configuration or training option (or a label) is out of its valid range.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidOption {
        field: &'static str,
        value: String,
        reason: String,
    },

    /// Input data holds NaN or an infinity where a finite value is needed.
    #[error("{what} holds a non-finite value at index {index}")]
    NonFinite { what: &'static str, index: usize },

    /// Reading or writing a file failed at the operating-system level.
    #[error("i/o error on {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A fogrec file is malformed, or a recording cannot be written as one.
    #[error("recording {}: {reason}", .path.display())]
    Recording { path: PathBuf, reason: String },

    /// Serialised weights are malformed (not safetensors, wrong dtype, a tensor the
    /// architecture does not have, non-finite values). `origin` is the file path, or a
    /// description of where in-memory bytes came from.
    #[error("weights from {origin}: {reason}")]
    Weights { origin: String, reason: String },

    /// Serialised weights lack a tensor the configured architecture needs.
    #[error("weights from {origin} lack tensor {name}")]
    MissingTensor { origin: String, name: String },

    /// A serialised tensor's shape disagrees with the configured architecture, which
    /// usually means the weights were trained with another config.
    #[error(
        "tensor {name} in weights from {origin} has shape {got}, the config expects {expected}"
    )]
    TensorShape {
        origin: String,
        name: String,
        expected: String,
        got: String,
    },

    /// Serialised weights are not the bytes the caller pinned by hash.
    #[error("weights from {origin} have sha256 {actual}, expected {expected}")]
    HashMismatch {
        origin: String,
        expected: String,
        actual: String,
    },

    /// Training produced a NaN or infinite loss; the model keeps its best weights so far
    /// (or its initial ones).
    #[error(
        "training diverged at epoch {epoch}: loss {loss} is not finite; lower the learning rate"
    )]
    Diverged { epoch: usize, loss: f64 },

    /// libtorch reported an error (device out of memory, an unsupported operation).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}
