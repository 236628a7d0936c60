//! A coordinator's rounds, apart from its mailbox: the state it keeps between rounds,
//! asking sites with a deadline, combining and applying their updates, the federated
//! evaluation and its gate, storing a version with its lineage, and the round metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_models::federated::distill::{consensus, distill_locally, onto_outputs};
use fogmesh_models::federated::{decode, Contribution, LocalTrainingError, RoundAggregator};
use fogmesh_models::merge::{MergeError, Weights};
use fogmesh_models::served::Architecture;
use fogmesh_models::store::Manifest;
use ractor::RpcReplyPort;

use super::error::FederationError;
use super::interface::{
    Answer, Distillation, EvaluationGate, FederatedCoordinatorMsg, FederatedEvaluation,
    FederatedRound, FederationPlan, FederationSite, Publication, Site, SiteJudgement,
};
use super::site_trainer::{DistillRound, RoundWork, SiteEvaluation, SiteReport, SiteTrainerMsg};
use crate::node_agent::{call_within, Unanswered};
use crate::telemetry;

pub struct FederatedCoordinatorState {
    pub(super) federation: String,
    pub(super) manifest: Manifest,
    pub(super) global: Weights,
    /// `global` as safetensors, shared with every site of a round.
    pub(super) global_bytes: Arc<Vec<u8>>,
    /// The weights of `manifest`: what a round's weights are judged against.
    pub(super) published: Arc<Vec<u8>>,
    /// Updates applied to the global weights since the start.
    pub(super) applied: u64,
    pub(super) sites: Vec<FederationSite>,
    pub(super) plan: FederationPlan,
    pub(super) aggregator: RoundAggregator,
    pub(super) publication: Option<Publication>,
    pub(super) rounds: u64,
    pub(super) last: Option<FederatedRound>,
    /// Why the last round applied nothing, for status (cleared by a round that did).
    pub(super) last_error: Option<String>,
    pub(super) buffered: Option<BufferedRun>,
    /// The sites' outputs on the shared windows agreed in the last distillation
    /// round (empty before the first).
    pub(super) consensus: Arc<Vec<f32>>,
    /// Whether a distillation round sent the shared windows already (counted in its
    /// bytes down once).
    pub(super) shared_sent: bool,
}

/// An asynchronous run in progress.
pub(super) struct BufferedRun {
    pub(super) run: u64,
    pub(super) versions_left: usize,
    pub(super) buffer: usize,
    pub(super) pending: Vec<Contribution>,
    pub(super) report: FederatedRound,
    pub(super) active: usize,
    pub(super) started: Instant,
    pub(super) reply: RpcReplyPort<Result<FederatedRound, FederationError>>,
}

impl FederatedCoordinatorState {
    pub(super) fn error_weights(&self) -> impl Fn(MergeError) -> FederationError + '_ {
        |source| FederationError::Weights {
            federation: self.federation.clone(),
            source: Box::new(source),
        }
    }

    pub(super) fn new_report(&self, mode: &'static str) -> FederatedRound {
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
    pub(super) fn apply(&mut self, delta: &[f32]) -> Result<(), FederationError> {
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
    pub(super) async fn publish(
        &mut self,
        report: &mut FederatedRound,
    ) -> Result<(), FederationError> {
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
                "distillation": self.plan.distillation.as_ref().map(|d| serde_json::json!({
                    "weight": d.weight,
                    "shared_windows": d.shared.len(),
                })),
                "epsilon": report.epsilon,
                "privacy_spent": self.aggregator.privacy_spent(),
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

    /// Every site's held-out losses of `weights`, by site; `None` for a site with no
    /// answer (or no held-out windows) within the deadline.
    pub(super) async fn evaluations(
        &self,
        weights: &[Arc<Vec<u8>>],
    ) -> Vec<(&FederationSite, SiteEvaluation)> {
        let asks = self
            .sites
            .iter()
            .map(|site| ask_evaluation(site, weights.to_vec(), self.plan.deadline));
        let answers = futures::future::join_all(asks).await;
        self.sites
            .iter()
            .zip(answers)
            .filter_map(|(site, answer)| {
                answer
                    .filter(|a| a.losses.len() == weights.len())
                    .map(|a| (site, a))
            })
            .collect()
    }

    /// Every site judges the global weights against the published ones on its held-out
    /// windows; the gate decides on the pooled losses.
    pub(super) async fn evaluate(&self, gate: EvaluationGate) -> FederatedEvaluation {
        let weights = [self.global_bytes.clone(), self.published.clone()];
        let answers = self.evaluations(&weights).await;
        let pooled = pool(answers.iter().map(|(_, a)| a), weights.len());
        let sites = answers
            .iter()
            .map(|(site, a)| SiteJudgement {
                site: site.name.clone(),
                candidate: a.losses[0],
                incumbent: a.losses[1],
                windows: a.windows,
            })
            .collect();
        let windows = pooled.windows;
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
        evaluation.candidate = pooled.losses[0];
        evaluation.incumbent = pooled.losses[1];
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
    pub(super) async fn gather(&self, round: u64, work: &Arc<RoundWork>) -> Vec<Answer> {
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
    pub(super) async fn synchronous(
        &mut self,
        work: Arc<RoundWork>,
    ) -> Result<(FederatedRound, Vec<f32>), FederationError> {
        let started = Instant::now();
        self.rounds += 1;
        let round = self.rounds;
        let answers = self.gather(round, &work).await;
        let mut report = self.new_report("synchronous");
        report.bytes_down = (self.global_bytes.len() * self.sites.len()) as u64;
        let contributions: Vec<Contribution> = self
            .tally(round, answers, &mut report)?
            .into_iter()
            .map(|r| Contribution {
                update: r.update,
                samples: r.samples,
                staleness: 0,
            })
            .collect();
        let combined =
            self.aggregator
                .combine(&contributions)
                .map_err(|source| FederationError::Combine {
                    federation: self.federation.clone(),
                    round,
                    source,
                })?;
        self.apply(&combined.delta)?;
        report.epsilon = self.aggregator.epsilon();
        report.applied = 1;
        report.seconds = started.elapsed().as_secs_f64();
        Ok((report, combined.delta))
    }

    /// The reports among a round's `answers`, with `report`'s sites, windows, bytes
    /// up, left-out sites, mean loss (by windows) and slowest compute filled in; fewer
    /// than `min_sites` reports refuse the round.
    fn tally(
        &self,
        round: u64,
        answers: Vec<Answer>,
        report: &mut FederatedRound,
    ) -> Result<Vec<SiteReport>, FederationError> {
        let mut reports = Vec::new();
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
                    reports.push(r);
                }
                Answer::Late => report.stragglers.push(site.name.clone()),
                Answer::Failed => report.failed.push(site.name.clone()),
            }
        }
        if reports.len() < self.plan.min_sites.max(1) {
            return Err(FederationError::TooFewSites {
                federation: self.federation.clone(),
                round,
                asked: self.sites.len(),
                answered: reports.len(),
                needed: self.plan.min_sites.max(1),
                stragglers: std::mem::take(&mut report.stragglers),
                failed: std::mem::take(&mut report.failed),
            });
        }
        report.loss = (loss_samples > 0).then(|| loss_sum / loss_samples as f64);
        report.compute_s = slowest.as_secs_f64();
        Ok(reports)
    }

    /// The federation's network, as its base version's manifest names it.
    fn distilled_architecture(&self, round: u64) -> Result<Architecture, FederationError> {
        Architecture::from_manifest(&self.manifest).map_err(|e| FederationError::Distill {
            federation: self.federation.clone(),
            round,
            source: Box::new(e.into()),
        })
    }

    /// The sites' outputs combined by windows: with privacy each site's clipped,
    /// weighed equally and noised as an update is, the noised mean then put back among
    /// the network's outputs.
    fn agree(
        &mut self,
        round: u64,
        reports: &[SiteReport],
        architecture: &Architecture,
        report: &mut FederatedRound,
    ) -> Result<Vec<f32>, FederationError> {
        let combine_failed = |source| FederationError::Combine {
            federation: self.federation.clone(),
            round,
            source,
        };
        if self.plan.privacy.is_some() {
            let contributions: Vec<Contribution> = reports
                .iter()
                .map(|r| Contribution {
                    update: r.update.clone(),
                    samples: r.samples,
                    staleness: 0,
                })
                .collect();
            let mut noised = self
                .aggregator
                .combine(&contributions)
                .map_err(combine_failed)?
                .delta;
            report.epsilon = self.aggregator.epsilon();
            onto_outputs(architecture, &mut noised);
            return Ok(noised);
        }
        let outputs = reports
            .iter()
            .map(|r| decode(&r.update).map(|values| (values, r.samples)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(combine_failed)?;
        let views: Vec<(&[f32], u64)> = outputs.iter().map(|(o, n)| (o.as_slice(), *n)).collect();
        consensus(&views).map_err(combine_failed)
    }

    /// A fog aggregator's part of a distillation round (`work` from the parent): its
    /// sites' outputs combined by windows, passed up as one site's weighted by all of
    /// their windows. The parent's consensus of that and its other sites is the one
    /// it would have reached asking every site itself.
    pub(super) async fn relayed_distillation(
        &mut self,
        work: Arc<RoundWork>,
    ) -> Result<(FederatedRound, Vec<f32>), FederationError> {
        let started = Instant::now();
        self.rounds += 1;
        let round = self.rounds;
        let answers = self.gather(round, &work).await;
        let mut report = self.new_report("distillation");
        let reports = self.tally(round, answers, &mut report)?;
        let architecture = self.distilled_architecture(round)?;
        let agreed = self.agree(round, &reports, &architecture, &mut report)?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok((report, agreed))
    }

    /// One distillation round: the sites' outputs on the shared windows, their
    /// consensus by windows, and the federation's network trained to match it.
    pub(super) async fn distilled(
        &mut self,
        distillation: Distillation,
    ) -> Result<FederatedRound, FederationError> {
        let started = Instant::now();
        self.rounds += 1;
        let round = self.rounds;
        let work = Arc::new(RoundWork {
            distill: Some(DistillRound {
                shared: distillation.shared.clone(),
                consensus: self.consensus.clone(),
                weight: distillation.weight,
            }),
            ..self.plan.work.clone()
        });
        let answers = self.gather(round, &work).await;
        let mut report = self.new_report("distillation");
        // The shared windows go down once; a site's node holds them for later rounds.
        let shared = match std::mem::replace(&mut self.shared_sent, true) {
            true => 0,
            false => distillation.shared.iter().map(|w| w.window.len()).sum(),
        };
        let down = self.global_bytes.len() + 4 * (self.consensus.len() + shared);
        report.bytes_down = (down * self.sites.len()) as u64;
        let reports = self.tally(round, answers, &mut report)?;
        let architecture = self.distilled_architecture(round)?;
        let agreed = Arc::new(self.agree(round, &reports, &architecture, &mut report)?);
        let federation = self.federation.clone();
        let distill_failed = |source: LocalTrainingError| FederationError::Distill {
            federation,
            round,
            source: Box::new(source),
        };
        let (global, shared, target) = (
            self.global_bytes.clone(),
            distillation.shared.clone(),
            agreed.clone(),
        );
        let local = self.plan.work.local.clone();
        let trained = tokio::task::spawn_blocking(move || {
            tch::set_num_threads(1);
            distill_locally(
                &architecture,
                &global,
                &[],
                &shared,
                &target,
                distillation.weight,
                &local,
                round,
                tch::Device::cuda_if_available(),
            )
        })
        .await
        .map_err(|source| FederationError::Thread {
            federation: self.federation.clone(),
            source,
        })?
        .map_err(distill_failed)?;
        self.global = Weights::from_safetensors(&trained.weights, &self.federation)
            .map_err(self.error_weights())?;
        self.global_bytes = Arc::new(trained.weights);
        self.applied += 1;
        self.consensus = agreed;
        report.applied = 1;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// Site evaluations of `weights` weights pooled: each loss the mean over all their
/// held-out windows; no losses when no site had windows.
pub(super) fn pool<'a>(
    answers: impl Iterator<Item = &'a SiteEvaluation>,
    weights: usize,
) -> SiteEvaluation {
    let mut pooled = SiteEvaluation {
        losses: vec![0.0; weights],
        windows: 0,
    };
    for answer in answers {
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
    pooled
}

/// Counts a round's outcome, time, bytes and left-out sites; `None` for a round that
/// applied nothing.
pub(super) fn record(federation: &str, round: Option<&FederatedRound>) {
    let federation = federation.to_string();
    let (label, report) = match round {
        Some(report) if report.version.is_some() => ("stored", Some(report)),
        Some(report) if report.evaluation.as_ref().is_some_and(|e| !e.passed) => {
            ("refused", Some(report))
        }
        Some(report) => ("applied", Some(report)),
        None => ("failed", None),
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
pub(super) async fn ask_evaluation(
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
pub(super) async fn ask(
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
