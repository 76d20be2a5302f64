//! Block planning: which blocks of a diff the destination must be sent.
//!
//! A source reports a diff at its own granularity (a qcow2 cluster, a hashed block of a
//! raw image); the destination stores blocks of its own size. [`plan_blocks`] maps the
//! one onto the other, so that the engine only reads, hashes and sends, and the
//! arithmetic (partial blocks, shrunk and grown volumes) is tested here against a model.

use crate::extent::{Extent, ExtentList};

/// The blocks the destination must be told about, from the source's diff. Every other
/// block of the target is the base's block unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlockPlan {
    /// Extents (block-aligned) whose blocks must be read from the source.
    pub read: ExtentList,
    /// Blocks known to be all zero without reading, in increasing order; none of them
    /// is in `read`.
    pub zero_blocks: Vec<u64>,
}

/// Map a diff (`data` to read, `zero` known to read as zeros) of a target of `size`
/// bytes onto whole destination blocks of `block_size`; `base_size` is the size of the
/// base the diff is against, `None` for a full replication.
///
/// A block is zero without reading only when every byte of it the volume has is covered
/// by zero extents; a block only partly zero is read. When the volume shrank to a size
/// inside a block, that last block is re-read: the base's copy holds data past the new
/// end, where the target's padding is zero. (When it grew, the base's padding already is
/// the zero-extension the diff assumes.)
pub fn plan_blocks(
    data: &ExtentList,
    zero: &ExtentList,
    block_size: u64,
    size: u64,
    base_size: Option<u64>,
) -> BlockPlan {
    let mut read = data.align(block_size, size);
    if let Some(bsz) = base_size {
        if bsz > size && !size.is_multiple_of(block_size) {
            let last = size / block_size * block_size;
            read = read.union(&ExtentList::from_extents([Extent::new(last, block_size)]));
        }
    }
    let zero_aligned = zero.align(block_size, size);
    let zero_blocks: Vec<u64> = zero_aligned
        .blocks(block_size)
        .filter(|b| {
            let off = b * block_size;
            zero.covers(off, block_size.min(size - off)) && !read.covers(off, 1)
        })
        .collect();
    let zero_set = ExtentList::from_extents(
        zero_blocks
            .iter()
            .map(|b| Extent::new(b * block_size, block_size)),
    );
    BlockPlan {
        read: read.union(&zero_aligned.subtract(&zero_set)),
        zero_blocks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn el(v: &[(u64, u64)]) -> ExtentList {
        v.iter().map(|&(o, l)| Extent::new(o, l)).collect()
    }

    #[test]
    fn aligns_and_keeps_partial_zero_blocks_read() {
        let p = plan_blocks(
            &el(&[(10, 5)]),
            &el(&[(100, 100), (250, 10)]),
            50,
            300,
            Some(300),
        );
        assert_eq!(p.zero_blocks, vec![2, 3]);
        assert_eq!(p.read, el(&[(0, 50), (250, 50)]));
    }

    #[test]
    fn rereads_tail_when_size_changes() {
        let p = plan_blocks(&el(&[]), &el(&[]), 64, 100, Some(150));
        assert_eq!(p.read, el(&[(64, 64)]));
        let p = plan_blocks(&el(&[]), &el(&[]), 64, 300, Some(100));
        assert!(
            p.read.is_empty(),
            "growth re-reads nothing the diff did not report"
        );
        let p = plan_blocks(&el(&[]), &el(&[]), 64, 128, Some(128));
        assert!(p.read.is_empty());
    }

    /// The model: a volume is its bytes; a destination holds it as whole blocks whose
    /// padding past the end is zero, and a block it does not hold reads as zeros.
    fn dest_blocks(bytes: &[u8], bs: usize) -> Vec<Vec<u8>> {
        bytes
            .chunks(bs)
            .map(|c| {
                let mut b = c.to_vec();
                b.resize(bs, 0);
                b
            })
            .collect()
    }

    /// What a destination holding `base` ends up with after receiving `plan` for
    /// `target`: zero blocks, the target's blocks where read, the base's elsewhere.
    fn apply(plan: &BlockPlan, base: &[Vec<u8>], target: &[Vec<u8>], bs: usize) -> Vec<Vec<u8>> {
        (0..target.len())
            .map(|b| {
                let off = (b * bs) as u64;
                if plan.zero_blocks.contains(&(b as u64)) {
                    vec![0; bs]
                } else if plan.read.covers(off, bs as u64) {
                    target[b].clone()
                } else {
                    base.get(b).cloned().unwrap_or_else(|| vec![0; bs])
                }
            })
            .collect()
    }

    /// A diff as a source may report it: every granule of `granule` bytes (the source's
    /// own block size, unrelated to the destination's) holding a changed byte is
    /// reported, as zero when the target's granule is all zero and the source says so,
    /// else as data; unchanged granules may be reported too (sources over-report).
    fn source_diff(
        base: &[u8],
        target: &[u8],
        granule: usize,
        say_zero: &[bool],
        over_report: &[bool],
    ) -> (ExtentList, ExtentList) {
        let (mut data, mut zero) = (ExtentList::new(), ExtentList::new());
        for (g, start) in (0..target.len()).step_by(granule).enumerate() {
            let end = (start + granule).min(target.len());
            let changed = (start..end).any(|i| target[i] != base.get(i).copied().unwrap_or(0));
            if !changed && !over_report[g % over_report.len()] {
                continue;
            }
            let e = Extent::new(start as u64, (end - start) as u64);
            if say_zero[g % say_zero.len()] && target[start..end].iter().all(|&b| b == 0) {
                zero.push(e);
            } else {
                data.push(e);
            }
        }
        (data, zero)
    }

    /// Bytes mostly zero or one value, so that zero runs, unchanged runs and changes
    /// all occur.
    fn volume(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![3 => Just(0u8), 2 => Just(7u8), 1 => 1u8..4],
            0..max,
        )
    }

    /// The target: the base with random writes, zeroed ranges and a new size.
    fn edited(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
        let edits = proptest::collection::vec((0usize..160, 0usize..40, 0u8..3), 0..6);
        (Just(base), 0usize..160, edits).prop_map(|(base, size, edits)| {
            let mut t = base;
            t.resize(size, 0);
            for (off, len, v) in edits {
                let end = (off + len).min(t.len());
                for b in t.iter_mut().take(end).skip(off) {
                    *b = v;
                }
            }
            t
        })
    }

    proptest! {
        #[test]
        fn plan_applied_to_base_gives_target(
            (base, target) in volume(160).prop_flat_map(|b| (Just(b.clone()), edited(b))),
            full in any::<bool>(),
            bs in 1usize..40,
            granule in 1usize..40,
            say_zero in proptest::collection::vec(any::<bool>(), 1..8),
            over_report in proptest::collection::vec(prop::bool::weighted(0.2), 1..8),
        ) {
            // A full replication is a diff against nothing: an empty base.
            let base = if full { Vec::new() } else { base };
            let (data, zero) = source_diff(&base, &target, granule, &say_zero, &over_report);
            let size = target.len() as u64;
            let plan = plan_blocks(&data, &zero, bs as u64, size, (!full).then_some(base.len() as u64));

            let want = dest_blocks(&target, bs);
            let got = apply(&plan, &dest_blocks(&base, bs), &want, bs);
            prop_assert_eq!(got, want);

            // The plan is in whole blocks of the volume, and never both reads and zeroes one.
            let blocks = size.div_ceil(bs as u64);
            for e in plan.read.as_slice() {
                prop_assert!(e.offset % bs as u64 == 0 && e.len % bs as u64 == 0);
                prop_assert!(e.end() <= blocks * bs as u64);
            }
            prop_assert!(plan.zero_blocks.windows(2).all(|w| w[0] < w[1]));
            for &b in &plan.zero_blocks {
                prop_assert!(b < blocks);
                prop_assert!(!plan.read.covers(b * bs as u64, 1));
            }
            // It reads nothing the diff did not report, but for the tail of a shrunk volume.
            let reported = data.union(&zero).align(bs as u64, size);
            let tail = blocks.saturating_sub(1) * bs as u64;
            for b in plan.read.blocks(bs as u64) {
                let off = b * bs as u64;
                prop_assert!(reported.covers(off, 1) || (!full && off == tail && base.len() as u64 > size));
            }
        }
    }
}
