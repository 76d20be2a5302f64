//! The client against three real NBD servers: qemu-nbd, qemu-storage-daemon's export
//! with a dirty bitmap, and nbdkit (its `error` filter injects faults). And against our
//! own server, so both ends agree.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapsync_nbd::proto::{BASE_ALLOCATION, EIO, STATE_HOLE, STATE_ZERO};
use snapsync_nbd::{Client, NbdError};
use snapsync_store::sample::pseudo_random;

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
}

fn run_ok(prog: &str, args: &[&str]) {
    let o = Command::new(prog).args(args).output().expect(prog);
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A raw file of 4 MiB: data, a hole (sparse), data.
fn sparse_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("disk.raw");
    let mut want = pseudo_random(5, 4 << 20);
    want[(1 << 20)..(3 << 20)].fill(0);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&want[..1 << 20]).unwrap();
    f.set_len(4 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&want[3 << 20..], 3 << 20).unwrap();
    (path, want)
}

fn read_all(c: &mut Client) -> Vec<u8> {
    let size = c.size() as usize;
    let mut out = vec![0u8; size];
    let mut pieces: Vec<(u64, &mut [u8])> = out
        .chunks_mut(256 << 10)
        .enumerate()
        .map(|(i, b)| ((i as u64) * (256 << 10), b))
        .collect();
    c.read_many(&mut pieces).unwrap();
    out
}

#[test]
fn qemu_nbd_reads_and_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, want) = sparse_file(dir.path());
    let sock = dir.path().join("qemu-nbd.sock");
    let _server = Proc(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-r", "--persistent", "-k"])
            .arg(&sock)
            .arg(&disk)
            .spawn()
            .expect("qemu-nbd"),
    );
    wait_for(&sock);
    let mut c = Client::connect_unix(&sock, "", &[BASE_ALLOCATION]).unwrap();
    assert_eq!(c.size(), 4 << 20);
    assert!(c.read_only());
    assert!(read_all(&mut c) == want);
    let status = c.block_status(BASE_ALLOCATION, 0, 4 << 20).unwrap();
    let covered: u64 = status.iter().map(|s| s.len).sum();
    assert_eq!(covered, 4 << 20);
    let at = |o: u64| {
        status
            .iter()
            .find(|s| s.offset <= o && o < s.offset + s.len)
            .unwrap()
    };
    assert_eq!(at(0).flags & STATE_HOLE, 0, "{status:?}");
    assert_eq!(
        at(2 << 20).flags & (STATE_HOLE | STATE_ZERO),
        STATE_HOLE | STATE_ZERO,
        "{status:?}"
    );
    // Reads past the end are the server's error, not a panic or wrong data.
    let mut b = vec![0u8; 4096];
    assert!(matches!(
        c.read((4 << 20) - 100, &mut b),
        Err(NbdError::Server { .. })
    ));
}

/// QMP, minimal.
struct Qmp(BufReader<UnixStream>, UnixStream);

impl Qmp {
    fn connect(path: &Path) -> Self {
        wait_for(path);
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp(BufReader::new(s.try_clone().unwrap()), s);
        let mut greeting = String::new();
        q.0.read_line(&mut greeting).unwrap();
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.1, "{c}").unwrap();
        loop {
            let mut l = String::new();
            self.0.read_line(&mut l).unwrap();
            assert!(!l.contains("\"error\""), "{c}: {l}");
            if l.contains("\"return\"") {
                return l;
            }
        }
    }
}

#[test]
fn qemu_storage_daemon_dirty_bitmap_through_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"],
    );
    let qmp = dir.path().join("qmp.sock");
    let nbd = dir.path().join("nbd.sock");
    let _daemon = Proc(
        Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &format!(
                    "driver=qcow2,node-name=disk,file.driver=file,file.filename={}",
                    img.display()
                ),
                "--chardev",
                &format!("socket,path={},server=on,wait=off,id=qmp", qmp.display()),
                "--monitor",
                "chardev=qmp",
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", nbd.display()),
            ])
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-storage-daemon"),
    );
    let mut q = Qmp::connect(&qmp);
    q.cmd(r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"disk","name":"b0","granularity":65536}}"#);
    q.cmd(r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"rw","node-name":"disk","name":"rw","writable":true}}"#);
    // The "guest" writes two ranges after the bitmap was made.
    let rw = format!("nbd+unix:///rw?socket={}", nbd.display());
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 65536 4096",
            "-c",
            "write -P 2 4194304 131072",
            &rw,
        ],
    );
    // A checkpoint's bitmap is frozen (disabled) before it is exported, as QEMU requires.
    q.cmd(r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"disk","name":"b0"}}"#);
    q.cmd(r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"ro","node-name":"disk","name":"ro","bitmaps":["b0"]}}"#);
    let dirty = "qemu:dirty-bitmap:b0";
    let mut c = Client::connect_unix(&nbd, "ro", &[BASE_ALLOCATION, dirty]).unwrap();
    let status = c.block_status(dirty, 0, 8 << 20).unwrap();
    let dirty_ranges: Vec<(u64, u64)> = status
        .iter()
        .filter(|s| s.flags & 1 != 0)
        .map(|s| (s.offset, s.len))
        .collect();
    assert_eq!(
        dirty_ranges,
        [(65536, 65536), (4 << 20, 131072)],
        "{status:?}"
    );
    let mut b = vec![0u8; 4096];
    c.read(65536, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 1));
    c.disconnect().unwrap();
}

#[test]
fn nbdkit_faults_are_errors_never_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbdkit.sock");
    // Every read fails with EIO.
    let _kit = Proc(
        Command::new("nbdkit")
            .args(["--foreground", "-U"])
            .arg(&sock)
            .args([
                "--filter=error",
                "pattern",
                "size=4M",
                "error-pread=EIO",
                "error-pread-rate=100%",
            ])
            .spawn()
            .expect("nbdkit (Debian package nbdkit)"),
    );
    wait_for(&sock);
    let mut c = Client::connect_unix(&sock, "", &[]).unwrap();
    let mut b = vec![0u8; 65536];
    match c.read(0, &mut b) {
        Err(NbdError::Server { errno, .. }) => assert_eq!(errno, EIO),
        other => panic!("an injected EIO gave {other:?}"),
    }
    // The connection stays usable for the next request.
    assert!(c.read(65536, &mut b).is_err());

    // Without faults, the pattern plugin's bytes (each 8-byte word is its offset).
    let sock2 = dir.path().join("nbdkit2.sock");
    let _kit2 = Proc(
        Command::new("nbdkit")
            .args(["--foreground", "-U"])
            .arg(&sock2)
            .args(["pattern", "size=4M"])
            .spawn()
            .unwrap(),
    );
    wait_for(&sock2);
    let mut c = Client::connect_unix(&sock2, "", &[]).unwrap();
    let all = read_all(&mut c);
    for (i, w) in all.chunks(8).enumerate().step_by(997) {
        assert_eq!(u64::from_be_bytes(w.try_into().unwrap()), i as u64 * 8);
    }
}

#[test]
fn our_client_and_our_server_agree() {
    use snapsync_nbd::{serve, Listener, ServerOptions, SnapshotExport};
    use snapsync_store::memory::MemoryStore;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ours.sock");
    let mut want = pseudo_random(9, 5 << 20);
    want[(2 << 20)..(4 << 20)].fill(0);
    let store = MemoryStore::new("ours", 4096);
    store.add_snapshot(
        "vm",
        "s1",
        snapsync_core::Timestamp::new(1_700_000_000, 0),
        want.clone(),
    );
    let export = SnapshotExport::open(&store, "vm", "s1", 4 << 20).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            serve(
                Listener::Unix(listener, sock.clone()),
                &export,
                &ServerOptions::new("vm@s1"),
                &stop,
            )
        });
        let mut c = Client::connect_unix(&sock, "vm@s1", &[BASE_ALLOCATION]).unwrap();
        assert!(read_all(&mut c) == want);
        let status = c.block_status(BASE_ALLOCATION, 0, 5 << 20).unwrap();
        let hole = status
            .iter()
            .find(|s| s.offset <= 3 << 20 && 3 << 20 < s.offset + s.len)
            .unwrap();
        assert_eq!(hole.flags, STATE_HOLE | STATE_ZERO, "{status:?}");
        assert!(matches!(
            Client::connect_unix(&sock, "other", &[]),
            Err(NbdError::Refused { .. })
        ));
        c.disconnect().unwrap();
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap().unwrap();
    });
}
