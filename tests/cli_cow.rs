//! Raw images on real copy-on-write file systems, each made on a loop device for the
//! test: btrfs read-only subvolume snapshots (`raw:DIR?layout=by-snapshot`), XFS
//! reflink copies, and ext4 without shared extents. Incrementals between images that
//! share extents are diffed from the extent maps and read only the changed blocks;
//! wherever the maps cannot tell, the store hashes; restores equal the images.
//!
//! Needs root (mount, losetup) and mkfs.btrfs, mkfs.xfs (`scripts/test.sh` installs
//! them). Without them these tests fail saying so: they never skip silently.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const BLOCK: u64 = 64 << 10;

/// Run a system command; panic with its output if it fails.
fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A fresh file system on a loop device, mounted in a temporary directory; unmounted
/// and detached on drop, also when the test panics.
struct LoopFs {
    mnt: PathBuf,
    device: String,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    fn new(kind: &str) -> Self {
        assert_eq!(
            sh("id", &["-u"]),
            "0",
            "these tests mount file systems on loop devices: run them as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fs.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let f = file.to_str().unwrap();
        match kind {
            "btrfs" => sh("mkfs.btrfs", &["-q", f]),
            "xfs" => sh("mkfs.xfs", &["-q", "-m", "reflink=1", f]),
            "ext4" => sh("mkfs.ext4", &["-q", "-F", f]),
            _ => panic!("unknown file system {kind}"),
        };
        let device = sh("losetup", &["-f", "--show", f]);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let fs = LoopFs {
            mnt,
            device,
            _dir: dir,
        };
        sh("mount", &[&fs.device, fs.mnt.to_str().unwrap()]);
        fs
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let m = self.mnt.to_str().unwrap();
        if !Command::new("umount")
            .arg(m)
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// The unit of a file system's extents (btrfs, XFS): an extent diff is this fine.
const PAGE: u64 = 4 << 10;

/// What [`write_in_place`] wrote over: the 4 KiB pages (an extent diff's unit) and the
/// repository's 64 KiB blocks (a hash diff's unit, and what the engine reads).
struct Touched {
    pages: BTreeSet<u64>,
    blocks: BTreeSet<u64>,
}

impl Touched {
    fn page_bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE
    }

    fn block_bytes(&self) -> u64 {
        self.blocks.len() as u64 * BLOCK
    }
}

/// Write `count` pieces of `len` pseudo-random bytes into the file at `path` in place
/// (no truncation: the rest keeps its extents); returns what they touched.
fn write_in_place(path: &Path, seed: u64, count: usize, len: usize) -> Touched {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let r = random(seed, count * 8);
    let mut touched = Touched {
        pages: BTreeSet::new(),
        blocks: BTreeSet::new(),
    };
    for k in 0..count {
        let off = u64::from_le_bytes(r[k * 8..k * 8 + 8].try_into().unwrap()) % (size - len as u64);
        f.write_all_at(&random(seed * 31 + k as u64, len), off)
            .unwrap();
        let end = off + len as u64;
        touched.pages.extend(off / PAGE..end.div_ceil(PAGE));
        touched.blocks.extend(off / BLOCK..end.div_ceil(BLOCK));
    }
    f.sync_all().unwrap();
    touched
}

/// Restore every snapshot of `volume` from `repo` and compare it with its image.
fn restores_equal(repo: &str, volume: &str, images: &[(&str, PathBuf)], scratch: &Path) {
    for (snap, image) in images {
        let out = scratch.join(format!("{volume}-{snap}.out"));
        ok(&[
            "restore",
            repo,
            &format!("{volume}@{snap}"),
            out.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(image).unwrap(),
            "restore of {volume}@{snap} differs from {}",
            image.display()
        );
        std::fs::remove_file(&out).unwrap();
    }
}

/// An incremental found from extents: changed are the pages written (or, where the file
/// system copied more on write, a little more), and read at most 1.2 times the blocks
/// written.
fn check_extent_incremental(report: &serde_json::Value, touched: &Touched) {
    assert_eq!(report["diff_method"], "extents", "{report}");
    let changed = num(report, "changed_bytes");
    assert!(
        changed >= touched.page_bytes() && changed <= touched.block_bytes(),
        "changed {changed} bytes for {} bytes of pages written: {report}",
        touched.page_bytes()
    );
    let written = touched.block_bytes();
    let read = num(report, "read_bytes");
    assert!(
        read * 10 <= written * 12,
        "read {read} bytes for {written} bytes of changed blocks: {report}"
    );
    assert!(read >= written, "read {read} < changed {written}: {report}");
}

/// `snapsync diff --json` of `target` against `base` run as user and group 65534
/// (nobody), after opening the way to the mount point for it.
fn diff_unprivileged(fs: &LoopFs, src: &str, target: &str, base: &str) -> serde_json::Value {
    use std::os::unix::fs::PermissionsExt;
    // Only what the test made; the temporary directory's parent (/tmp) is open to all.
    for p in [fs._dir.path(), fs.mnt.as_path()] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode | 0o755)).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_snapsync");
    let out = sh(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin,
            "diff",
            src,
            target,
            "--base",
            base,
            "--json",
        ],
    );
    serde_json::from_str(&out).unwrap()
}

/// Replicate the snapshots of `volume` one at a time, in order, so that each is based
/// on the one before (replicating them all at once may plan a later one before the
/// destination has its predecessor); their reports.
fn replicate_each(
    src: &str,
    repo: &str,
    volume: &str,
    snapshots: &[&str],
) -> Vec<serde_json::Value> {
    let mut reports = Vec::new();
    for (k, s) in snapshots.iter().enumerate() {
        let r = replicate_json(&[src, repo, "--volume", volume, "--snapshot", s]);
        assert_eq!(r.len(), 1, "{r:?}");
        let expected_base = k.checked_sub(1).map(|p| snapshots[p]);
        assert_eq!(r[0]["base"].as_str(), expected_base, "{r:?}");
        reports.push(r[0].clone());
    }
    reports
}

#[test]
fn btrfs_snapshots_by_snapshot_are_diffed_from_extents() {
    let fs = LoopFs::new("btrfs");
    let live = fs.mnt.join("live");
    let snaps = fs.mnt.join("snaps");
    sh(
        "btrfs",
        &["-q", "subvolume", "create", live.to_str().unwrap()],
    );
    std::fs::create_dir(&snaps).unwrap();
    std::fs::write(live.join("vm.img"), random(1, 48 * MIB)).unwrap();
    std::fs::write(live.join("db.img"), random(2, 8 * MIB)).unwrap();
    let snapshot = |name: &str| {
        let to = snaps.join(name);
        sh(
            "btrfs",
            &[
                "-q",
                "subvolume",
                "snapshot",
                "-r",
                live.to_str().unwrap(),
                to.to_str().unwrap(),
            ],
        );
        to
    };
    snapshot("s1");
    let touched2 = write_in_place(&live.join("vm.img"), 3, 20, 100 * 1024);
    snapshot("s2");
    let touched3 = write_in_place(&live.join("vm.img"), 4, 5, 4096);
    snapshot("s3");

    let scratch = tempfile::tempdir().unwrap();
    let repo = init_repo(scratch.path(), &[]);
    let src = format!("raw:{}?layout=by-snapshot", snaps.display());
    let listing: serde_json::Value = serde_json::from_str(&ok(&["list", &src, "--json"])).unwrap();
    let volumes = listing["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 2, "{listing}");
    for v in volumes {
        let names: Vec<_> = v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].clone())
            .collect();
        assert_eq!(names, ["s1", "s2", "s3"], "{listing}");
        for s in v["snapshots"].as_array().unwrap() {
            assert_eq!(s["age_from"], "btime", "{listing}");
        }
    }

    let reports = replicate_each(&src, &repo, "vm", &["s1", "s2", "s3"]);
    assert!(reports[0]["base"].is_null());
    assert_eq!(reports[0]["diff_method"], "full");
    check_extent_incremental(&reports[1], &touched2);
    check_extent_incremental(&reports[2], &touched3);
    // `diff` says the same.
    let d: serde_json::Value =
        serde_json::from_str(&ok(&["diff", &src, "vm@s3", "--base", "s2", "--json"])).unwrap();
    assert_eq!(d["diff_method"], "extents");
    assert_eq!(num(&d, "changed_bytes"), touched3.page_bytes(), "{d}");
    // Reading needs no privilege: the same diff as an unprivileged user.
    let d = diff_unprivileged(&fs, &src, "vm@s3", "s2");
    assert_eq!(d["diff_method"], "extents", "{d}");
    assert_eq!(num(&d, "changed_bytes"), touched3.page_bytes(), "{d}");
    // Unchanged between snapshots: nothing to read at all.
    let db = replicate_each(&src, &repo, "db", &["s1", "s2", "s3"]);
    for r in &db[1..] {
        assert_eq!(r["diff_method"], "extents");
        assert_eq!(num(r, "read_bytes"), 0, "{r}");
    }

    // Defragmenting unshares the extents, and rewriting the file with what it holds
    // gives it all new ones: a larger diff, the same snapshot.
    sh(
        "btrfs",
        &[
            "filesystem",
            "defragment",
            "-f",
            live.join("vm.img").to_str().unwrap(),
        ],
    );
    let same = std::fs::read(live.join("vm.img")).unwrap();
    std::fs::write(
        live.join("db.img"),
        std::fs::read(live.join("db.img")).unwrap(),
    )
    .unwrap();
    // Grown by a preallocated (unwritten) extent: doubtful in the map, so compared
    // (both read zeros there), not trusted.
    sh(
        "fallocate",
        &[
            "-o",
            "8M",
            "-l",
            "1M",
            live.join("db.img").to_str().unwrap(),
        ],
    );
    snapshot("s4");
    let r = replicate_json(&[&src, &repo]);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(
        std::fs::metadata(snaps.join("s4/db.img")).unwrap().len(),
        9 * MIB as u64
    );
    for r in &r {
        assert_eq!(r["diff_method"], "extents");
        assert_eq!(num(r, "sent_bytes"), 0, "{r}");
    }
    assert_eq!(same, std::fs::read(snaps.join("s4/vm.img")).unwrap());

    let images = |vol: &str| -> Vec<(&str, PathBuf)> {
        ["s1", "s2", "s3", "s4"]
            .into_iter()
            .map(|s| (s, snaps.join(s).join(format!("{vol}.img"))))
            .collect()
    };
    restores_equal(&repo, "vm", &images("vm"), scratch.path());
    restores_equal(&repo, "db", &images("db"), scratch.path());
}

#[test]
fn compressed_btrfs_extents_are_never_trusted() {
    // Compressed extents are ENCODED: their physical address says nothing about the
    // bytes at an offset inside them. Too little is decided from the maps, so the
    // store hashes; the restores are right either way.
    let fs = LoopFs::new("btrfs");
    let m = fs.mnt.to_str().unwrap();
    sh("mount", &["-o", "remount,compress-force=zstd", m]);
    let live = fs.mnt.join("live");
    let snaps = fs.mnt.join("snaps");
    sh(
        "btrfs",
        &["-q", "subvolume", "create", live.to_str().unwrap()],
    );
    std::fs::create_dir(&snaps).unwrap();
    // Compressible: each 4 KiB page repeats 64 random bytes.
    let data: Vec<u8> = random(9, 16 * MIB / 64)
        .chunks(64)
        .flat_map(|c| c.repeat(64))
        .take(16 * MIB)
        .collect();
    std::fs::write(live.join("vm.img"), &data).unwrap();
    let snapshot = |name: &'static str| {
        let to = snaps.join(name);
        sh(
            "btrfs",
            &[
                "-q",
                "subvolume",
                "snapshot",
                "-r",
                live.to_str().unwrap(),
                to.to_str().unwrap(),
            ],
        );
        (name, to.join("vm.img"))
    };
    let s1 = snapshot("s1");
    let touched = write_in_place(&live.join("vm.img"), 10, 8, 8192);
    let s2 = snapshot("s2");
    let map = sh("filefrag", &["-v", s2.1.to_str().unwrap()]);
    assert!(map.contains("encoded"), "not compressed: {map}");

    let scratch = tempfile::tempdir().unwrap();
    let repo = init_repo(scratch.path(), &[]);
    let src = format!("raw:{}?layout=by-snapshot", snaps.display());
    let r = replicate_each(&src, &repo, "vm", &["s1", "s2"]);
    assert_eq!(r[1]["diff_method"], "hash", "{r:?}");
    assert_eq!(num(&r[1], "changed_bytes"), touched.block_bytes());
    restores_equal(&repo, "vm", &[s1, s2], scratch.path());
}

/// Reflink copies `DIR/vm/sN.img` of a live image on `fs`, written between copies;
/// replicated, checked with `check`, and restored.
fn reflink_copies(fs: &LoopFs, reflink: &str, check: impl Fn(&serde_json::Value, &Touched)) {
    let live = fs.mnt.join("live.img");
    let store = fs.mnt.join("store");
    std::fs::create_dir_all(store.join("vm")).unwrap();
    let mut data = random(5, 40 * MIB);
    data[8 * MIB..12 * MIB].fill(0);
    std::fs::write(&live, &data).unwrap();
    let copy = |name: &str| {
        let to = store.join("vm").join(format!("{name}.img"));
        sh(
            "cp",
            &[reflink, live.to_str().unwrap(), to.to_str().unwrap()],
        );
        (name.to_string(), to)
    };
    let mut images = vec![copy("s1")];
    let touched2 = write_in_place(&live, 6, 30, 64 * 1024);
    images.push(copy("s2"));
    let touched3 = write_in_place(&live, 7, 3, 1000);
    images.push(copy("s3"));

    let scratch = tempfile::tempdir().unwrap();
    let repo = init_repo(scratch.path(), &[]);
    let src = format!("raw:{}", store.display());
    let listing: serde_json::Value = serde_json::from_str(&ok(&["list", &src, "--json"])).unwrap();
    for s in listing["volumes"][0]["snapshots"].as_array().unwrap() {
        assert_eq!(s["age_from"], "btime", "{listing}");
    }
    let reports = replicate_each(&src, &repo, "vm", &["s1", "s2", "s3"]);
    check(&reports[1], &touched2);
    check(&reports[2], &touched3);
    let images: Vec<(&str, PathBuf)> = images
        .iter()
        .map(|(n, p)| (n.as_str(), p.clone()))
        .collect();
    restores_equal(&repo, "vm", &images, scratch.path());
}

#[test]
fn xfs_reflink_copies_are_diffed_from_extents() {
    let fs = LoopFs::new("xfs");
    reflink_copies(&fs, "--reflink=always", check_extent_incremental);
}

#[test]
fn ext4_copies_share_nothing_and_are_hashed() {
    let fs = LoopFs::new("ext4");
    reflink_copies(&fs, "--reflink=auto", |report, touched| {
        assert_eq!(report["diff_method"], "hash", "{report}");
        // Hashing finds exactly the written blocks.
        assert_eq!(
            num(report, "changed_bytes"),
            touched.block_bytes(),
            "{report}"
        );
    });
}

/// Two snapshots of a volume on two file systems (one image reached through a symlink
/// into another mount): physical addresses of different devices say nothing about each
/// other, so the diff is hashed, and the result is right.
#[test]
fn images_on_two_file_systems_are_hashed_not_compared_by_extents() {
    let a = LoopFs::new("btrfs");
    let b = LoopFs::new("btrfs");
    let store = a.mnt.join("store");
    std::fs::create_dir_all(store.join("vm")).unwrap();
    let s1 = store.join("vm").join("s1.img");
    std::fs::write(&s1, random(21, 16 * MIB)).unwrap();
    // The same bytes on the other file system, then changed in place.
    let elsewhere = b.mnt.join("s2.img");
    sh("cp", &[s1.to_str().unwrap(), elsewhere.to_str().unwrap()]);
    let touched = write_in_place(&elsewhere, 22, 5, 64 * 1024);
    let s2 = store.join("vm").join("s2.img");
    std::os::unix::fs::symlink(&elsewhere, &s2).unwrap();
    let set_age = |p: &Path, secs: i64| {
        sh(
            "touch",
            &["-h", "-d", &format!("@{secs}"), p.to_str().unwrap()],
        );
    };
    set_age(&s1, 1_700_000_000);
    set_age(&elsewhere, 1_700_000_100);
    set_age(&s2, 1_700_000_100);

    let scratch = tempfile::tempdir().unwrap();
    let repo = init_repo(scratch.path(), &[]);
    let src = format!("raw:{}", store.display());
    let reports = replicate_each(&src, &repo, "vm", &["s1", "s2"]);
    assert_eq!(reports[1]["diff_method"], "hash", "{}", reports[1]);
    assert_eq!(
        num(&reports[1], "changed_bytes"),
        touched.block_bytes(),
        "{}",
        reports[1]
    );
    restores_equal(
        &repo,
        "vm",
        &[("s1", s1), ("s2", elsewhere)],
        scratch.path(),
    );
}

/// A reflink copy written while an incremental reads it from its extents: the change
/// is found (the file is not what was listed), nothing is committed, and the rerun
/// once nothing writes succeeds and restores what the image holds.
#[test]
fn an_image_written_during_an_extent_diff_commits_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let fs = LoopFs::new("xfs");
    let store = fs.mnt.join("store");
    std::fs::create_dir_all(store.join("vm")).unwrap();
    let s1 = store.join("vm").join("s1.img");
    std::fs::write(&s1, random(31, 40 * MIB)).unwrap();
    let s2 = store.join("vm").join("s2.img");
    sh(
        "cp",
        &[
            "--reflink=always",
            s1.to_str().unwrap(),
            s2.to_str().unwrap(),
        ],
    );
    write_in_place(&s2, 32, 20, 64 * 1024);
    let scratch = tempfile::tempdir().unwrap();
    let repo = init_repo(scratch.path(), &[]);
    let src = format!("raw:{}", store.display());
    replicate_each(&src, &repo, "vm", &["s1"]);

    // Overwrite blocks of s2 in place while replicate runs: once before it starts,
    // then every 2 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let writer = {
        let (stop, s2) = (stop.clone(), s2.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&s2).unwrap();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all_at(&random(100 + k, 4096), (k % 600) * BLOCK)
                    .unwrap();
                if k == 0 {
                    started_tx.send(()).unwrap();
                }
                k += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    started_rx.recv().unwrap();
    let out = run(&[
        "replicate",
        &src,
        &repo,
        "--volume",
        "vm",
        "--snapshot",
        "s2",
    ]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("changed while it was read"), "{err}");
    assert!(!ok(&["list", &repo]).contains("s2"), "nothing committed");

    // Still now: the rerun succeeds (hashing what the writes left in doubt, such as
    // delayed allocations) and restores the image as it is.
    let reports = replicate_json(&[&src, &repo, "--volume", "vm", "--snapshot", "s2"]);
    assert_eq!(reports[0]["base"], "s1", "{reports:?}");
    restores_equal(&repo, "vm", &[("s2", s2)], scratch.path());
}
