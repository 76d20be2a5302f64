//! Helpers shared by the end-to-end tests: run the real binary, make raw images.
#![allow(dead_code)]

pub mod daemon;
pub mod s3;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, UNIX_EPOCH};

pub const MIB: usize = 1 << 20;

/// The snapsync binary built for this test run.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_snapsync"))
}

/// Run snapsync with arguments; returns the output whatever the exit code.
pub fn run(args: &[&str]) -> Output {
    run_env(args, &[])
}

/// Run and require success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    ok_env(args, &[])
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
    success(args, &run_env(args, env))
}

/// Require that a finished `snapsync args` succeeded; returns its stdout.
pub fn success(args: &[&str], out: &Output) -> String {
    assert!(
        out.status.success(),
        "snapsync {args:?} failed ({:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

/// The error a failed run printed: exit 1 and exactly one line, naming snapsync.
pub fn one_line_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "expected exit 1: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("snapsync: error: "), "{err}");
    err
}

/// Run qemu-img and require success; returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img (qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Write `data` into `img` (format `fmt`) at `offset` with qemu-io, through a pattern
/// file; `data.len()` must be a multiple of 512.
pub fn qemu_write(img: &Path, fmt: &str, offset: u64, data: &[u8]) {
    let pat = img.with_extension("pattern");
    std::fs::write(&pat, data).unwrap();
    qemu_io(
        img,
        fmt,
        &[format!(
            "write -q -s {} {offset} {}",
            pat.display(),
            data.len()
        )],
    );
    std::fs::remove_file(&pat).unwrap();
}

/// Run qemu-io commands (`-c` each) on `img` and require success.
pub fn qemu_io(img: &Path, fmt: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-t", "unsafe", "-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(img).output().expect("run qemu-io (qemu-utils)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("error") && !text.contains("failed"),
        "qemu-io {cmds:?} on {}: {text}",
        img.display()
    );
}

/// What qemu-img shows of an image (or of internal snapshot `snapshot` of it) as raw
/// bytes, cut or zero-extended to `size` (`convert -l` shows a snapshot at the image's
/// current size).
pub fn qemu_raw(img: &Path, snapshot: Option<&str>, size: u64) -> Vec<u8> {
    let out = img.with_extension("qemu-raw");
    let (i, o) = (img.to_str().unwrap(), out.to_str().unwrap());
    let l = snapshot.map(|s| format!("snapshot.name={s}"));
    let mut args = vec!["convert"];
    if let Some(l) = &l {
        args.extend(["-l", l.as_str()]);
    }
    args.extend(["-O", "raw", i, o]);
    qemu_img(&args);
    let mut v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v.resize(size as usize, 0);
    v
}

/// The first line a spawned snapsync prints on stdout (its "ready" line: `serve` and
/// `export` print one when they listen).
pub fn ready_line(child: &mut Child) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .unwrap();
    line
}
