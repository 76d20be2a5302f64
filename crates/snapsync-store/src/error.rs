//! The error type shared by every store.
//!
//! Variants are semantic (what went wrong), not per backend, so callers can react to
//! `NotFound` or `Conflict` the same way whichever store produced them. Every message
//! names what and where, because it ends up as the one line a user sees.

use snapsync_core::NameError;

/// Result with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What a store operation can fail with.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A volume, snapshot, object or block does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, and where.
        what: String,
    },
    /// Something that must be created fresh already exists.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What, and where.
        what: String,
    },
    /// A concurrent writer won a commit race, or a precondition did not hold.
    #[error("conflict: {what}")]
    Conflict {
        /// What conflicted.
        what: String,
    },
    /// Stored data is damaged or is not what it claims to be.
    #[error("corrupt {location}: {detail}")]
    Corrupt {
        /// The object or file.
        location: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The input is not something this store can read.
    #[error("{location}: {detail}")]
    Malformed {
        /// The file or image.
        location: String,
        /// What is wrong.
        detail: String,
    },
    /// The repository is encrypted and no passphrase or key file was given.
    #[error("{what} is encrypted and no passphrase or key file was given")]
    KeyRequired {
        /// The repository.
        what: String,
    },
    /// No key of an encrypted repository opens with the passphrases or key files given.
    #[error("wrong passphrase or key file for {what}: none of its keys opens with it")]
    WrongKey {
        /// The repository.
        what: String,
    },
    /// The store cannot do this.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What was asked.
        what: String,
    },
    /// An argument a caller (or a peer) gave is not valid here: a block index past the
    /// end of a snapshot, a block id the sink does not hold, a timestamp out of range.
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What is wrong, and where.
        what: String,
    },
    /// A name that cannot be used as a volume or snapshot name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and on which path.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Any other backend failure (an object store, a network peer).
    #[error("{context}: {source}")]
    Backend {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    /// Wrap an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }

    /// A not-found error.
    pub fn not_found(what: impl Into<String>) -> Self {
        StoreError::NotFound { what: what.into() }
    }

    /// An invalid-argument error.
    pub fn invalid_argument(what: impl Into<String>) -> Self {
        StoreError::InvalidArgument { what: what.into() }
    }

    /// A corruption error.
    pub fn corrupt(location: impl Into<String>, detail: impl Into<String>) -> Self {
        StoreError::Corrupt {
            location: location.into(),
            detail: detail.into(),
        }
    }
}
