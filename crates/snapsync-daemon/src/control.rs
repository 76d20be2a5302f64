//! The control socket: a unix socket speaking JSON lines, one request and one reply
//! per line, for `snapsync status` and `snapsync run-job`.
//!
//! ```text
//! → {"command":"status"}
//! ← {"ok":true,"status":{...}}
//! → {"command":"run-job","job":"vm101"}
//! ← {"ok":true,"run":{...}}          (when the run has ended)
//! ← {"ok":false,"error":"no job named \"x\""}
//! ```
//!
//! A unix socket rather than a TCP port: who may trigger runs is then decided by the
//! file's owner and mode (0660: root and the daemon's group), with no token to manage.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use crate::api::Api;
use crate::record::RunRecord;
use crate::status::Status;

/// A request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Request {
    /// The status document.
    Status,
    /// Run a job now and answer when it has run.
    RunJob {
        /// The job.
        job: String,
    },
}

/// A reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Reply {
    /// Whether the request was done.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// For `status`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<Status>,
    /// For `run-job`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub run: Option<RunRecord>,
}

impl Reply {
    fn error(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(e.into()),
            status: None,
            run: None,
        }
    }
}

/// What talking to the daemon can fail with.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing answers on the socket.
    #[error("cannot reach the daemon at {path} (is `snapsync daemon` running with this config?): {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed midway.
    #[error("talking to the daemon at {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered something else than a reply.
    #[error("the daemon at {path} answered what is not a reply: {detail}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The daemon refused.
    #[error("{0}")]
    Refused(String),
    /// Binding the socket failed.
    #[error("control socket {path}: {detail}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

/// Send `request` to the daemon at `socket` and wait for its reply (for `run-job`, as
/// long as the run takes). A refusal is [`ControlError::Refused`].
pub fn request(socket: &Path, request: &Request) -> Result<Reply, ControlError> {
    let io = |source| ControlError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let mut line = serde_json::to_string(request).expect("serialisable");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(ControlError::Protocol {
            path: socket.to_path_buf(),
            detail: "the connection closed without a reply".into(),
        });
    }
    let reply: Reply = serde_json::from_str(&answer).map_err(|e| ControlError::Protocol {
        path: socket.to_path_buf(),
        detail: e.to_string(),
    })?;
    if !reply.ok {
        return Err(ControlError::Refused(
            reply.error.unwrap_or_else(|| "refused".into()),
        ));
    }
    Ok(reply)
}

/// Bind the control socket at `path`: its directory is made if need be, a socket left
/// by a daemon that died is replaced, one a running daemon answers on is refused.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |detail: String| ControlError::Bind {
        path: path.to_path_buf(),
        detail,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create its directory: {e}")))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(err("another snapsync daemon answers on it".into()));
        }
        std::fs::remove_file(path)
            .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(format!("cannot set its mode: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| err(e.to_string()))?;
    Ok(listener)
}

/// Serve the control socket until the runtime stops.
pub async fn serve(listener: UnixListener, api: Api) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("control socket: {e}");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, api.clone()));
            }
            Err(e) => {
                warn!("control socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: tokio::net::UnixStream, api: Api) {
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::error(format!("not a request: {e}")),
            Ok(Request::Status) => match api.status().await {
                Ok(s) => Reply {
                    ok: true,
                    error: None,
                    status: Some(s),
                    run: None,
                },
                Err(e) => Reply::error(e),
            },
            Ok(Request::RunJob { job }) => match api.run_job(&job).await {
                Ok(r) => Reply {
                    ok: true,
                    error: None,
                    status: None,
                    run: Some(r),
                },
                Err(e) => Reply::error(e),
            },
        };
        let mut out = serde_json::to_string(&reply).expect("serialisable");
        out.push('\n');
        if let Err(e) = write.write_all(out.as_bytes()).await {
            debug!("control socket: a client left: {e}");
            return;
        }
    }
}
