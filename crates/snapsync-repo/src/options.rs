//! How a repository is opened: limits an embedding program sets, never read from the
//! environment here (only the `snapsync` binary reads environment variables).

use std::time::Duration;

use crate::backend::DEFAULT_RETRY_TIMEOUT_SECS;

/// Default for [`RepoOptions::lock_wait`]: long enough for a gc of a large repository.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(3600);

/// Options of [`Repository::open_with`](crate::Repository::open_with) and
/// [`Repository::init_with`](crate::Repository::init_with).
///
/// Build with `RepoOptions::default()` and the `with_*` methods; the struct is
/// non-exhaustive so that later options do not break callers.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct RepoOptions {
    /// How long transient S3 errors of one request are retried (zero: never).
    pub retry_timeout: Duration,
    /// How long writers and gc wait for each other's locks before failing.
    pub lock_wait: Duration,
    /// Entries per part of the manifests this writes (default
    /// [`PART_ENTRIES`](crate::format::PART_ENTRIES)): larger parts mean fewer objects
    /// and larger reads per lookup. Readers take any part size, so this can differ
    /// between writers of one repository.
    pub part_entries: usize,
    /// Where the block index is cached between processes (under the repository's id),
    /// so that a process does not read every pack index of the repository again: it
    /// reads the cache and the indexes of packs stored since. `None` (the default): no
    /// cache. A cache is used only while no gc ran since it was written, and is checked
    /// whole when read (a damaged one is rebuilt, never trusted).
    pub cache_dir: Option<std::path::PathBuf>,
    /// Passphrases and key files tried on an encrypted repository's keys (ignored by a
    /// plain one); `init_encrypted` wraps the new key under the first.
    pub credentials: crate::Credentials,
    /// Argon2id parameters of the keys `init_encrypted` and `add_key` create. Stored in
    /// each key object: opening uses the parameters of the key it tries.
    pub kdf: crate::KdfParams,
}

impl Default for RepoOptions {
    fn default() -> Self {
        Self {
            retry_timeout: Duration::from_secs(DEFAULT_RETRY_TIMEOUT_SECS),
            lock_wait: DEFAULT_LOCK_WAIT,
            part_entries: crate::format::PART_ENTRIES,
            cache_dir: None,
            credentials: crate::Credentials::default(),
            kdf: crate::KdfParams::default(),
        }
    }
}

impl RepoOptions {
    /// Set [`RepoOptions::retry_timeout`].
    pub fn with_retry_timeout(mut self, timeout: Duration) -> Self {
        self.retry_timeout = timeout;
        self
    }

    /// Set [`RepoOptions::part_entries`] (at least 1).
    pub fn with_part_entries(mut self, entries: usize) -> Self {
        self.part_entries = entries.max(1);
        self
    }

    /// Set [`RepoOptions::cache_dir`].
    pub fn with_cache_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.cache_dir = dir;
        self
    }

    /// Set [`RepoOptions::credentials`].
    pub fn with_credentials(mut self, credentials: crate::Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// Set [`RepoOptions::kdf`].
    pub fn with_kdf(mut self, kdf: crate::KdfParams) -> Self {
        self.kdf = kdf;
        self
    }

    /// Set [`RepoOptions::lock_wait`].
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }
}
