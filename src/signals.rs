//! SIGINT and SIGTERM, for commands that end cleanly when asked: `export` stops serving,
//! a replication from a running VM stops reading and removes what it added to the VM.

use anyhow::{Context, Result};

/// Run `then` on a thread of its own when the process gets SIGINT or SIGTERM. From then
/// on those signals no longer kill the process: `then` must make it end.
pub fn on_interrupt(then: impl FnOnce() + Send + 'static) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal watcher")?;
    // Registered here, before this returns, so that no signal slips through.
    let (mut int, mut term) = runtime
        .block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .context("cannot watch for signals")?;
    std::thread::Builder::new()
        .name("snapsync-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            then();
        })
        .context("cannot start the signal watcher")?;
    Ok(())
}

/// Run `hangup` on every SIGHUP and `stop` on every SIGINT or SIGTERM, on a thread of
/// their own, for as long as the process lives (`snapsync daemon`: reload, stop). The
/// signals are watched before this returns.
pub fn watch(hangup: impl Fn() + Send + 'static, stop: impl Fn() + Send + 'static) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal watcher")?;
    let (mut hup, mut int, mut term) = runtime
        .block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((
                signal(SignalKind::hangup())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .context("cannot watch for signals")?;
    std::thread::Builder::new()
        .name("snapsync-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                loop {
                    tokio::select! {
                        _ = hup.recv() => hangup(),
                        _ = int.recv() => stop(),
                        _ = term.recv() => stop(),
                    }
                }
            })
        })
        .context("cannot start the signal watcher")?;
    Ok(())
}
