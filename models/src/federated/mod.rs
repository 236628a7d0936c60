//! The arithmetic of federated rounds, apart from any actor or network: how a
//! coordinator combines what sites learned ([`aggregate`]), how a site shrinks its
//! update before it crosses the mesh and keeps what it left out for the next round
//! ([`compress`]), how much privacy the clipped, noised updates spend
//! ([`privacy`]), what a site does with the global weights ([`local`]), what a
//! coordinator does with the sites' updates ([`round`]) and how sites whose networks
//! differ learn from each other's outputs instead ([`distill`]). Updates are flat `f32` vectors in the order of a model's
//! [`crate::merge::Weights`] (tensors sorted by name, back to back): the difference
//! between a site's weights after its local work and the weights it started from.

pub mod aggregate;
pub mod compress;
pub mod distill;
pub mod local;
pub mod privacy;
pub mod round;

pub use aggregate::{aggregate, Aggregation, SiteUpdate};
pub use compress::{decode, Compression, Compressor, EncodedUpdate};
pub use local::{held_out_loss, train_locally, LocalTrainingError, LocalUpdate, LocalWork};
pub use privacy::{add_noise, clip, GaussianAccountant, PrivacySpent};
pub use round::{Combined, Contribution, Privacy, RoundAggregator};

/// Why updates could not be combined, compressed or read back.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FederatedError {
    #[error("no site update to aggregate")]
    NoUpdates,
    #[error("site update {index} has {got} values, the first has {expected}: the sites train different models")]
    LengthMismatch {
        index: usize,
        expected: usize,
        got: usize,
    },
    #[error("site update {index}: value {position} is {value}, only finite values are aggregated")]
    NotFinite {
        index: usize,
        position: usize,
        value: f32,
    },
    #[error("site update {index} was trained on 0 samples: weighted averaging needs at least 1")]
    NoSamples { index: usize },
    #[error("{rule} needs more than {needed} updates, it got {got}")]
    TooFewUpdates {
        rule: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("invalid {field} = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("an encoded update of {bytes} bytes does not decode to {expected} values: {reason}")]
    Malformed {
        bytes: usize,
        expected: usize,
        reason: &'static str,
    },
}
