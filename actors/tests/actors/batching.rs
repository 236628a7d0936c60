//! The expert's batching contract, observed from outside: a full batch goes at once, a
//! lone window waits no longer than `max_wait`, and every caller gets the score of its
//! own window.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fogmesh_actors::expert::{ExpertArgs, ExpertShared, MAX_QUEUED_WINDOWS};
use fogmesh_actors::{
    BatchingSpec, Expert, ExpertMsg, ExpertSpec, ExpertVerdict, InferRequest, ModelSource,
    ScoreError,
};
use fogmesh_models::{AutoencoderConfig, ConvAutoencoder};
use ractor::{Actor, ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

const CHANNELS: i64 = 4;
const LENGTH: i64 = 16;
const SEED: i64 = 11;

fn spec(max_batch: usize, max_wait: Duration) -> ExpertSpec {
    ExpertSpec {
        name: "pump-ae".into(),
        model_version: "v1".into(),
        config: AutoencoderConfig::w1(CHANNELS, LENGTH),
        threshold: Some(1.0),
        batching: BatchingSpec {
            max_batch,
            max_wait_us: max_wait.as_micros() as u64,
        },
        intra_op_threads: 1,
        source: ModelSource::seeded(SEED),
    }
}

async fn start(spec: ExpertSpec) -> ActorRef<ExpertMsg> {
    let shared = ExpertShared::for_spec(&spec);
    let (actor, _) = Actor::spawn(None, Expert, ExpertArgs { spec, shared })
        .await
        .expect("expert starts");
    actor
}

fn window(k: usize) -> Arc<[f32]> {
    (0..(CHANNELS * LENGTH) as usize)
        .map(|i| ((i * 7 + k * 13) % 17) as f32 / 17.0 - 0.5 + k as f32 * 0.1)
        .collect()
}

fn send(
    actor: &ActorRef<ExpertMsg>,
    values: Arc<[f32]>,
) -> oneshot::Receiver<Result<ExpertVerdict, ScoreError>> {
    let (tx, rx) = oneshot::channel();
    actor
        .cast(ExpertMsg::Infer(InferRequest {
            values,
            enqueued: Instant::now(),
            reply: RpcReplyPort::from(tx),
        }))
        .expect("expert takes requests");
    rx
}

#[tokio::test]
async fn full_batches_leave_at_once_and_answers_reach_their_callers() {
    // max_wait of a minute: if a full batch waited for it, the test would time out.
    let actor = start(spec(8, Duration::from_secs(60))).await;
    let windows: Vec<Arc<[f32]>> = (0..16).map(window).collect();
    let pending: Vec<_> = windows.iter().map(|w| send(&actor, w.clone())).collect();
    let reference = ConvAutoencoder::new(
        AutoencoderConfig::w1(CHANNELS, LENGTH),
        tch::Device::Cpu,
        SEED,
    )
    .unwrap();
    for (w, rx) in windows.iter().zip(pending) {
        let verdict = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("a full batch does not wait for max_wait")
            .expect("reply")
            .expect("score");
        assert_eq!(verdict.batch_size, 8);
        let alone = reference.score(w).unwrap()[0];
        assert!(
            (verdict.score - alone).abs() <= 1e-4 * alone.abs().max(1e-3),
            "batched score {} differs from the window's own score {}",
            verdict.score,
            alone
        );
    }
    actor.stop(None);
}

#[tokio::test]
async fn a_lone_window_waits_at_most_max_wait() {
    let max_wait = Duration::from_millis(20);
    let actor = start(spec(32, max_wait)).await;
    for k in 0..3 {
        let verdict = send(&actor, window(k)).await.unwrap().unwrap();
        assert_eq!(verdict.batch_size, 1);
        // The upper bound allows for the OS waking the model thread late, nothing more.
        assert!(
            verdict.batch_wait < max_wait + Duration::from_millis(200),
            "waited {:?}",
            verdict.batch_wait
        );
    }
    actor.stop(None);
}

#[tokio::test]
async fn a_burst_shares_one_batch_and_leaves_when_the_senders_fall_quiet() {
    // An idle gap of max_wait / 16 = 625 ms: requests sent back to back all arrive within
    // it, and the batch leaves after the gap, long before max_wait.
    let max_wait = Duration::from_secs(10);
    let actor = start(spec(32, max_wait)).await;
    let pending: Vec<_> = (0..5).map(|k| send(&actor, window(k))).collect();
    for rx in pending {
        let verdict = rx.await.unwrap().unwrap();
        assert_eq!(verdict.batch_size, 5);
        assert!(verdict.batch_wait >= max_wait / fogmesh_actors::expert::IDLE_GAP_DIVISOR);
        assert!(
            verdict.batch_wait < max_wait,
            "the burst waited out max_wait: {:?}",
            verdict.batch_wait
        );
    }
    actor.stop(None);
}

#[tokio::test]
async fn a_window_of_the_wrong_shape_is_refused_without_harming_its_batch() {
    let actor = start(spec(4, Duration::from_millis(50))).await;
    let good = send(&actor, window(0));
    let bad = send(&actor, Arc::from(vec![0.0f32; 3]));
    assert!(good.await.unwrap().is_ok());
    let refused = bad.await.unwrap().unwrap_err();
    assert!(refused.to_string().contains("3 values"), "{refused}");
    actor.stop(None);
}

#[tokio::test]
async fn a_full_queue_refuses_windows_at_once_and_takes_them_again_once_it_drains() {
    let spec = spec(8, Duration::from_millis(1));
    let shared = ExpertShared::for_spec(&spec);
    let (actor, _) = Actor::spawn(
        None,
        Expert,
        ExpertArgs {
            spec,
            shared: shared.clone(),
        },
    )
    .await
    .expect("expert starts");
    // As many windows as the limit waiting for the model thread.
    shared
        .queued
        .store(MAX_QUEUED_WINDOWS, std::sync::atomic::Ordering::Relaxed);
    match tokio::time::timeout(Duration::from_secs(30), send(&actor, window(0)))
        .await
        .expect("a refusal comes at once")
        .expect("the expert answers")
    {
        Err(e @ ScoreError::ExpertBusy { .. }) => {
            assert_eq!(
                e.to_string(),
                format!("expert `pump-ae` has {MAX_QUEUED_WINDOWS} windows queued, its limit of {MAX_QUEUED_WINDOWS}")
            );
            assert_eq!(e.reason(), "expert_busy");
        }
        other => panic!("expected ExpertBusy, got {other:?}"),
    }
    shared.queued.store(0, std::sync::atomic::Ordering::Relaxed);
    let verdict = tokio::time::timeout(Duration::from_secs(30), send(&actor, window(0)))
        .await
        .expect("scored")
        .expect("the expert answers");
    assert!(verdict.is_ok(), "{verdict:?}");
}
