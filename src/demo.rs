//! `snapsync demo`: a self-contained walkthrough on generated data.
//!
//! It makes a directory of raw images (a volume with three snapshots and a second volume
//! that shares most of its data), replicates it into a fresh repository in full and
//! then incrementally, shows what was sent, restores the newest snapshot and checks it
//! against the original image bit for bit.

use std::fs::File;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use snapsync_engine::{ReplicateOptions, SnapshotReport};
use snapsync_raw::RawStore;
use snapsync_repo::{Location, Repository};
use snapsync_store::sample::pseudo_random;
use snapsync_store::NoProgress;

const MIB: usize = 1 << 20;
const BLOCK: usize = 64 << 10;

/// Sample data: half the blocks random (incompressible), a quarter text-like
/// (compressible), a quarter zero (sparse).
fn sample(size: usize, seed: u64) -> Vec<u8> {
    let mut v = pseudo_random(seed, size);
    let text = b"snapsync demo: the quick brown fox replicates the lazy snapshot. ";
    for (i, block) in v.chunks_mut(BLOCK).enumerate() {
        match i % 4 {
            2 => block
                .iter_mut()
                .enumerate()
                .for_each(|(k, b)| *b = text[k % text.len()]),
            3 => block.fill(0),
            _ => {}
        }
    }
    v
}

/// Overwrite `count` scattered 100 KiB regions.
fn scatter(v: &mut [u8], count: usize, seed: u64) {
    let len = v.len();
    for k in 0..count {
        let off = (pseudo_random(seed + k as u64, 8)
            .iter()
            .fold(0usize, |a, b| a * 256 + *b as usize))
            % (len - 100 * 1024);
        v[off..off + 100 * 1024]
            .copy_from_slice(&pseudo_random(seed * 1000 + k as u64, 100 * 1024));
    }
}

fn write_image(dir: &Path, volume: &str, name: &str, data: &[u8], age_secs: u64) -> Result<()> {
    let d = dir.join(volume);
    std::fs::create_dir_all(&d)?;
    let p = d.join(format!("{name}.img"));
    std::fs::write(&p, data).with_context(|| format!("write {}", p.display()))?;
    let t = SystemTime::now() - Duration::from_secs(age_secs);
    File::options().write(true).open(&p)?.set_modified(t)?;
    Ok(())
}

fn show(r: &SnapshotReport) {
    let kind = match &r.base {
        Some(b) => format!("incremental from {b}"),
        None => "full".into(),
    };
    println!(
        "  {:<16} {:<24} changed {:>9.1} MiB  read {:>9.1} MiB  sent {:>9.2} MiB  dedup {:>7.1} MiB  {:>5} ms",
        format!("{}@{}", r.volume, r.snapshot),
        kind,
        r.changed_bytes as f64 / MIB as f64,
        r.read_bytes as f64 / MIB as f64,
        r.sent_bytes as f64 / MIB as f64,
        r.dedup_bytes as f64 / MIB as f64,
        r.duration_ms
    );
}

pub fn run(dir: Option<&Path>, size_mib: u64) -> Result<ExitCode> {
    if !(4..=65536).contains(&size_mib) {
        bail!("--size-mib must be between 4 and 65536");
    }
    let tmp;
    let work = match dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.to_path_buf()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let images = work.join("images");
    let repo_dir = work.join("repo");
    if repo_dir.exists() {
        bail!(
            "{} already exists; give --dir an empty directory",
            repo_dir.display()
        );
    }
    let size = size_mib as usize * MIB;
    println!("snapsync demo in {}", work.display());
    println!(
        "1. generating sample raw images ({size_mib} MiB volume, 3 snapshots, plus a near-copy)"
    );
    let mut data = sample(size, 1);
    write_image(&images, "vm-disk", "monday", &data, 3 * 86400)?;
    scatter(&mut data, size / (100 * 1024) / 100 + 1, 2);
    write_image(&images, "vm-disk", "tuesday", &data, 2 * 86400)?;
    scatter(&mut data, size / (100 * 1024) / 100 + 1, 3);
    write_image(&images, "vm-disk", "wednesday", &data, 86400)?;
    let mut copy = sample(size, 1);
    scatter(&mut copy, size / (100 * 1024) / 50 + 1, 4);
    write_image(&images, "vm-clone", "monday", &copy, 3 * 86400)?;

    let raw = RawStore::open(&images)?;
    let repo = Repository::init(Location::Local(repo_dir.clone()), BLOCK as u64)?;
    println!("2. created repository {}", repo.location());

    println!("3. full replication of the first snapshot:");
    let first = ReplicateOptions::default()
        .with_volumes(vec!["vm-disk".into()])
        .with_snapshot(Some("monday".into()));
    snapsync_engine::replicate(&raw, &repo, &first, &NoProgress, &mut show)?;

    println!("4. replicating everything else (incremental, deduplicated):");
    let all = snapsync_engine::replicate(
        &raw,
        &repo,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut show,
    )?;

    println!("5. rerun: the repository already holds everything");
    let again = snapsync_engine::replicate(
        &raw,
        &repo,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut show,
    )?;
    println!("  {} snapshots sent", again.len());

    let logical = 4 * size as u64;
    let stored = repo.stored_bytes()?;
    println!(
        "6. 4 snapshots of {size_mib} MiB = {} MiB of images; repository holds {:.1} MiB of packs ({:.1}x smaller)",
        logical / MIB as u64,
        stored as f64 / MIB as f64,
        logical as f64 / stored.max(1) as f64
    );
    let incr: u64 = all
        .iter()
        .filter(|r| r.base.is_some())
        .map(|r| r.sent_bytes)
        .sum();
    println!(
        "  incremental snapshots sent {:.2} MiB in total",
        incr as f64 / MIB as f64
    );

    let out = work.join("restored-wednesday.img");
    snapsync_engine::restore(&repo, "vm-disk", "wednesday", &out, &NoProgress)?;
    let a = blake3::hash(&std::fs::read(&out)?);
    let b = blake3::hash(&std::fs::read(images.join("vm-disk/wednesday.img"))?);
    if a != b {
        bail!("restored image differs from the original");
    }
    println!(
        "7. restored vm-disk@wednesday: identical to the original (BLAKE3 {})",
        &a.to_hex()[..16]
    );

    let report = repo.verify(true, &NoProgress)?;
    if !report.ok {
        bail!("verify found damage: {:?}", report.damaged);
    }
    println!(
        "8. verify --read-data: {} snapshots, {} blocks re-hashed, no damage",
        report.snapshots_checked, report.blocks_read
    );
    Ok(ExitCode::SUCCESS)
}
