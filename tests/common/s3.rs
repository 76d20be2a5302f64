//! S3 test support, std only: a moto server, buckets, and a TCP proxy that can be
//! "killed" (listener and every connection dropped) and restarted on the same port, or
//! that strips `If-None-Match` to behave like a server that ignores it (Garage).
//!
//! `scripts/test.sh` starts one moto server and exports `SNAPSYNC_TEST_S3_ENDPOINT` and
//! the `AWS_*` variables. Under a plain `cargo test` the first S3 test starts a moto
//! server for its test process instead (it exits with that process); when moto is not
//! installed the test fails saying so, it is never silently skipped.
//!
//! Also compiled into `crates/snapsync-repo/tests` (via `#[path]`), so it depends on
//! nothing but std.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The moto release scripts/test.sh installs.
pub const MOTO_PIN: &str = "moto[server]==5.2.1";
/// Set by scripts/test.sh to the running moto server (`http://127.0.0.1:PORT`).
pub const ENDPOINT_ENV: &str = "SNAPSYNC_TEST_S3_ENDPOINT";

/// The S3 endpoint of the test server, starting one if needed. Also makes sure the
/// `AWS_*` variables point at it, for in-process clients and child processes alike.
pub fn endpoint() -> &'static str {
    static EP: OnceLock<String> = OnceLock::new();
    EP.get_or_init(|| {
        let ep = match std::env::var(ENDPOINT_ENV) {
            Ok(e) if !e.is_empty() => e,
            _ => start_moto(),
        };
        // Set once, before any S3 client of this process exists; std serialises its
        // own environment accesses, and nothing here reads it through libc meanwhile.
        std::env::set_var("AWS_ENDPOINT_URL", &ep);
        std::env::set_var("AWS_ALLOW_HTTP", "true");
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
        ] {
            if std::env::var_os(k).is_none() {
                std::env::set_var(k, v);
            }
        }
        ep
    })
}

/// `host:port` of an `http://host:port` endpoint.
pub fn addr_of(endpoint: &str) -> SocketAddr {
    let hp = endpoint
        .strip_prefix("http://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    std::net::ToSocketAddrs::to_socket_addrs(hp)
        .unwrap_or_else(|e| panic!("S3 endpoint {endpoint:?}: {e}"))
        .next()
        .expect("an address")
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Start `moto_server` on a free loopback port, watched by a shell that stops it when
/// this test process ends (a static is never dropped, so nothing else would).
fn start_moto() -> String {
    assert!(
        on_path("moto_server"),
        "moto_server is not installed, and the S3 tests need a real S3 server: \
         `pip install '{MOTO_PIN}'`, or run `bash scripts/test.sh`, which installs and starts it \
         (or set {ENDPOINT_ENV} to a running one)"
    );
    let port = free_port();
    let log = std::env::temp_dir().join(format!("snapsync-moto-{port}.log"));
    let script = format!(
        "moto_server -H 127.0.0.1 -p {port} >'{}' 2>&1 & m=$!; \
         while kill -0 {parent} 2>/dev/null && kill -0 $m 2>/dev/null; do sleep 1; done; \
         kill $m 2>/dev/null",
        log.display(),
        parent = std::process::id()
    );
    let mut watcher = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    // Reap the watcher should it end early (moto died); it normally outlives us.
    std::thread::spawn(move || watcher.wait());
    let ep = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((status, _)) = http(addr_of(&ep), "GET", "/", &[], b"") {
            if status > 0 {
                return ep;
            }
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not answer on {ep} within 60 s; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let status = std::str::from_utf8(&resp[..resp.len().min(12)])
        .ok()
        .and_then(|l| l.get(9..12))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = match find(&resp, b"\r\n\r\n") {
        Some(i) => resp[i + 4..].to_vec(),
        None => Vec::new(),
    };
    Ok((status, body))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Create a fresh bucket on the test server (moto accepts an unsigned `PUT /bucket`);
/// returns its name. Names are unique across processes sharing one server.
pub fn create_bucket() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let ep = endpoint();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!(
        "snapsync-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let (status, body) = http(addr_of(ep), "PUT", &format!("/{name}"), &[], b"")
        .unwrap_or_else(|e| panic!("create bucket {name} on {ep}: {e}"));
    assert_eq!(
        status,
        200,
        "create bucket {name} on {ep}: {}",
        String::from_utf8_lossy(&body)
    );
    name
}

/// Keys and sizes under `prefix` in `bucket` (unsigned ListObjectsV2; up to 1000).
pub fn list_objects(bucket: &str, prefix: &str) -> Vec<(String, u64)> {
    let (status, body) = http(
        addr_of(endpoint()),
        "GET",
        &format!("/{bucket}?list-type=2&prefix={prefix}"),
        &[],
        b"",
    )
    .expect("list objects");
    let xml = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "list {bucket}/{prefix}: {xml}");
    let tag = |s: &str, t: &str| -> Option<String> {
        let a = s.find(&format!("<{t}>"))? + t.len() + 2;
        let b = s[a..].find(&format!("</{t}>"))? + a;
        Some(s[a..b].to_string())
    };
    xml.split("<Contents>")
        .skip(1)
        .map(|c| {
            (
                tag(c, "Key").expect("Key"),
                tag(c, "Size").and_then(|s| s.parse().ok()).expect("Size"),
            )
        })
        .collect()
}

/// What a proxy does to the requests it forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes unchanged.
    Transparent,
    /// Remove `If-None-Match` request headers, like a server that ignores them.
    StripIfNoneMatch,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    /// Request bytes forwarded to the server (heads and bodies).
    bytes_up: AtomicU64,
    /// Kill before forwarding the `n`th PUT whose path contains the string.
    kill_on: Mutex<Option<(String, usize)>>,
    puts_seen: AtomicUsize,
}

impl Shared {
    fn kill(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// A TCP proxy in front of the S3 server, on a loopback port of its own.
pub struct Proxy {
    port: u16,
    upstream: SocketAddr,
    mode: ProxyMode,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Start a proxy in front of the test server.
    pub fn start(mode: ProxyMode) -> Proxy {
        let upstream = addr_of(endpoint());
        let mut p = Proxy {
            port: 0,
            upstream,
            mode,
            shared: Arc::default(),
            accept: None,
        };
        p.listen(TcpListener::bind("127.0.0.1:0").expect("bind proxy"));
        p
    }

    fn listen(&mut self, listener: TcpListener) {
        self.port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let shared = self.shared.clone();
        let (upstream, mode) = (self.upstream, self.mode);
        self.accept = Some(std::thread::spawn(move || {
            while !shared.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        serve(client, server, mode, shared.clone());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            // The listener is dropped here: the port refuses connections.
        }));
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Request bytes forwarded so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Ordering::SeqCst)
    }

    /// Kill the proxy just before forwarding the `n`th (1-based) PUT request whose
    /// path contains `needle`, counting from now.
    pub fn kill_before_put(&self, needle: &str, n: usize) {
        self.shared.puts_seen.store(0, Ordering::SeqCst);
        *self.shared.kill_on.lock().unwrap() = Some((needle.to_string(), n));
    }

    /// "Kill the server": close the port and every open connection.
    pub fn kill(&mut self) {
        self.shared.kill();
        if let Some(h) = self.accept.take() {
            h.join().unwrap();
        }
    }

    /// Serve again on the same port (after [`kill`](Self::kill) or a triggered kill).
    pub fn restart(&mut self) {
        self.kill();
        *self.shared.kill_on.lock().unwrap() = None;
        self.shared.stop.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("rebind proxy port {}: {e}", self.port),
            }
        };
        self.listen(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve(client: TcpStream, server: TcpStream, mode: ProxyMode, shared: Arc<Shared>) {
    {
        let mut conns = shared.conns.lock().unwrap();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        conns.push(client.try_clone().unwrap());
        conns.push(server.try_clone().unwrap());
    }
    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let sh = shared.clone();
    std::thread::spawn(move || {
        let _ = requests(client, server, mode, &sh);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut s2, &mut c2);
        let _ = c2.shutdown(Shutdown::Write);
    });
}

/// Forward requests one by one: parse each head (to strip headers, and to see which
/// PUT it is), then copy `Content-Length` bytes of body.
fn requests(
    mut client: TcpStream,
    mut server: TcpStream,
    mode: ProxyMode,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = client.read(&mut chunk)?;
            if n == 0 {
                let _ = server.shutdown(Shutdown::Write);
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut len = 0u64;
        let mut out = String::new();
        for line in head.split("\r\n").filter(|l| !l.is_empty()) {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                panic!("test proxy: chunked request bodies are not supported: {head}");
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if mode == ProxyMode::StripIfNoneMatch && lower.starts_with("if-none-match:") {
                continue;
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        if head.starts_with("PUT ") {
            let path = head.split(' ').nth(1).unwrap_or("");
            let mut kill = false;
            if let Some((needle, n)) = shared.kill_on.lock().unwrap().as_ref() {
                if path.contains(needle.as_str())
                    && shared.puts_seen.fetch_add(1, Ordering::SeqCst) + 1 >= *n
                {
                    kill = true;
                }
            }
            if kill {
                shared.kill();
                return Ok(());
            }
        }
        server.write_all(out.as_bytes())?;
        shared
            .bytes_up
            .fetch_add(out.len() as u64, Ordering::SeqCst);
        let mut left = len;
        while left > 0 {
            if buf.is_empty() {
                let n = client.read(&mut chunk)?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let take = (left as usize).min(buf.len());
            server.write_all(&buf[..take])?;
            shared.bytes_up.fetch_add(take as u64, Ordering::SeqCst);
            buf.drain(..take);
            left -= take as u64;
        }
    }
}

/// Environment for a snapsync process that talks to S3 through `endpoint`, giving up
/// on a dead server after `retry_secs`.
pub fn env_via(endpoint: &str, retry_secs: u64) -> Vec<(String, String)> {
    vec![
        ("AWS_ENDPOINT_URL".into(), endpoint.into()),
        ("SNAPSYNC_RETRY_TIMEOUT_SECS".into(), retry_secs.to_string()),
    ]
}
