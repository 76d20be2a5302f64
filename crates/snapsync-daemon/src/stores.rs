//! How the daemon reaches stores: traits the caller implements.
//!
//! Opening a store from a URL is the `snapsync` library's job (`snapsync::open`), and
//! that library's package is also the `snapsync` binary's, which runs this daemon: this
//! crate cannot depend on it without a dependency cycle. So the binary hands the daemon
//! an implementation of [`Stores`] built on `snapsync::open` (with the environment's
//! tokens and limits, as every other command uses), and this crate's tests hand it real
//! stores opened directly. The traits say only what a job needs: a source (which may take
//! its own snapshots), a destination (which may be a repository to prune).

use snapsync_core::Timestamp;
use snapsync_repo::Repository;
use snapsync_store::view::RepositoryView;
use snapsync_store::{SnapshotSink, SnapshotSource, StoreError};

use crate::config::UrlCheck;

/// An error from opening a store, whatever its type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A job's source, opened for one run.
pub trait JobSource: Send {
    /// As a replication source.
    fn source(&self) -> &dyn SnapshotSource;

    /// For sources whose snapshots snapsync takes (a running VM): take snapshot `name` of
    /// `volumes` (all when empty), aged `at`, to be replicated by this run. Returns
    /// `false` for sources that list snapshots made by others (the default).
    fn take_snapshot(
        &mut self,
        volumes: &[String],
        name: &str,
        at: Timestamp,
    ) -> Result<bool, StoreError> {
        let _ = (volumes, name, at);
        Ok(false)
    }

    /// Something that interrupts this source's blocked reads from another thread (a
    /// running VM's NBD connections), called when the run is cancelled.
    fn interrupter(&self) -> Option<Box<dyn Fn() + Send + Sync>> {
        None
    }

    /// End the run. A source that takes snapshots removes what the run added and its
    /// older snapshots but the newest `keep_at_least` per volume (or more, by its own
    /// default); the daemon counts in every snapshot a destination still needs as a base.
    fn finish(&mut self, keep_at_least: usize) -> Result<(), StoreError> {
        let _ = keep_at_least;
        Ok(())
    }
}

/// A job's destination, opened for one run.
pub trait JobDestination: Send {
    /// As a replication destination.
    fn sink(&self) -> &dyn SnapshotSink;

    /// As a repository this process can prune, if it is one.
    fn repository(&self) -> Option<&Repository> {
        None
    }

    /// As a repository whose size and chains the status page shows, if it is one:
    /// also a repository behind `snapsync serve`, which this process cannot prune but
    /// can ask. By default the repository this process holds.
    fn view(&self) -> Option<&dyn RepositoryView> {
        self.repository().map(|r| r as &dyn RepositoryView)
    }
}

/// Opens what jobs name. See the module documentation.
pub trait Stores: UrlCheck + Send + Sync {
    /// Open `url` as a job's source.
    fn open_source(&self, url: &str) -> Result<Box<dyn JobSource>, BoxError>;
    /// Open `url` as a job's destination.
    fn open_destination(&self, url: &str) -> Result<Box<dyn JobDestination>, BoxError>;
}

/// An error and its causes on one line, outermost first, each cause said once.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !line.ends_with(&s) {
            line.push_str(": ");
            line.push_str(&s);
        }
        cause = c.source();
    }
    line
}

/// A repository is a destination that can be pruned.
impl JobDestination for Repository {
    fn sink(&self) -> &dyn SnapshotSink {
        self
    }
    fn repository(&self) -> Option<&Repository> {
        Some(self)
    }
}
