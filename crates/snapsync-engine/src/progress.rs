//! Progress reporting, decoupled from any terminal library: the binary adapts it to a
//! progress bar, tests and `--json` use [`NoProgress`].

/// Receives progress of a long operation, in bytes.
pub trait Progress: Send + Sync {
    /// A new phase begins (e.g. one snapshot), with its total.
    fn begin(&self, _label: &str, _total_bytes: u64) {}
    /// Bytes done since the last call.
    fn advance(&self, _bytes: u64) {}
    /// The phase ended.
    fn end(&self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
