//! Bearer tokens and what each may do.
//!
//! The token file has one entry per line; blank lines and lines starting with `#` are
//! ignored:
//!
//! ```text
//! TOKEN                     # read-write access to every served store
//! TOKEN STORE ro            # read-only access to STORE
//! TOKEN STORE rw            # read-write access to STORE
//! ```
//!
//! A token may appear on several lines to reach several stores. Tokens are kept only as
//! BLAKE3 hashes and compared in constant time (`blake3::Hash` equality is).
//!
//! A token is at least 16 characters of printable ASCII other than space (`!` to `~`):
//! it travels in an HTTP header, where nothing else is portable, so anything else is
//! refused with the line number rather than becoming a token no client can send. Lines
//! may end in LF or CRLF (a file edited on Windows); the CR is not part of the entry.
//! An entry naming a store the server does not serve is kept (the store may be added
//! later) but reported by [`Tokens::unknown_stores`], since it is most likely a typo.

use std::collections::HashMap;
use std::path::Path;

use crate::RemoteError;

/// Access to one store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// list, diff, read, hints.
    Read,
    /// Also receive snapshots.
    Write,
}

#[derive(Clone, Debug, Default)]
struct Grant {
    /// Access to every store.
    all: Option<Access>,
    /// Access per store.
    stores: HashMap<String, Access>,
}

/// The tokens a server accepts.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    grants: Vec<(blake3::Hash, Grant)>,
    /// Per-store entries as (line number, store), for [`Tokens::unknown_stores`].
    store_lines: Vec<(usize, String)>,
}

/// What a presented token may do.
#[derive(Clone, Debug)]
pub struct Authorized(Grant);

impl Authorized {
    /// Access to `store`, if any.
    pub fn access(&self, store: &str) -> Option<Access> {
        let per = self.0.stores.get(store).copied();
        match (self.0.all, per) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Tokens {
    /// Read a token file.
    pub fn load(path: &Path) -> Result<Self, RemoteError> {
        let text = std::fs::read_to_string(path).map_err(|e| RemoteError::Config {
            what: format!("cannot read the token file {}: {e}", path.display()),
        })?;
        Self::parse(&text).map_err(|e| RemoteError::Config {
            what: format!("token file {}: {e}", path.display()),
        })
    }

    /// Parse the token file format.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut by_token: Vec<(blake3::Hash, Grant)> = Vec::new();
        let mut store_lines = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let hash = blake3::hash(f[0].as_bytes());
            if !f[0].bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "line {}: the token has a character outside printable ASCII ('!' to '~')",
                    n + 1
                ));
            }
            if f[0].len() < 16 {
                return Err(format!(
                    "line {}: the token is shorter than 16 characters",
                    n + 1
                ));
            }
            let idx = match by_token.iter().position(|(h, _)| *h == hash) {
                Some(i) => i,
                None => {
                    by_token.push((hash, Grant::default()));
                    by_token.len() - 1
                }
            };
            let g = &mut by_token[idx].1;
            match f.as_slice() {
                [_] => g.all = Some(Access::Write),
                [_, store, mode] => {
                    let access = match *mode {
                        "ro" => Access::Read,
                        "rw" => Access::Write,
                        m => {
                            return Err(format!(
                                "line {}: access {m:?} is neither ro nor rw",
                                n + 1
                            ))
                        }
                    };
                    let e = g.stores.entry(store.to_string()).or_insert(access);
                    *e = (*e).max(access);
                    store_lines.push((n + 1, store.to_string()));
                }
                _ => {
                    return Err(format!(
                        "line {}: expected `TOKEN` or `TOKEN STORE ro|rw`",
                        n + 1
                    ))
                }
            }
        }
        if by_token.is_empty() {
            return Err("it holds no token".into());
        }
        Ok(Self {
            grants: by_token,
            store_lines,
        })
    }

    /// The entries (line number, store) naming a store not in `served`.
    pub fn unknown_stores<'a>(&'a self, served: &[&str]) -> Vec<(usize, &'a str)> {
        self.store_lines
            .iter()
            .filter(|(_, s)| !served.contains(&s.as_str()))
            .map(|(n, s)| (*n, s.as_str()))
            .collect()
    }

    /// The grant of a presented token. Every known token is compared, whatever matches.
    pub fn check(&self, presented: &str) -> Option<Authorized> {
        let hash = blake3::hash(presented.as_bytes());
        let mut found = None;
        for (h, g) in &self.grants {
            // blake3::Hash's == is constant time.
            if *h == hash {
                found = Some(g);
            }
        }
        found.map(|g| Authorized(g.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants() {
        let t = Tokens::parse(
            "# comment\nAAAAAAAAAAAAAAAAAAAA\nBBBBBBBBBBBBBBBBBBBB repo ro\nBBBBBBBBBBBBBBBBBBBB img rw\n",
        )
        .unwrap();
        let a = t.check("AAAAAAAAAAAAAAAAAAAA").unwrap();
        assert_eq!(a.access("anything"), Some(Access::Write));
        let b = t.check("BBBBBBBBBBBBBBBBBBBB").unwrap();
        assert_eq!(b.access("repo"), Some(Access::Read));
        assert_eq!(b.access("img"), Some(Access::Write));
        assert_eq!(b.access("other"), None);
        assert!(t.check("CCCCCCCCCCCCCCCCCCCC").is_none());
        assert!(t.check("").is_none());
        assert!(Tokens::parse("short").is_err());
        assert!(Tokens::parse("BBBBBBBBBBBBBBBBBBBB repo rx").is_err());
        assert!(Tokens::parse("\n# none\n").is_err());
    }

    #[test]
    fn crlf_line_ends_are_accepted() {
        let t = Tokens::parse(
            "# from Windows\r\nAAAAAAAAAAAAAAAAAAAA\r\nBBBBBBBBBBBBBBBBBBBB repo ro\r\n",
        )
        .unwrap();
        // The CR belongs to neither the token nor the access mode.
        assert_eq!(
            t.check("AAAAAAAAAAAAAAAAAAAA").unwrap().access("x"),
            Some(Access::Write)
        );
        assert_eq!(
            t.check("BBBBBBBBBBBBBBBBBBBB").unwrap().access("repo"),
            Some(Access::Read)
        );
    }

    #[test]
    fn non_ascii_tokens_are_refused_with_their_line() {
        let e = Tokens::parse("# ok\nAAAAAAAAAAAAAAAAAAAA\nBBBBBBBBBBBBBBBBBBBü repo ro\n")
            .unwrap_err();
        assert!(e.starts_with("line 3: "), "{e}");
        assert!(e.contains("printable ASCII"), "{e}");
        let e = Tokens::parse("AAAAAAAAAAAAAAAA\u{7f}AAAA\n").unwrap_err();
        assert!(e.starts_with("line 1: "), "{e}");
    }

    #[test]
    fn entries_for_stores_not_served_are_reported() {
        let t = Tokens::parse(
            "AAAAAAAAAAAAAAAAAAAA\nBBBBBBBBBBBBBBBBBBBB repo ro\n\nBBBBBBBBBBBBBBBBBBBB rpeo rw\n",
        )
        .unwrap();
        assert_eq!(t.unknown_stores(&["repo", "img"]), [(4, "rpeo")]);
        assert!(t.unknown_stores(&["repo", "rpeo"]).is_empty());
    }
}
