//! `restore` never destroys what it reads, and never leaves a half-written image where a
//! good one was: an output that is the source image (or a hard link, a symlink to it, a
//! layer of its qcow2 backing chain, a file inside the repository) is refused with one
//! line and the source left byte for byte; a failed restore leaves the old target as it
//! was and no temporary file; devices such as `/dev/null` are written as streams.

mod common;

use std::path::Path;

use common::*;

fn refused(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?} must fail: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    stderr
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn restore_refuses_to_write_over_a_raw_source_or_its_links() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let data = random(1, 2 * MIB);
    let img = write_image(&images, "vm", "mon", &data, 1_700_000_000);
    let raw = format!("raw:{}", images.display());
    let hard = dir.path().join("hard.img");
    std::fs::hard_link(&img, &hard).unwrap();
    let soft = dir.path().join("soft.img");
    std::os::unix::fs::symlink(&img, &soft).unwrap();
    for out in [&img, &hard, &soft] {
        let err = refused(&["restore", &raw, "vm@mon", out.to_str().unwrap()]);
        assert!(err.contains("which the source reads"), "{err}");
        assert_eq!(std::fs::read(&img).unwrap(), data, "source changed");
    }
    // Through a repository: a restore into the repository's own directory is refused.
    let repo = init_repo(dir.path(), &[]);
    ok(&["replicate", &raw, &repo]);
    let inside = Path::new(&repo).join("restored.img");
    let err = refused(&["restore", &repo, "vm@mon", inside.to_str().unwrap()]);
    assert!(err.contains("inside"), "{err}");
    assert!(!inside.exists());
    ok(&["verify", &repo, "--read-data"]);
}

#[test]
fn restore_refuses_to_write_over_a_qcow2_image_or_its_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]);
    qemu_write(&base, "qcow2", 0, &random(2, 1 << 20));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    qemu_write(&top, "qcow2", 1 << 20, &random(3, 1 << 20));
    qemu_img(&["snapshot", "-c", "s1", top.to_str().unwrap()]);
    let before_top = std::fs::read(&top).unwrap();
    let before_base = std::fs::read(&base).unwrap();
    let url = format!("qcow2://{}", top.display());
    for out in [&top, &base] {
        for format in ["raw", "qcow2"] {
            let err = refused(&[
                "restore",
                &url,
                "q@s1",
                out.to_str().unwrap(),
                "--format",
                format,
            ]);
            assert!(err.contains("which the source reads"), "{err}");
            assert_eq!(std::fs::read(&top).unwrap(), before_top, "top changed");
            assert_eq!(std::fs::read(&base).unwrap(), before_base, "base changed");
        }
    }
    // Elsewhere it restores, and equals what qemu-img reads.
    let out = dir.path().join("out.img");
    ok(&["restore", &url, "q@s1", out.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        qemu_raw(&top, Some("s1"), 4 << 20)
    );
}

#[test]
fn a_failed_restore_leaves_the_previous_target_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    write_image(&images, "vm", "mon", &random(4, 4 * MIB), 1_700_000_000);
    let repo = init_repo(dir.path(), &[]);
    ok(&["replicate", &format!("raw:{}", images.display()), &repo]);
    // Damage every pack: the restore fails while reading.
    for e in walk(&Path::new(&repo).join("packs")) {
        let mut b = std::fs::read(&e).unwrap();
        let n = b.len();
        for x in &mut b[n / 2..n / 2 + 64] {
            *x ^= 0xff;
        }
        std::fs::write(&e, b).unwrap();
    }
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let target = out_dir.join("vm.img");
    std::fs::write(&target, b"the previous good image").unwrap();
    for format in ["raw", "qcow2"] {
        let r = run(&[
            "restore",
            &repo,
            "vm@mon",
            target.to_str().unwrap(),
            "--format",
            format,
        ]);
        assert_eq!(r.status.code(), Some(1), "{format}: {r:?}");
        assert_eq!(std::fs::read(&target).unwrap(), b"the previous good image");
        assert_eq!(
            files_in(&out_dir),
            ["vm.img"],
            "{format}: temporary file left"
        );
    }
}

#[test]
fn restore_replaces_a_target_whole_and_streams_to_dev_null() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let data = random(5, 3 * MIB);
    write_image(&images, "vm", "mon", &data, 1_700_000_000);
    let raw = format!("raw:{}", images.display());
    let target = dir.path().join("vm.img");
    // A longer old file: nothing of it may survive past the restored image's end.
    std::fs::write(&target, random(6, 5 * MIB)).unwrap();
    ok(&["restore", &raw, "vm@mon", target.to_str().unwrap()]);
    assert_eq!(std::fs::read(&target).unwrap(), data);
    assert_eq!(files_in(dir.path()), ["images", "vm.img"]);
    ok(&["restore", &raw, "vm@mon", "/dev/null"]);
    ok(&["restore", &raw, "vm@mon", "/dev/null", "--format", "qcow2"]);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}
