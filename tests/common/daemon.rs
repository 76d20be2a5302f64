//! A real `snapsync daemon` (and `snapsync serve`) for the tests that drive one:
//! tests/cli_daemon.rs and tests/cli_web.rs.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{bin, ok, ready_line};

pub const TOKEN: &str = "daemon-test-token-0123456789";

/// A running `snapsync daemon`.
pub struct DaemonProc {
    pub child: Child,
    pub config: PathBuf,
    /// `host:port` of `/metrics`.
    pub metrics: Option<String>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl DaemonProc {
    pub fn start(config: &Path, extra: &[&str]) -> Self {
        let mut child = bin()
            .args(["daemon", "--config", config.to_str().unwrap()])
            .args(extra)
            .env("SNAPSYNC_TOKEN", TOKEN)
            .env("SNAPSYNC_RETRY_TIMEOUT_SECS", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[daemon] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let line = ready_line(&mut child);
        assert!(
            line.contains("daemon running"),
            "the daemon did not start: {line:?}\n{}",
            log.lock().unwrap().join("\n")
        );
        let metrics = line
            .split("metrics on http://")
            .nth(1)
            .map(|r| r.trim().trim_end_matches("/metrics").to_string());
        DaemonProc {
            child,
            config: config.to_path_buf(),
            metrics,
            log,
        }
    }

    pub fn status(&self) -> Value {
        let out = ok(&[
            "status",
            "--config",
            self.config.to_str().unwrap(),
            "--json",
        ]);
        serde_json::from_str(&out).unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// SIGTERM; the exit code, within the grace period.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `f` until it holds, for up to `secs` seconds.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A config with `[daemon]` in `dir` and the given jobs.
pub fn write_config(dir: &Path, daemon_extra: &str, jobs: &str) -> PathBuf {
    let p = dir.join("snapsync.toml");
    std::fs::write(
        &p,
        format!(
            "[daemon]\nstate_dir = \"state\"\ncontrol_socket = \"run/control.sock\"\nmetrics_listen = \"127.0.0.1:0\"\n{daemon_extra}\n{jobs}"
        ),
    )
    .unwrap();
    p
}

pub fn job<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == name)
        .unwrap_or_else(|| panic!("no job {name} in {status}"))
}

pub fn destination<'a>(status: &'a Value, name: &str, url: &str) -> &'a Value {
    job(status, name)["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["url"] == url)
        .unwrap_or_else(|| panic!("no destination {url} in {status}"))
}

/// The snapshot names of `volume` in the store at `url`.
pub fn snapshots(url: &str, volume: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&ok(&["list", url, "--json"])).unwrap();
    v["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == volume)
        .flat_map(|v| v["snapshots"].as_array().unwrap().iter())
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// A `snapsync serve --insecure-plaintext` serving `repo` as `repo`, on `port` (0: any).
pub fn serve(dir: &Path, repo: &str, port: u16) -> (Child, u16) {
    serve_with(dir, repo, port, &[])
}

/// [`serve`] with `extra` arguments (a repository's `--password-file`, say).
pub fn serve_with(dir: &Path, repo: &str, port: u16, extra: &[&str]) -> (Child, u16) {
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    let mut child = bin()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--store", &format!("repo={repo}")])
        .args([
            "--token-file",
            tokens.to_str().unwrap(),
            "--insecure-plaintext",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = ready_line(&mut child);
    let port = line
        .split(" on ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    (child, port)
}

/// `GET path` from `addr` with `headers`: the status code, the head and the body.
pub fn get(addr: &str, path: &str, headers: &[&str]) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    // Bodies here are small: hyper sends them whole, with a content-length.
    (code, head.to_string(), body.to_string())
}
