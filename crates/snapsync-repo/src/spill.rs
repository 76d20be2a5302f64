//! The blocks a receive was sent, by index, in bounded memory, each with whether it is
//! new to the repository (its content was stored by this receive): a new block surely
//! differs from what any stored snapshot held at that index, which spares the commit a
//! lookup (see `receive.rs`).
//!
//! A full replication of a 16 M-block volume is sent 16 M entries; held in a tree they
//! would take ~1 GiB. So the newest entries are kept in a small tree, and each time it
//! fills up it is written out, sorted, as a run of fixed-size records to an anonymous
//! temporary file. Reading them back merges the runs and the tree in index order, the
//! newest entry for an index winning (a block sent twice is what was sent last).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use snapsync_core::{BlockId, BlockRef};
use snapsync_store::{Result, StoreError};

/// Entries held in memory before they are written out as a run (~60 bytes each).
const SPILL_AT: usize = if cfg!(test) { 5 } else { 256 << 10 };
/// One record: index, kind (0 zero, 1 data, 2 data new to the repository), id.
const RECORD: usize = 8 + 1 + 32;
/// Records read from a run at a time.
const READ_RECORDS: usize = 1024;

/// What was sent for one block: its content, and whether that is new to the repository.
pub(crate) type Sent = (BlockRef, bool);

/// Block index → what was sent for it.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    recent: BTreeMap<u64, Sent>,
    /// Written runs, oldest first, with their record counts.
    runs: Vec<(File, u64)>,
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::io("a temporary file of received block entries", e)
}

impl Changes {
    /// Note what block `index` is, and whether that content is `new` to the repository.
    pub(crate) fn insert(&mut self, index: u64, block: BlockRef, new: bool) -> Result<()> {
        self.recent.insert(index, (block, new));
        if self.recent.len() >= SPILL_AT {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<()> {
        let mut file = tempfile::tempfile().map_err(io_error)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut file);
        let mut record = [0u8; RECORD];
        for (i, (b, new)) in &self.recent {
            record[..8].copy_from_slice(&i.to_le_bytes());
            match b {
                BlockRef::Zero => record[8..].fill(0),
                BlockRef::Data(id) => {
                    record[8] = 1 + u8::from(*new);
                    record[9..].copy_from_slice(id.as_bytes());
                }
            }
            out.write_all(&record).map_err(io_error)?;
        }
        out.flush().map_err(io_error)?;
        drop(out);
        self.runs.push((file, self.recent.len() as u64));
        self.recent.clear();
        Ok(())
    }

    /// Every noted entry in index order, the newest for each index.
    pub(crate) fn iter(&self) -> ChangesIter<'_> {
        let mut sources: Vec<Source<'_>> = self
            .runs
            .iter()
            .map(|(file, count)| {
                Source::Run(RunReader {
                    file,
                    left: *count,
                    at: 0,
                    buf: Vec::new(),
                    pos: 0,
                })
            })
            .collect();
        sources.push(Source::Recent(self.recent.iter()));
        ChangesIter {
            heap: BinaryHeap::new(),
            heads: vec![None; sources.len()],
            sources,
            started: false,
        }
    }
}

struct RunReader<'a> {
    file: &'a File,
    left: u64,
    at: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl RunReader<'_> {
    fn next(&mut self) -> Result<Option<(u64, Sent)>> {
        if self.pos == self.buf.len() {
            if self.left == 0 {
                return Ok(None);
            }
            let n = self.left.min(READ_RECORDS as u64);
            self.buf.resize(n as usize * RECORD, 0);
            self.file
                .read_exact_at(&mut self.buf, self.at)
                .map_err(io_error)?;
            self.at += self.buf.len() as u64;
            self.left -= n;
            self.pos = 0;
        }
        let r = &self.buf[self.pos..self.pos + RECORD];
        self.pos += RECORD;
        let index = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
        let block = match r[8] {
            0 => BlockRef::Zero,
            _ => BlockRef::Data(BlockId(r[9..].try_into().expect("32 bytes"))),
        };
        Ok(Some((index, (block, r[8] == 2))))
    }
}

enum Source<'a> {
    Run(RunReader<'a>),
    Recent(std::collections::btree_map::Iter<'a, u64, Sent>),
}

impl Source<'_> {
    fn next(&mut self) -> Result<Option<(u64, Sent)>> {
        match self {
            Source::Run(r) => r.next(),
            Source::Recent(it) => Ok(it.next().map(|(i, b)| (*i, *b))),
        }
    }
}

/// See [`Changes::iter`].
pub(crate) struct ChangesIter<'a> {
    sources: Vec<Source<'a>>,
    /// Each source's next entry.
    heads: Vec<Option<(u64, Sent)>>,
    /// (lowest index first, newest source first).
    heap: BinaryHeap<(Reverse<u64>, usize)>,
    started: bool,
}

impl ChangesIter<'_> {
    fn pull(&mut self, k: usize) -> Result<()> {
        self.heads[k] = self.sources[k].next()?;
        if let Some((i, _)) = self.heads[k] {
            self.heap.push((Reverse(i), k));
        }
        Ok(())
    }

    /// The next entry, or `None` after the last.
    pub(crate) fn next_entry(&mut self) -> Result<Option<(u64, Sent)>> {
        if !self.started {
            self.started = true;
            for k in 0..self.sources.len() {
                self.pull(k)?;
            }
        }
        let Some((Reverse(index), newest)) = self.heap.pop() else {
            return Ok(None);
        };
        let block = self.heads[newest].expect("a head for each heap entry").1;
        self.pull(newest)?;
        // Older sources' entries for the same index are overridden.
        while let Some(&(Reverse(i), k)) = self.heap.peek() {
            if i != index {
                break;
            }
            self.heap.pop();
            self.pull(k)?;
        }
        Ok(Some((index, block)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against a map where the last write wins.
        #[test]
        fn merges_like_a_map(writes in proptest::collection::vec((0u64..40, any::<Option<u8>>(), any::<bool>()), 0..60)) {
            let mut changes = Changes::default();
            let mut model = BTreeMap::new();
            for (i, b, new) in writes {
                let b = b.map_or(BlockRef::Zero, |x| BlockRef::Data(BlockId([x; 32])));
                let new = new && b != BlockRef::Zero;
                changes.insert(i, b, new).unwrap();
                model.insert(i, (b, new));
            }
            for _ in 0..2 {
                let mut it = changes.iter();
                let mut got = Vec::new();
                while let Some(e) = it.next_entry().unwrap() {
                    got.push(e);
                }
                prop_assert_eq!(&got, &model.iter().map(|(i, b)| (*i, *b)).collect::<Vec<_>>());
            }
        }
    }
}
