//! The writer thread: every write to the edge log, in group commits.
//!
//! It takes the first job waiting, then every other job already queued (at most
//! [`MAX_GROUP`]), writes them in one transaction and commits it with redb's default
//! durability (fsync before the commit returns); then it answers each append. While it
//! waits for the disk, new jobs queue up and go in the next group, so the fsyncs per
//! second stay bounded by the disk, not by the number of producers. A failed commit
//! answers every append of its group with the error and changes nothing: each stream
//! refuses that batch. Outcomes of windows, consumers' cursors and learners'
//! snapshots ride in the next group; a group of those alone commits without an fsync (redb's `Durability::None`,
//! made durable by the next commit that has one), since losing one to a crash only
//! means a window scored again, a journal entry delivered again or a learner
//! restarting from its previous snapshot.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::{oneshot, watch};

use crate::error::EdgeLogError;
use crate::record::{encode_position, last_sequence, StreamPosition};
use crate::schema::{
    optional, Appended, EdgeLogStats, JournalMark, OutboxUsage, Outboxes, CURSORS, JOURNAL,
    LEARNERS, MAX_GROUP, OUTBOX, SAMPLES, STREAMS,
};

pub(crate) enum Job {
    Append(Append),
    /// A window has an outcome: out of the outbox. `dropped`: without a verdict.
    Outcome {
        sensor: Arc<str>,
        sequence: u64,
        dropped: bool,
    },
    Journal(Vec<u8>),
    Cursor {
        name: String,
        cursor: u64,
    },
    /// A continual learner's windows, replacing its last snapshot.
    Learner {
        name: String,
        snapshot: Vec<u8>,
    },
}

pub(crate) struct Append {
    pub(crate) sensor: Arc<str>,
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) batch: Vec<u8>,
    /// The windows the batch completed: (window sequence, encoded window).
    pub(crate) windows: Vec<(u64, Vec<u8>)>,
    pub(crate) position: StreamPosition,
    /// Most bytes the stream's outbox may hold after this append, oldest dropped first.
    pub(crate) make_room: Option<u64>,
    pub(crate) done: oneshot::Sender<Result<Appended, EdgeLogError>>,
}

/// The batches of one stream on disk, oldest first: (first sequence, last sequence).
type Batches = HashMap<Arc<str>, VecDeque<(u64, u64)>>;

/// One group's jobs, sorted by kind.
#[derive(Default)]
struct Group {
    appends: Vec<Append>,
    outcomes: Vec<(Arc<str>, u64, bool)>,
    journal: Vec<Vec<u8>>,
    cursors: Vec<(String, u64)>,
    learners: Vec<(String, Vec<u8>)>,
}

impl Group {
    fn len(&self) -> usize {
        self.appends.len()
            + self.outcomes.len()
            + self.journal.len()
            + self.cursors.len()
            + self.learners.len()
    }

    fn add(&mut self, job: Job) {
        match job {
            Job::Append(append) => self.appends.push(append),
            Job::Outcome {
                sensor,
                sequence,
                dropped,
            } => self.outcomes.push((sensor, sequence, dropped)),
            Job::Journal(entry) => self.journal.push(entry),
            Job::Cursor { name, cursor } => self.cursors.push((name, cursor)),
            Job::Learner { name, snapshot } => self.learners.push((name, snapshot)),
        }
    }

    /// Whether the group must reach the disk before it is answered.
    fn needs_fsync(&self) -> bool {
        !self.appends.is_empty() || !self.journal.is_empty()
    }
}

pub(crate) struct Writer {
    db: Arc<Database>,
    stats: Arc<EdgeLogStats>,
    outboxes: Arc<Mutex<Outboxes>>,
    batches: Batches,
    journal: JournalMark,
    retention: u64,
    marks: watch::Sender<JournalMark>,
}

impl Writer {
    /// The writer's state from what is on disk, and the receiver of the journal's marks.
    pub(crate) fn recover(
        db: Arc<Database>,
        stats: Arc<EdgeLogStats>,
        outboxes: Arc<Mutex<Outboxes>>,
        retention: u64,
    ) -> Result<(Writer, watch::Receiver<JournalMark>), EdgeLogError> {
        let read = db.begin_read().map_err(EdgeLogError::read)?;
        let mut batches = Batches::new();
        if let Some(samples) = optional(read.open_table(SAMPLES))? {
            for row in samples.iter().map_err(EdgeLogError::read)? {
                let (key, value) = row.map_err(EdgeLogError::read)?;
                let (sensor, first) = key.value();
                let last = last_sequence(value.value()).unwrap_or(first);
                batches
                    .entry(Arc::from(sensor))
                    .or_default()
                    .push_back((first, last));
            }
        }
        let mut usage = Outboxes::new();
        if let Some(outbox) = optional(read.open_table(OUTBOX))? {
            for row in outbox.iter().map_err(EdgeLogError::read)? {
                let (key, value) = row.map_err(EdgeLogError::read)?;
                let entry = usage.entry(Arc::from(key.value().0)).or_default();
                entry.windows += 1;
                entry.bytes += value.value().len() as u64;
            }
        }
        let parked = usage.values().map(|u| u.windows).sum();
        stats.parked.store(parked, Ordering::Relaxed);
        *outboxes.lock().unwrap_or_else(|p| p.into_inner()) = usage;
        let mut journal = JournalMark { oldest: 1, next: 1 };
        if let Some(table) = optional(read.open_table(JOURNAL))? {
            let first = table.first().map_err(EdgeLogError::read)?;
            let last = table.last().map_err(EdgeLogError::read)?;
            if let (Some((first, _)), Some((last, _))) = (first, last) {
                journal = JournalMark {
                    oldest: first.value(),
                    next: last.value() + 1,
                };
            }
        }
        let (marks, receiver) = watch::channel(journal);
        Ok((
            Writer {
                db,
                stats,
                outboxes,
                batches,
                journal,
                retention,
                marks,
            },
            receiver,
        ))
    }

    pub(crate) fn run(mut self, jobs: &mpsc::Receiver<Job>) {
        let commits = metrics::counter!("fogmesh_edge_log_commits_total");
        let group_size = metrics::histogram!("fogmesh_edge_log_group_appends");
        let parked = metrics::gauge!(crate::PARKED_WINDOWS);
        while let Ok(first) = jobs.recv() {
            let mut group = Group::default();
            let mut next = Some(first);
            while let Some(job) = next.take() {
                group.add(job);
                if group.len() < MAX_GROUP {
                    next = jobs.try_recv().ok();
                }
            }
            let result = self.commit(&group);
            match &result {
                Err(e) => {
                    tracing::error!(error = %e, appends = group.appends.len(), "edge log commit failed; the batches are refused");
                }
                Ok(_) if group.needs_fsync() => {
                    self.stats.commits.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .appends
                        .fetch_add(group.appends.len() as u64, Ordering::Relaxed);
                    commits.increment(1);
                    group_size.record(group.appends.len() as f64);
                }
                Ok(_) => {}
            }
            parked.set(self.stats.parked.load(Ordering::Relaxed) as f64);
            let answers: Vec<Result<Appended, EdgeLogError>> = match result {
                Ok(dropped) => dropped
                    .into_iter()
                    .map(|dropped| Ok(Appended { dropped }))
                    .collect(),
                Err(e) => vec![Err(e); group.appends.len()],
            };
            for (append, answer) in group.appends.into_iter().zip(answers) {
                let _ = append.done.send(answer);
            }
        }
    }

    /// One transaction for the whole group; the writer's state changes only once it
    /// committed. The windows each append dropped to make room, in order.
    fn commit(&mut self, group: &Group) -> Result<Vec<u64>, EdgeLogError> {
        let mut write = self.db.begin_write().map_err(EdgeLogError::commit)?;
        if !group.needs_fsync() {
            write
                .set_durability(redb::Durability::None)
                .map_err(EdgeLogError::commit)?;
        }
        let mut changed: Outboxes = HashMap::new();
        let mut trimmed: HashMap<Arc<str>, usize> = HashMap::new();
        let mut dropped_per_append = Vec::with_capacity(group.appends.len());
        let mut dropped_full: HashMap<Arc<str>, u64> = HashMap::new();
        let mut expired: HashMap<Arc<str>, u64> = HashMap::new();
        let mut samples_written = 0u64;
        let mut journal = self.journal;
        {
            let mut samples = write.open_table(SAMPLES).map_err(EdgeLogError::commit)?;
            let mut streams = write.open_table(STREAMS).map_err(EdgeLogError::commit)?;
            let mut outbox = write.open_table(OUTBOX).map_err(EdgeLogError::commit)?;
            for (sensor, sequence, dropped) in &group.outcomes {
                let mut u = current(&changed, &self.outboxes, sensor);
                if let Some(value) = outbox
                    .remove((&**sensor, *sequence))
                    .map_err(EdgeLogError::commit)?
                {
                    u.windows -= 1;
                    u.bytes = u.bytes.saturating_sub(value.value().len() as u64);
                    if *dropped {
                        u.dropped += 1;
                        u.dropped_before = u.dropped_before.max(sequence + 1);
                        *expired.entry(sensor.clone()).or_default() += 1;
                    }
                }
                changed.insert(sensor.clone(), u);
            }
            for append in &group.appends {
                let sensor: &str = &append.sensor;
                let mut u = current(&changed, &self.outboxes, &append.sensor);
                samples
                    .insert((sensor, append.first), append.batch.as_slice())
                    .map_err(EdgeLogError::commit)?;
                streams
                    .insert(sensor, encode_position(&append.position).as_slice())
                    .map_err(EdgeLogError::commit)?;
                for (sequence, window) in &append.windows {
                    if let Some(old) = outbox
                        .insert((sensor, *sequence), window.as_slice())
                        .map_err(EdgeLogError::commit)?
                    {
                        u.windows -= 1;
                        u.bytes = u.bytes.saturating_sub(old.value().len() as u64);
                    }
                    u.windows += 1;
                    u.bytes += window.len() as u64;
                }
                let mut dropped = 0u64;
                if let Some(limit) = append.make_room {
                    while u.bytes > limit {
                        let oldest = outbox
                            .range((sensor, 0)..=(sensor, u64::MAX))
                            .map_err(EdgeLogError::commit)?
                            .next()
                            .transpose()
                            .map_err(EdgeLogError::commit)?
                            .map(|(key, value)| (key.value().1, value.value().len() as u64));
                        let Some((sequence, bytes)) = oldest else {
                            break;
                        };
                        outbox
                            .remove((sensor, sequence))
                            .map_err(EdgeLogError::commit)?;
                        u.windows -= 1;
                        u.bytes = u.bytes.saturating_sub(bytes);
                        u.dropped += 1;
                        u.dropped_before = u.dropped_before.max(sequence + 1);
                        dropped += 1;
                    }
                }
                if dropped > 0 {
                    *dropped_full.entry(append.sensor.clone()).or_default() += dropped;
                }
                dropped_per_append.push(dropped);
                changed.insert(append.sensor.clone(), u);
                samples_written += batch_count(&append.batch);
                // Batches wholly before the unfinished window are windowed: drop them.
                // Several appends of one stream in a group trim against the latest.
                let keep_from = append.position.keep_from();
                let already = trimmed.get(&append.sensor).copied().unwrap_or(0);
                let stale: Vec<u64> = self
                    .batches
                    .get(&append.sensor)
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
            if !group.journal.is_empty() {
                let mut table = write.open_table(JOURNAL).map_err(EdgeLogError::commit)?;
                for entry in &group.journal {
                    table
                        .insert(journal.next, entry.as_slice())
                        .map_err(EdgeLogError::commit)?;
                    journal.next += 1;
                    while journal.next - journal.oldest > self.retention {
                        table.remove(journal.oldest).map_err(EdgeLogError::commit)?;
                        journal.oldest += 1;
                    }
                }
            }
            if !group.learners.is_empty() {
                let mut table = write.open_table(LEARNERS).map_err(EdgeLogError::commit)?;
                for (name, snapshot) in &group.learners {
                    table
                        .insert(name.as_str(), snapshot.as_slice())
                        .map_err(EdgeLogError::commit)?;
                }
            }
            if !group.cursors.is_empty() {
                let mut table = write.open_table(CURSORS).map_err(EdgeLogError::commit)?;
                for (name, cursor) in &group.cursors {
                    table
                        .insert(name.as_str(), *cursor)
                        .map_err(EdgeLogError::commit)?;
                }
            }
        }
        write.commit().map_err(EdgeLogError::commit)?;

        for (sensor, n) in trimmed {
            if let Some(queue) = self.batches.get_mut(&sensor) {
                queue.drain(..n.min(queue.len()));
            }
            self.stats.trimmed.fetch_add(n as u64, Ordering::Relaxed);
        }
        for append in &group.appends {
            self.batches
                .entry(append.sensor.clone())
                .or_default()
                .push_back((append.first, append.last));
        }
        self.stats
            .samples
            .fetch_add(samples_written, Ordering::Relaxed);
        {
            let mut outboxes = self.outboxes.lock().unwrap_or_else(|p| p.into_inner());
            let mut parked = self.stats.parked.load(Ordering::Relaxed);
            for (sensor, u) in changed {
                let before = outboxes.insert(sensor, u).map_or(0, |b| b.windows);
                parked = (parked + u.windows).saturating_sub(before);
            }
            self.stats.parked.store(parked, Ordering::Relaxed);
        }
        for (reason, drops) in [("full", dropped_full), ("expired", expired)] {
            for (sensor, n) in drops {
                metrics::counter!(crate::OUTBOX_DROPPED, "sensor" => sensor.to_string(), "reason" => reason).increment(n);
            }
        }
        if journal != self.journal {
            self.stats
                .journaled
                .fetch_add(journal.next - self.journal.next, Ordering::Relaxed);
            self.journal = journal;
            self.marks.send_replace(journal);
        }
        Ok(dropped_per_append)
    }
}

/// A sensor's outbox as this group has left it so far; the shared figures are read
/// (one short lock) only for a sensor the group has not touched yet, so readers never
/// wait for a copy of every sensor's.
fn current(changed: &Outboxes, shared: &Mutex<Outboxes>, sensor: &Arc<str>) -> OutboxUsage {
    if let Some(u) = changed.get(sensor) {
        return *u;
    }
    shared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(sensor)
        .copied()
        .unwrap_or_default()
}

fn batch_count(batch: &[u8]) -> u64 {
    batch
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u64::from(u32::from_le_bytes(b)))
}
