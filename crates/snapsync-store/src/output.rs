//! Where a restore writes: never over a file its source reads, never a half-written
//! image where a good one was.
//!
//! A restore that opened its output with truncation before reading would zero its own
//! source when the two are one file (`restore raw:DIR vm@mon DIR/vm/mon.img`), and a
//! restore that fails or is killed halfway would leave a truncated image where a complete
//! one stood. [`OutputFile`] prevents both, for every writer (the raw restore and the
//! qcow2 writer):
//!
//! - Before anything is opened for writing, the output is compared with every file the
//!   source reads ([`crate::SnapshotSource::local_files`]) by device and inode (so hard
//!   links and symlinks are caught), and with directories the source keeps (a
//!   repository) by path prefix. A match is refused.
//! - A regular file (or a path that does not exist yet) is written to a temporary file
//!   named `.NAME.snapsync-restore-RANDOM` in the target's directory, synced, and renamed
//!   over the target only by [`OutputFile::commit`]. Dropped uncommitted, the temporary
//!   file is removed; only a killed process leaves one behind, under that name.
//! - A block device is written in place and synced; a character device or a pipe (such as
//!   `/dev/null`) is written in place as a stream, without sync.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What kind of thing the output is, which decides how it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutputKind {
    /// A regular file: written beside the target and renamed into place.
    Regular,
    /// A block device: written in place and synced.
    BlockDevice,
    /// A character device or pipe: written in place, in order, with no sync.
    Stream,
}

/// A restore's output, being written.
#[derive(Debug)]
pub struct OutputFile {
    target: PathBuf,
    /// The temporary file written instead of a regular target; `None` for devices, and
    /// after commit.
    temp: Option<PathBuf>,
    file: File,
    kind: OutputKind,
}

impl OutputFile {
    /// Open `output` for a restore whose source reads `source_files`. Refuses (with
    /// [`io::ErrorKind::InvalidInput`]) when the output is one of them or lies inside a
    /// source directory.
    pub fn create(output: &Path, source_files: &[PathBuf]) -> io::Result<Self> {
        refuse_overlap(output, source_files)?;
        let existing = std::fs::metadata(output).ok();
        let kind = match existing.as_ref().map(|m| m.file_type()) {
            Some(t) if t.is_block_device() => OutputKind::BlockDevice,
            Some(t) if t.is_char_device() || t.is_fifo() => OutputKind::Stream,
            Some(t) if t.is_dir() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is a directory", output.display()),
                ))
            }
            _ => OutputKind::Regular,
        };
        if kind != OutputKind::Regular {
            let file = OpenOptions::new().write(true).open(output)?;
            return Ok(Self {
                target: output.to_path_buf(),
                temp: None,
                file,
                kind,
            });
        }
        // Write beside what the path finally names, so that a symlink stays a symlink
        // and the rename never crosses a file system.
        let target = match std::fs::canonicalize(output) {
            Ok(t) => t,
            Err(_) => output.to_path_buf(),
        };
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} names no file", output.display()),
                )
            })?
            .to_string_lossy()
            .into_owned();
        let temp = dir.join(format!(".{name}.snapsync-restore-{}", crate::random_id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)?;
        Ok(Self {
            target,
            temp: Some(temp),
            file,
            kind,
        })
    }

    /// The open file to write to.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path being written: the temporary file for a regular target, else the device.
    /// For writers that open by path (the qcow2 writer).
    pub fn path(&self) -> &Path {
        self.temp.as_deref().unwrap_or(&self.target)
    }

    /// How the output is written.
    pub fn kind(&self) -> OutputKind {
        self.kind
    }

    /// Make the restore visible: sync what needs it and rename a temporary file over the
    /// target (then sync the directory, so that the rename survives a crash).
    pub fn commit(mut self) -> io::Result<()> {
        if self.kind != OutputKind::Stream {
            self.file.sync_all()?;
        }
        if let Some(temp) = self.temp.take() {
            if let Err(e) = std::fs::rename(&temp, &self.target) {
                let _ = std::fs::remove_file(&temp);
                return Err(e);
            }
            if let Some(dir) = self.target.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// 64 bits that differ between processes and calls, for temporary names (uniqueness is
/// checked by `create_new` anyway).
/// Refuse when `output` is, or lies inside, something the source reads.
fn refuse_overlap(output: &Path, source_files: &[PathBuf]) -> io::Result<()> {
    let out_md = std::fs::metadata(output).ok();
    // Where the output would be created: its existing parent, resolved.
    let out_dir = output
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .and_then(|p| std::fs::canonicalize(p).ok());
    for src in source_files {
        let Ok(src_md) = std::fs::metadata(src) else {
            continue;
        };
        let overlaps = if src_md.is_dir() {
            let src_dir = std::fs::canonicalize(src).unwrap_or_else(|_| src.clone());
            out_dir.as_ref().is_some_and(|d| d.starts_with(&src_dir))
        } else {
            out_md
                .as_ref()
                .is_some_and(|o| o.dev() == src_md.dev() && o.ino() == src_md.ino())
        };
        if overlaps {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                if src_md.is_dir() {
                    format!(
                        "it lies inside {}, which the source keeps; refusing to write there",
                        src.display()
                    )
                } else {
                    format!(
                        "it is {}, which the source reads; refusing to overwrite it",
                        src.display()
                    )
                },
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn refuses_the_source_its_links_and_its_directory() {
        let dir = tempfile_dir();
        let src = dir.join("src.img");
        std::fs::write(&src, b"source").unwrap();
        std::fs::hard_link(&src, dir.join("hard.img")).unwrap();
        std::os::unix::fs::symlink(&src, dir.join("soft.img")).unwrap();
        for out in ["src.img", "hard.img", "soft.img"] {
            let err = OutputFile::create(&dir.join(out), std::slice::from_ref(&src)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{out}: {err}");
        }
        let err = OutputFile::create(&dir.join("new.img"), std::slice::from_ref(&dir)).unwrap_err();
        assert!(err.to_string().contains("inside"), "{err}");
        assert_eq!(std::fs::read(&src).unwrap(), b"source");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_regular_target_changes_only_on_commit() {
        let dir = tempfile_dir();
        let target = dir.join("out.img");
        std::fs::write(&target, b"old").unwrap();
        let out = OutputFile::create(&target, &[]).unwrap();
        out.file().write_all(b"new content").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        drop(out);
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "temp file left"
        );
        let out = OutputFile::create(&target, &[]).unwrap();
        out.file().write_all(b"new content").unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new content");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dev_null_is_a_stream() {
        let out = OutputFile::create(Path::new("/dev/null"), &[]).unwrap();
        assert_eq!(out.kind(), OutputKind::Stream);
        out.file().write_all(b"gone").unwrap();
        out.commit().unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("snapsync-output-{}", crate::random_id()));
        std::fs::create_dir(&d).unwrap();
        d
    }
}
