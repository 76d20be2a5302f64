//! Store URLs: which storage system a command-line argument names.
//!
//! | form | store |
//! | --- | --- |
//! | `raw:DIR`, `raw://DIR` | a directory of raw images |
//! | `file:///ABS/PATH`, or a plain path | a repository on local disk |

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use snapsync_raw::RawStore;
use snapsync_repo::{Location, Repository};
use snapsync_store::{SnapshotSink, SnapshotSource};

/// An opened storage system of any kind.
pub enum AnyStore {
    /// `raw:`
    Raw(RawStore),
    /// A repository.
    Repo(Box<Repository>),
}

/// What a URL names, before opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A raw image directory.
    Raw(PathBuf),
    /// A repository.
    Repo(Location),
}

fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(p)
    })
}

impl StoreUrl {
    /// Parse a store URL.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("raw:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                bail!("store URL {s:?} names no directory (use raw:/path/to/images)");
            }
            return Ok(StoreUrl::Raw(absolute(Path::new(path))?));
        }
        if let Some(rest) = s.strip_prefix("file://") {
            if !rest.starts_with('/') {
                bail!("store URL {s:?} must name an absolute path (file:///abs/path)");
            }
            return Ok(StoreUrl::Repo(Location::Local(PathBuf::from(rest))));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            bail!("store URL {s:?}: unknown scheme {scheme:?} (known: raw:, file://, or a plain path)");
        }
        if s.is_empty() {
            bail!("empty store URL");
        }
        Ok(StoreUrl::Repo(Location::Local(absolute(Path::new(s))?)))
    }

    /// Open it.
    pub fn open(&self) -> Result<AnyStore> {
        Ok(match self {
            StoreUrl::Raw(p) => AnyStore::Raw(RawStore::open(p)?),
            StoreUrl::Repo(loc) => AnyStore::Repo(Box::new(Repository::open(loc.clone())?)),
        })
    }
}

/// Parse and open.
pub fn open(s: &str) -> Result<AnyStore> {
    StoreUrl::parse(s)?.open()
}

impl AnyStore {
    /// As a replication source.
    pub fn source(&self) -> &dyn SnapshotSource {
        match self {
            AnyStore::Raw(r) => r,
            AnyStore::Repo(r) => r.as_ref(),
        }
    }

    /// As a destination, if it can be one.
    pub fn sink(&self) -> Result<&dyn SnapshotSink> {
        match self {
            AnyStore::Repo(r) => Ok(r.as_ref()),
            AnyStore::Raw(r) => bail!(
                "{} is a raw image directory, which is a source only; replicate into a repository",
                snapsync_store::Store::location(r)
            ),
        }
    }

    /// As a repository, for repository-only commands.
    pub fn repository(&self) -> Result<&Repository> {
        match self {
            AnyStore::Repo(r) => Ok(r),
            AnyStore::Raw(r) => bail!("{} is not a repository", snapsync_store::Store::location(r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            StoreUrl::parse("raw:/x").unwrap(),
            StoreUrl::Raw("/x".into())
        );
        assert_eq!(
            StoreUrl::parse("raw:///x").unwrap(),
            StoreUrl::Raw("/x".into())
        );
        assert_eq!(
            StoreUrl::parse("file:///r").unwrap(),
            StoreUrl::Repo(Location::Local("/r".into()))
        );
        assert_eq!(
            StoreUrl::parse("/r").unwrap(),
            StoreUrl::Repo(Location::Local("/r".into()))
        );
        assert!(StoreUrl::parse("file://rel").is_err());
        assert!(StoreUrl::parse("ftp://x").is_err());
        assert!(StoreUrl::parse("raw:").is_err());
    }
}
