//! [`EdgeLog`]: the redb file and what a node asks of it. Every write goes through
//! the writer thread ([`crate::writer`]); reads open their own read transactions.
//!
//! Six tables: `samples`, keyed by (sensor, first sequence of the batch), holding
//! batches as a stream accepted them; `streams`, keyed by sensor, holding its
//! [`StreamPosition`]; `outbox`, keyed by (sensor, window sequence), holding the
//! windows cut and without an outcome yet ([`EdgeLog::scored`]); `journal`, keyed by
//! cursor, holding the node's alerts (and, on request, every verdict) for subscribers
//! to read from any cursor still retained; `cursors`, keyed by consumer name, holding
//! how far a durable consumer (an MQTT publisher) has read the journal; `learners`,
//! keyed by expert, holding each continual learner's last snapshot of the windows it
//! learns from (opaque to the log). A batch, its
//! windows and its stream's position go in the same transaction, so after a crash the
//! position never runs ahead of, or behind, the samples on disk, and no window the
//! position counts as cut is missing.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use redb::{Database, ReadableDatabase};
use tokio::sync::{oneshot, watch};

use crate::error::EdgeLogError;
use crate::record::{
    decode_batch, decode_position, decode_window, encode_batch, encode_window, ParkedWindow,
    Sample, StreamPosition,
};
use crate::schema::{
    optional, Appended, EdgeLogStats, JournalMark, OutboxUsage, Outboxes, CURSORS, JOURNAL,
    LEARNERS, OUTBOX, SAMPLES, STREAMS,
};
use crate::writer::{Append, Job, Writer};

/// How the log is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeLogOptions {
    /// Journal entries kept; older ones are trimmed as new ones arrive, and a
    /// subscriber asking for a trimmed cursor is told what it missed.
    pub journal_retention: u64,
}

/// Alerts a node keeps for subscribers that were away: at a few hundred bytes each,
/// tens of megabytes.
pub const DEFAULT_JOURNAL_RETENTION: u64 = 100_000;

impl Default for EdgeLogOptions {
    fn default() -> Self {
        EdgeLogOptions {
            journal_retention: DEFAULT_JOURNAL_RETENTION,
        }
    }
}

/// Journal entries read from a cursor on.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalPage {
    /// (cursor, entry), in cursor order.
    pub entries: Vec<(u64, Vec<u8>)>,
    /// The journal's extent when read.
    pub mark: JournalMark,
}

/// A stream's accepted samples, encoded as the log stores them. Made before the
/// stream normalises the samples in place, so the log keeps the values as sent.
#[derive(Debug, Clone)]
pub struct Batch {
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) bytes: Vec<u8>,
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
    outboxes: Arc<Mutex<Outboxes>>,
    journal: watch::Receiver<JournalMark>,
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

impl EdgeLog {
    /// Opens (or creates) the log in `folder` (file `edge-log.redb`). A file that redb
    /// cannot open (damaged, another process holds it) is an error naming it.
    pub fn open(folder: &Path) -> Result<EdgeLog, EdgeLogError> {
        EdgeLog::open_with(folder, EdgeLogOptions::default())
    }

    pub fn open_with(folder: &Path, options: EdgeLogOptions) -> Result<EdgeLog, EdgeLogError> {
        std::fs::create_dir_all(folder).map_err(|e| EdgeLogError::Folder {
            path: folder.to_path_buf(),
            source: Arc::new(e),
        })?;
        let path = folder.join("edge-log.redb");
        let db = Database::create(&path).map_err(|e| EdgeLogError::Open {
            path: path.clone(),
            source: Arc::new(e),
        })?;
        EdgeLog::start(db, Some(path), options)
    }

    /// A log that keeps everything in memory: the same code path without the disk, for
    /// nodes without a data folder and for measuring what durability costs.
    pub fn in_memory() -> Result<EdgeLog, EdgeLogError> {
        EdgeLog::in_memory_with(EdgeLogOptions::default())
    }

    pub fn in_memory_with(options: EdgeLogOptions) -> Result<EdgeLog, EdgeLogError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| EdgeLogError::Open {
                path: PathBuf::from("(memory)"),
                source: Arc::new(e),
            })?;
        EdgeLog::start(db, None, options)
    }

    fn start(
        db: Database,
        path: Option<PathBuf>,
        options: EdgeLogOptions,
    ) -> Result<EdgeLog, EdgeLogError> {
        let db = Arc::new(db);
        let stats = Arc::new(EdgeLogStats::default());
        let outboxes = Arc::new(Mutex::new(Outboxes::new()));
        let (writer, journal) = Writer::recover(
            db.clone(),
            stats.clone(),
            outboxes.clone(),
            options.journal_retention.max(1),
        )?;
        let (sender, jobs) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("fogmesh-edge-log".into())
            .spawn(move || writer.run(&jobs))
            .map_err(|e| EdgeLogError::Folder {
                path: path.clone().unwrap_or_default(),
                source: Arc::new(e),
            })?;
        Ok(EdgeLog {
            inner: Arc::new(Inner {
                db,
                writer: Some(sender),
                thread: Some(thread),
                stats,
                outboxes,
                journal,
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

    fn send(&self, job: Job) -> Result<(), EdgeLogError> {
        let writer = self.inner.writer.as_ref().ok_or(EdgeLogError::WriterGone)?;
        writer.send(job).map_err(|_| EdgeLogError::WriterGone)
    }

    /// Stores `batch` (a stream's accepted samples, raw, in sequence order), the
    /// `windows` it completed (parked in the outbox) and the stream's `position` after
    /// it; answers once all are committed. With `make_room`, the stream's oldest
    /// parked windows are dropped in the same commit until its outbox holds at most
    /// that many bytes. Cancel safety: dropping the future does not withdraw the
    /// append, it only stops waiting.
    pub async fn append(
        &self,
        sensor: &Arc<str>,
        batch: Batch,
        windows: &[ParkedWindow],
        position: StreamPosition,
        make_room: Option<u64>,
    ) -> Result<Appended, EdgeLogError> {
        let (done, answer) = oneshot::channel();
        self.send(Job::Append(Append {
            sensor: sensor.clone(),
            first: batch.first,
            last: batch.last,
            batch: batch.bytes,
            windows: windows
                .iter()
                .map(|w| (w.sequence, encode_window(w)))
                .collect(),
            position,
            make_room,
            done,
        }))?;
        answer.await.map_err(|_| EdgeLogError::WriterGone)?
    }

    /// Window `sequence` of `sensor` has an outcome (a verdict, or a failure that
    /// retrying would repeat): it leaves the outbox with the next commit. Never waits.
    pub fn scored(&self, sensor: &Arc<str>, sequence: u64) {
        let _ = self.send(Job::Outcome {
            sensor: sensor.clone(),
            sequence,
            dropped: false,
        });
    }

    /// Window `sequence` of `sensor` waited longer than its outbox keeps windows: it
    /// leaves the outbox unscored and counts as dropped. Never waits.
    pub fn expired(&self, sensor: &Arc<str>, sequence: u64) {
        let _ = self.send(Job::Outcome {
            sensor: sensor.clone(),
            sequence,
            dropped: true,
        });
    }

    /// What `sensor`'s outbox holds, as of the last commit.
    pub fn outbox(&self, sensor: &str) -> OutboxUsage {
        self.inner
            .outboxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(sensor)
            .copied()
            .unwrap_or_default()
    }

    /// Up to `limit` of `sensor`'s parked windows from window sequence `from` on,
    /// oldest first.
    pub fn parked(
        &self,
        sensor: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<ParkedWindow>, EdgeLogError> {
        let read = self.inner.db.begin_read().map_err(EdgeLogError::read)?;
        let Some(outbox) = optional(read.open_table(OUTBOX))? else {
            return Ok(Vec::new());
        };
        let mut parked = Vec::new();
        for row in outbox
            .range((sensor, from)..=(sensor, u64::MAX))
            .map_err(EdgeLogError::read)?
            .take(limit)
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
        Ok(parked)
    }

    /// What the log holds for `sensor`: its position and its unfinished window, or
    /// `None` for a stream the log has never seen.
    pub fn stream(&self, sensor: &str) -> Result<Option<StreamLog>, EdgeLogError> {
        let read = self.inner.db.begin_read().map_err(EdgeLogError::read)?;
        let Some(streams) = optional(read.open_table(STREAMS))? else {
            return Ok(None);
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
        Ok(Some(StreamLog {
            position,
            unfinished,
        }))
    }

    /// Adds an entry to the journal; it gets the next cursor and is committed with an
    /// fsync in the next group. Never waits.
    pub fn journal(&self, entry: Vec<u8>) {
        let _ = self.send(Job::Journal(entry));
    }

    /// The journal's extent now; the receiver changes with every commit that adds
    /// entries, for readers waiting at the end.
    pub fn journal_marks(&self) -> watch::Receiver<JournalMark> {
        self.inner.journal.clone()
    }

    /// Up to `limit` journal entries from cursor `from` on (from the oldest retained
    /// when `from` was trimmed: compare with the page's mark).
    pub fn journal_page(&self, from: u64, limit: usize) -> Result<JournalPage, EdgeLogError> {
        let mark = *self.inner.journal.borrow();
        let read = self.inner.db.begin_read().map_err(EdgeLogError::read)?;
        let mut entries = Vec::new();
        if let Some(journal) = optional(read.open_table(JOURNAL))? {
            for row in journal
                .range(from.max(mark.oldest)..mark.next)
                .map_err(EdgeLogError::read)?
                .take(limit)
            {
                let (key, value) = row.map_err(EdgeLogError::read)?;
                entries.push((key.value(), value.value().to_vec()));
            }
        }
        Ok(JournalPage { entries, mark })
    }

    /// Remembers that consumer `name` has handled the journal up to (not including)
    /// `cursor`. Committed with the next group; a crash may lose the last few, so a
    /// consumer sees some entries again, never misses one. Never waits.
    pub fn save_cursor(&self, name: &str, cursor: u64) {
        let _ = self.send(Job::Cursor {
            name: name.to_string(),
            cursor,
        });
    }

    /// Replaces learner `name`'s snapshot (committed with the next group, without an
    /// fsync of its own). Never waits.
    pub fn save_learner(&self, name: &str, snapshot: Vec<u8>) {
        let _ = self.send(Job::Learner {
            name: name.to_string(),
            snapshot,
        });
    }

    /// Learner `name`'s last snapshot, if it saved one.
    pub fn learner(&self, name: &str) -> Result<Option<Vec<u8>>, EdgeLogError> {
        let read = self.inner.db.begin_read().map_err(EdgeLogError::read)?;
        let Some(learners) = optional(read.open_table(LEARNERS))? else {
            return Ok(None);
        };
        Ok(learners
            .get(name)
            .map_err(EdgeLogError::read)?
            .map(|v| v.value().to_vec()))
    }

    /// Where consumer `name` left the journal, if it ever saved a cursor.
    pub fn cursor(&self, name: &str) -> Result<Option<u64>, EdgeLogError> {
        let read = self.inner.db.begin_read().map_err(EdgeLogError::read)?;
        let Some(cursors) = optional(read.open_table(CURSORS))? else {
            return Ok(None);
        };
        Ok(cursors
            .get(name)
            .map_err(EdgeLogError::read)?
            .map(|v| v.value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::encode_position;
    use std::sync::atomic::Ordering;

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
            log.append(&pump, encoded(0, 8), &[], position(8, Some(0)), None)
                .await
                .unwrap();
            log.append(&pump, encoded(8, 8), &[], position(16, Some(12)), None)
                .await
                .unwrap();
            // The first batch ends before the window that starts at 12: trimmed now.
            log.append(&pump, encoded(16, 4), &[], position(20, Some(14)), None)
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
            cut_at_us: 1_000_000 + sequence as i64,
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
                None,
            )
            .await
            .unwrap();
            assert_eq!(log.stats().parked.load(Ordering::Relaxed), 2);
            log.scored(&pump, 0);
            // The log takes jobs in order: once this append is answered, so is the outcome.
            log.append(&pump, encoded(12, 2), &[], position(14, Some(8)), None)
                .await
                .unwrap();
            assert_eq!(log.parked("pump-1", 0, 10).unwrap(), vec![window(1)]);
            assert_eq!(log.stats().parked.load(Ordering::Relaxed), 1);
        }
        let log = EdgeLog::open(dir.path()).unwrap();
        assert_eq!(log.stats().parked.load(Ordering::Relaxed), 1);
        assert_eq!(log.parked("pump-1", 0, 10).unwrap(), vec![window(1)]);
        assert_eq!(log.outbox("pump-1").windows, 1);
        assert_eq!(log.outbox("pump-1").bytes, window(1).stored_bytes());
        let stream = log.stream("pump-1").unwrap().unwrap();
        assert_eq!(stream.unfinished.len(), 6);
    }

    #[tokio::test]
    async fn a_stream_with_no_unfinished_window_keeps_no_sample() {
        let log = EdgeLog::in_memory().unwrap();
        let fan: Arc<str> = "fan".into();
        log.append(&fan, encoded(0, 10), &[], position(10, Some(5)), None)
            .await
            .unwrap();
        log.append(&fan, encoded(10, 10), &[], position(20, None), None)
            .await
            .unwrap();
        let stream = log.stream("fan").unwrap().unwrap();
        assert!(stream.unfinished.is_empty());
        log.append(&fan, encoded(20, 1), &[], position(21, Some(20)), None)
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
            .map(|s| log.append(s, encoded(0, 4), &[], position(4, Some(0)), None));
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

    #[tokio::test]
    async fn a_full_outbox_drops_its_oldest_windows_and_counts_each() {
        let log = EdgeLog::in_memory().unwrap();
        let pump: Arc<str> = "pump-1".into();
        let each = window(0).stored_bytes();
        // Room for three windows; five arrive in two batches.
        let room = Some(3 * each);
        let first = log
            .append(
                &pump,
                encoded(0, 4),
                &[window(0), window(1)],
                position(4, Some(0)),
                room,
            )
            .await
            .unwrap();
        assert_eq!(first.dropped, 0);
        let second = log
            .append(
                &pump,
                encoded(4, 4),
                &[window(2), window(3), window(4)],
                position(8, Some(0)),
                room,
            )
            .await
            .unwrap();
        assert_eq!(second.dropped, 2);
        let kept: Vec<u64> = log
            .parked("pump-1", 0, 10)
            .unwrap()
            .iter()
            .map(|w| w.sequence)
            .collect();
        assert_eq!(kept, vec![2, 3, 4]);
        let usage = log.outbox("pump-1");
        assert_eq!(
            (
                usage.windows,
                usage.bytes,
                usage.dropped,
                usage.dropped_before
            ),
            (3, 3 * each, 2, 2)
        );
        // Too old to keep: dropped too, and counted with the others.
        log.expired(&pump, 2);
        log.scored(&pump, 3);
        log.append(&pump, encoded(8, 1), &[], position(9, Some(0)), room)
            .await
            .unwrap();
        let usage = log.outbox("pump-1");
        assert_eq!(
            (usage.windows, usage.dropped, usage.dropped_before),
            (1, 3, 3)
        );
        assert_eq!(log.stats().parked.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn the_journal_reads_on_from_a_cursor_and_says_what_retention_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let options = EdgeLogOptions {
            journal_retention: 4,
        };
        {
            let log = EdgeLog::open_with(dir.path(), options).unwrap();
            let mut marks = log.journal_marks();
            assert_eq!(*marks.borrow(), JournalMark { oldest: 1, next: 1 });
            for i in 0..6u8 {
                log.journal(vec![i; 3]);
            }
            while marks.borrow_and_update().next < 7 {
                marks.changed().await.unwrap();
            }
            let page = log.journal_page(1, 100).unwrap();
            assert_eq!(page.mark, JournalMark { oldest: 3, next: 7 });
            let cursors: Vec<u64> = page.entries.iter().map(|(c, _)| *c).collect();
            assert_eq!(cursors, vec![3, 4, 5, 6]);
            assert_eq!(page.entries[0].1, vec![2u8; 3]);
            let page = log.journal_page(5, 1).unwrap();
            assert_eq!(page.entries, vec![(5, vec![4u8; 3])]);
            log.save_cursor("mqtt:plant", 5);
            log.save_learner("pump-ae", vec![1, 2, 3]);
        }
        let log = EdgeLog::open_with(dir.path(), options).unwrap();
        assert_eq!(
            *log.journal_marks().borrow(),
            JournalMark { oldest: 3, next: 7 }
        );
        assert_eq!(log.cursor("mqtt:plant").unwrap(), Some(5));
        assert_eq!(log.cursor("mqtt:other").unwrap(), None);
        assert_eq!(log.learner("pump-ae").unwrap(), Some(vec![1, 2, 3]));
        assert_eq!(log.learner("fan-ae").unwrap(), None);
        assert!(log.journal_page(7, 10).unwrap().entries.is_empty());
    }
}
