//! End-to-end tests of `snapsync serve` and `snapsync://` stores: real processes on
//! 127.0.0.1, plain text and TLS, push, pull, remote to remote, refusals, a server or a
//! client killed mid-transfer then a rerun that resumes, and idle receive sessions
//! abandoned after `SNAPSYNC_SESSION_IDLE_SECS`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use snapsync_remote::PROTOCOL_VERSION;

const T0: u64 = 1_700_000_000;
const TOKEN: &str = "test-token-rw-0123456789";
const RO_TOKEN: &str = "test-token-ro-0123456789";

/// A running `snapsync serve`; killed when dropped.
struct ServerProc {
    child: Child,
    port: u16,
    args: Vec<String>,
    /// Its stderr (log) lines so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl ServerProc {
    /// Wait until a log line contains `needle`; false if none did within `limit`.
    fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token_file(dir: &Path) -> PathBuf {
    let p = dir.join("tokens");
    std::fs::write(
        &p,
        format!("# test tokens\n{TOKEN}\n{RO_TOKEN} repo ro\n{RO_TOKEN} img ro\n"),
    )
    .unwrap();
    p
}

/// Start a server on `port` (0: any) and wait until it says it listens.
fn start_server(args: &[String], port: u16) -> ServerProc {
    start_server_env(args, port, &[])
}

/// [`start_server`] with extra environment variables. Its stderr is collected (and
/// echoed into the test's output).
fn start_server_env(args: &[String], port: u16, env: &[(&str, &str)]) -> ServerProc {
    let mut a = vec![
        "serve".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    a.extend_from_slice(args);
    let mut child = bin()
        .args(&a)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let line = strip_ansi(&line);
            eprintln!("[server] {line}");
            sink.lock().unwrap().push(line);
        }
    });
    let line = ready_line(&mut child);
    assert!(line.contains("serving"), "server did not start: {line:?}");
    let port = line
        .trim()
        .rsplit_once(" on ")
        .and_then(|(_, r)| r.split(' ').next())
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    ServerProc {
        child,
        port,
        args: args.to_vec(),
        log,
    }
}

/// A log line without its colours.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
        } else if chars.next() == Some('[') {
            // A control sequence ends with a byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

fn plaintext_server(dir: &Path, stores: &[(&str, String)]) -> ServerProc {
    plaintext_server_env(dir, stores, &[])
}

fn plaintext_server_env(dir: &Path, stores: &[(&str, String)], env: &[(&str, &str)]) -> ServerProc {
    let mut args: Vec<String> = vec![
        "--token-file".into(),
        token_file(dir).to_str().unwrap().into(),
        "--insecure-plaintext".into(),
    ];
    for (n, u) in stores {
        args.push("--store".into());
        args.push(format!("{n}={u}"));
    }
    start_server_env(&args, 0, env)
}

fn env(token: &str) -> Vec<(String, String)> {
    vec![("SNAPSYNC_TOKEN".to_string(), token.to_string())]
}

fn url(s: &ServerProc, name: &str) -> String {
    format!("snapsync+http://127.0.0.1:{}/{name}", s.port)
}

fn replicate_env(args: &[&str], token: &str) -> Vec<serde_json::Value> {
    let mut a = vec!["replicate"];
    a.extend_from_slice(args);
    a.push("--json");
    ok_env(&a, &env(token))
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn failure_line(out: &Output) -> String {
    assert!(!out.status.success(), "unexpected success");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    err
}

/// A usage error (a malformed URL or target): exit 2, one line.
fn usage_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    err
}

fn restore_equals(repo: &str, target: &str, dir: &Path, want: &[u8]) {
    let out = dir.join(format!("{}.out", target.replace('@', "_")));
    ok(&["restore", repo, target, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == want, "{target} differs");
}

/// One raw HTTP/1.1 request to the server; returns (status, body).
fn raw_http(port: u16, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {resp:?}"));
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn push_raw_to_a_remote_repository_then_incremental_then_pull_back() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let s1 = random(1, 6 * MIB);
    let mut s2 = s1.clone();
    scribble(&mut s2, 9, 20, 10_000);
    write_image(&images, "vm", "s1", &s1, T0);
    write_image(&images, "vm", "s2", &s2, T0 + 60);
    let repo = init_repo(dir.path(), &[]);
    let server = plaintext_server(dir.path(), &[("repo", repo.clone())]);
    let src = format!("raw:{}", images.display());
    let remote = url(&server, "repo");

    let r = replicate_env(&[&src, &remote, "--snapshot", "s1"], TOKEN);
    assert_eq!(r.len(), 1);
    assert!(num(&r[0], "sent_bytes") >= 6 * MIB as u64);
    let r = replicate_env(&[&src, &remote], TOKEN);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["base"], "s1");
    assert!(
        num(&r[0], "sent_bytes") < 3 * MIB as u64,
        "incremental sent too much: {}",
        r[0]
    );
    // Nothing more to send.
    assert!(replicate_env(&[&src, &remote], TOKEN).is_empty());
    // Listing over the wire matches the local one.
    let remote_list = ok_env(&["list", &remote, "--json"], &env(TOKEN));
    assert_eq!(remote_list, ok(&["list", &repo, "--json"]));
    restore_equals(&repo, "vm@s1", dir.path(), &s1);
    restore_equals(&repo, "vm@s2", dir.path(), &s2);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["verify", &repo, "--read-data", "--json"])).unwrap();
    assert_eq!(v["ok"], true, "{v}");

    // Pull: the remote repository as a source into a local one.
    let local = dir.path().join("local");
    let local = local.to_str().unwrap();
    ok(&["init", local]);
    let r = replicate_env(&[&remote, local], TOKEN);
    assert_eq!(r.len(), 2);
    restore_equals(local, "vm@s2", &dir.path().join("images"), &s2);
}

#[test]
fn pull_from_a_remote_qcow2_source_and_remote_to_remote() {
    if std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("qemu-img not installed: skipping the qcow2 part");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let qdir = dir.path().join("qcow2");
    std::fs::create_dir_all(&qdir).unwrap();
    let raw = dir.path().join("base.raw");
    let s1 = random(5, 4 * MIB);
    std::fs::write(&raw, &s1).unwrap();
    let img = qdir.join("vm.qcow2");
    let q = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    };
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    q(&["snapshot", "-c", "s1", img.to_str().unwrap()]);

    let repo_a = dir.path().join("a");
    let repo_b = dir.path().join("b");
    ok(&["init", repo_a.to_str().unwrap()]);
    ok(&["init", repo_b.to_str().unwrap()]);
    let server = plaintext_server(
        dir.path(),
        &[
            ("img", format!("qcow2:{}", qdir.display())),
            ("a", repo_a.to_str().unwrap().into()),
            ("b", repo_b.to_str().unwrap().into()),
        ],
    );
    // Pull: remote qcow2 -> local repository.
    let local = dir.path().join("local");
    ok(&["init", local.to_str().unwrap()]);
    let r = replicate_env(&[&url(&server, "img"), local.to_str().unwrap()], TOKEN);
    assert_eq!(r.len(), 1);
    restore_equals(local.to_str().unwrap(), "vm@s1", dir.path(), &s1);

    // Remote to remote: qcow2 on the server -> repository a -> repository b, both
    // addressed over the wire; identities carry over, so b's hints name a.
    replicate_env(&[&url(&server, "img"), &url(&server, "a")], TOKEN);
    let r = replicate_env(&[&url(&server, "a"), &url(&server, "b")], TOKEN);
    assert_eq!(r.len(), 1);
    restore_equals(repo_b.to_str().unwrap(), "vm@s1", dir.path(), &s1);
    // A qcow2 store is a source only, also remotely.
    let out = run_env(
        &["replicate", &url(&server, "a"), &url(&server, "img")],
        &env(TOKEN),
    );
    assert!(failure_line(&out).contains("source"));
}

#[test]
fn refusals_bad_token_read_only_token_traversal_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    write_image(&images, "vm", "s1", &random(3, MIB), T0);
    let repo = init_repo(dir.path(), &[]);
    let server = plaintext_server(
        dir.path(),
        &[
            ("repo", repo.clone()),
            ("img", format!("raw:{}", images.display())),
        ],
    );
    let src = format!("raw:{}", images.display());
    let packs_before = std::fs::read_dir(Path::new(&repo).join("packs"))
        .map(|d| d.count())
        .unwrap_or(0);

    // A wrong token and a missing one.
    let out = run_env(
        &["list", &url(&server, "repo")],
        &env("wrong-token-0123456789"),
    );
    assert!(failure_line(&out).contains("token is not accepted"));
    let out = run_env(&["list", &url(&server, "repo")], &env(""));
    assert!(failure_line(&out).contains("SNAPSYNC_TOKEN"));
    let (status, body) = raw_http(
        server.port,
        &format!("GET /v1/stores/repo/list HTTP/1.1\r\nhost: x\r\nsnapsync-protocol: {PROTOCOL_VERSION}\r\nconnection: close\r\n\r\n"),
    );
    assert_eq!(status, 401, "{body}");

    // A read-only token may read but not write.
    ok_env(&["list", &url(&server, "repo")], &env(RO_TOKEN));
    let out = run_env(&["replicate", &src, &url(&server, "repo")], &env(RO_TOKEN));
    assert!(failure_line(&out).contains("may only read"));

    // Unknown stores, and names outside the served stores.
    let out = run_env(&["list", &url(&server, "nope")], &env(TOKEN));
    assert!(failure_line(&out).contains("not served"));
    for path in ["..%2F..%2Fetc", "%2E%2E", "repo%2F..%2F..", ".hidden"] {
        let (status, body) = raw_http(
            server.port,
            &format!("GET /v1/stores/{path}/list HTTP/1.1\r\nhost: x\r\nsnapsync-protocol: {PROTOCOL_VERSION}\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"),
        );
        assert!(
            status == 400 && body.contains("invalid store name"),
            "{path}: {status} {body}"
        );
    }
    let out = run_env(&["list", "snapsync+http://127.0.0.1:1/../etc"], &env(TOKEN));
    assert!(usage_line(&out).contains("invalid store name"));
    // A volume name with a path in it.
    let out = run_env(
        &["diff", &url(&server, "img"), "../../etc@passwd"],
        &env(TOKEN),
    );
    assert!(usage_line(&out).contains("invalid volume name"), "{out:?}");
    let body = r#"{"volume":"../x","snapshot":"s1","offset":0,"len":4096}"#;
    let (status, resp) = raw_http(
        server.port,
        &format!("POST /v1/stores/img/read HTTP/1.1\r\nhost: x\r\nsnapsync-protocol: {PROTOCOL_VERSION}\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()),
    );
    assert_eq!(status, 400, "{resp}");
    assert!(resp.contains("invalid volume name"), "{resp}");
    // Reads cut into blocks that are not whole, or into too many.
    for block_size in [0, 3000, 16] {
        let body = format!(
            r#"{{"volume":"vm","snapshot":"s1","offset":0,"len":4194304,"block_size":{block_size}}}"#
        );
        let (status, resp) = raw_http(
            server.port,
            &format!("POST /v1/stores/img/read HTTP/1.1\r\nhost: x\r\nsnapsync-protocol: {PROTOCOL_VERSION}\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()),
        );
        assert_eq!(status, 400, "block size {block_size}: {resp}");
        assert!(resp.contains("cannot be cut into blocks"), "{resp}");
    }

    // Another protocol version is refused, clearly.
    let (status, body) = raw_http(
        server.port,
        &format!("GET /v1/stores/repo/list HTTP/1.1\r\nhost: x\r\nsnapsync-protocol: 99\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"),
    );
    assert_eq!(status, 400);
    assert!(body.contains("protocol version mismatch"), "{body}");

    // Nothing was written.
    let list: serde_json::Value = serde_json::from_str(&ok(&["list", &repo, "--json"])).unwrap();
    assert!(list["volumes"].as_array().unwrap().is_empty());
    let packs_after = std::fs::read_dir(Path::new(&repo).join("packs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(packs_before, packs_after);
}

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                n += count_files(&p);
            } else if !p.to_string_lossy().contains('#') {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn server_killed_mid_transfer_then_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let s1 = random(11, 160 * MIB);
    write_image(&images, "vm", "s1", &s1, T0);
    let repo = init_repo(dir.path(), &[]);
    let mut server = plaintext_server(dir.path(), &[("repo", repo.clone())]);
    let src = format!("raw:{}", images.display());
    let remote = url(&server, "repo");
    // A pack counts for the rerun once its index is stored (packs go first).
    let indexes = Path::new(&repo).join("index");
    let before = count_files(&indexes);

    let mut client = bin()
        .args(["replicate", &src, &remote, "--json"])
        .env("SNAPSYNC_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while count_files(&indexes) < before + 1 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no pack appeared"
        );
        if client.try_wait().unwrap().is_some() {
            panic!("replication finished before the server could be killed");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(&remote), "{err}");

    // The same server again, on the same port; the rerun sends only what is missing.
    let args = server.args.clone();
    let port = server.port;
    drop(server);
    let server = start_server(&args, port);
    let r = replicate_env(&[&src, &url(&server, "repo")], TOKEN);
    assert_eq!(r.len(), 1);
    let sent = num(&r[0], "sent_bytes");
    assert!(
        sent <= 160 * MIB as u64 - 32 * MIB as u64,
        "rerun resent everything: {sent}"
    );
    assert!(num(&r[0], "dedup_bytes") >= 32 * MIB as u64, "{}", r[0]);
    restore_equals(&repo, "vm@s1", dir.path(), &s1);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["verify", &repo, "--read-data", "--json"])).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

/// Run snapsync with extra environment variables; a run longer than `limit` is killed and
/// fails the test (a hang must not block the suite).
fn run_bounded(args: &[&str], env: &[(String, String)], limit: Duration) -> Output {
    use std::io::{Seek, SeekFrom};
    let mut out = tempfile::tempfile().unwrap();
    let mut err = tempfile::tempfile().unwrap();
    let mut child = bin()
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap();
    let read = |f: &mut std::fs::File| {
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "snapsync {args:?} still running after {limit:?}:\n{}",
                String::from_utf8_lossy(&read(&mut err))
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
    }
}

/// `replicate SRC REMOTE --json`, bounded in time; its report lines.
fn replicate_bounded(src: &str, remote: &str) -> Vec<serde_json::Value> {
    let args = ["replicate", src, remote, "--json"];
    let out = run_bounded(&args, &env(TOKEN), Duration::from_secs(120));
    success(&args, &out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// Start `replicate SRC REMOTE` and SIGKILL it once the repository at `repo` holds
/// `packs` more packs than before: mid-transfer, its receive session open on the server.
fn kill_client_mid_transfer(src: &str, remote: &str, repo: &str, packs: usize) {
    use std::os::unix::process::ExitStatusExt;
    let packs_dir = Path::new(repo).join("packs");
    let before = count_files(&packs_dir);
    let mut client = bin()
        .args(["replicate", src, remote, "--json"])
        .env("SNAPSYNC_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    // A local pack is written to a staging file while it fills: `packs` packs are full
    // once the next one's file is there too (the server is then in the write that
    // handed the last of them to storage).
    while count_files(&packs_dir) < before + packs + 1 {
        if let Some(status) = client.try_wait().unwrap() {
            panic!("the replication ended ({status}) before it could be killed");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no pack appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    client.kill().unwrap(); // SIGKILL
    let status = client.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "not killed: {status}");
}

#[test]
fn client_killed_mid_transfer_then_a_rerun_resumes_on_the_same_server() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let size = 128 * MIB as u64;
    let s1 = random(31, size as usize);
    write_image(&images, "vm", "s1", &s1, T0);
    let repo = init_repo(dir.path(), &[]);
    let server = plaintext_server_env(
        dir.path(),
        &[("repo", repo.clone())],
        &[("SNAPSYNC_LOG", "info")],
    );
    let src = format!("raw:{}", images.display());
    let remote = url(&server, "repo");

    kill_client_mid_transfer(&src, &remote, &repo, 2);
    // Nothing is committed, locally or as the server sees it.
    let list: serde_json::Value = serde_json::from_str(&ok(&["list", &repo, "--json"])).unwrap();
    assert!(list["volumes"].as_array().unwrap().is_empty(), "{list}");
    let list: serde_json::Value =
        serde_json::from_str(&ok_env(&["list", &remote, "--json"], &env(TOKEN))).unwrap();
    assert!(list["volumes"].as_array().unwrap().is_empty(), "{list}");

    // The server stayed up with the dead client's session; the rerun's begin replaces it
    // and sends only what the stored packs lack.
    let r = replicate_bounded(&src, &remote);
    assert_eq!(r.len(), 1);
    let sent = num(&r[0], "sent_bytes");
    assert!(
        sent <= size - 32 * MIB as u64,
        "rerun resent everything: {}",
        r[0]
    );
    assert!(num(&r[0], "dedup_bytes") >= 32 * MIB as u64, "{}", r[0]);
    assert!(
        server.wait_for_log(
            "abandoning an earlier receive session of the same snapshot",
            Duration::from_secs(5)
        ),
        "the server did not say it replaced the abandoned session"
    );
    restore_equals(&repo, "vm@s1", dir.path(), &s1);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["verify", &repo, "--read-data", "--json"])).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn an_idle_session_of_a_killed_client_is_abandoned_and_releases_its_lock() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let size = 384 * MIB as u64;
    let s1 = random(41, size as usize);
    write_image(&images, "vm", "s1", &s1, T0);
    let repo = init_repo(dir.path(), &[]);
    let server = plaintext_server_env(
        dir.path(),
        &[("repo", repo.clone())],
        &[
            ("SNAPSYNC_SESSION_IDLE_SECS", "6"),
            ("SNAPSYNC_LOG", "info"),
        ],
    );
    assert!(server.wait_for_log("idle_secs=6", Duration::from_secs(10)));
    let src = format!("raw:{}", images.display());
    let remote = url(&server, "repo");

    // A client killed while it sends a write leaves a truncated request, and the server
    // ends that session at once (releasing its lock): no idle session is left. Packs
    // are written as they fill, so the client seldom waits for the server and is often
    // mid-request when killed: then run it again (its new session replaces the ended
    // one and reuses its packs) and kill it one pack later, until a session is left
    // (about every other kill leaves one; the image holds a dozen packs, enough tries
    // that this almost never runs out).
    // The server may still be in the write that filled the last pack (an fdatasync on a
    // loaded machine) before it reads the truncated request: give it 2 s, a third of the
    // idle limit, so a lock still there is an idle session's and stays for gc to see.
    let locks = Path::new(&repo).join("locks");
    for attempt in 1.. {
        kill_client_mid_transfer(&src, &remote, &repo, 1);
        std::thread::sleep(Duration::from_secs(2));
        if count_files(&locks) > 0 {
            break;
        }
        assert!(attempt < 11, "every killed client's session ended at once");
    }
    let killed = Instant::now();
    // The dead client's session holds a session lock on the repository, so gc waits for
    // it; when the server abandons the idle session, the lock goes and gc goes on.
    let args = ["gc", &repo, "--json"];
    let gc_env = [(
        "SNAPSYNC_LOG".to_string(),
        "snapsync_repo=debug".to_string(),
    )];
    let out = run_bounded(&args, &gc_env, Duration::from_secs(30));
    let took = killed.elapsed();
    let report: serde_json::Value = serde_json::from_str(&success(&args, &out)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gc waiting for writers to finish"),
        "gc did not find the session's lock: {err}"
    );
    assert!(
        server.wait_for_log("abandoning idle receive session", Duration::from_secs(10)),
        "the server did not say it abandoned the session"
    );
    eprintln!("gc finished {took:?} after the client was killed: {report}");
    // Nothing references the abandoned session's packs any more.
    assert!(num(&report, "packs_deleted") >= 1, "{report}");
    let list: serde_json::Value = serde_json::from_str(&ok(&["list", &repo, "--json"])).unwrap();
    assert!(list["volumes"].as_array().unwrap().is_empty(), "{list}");

    // The server goes on: a rerun sends everything again (gc removed the packs, and the
    // server must not count on its cached index of them) and restores bit for bit.
    let r = replicate_bounded(&src, &remote);
    assert_eq!(r.len(), 1);
    assert!(num(&r[0], "sent_bytes") >= size, "{}", r[0]);
    restore_equals(&repo, "vm@s1", dir.path(), &s1);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["verify", &repo, "--read-data", "--json"])).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

/// A server of `repo` over TLS with this certificate and key, on a free port.
fn start_tls_server(
    dir: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    repo: &str,
) -> ServerProc {
    start_server(
        &[
            "--token-file".into(),
            token_file(dir).to_str().unwrap().into(),
            "--tls-cert".into(),
            cert.to_str().unwrap().into(),
            "--tls-key".into(),
            key.to_str().unwrap().into(),
            "--store".into(),
            format!("repo={repo}"),
        ],
        0,
    )
}

#[test]
fn tls_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let s1 = random(21, 3 * MIB);
    write_image(&images, "vm", "s1", &s1, T0);
    let repo = init_repo(dir.path(), &[]);
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert_pem = dir.path().join("cert.pem");
    let key_pem = dir.path().join("key.pem");
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let other_pem = dir.path().join("other.pem");
    std::fs::write(&other_pem, other.cert.pem()).unwrap();

    let server = start_tls_server(dir.path(), &cert_pem, &key_pem, &repo);
    let remote = format!("snapsync://127.0.0.1:{}/repo", server.port);
    let src = format!("raw:{}", images.display());
    let ca = cert_pem.to_str().unwrap();

    // Trusting the server's certificate: works, with the token from a file too.
    let tok = dir.path().join("client-token");
    std::fs::write(&tok, format!("{TOKEN}\n")).unwrap();
    let out = ok(&[
        "replicate",
        &src,
        &remote,
        "--ca",
        ca,
        "--token-file",
        tok.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.lines().count(), 1);
    restore_equals(&repo, "vm@s1", dir.path(), &s1);
    // SNAPSYNC_CA works as --ca does.
    let mut e = env(TOKEN);
    e.push(("SNAPSYNC_CA".into(), ca.into()));
    ok_env(&["list", &remote], &e);

    // Not trusting it (system roots, or another certificate): refused.
    let out = run_env(&["list", &remote], &env(TOKEN));
    let line = failure_line(&out);
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    let out = run_env(
        &["list", &remote, "--ca", other_pem.to_str().unwrap()],
        &env(TOKEN),
    );
    failure_line(&out);
    // Plain text to a TLS server fails; TLS is the default and plain text must be asked.
    let out = run_env(
        &[
            "list",
            &format!("snapsync+http://127.0.0.1:{}/repo", server.port),
        ],
        &env(TOKEN),
    );
    failure_line(&out);
    let out = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        &format!("repo={repo}"),
        "--token-file",
        token_file(dir.path()).to_str().unwrap(),
    ]);
    // A usage error, found by clap: exit 2, naming the way to serve without TLS.
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure-plaintext"));
}

/// A self-signed certificate as `openssl req -x509` makes one: marked a CA, and naming a
/// host other than the address the client dials.
fn openssl_style_certificate(name: &str) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn tls_pins_the_exact_certificate_given_with_ca() {
    // Such a certificate cannot verify as a server's under the usual rules (a CA used as
    // an end entity, another name): `--ca` with exactly it pins it, and nothing else
    // passes for it.
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let s1 = random(22, MIB);
    write_image(&images, "vm", "s1", &s1, T0);
    let repo = init_repo(dir.path(), &[]);
    let (cert, key) = openssl_style_certificate("backup.example");
    let cert_pem = dir.path().join("cert.pem");
    let key_pem = dir.path().join("key.pem");
    std::fs::write(&cert_pem, &cert).unwrap();
    std::fs::write(&key_pem, key).unwrap();
    let (other, _) = openssl_style_certificate("backup.example");
    let other_pem = dir.path().join("other.pem");
    std::fs::write(&other_pem, &other).unwrap();
    // A bundle holding the pinned certificate among others pins it too.
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, format!("{other}{cert}")).unwrap();

    let server = start_tls_server(dir.path(), &cert_pem, &key_pem, &repo);
    let remote = format!("snapsync://127.0.0.1:{}/repo", server.port);
    let src = format!("raw:{}", images.display());
    for ca in [&cert_pem, &bundle] {
        ok_env(
            &["list", &remote, "--ca", ca.to_str().unwrap()],
            &env(TOKEN),
        );
    }
    let out = ok_env(
        &[
            "replicate",
            &src,
            &remote,
            "--ca",
            cert_pem.to_str().unwrap(),
            "--json",
        ],
        &env(TOKEN),
    );
    assert_eq!(out.lines().count(), 1);
    restore_equals(&repo, "vm@s1", dir.path(), &s1);

    // Another certificate with the same name and the same flags is not the pin.
    let out = run_env(
        &["list", &remote, "--ca", other_pem.to_str().unwrap()],
        &env(TOKEN),
    );
    let line = failure_line(&out);
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    // Nor is a file without certificates a way around the check.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "nothing here\n").unwrap();
    let out = run_env(
        &["list", &remote, "--ca", junk.to_str().unwrap()],
        &env(TOKEN),
    );
    assert!(failure_line(&out).contains("no certificate"));
}

/// One HTTP/1.1 POST with a binary body to `/v1/stores/{store}/{path}`, with the rw
/// token; returns (status, body).
fn post_bytes(port: u16, store: &str, path: &str, headers: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /v1/stores/{store}/{path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
         authorization: Bearer {TOKEN}\r\nsnapsync-protocol: {PROTOCOL_VERSION}\r\n\
         {headers}content-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {resp:?}"));
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A block batch (docs/PROTOCOL.md) of the given header entries and data.
fn batch(entries: &[(u64, u8, &[u8])], data: &[u8]) -> Vec<u8> {
    let mut header = Vec::new();
    for (index, kind, rest) in entries {
        header.extend_from_slice(&index.to_le_bytes());
        header.push(*kind);
        header.extend_from_slice(rest);
    }
    let mut body = (header.len() as u32).to_le_bytes().to_vec();
    body.extend(header);
    body.extend_from_slice(data);
    body
}

/// A writer with a read-write token, speaking the protocol by hand, tries every way to
/// commit a damaged snapshot into a served repository: each receive that had a refused
/// request answers 409 at commit, nothing is committed, and `verify --read-data` passes.
#[test]
fn a_hostile_writer_cannot_commit_a_damaged_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    write_image(&images, "vm", "s1", &random(11, MIB), T0);
    let repo = init_repo(dir.path(), &[]);
    ok(&["replicate", &format!("raw:{}", images.display()), &repo]);
    let server = plaintext_server(dir.path(), &[("repo", repo.clone())]);
    let bs: usize = 64 << 10;
    let good = random(12, bs);
    let good_id = blake3::hash(&good);
    let unknown = [0x5a_u8; 32];
    let mut wrong_id_plain = Vec::new();
    wrong_id_plain.extend_from_slice(&unknown);
    wrong_id_plain.extend_from_slice(&(bs as u32).to_le_bytes());
    let mut good_plain = Vec::new();
    good_plain.extend_from_slice(good_id.as_bytes());
    good_plain.extend_from_slice(&(bs as u32).to_le_bytes());
    let blocks = (MIB / bs) as u64;
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        ("unknown-existing", batch(&[(0, 1, &unknown)], &[])),
        ("past-end", batch(&[(blocks, 0, &[])], &[])),
        ("u64-max", batch(&[(u64::MAX, 2, &good_plain)], &good)),
        ("hash-mismatch", batch(&[(0, 2, &wrong_id_plain)], &good)),
        ("unknown-kind", batch(&[(0, 9, &[])], &[])),
        ("short-plain", batch(&[(0, 2, &good_plain)], &good[..100])),
        ("trailing-bytes", {
            let mut b = batch(&[(0, 0, &[])], &[]);
            b.extend_from_slice(b"junk");
            b
        }),
        ("huge-header", u32::MAX.to_le_bytes().to_vec()),
        ("three-bytes", vec![1, 2, 3]),
        ("empty", Vec::new()),
    ];
    let begin = |name: &str, created: serde_json::Value| {
        let body = serde_json::json!({
            "volume": "vm",
            "snapshot": {
                "name": name,
                "id": "00".repeat(32),
                "created": created,
                "size": MIB,
            },
            "base": {"volume": "vm", "snapshot": "s1"},
            "source_system": "hostile",
            "source_volume": "vm",
            "source_snapshot": name,
            "origin": null,
        });
        post_bytes(
            server.port,
            "repo",
            "receive",
            "content-type: application/json\r\n",
            body.to_string().as_bytes(),
        )
    };
    for (name, body) in &attacks {
        let (status, answer) = begin(name, serde_json::json!({"secs": T0 + 10, "nanos": 0}));
        assert_eq!(status, 200, "{name}: begin: {answer}");
        let session: serde_json::Value = serde_json::from_str(&answer).unwrap();
        let session = session["session"].as_str().unwrap().to_string();
        let (status, answer) = post_bytes(
            server.port,
            "repo",
            &format!("receive/{session}/write"),
            "snapsync-sequence: 0\r\n",
            body,
        );
        assert!(
            status == 400 || status == 413,
            "{name}: write answered {status}: {answer}"
        );
        let (status, answer) = post_bytes(
            server.port,
            "repo",
            &format!("receive/{session}/commit"),
            "",
            b"",
        );
        assert_eq!(
            status, 409,
            "{name}: commit after a refused write: {answer}"
        );
    }
    for (name, created) in [
        (
            "nanos",
            serde_json::json!({"secs": T0, "nanos": 4_294_967_295u64}),
        ),
        ("secs", serde_json::json!({"secs": i64::MIN, "nanos": 0})),
    ] {
        let (status, answer) = begin(name, created);
        assert_eq!(
            status, 400,
            "{name}: an impossible time was accepted: {answer}"
        );
    }
    drop(server);
    let listed = ok(&["list", &repo, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        v["volumes"][0]["snapshots"].as_array().unwrap().len(),
        1,
        "only the snapshot replicated honestly: {listed}"
    );
    ok(&["verify", &repo, "--read-data"]);
}
