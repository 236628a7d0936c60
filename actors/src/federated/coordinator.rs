//! `FederatedCoordinator`: the rounds of one federation (one expert's network).
//!
//! **Owns** the federation's global weights and the version they descend from, its
//! sites, the [`FederationPlan`] and the [`RoundAggregator`] (rule, noise generator,
//! privacy accountant). **Takes**
//! - [`FederatedCoordinatorMsg::Round`]: a synchronous round. Every site gets the
//!   global weights and the round's work; the answers that arrive within the deadline
//!   are combined (stragglers and failed sites are left out of that round, not waited
//!   for), and with fewer than `min_sites` answers nothing is applied. At the top of a
//!   federation every site then judges the new weights against the serving version's
//!   on windows it held out of training (federated evaluation); when the pooled loss
//!   passes the [`EvaluationGate`] the weights are stored as a version with their
//!   lineage and handed to the [`Promoter`], as a continual learner's candidate is.
//!   Either way the global weights go on to the next round.
//! - [`FederatedCoordinatorMsg::Buffered`]: an asynchronous run (FedBuff): every site
//!   trains from the newest weights it was given and is given the newest again as
//!   soon as it answers; every `buffer` answers are combined, each discounted by its
//!   staleness, until `versions` updates are applied; then one version is stored.
//! - [`FederatedCoordinatorMsg::Aggregate`]: the same synchronous round asked by a
//!   coordinator one level up (a fog aggregator for its zone): the global weights and
//!   work come from the parent, the combined update goes back to it as one site's
//!   report weighted by all of its sites' windows, and nothing is stored here.
//! - [`FederatedCoordinatorMsg::Evaluate`]: a coordinator one level up asks for the
//!   zone's held-out losses (federated evaluation), pooled over its sites.
//! - [`FederatedCoordinatorMsg::Status`] and [`FederatedCoordinatorMsg::Global`] (the
//!   global weights now).
//!
//! **Supervised by** whoever spawned it (a test or the benchmark today). **On
//! failure**: a round that cannot be combined, stored or promoted leaves the global
//! weights and the serving version as they were and is answered with a
//! [`FederationError`]; the coordinator takes the next round.
//!
//! A synchronous round runs inside the handler: a status asked during a round is
//! answered after it. A buffered run's answers come back as messages, so the run's
//! sites overlap.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_models::federated::{
    Aggregation, Compression, Compressor, Contribution, Privacy, RoundAggregator,
};
use fogmesh_models::merge::{MergeError, Weights};
use fogmesh_models::store::{Manifest, ModelStore};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;

use super::error::{FederationError, TrainingError};
use super::site_trainer::{RoundWork, SiteEvaluation, SiteReport, SiteTrainerMsg};
use crate::continual_learner::Promoter;
use crate::node_agent::{call_within, Unanswered};
use crate::telemetry;

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
    pub last: Option<FederatedRound>,
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

pub struct FederatedCoordinator;

pub struct FederatedCoordinatorState {
    federation: String,
    manifest: Manifest,
    global: Weights,
    /// `global` as safetensors, shared with every site of a round.
    global_bytes: Arc<Vec<u8>>,
    /// The weights of `manifest`: what a round's weights are judged against.
    published: Arc<Vec<u8>>,
    /// Updates applied to the global weights since the start.
    applied: u64,
    sites: Vec<FederationSite>,
    plan: FederationPlan,
    aggregator: RoundAggregator,
    publication: Option<Publication>,
    rounds: u64,
    last: Option<FederatedRound>,
    buffered: Option<BufferedRun>,
}

/// An asynchronous run in progress.
struct BufferedRun {
    run: u64,
    versions_left: usize,
    buffer: usize,
    pending: Vec<Contribution>,
    report: FederatedRound,
    active: usize,
    started: Instant,
    reply: RpcReplyPort<Result<FederatedRound, FederationError>>,
}

impl FederatedCoordinatorState {
    fn error_weights(&self) -> impl Fn(MergeError) -> FederationError + '_ {
        |source| FederationError::Weights {
            federation: self.federation.clone(),
            source: Box::new(source),
        }
    }

    fn new_report(&self, mode: &'static str) -> FederatedRound {
        FederatedRound {
            federation: self.federation.clone(),
            round: self.rounds,
            mode,
            sites: Vec::new(),
            stragglers: Vec::new(),
            failed: Vec::new(),
            samples: 0,
            bytes_up: 0,
            bytes_down: 0,
            loss: None,
            epsilon: None,
            applied: 0,
            max_staleness: 0,
            evaluation: None,
            version: None,
            promoted: false,
            compute_s: 0.0,
            seconds: 0.0,
        }
    }

    /// Adds `delta` to the global weights and re-encodes them.
    fn apply(&mut self, delta: &[f32]) -> Result<(), FederationError> {
        for (w, d) in self.global.values_mut().iter_mut().zip(delta) {
            *w += d;
        }
        let (bytes, _) = self.global.to_safetensors().map_err(self.error_weights())?;
        self.global_bytes = Arc::new(bytes);
        self.applied += 1;
        Ok(())
    }

    /// Stores the global weights as the next version of the federation's expert, with
    /// the round's lineage, and promotes it.
    async fn publish(&mut self, report: &mut FederatedRound) -> Result<(), FederationError> {
        let Some(publication) = &self.publication else {
            return Ok(());
        };
        if let Some(gate) = self.plan.gate {
            let evaluation = self.evaluate(gate).await;
            let passed = evaluation.passed;
            tracing::info!(federation = %self.federation, round = report.round, passed, reason = %evaluation.reason, "federated evaluation");
            report.evaluation = Some(evaluation);
            if !passed {
                return Ok(());
            }
        }
        let federation = self.federation.clone();
        let parent = self.manifest.clone();
        let mut candidate = parent.clone();
        candidate.parents = vec![parent.id()];
        candidate.weights_sha256 = fogmesh_models::weights::sha256_hex(&self.global_bytes);
        candidate.weights_bytes = self.global_bytes.len() as u64;
        candidate.created_us = 0;
        candidate.metrics = report
            .loss
            .map(|loss| [("federated_train_loss".to_string(), loss)].into())
            .unwrap_or_default();
        candidate.training = serde_json::json!({
            "federated": {
                "round": report.round,
                "mode": report.mode,
                "sites": &report.sites,
                "stragglers": &report.stragglers,
                "samples": report.samples,
                "aggregation": self.plan.aggregation,
                "compression": self.plan.work.compression,
                "local_work": {
                    "epochs": self.plan.work.local.epochs,
                    "batch_size": self.plan.work.local.batch_size,
                    "learning_rate": self.plan.work.local.learning_rate,
                    "mu": self.plan.work.local.proximal_mu,
                },
                "privacy": self.plan.privacy,
                "epsilon": report.epsilon,
                "applied": report.applied,
                "evaluation": &report.evaluation,
            }
        });
        let store = publication.store.clone();
        let bytes = self.global_bytes.clone();
        let stored = tokio::task::spawn_blocking(move || {
            candidate.version = store.next_version(&parent.name, Some(&parent.version))?;
            store.import(candidate, &bytes)
        })
        .await
        .map_err(|source| FederationError::Thread {
            federation: federation.clone(),
            source,
        })?
        .map_err(|source| FederationError::Store {
            federation: federation.clone(),
            source: Box::new(source),
        })?;
        report.version = Some(stored.id());
        self.manifest = stored.clone();
        self.published = self.global_bytes.clone();
        if let Some(promoter) = &publication.promoter {
            promoter
                .promote(&federation, &stored)
                .await
                .map_err(|source| FederationError::Promote {
                    federation: federation.clone(),
                    version: stored.id(),
                    source,
                })?;
            report.promoted = true;
        }
        Ok(())
    }

    /// Every site judges the global weights against the published ones on its held-out
    /// windows; the gate decides on the pooled losses.
    async fn evaluate(&self, gate: EvaluationGate) -> FederatedEvaluation {
        let weights = vec![self.global_bytes.clone(), self.published.clone()];
        let asks = self
            .sites
            .iter()
            .map(|site| ask_evaluation(site, weights.clone(), self.plan.deadline));
        let answers = futures::future::join_all(asks).await;
        let mut sites = Vec::new();
        let (mut candidate, mut incumbent, mut windows) = (0.0, 0.0, 0u64);
        for (site, answer) in self.sites.iter().zip(answers) {
            let Some(SiteEvaluation { losses, windows: n }) = answer else {
                continue;
            };
            if let [c, i] = losses[..] {
                candidate += c * n as f64;
                incumbent += i * n as f64;
                windows += n;
                sites.push(SiteJudgement {
                    site: site.name.clone(),
                    candidate: c,
                    incumbent: i,
                    windows: n,
                });
            }
        }
        let mut evaluation = FederatedEvaluation {
            sites,
            candidate: f64::NAN,
            incumbent: f64::NAN,
            windows,
            passed: false,
            reason: String::new(),
        };
        if windows == 0 {
            evaluation.reason =
                "not stored: no site judged the round's weights on held-out windows".into();
            return evaluation;
        }
        evaluation.candidate = candidate / windows as f64;
        evaluation.incumbent = incumbent / windows as f64;
        let limit = (1.0 + gate.max_regression) * evaluation.incumbent;
        evaluation.passed = evaluation.candidate.is_finite() && evaluation.candidate <= limit;
        evaluation.reason = format!(
            "{}: held-out loss {:.6} {} (1 + {}) x {:.6} = {:.6} over {} windows of {} sites",
            if evaluation.passed {
                "stored"
            } else {
                "not stored"
            },
            evaluation.candidate,
            if evaluation.passed { "<=" } else { ">" },
            gate.max_regression,
            evaluation.incumbent,
            limit,
            windows,
            evaluation.sites.len(),
        );
        evaluation
    }

    /// Sends the round to every site and waits for the answers, until the deadline.
    async fn gather(&self, round: u64, work: &Arc<RoundWork>) -> Vec<Answer> {
        let asks = self.sites.iter().map(|site| {
            ask(
                site,
                round,
                self.global_bytes.clone(),
                work.clone(),
                self.plan.deadline,
            )
        });
        futures::future::join_all(asks).await
    }

    /// One synchronous round over the sites with `work`: the combined update, applied.
    async fn synchronous(
        &mut self,
        work: Arc<RoundWork>,
    ) -> Result<FederatedRound, FederationError> {
        let started = Instant::now();
        self.rounds += 1;
        let round = self.rounds;
        let answers = self.gather(round, &work).await;
        let mut report = self.new_report("synchronous");
        report.bytes_down = (self.global_bytes.len() * self.sites.len()) as u64;
        let mut contributions = Vec::new();
        let (mut loss_sum, mut loss_samples) = (0.0, 0u64);
        let mut slowest = Duration::ZERO;
        for (site, answer) in self.sites.iter().zip(answers) {
            match answer {
                Answer::Report(r) => {
                    report.sites.push(site.name.clone());
                    report.samples += r.samples;
                    report.bytes_up += r.update.bytes.len() as u64;
                    if let Some(loss) = r.loss {
                        loss_sum += loss * r.samples as f64;
                        loss_samples += r.samples;
                    }
                    slowest = slowest.max(r.compute);
                    contributions.push(Contribution {
                        update: r.update,
                        samples: r.samples,
                        staleness: 0,
                    });
                }
                Answer::Late => report.stragglers.push(site.name.clone()),
                Answer::Failed => report.failed.push(site.name.clone()),
            }
        }
        if contributions.len() < self.plan.min_sites.max(1) {
            return Err(FederationError::TooFewSites {
                federation: self.federation.clone(),
                round,
                asked: self.sites.len(),
                answered: contributions.len(),
                needed: self.plan.min_sites.max(1),
                stragglers: report.stragglers,
                failed: report.failed,
            });
        }
        let combined =
            self.aggregator
                .combine(&contributions)
                .map_err(|source| FederationError::Combine {
                    federation: self.federation.clone(),
                    round,
                    source,
                })?;
        self.apply(&combined.delta)?;
        report.loss = (loss_samples > 0).then(|| loss_sum / loss_samples as f64);
        report.epsilon = self.aggregator.epsilon();
        report.applied = 1;
        report.compute_s = slowest.as_secs_f64();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// Counts a round's outcome, time, bytes and left-out sites.
fn record(federation: &str, outcome: &Result<FederatedRound, FederationError>) {
    let federation = federation.to_string();
    let (label, report) = match outcome {
        Ok(report) if report.version.is_some() => ("stored", Some(report)),
        Ok(report) if report.evaluation.as_ref().is_some_and(|e| !e.passed) => {
            ("refused", Some(report))
        }
        Ok(report) => ("applied", Some(report)),
        Err(_) => ("failed", None),
    };
    metrics::counter!(telemetry::FEDERATED_ROUNDS, "federation" => federation.clone(), "outcome" => label)
        .increment(1);
    let Some(report) = report else {
        return;
    };
    metrics::histogram!(telemetry::FEDERATED_ROUND_SECONDS, "federation" => federation.clone())
        .record(report.seconds);
    for (direction, bytes) in [("up", report.bytes_up), ("down", report.bytes_down)] {
        metrics::counter!(telemetry::FEDERATED_BYTES, "federation" => federation.clone(), "direction" => direction)
            .increment(bytes);
    }
    for (reason, sites) in [("late", &report.stragglers), ("failed", &report.failed)] {
        metrics::counter!(telemetry::FEDERATED_SITES_LEFT_OUT, "federation" => federation.clone(), "reason" => reason)
            .increment(sites.len() as u64);
    }
    if let Some(epsilon) = report.epsilon {
        metrics::gauge!(telemetry::FEDERATED_EPSILON, "federation" => federation).set(epsilon);
    }
}

/// Asks one site (or a zone, pooled) for its held-out losses of `weights`; `None`
/// when it has no answer within `deadline`.
async fn ask_evaluation(
    site: &FederationSite,
    weights: Vec<Arc<Vec<u8>>>,
    deadline: Duration,
) -> Option<SiteEvaluation> {
    let answer = match &site.site {
        Site::Trainer(actor) => {
            call_within(
                actor,
                |reply| SiteTrainerMsg::Evaluate { weights, reply },
                ("site evaluation", "site trainer"),
                deadline,
            )
            .await
        }
        Site::Aggregator(actor) => {
            call_within(
                actor,
                |reply| FederatedCoordinatorMsg::Evaluate { weights, reply },
                ("zone evaluation", "fog aggregator"),
                deadline,
            )
            .await
        }
    };
    match answer {
        Ok(Ok(evaluation)) if evaluation.windows > 0 => Some(evaluation),
        Ok(Ok(_)) => None,
        Ok(Err(error)) => {
            tracing::warn!(site = %site.name, %error, "a site could not evaluate the round's weights");
            None
        }
        Err(error) => {
            tracing::warn!(site = %site.name, %error, "a site gave no evaluation");
            None
        }
    }
}

/// Asks one site for its part of `round`, waiting at most `deadline`.
async fn ask(
    site: &FederationSite,
    round: u64,
    global: Arc<Vec<u8>>,
    work: Arc<RoundWork>,
    deadline: Duration,
) -> Answer {
    let answer = match &site.site {
        Site::Trainer(actor) => {
            call_within(
                actor,
                |reply| SiteTrainerMsg::Train {
                    round,
                    global,
                    work,
                    reply,
                },
                ("site report", "site trainer"),
                deadline,
            )
            .await
        }
        Site::Aggregator(actor) => {
            call_within(
                actor,
                |reply| FederatedCoordinatorMsg::Aggregate {
                    round,
                    global,
                    work,
                    reply,
                },
                ("zone report", "fog aggregator"),
                deadline,
            )
            .await
        }
    };
    match answer {
        Ok(Ok(report)) => Answer::Report(report),
        Ok(Err(error)) => {
            tracing::warn!(site = %site.name, round, %error, "a site's local work failed");
            Answer::Failed
        }
        Err(Unanswered::Timeout { .. }) => Answer::Late,
        Err(error) => {
            tracing::warn!(site = %site.name, round, %error, "a site gave no answer");
            Answer::Failed
        }
    }
}

impl Actor for FederatedCoordinator {
    type Msg = FederatedCoordinatorMsg;
    type State = FederatedCoordinatorState;
    type Arguments = FederatedCoordinatorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: FederatedCoordinatorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let global = Weights::from_safetensors(&args.weights, &args.base.id())?;
        let aggregator =
            RoundAggregator::new(args.plan.aggregation, args.plan.privacy, args.plan.seed)?;
        args.plan.work.local.validate()?;
        if let Some(gate) = args.plan.gate {
            if !(gate.max_regression.is_finite() && gate.max_regression > -1.0) {
                return Err(FederationError::Invalid {
                    field: "max_regression",
                    value: gate.max_regression.to_string(),
                    reason: "must be a finite number above -1",
                }
                .into());
            }
        }
        Ok(FederatedCoordinatorState {
            federation: args.federation,
            manifest: args.base,
            global,
            published: Arc::new(args.weights.clone()),
            global_bytes: Arc::new(args.weights),
            applied: 0,
            sites: args.sites,
            plan: args.plan,
            aggregator,
            publication: args.publication,
            rounds: 0,
            last: None,
            buffered: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            FederatedCoordinatorMsg::Round { reply } => {
                if state.buffered.is_some() {
                    let _ = reply.send(Err(FederationError::Busy {
                        federation: state.federation.clone(),
                    }));
                    return Ok(());
                }
                let work = Arc::new(state.plan.work.clone());
                let outcome = match state.synchronous(work).await {
                    Ok(mut report) => match state.publish(&mut report).await {
                        Ok(()) => {
                            state.last = Some(report.clone());
                            Ok(report)
                        }
                        Err(error) => Err(error),
                    },
                    Err(error) => Err(error),
                };
                record(&state.federation, &outcome);
                let _ = reply.send(outcome);
            }
            FederatedCoordinatorMsg::Aggregate {
                round,
                global,
                work,
                reply,
            } => {
                let outcome = self.aggregate(state, round, global, work).await;
                let _ = reply.send(outcome);
            }
            FederatedCoordinatorMsg::Buffered {
                versions,
                buffer,
                reply,
            } => self.start_buffered(myself, state, versions, buffer, reply),
            FederatedCoordinatorMsg::Answered {
                run,
                site,
                base,
                answer,
            } => {
                self.buffered_answer(myself, state, run, site, base, answer)
                    .await
            }
            FederatedCoordinatorMsg::Status { reply } => {
                let _ = reply.send(FederationStatus {
                    federation: state.federation.clone(),
                    rounds: state.rounds,
                    version: state.manifest.id(),
                    sites: state.sites.len(),
                    weights_sha256: fogmesh_models::weights::sha256_hex(&state.global_bytes),
                    epsilon: state.aggregator.epsilon(),
                    last: state.last.clone(),
                });
            }
            FederatedCoordinatorMsg::Evaluate { weights, reply } => {
                let asks = state
                    .sites
                    .iter()
                    .map(|site| ask_evaluation(site, weights.clone(), state.plan.deadline));
                let answers = futures::future::join_all(asks).await;
                let mut pooled = SiteEvaluation {
                    losses: vec![0.0; weights.len()],
                    windows: 0,
                };
                for answer in answers.into_iter().flatten() {
                    if answer.losses.len() != weights.len() {
                        continue;
                    }
                    for (sum, loss) in pooled.losses.iter_mut().zip(&answer.losses) {
                        *sum += loss * answer.windows as f64;
                    }
                    pooled.windows += answer.windows;
                }
                if pooled.windows == 0 {
                    pooled.losses.clear();
                } else {
                    let n = pooled.windows as f64;
                    pooled.losses.iter_mut().for_each(|l| *l /= n);
                }
                let _ = reply.send(Ok(pooled));
            }
            FederatedCoordinatorMsg::Global { reply } => {
                let _ = reply.send(state.global_bytes.clone());
            }
        }
        Ok(())
    }
}

impl FederatedCoordinator {
    /// A fog aggregator's round: the parent's weights and work, the zone's update back.
    async fn aggregate(
        &self,
        state: &mut FederatedCoordinatorState,
        round: u64,
        global: Arc<Vec<u8>>,
        work: Arc<RoundWork>,
    ) -> Result<SiteReport, TrainingError> {
        let site: Arc<str> = state.federation.as_str().into();
        let failed = |source: FederationError| TrainingError::Aggregator {
            site: site.to_string(),
            source: Box::new(source),
        };
        state.global = Weights::from_safetensors(&global, &site)
            .map_err(|e| failed(state.error_weights()(e)))?;
        state.global_bytes = global;
        let before = state.global.values().to_vec();
        let outcome = state.synchronous(work).await;
        record(&state.federation, &outcome);
        let report = outcome.map_err(failed)?;
        let delta: Vec<f32> = state
            .global
            .values()
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect();
        state.last = Some(report.clone());
        Ok(SiteReport {
            site,
            round,
            // The zone's combined update goes up as it is: its sites compressed theirs.
            update: Compressor::new(Compression::None).compress(&delta),
            samples: report.samples,
            loss: report.loss,
            compute: Duration::from_secs_f64(report.compute_s),
        })
    }

    fn start_buffered(
        &self,
        myself: ActorRef<FederatedCoordinatorMsg>,
        state: &mut FederatedCoordinatorState,
        versions: usize,
        buffer: usize,
        reply: RpcReplyPort<Result<FederatedRound, FederationError>>,
    ) {
        if state.buffered.is_some() {
            let _ = reply.send(Err(FederationError::Busy {
                federation: state.federation.clone(),
            }));
            return;
        }
        for (field, value) in [("versions", versions), ("buffer", buffer)] {
            if value == 0 {
                let _ = reply.send(Err(FederationError::Invalid {
                    field,
                    value: "0".into(),
                    reason: "must be at least 1",
                }));
                return;
            }
        }
        state.rounds += 1;
        let run = state.rounds;
        let report = state.new_report("buffered");
        state.buffered = Some(BufferedRun {
            run,
            versions_left: versions,
            buffer,
            pending: Vec::new(),
            report,
            active: state.sites.len(),
            started: Instant::now(),
            reply,
        });
        for site in 0..state.sites.len() {
            dispatch(&myself, state, run, site);
        }
    }

    async fn buffered_answer(
        &self,
        myself: ActorRef<FederatedCoordinatorMsg>,
        state: &mut FederatedCoordinatorState,
        run: u64,
        site: usize,
        base: u64,
        answer: Answer,
    ) {
        let applied = state.applied;
        let Some(buffered) = state.buffered.as_mut().filter(|b| b.run == run) else {
            // An answer from a run that ended: its update is not applied twice.
            return;
        };
        let name = state.sites[site].name.clone();
        let stays = matches!(answer, Answer::Report(_));
        match answer {
            Answer::Report(r) => {
                let staleness = applied.saturating_sub(base);
                let report = &mut buffered.report;
                if !report.sites.contains(&name) {
                    report.sites.push(name);
                }
                report.samples += r.samples;
                report.bytes_up += r.update.bytes.len() as u64;
                report.max_staleness = report.max_staleness.max(staleness);
                report.compute_s = report.compute_s.max(r.compute.as_secs_f64());
                report.loss = r.loss.or(report.loss);
                buffered.pending.push(Contribution {
                    update: r.update,
                    samples: r.samples,
                    staleness,
                });
            }
            Answer::Late => {
                buffered.report.stragglers.push(name);
                buffered.active -= 1;
            }
            Answer::Failed => {
                buffered.report.failed.push(name);
                buffered.active -= 1;
            }
        }
        let mut outcome = None;
        if buffered.pending.len() >= buffered.buffer {
            let pending = std::mem::take(&mut buffered.pending);
            match state.aggregator.combine(&pending) {
                Ok(combined) => {
                    if let Err(error) = state.apply(&combined.delta) {
                        outcome = Some(Err(error));
                    }
                }
                Err(source) => {
                    outcome = Some(Err(FederationError::Combine {
                        federation: state.federation.clone(),
                        round: run,
                        source,
                    }))
                }
            }
            let Some(buffered) = state.buffered.as_mut() else {
                return;
            };
            buffered.versions_left -= 1;
            buffered.report.applied += 1;
            if buffered.versions_left == 0 && outcome.is_none() {
                outcome = Some(Ok(()));
            }
        }
        let Some(buffered) = state.buffered.as_mut() else {
            return;
        };
        if outcome.is_none() && buffered.active < state.plan.min_sites.max(1) {
            outcome = Some(Err(FederationError::TooFewSites {
                federation: state.federation.clone(),
                round: run,
                asked: state.sites.len(),
                answered: buffered.active,
                needed: state.plan.min_sites.max(1),
                stragglers: buffered.report.stragglers.clone(),
                failed: buffered.report.failed.clone(),
            }));
        }
        match outcome {
            None => {
                if stays {
                    dispatch(&myself, state, run, site);
                }
            }
            Some(done) => {
                let Some(mut buffered) = state.buffered.take() else {
                    return;
                };
                let result = match done {
                    Ok(()) => {
                        buffered.report.epsilon = state.aggregator.epsilon();
                        buffered.report.seconds = buffered.started.elapsed().as_secs_f64();
                        match state.publish(&mut buffered.report).await {
                            Ok(()) => {
                                state.last = Some(buffered.report.clone());
                                Ok(buffered.report)
                            }
                            Err(error) => Err(error),
                        }
                    }
                    Err(error) => Err(error),
                };
                record(&state.federation, &result);
                let _ = buffered.reply.send(result);
            }
        }
    }
}

/// Sends the newest global weights to `site` for a buffered run; its answer comes
/// back as [`FederatedCoordinatorMsg::Answered`].
fn dispatch(
    myself: &ActorRef<FederatedCoordinatorMsg>,
    state: &mut FederatedCoordinatorState,
    run: u64,
    site: usize,
) {
    if let Some(buffered) = state.buffered.as_mut() {
        buffered.report.bytes_down += state.global_bytes.len() as u64;
    }
    let target = state.sites[site].clone();
    let (global, work) = (
        state.global_bytes.clone(),
        Arc::new(state.plan.work.clone()),
    );
    let (base, deadline, myself) = (state.applied, state.plan.deadline, myself.clone());
    tokio::spawn(async move {
        let answer = ask(&target, run, global, work, deadline).await;
        // The coordinator may have stopped meanwhile.
        let _ = myself.cast(FederatedCoordinatorMsg::Answered {
            run,
            site,
            base,
            answer,
        });
    });
}
