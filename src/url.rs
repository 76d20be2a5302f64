//! Store URLs and snapshot targets: which storage system, volume and snapshot a
//! string names, before anything is opened.
//!
//! | form | store |
//! | --- | --- |
//! | `raw:DIR`, `raw://DIR` | a directory of raw images, `DIR/VOLUME/SNAPSHOT.img`; `?layout=by-snapshot` reads `DIR/SNAPSHOT/VOLUME.img` (btrfs snapshots of a directory of images) |
//! | `file:///ABS/PATH`, or a plain path | a repository on local disk |
//! | `qcow2:///ABS/PATH`, `qcow2:PATH` | a qcow2 image, or a directory of them (source only); `?backing=any` lets its backing files lie anywhere |
//! | `qemu:///ABS/PATH/QMP.sock` | a running QEMU's disks (source only; `?nbd=PATH` names the NBD server it already runs) |
//! | `s3://BUCKET/PREFIX` | a repository in an S3 bucket (endpoint and credentials from `AWS_*`) |
//! | `snapsync://HOST:PORT/NAME` | a store served by `snapsync serve` (TLS) |
//! | `snapsync+http://HOST:PORT/NAME` | the same over plain text |
//!
//! A string that fits none of these is a [`UrlError`]: a mistake of whoever wrote it,
//! found before any store is touched, so a program can tell it apart from a store that
//! failed (the `snapsync` binary exits 2 for it, as for any usage error).

use std::path::{Path, PathBuf};

use snapsync_core::validate_name;
use snapsync_raw::Layout;
use snapsync_repo::Location;
use snapsync_store::SnapshotRef;

/// A store URL or snapshot target that cannot be used. Every message is one line that
/// quotes the string it is about.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// The URL is empty.
    #[error("empty store URL")]
    Empty,
    /// The URL's scheme is known but it names no path, bucket or store.
    #[error("store URL {url:?} names no {what} (use {example})")]
    Incomplete {
        /// The URL.
        url: String,
        /// What is missing.
        what: &'static str,
        /// The form to use.
        example: &'static str,
    },
    /// A form this URL's scheme does not take.
    #[error("store URL {url:?}: {why}")]
    Malformed {
        /// The URL.
        url: String,
        /// What is wrong, and the right form.
        why: String,
    },
    /// A scheme snapsync does not know.
    #[error("store URL {url:?}: unknown scheme {scheme:?} (known: raw:, qcow2:, file://, s3://, snapsync://, snapsync+http://, or a plain path)")]
    UnknownScheme {
        /// The URL.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// A `?name=value` parameter this kind of store does not take, or a value it does
    /// not know.
    #[error("store URL {url:?}: unknown parameter {parameter:?} (known: {known})")]
    UnknownParameter {
        /// The URL.
        url: String,
        /// The parameter as written.
        parameter: String,
        /// The parameters this kind of store takes.
        known: &'static str,
    },
    /// A `VOLUME@SNAPSHOT` target, or a volume or snapshot name, that cannot be one.
    #[error("{target:?} is not VOLUME@SNAPSHOT: {why}")]
    Target {
        /// The target as written.
        target: String,
        /// What is wrong.
        why: String,
    },
    /// A volume or snapshot name that no store can hold.
    #[error(transparent)]
    Name(#[from] snapsync_core::NameError),
}

/// What a URL names, before opening.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A raw image directory.
    Raw {
        /// The directory.
        path: PathBuf,
        /// `?layout=by-volume` (the default) or `?layout=by-snapshot`.
        layout: Layout,
    },
    /// A qcow2 image or a directory of them.
    Qcow2 {
        /// The image or directory.
        path: PathBuf,
        /// `?backing=any`: backing files may lie anywhere (trusted images only).
        backing_any: bool,
    },
    /// A running QEMU or qemu-storage-daemon: its QMP socket (source only).
    Qemu {
        /// The QMP unix socket.
        socket: PathBuf,
        /// `?nbd=PATH`: the unix socket of an NBD server the process already runs.
        nbd: Option<PathBuf>,
    },
    /// A repository.
    Repo(Location),
    /// A store on a `snapsync serve` server (the URL as given).
    Remote(String),
}

/// `p` made absolute against the current directory, so a store's location stays the
/// same whatever the process does later.
fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    // A process without a current directory cannot have meant a relative path; keep
    // it relative and let opening it report the failure.
    std::env::current_dir()
        .map(|d| d.join(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

/// Split `PATH?QUERY` into the path and its `name=value` parameters.
fn split_query(rest: &str) -> (&str, Vec<&str>) {
    match rest.split_once('?') {
        Some((path, query)) => (path, query.split('&').collect()),
        None => (rest, Vec::new()),
    }
}

/// Refuse every parameter: the store takes none.
fn no_parameters(url: &str, params: &[&str]) -> Result<(), UrlError> {
    match params.first() {
        Some(p) => Err(UrlError::UnknownParameter {
            url: url.to_string(),
            parameter: p.to_string(),
            known: "none",
        }),
        None => Ok(()),
    }
}

/// The layout a `raw:` URL's parameters ask for: `layout=by-volume` (the default) or
/// `layout=by-snapshot`, once at most; anything else is refused.
fn raw_layout(url: &str, params: &[&str]) -> Result<Layout, UrlError> {
    let mut layout = None;
    for p in params {
        let l = match *p {
            "layout=by-volume" => Layout::ByVolume,
            "layout=by-snapshot" => Layout::BySnapshot,
            _ => {
                return Err(UrlError::UnknownParameter {
                    url: url.to_string(),
                    parameter: p.to_string(),
                    known: "layout=by-volume, layout=by-snapshot",
                })
            }
        };
        if layout.replace(l).is_some() {
            return Err(UrlError::Malformed {
                url: url.to_string(),
                why: "layout is given more than once".into(),
            });
        }
    }
    Ok(layout.unwrap_or_default())
}

impl StoreUrl {
    /// Parse a store URL.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let incomplete = |what, example| UrlError::Incomplete {
            url: s.to_string(),
            what,
            example,
        };
        let malformed = |why: &str| UrlError::Malformed {
            url: s.to_string(),
            why: why.to_string(),
        };
        if let Some(rest) = s.strip_prefix("raw:") {
            let (path, params) = split_query(rest.strip_prefix("//").unwrap_or(rest));
            let layout = raw_layout(s, &params)?;
            if path.is_empty() {
                return Err(incomplete("directory", "raw:/path/to/images"));
            }
            return Ok(StoreUrl::Raw {
                path: absolute(Path::new(path)),
                layout,
            });
        }
        if let Some(rest) = s.strip_prefix("qcow2:") {
            let (path, params) = split_query(rest);
            let path = match path.strip_prefix("//") {
                Some("") => "",
                Some(p) if !p.starts_with('/') => {
                    return Err(malformed(
                        "qcow2:// is followed by an absolute path (qcow2:///abs/path); for a relative one, use qcow2:relative/path",
                    ))
                }
                Some(p) => p,
                None => path,
            };
            let mut backing_any = false;
            for p in params {
                match p {
                    "backing=any" => backing_any = true,
                    _ => {
                        return Err(UrlError::UnknownParameter {
                            url: s.to_string(),
                            parameter: p.to_string(),
                            known: "backing=any",
                        })
                    }
                }
            }
            if path.is_empty() {
                return Err(incomplete(
                    "image or directory",
                    "qcow2:///path/to/vm.qcow2",
                ));
            }
            return Ok(StoreUrl::Qcow2 {
                path: absolute(Path::new(path)),
                backing_any,
            });
        }
        if let Some(rest) = s.strip_prefix("qemu://") {
            let (path, params) = split_query(rest);
            if !path.starts_with('/') {
                return Err(malformed(
                    "qemu:// is followed by the absolute path of a QMP socket (qemu:///run/vm.qmp)",
                ));
            }
            let mut nbd = None;
            for p in params {
                match p.strip_prefix("nbd=") {
                    Some(n) if n.starts_with('/') => nbd = Some(PathBuf::from(n)),
                    _ => {
                        return Err(UrlError::UnknownParameter {
                            url: s.to_string(),
                            parameter: p.to_string(),
                            known: "nbd=/abs/path/of/its/nbd.sock",
                        })
                    }
                }
            }
            return Ok(StoreUrl::Qemu {
                socket: PathBuf::from(path),
                nbd,
            });
        }
        if let Some(rest) = s.strip_prefix("file://") {
            let (path, params) = split_query(rest);
            no_parameters(s, &params)?;
            if path.is_empty() {
                return Err(incomplete("path", "file:///abs/path"));
            }
            if !path.starts_with('/') {
                return Err(malformed(
                    "it must name an absolute path (file:///abs/path)",
                ));
            }
            return Ok(StoreUrl::Repo(Location::Local(PathBuf::from(path))));
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (rest, params) = split_query(rest);
            no_parameters(s, &params)?;
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            if bucket.is_empty() {
                return Err(incomplete("bucket", "s3://BUCKET/PREFIX"));
            }
            if !prefix.is_empty()
                && prefix
                    .split('/')
                    .any(|p| p.is_empty() || p == "." || p == "..")
            {
                return Err(malformed(
                    "the prefix has an empty, `.` or `..` path segment",
                ));
            }
            return Ok(StoreUrl::Repo(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            }));
        }
        if s.starts_with("snapsync://") || s.starts_with("snapsync+http://") {
            snapsync_remote::RemoteUrl::parse(s).map_err(|e| match e {
                snapsync_remote::RemoteError::Url { url, why } => UrlError::Malformed { url, why },
                other => malformed(&other.to_string()),
            })?;
            return Ok(StoreUrl::Remote(s.to_string()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(UrlError::UnknownScheme {
                url: s.to_string(),
                scheme: scheme.to_string(),
            });
        }
        if s.is_empty() {
            return Err(UrlError::Empty);
        }
        Ok(StoreUrl::Repo(Location::Local(absolute(Path::new(s)))))
    }
}

/// Split and check `VOLUME@SNAPSHOT`: both parts present and valid names.
pub fn parse_target(s: &str) -> Result<SnapshotRef<'_>, UrlError> {
    let bad = |why: String| UrlError::Target {
        target: s.to_string(),
        why,
    };
    let Some((volume, snapshot)) = s.split_once('@') else {
        return Err(bad("it has no '@'".into()));
    };
    for (kind, name) in [("volume", volume), ("snapshot", snapshot)] {
        validate_name(kind, name).map_err(|e| bad(e.to_string()))?;
    }
    Ok(SnapshotRef::new(volume, snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(path: &str, layout: Layout) -> StoreUrl {
        StoreUrl::Raw {
            path: path.into(),
            layout,
        }
    }

    fn qcow2(path: &str, backing_any: bool) -> StoreUrl {
        StoreUrl::Qcow2 {
            path: path.into(),
            backing_any,
        }
    }

    #[test]
    fn parses_urls() {
        assert_eq!(
            StoreUrl::parse("raw:/x").unwrap(),
            raw("/x", Layout::ByVolume)
        );
        assert_eq!(
            StoreUrl::parse("raw:///x").unwrap(),
            raw("/x", Layout::ByVolume)
        );
        assert_eq!(
            StoreUrl::parse("raw:/x?layout=by-snapshot").unwrap(),
            raw("/x", Layout::BySnapshot)
        );
        assert_eq!(
            StoreUrl::parse("raw:///x?layout=by-volume").unwrap(),
            raw("/x", Layout::ByVolume)
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
        assert_eq!(
            StoreUrl::parse("qcow2:///v/vm.qcow2").unwrap(),
            qcow2("/v/vm.qcow2", false)
        );
        assert_eq!(StoreUrl::parse("qcow2:/v").unwrap(), qcow2("/v", false));
        assert_eq!(
            StoreUrl::parse("qcow2:///v?backing=any").unwrap(),
            qcow2("/v", true)
        );
        assert_eq!(
            StoreUrl::parse("qcow2:rel").unwrap(),
            qcow2(
                std::env::current_dir()
                    .unwrap()
                    .join("rel")
                    .to_str()
                    .unwrap(),
                false
            )
        );
        assert_eq!(
            StoreUrl::parse("snapsync://h:7000/repo").unwrap(),
            StoreUrl::Remote("snapsync://h:7000/repo".into())
        );
        assert!(StoreUrl::parse("snapsync+http://h:7000/r").is_ok());
    }

    #[test]
    fn refuses_malformed_urls() {
        for bad in [
            "",
            "s3://",
            "s3:///p",
            "s3://b/a//p",
            "file://",
            "file://rel",
            "ftp://x",
            "raw:",
            "raw://",
            "qcow2:",
            "qcow2://",
            "qcow2://relative/vm.qcow2",
            "qcow2:///v?backing=some",
            "qcow2:///v?color=red",
            "raw:/x?backing=any",
            "raw:/x?layout=by-date",
            "raw:/x?layout=",
            "raw:/x?layout=by-snapshot&layout=by-volume",
            "raw:/x?layout=by-snapshot&x=1",
            "raw:?layout=by-snapshot",
            "file:///r?x=1",
            "s3://b/p?region=eu",
            "snapsync://h:7000",
            "snapsync://h/r",
            "snapsync://host",
            "snapsync://h:1/a b",
        ] {
            let e = StoreUrl::parse(bad).expect_err(bad);
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            if !bad.is_empty() {
                assert!(msg.contains(&format!("{bad:?}")), "{bad}: {msg}");
            }
        }
        let e = StoreUrl::parse("qcow2://relative").unwrap_err().to_string();
        assert!(
            e.contains("qcow2:///abs/path") && e.contains("qcow2:relative/path"),
            "{e}"
        );
    }

    #[test]
    fn parses_targets() {
        let t = parse_target("vm@mon").unwrap();
        assert_eq!((t.volume, t.snapshot), ("vm", "mon"));
        for bad in ["vm@", "@snap", "vm", "", "vm@a@b", "vm@a\nb", "v m@s"] {
            let e = parse_target(bad).expect_err(bad).to_string();
            assert!(!e.contains('\n'), "{e}");
            assert!(e.starts_with(&format!("{bad:?}")), "{e}");
        }
    }
}
