//! What a run is held to while it moves data: a cancellation token (timeouts and
//! shutdown) and bandwidth limits (token buckets, one per job and one for all jobs).

use std::fmt;
use std::num::NonZeroU32;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use snapsync_store::StoreError;

use crate::units::{format_duration, Rate};

/// Why a run was cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    /// It ran past its job's `timeout`.
    Timeout(Duration),
    /// The daemon is stopping.
    Shutdown,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CancelReason::Timeout(d) => write!(
                f,
                "the run was cancelled: it ran past its timeout of {}",
                format_duration(*d)
            ),
            CancelReason::Shutdown => f.write_str("the run was cancelled: the daemon is stopping"),
        }
    }
}

type Hook = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct CancelState {
    reason: Option<CancelReason>,
    hooks: Vec<Hook>,
}

/// Cancels a run from another thread. The run sees it at its next read from the source
/// or write to a destination (see `guard.rs`), and at every wait for bandwidth; a source
/// that can interrupt blocked reads (a running VM's NBD connections) registers a hook.
///
/// A cancelled snapshot is never committed: the destination's receive is dropped, which
/// abandons it, as the repository guarantees for any failed receive.
#[derive(Clone, Default)]
pub struct Cancel(Arc<(Mutex<CancelState>, Condvar)>);

impl fmt::Debug for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cancel({:?})", self.reason())
    }
}

impl Cancel {
    /// A token not cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancel, for `reason` (the first reason given stays), and run the hooks.
    pub fn cancel(&self, reason: CancelReason) {
        let hooks = {
            let mut st = self.state();
            if st.reason.is_some() {
                return;
            }
            st.reason = Some(reason);
            std::mem::take(&mut st.hooks)
        };
        self.0 .1.notify_all();
        for h in hooks {
            h();
        }
    }

    /// Why it was cancelled, if it was.
    pub fn reason(&self) -> Option<CancelReason> {
        self.state().reason
    }

    /// Run `hook` when cancelled (at once if it already is).
    pub fn on_cancel(&self, hook: impl Fn() + Send + Sync + 'static) {
        let mut st = self.state();
        if st.reason.is_some() {
            drop(st);
            hook();
        } else {
            st.hooks.push(Box::new(hook));
        }
    }

    /// An error if cancelled.
    pub fn check(&self) -> Result<(), StoreError> {
        match self.reason() {
            Some(r) => Err(cancelled(r)),
            None => Ok(()),
        }
    }

    /// Sleep `d`, or less if cancelled meanwhile (then an error).
    pub fn sleep(&self, d: Duration) -> Result<(), StoreError> {
        let end = Instant::now() + d;
        let mut st = self.state();
        loop {
            if let Some(r) = st.reason {
                return Err(cancelled(r));
            }
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            st = self
                .0
                 .1
                .wait_timeout(st, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn cancelled(reason: CancelReason) -> StoreError {
    StoreError::Conflict {
        what: reason.to_string(),
    }
}

/// A token bucket on bytes, measured where they are sent.
///
/// One cell is `unit` bytes, chosen so a second holds at most a million cells (governor
/// counts time in nanoseconds; finer cells would round). The bucket holds an eighth of
/// a second's bytes: enough that writes of a batch do not wait on each other, little
/// enough that the rate over a few seconds is the rate asked.
pub struct Bandwidth {
    limiter: RateLimiter<governor::state::NotKeyed, governor::state::InMemoryState, DefaultClock>,
    clock: DefaultClock,
    unit: u64,
    burst: u32,
    rate: Rate,
}

impl fmt::Debug for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bandwidth({})", self.rate)
    }
}

/// The bucket holds at least this many bytes (a few blocks), unless the rate is lower.
const MIN_BURST_BYTES: u64 = 256 << 10;

impl Bandwidth {
    /// A bucket for `rate`.
    pub fn new(rate: Rate) -> Self {
        let bytes = u64::from(rate.bytes_per_second());
        let unit = (bytes / 1_000_000).max(1);
        let cells = u32::try_from(bytes / unit).unwrap_or(u32::MAX).max(1);
        let burst_bytes = (bytes / 8).max(MIN_BURST_BYTES).min(bytes);
        let burst = u32::try_from(burst_bytes / unit).unwrap_or(u32::MAX).max(1);
        let nz = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(nz(cells)).allow_burst(nz(burst));
        let clock = DefaultClock::default();
        Self {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
            unit,
            burst,
            rate,
        }
    }

    /// The rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Take `bytes` from the bucket, waiting as long as that needs (an error if
    /// cancelled meanwhile).
    pub fn take(&self, bytes: u64, cancel: &Cancel) -> Result<(), StoreError> {
        let mut cells = bytes.div_ceil(self.unit);
        while cells > 0 {
            let n = cells.min(u64::from(self.burst)) as u32;
            let nz = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
            loop {
                match self.limiter.check_n(nz) {
                    Ok(Ok(())) => break,
                    Ok(Err(not_until)) => {
                        cancel.sleep(not_until.wait_time_from(self.clock.now()))?;
                    }
                    // n is at most the burst: cannot happen; do not spin if it does.
                    Err(_) => return Ok(()),
                }
            }
            cells -= u64::from(n);
        }
        Ok(())
    }
}

/// The buckets a run's bytes go through: its job's and the daemon's.
#[derive(Clone, Debug, Default)]
pub struct Limits(Vec<Arc<Bandwidth>>);

impl Limits {
    /// Limits from the buckets given (none: unlimited).
    pub fn new(buckets: impl IntoIterator<Item = Arc<Bandwidth>>) -> Self {
        Self(buckets.into_iter().collect())
    }

    /// Charge `bytes` just sent to every bucket, waiting until each has them.
    pub fn charge(&self, bytes: u64, cancel: &Cancel) -> Result<(), StoreError> {
        for b in &self.0 {
            b.take(bytes, cancel)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_its_rate() {
        let b = Bandwidth::new(Rate::new(4 << 20).unwrap());
        let cancel = Cancel::new();
        let t = Instant::now();
        // 2 MiB at 4 MiB/s, of which half a MiB the bucket holds: about 0.375 s.
        for _ in 0..32 {
            b.take(64 << 10, &cancel).unwrap();
        }
        let e = t.elapsed();
        assert!(
            e >= Duration::from_millis(330) && e < Duration::from_millis(700),
            "{e:?}"
        );
    }

    #[test]
    fn a_large_write_is_taken_in_pieces() {
        let b = Bandwidth::new(Rate::new(8 << 20).unwrap());
        let t = Instant::now();
        b.take(5 << 20, &Cancel::new()).unwrap();
        let e = t.elapsed();
        assert!(
            e >= Duration::from_millis(450) && e < Duration::from_millis(900),
            "{e:?}"
        );
    }

    #[test]
    fn cancel_ends_a_wait_at_once() {
        let b = Bandwidth::new(Rate::new(1 << 10).unwrap());
        let cancel = Cancel::new();
        let c = cancel.clone();
        let hooked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = hooked.clone();
        cancel.on_cancel(move || h.store(true, std::sync::atomic::Ordering::SeqCst));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            c.cancel(CancelReason::Timeout(Duration::from_secs(2)));
        });
        let t = Instant::now();
        let e = b.take(1 << 20, &cancel).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(e.to_string().contains("timeout of 2s"), "{e}");
        assert!(hooked.load(std::sync::atomic::Ordering::SeqCst));
        // The first reason stays.
        cancel.cancel(CancelReason::Shutdown);
        assert_eq!(
            cancel.reason(),
            Some(CancelReason::Timeout(Duration::from_secs(2)))
        );
    }
}
