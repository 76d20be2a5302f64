//! Backing files an image's author chose: by default they must resolve inside the
//! store's directory and be regular files; `backing_anywhere` lifts the first rule only.
//! Every image here is made by qemu-img with `-u -b PATH`, as a hostile tenant would.

mod common;

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use snapsync_qcow2::{Qcow2Options, Qcow2Store};
use snapsync_store::Store;

/// A 1 MiB qcow2 `name` in `dir` whose backing file is `backing` (not checked by
/// qemu-img: `-u`), format `format`.
fn overlay(dir: &Path, name: &str, backing: &str, format: &str) -> std::path::PathBuf {
    let img = p(dir, name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        format,
        &s(&img),
        "1M",
    ]);
    img
}

/// Open `path` on another thread, failing the test if it does not answer within 20 s
/// (a FIFO opened for reading would block forever).
fn open_in_time(path: &Path, options: Qcow2Options) -> Result<Qcow2Store, String> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Qcow2Store::open_with(&path, &options).map_err(|e| e.to_string()));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("opening the store hung")
}

fn any() -> Qcow2Options {
    Qcow2Options::default().with_backing_anywhere(true)
}

#[test]
fn a_backing_file_outside_the_store_directory_is_refused_by_default() {
    let dir = tmp();
    let img = overlay(
        dir.path(),
        "escape.qcow2",
        "../../../../../../etc/passwd",
        "raw",
    );
    for url_path in [dir.path(), img.as_path()] {
        let err = open_in_time(url_path, Qcow2Options::default()).unwrap_err();
        assert!(err.contains("escape.qcow2"), "names the image: {err}");
        assert!(
            err.contains("../etc/passwd"),
            "names the backing path: {err}"
        );
        assert!(
            err.contains("/etc/passwd, outside") && err.contains("backing=any"),
            "names the rule: {err}"
        );
    }
    // Trusted images may opt in, and then the chain reads through.
    let store = open_in_time(dir.path(), any()).unwrap();
    assert_eq!(store.list().unwrap()[0].name, "escape");
}

#[test]
fn a_symlink_leading_out_of_the_directory_is_refused() {
    let dir = tmp();
    let outside = tmp();
    let base = p(outside.path(), "base.raw");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink(&base, p(dir.path(), "base.raw")).unwrap();
    overlay(dir.path(), "top.qcow2", "base.raw", "raw");
    let err = open_in_time(dir.path(), Qcow2Options::default()).unwrap_err();
    assert!(err.contains("outside"), "{err}");
    assert!(open_in_time(dir.path(), any()).is_ok());
}

#[test]
fn backing_files_inside_the_directory_are_followed() {
    let dir = tmp();
    std::fs::create_dir(p(dir.path(), "layers")).unwrap();
    let base = p(dir.path(), "layers/base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&base), "1M"]);
    let top = overlay(dir.path(), "top.qcow2", "layers/base.qcow2", "qcow2");
    assert!(open_in_time(dir.path(), Qcow2Options::default()).is_ok());
    // A single-image URL confines to the image's own directory.
    assert!(open_in_time(&top, Qcow2Options::default()).is_ok());
    let nested = overlay(
        &p(dir.path(), "layers"),
        "up.qcow2",
        "../top.qcow2",
        "qcow2",
    );
    let err = open_in_time(&nested, Qcow2Options::default()).unwrap_err();
    assert!(err.contains("outside"), "{err}");
}

#[test]
fn devices_and_fifos_are_never_layers() {
    let dir = tmp();
    overlay(dir.path(), "zero.qcow2", "/dev/zero", "raw");
    let err = open_in_time(dir.path(), Qcow2Options::default()).unwrap_err();
    assert!(err.contains("/dev/zero"), "{err}");
    let err = open_in_time(dir.path(), any()).unwrap_err();
    assert!(err.contains("character device"), "{err}");
    std::fs::remove_file(p(dir.path(), "zero.qcow2")).unwrap();

    let fifo = p(dir.path(), "pipe.raw");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    overlay(dir.path(), "piped.qcow2", "pipe.raw", "raw");
    for options in [Qcow2Options::default(), any()] {
        let err = open_in_time(dir.path(), options).unwrap_err();
        assert!(err.contains("FIFO"), "{err}");
    }
    // A FIFO given as the image itself.
    let err = open_in_time(&fifo, Qcow2Options::default()).unwrap_err();
    assert!(err.contains("not a regular file"), "{err}");
}
