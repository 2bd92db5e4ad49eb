//! Batching: frames from every stream are grouped before they reach the model.
//!
//! [`BatchState`] is the pure rule (flush on `max_batch`, on `max_wait` counted from
//! the batch's first frame, or at end of input); [`batching_task`] is the small loop
//! that moves frames from the handoff queue through it.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

/// Frames waiting to be scored, and when the first of them arrived.
#[derive(Debug)]
pub struct BatchState<T> {
    items: Vec<T>,
    first_at: Option<Instant>,
    max_batch: usize,
    max_wait: Duration,
}

impl<T> BatchState<T> {
    /// An empty batch that flushes at `max_batch` items or `max_wait` after its first.
    pub fn new(max_batch: usize, max_wait: Duration) -> Self {
        assert!(max_batch > 0, "max_batch must be at least 1");
        Self {
            items: Vec::with_capacity(max_batch),
            first_at: None,
            max_batch,
            max_wait,
        }
    }

    /// Adds an item that arrived at `now`.
    pub fn push(&mut self, item: T, now: Instant) {
        self.first_at.get_or_insert(now);
        self.items.push(item);
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether the batch reached `max_batch`.
    pub fn is_full(&self) -> bool {
        self.items.len() >= self.max_batch
    }

    /// When the batch must be flushed at the latest, if it holds anything.
    pub fn deadline(&self) -> Option<Instant> {
        self.first_at.map(|t| t + self.max_wait)
    }

    /// Whether the batch should be flushed at `now`.
    pub fn should_flush(&self, now: Instant) -> bool {
        self.is_full() || self.deadline().is_some_and(|d| now >= d)
    }

    /// Takes the waiting items and starts a new batch.
    pub fn take(&mut self) -> Vec<T> {
        self.first_at = None;
        std::mem::replace(&mut self.items, Vec::with_capacity(self.max_batch))
    }
}

/// Moves items from `rx` into batches and hands each batch to `flush`.
///
/// Returns when `rx` is disconnected (all senders dropped: end of input), after
/// flushing what is left, or when `flush` returns false (its consumer is gone).
/// `on_depth` is told the queue depth after every receive.
pub fn batching_task<T>(
    rx: Receiver<T>,
    max_batch: usize,
    max_wait: Duration,
    mut flush: impl FnMut(Vec<T>) -> bool,
    on_depth: impl Fn(usize),
) {
    let mut state = BatchState::new(max_batch, max_wait);
    loop {
        let received = match state.deadline() {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(deadline) => rx.recv_deadline(deadline),
        };
        on_depth(rx.len());
        let done = match received {
            Ok(item) => {
                state.push(item, Instant::now());
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if (done || state.should_flush(Instant::now())) && !state.is_empty() && !flush(state.take())
        {
            return;
        }
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(20);

    #[test]
    fn flushes_when_full() {
        let t0 = Instant::now();
        let mut b = BatchState::new(3, WAIT);
        b.push(1, t0);
        b.push(2, t0);
        assert!(!b.should_flush(t0));
        b.push(3, t0);
        assert!(b.is_full() && b.should_flush(t0));
        assert_eq!(b.take(), vec![1, 2, 3]);
        assert!(b.is_empty() && b.deadline().is_none());
    }

    #[test]
    fn deadline_counts_from_the_first_item() {
        let t0 = Instant::now();
        let mut b = BatchState::new(32, WAIT);
        assert_eq!(b.deadline(), None);
        b.push("a", t0);
        b.push("b", t0 + Duration::from_millis(15));
        assert_eq!(b.deadline(), Some(t0 + WAIT));
        assert!(!b.should_flush(t0 + Duration::from_millis(19)));
        assert!(b.should_flush(t0 + WAIT));
        b.take();
        b.push("c", t0 + Duration::from_millis(30));
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(50)));
    }

    #[test]
    fn task_flushes_partial_batch_at_end_of_input() {
        let (tx, rx) = crossbeam_channel::bounded(16);
        let (btx, brx) = crossbeam_channel::unbounded();
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        drop(tx);
        batching_task(
            rx,
            4,
            Duration::from_secs(3600),
            move |b| btx.send(b).is_ok(),
            |_| {},
        );
        let batches: Vec<Vec<i32>> = brx.iter().collect();
        assert_eq!(batches, vec![vec![0, 1, 2, 3], vec![4]]);
    }

    #[test]
    fn task_flushes_on_max_wait_while_input_stays_open() {
        let (tx, rx) = crossbeam_channel::bounded(16);
        let (btx, brx) = crossbeam_channel::unbounded();
        let h = std::thread::spawn(move || {
            batching_task(rx, 100, WAIT, |b| btx.send(b).is_ok(), |_| {})
        });
        tx.send(7).unwrap();
        let got = brx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, vec![7]);
        drop(tx);
        h.join().unwrap();
    }
}
