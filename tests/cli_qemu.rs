//! A running VM's disk as a source (`qemu:///QMP.sock`), end to end with a real
//! qemu-storage-daemon whose writable NBD export stands in for the guest: a full
//! replication, then incrementals that read only what the guest wrote (from the dirty
//! bitmaps), restores equal to the disk at each checkpoint, and nothing left behind.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SIZE: usize = 32 << 20;

struct Vm {
    child: Child,
    /// The disk image: qcow2, or raw (`.raw`: bitmaps cannot persist).
    image: PathBuf,
    qmp: PathBuf,
    guest: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_vm(initial: &[u8]) -> Vm {
    start_vm_on(initial, "qcow2")
}

/// A VM whose disk is `format` (`qcow2` or `raw`), holding `initial`.
fn start_vm_on(initial: &[u8], format: &str) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("initial.raw");
    std::fs::write(&raw, initial).unwrap();
    let image = dir.path().join(format!("disk.{format}"));
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        format,
        raw.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let qmp = dir.path().join("qmp.sock");
    let guest = dir.path().join("guest.sock");
    let child = daemon(&image, &qmp, &guest);
    Vm {
        child,
        image,
        qmp,
        guest,
        dir,
    }
}

impl Vm {
    fn url(&self) -> String {
        format!("qemu://{}?nbd={}", self.qmp.display(), self.guest.display())
    }

    fn write(&self, byte: u8, offset: usize, len: usize) {
        qemu_io(
            std::path::Path::new(&format!(
                "nbd+unix:///guest?socket={}",
                self.guest.display()
            )),
            "raw",
            &[format!("write -P {byte} {offset} {len}")],
        );
    }
}

#[test]
fn a_running_disk_replicates_full_then_only_what_the_guest_wrote() {
    let mut disk = random(31, SIZE);
    disk[(8 << 20)..(12 << 20)].fill(0);
    let vm = start_vm(&disk);
    let repo = init_repo(vm.dir.path(), &[]);

    let listed = ok(&["list", &vm.url(), "--json"]);
    assert!(listed.contains("\"disk0\""), "{listed}");

    let full = replicate_json(&[&vm.url(), &repo, "--snapshot", "c1"]);
    assert_eq!(full.len(), 1, "{full:?}");
    assert_eq!(full[0]["volume"], "disk0");
    let restored = |snap: &str| -> Vec<u8> {
        let out = vm.dir.path().join(format!("{snap}.raw"));
        ok(&[
            "restore",
            &repo,
            &format!("disk0@{snap}"),
            out.to_str().unwrap(),
        ]);
        std::fs::read(&out).unwrap()
    };
    assert!(restored("c1") == disk, "c1 differs from the disk");

    // The guest writes 3 ranges: 1 block, 2 blocks, a partial block.
    for (byte, offset, len) in [
        (1u8, 1 << 20, 65536),
        (2, 20 << 20, 131072),
        (3, 30 << 20, 100),
    ] {
        vm.write(byte, offset, len);
        disk[offset..offset + len].fill(byte);
    }
    let incr = replicate_json(&[&vm.url(), &repo, "--snapshot", "c2"]);
    assert_eq!(incr[0]["base"], "c1", "{incr:?}");
    assert_eq!(incr[0]["diff_method"], "bitmap", "{incr:?}");
    let dirty = 4 * 65536;
    assert!(
        num(&incr[0], "read_bytes") <= dirty * 11 / 10,
        "read {} for {dirty} dirty bytes",
        num(&incr[0], "read_bytes")
    );
    assert!(restored("c2") == disk, "c2 differs from the disk");

    // Nothing is left in the scratch directory of this VM, nor the directory itself.
    let qmp = std::fs::canonicalize(vm.dir.path().join("qmp.sock")).unwrap();
    let scratch = std::env::temp_dir().join(format!(
        "snapsync-qemu{}",
        qmp.display().to_string().replace('/', "_")
    ));
    assert!(!scratch.exists(), "{} left behind", scratch.display());

    // The checkpoints stay as bitmaps; reading an old one is refused with one line.
    let listed = ok(&["list", &vm.url()]);
    assert!(listed.contains("c1") && listed.contains("c2"), "{listed}");
    let out = run(&["diff", &vm.url(), "disk0@c1", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only while it is taken"));
}

#[test]
fn two_destinations_at_different_checkpoints_each_get_their_own_incremental() {
    let mut disk = random(32, SIZE);
    let vm = start_vm(&disk);
    let a = init_repo(&vm.dir.path().join("a"), &[]);
    let b = init_repo(&vm.dir.path().join("b"), &[]);
    let restored = |repo: &str, snap: &str| -> Vec<u8> {
        let out = vm.dir.path().join(format!("{snap}.out"));
        ok(&[
            "restore",
            repo,
            &format!("disk0@{snap}"),
            out.to_str().unwrap(),
        ]);
        std::fs::read(&out).unwrap()
    };
    replicate_json(&[&vm.url(), &a, "--snapshot", "c1"]);
    vm.write(1, 2 << 20, 65536);
    disk[(2 << 20)..(2 << 20) + 65536].fill(1);
    replicate_json(&[&vm.url(), &b, "--snapshot", "c2"]);
    vm.write(2, 5 << 20, 65536);
    disk[(5 << 20)..(5 << 20) + 65536].fill(2);
    // A holds c1: the changes since c1 are both writes.
    let ra = replicate_json(&[&vm.url(), &a, "--snapshot", "c3"]);
    assert_eq!(ra[0]["base"], "c1", "{ra:?}");
    assert_eq!(num(&ra[0], "read_bytes"), 2 * 65536, "{ra:?}");
    assert!(restored(&a, "c3") == disk);
    vm.write(3, 7 << 20, 65536);
    disk[(7 << 20)..(7 << 20) + 65536].fill(3);
    // B holds c2: the second and third writes.
    let rb = replicate_json(&[&vm.url(), &b, "--snapshot", "c4"]);
    assert_eq!(rb[0]["base"], "c2", "{rb:?}");
    assert_eq!(num(&rb[0], "read_bytes"), 2 * 65536, "{rb:?}");
    assert!(restored(&b, "c4") == disk);
}

#[test]
fn a_lost_bitmap_means_a_full_read_that_still_sends_only_what_changed() {
    let mut disk = random(33, SIZE);
    let mut vm = start_vm(&disk);
    let repo = init_repo(vm.dir.path(), &[]);
    replicate_json(&[&vm.url(), &repo, "--snapshot", "c1"]);
    vm.write(9, 3 << 20, 65536);
    disk[(3 << 20)..(3 << 20) + 65536].fill(9);
    // The VM is restarted without its checkpoints (as with transient bitmaps).
    let image = vm.image.clone();
    let _ = vm.child.kill();
    let _ = vm.child.wait();
    for b in qemu_img(&["info", "--output=json", image.to_str().unwrap()])
        .split('"')
        .filter(|s| s.starts_with("snapsync."))
        .map(str::to_string)
        .collect::<Vec<_>>()
    {
        qemu_img(&["bitmap", "--remove", image.to_str().unwrap(), &b]);
    }
    vm.restart();
    let r = replicate_json(&[&vm.url(), &repo, "--snapshot", "c2"]);
    assert_eq!(
        r[0]["base"],
        serde_json::Value::Null,
        "no checkpoint in common: {r:?}"
    );
    assert!(
        num(&r[0], "read_bytes") >= (SIZE as u64) / 2,
        "a full read: {r:?}"
    );
    assert!(
        num(&r[0], "sent_bytes") <= 2 * 65536,
        "only the changed block sent: {r:?}"
    );
    let out = vm.dir.path().join("c2.out");
    ok(&["restore", &repo, "disk0@c2", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == disk);
}

#[test]
fn a_checkpoint_is_the_disk_at_one_instant_while_the_guest_keeps_writing() {
    let disk = random(34, SIZE);
    let vm = start_vm(&disk);
    let repo = init_repo(vm.dir.path(), &[]);
    replicate_json(&[&vm.url(), &repo, "--snapshot", "c1"]);
    // The guest writes 150 blocks, one after another, 5 ms apart, during the next run.
    let block = |i: usize| (i * 7 % 64) * 65536;
    let mut cmds = Vec::new();
    for i in 1..=150usize {
        cmds.push("-c".to_string());
        cmds.push(format!("write -P {} {} 65536", i % 250 + 1, block(i)));
        cmds.push("-c".to_string());
        cmds.push("sleep 5".to_string());
    }
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(&cmds)
        .arg(format!("nbd+unix:///guest?socket={}", vm.guest.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    replicate_json(&[
        &vm.url(),
        &repo,
        "--snapshot",
        "c2",
        "--keep-checkpoints",
        "1",
    ]);
    assert!(writer.wait().unwrap().success());
    let out = vm.dir.path().join("c2.raw");
    ok(&["restore", &repo, "disk0@c2", out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    // c2 must be the disk after exactly the first k writes, for one k.
    let mut state = disk.clone();
    let mut matched = None;
    for k in 0..=150usize {
        if k > 0 {
            state[block(k)..block(k) + 65536].fill((k % 250 + 1) as u8);
        }
        if got == state {
            matched = Some(k);
            break;
        }
    }
    let k = matched.expect("c2 is no single instant of the disk");
    assert!(
        k < 150,
        "the checkpoint was taken after every write (k = {k}): not a live test"
    );
    // --keep-checkpoints 1: only c2 is left.
    let listed = ok(&["list", &vm.url(), "--json"]);
    assert!(
        listed.contains("\"c2\"") && !listed.contains("\"c1\""),
        "{listed}"
    );
}

impl Vm {
    /// Start the daemon again on the same image and sockets (after it stopped).
    fn restart(&mut self) {
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.guest);
        self.child = daemon(&self.image, &self.qmp, &self.guest);
    }
}

/// qemu-storage-daemon on `image` (node `disk0`), with its QMP socket and an NBD server
/// whose writable export `guest` stands in for the guest; returns once both listen.
fn daemon(image: &std::path::Path, qmp: &std::path::Path, guest: &std::path::Path) -> Child {
    let driver = if image.extension().is_some_and(|e| e == "raw") {
        "raw"
    } else {
        "qcow2"
    };
    let child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!(
                "driver={driver},node-name=disk0,file.driver=file,file.filename={}",
                image.display()
            ),
            "--chardev",
            &format!("socket,path={},server=on,wait=off,id=qmp", qmp.display()),
            "--monitor",
            "chardev=qmp",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", guest.display()),
            "--export",
            "type=nbd,id=guest,node-name=disk0,name=guest,writable=on",
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
    child
}

#[test]
fn an_inconsistent_bitmap_after_a_crash_is_never_trusted() {
    let mut disk = random(35, SIZE);
    let mut vm = start_vm(&disk);
    let repo = init_repo(vm.dir.path(), &[]);
    replicate_json(&[&vm.url(), &repo, "--snapshot", "c1"]);
    // A clean stop stores c1's persistent bitmap in the image; after a restart it is
    // loaded (and marked in use in the file), then the guest writes and QEMU is killed.
    let mut q = snapsync_qemu::Qmp::connect(&vm.qmp).unwrap();
    let _ = q.execute("quit", serde_json::json!({}));
    drop(q);
    vm.restart();
    vm.write(7, 6 << 20, 65536);
    disk[(6 << 20)..(6 << 20) + 65536].fill(7);
    let _ = vm.child.kill();
    let image = vm.image.clone();
    vm.restart();
    let info = qemu_img(&["info", "--output=json", "-U", image.to_str().unwrap()]);
    assert!(
        info.contains("in-use"),
        "the bitmap is not marked in use: {info}"
    );
    let listed = ok(&["list", &vm.url(), "--json"]);
    assert!(
        !listed.contains("\"c1\""),
        "an inconsistent checkpoint is listed: {listed}"
    );
    let r = replicate_json(&[&vm.url(), &repo, "--snapshot", "c2"]);
    assert_eq!(r[0]["base_reason"], "no-common-base", "{r:?}");
    assert!(
        num(&r[0], "sent_bytes") <= 2 * 65536,
        "only the changed block sent: {r:?}"
    );
    let out = vm.dir.path().join("c2.out");
    ok(&["restore", &repo, "disk0@c2", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == disk);
    let listed = ok(&["list", &vm.url(), "--json"]);
    assert!(listed.contains("\"c2\""), "{listed}");
}

/// What snapsync may leave in the VM: exports and named nodes (its checkpoints'
/// bitmaps are meant to stay).
/// Wait until a run has frozen its checkpoint (its fleecing overlay exists in the VM's
/// scratch directory: QMP takes one client at a time, and the run holds it).
fn wait_for_frozen_checkpoint(vm: &Vm) {
    let scratch = std::env::temp_dir().join(format!(
        "snapsync-qemu{}",
        std::fs::canonicalize(&vm.qmp)
            .unwrap()
            .display()
            .to_string()
            .replace('/', "_")
    ));
    let frozen = || {
        std::fs::read_dir(&scratch)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
            })
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !frozen() {
        assert!(
            Instant::now() < deadline,
            "the run never froze its checkpoint"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
}

fn vm_state(vm: &Vm) -> (Vec<String>, Vec<String>) {
    let mut q = snapsync_qemu::Qmp::connect(&vm.qmp).unwrap();
    let exports = q
        .execute("query-block-exports", serde_json::json!({}))
        .unwrap();
    let nodes = q
        .execute("query-named-block-nodes", serde_json::json!({"flat": true}))
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
        .filter_map(|n| n["node-name"].as_str().map(str::to_string))
        .filter(|n| !n.starts_with('#'))
        .collect();
    e.sort();
    n.sort();
    (e, n)
}

#[test]
fn a_failed_replication_leaves_nothing_in_the_vm_and_the_rerun_works() {
    let mut disk = random(36, SIZE);
    let vm = start_vm(&disk);
    let before = vm_state(&vm);
    let repo = init_repo(vm.dir.path(), &[]);
    replicate_json(&[&vm.url(), &repo, "--snapshot", "c1"]);
    vm.write(4, 10 << 20, 65536);
    disk[(10 << 20)..(10 << 20) + 65536].fill(4);
    // The destination fails while the checkpoint is read: its packs cannot be written.
    let packs = std::path::Path::new(&repo).join("packs");
    let saved = std::path::Path::new(&repo).join("packs.saved");
    std::fs::rename(&packs, &saved).unwrap();
    std::fs::write(&packs, b"not a directory").unwrap();
    let out = run(&["replicate", &vm.url(), &repo, "--snapshot", "c2"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        vm_state(&vm),
        before,
        "the failed run left something in the VM"
    );
    std::fs::remove_file(&packs).unwrap();
    std::fs::rename(&saved, &packs).unwrap();
    // c2's bitmap stays (the changes it recorded are in no other), so c3 against c1
    // still covers the write.
    let r = replicate_json(&[&vm.url(), &repo, "--snapshot", "c3"]);
    assert_eq!(r[0]["base"], "c1", "{r:?}");
    let out = vm.dir.path().join("c3.out");
    ok(&["restore", &repo, "disk0@c3", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == disk);
    assert_eq!(vm_state(&vm), before);
}

#[test]
fn a_raw_disk_replicates_incrementally_and_a_restart_means_a_full_read() {
    let mut disk = random(37, SIZE);
    let mut vm = start_vm_on(&disk, "raw");
    let repo = init_repo(vm.dir.path(), &[]);
    replicate_json(&[&vm.url(), &repo, "--snapshot", "c1"]);
    vm.write(5, 12 << 20, 65536);
    disk[(12 << 20)..(12 << 20) + 65536].fill(5);
    let r = replicate_json(&[&vm.url(), &repo, "--snapshot", "c2"]);
    assert_eq!(
        (r[0]["base"].as_str(), num(&r[0], "read_bytes")),
        (Some("c1"), 65536)
    );
    // A raw disk's bitmaps cannot persist: after a restart there is no common base.
    let _ = snapsync_qemu::Qmp::connect(&vm.qmp)
        .unwrap()
        .execute("quit", serde_json::json!({}));
    vm.restart();
    vm.write(6, 13 << 20, 65536);
    disk[(13 << 20)..(13 << 20) + 65536].fill(6);
    let r = replicate_json(&[&vm.url(), &repo, "--snapshot", "c3"]);
    assert_eq!(r[0]["base_reason"], "no-common-base", "{r:?}");
    assert!(num(&r[0], "sent_bytes") <= 2 * 65536, "{r:?}");
    let out = vm.dir.path().join("c3.out");
    ok(&["restore", &repo, "disk0@c3", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == disk);
}

/// A replication of a disk large enough to be killed while it reads.
struct InFlight {
    vm: Vm,
    disk: Vec<u8>,
    repo: String,
    /// The VM's exports and nodes before the run.
    before: (Vec<String>, Vec<String>),
    /// `snapsync replicate`, once it has frozen its checkpoint.
    child: Child,
}

fn replication_in_flight(seed: u64) -> InFlight {
    let disk = random(seed, 384 << 20);
    let vm = start_vm(&disk);
    let before = vm_state(&vm);
    let repo = init_repo(vm.dir.path(), &[]);
    let child = bin()
        .args(["replicate", &vm.url(), &repo, "--snapshot", "c1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_frozen_checkpoint(&vm);
    InFlight {
        vm,
        disk,
        repo,
        before,
        child,
    }
}

#[test]
fn a_killed_replication_is_cleaned_up_by_the_next_run() {
    let InFlight {
        vm,
        disk,
        repo,
        before,
        mut child,
    } = replication_in_flight(38);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "the run ended before it was killed");
    assert_ne!(vm_state(&vm), before, "a killed run leaves its export");
    // The next run removes what the killed one left, and completes.
    let r = replicate_json(&[&vm.url(), &repo, "--snapshot", "c2"]);
    assert_eq!(r.len(), 1);
    assert_eq!(vm_state(&vm), before);
    let out = vm.dir.path().join("c2.out");
    ok(&["restore", &repo, "disk0@c2", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == disk);
}

#[test]
fn ctrl_c_ends_a_replication_and_removes_what_it_added() {
    let InFlight {
        vm,
        repo,
        before,
        child,
        ..
    } = replication_in_flight(39);
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(vm_state(&vm), before, "Ctrl-C left something in the VM");
    assert!(
        ok(&["list", &repo]).contains("no volumes"),
        "nothing committed"
    );
}

#[test]
fn without_an_nbd_server_snapsync_starts_one_and_stops_it() {
    let disk = random(40, SIZE);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("initial.raw");
    std::fs::write(&raw, &disk).unwrap();
    let image = dir.path().join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let qmp = dir.path().join("qmp.sock");
    let mut child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=disk0,file.driver=file,file.filename={}",
                image.display()
            ),
            "--chardev",
            &format!("socket,path={},server=on,wait=off,id=qmp", qmp.display()),
            "--monitor",
            "chardev=qmp",
        ])
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !qmp.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let repo = init_repo(dir.path(), &[]);
    let url = format!("qemu://{}", qmp.display());
    let r = replicate_json(&[&url, &repo, "--snapshot", "c1"]);
    assert_eq!(r.len(), 1);
    let out = dir.path().join("c1.out");
    ok(&["restore", &repo, "disk0@c1", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == disk);
    // The server it started is gone: starting one now succeeds.
    let mut q = snapsync_qemu::Qmp::connect(&qmp).unwrap();
    let sock = dir.path().join("again.sock");
    q.execute(
        "nbd-server-start",
        serde_json::json!({"addr": {"type": "unix", "data": {"path": sock.display().to_string()}}}),
    )
    .expect("snapsync left its NBD server running");
    drop(q);
    let _ = child.kill();
    let _ = child.wait();
}
