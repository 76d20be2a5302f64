//! Diffs of two images that share extents, from their extent maps (see [`crate::extents`]).
//!
//! Only what the maps cannot vouch for is read, and then both images' blocks are
//! compared byte for byte. Whenever the maps cannot be trusted as a whole (no FIEMAP,
//! different file systems, nothing shared, a file or map that changed meanwhile), the
//! answer is `None` and the caller hashes as it always did: this path may only ever
//! make an incremental cheaper, never different.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use snapsync_core::{Extent, ExtentList};
use snapsync_store::{Diff, DiffMethod, Result, StoreError};
use tracing::debug;

use crate::cache::FileKey;
use crate::extents::{compare, FileMap};
use crate::sys::{extent_map, mount_id};

/// The unit extent maps are compared in and content is compared in: a page, the block
/// of btrfs and XFS (whose extents are aligned to it). Finer than the store's hash
/// block, so a 4 KiB write is a 4 KiB diff, and a repository of small blocks is asked
/// about the blocks written, not about every block of the 64 KiB around each write.
const COMPARE_UNIT: u64 = 4 << 10;

/// Bytes read at once from each image when comparing content.
const COMPARE_READ: u64 = 256 << 10;

/// One image opened for an extent diff: its key when opened, and its map.
struct Mapped {
    file: File,
    key: FileKey,
    map: FileMap,
}

impl Mapped {
    /// Open `path` and read its map; `None` (with the reason logged) when FIEMAP is not
    /// there to read.
    fn open(path: &Path) -> Result<Option<Self>> {
        let file =
            File::open(path).map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
        let key = FileKey::of_file(&file, path)?;
        match extent_map(&file, key.size) {
            Ok(map) => Ok(Some(Self { file, key, map })),
            Err(e) => {
                debug!(path = %path.display(), error = %e, "no extent map; hashing");
                Ok(None)
            }
        }
    }

    /// Whether the file is still the one mapped: same key (the path still names the
    /// file open, unchanged), same map.
    fn unchanged(&self, path: &Path) -> Result<bool> {
        Ok(FileKey::of(path)? == self.key
            && extent_map(&self.file, self.key.size).ok().as_ref() == Some(&self.map))
    }
}

/// The diff of `target` against `base` from their extent maps, or `None` when the maps
/// cannot decide it (the caller then hashes).
pub(crate) fn diff(base: &Path, target: &Path) -> Result<Option<Diff>> {
    let (Some(b), Some(t)) = (Mapped::open(base)?, Mapped::open(target)?) else {
        return Ok(None);
    };
    // One device is one file system; so is one mount (btrfs gives every subvolume,
    // so every snapshot, a device number of its own). Anything else may be two file
    // systems whose physical addresses mean nothing to each other.
    let same_fs = b.key.device() == t.key.device()
        || matches!((mount_id(&b.file), mount_id(&t.file)), (Some(x), Some(y)) if x == y);
    if !same_fs {
        debug!("images on different file systems; hashing");
        return Ok(None);
    }
    if !b.map.has_shared() || !t.map.has_shared() {
        // Nothing shared: every physical extent differs, the maps say "all changed".
        debug!("images share no extents; hashing");
        return Ok(None);
    }
    let d = compare(&b.map, &t.map, COMPARE_UNIT);
    if d.to_hash.total_len() > t.key.size / 2 {
        // Mostly undecidable (a compressed btrfs, say): comparing would read both images
        // nearly whole, where hashing reads the target and has the base's hashes cached.
        debug!(
            undecided = d.to_hash.total_len(),
            "extent maps decide too little; hashing"
        );
        return Ok(None);
    }
    let (data, zero) = compare_blocks(&b, &t, &d.to_hash, target)?;
    // Both files, and their maps, must be as they were throughout; read twice, a map
    // that moved under us proves nothing.
    if !b.unchanged(base)? || !t.unchanged(target)? {
        debug!("an image or its extent map changed while diffing; hashing");
        return Ok(None);
    }
    Ok(Some(Diff {
        data: d.data.union(&data),
        zero: d.zero.union(&zero),
        method: DiffMethod::Extents,
    }))
}

/// Compare the units of `ranges` in both images, read [`COMPARE_READ`] bytes at a
/// time: the units that differ, as data and as zero (all zero in the target) ranges.
fn compare_blocks(
    b: &Mapped,
    t: &Mapped,
    ranges: &ExtentList,
    target: &Path,
) -> Result<(ExtentList, ExtentList)> {
    let (mut data, mut zero) = (ExtentList::new(), ExtentList::new());
    let mut tb = vec![0u8; COMPARE_READ as usize];
    let mut bb = vec![0u8; COMPARE_READ as usize];
    for range in ranges.as_slice() {
        let end = range.end().min(t.key.size);
        let mut off = range.offset;
        while off < end {
            let len = COMPARE_READ.min(end - off) as usize;
            read_padded(&t.file, t.key.size, off, &mut tb[..len])
                .map_err(|e| StoreError::io(format!("read {} at {off}", target.display()), e))?;
            read_padded(&b.file, b.key.size, off, &mut bb[..len])
                .map_err(|e| StoreError::io(format!("read base at {off}"), e))?;
            for (k, (tu, bu)) in tb[..len]
                .chunks(COMPARE_UNIT as usize)
                .zip(bb[..len].chunks(COMPARE_UNIT as usize))
                .enumerate()
            {
                if tu != bu {
                    let e = Extent::new(off + (k as u64) * COMPARE_UNIT, tu.len() as u64);
                    if tu.iter().all(|&x| x == 0) {
                        zero.push(e);
                    } else {
                        data.push(e);
                    }
                }
            }
            off += len as u64;
        }
    }
    Ok((data, zero))
}

/// Read `buf` from `off`; bytes past `size` read as zeros.
fn read_padded(file: &File, size: u64, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let avail = size.saturating_sub(off).min(buf.len() as u64) as usize;
    file.read_exact_at(&mut buf[..avail], off)?;
    buf[avail..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_or_map_that_changed_is_not_trusted() {
        // Needs FIEMAP where temporary files live (ext4, XFS, btrfs; not tmpfs).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let m = Mapped::open(&path)
            .unwrap()
            .expect("FIEMAP works on the temporary directory's file system");
        assert!(!m.map.extents.is_empty());
        assert!(m.unchanged(&path).unwrap());
        // Rewritten in place, same size: the key (ctime, mtime) tells.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"x", 4096)
            .unwrap();
        assert!(!m.unchanged(&path).unwrap());
        // A file with no shared extents (written, not copied: a copy may be a reflink)
        // is left to hashing.
        let copy = dir.path().join("b.img");
        std::fs::write(&copy, std::fs::read(&path).unwrap()).unwrap();
        assert!(diff(&path, &copy).unwrap().is_none());
    }
}
