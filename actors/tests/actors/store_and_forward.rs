//! Store-and-forward: a node on an edge log whose stream's expert is out of reach.
//! Its windows wait in the outbox, nothing is refused within the outbox's capacity,
//! and when the expert is back the backlog drains oldest first, each window's verdict
//! once and in order, faster than the producer fills it. A full outbox follows its
//! policy (refuse, or drop the oldest), and every drop is counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fogmesh_actors::{Annunciator, EdgeStorage, IngestError, Node, OutboxLimits, WhenFull};
use fogmesh_edge_log::EdgeLog;

use crate::edge_log::node_without_its_expert;
use crate::node::{eventually, samples, static_node};

/// How long the expert stays out of reach in the partition test: the minute.
const OUTAGE: Duration = Duration::from_secs(60);
/// The producer's pace: 100 samples every 50 ms, 500 windows a second.
const BATCH: u64 = 100;
const EVERY: Duration = Duration::from_millis(50);

/// A verdict as the test heard it: the window, how late, when.
type Heard = (u64, Option<Duration>, Instant);

/// Every verdict the annunciator publishes, with when it came.
#[derive(Clone, Default)]
struct Verdicts(Arc<Mutex<Vec<Heard>>>);

impl Verdicts {
    fn collect(annunciator: &Annunciator) -> Self {
        let verdicts = Verdicts::default();
        let mut rx = annunciator.subscribe();
        let sink = verdicts.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(w) => {
                        sink.0
                            .lock()
                            .unwrap()
                            .push((w.window_sequence, w.late, Instant::now()))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    Err(e) => panic!("the test's subscriber fell behind: {e}"),
                }
            }
        });
        verdicts
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn sequences(&self) -> Vec<u64> {
        self.0.lock().unwrap().iter().map(|v| v.0).collect()
    }
}

/// A node on a fresh edge log whose stream's expert runs nowhere yet, and what it
/// publishes. The folder lives as long as the returned guard.
struct Outage {
    node: Node,
    join: tokio::task::JoinHandle<()>,
    log: EdgeLog,
    verdicts: Verdicts,
    _dir: tempfile::TempDir,
}

async fn without_experts(limits: OutboxLimits, subscriber_room: usize) -> Outage {
    let dir = tempfile::tempdir().unwrap();
    let log = EdgeLog::open(dir.path()).unwrap();
    let annunciator = Annunciator::new(subscriber_room);
    let verdicts = Verdicts::collect(&annunciator);
    let storage = EdgeStorage {
        log: log.clone(),
        limits,
    };
    let (node, join) = Node::start_with_log(node_without_its_expert(), annunciator, Some(storage))
        .await
        .unwrap();
    Outage {
        node,
        join,
        log,
        verdicts,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_without_experts_loses_nothing_and_the_backlog_drains_in_order() {
    let Outage {
        node,
        join,
        log,
        verdicts,
        _dir,
    } = without_experts(OutboxLimits::default(), 1 << 18).await;

    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let producer = {
        let (node, stop, refused) = (node.clone(), stop.clone(), refused.clone());
        tokio::spawn(async move {
            let mut next = 0u64;
            let mut pace = tokio::time::interval(EVERY);
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                match node.ingest("pump-1", samples(next..next + BATCH)).await {
                    Ok(_) => next += BATCH,
                    Err(e) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        eprintln!("refused: {e}");
                    }
                }
            }
        })
    };

    let started = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    assert_eq!(verdicts.len(), 0, "no expert, no verdict");
    let backlog = node.snapshot().sensors[0].windows;
    let ingest_rate = backlog as f64 / started.elapsed().as_secs_f64();
    assert!(log.outbox("pump-1").windows >= backlog - 1);

    // The expert is back.
    let back = Instant::now();
    node.reconcile(static_node()).await.unwrap();
    eventually(Duration::from_secs(60), "the backlog to drain", || {
        verdicts.len() as u64 >= backlog
    })
    .await;
    let drained_at = verdicts.0.lock().unwrap()[backlog as usize - 1].2;
    let drain_rate = backlog as f64 / (drained_at - back).as_secs_f64();
    eprintln!(
        "store-and-forward: backlog {backlog} windows after {OUTAGE:?} without experts; ingest {ingest_rate:.0} windows/s; drained at {drain_rate:.0} windows/s ({:.1}x) in {:?}",
        drain_rate / ingest_rate,
        drained_at - back
    );
    assert!(
        drain_rate >= 2.0 * ingest_rate,
        "the backlog of {backlog} windows drained at {drain_rate:.0} windows/s, ingest cuts {ingest_rate:.0}/s"
    );

    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    let cut = node.snapshot().sensors[0].windows;
    eventually(Duration::from_secs(30), "every window to be scored", || {
        verdicts.len() as u64 >= cut
    })
    .await;
    eventually(Duration::from_secs(30), "the outbox to empty", || {
        log.outbox("pump-1").windows == 0
    })
    .await;

    assert_eq!(refused.load(Ordering::Relaxed), 0, "nothing refused");
    assert_eq!(
        verdicts.sequences(),
        (0..cut).collect::<Vec<_>>(),
        "every window scored once, in the order it was cut"
    );
    let late = verdicts.0.lock().unwrap()[0]
        .1
        .expect("the first verdict is late");
    assert!(
        late >= OUTAGE / 2,
        "the first window's verdict came {late:?} after its cut"
    );
    let status = &node.snapshot().sensors[0];
    assert_eq!((status.parked, status.dropped), (0, 0));
    node.shutdown(join).await;
}

/// A window every 4 samples after the first 8; each takes 100 bytes in the outbox
/// (2 channels x 8 samples, and its header).
const WINDOW_BYTES: u64 = 100;

#[tokio::test]
async fn a_full_outbox_refuses_the_next_batch_and_takes_it_once_drained() {
    let limits = OutboxLimits {
        max_bytes_per_sensor: 10 * WINDOW_BYTES,
        when_full: WhenFull::Refuse,
        ..OutboxLimits::default()
    };
    let Outage {
        node,
        join,
        log,
        verdicts,
        _dir,
    } = without_experts(limits, 1024).await;
    // 8 samples cut window 0, then each 4 cut one more: 10 windows fill the outbox.
    node.ingest("pump-1", samples(0..8)).await.unwrap();
    for first in (8..44).step_by(4) {
        node.ingest("pump-1", samples(first..first + 4))
            .await
            .unwrap();
    }
    assert_eq!(log.outbox("pump-1").bytes, 10 * WINDOW_BYTES);
    let refused = node
        .ingest("pump-1", samples(44..48))
        .await
        .expect_err("the eleventh window does not fit");
    assert!(
        matches!(
            &refused,
            IngestError::OutboxFull {
                windows: 10,
                bytes: 1000,
                limit: 1000,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(refused
        .to_string()
        .contains("outbox.max_bytes_per_sensor = 1000"));
    // Refused whole: the stream did not move.
    let status = &node.snapshot().sensors[0];
    assert_eq!(
        (status.acked_through, status.windows, status.parked),
        (Some(43), 10, 10)
    );

    node.reconcile(static_node()).await.unwrap();
    eventually(Duration::from_secs(30), "the outbox to drain", || {
        verdicts.len() == 10 && log.outbox("pump-1").windows == 0
    })
    .await;
    node.ingest("pump-1", samples(44..48))
        .await
        .expect("room again");
    eventually(Duration::from_secs(30), "the new window's verdict", || {
        verdicts.len() == 11
    })
    .await;
    assert_eq!(verdicts.sequences(), (0..11).collect::<Vec<_>>());
    assert_eq!(node.snapshot().sensors[0].dropped, 0);
    node.shutdown(join).await;
}

#[tokio::test]
async fn a_full_outbox_drops_its_oldest_windows_and_counts_exactly_those() {
    let limits = OutboxLimits {
        max_bytes_per_sensor: 10 * WINDOW_BYTES,
        when_full: WhenFull::DropOldest,
        ..OutboxLimits::default()
    };
    let Outage {
        node,
        join,
        log,
        verdicts,
        _dir,
    } = without_experts(limits, 1024).await;
    // 30 windows, one batch each after the first: nothing refused.
    node.ingest("pump-1", samples(0..8)).await.unwrap();
    for first in (8..124).step_by(4) {
        node.ingest("pump-1", samples(first..first + 4))
            .await
            .unwrap();
    }
    let status = &node.snapshot().sensors[0];
    assert_eq!(
        (status.windows, status.parked, status.dropped),
        (30, 10, 20)
    );

    node.reconcile(static_node()).await.unwrap();
    eventually(Duration::from_secs(30), "the outbox to drain", || {
        log.outbox("pump-1").windows == 0 && verdicts.len() >= 10
    })
    .await;
    // Verdicts are published in window order, so a window dropped while already on
    // its way to the router would stand before window 20 here.
    let scored = verdicts.sequences();
    assert_eq!(
        scored,
        (20..30).collect::<Vec<_>>(),
        "the newest ten, in order"
    );
    let dropped = node.snapshot().sensors[0].dropped;
    assert_eq!(
        dropped,
        30 - scored.len() as u64,
        "the counter says what was lost"
    );
    node.shutdown(join).await;
}

#[tokio::test]
async fn windows_older_than_the_outbox_keeps_are_dropped_and_counted() {
    let limits = OutboxLimits {
        max_age: Duration::from_secs(1),
        ..OutboxLimits::default()
    };
    let Outage {
        node,
        join,
        log,
        verdicts,
        _dir,
    } = without_experts(limits, 1024).await;
    node.ingest("pump-1", samples(0..20)).await.unwrap();
    // The router gives up on them after its retry deadline; the backlog then finds
    // them too old.
    eventually(
        Duration::from_secs(60),
        "the stale windows to be dropped",
        || node.snapshot().sensors[0].dropped == 4,
    )
    .await;
    assert_eq!(log.outbox("pump-1").windows, 0);
    node.reconcile(static_node()).await.unwrap();
    node.ingest("pump-1", samples(20..24)).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the fresh window's verdict",
        || verdicts.len() == 1,
    )
    .await;
    assert_eq!(verdicts.sequences(), vec![4]);
    node.shutdown(join).await;
}
