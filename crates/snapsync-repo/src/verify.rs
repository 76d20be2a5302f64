//! `verify`: check catalogs, manifests, chains and block presence, and with
//! `read_data` re-hash every stored block. Every damaged snapshot is named.

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;
use serde::Serialize;
use snapsync_core::{BlockId, RootHasher};
use snapsync_store::{Phase, Progress, Result, StoreError};

use crate::format::{self, MAGIC_PACK};
use crate::index::BlockIndex;
use crate::repo::{key_pack, Repository};
use crate::stream::ChainCursor;

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
    /// Sealed units whose nonces were checked for repeats (an encrypted repository,
    /// `--read-data`): every block and every sealed object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonces_checked: Option<u64>,
}

/// Blocks looked up in the index at once (sorted: see [`BlockIndex::rank_many`]);
/// ~40 MiB.
pub(crate) const LOOKUP_BATCH: usize = 1 << 20;

/// One bit a block, by rank in the index (see [`BlockIndex::rank_many`]).
pub(crate) struct Bitmap(Vec<u64>);

impl Bitmap {
    pub(crate) fn new(bits: usize) -> Self {
        Bitmap(vec![0; bits.div_ceil(64)])
    }

    pub(crate) fn set(&mut self, k: usize) {
        self.0[k / 64] |= 1 << (k % 64);
    }

    pub(crate) fn get(&self, k: usize) -> bool {
        self.0[k / 64] & (1 << (k % 64)) != 0
    }

    pub(crate) fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// The nonces of an encrypted repository's sealed units, by their first 16 bytes (a
/// repeat of 128 random bits is as telling as one of 192, in less memory).
#[derive(Default)]
struct Nonces {
    seen: std::collections::HashSet<u128>,
    checked: u64,
    repeated: Vec<String>,
}

impl Nonces {
    fn add(&mut self, nonce: &[u8], what: impl FnOnce() -> String) {
        self.checked += 1;
        let n = u128::from_le_bytes(nonce[..16].try_into().expect("16 bytes"));
        if !self.seen.insert(n) && self.repeated.len() < 100 {
            self.repeated.push(format!(
                "{}: nonce used before (a sealed unit repeats another's nonce)",
                what()
            ));
        }
    }
}

/// The index entries of a pack good enough to check its blocks against.
struct GoodPack {
    pack: BlockId,
    index_key: String,
}

impl Repository {
    /// Add the nonces of every sealed object (index, manifest, part, catalog, key) to
    /// `nonces`; each sits after the object's envelope header.
    fn audit_object_nonces(&self, nonces: &mut Nonces) -> Result<()> {
        for prefix in ["index", "manifests", "mparts", "volumes", "keys"] {
            let keys: Vec<String> = self
                .backend
                .list(prefix)?
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| !k.ends_with("/head"))
                .collect();
            for batch in keys.chunks(64) {
                for (key, bytes) in batch.iter().zip(self.backend.get_many(batch)?) {
                    let at = format::ENVELOPE_HEADER;
                    let nonce = match (prefix, &bytes) {
                        // A key object's nonce is in its JSON.
                        ("keys", Some(b)) => crate::crypt::key_object_nonce(b),
                        (_, Some(b)) => b.get(at..at + crate::crypt::NONCE_LEN).map(<[u8]>::to_vec),
                        (_, None) => None,
                    };
                    if let Some(n) = nonce {
                        nonces.add(&n, || self.describe(key));
                    }
                }
            }
        }
        Ok(())
    }

    /// Verify the repository. With `read_data`, `progress` is told of the pack data to
    /// read ([`Phase::Verify`]) and of each pack read.
    ///
    /// Memory stays bounded whatever the repository holds: the indexes go into a block
    /// index that writes itself out past a bound (see `index.rs`), packs are read one at
    /// a time, snapshots are streamed along their chains, and the blocks referenced are
    /// marked in a bitmap by rank, one bit a block.
    pub fn verify(&self, read_data: bool, progress: &dyn Progress) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let catalogs = self.verify_catalogs(&mut report)?;
        let (mut index, packs) = self.verify_indexes(&mut report)?;
        let bad_blocks = if read_data {
            let mut nonces = Nonces::default();
            let bad = self.verify_data(&packs, &mut report, progress, &mut nonces)?;
            if self.is_encrypted() {
                self.audit_object_nonces(&mut nonces)?;
                report.nonces_checked = Some(nonces.checked);
                report.repository_errors.extend(nonces.repeated);
            }
            bad
        } else {
            HashMap::new()
        };
        index
            .rank_all()
            .map_err(|e| StoreError::io("a temporary file of the block index", e))?;
        let mut referenced = Bitmap::new(index.ranked_len());
        for cat in &catalogs {
            for s in &cat.snapshots {
                report.snapshots_checked += 1;
                let problems = self.verify_snapshot(s, &index, &bad_blocks, &mut referenced);
                if !problems.is_empty() {
                    report.damaged.push(Damage {
                        volume: cat.volume.clone(),
                        snapshot: s.name.clone(),
                        problems,
                    });
                }
            }
        }
        report.blocks_referenced = referenced.count();
        report.ok = report.damaged.is_empty() && report.repository_errors.is_empty();
        Ok(report)
    }

    /// Each volume's newest catalog generation, read separately, so one damaged catalog
    /// is reported and the others are still checked.
    fn verify_catalogs(&self, report: &mut VerifyReport) -> Result<Vec<format::Catalog>> {
        let mut catalogs = Vec::new();
        let mut vols: BTreeMap<String, ()> = BTreeMap::new();
        for (k, _) in self.backend.list("volumes")? {
            if let Some(v) = k.strip_prefix("volumes/").and_then(|r| r.split('/').next()) {
                vols.insert(v.to_string(), ());
            }
        }
        for v in vols.keys() {
            match self.catalog_in(v) {
                Ok(Some(c)) => catalogs.push(c),
                Ok(None) => {}
                Err(e) => report.damaged.push(Damage {
                    volume: v.clone(),
                    snapshot: "*".into(),
                    problems: vec![e.to_string()],
                }),
            }
        }
        Ok(catalogs)
    }

    /// The indexes, checked one by one so that one damaged index is named, with their
    /// packs' presence and length: the block index of the good ones, and those packs.
    fn verify_indexes(&self, report: &mut VerifyReport) -> Result<(BlockIndex, Vec<GoodPack>)> {
        let packs_present: HashMap<String, u64> = self.backend.list("packs")?.into_iter().collect();
        let mut index = BlockIndex::new(self.block_size());
        index.reserve(usize::MAX);
        let mut good = Vec::new();
        self.for_each_index(|ix| {
            let (pack, entries) = match ix.parsed {
                Ok(p) => p,
                Err(e) => {
                    report.repository_errors.push(e.to_string());
                    return Ok(());
                }
            };
            let key = key_pack(&pack);
            let end = entries
                .iter()
                .map(|e| e.offset + u64::from(e.stored_len))
                .max()
                .unwrap_or(0);
            match packs_present.get(&key).copied() {
                None => report
                    .repository_errors
                    .push(format!("{} is missing", self.describe(&key))),
                Some(size) if size < end => report.repository_errors.push(format!(
                    "{} is truncated ({size} bytes, index needs {end})",
                    self.describe(&key)
                )),
                Some(_) => {
                    index.add_pack(pack, &entries);
                    good.push(GoodPack {
                        pack,
                        index_key: ix.key,
                    });
                }
            }
            Ok(())
        })?;
        Ok((index, good))
    }

    /// Read every good pack whole, one at a time, and re-hash each block: the damaged
    /// blocks, with why.
    fn verify_data(
        &self,
        packs: &[GoodPack],
        report: &mut VerifyReport,
        progress: &dyn Progress,
        nonces: &mut Nonces,
    ) -> Result<HashMap<BlockId, String>> {
        let sizes: HashMap<String, u64> = self.backend.list("packs")?.into_iter().collect();
        let total = packs
            .iter()
            .filter_map(|p| sizes.get(&key_pack(&p.pack)))
            .sum();
        progress.start(Phase::Verify, total);
        let mut bad_blocks = HashMap::new();
        for p in packs {
            let key = key_pack(&p.pack);
            let (Some(index), Some(bytes)) =
                (self.backend.get(&p.index_key)?, self.backend.get(&key)?)
            else {
                report
                    .repository_errors
                    .push(format!("{} vanished", self.describe(&key)));
                continue;
            };
            let index = self.open_object(format::MAGIC_INDEX, &p.index_key, &index)?;
            let entries = format::decode_index(&index, &self.describe(&p.index_key))?;
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
                        .and_then(|s| self.decode_stored(&e.id, s, e.compression, e.raw_len))
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
            if self.is_encrypted() {
                for e in &entries {
                    let at = e.offset as usize;
                    if let Some(n) = bytes.get(at..at + crate::crypt::NONCE_LEN) {
                        nonces.add(n, || format!("{} at offset {at}", self.describe(&key)));
                    }
                }
            }
        }
        progress.finish();
        Ok(bad_blocks)
    }

    /// One snapshot: its chain, root hash (where stored), identity, and every block
    /// present (and good), streamed along the chain. Marks its blocks in `referenced`.
    fn verify_snapshot(
        &self,
        s: &format::CatalogSnapshot,
        index: &BlockIndex,
        bad_blocks: &HashMap<BlockId, String>,
        referenced: &mut Bitmap,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let mut walk = || -> Result<BlockFindings> {
            let chain = self.checked_chain(&s.manifest)?;
            let h = &chain[0].head.header;
            if h.id != s.id || h.name != s.name || h.size != s.size {
                problems.push(format!(
                    "manifest {} does not match its catalog entry",
                    s.manifest
                ));
            }
            let mut root = h.root.map(|_| RootHasher::new(chain[0].head.block_count));
            let mut cursor = ChainCursor::new(self, &chain)?;
            let mut found = BlockFindings::default();
            // Looked up a batch at a time, sorted, so that the index is read in order.
            let mut batch: Vec<(BlockId, u64)> = Vec::with_capacity(LOOKUP_BATCH);
            while let Some((i, id)) = cursor.next_data_entry()? {
                if let Some(r) = &mut root {
                    r.add(i, &id);
                }
                batch.push((id, i));
                if batch.len() == LOOKUP_BATCH {
                    found.look_up(&mut batch, index, bad_blocks, referenced)?;
                }
            }
            found.look_up(&mut batch, index, bad_blocks, referenced)?;
            cursor.finish()?;
            found.root_differs = match (root, h.root) {
                (Some(r), Some(want)) => r.finish() != want,
                _ => false,
            };
            Ok(found)
        };
        match walk() {
            Err(e) => problems.push(e.to_string()),
            Ok(found) => {
                if found.root_differs {
                    problems.push(format!(
                        "block map of manifest {} does not match its root hash",
                        s.manifest
                    ));
                }
                if found.missing + found.damaged > 0 {
                    problems.push(format!(
                        "{} missing and {} damaged blocks; first: {}",
                        found.missing,
                        found.damaged,
                        found.first.map(|(_, what)| what).unwrap_or_default()
                    ));
                }
            }
        }
        problems
    }
}

/// What checking one snapshot's blocks found.
#[derive(Default)]
struct BlockFindings {
    missing: u64,
    damaged: u64,
    /// The first problem by block number, whatever order the lookups went in.
    first: Option<(u64, String)>,
    root_differs: bool,
}

impl BlockFindings {
    fn note(&mut self, i: u64, what: String) {
        if self.first.as_ref().is_none_or(|(f, _)| i < *f) {
            self.first = Some((i, what));
        }
    }

    /// Look up a batch of (block id, block number), sorted (see
    /// [`BlockIndex::rank_many`]): mark each found in `referenced`, count the missing
    /// and the damaged. Empties the batch.
    fn look_up(
        &mut self,
        batch: &mut Vec<(BlockId, u64)>,
        index: &BlockIndex,
        bad_blocks: &HashMap<BlockId, String>,
        referenced: &mut Bitmap,
    ) -> Result<()> {
        index
            .rank_many(batch, |id, &i, rank| match rank {
                None => {
                    self.missing += 1;
                    self.note(i, format!("block #{i} ({id}) is missing"));
                }
                Some(rank) => {
                    referenced.set(rank);
                    if let Some(why) = bad_blocks.get(id) {
                        self.damaged += 1;
                        self.note(i, format!("block #{i}: {why}"));
                    }
                }
            })
            .map_err(|e| StoreError::io("a temporary file of the block index", e))?;
        batch.clear();
        Ok(())
    }
}
