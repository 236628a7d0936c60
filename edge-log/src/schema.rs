//! What the edge log's two sides share: its tables, what it counts, what it answers
//! with. Below both the [`crate::EdgeLog`] handle (which reads) and the writer thread
//! (which writes), so neither imports the other for these.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use redb::TableDefinition;

use crate::error::EdgeLogError;

pub(crate) const SAMPLES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("samples");
pub(crate) const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("streams");
pub(crate) const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");
pub(crate) const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
pub(crate) const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
pub(crate) const LEARNERS: TableDefinition<&str, &[u8]> = TableDefinition::new("learners");

/// Most jobs one transaction takes: a bound on the group's memory and on how long
/// the first append of a group waits for the rest to be written.
pub const MAX_GROUP: usize = 1024;

/// What the edge log has done since it opened.
#[derive(Debug, Default)]
pub struct EdgeLogStats {
    /// Transactions committed with an fsync (on a file-backed log).
    pub commits: AtomicU64,
    pub appends: AtomicU64,
    pub samples: AtomicU64,
    /// Batches trimmed because their stream had windowed every sample of them.
    pub trimmed: AtomicU64,
    /// Windows in the outbox now: cut, and without an outcome yet.
    pub parked: AtomicU64,
    /// Journal entries written.
    pub journaled: AtomicU64,
}

/// One sensor's outbox: what it holds now and what it lost since the log opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxUsage {
    /// Windows parked: cut and without an outcome yet.
    pub windows: u64,
    /// Their bytes as stored ([`ParkedWindow::stored_bytes`]).
    pub bytes: u64,
    /// Windows dropped without a verdict since the log opened: made room for newer
    /// ones ([`EdgeLog::append`] with `make_room`) or too old ([`EdgeLog::expired`]).
    pub dropped: u64,
    /// Every window of this sensor below this sequence that is not scored was
    /// dropped: drops take the oldest first, so one number says which.
    pub dropped_before: u64,
}

pub(crate) type Outboxes = HashMap<Arc<str>, OutboxUsage>;

/// The journal's extent: entries `oldest..next` are retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalMark {
    /// The oldest cursor retained (equal to `next` when the journal is empty).
    pub oldest: u64,
    /// The cursor the next entry will get. Cursors start at 1.
    pub next: u64,
}

/// What a batch's append did besides storing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    /// Parked windows of the stream dropped, oldest first, to make room.
    pub dropped: u64,
}

/// A table that may not exist yet (a log that never wrote one): `None` then.
pub(crate) fn optional<T>(table: Result<T, redb::TableError>) -> Result<Option<T>, EdgeLogError> {
    match table {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(EdgeLogError::read(e)),
    }
}
