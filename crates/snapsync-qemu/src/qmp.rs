//! A QMP client: the JSON monitor protocol of QEMU and qemu-storage-daemon, over their
//! unix socket. Commands are answered in order; events that arrive meanwhile are kept
//! for [`Qmp::wait_event`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What can go wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP {socket}: {source}")]
    Io {
        /// The socket's path.
        socket: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered a command with an error.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's words.
        desc: String,
    },
    /// Something that is not QMP.
    #[error("QMP {socket}: {what}")]
    Protocol {
        /// The socket's path.
        socket: String,
        /// What was wrong.
        what: String,
    },
    /// An awaited event did not come.
    #[error("QMP {socket}: no {event} event within {seconds} s")]
    Timeout {
        /// The socket's path.
        socket: String,
        /// The event.
        event: String,
        /// How long it waited.
        seconds: u64,
    },
}

/// A QMP session in command mode.
pub struct Qmp {
    socket: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Qmp({})", self.socket)
    }
}

impl Qmp {
    /// Connect, read the greeting and enter command mode.
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let socket = path.display().to_string();
        let io = |source| QmpError::Io {
            socket: socket.clone(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().map_err(io)?),
            writer: stream,
            socket: socket.clone(),
            events: VecDeque::new(),
        };
        let greeting = q.message()?;
        if greeting.get("QMP").is_none() {
            return Err(q.protocol(format!("not a QMP greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn protocol(&self, what: String) -> QmpError {
        QmpError::Protocol {
            socket: self.socket.clone(),
            what,
        }
    }

    fn message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                socket: self.socket.clone(),
                source,
            })?;
        if n == 0 {
            return Err(self.protocol("QEMU closed the connection".into()));
        }
        serde_json::from_str(&line).map_err(|e| self.protocol(format!("{e}: {line:?}")))
    }

    /// Run `command` with `arguments`; its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").map_err(|source| QmpError::Io {
            socket: self.socket.clone(),
            source,
        })?;
        loop {
            let mut m = self.message()?;
            if m.get("event").is_some() {
                self.events.push_back(m);
                continue;
            }
            if let Some(r) = m.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(self.protocol(format!("an answer that is neither return nor error: {m}")));
        }
    }

    /// Wait for an event named `name` whose `data` satisfies `matches`.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        if let Some(i) = self
            .events
            .iter()
            .position(|e| e["event"] == name && matches(&e["data"]))
        {
            return Ok(self.events.remove(i).expect("found"));
        }
        while Instant::now() < deadline {
            let m = self.message()?;
            if m["event"] == name && matches(&m["data"]) {
                return Ok(m);
            }
            if m.get("event").is_some() {
                self.events.push_back(m);
            }
        }
        Err(QmpError::Timeout {
            socket: self.socket.clone(),
            event: name.to_string(),
            seconds: timeout.as_secs(),
        })
    }
}
