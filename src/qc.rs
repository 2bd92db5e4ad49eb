//! Quality control on sampled frames: the windowed quality mean, and black- and
//! frozen-picture segments.
//!
//! Segments are found in stream time (seconds). A run of matching frames becomes an
//! *active* segment as soon as it has lasted the minimum duration (not when it ends);
//! it ends at the first frame that no longer matches. A frozen run is measured against
//! its first frame (the anchor), not only frame to frame, so that slow motion never
//! adds up to a freeze; black frames never count as frozen.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::QcSettings;
use crate::frame::{RgbImage, luma256};

/// A finished (or, at end of input, closed) segment in stream seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Segment {
    /// First second of the segment.
    pub start: f64,
    /// First second after it.
    pub end: f64,
}

/// What a detector reports for one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    /// Nothing changed.
    None,
    /// A run just reached the minimum duration: the segment is active from `start`.
    Started {
        /// Segment start.
        start: f64,
    },
    /// An active segment ended.
    Ended(Segment),
}

/// Turns a per-frame yes/no into segments of at least `min` seconds.
#[derive(Debug, Clone)]
pub struct SegmentDetector {
    min: f64,
    run_start: Option<f64>,
    active: bool,
}

impl SegmentDetector {
    /// A detector for segments of at least `min`.
    pub fn new(min: Duration) -> Self {
        Self {
            min: min.as_secs_f64(),
            run_start: None,
            active: false,
        }
    }

    /// Whether a segment is active.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Feeds the frame shown from `t` to `end`; `run_start` is when the current
    /// matching run began (for a freeze, the anchor frame's time), or `None` if the
    /// frame does not match. A run has lasted until the end of its latest frame; since
    /// it may have begun up to one frame before its first matching sample, half a frame
    /// period is granted (at 25 fps 20 ms; at `sample_fps = 2`, 250 ms).
    pub fn update(&mut self, t: f64, end: f64, run_start: Option<f64>) -> Transition {
        match run_start {
            Some(start) => {
                let start = *self.run_start.get_or_insert(start);
                let slack = (end - t) / 2.0;
                if !self.active && end - start + slack >= self.min - 1e-6 {
                    self.active = true;
                    return Transition::Started { start };
                }
                Transition::None
            }
            None => self.close(t),
        }
    }

    /// Ends the current run at `t` (a non-matching frame, or the end of input).
    pub fn close(&mut self, t: f64) -> Transition {
        let start = self.run_start.take();
        if std::mem::take(&mut self.active) {
            Transition::Ended(Segment {
                start: start.unwrap_or(t),
                end: t,
            })
        } else {
            Transition::None
        }
    }
}

/// Per-frame statistics the detectors need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameStats {
    /// Share of pixels whose luma is at most `black_luma_max`.
    pub dark_ratio: f32,
}

/// Share of pixels with BT.601 luma (0..1) at most `luma_max`.
pub fn dark_ratio(img: &RgbImage, luma_max: f32) -> f32 {
    // Integer luma in 0..=255*256 (`luma256`).
    let limit = (luma_max * 255.0 * 256.0) as u32;
    let mut dark = 0usize;
    for y in 0..img.height {
        for px in img.row(y).chunks_exact(3) {
            dark += (luma256(px) <= limit) as usize;
        }
    }
    dark as f32 / (img.width * img.height).max(1) as f32
}

/// Mean absolute difference of two same-sized images, 0..1; `None` if sizes differ.
pub fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> Option<f32> {
    if a.width != b.width || a.height != b.height {
        return None;
    }
    let mut sum = 0u64;
    for y in 0..a.height {
        let (ra, rb) = (a.row(y), b.row(y));
        sum += ra
            .iter()
            .zip(rb)
            .map(|(x, y)| x.abs_diff(*y) as u64)
            .sum::<u64>();
    }
    Some(sum as f32 / (a.width * a.height * 3).max(1) as f32 / 255.0)
}

/// Events produced by one frame, for metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QcEvents {
    /// Black transition.
    pub black: Transition,
    /// Freeze transition.
    pub freeze: Transition,
}

/// Black and freeze detection for one stream. Holds the freeze anchor frame.
pub struct PictureDetectors<A> {
    luma_max: f32,
    pixel_ratio: f32,
    mad_max: f32,
    /// Black segments.
    pub black: SegmentDetector,
    /// Frozen segments.
    pub freeze: SegmentDetector,
    anchor: Option<(f64, A)>,
    last_end: Option<f64>,
}

impl<A: AsRef<RgbImage>> PictureDetectors<A> {
    /// Detectors with `[qc]`'s thresholds.
    pub fn new(qc: &QcSettings) -> Self {
        Self {
            luma_max: qc.black_luma_max,
            pixel_ratio: qc.black_pixel_ratio,
            mad_max: qc.freeze_mad_max,
            black: SegmentDetector::new(qc.black_min_duration),
            freeze: SegmentDetector::new(qc.freeze_min_duration),
            anchor: None,
            last_end: None,
        }
    }

    /// Feeds one frame at stream time `t` lasting `duration` seconds (if known).
    /// `frame` is kept as the freeze anchor when it starts a new still run.
    pub fn update(&mut self, t: f64, duration: Option<f64>, frame: A) -> QcEvents {
        let end = t + duration.unwrap_or(0.0);
        self.last_end = Some(end);
        let is_black = dark_ratio(frame.as_ref(), self.luma_max) >= self.pixel_ratio;
        let black = self.black.update(t, end, is_black.then_some(t));
        if is_black {
            self.anchor = None;
            return QcEvents {
                black,
                freeze: self.freeze.update(t, end, None),
            };
        }
        let still = self.anchor.as_ref().and_then(|(t0, a)| {
            mean_abs_diff(a.as_ref(), frame.as_ref())
                .filter(|mad| *mad <= self.mad_max)
                .map(|_| *t0)
        });
        let freeze = self.freeze.update(t, end, still);
        if still.is_none() {
            self.anchor = Some((t, frame));
        }
        QcEvents { black, freeze }
    }

    /// Closes open segments at the end of input (the last frame's end).
    pub fn finish(&mut self) -> QcEvents {
        let t = self.last_end.unwrap_or(0.0);
        self.anchor = None;
        QcEvents {
            black: self.black.close(t),
            freeze: self.freeze.close(t),
        }
    }
}

/// Mean of the scores seen over a sliding wall-clock window.
#[derive(Debug, Clone)]
pub struct QualityWindow {
    window: Duration,
    samples: VecDeque<(Instant, f32)>,
    sum: f64,
}

impl QualityWindow {
    /// A window of `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
            sum: 0.0,
        }
    }

    /// Adds `score` seen at `now` and drops samples older than the window.
    pub fn push(&mut self, now: Instant, score: f32) {
        self.samples.push_back((now, score));
        self.sum += score as f64;
        while let Some(&(t, s)) = self.samples.front() {
            if now.duration_since(t) <= self.window {
                break;
            }
            self.samples.pop_front();
            self.sum -= s as f64;
        }
    }

    /// The mean, or `None` if the window is empty.
    pub fn mean(&self) -> Option<f64> {
        (!self.samples.is_empty()).then(|| (self.sum / self.samples.len() as f64).clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qc() -> QcSettings {
        QcSettings {
            window: Duration::from_secs(10),
            black_luma_max: 0.1,
            black_pixel_ratio: 0.98,
            black_min_duration: Duration::from_secs(2),
            freeze_mad_max: 0.002,
            freeze_min_duration: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(5),
        }
    }

    struct Img(RgbImage);
    impl AsRef<RgbImage> for Img {
        fn as_ref(&self) -> &RgbImage {
            &self.0
        }
    }

    fn solid(v: u8) -> Img {
        Img(RgbImage::from_packed(8, 8, vec![v; 8 * 8 * 3]))
    }

    fn moving(i: usize) -> Img {
        Img(RgbImage::from_packed(
            8,
            8,
            (0..8 * 8 * 3)
                .map(|k| ((k * 7 + i * 13) % 256) as u8)
                .collect(),
        ))
    }

    #[test]
    fn segment_becomes_active_at_min_duration_and_ends_on_first_mismatch() {
        let mut d = SegmentDetector::new(Duration::from_secs(2));
        let mut feed = |t: f64, m: bool| d.update(t, t + 0.5, m.then_some(t));
        assert_eq!(feed(0.0, true), Transition::None);
        assert_eq!(feed(1.0, true), Transition::None);
        // Active once the run covers 2 s: frames at 0, 0.5, 1.0, 1.5 shown until 2.0.
        assert_eq!(feed(1.5, true), Transition::Started { start: 0.0 });
        assert_eq!(feed(2.5, true), Transition::None);
        let ended = Transition::Ended(Segment {
            start: 0.0,
            end: 3.0,
        });
        assert_eq!(feed(3.0, false), ended);
        // A short run never becomes a segment.
        feed(4.0, true);
        assert_eq!(feed(5.0, false), Transition::None);
        assert!(!d.is_active());
    }

    #[test]
    fn black_and_freeze_segments_on_synthetic_frames() {
        let mut det = PictureDetectors::new(&qc());
        let fps = 10.0;
        let mut black = Vec::new();
        let mut freeze = Vec::new();
        let mut record = |ev: QcEvents| {
            if let Transition::Ended(s) = ev.black {
                black.push(s);
            }
            if let Transition::Ended(s) = ev.freeze {
                freeze.push(s);
            }
        };
        // 0-3 s motion, 3-6 s black, 6-9 s motion, 9-12 s frozen, 12-13 s motion.
        for i in 0..130 {
            let t = i as f64 / fps;
            let f = if (3.0..6.0).contains(&t) {
                solid(5)
            } else if (9.0..12.0).contains(&t) {
                moving(90)
            } else {
                moving(i)
            };
            record(det.update(t, Some(1.0 / fps), f));
        }
        record(det.finish());
        assert_eq!(
            black,
            vec![Segment {
                start: 3.0,
                end: 6.0
            }]
        );
        assert_eq!(freeze.len(), 1, "{freeze:?}");
        assert!((freeze[0].start - 9.0).abs() < 1e-9 && (freeze[0].end - 12.0).abs() < 1e-9);
    }

    #[test]
    fn open_segment_closes_at_end_of_input() {
        let mut det = PictureDetectors::new(&qc());
        for i in 0..30 {
            det.update(i as f64 * 0.1, Some(0.1), solid(0));
        }
        let ev = det.finish();
        match ev.black {
            Transition::Ended(s) => assert!(s.start == 0.0 && (s.end - 3.0).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
        assert_eq!(ev.freeze, Transition::None, "black is never also frozen");
    }

    #[test]
    fn quality_window_mean() {
        let t0 = Instant::now();
        let mut w = QualityWindow::new(Duration::from_secs(10));
        assert_eq!(w.mean(), None);
        w.push(t0, 1.0);
        w.push(t0 + Duration::from_secs(5), 0.0);
        assert_eq!(w.mean(), Some(0.5));
        w.push(t0 + Duration::from_secs(12), 0.0);
        assert_eq!(w.mean(), Some(0.0));
    }
}
