//! `SiteTrainer`: one site of a federated round.
//!
//! **Owns** the site's training windows (they never leave it) and the
//! [`Compressor`] whose residual carries what earlier rounds' encodings left out
//! (error feedback). **Takes** [`SiteTrainerMsg::Train`]: the round's global weights
//! (safetensors bytes) and the round's work, answered with a [`SiteReport`]: the
//! encoded difference between the weights after its local work and the global ones,
//! the number of windows it trained on, its training objective and how long the work
//! took; and [`SiteTrainerMsg::Evaluate`]: candidate weights judged on the windows it
//! holds out of training ([`SiteEvaluation`]). Only those answers leave the site. **Supervised by** whoever spawned it (the
//! test or benchmark that builds the federation; its coordinator only calls it).
//! **On failure**: global weights that do not load into the site's network, or a
//! training error, are answered as [`TrainingError`]; the actor keeps its windows and
//! takes the next round.
//!
//! A site on a mesh node takes its windows from a [`WindowFeed`]. Where the node runs
//! the expert's continual learner, each round asks it for the windows it holds (its
//! reservoir and recent windows, with the labels the plant gave them, kept across a
//! restart in the edge log): the site trains on those, holding out the windows whose
//! values hash to 0 modulo `holdout_every`, the same ones every time they are asked
//! for. Otherwise, or while the learner holds none or does not answer within
//! [`LEARNER_WAIT`], it trains on its own sample of the windows the node's routers
//! had the federation's expert score, from the node's annunciator
//! ([`SiteTrainerMsg::Observed`]): a uniform sample (a reservoir) with every n-th
//! window held out for evaluation, so what it trains on follows the plant without
//! growing.
//!
//! In a distillation round ([`RoundWork::distill`]) the site trains its own network,
//! which may be narrower or wider than the federation's ([`SiteTrainerArgs::network`]),
//! on its windows while matching last round's consensus on the shared windows, and
//! answers with its outputs on the shared windows instead of an update. The site keeps
//! that network from round to round; it starts from the global weights when it is the
//! federation's network, newly initialised otherwise.
//!
//! Local work ([`train_locally`]) runs on a blocking thread with one libtorch
//! intra-op thread, so a site never holds up the async runtime and many sites share
//! the cores fairly. With [`RoundWork::echo`] a site sends back a zero update without
//! training: a round then measures only dispatch, encoding and aggregation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_models::continual::{ReplayItem, Reservoir};
use fogmesh_models::federated::distill::{distill_locally, initial_weights, outputs_on};
use fogmesh_models::federated::{
    held_out_loss, train_locally, Compression, Compressor, EncodedUpdate, LocalTrainingError,
    LocalWork,
};
use fogmesh_models::merge::Weights;
use fogmesh_models::served::Architecture;
use fogmesh_models::ModelError;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::error::TrainingError;
use crate::annunciator::ScoredWindow;
use crate::continual_learner::ContinualLearnerMsg;
use crate::directory::NodeDirectory;

/// What a coordinator asks of every site in a round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundWork {
    pub local: LocalWork,
    pub compression: Compression,
    /// Send a zero update without training (W2's `--local-work none`).
    pub echo: bool,
    /// A distillation round: the site answers with its outputs on the shared windows.
    pub distill: Option<DistillRound>,
}

/// What a site needs for a distillation round.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillRound {
    /// Unlabelled windows every site may see (the federation's shared set).
    pub shared: Arc<Vec<ReplayItem>>,
    /// The sites' outputs on `shared` agreed last round, as
    /// [`outputs_on`] lays them out; empty in a federation's first round.
    pub consensus: Arc<Vec<f32>>,
    /// The weight of the distance to the consensus against the site's own loss.
    pub weight: f64,
}

impl Default for RoundWork {
    /// W2's local work: one epoch, batches of 32, Adam at 1e-3, no compression.
    fn default() -> Self {
        RoundWork {
            local: LocalWork::default(),
            compression: Compression::None,
            echo: false,
            distill: None,
        }
    }
}

pub struct SiteTrainerArgs {
    pub site: String,
    /// The federation's network.
    pub architecture: Architecture,
    /// The windows the site has seen; a classifier trains on the labelled ones.
    pub windows: Vec<ReplayItem>,
    /// Windows kept out of training, on which the site judges candidate versions
    /// (federated evaluation); may be empty.
    pub held_out: Vec<ReplayItem>,
    /// Windows that keep coming (a site on a mesh node); they join `windows` and
    /// `held_out` as they arrive.
    pub feed: Option<WindowFeed>,
    /// The site's own network in distillation rounds when it differs from the
    /// federation's (`None`: the federation's).
    pub network: Option<Architecture>,
}

/// The windows of a site on a mesh node: those its node's routers had `expert` score.
pub struct WindowFeed {
    pub windows: broadcast::Receiver<Arc<ScoredWindow>>,
    pub expert: Arc<str>,
    /// Windows kept to train on, a uniform sample of all that came.
    pub capacity: usize,
    /// Every how many windows one is held out instead (0: none).
    pub holdout_every: usize,
    pub seed: u64,
    /// The node's actors, where the site finds the expert's continual learner.
    pub learners: Option<Arc<NodeDirectory>>,
}

/// How long a round waits for the learner's windows before taking the site's own.
pub const LEARNER_WAIT: Duration = Duration::from_secs(2);

/// Whether `item` is one of the windows a site holds out of training: its values'
/// FNV-1a hash is 0 modulo `every` (never with `every` 0), so the choice does not
/// depend on where the window sits in the learner's buffers.
fn held_out_by_hash(item: &ReplayItem, every: usize) -> bool {
    if every == 0 {
        return false;
    }
    let hash = item
        .window
        .iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    hash % every as u64 == 0
}

/// A fed site's samples of what came, turned into `windows` and `held_out` when a
/// round needs them.
struct FedSample {
    train: Reservoir,
    held_out: Reservoir,
    holdout_every: usize,
    expert: Arc<str>,
    learners: Option<Arc<NodeDirectory>>,
    seen: u64,
    changed: bool,
    forwarder: JoinHandle<()>,
}

pub struct SiteTrainerState {
    site: Arc<str>,
    architecture: Arc<Architecture>,
    windows: Arc<Vec<ReplayItem>>,
    held_out: Arc<Vec<ReplayItem>>,
    compressor: Option<Compressor>,
    fed: Option<FedSample>,
    /// The network distillation rounds train, and its weights once a round made them.
    network: Option<Arc<Architecture>>,
    distilled: Option<Arc<Vec<u8>>>,
}

impl SiteTrainerState {
    /// Takes in the windows to train and judge on: the learner's, or what came to the
    /// site's own sample since the last round.
    async fn refresh(&mut self) {
        let Some(fed) = self.fed.as_mut() else { return };
        let learner = fed.learners.as_ref().and_then(|l| l.learner(&fed.expert));
        if let Some(learner) = learner {
            let asked = learner
                .actor
                .call(
                    |reply| ContinualLearnerMsg::Windows { reply },
                    Some(LEARNER_WAIT),
                )
                .await;
            if let Ok(CallResult::Success(windows)) = asked {
                if !windows.is_empty() {
                    let (held_out, train): (Vec<_>, Vec<_>) = windows
                        .into_iter()
                        .partition(|w| held_out_by_hash(w, fed.holdout_every));
                    self.windows = Arc::new(train);
                    self.held_out = Arc::new(held_out);
                    // The site's own sample stands in again whenever the learner
                    // cannot.
                    fed.changed = true;
                    return;
                }
            }
        }
        if fed.changed {
            self.windows = Arc::new(fed.train.items().to_vec());
            self.held_out = Arc::new(fed.held_out.items().to_vec());
            fed.changed = false;
        }
    }

    fn observe(&mut self, window: &ScoredWindow) {
        let Some(fed) = self.fed.as_mut() else { return };
        fed.seen += 1;
        let item = ReplayItem {
            window: window.values.to_vec(),
            label: None,
        };
        if fed.holdout_every > 0 && fed.seen % fed.holdout_every as u64 == 0 {
            fed.held_out.offer(item);
        } else {
            fed.train.offer(item);
        }
        fed.changed = true;
    }
}

/// What a site (or a fog aggregator, for its zone) sends back for a round.
#[derive(Debug, Clone)]
pub struct SiteReport {
    pub site: Arc<str>,
    pub round: u64,
    pub update: EncodedUpdate,
    /// Windows trained on: FedAvg's weight.
    pub samples: u64,
    /// The training objective after the local work (`None` for an echo).
    pub loss: Option<f64>,
    /// The local work alone (for an aggregator, its slowest site's), without waiting
    /// for the thread.
    pub compute: Duration,
}

/// A site's judgement of weights on its held-out windows.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteEvaluation {
    /// The mean loss of each weights asked about, in the order asked.
    pub losses: Vec<f64>,
    /// Held-out windows measured on (0: the site has none, and no losses).
    pub windows: u64,
}

pub enum SiteTrainerMsg {
    Train {
        round: u64,
        /// The global weights, safetensors.
        global: Arc<Vec<u8>>,
        work: Arc<RoundWork>,
        reply: RpcReplyPort<Result<SiteReport, TrainingError>>,
    },
    /// Federated evaluation: the loss of each of `weights` (safetensors) on the
    /// site's held-out windows.
    Evaluate {
        weights: Vec<Arc<Vec<u8>>>,
        reply: RpcReplyPort<Result<SiteEvaluation, TrainingError>>,
    },
    /// A window the site's expert scored on this node (from the feed's task).
    Observed(Arc<ScoredWindow>),
}

// Local: a site on another node is reached through `RemoteSite` and the `Federation`
// service, which move weights and updates in chunks.
impl ractor::Message for SiteTrainerMsg {}

pub struct SiteTrainer;

impl Actor for SiteTrainer {
    type Msg = SiteTrainerMsg;
    type State = SiteTrainerState;
    type Arguments = SiteTrainerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SiteTrainerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let fed = match args.feed {
            None => None,
            Some(feed) => Some(FedSample {
                train: Reservoir::new(feed.capacity, feed.seed)?,
                held_out: Reservoir::new(
                    (feed.capacity / feed.holdout_every.max(1)).max(1),
                    feed.seed.wrapping_add(1),
                )?,
                holdout_every: feed.holdout_every,
                expert: feed.expert.clone(),
                learners: feed.learners,
                seen: 0,
                changed: false,
                forwarder: tokio::spawn(forward(feed.windows, feed.expert, myself)),
            }),
        };
        Ok(SiteTrainerState {
            site: args.site.as_str().into(),
            architecture: Arc::new(args.architecture),
            windows: Arc::new(args.windows),
            held_out: Arc::new(args.held_out),
            compressor: None,
            fed,
            network: args.network.map(Arc::new),
            distilled: None,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(fed) = &state.fed {
            fed.forwarder.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SiteTrainerMsg::Observed(window) = &message {
            state.observe(window);
            return Ok(());
        }
        state.refresh().await;
        let (round, global, work, reply) = match message {
            SiteTrainerMsg::Observed(_) => return Ok(()),
            SiteTrainerMsg::Train {
                round,
                global,
                work,
                reply,
            } => (round, global, work, reply),
            SiteTrainerMsg::Evaluate { weights, reply } => {
                let (site, architecture, held_out) = (
                    state.site.clone(),
                    state.architecture.clone(),
                    state.held_out.clone(),
                );
                let judged = tokio::task::spawn_blocking(move || {
                    evaluate(&site, &architecture, &held_out, &weights)
                })
                .await
                .unwrap_or_else(|source| {
                    Err(TrainingError::Thread {
                        site: state.site.to_string(),
                        source,
                    })
                });
                let _ = reply.send(judged);
                return Ok(());
            }
        };
        if let Some(distill) = work.distill.clone() {
            let outcome = self.distill(state, round, global, &work, distill).await;
            let _ = reply.send(outcome);
            return Ok(());
        }
        let site = state.site.clone();
        let (architecture, windows) = (state.architecture.clone(), state.windows.clone());
        // A federation that changes its encoding starts the residual afresh.
        let mut compressor = state
            .compressor
            .take()
            .filter(|c| c.compression() == work.compression)
            .unwrap_or_else(|| Compressor::new(work.compression));
        let echo = work.echo;
        let work_once = move |compressor: &mut Compressor| {
            local_work(
                &site,
                &architecture,
                &windows,
                &work,
                &global,
                compressor,
                round,
            )
        };
        // An echo trains nothing: no thread for it.
        let done = if echo {
            Ok((work_once(&mut compressor), compressor))
        } else {
            tokio::task::spawn_blocking(move || (work_once(&mut compressor), compressor)).await
        };
        let outcome = match done {
            Ok((outcome, compressor)) => {
                state.compressor = Some(compressor);
                outcome
            }
            Err(source) => Err(TrainingError::Thread {
                site: state.site.to_string(),
                source,
            }),
        };
        // The coordinator may have given up on this round (a straggler).
        let _ = reply.send(outcome);
        Ok(())
    }
}

impl SiteTrainer {
    /// A distillation round: own work plus the consensus, then outputs on the shared
    /// windows.
    async fn distill(
        &self,
        state: &mut SiteTrainerState,
        round: u64,
        global: Arc<Vec<u8>>,
        work: &RoundWork,
        distill: DistillRound,
    ) -> Result<SiteReport, TrainingError> {
        let site = state.site.clone();
        let federation = state.architecture.clone();
        let network = state.network.clone().unwrap_or_else(|| federation.clone());
        let (windows, start) = (state.windows.clone(), state.distilled.clone());
        let local = work.local.clone();
        let done = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            tch::set_num_threads(1);
            let device = tch::Device::cuda_if_available();
            let failed = |source: LocalTrainingError| TrainingError::Local {
                site: site.to_string(),
                source: Box::new(source),
            };
            if windows.is_empty() {
                return Err(failed(
                    ModelError::Shape {
                        what: "site windows",
                        expected: "at least one window to train on".into(),
                        got: "0 windows: the site has seen none of the expert's windows yet".into(),
                    }
                    .into(),
                ));
            }
            let weights = match start {
                Some(weights) => weights.to_vec(),
                None if network == federation => global.to_vec(),
                None => initial_weights(&network, local.seed, device).map_err(failed)?,
            };
            // The first round has no consensus yet: the site trains on its own windows
            // alone (a weight of 0 against its own outputs).
            let (consensus, weight) = if distill.consensus.is_empty() {
                let own =
                    outputs_on(&network, &weights, &distill.shared, device).map_err(failed)?;
                (own, 0.0)
            } else {
                (distill.consensus.to_vec(), distill.weight)
            };
            let trained = distill_locally(
                &network,
                &weights,
                &windows,
                &distill.shared,
                &consensus,
                weight,
                &local,
                round,
                device,
            )
            .map_err(failed)?;
            let outputs =
                outputs_on(&network, &trained.weights, &distill.shared, device).map_err(failed)?;
            Ok((trained, outputs, started.elapsed()))
        })
        .await
        .unwrap_or_else(|source| {
            Err(TrainingError::Thread {
                site: state.site.to_string(),
                source,
            })
        });
        let (trained, outputs, compute) = done?;
        state.distilled = Some(Arc::new(trained.weights));
        Ok(SiteReport {
            site: state.site.clone(),
            round,
            update: Compressor::new(Compression::None).compress(&outputs),
            samples: trained.samples,
            loss: Some(trained.loss),
            compute,
        })
    }
}

/// Passes the windows `expert` scored to the site; windows the site fell behind on are
/// skipped (it keeps a sample, so a gap costs nothing but those windows).
async fn forward(
    mut windows: broadcast::Receiver<Arc<ScoredWindow>>,
    expert: Arc<str>,
    site: ActorRef<SiteTrainerMsg>,
) {
    loop {
        match windows.recv().await {
            Ok(window) => {
                if window.experts.iter().any(|o| o.expert == expert)
                    && site.cast(SiteTrainerMsg::Observed(window)).is_err()
                {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The held-out loss of each of `weights`, on the site's thread.
fn evaluate(
    site: &Arc<str>,
    architecture: &Architecture,
    held_out: &[ReplayItem],
    weights: &[Arc<Vec<u8>>],
) -> Result<SiteEvaluation, TrainingError> {
    if held_out.is_empty() {
        return Ok(SiteEvaluation {
            losses: Vec::new(),
            windows: 0,
        });
    }
    tch::set_num_threads(1);
    let mut evaluation = SiteEvaluation {
        losses: Vec::with_capacity(weights.len()),
        windows: 0,
    };
    for bytes in weights {
        let (loss, windows) = held_out_loss(
            architecture,
            bytes,
            held_out,
            tch::Device::cuda_if_available(),
        )
        .map_err(|source| TrainingError::Local {
            site: site.to_string(),
            source: Box::new(source),
        })?;
        evaluation.losses.push(loss);
        evaluation.windows = windows;
    }
    Ok(evaluation)
}

/// One round's work on the site's thread.
fn local_work(
    site: &Arc<str>,
    architecture: &Architecture,
    windows: &[ReplayItem],
    work: &RoundWork,
    global: &[u8],
    compressor: &mut Compressor,
    round: u64,
) -> Result<SiteReport, TrainingError> {
    let started = Instant::now();
    let failed = |source: LocalTrainingError| TrainingError::Local {
        site: site.to_string(),
        source: Box::new(source),
    };
    let (delta, samples, loss) = if work.echo {
        let global = Weights::from_safetensors(global, site).map_err(|e| failed(e.into()))?;
        (vec![0f32; global.parameters()], windows.len() as u64, None)
    } else {
        tch::set_num_threads(1);
        let update = train_locally(
            architecture,
            global,
            windows,
            &work.local,
            round,
            tch::Device::cuda_if_available(),
        )
        .map_err(failed)?;
        (update.delta, update.samples, Some(update.loss))
    };
    Ok(SiteReport {
        site: site.clone(),
        round,
        update: compressor.compress(&delta),
        samples,
        loss,
        compute: started.elapsed(),
    })
}
