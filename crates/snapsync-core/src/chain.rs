//! Which manifest a new delta is stored against: the shape of a volume's delta chain.
//!
//! A chain that bases every snapshot on the previous one needs a full map every so
//! often, or reading the newest snapshot walks every delta ever written; and a full map
//! of a 16 M-block volume is 650 MiB, whatever changed. Instead, snapshot number `n`
//! (counted along the chain since its full map) is stored against number
//! `n - lowbit(n)`, as in a Fenwick tree or a skip list:
//!
//! - resolving number `n` reads at most `popcount(n) + 1` manifests (8 for the 200th),
//! - a delta against `n - lowbit(n)` holds the changes of `lowbit(n)` snapshots, so each
//!   change is written again about `log2(n) / 2` times on average: metadata grows with
//!   what changed, never with the volume,
//! - and the manifests a new delta merges are exactly those on the previous snapshot's
//!   chain above its base, so it is built from them and the blocks received, without
//!   reading the full map below.

/// The number of the snapshot that snapshot number `n` (≥ 1) is stored against:
/// `n` with its lowest set bit cleared.
pub fn delta_base_number(n: u64) -> u64 {
    n & n.wrapping_sub(1)
}

/// The numbers on the chain of snapshot `n`, from `n` down to 0 (the full map).
pub fn chain_numbers(n: u64) -> Vec<u64> {
    let mut out = vec![n];
    let mut cur = n;
    while cur != 0 {
        cur = delta_base_number(cur);
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_numbers() {
        assert_eq!(delta_base_number(1), 0);
        assert_eq!(delta_base_number(6), 4);
        assert_eq!(delta_base_number(8), 0);
        assert_eq!(chain_numbers(13), vec![13, 12, 8, 0]);
    }

    proptest! {
        /// The base of `n` is on the chain of `n - 1`, and the chain of `n - 1` above it
        /// covers exactly the snapshots after the base: a new delta is the merge of
        /// those manifests and the blocks received.
        #[test]
        fn the_base_is_on_the_previous_chain(n in 1u64..1 << 40) {
            let base = delta_base_number(n);
            let prev = chain_numbers(n - 1);
            prop_assert!(prev.contains(&base));
            prop_assert!(base < n);
            // Chains are short: at most one manifest per bit.
            prop_assert!(chain_numbers(n).len() as u32 <= n.count_ones() + 1);
        }
    }

    /// Against a model of what each delta holds (the changes of the snapshots it
    /// spans), every change is rewritten about log2(n)/2 times: 48 snapshots write
    /// at most 4x their changes, not a full map every 16.
    #[test]
    fn metadata_grows_with_changes() {
        let n = 48u64;
        let spans: u64 = (1..=n).map(|k| k - delta_base_number(k)).sum();
        assert!(spans <= 4 * n, "{spans}");
    }
}
