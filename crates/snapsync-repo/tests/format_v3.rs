//! Format version 3 (encrypted repositories), frozen: a small encrypted repository
//! committed as a fixture (`tests/fixtures/v3-encrypted-repo`) that every future
//! version must open with each of its keys, read, verify and write into.
//!
//! Its keys pin the key derivation: one passphrase wrapped with one Argon2id lane (the
//! default until session 11), one with four lanes (the default since), and a key file.
//! The fixture was written with the `argon2` crate 0.5.3, which computes lanes one after
//! another; a later crate that computes them in parallel must derive the same keys.
//! Its Argon2id costs are tiny (the fixture is about formats, not about cost).

use std::path::{Path, PathBuf};

use snapsync_repo::{Credentials, KdfParams, Location, RepoOptions, Repository};

mod fixture;
use fixture::BS;

/// Where the fixture lives in the source tree.
fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v3-encrypted-repo")
}

/// The memory store the fixture was replicated from (its name is in the hints).
const SOURCE: &str = "v3-fixture";
/// The passphrase wrapped with one Argon2id lane.
const ONE_LANE: &str = "fixture passphrase, one lane";
/// The passphrase wrapped with four Argon2id lanes.
const FOUR_LANES: &str = "fixture passphrase, four lanes";
/// The key file's contents.
const KEY_FILE: &[u8] = b"0123456789abcdef0123456789abcdef fixture key file";

fn kdf(lanes: u32) -> KdfParams {
    KdfParams {
        memory_kib: 256,
        iterations: 2,
        parallelism: lanes,
    }
}

/// Wrote the fixture (once, with the code of session 11 before the `argon2` upgrade):
/// `SNAPSYNC_WRITE_V3_FIXTURE=1 cargo test -p snapsync-repo --test format_v3 -- --ignored`.
#[test]
#[ignore = "writes the committed fixture; run only to create it"]
fn write_the_v3_fixture() {
    let Some(dir) = fixture::dir_to_write("SNAPSYNC_WRITE_V3_FIXTURE", fixture_dir()) else {
        return;
    };
    let one = RepoOptions::default()
        .with_credentials(Credentials::default().with_passphrase(ONE_LANE))
        .with_kdf(kdf(1));
    let repo = Repository::init_encrypted(Location::Local(dir), BS, &one).unwrap();
    repo.add_key(&Credentials::default().with_passphrase(FOUR_LANES), kdf(4))
        .unwrap();
    repo.add_key(&Credentials::default().with_key_file(KEY_FILE), kdf(1))
        .unwrap();
    fixture::replicate(&fixture::fixture_source(SOURCE), &repo);
}

/// Open a copy of the fixture with `credentials` and check it whole.
fn check_with(credentials: Credentials) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("v3-encrypted-repo");
    fixture::copy_tree(&fixture_dir(), &copy);
    let options = RepoOptions::default().with_credentials(credentials);
    let repo = Repository::open_with(Location::Local(copy), &options).unwrap();
    assert!(repo.is_encrypted());
    fixture::check_reads_verifies_and_takes_new_snapshots(&repo, &fixture::fixture_source(SOURCE));
}

#[test]
fn the_committed_v3_repository_opens_with_a_one_lane_passphrase() {
    check_with(Credentials::default().with_passphrase(ONE_LANE));
}

#[test]
fn the_committed_v3_repository_opens_with_a_four_lane_passphrase() {
    check_with(Credentials::default().with_passphrase(FOUR_LANES));
}

#[test]
fn the_committed_v3_repository_opens_with_its_key_file() {
    check_with(Credentials::default().with_key_file(KEY_FILE));
}

#[test]
fn the_committed_v3_repository_refuses_another_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("v3-encrypted-repo");
    fixture::copy_tree(&fixture_dir(), &copy);
    let options =
        RepoOptions::default().with_credentials(Credentials::default().with_passphrase("nope"));
    let Err(err) = Repository::open_with(Location::Local(copy), &options) else {
        panic!("a wrong passphrase opens nothing");
    };
    assert!(err.to_string().contains("passphrase"), "{err}");
}
