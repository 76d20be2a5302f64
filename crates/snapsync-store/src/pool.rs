//! Large buffers reused once nothing holds them any more.
//!
//! Block data travels as slices of the buffer it was read or decoded into (a sink may
//! keep them until its pack is stored), so a buffer cannot simply be freed or reused
//! when its batch is handed on. And a fresh multi-megabyte buffer per batch costs page
//! faults, zeroing and an unmap each time: glibc maps allocations this large and hands
//! freed ones back to the kernel. The pool keeps handles to buffers it gave out and
//! lends one again once its handle is the last (`Bytes::is_unique`).

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

/// Buffers lent out and given back, for reuse once unshared.
#[derive(Debug)]
pub struct BufferPool {
    spare: Mutex<VecDeque<Bytes>>,
    max: usize,
}

impl BufferPool {
    /// A pool remembering at most `max` buffers: about as many as its users hold at once
    /// (a buffer given back beyond that is simply freed when unshared).
    pub fn new(max: usize) -> Self {
        BufferPool {
            spare: Mutex::new(VecDeque::new()),
            max,
        }
    }

    /// A buffer of `len` initialised bytes: one given back and no longer shared, or a
    /// new zeroed one. Its contents are unspecified; callers overwrite them.
    pub fn take(&self, len: usize) -> BytesMut {
        let reused = {
            let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            spare
                .iter()
                .position(Bytes::is_unique)
                .and_then(|i| spare.remove(i))
        };
        let mut buf = reused
            .and_then(|b| b.try_into_mut().ok())
            .unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    /// Hand back a buffer from [`BufferPool::take`], frozen and possibly still sliced:
    /// it is lent again once those slices are gone.
    pub fn give_back(&self, buf: Bytes) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() >= self.max {
            spare.pop_front();
        }
        spare.push_back(buf);
    }

    /// Forget every buffer (each is freed once its last slice is gone): when a pass is
    /// over, what follows it (a commit) should not run with the pass's buffers held.
    pub fn clear(&self) {
        let spare = std::mem::take(&mut *self.spare.lock().unwrap_or_else(|p| p.into_inner()));
        drop(spare);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_lent_again_only_once_unshared() {
        let pool = BufferPool::new(4);
        let mut a = pool.take(1 << 20);
        a[0] = 7;
        let a = a.freeze();
        let slice = a.slice(0..16);
        pool.give_back(a);
        // Still sliced: a new buffer, and the slice is untouched by its use.
        let mut b = pool.take(1 << 20);
        b[0] = 9;
        assert_eq!(slice[0], 7);
        let b_ptr = b.as_ptr();
        pool.give_back(b.freeze());
        drop(slice);
        // Both are unshared now; the first given back is lent first.
        let c = pool.take(1 << 20);
        assert_ne!(c.as_ptr(), b_ptr);
        assert_eq!(c[0], 7, "the first buffer, reused without zeroing");
        let d = pool.take(100);
        assert_eq!(d.as_ptr(), b_ptr);
        assert_eq!(d.len(), 100);
    }

    #[test]
    fn the_pool_remembers_at_most_max_buffers() {
        let pool = BufferPool::new(2);
        for _ in 0..5 {
            pool.give_back(pool.take(10).freeze());
        }
        assert!(pool.spare.lock().unwrap().len() <= 2);
    }

    #[test]
    fn a_cleared_pool_holds_nothing() {
        let pool = BufferPool::new(4);
        let a = pool.take(64).freeze();
        let probe = a.clone();
        pool.give_back(a);
        assert!(!probe.is_unique(), "the pool holds it");
        pool.clear();
        assert!(probe.is_unique(), "the pool let go of it");
    }
}
