//! The raw store runs the shared conformance suite, with and without hash caches.

use std::fs::File;
use std::time::{Duration, UNIX_EPOCH};

use snapsync_raw::{RawStore, HASH_BLOCK_SIZE};
use snapsync_store::conformance::{check_source, standard_fixture, Fixture};
use snapsync_store::SnapshotSource;

fn populate(dir: &std::path::Path, fixture: &Fixture) {
    for v in &fixture.volumes {
        std::fs::create_dir_all(dir.join(&v.name)).unwrap();
        for s in &v.snapshots {
            let p = dir.join(&v.name).join(format!("{}.img", s.name));
            std::fs::write(&p, &s.content).unwrap();
            let t = UNIX_EPOCH + Duration::new(s.created.secs as u64, s.created.nanos);
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
    }
}

#[test]
fn raw_store_is_a_conforming_source() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = standard_fixture();
    populate(dir.path(), &fixture);
    let store = RawStore::open(dir.path()).unwrap();
    // First run fills the hash caches, the second runs from them.
    check_source(&store, &fixture, HASH_BLOCK_SIZE);
    check_source(&store, &fixture, HASH_BLOCK_SIZE);
    let reopened = RawStore::open(dir.path()).unwrap();
    assert_eq!(
        snapsync_store::Store::list(&store).unwrap(),
        snapsync_store::Store::list(&reopened).unwrap()
    );
}

#[test]
fn a_changed_image_is_never_diffed_from_a_stale_cache() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = standard_fixture();
    populate(dir.path(), &fixture);
    let store = RawStore::open(dir.path()).unwrap();
    let base = Some(snapsync_store::SnapshotRef::new("alpha", "s1"));
    let before = store.diff("alpha", "s2", base).unwrap();
    // Rewrite one block of s2 while keeping its size and mtime.
    let p = dir.path().join("alpha/s2.img");
    let md = std::fs::metadata(&p).unwrap();
    let mut content = std::fs::read(&p).unwrap();
    content[600 * 1024] ^= 0x55;
    std::fs::write(&p, &content).unwrap();
    File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(md.modified().unwrap())
        .unwrap();
    let after = store.diff("alpha", "s2", base).unwrap();
    assert_ne!(before, after);
    assert!(after.data.covers(600 * 1024, 1));
}
