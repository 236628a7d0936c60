//! `fogmesh train`: one model of the zoo trained on its data set, evaluated with the
//! set's standard metric and stored as a new version (`fogmesh_zoo::train`). Progress
//! bar and evaluation table on stderr, the outcome as one JSON object on stdout.

use std::path::PathBuf;

use anyhow::Context;
use clap::ValueEnum;
use fogmesh_zoo::train::{ModelChoice, TrainRequest, TrainingOutcome};

use crate::task::{blocking, print_json};

#[derive(clap::Args)]
pub struct TrainArgs {
    #[arg(long, value_enum)]
    model: TrainModel,
    /// The data: `data/tep` for the time-series and multimodal models, the notes
    /// file for the language model, `data/elpv` for the vision model.
    #[arg(long)]
    data: PathBuf,
    /// The model store that receives the trained version.
    #[arg(long, default_value = "data/models")]
    store: PathBuf,
    /// Store name (default: one per model, e.g. `tep-diagnosis`).
    #[arg(long)]
    name: Option<String>,
    /// Store version (default: one more than the newest whole-number version).
    #[arg(long)]
    version: Option<String>,
    /// Upper bound on epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Epochs without a better validation loss before stopping.
    #[arg(long)]
    patience: Option<usize>,
    /// Fixes initialisation, split and batch order.
    #[arg(long)]
    seed: Option<i64>,
    /// Wall-clock budget for training, in seconds.
    #[arg(long)]
    max_seconds: Option<f64>,
    /// The MiniLM folder `just setup` exports (models that read text).
    #[arg(long, default_value = "data/minilm")]
    minilm: PathBuf,
    /// The labelled operator notes (models that read them).
    #[arg(long, default_value = "models/data/tep_operator_notes.tsv")]
    notes: PathBuf,
    /// libtorch intra-op threads. One by default: on a fog node the serving experts
    /// share the cores, and on two busy cores more threads only wait on each other.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum TrainModel {
    /// Convolutional autoencoder: anomaly detection (time series).
    Autoencoder,
    /// Temporal convolution network: forecasting, its error an anomaly score.
    Forecaster,
    /// Convolutional fault classifier: diagnosis (which fault).
    Classifier,
    /// Operator notes and alarm texts to fault classes (`--data` the notes file).
    Language,
    /// Sensor window + operator note fused into one diagnosis (needs `--notes`, `--minilm`).
    Multimodal,
    /// Defect CNN on solar-cell electroluminescence images (`--data data/elpv`).
    Vision,
}

pub async fn run(args: TrainArgs) -> anyhow::Result<()> {
    let model = match args.model {
        TrainModel::Autoencoder => ModelChoice::Autoencoder,
        TrainModel::Forecaster => ModelChoice::Forecaster,
        TrainModel::Classifier => ModelChoice::Classifier,
        TrainModel::Language => ModelChoice::Language,
        TrainModel::Multimodal => ModelChoice::Multimodal,
        TrainModel::Vision => ModelChoice::Vision,
    };
    let mut options = model.default_options();
    options.epochs = args.epochs.unwrap_or(options.epochs);
    options.patience = args.patience.unwrap_or(options.patience);
    options.seed = args.seed.unwrap_or(options.seed);
    options.max_seconds = args.max_seconds.or(options.max_seconds);
    let request = TrainRequest {
        model,
        data: args.data,
        store: args.store,
        name: args.name,
        version: args.version,
        options,
        minilm: args.minilm,
        notes: args.notes,
        threads: args.threads,
    };
    let outcome = blocking("training", move || train(&request)).await?;
    print_json(&outcome)
}

/// Runs `fogmesh train` with a progress bar (epoch, losses, samples/s, ETA) on stderr and
/// a table of the evaluation after it.
fn train(request: &TrainRequest) -> anyhow::Result<TrainingOutcome> {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = ProgressBar::new(request.options.epochs as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:28}] epoch {pos}/{len} {msg} ETA {eta}")
            .context("the progress bar template")?
            .progress_chars("=> "),
    );
    bar.set_prefix(request.model.default_name());
    let outcome = fogmesh_zoo::train::run(request, &mut |epoch| {
        bar.set_length(epoch.epochs as u64);
        bar.set_position(epoch.epoch as u64);
        bar.set_message(format!(
            "loss {:.4} val {:.4} {:.0} samples/s",
            epoch.train_loss, epoch.validation_loss, epoch.samples_per_s
        ));
    });
    bar.finish_and_clear();
    let outcome = outcome.with_context(|| {
        format!(
            "training {} on {}",
            request.model.default_name(),
            request.data.display()
        )
    })?;
    let t = &outcome.training;
    eprintln!(
        "stored        {} ({})",
        outcome.model,
        outcome.store.display()
    );
    eprintln!(
        "trained       {} epochs (best {}), {:.0} samples/s, {:.1} s{}",
        t.epochs_run,
        t.best_epoch,
        t.samples_per_s,
        t.elapsed_s,
        if t.stopped_early {
            ", stopped early"
        } else {
            ""
        }
    );
    for (metric, value) in &outcome.metrics {
        let mark = if metric == outcome.metric {
            " <- standard metric"
        } else {
            ""
        };
        eprintln!("{metric:<28} {value:>10.4}{mark}");
    }
    if let Some(published) = &outcome.published {
        eprintln!(
            "published     {} {:.4} ({})",
            published.model, published.score, published.source
        );
    }
    Ok(outcome)
}
