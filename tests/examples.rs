//! The examples in `examples/`, run as part of the test suite: each example's logic is
//! compiled into this test (its `main` is only a thin argument parser), so a change to
//! the library that breaks an example fails here, not in a user's hands.

mod common;

#[allow(dead_code)]
#[path = "../examples/replicate_dir.rs"]
mod replicate_dir;

#[allow(dead_code)]
#[path = "../examples/restore_snapshot.rs"]
mod restore_snapshot;

use common::*;

#[test]
fn replicate_a_directory_then_restore_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let repo = dir.path().join("repo");
    let mut data = random(1, 4 * MIB);
    write_image(&images, "vm", "s1", &data, 1_700_000_000);
    scribble(&mut data, 2, 3, 64 << 10);
    write_image(&images, "vm", "s2", &data, 1_700_003_600);

    let sent = replicate_dir::replicate_dir(&images, &repo).unwrap();
    assert_eq!(sent, ["vm@s1", "vm@s2"]);
    // The second run finds the repository and everything in it.
    assert!(replicate_dir::replicate_dir(&images, &repo)
        .unwrap()
        .is_empty());

    let out = dir.path().join("s2.img");
    let url = format!("file://{}", repo.display());
    let stats = restore_snapshot::restore_snapshot(&url, "vm@s2", &out).unwrap();
    assert_eq!(stats.size, data.len() as u64);
    assert!(
        std::fs::read(&out).unwrap() == data,
        "restored image differs"
    );

    let e = restore_snapshot::restore_snapshot(&url, "vm@", &out).unwrap_err();
    assert!(e.to_string().contains("VOLUME@SNAPSHOT"), "{e}");
}
