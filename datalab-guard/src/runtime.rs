//! What `local` and `node` share around their async work: the runtime, the signals that
//! end them, and the one that makes `node` reload its config. The streams are created once, up front: a SIGTERM that arrives while a
//! reconcile runs is kept and seen at the next `terminated()`, never lost between loop turns.

use anyhow::Context as _;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Two worker threads: the agent's work is small and bursty, and nodes are shared.
pub fn build() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// SIGTERM and SIGINT: exit, leaving enforcement pinned.
pub struct Termination {
    term: Signal,
    int: Signal,
}

impl Termination {
    /// Must be called inside the runtime.
    pub fn new() -> anyhow::Result<Termination> {
        Ok(Termination {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT (or one already received).
    pub async fn terminated(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}

/// SIGHUP: reload the config (node mode). Created first thing in `node`, so a SIGHUP that
/// arrives during start-up (before the first sync) waits for the loop instead of killing
/// the agent with the signal's default action.
pub struct Hangup(Signal);

impl Hangup {
    /// Must be called inside the runtime.
    pub fn new() -> anyhow::Result<Hangup> {
        Ok(Hangup(
            signal(SignalKind::hangup()).context("cannot watch SIGHUP")?,
        ))
    }

    /// Resolves at the next SIGHUP (or one already received).
    pub async fn received(&mut self) {
        if self.0.recv().await.is_none() {
            // The stream cannot end while the runtime runs; never spin if it did.
            std::future::pending::<()>().await;
        }
    }
}
