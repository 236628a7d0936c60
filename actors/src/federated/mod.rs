//! Federated training on the mesh: sites that train on windows that never leave them
//! ([`SiteTrainer`]) and send back only what their weights moved by, and the
//! [`FederatedCoordinator`] that combines their updates round after round, alone or in
//! levels (a coordinator can be a site of another). `spec.rs` is a mesh expert's
//! `[experts.federation]`. `interface.rs` holds what others
//! see of a coordinator, `rounds.rs` its rounds, `coordinator.rs` its mailbox; both
//! use the interface and `error.rs`, and the actor uses the rounds.

mod coordinator;
mod error;
mod interface;
mod rounds;
mod site_trainer;
mod spec;

pub use coordinator::FederatedCoordinator;
pub use error::{FederationError, TrainingError};
pub use interface::{
    Answer, BufferedRounds, Distillation, EvaluationGate, FederatedCoordinatorArgs,
    FederatedCoordinatorMsg, FederatedEvaluation, FederatedRound, FederationPlan, FederationSite,
    FederationStatus, Publication, Site, SiteJudgement,
};
pub use site_trainer::{
    DistillRound, RoundWork, SiteEvaluation, SiteReport, SiteTrainer, SiteTrainerArgs,
    SiteTrainerMsg, WindowFeed,
};
pub use spec::{
    DistillationSpec, FederationGroup, FederationSpec, InvalidFederation, MAX_SITE_WINDOWS,
};
