//! Checkpoints of a disk that a "guest" keeps writing, against a real
//! qemu-storage-daemon: the frozen view is the disk at the checkpoint's instant, the
//! merged bitmap names exactly what changed since the base, and nothing snapsync added
//! outlives its session (nor a session that was never cleaned up).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use snapsync_nbd::proto::BASE_ALLOCATION;
use snapsync_nbd::Client;
use snapsync_qemu::{nodes, Qmp, Session};
use snapsync_store::sample::pseudo_random;

const SIZE: u64 = 16 << 20;

struct Daemon {
    child: Child,
    qmp: PathBuf,
    guest: PathBuf,
    _dir: tempfile::TempDir,
    scratch: PathBuf,
    initial: Vec<u8>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

fn start() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("initial.raw");
    let initial = pseudo_random(3, SIZE as usize);
    std::fs::write(&raw, &initial).unwrap();
    let img = dir.path().join("disk.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let qmp = dir.path().join("qmp.sock");
    let guest = dir.path().join("guest.sock");
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let child = Command::new("qemu-storage-daemon")
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
            &format!("addr.type=unix,addr.path={}", guest.display()),
            "--export",
            "type=nbd,id=guest,node-name=disk,name=guest,writable=on",
        ])
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-storage-daemon");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(qmp.exists() && guest.exists()) {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon {
        child,
        qmp,
        guest,
        _dir: dir,
        scratch,
        initial,
    }
}

impl Daemon {
    /// The guest writes `len` bytes of `byte` at `offset`.
    fn guest_write(&self, byte: u8, offset: u64, len: u64) {
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {byte} {offset} {len}"),
                &format!("nbd+unix:///guest?socket={}", self.guest.display()),
            ],
        );
    }

    fn session(&self) -> Session {
        Session::start(
            Qmp::connect(&self.qmp).unwrap(),
            &self.scratch,
            Some(&self.guest),
        )
        .unwrap()
    }

    /// Exports, temporary nodes and temporary bitmaps, to compare before and after.
    fn state(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let mut q = Qmp::connect(&self.qmp).unwrap();
        let exports = q.execute("query-block-exports", json!({})).unwrap();
        let nodes = q
            .execute("query-named-block-nodes", json!({"flat": true}))
            .unwrap();
        let mut e: Vec<String> = exports
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        let mut n: Vec<String> = nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .filter(|n| !n.starts_with('#'))
            .collect();
        let mut b: Vec<String> = nodes
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            // Jobs add anonymous bitmaps of their own.
            .filter_map(|b| b["name"].as_str().map(str::to_string))
            .collect();
        e.sort();
        n.sort();
        b.sort();
        (e, n, b)
    }
}

fn read_all(socket: &Path, export: &str) -> Vec<u8> {
    let mut c = Client::connect_unix(socket, export, &[]).unwrap();
    let mut out = vec![0u8; c.size() as usize];
    let mut pieces: Vec<(u64, &mut [u8])> = out
        .chunks_mut(1 << 20)
        .enumerate()
        .map(|(i, b)| ((i as u64) << 20, b))
        .collect();
    c.read_many(&mut pieces).unwrap();
    out
}

#[test]
fn a_checkpoint_is_a_point_in_time_and_its_bitmap_names_what_changed() {
    let d = start();
    let before = d.state();
    let mut disk = d.initial.clone();

    // c1: the guest writes right after it is taken; the frozen view does not see it.
    let mut s = d.session();
    let node = nodes(s.qmp())
        .unwrap()
        .into_iter()
        .find(|n| n.name == "disk")
        .unwrap();
    assert_eq!(node.size, SIZE);
    assert!(node.checkpoints.is_empty());
    let (socket, export) = {
        let f = s.take(&node, "c1", (1_700_000_000, 0), None).unwrap();
        assert!(f.changed_context.is_none(), "no base, no bitmap");
        (f.socket.clone(), f.export.clone())
    };
    d.guest_write(0xAA, 4 << 20, 65536);
    let frozen = read_all(&socket, &export);
    assert!(frozen == disk, "the checkpoint shows a write made after it");
    disk[(4 << 20)..(4 << 20) + 65536].fill(0xAA);
    s.finish(8).unwrap();
    let (exports, nodes_after, bitmaps) = d.state();
    assert_eq!((exports, nodes_after), (before.0.clone(), before.1.clone()));
    assert_eq!(bitmaps, ["snapsync.1700000000.000000000.c1"]);

    // c2 against c1: exactly the guest's writes since c1, at the bitmap's granularity.
    d.guest_write(0xBB, 1 << 20, 4096);
    d.guest_write(0xCC, 9 << 20, 131072);
    disk[(1 << 20)..(1 << 20) + 4096].fill(0xBB);
    disk[(9 << 20)..(9 << 20) + 131072].fill(0xCC);
    let mut s = d.session();
    let node = nodes(s.qmp())
        .unwrap()
        .into_iter()
        .find(|n| n.name == "disk")
        .unwrap();
    assert_eq!(node.checkpoints.len(), 1);
    assert!(node.checkpoints[0].recording);
    let f = s.take(&node, "c2", (1_700_000_100, 0), Some("c1")).unwrap();
    let context = f.changed_context.clone().expect("c1's bitmap is there");
    let (socket, export) = (f.socket.clone(), f.export.clone());
    let mut c = Client::connect_unix(&socket, &export, &[BASE_ALLOCATION, &context]).unwrap();
    let dirty: Vec<(u64, u64)> = c
        .block_status(&context, 0, SIZE)
        .unwrap()
        .into_iter()
        .filter(|s| s.flags & 1 != 0)
        .map(|s| (s.offset, s.len))
        .collect();
    assert_eq!(
        dirty,
        [(1 << 20, 65536), (4 << 20, 65536), (9 << 20, 131072)],
        "the changes since c1"
    );
    assert!(read_all(&socket, &export) == disk, "c2's view");
    s.finish(1).unwrap();
    let (exports, nodes_after, bitmaps) = d.state();
    assert_eq!((exports, nodes_after), (before.0, before.1));
    assert_eq!(
        bitmaps,
        ["snapsync.1700000100.000000000.c2"],
        "c1 pruned, c2 kept"
    );
}

#[test]
fn what_a_killed_session_left_is_removed_by_the_next() {
    let d = start();
    let before = d.state();
    let mut s = d.session();
    let node = nodes(s.qmp())
        .unwrap()
        .into_iter()
        .find(|n| n.name == "disk")
        .unwrap();
    s.take(&node, "c1", (1_700_000_000, 0), None).unwrap();
    // Killed: no cleanup at all.
    s.abandon();
    assert_ne!(d.state().0, before.0, "the export is there");
    let s = d.session();
    s.finish(8).unwrap();
    let (exports, nodes_after, _) = d.state();
    assert_eq!((exports, nodes_after), (before.0, before.1));
    let leftovers: Vec<_> = std::fs::read_dir(&d.scratch).unwrap().flatten().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
