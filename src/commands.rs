//! One function per subcommand: open stores, call the library, print.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::json;
use snapsync::{parse_target, AnyStore, StoreUrl};
use snapsync_core::Timestamp;
use snapsync_daemon::units::human_bytes as human;
use snapsync_engine::{ReplicateOptions, SnapshotReport};
use snapsync_repo::{PruneOptions, Repository};
use snapsync_store::{Skipped, SnapshotSource};

use crate::stores::{self, ClientArgs, Usage};

/// Image formats `restore` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A raw image, sparse where the snapshot is zero.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

/// Split `VOLUME@SNAPSHOT`.
fn split_target(s: &str) -> Result<(&str, &str)> {
    let t = parse_target(s)?;
    Ok((t.volume, t.snapshot))
}

/// A volume or snapshot name from the command line; a bad one is a usage error.
fn check_name(kind: &'static str, name: &str) -> Result<()> {
    snapsync_core::validate_name(kind, name).map_err(snapsync::UrlError::from)?;
    Ok(())
}

pub fn init(repo: &str, block_size: u64, encryption: bool) -> Result<ExitCode> {
    let StoreUrl::Repo(loc) = StoreUrl::parse(repo)? else {
        return Err(Usage(format!(
            "{repo:?} is not a repository URL (use file:///path, s3://BUCKET/PREFIX or a plain path)"
        ))
        .into());
    };
    let options = stores::repo_options()?;
    let r = if encryption {
        Repository::init_encrypted(loc, block_size, &options)
    } else {
        Repository::init_with(loc, block_size, &options)
    }
    .with_context(|| format!("cannot create a repository at {repo}"))?;
    println!(
        "created {}repository {} (id {}, block size {}{})",
        if r.is_encrypted() { "encrypted " } else { "" },
        r.location(),
        r.repository_id(),
        human(r.block_size()),
        r.key_id().map(|k| format!(", key {k}")).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn key_add(
    repo: &str,
    password_file: Option<&Path>,
    key_file: Option<&Path>,
) -> Result<ExitCode> {
    let new = match (password_file, key_file) {
        (Some(p), _) => {
            snapsync_repo::Credentials::default().with_passphrase(stores::read_password_file(p)?)
        }
        (None, Some(k)) => {
            snapsync_repo::Credentials::default().with_key_file(stores::read_key_file(k)?)
        }
        (None, None) => {
            return Err(Usage("give --new-password-file or --new-key-file".into()).into())
        }
    };
    let s = stores::open(repo)?;
    let id = s
        .repository()?
        .add_key(&new, stores::kdf_params()?)
        .with_context(|| format!("cannot add a key to {repo}"))?;
    println!("added key {id}");
    Ok(ExitCode::SUCCESS)
}

pub fn key_list(repo: &str, as_json: bool) -> Result<ExitCode> {
    let s = stores::open(repo)?;
    let keys = s.repository()?.list_keys()?;
    if as_json {
        let v: Vec<_> = keys
            .iter()
            .map(|k| {
                json!({
                    "id": k.id,
                    "kind": k.kind,
                    "created": k.created.to_rfc3339(),
                    "kdf": k.kdf,
                    "current": k.current,
                })
            })
            .collect();
        println!("{}", json!({ "keys": v }));
        return Ok(ExitCode::SUCCESS);
    }
    for k in &keys {
        println!(
            "{} {:<10} {}{}",
            k.id,
            k.kind,
            k.created.to_rfc3339(),
            if k.current { " (current)" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn key_remove(repo: &str, id: &str) -> Result<ExitCode> {
    let s = stores::open(repo)?;
    s.repository()?
        .remove_key(id)
        .with_context(|| format!("cannot remove key {id:?} of {repo}"))?;
    println!("removed key {id}");
    Ok(ExitCode::SUCCESS)
}

/// The default name of a checkpoint taken at `t`: the UTC time, `YYYYMMDDTHHMMSSZ`.
fn checkpoint_name(t: Timestamp) -> String {
    let t = t.to_rfc3339();
    let seconds = t.split('.').next().unwrap_or(&t).trim_end_matches('Z');
    seconds.replace(['-', ':'], "") + "Z"
}

/// Tell the operator, one stderr line each, what `source` leaves out of its listing.
fn warn_skipped(source: &dyn SnapshotSource) -> Result<Vec<Skipped>> {
    let skipped = source.skipped()?;
    for k in &skipped {
        eprintln!("warning: skipped {:?}: {}", k.what, k.reason);
    }
    Ok(skipped)
}

pub fn list(client: &ClientArgs, store: &str, as_json: bool) -> Result<ExitCode> {
    let s = client.open(store)?;
    let volumes = s.source().list()?;
    let skipped = warn_skipped(s.source())?;
    if as_json {
        let skipped: Vec<_> = skipped
            .iter()
            .map(|k| json!({"what": k.what, "reason": k.reason}))
            .collect();
        let v: Vec<_> = volumes
            .iter()
            .map(|v| {
                json!({
                    "name": v.name,
                    "size": v.size,
                    "origin": v.origin.as_ref().map(|o| json!({"volume": o.volume, "snapshot": o.snapshot, "id": o.id})),
                    "snapshots": v.snapshots.iter().map(|snap| {
                        let mut j = json!({
                            "name": snap.name,
                            "id": snap.id,
                            "created": snap.created.to_rfc3339(),
                            "size": snap.size,
                        });
                        if let Some(from) = age_from(&s, &v.name, &snap.name) {
                            j["age_from"] = from.into();
                        }
                        j
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", json!({ "volumes": v, "skipped": skipped }));
        return Ok(ExitCode::SUCCESS);
    }
    if volumes.is_empty() {
        println!("no volumes");
    }
    for v in &volumes {
        let origin = v
            .origin
            .as_ref()
            .map(|o| format!("  (clone of {}@{})", o.volume, o.snapshot))
            .unwrap_or_default();
        println!("{}  {}{origin}", v.name, human(v.size));
        for s in &v.snapshots {
            println!(
                "  {:<24} {}  {:>10}  {}",
                s.name,
                s.created.to_rfc3339(),
                human(s.size),
                &s.id.to_hex()[..16]
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a listed snapshot's age came from, for stores that tell (`raw:`: birth or
/// modification time); `None` for the others, whose ages are recorded.
fn age_from(store: &AnyStore, volume: &str, snapshot: &str) -> Option<&'static str> {
    match store {
        AnyStore::Raw(r) => r.age_from(volume, snapshot).ok().map(|a| a.as_str()),
        _ => None,
    }
}

pub fn diff(
    client: &ClientArgs,
    store: &str,
    target: &str,
    base: Option<&str>,
    as_json: bool,
) -> Result<ExitCode> {
    let (volume, snap) = split_target(target)?;
    // --base SNAP names a snapshot of the same volume; --base VOLUME@SNAP another
    // volume's (a clone's origin).
    let base = match base {
        Some(b) if b.contains('@') => Some(parse_target(b)?),
        Some(b) => {
            check_name("snapshot", b)?;
            Some(snapsync_store::SnapshotRef::new(volume, b))
        }
        None => None,
    };
    let s = client.open(store)?;
    let d = s.source().diff(volume, snap, base)?;
    let changed = d.changed();
    let pairs = |l: &snapsync_core::ExtentList| {
        l.as_slice()
            .iter()
            .map(|e| [e.offset, e.len])
            .collect::<Vec<_>>()
    };
    if as_json {
        println!(
            "{}",
            json!({
                "extents": pairs(&changed),
                "changed_bytes": changed.total_len(),
                "zero_extents": pairs(&d.zero),
                "diff_method": d.method.as_str(),
            })
        );
    } else {
        for e in changed.as_slice() {
            let kind = if d.zero.covers(e.offset, e.len) {
                "zero"
            } else {
                "data"
            };
            println!("{:>16} {:>12} {kind}", e.offset, e.len);
        }
        println!(
            "{} changed in {} extents (diff from {})",
            human(changed.total_len()),
            changed.as_slice().len(),
            d.method.as_str()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &SnapshotReport, as_json: bool) {
    if as_json {
        println!("{}", serde_json::to_string(r).expect("serialisable"));
    } else {
        let mut how = match &r.base {
            Some(b) => format!(
                "incremental from {b} ({}, diff from {})",
                r.base_reason.as_str(),
                r.diff_method.as_str()
            ),
            None => "full".to_string(),
        };
        if let Some(y) = &r.inserted_before {
            how += &format!(
                ", inserted before {y} ({} redundant entries removed)",
                r.redundant_entries_removed
            );
        }
        println!(
            "{}@{}: {how}: changed {}, read {}, sent {}, dedup {}, {} ms",
            r.volume,
            r.snapshot,
            human(r.changed_bytes),
            human(r.read_bytes),
            human(r.sent_bytes),
            human(r.dedup_bytes),
            r.duration_ms
        );
    }
}

/// What `replicate` sends.
#[derive(Debug)]
pub struct Selection {
    /// Only these volumes.
    pub volumes: Vec<String>,
    /// Only this snapshot (for a running VM: the checkpoint's name).
    pub snapshot: Option<String>,
    /// For a running VM: checkpoints kept per disk.
    pub keep_checkpoints: usize,
}

pub fn replicate(
    client: &ClientArgs,
    source: &str,
    dest: &str,
    selection: Selection,
    as_json: bool,
) -> Result<ExitCode> {
    let Selection {
        volumes,
        snapshot,
        keep_checkpoints,
    } = selection;
    for v in &volumes {
        check_name("volume", v)?;
    }
    if let Some(n) = &snapshot {
        check_name("snapshot", n)?;
    }
    // Both URLs are checked before either store is opened.
    StoreUrl::parse(source)?;
    StoreUrl::parse(dest)?;
    let mut src = client.open(source)?;
    let dst = client.open(dest)?;
    warn_skipped(src.source())?;
    let progress = crate::progress::for_terminal(as_json);
    // A running VM's checkpoint is taken now, and is the one snapshot replicated.
    let snapshot = match &mut src {
        AnyStore::Qemu(q) => {
            let now = Timestamp::from_system_time(std::time::SystemTime::now());
            let name = snapshot.unwrap_or_else(|| checkpoint_name(now));
            q.set_keep_checkpoints(keep_checkpoints);
            q.take_checkpoints(&volumes, &name, now)?;
            // Ctrl-C or SIGTERM ends the reading; the run then fails through its error
            // path, which removes what it added to the VM.
            let interrupter = q.interrupter();
            crate::signals::on_interrupt(move || interrupter.interrupt())?;
            Some(name)
        }
        _ => snapshot,
    };
    let opts = ReplicateOptions::default()
        .with_volumes(volumes)
        .with_snapshot(snapshot);
    let reports = snapsync_engine::replicate(
        src.source(),
        dst.sink()?,
        &opts,
        progress.as_ref(),
        &mut |r| print_report(r, as_json),
    )?;
    if let AnyStore::Qemu(q) = &mut src {
        q.finish()?;
    }
    if reports.is_empty() && !as_json {
        println!("nothing to replicate: the destination holds every selected snapshot");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn restore(
    client: &ClientArgs,
    store: &str,
    target: &str,
    output: &Path,
    format: OutputFormat,
) -> Result<ExitCode> {
    let (volume, snap) = split_target(target)?;
    let s = client.open(store)?;
    if format == OutputFormat::Qcow2 {
        return restore_qcow2(s.source(), volume, snap, output);
    }
    let progress = crate::progress::for_terminal(false);
    let stats = snapsync_engine::restore(s.source(), volume, snap, output, progress.as_ref())?;
    println!(
        "restored {volume}@{snap} to {} ({}, {} of data)",
        output.display(),
        human(stats.size),
        human(stats.written_bytes)
    );
    Ok(ExitCode::SUCCESS)
}

/// `restore --format qcow2`: a fresh qcow2 v3 image with 64 KiB clusters, only the
/// clusters that hold data allocated.
fn restore_qcow2(
    source: &dyn snapsync_store::SnapshotSource,
    volume: &str,
    snap: &str,
    output: &Path,
) -> Result<ExitCode> {
    let progress = crate::progress::for_terminal(false);
    let stats = snapsync_qcow2::restore_qcow2(
        source,
        volume,
        snap,
        output,
        snapsync_qcow2::DEFAULT_CLUSTER_SIZE,
        progress.as_ref(),
    )?;
    println!(
        "restored {volume}@{snap} to {} (qcow2, {}, {} of data read)",
        output.display(),
        human(stats.size),
        human(stats.read_bytes)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn verify(repo: &str, read_data: bool, as_json: bool) -> Result<ExitCode> {
    let s = stores::open(repo)?;
    let r = s.repository()?;
    let progress = crate::progress::for_terminal(as_json);
    let report = r.verify(read_data, progress.as_ref())?;
    if as_json {
        println!("{}", serde_json::to_string(&report).expect("serialisable"));
    } else {
        println!(
            "checked {} snapshots, {} blocks referenced{}",
            report.snapshots_checked,
            report.blocks_referenced,
            if read_data {
                format!(
                    ", {} blocks re-hashed ({})",
                    report.blocks_read,
                    human(report.bytes_read)
                )
            } else {
                String::new()
            }
        );
        for e in &report.repository_errors {
            println!("repository damage: {e}");
        }
        for d in &report.damaged {
            println!(
                "damaged snapshot {}@{}: {}",
                d.volume,
                d.snapshot,
                d.problems.join("; ")
            );
        }
    }
    if report.ok {
        if !as_json {
            println!("no damage found");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        let names: Vec<String> = report
            .damaged
            .iter()
            .map(|d| snapsync_core::quote_snapshot(&d.volume, &d.snapshot))
            .collect();
        eprintln!(
            "snapsync: error: repository {} is damaged: {}",
            r.location(),
            if names.is_empty() {
                format!("{} repository errors", report.repository_errors.len())
            } else {
                format!("damaged snapshots: {}", names.join(", "))
            }
        );
        Ok(ExitCode::from(1))
    }
}

pub fn prune(repo: &str, options: &PruneOptions, as_json: bool) -> Result<ExitCode> {
    if options.policy.is_empty() {
        return Err(Usage(
            "prune without any --keep-* rule would remove every snapshot; give at least one".into(),
        )
        .into());
    }
    for v in &options.volumes {
        check_name("volume", v)?;
    }
    let s = stores::open(repo)?;
    let report = s.repository()?.prune(options)?;
    if as_json {
        println!("{}", serde_json::to_string(&report).expect("serialisable"));
        return Ok(ExitCode::SUCCESS);
    }
    let dry_run = options.dry_run;
    let verb = if dry_run { "would remove" } else { "removed" };
    for v in &report.volumes {
        println!(
            "{}: kept {}, {verb} {}{}",
            v.volume,
            v.kept.len(),
            v.removed.len(),
            if v.removed.is_empty() {
                String::new()
            } else {
                format!(" ({})", v.removed.join(", "))
            }
        );
        for k in &v.kept {
            println!("  keep {:<24} {}", k.name, k.reasons.join(", "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn gc(repo: &str, as_json: bool) -> Result<ExitCode> {
    let s = stores::open(repo)?;
    let r = s.repository()?.gc()?;
    if as_json {
        println!("{}", serde_json::to_string(&r).expect("serialisable"));
    } else {
        println!(
            "gc: deleted {} packs, repacked {}, deleted {} manifests and {} old catalog generations; freed {}; {} blocks live",
            r.packs_deleted,
            r.packs_repacked,
            r.manifests_deleted,
            r.catalog_generations_deleted,
            human(r.bytes_freed),
            r.live_blocks
        );
    }
    Ok(ExitCode::SUCCESS)
}
