//! `snapsync serve`: open the named stores and hand them to the server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use snapsync_remote::{ServedStore, Server, ServerConfig, TlsFiles, Tokens};
use snapsync_store::{SnapshotSink, SnapshotSource};

use crate::stores::{self, AnyStore};

impl ServedStore for AnyStore {
    fn source(&self) -> &dyn SnapshotSource {
        AnyStore::source(self)
    }
    fn sink(&self) -> Option<&dyn SnapshotSink> {
        AnyStore::sink(self).ok()
    }
}

/// Options of `serve`.
#[derive(Debug)]
pub struct ServeArgs {
    pub listen: String,
    pub stores: Vec<String>,
    pub token_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure_plaintext: bool,
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    let Some(token_file) = &a.token_file else {
        bail!("serve needs --token-file FILE (one token per line, or `TOKEN STORE ro|rw`)");
    };
    let tokens = Tokens::load(token_file)?;
    let tls = match (a.tls_cert, a.tls_key, a.insecure_plaintext) {
        (Some(cert), Some(key), false) => Some(TlsFiles { cert, key }),
        (None, None, true) => None,
        (_, _, true) => bail!("--insecure-plaintext and --tls-cert/--tls-key exclude each other"),
        _ => bail!(
            "serve needs --tls-cert CERT and --tls-key KEY (or --insecure-plaintext to serve without encryption)"
        ),
    };
    let mut served: Vec<(String, Arc<dyn ServedStore>)> = Vec::new();
    for s in &a.stores {
        let Some((name, url)) = s.split_once('=') else {
            bail!("--store {s:?} is not NAME=URL");
        };
        snapsync_core::validate_name("store", name).with_context(|| format!("--store {s:?}"))?;
        if url.starts_with("snapsync://") || url.starts_with("snapsync+http://") {
            bail!("--store {s:?}: serving a remote store is not supported; serve it where it is");
        }
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
