//! Restore one snapshot from any store (a repository, a raw or qcow2 directory, a
//! served store) to a raw image file.
//!
//! ```text
//! cargo run --example restore_snapshot -- file:///backup/repo vm-disk@monday out.img
//! ```

use std::error::Error;
use std::path::Path;

use snapsync::{OpenOptions, RestoreStats};

/// Write `target` (`VOLUME@SNAPSHOT`) of the store at `url` to `output`.
pub fn restore_snapshot(
    url: &str,
    target: &str,
    output: &Path,
) -> Result<RestoreStats, Box<dyn Error>> {
    let target = snapsync::parse_target(target)?;
    let source = snapsync::open_source(url, &OpenOptions::default())?;
    let stats = snapsync::restore(
        source.as_ref(),
        target.volume,
        target.snapshot,
        output,
        &snapsync::NoProgress,
    )?;
    Ok(stats)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, target, output] = args.as_slice() else {
        return Err("usage: restore_snapshot STORE_URL VOLUME@SNAPSHOT OUTPUT".into());
    };
    let stats = restore_snapshot(url, target, Path::new(output))?;
    println!("restored {target} to {output} ({} bytes)", stats.size);
    Ok(())
}
