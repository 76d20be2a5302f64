//! Replicate a directory of raw images into a repository, creating the repository on
//! first use; a second run sends only what changed.
//!
//! ```text
//! cargo run --example replicate_dir -- /var/lib/images /backup/repo
//! ```
//!
//! The directory holds one subdirectory per volume with one image per snapshot
//! (`IMAGES/vm-disk/monday.img`), as `raw:` stores do.

use std::error::Error;
use std::path::Path;

use snapsync::{Location, OpenOptions, ReplicateOptions, Repository};

/// Replicate every snapshot of `images` that `repo` lacks; returns the snapshots sent
/// as `VOLUME@SNAPSHOT`.
pub fn replicate_dir(images: &Path, repo: &Path) -> Result<Vec<String>, Box<dyn Error>> {
    let options = OpenOptions::default();
    if !repo.join("config").exists() {
        Repository::init_with(
            Location::Local(repo.to_path_buf()),
            snapsync::DEFAULT_BLOCK_SIZE,
            &options.repo,
        )?;
    }
    let source = snapsync::open_source(&format!("raw:{}", images.display()), &options)?;
    let dest = snapsync::open_sink(&format!("file://{}", repo.display()), &options)?;
    let mut sent = Vec::new();
    snapsync::replicate(
        source.as_ref(),
        dest.as_ref(),
        &ReplicateOptions::default(),
        &snapsync::NoProgress,
        &mut |r| {
            println!(
                "{}@{}: {} sent of {} changed",
                r.volume, r.snapshot, r.sent_bytes, r.changed_bytes
            );
            sent.push(format!("{}@{}", r.volume, r.snapshot));
        },
    )?;
    Ok(sent)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [images, repo] = args.as_slice() else {
        return Err("usage: replicate_dir IMAGES_DIR REPO_DIR (absolute paths)".into());
    };
    replicate_dir(Path::new(images), Path::new(repo))?;
    Ok(())
}
