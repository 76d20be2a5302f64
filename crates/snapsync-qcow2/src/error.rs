//! Error type shared by the reader, the chain walker and the writer.

use std::io;

/// Everything that can go wrong while reading or writing a qcow2 image.
///
/// Every variant says *what* went wrong and, where it is known, *where*
/// (a file path, or a byte offset inside the image file), so that a user
/// who hands us a broken image can find the damage with a hex editor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Qcow2Error {
    /// The underlying file could not be read or written.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What we were doing, including the path where known.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image violates the qcow2 specification (or is truncated).
    #[error("malformed qcow2 image: {what} (at byte offset {offset})")]
    Malformed {
        /// Which structure is broken and how.
        what: String,
        /// Byte offset in the image file of the offending structure.
        offset: u64,
    },
    /// The image is valid but uses a feature this crate deliberately does not implement.
    #[error("unsupported qcow2 feature: {feature}")]
    Unsupported {
        /// Name of the feature (e.g. "encryption", "external data file", "incompatible feature bit 7").
        feature: String,
    },
    /// A size field asks for more memory or work than we are willing to spend.
    #[error("qcow2 image too large: {what}")]
    TooLarge {
        /// Which field is too large and what the limit is.
        what: String,
    },
    /// A backing file the chain's [`crate::BackingRule`] does not allow: outside the
    /// permitted directory, or not a regular file (a FIFO would hang the reader, a
    /// character device such as `/dev/zero` is no image).
    #[error("{image}: backing file {backing:?} is refused: {reason}")]
    BackingRefused {
        /// The image whose header names the backing file.
        image: String,
        /// The backing file name as the header gives it.
        backing: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// The caller asked for something outside the image (bad view index, read past the end, ...).
    #[error("invalid request: {what}")]
    InvalidArgument {
        /// What was wrong with the request.
        what: String,
    },
}

impl Qcow2Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Qcow2Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn malformed(what: impl Into<String>, offset: u64) -> Self {
        Qcow2Error::Malformed {
            what: what.into(),
            offset,
        }
    }

    pub(crate) fn unsupported(feature: impl Into<String>) -> Self {
        Qcow2Error::Unsupported {
            feature: feature.into(),
        }
    }

    pub(crate) fn too_large(what: impl Into<String>) -> Self {
        Qcow2Error::TooLarge { what: what.into() }
    }

    pub(crate) fn invalid(what: impl Into<String>) -> Self {
        Qcow2Error::InvalidArgument { what: what.into() }
    }
}
