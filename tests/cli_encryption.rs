//! End-to-end tests of encrypted repositories (format version 3): the real binary on
//! local and S3 (moto) repositories. Keys are created with cheap Argon2id parameters
//! (SNAPSYNC_KDF_MEMORY_KIB, SNAPSYNC_KDF_ITERATIONS): what is tested here is what is
//! stored and who can open it, not the cost of guessing.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use common::*;

const T0: u64 = 1_700_000_000;
const BLOCK: usize = 64 << 10;
const MARKER: &[u8] = b"MARKER-7f3a-SECRET-PAYLOAD";
const VOLUME: &str = "secretvolume";
const SNAPS: [&str; 2] = ["snapalpha", "snapbeta"];

/// Cheap keys, and no block index cache: every run reads the repository's own
/// indexes (a damaged one is then noticed by a restore too).
fn env() -> Vec<(String, String)> {
    [
        ("SNAPSYNC_KDF_MEMORY_KIB", "64"),
        ("SNAPSYNC_KDF_ITERATIONS", "1"),
        ("SNAPSYNC_CACHE_DIR", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Run with the test's KDF parameters.
fn e(args: &[&str]) -> Output {
    run_env(args, &env())
}

fn eok(args: &[&str]) -> String {
    success(args, &e(args))
}

/// A password file holding `pass`.
fn password(dir: &Path, name: &str, pass: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("{pass}\n")).unwrap();
    p.to_str().unwrap().to_string()
}

/// An image carrying the marker in the clear: in incompressible blocks, and repeated
/// in a compressible region (zstd keeps a literal copy of its first occurrence).
fn marked_image(seed: u64, size: usize) -> Vec<u8> {
    let mut d = random(seed, size);
    for b in (0..size / BLOCK).step_by(3) {
        d[b * BLOCK + 100..][..MARKER.len()].copy_from_slice(MARKER);
    }
    if size < 20 * BLOCK {
        return d;
    }
    let text = MARKER.repeat(BLOCK / MARKER.len() + 1);
    for b in 8..12 {
        d[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&text[..BLOCK]);
    }
    d[16 * BLOCK..20 * BLOCK].fill(0);
    d
}

/// Two snapshots of `VOLUME` in a raw store; returns the store URL and the images.
fn images(dir: &Path) -> (String, Vec<Vec<u8>>) {
    let images = dir.join("images");
    let s1 = marked_image(1, 64 * BLOCK);
    let mut s2 = s1.clone();
    for b in [1usize, 30, 50] {
        s2[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&marked_image(b as u64 + 7, BLOCK));
    }
    write_image(&images, VOLUME, SNAPS[0], &s1, T0);
    write_image(&images, VOLUME, SNAPS[1], &s2, T0 + 3600);
    (format!("raw:{}", images.display()), vec![s1, s2])
}

/// What must appear in no object key and no object body of an encrypted repository.
struct Secrets {
    words: Vec<Vec<u8>>,
    /// Plain BLAKE3 ids of the blocks and the snapshots' identities, raw and in hex.
    ids: HashSet<Vec<u8>>,
    hex_ids: HashSet<Vec<u8>>,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn secrets(source: &str, data: &[Vec<u8>]) -> Secrets {
    let mut words = vec![MARKER.to_vec(), VOLUME.into()];
    words.extend(SNAPS.iter().map(|s| s.as_bytes().to_vec()));
    let mut ids = HashSet::new();
    for d in data {
        for b in d.chunks(BLOCK) {
            ids.insert(blake3::hash(b).as_bytes().to_vec());
        }
    }
    let l: serde_json::Value = serde_json::from_str(&ok(&["list", source, "--json"])).unwrap();
    for s in l["volumes"][0]["snapshots"].as_array().unwrap() {
        ids.insert(unhex(s["id"].as_str().unwrap()));
    }
    let hex_ids = ids
        .iter()
        .map(|i| {
            i.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into_bytes()
        })
        .collect();
    Secrets {
        words,
        ids,
        hex_ids,
    }
}

impl Secrets {
    /// The first secret found in `bytes`, if any.
    fn find(&self, bytes: &[u8]) -> Option<String> {
        for w in &self.words {
            if bytes.windows(w.len()).any(|x| x == &w[..]) {
                return Some(String::from_utf8_lossy(w).into_owned());
            }
        }
        for (set, n) in [(&self.ids, 32), (&self.hex_ids, 64)] {
            if let Some(x) = bytes.windows(n).find(|x| set.contains(*x)) {
                return Some(format!("id {x:02x?}"));
            }
        }
        None
    }

    /// Check every object, by key and body; returns how many were checked.
    fn check(&self, objects: impl Iterator<Item = (String, Vec<u8>)>) -> usize {
        let mut n = 0;
        for (key, body) in objects {
            assert_eq!(self.find(key.as_bytes()), None, "in the key {key}");
            assert_eq!(self.find(&body), None, "in the body of {key}");
            n += 1;
        }
        n
    }
}

fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn local_objects(repo: &Path) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
    files(repo).into_iter().map(move |p| {
        let key = p.strip_prefix(repo).unwrap().to_str().unwrap().to_string();
        (key, std::fs::read(&p).unwrap())
    })
}

/// Every object under `repo/` in `bucket`, read with a signed client (moto refuses
/// anonymous reads of objects).
fn s3_objects(bucket: &str) -> Vec<(String, Vec<u8>)> {
    use futures::TryStreamExt;
    use snapsync::object_store::aws::AmazonS3Builder;
    use snapsync::object_store::{path::Path as ObjPath, ObjectStore};
    s3::endpoint();
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let metas: Vec<_> = store
            .list(Some(&ObjPath::from("repo")))
            .try_collect()
            .await
            .unwrap();
        let mut out = vec![];
        for m in metas {
            let body = store.get(&m.location).await.unwrap().bytes().await.unwrap();
            out.push((m.location.to_string(), body.to_vec()));
        }
        out.sort();
        out
    })
}

fn restore_equals(args: &[&str], target: &str, want: &[u8], dir: &Path) {
    let out = dir.join("restored.img");
    let mut a = vec!["restore"];
    a.extend_from_slice(args);
    a.extend([target, out.to_str().unwrap()]);
    eok(&a);
    assert!(std::fs::read(&out).unwrap() == want, "restore of {target}");
    std::fs::remove_file(out).unwrap();
}

#[test]
fn nothing_in_the_clear_in_a_local_encrypted_repository() {
    let dir = tempfile::tempdir().unwrap();
    let (source, data) = images(dir.path());
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    let pw = password(dir.path(), "pw", "correct horse");
    let out = eok(&["init", r, "--encryption", "--password-file", &pw]);
    assert!(out.contains("created encrypted repository"), "{out}");
    eok(&["replicate", &source, r, "--password-file", &pw]);
    for (k, s) in SNAPS.iter().enumerate() {
        let t = format!("{VOLUME}@{s}");
        restore_equals(&[r, "--password-file", &pw], &t, &data[k], dir.path());
    }
    eok(&["verify", r, "--read-data", "--password-file", &pw]);
    let n = secrets(&source, &data).check(local_objects(&repo));
    assert!(n >= 8, "{n} objects");
    // The plain repository beside it holds all of them: the scan finds what is there.
    let plain = dir.path().join("plain");
    eok(&["init", plain.to_str().unwrap()]);
    eok(&["replicate", &source, plain.to_str().unwrap()]);
    let s = secrets(&source, &data);
    let found: Vec<String> = local_objects(&plain)
        .filter_map(|(k, b)| s.find(&b).or(s.find(k.as_bytes())))
        .collect();
    assert!(
        found
            .iter()
            .any(|f| f == std::str::from_utf8(MARKER).unwrap()),
        "{found:?}"
    );
    assert!(found.iter().any(|f| f.starts_with("id ")), "{found:?}");
}

#[test]
fn nothing_in_the_clear_in_an_encrypted_s3_repository() {
    let dir = tempfile::tempdir().unwrap();
    let (source, data) = images(dir.path());
    s3::endpoint();
    let bucket = s3::create_bucket();
    let url = format!("s3://{bucket}/repo");
    let pw = password(dir.path(), "pw", "correct horse");
    eok(&["init", &url, "--encryption", "--password-file", &pw]);
    eok(&["replicate", &source, &url, "--password-file", &pw]);
    restore_equals(
        &[&url, "--password-file", &pw],
        &format!("{VOLUME}@{}", SNAPS[1]),
        &data[1],
        dir.path(),
    );
    let n = secrets(&source, &data).check(s3_objects(&bucket).into_iter());
    assert!(n >= 8, "{n} objects");
}

/// An encrypted repository with two snapshots of `vm`; returns its path and password
/// file.
fn small_encrypted(dir: &Path) -> (PathBuf, String, Vec<Vec<u8>>) {
    let images = dir.join("images");
    let s1 = random(5, 32 * BLOCK);
    let mut s2 = s1.clone();
    s2[3 * BLOCK..5 * BLOCK].copy_from_slice(&random(6, 2 * BLOCK));
    write_image(&images, "vm", "s1", &s1, T0);
    write_image(&images, "vm", "s2", &s2, T0 + 60);
    let repo = dir.join("repo");
    let pw = password(dir, "pw", "tamper");
    eok(&[
        "init",
        repo.to_str().unwrap(),
        "--encryption",
        "--password-file",
        &pw,
    ]);
    // Two runs: two packs, two manifests, two catalog generations.
    for s in ["s1", "s2"] {
        eok(&[
            "replicate",
            &format!("raw:{}", images.display()),
            repo.to_str().unwrap(),
            "--snapshot",
            s,
            "--password-file",
            &pw,
        ]);
    }
    (repo, pw, vec![s1, s2])
}

fn copy_dir(from: &Path, to: &Path) {
    for f in files(from) {
        let t = to.join(f.strip_prefix(from).unwrap());
        std::fs::create_dir_all(t.parent().unwrap()).unwrap();
        std::fs::copy(&f, &t).unwrap();
    }
}

fn objects_under(repo: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = files(&repo.join(prefix))
        .into_iter()
        .filter(|p| !p.ends_with("head"))
        .collect();
    v.sort();
    v
}

#[test]
fn tampering_with_any_object_is_detected_by_verify_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, pw, data) = small_encrypted(dir.path());
    let flip = |p: &Path| {
        let mut b = std::fs::read(p).unwrap();
        let at = b.len() / 2;
        b[at] ^= 0x20;
        std::fs::write(p, b).unwrap();
    };
    let swap = |a: &Path, b: &Path| {
        let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        std::fs::write(a, y).unwrap();
        std::fs::write(b, x).unwrap();
    };
    type Damage<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "a byte of a pack",
            Box::new(|r: &Path| flip(&objects_under(r, "packs")[0])),
        ),
        (
            "a byte of the other pack",
            Box::new(|r: &Path| flip(&objects_under(r, "packs")[1])),
        ),
        (
            "a byte of a pack index",
            Box::new(|r: &Path| flip(&objects_under(r, "index")[0])),
        ),
        (
            "a byte of a manifest",
            Box::new(|r: &Path| flip(&objects_under(r, "manifests")[0])),
        ),
        (
            "a byte of the catalog",
            Box::new(|r: &Path| flip(objects_under(r, "volumes").last().unwrap())),
        ),
        (
            "a byte of config",
            Box::new(|r: &Path| flip(&r.join("config"))),
        ),
        (
            "two packs swapped",
            Box::new(|r: &Path| {
                let p = objects_under(r, "packs");
                swap(&p[0], &p[1])
            }),
        ),
        (
            "two pack indexes swapped",
            Box::new(|r: &Path| {
                let p = objects_under(r, "index");
                swap(&p[0], &p[1])
            }),
        ),
        (
            "two manifests swapped",
            Box::new(|r: &Path| {
                let p = objects_under(r, "manifests");
                swap(&p[0], &p[1])
            }),
        ),
        (
            "two catalog generations swapped",
            Box::new(|r: &Path| {
                let p = objects_under(r, "volumes");
                swap(&p[0], &p[1])
            }),
        ),
    ];
    assert_eq!(objects_under(&repo, "packs").len(), 2);
    assert_eq!(objects_under(&repo, "manifests").len(), 2);
    assert_eq!(objects_under(&repo, "volumes").len(), 2);
    for (k, (what, damage)) in cases.iter().enumerate() {
        let copy = dir.path().join(format!("copy{k}"));
        copy_dir(&repo, &copy);
        let c = copy.to_str().unwrap();
        restore_equals(&[c, "--password-file", &pw], "vm@s2", &data[1], dir.path());
        damage(&copy);
        eprintln!("{what}");
        let v = e(&["verify", c, "--read-data", "--password-file", &pw]);
        let text =
            String::from_utf8_lossy(&v.stdout).to_string() + &String::from_utf8_lossy(&v.stderr);
        assert_eq!(v.status.code(), Some(1), "{what}: verify {text}");
        let out = dir.path().join("out.img");
        let r = e(&[
            "restore",
            c,
            "vm@s2",
            out.to_str().unwrap(),
            "--password-file",
            &pw,
        ]);
        let err = one_line_error(&r);
        eprintln!("{what}: verify says {text:?}; restore says {err}");
        if !what.contains("config") && !what.contains("catalog") {
            // The catalog names the snapshots: with it intact, they are named.
            assert!(
                text.contains("vm@s2") || text.contains("\"vm\""),
                "{what}: {text}"
            );
        }
        assert!(!out.exists(), "{what}: a damaged snapshot was restored");
    }
}

#[test]
fn passphrases_missing_wrong_added_removed_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, pw, data) = small_encrypted(dir.path());
    let r = repo.to_str().unwrap();
    // Missing: one line, saying it is encrypted and how to give the passphrase.
    let err = one_line_error(&e(&["list", r]));
    assert!(
        err.contains("is encrypted")
            && err.contains("--password-file")
            && err.contains("SNAPSYNC_PASSWORD"),
        "{err}"
    );
    let err = one_line_error(&e(&[
        "restore",
        r,
        "vm@s1",
        dir.path().join("x").to_str().unwrap(),
    ]));
    assert!(err.contains("is encrypted"), "{err}");
    // Wrong.
    let wrong = password(dir.path(), "wrong", "not it");
    let err = one_line_error(&e(&["list", r, "--password-file", &wrong]));
    assert!(err.contains("wrong passphrase"), "{err}");
    // The environment variable.
    let list = success(
        &["list"],
        &run_env(
            &["list", r],
            &[("SNAPSYNC_PASSWORD".into(), "tamper".into())],
        ),
    );
    assert!(list.contains("s2"), "{list}");
    // Add a second passphrase: both open it.
    let second = password(dir.path(), "second", "second passphrase");
    let out = eok(&[
        "key",
        "add",
        r,
        "--password-file",
        &pw,
        "--new-password-file",
        &second,
    ]);
    let new_id = out.trim().strip_prefix("added key ").unwrap().to_string();
    let keys: serde_json::Value = serde_json::from_str(&eok(&[
        "key",
        "list",
        r,
        "--json",
        "--password-file",
        &second,
    ]))
    .unwrap();
    let keys = keys["keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let old_id = keys.iter().find(|k| k["id"] != new_id.as_str()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(keys
        .iter()
        .any(|k| k["id"] == new_id.as_str() && k["current"] == true));
    restore_equals(
        &[r, "--password-file", &second],
        "vm@s2",
        &data[1],
        dir.path(),
    );
    restore_equals(&[r, "--password-file", &pw], "vm@s2", &data[1], dir.path());
    // Rotate: remove the first; it no longer opens, the second does, data untouched.
    eok(&["key", "remove", r, &old_id, "--password-file", &second]);
    let err = one_line_error(&e(&["list", r, "--password-file", &pw]));
    assert!(err.contains("wrong passphrase"), "{err}");
    restore_equals(
        &[r, "--password-file", &second],
        "vm@s1",
        &data[0],
        dir.path(),
    );
    // Never the last key.
    let err = one_line_error(&e(&[
        "key",
        "remove",
        r,
        &new_id,
        "--password-file",
        &second,
    ]));
    assert!(err.contains("last key"), "{err}");
    eok(&["verify", r, "--read-data", "--password-file", &second]);
    // A key file instead of a passphrase.
    let key = dir.path().join("key");
    std::fs::write(&key, random(99, 64)).unwrap();
    let k = key.to_str().unwrap();
    eok(&[
        "key",
        "add",
        r,
        "--password-file",
        &second,
        "--new-key-file",
        k,
    ]);
    restore_equals(&[r, "--key-file", k], "vm@s2", &data[1], dir.path());
    // A plain repository needs nothing, and ignores a passphrase given.
    let plain = init_repo(&dir.path().join("p"), &[]);
    eok(&["list", &plain, "--password-file", &second]);
    let err = one_line_error(&e(&["key", "list", &plain]));
    assert!(err.contains("not encrypted"), "{err}");
    // init --encryption without a passphrase.
    let err = one_line_error(&e(&[
        "init",
        dir.path().join("q").to_str().unwrap(),
        "--encryption",
    ]));
    assert!(err.contains("--password-file"), "{err}");
}

fn sent(args: &[&str]) -> Vec<serde_json::Value> {
    let mut a = vec!["replicate"];
    a.extend_from_slice(args);
    a.push("--json");
    eok(&a)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn replication_between_plain_and_encrypted_in_every_combination_stays_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let s1 = random(31, 96 * BLOCK);
    let mut s2 = s1.clone();
    s2[10 * BLOCK..12 * BLOCK].copy_from_slice(&random(32, 2 * BLOCK));
    write_image(&images, "vm", "s1", &s1, T0);
    write_image(&images, "vm", "s2", &s2, T0 + 60);
    let raw = format!("raw:{}", images.display());
    let p1 = password(dir.path(), "p1", "first");
    let p2 = password(dir.path(), "p2", "second");
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (plain_a, enc_a, enc_b, plain_b) = (
        path("plain_a"),
        path("enc_a"),
        path("enc_b"),
        path("plain_b"),
    );
    eok(&["init", &plain_a]);
    eok(&["init", &plain_b]);
    eok(&["init", &enc_a, "--encryption", "--password-file", &p1]);
    eok(&["init", &enc_b, "--encryption", "--password-file", &p2]);
    // Both passphrases are given to every run: each repository tries them.
    let both = [
        "--password-file",
        p1.as_str(),
        "--password-file",
        p2.as_str(),
    ];
    // raw -> plain, plain -> encrypted, encrypted -> encrypted (another key),
    // encrypted -> plain: each hop a full copy of s1, then s2 as an increment.
    let hops = [
        (&raw, &plain_a),
        (&plain_a, &enc_a),
        (&enc_a, &enc_b),
        (&enc_b, &plain_b),
    ];
    for (from, to) in hops {
        for (snap, want) in [("s1", &s1), ("s2", &s2)] {
            let mut args = vec![from.as_str(), to.as_str(), "--snapshot", snap];
            args.extend_from_slice(&both);
            let r = sent(&args);
            assert_eq!(r.len(), 1, "{from} -> {to} {snap}: {r:?}");
            let bytes = num(&r[0], "sent_bytes");
            if snap == "s1" {
                assert!(bytes >= 96 * BLOCK as u64, "{from} -> {to} s1 sent {bytes}");
            } else {
                assert_eq!(r[0]["base"], "s1", "{from} -> {to}: {r:?}");
                assert!(
                    bytes <= 2 * BLOCK as u64,
                    "{from} -> {to} s2 sent {bytes}: not incremental"
                );
            }
            let mut a = vec![to.as_str()];
            a.extend_from_slice(&both);
            restore_equals(&a, &format!("vm@{snap}"), want, dir.path());
        }
    }
    // raw -> encrypted directly, and on again from the plain copies into the encrypted
    // ones: nothing is missing, so nothing is sent.
    let mut args = vec![raw.as_str(), enc_a.as_str()];
    args.extend_from_slice(&both);
    assert!(sent(&args).is_empty());
    // Hints carried over: a new snapshot goes raw -> plain_a -> enc_a -> enc_b as
    // increments against s2 on every hop.
    let mut s3d = s2.clone();
    s3d[40 * BLOCK..41 * BLOCK].copy_from_slice(&random(33, BLOCK));
    write_image(&images, "vm", "s3", &s3d, T0 + 120);
    for (from, to) in &hops[..3] {
        let mut args = vec![from.as_str(), to.as_str()];
        args.extend_from_slice(&both);
        let r = sent(&args);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0]["base"], "s2");
        assert!(num(&r[0], "sent_bytes") <= BLOCK as u64, "{r:?}");
    }
    for repo in [&enc_a, &enc_b] {
        let mut a = vec!["verify", repo.as_str(), "--read-data"];
        a.extend_from_slice(&both);
        eok(&a);
    }
}

#[test]
fn two_writers_into_one_encrypted_s3_repository_lose_nothing_and_reuse_no_nonce() {
    let dir = tempfile::tempdir().unwrap();
    s3::endpoint();
    let bucket = s3::create_bucket();
    let url = format!("s3://{bucket}/repo");
    let pw = password(dir.path(), "pw", "shared");
    eok(&["init", &url, "--encryption", "--password-file", &pw]);
    let hosts: Vec<(PathBuf, Vec<u8>)> = (0..2)
        .map(|k| {
            let d = dir.path().join(format!("host{k}"));
            let data = random(40 + k, 8 << 20);
            write_image(&d, &format!("vm{k}"), "s1", &data, T0);
            (d, data)
        })
        .collect();
    let children: Vec<_> = hosts
        .iter()
        .map(|(d, _)| {
            bin()
                .args([
                    "replicate",
                    &format!("raw:{}", d.display()),
                    &url,
                    "--password-file",
                    &pw,
                ])
                .envs(env())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    for (k, (_, data)) in hosts.iter().enumerate() {
        restore_equals(
            &[&url, "--password-file", &pw],
            &format!("vm{k}@s1"),
            data,
            dir.path(),
        );
    }
    // verify --read-data opens every sealed unit and reports a nonce seen twice.
    let v: serde_json::Value = serde_json::from_str(&eok(&[
        "verify",
        &url,
        "--read-data",
        "--json",
        "--password-file",
        &pw,
    ]))
    .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let blocks = 2 * (8 << 20) / BLOCK as u64;
    assert!(num(&v, "nonces_checked") >= blocks + 4, "{v}");
    // And independently: the nonce of every sealed object (after its 20-byte envelope
    // header) and of the key objects, as stored; none twice.
    let mut nonces = HashSet::new();
    let mut n = 0;
    for (key, body) in s3_objects(&bucket) {
        let sealed = ["index/", "manifests/", "mparts/", "volumes/"]
            .iter()
            .any(|p| key.contains(p))
            && !key.ends_with("/head");
        if !sealed {
            continue;
        }
        assert_eq!(&body[8..12], &3u32.to_le_bytes(), "{key} is not version 3");
        assert!(
            nonces.insert(body[20..44].to_vec()),
            "nonce of {key} repeated"
        );
        n += 1;
    }
    assert!(n >= 6, "{n} sealed objects");
}

/// Whoever can write the storage swaps the encrypted repository's `config` for a plain
/// one (from a fresh plain repository): no command then treats it as plain, so nothing
/// would be written to it in clear.
#[test]
fn a_config_swapped_for_a_plain_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, pw, _) = small_encrypted(dir.path());
    let plain = init_repo(&dir.path().join("plain"), &[]);
    std::fs::copy(Path::new(&plain).join("config"), repo.join("config")).unwrap();
    let r = repo.to_str().unwrap();
    for args in [
        vec!["list", r],
        vec!["list", r, "--password-file", &pw],
        vec![
            "replicate",
            &format!("raw:{}", dir.path().join("images").display()),
            r,
        ],
    ] {
        let err = one_line_error(&e(&args));
        assert!(err.contains("replaced") && err.contains("keys/"), "{err}");
    }
}

/// `serve` of an encrypted repository, its passphrase given to the server only: a
/// client that knows no key pulls out of it and pushes into it over the wire, each
/// time sending only the change, and what it pushed is sealed like the rest.
#[test]
fn a_served_encrypted_repository_is_read_and_written_by_clients_without_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (repo, pw, data) = small_encrypted(d);
    let (mut server, port) =
        daemon::serve_with(d, repo.to_str().unwrap(), 0, &["--password-file", &pw]);
    let url = format!("snapsync+http://127.0.0.1:{port}/repo");
    let mut client_env = env();
    client_env.push(("SNAPSYNC_TOKEN".into(), daemon::TOKEN.into()));
    let client = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut a = vec!["replicate"];
        a.extend_from_slice(args);
        a.push("--json");
        ok_env(&a, &client_env)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // Pull: s1 whole, then s2 as an increment.
    let plain = init_repo(&d.join("plain"), &[]);
    client(&[&url, &plain, "--snapshot", "s1"]);
    let r = client(&[&url, &plain]);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["base"], "s1", "{r:?}");
    assert!(num(&r[0], "sent_bytes") <= 2 * BLOCK as u64, "{r:?}");
    restore_equals(&[&plain], "vm@s2", &data[1], d);
    // Push: a new snapshot of the source into the served repository, as an increment.
    let images = d.join("images");
    let mut s3 = data[1].clone();
    s3[7 * BLOCK..8 * BLOCK].copy_from_slice(&random(77, BLOCK));
    write_image(&images, "vm", "s3", &s3, T0 + 120);
    let r = client(&[&format!("raw:{}", images.display()), &url]);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["base"], "s2", "{r:?}");
    assert!(num(&r[0], "sent_bytes") <= BLOCK as u64, "{r:?}");
    server.kill().unwrap();
    server.wait().unwrap();
    let r = repo.to_str().unwrap();
    restore_equals(&[r, "--password-file", &pw], "vm@s3", &s3, d);
    eok(&["verify", r, "--read-data", "--password-file", &pw]);
    // What the server stored for the client is sealed as well.
    let pushed = &s3[7 * BLOCK..7 * BLOCK + 64];
    for (key, bytes) in local_objects(&repo) {
        assert!(!key.contains("vm"), "{key}");
        assert!(!bytes.windows(pushed.len()).any(|w| w == pushed), "{key}");
    }
}
