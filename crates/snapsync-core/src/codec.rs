//! Block compression: the one policy shared by repository packs and the wire.
//!
//! A block is stored and sent either as plaintext or as one zstd frame, compressed only
//! when that saves at least 1/16 of it. Random or already-compressed data (encrypted
//! disks, media) is common in disk images, so a 4 KiB sample from the middle is tried
//! first at the fastest level: a failed attempt costs a fraction of compressing the
//! whole block. Because packs and the wire use the same function, a server can store
//! the frame a client sent without compressing it again.
//!
//! zstd contexts are kept per thread: creating one per block showed up in profiles as
//! allocation and page-fault time.

use std::cell::RefCell;

/// zstd level: fast, and most of the ratio of higher levels on disk images.
pub const ZSTD_LEVEL: i32 = 3;
/// Bytes tried first to detect incompressible data cheaply.
const PROBE_LEN: usize = 4096;

type CompressorSlot = RefCell<Option<zstd::bulk::Compressor<'static>>>;

thread_local! {
    static PROBE: CompressorSlot = const { RefCell::new(None) };
    static FULL: CompressorSlot = const { RefCell::new(None) };
    /// A decompression context is larger than the glibc mmap threshold: made per block,
    /// it cost a map, page faults and an unmap each time (a fifth of a server's CPU when
    /// receiving compressible data).
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn with_compressor(
    slot: &'static std::thread::LocalKey<CompressorSlot>,
    level: i32,
    data: &[u8],
) -> Option<Vec<u8>> {
    slot.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = zstd::bulk::Compressor::new(level).ok();
        }
        cell.as_mut().and_then(|c| c.compress(data).ok())
    })
}

/// `data` as one zstd frame, or `None` when compression would not save 1/16 of it.
pub fn compress(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() > 2 * PROBE_LEN {
        let mid = data.len() / 2;
        match with_compressor(&PROBE, 1, &data[mid..mid + PROBE_LEN]) {
            Some(c) if c.len() < PROBE_LEN - PROBE_LEN / 32 => {}
            _ => return None,
        }
    }
    with_compressor(&FULL, ZSTD_LEVEL, data).filter(|c| c.len() < data.len() - data.len() / 16)
}

fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> Result<T, String> {
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        f(cell.as_mut().expect("just set")).map_err(|e| e.to_string())
    })
}

/// Decompress one frame that must hold exactly `len` bytes.
pub fn decompress(frame: &[u8], len: usize) -> Result<Vec<u8>, String> {
    // Bounded: at most `len` bytes of output whatever the frame claims.
    let d = with_decompressor(|d| d.decompress(frame, len))?;
    if d.len() != len {
        return Err(format!("{} bytes instead of {len}", d.len()));
    }
    Ok(d)
}

/// Decompress one frame that must fill exactly `dst`.
pub fn decompress_into(frame: &[u8], dst: &mut [u8]) -> Result<(), String> {
    let n = with_decompressor(|d| d.decompress_to_buffer(frame, dst))?;
    if n != dst.len() {
        return Err(format!("{n} bytes instead of {}", dst.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_round_trips_and_random_is_left_alone() {
        let text: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 / 8).collect();
        let c = compress(&text).expect("compressible");
        assert!(c.len() < text.len() / 2);
        assert_eq!(decompress(&c, text.len()).unwrap(), text);
        assert!(decompress(&c, text.len() + 1).is_err());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(compress(&random), None);
    }
}
