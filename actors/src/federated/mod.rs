//! Federated training on the mesh: sites that train on windows that never leave them
//! ([`SiteTrainer`]) and send back only what their weights moved by, and the
//! [`FederatedCoordinator`] that combines their updates round after round, alone or in
//! levels (a coordinator can be a site of another).

mod coordinator;
mod error;
mod site_trainer;

pub use coordinator::{
    Answer, EvaluationGate, FederatedCoordinator, FederatedCoordinatorArgs,
    FederatedCoordinatorMsg, FederatedEvaluation, FederatedRound, FederationPlan, FederationSite,
    FederationStatus, Publication, Site, SiteJudgement,
};
pub use error::{FederationError, TrainingError};
pub use site_trainer::{
    RoundWork, SiteEvaluation, SiteReport, SiteTrainer, SiteTrainerArgs, SiteTrainerMsg,
};
