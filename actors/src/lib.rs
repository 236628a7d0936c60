//! fogmesh's actors: everything a fog node runs between a sensor reading arriving and
//! an alert leaving, with no networking of its own (the `fogmesh-cluster` crate puts
//! these behind gRPC and MQTT).
//!
//! The path of a reading: a source pushes a batch of [`Sample`]s to a
//! [`SensorStream`], which validates, flags, normalises and windows it; each
//! [`Window`] goes, through the stream's forwarder (store-and-forward with an edge log),
//! to the stream's [`Router`], which picks experts (static table or
//! learned gate), sends the window to each [`Expert`] and combines their verdicts into
//! a [`ScoredWindow`] for the [`Annunciator`]. The [`NodeAgent`] starts and supervises
//! all of them. A [`ContinualLearner`] per learning expert watches its scored windows
//! for drift and fine-tunes, validates and promotes new versions. A [`Merger`] merges
//! stored versions into a new one, through the same validation gate when asked. A
//! [`SiteTrainer`] is one site of a federated round: it trains on windows that never
//! leave it and sends back only its encoded update. See ARCHITECTURE.md for the
//! invariants.

pub mod annunciator;
pub mod continual_learner;
pub mod directory;
pub mod error;
pub mod expert;
pub mod expert_endpoint;
pub mod expert_relay;
pub mod federated;
pub mod merger;
pub mod node_agent;
pub mod normalisation;
pub mod quality;
pub mod rate;
pub mod replay;
pub mod router;
pub mod sample;
pub mod sensor_stream;
pub mod telemetry;
pub mod windowing;

pub use annunciator::{
    Annunciator, ExpertOpinion, JournaledOpinion, JournaledVerdict, ScoredWindow,
};
pub use continual_learner::{
    ContinualLearner, ContinualLearnerMsg, LearnerError, LearnerSnapshot, LearningSpec,
    LocalPromoter, PromoteError, Promoter, RoundReport, RunningLearner,
};
pub use directory::NodeDirectory;
pub use error::{
    IngestError, LoadError, ModelFault, ScoreError, SpawnFault, SpecError, StartError, SwapError,
    Unavailability,
};
pub use expert::{
    BatchingSpec, Expert, ExpertMsg, ExpertSpec, ExpertVerdict, InferRequest, ModelSource,
    StoredModel,
};
pub use expert_endpoint::{ExpertEndpoint, ExpertEndpointMsg, EXPERT_SCOPE};
pub use expert_relay::{ExpertRelay, ExpertRelayMsg, MAX_RELAY_HOPS, RELAY_GROUP, RELAY_SCOPE};
pub use federated::{
    BufferedRounds, DistillRound, Distillation, DistillationSpec, EvaluationGate,
    FederatedCoordinator, FederatedCoordinatorArgs, FederatedCoordinatorMsg, FederatedEvaluation,
    FederatedRound, FederationError, FederationGroup, FederationPlan, FederationSite,
    FederationSpec, FederationStatus, InvalidFederation, Publication, RoundWork, Site,
    SiteEvaluation, SiteJudgement, SiteReport, SiteTrainer, SiteTrainerArgs, SiteTrainerMsg,
    TrainingError, WindowFeed,
};
pub use merger::{
    MergeOutcome, MergeRefused, MergeRequest, Merger, MergerArgs, MergerMsg, MergerShared,
    Validation,
};
pub use node_agent::{Node, NodeAgent, NodeSnapshot, NodeSpec, ReconcileReport, RestartPolicy};
pub use normalisation::{NormalisationSpec, Normaliser, RunningStats};
pub use quality::{QualityFlag, QualityFlags, QualityRules};
pub use router::{
    Replicas, RetryPolicy, Router, RouterMsg, RouterSpec, RoutingPolicy, MAX_WINDOWS_IN_FLIGHT,
};
pub use sample::{Sample, Window};
pub use sensor_stream::{
    EdgeStorage, OutboxLimits, PushOutcome, SensorStream, SensorStreamMsg, SensorStreamSpec,
    WhenFull, DEFAULT_MAX_CLOCK_SKEW_MS, DEFAULT_MAX_RATE, DEFAULT_MAX_SEQUENCE_GAP, PIPELINE,
};
pub use windowing::Windower;
