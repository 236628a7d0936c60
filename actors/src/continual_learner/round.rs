//! One learning round, run apart from the learner so its mailbox never waits: a share
//! of the new and of the old windows is held out, a shadow copy of the serving version
//! is fine-tuned with replay and EWC on a blocking thread with one libtorch thread,
//! incumbent and candidate are evaluated on both held-out sets and the gate judges. A
//! promoted candidate is stored as the next version and handed to the [`Promoter`]; a
//! refused one stores nothing, and a failure at any step leaves the serving version as
//! it was.

use std::collections::BTreeMap;
use std::sync::Arc;

use fogmesh_models::continual::{evaluate, fine_tune, GateReport, ReplayItem};
use fogmesh_models::store::{Manifest, ModelStore};
use fogmesh_models::{ModelError, SplitMix64};
use ractor::RpcReplyPort;

use super::promoter::Promoter;
use super::shared::{
    ContinualLearnerShared, DriftEvent, FineTuneFailure, LearnerError, Phase, RoundReport,
    StoreFailure, Trigger,
};
use super::spec::LearningSpec;

/// The fewest old-regime windows a round needs: one to hold out, one to replay.
pub const MIN_OLD_WINDOWS: usize = 2;

/// How a round ended, on its way back to the learner.
pub struct RoundDone {
    pub(super) outcome: Result<Completed, LearnerError>,
    pub(super) reply: Option<RpcReplyPort<Result<RoundReport, LearnerError>>>,
}

pub(super) struct Completed {
    pub(super) report: RoundReport,
    /// The promoted version, now serving.
    pub(super) promoted: Option<Arc<Serving>>,
}

/// The version the expert serves, as the learner fine-tunes it.
pub(super) struct Serving {
    /// `name@version`, as verdicts name it.
    pub(super) id: String,
    manifest: Manifest,
    weights: Arc<[u8]>,
}

impl Serving {
    pub(super) fn new(manifest: Manifest, weights: Arc<[u8]>) -> Arc<Serving> {
        Arc::new(Serving {
            id: manifest.id(),
            manifest,
            weights,
        })
    }
}

/// Everything a round needs, owned, so it runs apart from the learner.
pub(super) struct RoundInput {
    pub(super) round: u64,
    pub(super) trigger: Trigger,
    pub(super) expert: Arc<str>,
    pub(super) serving: Arc<Serving>,
    pub(super) new: Vec<ReplayItem>,
    pub(super) old: Vec<ReplayItem>,
    pub(super) spec: LearningSpec,
    pub(super) store: ModelStore,
    pub(super) promoter: Arc<dyn Promoter>,
    pub(super) shared: Arc<ContinualLearnerShared>,
    pub(super) drift: Option<DriftEvent>,
}

/// Splits `items` into (train, holdout): `share` of them (at least one, leaving at
/// least one) held out from the end. New windows come in arrival order and are split
/// as they are: consecutive windows overlap, so a random pick would validate on
/// near-copies of training windows. The reservoir, already a random sample, is shuffled
/// first (`shuffle_seed`).
fn split(
    mut items: Vec<ReplayItem>,
    share: f64,
    shuffle_seed: Option<u64>,
) -> (Vec<ReplayItem>, Vec<ReplayItem>) {
    if let Some(seed) = shuffle_seed {
        let mut rng = SplitMix64::new(seed);
        for i in (1..items.len()).rev() {
            // Lemire's multiply-shift: uniform in 0..=i.
            let j = ((u128::from(rng.next_u64()) * (i as u128 + 1)) >> 64) as usize;
            items.swap(i, j);
        }
    }
    let held = ((items.len() as f64 * share).round() as usize).clamp(1, items.len().max(2) - 1);
    let holdout = items.split_off(items.len() - held);
    (items, holdout)
}

/// What the blocking part of a round hands back.
struct Tuned {
    weights: Vec<u8>,
    sha256: String,
    metrics: BTreeMap<String, f64>,
    steps: usize,
    elapsed_s: f64,
    gate: GateReport,
}

pub(super) async fn run_round(input: RoundInput) -> Result<Completed, LearnerError> {
    let incumbent = input.serving.id.clone();
    let seed = input.spec.seed ^ input.round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (new_train, new_holdout) = split(input.new, input.spec.holdout, None);
    let (replay, old_holdout) = split(input.old, input.spec.holdout, Some(seed));
    let labelled = new_train.iter().filter(|i| i.label.is_some()).count();
    let sizes = (
        new_train.len(),
        new_holdout.len(),
        replay.len(),
        old_holdout.len(),
    );
    let failed = |source| LearnerError::FineTune {
        expert: input.expert.to_string(),
        incumbent: incumbent.clone(),
        source,
    };
    let serving = input.serving.clone();
    let options = input.spec.fine_tune.clone();
    let gate = input.spec.gate.clone();
    let shared = input.shared.clone();
    let tuned = tokio::task::spawn_blocking(move || -> Result<Tuned, ModelError> {
        // libtorch's intra-op thread count is per calling thread: one here, as on the
        // expert threads, so training does not take the cores serving needs.
        tch::set_num_threads(1);
        let device = fogmesh_models::default_device();
        let manifest = &serving.manifest;
        let tuned = fine_tune(
            manifest,
            &serving.weights,
            &new_train,
            &replay,
            &options,
            device,
        )?;
        shared.set_phase(Phase::Validating);
        // Loading checks the weights against the manifest's hash: the candidate's
        // manifest differs from the incumbent's in exactly that.
        let candidate = Manifest {
            weights_sha256: tuned.sha256.clone(),
            weights_bytes: tuned.weights.len() as u64,
            ..manifest.clone()
        };
        let loss = |manifest: &Manifest, weights: &[u8], items: &[ReplayItem]| {
            evaluate(manifest, weights, items, device)
        };
        let old_before = loss(manifest, &serving.weights, &old_holdout)?;
        let old_after = loss(&candidate, &tuned.weights, &old_holdout)?;
        let new_before = loss(manifest, &serving.weights, &new_holdout)?;
        let new_after = loss(&candidate, &tuned.weights, &new_holdout)?;
        let report = gate.judge(old_before, old_after, new_before, new_after);
        Ok(Tuned {
            weights: tuned.weights,
            sha256: tuned.sha256,
            metrics: tuned.metrics,
            steps: tuned.steps,
            elapsed_s: tuned.elapsed_s,
            gate: report,
        })
    })
    .await
    .map_err(|e| failed(FineTuneFailure::Thread(Arc::new(e))))?
    .map_err(|e| failed(FineTuneFailure::Model(Arc::new(e))))?;

    let mut report = RoundReport {
        round: input.round,
        trigger: input.trigger,
        incumbent: incumbent.clone(),
        promoted: None,
        gate: tuned.gate.clone(),
        new_windows: sizes.0,
        new_holdout: sizes.1,
        replay_windows: sizes.2,
        old_holdout: sizes.3,
        steps: tuned.steps,
        fine_tune_s: tuned.elapsed_s,
    };
    if !tuned.gate.promote {
        return Ok(Completed {
            report,
            promoted: None,
        });
    }

    input.shared.set_phase(Phase::Promoting);
    let parent = &input.serving.manifest;
    let mut metrics = tuned.metrics;
    for (name, value) in [
        ("gate_old_before", tuned.gate.old_before),
        ("gate_old_after", tuned.gate.old_after),
        ("gate_new_before", tuned.gate.new_before),
        ("gate_new_after", tuned.gate.new_after),
    ] {
        metrics.insert(name.to_string(), value);
    }
    let training = serde_json::json!({
        "continual": {
            "expert": &*input.expert,
            "round": input.round,
            "trigger": input.trigger,
            "incumbent": &incumbent,
            "new_windows": { "train": sizes.0, "holdout": sizes.1, "labelled": labelled },
            "old_windows": { "replay": sizes.2, "holdout": sizes.3 },
            "drift": input.drift,
            "options": input.spec.fine_tune,
            "gate": input.spec.gate,
            "gate_report": tuned.gate,
            "steps": tuned.steps,
            "elapsed_s": tuned.elapsed_s,
        }
    });
    let candidate = Manifest {
        name: parent.name.clone(),
        version: String::new(),
        kind: parent.kind,
        architecture: parent.architecture.clone(),
        hyper: parent.hyper.clone(),
        input: parent.input.clone(),
        training,
        metrics,
        parents: vec![incumbent.clone()],
        weights_sha256: tuned.sha256,
        weights_bytes: tuned.weights.len() as u64,
        created_us: 0,
    };
    let store = input.store.clone();
    let weights: Arc<[u8]> = tuned.weights.into();
    let bytes = weights.clone();
    let serving = input.serving.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let mut candidate = candidate;
        let incumbent = &serving.manifest;
        candidate.version = store
            .next_version(&incumbent.name, Some(&incumbent.version))
            .map_err(|e| (format!("{}@?", candidate.name), e))?;
        let id = candidate.id();
        store.import(candidate, &bytes).map_err(|e| (id, e))
    })
    .await
    .map_err(|e| LearnerError::Store {
        expert: input.expert.to_string(),
        candidate: format!("{}@?", parent.name),
        source: StoreFailure::Thread(Arc::new(e)),
    })?
    .map_err(|(candidate, e)| LearnerError::Store {
        expert: input.expert.to_string(),
        candidate,
        source: StoreFailure::Store(Arc::new(e)),
    })?;
    let candidate = stored.id();
    tracing::info!(expert = %input.expert, %candidate, parent = %incumbent, "candidate stored; promoting it");
    // Said before the promotion starts: a mesh rollout commits the spec naming the
    // candidate before this round ends, and whoever compares that spec with the
    // learner must see the candidate as the learner's own, not someone else's.
    input.shared.set_promoting(Some(&candidate));
    let promotion = input.promoter.promote(&input.expert, &stored).await;
    input.shared.set_promoting(None);
    promotion.map_err(|source| LearnerError::Promote {
        expert: input.expert.to_string(),
        candidate: candidate.clone(),
        incumbent: incumbent.clone(),
        source,
    })?;
    report.promoted = Some(candidate);
    Ok(Completed {
        report,
        promoted: Some(Serving::new(stored, weights)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: usize) -> ReplayItem {
        ReplayItem {
            window: vec![i as f32],
            label: None,
        }
    }

    #[test]
    fn new_windows_are_held_out_from_the_end_and_every_split_keeps_both_sides() {
        let (train, holdout) = split((0..8).map(item).collect(), 0.25, None);
        assert_eq!(train, (0..6).map(item).collect::<Vec<_>>());
        assert_eq!(holdout, (6..8).map(item).collect::<Vec<_>>());
        for n in 2..10 {
            for share in [0.01, 0.5, 0.99] {
                let (train, holdout) = split((0..n).map(item).collect(), share, Some(3));
                assert!(!train.is_empty() && !holdout.is_empty(), "{n} at {share}");
                assert_eq!(train.len() + holdout.len(), n);
            }
        }
        let (mut train, holdout) = split((0..50).map(item).collect(), 0.2, Some(3));
        train.extend(holdout);
        assert_ne!(train, (0..50).map(item).collect::<Vec<_>>(), "shuffled");
    }
}
