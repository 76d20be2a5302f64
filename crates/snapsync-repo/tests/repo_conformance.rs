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

/// Options that open the encrypted repositories below (a cheap key derivation).
fn encrypted_options() -> snapsync_repo::RepoOptions {
    let kdf = snapsync_repo::KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    snapsync_repo::RepoOptions::default()
        .with_credentials(snapsync_repo::Credentials::default().with_passphrase("conformance"))
        .with_kdf(kdf)
}

#[test]
fn encrypted_repository_is_a_conforming_sink_and_source() {
    for bs in [4096, 64 << 10] {
        let dir = tempfile::tempdir().unwrap();
        let location = Location::Local(dir.path().join("repo"));
        check_sink(&Repository::init_encrypted(location, bs, &encrypted_options()).unwrap());
    }
    let dir = tempfile::tempdir().unwrap();
    let fixture = standard_fixture();
    let mem = MemoryStore::new("fixture", 4096);
    mem.add_fixture(&fixture);
    let location = || Location::Local(dir.path().join("repo"));
    let repo = Repository::init_encrypted(location(), 16 << 10, &encrypted_options()).unwrap();
    replicate(
        &mem,
        &repo,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap();
    check_source(&repo, &fixture, 16 << 10);
    let reopened = Repository::open_with(location(), &encrypted_options()).unwrap();
    assert!(reopened.is_encrypted());
    check_source(&reopened, &fixture, 16 << 10);
    let report = reopened.verify(true, &NoProgress).unwrap();
    assert!(report.ok, "{report:?}");
    assert!(report.nonces_checked.unwrap() > 0);
    // Without the passphrase, or with another, it does not open.
    let e = Repository::open(location()).unwrap_err();
    assert!(
        matches!(e, snapsync_store::StoreError::KeyRequired { .. }),
        "{e}"
    );
    let wrong = encrypted_options()
        .with_credentials(snapsync_repo::Credentials::default().with_passphrase("other"));
    let e = Repository::open_with(location(), &wrong).unwrap_err();
    assert!(
        matches!(e, snapsync_store::StoreError::WrongKey { .. }),
        "{e}"
    );
}
