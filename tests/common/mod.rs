//! Helpers shared by the end-to-end tests: run the real binary, make raw images.
#![allow(dead_code)]

pub mod s3;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, UNIX_EPOCH};

pub const MIB: usize = 1 << 20;

/// The snapsync binary built for this test run.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_snapsync"))
}

/// Run snapsync with arguments; returns the output whatever the exit code.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run snapsync")
}

/// Run and require success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "snapsync {args:?} failed ({:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Run `replicate --json` and parse its lines.
pub fn replicate_json(args: &[&str]) -> Vec<serde_json::Value> {
    let mut a = vec!["replicate"];
    a.extend_from_slice(args);
    a.push("--json");
    ok(&a)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// Deterministic pseudo-random bytes.
pub fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Overwrite `count` regions of `len` bytes at pseudo-random places.
pub fn scribble(data: &mut [u8], seed: u64, count: usize, len: usize) {
    let r = random(seed, count * 8);
    for k in 0..count {
        let off = (u64::from_le_bytes(r[k * 8..k * 8 + 8].try_into().unwrap()) as usize)
            % (data.len() - len);
        data[off..off + len].copy_from_slice(&random(seed * 7919 + k as u64, len));
    }
}

/// Write `DIR/volume/name.img` with the given age (seconds since the epoch).
pub fn write_image(dir: &Path, volume: &str, name: &str, data: &[u8], age: u64) -> PathBuf {
    let d = dir.join(volume);
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(format!("{name}.img"));
    std::fs::write(&p, data).unwrap();
    File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(UNIX_EPOCH + Duration::from_secs(age))
        .unwrap();
    p
}

/// Field of a JSON object as u64.
pub fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// A fresh repository in `dir/repo`; returns its path as a string.
pub fn init_repo(dir: &Path, extra: &[&str]) -> String {
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap().to_string();
    let mut a = vec!["init", r.as_str()];
    a.extend_from_slice(extra);
    ok(&a);
    r
}

/// Run snapsync with extra environment variables; returns the output whatever the exit code.
pub fn run_env(args: &[&str], env: &[(String, String)]) -> Output {
    bin()
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run snapsync")
}

/// Run with extra environment variables and require success; returns stdout.
pub fn ok_env(args: &[&str], env: &[(String, String)]) -> String {
    let out = run_env(args, env);
    assert!(
        out.status.success(),
        "snapsync {args:?} failed ({:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}
