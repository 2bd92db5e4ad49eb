//! Quality control on sampled frames: the windowed quality mean, and picture segments
//! (black, frozen, colour bars).
//!
//! The segment detectors are a table indexed by [`SegmentKind`]: each kind's metrics
//! (`streamiq_{name}_active`, `streamiq_{name}_events_total`), API fields
//! (`{name}_active` in `/api/v1/streams`) and `scan` report fields (`{name}_segments`)
//! are made from its name, and its `[qc]` keys are `{name}_*` (config.rs). Adding a
//! detector is a variant here, its per-frame test in [`PictureDetectors::update`] and
//! its keys in config.rs.
//!
//! Segments are found in stream time (seconds). A run of matching frames becomes an
//! *active* segment as soon as it has lasted the minimum duration (not when it ends);
//! it ends at the first frame that no longer matches. A frozen run is measured against
//! its first frame (the anchor), not only frame to frame, so that slow motion never
//! adds up to a freeze: a frame continues the run when it is within `qc.freeze_mad_max`
//! of the anchor, or within it of the previous frame while no further than
//! [`FREEZE_DRIFT`] times that from the anchor. The second rule keeps a still picture one
//! freeze while an encoder refines it within a GOP and re-encodes it at the next key
//! frame (each step well under a grey level, a few steps adding up past the limit),
//! where FFmpeg's `freezedetect`, which compares with the first frame only, splits it.
//! Black frames never count as frozen.

use std::collections::{BTreeMap, VecDeque};
use std::ops::{Index, IndexMut};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::QcSettings;
use crate::frame::{RgbImage, luma256};

/// How far (in multiples of `qc.freeze_mad_max`) a frozen run may drift from its first
/// frame through small frame-to-frame steps (an encoder refining a still picture).
pub const FREEZE_DRIFT: f32 = 4.0;

/// A kind of picture segment a stream can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SegmentKind {
    /// A black (or nearly black) picture.
    Black,
    /// A frozen picture: unchanged against the run's first frame.
    Freeze,
    /// Colour bars (SMPTE / EBU test pattern): a source that is not on air.
    Bars,
}

impl SegmentKind {
    /// Every kind, in table order.
    pub const ALL: [SegmentKind; 3] = [Self::Black, Self::Freeze, Self::Bars];

    /// The name in metric names, API fields and `[qc]` keys.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Black => "black",
            Self::Freeze => "freeze",
            Self::Bars => "bars",
        }
    }

    /// What a segment of this kind is, for metric help texts.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Black => "a black picture",
            Self::Freeze => "a frozen picture",
            Self::Bars => "colour bars",
        }
    }
}

/// One value per [`SegmentKind`], indexed by it.
#[derive(Debug, Clone, PartialEq)]
pub struct PerKind<T>([T; SegmentKind::ALL.len()]);

impl<T> PerKind<T> {
    /// The value of each kind from `f`.
    pub fn from_fn(mut f: impl FnMut(SegmentKind) -> T) -> Self {
        Self(SegmentKind::ALL.map(&mut f))
    }

    /// Each kind with its value, in table order.
    pub fn iter(&self) -> impl Iterator<Item = (SegmentKind, &T)> {
        SegmentKind::ALL.into_iter().zip(&self.0)
    }

    /// Each kind with its value, mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (SegmentKind, &mut T)> {
        SegmentKind::ALL.into_iter().zip(&mut self.0)
    }

    /// A value of another type per kind.
    pub fn map<U>(&self, mut f: impl FnMut(SegmentKind, &T) -> U) -> PerKind<U> {
        PerKind::from_fn(|k| f(k, &self[k]))
    }

    /// The values keyed `{name}{suffix}` (e.g. `black_active`), for JSON fields.
    pub fn named<'a, U>(
        &'a self,
        suffix: &str,
        mut f: impl FnMut(&'a T) -> U,
    ) -> BTreeMap<String, U> {
        self.iter()
            .map(|(k, v)| (format!("{}{suffix}", k.name()), f(v)))
            .collect()
    }
}

impl<T: Default> Default for PerKind<T> {
    fn default() -> Self {
        Self::from_fn(|_| T::default())
    }
}

impl<T> Index<SegmentKind> for PerKind<T> {
    type Output = T;
    fn index(&self, k: SegmentKind) -> &T {
        &self.0[k as usize]
    }
}

impl<T> IndexMut<SegmentKind> for PerKind<T> {
    fn index_mut(&mut self, k: SegmentKind) -> &mut T {
        &mut self.0[k as usize]
    }
}

/// A finished (or, at end of input, closed) segment in stream seconds; serialised as
/// `{"start", "end", "duration"}`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Segment {
    /// First second of the segment.
    pub start: f64,
    /// First second after it.
    pub end: f64,
}

impl Segment {
    /// Length in seconds.
    pub fn duration(&self) -> f64 {
        self.end - self.start
    }
}

impl Serialize for Segment {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Segment", 3)?;
        st.serialize_field("start", &self.start)?;
        st.serialize_field("end", &self.end)?;
        st.serialize_field("duration", &self.duration())?;
        st.end()
    }
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
        // A row's sum fits in 32 bits (255 per byte): vector lanes of 32 bits.
        sum += u64::from(
            ra.iter()
                .zip(rb)
                .map(|(x, y)| u32::from(x.abs_diff(*y)))
                .sum::<u32>(),
        );
    }
    Some(sum as f32 / (a.width * a.height * 3).max(1) as f32 / 255.0)
}

/// Which of R, G, B are lit in each of the seven colour bars, left to right.
const BAR_CHANNELS: [[bool; 3]; 7] = [
    [true, true, true],
    [true, true, false],
    [false, true, true],
    [false, true, false],
    [true, false, true],
    [true, false, false],
    [false, false, true],
];

/// Whether `img` shows colour bars: across the upper part of the picture, seven
/// vertical bars of even colour in the SMPTE / EBU order (grey or white, yellow, cyan,
/// green, magenta, red, blue), whatever their level (75 % or 100 %, studio or full
/// range). A natural picture practically never has seven flat bands with exactly this
/// pattern of colour channels.
pub fn looks_like_bars(img: &RgbImage) -> bool {
    let (w, h) = (img.width, img.height);
    if w < 28 || h < 8 {
        return false;
    }
    // SMPTE bars fill the top two thirds; EBU bars the whole height.
    let (y0, y1) = (h / 10, h * 6 / 10);
    let mut means = [[0f32; 3]; 7];
    for (bar, mean) in means.iter_mut().enumerate() {
        // The middle 60 % of each bar, away from its edges (scaling blurs them).
        let (x0, x1) = (w * (5 * bar + 1) / 35, w * (5 * bar + 4) / 35);
        let n = ((x1 - x0) * (y1 - y0)) as f32;
        let mut sum = [0u64; 3];
        for y in y0..y1 {
            for px in img.row(y)[3 * x0..3 * x1].chunks_exact(3) {
                (0..3).for_each(|c| sum[c] += px[c] as u64);
            }
        }
        *mean = sum.map(|s| s as f32 / n);
        let mut dev = 0f32;
        for y in y0..y1 {
            for px in img.row(y)[3 * x0..3 * x1].chunks_exact(3) {
                dev += (0..3).map(|c| (px[c] as f32 - mean[c]).abs()).sum::<f32>();
            }
        }
        // An even bar: within 4 grey levels per channel on average.
        if dev / (3.0 * n) > 4.0 {
            return false;
        }
    }
    (0..3).all(|c| {
        let on = means.iter().map(|m| m[c]).fold(f32::MIN, f32::max);
        let off = means.iter().map(|m| m[c]).fold(f32::MAX, f32::min);
        // Lit and unlit channels at least 96 grey levels apart, and each bar's channel
        // clearly at one of the two levels.
        on - off >= 96.0
            && means.iter().zip(BAR_CHANNELS).all(|(m, p)| {
                let level = (m[c] - off) / (on - off);
                if p[c] { level > 0.8 } else { level < 0.2 }
            })
    })
}

/// Events produced by one frame, per kind.
pub type QcEvents = PerKind<Transition>;

/// Picture-segment detection for one stream (black, freeze, colour bars). Holds the
/// freeze anchor frame.
pub struct PictureDetectors<A> {
    luma_max: f32,
    pixel_ratio: f32,
    mad_max: f32,
    /// One segment detector per kind.
    pub segments: PerKind<SegmentDetector>,
    anchor: Option<(f64, A)>,
    /// The previous picture (not black, not bars).
    previous: Option<A>,
    last_end: Option<f64>,
    flags: PerKind<bool>,
}

impl<A: AsRef<RgbImage> + Clone> PictureDetectors<A> {
    /// Detectors with `[qc]`'s thresholds.
    pub fn new(qc: &QcSettings) -> Self {
        Self {
            luma_max: qc.black_luma_max,
            pixel_ratio: qc.black_pixel_ratio,
            mad_max: qc.freeze_mad_max,
            segments: qc.min_duration.map(|_, d| SegmentDetector::new(*d)),
            anchor: None,
            previous: None,
            last_end: None,
            flags: PerKind::default(),
        }
    }

    /// What the last frame was by itself: black, still (like the first picture of its
    /// still run) or colour bars, before any minimum duration.
    pub fn flags(&self) -> &PerKind<bool> {
        &self.flags
    }

    /// Whether a segment of `kind` is active.
    pub fn is_active(&self, kind: SegmentKind) -> bool {
        self.segments[kind].is_active()
    }

    /// Feeds one frame at stream time `t` lasting `duration` seconds (if known).
    /// `frame` is kept as the freeze anchor when it starts a new still run. A black
    /// picture or colour bars are never also a freeze: each is its own diagnosis.
    pub fn update(&mut self, t: f64, duration: Option<f64>, frame: A) -> QcEvents {
        let end = t + duration.unwrap_or(0.0);
        self.last_end = Some(end);
        let img = frame.as_ref();
        let black = dark_ratio(img, self.luma_max) >= self.pixel_ratio;
        let bars = !black && looks_like_bars(img);
        let still = if black || bars {
            self.anchor = None;
            self.previous = None;
            None
        } else {
            let near_previous = || {
                self.previous
                    .as_ref()
                    .and_then(|p| mean_abs_diff(p.as_ref(), img))
                    .is_some_and(|mad| mad <= self.mad_max)
            };
            let still = self.anchor.as_ref().and_then(|(t0, a)| {
                let drift = mean_abs_diff(a.as_ref(), img)?;
                (drift <= self.mad_max || (drift <= FREEZE_DRIFT * self.mad_max && near_previous()))
                    .then_some(*t0)
            });
            if still.is_none() {
                self.anchor = Some((t, frame.clone()));
            }
            self.previous = Some(frame);
            still
        };
        let runs = PerKind::from_fn(|k| match k {
            SegmentKind::Black => black.then_some(t),
            SegmentKind::Freeze => still,
            SegmentKind::Bars => bars.then_some(t),
        });
        self.flags = runs.map(|_, r| r.is_some());
        PerKind::from_fn(|k| self.segments[k].update(t, end, runs[k]))
    }

    /// Closes open segments at the end of input (the last frame's end).
    pub fn finish(&mut self) -> QcEvents {
        let t = self.last_end.unwrap_or(0.0);
        self.anchor = None;
        self.previous = None;
        PerKind::from_fn(|k| self.segments[k].close(t))
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

    /// Adds `score` seen at `now` and drops samples older than the window. A score that
    /// is not a finite number is ignored: it would make the running sum, and so the
    /// gauge, NaN for good.
    pub fn push(&mut self, now: Instant, score: f32) {
        if !score.is_finite() {
            return;
        }
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
            freeze_mad_max: 0.002,
            min_duration: PerKind::from_fn(|_| Duration::from_secs(2)),
            stall_timeout: Duration::from_secs(5),
        }
    }

    #[derive(Clone)]
    struct Img(std::sync::Arc<RgbImage>);
    impl AsRef<RgbImage> for Img {
        fn as_ref(&self) -> &RgbImage {
            &self.0
        }
    }

    fn solid(v: u8) -> Img {
        Img(std::sync::Arc::new(RgbImage::from_packed(
            8,
            8,
            vec![v; 8 * 8 * 3],
        )))
    }

    fn moving(i: usize) -> Img {
        Img(std::sync::Arc::new(RgbImage::from_packed(
            8,
            8,
            (0..8 * 8 * 3)
                .map(|k| ((k * 7 + i * 13) % 256) as u8)
                .collect(),
        )))
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
            if let Transition::Ended(s) = ev[SegmentKind::Black] {
                black.push(s);
            }
            if let Transition::Ended(s) = ev[SegmentKind::Freeze] {
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

    /// An 8x8 grey picture (values 100..164) brightened by `tenths` / 10 grey levels on
    /// average: every value by `tenths / 10`, and the first share `tenths % 10` / 10 of
    /// the values by one more.
    fn brightened(tenths: usize) -> Img {
        let n = 8 * 8 * 3;
        Img(std::sync::Arc::new(RgbImage::from_packed(
            8,
            8,
            (0..n)
                .map(|k| {
                    (100 + k % 64 + tenths / 10 + usize::from(k * 10 < n * (tenths % 10))) as u8
                })
                .collect(),
        )))
    }

    /// Frozen runs over `pictures` (one per 0.1 s, `tenths` of brightening each).
    fn freezes(pictures: impl IntoIterator<Item = usize>) -> Vec<Segment> {
        let mut det = PictureDetectors::new(&qc());
        let mut out = Vec::new();
        let mut last = 0.0;
        for (i, tenths) in pictures.into_iter().enumerate() {
            last = i as f64 * 0.1;
            if let Transition::Ended(s) =
                det.update(last, Some(0.1), brightened(tenths))[SegmentKind::Freeze]
            {
                out.push(s);
            }
        }
        if let Transition::Ended(s) = det.finish()[SegmentKind::Freeze] {
            out.push(s);
        }
        assert!(last > 0.0);
        out
    }

    #[test]
    fn a_still_picture_refined_in_small_steps_stays_one_freeze_but_slow_change_does_not() {
        // qc() allows 0.51 grey levels (0.002). An encoder refining a still picture: 0.4
        // grey levels at a time, 1.6 in all, each step held for 1 s.
        let refined = (0..50).map(|i| (i / 10) * 4);
        assert_eq!(
            freezes(refined),
            [Segment {
                start: 0.0,
                end: 5.0
            }],
            "one freeze from the first picture to the end"
        );
        // The same steps going on (a slow fade): the drift passes 4 x 0.51 levels after
        // the sixth step, and the next run, from there, starts again.
        let fading = (0..100).map(|i| (i / 10) * 4);
        let runs = freezes(fading);
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert!((runs[0].end - 6.0).abs() < 1e-9, "{runs:?}");
        // Steps too large to be refinement (0.6 levels) never continue a run.
        let jumps = (0..40).map(|i| (i / 5) * 6);
        assert!(freezes(jumps).is_empty());
    }

    #[test]
    fn open_segment_closes_at_end_of_input() {
        let mut det = PictureDetectors::new(&qc());
        for i in 0..30 {
            det.update(i as f64 * 0.1, Some(0.1), solid(0));
        }
        let ev = det.finish();
        match ev[SegmentKind::Black] {
            Transition::Ended(s) => assert!(s.start == 0.0 && (s.end - 3.0).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ev[SegmentKind::Freeze],
            Transition::None,
            "black is never also frozen"
        );
    }

    /// Seven vertical bars over the top two thirds (SMPTE layout) at `level` (191 =
    /// 75 %, 255 = 100 %) on `floor` (0 full range, 16 studio range), dark below.
    fn bars(w: usize, h: usize, level: u8, floor: u8) -> RgbImage {
        bars_in_order(w, h, level, floor, |i| i)
    }

    fn bars_in_order(
        w: usize,
        h: usize,
        level: u8,
        floor: u8,
        order: impl Fn(usize) -> usize,
    ) -> RgbImage {
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let bar = BAR_CHANNELS[order(x * 7 / w)];
                for on in bar {
                    data.push(if y < h * 2 / 3 && on { level } else { floor });
                }
            }
        }
        RgbImage::from_packed(w, h, data)
    }

    #[test]
    fn colour_bars_are_recognised_and_natural_pictures_are_not() {
        assert!(looks_like_bars(&bars(398, 224, 191, 0)));
        assert!(looks_like_bars(&bars(224, 224, 255, 16)));
        assert!(looks_like_bars(&bars(64, 36, 180, 16)));
        // Bars in another order, a grey ramp, noise, a flat grey: not bars.
        assert!(!looks_like_bars(&bars_in_order(398, 224, 191, 0, |i| 6 - i)));
        let ramp: Vec<u8> = (0..224 * 398 * 3)
            .map(|i| ((i / 3) % 398 * 255 / 398) as u8)
            .collect();
        assert!(!looks_like_bars(&RgbImage::from_packed(398, 224, ramp)));
        assert!(!looks_like_bars(&moving(3).0));
        assert!(!looks_like_bars(&solid(128).0));
        assert!(!looks_like_bars(&bars(20, 20, 191, 0)), "too small to tell");
    }

    #[test]
    fn bars_make_a_segment_of_their_own_never_a_freeze() {
        let mut det = PictureDetectors::new(&qc());
        let img = || Img(std::sync::Arc::new(bars(112, 64, 191, 16)));
        let mut events = Vec::new();
        for i in 0..30 {
            let ev = det.update(i as f64 * 0.1, Some(0.1), img());
            assert_eq!(ev[SegmentKind::Freeze], Transition::None);
            assert_eq!(ev[SegmentKind::Black], Transition::None);
            events.push(ev[SegmentKind::Bars]);
        }
        assert!(
            events.contains(&Transition::Started { start: 0.0 }),
            "{events:?}"
        );
        assert!(det.is_active(SegmentKind::Bars));
        match det.finish()[SegmentKind::Bars] {
            Transition::Ended(s) => assert!(s.start == 0.0 && (s.end - 3.0).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
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
        // Not a number, or infinite: ignored, the mean stays a number.
        w.push(t0 + Duration::from_secs(13), f32::NAN);
        w.push(t0 + Duration::from_secs(13), f32::INFINITY);
        assert_eq!(w.mean(), Some(0.0));
        w.push(t0 + Duration::from_secs(14), 1.0);
        assert_eq!(
            w.mean(),
            Some(1.0 / 3.0),
            "the 0s at 5 s and 12 s, and this 1"
        );
    }
}
