//! The conformance suite: one set of checks that every store runs.
//!
//! Each store's test file builds its store from a [`Fixture`] (for sources) or fresh
//! (for sinks) and calls [`check_source`] / [`check_sink`], which run every named check
//! (`source_*`, `sink_*`: one public function per behaviour, as object_store's
//! integration module has) in turn; a store that cannot do one thing yet can call the
//! others alone. The checks panic with a message naming the store and what diverged,
//! like `assert!` does.
//!
//! They compare against the fixture's plain bytes: the model is "a `Vec<u8>` per
//! snapshot", and a store conforms when everything it reports and returns agrees.
//!
//! Compiled only with the `conformance` feature, which stores enable for their tests.

use snapsync_core::{BlockId, Extent, ExtentList, SnapshotInfo, Timestamp};

pub use crate::sample::pseudo_random;
use crate::{
    BaseRef, BlockContent, Compressed, IncomingBlock, ReceiveRequest, SnapshotRef, SnapshotSink,
    SnapshotSource, StoreError,
};

/// One snapshot of the fixture.
#[derive(Clone, Debug)]
pub struct FixtureSnapshot {
    /// Name.
    pub name: String,
    /// Age.
    pub created: Timestamp,
    /// Exact content.
    pub content: Vec<u8>,
}

/// One volume of the fixture, snapshots oldest first.
#[derive(Clone, Debug)]
pub struct FixtureVolume {
    /// Name.
    pub name: String,
    /// Snapshots, oldest first.
    pub snapshots: Vec<FixtureSnapshot>,
}

/// Volumes and snapshots a store is populated with before the source checks.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// The volumes.
    pub volumes: Vec<FixtureVolume>,
}

const KIB: usize = 1024;

/// The standard fixture: sizes that are not block multiples, zero regions, blocks that
/// become zero, a volume that grows, and a second volume sharing data with the first.
pub fn standard_fixture() -> Fixture {
    let t = |s: i64| Timestamp::new(1_700_000_000 + s, 123_456_789);
    let mut s1 = pseudo_random(1, 640 * KIB + 100);
    s1[128 * KIB..256 * KIB].fill(0);
    let mut s2 = s1.clone();
    s2[10 * KIB..12 * KIB].copy_from_slice(&pseudo_random(2, 2 * KIB));
    s2[300 * KIB..364 * KIB].fill(0);
    s2[130 * KIB..131 * KIB].fill(7);
    let mut s3 = s2.clone();
    s3.extend_from_slice(&pseudo_random(3, 200 * KIB));
    s3.extend_from_slice(&[0u8; 70 * KIB]);
    s3[500 * KIB] ^= 0xff;
    let mut other = s1[..320 * KIB].to_vec();
    other.extend_from_slice(&pseudo_random(4, 64 * KIB));
    Fixture {
        volumes: vec![
            FixtureVolume {
                name: "alpha".into(),
                snapshots: vec![
                    FixtureSnapshot {
                        name: "s1".into(),
                        created: t(0),
                        content: s1,
                    },
                    FixtureSnapshot {
                        name: "s2".into(),
                        created: t(60),
                        content: s2,
                    },
                    FixtureSnapshot {
                        name: "s3".into(),
                        created: t(3600),
                        content: s3,
                    },
                ],
            },
            FixtureVolume {
                name: "beta".into(),
                snapshots: vec![FixtureSnapshot {
                    name: "only".into(),
                    created: t(10),
                    content: other,
                }],
            },
        ],
    }
}

fn read_all(src: &dyn SnapshotSource, volume: &str, snap: &str, len: usize) -> Vec<u8> {
    let mut r = src.open_snapshot(volume, snap).expect("open_snapshot");
    let mut out = vec![0u8; len];
    // Odd-sized reads at odd offsets exercise the reader's arithmetic.
    let mut off = 0;
    let mut step = 1000;
    while off < len {
        let n = step.min(len - off);
        r.read_at(off as u64, &mut out[off..off + n])
            .expect("read_at");
        off += n;
        step = step * 3 % 70_001 + 4096;
    }
    out
}

fn real_changes(target: &[u8], base: Option<&[u8]>) -> ExtentList {
    let mut l = ExtentList::new();
    for (i, b) in target.iter().enumerate() {
        let old = base.and_then(|x| x.get(i)).copied().unwrap_or(0);
        if *b != old {
            l.push(Extent::new(i as u64, 1));
        }
    }
    l
}

/// Source checks, on a store populated with `fixture`: every `source_*` check below.
/// `granularity` is the coarsest unit in which this store reports differences; diffs
/// may be that much larger than the real change, never more.
pub fn check_source(src: &dyn SnapshotSource, fixture: &Fixture, granularity: u64) {
    source_lists_the_fixture_stably(src, fixture);
    source_reads_every_snapshot_exactly(src, fixture);
    source_diffs_cover_every_change_within_granularity(src, fixture, granularity);
    source_refuses_missing_and_path_like_names(src);
}

/// The listing and the system id are stable; every fixture volume is listed with its
/// snapshots oldest first, each with its size and age, and unique identities.
pub fn source_lists_the_fixture_stably(src: &dyn SnapshotSource, fixture: &Fixture) {
    let loc = src.location();
    let listed = src.list().expect("list");
    assert_eq!(
        listed,
        src.list().expect("list again"),
        "{loc}: listing is not stable"
    );
    let id = src.system_id().expect("system_id");
    assert_eq!(
        id,
        src.system_id().expect("system_id"),
        "{loc}: system id is not stable"
    );
    for fv in &fixture.volumes {
        let v = listed
            .iter()
            .find(|v| v.name == fv.name)
            .unwrap_or_else(|| panic!("{loc}: volume {} not listed", fv.name));
        let names: Vec<&str> = v.snapshots.iter().map(|s| s.name.as_str()).collect();
        let want: Vec<&str> = fv.snapshots.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names, want,
            "{loc}: snapshots of {} not listed oldest first",
            fv.name
        );
        assert_eq!(
            v.size,
            fv.snapshots.last().unwrap().content.len() as u64,
            "{loc}: volume size"
        );
        for (s, f) in v.snapshots.iter().zip(&fv.snapshots) {
            assert_eq!(
                s.size,
                f.content.len() as u64,
                "{loc}: size of {}@{}",
                fv.name,
                f.name
            );
            assert_eq!(s.created, f.created, "{loc}: age of {}@{}", fv.name, f.name);
        }
        let ids: std::collections::HashSet<_> = v.snapshots.iter().map(|s| s.id).collect();
        assert_eq!(
            ids.len(),
            v.snapshots.len(),
            "{loc}: snapshot ids not unique"
        );
    }
}

/// Every snapshot reads back exactly (in odd-sized pieces), and zeros past its end.
pub fn source_reads_every_snapshot_exactly(src: &dyn SnapshotSource, fixture: &Fixture) {
    let loc = src.location();
    for fv in &fixture.volumes {
        for f in &fv.snapshots {
            let got = read_all(src, &fv.name, &f.name, f.content.len());
            assert!(
                got == f.content,
                "{loc}: content of {}@{} differs",
                fv.name,
                f.name
            );
            let mut past = [1u8; 100];
            let mut r = src.open_snapshot(&fv.name, &f.name).unwrap();
            r.read_at(f.content.len() as u64 + 10, &mut past).unwrap();
            assert!(
                past.iter().all(|b| *b == 0),
                "{loc}: reading past the end is not zero"
            );
        }
    }
}

/// Diffs against every other snapshot and against nothing cover every changed byte,
/// stay inside the target, report as zero only zeros, and (with a base) report no more
/// than the changes rounded to `granularity`.
pub fn source_diffs_cover_every_change_within_granularity(
    src: &dyn SnapshotSource,
    fixture: &Fixture,
    granularity: u64,
) {
    let loc = src.location();
    for fv in &fixture.volumes {
        for f in &fv.snapshots {
            let mut bases: Vec<Option<&FixtureSnapshot>> = vec![None];
            bases.extend(fv.snapshots.iter().filter(|b| b.name != f.name).map(Some));
            for base in bases {
                let d = src
                    .diff(
                        &fv.name,
                        &f.name,
                        base.map(|b| SnapshotRef::new(&fv.name, &b.name)),
                    )
                    .expect("diff");
                let what = format!(
                    "{loc}: diff {}@{} against {:?}",
                    fv.name,
                    f.name,
                    base.map(|b| &b.name)
                );
                let changed = d.changed();
                assert!(
                    d.data.union(&d.zero).total_len() == d.data.total_len() + d.zero.total_len(),
                    "{what}: data and zero overlap"
                );
                let real = real_changes(&f.content, base.map(|b| b.content.as_slice()));
                assert!(
                    real.subtract(&changed).is_empty(),
                    "{what}: misses changed bytes {:?}",
                    &real.subtract(&changed).as_slice()[..1]
                );
                assert!(
                    changed.clip(f.content.len() as u64) == changed,
                    "{what}: extends past the end"
                );
                let len = f.content.len() as u64;
                let mut bound = real.align(granularity, len).clip(len);
                if base.is_some_and(|b| b.content.len() as u64 != len)
                    && !len.is_multiple_of(granularity)
                {
                    // A store that compares padded blocks cannot tell the bytes of a
                    // partial last block apart when the sizes differ.
                    let tail = len / granularity * granularity;
                    bound = bound.union(&ExtentList::from_extents([Extent::new(tail, len - tail)]));
                }
                if base.is_some() {
                    assert!(
                        changed.subtract(&bound).is_empty(),
                        "{what}: reports unchanged bytes beyond its granularity"
                    );
                }
                for e in d.zero.as_slice() {
                    let r = &f.content[e.offset as usize..e.end() as usize];
                    assert!(
                        r.iter().all(|b| *b == 0),
                        "{what}: zero extent {e:?} holds data"
                    );
                }
            }
        }
    }
}

/// Missing volumes and snapshots are `NotFound`; path-like names open nothing.
pub fn source_refuses_missing_and_path_like_names(src: &dyn SnapshotSource) {
    let loc = src.location();
    for (vol, snap) in [("nope", "s1"), ("alpha", "nope")] {
        match src.open_snapshot(vol, snap) {
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => panic!("{loc}: {vol}@{snap} gave {e}, not NotFound"),
            Ok(_) => panic!("{loc}: {vol}@{snap} opened"),
        }
        assert!(
            src.diff(vol, snap, None).is_err(),
            "{loc}: diff of missing {vol}@{snap}"
        );
    }
    assert!(
        src.open_snapshot("../alpha", "s1").is_err(),
        "{loc}: path traversal"
    );
}

/// Send one snapshot to `sink` the simple way (every block of `content`, or those that
/// differ from `base_content`), without the engine.
fn send(
    sink: &dyn SnapshotSink,
    volume: &str,
    info: &SnapshotInfo,
    content: &[u8],
    base: Option<(&str, &[u8])>,
    commit: bool,
) -> u64 {
    let bs = sink.block_size() as usize;
    let mut rx = sink
        .begin_receive(ReceiveRequest {
            volume: volume.into(),
            snapshot: info.clone(),
            base: base.map(|(name, _)| BaseRef {
                volume: volume.into(),
                snapshot: name.into(),
            }),
            source_system: "conformance-source".into(),
            source_volume: volume.into(),
            source_snapshot: info.name.clone(),
            origin: None,
        })
        .expect("begin_receive");
    let mut stored = 0;
    for (i, chunk) in content.chunks(bs).enumerate() {
        let mut block = chunk.to_vec();
        block.resize(bs, 0);
        if let Some((_, b)) = base {
            let mut old = b.get(i * bs..).unwrap_or(&[]).to_vec();
            old.truncate(bs);
            old.resize(bs, 0);
            if old == block {
                continue;
            }
        }
        let content = if block.iter().all(|b| *b == 0) {
            BlockContent::Zero
        } else {
            let id = BlockId::of(&block);
            if rx.missing(&[id]).expect("missing")[0] {
                // Every way a sender may hand a block over, in turn.
                let compressed = match i % 3 {
                    0 => Compressed::NotTried,
                    1 => Compressed::from_attempt(snapsync_core::codec::compress(&block)),
                    _ => Compressed::NotWorthIt,
                };
                BlockContent::Data {
                    id,
                    data: block.into(),
                    compressed,
                }
            } else {
                BlockContent::Existing(id)
            }
        };
        stored += rx
            .write(vec![IncomingBlock {
                index: i as u64,
                content,
            }])
            .expect("write");
    }
    if commit {
        rx.commit().expect("commit");
    }
    stored
}

/// Sink checks, on a store that is also a source (to read back): every `sink_*` check
/// below, in turn. Each uses volumes of its own, so they can share one store.
pub fn check_sink<S: SnapshotSink + SnapshotSource>(store: &S) {
    sink_hides_an_uncommitted_receive(store);
    sink_receives_full_and_incremental_snapshots_with_identity_and_hints(store);
    sink_deduplicates_across_volumes(store);
    sink_refuses_a_second_receive_of_a_name(store);
    sink_answers_announced_missing_questions_as_it_stands(store);
    sink_accepts_a_block_repeated_within_a_batch(store);
    sink_refuses_hostile_receives(store);
    sink_refuses_path_like_names(store);
}

/// The identity a snapshot of the fixture has at the conformance source, in `volume`.
fn fixture_info(volume: &str, f: &FixtureSnapshot) -> SnapshotInfo {
    SnapshotInfo {
        name: f.name.clone(),
        id: snapsync_core::SnapshotId::derive("conformance-source", volume, &f.name, f.created),
        created: f.created,
        size: f.content.len() as u64,
    }
}

/// The first snapshot of the standard fixture's first volume.
fn first_snapshot() -> FixtureSnapshot {
    standard_fixture().volumes[0].snapshots[0].clone()
}

/// A receive dropped before its commit leaves nothing visible.
pub fn sink_hides_an_uncommitted_receive<S: SnapshotSink + SnapshotSource>(store: &S) {
    let loc = store.location();
    let s1 = first_snapshot();
    send(
        store,
        "hidden",
        &fixture_info("hidden", &s1),
        &s1.content,
        None,
        false,
    );
    assert!(
        store
            .list()
            .expect("list")
            .iter()
            .all(|v| v.name != "hidden" || v.snapshots.is_empty()),
        "{loc}: an uncommitted snapshot is visible"
    );
}

/// Full and incremental receives (a base younger than its target included) store at
/// most the changed blocks, read back exactly, keep the source's identity, age and
/// size, and leave hints for that source only.
pub fn sink_receives_full_and_incremental_snapshots_with_identity_and_hints<
    S: SnapshotSink + SnapshotSource,
>(
    store: &S,
) {
    let loc = store.location();
    let fixture = standard_fixture();
    let alpha = &fixture.volumes[0];
    let info = |f: &FixtureSnapshot| fixture_info("alpha", f);
    let (s1, s2, s3) = (
        &alpha.snapshots[0],
        &alpha.snapshots[1],
        &alpha.snapshots[2],
    );
    let full = send(store, "alpha", &info(s1), &s1.content, None, true);
    assert!(full > 0, "{loc}: a full receive stored nothing");
    let incr = send(
        store,
        "alpha",
        &info(s2),
        &s2.content,
        Some(("s1", &s1.content)),
        true,
    );
    // At most the changed non-zero blocks, at the sink's block size.
    let bs = store.block_size() as usize;
    let changed = s2
        .content
        .chunks(bs)
        .zip(s1.content.chunks(bs))
        .filter(|(a, b)| a != b && a.iter().any(|x| *x != 0))
        .count();
    let bound = (changed * bs) as u64;
    assert!(
        incr <= bound,
        "{loc}: incremental stored {incr} bytes for {changed} changed blocks"
    );
    // Base younger than target is allowed: the sink must not assume order.
    send(
        store,
        "alpha",
        &info(s3),
        &s3.content,
        Some(("s2", &s2.content)),
        true,
    );

    let v = store.volume("alpha").expect("volume");
    let names: Vec<_> = v.snapshots.iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["s1", "s2", "s3"], "{loc}: listing after receive");
    for f in [s1, s2, s3] {
        let s = v.snapshot(&f.name).unwrap();
        assert_eq!(
            s,
            &info(f),
            "{loc}: identity, age or size not preserved for {}",
            f.name
        );
        let got = read_all(store, "alpha", &f.name, f.content.len());
        assert!(got == f.content, "{loc}: {} does not read back", f.name);
    }

    let hints = store.hints("conformance-source", "alpha").expect("hints");
    let mut hinted: Vec<_> = hints.iter().map(|h| h.source_snapshot.clone()).collect();
    hinted.sort();
    assert_eq!(hinted, ["s1", "s2", "s3"], "{loc}: hints after receive");
    assert!(
        hints.iter().all(|h| h.local_volume == "alpha"
            && h.id
                == info(
                    alpha
                        .snapshots
                        .iter()
                        .find(|s| s.name == h.source_snapshot)
                        .unwrap()
                )
                .id),
        "{loc}: hint fields"
    );
    assert!(
        store.hints("other", "alpha").expect("hints").is_empty(),
        "{loc}: hints leak across sources"
    );
}

/// A second volume with the same data stores nothing new.
pub fn sink_deduplicates_across_volumes<S: SnapshotSink + SnapshotSource>(store: &S) {
    let loc = store.location();
    let s1 = first_snapshot();
    send(
        store,
        "dedup-a",
        &fixture_info("dedup-a", &s1),
        &s1.content,
        None,
        true,
    );
    let again = send(
        store,
        "dedup-b",
        &fixture_info("dedup-b", &s1),
        &s1.content,
        None,
        true,
    );
    assert_eq!(
        again, 0,
        "{loc}: identical data in another volume was stored again"
    );
}

/// A second receive of a snapshot name the volume holds is refused, and changes nothing.
pub fn sink_refuses_a_second_receive_of_a_name<S: SnapshotSink + SnapshotSource>(store: &S) {
    let loc = store.location();
    let s1 = first_snapshot();
    let info = fixture_info("twice", &s1);
    send(store, "twice", &info, &s1.content, None, true);
    let mut other = info.clone();
    other.id = snapsync_core::SnapshotId::derive("elsewhere", "twice", "s1", s1.created);
    let refused = match store.begin_receive(ReceiveRequest {
        volume: "twice".into(),
        snapshot: other,
        base: None,
        source_system: "elsewhere".into(),
        source_volume: "twice".into(),
        source_snapshot: "s1".into(),
        origin: None,
    }) {
        Err(_) => true,
        Ok(rx) => rx.commit().is_err(),
    };
    assert!(
        refused,
        "{loc}: a snapshot was received twice under the same name"
    );
    let got = read_all(store, "twice", "s1", s1.content.len());
    assert!(got == s1.content, "{loc}: s1 damaged by a refused receive");
}

/// `missing` questions announced ahead are answered as the sink stands when they are
/// asked: blocks written in between count as present, whatever the receiver did with
/// the announcement (a remote store asks the server at once).
pub fn sink_answers_announced_missing_questions_as_it_stands<S: SnapshotSink + SnapshotSource>(
    store: &S,
) {
    let loc = store.location();
    let bs = store.block_size() as usize;
    let s1 = first_snapshot();
    let mut ahead = fixture_info("ahead", &s1);
    ahead.name = "ahead".into();
    ahead.id = snapsync_core::SnapshotId::derive("conformance-source", "ahead", "s1", s1.created);
    let mut rx = store
        .begin_receive(ReceiveRequest {
            volume: "ahead".into(),
            snapshot: ahead,
            base: None,
            source_system: "conformance-source".into(),
            source_volume: "ahead".into(),
            source_snapshot: "s1".into(),
            origin: None,
        })
        .expect("begin_receive");
    let fresh: Vec<Vec<u8>> = (0..3).map(|k| pseudo_random(9000 + k, bs)).collect();
    let ids: Vec<BlockId> = fresh.iter().map(|b| BlockId::of(b)).collect();
    let data = |k: usize| IncomingBlock {
        index: k as u64,
        content: BlockContent::Data {
            id: ids[k],
            data: fresh[k].clone().into(),
            compressed: Compressed::NotTried,
        },
    };
    rx.missing_ahead(&ids);
    rx.missing_ahead(&ids[2..]);
    rx.missing_ahead(&ids[1..]);
    rx.write(vec![data(0)]).expect("write");
    assert_eq!(
        rx.missing(&ids).expect("missing"),
        [false, true, true],
        "{loc}: an announced question missed a block written since"
    );
    // The second announcement is never asked; the third is, after another write.
    rx.write(vec![data(1)]).expect("write");
    assert_eq!(
        rx.missing(&ids[1..]).expect("missing"),
        [false, true],
        "{loc}: a question asked after a skipped announcement"
    );
    // A question never announced.
    rx.write(vec![data(2)]).expect("write");
    assert_eq!(
        rx.missing(&ids).expect("missing"),
        [false, false, false],
        "{loc}: written blocks still reported missing"
    );
    drop(rx);
}

/// Names that could escape a directory or key prefix are refused.
pub fn sink_refuses_path_like_names<S: SnapshotSink + SnapshotSource>(store: &S) {
    let loc = store.location();
    let mut bad = fixture_info("alpha", &first_snapshot());
    bad.name = "../evil".into();
    assert!(
        store
            .begin_receive(ReceiveRequest {
                volume: "alpha".into(),
                snapshot: bad,
                base: None,
                source_system: "x".into(),
                source_volume: "alpha".into(),
                source_snapshot: "x".into(),
                origin: None,
            })
            .is_err(),
        "{loc}: a path-like snapshot name was accepted"
    );
}

/// A peer speaking the protocol by hand may send what the engine never does: block
/// indexes past the end, unknown blocks named as existing, impossible times. Each such
/// request is refused, the receive can no longer commit, and nothing already committed
/// changes.
pub fn sink_refuses_hostile_receives<S: SnapshotSink + SnapshotSource>(store: &S) {
    let s1 = first_snapshot();
    let committed = &fixture_info("hostile", &s1);
    send(store, "hostile", committed, &s1.content, None, true);
    let content = &s1.content;
    let loc = store.location();
    let bs = store.block_size();
    let blocks = committed.size.div_ceil(bs);
    let request = |name: &str, created: snapsync_core::Timestamp| {
        let mut snapshot = committed.clone();
        snapshot.name = name.into();
        snapshot.created = created;
        snapshot.id = snapsync_core::SnapshotId::derive("hostile", "hostile", name, created);
        ReceiveRequest {
            volume: "hostile".into(),
            snapshot,
            base: Some(BaseRef {
                volume: "hostile".into(),
                snapshot: committed.name.clone(),
            }),
            source_system: "hostile".into(),
            source_volume: "hostile".into(),
            source_snapshot: name.into(),
            origin: None,
        }
    };
    let fresh = pseudo_random(4242, bs as usize);
    let data = |index: u64| IncomingBlock {
        index,
        content: BlockContent::Data {
            id: BlockId::of(&fresh),
            data: fresh.clone().into(),
            compressed: Compressed::NotTried,
        },
    };
    let unknown = BlockId::of(b"a block no conformance store ever holds");
    let cases: Vec<(&str, Vec<IncomingBlock>)> = vec![
        ("past-end", vec![data(blocks)]),
        ("far-past-end", vec![data(u64::MAX)]),
        (
            "zero-past-end",
            vec![IncomingBlock {
                index: blocks + 7,
                content: BlockContent::Zero,
            }],
        ),
        (
            "unknown-existing",
            vec![IncomingBlock {
                index: 0,
                content: BlockContent::Existing(unknown),
            }],
        ),
        // A good block first, so the refusal is not the first request.
        ("good-then-past-end", vec![data(0), data(blocks)]),
    ];
    for (name, batch) in cases {
        let mut rx = store
            .begin_receive(request(name, committed.created))
            .expect("begin_receive");
        // A receiver may answer a write later (a remote one pipelines them), so the
        // refusal may surface at any later call; once it has, every call fails.
        let mut refused = false;
        for block in batch.into_iter().chain([data(0)]) {
            let result = rx.write(vec![block]);
            assert!(
                !(refused && result.is_ok()),
                "{loc}: a receive went on after a refused write ({name})"
            );
            refused |= result.is_err();
        }
        let commit = rx.commit();
        assert!(
            commit.is_err(),
            "{loc}: a hostile receive ({name}) committed"
        );
        let listed = store.volume("hostile").expect("volume");
        assert!(
            listed.snapshot(name).is_none(),
            "{loc}: a refused receive ({name}) became visible"
        );
    }

    // Times that are not times: nanoseconds past a second, years past 9999.
    for (name, created) in [
        (
            "bad-nanos",
            snapsync_core::Timestamp {
                secs: 1_700_000_000,
                nanos: 2_000_000_000,
            },
        ),
        (
            "bad-year",
            snapsync_core::Timestamp {
                secs: i64::MAX,
                nanos: 0,
            },
        ),
    ] {
        let refused = match store.begin_receive(request(name, created)) {
            Err(_) => true,
            Ok(rx) => rx.commit().is_err(),
        };
        assert!(
            refused,
            "{loc}: a snapshot with an impossible time ({name}) was accepted"
        );
    }

    let got = read_all(store, "hostile", &committed.name, content.len());
    assert!(
        got == *content,
        "{loc}: hostile receives changed the committed {}",
        committed.name
    );
}

/// A block that repeats within one write batch is carried once, as data, and then named
/// as existing (the engine sends it so); the sink accepts that and reads it back twice.
pub fn sink_accepts_a_block_repeated_within_a_batch<S: SnapshotSink + SnapshotSource>(store: &S) {
    let loc = store.location();
    let bs = store.block_size();
    let block = pseudo_random(31337, bs as usize);
    let id = BlockId::of(&block);
    let created = snapsync_core::Timestamp::new(1_700_000_100, 0);
    let mut rx = store
        .begin_receive(ReceiveRequest {
            volume: "repeat".into(),
            snapshot: SnapshotInfo {
                name: "r1".into(),
                id: snapsync_core::SnapshotId::derive(
                    "conformance-source",
                    "repeat",
                    "r1",
                    created,
                ),
                created,
                size: 3 * bs,
            },
            base: None,
            source_system: "conformance-source".into(),
            source_volume: "repeat".into(),
            source_snapshot: "r1".into(),
            origin: None,
        })
        .expect("begin_receive");
    rx.write(vec![
        IncomingBlock {
            index: 0,
            content: BlockContent::Data {
                id,
                data: block.clone().into(),
                compressed: Compressed::NotTried,
            },
        },
        IncomingBlock {
            index: 2,
            content: BlockContent::Existing(id),
        },
    ])
    .unwrap_or_else(|e| panic!("{loc}: a block repeated within a batch was refused: {e}"));
    rx.flush().expect("flush");
    rx.commit().expect("commit");
    let mut want = block.clone();
    want.extend(vec![0u8; bs as usize]);
    want.extend(&block);
    let got = read_all(store, "repeat", "r1", want.len());
    assert!(
        got == want,
        "{loc}: a block repeated within a batch reads back wrong"
    );
}
