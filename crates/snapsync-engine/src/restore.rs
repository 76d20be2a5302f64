//! `restore`: write a snapshot out as a raw image, sparse where it is zero.

use std::os::unix::fs::FileExt;
use std::path::Path;

use snapsync_core::is_zero;
use snapsync_store::output::{OutputFile, OutputKind};
use snapsync_store::{Phase, Progress, SnapshotSource, StoreError};

use crate::{EngineError, Result};

/// What a restore did.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Size of the image.
    pub size: u64,
    /// Bytes of data written (the rest is holes).
    pub written_bytes: u64,
}

/// Granularity at which zero runs become holes.
const HOLE_GRANULE: usize = 64 << 10;
const CHUNK: u64 = 8 << 20;

/// Write `volume@snapshot` of `source` to `output` as a raw image. Zero regions are left
/// as holes in a fresh file, which replaces `output` only when complete; a device is
/// written in place. An output that is a file the source reads is refused
/// ([`OutputFile`]).
pub fn restore(
    source: &dyn SnapshotSource,
    volume: &str,
    snapshot: &str,
    output: &Path,
    progress: &dyn Progress,
) -> Result<RestoreStats> {
    let src_err = |e: StoreError| EngineError::Source {
        location: source.location(),
        source: e,
    };
    let info = source
        .volume(volume)
        .map_err(src_err)?
        .snapshot(snapshot)
        .cloned()
        .ok_or_else(|| {
            EngineError::NotFound(format!(
                "snapshot {} not found in {}",
                snapsync_core::quote_snapshot(volume, snapshot),
                source.location()
            ))
        })?;
    let diff = source.diff(volume, snapshot, None).map_err(src_err)?;
    let mut reader = source.open_snapshot(volume, snapshot).map_err(src_err)?;
    let out_err = |context: &str, e| EngineError::Output {
        context: format!("{context} {}", output.display()),
        source: e,
    };
    let source_files = source.local_files(volume, snapshot).map_err(src_err)?;
    let output_file =
        OutputFile::create(output, &source_files).map_err(|e| out_err("cannot restore to", e))?;
    let file = output_file.file();
    let is_regular = output_file.kind() == OutputKind::Regular;
    if is_regular {
        file.set_len(info.size)
            .map_err(|e| out_err("cannot size", e))?;
    }
    let mut stats = RestoreStats {
        size: info.size,
        written_bytes: 0,
    };
    progress.start(Phase::Restore { volume, snapshot }, diff.data.total_len());
    let mut buf = Vec::new();
    for e in diff.data.as_slice() {
        let mut off = e.offset;
        while off < e.end() {
            let n = CHUNK.min(e.end() - off);
            buf.resize(n as usize, 0);
            reader.read_at(off, &mut buf).map_err(src_err)?;
            let mut pos = 0usize;
            for piece in buf.chunks(HOLE_GRANULE) {
                if !is_regular || !is_zero(piece) {
                    file.write_all_at(piece, off + pos as u64)
                        .map_err(|e| out_err("cannot write", e))?;
                    stats.written_bytes += piece.len() as u64;
                }
                pos += piece.len();
            }
            progress.advance(n);
            off += n;
        }
    }
    if !is_regular {
        // A device or pipe cannot have holes: write the zero ranges explicitly.
        let zeros = vec![0u8; HOLE_GRANULE];
        let holes =
            snapsync_core::ExtentList::from_extents([snapsync_core::Extent::new(0, info.size)])
                .subtract(&diff.data);
        for h in holes.as_slice() {
            let mut off = h.offset;
            while off < h.end() {
                let n = (h.end() - off).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], off)
                    .map_err(|e| out_err("cannot write", e))?;
                off += n as u64;
            }
        }
    }
    reader.finish().map_err(src_err)?;
    output_file
        .commit()
        .map_err(|e| out_err("cannot complete", e))?;
    progress.finish();
    Ok(stats)
}
