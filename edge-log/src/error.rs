//! Why the edge log could not open, append or read. Causes sit behind `Arc` because
//! one failed group commit answers every append in the group.

use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EdgeLogError {
    #[error("edge log {path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Arc<redb::DatabaseError>,
    },
    #[error("edge log {path}: cannot create its folder: {source}")]
    Folder {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A commit did not reach the disk (disk full, I/O error): nothing of it counts as
    /// acknowledged.
    #[error("edge log: the commit failed, nothing of it was stored: {0}")]
    Commit(#[source] Arc<redb::Error>),
    #[error("edge log: reading failed: {0}")]
    Read(#[source] Arc<redb::Error>),
    /// A record that does not decode: the file was damaged outside fogmesh.
    #[error("edge log: sensor `{sensor}`: damaged record at sequence {sequence}: {reason}")]
    Damaged {
        sensor: String,
        sequence: u64,
        reason: &'static str,
    },
    #[error("edge log: the writer thread stopped")]
    WriterGone,
}

impl EdgeLogError {
    pub(crate) fn commit(error: impl Into<redb::Error>) -> Self {
        EdgeLogError::Commit(Arc::new(error.into()))
    }

    pub(crate) fn read(error: impl Into<redb::Error>) -> Self {
        EdgeLogError::Read(Arc::new(error.into()))
    }
}
