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

/// Bytes of small blocks that failed to compress in a row on this thread, and how many
/// bytes of small blocks it stores next without trying.
///
/// A block too small for a probe (8 KiB or less: `--block-size 4096` repositories) is
/// compressed whole to find out, and random data made that a quarter of the CPU of such
/// an incremental. A probe of part of a small block does not help: zstd's cost per call
/// is most of it, and on compressible data the probe made compression 1.3x slower. So a
/// thread that has just failed on [`MIN_STREAK`] bytes of small blocks in a row stores
/// as many bytes again without trying (at most [`MAX_SKIP`]), then tries one block: on
/// random data ~1 block in 64 is tried; where incompressible data gives way to
/// compressible, at most [`MAX_SKIP`] bytes per thread are stored plain. Blocks with a
/// probe are always tried (a failed probe costs 1/16 of a block already).
#[derive(Default, Clone, Copy)]
struct Streak {
    failed: usize,
    skip: usize,
}

/// Bytes of small blocks that must fail in a row before any is skipped.
const MIN_STREAK: usize = 64 << 10;
/// Most bytes skipped before the next try.
const MAX_SKIP: usize = 256 << 10;

impl Streak {
    /// Whether to store a block of `len` bytes without trying.
    fn skips(&mut self, len: usize) -> bool {
        if self.skip >= len {
            self.skip -= len;
            true
        } else {
            self.skip = 0;
            false
        }
    }

    /// Note whether a block of `len` bytes compressed.
    fn record(&mut self, len: usize, compressed: bool) {
        if compressed {
            *self = Self::default();
        } else {
            self.failed = self.failed.saturating_add(len);
            if self.failed >= MIN_STREAK {
                self.skip = self.failed.min(MAX_SKIP);
            }
        }
    }
}

thread_local! {
    static STREAK: std::cell::Cell<Streak> = const { std::cell::Cell::new(Streak { failed: 0, skip: 0 }) };
}

/// `data` as one zstd frame, or `None` when compression would not save 1/16 of it (or,
/// for a small block, when this thread's last blocks did not: see [`Streak`]).
pub fn compress(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() > 2 * PROBE_LEN {
        return compress_probed(data);
    }
    let mut streak = STREAK.get();
    let out = if streak.skips(data.len()) {
        None
    } else {
        let out = compress_whole(data);
        streak.record(data.len(), out.is_some());
        out
    };
    STREAK.set(streak);
    out
}

/// A large block: its middle [`PROBE_LEN`] bytes tried first, at the fastest level.
fn compress_probed(data: &[u8]) -> Option<Vec<u8>> {
    let mid = data.len() / 2;
    match with_compressor(&PROBE, 1, &data[mid..mid + PROBE_LEN]) {
        Some(c) if c.len() < PROBE_LEN - PROBE_LEN / 32 => compress_whole(data),
        _ => None,
    }
}

fn compress_whole(data: &[u8]) -> Option<Vec<u8>> {
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

    fn xorshift(len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn after_random_small_blocks_compressible_ones_compress_again_within_the_skip() {
        // A thread of its own: the streak is per thread.
        std::thread::spawn(|| {
            // Enough for the skip to reach its bound (each try adds a block to it).
            let random = xorshift(16 << 20);
            let text: Vec<u8> = (0..4096u32)
                .map(|i| b"snapshot volume "[i as usize % 16])
                .collect();
            for b in random.chunks(4096) {
                assert_eq!(compress(b), None);
            }
            let plain = (0..).take_while(|_| compress(&text).is_none()).count();
            assert!(plain > 0, "the streak skipped nothing");
            assert!(
                plain <= MAX_SKIP / 4096,
                "{plain} compressible blocks stored plain"
            );
            let c = compress(&text).expect("compressible again");
            assert_eq!(decompress(&c, text.len()).unwrap(), text);
        })
        .join()
        .unwrap();
    }

    proptest::proptest! {
        /// Against the rule: nothing is skipped unless the blocks just before failed on
        /// at least MIN_STREAK bytes in a row, and never more than MAX_SKIP bytes in a
        /// row are skipped.
        #[test]
        fn the_streak_skips_only_after_failures_and_boundedly(
            blocks in proptest::collection::vec((1usize..=8192, proptest::bool::weighted(0.995)), 0..4000)
        ) {
            let mut streak = Streak::default();
            let (mut failed_in_a_row, mut skipped_in_a_row) = (0usize, 0usize);
            for (len, incompressible) in blocks {
                if streak.skips(len) {
                    proptest::prop_assert!(failed_in_a_row >= MIN_STREAK);
                    skipped_in_a_row += len;
                    proptest::prop_assert!(skipped_in_a_row <= MAX_SKIP);
                } else {
                    skipped_in_a_row = 0;
                    streak.record(len, !incompressible);
                    failed_in_a_row = if incompressible { failed_in_a_row + len } else { 0 };
                }
            }
        }
    }
}
