//! Store URLs: which storage system a command-line argument names.
//!
//! | form | store |
//! | --- | --- |
//! | `raw:DIR`, `raw://DIR` | a directory of raw images |
//! | `file:///ABS/PATH`, or a plain path | a repository on local disk |
//! | `qcow2:///ABS/PATH`, `qcow2:PATH` | a qcow2 image, or a directory of them (source only) |
//! | `s3://BUCKET/PREFIX` | a repository in an S3 bucket (endpoint and credentials from `AWS_*`) |
//! | `snapsync://HOST:PORT/NAME` | a store served by `snapsync serve` (TLS) |
//! | `snapsync+http://HOST:PORT/NAME` | the same over plain text (`serve --insecure-plaintext`) |

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use snapsync_qcow2::Qcow2Store;
use snapsync_raw::RawStore;
use snapsync_repo::{Location, Repository};
use snapsync_store::{SnapshotSink, SnapshotSource};

/// An opened storage system of any kind.
pub enum AnyStore {
    /// `raw:`
    Raw(RawStore),
    /// `qcow2:`
    Qcow2(Box<Qcow2Store>),
    /// A repository.
    Repo(Box<Repository>),
    /// `snapsync://`: a store served by `snapsync serve`.
    Remote(Box<snapsync_remote::RemoteStore>),
}

/// How remote stores are reached: `--ca` and `--token-file`, set once by `main`.
#[derive(Debug, Clone, Default)]
pub struct RemoteArgs {
    /// PEM certificate(s) to trust for `snapsync://` servers (else `SNAPSYNC_CA`, else
    /// the system roots).
    pub ca: Option<PathBuf>,
    /// File holding the bearer token (else `SNAPSYNC_TOKEN`).
    pub token_file: Option<PathBuf>,
}

static REMOTE_ARGS: std::sync::OnceLock<RemoteArgs> = std::sync::OnceLock::new();

/// Record `--ca` and `--token-file` for remote stores opened later.
pub fn set_remote_args(args: RemoteArgs) {
    let _ = REMOTE_ARGS.set(args);
}

fn remote_options() -> Result<snapsync_remote::ClientOptions> {
    let args = REMOTE_ARGS.get().cloned().unwrap_or_default();
    let token = match &args.token_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_default()
            .to_string(),
        None => std::env::var("SNAPSYNC_TOKEN").unwrap_or_default(),
    };
    let ca = args
        .ca
        .or_else(|| std::env::var_os("SNAPSYNC_CA").map(PathBuf::from));
    let ca_pem = match ca {
        Some(p) => Some(
            std::fs::read(&p)
                .with_context(|| format!("cannot read the CA certificate {}", p.display()))?,
        ),
        None => None,
    };
    Ok(snapsync_remote::ClientOptions { token, ca_pem })
}

/// What a URL names, before opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A raw image directory.
    Raw(PathBuf),
    /// A qcow2 image or a directory of them.
    Qcow2(PathBuf),
    /// A repository.
    Repo(Location),
    /// A store on a `snapsync serve` server.
    Remote(String),
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
        if let Some(rest) = s.strip_prefix("qcow2:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                bail!(
                    "store URL {s:?} names no image or directory (use qcow2:///path/to/vm.qcow2)"
                );
            }
            return Ok(StoreUrl::Qcow2(absolute(Path::new(path))?));
        }
        if let Some(rest) = s.strip_prefix("file://") {
            if !rest.starts_with('/') {
                bail!("store URL {s:?} must name an absolute path (file:///abs/path)");
            }
            return Ok(StoreUrl::Repo(Location::Local(PathBuf::from(rest))));
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            if bucket.is_empty() {
                bail!("store URL {s:?} names no bucket (use s3://BUCKET/PREFIX)");
            }
            if !prefix.is_empty()
                && prefix
                    .split('/')
                    .any(|p| p.is_empty() || p == "." || p == "..")
            {
                bail!("store URL {s:?}: the prefix has an empty, `.` or `..` path segment");
            }
            return Ok(StoreUrl::Repo(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            }));
        }
        if s.starts_with("snapsync://") || s.starts_with("snapsync+http://") {
            snapsync_remote::RemoteUrl::parse(s)?;
            return Ok(StoreUrl::Remote(s.to_string()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            bail!("store URL {s:?}: unknown scheme {scheme:?} (known: raw:, file://, s3://, or a plain path)");
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
            StoreUrl::Qcow2(p) => AnyStore::Qcow2(Box::new(Qcow2Store::open(p)?)),
            StoreUrl::Repo(loc) => AnyStore::Repo(Box::new(Repository::open(loc.clone())?)),
            StoreUrl::Remote(u) => AnyStore::Remote(Box::new(snapsync_remote::RemoteStore::open(
                u,
                remote_options()?,
            )?)),
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
            AnyStore::Qcow2(q) => q.as_ref(),
            AnyStore::Repo(r) => r.as_ref(),
            AnyStore::Remote(r) => r.as_ref(),
        }
    }

    /// As a destination, if it can be one.
    pub fn sink(&self) -> Result<&dyn SnapshotSink> {
        match self {
            AnyStore::Repo(r) => Ok(r.as_ref()),
            AnyStore::Remote(r) if r.is_sink() => Ok(r.as_ref()),
            AnyStore::Remote(r) => bail!(
                "{} is a source-only store on its server; replicate into a repository",
                snapsync_store::Store::location(r.as_ref())
            ),
            AnyStore::Raw(r) => bail!(
                "{} is a raw image directory, which is a source only; replicate into a repository",
                snapsync_store::Store::location(r)
            ),
            AnyStore::Qcow2(q) => bail!(
                "{} is a qcow2 store, which is a source only; replicate into a repository, or restore --format qcow2",
                snapsync_store::Store::location(q.as_ref())
            ),
        }
    }

    /// As a repository, for repository-only commands.
    pub fn repository(&self) -> Result<&Repository> {
        match self {
            AnyStore::Repo(r) => Ok(r),
            AnyStore::Remote(r) => bail!(
                "{} is a remote store; run this command on its server",
                snapsync_store::Store::location(r.as_ref())
            ),
            AnyStore::Raw(r) => bail!("{} is not a repository", snapsync_store::Store::location(r)),
            AnyStore::Qcow2(q) => bail!(
                "{} is not a repository",
                snapsync_store::Store::location(q.as_ref())
            ),
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
        assert_eq!(
            StoreUrl::parse("s3://b/a/p/").unwrap(),
            StoreUrl::Repo(Location::S3 {
                bucket: "b".into(),
                prefix: "a/p".into()
            })
        );
        assert_eq!(
            StoreUrl::parse("s3://b").unwrap(),
            StoreUrl::Repo(Location::S3 {
                bucket: "b".into(),
                prefix: String::new()
            })
        );
        assert!(StoreUrl::parse("s3:///p").is_err());
        assert!(StoreUrl::parse("s3://b/a//p").is_err());
        assert!(StoreUrl::parse("file://rel").is_err());
        assert!(StoreUrl::parse("ftp://x").is_err());
        assert!(StoreUrl::parse("raw:").is_err());
        assert_eq!(
            StoreUrl::parse("qcow2:///v/vm.qcow2").unwrap(),
            StoreUrl::Qcow2("/v/vm.qcow2".into())
        );
        assert_eq!(
            StoreUrl::parse("qcow2:/v").unwrap(),
            StoreUrl::Qcow2("/v".into())
        );
        assert!(StoreUrl::parse("qcow2://").is_err());
        assert_eq!(
            StoreUrl::parse("snapsync://h:7000/repo").unwrap(),
            StoreUrl::Remote("snapsync://h:7000/repo".into())
        );
        assert!(StoreUrl::parse("snapsync+http://h:7000/r").is_ok());
        assert!(StoreUrl::parse("snapsync://h:7000").is_err());
        assert!(StoreUrl::parse("snapsync://h/r").is_err());
    }
}
