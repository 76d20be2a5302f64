//! Shared entry point for the fuzzer and its regression test.
//!
//! Kept in the library (rather than in the fuzz crate) so that the corpus
//! regression test in `tests/` exercises exactly the same code paths.

use crate::{Qcow2Image, View};

/// Parse `data` as a qcow2 image and exercise every read-only API on it.
/// Must never panic, hang or allocate without bound, whatever `data` is.
pub fn exercise(data: &[u8]) {
    let Ok(img) = Qcow2Image::from_source(Box::new(data.to_vec()), "fuzz input".into()) else {
        return;
    };
    let _ = (
        img.version(),
        img.cluster_size(),
        img.backing_file(),
        img.backing_format(),
        img.is_dirty(),
    );
    let mut views = vec![View::Active];
    views.extend((0..img.snapshots().len().min(4)).map(View::Snapshot));
    views.push(View::Snapshot(usize::MAX));
    let chunk = img.cluster_size().min(64 * 1024);
    let mut buf = vec![0u8; chunk as usize];
    for &v in &views {
        let size = img.view_size(v).unwrap_or(0);
        if let Ok(ext) = img.allocated(v) {
            for e in ext.iter().take(8) {
                let n = chunk.min(size.saturating_sub(e.offset)) as usize;
                let _ = img.read_at(v, e.offset, &mut buf[..n]);
            }
        }
        let n = chunk.min(size) as usize;
        let _ = img.read_at(v, 0, &mut buf[..n]);
        let _ = img.read_at(v, size.saturating_sub(1), &mut buf[..1]);
        let _ = img.read_at(v, u64::MAX, &mut buf[..1]);
        let _ = img.diff(v, None);
        let _ = img.diff(View::Active, Some(v));
        let _ = img.diff(v, Some(View::Active));
    }
    let _ = img.metadata_bytes_read();
}
