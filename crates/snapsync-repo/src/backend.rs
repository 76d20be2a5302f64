//! The object-store backend: one synchronous facade over `object_store`.
//!
//! The repository is written against immutable objects and create-only conditional
//! writes, the one primitive both a local file system (hard link) and S3
//! (`If-None-Match: *`) provide atomically. That is why the same repository code serves
//! `file://` and `s3://`: there is one implementation, not two.
//!
//! The store's async API is driven by a small Tokio runtime owned here, so the rest of
//! the code stays synchronous and uses threads (rayon) for CPU work.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use snapsync_store::{Result, StoreError};

/// Where a repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on a local file system.
    Local(PathBuf),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "file://{}", p.display()),
        }
    }
}

/// Whether a put may replace an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Put {
    /// Fail with [`StoreError::AlreadyExists`] if the key exists (a commit point).
    Create,
}

/// Writes running in the background; see [`Backend::spawn_puts`].
#[derive(Debug)]
pub(crate) struct PendingPuts(tokio::task::JoinHandle<Result<()>>);

/// fsync a local object and its directory (no-op for remote stores).
fn sync_local(location: &Location, key: &str) -> Result<()> {
    let Location::Local(root) = location;
    let p = root.join(key);
    let sync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all());
    sync(&p).map_err(|e| StoreError::io(format!("fsync {}", p.display()), e))?;
    if let Some(dir) = p.parent() {
        sync(dir).map_err(|e| StoreError::io(format!("fsync {}", dir.display()), e))?;
    }
    Ok(())
}

/// A synchronous handle on an object store.
pub(crate) struct Backend {
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    location: Location,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backend({})", self.location)
    }
}

fn backend_err(context: String, e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound { what: context },
        object_store::Error::AlreadyExists { .. } => StoreError::AlreadyExists { what: context },
        object_store::Error::Precondition { .. } => StoreError::Conflict { what: context },
        other => StoreError::Backend {
            context,
            source: Box::new(other),
        },
    }
}

impl Backend {
    /// Open the backend for `location`, creating a local directory if `create`.
    pub(crate) fn open(location: Location, create: bool) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("snapsync-io")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("start the I/O runtime", e))?;
        let store: Arc<dyn ObjectStore> = match &location {
            Location::Local(dir) => {
                if create {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
                }
                if !dir.is_dir() {
                    return Err(StoreError::not_found(format!(
                        "repository directory {}",
                        dir.display()
                    )));
                }
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| backend_err(format!("open {}", dir.display()), e))?;
                Arc::new(fs)
            }
        };
        Ok(Self {
            store,
            runtime,
            location,
        })
    }

    pub(crate) fn location(&self) -> &Location {
        &self.location
    }

    fn describe(&self, key: &str) -> String {
        format!("{}/{key}", self.location)
    }

    /// Read a whole object; `None` when it does not exist.
    pub(crate) fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = ObjectPath::from(key);
        let r = self.runtime.block_on(async {
            let got = self.store.get(&path).await?;
            got.bytes().await
        });
        match r {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(backend_err(format!("read {}", self.describe(key)), e)),
        }
    }

    /// Read ranges from several objects concurrently.
    pub(crate) fn get_ranges_many(
        &self,
        requests: Vec<(String, Vec<std::ops::Range<u64>>)>,
    ) -> Result<Vec<Vec<Bytes>>> {
        let store = &self.store;
        self.runtime.block_on(async {
            futures::stream::iter(requests.into_iter().map(|(key, ranges)| async move {
                let path = ObjectPath::from(key.as_str());
                store
                    .get_ranges(&path, &ranges)
                    .await
                    .map_err(|e| backend_err(format!("read {}", self.describe(&key)), e))
            }))
            .buffered(8)
            .try_collect()
            .await
        })
    }

    /// Write an object.
    pub(crate) fn put(&self, key: &str, data: Bytes, mode: Put) -> Result<()> {
        let path = ObjectPath::from(key);
        let opts = PutOptions {
            mode: match mode {
                Put::Create => PutMode::Create,
            },
            ..Default::default()
        };
        self.runtime
            .block_on(self.store.put_opts(&path, PutPayload::from(data), opts))
            .map_err(|e| backend_err(self.describe(key), e))?;
        self.sync_local(key)
    }

    /// Start writing objects in order (e.g. a pack, then its index) in the background;
    /// the returned handle reports the outcome. This lets packs upload (and fsync)
    /// while the next one is being filled.
    pub(crate) fn spawn_puts(&self, objects: Vec<(String, Bytes)>) -> PendingPuts {
        let store = self.store.clone();
        let location = self.location.clone();
        let handle = self.runtime.spawn(async move {
            for (key, data) in objects {
                let path = ObjectPath::from(key.as_str());
                store
                    .put_opts(&path, PutPayload::from(data), PutOptions::default())
                    .await
                    .map_err(|e| backend_err(format!("{location}/{key}"), e))?;
                let loc = location.clone();
                tokio::task::spawn_blocking(move || sync_local(&loc, &key))
                    .await
                    .map_err(|e| StoreError::Backend {
                        context: "fsync task".into(),
                        source: Box::new(e),
                    })??;
            }
            Ok(())
        });
        PendingPuts(handle)
    }

    /// Wait for background writes.
    pub(crate) fn wait(&self, pending: PendingPuts) -> Result<()> {
        self.runtime
            .block_on(pending.0)
            .map_err(|e| StoreError::Backend {
                context: "background write".into(),
                source: Box::new(e),
            })?
    }

    /// Make a local write durable: the object store renames a staged file into place but
    /// does not fsync, so a power loss could otherwise lose a committed object.
    fn sync_local(&self, key: &str) -> Result<()> {
        sync_local(&self.location, key)
    }

    /// Keys (relative to the repository) and sizes under `prefix`.
    pub(crate) fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let path = ObjectPath::from(prefix);
        self.runtime
            .block_on(async {
                self.store
                    .list(Some(&path))
                    .map_ok(|m| (m.location.to_string(), m.size))
                    .try_collect::<Vec<_>>()
                    .await
            })
            .map_err(|e| backend_err(format!("list {}", self.describe(prefix)), e))
    }

    /// Delete an object; a missing object is not an error.
    pub(crate) fn delete(&self, key: &str) -> Result<()> {
        let path = ObjectPath::from(key);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend_err(format!("delete {}", self.describe(key)), e)),
        }
    }

    /// Fetch many whole objects concurrently (missing ones are `None`).
    pub(crate) fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>> {
        let store = &self.store;
        self.runtime.block_on(async {
            futures::stream::iter(keys.iter().map(|key| async move {
                let path = ObjectPath::from(key.as_str());
                let r = async { store.get(&path).await?.bytes().await }.await;
                match r {
                    Ok(b) => Ok(Some(b)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(backend_err(format!("read {}", self.describe(key)), e)),
                }
            }))
            .buffered(16)
            .try_collect()
            .await
        })
    }
}
