//! Diffs from extent maps: which blocks of two images sharing extents can differ.
//!
//! On a copy-on-write file system (btrfs, XFS with reflink) a snapshot of an image and
//! the image shares the physical extents nobody wrote since; a write gets new extents.
//! So where two files map the same logical bytes to the same physical bytes, they hold
//! the same data, and only the rest needs reading. This module is the pure part of that:
//! two extent maps in, changed blocks and blocks needing a closer look out. It never
//! reads a file, so it can be tested against a byte model (see the tests).
//!
//! The comparison is conservative in one direction only: different physical extents
//! may hold equal data (a block rewritten with what it held, a defragmented file), which
//! only makes the diff larger. Anything it cannot vouch for (flags such as inline,
//! delalloc, encoded, unwritten) goes to `to_hash`, never to "unchanged".

use snapsync_core::{Extent, ExtentList};

/// FIEMAP extent flags that make an extent's physical address no proof of its content:
/// unknown or not yet allocated location, data stored encoded (compressed, encrypted) or
/// inline, not block aligned, or allocated but reading as zeros.
pub(crate) const DOUBTFUL_FLAGS: u32 = 0x2 // UNKNOWN
    | 0x4 // DELALLOC
    | 0x8 // ENCODED
    | 0x80 // DATA_ENCRYPTED
    | 0x100 // NOT_ALIGNED
    | 0x200 // DATA_INLINE
    | 0x400 // DATA_TAIL
    | 0x800; // UNWRITTEN

/// `FIEMAP_EXTENT_SHARED`: the extent is shared with another file (or snapshot).
pub(crate) const SHARED_FLAG: u32 = 0x2000;

/// One extent of a file's map, as FIEMAP reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedExtent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device.
    pub physical: u64,
    /// Length in bytes.
    pub len: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

/// A file's size and extent map; bytes in no extent are holes (read as zeros).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileMap {
    /// File size in bytes.
    pub size: u64,
    /// Extents, in any order.
    pub extents: Vec<MappedExtent>,
}

impl FileMap {
    /// Whether any extent is shared with another file: without sharing, two files
    /// never have a physical byte in common and comparing maps finds nothing.
    pub fn has_shared(&self) -> bool {
        self.extents.iter().any(|e| e.flags & SHARED_FLAG != 0)
    }
}

/// What one stretch of a file is, as far as its map tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    /// A hole: reads as zeros.
    Hole,
    /// Mapped: file offset `x` lives at device offset `x + shift`.
    Mapped { shift: i128 },
    /// Nothing can be said about its content.
    Doubtful,
}

/// The map of `[0, size)` as sorted, disjoint `(start, end, piece)` stretches covering
/// it entirely. Overlapping extents (a file system bug, or a map read while it changed)
/// make the overlap doubtful.
fn pieces(map: &FileMap) -> Vec<(u64, u64, Piece)> {
    let mut ext: Vec<MappedExtent> = map.extents.clone();
    ext.sort_by_key(|e| e.logical);
    let mut out: Vec<(u64, u64, Piece)> = Vec::new();
    let mut pos = 0;
    for e in ext {
        let start = e.logical.min(map.size);
        let end = e.logical.saturating_add(e.len).min(map.size);
        if start >= end {
            continue;
        }
        let piece = if e.flags & DOUBTFUL_FLAGS != 0 || e.physical == 0 {
            Piece::Doubtful
        } else {
            Piece::Mapped {
                shift: i128::from(e.physical) - i128::from(e.logical),
            }
        };
        if start < pos {
            // Overlaps what came before: doubt both.
            let from = out.partition_point(|p| p.1 <= start);
            for p in &mut out[from..] {
                p.2 = Piece::Doubtful;
            }
            out.push((pos, end.max(pos), Piece::Doubtful));
            pos = pos.max(end);
            continue;
        }
        if start > pos {
            out.push((pos, start, Piece::Hole));
        }
        out.push((start, end, piece));
        pos = end;
    }
    if pos < map.size {
        out.push((pos, map.size, Piece::Hole));
    }
    out.retain(|p| p.0 < p.1);
    out
}

/// The result of comparing two maps, in bytes of the target, in whole blocks (the last
/// one clipped to the target's size). The three lists are disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentDiff {
    /// Blocks that differ and hold data in the target.
    pub data: ExtentList,
    /// Blocks that differ and are holes in the target (read as zeros).
    pub zero: ExtentList,
    /// Blocks the maps cannot decide: compare their content.
    pub to_hash: ExtentList,
}

/// Compare `target` with `base` in blocks of `block` bytes. Past its size the base
/// reads as zeros (a grown volume); the diff covers the target's size only.
pub fn compare(base: &FileMap, target: &FileMap, block: u64) -> ExtentDiff {
    assert!(block > 0, "block size must be positive");
    let size = target.size;
    let b = pieces(base);
    let t = pieces(target);
    let (mut changed, mut doubt, mut hole) =
        (ExtentList::new(), ExtentList::new(), ExtentList::new());
    let (mut i, mut j, mut pos) = (0, 0, 0);
    while pos < size {
        while t[j].1 <= pos {
            j += 1;
        }
        while i < b.len() && b[i].1 <= pos {
            i += 1;
        }
        let (tp, tend) = (t[j].2, t[j].1);
        let (bp, bend) = b.get(i).map_or((Piece::Hole, u64::MAX), |p| (p.2, p.1));
        let end = tend.min(bend);
        let e = Extent::new(pos, end - pos);
        match (bp, tp) {
            (Piece::Doubtful, _) | (_, Piece::Doubtful) => doubt.push(e),
            (Piece::Hole, Piece::Hole) => {}
            (Piece::Mapped { shift: x }, Piece::Mapped { shift: y }) if x == y => {}
            _ => changed.push(e),
        }
        if tp == Piece::Hole {
            hole.push(e);
        }
        pos = end;
    }
    let changed = changed.align(block, size).clip(size);
    let doubt = doubt.align(block, size).clip(size).subtract(&changed);
    let zero = whole_blocks(&hole, block, size);
    let zero_changed = changed.subtract(&changed.subtract(&zero));
    ExtentDiff {
        data: changed.subtract(&zero_changed),
        zero: zero_changed,
        to_hash: doubt,
    }
}

/// The blocks (clipped to `size`) that lie entirely inside `set`.
fn whole_blocks(set: &ExtentList, block: u64, size: u64) -> ExtentList {
    let mut out = ExtentList::new();
    for e in set.as_slice() {
        let start = e.offset.div_ceil(block) * block;
        // A hole reaching the end of the file covers the clipped last block.
        let end = if e.end() >= size {
            size
        } else {
            e.end() / block * block
        };
        if start < end {
            out.push(Extent::new(start, end - start));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The model: a file is a sequence of units of `UNIT` bytes, each a hole or a
    /// device unit (with flags). Device unit `p` holds bytes all equal to `p + 1`, so
    /// different device units hold different data and no device unit reads as zeros.
    const UNIT: u64 = 4;
    const BLOCK: u64 = 16;

    #[derive(Clone, Debug)]
    struct ModelFile {
        size: u64,
        units: Vec<Option<(u64, u32)>>,
    }

    impl ModelFile {
        fn byte(&self, x: u64) -> (u8, bool) {
            if x >= self.size {
                return (0, false);
            }
            match self.units.get((x / UNIT) as usize).copied().flatten() {
                None => (0, false),
                Some((p, flags)) => ((p + 1) as u8, flags & DOUBTFUL_FLAGS != 0),
            }
        }

        /// Extents as FIEMAP would report them: runs of contiguous device units with
        /// equal flags merged, or, with `split`, one extent per unit.
        fn map(&self, split: bool) -> FileMap {
            let mut extents: Vec<MappedExtent> = Vec::new();
            for (k, u) in self.units.iter().enumerate() {
                let Some((p, flags)) = *u else { continue };
                let (logical, physical) = (k as u64 * UNIT, p * UNIT + 4096);
                match extents.last_mut() {
                    Some(l)
                        if !split
                            && l.logical + l.len == logical
                            && l.physical + l.len == physical
                            && l.flags == flags =>
                    {
                        l.len += UNIT
                    }
                    _ => extents.push(MappedExtent {
                        logical,
                        physical,
                        len: UNIT,
                        flags,
                    }),
                }
            }
            FileMap {
                size: self.size,
                extents,
            }
        }
    }

    fn unit() -> impl Strategy<Value = Option<(u64, u32)>> {
        prop_oneof![
            2 => Just(None),
            6 => (0u64..12).prop_map(|p| Some((p, SHARED_FLAG))),
            1 => (0u64..12, prop_oneof![Just(0x8u32), Just(0x800), Just(0x200)])
                .prop_map(|(p, f)| Some((p, f))),
        ]
    }

    fn file() -> impl Strategy<Value = ModelFile> {
        (prop::collection::vec(unit(), 0..24), 0u64..100).prop_map(|(units, extra)| {
            let size = (units.len() as u64 * UNIT).saturating_sub(extra % (UNIT * 3));
            ModelFile { size, units }
        })
    }

    /// Target `t`, mostly a copy of `b` with some units rewritten.
    fn pair() -> impl Strategy<Value = (ModelFile, ModelFile, bool, bool)> {
        (
            file(),
            prop::collection::vec((0usize..24, unit()), 0..6),
            0u64..40,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(b, writes, grow, s1, s2)| {
                let mut t = b.clone();
                for (k, u) in writes {
                    if k < t.units.len() {
                        t.units[k] = u;
                    }
                }
                t.size = (t.size + grow).min(t.units.len() as u64 * UNIT + 5);
                (b, t, s1, s2)
            })
    }

    proptest! {
        #[test]
        fn extent_diff_matches_the_byte_model((b, t, s1, s2) in pair()) {
            let d = compare(&b.map(s1), &t.map(s2), BLOCK);
            let blocks = t.size.div_ceil(BLOCK);
            prop_assert!(d.data.subtract(&d.zero).total_len() == d.data.total_len());
            prop_assert!(d.to_hash.subtract(&d.data.union(&d.zero)).total_len() == d.to_hash.total_len());
            for k in 0..blocks {
                let (start, end) = (k * BLOCK, ((k + 1) * BLOCK).min(t.size));
                let len = end - start;
                let (mut differs, mut doubtful, mut all_zero) = (false, false, true);
                for x in start..end {
                    let (tb, td) = t.byte(x);
                    let (bb, bd) = b.byte(x);
                    differs |= tb != bb;
                    doubtful |= td || bd;
                    all_zero &= tb == 0 && !td;
                }
                let in_data = d.data.covers(start, len);
                let in_zero = d.zero.covers(start, len);
                let in_hash = d.to_hash.covers(start, len);
                // Never wrong: a block whose bytes differ (or cannot be vouched for)
                // is reported.
                if differs || doubtful {
                    prop_assert!(in_data || in_zero || in_hash, "block {} missed: {:?}", k, d);
                }
                // Zero blocks read as zeros in the target.
                if in_zero {
                    prop_assert!(all_zero, "block {} reported zero", k);
                }
                // And exact where the maps are clean: device units hold distinct data,
                // so a clean block is reported exactly when it differs.
                if !doubtful {
                    prop_assert_eq!(differs, in_data || in_zero, "block {}", k);
                    prop_assert!(!in_hash);
                }
                // Nothing is reported partly.
                for l in [&d.data, &d.zero, &d.to_hash] {
                    prop_assert!(l.covers(start, len) || l.clip(end).subtract(&ExtentList::from_extents([Extent::new(0, start)])).is_empty());
                }
            }
            prop_assert!(d.data.union(&d.zero).union(&d.to_hash).clip(t.size) == d.data.union(&d.zero).union(&d.to_hash));
        }
    }

    #[test]
    fn identical_maps_differ_nowhere_and_a_rewrite_shows() {
        let ext = |logical, physical, len| MappedExtent {
            logical,
            physical,
            len,
            flags: SHARED_FLAG,
        };
        let base = FileMap {
            size: 1 << 20,
            extents: vec![ext(0, 1 << 30, 1 << 20)],
        };
        assert_eq!(compare(&base, &base, 65536), ExtentDiff::default());
        let mut target = base.clone();
        target.extents = vec![
            ext(0, 1 << 30, 65536),
            ext(65536, 5 << 30, 4096),
            ext(69632, (1 << 30) + 69632, (1 << 20) - 69632),
        ];
        let d = compare(&base, &target, 65536);
        assert_eq!(
            d.data,
            ExtentList::from_extents([Extent::new(65536, 65536)])
        );
        assert!(d.zero.is_empty() && d.to_hash.is_empty());
        // An unwritten extent is doubt, even at the same place.
        target.extents[1].flags |= 0x800;
        target.extents[1].physical = (1 << 30) + 65536;
        let d = compare(&base, &target, 65536);
        assert_eq!(
            d.to_hash,
            ExtentList::from_extents([Extent::new(65536, 65536)])
        );
        assert!(d.data.is_empty());
    }
}
