//! What the raw store asks the kernel beyond `std`: a file's extent map (the FIEMAP
//! ioctl, `linux/fiemap.h`), the mount a file is on (statx), and when a btrfs snapshot
//! was taken (`BTRFS_IOC_GET_SUBVOL_INFO`). All work on descriptors open for reading.
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

/// The id of the mount `file` is on (statx `stx_mnt_id`), or `None` when the kernel
/// does not say. Files under one mount are on one file system, so their physical
/// addresses are comparable even where `st_dev` differs (each btrfs subvolume, and so
/// each snapshot, has a device number of its own).
pub fn mount_id(file: &File) -> Option<u64> {
    // SAFETY: `statx` is plain data, valid when zeroed.
    #[allow(unsafe_code)]
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH names the open descriptor itself; `stx`
    // is a valid, exclusively borrowed buffer that outlives the call.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    (r == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

/// `struct btrfs_ioctl_timespec`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct BtrfsTimespec {
    sec: u64,
    nsec: u32,
}

/// `struct btrfs_ioctl_get_subvol_info_args`.
#[repr(C)]
struct SubvolInfo {
    treeid: u64,
    name: [u8; 256],
    parent_id: u64,
    dirid: u64,
    generation: u64,
    flags: u64,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    received_uuid: [u8; 16],
    ctransid: u64,
    otransid: u64,
    stransid: u64,
    rtransid: u64,
    ctime: BtrfsTimespec,
    otime: BtrfsTimespec,
    stime: BtrfsTimespec,
    rtime: BtrfsTimespec,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<BtrfsTimespec>() == 16);
const _: () = assert!(std::mem::size_of::<SubvolInfo>() == 504);

/// `_IOR(BTRFS_IOCTL_MAGIC, 60, struct btrfs_ioctl_get_subvol_info_args)`.
const BTRFS_IOC_GET_SUBVOL_INFO: libc::c_ulong = 0x81F8_943C;
/// The inode number of every btrfs subvolume's root directory.
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

/// When the btrfs subvolume whose root directory is `dir` was made, or `None` when it
/// is no subvolume root (or not on btrfs, or the kernel is older than 4.18). A
/// snapshot's root directory has its source's times, birth time included; only the
/// subvolume's own record (what `btrfs subvolume show` calls its creation time) says
/// when the snapshot was taken. Needs no privilege.
pub fn subvolume_birth(dir: &File) -> Option<std::time::SystemTime> {
    use std::os::unix::fs::MetadataExt;
    if dir.metadata().ok()?.ino() != BTRFS_FIRST_FREE_OBJECTID {
        return None;
    }
    // SAFETY: `SubvolInfo` is plain data, valid when zeroed.
    #[allow(unsafe_code)]
    let mut info: Box<SubvolInfo> = Box::new(unsafe { std::mem::zeroed() });
    // SAFETY: `info` is a valid, exclusively borrowed `struct
    // btrfs_ioctl_get_subvol_info_args` (size checked above) that outlives the call. On
    // another file system the ioctl number means nothing and fails (ENOTTY).
    #[allow(unsafe_code)]
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_GET_SUBVOL_INFO as _, &mut *info) };
    if r < 0 || info.otime.sec == 0 {
        return None;
    }
    Some(
        std::time::UNIX_EPOCH
            + std::time::Duration::new(info.otime.sec, info.otime.nsec.min(999_999_999)),
    )
}
