//! Byte ranges of a volume and their algebra.
//!
//! Stores report differences as extents at whatever granularity they know (a qcow2
//! cluster, a hashed block of a raw image); the destination stores blocks of its own
//! size. [`ExtentList::align`] is the one place that maps one onto the other.

use serde::{Deserialize, Serialize};

/// A byte range `[offset, offset + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Number of bytes; never zero inside an [`ExtentList`].
    pub len: u64,
}

impl Extent {
    /// Construct.
    pub fn new(offset: u64, len: u64) -> Self {
        Self { offset, len }
    }
    /// One past the last byte (saturating).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// A set of bytes, kept as sorted, non-overlapping, non-adjacent extents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentList {
    extents: Vec<Extent>,
}

impl ExtentList {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Normalise any collection of extents (overlapping, unsorted, empty ones allowed).
    pub fn from_extents(iter: impl IntoIterator<Item = Extent>) -> Self {
        let mut v: Vec<Extent> = iter.into_iter().filter(|e| e.len > 0).collect();
        v.sort_unstable();
        let mut out: Vec<Extent> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if e.offset <= last.end() => {
                    let end = last.end().max(e.end());
                    last.len = end - last.offset;
                }
                _ => out.push(e),
            }
        }
        Self { extents: out }
    }

    /// Add one extent. Appending in order is O(1); otherwise the list is renormalised.
    pub fn push(&mut self, e: Extent) {
        if e.len == 0 {
            return;
        }
        match self.extents.last_mut() {
            None => self.extents.push(e),
            Some(last) if e.offset > last.end() => self.extents.push(e),
            Some(last) if e.offset >= last.offset => {
                let end = last.end().max(e.end());
                last.len = end - last.offset;
            }
            Some(_) => {
                let mut all = std::mem::take(&mut self.extents);
                all.push(e);
                *self = Self::from_extents(all);
            }
        }
    }

    /// The extents, sorted.
    pub fn as_slice(&self) -> &[Extent] {
        &self.extents
    }

    /// Whether no byte is in the set.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Number of bytes in the set.
    pub fn total_len(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// Union of two sets.
    pub fn union(&self, other: &ExtentList) -> ExtentList {
        Self::from_extents(self.extents.iter().chain(other.extents.iter()).copied())
    }

    /// Bytes in `self` but not in `other`.
    pub fn subtract(&self, other: &ExtentList) -> ExtentList {
        let mut out = Vec::new();
        let mut j = 0;
        for e in &self.extents {
            let mut start = e.offset;
            let end = e.end();
            while j < other.extents.len() && other.extents[j].end() <= start {
                j += 1;
            }
            let mut k = j;
            while k < other.extents.len() && other.extents[k].offset < end {
                let o = other.extents[k];
                if o.offset > start {
                    out.push(Extent::new(start, o.offset - start));
                }
                start = start.max(o.end());
                k += 1;
            }
            if start < end {
                out.push(Extent::new(start, end - start));
            }
        }
        Self { extents: out }
    }

    /// Whether every byte of `[offset, offset+len)` is in the set.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let idx = self.extents.partition_point(|e| e.end() <= offset);
        match self.extents.get(idx) {
            Some(e) => e.offset <= offset && e.end() >= offset.saturating_add(len),
            None => false,
        }
    }

    /// Clip to `[0, size)`.
    pub fn clip(&self, size: u64) -> ExtentList {
        let mut out = Vec::with_capacity(self.extents.len());
        for e in &self.extents {
            if e.offset >= size {
                break;
            }
            out.push(Extent::new(e.offset, e.end().min(size) - e.offset));
        }
        Self { extents: out }
    }

    /// Widen every extent outwards to multiples of `block_size`, then clip to the
    /// blocks of a volume of `size` bytes (the last block may be partial in bytes but
    /// is kept whole in block terms).
    pub fn align(&self, block_size: u64, size: u64) -> ExtentList {
        assert!(block_size > 0, "block size must be positive");
        let limit = size.div_ceil(block_size).saturating_mul(block_size);
        Self::from_extents(self.extents.iter().map(|e| {
            let start = e.offset / block_size * block_size;
            let end = e.end().div_ceil(block_size).saturating_mul(block_size);
            Extent::new(start, end - start)
        }))
        .clip(limit)
    }

    /// Indices of the blocks of `block_size` that the set touches.
    pub fn blocks(&self, block_size: u64) -> impl Iterator<Item = u64> + '_ {
        let mut last: Option<u64> = None;
        self.extents.iter().flat_map(move |e| {
            let first = e.offset / block_size;
            let end = e.end().div_ceil(block_size);
            let from = match last {
                Some(l) if l >= first => l + 1,
                _ => first,
            };
            if end > 0 {
                last = Some(last.map_or(end - 1, |l| l.max(end - 1)));
            }
            from..end
        })
    }
}

impl FromIterator<Extent> for ExtentList {
    fn from_iter<T: IntoIterator<Item = Extent>>(iter: T) -> Self {
        Self::from_extents(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn model(list: &[(u64, u64)]) -> BTreeSet<u64> {
        list.iter().flat_map(|&(o, l)| o..o + l).collect()
    }

    fn to_set(l: &ExtentList) -> BTreeSet<u64> {
        l.as_slice()
            .iter()
            .flat_map(|e| e.offset..e.end())
            .collect()
    }

    fn arb() -> impl Strategy<Value = Vec<(u64, u64)>> {
        proptest::collection::vec((0u64..200, 0u64..30), 0..12)
    }

    proptest! {
        #[test]
        fn normalised_matches_model(a in arb()) {
            let l = ExtentList::from_extents(a.iter().map(|&(o, n)| Extent::new(o, n)));
            prop_assert_eq!(to_set(&l), model(&a));
            for w in l.as_slice().windows(2) {
                prop_assert!(w[0].end() < w[1].offset);
            }
            let mut pushed = ExtentList::new();
            for &(o, n) in &a { pushed.push(Extent::new(o, n)); }
            prop_assert_eq!(pushed, l);
        }

        #[test]
        fn union_subtract(a in arb(), b in arb()) {
            let la: ExtentList = a.iter().map(|&(o, n)| Extent::new(o, n)).collect();
            let lb: ExtentList = b.iter().map(|&(o, n)| Extent::new(o, n)).collect();
            let (ma, mb) = (model(&a), model(&b));
            prop_assert_eq!(to_set(&la.union(&lb)), ma.union(&mb).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(to_set(&la.subtract(&lb)), ma.difference(&mb).copied().collect::<BTreeSet<_>>());
        }

        #[test]
        fn align_and_blocks(a in arb(), bs in 1u64..20, size in 0u64..250) {
            let la: ExtentList = a.iter().map(|&(o, n)| Extent::new(o, n)).collect();
            let aligned = la.align(bs, size);
            let limit = size.div_ceil(bs) * bs;
            let want_blocks: BTreeSet<u64> = model(&a).into_iter().filter(|&b| b < limit).map(|b| b / bs).collect();
            let got_blocks: BTreeSet<u64> = aligned.blocks(bs).collect();
            prop_assert_eq!(&got_blocks, &want_blocks);
            let raw_blocks: Vec<u64> = la.clip(limit).blocks(bs).collect();
            prop_assert_eq!(raw_blocks.iter().copied().collect::<BTreeSet<_>>(), want_blocks);
            prop_assert!(raw_blocks.windows(2).all(|w| w[0] < w[1]));
            for e in aligned.as_slice() {
                prop_assert!(e.offset % bs == 0 && e.len % bs == 0);
            }
        }

        #[test]
        fn covers_matches_model(a in arb(), o in 0u64..230, n in 0u64..20) {
            let la: ExtentList = a.iter().map(|&(o, n)| Extent::new(o, n)).collect();
            let m = model(&a);
            prop_assert_eq!(la.covers(o, n), (o..o + n).all(|b| m.contains(&b)));
        }
    }
}
