//! snapsync over the network.
//!
//! - [`server`]: `snapsync serve`, which exposes local stores under names, over HTTP/2
//!   with TLS (rustls) by default, behind bearer tokens ([`tokens`]).
//! - [`client`]: [`RemoteStore`], the `snapsync://HOST:PORT/NAME` store, which
//!   implements the store traits over the protocol, so the engine replicates to and from
//!   a server exactly as between local stores.
//! - [`proto`]: what both sides agree on; documented in `docs/PROTOCOL.md`.

pub mod client;
pub mod proto;
pub mod server;
pub mod tls;
pub mod tokens;

pub use client::{ClientOptions, RemoteStore, RemoteUrl};
pub use proto::PROTOCOL_VERSION;
pub use server::{ServedStore, Server, ServerConfig, TlsFiles};
pub use tokens::Tokens;

/// Errors of setting up a server or parsing a remote URL. Store operations fail with
/// [`snapsync_store::StoreError`].
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The server's configuration (token file, TLS files, store names, address).
    #[error("{what}")]
    Config {
        /// What is wrong, and where.
        what: String,
    },
    /// A remote store URL that cannot be used.
    #[error("store URL {url:?}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        why: String,
    },
}
