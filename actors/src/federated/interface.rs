//! What others see of a `FederatedCoordinator`: its messages, its arguments, the sites
//! a round goes to and the reports it answers with.

use std::sync::Arc;
use std::time::Duration;

use fogmesh_models::continual::ReplayItem;
use fogmesh_models::federated::{Aggregation, Privacy, PrivacySpent};
use fogmesh_models::store::{Manifest, ModelStore};
use ractor::{ActorRef, RpcReplyPort};
use serde::Serialize;

use super::error::{FederationError, TrainingError};
use super::site_trainer::{RoundWork, SiteEvaluation, SiteReport, SiteTrainerMsg};
use crate::continual_learner::Promoter;

/// Where a round's work goes: a site that trains, or a coordinator one level down that
/// runs the round over its own sites.
#[derive(Clone)]
pub enum Site {
    Trainer(ActorRef<SiteTrainerMsg>),
    Aggregator(ActorRef<FederatedCoordinatorMsg>),
}

#[derive(Clone)]
pub struct FederationSite {
    pub name: String,
    pub site: Site,
}

/// How every round of a federation runs.
#[derive(Debug, Clone)]
pub struct FederationPlan {
    pub work: RoundWork,
    pub aggregation: Aggregation,
    pub privacy: Option<Privacy>,
    /// The fewest answers a round applies.
    pub min_sites: usize,
    /// How long a round waits for its sites.
    pub deadline: Duration,
    /// The privacy noise's seed.
    pub seed: u64,
    /// Judge each round's weights on the sites' held-out windows before storing them;
    /// `None` stores every round.
    pub gate: Option<EvaluationGate>,
    /// `Round` runs an asynchronous run (FedBuff) instead of a synchronous round.
    pub buffered: Option<BufferedRounds>,
    /// `Round` runs a distillation round instead of averaging weights.
    pub distillation: Option<Distillation>,
}

/// Federated distillation (`[experts.federation.distillation]`): the sites, whose
/// networks may differ, answer with their outputs on the shared windows; the
/// coordinator averages them by windows (the consensus), trains the federation's
/// network to match it on the same windows, and passes it down with the next round.
#[derive(Debug, Clone)]
pub struct Distillation {
    /// Unlabelled windows every site may see.
    pub shared: Arc<Vec<ReplayItem>>,
    /// The weight of the distance to the consensus in the sites' objective.
    pub weight: f64,
}

/// An asynchronous run (`[experts.federation.buffered]`): each site trains from the newest weights it was
/// given and is given the newest again when it answers; every `buffer` answers are
/// combined, each discounted by its staleness, until `updates` are applied; then one
/// version is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferedRounds {
    pub buffer: usize,
    pub updates: usize,
}

/// When a round's weights become a version: their held-out loss, pooled over the
/// sites by windows, is at most `(1 + max_regression)` × the loss of the version they
/// descend from on the same windows (a negative `max_regression` demands a gain).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationGate {
    pub max_regression: f64,
}

/// One site's judgement in a round's federated evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct SiteJudgement {
    pub site: String,
    pub candidate: f64,
    pub incumbent: f64,
    pub windows: u64,
}

/// A round's federated evaluation and the gate's decision.
#[derive(Debug, Clone, Serialize)]
pub struct FederatedEvaluation {
    pub sites: Vec<SiteJudgement>,
    /// Pooled over the sites, weighted by their held-out windows.
    pub candidate: f64,
    pub incumbent: f64,
    pub windows: u64,
    pub passed: bool,
    /// Why, with the numbers and the limit.
    pub reason: String,
}

/// Where the top of a federation puts its results.
pub struct Publication {
    pub store: ModelStore,
    pub promoter: Option<Arc<dyn Promoter>>,
}

pub struct FederatedCoordinatorArgs {
    /// The expert whose network the federation trains.
    pub federation: String,
    /// The stored version the rounds start from and its weights.
    pub base: Manifest,
    pub weights: Vec<u8>,
    pub sites: Vec<FederationSite>,
    pub plan: FederationPlan,
    /// `None` for a fog aggregator: its results go to its parent.
    pub publication: Option<Publication>,
    /// What the federation's earlier coordinators' private rounds spent: this one's
    /// accountant goes on from it (zero for a new federation or without privacy).
    pub spent: PrivacySpent,
}

/// What a round (or a buffered run) did.
#[derive(Debug, Clone, Serialize)]
pub struct FederatedRound {
    pub federation: String,
    pub round: u64,
    pub mode: &'static str,
    /// Sites whose updates were combined.
    pub sites: Vec<String>,
    /// Sites that did not answer within the deadline.
    pub stragglers: Vec<String>,
    /// Sites that answered with an error or were gone.
    pub failed: Vec<String>,
    pub samples: u64,
    /// Encoded updates received.
    pub bytes_up: u64,
    /// Global weights sent.
    pub bytes_down: u64,
    /// The sites' mean training objective, weighted by their windows.
    pub loss: Option<f64>,
    /// ε spent so far (with privacy).
    pub epsilon: Option<f64>,
    /// Updates applied (1 for a synchronous round) and, for a buffered run, the most
    /// stale update combined.
    pub applied: usize,
    pub max_staleness: u64,
    /// The sites' judgement of the round's weights against the serving version's.
    pub evaluation: Option<FederatedEvaluation>,
    /// The stored version (the top of a federation only, when the gate passed).
    pub version: Option<String>,
    /// Whether the promoter made it serve.
    pub promoted: bool,
    /// The slowest site's local work and the whole round.
    pub compute_s: f64,
    pub seconds: f64,
}

/// What the coordinator shows between rounds.
#[derive(Debug, Clone, Serialize)]
pub struct FederationStatus {
    pub federation: String,
    pub rounds: u64,
    /// The version the global weights descend from (the newest stored one at the top).
    pub version: String,
    pub sites: usize,
    /// sha256 of the global weights now: the same seed gives the same hash.
    pub weights_sha256: String,
    pub epsilon: Option<f64>,
    /// What the private rounds have spent, earlier coordinators' included; `None`
    /// without privacy.
    pub privacy_spent: Option<PrivacySpent>,
    pub last: Option<FederatedRound>,
    /// Why the last round applied nothing (shown by `fogmesh status`).
    pub last_error: Option<String>,
    pub site_names: Vec<String>,
    /// What a `Round` runs: "synchronous", "buffered" or "distillation".
    pub mode: &'static str,
}

pub enum FederatedCoordinatorMsg {
    Round {
        reply: RpcReplyPort<Result<FederatedRound, FederationError>>,
    },
    Buffered {
        /// Updates to apply before the run ends.
        versions: usize,
        /// Answers combined into one update.
        buffer: usize,
        reply: RpcReplyPort<Result<FederatedRound, FederationError>>,
    },
    Aggregate {
        round: u64,
        global: Arc<Vec<u8>>,
        work: Arc<RoundWork>,
        reply: RpcReplyPort<Result<SiteReport, TrainingError>>,
    },
    Status {
        reply: RpcReplyPort<FederationStatus>,
    },
    /// A coordinator one level up asks for the zone's held-out losses of `weights`,
    /// pooled over its sites by windows.
    Evaluate {
        weights: Vec<Arc<Vec<u8>>>,
        reply: RpcReplyPort<Result<SiteEvaluation, TrainingError>>,
    },
    /// The global weights as they are now (safetensors).
    Global { reply: RpcReplyPort<Arc<Vec<u8>>> },
    /// A buffered run's site answered (sent by the coordinator's own tasks).
    Answered {
        run: u64,
        site: usize,
        /// The version of the weights the site started from.
        base: u64,
        answer: Answer,
    },
}

impl ractor::Message for FederatedCoordinatorMsg {}

/// One site's part of a round as the coordinator saw it.
pub enum Answer {
    Report(SiteReport),
    Late,
    Failed,
}
