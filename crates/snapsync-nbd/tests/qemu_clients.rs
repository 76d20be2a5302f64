//! The export against QEMU's own NBD client: `qemu-img convert` reads it byte for
//! byte, `qemu-img map` sees its holes, `qemu-io` cannot write; and against hand-made
//! hostile clients, which get an error or are closed while the others are served.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use snapsync_core::Timestamp;
use snapsync_nbd::proto::*;
use snapsync_nbd::{serve, Listener, ServerOptions, SnapshotExport};
use snapsync_store::memory::MemoryStore;
use snapsync_store::sample::pseudo_random;

const BS: u64 = 4096;

/// A snapshot with data, zero runs, and a size that is no multiple of a chunk.
fn content() -> Vec<u8> {
    let mut v = pseudo_random(1, (3 << 20) + 3 * BS as usize);
    v[(1 << 20)..(2 << 20)].fill(0);
    v[100..5000].fill(0);
    v
}

/// A running export of `vm@s1`; stopped when dropped.
struct Running {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn start(content: Vec<u8>, max_connections: usize) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        let socket = socket.clone();
        std::thread::spawn(move || {
            let store = MemoryStore::new("nbd-test", BS);
            store.add_snapshot("vm", "s1", Timestamp::new(1_700_000_000, 0), content);
            let export = SnapshotExport::open(&store, "vm", "s1", 1 << 20).unwrap();
            let options = ServerOptions::new("vm@s1").with_max_connections(max_connections);
            serve(Listener::Unix(listener, socket), &export, &options, &stop).unwrap();
        })
    };
    Running {
        socket,
        stop,
        thread: Some(thread),
        _dir: dir,
    }
}

fn url(socket: &Path) -> String {
    format!("nbd+unix:///vm@s1?socket={}", socket.display())
}

fn run(prog: &str, args: &[&str]) -> std::process::Output {
    Command::new(prog).args(args).output().expect(prog)
}

#[test]
fn qemu_img_reads_the_export_byte_for_byte_and_maps_its_holes() {
    let want = content();
    let export = start(want.clone(), 16);
    let out = export._dir.path().join("out.raw");
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url(&export.socket),
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == want, "convert differs");

    let o = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &url(&export.socket)],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let map = String::from_utf8_lossy(&o.stdout);
    let entries: Vec<(u64, u64, bool, bool)> = map
        .lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            let num = |k: &str| {
                let i = l.find(k).unwrap() + k.len();
                l[i..]
                    .trim_start_matches([' ', ':'])
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            };
            (
                num("\"start\""),
                num("\"length\""),
                l.contains("\"zero\": true"),
                l.contains("\"data\": true"),
            )
        })
        .collect();
    assert!(!entries.is_empty(), "{map}");
    // The zeroed MiB is reported zero and not data.
    let hole = entries
        .iter()
        .find(|e| e.0 <= (1 << 20) && (1 << 20) < e.0 + e.1)
        .unwrap_or_else(|| panic!("{map}"));
    assert!(hole.2 && !hole.3, "the zero MiB is not a hole: {map}");
    let data = entries.iter().find(|e| e.0 == 0).unwrap();
    assert!(data.3, "the start holds data: {map}");
}

#[test]
fn writes_are_refused_and_reads_past_the_end_fail() {
    let export = start(content(), 16);
    let u = url(&export.socket);
    let o = run("qemu-io", &["-f", "raw", "-c", "write -P 7 0 4096", &u]);
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            || text.contains("ermission")
            || text.contains("read-only")
            || text.contains("failed"),
        "a write was accepted: {text}"
    );
    let o = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0 1048576 4096", &u],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !text.contains("fail"), "{text}");
}

/// A client that speaks NBD by hand over the unix socket.
fn handshake(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(
        u64::from_be_bytes(hello[0..8].try_into().unwrap()),
        NBD_MAGIC
    );
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s
}

fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).unwrap();
}

/// Read one option reply: (reply type, data).
fn option_answer(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u64::from_be_bytes(h[0..8].try_into().unwrap()),
        OPTION_REPLY_MAGIC
    );
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    (kind, data)
}

/// Negotiate `OPT_GO` with simple replies; returns the connection in transmission.
fn go(socket: &Path) -> UnixStream {
    let mut s = handshake(socket);
    let mut data = 0u32.to_be_bytes().to_vec();
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, OPT_GO, &data);
    loop {
        let (kind, _) = option_answer(&mut s);
        if kind == REP_ACK {
            return s;
        }
        assert_eq!(kind, REP_INFO);
    }
}

#[test]
fn hostile_clients_get_errors_or_are_closed_and_others_are_still_served() {
    let want = content();
    let export = start(want.clone(), 64);
    // Malformed options: an INFO that lies about its name length; an unknown option.
    let mut s = handshake(&export.socket);
    send_option(&mut s, OPT_INFO, &[0, 0, 0, 99, b'x']);
    assert_eq!(option_answer(&mut s).0, REP_ERR_INVALID);
    send_option(&mut s, 0x4242, b"");
    assert_eq!(option_answer(&mut s).0, REP_ERR_UNSUP);
    send_option(&mut s, OPT_SET_META_CONTEXT, b"");
    assert_eq!(option_answer(&mut s).0, REP_ERR_INVALID);
    // An option longer than the limit: the connection is closed.
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&OPT_LIST.to_be_bytes());
    v.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&v).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0, "not closed");

    // Reads past the end, oversized reads, and writes: errors with the cookie.
    let mut s = go(&export.socket);
    let size = want.len() as u64;
    for (cookie, command, offset, length, want_error) in [
        (1u64, CMD_READ, size - 10, 4096u32, EINVAL),
        (2, CMD_READ, 0, 64 << 20, EOVERFLOW),
        (3, CMD_BLOCK_STATUS, 0, 4096, EINVAL),
        (4, CMD_TRIM, 0, 4096, EPERM),
        (5, 99, 0, 0, EINVAL),
    ] {
        let r = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        };
        s.write_all(&r.encode()).unwrap();
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            want_error,
            "cookie {cookie}"
        );
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
    }
    // A write with its payload: refused, and the stream stays in step.
    let r = Request {
        flags: 0,
        command: CMD_WRITE,
        cookie: 6,
        offset: 0,
        length: 512,
    };
    s.write_all(&r.encode()).unwrap();
    s.write_all(&[9u8; 512]).unwrap();
    let r = Request {
        flags: 0,
        command: CMD_READ,
        cookie: 7,
        offset: 0,
        length: 512,
    };
    s.write_all(&r.encode()).unwrap();
    // Two replies, in either order (NBD matches replies to requests by cookie, and the
    // server answers requests in flight as each completes): the write refused, the
    // read answered with its data.
    let mut answered = Vec::new();
    for _ in 0..2 {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        if cookie == 7 {
            assert_eq!(error, 0, "the read after a refused write");
            let mut data = vec![0u8; 512];
            s.read_exact(&mut data).unwrap();
            assert!(data == want[..512]);
        } else {
            assert_eq!((cookie, error), (6, EPERM), "the write");
        }
        answered.push(cookie);
    }
    answered.sort();
    assert_eq!(answered, [6, 7]);
    // Many reads in flight, then a disconnect mid-reply.
    for cookie in 0..64u64 {
        let r = Request {
            flags: 0,
            command: CMD_READ,
            cookie,
            offset: cookie * 65536,
            length: 65536,
        };
        s.write_all(&r.encode()).unwrap();
    }
    drop(s);

    // 100 connections at once against a limit of 64: 64 are served, the rest closed.
    let mut served = Vec::new();
    let mut refused = 0;
    for _ in 0..100 {
        let mut c = UnixStream::connect(&export.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = [0u8; 18];
        match c.read_exact(&mut hello) {
            Ok(()) => served.push(c),
            Err(_) => refused += 1,
        }
    }
    assert_eq!((served.len(), refused), (64, 36));
    let held = served;
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let o = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            &url(&export.socket),
            "-F",
            "raw",
            &url(&export.socket),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
