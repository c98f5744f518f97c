//! Slow file writes off the reconcile loop. The state file and the state cache describe
//! every environment namespace of the cluster (tens of thousands on a Datalab): serialising
//! and writing them takes milliseconds that a new pod's verdict must not wait for. The loop
//! hands the newest value to a [`LatestWriter`], whose own thread writes it; a value that is
//! replaced before its turn is never written (only the newest state matters).

use std::{
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

struct Slot<T> {
    pending: Option<T>,
    closed: bool,
}

type Shared<T> = Arc<(Mutex<Slot<T>>, Condvar)>;

/// A thread that writes the newest value offered, at most once per `min_interval`.
pub struct LatestWriter<T> {
    shared: Shared<T>,
}

impl<T: Send + 'static> LatestWriter<T> {
    /// Starts the thread; `write` runs on it for each value taken.
    pub fn spawn(
        name: &str,
        min_interval: Duration,
        mut write: impl FnMut(T) + Send + 'static,
    ) -> std::io::Result<LatestWriter<T>> {
        let shared: Shared<T> = Arc::new((
            Mutex::new(Slot {
                pending: None,
                closed: false,
            }),
            Condvar::new(),
        ));
        let theirs = shared.clone();
        thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut last: Option<Instant> = None;
                while let Some(value) = next(&theirs, last, min_interval) {
                    write(value);
                    last = Some(Instant::now());
                }
            })?;
        Ok(LatestWriter { shared })
    }

    /// Replaces whatever is waiting with `value`.
    pub fn offer(&self, value: T) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(PoisonError::into_inner).pending = Some(value);
        wake.notify_one();
    }
}

/// Waits for a value and for `min_interval` since the last write; `None` once closed with
/// nothing left to write.
fn next<T>(shared: &Shared<T>, last: Option<Instant>, min_interval: Duration) -> Option<T> {
    let (lock, wake) = &**shared;
    let mut slot = lock.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if slot.pending.is_some() {
            let due = last.map_or(Instant::now(), |t| t + min_interval);
            let now = Instant::now();
            if now >= due || slot.closed {
                return slot.pending.take();
            }
            slot = wake
                .wait_timeout(slot, due - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        } else if slot.closed {
            return None;
        } else {
            slot = wake.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl<T> Drop for LatestWriter<T> {
    /// The thread writes what is still waiting, then ends (not waited for: an exit must not
    /// hang on a slow disk).
    fn drop(&mut self) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn only_the_newest_value_is_written_and_writes_are_spaced() {
        let (tx, rx) = mpsc::channel();
        let writer = LatestWriter::spawn("test-writer", Duration::from_millis(300), move |v| {
            tx.send((v, Instant::now())).unwrap();
        })
        .unwrap();
        writer.offer(1);
        let (first, at) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first, 1);
        // Offered while the interval runs: only the last of these is written, not earlier
        // than the interval allows.
        for v in 2..=5 {
            writer.offer(v);
        }
        let (second, then) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(second, 5);
        assert!(then - at >= Duration::from_millis(290), "{:?}", then - at);
        assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    }

    #[test]
    fn what_waits_at_drop_is_still_written() {
        let (tx, rx) = mpsc::channel();
        let writer = LatestWriter::spawn("test-writer", Duration::from_secs(30), move |v| {
            tx.send(v).unwrap();
        })
        .unwrap();
        writer.offer("first");
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "first");
        writer.offer("last");
        drop(writer);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "last");
    }
}
