//! `verify`: check catalogs, manifests, chains and block presence, and with
//! `read_data` re-hash every stored block. Every damaged snapshot is named.

use std::collections::{BTreeMap, HashMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;
use snapsync_core::BlockId;
use snapsync_store::{Phase, Progress, Result};

use crate::format::{self, MAGIC_PACK};
use crate::repo::{decode_block, key_pack, Repository};

/// One damaged snapshot (or, with `snapshot` empty, a damaged repository object).
#[non_exhaustive]
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Damage {
    /// Volume.
    pub volume: String,
    /// Snapshot.
    pub snapshot: String,
    /// What is wrong.
    pub problems: Vec<String>,
}

/// What `verify` found.
#[non_exhaustive]
#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    /// True when nothing is damaged.
    pub ok: bool,
    /// Snapshots checked.
    pub snapshots_checked: u64,
    /// Distinct blocks referenced by snapshots.
    pub blocks_referenced: u64,
    /// Blocks whose data was re-hashed (`--read-data`).
    pub blocks_read: u64,
    /// Bytes of pack data read (`--read-data`).
    pub bytes_read: u64,
    /// Damaged snapshots.
    pub damaged: Vec<Damage>,
    /// Damage not tied to one snapshot (unreadable catalogs or indexes, lost packs).
    pub repository_errors: Vec<String>,
}

impl Repository {
    /// Verify the repository. With `read_data`, `progress` is told of the pack data to
    /// read ([`Phase::Verify`]) and of each pack read.
    pub fn verify(&self, read_data: bool, progress: &dyn Progress) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();

        // Catalogs: read each volume's newest generation separately, so one damaged
        // catalog is reported and the others are still checked.
        let mut catalogs = Vec::new();
        let mut vols: BTreeMap<String, ()> = BTreeMap::new();
        for (k, _) in self.backend.list("volumes")? {
            if let Some(v) = k.strip_prefix("volumes/").and_then(|r| r.split('/').next()) {
                vols.insert(v.to_string(), ());
            }
        }
        for v in vols.keys() {
            match self.catalog(v) {
                Ok(Some(c)) => catalogs.push(c),
                Ok(None) => {}
                Err(e) => report.damaged.push(Damage {
                    volume: v.clone(),
                    snapshot: "*".into(),
                    problems: vec![e.to_string()],
                }),
            }
        }

        // Indexes, checked one by one so that one damaged index is named.
        let mut located: HashMap<BlockId, (BlockId, format::IndexEntry)> = HashMap::new();
        let packs_present: HashMap<String, u64> = self.backend.list("packs")?.into_iter().collect();
        let mut pack_entries: Vec<(BlockId, Vec<format::IndexEntry>)> = Vec::new();
        for ix in self.read_indexes()? {
            let parsed = ix.parsed.map_err(|e| e.to_string());
            match parsed {
                Ok((pack, entries)) => {
                    let key = key_pack(&pack);
                    let size = packs_present.get(&key).copied();
                    let end = entries
                        .iter()
                        .map(|e| e.offset + u64::from(e.stored_len))
                        .max()
                        .unwrap_or(0);
                    match size {
                        None => report
                            .repository_errors
                            .push(format!("{} is missing", self.describe(&key))),
                        Some(s) if s < end => report.repository_errors.push(format!(
                            "{} is truncated ({s} bytes, index needs {end})",
                            self.describe(&key)
                        )),
                        Some(_) => {
                            for e in &entries {
                                located.entry(e.id).or_insert((pack, *e));
                            }
                            pack_entries.push((pack, entries));
                        }
                    }
                }
                Err(e) => report.repository_errors.push(e),
            }
        }

        // Data: read every pack whole and re-hash each block.
        let mut bad_blocks: HashMap<BlockId, String> = HashMap::new();
        if read_data {
            let total = pack_entries
                .iter()
                .filter_map(|(pack, _)| packs_present.get(&key_pack(pack)))
                .sum();
            progress.start(Phase::Verify, total);
            for (pack, entries) in &pack_entries {
                let key = key_pack(pack);
                let Some(bytes) = self.backend.get(&key)? else {
                    report
                        .repository_errors
                        .push(format!("{} vanished", self.describe(&key)));
                    continue;
                };
                report.bytes_read += bytes.len() as u64;
                progress.advance(bytes.len() as u64);
                if bytes.len() < 8 || &bytes[..8] != MAGIC_PACK {
                    report
                        .repository_errors
                        .push(format!("{}: not a pack (bad magic)", self.describe(&key)));
                }
                let bad: Vec<(BlockId, String)> = entries
                    .par_iter()
                    .filter_map(|e| {
                        let start = e.offset as usize;
                        let end = start + e.stored_len as usize;
                        let ok = bytes
                            .get(start..end)
                            .and_then(|s| decode_block(s, e.compression, e.raw_len))
                            .is_some_and(|d| BlockId::of(&d) == e.id);
                        (!ok).then(|| {
                            (
                                e.id,
                                format!(
                                    "block {} in {} at offset {} is damaged",
                                    e.id,
                                    self.describe(&key),
                                    e.offset
                                ),
                            )
                        })
                    })
                    .collect();
                report.blocks_read += entries.len() as u64;
                bad_blocks.extend(bad);
            }
            progress.finish();
        }

        // Snapshots: chain, root hash, identity, and every block present (and good).
        let mut referenced: HashSet<BlockId> = HashSet::new();
        for cat in &catalogs {
            for s in &cat.snapshots {
                report.snapshots_checked += 1;
                let mut problems = Vec::new();
                match self.resolve(&s.manifest) {
                    Err(e) => problems.push(e.to_string()),
                    Ok((m, map)) => {
                        let h = &m.header;
                        if h.id != s.id || h.name != s.name || h.size != s.size {
                            problems.push(format!(
                                "manifest {} does not match its catalog entry",
                                s.manifest
                            ));
                        }
                        if h.root.is_some_and(|root| map.root_hash() != root) {
                            problems.push(format!(
                                "block map of manifest {} does not match its root hash",
                                s.manifest
                            ));
                        }
                        let mut missing = 0u64;
                        let mut damaged = 0u64;
                        let mut first = None;
                        for (i, id) in map.iter_data() {
                            referenced.insert(id);
                            if !located.contains_key(&id) {
                                missing += 1;
                                first.get_or_insert(format!("block #{i} ({id}) is missing"));
                            } else if let Some(why) = bad_blocks.get(&id) {
                                damaged += 1;
                                first.get_or_insert(format!("block #{i}: {why}"));
                            }
                        }
                        if missing + damaged > 0 {
                            problems.push(format!(
                                "{missing} missing and {damaged} damaged blocks; first: {}",
                                first.unwrap_or_default()
                            ));
                        }
                    }
                }
                if !problems.is_empty() {
                    report.damaged.push(Damage {
                        volume: cat.volume.clone(),
                        snapshot: s.name.clone(),
                        problems,
                    });
                }
            }
        }
        report.blocks_referenced = referenced.len() as u64;
        report.ok = report.damaged.is_empty() && report.repository_errors.is_empty();
        Ok(report)
    }
}
