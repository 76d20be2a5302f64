//! Opening stores for the command line: the library's [`snapsync::open`] with options
//! read from flags and the environment. This is the only code that reads `SNAPSYNC_*`
//! variables (besides `SNAPSYNC_LOG`, read where logging is set up).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use snapsync::{AnyStore, OpenError, OpenOptions, StoreKind, StoreUrl};
use snapsync_remote::ClientOptions;
use snapsync_repo::{Credentials, KdfParams, RepoOptions, WrappingKeyMemo};
use snapsync_store::StoreError;

/// How long transient S3 errors are retried, whole seconds.
const RETRY_TIMEOUT_ENV: &str = "SNAPSYNC_RETRY_TIMEOUT_SECS";
/// How long writers and gc wait for each other, whole seconds.
const LOCK_WAIT_ENV: &str = "SNAPSYNC_LOCK_WAIT_SECS";
const CACHE_DIR_ENV: &str = "SNAPSYNC_CACHE_DIR";
/// The passphrase of encrypted repositories (after any `--password-file`).
const PASSWORD_ENV: &str = "SNAPSYNC_PASSWORD";
/// Argon2id memory (KiB) and passes of the keys `init --encryption` and `key add`
/// create; the defaults (64 MiB, 3) are for production, smaller values for tests.
const KDF_MEMORY_ENV: &str = "SNAPSYNC_KDF_MEMORY_KIB";
const KDF_ITERATIONS_ENV: &str = "SNAPSYNC_KDF_ITERATIONS";
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

/// What opens encrypted repositories, from flags given anywhere on the command line
/// (global: every command that opens a repository takes them).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecretArgs {
    /// File holding the passphrase of encrypted repositories (its first line; else
    /// SNAPSYNC_PASSWORD). Repeatable: each is tried, e.g. for both ends of a replication.
    #[arg(long = "password-file", value_name = "FILE", global = true)]
    password_files: Vec<PathBuf>,
    /// File of random bytes (at least 32) that opens encrypted repositories instead of
    /// a passphrase. Repeatable.
    #[arg(long = "key-file", value_name = "FILE", global = true)]
    key_files: Vec<PathBuf>,
}

static SECRETS: std::sync::OnceLock<SecretArgs> = std::sync::OnceLock::new();

/// Remember the command line's secrets for every repository opened later.
pub fn set_secrets(secrets: SecretArgs) {
    let _ = SECRETS.set(secrets);
}

/// A passphrase file's first line (without its line ending); an empty one is refused.
pub fn read_password_file(path: &std::path::Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the password file {}", path.display()))?;
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        anyhow::bail!("the password file {} is empty", path.display());
    }
    Ok(line.to_vec())
}

/// A key file's bytes.
pub fn read_key_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the key file {}", path.display()))
}

/// The passphrases and key files given: `--password-file`s, SNAPSYNC_PASSWORD, then
/// `--key-file`s (the first is what `init --encryption` uses).
///
/// Wrapping keys derived from them are kept for the process's later opens (a daemon
/// opens its destinations again for every run, and each open would otherwise pay
/// Argon2id again): see `WrappingKeyMemo`.
fn credentials() -> Result<Credentials> {
    static MEMO: std::sync::LazyLock<WrappingKeyMemo> =
        std::sync::LazyLock::new(WrappingKeyMemo::new);
    let mut c = Credentials::default().remembering(MEMO.clone());
    let args = SECRETS.get().cloned().unwrap_or_default();
    for f in &args.password_files {
        c = c.with_passphrase(read_password_file(f)?);
    }
    if let Some(p) = std::env::var_os(PASSWORD_ENV).filter(|p| !p.is_empty()) {
        c = c.with_passphrase(p.into_encoded_bytes());
    }
    for f in &args.key_files {
        c = c.with_key_file(read_key_file(f)?);
    }
    Ok(c)
}

/// Argon2id parameters of new keys: the defaults, or SNAPSYNC_KDF_MEMORY_KIB and
/// SNAPSYNC_KDF_ITERATIONS.
pub fn kdf_params() -> Result<KdfParams> {
    let mut kdf = KdfParams::default();
    let number = |name: &str| -> Result<Option<u32>> {
        let Some(v) = std::env::var_os(name) else {
            return Ok(None);
        };
        match v.to_str().and_then(|s| s.trim().parse::<u32>().ok()) {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => anyhow::bail!("{name}={v:?} is not a positive whole number"),
        }
    };
    if let Some(m) = number(KDF_MEMORY_ENV)? {
        kdf.memory_kib = m;
    }
    if let Some(t) = number(KDF_ITERATIONS_ENV)? {
        kdf.iterations = t;
    }
    Ok(kdf)
}

/// The repository options the environment sets.
pub fn repo_options() -> Result<RepoOptions> {
    let mut o = RepoOptions::default()
        .with_credentials(credentials()?)
        .with_kdf(kdf_params()?);
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
        .or_else(|| {
            e.chain().find_map(|c| {
                let store = c
                    .downcast_ref::<StoreError>()
                    .or_else(|| match c.downcast_ref::<OpenError>()? {
                        OpenError::Store(s) => Some(s),
                        _ => None,
                    })?;
                matches!(store, StoreError::KeyRequired { .. }).then_some(
                    "; give its passphrase with --password-file FILE or SNAPSYNC_PASSWORD, or a key with --key-file FILE",
                )
            })
        })
}
