//! Opening stores from URLs: the one place that knows every kind of store.

use std::sync::Arc;

use snapsync_qcow2::{Qcow2Options, Qcow2Store};
use snapsync_qemu::{QemuOptions, QemuSource};
use snapsync_raw::RawStore;
use snapsync_remote::{ClientOptions, RemoteStore, ServedStore};
use snapsync_repo::object_store::prefix::PrefixStore;
use snapsync_repo::object_store::ObjectStore;
use snapsync_repo::{Location, RepoOptions, Repository};
use snapsync_store::view::RepositoryView;
use snapsync_store::{SnapshotSink, SnapshotSource, StoreError};

use crate::url::{StoreUrl, UrlError};

/// How stores are opened: everything a library reads instead of the environment.
///
/// Build with `OpenOptions::default()` and the `with_*` methods.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// For repositories (`file://`, `s3://`, plain paths).
    pub repo: RepoOptions,
    /// For `snapsync://` stores: the token and the certificates to trust.
    pub client: ClientOptions,
    /// For `qcow2:` stores. `backing_anywhere` here applies to every qcow2 store, as
    /// `?backing=any` does for one URL: only for images whose author is trusted.
    pub qcow2: Qcow2Options,
    /// The object store behind `s3://` URLs, built by the caller (credentials, client
    /// settings, or any other `object_store` implementation) instead of one from the
    /// `AWS_*` variables. It is the bucket's store: the URL's key prefix applies inside
    /// it. Like object_store's `parse_url_opts`, this lets an embedding program own its
    /// storage configuration.
    pub object_store: Option<Arc<dyn ObjectStore>>,
}

impl OpenOptions {
    /// Set [`OpenOptions::repo`].
    pub fn with_repo(mut self, repo: RepoOptions) -> Self {
        self.repo = repo;
        self
    }

    /// Set [`OpenOptions::client`].
    pub fn with_client(mut self, client: ClientOptions) -> Self {
        self.client = client;
        self
    }

    /// Set [`OpenOptions::object_store`].
    pub fn with_object_store(mut self, store: Arc<dyn ObjectStore>) -> Self {
        self.object_store = Some(store);
        self
    }

    /// Set [`OpenOptions::qcow2`].
    pub fn with_qcow2(mut self, qcow2: Qcow2Options) -> Self {
        self.qcow2 = qcow2;
        self
    }
}

impl OpenOptions {
    /// Where the repository at `location` is reached: through the caller's object
    /// store for `s3://` when one is given.
    pub fn location(&self, location: &Location) -> Location {
        match (location, &self.object_store) {
            (Location::S3 { prefix, .. }, Some(store)) => {
                let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    store.clone()
                } else {
                    Arc::new(PrefixStore::new(store.clone(), prefix.as_str()))
                };
                Location::custom(location.to_string(), store)
            }
            _ => location.clone(),
        }
    }
}

/// What opening a store can fail with.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL cannot name a store.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A store that is a source only, asked for as a destination.
    #[error("{location} is {kind}, which is a source only; replicate into a repository")]
    NotASink {
        /// The store.
        location: String,
        /// What kind of store it is.
        kind: StoreKind,
    },
    /// A repository URL where there is no repository (nothing there, or no config
    /// object).
    #[error("{what}")]
    NoRepository {
        /// What was looked for, and where.
        what: String,
    },
    /// A store that is not a repository, asked for as one.
    #[error("{location} is {kind}, not a repository{}", if *kind == StoreKind::Remote { "; run this on its server" } else { "" })]
    NotARepository {
        /// The store.
        location: String,
        /// What kind of store it is.
        kind: StoreKind,
    },
}

/// The kinds of store a URL can name.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// `raw:`
    Raw,
    /// `qcow2:`
    Qcow2,
    /// A repository.
    Repository,
    /// A store on a `snapsync serve` server.
    Remote,
    /// `qemu:`: a running QEMU.
    Qemu,
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreKind::Raw => "a raw image directory",
            StoreKind::Qcow2 => "a qcow2 store",
            StoreKind::Repository => "a repository",
            StoreKind::Remote => "a remote store",
            StoreKind::Qemu => "a running QEMU",
        })
    }
}

/// An opened storage system of any kind.
#[derive(Debug)]
#[non_exhaustive]
pub enum AnyStore {
    /// `raw:`
    Raw(RawStore),
    /// `qcow2:`
    Qcow2(Box<Qcow2Store>),
    /// A repository.
    Repo(Box<Repository>),
    /// `snapsync://`: a store served by `snapsync serve`.
    Remote(Box<RemoteStore>),
    /// `qemu://`: a running QEMU's disks.
    Qemu(Box<QemuSource>),
}

impl StoreUrl {
    /// Open the store this URL names.
    pub fn open(&self, options: &OpenOptions) -> Result<AnyStore, OpenError> {
        Ok(match self {
            StoreUrl::Raw { path, layout } => {
                AnyStore::Raw(RawStore::open_with_layout(path, *layout)?)
            }
            StoreUrl::Qcow2 { path, backing_any } => {
                let options = options
                    .qcow2
                    .clone()
                    .with_backing_anywhere(options.qcow2.backing_anywhere || *backing_any);
                AnyStore::Qcow2(Box::new(Qcow2Store::open_with(path, &options)?))
            }
            StoreUrl::Qemu { socket, nbd } => AnyStore::Qemu(Box::new(QemuSource::open(
                socket,
                QemuOptions::default().with_nbd_socket(nbd.clone()),
            )?)),
            StoreUrl::Repo(loc) => AnyStore::Repo(Box::new(
                Repository::open_with(options.location(loc), &options.repo).map_err(
                    |e| match e {
                        StoreError::NotFound { what } => OpenError::NoRepository { what },
                        other => other.into(),
                    },
                )?,
            )),
            StoreUrl::Remote(u) => {
                AnyStore::Remote(Box::new(RemoteStore::open(u, options.client.clone())?))
            }
        })
    }
}

/// Parse `url` and open the store it names, whatever it can be used as.
pub fn open(url: &str, options: &OpenOptions) -> Result<AnyStore, OpenError> {
    StoreUrl::parse(url)?.open(options)
}

/// Open `url` as a replication source (every kind of store is one).
pub fn open_source(url: &str, options: &OpenOptions) -> Result<Box<dyn SnapshotSource>, OpenError> {
    Ok(match open(url, options)? {
        AnyStore::Raw(r) => Box::new(r),
        AnyStore::Qcow2(q) => q,
        AnyStore::Repo(r) => r,
        AnyStore::Remote(r) => r,
        AnyStore::Qemu(q) => q,
    })
}

/// Open `url` as a destination; a source-only store is an [`OpenError::NotASink`].
pub fn open_sink(url: &str, options: &OpenOptions) -> Result<Box<dyn SnapshotSink>, OpenError> {
    match open(url, options)? {
        AnyStore::Repo(r) => Ok(r),
        AnyStore::Remote(r) if r.is_sink() => Ok(r),
        other => Err(other.not_a_sink()),
    }
}

impl AnyStore {
    /// What kind of store it is.
    pub fn kind(&self) -> StoreKind {
        match self {
            AnyStore::Raw(_) => StoreKind::Raw,
            AnyStore::Qcow2(_) => StoreKind::Qcow2,
            AnyStore::Repo(_) => StoreKind::Repository,
            AnyStore::Remote(_) => StoreKind::Remote,
            AnyStore::Qemu(_) => StoreKind::Qemu,
        }
    }

    /// As a replication source.
    pub fn source(&self) -> &dyn SnapshotSource {
        match self {
            AnyStore::Raw(r) => r,
            AnyStore::Qcow2(q) => q.as_ref(),
            AnyStore::Repo(r) => r.as_ref(),
            AnyStore::Remote(r) => r.as_ref(),
            AnyStore::Qemu(q) => q.as_ref(),
        }
    }

    /// As a destination, if it can be one.
    pub fn sink(&self) -> Result<&dyn SnapshotSink, OpenError> {
        match self {
            AnyStore::Repo(r) => Ok(r.as_ref()),
            AnyStore::Remote(r) if r.is_sink() => Ok(r.as_ref()),
            _ => Err(self.not_a_sink()),
        }
    }

    fn not_a_sink(&self) -> OpenError {
        OpenError::NotASink {
            location: self.source().location(),
            kind: self.kind(),
        }
    }

    /// As a repository whose size and chains can be shown: one here, or one a
    /// `snapsync://` server holds (which answers for itself whether it holds one).
    pub fn view(&self) -> Option<&dyn RepositoryView> {
        match self {
            AnyStore::Repo(r) => Some(r.as_ref()),
            AnyStore::Remote(r) => Some(r.as_ref()),
            _ => None,
        }
    }

    /// As a repository, for repository-only operations (verify, prune, gc).
    pub fn repository(&self) -> Result<&Repository, OpenError> {
        match self {
            AnyStore::Repo(r) => Ok(r),
            _ => Err(OpenError::NotARepository {
                location: self.source().location(),
                kind: self.kind(),
            }),
        }
    }
}

impl ServedStore for AnyStore {
    fn source(&self) -> &dyn SnapshotSource {
        AnyStore::source(self)
    }
    fn sink(&self) -> Option<&dyn SnapshotSink> {
        AnyStore::sink(self).ok()
    }
    fn view(&self) -> Option<&dyn RepositoryView> {
        AnyStore::view(self)
    }
}
