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
    /// Values offered so far, and up to which of them the thread is done (written, or
    /// replaced by a newer one before its turn: only the newest matters).
    offered: u64,
    done: u64,
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
                offered: 0,
                done: 0,
            }),
            Condvar::new(),
        ));
        let theirs = shared.clone();
        thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut last: Option<Instant> = None;
                while let Some((value, generation)) = next(&theirs, last, min_interval) {
                    write(value);
                    last = Some(Instant::now());
                    let (lock, wake) = &*theirs;
                    lock.lock().unwrap_or_else(PoisonError::into_inner).done = generation;
                    wake.notify_all();
                }
            })?;
        Ok(LatestWriter { shared })
    }

    /// Replaces whatever is waiting with `value`.
    pub fn offer(&self, value: T) {
        self.offer_generation(value);
    }

    /// Offers `value` and waits (at most `timeout`) until it is written; `false` on timeout.
    /// For the rare write that must be on disk before the caller goes on.
    pub fn offer_and_wait(&self, value: T, timeout: Duration) -> bool {
        let generation = self.offer_generation(value);
        let (lock, wake) = &*self.shared;
        let slot = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (slot, _) = wake
            .wait_timeout_while(slot, timeout, |s| s.done < generation)
            .unwrap_or_else(PoisonError::into_inner);
        slot.done >= generation
    }

    fn offer_generation(&self, value: T) -> u64 {
        let (lock, wake) = &*self.shared;
        let mut slot = lock.lock().unwrap_or_else(PoisonError::into_inner);
        slot.pending = Some(value);
        slot.offered += 1;
        let generation = slot.offered;
        drop(slot);
        wake.notify_all();
        generation
    }
}

/// Waits for a value and for `min_interval` since the last write; `None` once closed with
/// nothing left to write. The value comes with the generation it completes.
fn next<T>(shared: &Shared<T>, last: Option<Instant>, min_interval: Duration) -> Option<(T, u64)> {
    let (lock, wake) = &**shared;
    let mut slot = lock.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if slot.pending.is_some() {
            let due = last.map_or(Instant::now(), |t| t + min_interval);
            let now = Instant::now();
            if now >= due || slot.closed {
                let generation = slot.offered;
                return slot.pending.take().map(|v| (v, generation));
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
        wake.notify_all();
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
    fn offer_and_wait_returns_once_written() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let theirs = written.clone();
        let writer = LatestWriter::spawn("test-writer", Duration::from_millis(200), move |v| {
            thread::sleep(Duration::from_millis(50));
            theirs.lock().unwrap().push(v);
        })
        .unwrap();
        writer.offer(1);
        assert!(writer.offer_and_wait(2, Duration::from_secs(5)));
        assert_eq!(written.lock().unwrap().last(), Some(&2));
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
