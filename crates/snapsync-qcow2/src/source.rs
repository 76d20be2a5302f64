//! Positioned-read abstraction so the parser works on files and on memory.
//!
//! The parser never seeks: every access is "read exactly N bytes at offset X".
//! Abstracting that behind [`ReadAt`] lets the fuzzer (and tests) feed images
//! from memory without touching the file system, while production code reads
//! straight from a [`std::fs::File`] with `pread`, which also makes a shared
//! `&Qcow2Image` safe to use from several threads.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// A random-access byte source.
pub trait ReadAt: Send + Sync + fmt::Debug {
    /// Fill `buf` completely from `offset`, or fail (short reads are errors).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Current size of the source in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

fn read_slice(data: &[u8], buf: &mut [u8], offset: u64) -> io::Result<()> {
    let start = usize::try_from(offset).ok();
    let end = start.and_then(|s| s.checked_add(buf.len()));
    match (start, end) {
        (Some(s), Some(e)) if e <= data.len() => {
            buf.copy_from_slice(&data[s..e]);
            Ok(())
        }
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "read past end of in-memory image",
        )),
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_slice(self, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Arc<[u8]> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_slice(self, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}
