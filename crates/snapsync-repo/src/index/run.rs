//! Runs: blocks of the index written out, sorted, to a file (see the parent module).
//!
//! A run file is read a **page** at a time (64 records), and each page carries its own
//! check, so a process checks exactly the pages it reads: opening a cached run reads
//! its small parts (fences, filter, footer: ~1.1 bytes a block) and checks them whole,
//! never the 44 bytes a block of its records. Opening the index of a 16 M-block
//! repository so reads ~20 MB, not 0.7 GB, and its cost follows what a command looks
//! up, not what the repository holds.
//!
//! The filter stays in the file unless the index's filter budget holds it (see
//! [`FILTER_MEMORY`]): a lookup then reads the one 64-byte filter block it needs. A
//! filter block damaged after the open can only make a block look absent (stored once
//! more) or present (its page is read, and checked); never a wrong location.
//!
//! Layout (format `SNSYIXR2`, all integers little-endian):
//!
//! | part | bytes |
//! | --- | --- |
//! | magic `SNSYIXR2` | 8 |
//! | salt (random, per file) | 16 |
//! | pages: up to 64 records of 44 bytes, then the page's check | ≤ 64 × 44 + 16 each |
//! | fences: the first 8 bytes of each page's first id, as a big-endian number | 8 a page |
//! | filter: blocked Bloom filter | 64 a filter block |
//! | `count`, pages, filter blocks, highest pack position | 4 × 8 |
//! | BLAKE3 of magic, salt, fences, filter and the four numbers | 32 |
//!
//! A page's check is the first 16 bytes of BLAKE3(salt ‖ page number ‖ records): a
//! page of another file or another place in this one fails it too. A process checks a
//! page the first time it reads it (a run file never changes).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use snapsync_core::BlockId;

use super::{Entry, Loc};

/// Records between two fence entries: one page, one read per lookup.
pub(super) const FENCE: usize = 64;
/// One record: id, pack position, location word.
pub(super) const RECORD: usize = 44;
/// Bytes of a page's check.
const CHECK: usize = 16;
/// Bytes of a whole page on disk.
const PAGE: usize = FENCE * RECORD + CHECK;
/// Magic, then the salt.
const HEADER: u64 = 8 + 16;
/// Magic at the start of a run file.
const RUN_MAGIC: &[u8; 8] = b"SNSYIXR2";
/// Pages a process reads of a run by lookups before it reads the run through once
/// (see [`Run::read_through`]).
const READ_THROUGH_AFTER: usize = if cfg!(test) { 4 } else { 1024 };
/// Bytes of filters an index keeps in memory, smallest filters first (each saves one
/// read per lookup whatever its size); the others are read a block at a time from
/// their files (the page cache, usually). 8 MiB: the filters of 8 M blocks.
pub(super) const FILTER_MEMORY: usize = if cfg!(test) { 128 } else { 8 << 20 };
/// The buffer a run file's fences and filter are read through.
const OPEN_READ: usize = 1 << 20;

/// Blocks written out: sorted records in a file, with a fence per page in memory and a
/// filter in memory or in the file (see the module documentation).
#[derive(Debug)]
pub(super) struct Run {
    file: File,
    /// Its name when it is a file of the local cache (removed when merged away, unless
    /// `persisted`: a `state.json` names it, and other processes may be reading it).
    pub(super) path: Option<PathBuf>,
    pub(super) persisted: bool,
    /// The highest pack position it names (a cached run must fit its state's packs).
    pub(super) max_pack: u64,
    pub(super) count: usize,
    salt: [u8; 16],
    /// The first 8 bytes of the first id of every page.
    fences: Vec<u64>,
    /// Where the filter starts in the file, and its blocks.
    filter_at: u64,
    filter_blocks: usize,
    /// The filter, when the index's budget holds it.
    filter: Option<Filter>,
    /// One bit a page: checked already by this process (a page is checked the first
    /// time it is read; a run file never changes, and writing a manifest looks up
    /// every block it names, tens of times a page).
    checked: Vec<AtomicU64>,
    /// Pages read by lookups so far.
    looked_up: AtomicUsize,
}

pub(super) fn prefix(id: &BlockId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

fn encode_record(e: &Entry, out: &mut [u8]) {
    out[..32].copy_from_slice(&e.id.0);
    out[32..36].copy_from_slice(&e.loc.pack.to_le_bytes());
    out[36..40].copy_from_slice(&e.loc.word[0].to_le_bytes());
    out[40..44].copy_from_slice(&e.loc.word[1].to_le_bytes());
}

fn decode_record(r: &[u8]) -> Entry {
    let u32_at = |k: usize| u32::from_le_bytes(r[k..k + 4].try_into().expect("4 bytes"));
    Entry {
        id: BlockId(r[..32].try_into().expect("32 bytes")),
        loc: Loc {
            pack: u32_at(32),
            word: [u32_at(36), u32_at(40)],
        },
    }
}

fn page_check(salt: &[u8; 16], page: usize, records: &[u8]) -> [u8; CHECK] {
    let mut h = blake3::Hasher::new();
    h.update(salt);
    h.update(&(page as u64).to_le_bytes());
    h.update(records);
    h.finalize().as_bytes()[..CHECK]
        .try_into()
        .expect("16 bytes")
}

/// A page of a run: its records, read and checked. It serves one run (see
/// [`Page::forget`]).
pub(super) struct Page {
    no: usize,
    bytes: [u8; PAGE],
    len: usize,
}

impl Page {
    pub(super) fn new() -> Self {
        Page {
            no: usize::MAX,
            bytes: [0; PAGE],
            len: 0,
        }
    }

    /// Forget which page it holds (before it serves another run).
    pub(super) fn forget(&mut self) {
        self.no = usize::MAX;
    }

    /// Its records, 44 bytes each.
    pub(super) fn records(&self) -> &[u8] {
        &self.bytes[..self.len * RECORD]
    }
}

/// The error of a page or file that fails its check. A damaged file of the local
/// cache is taken out of it at once (its `state.json` removed), so that no process
/// trusts it again: the next one rebuilds the cache from the repository.
fn damaged(path: Option<&Path>, what: String) -> std::io::Error {
    if let Some(state) = path.and_then(Path::parent).map(|d| d.join("state.json")) {
        let _ = std::fs::remove_file(state);
    }
    let file = path.map_or("a temporary block index file".into(), |p| {
        p.display().to_string()
    });
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("block index {file}: {what} (the local cache is dropped and rebuilt from the repository)"),
    )
}

impl Run {
    /// Write `count` entries (at most: a merge may drop duplicates), sorted by id,
    /// distinct: to a new file in `dir`, or to an anonymous temporary file.
    pub(super) fn write(
        dir: Option<&Path>,
        entries: impl Iterator<Item = Entry>,
        count: usize,
    ) -> std::io::Result<Run> {
        let (file, path) = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                let p = d.join(format!("run-{}", snapsync_store::random_id()));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&p)?;
                (f, Some(p))
            }
            None => (tempfile::tempfile()?, None),
        };
        let salt: [u8; 16] = rand::random();
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &file);
        out.write_all(RUN_MAGIC)?;
        out.write_all(&salt)?;
        let mut fences = Vec::with_capacity(count / FENCE + 1);
        let mut filter = Filter::new(count);
        let mut page = Vec::with_capacity(FENCE * RECORD);
        let mut record = [0u8; RECORD];
        let mut n = 0usize;
        let mut max_pack = 0u64;
        for e in entries {
            if n.is_multiple_of(FENCE) && n > 0 {
                write_page(&mut out, &salt, fences.len() - 1, &mut page)?;
            }
            if n.is_multiple_of(FENCE) {
                fences.push(prefix(&e.id));
            }
            filter.insert(&e.id);
            max_pack = max_pack.max(u64::from(e.loc.pack));
            encode_record(&e, &mut record);
            page.extend_from_slice(&record);
            n += 1;
        }
        if !page.is_empty() {
            write_page(&mut out, &salt, fences.len() - 1, &mut page)?;
        }
        let filter_at = HEADER + records_len(n) + fences.len() as u64 * 8;
        let footer = Footer {
            count: n as u64,
            pages: fences.len() as u64,
            filter_blocks: filter.blocks.len() as u64,
            max_pack,
        };
        let mut summary = blake3::Hasher::new();
        summary.update(RUN_MAGIC);
        summary.update(&salt);
        let mut put = |bytes: &[u8]| {
            summary.update(bytes);
            out.write_all(bytes)
        };
        for f in &fences {
            put(&f.to_le_bytes())?;
        }
        for b in &filter.blocks {
            for w in b {
                put(&w.to_le_bytes())?;
            }
        }
        put(&footer.to_bytes())?;
        let check = summary.finalize();
        out.write_all(check.as_bytes())?;
        out.flush()?;
        drop(out);
        Ok(Run {
            file,
            path,
            persisted: false,
            max_pack,
            count: n,
            salt,
            fences,
            filter_at,
            filter_blocks: filter.blocks.len(),
            filter: Some(filter),
            checked: unchecked(n.div_ceil(FENCE)),
            looked_up: AtomicUsize::new(0),
        })
    }

    /// A run file of the local cache with its small parts checked (its pages are
    /// checked as they are read); `None` when they are damaged. The filter is not kept
    /// (see [`Run::hold_filter`]).
    pub(super) fn open(path: &Path) -> std::io::Result<Option<Run>> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let Some(footer) = Footer::read(&file, len)? else {
            return Ok(None);
        };
        let mut head = [0u8; HEADER as usize];
        file.read_exact_at(&mut head, 0)?;
        if head[..8] != RUN_MAGIC[..] {
            return Ok(None);
        }
        let mut summary = blake3::Hasher::new();
        summary.update(&head);
        // Fences and filter are read through one buffer of at most 1 MiB (a filter
        // is held later, if at all; see `hold_filter`), so opening needs no second
        // copy of either.
        let fences_at = HEADER + records_len(footer.count as usize);
        let mut buf = vec![0u8; OPEN_READ];
        let mut fences = Vec::with_capacity(footer.pages as usize);
        read_chunks(&file, fences_at, footer.pages * 8, &mut buf, |bytes| {
            summary.update(bytes);
            fences.extend(
                bytes
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
            );
        })?;
        let filter_at = fences_at + footer.pages * 8;
        read_chunks(
            &file,
            filter_at,
            footer.filter_blocks * 64,
            &mut buf,
            |bytes| {
                summary.update(bytes);
            },
        )?;
        summary.update(&footer.to_bytes());
        let mut want = [0u8; 32];
        file.read_exact_at(&mut want, len - 32)?;
        if summary.finalize().as_bytes() != &want {
            return Ok(None);
        }
        Ok(Some(Run {
            file,
            path: Some(path.to_path_buf()),
            persisted: true,
            max_pack: footer.max_pack,
            count: footer.count as usize,
            salt: head[8..].try_into().expect("16 bytes"),
            fences,
            filter_at,
            filter_blocks: footer.filter_blocks as usize,
            filter: None,
            checked: unchecked(footer.pages as usize),
            looked_up: AtomicUsize::new(0),
        }))
    }

    /// Bytes of its filter.
    pub(super) fn filter_bytes(&self) -> usize {
        self.filter_blocks * 64
    }

    /// Keep the filter in memory (read from the file if it is not), or drop it.
    pub(super) fn hold_filter(&mut self, hold: bool) -> std::io::Result<()> {
        if !hold {
            self.filter = None;
        } else if self.filter.is_none() {
            // Straight into the filter's blocks: a whole-file buffer beside them would
            // double the filter's memory while it loads (the peak of a small command).
            let mut blocks = Vec::with_capacity(self.filter_blocks);
            let mut buf = vec![0u8; OPEN_READ.min(self.filter_bytes())];
            read_chunks(
                &self.file,
                self.filter_at,
                self.filter_bytes() as u64,
                &mut buf,
                |bytes| blocks.extend(bytes.chunks_exact(64).map(Filter::block_from)),
            )?;
            self.filter = Some(Filter { blocks });
        }
        Ok(())
    }

    /// Whether its filter lets `id` through (from memory, or one read of 64 bytes).
    pub(super) fn may_contain(&self, id: &BlockId) -> std::io::Result<bool> {
        if let Some(f) = &self.filter {
            return Ok(f.may_contain(id));
        }
        let (block, bits) = Filter::bits(self.filter_blocks, id);
        let mut bytes = [0u8; 64];
        self.file
            .read_exact_at(&mut bytes, self.filter_at + block as u64 * 64)?;
        Ok(Filter::block_has(&Filter::block_from(&bytes), &bits))
    }

    /// Read page `no` into `page` (unless it holds it already) and check it.
    pub(super) fn read_page(&self, no: usize, page: &mut Page) -> std::io::Result<()> {
        if page.no == no {
            return Ok(());
        }
        page.no = usize::MAX;
        let len = (self.count - no * FENCE).min(FENCE);
        let bytes = &mut page.bytes[..len * RECORD + CHECK];
        self.file
            .read_exact_at(bytes, HEADER + (no * PAGE) as u64)?;
        let (records, check) = bytes.split_at(len * RECORD);
        let (word, bit) = (&self.checked[no / 64], 1u64 << (no % 64));
        if word.load(Ordering::Relaxed) & bit == 0 {
            if page_check(&self.salt, no, records) != check {
                return Err(damaged(
                    self.path.as_deref(),
                    format!("page {no} fails its check"),
                ));
            }
            word.fetch_or(bit, Ordering::Relaxed);
        }
        page.no = no;
        page.len = len;
        Ok(())
    }

    /// Read the records through once, a MiB at a time, into the page cache: a process
    /// that looks up this many blocks of a run will look up many more (an extent diff
    /// hands the repository whole extents around each write, most of their blocks
    /// stored already), and each would be a random read of a cold page; read in order,
    /// the run costs a fraction of them. A failure here only leaves the reads random.
    fn read_through(&self) {
        let mut buf = vec![0u8; 1 << 20];
        let end = HEADER + records_len(self.count);
        let mut at = HEADER;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            if self.file.read_exact_at(&mut buf[..n], at).is_err() {
                return;
            }
            at += n as u64;
        }
    }

    /// The pages that may hold `id`, in order: from the last whose fence is below its
    /// prefix (a page starting with the prefix may follow one that ends with it) while
    /// fences do not pass it.
    pub(super) fn pages_for(&self, id: &BlockId) -> impl Iterator<Item = usize> + '_ {
        let key = prefix(id);
        let first = self.fences.partition_point(|f| *f < key).saturating_sub(1);
        (first..self.fences.len()).take_while(move |p| self.fences[*p] <= key)
    }

    /// The record number and location of `id`, if this run holds it: `page` is the
    /// reader's buffer (a page already in it is not read again).
    pub(super) fn find_in(
        &self,
        id: &BlockId,
        page: &mut Page,
    ) -> std::io::Result<Option<(usize, Loc)>> {
        if !self.may_contain(id)? {
            return Ok(None);
        }
        for p in self.pages_for(id) {
            if page.no != p
                && self.looked_up.fetch_add(1, Ordering::Relaxed) + 1 == READ_THROUGH_AFTER
            {
                self.read_through();
            }
            self.read_page(p, page)?;
            for (k, r) in page.records().chunks_exact(RECORD).enumerate() {
                match r[..32].cmp(&id.0[..]) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => {
                        return Ok(Some((p * FENCE + k, decode_record(r).loc)))
                    }
                    std::cmp::Ordering::Greater => return Ok(None),
                }
            }
        }
        Ok(None)
    }

    /// Merge runs into one (a block in several keeps the oldest run's location); the
    /// merged runs' cache files are removed.
    pub(super) fn merge(dir: Option<&Path>, runs: &[Run]) -> std::io::Result<Run> {
        let count = runs.iter().map(|r| r.count).sum();
        let mut readers: Vec<RunReader<'_>> = runs.iter().map(RunReader::new).collect();
        let mut heads: Vec<Option<Entry>> = Vec::with_capacity(runs.len());
        for r in &mut readers {
            heads.push(r.next()?);
        }
        let mut error = None;
        let mut last: Option<BlockId> = None;
        let merged = std::iter::from_fn(|| loop {
            let k = (0..heads.len())
                .filter(|&k| heads[k].is_some())
                .min_by_key(|&k| (heads[k].expect("some").id, k))?;
            let e = heads[k].take().expect("some");
            match readers[k].next() {
                Ok(next) => heads[k] = next,
                Err(err) => {
                    error = Some(err);
                    return None;
                }
            }
            if last != Some(e.id) {
                last = Some(e.id);
                return Some(e);
            }
        });
        let run = Run::write(dir, merged, count)?;
        if let Some(e) = error {
            if let Some(p) = &run.path {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        for r in runs.iter().filter(|r| !r.persisted) {
            if let Some(p) = &r.path {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(run)
    }
}

/// Write one page's records and its check, and empty `page`.
fn write_page(
    out: &mut impl Write,
    salt: &[u8; 16],
    no: usize,
    page: &mut Vec<u8>,
) -> std::io::Result<()> {
    out.write_all(page)?;
    out.write_all(&page_check(salt, no, page))?;
    page.clear();
    Ok(())
}

/// A bitmap of `pages` pages, none checked yet.
fn unchecked(pages: usize) -> Vec<AtomicU64> {
    (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

/// Bytes of the pages of `count` records.
fn records_len(count: usize) -> u64 {
    (count * RECORD + count.div_ceil(FENCE) * CHECK) as u64
}

/// Read `len` bytes of `file` from `at` through `buf` (whose length is a multiple of 64),
/// handing each filled part to `each`.
fn read_chunks(
    file: &File,
    at: u64,
    len: u64,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at + done)?;
        each(&buf[..n]);
        done += n as u64;
    }
    Ok(())
}

/// The numbers at the end of a run file (see the module documentation).
struct Footer {
    count: u64,
    pages: u64,
    filter_blocks: u64,
    max_pack: u64,
}

impl Footer {
    /// The numbers and the summary's checksum.
    const LEN: u64 = 4 * 8 + 32;

    fn to_bytes(&self) -> Vec<u8> {
        [self.count, self.pages, self.filter_blocks, self.max_pack]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// The footer of a file of `len` bytes, if its numbers add up to that length.
    fn read(file: &File, len: u64) -> std::io::Result<Option<Footer>> {
        if len < HEADER + Self::LEN {
            return Ok(None);
        }
        let mut tail = [0u8; 32];
        file.read_exact_at(&mut tail, len - Self::LEN)?;
        let word = |k: usize| u64::from_le_bytes(tail[k * 8..k * 8 + 8].try_into().expect("8"));
        let footer = Footer {
            count: word(0),
            pages: word(1),
            filter_blocks: word(2),
            max_pack: word(3),
        };
        // What the numbers make the length (none when they overflow).
        let expect = footer
            .count
            .checked_mul(RECORD as u64)
            .and_then(|b| b.checked_add(footer.pages.checked_mul((CHECK + 8) as u64)?))
            .and_then(|b| b.checked_add(footer.filter_blocks.checked_mul(64)?))
            .and_then(|b| b.checked_add(HEADER + Self::LEN));
        let pages_ok = footer.pages == footer.count.div_ceil(FENCE as u64);
        Ok((expect == Some(len) && pages_ok && footer.filter_blocks > 0).then_some(footer))
    }
}

/// A run read in order, some pages at a time, each checked.
pub(super) struct RunReader<'a> {
    run: &'a Run,
    /// The next page to read.
    next_page: usize,
    page: Page,
    pos: usize,
}

impl<'a> RunReader<'a> {
    pub(super) fn new(run: &'a Run) -> Self {
        RunReader {
            run,
            next_page: 0,
            page: Page::new(),
            pos: 0,
        }
    }

    pub(super) fn next(&mut self) -> std::io::Result<Option<Entry>> {
        if self.pos == self.page.len {
            if self.next_page * FENCE >= self.run.count {
                return Ok(None);
            }
            self.run.read_page(self.next_page, &mut self.page)?;
            self.next_page += 1;
            self.pos = 0;
        }
        let e = decode_record(&self.page.records()[self.pos * RECORD..][..RECORD]);
        self.pos += 1;
        Ok(Some(e))
    }
}

/// A blocked Bloom filter over block ids (already uniform hashes): 8 bits a block, one
/// 512-bit block (a cache line) per id, 6 bits set in it.
#[derive(Debug)]
pub(super) struct Filter {
    blocks: Vec<[u64; 8]>,
}

impl Filter {
    fn new(count: usize) -> Self {
        Filter {
            blocks: vec![[0; 8]; (count * 8).div_ceil(512).max(1)],
        }
    }

    /// The filter block of `id` among `blocks`, and its 6 bits in it.
    fn bits(blocks: usize, id: &BlockId) -> (usize, [u32; 6]) {
        let w = |k: usize| u64::from_le_bytes(id.0[k..k + 8].try_into().expect("8 bytes"));
        let block = (w(8) % blocks as u64) as usize;
        let h = w(16);
        let mut bits = [0u32; 6];
        for (k, b) in bits.iter_mut().enumerate() {
            *b = ((h >> (9 * k)) & 511) as u32;
        }
        (block, bits)
    }

    fn insert(&mut self, id: &BlockId) {
        let (block, bits) = Self::bits(self.blocks.len(), id);
        for b in bits {
            self.blocks[block][(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    pub(super) fn may_contain(&self, id: &BlockId) -> bool {
        let (block, bits) = Self::bits(self.blocks.len(), id);
        Self::block_has(&self.blocks[block], &bits)
    }

    fn block_has(block: &[u64; 8], bits: &[u32; 6]) -> bool {
        bits.iter()
            .all(|b| block[(*b / 64) as usize] & (1 << (b % 64)) != 0)
    }

    fn block_from(bytes: &[u8]) -> [u64; 8] {
        let mut block = [0u64; 8];
        for (k, w) in bytes.chunks_exact(8).enumerate() {
            block[k] = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        }
        block
    }
}

#[cfg(test)]
impl Run {
    /// [`Run::find_in`] with a buffer of its own.
    pub(super) fn find(&self, id: &BlockId) -> std::io::Result<Option<(usize, Loc)>> {
        self.find_in(id, &mut Page::new())
    }

    /// Whether the filter lets `id` through (the tests' view of it).
    pub(super) fn filter_passes(&self, id: &BlockId) -> bool {
        self.may_contain(id).unwrap()
    }

    /// Whether its filter is held in memory.
    pub(super) fn holds_filter(&self) -> bool {
        self.filter.is_some()
    }
}
