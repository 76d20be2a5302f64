//! `verify --read-data` reports progress by the one contract: one phase, advanced by
//! exactly the pack bytes it announced and re-read, then finished.

use snapsync_core::Timestamp;
use snapsync_engine::{replicate, ReplicateOptions};
use snapsync_repo::{Location, Repository};
use snapsync_store::memory::MemoryStore;
use snapsync_store::sample::pseudo_random;
use snapsync_store::{NoProgress, RecordedProgress};

#[test]
fn verify_reports_the_pack_data_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(Location::Local(dir.path().join("repo")), 4096).unwrap();
    let src = MemoryStore::new("src", 4096);
    src.add_snapshot("vm", "s1", Timestamp::new(1, 0), pseudo_random(3, 1 << 20));
    replicate(
        &src,
        &repo,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap();

    let progress = RecordedProgress::default();
    let report = repo.verify(true, &progress).unwrap();
    assert!(report.ok, "{report:?}");
    let phases = progress.phases();
    assert_eq!(phases.len(), 1, "{phases:?}");
    assert_eq!(phases[0].label, "verify");
    assert!(report.bytes_read > 0);
    assert_eq!(phases[0].total_bytes, report.bytes_read);
    assert_eq!(phases[0].done_bytes, report.bytes_read);
    assert!(phases[0].finished);

    let progress = RecordedProgress::default();
    repo.verify(false, &progress).unwrap();
    assert!(
        progress.phases().is_empty(),
        "nothing read, nothing reported"
    );
}
