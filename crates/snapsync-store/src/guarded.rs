//! A receive that has had a refused request can never commit.
//!
//! A refused write may have carried blocks that the snapshot needs; committing after it
//! would silently leave them as they were in the base (or zero). The engine never does
//! that, but a peer speaking the protocol by hand can try, so the rule is enforced by the
//! sink, once for every receiver, here.

use snapsync_core::BlockId;

use crate::{CommitInfo, IncomingBlock, Receiver, Result, StoreError};

/// A [`Receiver`] that remembers its first refused request and from then on refuses
/// everything, the commit above all.
#[derive(Debug)]
pub struct Guarded<R> {
    inner: R,
    refused: Option<String>,
}

impl<R: Receiver> Guarded<R> {
    /// Guard `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            refused: None,
        }
    }

    fn check(&self) -> Result<()> {
        match &self.refused {
            None => Ok(()),
            Some(why) => Err(StoreError::Conflict {
                what: format!(
                    "this receive had a refused request ({why}); it cannot go on or be committed: rerun the replication"
                ),
            }),
        }
    }

    fn note<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.refused.get_or_insert_with(|| e.to_string());
        }
        result
    }
}

impl<R: Receiver> Receiver for Guarded<R> {
    fn missing(&mut self, ids: &[BlockId]) -> Result<Vec<bool>> {
        self.check()?;
        let r = self.inner.missing(ids);
        self.note(r)
    }

    fn missing_ahead(&mut self, ids: &[BlockId]) -> bool {
        self.refused.is_none() && self.inner.missing_ahead(ids)
    }

    fn write(&mut self, blocks: Vec<IncomingBlock>) -> Result<u64> {
        self.check()?;
        let r = self.inner.write(blocks);
        self.note(r)
    }

    fn flush(&mut self) -> Result<u64> {
        self.check()?;
        let r = self.inner.flush();
        self.note(r)
    }

    fn commit(self: Box<Self>) -> Result<CommitInfo> {
        self.check()?;
        Box::new(self.inner).commit()
    }
}
