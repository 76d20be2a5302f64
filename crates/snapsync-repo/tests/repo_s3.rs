//! The repository on S3 (a real moto server): the shared conformance suite as a sink
//! and as a source, the create-only check recorded at init, prefixes, clear errors.

#[path = "../../../tests/common/s3.rs"]
mod s3;

use snapsync_engine::{replicate, ReplicateOptions};
use snapsync_repo::{Location, Repository};
use snapsync_store::conformance::{check_sink, check_source, standard_fixture};
use snapsync_store::memory::MemoryStore;
use snapsync_store::{NoProgress, StoreError};

/// A location in a fresh bucket (the server is started on first use).
fn fresh_location(prefix: &str) -> Location {
    s3::endpoint();
    Location::S3 {
        bucket: s3::create_bucket(),
        prefix: prefix.into(),
    }
}

#[test]
fn s3_repository_is_a_conforming_sink() {
    for bs in [4096, 64 << 10] {
        let repo = Repository::init(fresh_location("repo"), bs).unwrap();
        check_sink(&repo);
    }
}

#[test]
fn s3_repository_is_a_conforming_source() {
    let fixture = standard_fixture();
    let mem = MemoryStore::new("fixture", 4096);
    mem.add_fixture(&fixture);
    // At the bucket's root: no prefix at all.
    let loc = fresh_location("");
    let repo = Repository::init(loc.clone(), 16 << 10).unwrap();
    replicate(
        &mem,
        &repo,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap();
    check_source(&repo, &fixture, 16 << 10);
    // Reopened, without any cache.
    let reopened = Repository::open(loc).unwrap();
    check_source(&reopened, &fixture, 16 << 10);
    let report = reopened.verify(true, &NoProgress).unwrap();
    assert!(report.ok, "{report:?}");
}

#[test]
fn init_checks_create_only_and_records_it_and_leaves_no_probe() {
    let loc = fresh_location("deep/er/repo");
    let Location::S3 { bucket, .. } = &loc else {
        unreachable!()
    };
    let repo = Repository::init(loc.clone(), 64 << 10).unwrap();
    let keys: Vec<String> = s3::list_objects(bucket, "")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec!["deep/er/repo/config".to_string()], "{keys:?}");
    let opened = Repository::open(loc.clone()).unwrap();
    assert_eq!(opened.repository_id(), repo.repository_id());
    // A second init in the same place is refused, naming it.
    let e = Repository::init(loc.clone(), 64 << 10).unwrap_err();
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
    assert!(e.to_string().contains(&loc.to_string()), "{e}");
    // A sibling prefix is another, independent place.
    let sibling = Location::S3 {
        bucket: bucket.clone(),
        prefix: "deep/er/other".into(),
    };
    let other = Repository::init(sibling, 4096).unwrap();
    assert_ne!(other.repository_id(), repo.repository_id());
}

#[test]
fn open_of_missing_repository_or_bucket_says_what() {
    let loc = fresh_location("nothing-here");
    let e = Repository::open(loc.clone()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&loc.to_string())
            && msg.contains("snapsync repository")
            && msg.contains("not found"),
        "{msg}"
    );
    let no_bucket = Location::S3 {
        bucket: "snapsync-no-such-bucket".into(),
        prefix: "r".into(),
    };
    let msg = Repository::open(no_bucket).unwrap_err().to_string();
    assert!(msg.contains("s3://snapsync-no-such-bucket/r"), "{msg}");
}
