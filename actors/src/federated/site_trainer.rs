//! `SiteTrainer`: one site of a federated round.
//!
//! **Owns** the site's training windows (they never leave it), the local-work settings
//! and the [`Compressor`] whose residual carries what earlier rounds' encodings left
//! out (error feedback). **Takes** [`SiteTrainerMsg::Train`]: the round's global
//! weights (safetensors bytes), answered with a [`SiteReport`]: the encoded
//! difference between the weights after its local work and the global ones, the
//! number of windows it trained on, its training loss and how long the work took.
//! Only that report leaves the site. **Supervised by** whoever coordinates the rounds
//! (the W2 benchmark today). **On failure**: global weights that do not load into the
//! site's network, or a training error, are answered as [`TrainingError`]; the actor
//! keeps its windows and takes the next round.
//!
//! Local work runs on a blocking thread with one libtorch intra-op thread, so a site
//! never holds up the async runtime and many sites share the cores fairly. With
//! [`LocalWork::echo`] a site sends back a zero update without training: a round then
//! measures only dispatch, encoding and aggregation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_models::federated::{Compression, Compressor, EncodedUpdate};
use fogmesh_models::merge::{MergeError, Weights};
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder, ModelError, TrainOptions};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

/// What a site does with the global weights each round.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalWork {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Send a zero update without training (W2's `--local-work none`).
    pub echo: bool,
    pub compression: Compression,
    /// Fixes the batch order of every round.
    pub seed: i64,
}

impl Default for LocalWork {
    /// W2's local work: one epoch, batches of 32, Adam at 1e-3, no compression.
    fn default() -> Self {
        LocalWork {
            epochs: 1,
            batch_size: 32,
            learning_rate: 1e-3,
            echo: false,
            compression: Compression::None,
            seed: 7,
        }
    }
}

pub struct SiteTrainerArgs {
    pub site: String,
    pub config: AutoencoderConfig,
    /// The site's windows, `[windows, channels, length]` flattened (the layout
    /// [`ConvAutoencoder::fit`] takes).
    pub windows: Vec<f32>,
    pub work: LocalWork,
}

pub struct SiteTrainerState {
    site: Arc<str>,
    config: AutoencoderConfig,
    windows: Arc<Vec<f32>>,
    work: LocalWork,
    compressor: Option<Compressor>,
}

/// What a site sends back for a round.
#[derive(Debug, Clone)]
pub struct SiteReport {
    pub site: Arc<str>,
    pub round: u64,
    pub update: EncodedUpdate,
    /// Windows the site trained on: FedAvg's weight.
    pub samples: u64,
    /// The mean training loss of the site's last epoch (`None` for an echo).
    pub loss: Option<f64>,
    /// The local work alone, without waiting for the thread.
    pub compute: Duration,
}

/// Why a site could not do its part of a round.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error("site `{site}`: the global weights do not load into its network: {source}")]
    Weights {
        site: String,
        #[source]
        source: ModelError,
    },
    #[error("site `{site}`: its weights cannot be read back: {source}")]
    Export {
        site: String,
        #[source]
        source: Box<MergeError>,
    },
    #[error("site `{site}`: local training failed: {source}")]
    Training {
        site: String,
        #[source]
        source: ModelError,
    },
    #[error("site `{site}`: its training thread stopped: {source}")]
    Thread {
        site: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

pub enum SiteTrainerMsg {
    Train {
        round: u64,
        /// The global weights, safetensors.
        global: Arc<Vec<u8>>,
        reply: RpcReplyPort<Result<SiteReport, TrainingError>>,
    },
}

// Local for now: global weights reach a site on another node through the model store.
impl ractor::Message for SiteTrainerMsg {}

pub struct SiteTrainer;

impl Actor for SiteTrainer {
    type Msg = SiteTrainerMsg;
    type State = SiteTrainerState;
    type Arguments = SiteTrainerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SiteTrainerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SiteTrainerState {
            site: args.site.as_str().into(),
            config: args.config,
            windows: Arc::new(args.windows),
            compressor: Some(Compressor::new(args.work.compression)),
            work: args.work,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let SiteTrainerMsg::Train {
            round,
            global,
            reply,
        } = message;
        let site = state.site.clone();
        let (config, windows, work) = (
            state.config.clone(),
            state.windows.clone(),
            state.work.clone(),
        );
        let mut compressor = state
            .compressor
            .take()
            .unwrap_or_else(|| Compressor::new(work.compression));
        let work_once = move |compressor: &mut Compressor| {
            local_work(&site, config, &windows, &work, &global, compressor, round)
        };
        // An echo trains nothing: no thread for it.
        let done = if state.work.echo {
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

/// One round's work on the site's thread.
fn local_work(
    site: &Arc<str>,
    config: AutoencoderConfig,
    windows: &[f32],
    work: &LocalWork,
    global: &[u8],
    compressor: &mut Compressor,
    round: u64,
) -> Result<SiteReport, TrainingError> {
    let started = Instant::now();
    let export_error = |source| TrainingError::Export {
        site: site.to_string(),
        source: Box::new(source),
    };
    let samples = (windows.len() / config.window_len().max(1)) as u64;
    let before = Weights::from_safetensors(global, site).map_err(export_error)?;
    let (delta, loss) = if work.echo {
        (vec![0f32; before.parameters()], None)
    } else {
        tch::set_num_threads(1);
        let weights_error = |source| TrainingError::Weights {
            site: site.to_string(),
            source,
        };
        let mut model = ConvAutoencoder::from_safetensors(
            config,
            global,
            None,
            tch::Device::cuda_if_available(),
        )
        .map_err(weights_error)?;
        let options = TrainOptions {
            epochs: work.epochs,
            batch_size: work.batch_size,
            learning_rate: work.learning_rate,
            validation_fraction: 0.0,
            patience: work.epochs.max(1),
            seed: work.seed.wrapping_add(round as i64),
            max_seconds: None,
        };
        let mut last_loss = None;
        model
            .fit(windows, &options, &mut |epoch| {
                last_loss = Some(epoch.train_loss)
            })
            .map_err(|source| TrainingError::Training {
                site: site.to_string(),
                source,
            })?;
        let (bytes, _) = model.to_safetensors().map_err(weights_error)?;
        let after = Weights::from_safetensors(&bytes, site).map_err(export_error)?;
        let delta = after
            .values()
            .iter()
            .zip(before.values())
            .map(|(a, b)| a - b)
            .collect();
        (delta, last_loss)
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
