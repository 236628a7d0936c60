//! Why a federated round, or one site's part of it, produced nothing.

use fogmesh_models::federated::{FederatedError, LocalTrainingError};
use fogmesh_models::merge::MergeError;
use fogmesh_models::store::StoreError;

use crate::continual_learner::PromoteError;

/// Why a site could not do its part of a round.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error("site `{site}`: {source}")]
    Local {
        site: String,
        #[source]
        source: Box<LocalTrainingError>,
    },
    #[error("fog aggregator `{site}`: {source}")]
    Aggregator {
        site: String,
        #[source]
        source: Box<FederationError>,
    },
    /// A site on another node that could not be reached, refused, or failed there.
    #[error("site `{site}` on another node: {source}")]
    Remote {
        site: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("site `{site}`: its training thread stopped: {source}")]
    Thread {
        site: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Why a round applied nothing.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("federation `{federation}` round {round}: {answered} of {asked} sites answered, the round needs {needed} (stragglers: {stragglers:?}, failed: {failed:?})")]
    TooFewSites {
        federation: String,
        round: u64,
        asked: usize,
        answered: usize,
        needed: usize,
        stragglers: Vec<String>,
        failed: Vec<String>,
    },
    #[error("federation `{federation}`: a run is already in progress")]
    Busy { federation: String },
    #[error("federation `{federation}` round {round}: the updates do not combine: {source}")]
    Combine {
        federation: String,
        round: u64,
        #[source]
        source: FederatedError,
    },
    #[error("federation `{federation}` round {round}: distilling the consensus into the federation's network failed: {source}")]
    Distill {
        federation: String,
        round: u64,
        #[source]
        source: Box<LocalTrainingError>,
    },
    #[error("federation `{federation}`: the global weights cannot be written: {source}")]
    Weights {
        federation: String,
        #[source]
        source: Box<MergeError>,
    },
    #[error("federation `{federation}`: storing the round's version failed: {source}")]
    Store {
        federation: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("federation `{federation}`: the store's thread stopped: {source}")]
    Thread {
        federation: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("federation `{federation}`: version {version} was stored but not promoted: {source}")]
    Promote {
        federation: String,
        version: String,
        #[source]
        source: PromoteError,
    },
    #[error("invalid {field} = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}
