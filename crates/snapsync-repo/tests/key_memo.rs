//! Wrapping keys remembered between opens (`Credentials::remembering`): a daemon opens
//! its encrypted destinations again for every run and must not pay Argon2id each time,
//! yet a remembered key must open no more than the passphrase itself would.

use snapsync_repo::{Credentials, KdfParams, Location, RepoOptions, Repository, WrappingKeyMemo};

const BS: u64 = 64 * 1024;
const FIRST: &str = "the first passphrase";
const SECOND: &str = "the second passphrase";

fn cheap() -> KdfParams {
    KdfParams {
        memory_kib: 256,
        iterations: 2,
        parallelism: 1,
    }
}

fn open(dir: &std::path::Path, credentials: Credentials) -> snapsync_store::Result<Repository> {
    Repository::open_with(
        Location::Local(dir.to_path_buf()),
        &RepoOptions::default().with_credentials(credentials),
    )
}

#[test]
fn a_remembered_key_is_derived_once_and_opens_only_what_its_passphrase_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    let init = RepoOptions::default()
        .with_credentials(Credentials::default().with_passphrase(FIRST))
        .with_kdf(cheap());
    let repo = Repository::init_encrypted(Location::Local(dir.clone()), BS, &init).unwrap();
    let first_key = repo.key_id().unwrap().to_string();
    drop(repo);

    let memo = WrappingKeyMemo::new();
    let first = || {
        Credentials::default()
            .with_passphrase(FIRST)
            .remembering(memo.clone())
    };
    // Opened three times: derived once.
    for _ in 0..3 {
        assert!(open(&dir, first()).unwrap().is_encrypted());
    }
    assert_eq!((memo.derived(), memo.len()), (1, 1));

    // Another passphrase is another key; a wrong one is derived, kept, and opens nothing,
    // however often it is tried.
    let repo = open(&dir, first()).unwrap();
    let second_key = repo
        .add_key(&Credentials::default().with_passphrase(SECOND), cheap())
        .unwrap();
    drop(repo);
    let second = || {
        Credentials::default()
            .with_passphrase(SECOND)
            .remembering(memo.clone())
    };
    assert_eq!(
        open(&dir, second()).unwrap().key_id(),
        Some(second_key.as_str())
    );
    for _ in 0..2 {
        let wrong = Credentials::default()
            .with_passphrase("wrong")
            .remembering(memo.clone());
        let Err(err) = open(&dir, wrong) else {
            panic!("a wrong passphrase opened the repository");
        };
        assert!(err.to_string().contains("passphrase"), "{err}");
    }
    let derived = memo.derived();
    assert!(derived >= 3, "{derived}");

    // Its key object removed, the first passphrase opens nothing, remembered or not.
    open(&dir, second())
        .unwrap()
        .remove_key(&first_key)
        .unwrap();
    assert!(open(&dir, first()).is_err());
    assert!(open(&dir, Credentials::default().with_passphrase(FIRST)).is_err());
    // Added again (a new key object, a new salt): derived afresh, and it opens.
    let repo = open(&dir, second()).unwrap();
    let again = repo
        .add_key(&Credentials::default().with_passphrase(FIRST), cheap())
        .unwrap();
    drop(repo);
    let before = memo.derived();
    assert_eq!(open(&dir, first()).unwrap().key_id(), Some(again.as_str()));
    assert!(memo.derived() > before);
    let before = memo.derived();
    open(&dir, first()).unwrap();
    assert_eq!(
        memo.derived(),
        before,
        "the new key object's key is remembered too"
    );
}
