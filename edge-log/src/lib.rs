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
//! The windows a batch completes are kept too, in the log's outbox, until their router
//! has an outcome for them ([`EdgeLog::scored`]): a window cut before a crash and not
//! yet scored is handed on again after the restart.
//!
//! Samples a stream has windowed are trimmed in the same commits: the log holds what a
//! restart needs, not a history.

mod error;
mod log;
mod record;

pub use error::EdgeLogError;
pub use log::{Batch, EdgeLog, EdgeLogStats, StreamLog, MAX_GROUP};
pub use record::{ParkedWindow, Sample, StreamPosition};
