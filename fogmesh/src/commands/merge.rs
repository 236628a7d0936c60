//! `fogmesh merge`: stored versions of one network folded into a new stored version
//! through a `Merger` actor spawned for the one request. Each method takes only its own
//! parameters; a flag for another method is refused rather than silently ignored.

use std::path::PathBuf;

use anyhow::Context;
use clap::ValueEnum;

/// `fogmesh merge`'s flags. Each method takes only its own parameters: a flag another
/// method takes is refused rather than silently ignored.
#[derive(clap::Args)]
pub struct MergeFlags {
    /// The model store the versions are read from and the merge is stored in.
    #[arg(long, default_value = "data/models")]
    store: PathBuf,
    #[arg(long, value_enum)]
    method: MergeMethodName,
    /// The versions merged, NAME@VERSION (NAME alone: its newest), in the order
    /// `--weights` and slerp's `--t` refer to.
    #[arg(required = true, value_name = "MODEL")]
    models: Vec<String>,
    /// The version the deltas are taken from (task_arithmetic, ties, dare).
    #[arg(long, value_name = "ID")]
    base: Option<String>,
    /// weighted_average: one weight per model, comma-separated (default: equal).
    #[arg(long, value_delimiter = ',')]
    weights: Option<Vec<f64>>,
    /// task_arithmetic, ties, dare: the factor on the merged delta (default 1).
    #[arg(long)]
    scale: Option<f64>,
    /// ties: the share of each delta's largest magnitudes kept, in (0, 1] (default 0.5).
    #[arg(long)]
    density: Option<f64>,
    /// dare: the probability of dropping each delta element, in [0, 1) (default 0.5).
    #[arg(long)]
    drop_rate: Option<f64>,
    /// dare: fixes which elements are dropped (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// slerp: 0 gives the first model, 1 the second (default 0.5).
    #[arg(long)]
    t: Option<f64>,
    /// The merged version's name (default: the first model's).
    #[arg(long)]
    name: Option<String>,
    /// Its version (default: one more than the newest whole-number version of the name).
    #[arg(long)]
    version: Option<String>,
    /// The MiniLM folder `just setup` exports: merged language and multimodal models
    /// are loaded with it to prove they serve.
    #[arg(long, default_value = "data/minilm")]
    minilm: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum MergeMethodName {
    #[value(name = "weighted_average")]
    WeightedAverage,
    #[value(name = "task_arithmetic")]
    TaskArithmetic,
    Ties,
    Dare,
    Slerp,
}

/// The method `flags` ask for, with each parameter's default; a parameter flag the
/// method does not take, or a value the method refuses, is an error naming the flag.
fn merge_method(flags: &MergeFlags) -> anyhow::Result<fogmesh_models::merge::MergeMethod> {
    use fogmesh_models::merge::{MergeError, MergeMethod};
    let scale = flags.scale.unwrap_or(1.0);
    let (method, takes): (MergeMethod, &[&str]) = match flags.method {
        MergeMethodName::WeightedAverage => (
            MergeMethod::WeightedAverage {
                weights: flags
                    .weights
                    .clone()
                    .unwrap_or_else(|| vec![1.0; flags.models.len()]),
            },
            &["--weights"],
        ),
        MergeMethodName::TaskArithmetic => (MergeMethod::TaskArithmetic { scale }, &["--scale"]),
        MergeMethodName::Ties => (
            MergeMethod::Ties {
                density: flags.density.unwrap_or(0.5),
                scale,
            },
            &["--density", "--scale"],
        ),
        MergeMethodName::Dare => (
            MergeMethod::Dare {
                drop_rate: flags.drop_rate.unwrap_or(0.5),
                seed: flags.seed.unwrap_or(0),
                scale,
            },
            &["--drop-rate", "--seed", "--scale"],
        ),
        MergeMethodName::Slerp => (
            MergeMethod::Slerp {
                t: flags.t.unwrap_or(0.5),
            },
            &["--t"],
        ),
    };
    let given = [
        ("--weights", flags.weights.is_some()),
        ("--scale", flags.scale.is_some()),
        ("--density", flags.density.is_some()),
        ("--drop-rate", flags.drop_rate.is_some()),
        ("--seed", flags.seed.is_some()),
        ("--t", flags.t.is_some()),
    ];
    if let Some((flag, _)) = given
        .iter()
        .find(|(flag, given)| *given && !takes.contains(flag))
    {
        anyhow::bail!(
            "{flag}: {} does not take it (it takes {})",
            method.name(),
            takes.join(", ")
        );
    }
    // The library names its fields (`drop_rate`, `weights[1]`); the user typed flags.
    method
        .validate(flags.base.is_some(), flags.models.len())
        .map_err(|err| match &err {
            MergeError::InvalidParameter { field, .. } if field == "models" => {
                anyhow::anyhow!("MODEL: {err}")
            }
            MergeError::InvalidParameter { field, .. } => {
                let flag = field.split('[').next().unwrap_or(field).replace('_', "-");
                anyhow::anyhow!("--{flag}: {err}")
            }
            _ => anyhow::Error::new(err),
        })?;
    Ok(method)
}

/// `fogmesh merge`: one request to a `Merger` actor spawned for it.
pub async fn run(flags: MergeFlags) -> anyhow::Result<()> {
    use fogmesh_actors::{MergeRequest, Merger, MergerArgs, MergerMsg, MergerShared};
    use ractor::rpc::CallResult;
    let method = merge_method(&flags)?;
    let name = match (&flags.name, flags.models.first()) {
        (Some(name), _) => name.clone(),
        (None, Some(first)) => fogmesh_models::store::parse_id(first).0.to_string(),
        (None, None) => anyhow::bail!("MODEL: name at least one stored version to merge"),
    };
    let store = flags.store;
    let (merger, stopped) = ractor::Actor::spawn(
        None,
        Merger,
        MergerArgs {
            store: fogmesh_models::store::ModelStore::open(&store),
            assets: fogmesh_models::served::Assets {
                minilm: Some(flags.minilm),
            },
            // Nothing else runs in this process: the merge may use every core.
            merge_threads: fogmesh_models::merge::default_threads(),
            shared: std::sync::Arc::new(MergerShared::default()),
        },
    )
    .await
    .context("starting the merger")?;
    let method_name = method.name();
    let request = MergeRequest {
        inputs: flags.models,
        base: flags.base,
        method,
        name,
        version: flags.version,
        incumbent: None,
        validation: None,
    };
    let answer = merger
        .call(|reply| MergerMsg::Merge { request, reply }, None)
        .await
        .context("asking the merger")?;
    merger.stop(None);
    stopped.await.context("stopping the merger")?;
    let outcome = match answer {
        CallResult::Success(outcome) => {
            outcome.with_context(|| format!("merging in the store {}", store.display()))?
        }
        CallResult::Timeout | CallResult::SenderError => {
            anyhow::bail!("the merger stopped before it answered")
        }
    };
    let merged = &outcome.manifest;
    eprintln!(
        "stored {} ({}) by {method_name} of {}, unvalidated",
        merged.id(),
        store.display(),
        merged.parents.join(", ")
    );
    println!(
        "{}",
        serde_json::json!({
            "model": merged.id(),
            "method": method_name,
            "parents": merged.parents,
            "weights_sha256": merged.weights_sha256,
            "validated": outcome.validated(),
        })
    );
    Ok(())
}
