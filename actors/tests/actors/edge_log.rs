//! A node on an edge log, stopped and started again on the same folder: the second
//! life refuses resends of what the first acknowledged, finishes the window the first
//! left unfinished with the samples the log kept, so every acknowledged sample is
//! windowed once, and scores the windows the first cut but never scored.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fogmesh_actors::{Annunciator, EdgeStorage, Node, NodeSpec, OutboxLimits, ScoredWindow};
use fogmesh_edge_log::EdgeLog;

use crate::node::{eventually, samples, static_node, WINDOW};

async fn scored_windows(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<ScoredWindow>>,
    count: usize,
) -> Vec<Arc<ScoredWindow>> {
    let mut windows = Vec::with_capacity(count);
    for _ in 0..count {
        let window = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("a scored window arrives")
            .expect("no window missed");
        windows.push(window);
    }
    windows.sort_by_key(|w| w.window_sequence);
    windows
}

/// The window of samples `first..first + WINDOW`, channel-major, as the fixture's
/// frozen identity normalisation leaves it.
fn window_values(first: u64) -> Vec<f32> {
    let rows = samples(first..first + WINDOW as u64);
    (0..2)
        .flat_map(|c| rows.iter().map(move |s| s.values[c]).collect::<Vec<_>>())
        .collect()
}

#[tokio::test]
async fn a_node_restarted_on_its_edge_log_refuses_resends_and_finishes_the_unfinished_window() {
    let dir = tempfile::tempdir().unwrap();

    // First life: 22 samples. Windows of 8 every 4 start at 0, 4, 8 and 12; the one
    // from 16 is unfinished when the node stops.
    let annunciator = Annunciator::new(1024);
    let mut scored = annunciator.subscribe();
    let log = EdgeLog::open(dir.path()).unwrap();
    let (node, join) = Node::start_with_log(static_node(), annunciator, Some(storage(log)))
        .await
        .unwrap();
    let ack = node.push("pump-1", samples(0..22)).await.unwrap();
    assert_eq!(
        (ack.acked_through, ack.accepted, ack.duplicates),
        (Some(21), 22, 0)
    );
    let first: Vec<(u64, i64)> = scored_windows(&mut scored, 4)
        .await
        .iter()
        .map(|w| (w.window_sequence, w.start_us))
        .collect();
    assert_eq!(first, vec![(0, 0), (1, 4_000), (2, 8_000), (3, 12_000)]);
    node.shutdown(join).await;
    drop(node);

    // Second life on the same folder.
    let annunciator = Annunciator::new(1024);
    let mut scored = annunciator.subscribe();
    let log = EdgeLog::open(dir.path()).expect("the first life let the log go");
    let (node, join) = Node::start_with_log(static_node(), annunciator, Some(storage(log)))
        .await
        .unwrap();
    let resumed = &node.snapshot().sensors[0];
    assert_eq!((resumed.acked_through, resumed.windows), (Some(21), 4));
    // The producer did not hear the last ack and resends from 14.
    let ack = node.push("pump-1", samples(14..30)).await.unwrap();
    assert_eq!(
        (ack.acked_through, ack.accepted, ack.duplicates),
        (Some(29), 8, 8)
    );
    // 30 samples in all: windows start at 0, 4, ..., 20; this life cuts 16 and 20.
    let second = scored_windows(&mut scored, 2).await;
    let starts: Vec<(u64, i64)> = second
        .iter()
        .map(|w| (w.window_sequence, w.start_us))
        .collect();
    assert_eq!(starts, vec![(4, 16_000), (5, 20_000)]);
    assert_eq!(&*second[0].values, window_values(16).as_slice());
    assert_eq!(&*second[1].values, window_values(20).as_slice());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), scored.recv())
            .await
            .is_err(),
        "no window beyond the two the new samples complete"
    );
    let status = &node.snapshot().sensors[0];
    assert_eq!((status.windows, status.duplicates), (6, 8));
    node.shutdown(join).await;
}

/// The log with the default outbox limits.
pub fn storage(log: EdgeLog) -> EdgeStorage {
    EdgeStorage {
        log,
        limits: OutboxLimits::default(),
    }
}

/// The node whose router's expert runs nowhere: its windows wait for a replica.
pub fn node_without_its_expert() -> NodeSpec {
    let mut spec = static_node();
    spec.remote_experts = std::mem::take(&mut spec.experts);
    spec
}

#[test]
fn windows_cut_before_a_crash_are_scored_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();

    // First life: 20 samples cut windows 0 to 3, which wait for a replica of their
    // expert when the process dies: its runtime goes with every task, no goodbye.
    let first = tokio::runtime::Runtime::new().unwrap();
    first.block_on(async {
        let log = EdgeLog::open(dir.path()).unwrap();
        let (node, _join) = Node::start_with_log(
            node_without_its_expert(),
            Annunciator::new(64),
            Some(storage(log.clone())),
        )
        .await
        .unwrap();
        node.push("pump-1", samples(0..20)).await.unwrap();
        assert_eq!(log.stats().parked.load(Ordering::Relaxed), 4);
    });
    first.shutdown_background();

    // Second life, with the expert: the parked windows are scored, once each.
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let mut opened = None;
        eventually(
            Duration::from_secs(30),
            "the dead process to let the log go",
            || {
                opened = EdgeLog::open(dir.path()).ok();
                opened.is_some()
            },
        )
        .await;
        let log = opened.expect("opened");
        let annunciator = Annunciator::new(64);
        let mut scored = annunciator.subscribe();
        let (node, join) =
            Node::start_with_log(static_node(), annunciator, Some(storage(log.clone())))
                .await
                .unwrap();
        let windows: Vec<(u64, i64)> = scored_windows(&mut scored, 4)
            .await
            .iter()
            .map(|w| (w.window_sequence, w.start_us))
            .collect();
        assert_eq!(windows, vec![(0, 0), (1, 4_000), (2, 8_000), (3, 12_000)]);
        eventually(Duration::from_secs(30), "the outbox to empty", || {
            log.stats().parked.load(Ordering::Relaxed) == 0
        })
        .await;
        assert_eq!(node.snapshot().sensors[0].windows, 4);
        node.shutdown(join).await;
    });
}
