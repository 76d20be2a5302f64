//! [`Qcow2Writer`]: stream guest data into a fresh qcow2 v3 image.
//!
//! Used by `restore --format qcow2`. Data arrives in increasing guest
//! offset order, so the file is laid out append-only: header and L1 table
//! are reserved up front, every non-zero data cluster is appended as it
//! arrives, each L2 table is appended once the writer moves past the range
//! it maps, and the refcount table and blocks are appended by
//! [`Qcow2Writer::finish`], which then fills in the header and L1 table.
//! Because every cluster of the file is used exactly once, every refcount
//! is 1 and every L1/L2 entry carries the COPIED flag, which is exactly
//! what `qemu-img check` expects.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::Qcow2Error;
use crate::format::MAGIC;

/// Cluster size used when the caller has no preference (same as QEMU).
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 * 1024;
/// "Refcount is exactly one": set on every entry we write.
const COPIED: u64 = 1 << 63;
/// Same cap as the reader: 32 MiB of L1 table.
const MAX_L1_ENTRIES: u64 = 32 * 1024 * 1024 / 8;
const HEADER_LEN: usize = 112;

/// Streaming writer for a new qcow2 version 3 image without backing file.
#[derive(Debug)]
pub struct Qcow2Writer {
    path: PathBuf,
    out: BufWriter<File>,
    virtual_size: u64,
    cluster_bits: u32,
    cluster_size: u64,
    l2_entries: u64,
    l1: Vec<u64>,
    l1_offset: u64,
    /// Next free (cluster-aligned) host offset; the file is append-only.
    next_host: u64,
    cur_l2: Option<(u64, Vec<u64>)>,
    /// Lowest guest offset the next `write_at` may start at.
    next_guest: u64,
}

impl Qcow2Writer {
    /// Create (truncate) `path` as an empty image of `virtual_size` bytes,
    /// rounded up to a multiple of 512 (QEMU cannot represent partial
    /// sectors and would silently drop the tail). `cluster_size` must be a
    /// power of two between 512 B and 2 MiB (see [`DEFAULT_CLUSTER_SIZE`]).
    pub fn new(path: &Path, virtual_size: u64, cluster_size: u64) -> Result<Self, Qcow2Error> {
        let virtual_size = virtual_size
            .checked_next_multiple_of(512)
            .ok_or_else(|| Qcow2Error::too_large(format!("virtual size {virtual_size}")))?;
        if !cluster_size.is_power_of_two() || !(512..=2 * 1024 * 1024).contains(&cluster_size) {
            return Err(Qcow2Error::invalid(format!(
                "cluster size {cluster_size} is not a power of two between 512 and 2097152"
            )));
        }
        let cluster_bits = cluster_size.trailing_zeros();
        let l2_entries = cluster_size / 8;
        let l1_entries = virtual_size.div_ceil(l2_entries * cluster_size);
        if l1_entries > MAX_L1_ENTRIES {
            return Err(Qcow2Error::too_large(format!(
                "virtual size {virtual_size} needs {l1_entries} L1 entries with {cluster_size}-byte clusters"
            )));
        }
        let l1_clusters = (l1_entries * 8).div_ceil(cluster_size);
        let file = File::create(path)
            .map_err(|e| Qcow2Error::io(format!("creating {}", path.display()), e))?;
        let mut w = Qcow2Writer {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            virtual_size,
            cluster_bits,
            cluster_size,
            l2_entries,
            l1: vec![0; l1_entries as usize],
            l1_offset: if l1_entries > 0 { cluster_size } else { 0 },
            next_host: 0,
            cur_l2: None,
            next_guest: 0,
        };
        // Reserve the header cluster and the L1 table; filled in by finish().
        let zeros = vec![0u8; cluster_size as usize];
        for _ in 0..1 + l1_clusters {
            w.append(&zeros)?;
        }
        Ok(w)
    }

    fn append(&mut self, data: &[u8]) -> Result<u64, Qcow2Error> {
        let at = self.next_host;
        self.out
            .write_all(data)
            .map_err(|e| Qcow2Error::io(format!("writing {}", self.path.display()), e))?;
        self.next_host += data.len() as u64;
        Ok(at)
    }

    fn flush_l2(&mut self) -> Result<(), Qcow2Error> {
        if let Some((idx, table)) = self.cur_l2.take() {
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            let at = self.append(&bytes)?;
            self.l1[idx as usize] = at | COPIED;
        }
        Ok(())
    }

    /// Write guest data at `offset`, which must be cluster-aligned and not
    /// below the end of the previous write (rounded up to a cluster).
    /// All-zero clusters are left unallocated. A final partial cluster is
    /// zero-padded.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        if !offset.is_multiple_of(self.cluster_size) {
            return Err(Qcow2Error::invalid(format!(
                "write offset {offset} is not aligned to the cluster size {}",
                self.cluster_size
            )));
        }
        if offset < self.next_guest {
            return Err(Qcow2Error::invalid(format!(
                "write offset {offset} is below the previous write end {}",
                self.next_guest
            )));
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.virtual_size)
            .ok_or_else(|| {
                Qcow2Error::invalid(format!(
                    "write of {} bytes at {offset} exceeds the virtual size {}",
                    data.len(),
                    self.virtual_size
                ))
            })?;
        let cs = self.cluster_size as usize;
        let mut padded = Vec::new();
        for (i, chunk) in data.chunks(cs).enumerate() {
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            let guest_cluster = (offset >> self.cluster_bits) + i as u64;
            let l1_idx = guest_cluster / self.l2_entries;
            if self.cur_l2.as_ref().map(|(idx, _)| *idx) != Some(l1_idx) {
                self.flush_l2()?;
                self.cur_l2 = Some((l1_idx, vec![0; self.l2_entries as usize]));
            }
            let host = if chunk.len() == cs {
                self.append(chunk)?
            } else {
                padded.clear();
                padded.extend_from_slice(chunk);
                padded.resize(cs, 0);
                let p = std::mem::take(&mut padded);
                let at = self.append(&p)?;
                padded = p;
                at
            };
            if let Some((_, table)) = self.cur_l2.as_mut() {
                table[(guest_cluster % self.l2_entries) as usize] = host | COPIED;
            }
        }
        self.next_guest = end.div_ceil(self.cluster_size) * self.cluster_size;
        Ok(())
    }

    /// Write the last L2 table, the refcounts, the L1 table and the header,
    /// then sync the file to disk (unless it is a stream such as `/dev/null`).
    pub fn finish(mut self) -> Result<(), Qcow2Error> {
        self.flush_l2()?;
        let cs = self.cluster_size;
        let used = self.next_host / cs;
        // 16-bit refcounts: a refcount block covers cs/2 clusters. The
        // refcount structures must count themselves, hence the fixpoint.
        let per_block = cs / 2;
        let (mut rb, mut rt) = (0u64, 0u64);
        loop {
            let total = used + rb + rt;
            let nrb = total.div_ceil(per_block);
            let nrt = (nrb * 8).div_ceil(cs).max(1);
            if nrb == rb && nrt == rt {
                break;
            }
            rb = nrb;
            rt = nrt;
        }
        let total = used + rb + rt;
        let rt_offset = self.next_host;
        let first_block = rt_offset + rt * cs;
        let mut table = vec![0u8; (rt * cs) as usize];
        for b in 0..rb {
            let at = (b * 8) as usize;
            table[at..at + 8].copy_from_slice(&(first_block + b * cs).to_be_bytes());
        }
        self.append(&table)?;
        let mut block = vec![0u8; cs as usize];
        for b in 0..rb {
            block.fill(0);
            let first = b * per_block;
            let n = total.saturating_sub(first).min(per_block);
            for i in 0..n as usize {
                block[i * 2..i * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            self.append(&block)?;
        }
        let ctx = |what: &str| format!("{what} {}", self.path.display());
        let file = self
            .out
            .into_inner()
            .map_err(|e| Qcow2Error::io(ctx("flushing"), e.into_error()))?;

        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        // 8..20: no backing file.
        h[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&self.virtual_size.to_be_bytes());
        // 32..36: crypt_method 0.
        h[36..40].copy_from_slice(&(self.l1.len() as u32).to_be_bytes());
        h[40..48].copy_from_slice(&self.l1_offset.to_be_bytes());
        h[48..56].copy_from_slice(&rt_offset.to_be_bytes());
        h[56..60].copy_from_slice(&(rt as u32).to_be_bytes());
        // 60..72: no snapshots; 72..96: no feature bits.
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&(HEADER_LEN as u32).to_be_bytes());
        // 104: compression type zlib; 105..112 padding; the zeroed rest of
        // cluster 0 is the end-of-extensions marker.
        file.write_all_at(&h, 0)
            .map_err(|e| Qcow2Error::io(ctx("writing header of"), e))?;
        let l1: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        if !l1.is_empty() {
            file.write_all_at(&l1, self.l1_offset)
                .map_err(|e| Qcow2Error::io(ctx("writing L1 table of"), e))?;
        }
        // A character device or pipe (`/dev/null`) has nothing to sync and refuses to.
        let is_stream = file.metadata().is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_char_device() || m.file_type().is_fifo()
        });
        if !is_stream {
            file.sync_all()
                .map_err(|e| Qcow2Error::io(ctx("syncing"), e))?;
        }
        Ok(())
    }
}
