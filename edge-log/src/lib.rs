//! A node's durable edge log: what makes an acknowledgement mean "on disk".
//!
//! A sensor stream appends each accepted batch (the raw samples, as the producer sent
//! them) together with the stream's position after it ([`StreamPosition`]: the next
//! expected sequence number, the last timestamp, the windows cut, where the unfinished
//! window starts) and acknowledges only once the append is committed. Appends from
//! every stream of the node meet in one writer thread that commits whatever has
//! arrived in one redb write transaction, so many producers share one fsync
//! ([`EdgeLog::append`]). After a crash, [`EdgeLog::stream`] gives a stream its
//! position back and the samples of its unfinished window, so it refuses a resend of
//! an acknowledged sample as a duplicate and windows every acknowledged sample once.
//!
//! The windows a batch completes are kept too, in the log's outbox, until they have an
//! outcome ([`EdgeLog::scored`]): a window that cannot be scored now (no expert
//! reachable) or was cut before a crash waits there and is scored later, oldest first.
//! Each sensor's outbox is measured ([`EdgeLog::outbox`]) so its stream can refuse new
//! samples when it is full, or have the oldest windows dropped (`make_room`), each drop
//! counted.
//!
//! The journal keeps the node's alerts under increasing cursors, so a subscriber that
//! was away reads on from where it left ([`EdgeLog::journal_page`]) and learns exactly
//! what was trimmed before it came back.
//!
//! Samples a stream has windowed are trimmed in the same commits: the log holds what a
//! restart needs, not a history.

mod error;
mod log;
mod record;
mod schema;
mod writer;

pub use error::EdgeLogError;
pub use log::{Batch, EdgeLog, EdgeLogOptions, JournalPage, StreamLog, DEFAULT_JOURNAL_RETENTION};
pub use record::{ParkedWindow, Sample, StreamPosition};
pub use schema::{Appended, EdgeLogStats, JournalMark, OutboxUsage, MAX_GROUP};

/// Windows in the outbox waiting for a verdict (a gauge).
pub const PARKED_WINDOWS: &str = "fogmesh_edge_log_parked_windows";
/// Windows dropped from the outbox without a verdict (labels `sensor`, `reason`).
pub const OUTBOX_DROPPED: &str = "fogmesh_outbox_dropped_windows_total";
