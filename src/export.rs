//! `snapsync export`: one snapshot of any readable store, served read-only over NBD
//! until SIGINT or SIGTERM (then exit 0).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use snapsync::parse_target;
use snapsync_nbd::{Listener, ServerOptions, SnapshotExport};

use crate::stores::{ClientArgs, Usage};

/// Options of `export`.
#[derive(Debug)]
pub struct ExportArgs {
    pub store: String,
    pub client: ClientArgs,
    pub target: String,
    pub listen: String,
    pub name: Option<String>,
    pub cache_size: String,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub insecure_plaintext: bool,
}

pub fn run(a: ExportArgs) -> Result<ExitCode> {
    let target = parse_target(&a.target)?;
    let cache_bytes = parse_bytes(&a.cache_size)
        .ok_or_else(|| Usage(format!("--cache-size {:?} is not a size", a.cache_size)))?;
    let name = a.name.clone().unwrap_or_else(|| a.target.clone());
    let listener = bind(&a.listen, a.tls.is_some() || a.insecure_plaintext)?;
    let tls = match &a.tls {
        Some((cert, key)) => Some(Arc::new(snapsync_remote::tls::server_config(
            &snapsync_remote::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            },
            &[],
        )?)),
        None => None,
    };
    let store = a.client.open(&a.store)?;
    let export = SnapshotExport::open(store.source(), target.volume, target.snapshot, cache_bytes)
        .with_context(|| format!("cannot export {} of {}", a.target, a.store))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        crate::signals::on_interrupt(move || stop.store(true, Ordering::Relaxed))?;
    }
    let options = ServerOptions::new(name.clone())
        .with_description(format!("{} of {}", a.target, store.source().location()))
        .with_tls(tls.clone());
    // One line on stdout when ready: scripts and tests wait for it.
    println!(
        "snapsync: exporting {} as {name:?} on {} ({})",
        a.target,
        describe(&listener),
        if tls.is_some() { "TLS" } else { "plain" }
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    snapsync_nbd::serve(listener, &export, &options, &stop)?;
    Ok(ExitCode::SUCCESS)
}

/// Listen on `unix:PATH` or `HOST:PORT`. A TCP address other than loopback needs TLS
/// or the explicit plain-text flag, as `serve` does.
fn bind(listen: &str, secured_or_waived: bool) -> Result<Listener> {
    if let Some(path) = listen.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(Usage("--listen unix: needs a path".into()).into());
        }
        let l = std::os::unix::net::UnixListener::bind(path)
            .with_context(|| format!("cannot listen on {listen}"))?;
        return Ok(Listener::Unix(l, PathBuf::from(path)));
    }
    let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(listen)
        .map_err(|e| {
            Usage(format!(
                "--listen {listen:?} is not unix:PATH or HOST:PORT: {e}"
            ))
        })?
        .collect();
    if !secured_or_waived && addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(Usage(format!(
            "--listen {listen}: a TCP address other than loopback needs --tls-cert and --tls-key, or --insecure-plaintext"
        ))
        .into());
    }
    let l = std::net::TcpListener::bind(&addrs[..])
        .with_context(|| format!("cannot listen on {listen}"))?;
    Ok(Listener::Tcp(l))
}

fn describe(l: &Listener) -> String {
    match l {
        Listener::Tcp(t) => t
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into()),
        Listener::Unix(_, path) => format!("unix:{}", path.display()),
    }
}

/// A size in bytes: a number with an optional K, M, G (powers of 1024, also KiB...).
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("256MiB"), Some(256 << 20));
        assert_eq!(parse_bytes("1G"), Some(1 << 30));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("12 KiB"), Some(12 << 10));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("1T"), None);
    }
}
