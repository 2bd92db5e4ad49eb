//! The frame handoff between GStreamer threads and the batcher: a bounded crossbeam
//! channel. Live sources never block: when the queue is full the `when_full` policy
//! drops a frame and counts it. Sources read as fast as scoring allows (files with
//! `realtime = false`) block instead, which is their backpressure.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::config::WhenFull;
use crate::frame::Frame;

/// Called with every frame the queue drops (to count it against its own stream).
pub type DropHook = Arc<dyn Fn(&Frame) + Send + Sync>;

/// The sending side of the frame queue, shared by every stream's appsink.
#[derive(Clone)]
pub struct Handoff {
    tx: Sender<Frame>,
    /// Held only to evict the oldest frame under `drop_oldest`.
    evict: Receiver<Frame>,
    when_full: WhenFull,
    on_drop: DropHook,
}

impl Handoff {
    /// A queue of `capacity` frames; returns the handoff and the batcher's receiver.
    pub fn new(capacity: usize, when_full: WhenFull, on_drop: DropHook) -> (Self, Receiver<Frame>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (
            Self {
                tx,
                evict: rx.clone(),
                when_full,
                on_drop,
            },
            rx,
        )
    }

    /// Offers a frame from a live source without ever blocking.
    /// Returns false if the batcher is gone.
    pub fn offer(&self, frame: Frame) -> bool {
        let mut frame = frame;
        // Under drop_oldest a few rounds may be needed when several producers race
        // for the freed slot; the last round drops the new frame instead.
        for _ in 0..4 {
            match self.tx.try_send(frame) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(f)) => match self.when_full {
                    WhenFull::DropNewest => {
                        (self.on_drop)(&f);
                        return true;
                    }
                    WhenFull::DropOldest => {
                        if let Ok(old) = self.evict.try_recv() {
                            (self.on_drop)(&old);
                        }
                        frame = f;
                    }
                },
            }
        }
        (self.on_drop)(&frame);
        true
    }

    /// Sends a frame, waiting for room (backpressure). Returns false if the batcher is gone.
    pub fn send(&self, frame: Frame) -> bool {
        self.tx.send(frame).is_ok()
    }

    /// Frames waiting.
    pub fn depth(&self) -> usize {
        self.tx.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::RgbImage;
    use std::sync::Mutex;
    use std::time::{Instant, SystemTime};

    fn frame(stream: usize, id: u64) -> Frame {
        Frame {
            id,
            stream,
            pts: None,
            duration: None,
            captured: SystemTime::now(),
            arrived: Instant::now(),
            image: Arc::new(RgbImage::from_packed(1, 1, vec![0, 0, 0])),
        }
    }

    type DropLog = Arc<Mutex<Vec<(usize, u64)>>>;

    fn recorder() -> (DropHook, DropLog) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        (
            Arc::new(move |f: &Frame| l.lock().unwrap().push((f.stream, f.id))),
            log,
        )
    }

    #[test]
    fn drop_oldest_evicts_and_counts_the_evicted_frames_stream() {
        let (hook, log) = recorder();
        let (h, rx) = Handoff::new(2, WhenFull::DropOldest, hook);
        assert!(h.offer(frame(0, 1)));
        assert!(h.offer(frame(1, 2)));
        assert!(h.offer(frame(1, 3)));
        assert!(h.offer(frame(0, 4)));
        assert_eq!(*log.lock().unwrap(), vec![(0, 1), (1, 2)]);
        let left: Vec<u64> = rx.try_iter().map(|f| f.id).collect();
        assert_eq!(left, vec![3, 4]);
    }

    #[test]
    fn drop_newest_keeps_the_queue_and_counts_the_new_frame() {
        let (hook, log) = recorder();
        let (h, rx) = Handoff::new(2, WhenFull::DropNewest, hook);
        for id in 1..=5 {
            assert!(h.offer(frame(id as usize % 2, id)));
        }
        assert_eq!(*log.lock().unwrap(), vec![(1, 3), (0, 4), (1, 5)]);
        assert_eq!(h.depth(), 2);
        let left: Vec<u64> = rx.try_iter().map(|f| f.id).collect();
        assert_eq!(left, vec![1, 2]);
    }
}
