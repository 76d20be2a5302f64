//! `snapsync export` end to end, with QEMU's own tools as the clients: `qemu-img
//! convert` of the export equals `snapsync restore` for a repository, an S3 repository
//! (moto), a `snapsync://` store and a qcow2 source; `qemu-img map` sees the holes; an
//! instant restore (a qcow2 overlay backed by the export, served by qemu-storage-daemon,
//! written to, `block-stream`ed) leaves an overlay that holds the snapshot alone; SIGTERM
//! ends the export with exit 0.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T0: u64 = 1_700_000_000;

/// A running `snapsync export`.
struct ExportProc {
    child: Child,
    socket: PathBuf,
}

impl ExportProc {
    fn start(store: &str, target: &str, socket: &Path, env: &[(String, String)]) -> Self {
        let listen = format!("unix:{}", socket.display());
        let (mut export, _) = Self::spawn(
            &[store, target, "--listen", &listen, "--cache-size", "8MiB"],
            env,
        );
        export.socket = socket.to_path_buf();
        export
    }

    /// `snapsync export ARGS...`, once it says it is ready; that line too.
    fn spawn(args: &[&str], env: &[(String, String)]) -> (Self, String) {
        let mut child = bin()
            .arg("export")
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let line = ready_line(&mut child);
        assert!(line.contains("exporting"), "export did not start: {line:?}");
        let export = Self {
            child,
            socket: PathBuf::new(),
        };
        (export, line)
    }

    fn url(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// SIGTERM, and the exit code.
    fn stop(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the export did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ExportProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 6 MiB and 3 blocks with data and a zero MiB: what every store exports here. (A size
/// that is no multiple of 512 is exported as it is; QEMU then reads it padded.)
fn image() -> Vec<u8> {
    let mut v = random(21, (6 << 20) + 12288);
    v[(2 << 20)..(3 << 20)].fill(0);
    v
}

/// `qemu-img convert` of `url` into a file, read back.
fn convert(url: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("converted.raw");
    let _ = std::fs::remove_file(&out);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        url,
        out.to_str().unwrap(),
    ]);
    std::fs::read(&out).unwrap()
}

/// `snapsync restore` of `store` `target`, read back.
fn restored(store: &str, target: &str, dir: &Path, env: &[(String, String)]) -> Vec<u8> {
    let out = dir.join("restored.raw");
    let _ = std::fs::remove_file(&out);
    ok_env(&["restore", store, target, out.to_str().unwrap()], env);
    std::fs::read(&out).unwrap()
}

/// Export `target` of `store` and check convert == restore == `want`, and the map.
fn check_store(store: &str, target: &str, want: &[u8], env: &[(String, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let export = ExportProc::start(store, target, &dir.path().join("nbd.sock"), env);
    let got = convert(&export.url(target), dir.path());
    assert!(
        got == want,
        "{store}: qemu-img convert of the export differs"
    );
    assert!(
        restored(store, target, dir.path(), env) == got,
        "{store}: the export and restore differ"
    );
    let map = qemu_img(&["map", "--output=json", "-f", "raw", &export.url(target)]);
    let zero_mib = map
        .lines()
        .filter(|l| l.contains("\"zero\": true") && l.contains("\"data\": false"))
        .any(|l| {
            let field = |k: &str| -> u64 {
                let i = l.find(k).unwrap() + k.len();
                l[i..]
                    .trim_start_matches([' ', ':'])
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            let (start, len) = (field("\"start\""), field("\"length\""));
            start <= (2 << 20) && (3 << 20) <= start + len
        });
    if !store.starts_with("qcow2") {
        assert!(
            zero_mib,
            "{store}: the zero MiB is not mapped as a hole:\n{map}"
        );
    }
    assert_eq!(export.stop(), Some(0), "{store}: SIGTERM is a clean stop");
}

#[test]
fn a_repository_and_a_qcow2_source_export_what_restore_writes() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let want = image();
    write_image(&images, "vm", "s1", &want, T0);
    let repo = init_repo(dir.path(), &[]);
    ok(&["replicate", &format!("raw:{}", images.display()), &repo]);
    check_store(&repo, "vm@s1", &want, &[]);
    check_store(&format!("raw:{}", images.display()), "vm@s1", &want, &[]);

    let qcow = dir.path().join("q");
    std::fs::create_dir(&qcow).unwrap();
    let img = qcow.join("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        &want.len().to_string(),
    ]);
    let raw = dir.path().join("w.raw");
    std::fs::write(&raw, &want).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-n",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    check_store(
        &format!("qcow2://{}", qcow.display()),
        "disk@s1",
        &want,
        &[],
    );
}

/// An encrypted repository exports with its passphrase what restore writes (blocks
/// opened and checked on the way out), and without it refuses in one line.
#[test]
fn an_encrypted_repository_exports_what_restore_writes() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let want = image();
    write_image(&images, "vm", "s1", &want, T0);
    let cheap_kdf = [
        ("SNAPSYNC_KDF_MEMORY_KIB", "64"),
        ("SNAPSYNC_KDF_ITERATIONS", "1"),
    ];
    let mut env: Vec<(String, String)> = cheap_kdf
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let repo = dir.path().join("sealed").to_str().unwrap().to_string();
    let without = run_env(&["init", &repo, "--encryption"], &env);
    assert_eq!(without.status.code(), Some(1), "init needs a passphrase");
    env.push(("SNAPSYNC_PASSWORD".into(), "export me".into()));
    ok_env(&["init", &repo, "--encryption"], &env);
    ok_env(
        &["replicate", &format!("raw:{}", images.display()), &repo],
        &env,
    );
    check_store(&repo, "vm@s1", &want, &env);
    let socket = dir.path().join("refused.sock");
    let listen = format!("unix:{}", socket.display());
    let out = run_env(&["export", &repo, "vm@s1", "--listen", &listen], &[]);
    let err = one_line_error(&out);
    assert!(err.contains("is encrypted"), "{err}");
    assert!(!socket.exists(), "nothing was exported");
}

#[test]
fn an_s3_repository_exports_what_restore_writes() {
    let endpoint = common::s3::endpoint();
    let bucket = common::s3::create_bucket();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let want = image();
    write_image(&images, "vm", "s1", &want, T0);
    let env = common::s3::env_via(endpoint, 10);
    let repo = format!("s3://{bucket}/exported");
    ok_env(&["init", &repo], &env);
    ok_env(
        &["replicate", &format!("raw:{}", images.display()), &repo],
        &env,
    );
    check_store(&repo, "vm@s1", &want, &env);
}

#[test]
fn a_remote_store_exports_what_restore_writes() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let want = image();
    write_image(&images, "vm", "s1", &want, T0);
    let repo = init_repo(dir.path(), &[]);
    ok(&["replicate", &format!("raw:{}", images.display()), &repo]);
    let token = "export-test-token-0123456789";
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{token}\n")).unwrap();
    let mut server = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &format!("r={repo}"),
            "--token-file",
            tokens.to_str().unwrap(),
            "--insecure-plaintext",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = ready_line(&mut server);
    let addr = line
        .trim()
        .rsplit_once(" on ")
        .and_then(|(_, r)| r.split(' ').next())
        .unwrap()
        .to_string();
    let env = vec![("SNAPSYNC_TOKEN".to_string(), token.to_string())];
    check_store(&format!("snapsync+http://{addr}/r"), "vm@s1", &want, &env);
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn a_tcp_export_off_loopback_needs_tls_or_the_plaintext_flag() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), &[]);
    let out = run(&["export", &repo, "vm@s1", "--listen", "0.0.0.0:0"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure-plaintext"));
    let out = run(&["export", &repo, "vm@", "--listen", "unix:/tmp/x"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&[
        "export",
        &repo,
        "vm@s1",
        "--listen",
        "unix:/tmp/x",
        "--cache-size",
        "lots",
    ]);
    assert_eq!(out.status.code(), Some(2));
    // A snapshot that does not exist: one line, exit 1.
    let out = run(&[
        "export",
        &repo,
        "vm@s1",
        "--listen",
        &format!("unix:{}/s", dir.path().display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
}

/// A QMP session on a unix socket.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("QMP socket {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        q.line(); // the greeting
        q.execute(r#"{"execute": "qmp_capabilities"}"#);
        q
    }

    fn line(&mut self) -> serde_json::Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP said {l:?}: {e}"))
    }

    /// Run a command; its answer (events before it are collected in `events`).
    fn execute(&mut self, command: &str) -> serde_json::Value {
        writeln!(self.writer, "{command}").unwrap();
        loop {
            let v = self.line();
            if v.get("return").is_some() {
                return v;
            }
            assert!(v.get("error").is_none(), "{command}: {v}");
        }
    }

    fn wait_event(&mut self, name: &str) -> serde_json::Value {
        loop {
            let v = self.line();
            if v["event"] == name {
                return v;
            }
        }
    }
}

#[test]
fn instant_restore_boots_from_the_export_then_streams_it_in() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let want = image();
    write_image(&images, "vm", "s1", &want, T0);
    let repo = init_repo(dir.path(), &[]);
    ok(&["replicate", &format!("raw:{}", images.display()), &repo]);
    let export = ExportProc::start(&repo, "vm@s1", &dir.path().join("nbd.sock"), &[]);

    // The overlay the VM would boot from, backed by the export.
    let overlay = dir.path().join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &export.url("vm@s1"),
        "-F",
        "raw",
        overlay.to_str().unwrap(),
    ]);
    let qmp_path = dir.path().join("qmp.sock");
    let disk_sock = dir.path().join("disk.sock");
    let mut daemon = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=disk,file.driver=file,file.filename={}",
                overlay.display()
            ),
            "--chardev",
            &format!(
                "socket,path={},server=on,wait=off,id=qmp",
                qmp_path.display()
            ),
            "--monitor",
            "chardev=qmp",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", disk_sock.display()),
            "--export",
            "type=nbd,id=exp,node-name=disk,name=disk,writable=on",
        ])
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-storage-daemon");
    let mut qmp = Qmp::connect(&qmp_path);
    // The "guest" reads the backup at once and writes.
    let disk = format!("nbd+unix:///disk?socket={}", disk_sock.display());
    qemu_io(
        Path::new(&disk),
        "raw",
        &[
            "write -P 0x55 0 65536".to_string(),
            "read -P 0 2097152 65536".to_string(),
        ],
    );
    // Pull the rest in, then let go of the export.
    qmp.execute(
        r#"{"execute": "block-stream", "arguments": {"job-id": "pull", "device": "disk"}}"#,
    );
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED");
    assert!(done["data"]["error"].is_null(), "{done}");
    qmp.execute(r#"{"execute": "quit"}"#);
    let _ = daemon.wait();
    assert_eq!(export.stop(), Some(0));

    // The overlay alone holds the snapshot plus the write.
    let info = qemu_img(&["info", "--output=json", overlay.to_str().unwrap()]);
    assert!(!info.contains("backing-filename"), "still backed: {info}");
    let mut expect = want.clone();
    expect[..65536].fill(0x55);
    let alone = dir.path().join("alone.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        overlay.to_str().unwrap(),
        alone.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&alone).unwrap() == expect,
        "the streamed overlay differs"
    );
}

#[test]
fn a_tls_export_serves_qemu_with_x509_credentials_and_refuses_plain_clients() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let want = image();
    write_image(&images, "vm", "s1", &want, T0);
    let repo = init_repo(dir.path(), &[]);
    ok(&["replicate", &format!("raw:{}", images.display()), &repo]);
    // A CA, and a server certificate it signs for 127.0.0.1, as QEMU's x509 credentials
    // expect them (dir/ca-cert.pem).
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("ca-cert.pem"), ca.pem()).unwrap();
    let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_pem, leaf.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();

    let (export, line) = ExportProc::spawn(
        &[
            &repo,
            "vm@s1",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert_pem.to_str().unwrap(),
            "--tls-key",
            key_pem.to_str().unwrap(),
        ],
        &[],
    );
    assert!(line.contains("(TLS)"), "{line}");
    let port = line
        .split(" on 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .to_string();
    let out = dir.path().join("tls.raw");
    qemu_img(&[
        "convert",
        "--object",
        &format!("tls-creds-x509,id=tls0,dir={},endpoint=client", creds.display()),
        "--image-opts",
        &format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=vm@s1,tls-creds=tls0"
        ),
        "-O",
        "raw",
        out.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "the TLS export differs"
    );
    // Without TLS, QEMU is refused (TLS is required), and the export keeps serving.
    let plain = Command::new("qemu-img")
        .args(["info", &format!("nbd://127.0.0.1:{port}/vm@s1")])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plain client was served");
    assert_eq!(export.stop(), Some(0));
}
