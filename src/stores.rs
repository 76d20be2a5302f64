//! Opening stores for the command line: the library's [`snapsync::open`] with options
//! read from flags and the environment. This is the only code that reads `SNAPSYNC_*`
//! variables (besides `SNAPSYNC_LOG`, read where logging is set up).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use snapsync::{AnyStore, OpenError, OpenOptions, StoreKind, StoreUrl};
use snapsync_remote::ClientOptions;
use snapsync_repo::RepoOptions;

/// How long transient S3 errors are retried, whole seconds.
const RETRY_TIMEOUT_ENV: &str = "SNAPSYNC_RETRY_TIMEOUT_SECS";
/// How long writers and gc wait for each other, whole seconds.
const LOCK_WAIT_ENV: &str = "SNAPSYNC_LOCK_WAIT_SECS";
const CACHE_DIR_ENV: &str = "SNAPSYNC_CACHE_DIR";
/// `serve`: how long an untouched receive session lives, whole seconds (at least 1).
pub const SESSION_IDLE_ENV: &str = "SNAPSYNC_SESSION_IDLE_SECS";

/// A mistake in the command line found by the binary itself; exits 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// How `snapsync://` stores are reached.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// PEM certificate(s) to trust for snapsync:// servers instead of the system roots:
    /// a server presenting one of them is trusted (pinned), as is one they sign (else
    /// SNAPSYNC_CA).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// File whose first entry is the bearer token for snapsync:// stores (else
    /// SNAPSYNC_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// `name`'s value as whole seconds, if set.
pub fn seconds_from_env(name: &str) -> Result<Option<Duration>> {
    let Some(v) = std::env::var_os(name) else {
        return Ok(None);
    };
    match v.to_str().and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(secs) => Ok(Some(Duration::from_secs(secs))),
        None => anyhow::bail!("{name}={v:?} is not a whole number of seconds"),
    }
}

/// The repository options the environment sets.
pub fn repo_options() -> Result<RepoOptions> {
    let mut o = RepoOptions::default();
    if let Some(t) = seconds_from_env(RETRY_TIMEOUT_ENV)? {
        o = o.with_retry_timeout(t);
    }
    if let Some(t) = seconds_from_env(LOCK_WAIT_ENV)? {
        o = o.with_lock_wait(t);
    }
    Ok(o.with_cache_dir(cache_dir()))
}

/// Where repositories' block indexes are cached: `SNAPSYNC_CACHE_DIR` (empty: nowhere),
/// else `$XDG_CACHE_HOME/snapsync`, else `~/.cache/snapsync`.
fn cache_dir() -> Option<std::path::PathBuf> {
    match std::env::var_os(CACHE_DIR_ENV) {
        Some(v) if v.is_empty() => None,
        Some(v) => Some(v.into()),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
            .map(|d| d.join("snapsync")),
    }
}

impl ClientArgs {
    fn client_options(&self) -> Result<ClientOptions> {
        let token = match &self.token_file {
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
        if token.is_empty() {
            anyhow::bail!(
                "no token for snapsync:// stores: set SNAPSYNC_TOKEN or pass --token-file"
            );
        }
        let mut o = ClientOptions::new(token);
        let ca = self
            .ca
            .clone()
            .or_else(|| std::env::var_os("SNAPSYNC_CA").map(PathBuf::from));
        if let Some(p) = ca {
            let pem = std::fs::read(&p)
                .with_context(|| format!("cannot read the CA certificate {}", p.display()))?;
            o = o.with_ca_pem(pem);
        }
        Ok(o)
    }

    /// Parse `url` and open it, with the options its kind of store needs (and only
    /// those: a token is not asked for to open a local repository).
    pub fn open(&self, url: &str) -> Result<AnyStore> {
        let parsed = StoreUrl::parse(url)?;
        let mut options = OpenOptions::default();
        match &parsed {
            StoreUrl::Repo(_) => options = options.with_repo(repo_options()?),
            StoreUrl::Remote(u) => {
                options = options.with_client(
                    self.client_options()
                        .with_context(|| format!("cannot open {u}"))?,
                )
            }
            _ => {}
        }
        Ok(parsed.open(&options)?)
    }
}

/// Open a store for a repository-only command (or `serve`, which refuses remote URLs
/// itself): a remote store cannot be one, so it is refused before any token is asked
/// for.
pub fn open(url: &str) -> Result<AnyStore> {
    if let StoreUrl::Remote(u) = StoreUrl::parse(url)? {
        return Err(OpenError::NotARepository {
            location: u,
            kind: StoreKind::Remote,
        }
        .into());
    }
    ClientArgs::default().open(url)
}

/// The command-line advice the library leaves out of its messages, for errors it has.
pub fn hint(e: &anyhow::Error) -> Option<&'static str> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<OpenError>()? {
            OpenError::NotASink {
                kind: StoreKind::Qcow2,
                ..
            } => Some(", or restore --format qcow2"),
            OpenError::NoRepository { .. } => Some("; create one with `snapsync init`"),
            _ => None,
        })
}
