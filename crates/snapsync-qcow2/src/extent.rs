//! Extents returned by diffs and allocation maps, plus the small amount of
//! interval arithmetic needed to combine them.

/// What a reader of the target sees inside an extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Guest data that must be read (allocated, possibly compressed, or
    /// inherited from a backing file).
    Data,
    /// The range reads as zeros; no data needs to be transferred.
    Zero,
}

/// A byte range of the guest disk, tagged with what it contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiffExtent {
    /// Guest (virtual disk) byte offset.
    pub offset: u64,
    /// Length in bytes, never zero.
    pub len: u64,
    /// Data or zeros.
    pub kind: ExtentKind,
}

impl DiffExtent {
    /// Exclusive end offset (saturating, extents never exceed `u64::MAX`).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Accumulates extents pushed in increasing offset order, coalescing
/// adjacent extents of the same kind, so callers get a compact list.
#[derive(Debug, Default)]
pub(crate) struct ExtentList {
    out: Vec<DiffExtent>,
}

impl ExtentList {
    /// Append `[offset, offset+len)`; must not start before the previous end.
    pub(crate) fn push(&mut self, offset: u64, len: u64, kind: ExtentKind) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.out.last_mut() {
            if last.kind == kind && last.end() == offset {
                last.len = last.len.saturating_add(len);
                return;
            }
        }
        self.out.push(DiffExtent { offset, len, kind });
    }

    pub(crate) fn finish(self) -> Vec<DiffExtent> {
        self.out
    }
}

/// Clip sorted extents to `[0, limit)`.
pub(crate) fn clip(extents: &mut Vec<DiffExtent>, limit: u64) {
    extents.retain(|e| e.offset < limit);
    if let Some(last) = extents.last_mut() {
        if last.end() > limit {
            last.len = limit - last.offset;
        }
    }
}

/// Remove from sorted, non-overlapping `extents` everything covered by the
/// sorted, non-overlapping, coalesced `covered` ranges (half-open).
pub(crate) fn subtract(extents: &[DiffExtent], covered: &[(u64, u64)]) -> Vec<DiffExtent> {
    let mut out = Vec::new();
    let mut ci = 0usize;
    for e in extents {
        let mut start = e.offset;
        let end = e.end();
        while ci < covered.len() && covered[ci].1 <= start {
            ci += 1;
        }
        let mut k = ci;
        while start < end {
            match covered.get(k) {
                Some(&(cs, ce)) if cs < end => {
                    if cs > start {
                        out.push(DiffExtent {
                            offset: start,
                            len: cs - start,
                            kind: e.kind,
                        });
                    }
                    start = start.max(ce);
                    k += 1;
                }
                _ => {
                    out.push(DiffExtent {
                        offset: start,
                        len: end - start,
                        kind: e.kind,
                    });
                    start = end;
                }
            }
        }
    }
    out
}

/// Union of two sorted coalesced range lists.
pub(crate) fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b.iter()).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (s, e) in all {
        if let Some(last) = out.last_mut() {
            if s <= last.1 {
                last.1 = last.1.max(e);
                continue;
            }
        }
        out.push((s, e));
    }
    out
}

/// Sort and coalesce extents that may come from several sources but do not overlap.
pub(crate) fn normalize(mut extents: Vec<DiffExtent>) -> Vec<DiffExtent> {
    extents.sort_unstable_by_key(|e| e.offset);
    let mut list = ExtentList::default();
    for e in extents {
        list.push(e.offset, e.len, e.kind);
    }
    list.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(offset: u64, len: u64) -> DiffExtent {
        DiffExtent {
            offset,
            len,
            kind: ExtentKind::Data,
        }
    }

    #[test]
    fn subtract_basic() {
        let r = subtract(&[d(0, 100), d(200, 50)], &[(10, 20), (90, 210), (240, 300)]);
        assert_eq!(r, vec![d(0, 10), d(20, 70), d(210, 30)]);
    }

    #[test]
    fn union_merges() {
        assert_eq!(
            union(&[(0, 5), (10, 20)], &[(5, 10), (30, 40)]),
            vec![(0, 20), (30, 40)]
        );
    }

    #[test]
    fn list_coalesces() {
        let mut l = ExtentList::default();
        l.push(0, 10, ExtentKind::Data);
        l.push(10, 10, ExtentKind::Data);
        l.push(20, 10, ExtentKind::Zero);
        l.push(40, 0, ExtentKind::Zero);
        assert_eq!(l.finish().len(), 2);
    }
}
