//! The status page's side of the HTTP listener: who may read it, and the page itself.
//!
//! **Who.** `/metrics` is for Prometheus and stays as it was, open wherever it is
//! served. The page and `/api/*` show more (URLs, error lines, repository contents), so
//! they are open only where the listener is bound to a loopback address (reaching it
//! already takes an account on the machine). Bound anywhere else (`0.0.0.0`, a LAN
//! address), they need `[daemon] web_token_file`, and the token as an
//! `Authorization: Bearer` header or a `?token=` link (a browser cannot send a header
//! when following a link); without that file they are refused with 403 and a body that
//! says how to enable them. The decision is from the address bound, not the peer: a
//! request from 127.0.0.1 to a listener on `0.0.0.0` needs the token too, since a
//! proxy on the machine would look the same. The token is kept as a BLAKE3 hash and
//! compared as one (`blake3::Hash` equality is constant time).
//!
//! **The page.** One HTML file, a stylesheet and a script, compiled into the binary
//! (`include_str!`) and served as one document, so that it works offline, behind a
//! token (the script carries the token on to its requests), and with nothing fetched
//! from anywhere else. The script draws everything from `/api/status` every few
//! seconds (one request, whatever the number of jobs) and a job's chains from
//! `/api/chains?job=NAME` when one is picked.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;

/// A token that opens the page and `/api/*` on a non-loopback address.
#[derive(Clone, PartialEq, Eq)]
pub struct WebToken(blake3::Hash);

impl std::fmt::Debug for WebToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebToken(..)")
    }
}

/// Shortest token accepted, as `snapsync serve` requires.
pub const MIN_TOKEN_LEN: usize = 16;

impl WebToken {
    /// Read a token file: one token on a line of its own; blank lines and lines
    /// starting with `#` are ignored; at least [`MIN_TOKEN_LEN`] printable ASCII
    /// characters other than space (it travels in a header and in a URL).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// The token file's text to a token.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text
            .lines()
            .map(|l| l.trim_end_matches('\r').trim())
            .enumerate()
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
        let Some((_, token)) = lines.next() else {
            return Err("holds no token".into());
        };
        if let Some((n, _)) = lines.next() {
            return Err(format!(
                "line {}: a second token; the page takes one",
                n + 1
            ));
        }
        if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the token must be at least {MIN_TOKEN_LEN} printable ASCII characters without spaces"
            ));
        }
        Ok(Self::new(token))
    }

    /// The token `token`.
    pub fn new(token: &str) -> Self {
        Self(blake3::hash(token.as_bytes()))
    }

    /// Whether `presented` is the token, in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        blake3::hash(presented.as_bytes()) == self.0
    }
}

/// Whether a listener on `addr` serves the page without a token.
pub fn is_loopback(addr: SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Who may read the page and `/api/*` on one listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone (a loopback address).
    Open,
    /// Whoever presents the token.
    Token(WebToken),
    /// No one (a non-loopback address without a token file).
    Refused,
}

impl Access {
    /// For a listener bound to `addr`, with the configured token.
    pub fn of(addr: SocketAddr, token: Option<WebToken>) -> Self {
        match (is_loopback(addr), token) {
            (true, _) => Access::Open,
            (false, Some(t)) => Access::Token(t),
            (false, None) => Access::Refused,
        }
    }
}

/// Why a request for the page is not answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token, or the wrong one: 401.
    Token,
    /// Not served on this address: 403.
    NotHere,
}

impl Denied {
    /// The body of the answer, one line.
    pub fn message(self) -> &'static str {
        match self {
            Denied::Token => "the status page needs the token of [daemon] web_token_file: send \"Authorization: Bearer TOKEN\" or open /?token=TOKEN\n",
            Denied::NotHere => "the status page and /api are not served on a non-loopback address without [daemon] web_token_file (/metrics is); set it, or listen on 127.0.0.1\n",
        }
    }
}

/// Whether a request with `authorization` (its header) and `query` (its URL's query
/// string) may read the page.
pub fn check(
    access: &Access,
    authorization: Option<&str>,
    query: Option<&str>,
) -> Result<(), Denied> {
    let token = match access {
        Access::Open => return Ok(()),
        Access::Refused => return Err(Denied::NotHere),
        Access::Token(t) => t,
    };
    let bearer = authorization.and_then(|h| {
        let (scheme, value) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| value.trim())
    });
    let in_query = query.and_then(|q| query_value(q, "token"));
    let presented = bearer.map(str::to_string).or(in_query);
    match presented {
        Some(p) if token.matches(&p) => Ok(()),
        _ => Err(Denied::Token),
    }
}

/// The value of `key` in a URL query string, percent-decoded (`+` stays `+`: a token
/// may hold one, written into a link as it is).
pub fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

const HTML: &str = include_str!("web/index.html");
const CSS: &str = include_str!("web/style.css");
const SCRIPT: &str = include_str!("web/app.js");

/// The page, one document with its stylesheet and script in it.
pub fn page() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| HTML.replace("/*STYLE*/", CSS).replace("/*SCRIPT*/", SCRIPT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_decided_by_the_address_bound() {
        for a in [
            "127.0.0.1:1",
            "127.3.4.5:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(a.parse().unwrap()), "{a}");
        }
        for a in ["0.0.0.0:1", "[::]:1", "192.168.1.2:1", "10.0.0.1:1"] {
            assert!(!is_loopback(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn the_token_opens_the_page_by_header_or_link_and_nothing_else_does() {
        let t = WebToken::parse("# the page\n\nsecret-token-0123456789\r\n").unwrap();
        let a = Access::Token(t);
        assert_eq!(
            check(&a, Some("Bearer secret-token-0123456789"), None),
            Ok(())
        );
        assert_eq!(
            check(&a, Some("bearer  secret-token-0123456789 "), None),
            Ok(())
        );
        assert_eq!(
            check(&a, None, Some("x=1&token=secret-token-0123456789")),
            Ok(())
        );
        assert_eq!(
            check(&a, None, Some("token=secret%2Dtoken-0123456789")),
            Ok(())
        );
        assert_eq!(check(&a, None, None), Err(Denied::Token));
        assert_eq!(
            check(&a, Some("Bearer secret-token-012345678"), None),
            Err(Denied::Token)
        );
        assert_eq!(
            check(&a, Some("Basic secret-token-0123456789"), None),
            Err(Denied::Token)
        );
        assert_eq!(check(&a, None, Some("token=")), Err(Denied::Token));
        assert_eq!(
            check(&Access::Refused, Some("Bearer x"), None),
            Err(Denied::NotHere)
        );
        assert_eq!(check(&Access::Open, None, None), Ok(()));
    }

    #[test]
    fn token_files_are_checked() {
        assert!(WebToken::parse("").unwrap_err().contains("no token"));
        assert!(WebToken::parse("short")
            .unwrap_err()
            .contains("at least 16"));
        assert!(WebToken::parse("has a space in it, long enough").is_err());
        assert!(
            WebToken::parse("aaaaaaaaaaaaaaaaaaaa\nbbbbbbbbbbbbbbbbbbbbbb\n")
                .unwrap_err()
                .contains("line 2")
        );
    }

    #[test]
    fn percent_decoding_keeps_what_is_not_an_escape() {
        assert_eq!(percent_decode("a%41b"), "aAb");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(
            query_value("job=vm%20101&x", "job").as_deref(),
            Some("vm 101")
        );
        assert_eq!(query_value("x", "x").as_deref(), Some(""));
    }

    #[test]
    fn the_page_holds_its_style_and_script() {
        let p = page();
        assert!(p.contains("</html>") && !p.contains("/*STYLE*/") && !p.contains("/*SCRIPT*/"));
        assert!(
            !p.contains("http://") && !p.contains("https://"),
            "nothing from elsewhere"
        );
    }
}
