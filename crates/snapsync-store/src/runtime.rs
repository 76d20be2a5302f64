//! The Tokio runtime a blocking store owns, usable from any caller.
//!
//! Stores keep a blocking API (the engine is threads and rayon), and those that speak
//! async protocols (the repository's object store, the remote client) drive them on a
//! small runtime of their own. Tokio's own `Runtime::block_on` panics when called, and
//! dropping a runtime panics, inside another runtime's async context; a daemon that
//! embeds snapsync is exactly such a caller. [`OwnedRuntime`] blocks in the way the
//! caller's context allows, and shuts down without waiting when dropped there.

use std::future::Future;

use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

/// A multi-threaded runtime owned by one store.
#[derive(Debug)]
pub struct OwnedRuntime(Option<Runtime>);

impl OwnedRuntime {
    /// A runtime of `threads` worker threads named `name`, with I/O and timers.
    pub fn new(name: &str, threads: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Self(Some(runtime)))
    }

    fn runtime(&self) -> &Runtime {
        self.0.as_ref().expect("the runtime lives until drop")
    }

    /// Its handle, to spawn tasks on it.
    pub fn handle(&self) -> &Handle {
        self.runtime().handle()
    }

    /// Spawn a task on it.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime().spawn(future)
    }

    /// Run `future` to completion on this runtime and wait for it, whoever calls:
    ///
    /// - outside any runtime, directly;
    /// - on a worker of a multi-threaded runtime, in `block_in_place`, which lets that
    ///   runtime move its other tasks to other workers meanwhile;
    /// - on a current-thread runtime (which cannot give its thread away), on a thread
    ///   of its own, so the caller's runtime is blocked but not broken.
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Err(_) => self.runtime().block_on(future),
            Ok(RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.runtime().block_on(future))
            }
            Ok(_) => std::thread::scope(|scope| {
                scope
                    .spawn(|| self.runtime().block_on(future))
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            }),
        }
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            if Handle::try_current().is_ok() {
                // Dropping a runtime waits for its blocking tasks, which async code
                // may not do: let them finish on their own.
                runtime.shutdown_background();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(rt: &OwnedRuntime) -> u32 {
        rt.block_on(async {
            tokio::task::yield_now().await;
            41 + 1
        })
    }

    #[test]
    fn blocks_from_plain_threads_and_from_both_kinds_of_async_caller() {
        let rt = OwnedRuntime::new("test-rt", 1).unwrap();
        assert_eq!(work(&rt), 42);
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(current.block_on(async { work(&rt) }), 42);
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        assert_eq!(multi.block_on(async { work(&rt) }), 42);
        // Dropped inside async code: no panic.
        current.block_on(async move { drop(rt) });
    }
}
