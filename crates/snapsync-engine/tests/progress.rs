//! Replicate and restore report progress by the one contract: a phase per snapshot,
//! advanced by exactly the bytes it announced, then finished.

use snapsync_core::Timestamp;
use snapsync_engine::{replicate, restore, ReplicateOptions};
use snapsync_store::memory::MemoryStore;
use snapsync_store::sample::pseudo_random;
use snapsync_store::RecordedProgress;

const BS: u64 = 4096;

#[test]
fn replicate_and_restore_report_each_snapshot_in_full() {
    let src = MemoryStore::new("src", BS);
    let dst = MemoryStore::new("dst", BS);
    let mut content = pseudo_random(7, 16 * BS as usize);
    src.add_snapshot("vol", "s1", Timestamp::new(1, 0), content.clone());
    content[3 * BS as usize] ^= 1;
    src.add_snapshot("vol", "s2", Timestamp::new(2, 0), content);

    let progress = RecordedProgress::default();
    let reports = replicate(
        &src,
        &dst,
        &ReplicateOptions::default(),
        &progress,
        &mut |_| {},
    )
    .unwrap();
    let phases = progress.phases();
    let seen: Vec<(&str, u64, u64, bool)> = phases
        .iter()
        .map(|p| (p.label.as_str(), p.total_bytes, p.done_bytes, p.finished))
        .collect();
    assert_eq!(
        seen,
        [("vol@s1", 16 * BS, 16 * BS, true), ("vol@s2", BS, BS, true)]
    );
    assert_eq!(reports[1].read_bytes, phases[1].done_bytes);

    let dir = tempfile::tempdir().unwrap();
    let progress = RecordedProgress::default();
    restore(&dst, "vol", "s2", &dir.path().join("out.img"), &progress).unwrap();
    let phases = progress.phases();
    assert_eq!(phases.len(), 1);
    assert_eq!(phases[0].label, "vol@s2");
    assert_eq!(phases[0].total_bytes, 16 * BS);
    assert_eq!(phases[0].done_bytes, phases[0].total_bytes);
    assert!(phases[0].finished);
}
