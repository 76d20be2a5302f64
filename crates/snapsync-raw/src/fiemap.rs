//! Reading a file's extent map with the FIEMAP ioctl (`linux/fiemap.h`).
//!
//! FIEMAP needs only a file descriptor open for reading, so an unprivileged user can
//! diff images it can read. File systems without it (tmpfs, some network file
//! systems) answer `EOPNOTSUPP`; the caller then hashes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::extents::{FileMap, MappedExtent};

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// `struct fiemap` followed by room for [`BATCH`] extents.
#[repr(C)]
struct Fiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [FiemapExtent; BATCH],
}

const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);
const _: () = assert!(std::mem::size_of::<Fiemap>() == 32 + 56 * BATCH);

/// Extents asked for per call.
const BATCH: usize = 512;
/// `_IOWR('f', 11, struct fiemap)`: the header is 32 bytes.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `FIEMAP_FLAG_SYNC`: write dirty pages first, so no extent is delayed allocation.
const FIEMAP_FLAG_SYNC: u32 = 0x1;
/// `FIEMAP_EXTENT_LAST`.
const FIEMAP_EXTENT_LAST: u32 = 0x1;

/// The extent map of `file`, whose size is `size`.
pub fn extent_map(file: &File, size: u64) -> io::Result<FileMap> {
    let mut extents = Vec::new();
    let mut buf = Box::new(Fiemap {
        fm_start: 0,
        fm_length: 0,
        fm_flags: 0,
        fm_mapped_extents: 0,
        fm_extent_count: 0,
        fm_reserved: 0,
        fm_extents: [FiemapExtent::default(); BATCH],
    });
    let mut start = 0u64;
    while start < size {
        buf.fm_start = start;
        buf.fm_length = u64::MAX - start;
        buf.fm_flags = FIEMAP_FLAG_SYNC;
        buf.fm_mapped_extents = 0;
        buf.fm_extent_count = BATCH as u32;
        // SAFETY: `buf` is a valid, exclusively borrowed `struct fiemap` (layout checked
        // above) with room for the `fm_extent_count` extents the kernel may write, and
        // it outlives the call; the descriptor is open for as long as `file` lives.
        #[allow(unsafe_code)]
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut *buf) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (buf.fm_mapped_extents as usize).min(BATCH);
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &buf.fm_extents[..n] {
            extents.push(MappedExtent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                len: e.fe_length,
                flags: e.fe_flags,
            });
            last |= e.fe_flags & FIEMAP_EXTENT_LAST != 0;
        }
        let e = &buf.fm_extents[n - 1];
        let next = e.fe_logical.saturating_add(e.fe_length);
        if last || next <= start {
            break;
        }
        start = next;
    }
    Ok(FileMap { size, extents })
}
