//! The repository runs the shared conformance suite, as a sink and as a source.

use snapsync_engine::{replicate, ReplicateOptions};
use snapsync_repo::{Location, Repository};
use snapsync_store::conformance::{check_sink, check_source, standard_fixture};
use snapsync_store::memory::MemoryStore;
use snapsync_store::NoProgress;

fn fresh(dir: &std::path::Path, bs: u64) -> Repository {
    Repository::init(Location::Local(dir.join("repo")), bs).unwrap()
}

#[test]
fn repository_is_a_conforming_sink() {
    for bs in [4096, 64 << 10] {
        let dir = tempfile::tempdir().unwrap();
        check_sink(&fresh(dir.path(), bs));
    }
}

#[test]
fn repository_is_a_conforming_source() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = standard_fixture();
    let mem = MemoryStore::new("fixture", 4096);
    mem.add_fixture(&fixture);
    let repo = fresh(dir.path(), 16 << 10);
    replicate(
        &mem,
        &repo,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap();
    check_source(&repo, &fixture, 16 << 10);
    // And reopened from disk, without any cache.
    let reopened = Repository::open(Location::Local(dir.path().join("repo"))).unwrap();
    check_source(&reopened, &fixture, 16 << 10);
    let report = reopened.verify(true, &NoProgress).unwrap();
    assert!(report.ok, "{report:?}");
}
