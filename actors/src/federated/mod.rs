//! Federated training on the mesh: sites that train on windows that never leave them
//! ([`SiteTrainer`]) and send back only what their weights moved by.

mod site_trainer;

pub use site_trainer::{
    LocalWork, SiteReport, SiteTrainer, SiteTrainerArgs, SiteTrainerMsg, TrainingError,
};
