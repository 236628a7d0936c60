//! Hot swap of an expert's model under load: no request fails, every verdict names the
//! version that computed it and has exactly that version's score (no window is scored
//! by a half-installed model), a request sent after the swap answered is served by the
//! new version, and a version that cannot serve (other window shape, weights that do
//! not match their hash) is refused while the old one keeps serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_actors::expert::{ExpertArgs, ExpertShared};
use fogmesh_actors::{
    BatchingSpec, Expert, ExpertMsg, ExpertSpec, ExpertVerdict, InferRequest, LoadError,
    ModelSource, ScoreError, SwapError,
};
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder};
use ractor::{Actor, ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

const CHANNELS: i64 = 3;
const LENGTH: i64 = 16;

/// Version `vK` is the autoencoder seeded with K.
fn spec(seed: i64) -> ExpertSpec {
    ExpertSpec {
        name: "pump-ae".into(),
        model_version: format!("v{seed}"),
        config: AutoencoderConfig::w1(CHANNELS, LENGTH),
        threshold: Some(1.0),
        batching: BatchingSpec {
            max_batch: 8,
            max_wait_us: 500,
        },
        intra_op_threads: 1,
        source: ModelSource::seeded(seed),
    }
}

fn window(k: usize) -> Arc<[f32]> {
    (0..(CHANNELS * LENGTH) as usize)
        .map(|i| ((i * 5 + k * 11) % 23) as f32 / 23.0 - 0.5)
        .collect()
}

async fn infer(
    actor: &ActorRef<ExpertMsg>,
    values: Arc<[f32]>,
) -> Result<ExpertVerdict, ScoreError> {
    let (tx, rx) = oneshot::channel();
    actor
        .cast(ExpertMsg::Infer(InferRequest {
            values,
            enqueued: Instant::now(),
            reply: RpcReplyPort::from(tx),
        }))
        .expect("the expert takes requests");
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("answered")
        .expect("the reply port stays open")
}

async fn swap(actor: &ActorRef<ExpertMsg>, spec: ExpertSpec) -> Result<Arc<str>, SwapError> {
    let (tx, rx) = oneshot::channel();
    actor
        .cast(ExpertMsg::Swap {
            spec: Box::new(spec),
            reply: RpcReplyPort::from(tx),
        })
        .expect("the expert takes swaps");
    rx.await.expect("the swap is answered")
}

async fn start() -> (ActorRef<ExpertMsg>, Arc<ExpertShared>) {
    let first = spec(1);
    let shared = ExpertShared::for_spec(&first);
    let (actor, _) = Actor::spawn(
        None,
        Expert,
        ExpertArgs {
            spec: first,
            shared: shared.clone(),
        },
    )
    .await
    .expect("the expert starts");
    (actor, shared)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_swap_under_load_without_a_failed_or_mixed_request() {
    let (actor, shared) = start().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for lane in 0..4 {
        let actor = actor.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut k = lane;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let verdict = infer(&actor, window(k % 32)).await;
                seen.push((k % 32, verdict));
                k += 4;
            }
            seen
        }));
    }
    // Swaps happen while windows flow: each waits for the load to have moved on.
    let progress = |shared: &ExpertShared| {
        shared
            .windows_scored
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let until_scored = |target: u64| {
        let shared = shared.clone();
        async move {
            while progress(&shared) < target {
                tokio::task::yield_now().await;
            }
        }
    };
    for seed in 2..=6 {
        until_scored(progress(&shared) + 20).await;
        let version = swap(&actor, spec(seed))
            .await
            .expect("a valid version swaps in");
        assert_eq!(&*version, format!("v{seed}"));
        // Sent after the swap was answered: the new version serves it.
        let after = infer(&actor, window(0)).await.expect("scored");
        assert_eq!(&*after.model_version, format!("v{seed}"));
    }
    until_scored(progress(&shared) + 20).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let references: Vec<ConvAutoencoder> = (0..=6)
        .map(|seed| {
            ConvAutoencoder::new(
                AutoencoderConfig::w1(CHANNELS, LENGTH),
                tch::Device::Cpu,
                seed,
            )
            .unwrap()
        })
        .collect();
    let mut versions = std::collections::BTreeSet::new();
    let mut total = 0;
    for lane in load {
        for (k, verdict) in lane.await.unwrap() {
            let verdict = verdict.expect("no request fails during swaps");
            let seed: usize = verdict.model_version[1..].parse().unwrap();
            let expected = references[seed].score(&window(k)).unwrap()[0];
            assert!(
                (verdict.score - expected).abs() <= 1e-4 * expected.abs().max(1e-3),
                "window {k} scored {} under {}, which gives {expected}",
                verdict.score,
                verdict.model_version
            );
            versions.insert(seed);
            total += 1;
        }
    }
    assert!(total > 50, "{total} requests under load");
    assert!(
        versions.len() >= 3,
        "the load saw the versions change: {versions:?}"
    );
    assert_eq!(&*shared.model_version(), "v6");
    assert_eq!(shared.swaps.load(std::sync::atomic::Ordering::Relaxed), 5);
    actor.stop(None);
}

#[tokio::test]
async fn a_version_that_cannot_serve_is_refused_and_the_old_one_keeps_serving() {
    let (actor, shared) = start().await;
    let mut wider = spec(2);
    wider.config = AutoencoderConfig::w1(CHANNELS, LENGTH * 2);
    let refused = swap(&actor, wider).await.unwrap_err();
    assert!(
        matches!(refused, SwapError::WindowShape { .. }),
        "{refused}"
    );
    let refused = refused.to_string();
    assert!(
        refused.contains("v2") && refused.contains("96"),
        "{refused}"
    );

    let trained =
        ConvAutoencoder::new(AutoencoderConfig::w1(CHANNELS, LENGTH), tch::Device::Cpu, 3).unwrap();
    let (bytes, _) = trained.to_safetensors().unwrap();
    let mut tampered = spec(3);
    tampered.source = ModelSource::Autoencoder {
        weights: Some(bytes.into()),
        weights_sha256: Some("00".repeat(32)),
        seed: 3,
    };
    let refused = swap(&actor, tampered).await.unwrap_err();
    // The model's own error comes with the refusal, not only its text.
    assert!(
        matches!(
            refused,
            SwapError::Load {
                source: LoadError::Autoencoder(_),
                ..
            }
        ),
        "{refused:?}"
    );
    let refused = refused.to_string();
    assert!(refused.contains("sha256"), "{refused}");

    let verdict = infer(&actor, window(1)).await.expect("still serving");
    assert_eq!(&*verdict.model_version, "v1");
    assert_eq!(&*shared.model_version(), "v1");
    assert_eq!(shared.swaps.load(std::sync::atomic::Ordering::Relaxed), 0);
    actor.stop(None);
}
