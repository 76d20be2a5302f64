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

/// The standard fixture replicated into a repository `init` creates in `dir`, checked
/// as a source there and again reopened from disk with `options` (no cache), then
/// verified with its data: the reopened repository and the verify report.
fn conforming_source(
    dir: &std::path::Path,
    init: impl Fn(Location, u64) -> Repository,
    options: &snapsync_repo::RepoOptions,
) -> (Repository, snapsync_repo::VerifyReport) {
    let fixture = standard_fixture();
    let mem = MemoryStore::new("fixture", 4096);
    mem.add_fixture(&fixture);
    let location = || Location::Local(dir.join("repo"));
    let repo = init(location(), 16 << 10);
    replicate(
        &mem,
        &repo,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap();
    check_source(&repo, &fixture, 16 << 10);
    let reopened = Repository::open_with(location(), options).unwrap();
    check_source(&reopened, &fixture, 16 << 10);
    let report = reopened.verify(true, &NoProgress).unwrap();
    assert!(report.ok, "{report:?}");
    (reopened, report)
}

#[test]
fn repository_is_a_conforming_source() {
    let dir = tempfile::tempdir().unwrap();
    conforming_source(
        dir.path(),
        |l, bs| Repository::init(l, bs).unwrap(),
        &Default::default(),
    );
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
    let location = || Location::Local(dir.path().join("repo"));
    let (reopened, report) = conforming_source(
        dir.path(),
        |l, bs| Repository::init_encrypted(l, bs, &encrypted_options()).unwrap(),
        &encrypted_options(),
    );
    assert!(reopened.is_encrypted());
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
