//! [`EdgeLog`]: the redb file, its writer thread and the group commit.
//!
//! Three tables: `samples`, keyed by (sensor, first sequence of the batch), holding
//! batches as a stream accepted them; `streams`, keyed by sensor, holding its
//! [`StreamPosition`]; `outbox`, keyed by (sensor, window sequence), holding the
//! windows the batch completed until their router has an outcome for them
//! ([`EdgeLog::scored`]). A batch, its windows and its stream's position go in the same
//! transaction, so after a crash the position never runs ahead of, or behind, the
//! samples on disk, and no window the position counts as cut is missing.
//!
//! The writer thread owns every write. It takes the first append waiting, then every
//! other append already queued (at most [`MAX_GROUP`]), writes them in one transaction
//! and commits it with redb's default durability (fsync before the commit returns);
//! then it answers each append. While it waits for the disk, new appends queue up and
//! go in the next group, so the fsyncs per second stay bounded by the disk, not by the
//! number of producers. A failed commit answers every append of its group with the
//! error and changes nothing: each stream refuses that batch. Outcomes of windows
//! ([`EdgeLog::scored`]) ride in the next group; a group of outcomes alone commits
//! without an fsync (redb's `Durability::None`, made durable by the next commit that
//! has one), since losing one to a crash only means the window is scored again.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

use crate::error::EdgeLogError;
use crate::record::{
    decode_batch, decode_position, decode_window, encode_batch, encode_position, encode_window,
    last_sequence, ParkedWindow, Sample, StreamPosition,
};

const SAMPLES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("samples");
const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("streams");
const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");

/// Most appends one transaction takes: a bound on the group's memory and on how long
/// the first append of a group waits for the rest to be written.
pub const MAX_GROUP: usize = 1024;

/// What the edge log has done since it opened.
#[derive(Debug, Default)]
pub struct EdgeLogStats {
    /// Transactions committed: one fsync each on a file-backed log.
    pub commits: AtomicU64,
    pub appends: AtomicU64,
    pub samples: AtomicU64,
    /// Batches trimmed because their stream had windowed every sample of them.
    pub trimmed: AtomicU64,
    /// Windows in the outbox now: cut, and without an outcome yet.
    pub parked: AtomicU64,
}

/// A stream's accepted samples, encoded as the log stores them. Made before the
/// stream normalises the samples in place, so the log keeps the values as sent.
#[derive(Debug, Clone)]
pub struct Batch {
    first: u64,
    last: u64,
    bytes: Vec<u8>,
}

impl Batch {
    /// `None` for no samples: there is nothing to store.
    pub fn encode(samples: &[Sample]) -> Option<Batch> {
        Some(Batch {
            first: samples.first()?.sequence,
            last: samples.last()?.sequence,
            bytes: encode_batch(samples),
        })
    }
}

/// What a stream gets back from the log when it (re)starts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamLog {
    pub position: StreamPosition,
    /// The samples of the unfinished window, in sequence order: from
    /// [`StreamPosition::keep_from`] to the last accepted one.
    pub unfinished: Vec<Sample>,
    /// Windows cut before the restart that have no outcome yet, oldest first.
    pub parked: Vec<ParkedWindow>,
}

/// The node's edge log. Cheap to clone; when the last clone is dropped the writer
/// thread finishes the groups it holds and closes the file before the drop returns, so
/// the same folder can be opened again at once.
#[derive(Clone)]
pub struct EdgeLog {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    writer: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<EdgeLogStats>,
    /// Where the file is; `None` for a log in memory.
    path: Option<PathBuf>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.writer.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for EdgeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner.path {
            Some(path) => write!(f, "EdgeLog({})", path.display()),
            None => f.write_str("EdgeLog(in memory)"),
        }
    }
}

enum Job {
    Append(Append),
    /// A window's router has an outcome for it: out of the outbox.
    Scored {
        sensor: Arc<str>,
        sequence: u64,
    },
}

struct Append {
    sensor: Arc<str>,
    first: u64,
    last: u64,
    batch: Vec<u8>,
    /// The windows the batch completed: (window sequence, encoded window).
    windows: Vec<(u64, Vec<u8>)>,
    position: StreamPosition,
    done: oneshot::Sender<Result<(), EdgeLogError>>,
}

/// The batches of one stream on disk, oldest first: (first sequence, last sequence).
type Batches = HashMap<Arc<str>, VecDeque<(u64, u64)>>;

impl EdgeLog {
    /// Opens (or creates) the log in `folder` (file `edge-log.redb`). A file that redb
    /// cannot open (damaged, another process holds it) is an error naming it.
    pub fn open(folder: &Path) -> Result<EdgeLog, EdgeLogError> {
        std::fs::create_dir_all(folder).map_err(|e| EdgeLogError::Folder {
            path: folder.to_path_buf(),
            source: Arc::new(e),
        })?;
        let path = folder.join("edge-log.redb");
        let db = Database::create(&path).map_err(|e| EdgeLogError::Open {
            path: path.clone(),
            source: Arc::new(e),
        })?;
        EdgeLog::start(db, Some(path))
    }

    /// A log that keeps everything in memory: the same code path without the disk, for
    /// nodes without a data folder and for measuring what durability costs.
    pub fn in_memory() -> Result<EdgeLog, EdgeLogError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| EdgeLogError::Open {
                path: PathBuf::from("(memory)"),
                source: Arc::new(e),
            })?;
        EdgeLog::start(db, None)
    }

    fn start(db: Database, path: Option<PathBuf>) -> Result<EdgeLog, EdgeLogError> {
        let db = Arc::new(db);
        let batches = stored_batches(&db)?;
        let stats = Arc::new(EdgeLogStats::default());
        stats.parked.store(parked_count(&db)?, Ordering::Relaxed);
        let (writer, appends) = mpsc::channel();
        let (thread_db, thread_stats) = (db.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("fogmesh-edge-log".into())
            .spawn(move || write_groups(&thread_db, &appends, batches, &thread_stats))
            .map_err(|e| EdgeLogError::Folder {
                path: path.clone().unwrap_or_default(),
                source: Arc::new(e),
            })?;
        Ok(EdgeLog {
            inner: Arc::new(Inner {
                db,
                writer: Some(writer),
                thread: Some(thread),
                stats,
                path,
            }),
        })
    }

    /// The file, or `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    pub fn stats(&self) -> &EdgeLogStats {
        &self.inner.stats
    }

    /// Stores `batch` (a stream's accepted samples, raw, in sequence order), the
    /// `windows` it completed and the stream's `position` after it; answers once all
    /// are committed. Cancel safety: dropping the future does not withdraw the append,
    /// it only stops waiting.
    pub async fn append(
        &self,
        sensor: &Arc<str>,
        batch: Batch,
        windows: &[ParkedWindow],
        position: StreamPosition,
    ) -> Result<(), EdgeLogError> {
        let (done, answer) = oneshot::channel();
        let writer = self.inner.writer.as_ref().ok_or(EdgeLogError::WriterGone)?;
        writer
            .send(Job::Append(Append {
                sensor: sensor.clone(),
                first: batch.first,
                last: batch.last,
                batch: batch.bytes,
                windows: windows
                    .iter()
                    .map(|w| (w.sequence, encode_window(w)))
                    .collect(),
                position,
                done,
            }))
            .map_err(|_| EdgeLogError::WriterGone)?;
        answer.await.map_err(|_| EdgeLogError::WriterGone)?
    }

    /// Window `sequence` of `sensor` has an outcome (a verdict, or a failure that
    /// retrying would repeat): it leaves the outbox with the next commit. Never waits.
    pub fn scored(&self, sensor: &Arc<str>, sequence: u64) {
        if let Some(writer) = &self.inner.writer {
            let _ = writer.send(Job::Scored {
                sensor: sensor.clone(),
                sequence,
            });
        }
    }

    /// What the log holds for `sensor`: its position and its unfinished window, or
    /// `None` for a stream the log has never seen.
    pub fn stream(&self, sensor: &str) -> Result<Option<StreamLog>, EdgeLogError> {
        let read = self.inner.db.begin_read().map_err(EdgeLogError::read)?;
        let streams = match read.open_table(STREAMS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(EdgeLogError::read(e)),
        };
        let Some(bytes) = streams.get(sensor).map_err(EdgeLogError::read)? else {
            return Ok(None);
        };
        let position = decode_position(bytes.value()).ok_or_else(|| EdgeLogError::Damaged {
            sensor: sensor.to_string(),
            sequence: 0,
            reason: "its position record has the wrong length",
        })?;
        let keep_from = position.keep_from();
        let samples = read.open_table(SAMPLES).map_err(EdgeLogError::read)?;
        let mut unfinished = Vec::new();
        for row in samples
            .range((sensor, 0)..=(sensor, u64::MAX))
            .map_err(EdgeLogError::read)?
        {
            let (key, value) = row.map_err(EdgeLogError::read)?;
            let batch = decode_batch(value.value()).ok_or_else(|| EdgeLogError::Damaged {
                sensor: sensor.to_string(),
                sequence: key.value().1,
                reason: "a batch whose length does not match its header",
            })?;
            unfinished.extend(batch.into_iter().filter(|s| s.sequence >= keep_from));
        }
        let outbox = read.open_table(OUTBOX).map_err(EdgeLogError::read)?;
        let mut parked = Vec::new();
        for row in outbox
            .range((sensor, 0)..=(sensor, u64::MAX))
            .map_err(EdgeLogError::read)?
        {
            let (key, value) = row.map_err(EdgeLogError::read)?;
            let sequence = key.value().1;
            parked.push(decode_window(sequence, value.value()).ok_or_else(|| {
                EdgeLogError::Damaged {
                    sensor: sensor.to_string(),
                    sequence,
                    reason: "a parked window whose length does not match its shape",
                }
            })?);
        }
        Ok(Some(StreamLog {
            position,
            unfinished,
            parked,
        }))
    }
}

/// Every batch on disk, per stream: the writer's starting point for trimming.
fn stored_batches(db: &Database) -> Result<Batches, EdgeLogError> {
    let mut batches = Batches::new();
    let read = db.begin_read().map_err(EdgeLogError::read)?;
    let samples = match read.open_table(SAMPLES) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(batches),
        Err(e) => return Err(EdgeLogError::read(e)),
    };
    for row in samples.iter().map_err(EdgeLogError::read)? {
        let (key, value) = row.map_err(EdgeLogError::read)?;
        let (sensor, first) = key.value();
        let last = last_sequence(value.value()).unwrap_or(first);
        batches
            .entry(Arc::from(sensor))
            .or_default()
            .push_back((first, last));
    }
    Ok(batches)
}

/// Windows in the outbox when the log opens.
fn parked_count(db: &Database) -> Result<u64, EdgeLogError> {
    let read = db.begin_read().map_err(EdgeLogError::read)?;
    match read.open_table(OUTBOX) {
        Ok(table) => table.len().map_err(EdgeLogError::read),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(EdgeLogError::read(e)),
    }
}

fn write_groups(
    db: &Database,
    jobs: &mpsc::Receiver<Job>,
    mut batches: Batches,
    stats: &EdgeLogStats,
) {
    let commits = metrics::counter!("fogmesh_edge_log_commits_total");
    let group_size = metrics::histogram!("fogmesh_edge_log_group_appends");
    let parked = metrics::gauge!("fogmesh_edge_log_parked_windows");
    while let Ok(first) = jobs.recv() {
        let mut group = Vec::new();
        let mut scored = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Append(append) => group.push(append),
                Job::Scored { sensor, sequence } => scored.push((sensor, sequence)),
            }
            if group.len() + scored.len() < MAX_GROUP {
                next = jobs.try_recv().ok();
            }
        }
        let result = commit(db, &group, &scored, &mut batches, stats);
        match &result {
            Err(e) => {
                tracing::error!(error = %e, appends = group.len(), "edge log commit failed; the batches are refused");
            }
            Ok(()) if !group.is_empty() => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats
                    .appends
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
                commits.increment(1);
                group_size.record(group.len() as f64);
            }
            Ok(()) => {}
        }
        parked.set(stats.parked.load(Ordering::Relaxed) as f64);
        for append in group {
            let _ = append.done.send(result.clone());
        }
    }
}

/// One transaction for the whole group; `batches` changes only once it committed.
fn commit(
    db: &Database,
    group: &[Append],
    scored: &[(Arc<str>, u64)],
    batches: &mut Batches,
    stats: &EdgeLogStats,
) -> Result<(), EdgeLogError> {
    let mut write = db.begin_write().map_err(EdgeLogError::commit)?;
    if group.is_empty() {
        write
            .set_durability(redb::Durability::None)
            .map_err(EdgeLogError::commit)?;
    }
    let mut trimmed: HashMap<Arc<str>, usize> = HashMap::new();
    let mut samples_written = 0u64;
    let (mut parked_added, mut parked_removed) = (0u64, 0u64);
    {
        let mut samples = write.open_table(SAMPLES).map_err(EdgeLogError::commit)?;
        let mut streams = write.open_table(STREAMS).map_err(EdgeLogError::commit)?;
        let mut outbox = write.open_table(OUTBOX).map_err(EdgeLogError::commit)?;
        for (sensor, sequence) in scored {
            if outbox
                .remove((&**sensor, *sequence))
                .map_err(EdgeLogError::commit)?
                .is_some()
            {
                parked_removed += 1;
            }
        }
        for append in group {
            let sensor: &str = &append.sensor;
            samples
                .insert((sensor, append.first), append.batch.as_slice())
                .map_err(EdgeLogError::commit)?;
            streams
                .insert(sensor, encode_position(&append.position).as_slice())
                .map_err(EdgeLogError::commit)?;
            for (sequence, window) in &append.windows {
                outbox
                    .insert((sensor, *sequence), window.as_slice())
                    .map_err(EdgeLogError::commit)?;
            }
            parked_added += append.windows.len() as u64;
            samples_written += batch_count(&append.batch);
            // Batches wholly before the unfinished window are windowed: drop them.
            // Several appends of one stream in a group trim against the latest.
            let keep_from = append.position.keep_from();
            let already = trimmed.get(&append.sensor).copied().unwrap_or(0);
            let stored = batches.get(&append.sensor);
            let stale: Vec<u64> = stored
                .into_iter()
                .flatten()
                .skip(already)
                .take_while(|(_, last)| *last < keep_from)
                .map(|(first, _)| *first)
                .collect();
            for first in &stale {
                samples
                    .remove((sensor, *first))
                    .map_err(EdgeLogError::commit)?;
            }
            *trimmed.entry(append.sensor.clone()).or_default() += stale.len();
        }
    }
    write.commit().map_err(EdgeLogError::commit)?;
    for (sensor, n) in trimmed {
        if let Some(queue) = batches.get_mut(&sensor) {
            queue.drain(..n.min(queue.len()));
        }
        stats.trimmed.fetch_add(n as u64, Ordering::Relaxed);
    }
    for append in group {
        batches
            .entry(append.sensor.clone())
            .or_default()
            .push_back((append.first, append.last));
    }
    stats.samples.fetch_add(samples_written, Ordering::Relaxed);
    stats.parked.fetch_add(parked_added, Ordering::Relaxed);
    stats.parked.fetch_sub(parked_removed, Ordering::Relaxed);
    Ok(())
}

fn batch_count(batch: &[u8]) -> u64 {
    batch
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u64::from(u32::from_le_bytes(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(from: u64, count: u64) -> Vec<Sample> {
        (from..from + count)
            .map(|sequence| Sample {
                sequence,
                timestamp_us: sequence as i64 * 1000,
                values: vec![sequence as f32, -(sequence as f32)],
            })
            .collect()
    }

    fn encoded(from: u64, count: u64) -> Batch {
        Batch::encode(&batch(from, count)).expect("samples")
    }

    fn position(next_sequence: u64, window_start: Option<u64>) -> StreamPosition {
        StreamPosition {
            next_sequence,
            last_timestamp_us: (next_sequence as i64 - 1) * 1000,
            windows: next_sequence / 10,
            window_start,
            skip: 0,
        }
    }

    #[tokio::test]
    async fn a_reopened_log_gives_the_position_and_the_unfinished_window_back() {
        let dir = tempfile::tempdir().unwrap();
        let pump: Arc<str> = "pump-1".into();
        {
            let log = EdgeLog::open(dir.path()).unwrap();
            assert_eq!(log.stream("pump-1").unwrap(), None);
            log.append(&pump, encoded(0, 8), &[], position(8, Some(0)))
                .await
                .unwrap();
            log.append(&pump, encoded(8, 8), &[], position(16, Some(12)))
                .await
                .unwrap();
            // The first batch ends before the window that starts at 12: trimmed now.
            log.append(&pump, encoded(16, 4), &[], position(20, Some(14)))
                .await
                .unwrap();
            assert_eq!(log.stats().trimmed.load(Ordering::Relaxed), 1);
            assert_eq!(log.stats().samples.load(Ordering::Relaxed), 20);
        }
        let log = EdgeLog::open(dir.path()).unwrap();
        let stream = log
            .stream("pump-1")
            .unwrap()
            .expect("the stream is in the log");
        assert_eq!(stream.position, position(20, Some(14)));
        let sequences: Vec<u64> = stream.unfinished.iter().map(|s| s.sequence).collect();
        assert_eq!(sequences, (14..20).collect::<Vec<_>>());
        assert_eq!(stream.unfinished[0], batch(14, 1)[0]);
        assert_eq!(log.stream("pump-2").unwrap(), None);
    }

    fn window(sequence: u64) -> ParkedWindow {
        ParkedWindow {
            sequence,
            start_us: sequence as i64 * 4_000,
            end_us: sequence as i64 * 4_000 + 7_000,
            channels: 2,
            length: 8,
            quality: 0,
            values: (0..16).map(|v| v as f32 + sequence as f32).collect(),
        }
    }

    #[tokio::test]
    async fn cut_windows_stay_parked_until_scored_and_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let pump: Arc<str> = "pump-1".into();
        {
            let log = EdgeLog::open(dir.path()).unwrap();
            log.append(
                &pump,
                encoded(0, 12),
                &[window(0), window(1)],
                position(12, Some(8)),
            )
            .await
            .unwrap();
            assert_eq!(log.stats().parked.load(Ordering::Relaxed), 2);
            log.scored(&pump, 0);
            // The log takes jobs in order: once this append is answered, so is the outcome.
            log.append(&pump, encoded(12, 2), &[], position(14, Some(8)))
                .await
                .unwrap();
            let stream = log.stream("pump-1").unwrap().unwrap();
            assert_eq!(stream.parked, vec![window(1)]);
            assert_eq!(log.stats().parked.load(Ordering::Relaxed), 1);
        }
        let log = EdgeLog::open(dir.path()).unwrap();
        assert_eq!(log.stats().parked.load(Ordering::Relaxed), 1);
        let stream = log.stream("pump-1").unwrap().unwrap();
        assert_eq!(stream.parked, vec![window(1)]);
        assert_eq!(stream.unfinished.len(), 6);
    }

    #[tokio::test]
    async fn a_stream_with_no_unfinished_window_keeps_no_sample() {
        let log = EdgeLog::in_memory().unwrap();
        let fan: Arc<str> = "fan".into();
        log.append(&fan, encoded(0, 10), &[], position(10, Some(5)))
            .await
            .unwrap();
        log.append(&fan, encoded(10, 10), &[], position(20, None))
            .await
            .unwrap();
        let stream = log.stream("fan").unwrap().unwrap();
        assert!(stream.unfinished.is_empty());
        log.append(&fan, encoded(20, 1), &[], position(21, Some(20)))
            .await
            .unwrap();
        assert_eq!(log.stats().trimmed.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn appends_waiting_together_share_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let log = EdgeLog::open(dir.path()).unwrap();
        let sensors: Vec<Arc<str>> = (0..200).map(|i| Arc::from(format!("s{i}"))).collect();
        // join_all polls every append once before any is answered, so all 200 are
        // queued while the writer commits the first.
        let appends = sensors
            .iter()
            .map(|s| log.append(s, encoded(0, 4), &[], position(4, Some(0))));
        for result in futures::future::join_all(appends).await {
            result.unwrap();
        }
        let commits = log.stats().commits.load(Ordering::Relaxed);
        assert_eq!(log.stats().appends.load(Ordering::Relaxed), 200);
        assert!(
            commits < 200,
            "{commits} commits for 200 appends waiting together"
        );
        for s in &sensors {
            assert_eq!(log.stream(s).unwrap().unwrap().unfinished.len(), 4);
        }
    }

    #[tokio::test]
    async fn a_damaged_batch_is_named_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let log = EdgeLog::open(dir.path()).unwrap();
        let write = log.inner.db.begin_write().unwrap();
        {
            let mut samples = write.open_table(SAMPLES).unwrap();
            samples
                .insert(("valve", 7), [1u8, 2, 3].as_slice())
                .unwrap();
            let mut streams = write.open_table(STREAMS).unwrap();
            streams
                .insert("valve", encode_position(&position(9, Some(7))).as_slice())
                .unwrap();
        }
        write.commit().unwrap();
        let error = log.stream("valve").unwrap_err();
        assert!(
            matches!(&error, EdgeLogError::Damaged { sensor, sequence: 7, .. } if sensor == "valve"),
            "{error}"
        );
    }
}
