//! `snapsync serve`: open the named stores and hand them to the server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use snapsync::StoreUrl;
use snapsync_remote::{ServedStore, Server, ServerConfig, TlsFiles, Tokens};

use crate::stores::{self, Usage};

/// Options of `serve`.
#[derive(Debug)]
pub struct ServeArgs {
    pub listen: String,
    pub stores: Vec<String>,
    pub token_file: PathBuf,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure_plaintext: bool,
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    // clap has checked the flags: TLS files both or neither, and then plain text asked.
    let tls = match (a.tls_cert, a.tls_key, a.insecure_plaintext) {
        (Some(cert), Some(key), false) => Some(TlsFiles { cert, key }),
        _ => None,
    };
    let session_idle = match stores::seconds_from_env(stores::SESSION_IDLE_ENV)? {
        Some(d) if d.is_zero() => anyhow::bail!(
            "{}=0: the limit is at least 1 second",
            stores::SESSION_IDLE_ENV
        ),
        Some(d) => d,
        None => snapsync_remote::server::SESSION_IDLE,
    };
    // Every URL is checked before any store is opened.
    let mut named = Vec::new();
    for s in &a.stores {
        let Some((name, url)) = s.split_once('=') else {
            return Err(Usage(format!("--store {s:?} is not NAME=URL")).into());
        };
        snapsync_core::validate_name("store", name)
            .map_err(|e| Usage(format!("--store {s:?}: {e}")))?;
        if matches!(
            StoreUrl::parse(url).with_context(|| format!("--store {s:?}"))?,
            StoreUrl::Remote(_)
        ) {
            return Err(Usage(format!(
                "--store {s:?}: serving a remote store is not supported; serve it where it is"
            ))
            .into());
        }
        named.push((name, url));
    }
    let tokens = Tokens::load(&a.token_file)?;
    let names: Vec<&str> = named.iter().map(|(n, _)| *n).collect();
    for (line, store) in tokens.unknown_stores(&names) {
        tracing::warn!(
            "token file {}, line {line}: store {store:?} is not served (served: {})",
            a.token_file.display(),
            names.join(", ")
        );
    }
    let mut served: Vec<(String, Arc<dyn ServedStore>)> = Vec::new();
    for (name, url) in named {
        let store =
            stores::open(url).with_context(|| format!("cannot open store {name:?} ({url})"))?;
        served.push((name.to_string(), Arc::new(store)));
    }
    let plaintext = tls.is_none();
    let names: Vec<String> = served.iter().map(|(n, _)| n.clone()).collect();
    let server = Server::bind(
        ServerConfig {
            stores: served,
            tokens,
            tls,
            session_idle,
        },
        &a.listen,
    )?;
    let addr = server.local_addr()?;
    // One line on stdout when ready: scripts and tests wait for it.
    println!(
        "snapsync: serving {} on {addr} ({})",
        names.join(", "),
        if plaintext {
            "plain text, insecure"
        } else {
            "TLS"
        }
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    server.run()?;
    Ok(ExitCode::SUCCESS)
}
