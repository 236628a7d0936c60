//! `FederatedCoordinator`: the rounds of one federation (one expert's network).
//!
//! **Owns** the federation's global weights and the version they descend from, its
//! sites, the [`FederationPlan`] and the [`RoundAggregator`] (rule, noise generator,
//! privacy accountant, which goes on from what its predecessors spent,
//! [`FederatedCoordinatorArgs::spent`]). **Takes**
//! - [`FederatedCoordinatorMsg::Round`]: a synchronous round. Every site gets the
//!   global weights and the round's work; the answers that arrive within the deadline
//!   are combined (stragglers and failed sites are left out of that round, not waited
//!   for), and with fewer than `min_sites` answers nothing is applied. At the top of a
//!   federation every site then judges the new weights against the serving version's
//!   on windows it held out of training (federated evaluation); when the pooled loss
//!   passes the [`EvaluationGate`] the weights are stored as a version with their
//!   lineage and handed to the [`Promoter`], as a continual learner's candidate is.
//!   Either way the global weights go on to the next round.
//!   With [`FederationPlan::distillation`] a round is a distillation round instead:
//!   the sites answer with their outputs on the shared windows, the coordinator
//!   averages them by windows and trains the federation's network to match that
//!   consensus on the same windows; the result is judged, stored and promoted the
//!   same way.
//! - [`FederatedCoordinatorMsg::Buffered`]: an asynchronous run (FedBuff): every site
//!   trains from the newest weights it was given and is given the newest again as
//!   soon as it answers; every `buffer` answers are combined, each discounted by its
//!   staleness, until `versions` updates are applied; then one version is stored.
//! - [`FederatedCoordinatorMsg::Aggregate`]: the same synchronous round asked by a
//!   coordinator one level up (a fog aggregator for its zone): the global weights and
//!   work come from the parent, the combined update goes back to it as one site's
//!   report weighted by all of its sites' windows, and nothing is stored here. In a
//!   distillation round the sites' outputs are combined by windows instead and go up
//!   the same way; the aggregator trains no network of its own.
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

use fogmesh_models::federated::{Compression, Compressor, Contribution, RoundAggregator};
use fogmesh_models::merge::Weights;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::error::{FederationError, TrainingError};
use super::interface::{
    Answer, FederatedCoordinatorArgs, FederatedCoordinatorMsg, FederatedRound, FederationStatus,
};
use super::rounds::{ask, pool, record, BufferedRun, FederatedCoordinatorState};
use super::site_trainer::{RoundWork, SiteReport};

pub struct FederatedCoordinator;

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
        let mut aggregator =
            RoundAggregator::new(args.plan.aggregation, args.plan.privacy, args.plan.seed)?;
        aggregator.resume_privacy(args.spent)?;
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
        // A coordinator started again (re-placed, or its node restarted) numbers on
        // from the round that made its base version.
        let rounds = args
            .base
            .training
            .pointer("/federated/round")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
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
            rounds,
            last: None,
            last_error: None,
            buffered: None,
            consensus: Arc::new(Vec::new()),
            shared_sent: false,
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
                if let Some(run) = state.plan.buffered {
                    self.start_buffered(myself, state, run.updates, run.buffer, reply);
                    return Ok(());
                }
                if state.buffered.is_some() {
                    let _ = reply.send(Err(FederationError::Busy {
                        federation: state.federation.clone(),
                    }));
                    return Ok(());
                }
                let work = Arc::new(state.plan.work.clone());
                let ran = if let Some(distillation) = state.plan.distillation.clone() {
                    state.distilled(distillation).await
                } else {
                    state.synchronous(work).await.map(|(report, _)| report)
                };
                let outcome = match ran {
                    Ok(mut report) => match state.publish(&mut report).await {
                        Ok(()) => {
                            state.last = Some(report.clone());
                            Ok(report)
                        }
                        Err(error) => Err(error),
                    },
                    Err(error) => Err(error),
                };
                record(&state.federation, outcome.as_ref().ok());
                state.last_error = outcome.as_ref().err().map(ToString::to_string);
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
                    privacy_spent: state.aggregator.privacy_spent(),
                    last: state.last.clone(),
                    last_error: state.last_error.clone(),
                    site_names: state.sites.iter().map(|s| s.name.clone()).collect(),
                    mode: if state.plan.buffered.is_some() {
                        "buffered"
                    } else if state.plan.distillation.is_some() {
                        "distillation"
                    } else {
                        "synchronous"
                    },
                });
            }
            FederatedCoordinatorMsg::Evaluate { weights, reply } => {
                let answers = state.evaluations(&weights).await;
                let pooled = pool(answers.iter().map(|(_, a)| a), weights.len());
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
        let outcome = if work.distill.is_some() {
            state.relayed_distillation(work).await
        } else {
            state.synchronous(work).await
        };
        record(
            &state.federation,
            outcome.as_ref().ok().map(|(report, _)| report),
        );
        let (report, delta) = outcome.map_err(failed)?;
        state.last = Some(report.clone());
        Ok(SiteReport {
            site,
            round,
            // The zone's combined update (or outputs) goes up as it is: its sites
            // compressed theirs.
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
        if state.plan.distillation.is_some() {
            let _ = reply.send(Err(FederationError::Invalid {
                field: "buffered",
                value: format!("{{ buffer = {buffer}, updates = {versions} }}"),
                reason: "a distillation federation runs synchronous rounds only",
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
                record(&state.federation, result.as_ref().ok());
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
