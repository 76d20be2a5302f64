//! Opening and reading a repository: configuration, catalogs, manifests, blocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use rayon::prelude::*;
use snapsync_core::{codec, validate_name, BlockId, BlockMap, Timestamp, VolumeInfo};
use snapsync_store::{Result, StoreError};

use crate::backend::{Backend, Location, Put, PROBE_PREFIX};
use crate::crypt::Keys;
use crate::format::{
    self, Catalog, Compression, Config, Manifest, ManifestHeader, ManifestId, MAGIC_CATALOG,
    MAGIC_CONFIG,
};
use crate::index::{BlockIndex, BlockLocation};
use crate::sealed;
use crate::RepoOptions;

/// Default block size: the qcow2 default cluster size, a good balance of dedup
/// granularity and metadata size.
pub const DEFAULT_BLOCK_SIZE: u64 = 64 << 10;

/// A full block map is stored instead of a delta when the chain below would hold more
/// manifests than this. Chains are built of logarithmic length (see
/// [`snapsync_core::chain`]: 8 manifests for the 200th snapshot), so this bound is met
/// only after insertions and prunes have reshaped a chain many times.
pub const MAX_CHAIN_LEN: usize = 40;

/// Catalog generations kept behind the newest, so that a reader that listed an older
/// generation a moment ago can still read it.
const KEEP_GENERATIONS: u64 = 8;

/// A snapsync repository.
pub struct Repository {
    pub(crate) backend: Backend,
    pub(crate) config: Config,
    pub(crate) options: RepoOptions,
    /// The keys of an encrypted repository (format version 3); `None` for a plain one.
    pub(crate) keys: Option<Keys>,
    /// The key object `keys` were unwrapped from.
    pub(crate) key_id: Option<String>,
    index: Mutex<Option<BlockIndex>>,
    manifests: Mutex<HashMap<ManifestId, Arc<Manifest>>>,
    /// gc runs seen when the block index was last trusted (see `lock.rs`).
    pub(crate) gc_epochs: Mutex<Option<usize>>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repository({})", self.backend.location())
    }
}

pub(crate) fn key_pack(id: &BlockId) -> String {
    let h = id.to_hex();
    format!("packs/{}/{h}", &h[..2])
}
pub(crate) fn key_index(id: &BlockId) -> String {
    format!("index/{}", id.to_hex())
}
pub(crate) fn key_manifest(id: &ManifestId) -> String {
    let h = id.to_hex();
    format!("manifests/{}/{h}", &h[..2])
}
/// A part of a large manifest's entries (format version 2).
pub(crate) fn key_part(id: &BlockId) -> String {
    let h = id.to_hex();
    format!("mparts/{}/{h}", &h[..2])
}
/// A hint to the newest generation of a volume's catalog, so that reading a snapshot
/// needs no listing. `dir` is the volume's directory ([`Repository::volume_dir`]).
pub(crate) fn key_catalog_head(dir: &str) -> String {
    format!("volumes/{dir}/head")
}
/// A catalog generation; `dir` is the volume's directory ([`Repository::volume_dir`]).
pub(crate) fn key_catalog(dir: &str, generation: u64) -> String {
    format!("volumes/{dir}/{generation:016x}")
}

/// Parse `volumes/<dir>/<generation>` keys.
pub(crate) fn parse_catalog_key(key: &str) -> Option<(String, u64)> {
    let rest = key.strip_prefix("volumes/")?;
    let (vol, gen) = rest.split_once('/')?;
    if gen.len() != 16 || validate_name("volume", vol).is_err() {
        return None;
    }
    Some((vol.to_string(), u64::from_str_radix(gen, 16).ok()?))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Repository {
    /// Create a repository at `location` with the given block size (a power of two
    /// from 512 B to 16 MiB) and default [`RepoOptions`]. The location must be empty.
    pub fn init(location: Location, block_size: u64) -> Result<Self> {
        Self::init_with(location, block_size, &RepoOptions::default())
    }

    /// [`Repository::init`] with `options`.
    pub fn init_with(location: Location, block_size: u64, options: &RepoOptions) -> Result<Self> {
        Self::create(location, block_size, options, false)
    }

    /// Create an encrypted repository (format version 3): a random master key, wrapped
    /// under the first passphrase or key file of [`RepoOptions::credentials`] with
    /// [`RepoOptions::kdf`] in a key object, then `config`. See `docs/FORMAT.md`.
    pub fn init_encrypted(
        location: Location,
        block_size: u64,
        options: &RepoOptions,
    ) -> Result<Self> {
        Self::create(location, block_size, options, true)
    }

    fn create(
        location: Location,
        block_size: u64,
        options: &RepoOptions,
        encrypt: bool,
    ) -> Result<Self> {
        if !block_size.is_power_of_two() || !(512..=16 << 20).contains(&block_size) {
            return Err(StoreError::invalid_argument(format!(
                "block size {block_size}: it must be a power of two from 512 to 16777216"
            )));
        }
        let backend = Backend::open(location, true, options)?;
        let probe = format!("{PROBE_PREFIX}/");
        if let Some((key, _)) = backend
            .list("")?
            .into_iter()
            .find(|(k, _)| !k.starts_with(&probe))
        {
            return Err(StoreError::AlreadyExists {
                what: format!(
                    "{} is not empty (found {key}); a repository is created in an empty place",
                    backend.location()
                ),
            });
        }
        // Before anything is stored: a server that cannot refuse a second create would
        // let concurrent commits overwrite each other.
        backend.check_create_only()?;
        let mut config = Config {
            repository_id: snapsync_store::random_id(),
            block_size,
            created: Timestamp::from_system_time(std::time::SystemTime::now()),
            create_only_checked: true,
            encryption: None,
        };
        let keys = match (encrypt, options.credentials.first()) {
            (false, _) => None,
            (true, None) => {
                return Err(StoreError::KeyRequired {
                    what: format!(
                        "an encrypted repository at {} needs a passphrase or key file",
                        backend.location()
                    ),
                })
            }
            (true, Some(secret)) => {
                let keys = Keys::generate();
                let id = sealed::add_key_object(&backend, &config, &keys, secret, options.kdf)?;
                config.encryption = Some(sealed::config_encryption(&config, &keys));
                Some((keys, id))
            }
        };
        let bytes = sealed::encode_config(&config);
        backend
            .put("config", Bytes::from(bytes), Put::Create)
            .map_err(|e| match e {
                StoreError::AlreadyExists { .. } => StoreError::AlreadyExists {
                    what: format!("a repository at {}", backend.location()),
                },
                other => other,
            })?;
        Ok(Self::from_parts(backend, config, options, keys))
    }

    /// Open an existing repository with default [`RepoOptions`].
    pub fn open(location: Location) -> Result<Self> {
        Self::open_with(location, &RepoOptions::default())
    }

    /// [`Repository::open`] with `options`.
    pub fn open_with(location: Location, options: &RepoOptions) -> Result<Self> {
        let backend = Backend::open(location, false, options).map_err(|e| match e {
            StoreError::NotFound { what } => StoreError::NotFound {
                what: format!("{what} (no snapsync repository there)"),
            },
            other => other,
        })?;
        let loc = format!("{}/config", backend.location());
        let Some(bytes) = backend.get("config")? else {
            return Err(StoreError::NotFound {
                what: format!(
                    "snapsync repository at {} (no config object)",
                    backend.location()
                ),
            });
        };
        let config: Config = format::decode_json(MAGIC_CONFIG, &bytes, &loc)?;
        let keys = sealed::unlock(&backend, &config, &bytes, &options.credentials, &loc)?;
        if !config.block_size.is_power_of_two() || config.block_size < 512 {
            return Err(StoreError::corrupt(
                loc,
                format!("invalid block size {}", config.block_size),
            ));
        }
        if !config.create_only_checked {
            // A repository created before the check was recorded. Only a store that
            // overwrote is refused: one that cannot be written at all (read-only
            // access) can still be read, and its commits would fail on their own.
            match backend.check_create_only() {
                Err(e @ StoreError::Unsupported { .. }) => return Err(e),
                Err(e) => tracing::debug!(error = %e, "create-only check skipped"),
                Ok(()) => {}
            }
        }
        Ok(Self::from_parts(backend, config, options, keys))
    }

    /// Refuse to write on when the repository was replaced since it was opened (deleted
    /// and created again by `init` under a long-running server): the cached block index
    /// would name packs the new one does not hold, and a snapshot deduplicated against
    /// them would be missing its blocks.
    pub(crate) fn check_still_the_same(&self) -> Result<()> {
        let loc = format!("{}/config", self.backend.location());
        let now = match self.backend.get("config")? {
            Some(bytes) => {
                Some(format::decode_json::<Config>(MAGIC_CONFIG, &bytes, &loc)?.repository_id)
            }
            None => None,
        };
        if now.as_deref() == Some(self.config.repository_id.as_str()) {
            return Ok(());
        }
        Err(StoreError::Conflict {
            what: format!(
                "the repository at {} was replaced while open (its id was {}, now {}); open it again",
                self.backend.location(),
                self.config.repository_id,
                now.as_deref().unwrap_or("none: no config object")
            ),
        })
    }

    fn from_parts(
        backend: Backend,
        config: Config,
        options: &RepoOptions,
        keys: Option<(Keys, String)>,
    ) -> Self {
        let (keys, key_id) = keys.unzip();
        Self {
            backend,
            config,
            keys,
            key_id,
            options: options.clone(),
            index: Mutex::new(None),
            manifests: Mutex::new(HashMap::new()),
            gc_epochs: Mutex::new(None),
        }
    }

    /// Block size set at init.
    pub fn block_size(&self) -> u64 {
        self.config.block_size
    }

    /// The repository's random id.
    pub fn repository_id(&self) -> &str {
        &self.config.repository_id
    }

    /// Where it is.
    pub fn location(&self) -> &Location {
        self.backend.location()
    }

    pub(crate) fn describe(&self, key: &str) -> String {
        format!("{}/{key}", self.backend.location())
    }

    /// The newest catalog generation of every volume, in volume-name order.
    pub fn catalogs(&self) -> Result<Vec<Catalog>> {
        for _ in 0..10 {
            let mut newest: BTreeMap<String, u64> = BTreeMap::new();
            for (key, _) in self.backend.list("volumes")? {
                if let Some((vol, gen)) = parse_catalog_key(&key) {
                    let e = newest.entry(vol).or_insert(gen);
                    *e = (*e).max(gen);
                }
            }
            let keys: Vec<String> = newest.iter().map(|(d, g)| key_catalog(d, *g)).collect();
            let got = self.backend.get_many(&keys)?;
            if got.iter().any(Option::is_none) {
                // A generation vanished between list and read: a newer one exists.
                continue;
            }
            let mut catalogs = keys
                .iter()
                .zip(got)
                .map(|(k, b)| self.decode_catalog(k, &b.expect("checked")))
                .collect::<Result<Vec<_>>>()?;
            // In volume-name order, also where keyed directory names order them otherwise.
            catalogs.sort_by(|a, b| a.volume.cmp(&b.volume));
            return Ok(catalogs);
        }
        Err(StoreError::Conflict {
            what: format!(
                "catalogs of {} keep changing while being read",
                self.backend.location()
            ),
        })
    }

    fn decode_catalog(&self, key: &str, bytes: &[u8]) -> Result<Catalog> {
        let bytes = self.open_object(MAGIC_CATALOG, key, bytes)?;
        let cat: Catalog = format::decode_json(MAGIC_CATALOG, &bytes, &self.describe(key))?;
        match parse_catalog_key(key) {
            Some((d, g)) if d == self.volume_dir(&cat.volume) && g == cat.generation => Ok(cat),
            _ => Err(StoreError::corrupt(
                self.describe(key),
                "catalog content does not match its key",
            )),
        }
    }

    /// The newest catalog generation of one volume.
    pub fn catalog(&self, volume: &str) -> Result<Option<Catalog>> {
        validate_name("volume", volume)?;
        self.catalog_in(&self.volume_dir(volume))
    }

    /// The newest catalog generation under `volumes/<dir>/`.
    pub(crate) fn catalog_in(&self, dir: &str) -> Result<Option<Catalog>> {
        // Without listing: start from the head pointer and probe forward, since
        // generations are created one after the other. The pointer is only a hint.
        if let Some(head) = self.backend.get(&key_catalog_head(dir))? {
            let gen = std::str::from_utf8(&head)
                .ok()
                .and_then(|s| u64::from_str_radix(s.trim(), 16).ok());
            if let Some(mut gen) = gen {
                if let Some(mut bytes) = self.backend.get(&key_catalog(dir, gen))? {
                    while let Some(next) = self.backend.get(&key_catalog(dir, gen + 1))? {
                        gen += 1;
                        bytes = next;
                    }
                    return self
                        .decode_catalog(&key_catalog(dir, gen), &bytes)
                        .map(Some);
                }
            }
        }
        for _ in 0..10 {
            let newest = self
                .backend
                .list(&format!("volumes/{dir}"))?
                .into_iter()
                .filter_map(|(k, _)| parse_catalog_key(&k))
                .filter(|(v, _)| v == dir)
                .map(|(_, g)| g)
                .max();
            let Some(gen) = newest else { return Ok(None) };
            let key = key_catalog(dir, gen);
            match self.backend.get(&key)? {
                Some(b) => return self.decode_catalog(&key, &b).map(Some),
                None => continue,
            }
        }
        Err(StoreError::Conflict {
            what: format!("catalog in volumes/{dir} keeps changing while being read"),
        })
    }

    /// Write the next catalog generation; `Conflict` when another writer took it.
    pub(crate) fn put_catalog(&self, catalog: &Catalog) -> Result<()> {
        let dir = self.volume_dir(&catalog.volume);
        let key = key_catalog(&dir, catalog.generation);
        let bytes = self.seal_object(&key, format::encode_json(MAGIC_CATALOG, catalog));
        match self.backend.put(&key, Bytes::from(bytes), Put::Create) {
            Err(StoreError::AlreadyExists { .. }) => Err(StoreError::Conflict {
                what: format!(
                    "generation {} of volume {:?} was committed by another writer",
                    catalog.generation, catalog.volume
                ),
            }),
            other => other,
        }?;
        // Best effort: a stale or missing pointer only costs readers a probe or a list,
        // and it never names a generation that is not durable (written after it), so it
        // need not be durable itself.
        let _ = self.backend.put_visible(
            &key_catalog_head(&dir),
            Bytes::from(format!("{:016x}", catalog.generation)),
            Put::Overwrite,
        );
        if catalog.generation > KEEP_GENERATIONS {
            let old = catalog.generation - KEEP_GENERATIONS;
            for (k, _) in self.backend.list(&format!("volumes/{dir}"))? {
                if let Some((d, g)) = parse_catalog_key(&k) {
                    if d == dir && g < old {
                        let _ = self.backend.delete(&k);
                    }
                }
            }
        }
        Ok(())
    }

    /// Listing of all volumes.
    pub(crate) fn volume_infos(&self) -> Result<Vec<VolumeInfo>> {
        Ok(self
            .catalogs()?
            .into_iter()
            .filter(|c| !c.snapshots.is_empty())
            .map(volume_info)
            .collect())
    }

    /// Listing operations made so far (reading a snapshot should make none).
    pub fn listings_made(&self) -> u64 {
        self.backend.listings_made()
    }

    /// A manifest if it is in the cache.
    pub(crate) fn cached_manifest(&self, id: &ManifestId) -> Option<Arc<Manifest>> {
        lock(&self.manifests).get(id).cloned()
    }

    /// Read a manifest whole, all its parts (cached: manifests are immutable). For the
    /// deltas prune and gc work on; reads of a snapshot stream its chain instead (see
    /// `stream.rs`).
    pub fn manifest(&self, id: &ManifestId) -> Result<Arc<Manifest>> {
        if let Some(m) = lock(&self.manifests).get(id) {
            return Ok(m.clone());
        }
        let key = key_manifest(id);
        let bytes = self
            .backend
            .get(&key)?
            .ok_or_else(|| StoreError::corrupt(self.describe(&key), "manifest is missing"))?;
        let bytes = self.open_object(format::MAGIC_MANIFEST, &key, &bytes)?;
        if self.object_id(&bytes) != *id {
            return Err(StoreError::corrupt(
                self.describe(&key),
                "content does not match its id (damaged)",
            ));
        }
        let (head, mut entries) = format::parse_manifest(&bytes, &self.describe(&key))?;
        drop(bytes);
        let small = head.parts.is_empty();
        for part in &head.parts {
            entries.extend(self.load_part(part, head.block_count)?);
        }
        let m = Arc::new(Manifest {
            header: head.header,
            delta: snapsync_core::Delta {
                block_count: head.block_count,
                entries: entries.into_iter().collect(),
            },
        });
        if small {
            lock(&self.manifests).insert(*id, m.clone());
        }
        Ok(m)
    }

    /// A manifest's fixed fields (its delta base, its depth) without its entries, for
    /// showing a volume's chain: a format-2 manifest is one small read (its parts are
    /// not loaded), a format-1 one is read through once and checked like any read.
    pub fn manifest_header(&self, id: &ManifestId) -> Result<ManifestHeader> {
        if let Some(m) = self.cached_manifest(id) {
            return Ok(m.header.clone());
        }
        Ok(self.check_manifest(id)?.head.header)
    }

    /// Store a manifest given whole (tests build chains by hand); returns its id. The
    /// root hash (full maps only) and the packs its blocks are in are filled in.
    #[cfg(test)]
    pub(crate) fn put_manifest(&self, m: Manifest) -> Result<ManifestId> {
        let full = m.header.delta_base.is_none();
        let mut w = crate::writer::ManifestWriter::new(self, m.delta.block_count, full);
        for (i, b) in &m.delta.entries {
            w.push(*i, *b)?;
        }
        w.finish(m.header)
    }

    /// The full block map of a manifest, resolving its delta chain.
    pub fn resolve(&self, id: &ManifestId) -> Result<(Arc<Manifest>, BlockMap)> {
        let chain = self.chain(id)?;
        let mut map = BlockMap::zeroed(0);
        for m in chain.iter().rev() {
            map.apply_in_place(&m.delta);
        }
        Ok((chain[0].clone(), map))
    }

    /// The manifests of a delta chain, from `id` down to its full map.
    pub(crate) fn chain(&self, id: &ManifestId) -> Result<Vec<Arc<Manifest>>> {
        let mut cur = self.manifest(id)?;
        let mut chain = vec![cur.clone()];
        while let Some(base) = cur.header.delta_base {
            if chain.len() > MAX_CHAIN_LEN * 4 {
                return Err(StoreError::corrupt(
                    self.describe(&key_manifest(id)),
                    "delta chain is too long or cyclic",
                ));
            }
            cur = self.manifest(&base)?;
            chain.push(cur.clone());
        }
        Ok(chain)
    }

    /// Bytes of block data stored (all packs), from a listing.
    pub fn stored_bytes(&self) -> Result<u64> {
        Ok(self.backend.list("packs")?.iter().map(|(_, n)| n).sum())
    }

    /// Forget the cached block index (gc may have deleted packs it names).
    pub(crate) fn invalidate_index(&self) {
        *lock(&self.index) = None;
    }

    /// Cache the block index as it is now, when it is complete (after a receive stored
    /// its packs: the next process then reads none of their indexes again).
    pub(crate) fn cache_index(&self) {
        let mut guard = lock(&self.index);
        if let Some(ix) = guard.as_mut().filter(|ix| ix.complete) {
            if let Err(e) = ix.persist() {
                tracing::debug!(error = %e, "block index not cached");
            }
        }
    }

    /// Where this repository's block index is cached ([`RepoOptions::cache_dir`]).
    fn index_cache(&self) -> Option<std::path::PathBuf> {
        let dir = self.options.cache_dir.as_ref()?;
        Some(dir.join(&self.config.repository_id).join("index"))
    }

    /// An empty block index, or the one cached by an earlier process if it is still
    /// good (no gc ran since).
    fn fresh_index(&self) -> Result<BlockIndex> {
        let bs = self.config.block_size;
        let Some(dir) = self.index_cache() else {
            return Ok(BlockIndex::new(bs));
        };
        let epochs = self.backend.list("gc-epochs")?.len();
        match BlockIndex::restore(bs, &dir, epochs) {
            Ok(Some(ix)) => return Ok(ix),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, cache = %dir.display(), "block index cache unreadable")
            }
        }
        let mut ix = BlockIndex::in_dir(bs, dir);
        ix.gc_epochs = Some(epochs);
        Ok(ix)
    }

    /// Run `f` with the block index, loading it on first use. Should a lookup meet a
    /// damaged run of the local cache (its answers then may say "not indexed" for a
    /// block that is), the index is dropped, built again from the repository's own
    /// index objects, and `f` runs once more on it: `f` must be safe to repeat.
    pub(crate) fn with_index<T>(&self, mut f: impl FnMut(&mut BlockIndex) -> T) -> Result<T> {
        let mut guard = lock(&self.index);
        for _ in 0..2 {
            let ix = self.loaded_index(&mut guard)?;
            let out = f(ix);
            // Whatever `f` added is sorted in before anyone looks blocks up again.
            ix.seal();
            if !ix.take_damage() {
                return Ok(out);
            }
            tracing::warn!("block index cache damaged: rebuilding it from the repository");
            *guard = None;
        }
        Err(StoreError::corrupt(
            self.index_cache()
                .map_or_else(|| "block index".into(), |d| d.display().to_string()),
            "the block index stays unreadable after a rebuild",
        ))
    }

    /// The block index in `guard`, loaded and completed first if it is not.
    fn loaded_index<'a>(
        &self,
        guard: &'a mut std::sync::MutexGuard<'_, Option<BlockIndex>>,
    ) -> Result<&'a mut BlockIndex> {
        if !guard.as_ref().is_some_and(|ix| ix.complete) {
            // The packs already loaded stay: only the others are read.
            let partial = match guard.take() {
                Some(ix) => ix,
                None => self.fresh_index()?,
            };
            let mut ix = self.load_index(partial)?;
            // Complete as of the listing: the next process starts from here.
            // A cache that cannot be written costs the next process time, not this
            // one its result: noted, not shown.
            if let Err(e) = ix.persist() {
                tracing::debug!(error = %e, "block index not cached");
            }
            **guard = Some(ix);
        }
        Ok(guard.as_mut().expect("loaded"))
    }

    /// Load the indexes of these packs only (no listing), unless already loaded;
    /// `expected_blocks` (how many blocks they hold, as far as the caller knows) sizes
    /// the index once instead of growing it step by step.
    pub(crate) fn index_packs(&self, packs: &[BlockId], expected_blocks: usize) -> Result<()> {
        let mut guard = lock(&self.index);
        if guard.is_none() {
            *guard = Some(self.fresh_index()?);
        }
        let ix = guard.as_mut().expect("set");
        let wanted: Vec<BlockId> = packs.iter().filter(|p| !ix.has_pack(p)).copied().collect();
        if wanted.is_empty() {
            return Ok(());
        }
        ix.reserve(expected_blocks);
        let added = self.add_indexes(ix, &wanted);
        ix.seal();
        added
    }

    /// Read the indexes of `packs` into `ix`, a batch at a time: a 1 TiB volume's are
    /// tens of thousands of objects, and all their bytes at once would add half the
    /// index's own size again.
    /// Missing ones are skipped: a pack repacked by gc is gone, and the full index (a
    /// listing) finds its blocks.
    fn add_indexes(&self, ix: &mut BlockIndex, packs: &[BlockId]) -> Result<()> {
        for batch in packs.chunks(INDEX_BATCH) {
            let keys: Vec<String> = batch.iter().map(key_index).collect();
            for ((pack, key), bytes) in batch.iter().zip(&keys).zip(self.backend.get_many(&keys)?) {
                let Some(bytes) = bytes else { continue };
                let bytes = self.open_object(format::MAGIC_INDEX, key, &bytes)?;
                let entries = format::decode_index(&bytes, &self.describe(key))?;
                ix.add_pack(*pack, &entries);
            }
        }
        Ok(())
    }

    /// Complete `index` (empty, or holding some packs already) with every pack's index.
    fn load_index(&self, mut index: BlockIndex) -> Result<BlockIndex> {
        let mut packs = Vec::new();
        let mut blocks = 0usize;
        for (key, size) in self.backend.list("index")? {
            let Some(hex) = key.strip_prefix("index/").filter(|h| h.len() == 64) else {
                continue;
            };
            let pack = hex
                .parse::<BlockId>()
                .map_err(|_| StoreError::corrupt(self.describe(&key), "bad index name"))?;
            if !index.has_pack(&pack) {
                // The entry count, from the object's size (envelope and count: 60 bytes).
                blocks += (size.saturating_sub(60) / format::INDEX_ENTRY_LEN as u64) as usize;
                packs.push(pack);
            }
        }
        index.reserve(blocks);
        let added = self.add_indexes(&mut index, &packs);
        index.seal();
        added?;
        index.complete = true;
        Ok(index)
    }

    /// Call `f` with every pack index object, each parsed on its own so that callers
    /// can decide whether one damaged index is fatal (reading) or a finding (verify), a
    /// batch at a time: the indexes of a large repository are never all in memory.
    pub(crate) fn for_each_index(
        &self,
        mut f: impl FnMut(IndexObject) -> Result<()>,
    ) -> Result<()> {
        let keys: Vec<String> = self
            .backend
            .list("index")?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.len() == "index/".len() + 64)
            .collect();
        for batch in keys.chunks(INDEX_BATCH) {
            for (key, bytes) in batch.iter().zip(self.backend.get_many(batch)?) {
                let Some(bytes) = bytes else { continue };
                let parsed = key["index/".len()..]
                    .parse::<BlockId>()
                    .map_err(|_| StoreError::corrupt(self.describe(key), "bad index name"))
                    .and_then(|pack| {
                        let bytes = self.open_object(format::MAGIC_INDEX, key, &bytes)?;
                        format::decode_index(&bytes, &self.describe(key)).map(|e| (pack, e))
                    });
                f(IndexObject {
                    size: bytes.len() as u64,
                    key: key.clone(),
                    parsed,
                })?;
            }
        }
        Ok(())
    }

    /// Read blocks by id, verifying each against its id. Reads are grouped by pack and
    /// issued concurrently; decompression and hashing run on all cores.
    pub fn read_blocks(&self, ids: &[BlockId]) -> Result<Vec<Vec<u8>>> {
        let bs = self.block_size() as usize;
        let mut out = vec![0u8; ids.len() * bs];
        let slots: Vec<(usize, BlockId)> = ids.iter().copied().enumerate().collect();
        self.read_blocks_into(&mut out, &slots, &[], &mut Vec::new())?;
        Ok(out.chunks(bs.max(1)).map(<[u8]>::to_vec).collect())
    }

    /// Where each block is: the indexes of `packs` (the packs a snapshot's manifests
    /// name) are loaded first; the full index only if they are not enough.
    fn locate(&self, ids: &[BlockId], packs: &[BlockId]) -> Result<Vec<(BlockId, BlockLocation)>> {
        self.index_packs(packs, 0)?;
        let lookup = |ix: &BlockIndex| {
            ids.iter()
                .map(|id| ix.get(id).ok_or(*id))
                .collect::<Vec<_>>()
        };
        let partial = lock(&self.index).as_ref().map(lookup);
        let located = match partial {
            Some(l) if l.iter().all(|x| x.is_ok()) => l,
            _ => self.with_index(|ix| lookup(ix))?,
        };
        located
            .into_iter()
            .map(|l| {
                l.map_err(|id| {
                    StoreError::corrupt(
                        self.backend.location().to_string(),
                        format!("block {id} is referenced but not in any pack index"),
                    )
                })
            })
            .collect()
    }

    /// Read blocks straight into `out`, verifying each against its id: `blocks` lists
    /// `(slot, id)`, and block `slot` fills `out[slot * block_size..][..block_size]`.
    /// Each slot is listed at most once; slots not listed are left as they are.
    ///
    /// Nothing is allocated per block. Blocks stored one after the other in a pack are
    /// read with one request; a run of uncompressed blocks that also follow each other
    /// in `out` is read straight into `out` and only hashed there, the others are read
    /// into `scratch` (kept by the caller for the next call) and decompressed or copied
    /// into `out` on all cores. Only the indexes of `packs` are loaded unless they do
    /// not name every block (see [`Repository::locate`]).
    pub(crate) fn read_blocks_into(
        &self,
        out: &mut [u8],
        blocks: &[(usize, BlockId)],
        packs: &[BlockId],
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        let bs = self.block_size() as usize;
        assert_eq!(out.len() % bs, 0, "output is whole blocks");
        if blocks.is_empty() {
            return Ok(());
        }
        let slots = out.len() / bs;
        let ids: Vec<BlockId> = blocks.iter().map(|(_, id)| *id).collect();
        let located = self.locate(&ids, packs)?;
        let damaged = |k: usize| {
            let (pack, l) = &located[k];
            StoreError::corrupt(
                self.describe(&key_pack(pack)),
                format!("block {} at offset {} is damaged", ids[k], l.offset),
            )
        };
        for (k, (_, l)) in located.iter().enumerate() {
            // Every block is exactly one block long, and stored compressed only when
            // that made it smaller: anything else is a damaged index (and must not
            // size a read).
            if l.raw_len as usize != bs || l.stored_len as usize > self.max_stored_len() {
                return Err(damaged(k));
            }
        }

        // Group into runs of consecutive (or nearly so) bytes of one pack.
        let mut order: Vec<usize> = (0..blocks.len()).collect();
        order.sort_unstable_by_key(|&k| (located[k].0, located[k].1.offset));
        let mut runs: Vec<Run> = Vec::new();
        // Where each block's stored bytes are, by slot.
        let mut sources: Vec<Option<(usize, Source)>> = vec![None; slots];
        let mut scratch_len = 0usize;
        for &k in &order {
            let (pack, l) = &located[k];
            let slot = blocks[k].0;
            assert!(slot < slots && sources[slot].is_none(), "slots are unique");
            let (start, stored) = (l.offset, u64::from(l.stored_len));
            let plain =
                self.keys.is_none() && l.compression == Compression::None && stored == bs as u64;
            let extends = runs.last().is_some_and(|r| {
                r.pack == *pack
                    && match r.direct {
                        Some(first) => plain && start == r.end && slot == first + r.blocks,
                        None => {
                            start >= r.start
                                && start <= r.end + MAX_READ_GAP
                                && (start + stored).max(r.end) - r.start <= MAX_READ_RUN
                        }
                    }
            });
            if !extends {
                let direct = plain.then_some(slot);
                scratch_len += runs.last().map_or(0, Run::scratch_len);
                runs.push(Run {
                    pack: *pack,
                    start,
                    end: start,
                    direct,
                    blocks: 0,
                    scratch_at: scratch_len,
                });
            }
            let r = runs.last_mut().expect("pushed");
            r.end = r.end.max(start + stored);
            r.blocks += 1;
            sources[slot] = Some((
                k,
                match r.direct {
                    Some(_) => Source::InPlace,
                    None => Source::Scratch(r.scratch_at + (start - r.start) as usize),
                },
            ));
        }
        scratch_len += runs.last().map_or(0, Run::scratch_len);
        if scratch.len() < scratch_len {
            scratch.resize(scratch_len, 0);
        }

        // Read: in-place runs into disjoint pieces of `out`, the others into `scratch`.
        {
            let mut direct: Vec<&Run> = runs.iter().filter(|r| r.direct.is_some()).collect();
            direct.sort_unstable_by_key(|r| r.direct);
            let mut requests: Vec<(String, u64, &mut [u8])> = Vec::with_capacity(runs.len());
            let mut rest_out = &mut out[..];
            let mut taken = 0usize;
            for r in direct {
                let first = r.direct.expect("direct") * bs;
                let tail = std::mem::take(&mut rest_out);
                let (_, tail) = tail.split_at_mut(first - taken);
                let (dst, tail) = tail.split_at_mut((r.end - r.start) as usize);
                rest_out = tail;
                taken = first + dst.len();
                requests.push((key_pack(&r.pack), r.start, dst));
            }
            let mut rest_scratch = &mut scratch[..scratch_len];
            for r in runs.iter().filter(|r| r.direct.is_none()) {
                let (dst, tail) = std::mem::take(&mut rest_scratch).split_at_mut(r.scratch_len());
                rest_scratch = tail;
                requests.push((key_pack(&r.pack), r.start, dst));
            }
            self.backend.read_ranges_into(&mut requests)?;
        }

        // Decode and verify on all cores.
        let scratch = &scratch[..scratch_len];
        out.par_chunks_mut(bs)
            .zip(sources.par_iter())
            .try_for_each(|(dst, source)| {
                let Some((k, source)) = source else {
                    return Ok(());
                };
                let l = &located[*k].1;
                if let Source::Scratch(at) = source {
                    let stored = &scratch[*at..*at + l.stored_len as usize];
                    if !self.decode_stored_into(&ids[*k], stored, l.compression, dst) {
                        return Err(damaged(*k));
                    }
                }
                if BlockId::of(dst) != ids[*k] {
                    return Err(damaged(*k));
                }
                Ok(())
            })
    }
}

/// A catalog as a store listing entry.
pub(crate) fn volume_info(c: Catalog) -> VolumeInfo {
    VolumeInfo {
        size: c.snapshots.last().map_or(0, |s| s.size),
        snapshots: c
            .snapshots
            .iter()
            .map(|s| snapsync_core::SnapshotInfo {
                name: s.name.clone(),
                id: s.id,
                created: s.created,
                size: s.size,
            })
            .collect(),
        name: c.volume,
        origin: c.origin,
    }
}

/// One `index/<pack>` object as read.
pub(crate) struct IndexObject {
    /// Its key.
    pub(crate) key: String,
    /// Its size in bytes.
    pub(crate) size: u64,
    /// The pack it describes and the pack's entries, or why it could not be read.
    pub(crate) parsed: Result<(BlockId, Vec<format::IndexEntry>)>,
}

/// Decompress (or copy) a stored block; `None` when it does not decode to `raw_len` bytes.
pub(crate) fn decode_block(
    stored: &[u8],
    compression: Compression,
    raw_len: u32,
) -> Option<Vec<u8>> {
    match compression {
        Compression::None => (stored.len() == raw_len as usize).then(|| stored.to_vec()),
        Compression::Zstd => codec::decompress(stored, raw_len as usize).ok(),
    }
}

/// Index objects read at once when loading the block index.
const INDEX_BATCH: usize = 64;

/// Unread bytes between two blocks of a pack that still join them into one read: less
/// than a block costs less than a second request.
const MAX_READ_GAP: u64 = 64 << 10;
/// Longest single read.
const MAX_READ_RUN: u64 = 16 << 20;

/// One read request of [`Repository::read_blocks_into`]: bytes `start..end` of a pack.
#[derive(Debug)]
struct Run {
    pack: BlockId,
    start: u64,
    end: u64,
    /// Read straight into the output from this slot on (uncompressed blocks that follow
    /// each other both in the pack and in the output); otherwise into the scratch buffer.
    direct: Option<usize>,
    blocks: usize,
    /// Where the run starts in the scratch buffer (when not direct).
    scratch_at: usize,
}

impl Run {
    fn scratch_len(&self) -> usize {
        if self.direct.is_some() {
            0
        } else {
            (self.end - self.start) as usize
        }
    }
}

/// Where a block's stored bytes were read to.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// Already in place in the output (uncompressed).
    InPlace,
    /// At this offset in the scratch buffer.
    Scratch(usize),
}

/// Decompress (or copy) a stored block into `dst`; false unless it decodes to exactly
/// `dst.len()` bytes.
pub(crate) fn decode_block_into(stored: &[u8], compression: Compression, dst: &mut [u8]) -> bool {
    match compression {
        Compression::None => {
            if stored.len() != dst.len() {
                return false;
            }
            dst.copy_from_slice(stored);
            true
        }
        Compression::Zstd => codec::decompress_into(stored, dst).is_ok(),
    }
}
